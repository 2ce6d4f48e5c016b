//! A run that diverges stops before the step's update takes effect, with a
//! message that names the step, the stage (forward k-means, loss, adjoint
//! solve, backward, optimizer) and, where known, the layer; the last
//! checkpoint is kept.

mod common;

use candle_core::{DType, Device, Tensor};
use idkm::cluster::{ClusteredWeight, KmeansConfig};
use idkm::model::{Arch, Model, WeightSource, Weights};
use idkm::quantize::Clustering;
use idkm::train::{Optimizer, OptimizerKind, SgdConfig, TrainStep};
use std::collections::BTreeMap;
use std::process::Command;

fn model() -> Model {
    Model::new(Arch::SmallCnn, 1, 10, 3, &Device::Cpu).unwrap()
}

fn step(model: &Model) -> TrainStep {
    let vars = model.trainable().into_iter().map(|(_, v)| v).collect();
    let sgd = OptimizerKind::Sgd(SgdConfig {
        momentum: 0.9,
        nesterov: false,
        weight_decay: 5e-4,
    });
    TrainStep::new(Optimizer::new(sgd, vars, 0.01).unwrap())
}

fn batch() -> (Tensor, Tensor) {
    let x = Tensor::randn(0f32, 1.0, (8, 1, 28, 28), &Device::Cpu).unwrap();
    let y = Tensor::new(&[0u32, 1, 2, 3, 4, 5, 6, 7], &Device::Cpu).unwrap();
    (x, y)
}

/// Sets the parameter `name` of `model` to NaN everywhere.
fn poison(model: &Model, name: &str) {
    let data = model.varmap().data().lock().unwrap();
    let var = &data[name];
    let nan = (var.as_tensor().ones_like().unwrap() * f64::NAN).unwrap();
    var.set(&nan).unwrap();
}

#[test]
fn a_non_finite_loss_names_the_step_and_the_stage() {
    let model = model();
    let mut step = step(&model);
    let (x, y) = batch();
    step.run(&model, &Weights::Float, &x, &y).unwrap();
    poison(&model, "fc2.bias");
    let e = step
        .run(&model, &Weights::Float, &x, &y)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("diverged at step 1, in the loss: the loss became NaN"),
        "{e}"
    );
    assert_eq!(step.count(), 1, "the failed step counted");
}

#[test]
fn non_finite_centroids_name_the_forward_k_means_and_the_layer() {
    let model = model();
    let layer = ClusteredWeight::new(
        "conv2.weight",
        KmeansConfig {
            bits: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let clustering = Clustering::from_layers(BTreeMap::from([("conv2.weight".into(), layer)]));
    clustering.prepare(&model).unwrap();
    let mut step = step(&model);
    let (x, y) = batch();
    let weights = Weights::Clustered(&clustering);
    step.run(&model, &weights, &x, &y).unwrap();
    // The next solve starts from centroids that are not finite.
    let nan = Tensor::full(f32::NAN, (4, 1), &Device::Cpu).unwrap();
    clustering.layers()["conv2.weight"]
        .set_centroids(nan.to_dtype(DType::F32).unwrap())
        .unwrap();
    let before = model.tensors();
    let e = step.run(&model, &weights, &x, &y).unwrap_err().to_string();
    assert!(
        e.contains("diverged at step 1, in the forward k-means of `conv2.weight`"),
        "{e}"
    );
    assert_eq!(step.count(), 1, "the failed step counted");
    let after = model.tensors();
    for (name, t) in &before {
        let same = (t - &after[name])
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(same, 0.0, "`{name}` was updated");
    }
}

/// A weight source whose backward goes bad while its forward stays finite,
/// as a clustered layer's implicit backward can: `w + sqrt(w - w)` is `w`
/// forward (the second `w` detached), and its gradient is infinite (of
/// either sign, as the batch's gradient is).
struct InfiniteBackward(&'static str);

impl WeightSource for InfiniteBackward {
    fn weight(&self, name: &str, param: &Tensor) -> idkm::Result<Tensor> {
        if name != self.0 {
            return Ok(param.clone());
        }
        Ok((param + (param - param.detach())?.sqrt()?)?)
    }

    fn replaces(&self, name: &str) -> bool {
        name == self.0
    }
}

#[test]
fn a_non_finite_gradient_of_a_clustered_layer_names_the_adjoint_solve() {
    let model = model();
    let mut step = step(&model);
    let (x, y) = batch();
    let source = InfiniteBackward("conv2.weight");
    let e = step
        .run(&model, &Weights::Clustered(&source), &x, &y)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("diverged at step 0, in the adjoint solve of `conv2.weight`")
            && (e.contains("its gradient holds inf") || e.contains("its gradient holds -inf")),
        "{e}"
    );
    assert_eq!(step.count(), 0, "the failed step counted");
}

/// `idkm train` at a learning rate that overflows the update: the
/// optimizer stage and the first parameter it made non-finite are named,
/// and the checkpoint already at the output path is left as it was.
#[test]
fn a_non_finite_update_names_the_optimizer_and_keeps_the_checkpoint() {
    let data = common::fashion_mnist();
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("run.safetensors");
    std::fs::write(&output, b"the last good checkpoint").unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_idkm"))
        .args([
            "train",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--lr",
            "1e300",
        ])
        .args(["--train-limit", "64", "--test-limit", "32", "--data"])
        .arg(&data)
        .arg("-o")
        .arg(&output)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    assert!(
        stderr.contains("diverged at step 0, in the optimizer of `")
            && stderr.contains("after the update"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&output).unwrap(), b"the last good checkpoint");
}
