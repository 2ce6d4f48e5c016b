//! The command line from the outside: `idkm cluster` (files in, files out),
//! and the refusal of misspelt settings before anything runs.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{randn, rel_err};
use idkm::cluster::{ClusteredWeight, KmeansConfig, Method, Solver};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

fn idkm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_idkm"))
        .args(args)
        .output()
        .expect("run idkm")
}

fn save(path: &Path, tensors: &[(&str, &Tensor)]) {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| (n.to_string(), (*t).clone()))
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

#[test]
fn cluster_writes_weights_centroids_indices_and_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let (input, grad, output) = (
        dir.path().join("w.safetensors"),
        dir.path().join("g.safetensors"),
        dir.path().join("out.safetensors"),
    );
    let w = randn(96, 1, 1, DType::F32).reshape((8, 3, 2, 2)).unwrap();
    let g = randn(96, 1, 2, DType::F32).reshape((8, 3, 2, 2)).unwrap();
    save(
        &input,
        &[
            ("conv.weight", &w),
            ("bn.bias", &randn(8, 1, 3, DType::F32)),
        ],
    );
    save(&grad, &[("conv.weight", &g)]);
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let args = [
        "cluster",
        "--input",
        &p(&input),
        "--tensor",
        "conv.weight",
        "--grad",
        &p(&grad),
        "--output",
        &p(&output),
        "--bits",
        "2",
        "--cluster-dim",
        "2",
        "--tau",
        "0.3",
        "--distance",
        "squared",
        "--method",
        "idkm",
        "--solver",
        "gmres",
        "--max-iter",
        "500",
        "--tol",
        "1e-7",
        "--seed",
        "5",
    ];
    let run = idkm(&args);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let out = candle_core::safetensors::load(&output, &Device::Cpu).unwrap();
    assert_eq!(out["weight_clustered"].dims(), [8, 3, 2, 2]);
    assert_eq!(out["grad_weight"].dims(), [8, 3, 2, 2]);
    assert_eq!(out["centroids"].dims(), [4, 2]);
    assert_eq!(out["indices"].dims(), [48]);
    assert_eq!(out["indices"].dtype(), DType::U32);
    assert_eq!(out["weight_clustered"].dtype(), DType::F32);

    // The same computation through the library.
    let cfg = KmeansConfig {
        bits: 2,
        cluster_dim: 2,
        tau: Some(0.3),
        method: Method::Idkm,
        solver: Solver::Gmres,
        max_iter: 500,
        tol: 1e-7,
        seed: 5,
        ..Default::default()
    };
    let layer = ClusteredWeight::new("conv.weight", cfg).unwrap();
    let var = Var::from_tensor(&w).unwrap();
    let soft = layer.forward(&var).unwrap();
    let gw = (&soft * &g)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
        .get(&var)
        .unwrap()
        .clone();
    assert!(rel_err(&out["weight_clustered"], &soft) < 1e-6);
    assert!(rel_err(&out["grad_weight"], &gw) < 1e-5);
    assert!(rel_err(&out["centroids"], &layer.centroids().unwrap()) < 1e-6);
}

#[test]
fn cluster_reports_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("w.safetensors");
    let output = dir.path().join("out.safetensors");
    save(
        &input,
        &[
            ("a", &randn(10, 1, 1, DType::F32)),
            ("b", &randn(12, 1, 1, DType::F32)),
        ],
    );
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let stderr = |args: &[&str]| {
        let run = idkm(args);
        assert!(!run.status.success());
        String::from_utf8_lossy(&run.stderr).into_owned()
    };
    let e = stderr(&["cluster", "--input", &p(&input), "--output", &p(&output)]);
    assert!(e.contains("--tensor") && e.contains("a, b"), "{e}");
    let e = stderr(&[
        "cluster",
        "--input",
        &p(&input),
        "--tensor",
        "c",
        "--output",
        &p(&output),
    ]);
    assert!(e.contains("no tensor `c`"), "{e}");
    let e = stderr(&[
        "cluster",
        "--input",
        &p(&input),
        "--tensor",
        "a",
        "--output",
        &p(&output),
        "--bits",
        "4",
    ]);
    assert!(e.contains("fewer than the k = 16"), "{e}");
    let e = stderr(&[
        "cluster",
        "--input",
        &p(&input),
        "--tensor",
        "b",
        "--output",
        &p(&output),
        "--cluster-dim",
        "8",
        "--bits",
        "1",
    ]);
    assert!(
        e.contains("not divisible by the cluster dimension 8"),
        "{e}"
    );
    let e = stderr(&[
        "cluster",
        "--input",
        &p(&input),
        "--tensor",
        "a",
        "--output",
        &p(&output),
        "--solver",
        "lbfgs",
    ]);
    assert!(e.contains("cg, gmres, neumann"), "{e}");
    let e = stderr(&[
        "cluster",
        "--input",
        &p(&dir.path().join("missing.safetensors")),
        "--output",
        &p(&output),
    ]);
    assert!(e.contains("missing.safetensors"), "{e}");
    assert!(!output.exists(), "no output on failure");
}

/// Misspelt names are refused by the argument parser, which names the flag
/// and lists what it takes, before any data is read or model built.
#[test]
fn misspelt_settings_are_refused_with_the_known_names() {
    for (args, flag, known) in [
        (
            &["train", "--device", "gpu"][..],
            "--device",
            "cpu, cuda, cuda:N",
        ),
        (
            &["eval", "--model", "m.safetensors", "--arch", "resnet50"][..],
            "--arch",
            "resnet18-cifar, resnet18, small-cnn",
        ),
        (
            &["quantize", "--method", "kmeans"][..],
            "--method",
            "dkm, idkm, idkm-jfb",
        ),
        (
            &["quantize", "--optimizer", "adam"][..],
            "--optimizer",
            "sgd",
        ),
        (
            &["profile", "--memory-budget", "7 parsecs"][..],
            "--memory-budget",
            "unit",
        ),
    ] {
        let out = idkm(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains(known),
            "{args:?}: {stderr}"
        );
    }
}

/// `profile --model` takes an architecture or a checkpoint: a name that is
/// neither says so once, naming the flag and the path.
#[test]
fn profile_model_that_is_no_architecture_and_no_file_is_refused() {
    let out = idkm(&["profile", "--model", "vgg16", "--predict-only"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--model vgg16"), "{stderr}");
    assert_eq!(stderr.matches("no such file").count(), 1, "{stderr}");
}

/// `cluster` refuses a clustering predicted over the memory budget before
/// it starts, with the prediction and the method that would fit; the same
/// layer with IDKM runs within it.
#[test]
fn cluster_refuses_a_dkm_layer_over_the_memory_budget() {
    let dkm = idkm(&[
        "cluster",
        "--method",
        "dkm",
        "--forward",
        "plain",
        "--max-iter",
        "30",
        "--memory-budget",
        "100MiB",
    ]);
    let stderr = String::from_utf8_lossy(&dkm.stderr);
    assert_eq!(dkm.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("predicted to need") && stderr.contains("--method idkm needs"),
        "{stderr}"
    );
    let idkm_run = idkm(&["cluster", "--method", "idkm", "--memory-budget", "100MiB"]);
    assert!(
        idkm_run.status.success(),
        "{}",
        String::from_utf8_lossy(&idkm_run.stderr)
    );
}
