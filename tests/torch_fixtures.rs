//! Files written by real PyTorch (tests/fixtures/torch, made by its
//! generate.py): every format reads to PyTorch's values, and the models
//! reproduce PyTorch's logits.

mod common;

use candle_core::{DType, Device, Tensor};
use common::pattern::pattern;
use idkm::checkpoint::{self, Format};
use idkm::loader::{self, Kind, Request};
use idkm::model::{Arch, Model, Weights};
use idkm::quantize::torch_state_dict;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/torch")
        .join(name)
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("reference.json")).unwrap()).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// The tiny model's tensors as PyTorch wrote them: name -> (shape, values).
fn tiny() -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let reference = reference();
    reference["tiny"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, t)| {
            let shape = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let values = t["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            (name.clone(), (shape, values))
        })
        .collect()
}

/// `read` of a fixture, by name, with the shapes and values.
fn read(name: &str) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    checkpoint::read(&fixture(name))
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, (t.dims().to_vec(), flat(&t))))
        .collect()
}

fn with_prefix(prefix: &str, scale: f32) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    tiny()
        .into_iter()
        .map(|(n, (s, v))| {
            (
                format!("{prefix}{n}"),
                (s, v.iter().map(|x| x * scale).collect()),
            )
        })
        .collect()
}

#[test]
fn every_format_is_told_from_its_bytes() {
    for (file, format) in [
        ("tiny.safetensors", Format::Safetensors),
        ("tiny_zip.pth", Format::TorchZip),
        ("tiny_model.bin", Format::TorchZip),
        ("tiny_legacy.pth", Format::TorchLegacy),
        ("tiny_views_legacy.pth", Format::TorchLegacy),
        ("small_cnn.pth", Format::TorchZip),
    ] {
        assert_eq!(
            checkpoint::detect(&fixture(file)).unwrap(),
            format,
            "{file}"
        );
    }
}

#[test]
fn zip_legacy_and_safetensors_state_dicts_read_exactly() {
    let expected = tiny();
    assert_eq!(
        expected.len(),
        7,
        "six batch-norm and linear tensors and the conv weight"
    );
    for file in ["tiny.safetensors", "tiny_zip.pth", "tiny_legacy.pth"] {
        assert_eq!(
            read(file),
            expected,
            "{file}: num_batches_tracked (int64) skipped, floats exact"
        );
    }
}

#[test]
fn nested_training_checkpoints_give_their_state_dict() {
    // `state_dict` of a DataParallel model beside an optimiser and an EMA copy:
    // the plain weights, with their prefix (load_into strips it).
    assert_eq!(read("tiny_checkpoint.pth"), with_prefix("module.", 1.0));
    // Only an EMA copy, of a compiled model.
    assert_eq!(read("tiny_ema.pth"), with_prefix("_orig_mod.", 0.5));
    // `model` beside training arguments, in a `.bin`.
    assert_eq!(read("tiny_model.bin"), tiny());
}

#[test]
fn half_bfloat_and_double_tensors_are_converted() {
    let round = |name: &str, v: f32| -> f32 {
        if name.starts_with("conv1.") {
            half::f16::from_f32(v).to_f32()
        } else if name.starts_with("bn1.") {
            half::bf16::from_f32(v).to_f32()
        } else {
            v
        }
    };
    let expected: BTreeMap<_, _> = tiny()
        .into_iter()
        .map(|(n, (s, v))| (n.clone(), (s, v.iter().map(|&x| round(&n, x)).collect())))
        .collect();
    for file in [
        "tiny_dtypes.safetensors",
        "tiny_dtypes.pth",
        "tiny_dtypes_legacy.pth",
    ] {
        assert_eq!(read(file), expected, "{file}");
    }
    // The conversion did something: f16 and bf16 round these values.
    assert_ne!(expected["conv1.weight"], tiny()["conv1.weight"]);
    assert_ne!(expected["bn1.running_var"], tiny()["bn1.running_var"]);
}

#[test]
fn views_into_shared_storages_read_as_pytorch_shows_them() {
    // Offsets into one flat storage, a transposed fc.weight, a conv weight
    // read with a step of 2, and stride 0.
    let mut expected = tiny();
    let first = expected["bn1.weight"].1[0];
    expected.insert("stride0".into(), (vec![5], vec![first; 5]));
    for file in ["tiny_views.pth", "tiny_views_legacy.pth"] {
        assert_eq!(read(file), expected, "{file}");
    }
}

/// Max |a - b| between logits and PyTorch's.
fn max_diff(logits: &Tensor, case: &Value) -> f64 {
    let shape: Vec<usize> = case["logits_shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(logits.dims(), shape.as_slice());
    let torch: Vec<f64> = case["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let ours = flat(logits);
    ours.iter()
        .zip(&torch)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max)
}

fn input(case: &Value) -> Tensor {
    let shape: Vec<usize> = case["input_shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    pattern("input", &shape)
}

#[test]
fn the_small_cnn_from_pytorch_gives_pytorchs_logits() {
    let reference = reference();
    let case = &reference["small_cnn"];
    let loaded =
        loader::load(&fixture("small_cnn.pth"), &Request::default(), &Device::Cpu).unwrap();
    assert_eq!(loaded.kind, Kind::StateDict(Format::TorchZip));
    assert_eq!(
        (
            loaded.model.arch(),
            loaded.model.channels(),
            loaded.model.classes()
        ),
        (Arch::SmallCnn, 1, 10),
        "inferred"
    );
    let logits = loaded
        .model
        .forward(&input(case), false, &Weights::Float)
        .unwrap();
    let diff = max_diff(&logits, case);
    assert!(diff <= 1e-4, "max |idkm - torch| = {diff}");
}

/// ResNet18 with every variable set to the closed-form pattern.
fn patterned(arch: Arch) -> Model {
    let model = Model::new(arch, 3, 10, 0, &Device::Cpu).unwrap();
    let tensors: Vec<(String, Tensor)> = model
        .tensors()
        .into_iter()
        .map(|(n, t)| (n.clone(), pattern(&n, t.dims())))
        .collect();
    model
        .assign(tensors, std::path::Path::new("pattern"))
        .unwrap();
    model
}

#[test]
fn resnet18_in_both_layouts_gives_pytorchs_logits() {
    let reference = reference();
    for arch in [Arch::ResNet18Cifar, Arch::ResNet18] {
        let case = &reference[arch.to_string()];
        let model = patterned(arch);
        let logits = model.forward(&input(case), false, &Weights::Float).unwrap();
        let diff = max_diff(&logits, case);
        assert!(diff <= 1e-4, "{arch}: max |idkm - torch| = {diff}");
        // The bound is tight: the logits depend on the input and PyTorch's
        // float32 is within 1e-6 of float64.
        assert!(
            case["input_spread"].as_f64().unwrap() > 0.1
                && case["f32_vs_f64"].as_f64().unwrap() < 1e-5
        );
    }
}

#[test]
fn the_architecture_is_inferred_from_names_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    for arch in [Arch::ResNet18Cifar, Arch::ResNet18] {
        // A torchvision state dict, as `idkm export --format torch` writes
        // it, under DistributedDataParallel's prefix.
        let path = dir.path().join(format!("{arch}.safetensors"));
        let tensors: HashMap<String, Tensor> = torch_state_dict(&patterned(arch), &HashMap::new())
            .unwrap()
            .into_iter()
            .map(|(n, t)| (format!("module.{n}"), t))
            .collect();
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let loaded = loader::load(&path, &Request::default(), &Device::Cpu).unwrap();
        assert_eq!(loaded.model.arch(), arch);
        let case = &reference()[arch.to_string()];
        let logits = loaded
            .model
            .forward(&input(case), false, &Weights::Float)
            .unwrap();
        assert!(max_diff(&logits, case) <= 1e-4, "{arch}");
        // The wrong --arch is one error listing the tensors that do not fit.
        let other = if arch == Arch::ResNet18 {
            Arch::ResNet18Cifar
        } else {
            Arch::ResNet18
        };
        let request = Request {
            arch: Some(other),
            ..Request::default()
        };
        let e = loader::load(&path, &request, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("0 missing, 1 mis-shaped, 0 unexpected") && e.contains("conv1.weight"),
            "{e}"
        );
    }
    // The tiny model is none of idkm's architectures.
    let e = loader::load(&fixture("tiny_zip.pth"), &Request::default(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("cannot tell the architecture") && e.contains("pass --arch"),
        "{e}"
    );
}

#[test]
fn torch_exports_have_torchs_state_dict_signature() {
    let reference = reference();
    for arch in [Arch::SmallCnn, Arch::ResNet18Cifar, Arch::ResNet18] {
        let channels = if arch == Arch::SmallCnn { 1 } else { 3 };
        let model = Model::new(arch, channels, 10, 0, &Device::Cpu).unwrap();
        let ours: BTreeMap<String, (Vec<usize>, String)> =
            torch_state_dict(&model, &HashMap::new())
                .unwrap()
                .into_iter()
                .map(|(n, t)| {
                    let dtype = match t.dtype() {
                        DType::F32 => "float32",
                        DType::I64 => "int64",
                        other => panic!("{n}: {other:?}"),
                    };
                    (n, (t.dims().to_vec(), dtype.to_string()))
                })
                .collect();
        let torch: BTreeMap<String, (Vec<usize>, String)> = reference["signatures"]
            [arch.to_string()]
        .as_object()
        .unwrap()
        .iter()
        .map(|(n, s)| {
            let shape = s["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (n.clone(), (shape, s["dtype"].as_str().unwrap().to_string()))
        })
        .collect();
        assert_eq!(ours, torch, "{arch}");
    }
}
