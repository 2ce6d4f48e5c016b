//! The networks: torchvision's parameter layout, batch norm in training and
//! evaluation, and checkpoints that load back exactly.

use candle_core::{DType, Device, Tensor, D};
use idkm::checkpoint::{self, LoadOptions};
use idkm::cluster::{KmeansConfig, Method};
use idkm::model::{Arch, Model, Weights};
use idkm::quantize::{Clustering, QuantizePlan};
use idkm::train::{Optimizer, OptimizerKind, SgdConfig};
use std::collections::HashMap;

fn input(n: usize, c: usize, hw: usize, seed: u64) -> Tensor {
    let values: Vec<f32> = (0..n * c * hw * hw)
        .map(|i| (((i as u64 * 2654435761 + seed) % 1000) as f32 / 500.0) - 1.0)
        .collect();
    Tensor::from_vec(values, (n, c, hw, hw), &Device::Cpu).unwrap()
}

#[test]
fn resnet18_has_torchvisions_parameters() {
    let model = Model::new(Arch::ResNet18, 3, 1000, 0, &Device::Cpu).unwrap();
    // torchvision.models.resnet18(): 11,689,512 parameters.
    assert_eq!(model.parameter_count(), 11_689_512);
    let tensors = model.tensors();
    for (name, shape) in [
        ("conv1.weight", vec![64, 3, 7, 7]),
        ("bn1.running_var", vec![64]),
        ("layer1.0.conv1.weight", vec![64, 64, 3, 3]),
        ("layer2.0.downsample.0.weight", vec![128, 64, 1, 1]),
        ("layer2.0.downsample.1.running_mean", vec![128]),
        ("layer4.1.bn2.bias", vec![512]),
        ("fc.weight", vec![1000, 512]),
    ] {
        assert_eq!(tensors[name].dims(), shape.as_slice(), "{name}");
    }
    // 62 tensors in torchvision's state dict without the 20 num_batches_tracked.
    assert_eq!(tensors.len(), 122 - 20);
    let weights: Vec<String> = model.weights().into_iter().map(|(n, _)| n).collect();
    assert_eq!(weights.len(), 21, "20 convs and fc: {weights:?}");
    assert_eq!(weights.first().map(String::as_str), Some("conv1.weight"));
    assert_eq!(weights.last().map(String::as_str), Some("fc.weight"));

    let cifar = Model::new(Arch::ResNet18Cifar, 3, 10, 0, &Device::Cpu).unwrap();
    assert_eq!(cifar.tensors()["conv1.weight"].dims(), &[64, 3, 3, 3]);
    assert_eq!(cifar.parameter_count(), 11_173_962);
    let logits = cifar
        .forward(&input(2, 3, 32, 1), false, &Weights::Float)
        .unwrap();
    assert_eq!(logits.dims(), &[2, 10]);
    let logits = model
        .forward(&input(1, 3, 64, 1), false, &Weights::Float)
        .unwrap();
    assert_eq!(logits.dims(), &[1, 1000]);
}

#[test]
fn initialisation_is_seeded() {
    let a = Model::new(Arch::SmallCnn, 1, 10, 7, &Device::Cpu)
        .unwrap()
        .tensors();
    let b = Model::new(Arch::SmallCnn, 1, 10, 7, &Device::Cpu)
        .unwrap()
        .tensors();
    let c = Model::new(Arch::SmallCnn, 1, 10, 8, &Device::Cpu)
        .unwrap()
        .tensors();
    let same = |x: &Tensor, y: &Tensor| {
        x.eq(y)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            == 1.0
    };
    for (name, t) in &a {
        assert!(same(t, &b[name]), "{name} differs for the same seed");
    }
    assert!(!same(&a["conv2.weight"], &c["conv2.weight"]));
    // Kaiming normal: std sqrt(2 / fan_in) with fan_in = 16 * 9.
    let w = &a["conv2.weight"];
    let std = w
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt();
    assert!(
        (std / (2.0f32 / 144.0).sqrt() - 1.0).abs() < 0.05,
        "std {std}"
    );
}

#[test]
fn batch_norm_trains_running_statistics_and_evaluates_with_them() {
    let model = Model::new(Arch::SmallCnn, 1, 10, 0, &Device::Cpu).unwrap();
    let x = (input(8, 1, 28, 3) * 3.0)
        .unwrap()
        .affine(1.0, 2.0)
        .unwrap();
    let before = model.tensors()["bn1.running_mean"]
        .to_vec1::<f32>()
        .unwrap();
    assert!(before.iter().all(|&v| v == 0.0));
    model.forward(&x, true, &Weights::Float).unwrap();
    let after = model.tensors()["bn1.running_mean"]
        .to_vec1::<f32>()
        .unwrap();
    // momentum 0.1: running = 0.9 * 0 + 0.1 * batch mean of conv1's output.
    let conv = x
        .conv2d(&model.tensors()["conv1.weight"], 1, 1, 1, 1)
        .unwrap();
    let mean = conv.mean((0, 2, 3)).unwrap().to_vec1::<f32>().unwrap();
    for (a, m) in after.iter().zip(&mean) {
        assert!(
            (a - 0.1 * m).abs() < 1e-4 * (1.0 + m.abs()),
            "{a} vs {}",
            0.1 * m
        );
    }
    // Evaluation does not touch the statistics and depends on them.
    let e1 = model.forward(&x, false, &Weights::Float).unwrap();
    assert_eq!(
        model.tensors()["bn1.running_mean"]
            .to_vec1::<f32>()
            .unwrap(),
        after
    );
    model.forward(&x, true, &Weights::Float).unwrap();
    let e2 = model.forward(&x, false, &Weights::Float).unwrap();
    let diff = (e1 - e2)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff > 1e-4, "evaluation ignored the running statistics");
}

#[test]
fn torchvision_checkpoint_loads_into_resnet18_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let source = Model::new(Arch::ResNet18Cifar, 3, 10, 1, &Device::Cpu).unwrap();
    // What a training script with DataParallel saves: `module.` prefixes and num_batches_tracked.
    let mut state: HashMap<String, Tensor> = source
        .tensors()
        .into_iter()
        .map(|(n, t)| (format!("module.{n}"), t))
        .collect();
    state.insert(
        "module.bn1.num_batches_tracked".into(),
        Tensor::new(5i64, &Device::Cpu).unwrap(),
    );
    let path = dir.path().join("resnet18.safetensors");
    candle_core::safetensors::save(&state, &path).unwrap();

    let target = Model::new(Arch::ResNet18Cifar, 3, 10, 2, &Device::Cpu).unwrap();
    checkpoint::load_into(target.varmap(), &path, &LoadOptions::default()).unwrap();
    let x = input(2, 3, 32, 5);
    let (a, b) = (
        source.forward(&x, false, &Weights::Float).unwrap(),
        target.forward(&x, false, &Weights::Float).unwrap(),
    );
    assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());

    // A 1000-class checkpoint into a 10-class model: the head is the error, or is skipped.
    let imagenet = Model::new(Arch::ResNet18, 3, 1000, 1, &Device::Cpu).unwrap();
    let path = dir.path().join("imagenet.safetensors");
    candle_core::safetensors::save(
        &imagenet.tensors().into_iter().collect::<HashMap<_, _>>(),
        &path,
    )
    .unwrap();
    let ten = Model::new(Arch::ResNet18, 3, 10, 2, &Device::Cpu).unwrap();
    let err = checkpoint::load_into(ten.varmap(), &path, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("fc.weight") && err.contains("1000"), "{err}");
    let options = LoadOptions {
        skip_prefixes: vec!["fc.".into()],
        ..Default::default()
    };
    checkpoint::load_into(ten.varmap(), &path, &options).unwrap();
    assert_eq!(
        ten.tensors()["layer3.1.conv2.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        imagenet.tensors()["layer3.1.conv2.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );
    let pred = ten
        .forward(&input(1, 3, 32, 2), false, &Weights::Float)
        .unwrap()
        .argmax(D::Minus1)
        .unwrap();
    assert!(pred.to_vec1::<u32>().unwrap()[0] < 10);
}

/// One SGD step of ResNet18-CIFAR with every conv and linear weight
/// clustered (2 bits, IDKM): the implicit gradient reaches every clustered
/// weight, and the step lowers the loss on its batch.
#[test]
fn clustered_resnet18_trains() {
    let model = Model::new(Arch::ResNet18Cifar, 3, 10, 3, &Device::Cpu).unwrap();
    let config = KmeansConfig {
        bits: 2,
        tau: Some(1e-3),
        max_iter: 5,
        method: Method::Idkm,
        ..Default::default()
    };
    let clustering = Clustering::new(&model, &QuantizePlan::new(config)).unwrap();
    // conv1 (1,728 weights) stays in float; the other 19 convs and fc are clustered.
    assert_eq!(clustering.layers().len(), 20);
    let x = input(4, 3, 32, 9);
    let y = Tensor::new(&[1u32, 7, 3, 0], &Device::Cpu).unwrap();
    let weights = Weights::Clustered(&clustering);
    let vars: Vec<_> = model.trainable().into_iter().map(|(_, v)| v).collect();
    let sgd = OptimizerKind::Sgd(SgdConfig {
        momentum: 0.0,
        nesterov: false,
        weight_decay: 0.0,
    });
    let mut optimizer = Optimizer::new(sgd, vars, 0.05).unwrap();
    let loss = |train: bool| {
        let logits = model.forward(&x, train, &weights).unwrap();
        candle_nn::loss::cross_entropy(&logits, &y).unwrap()
    };
    let before = loss(true);
    let grads = before.backward().unwrap();
    for (name, w) in model.weights() {
        let g = grads
            .get(&w)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient norm {norm}"
        );
    }
    optimizer.step(&grads).unwrap();
    let (before, after) = (
        before.to_scalar::<f32>().unwrap(),
        loss(true).to_scalar::<f32>().unwrap(),
    );
    assert!(after < before, "loss {before} -> {after}");
}
