//! End to end on real data: Fashion-MNIST (Debian's `dataset-fashion-mnist`,
//! which `.ci/run` installs), the small CNN trained in float, fine-tuned
//! with 2-bit IDKM, exported, and the export evaluated; and the same from a
//! PyTorch checkpoint served by a local hub.

mod common;

use candle_core::Device;
use common::local_hub::{LocalHub, Repo};
use idkm::cluster::{KmeansConfig, Method};
use idkm::data::{self, Augment, Batcher, DataSplit};
use idkm::model::{Arch, Model, Weights};
use idkm::quantize::{Clustering, LutDType, Palettized, QuantizePlan};
use idkm::train::{evaluate, OptimizerKind, SgdConfig, Trainer};
use std::process::Command;

fn subset(train: usize, test: usize) -> DataSplit {
    let mut split = data::load(&common::fashion_mnist()).unwrap();
    split.train = split.train.take(train).unwrap();
    split.test = split.test.take(test).unwrap();
    split
}

fn batches<'a>(split: &'a DataSplit, epoch: Option<u64>) -> Batcher<'a> {
    match epoch {
        Some(e) => Batcher::new(
            &split.train,
            64,
            Some((0, e)),
            Augment::none(),
            &split.mean,
            &split.std,
            &Device::Cpu,
        ),
        None => Batcher::new(
            &split.test,
            250,
            None,
            Augment::none(),
            &split.mean,
            &split.std,
            &Device::Cpu,
        ),
    }
}

/// 2-bit IDKM on 3,000 training images: the hard (palettized) weights
/// must reach 65% test accuracy (chance is 10%; float after one epoch
/// reaches about 75%), and the exported model must reproduce the
/// hard-weight logits bit for bit.
#[test]
fn two_bit_idkm_on_fashion_mnist_and_export_round_trip() {
    let split = subset(3000, 1000);
    let model = Model::new(Arch::SmallCnn, 1, 10, 0, &Device::Cpu).unwrap();
    let sgd = OptimizerKind::Sgd(SgdConfig {
        momentum: 0.9,
        nesterov: true,
        weight_decay: 5e-4,
    });
    let steps = split.train.len().div_ceil(64);
    Trainer::new(&model, sgd, 0.05, steps)
        .unwrap()
        .epoch(&model, &Weights::Float, batches(&split, Some(0)), "float")
        .unwrap();
    let float = evaluate(&model, &Weights::Float, batches(&split, None), "test").unwrap();

    let config = KmeansConfig {
        bits: 2,
        tau: Some(2e-4),
        method: Method::Idkm,
        ..Default::default()
    };
    let clustering = Clustering::new(&model, &QuantizePlan::new(config)).unwrap();
    let names: Vec<_> = clustering.layers().keys().cloned().collect();
    // conv1 (144 weights) and fc2 (640) are below the 2048 threshold.
    assert_eq!(names, ["conv2.weight", "fc1.weight"]);
    let mut trainer = Trainer::new(&model, sgd, 0.01, steps).unwrap();
    trainer
        .epoch(
            &model,
            &Weights::Clustered(&clustering),
            batches(&split, Some(1)),
            "idkm",
        )
        .unwrap();
    let hard = clustering.hard_weights(&model, LutDType::F32).unwrap();
    let hard_acc = evaluate(
        &model,
        &Weights::Fixed(&hard),
        batches(&split, None),
        "hard",
    )
    .unwrap()
    .accuracy;
    println!("float {:.3}, 2-bit hard {hard_acc:.3}", float.accuracy);
    assert!(
        hard_acc > 0.65,
        "2-bit accuracy {hard_acc} (float {})",
        float.accuracy
    );
    for (name, w) in &hard {
        let mut distinct: Vec<u32> = w
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        distinct.sort();
        distinct.dedup();
        assert!(
            distinct.len() <= 4,
            "{name} has {} distinct values",
            distinct.len()
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("palettized.safetensors");
    let palettized = clustering.palettize(&model, LutDType::F32).unwrap();
    palettized.save(&path).unwrap();
    // 2 bits per weight: conv2 4,608 weights -> 1,152 bytes, fc1 100,352 -> 25,088.
    let loaded = Palettized::load(&path).unwrap();
    assert_eq!(loaded.packed["conv2.weight"].indices.len(), 1152);
    assert_eq!(loaded.packed["fc1.weight"].indices.len(), 25_088);
    assert_eq!(loaded.configs["fc1.weight"]["bits"], 2);
    assert_eq!(loaded.configs["conv2.weight"]["method"], "idkm");
    assert!(palettized.float_bytes() as f64 / palettized.bytes() as f64 > 10.0);
    let exported = Model::new(
        loaded.arch,
        loaded.channels,
        loaded.classes,
        99,
        &Device::Cpu,
    )
    .unwrap();
    exported.assign(loaded.tensors().unwrap(), &path).unwrap();
    let x = batches(&split, None).next().unwrap().unwrap().0;
    let a = model
        .forward(&x, false, &Weights::Fixed(&hard))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let b = exported
        .forward(&x, false, &Weights::Float)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(a, b, "the export's logits differ from the hard weights'");
    let export_acc = evaluate(&exported, &Weights::Float, batches(&split, None), "export")
        .unwrap()
        .accuracy;
    assert_eq!(export_acc, hard_acc);
}

fn idkm(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_idkm"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "idkm {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `quantize` -> `export` -> `eval` from the command line: `eval` of the
/// export prints exactly the hard accuracy that `quantize` printed.
#[test]
fn quantize_export_eval_commands_agree() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::fashion_mnist();
    let data = data.to_str().unwrap();
    let (ckpt, export) = (
        dir.path().join("q.safetensors"),
        dir.path().join("p.safetensors"),
    );
    let (ckpt, export) = (ckpt.to_str().unwrap(), export.to_str().unwrap());
    let limits = [
        "--data",
        data,
        "--train-limit",
        "640",
        "--test-limit",
        "500",
    ];
    let out = idkm(
        &[
            &[
                "quantize", "--bits", "3", "--tau", "2e-4", "--epochs", "1", "-o", ckpt,
            ],
            &limits[..],
        ]
        .concat(),
    );
    // The last line of the table: epoch, loss, train acc, soft, hard, time, RSS.
    let row = out
        .lines()
        .rfind(|l| l.trim_start().starts_with('1'))
        .expect(&out)
        .to_string();
    let hard: f64 = row
        .split_whitespace()
        .nth(4)
        .unwrap()
        .trim_end_matches('%')
        .parse()
        .unwrap();
    let out = idkm(&["export", "--model", ckpt, "-o", export]);
    assert!(out.contains("ratio"), "{out}");
    let out = idkm(&[
        "eval",
        "--model",
        export,
        "--data",
        data,
        "--test-limit",
        "500",
    ]);
    let printed = out
        .split("accuracy ")
        .nth(1)
        .unwrap()
        .split('%')
        .next()
        .unwrap();
    assert_eq!(
        printed,
        format!("{hard:.2}"),
        "eval: {out}\nquantize: {row}"
    );
    // The float checkpoint evaluates too, and a float checkpoint cannot be exported.
    let out = idkm(&[
        "eval",
        "--model",
        ckpt,
        "--data",
        data,
        "--test-limit",
        "500",
    ]);
    assert!(out.contains("float weights"), "{out}");
}

/// `idkm` with a clean hub environment plus `vars`; its stdout.
fn idkm_with(args: &[&str], vars: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_idkm"));
    cmd.args(args).env("RUST_LOG", "warn");
    for var in [
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_HUB_OFFLINE",
        "HF_ENDPOINT",
        "HF_TOKEN",
        "XDG_CACHE_HOME",
        "IDKM_DATA",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd.envs(vars.iter().copied()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "idkm {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The accuracy that `eval` printed, as text (`80.70`).
fn printed_accuracy(out: &str) -> String {
    out.split("accuracy ")
        .nth(1)
        .and_then(|rest| rest.split('%').next())
        .unwrap_or_else(|| panic!("{out}"))
        .to_string()
}

/// A PyTorch checkpoint from the hub through the whole pipeline: `pull`,
/// `eval` (PyTorch's own accuracy), `quantize` with IDKM, `export` in both
/// formats, and `eval` of each export (the hard accuracy `quantize` printed).
#[test]
fn a_pytorch_checkpoint_from_the_hub_through_the_pipeline() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("reference.json")).unwrap())
            .unwrap();
    let commit = "5a11c4a0000000000000000000000000000000ff".to_string();
    let repo = Repo {
        refs: vec![
            ("main".into(), commit.clone()),
            ("v1".into(), commit.clone()),
        ],
        commits: vec![(
            commit.clone(),
            vec![
                (
                    "pytorch_model.bin".into(),
                    std::fs::read(fixtures.join("small_cnn.pth")).unwrap(),
                ),
                ("README.md".into(), b"# small CNN, Fashion-MNIST".to_vec()),
            ],
        )],
        token: None,
    };
    let server = LocalHub::start(vec![("idkm-test/small-cnn-fmnist", repo)]);
    let home = tempfile::tempdir().unwrap();
    let (home_dir, endpoint) = (home.path().to_str().unwrap().to_string(), server.endpoint());
    let online = [
        ("HF_HOME", home_dir.as_str()),
        ("HF_ENDPOINT", endpoint.as_str()),
    ];
    let offline = [("HF_HOME", home_dir.as_str()), ("HF_HUB_OFFLINE", "1")];
    let data = common::fashion_mnist();
    let data = data.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (clustered, palettized, torch) = (
        file("q.safetensors"),
        file("p.safetensors"),
        file("t.safetensors"),
    );

    let pulled = idkm_with(&["pull", "idkm-test/small-cnn-fmnist@v1"], &online);
    let cached = format!(
        "{home_dir}/hub/models--idkm-test--small-cnn-fmnist/snapshots/{commit}/pytorch_model.bin"
    );
    assert_eq!(pulled.trim(), cached);

    // PyTorch's accuracy on the first 1,000 test images, from the cache.
    let case = &reference["small_cnn"];
    let torch_accuracy =
        100.0 * case["test_correct"].as_f64().unwrap() / case["test_images"].as_f64().unwrap();
    let out = idkm_with(
        &[
            "eval",
            "--model",
            "idkm-test/small-cnn-fmnist@v1",
            "--data",
            data,
            "--test-limit",
            "1000",
        ],
        &offline,
    );
    assert!(
        out.contains("(small-cnn, float weights, PyTorch zip state dict)"),
        "{out}"
    );
    assert_eq!(
        printed_accuracy(&out),
        format!("{torch_accuracy:.2}"),
        "{out}"
    );

    let quantize = [
        "quantize",
        "--model",
        "idkm-test/small-cnn-fmnist",
        "--method",
        "idkm",
        "--bits",
        "2",
        "--tau",
        "2e-4",
        "--epochs",
        "1",
        "--lr",
        "0.01",
        "--data",
        data,
        "--train-limit",
        "256",
        "--test-limit",
        "500",
        "-o",
        &clustered,
    ];
    let out = idkm_with(&quantize, &online);
    let row = out
        .lines()
        .rfind(|l| l.trim_start().starts_with('1'))
        .expect(&out)
        .to_string();
    let hard = row
        .split_whitespace()
        .nth(4)
        .unwrap()
        .trim_end_matches('%')
        .to_string();
    assert!(
        out.contains("conv2.weight: 2 bits") && out.contains("fc1.weight: 2 bits"),
        "{out}"
    );

    let out = idkm_with(&["export", "--model", &clustered, "-o", &palettized], &[]);
    assert!(out.contains("clustered tensors  2 (f32 LUT)"), "{out}");
    let out = idkm_with(
        &[
            "export", "--model", &clustered, "--format", "torch", "-o", &torch,
        ],
        &[],
    );
    assert!(out.contains("clustered tensors  2"), "{out}");
    for export in [&palettized, &torch] {
        let out = idkm_with(
            &[
                "eval",
                "--model",
                export,
                "--data",
                data,
                "--test-limit",
                "500",
            ],
            &[],
        );
        assert_eq!(
            printed_accuracy(&out),
            hard,
            "eval of {export}: {out}\nquantize: {row}"
        );
    }

    // The PyTorch export holds exactly the palettized model's weights: 4
    // values in each clustered tensor, and every other tensor as it was.
    let dequantized: std::collections::BTreeMap<String, Vec<f32>> =
        Palettized::load(std::path::Path::new(&palettized))
            .unwrap()
            .tensors()
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1().unwrap()))
            .collect();
    let exported: std::collections::BTreeMap<String, Vec<f32>> =
        idkm::checkpoint::read(std::path::Path::new(&torch))
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1().unwrap()))
            .collect();
    assert_eq!(exported, dequantized);
    for name in ["conv2.weight", "fc1.weight"] {
        let mut values: Vec<u32> = exported[name].iter().map(|v| v.to_bits()).collect();
        values.sort();
        values.dedup();
        assert_eq!(values.len(), 4, "{name}");
    }
}
