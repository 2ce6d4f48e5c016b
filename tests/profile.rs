//! The memory model against measurements on the small CNN, `idkm profile`'s
//! outputs, and the `--memory-budget` refusal.

use idkm::cluster::{Forward, Method, Solver};
use idkm::device::DeviceSpec;
use idkm::memory::{self, ModelShape, Workload};
use idkm::model::Arch;
use idkm::profile::{self, Outcome, StepConfig};
use std::process::Command;

#[global_allocator]
static GLOBAL: idkm::alloc::Counting = idkm::alloc::Counting;

/// Tests that measure memory (in this process, or in the children of
/// `idkm profile`) run one at a time: another test's children running at
/// the same time move a small process's peak resident set by megabytes.
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn measuring() -> std::sync::MutexGuard<'static, ()> {
    MEASURING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn idkm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_idkm"))
        .args(args)
        .output()
        .expect("run idkm")
}

/// `method`: a clustering method's name, or `fp32`.
fn small_cnn(method: &str, bits: u32, iters: usize, batch: usize) -> StepConfig {
    StepConfig {
        arch: Arch::SmallCnn,
        batch,
        method: (method != "fp32").then(|| method.parse().unwrap()),
        bits,
        cluster_dim: 1,
        iters,
        tol: 0.0,
        tau: Some(1e-4),
        forward: Forward::Plain,
        solver: Solver::Cg,
        min_weights: 2048,
        classes: 10,
        warmup: 1,
        steps: 1,
        max_seconds: 60.0,
        device: DeviceSpec::Cpu,
        data: None,
        checkpoint: None,
        seed: 0,
        converge_iters: None,
    }
}

/// The heap part of the model against the bytes the counting allocator saw,
/// in this process (one test function: nothing else big allocates
/// meanwhile; the other tests run their work in child processes), then the
/// budget refusal, which builds a ResNet18.
#[test]
fn memory_model_predicts_the_counted_peak_of_the_small_cnn_within_15_percent() {
    let _measuring = measuring();
    let shape = ModelShape::of_arch(Arch::SmallCnn, 1, 10).unwrap();
    for config in [
        small_cnn("fp32", 2, 1, 32),
        small_cnn("dkm", 2, 1, 16),
        small_cnn("dkm", 2, 4, 16),
        small_cnn("idkm", 2, 3, 32),
        small_cnn("idkm-jfb", 2, 3, 16),
    ] {
        let m = profile::run_steps(&config).unwrap();
        assert!(m.loss.is_finite(), "{}: loss {}", config.label(), m.loss);
        let counted = m
            .peak_counted_bytes
            .expect("the counting allocator is installed") as f64;
        let predicted = config.predict(&shape).unwrap().heap() as f64;
        let err = (predicted - counted) / counted;
        eprintln!(
            "{}: counted {counted:.0}, predicted {predicted:.0} ({:+.1}%)",
            config.label(),
            100.0 * err
        );
        assert!(
            err.abs() < 0.15,
            "{}: predicted {predicted} vs counted {counted}",
            config.label()
        );
        if config.method == Some(Method::Idkm) {
            assert!(
                m.layers
                    .iter()
                    .all(|l| l.solver_steps.is_some() && l.residual.is_some()),
                "{:?}",
                m.layers
            );
            assert!(
                m.layers.iter().all(|l| l.forward_iters == Some(3)),
                "{:?}",
                m.layers
            );
        }
    }
    budget_refusal_names_what_would_fit();
}

#[test]
fn profile_runs_each_configuration_in_a_child_and_writes_json_table_and_plots() {
    let _measuring = measuring();
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("p");
    let run = idkm(&[
        "profile",
        "--model",
        "small-cnn",
        "--batch",
        "16",
        "--bits",
        "2",
        "--methods",
        "dkm,idkm,idkm-jfb",
        "--iters",
        "1,30",
        "--memory-budget",
        "200MiB",
        "--output",
        prefix.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("| fp32 |") && stdout.contains("does not fit (predicted"),
        "{stdout}"
    );

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("p.json")).unwrap()).unwrap();
    let records: Vec<profile::Record> = serde_json::from_value(json["records"].clone()).unwrap();
    // fp32, DKM at each t, and one Newton row each for IDKM and IDKM-JFB
    // (a Newton solve has no t: it runs to the trainer's tolerance).
    assert_eq!(records.len(), 5);
    let mut labels: Vec<String> = records.iter().map(|r| r.config.label()).collect();
    labels.sort();
    labels.dedup();
    assert_eq!(labels.len(), records.len(), "{labels:?}");
    let trainer = idkm::cluster::KmeansConfig::default();
    for r in records
        .iter()
        .filter(|r| r.config.forward == Forward::Newton)
    {
        if matches!(r.config.method, Some(Method::Idkm | Method::IdkmJfb)) {
            assert_eq!(
                (r.config.iters, r.config.tol),
                (trainer.max_iter, trainer.tol)
            );
        }
    }
    // Raw fields, as other tools read them.
    let first = &json["records"][0];
    for key in ["config", "predicted", "status"] {
        assert!(
            first.get(key).is_some() || first["outcome"].get(key).is_some(),
            "no `{key}` in {first}"
        );
    }
    for r in &records {
        match (&r.outcome, r.config.method, r.config.iters) {
            (Outcome::DoesNotFit { budget_bytes }, Some(Method::Dkm), 30) => {
                assert!(r.predicted.total() > *budget_bytes)
            }
            (Outcome::Measured(m), _, _) => {
                assert!(
                    m.seconds_per_step > 0.0 && m.peak_rss_bytes.is_some() && m.loss.is_finite()
                );
                // The idkm binary runs the system allocator without counting.
                // These processes are small (about 25 MiB), so that the few
                // MiB by which a process's own base (binary, C library,
                // thread stacks) differs between machines count as well.
                let err = r.rss_error().unwrap();
                let off = m.peak_rss_bytes.unwrap().abs_diff(r.predicted.total());
                assert!(
                    err.abs() < 0.15 || off < 6 << 20,
                    "{}: predicted {} vs RSS {:?} ({err:+.3})",
                    r.config.label(),
                    r.predicted.total(),
                    m.peak_rss_bytes
                );
                if r.config.method == Some(Method::Idkm) {
                    assert!(
                        m.layers
                            .iter()
                            .all(|l| l.adjoint.is_some() && l.solver_steps.is_some()),
                        "{:?}",
                        m.layers
                    );
                }
                if r.config.method.is_some() {
                    assert_eq!(m.layers.len(), r.predicted.layers.len());
                }
            }
            other => panic!("unexpected outcome for {}: {other:?}", r.config.label()),
        }
    }
    let md = std::fs::read_to_string(dir.path().join("p.md")).unwrap();
    assert!(
        md.contains("| layer |") && md.contains("fc1.weight"),
        "{md}"
    );
    for plot in ["p-memory", "p-time"] {
        let svg = std::fs::read_to_string(dir.path().join(format!("{plot}.svg"))).unwrap();
        // DKM's line over t; IDKM's Newton row, which has no t, across.
        let legend = |text: &str| svg.lines().any(|l| l.trim() == text);
        assert!(
            svg.contains("<svg") && legend("dkm 2-bit") && legend("idkm 2-bit newton"),
            "{plot}.svg"
        );
        let png = std::fs::read(dir.path().join(format!("{plot}.png"))).unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 5000,
            "{plot}.png"
        );
    }
}

#[test]
fn profile_predict_only_runs_nothing() {
    let run = idkm(&[
        "profile",
        "--model",
        "resnet18-cifar",
        "--bits",
        "4,8",
        "--predict-only",
        "--memory-budget",
        "16GiB",
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("| dkm 8-bit t=30 |") && stdout.contains("over the budget"),
        "{stdout}"
    );
}

#[test]
fn quantize_and_train_refuse_a_run_over_the_memory_budget_before_training() {
    let Some(data) = idkm::data::fashion_mnist_dir() else {
        panic!("Fashion-MNIST is not installed: `apt-get install dataset-fashion-mnist` (.ci/run does this)");
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q.safetensors");
    let started = std::time::Instant::now();
    let run = idkm(&[
        "quantize",
        "--data",
        data.to_str().unwrap(),
        "--train-limit",
        "256",
        "--test-limit",
        "256",
        "--method",
        "dkm",
        "--bits",
        "8",
        "--max-iter",
        "30",
        "--memory-budget",
        "256MiB",
        "--output",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    assert!(
        stderr.contains("more than the memory budget of 256 MiB")
            && stderr.contains("--method idkm"),
        "{stderr}"
    );
    assert!(!out.exists() && started.elapsed().as_secs() < 30);

    let run = idkm(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--train-limit",
        "256",
        "--test-limit",
        "256",
        "--memory-budget",
        "4MiB",
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        !run.status.success() && stderr.contains("memory budget"),
        "{stderr}"
    );

    // Within the budget the run goes ahead.
    let run = idkm(&[
        "quantize",
        "--data",
        data.to_str().unwrap(),
        "--train-limit",
        "128",
        "--test-limit",
        "128",
        "--bits",
        "2",
        "--memory-budget",
        "1GiB",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// Called by the in-process test after its measurements (building a
/// ResNet18 would disturb the counted peaks of a concurrent test).
fn budget_refusal_names_what_would_fit() {
    let shape = ModelShape::of_arch(Arch::ResNet18Cifar, 3, 10).unwrap();
    let work = Workload::for_arch(Arch::ResNet18Cifar, 32, 10);
    let dkm = small_cnn("dkm", 4, 3, 32);
    let plan = idkm::quantize::QuantizePlan::new(dkm.kmeans().unwrap().unwrap());
    let specs = memory::plan_specs(&shape, &plan).unwrap();
    let err = memory::check_budget(&shape, &specs, &work, 7 << 30).unwrap_err();
    assert!(
        err.contains("more than the memory budget of 7.00 GiB"),
        "{err}"
    );
    assert!(err.contains("--method idkm"), "{err}");
    // And the alternative it names does fit.
    let idkm_plan =
        idkm::quantize::QuantizePlan::new(small_cnn("idkm", 4, 3, 32).kmeans().unwrap().unwrap());
    let ok = memory::check_budget(
        &shape,
        &memory::plan_specs(&shape, &idkm_plan).unwrap(),
        &work,
        7 << 30,
    );
    assert!(ok.is_ok());
}

/// A steady-state configuration starts its steps at the k-means fixed point
/// of the initial weights: its forward passes need far fewer iterations than
/// the first step after a cold start.
#[test]
fn steady_state_steps_start_at_the_fixed_point() {
    let _measuring = measuring();
    // No warm-up step: the measured step is the first, so the cold one
    // starts at the initialisation (a warm-up would leave it at a fixed
    // point too).
    let cold = StepConfig {
        tol: 1e-4,
        warmup: 0,
        ..small_cnn("idkm", 2, 30, 8)
    };
    let steady = StepConfig {
        converge_iters: Some(3000),
        ..cold.clone()
    };
    let iters = |c: &StepConfig| -> Vec<usize> {
        profile::run_steps(c)
            .unwrap()
            .layers
            .iter()
            .map(|l| l.forward_iters.unwrap())
            .collect()
    };
    let (cold_iters, steady_iters) = (iters(&cold), iters(&steady));
    assert_eq!(steady_iters.len(), 2, "conv2 and fc1 are clustered");
    let total = |v: &[usize]| v.iter().sum::<usize>();
    assert!(
        2 * total(&steady_iters) < total(&cold_iters),
        "k-means iterations: cold {cold_iters:?}, steady {steady_iters:?}"
    );
}

/// `idkm profile --steady N`: the records say so in their label, and the
/// measured steps start at the fixed point (fewer k-means iterations than
/// the limit on every clustered layer).
#[test]
fn profile_steady_starts_the_steps_at_the_fixed_point() {
    let _measuring = measuring();
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("s");
    let run = idkm(&[
        "profile",
        "--model",
        "small-cnn",
        "--batch",
        "8",
        "--bits",
        "2",
        "--methods",
        "idkm",
        "--iters",
        "30",
        "--tol",
        "1e-4",
        "--forward",
        "plain",
        "--steady",
        "3000",
        "--no-fp32",
        "--output",
        prefix.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("idkm 2-bit t=30 steady"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("s.json")).unwrap()).unwrap();
    let records: Vec<profile::Record> = serde_json::from_value(json["records"].clone()).unwrap();
    let Outcome::Measured(m) = &records[0].outcome else {
        panic!("{:?}", records[0].outcome)
    };
    assert!(
        m.layers.iter().all(|l| l.forward_iters.unwrap() < 30),
        "{:?}",
        m.layers
    );
}

#[test]
fn profile_takes_one_temperature_per_bit_width() {
    let _measuring = measuring();
    let wrong = idkm(&[
        "profile",
        "--bits",
        "4,8",
        "--tau",
        "1e-4,4e-7,1e-9",
        "--predict-only",
    ]);
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        !wrong.status.success() && stderr.contains("one per --bits: got 3 for 2"),
        "{stderr}"
    );

    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("p");
    let run = idkm(&[
        "profile",
        "--model",
        "small-cnn",
        "--batch",
        "4",
        "--bits",
        "2,3",
        "--tau",
        "0.01,0.0025",
        "--methods",
        "idkm-jfb",
        "--iters",
        "1",
        "--no-fp32",
        "--output",
        prefix.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("p.json")).unwrap()).unwrap();
    let records: Vec<profile::Record> = serde_json::from_value(json["records"].clone()).unwrap();
    let taus: Vec<(u32, Option<f64>)> = records
        .iter()
        .map(|r| (r.config.bits, r.config.tau))
        .collect();
    assert_eq!(taus, vec![(2, Some(0.01)), (3, Some(0.0025))]);
}

/// `profile --model CHECKPOINT` steps from the checkpoint's weights: a
/// state dict of a 5-class small CNN whose conv and linear weights are 10x
/// a fresh model's profiles with 5 classes, and each layer's temperature
/// (derived from its weights, proportional to their squared scale) is 100x
/// that of the fresh model's.
#[test]
fn profile_of_a_checkpoint_steps_from_its_weights() {
    let _measuring = measuring();
    let dir = tempfile::tempdir().unwrap();
    let fresh =
        idkm::model::Model::new(Arch::SmallCnn, 1, 5, 0, &candle_core::Device::Cpu).unwrap();
    let weights: std::collections::HashSet<String> =
        fresh.weights().into_iter().map(|(n, _)| n).collect();
    let scaled: std::collections::HashMap<String, candle_core::Tensor> = fresh
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let t = if weights.contains(&n) {
                (t * 10.0).unwrap()
            } else {
                t
            };
            (n, t)
        })
        .collect();
    let checkpoint = dir.path().join("scaled.safetensors");
    candle_core::safetensors::save(&scaled, &checkpoint).unwrap();

    let taus = |model: &str, prefix: &str| -> (usize, Vec<f64>) {
        let prefix = dir.path().join(prefix);
        let run = idkm(&[
            "profile",
            "--model",
            model,
            "--classes",
            "5",
            "--batch",
            "8",
            "--bits",
            "2",
            "--methods",
            "idkm-jfb",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--no-fp32",
            "--output",
            prefix.to_str().unwrap(),
        ]);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(prefix.with_extension("json")).unwrap())
                .unwrap();
        let records: Vec<profile::Record> =
            serde_json::from_value(json["records"].clone()).unwrap();
        let Outcome::Measured(m) = &records[0].outcome else {
            panic!("{model}: {:?}", records[0].outcome)
        };
        let taus = m.layers.iter().map(|l| l.tau.unwrap()).collect();
        (records[0].config.classes, taus)
    };
    let (classes, from_checkpoint) = taus(checkpoint.to_str().unwrap(), "checkpoint");
    let (_, fresh_taus) = taus("small-cnn", "fresh");
    assert_eq!(classes, 5);
    assert_eq!(from_checkpoint.len(), fresh_taus.len());
    assert!(!fresh_taus.is_empty());
    for (c, f) in from_checkpoint.iter().zip(&fresh_taus) {
        assert!((c / f / 100.0 - 1.0).abs() < 0.01, "tau {c} vs {f}");
    }
}
