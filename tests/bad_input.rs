//! Bad input, one test a row of the table in `docs/bad-input.md`: each is
//! refused with status 2 and a message that names the file (and the tensor
//! or flag) and what was expected, never a panic.

mod common;

use candle_core::{Device, Tensor};
use idkm::model::{Arch, Model};
use idkm::quantize::LutDType;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs idkm; asserts the refusal and that the message holds every needle.
fn refused(args: &[&str], needles: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_idkm"))
        .args(args)
        .env("RUST_LOG", "error")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run idkm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{args:?}\n  {}", stderr.trim());
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{args:?}: no `{needle}` in: {stderr}"
        );
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A small CNN's float state dict, written as safetensors at `path`.
fn state_dict(path: &Path) -> BTreeMap<String, Tensor> {
    let model = Model::new(Arch::SmallCnn, 1, 10, 0, &Device::Cpu).unwrap();
    let tensors = model.tensors();
    idkm::checkpoint::save(&tensors, &Default::default(), path).unwrap();
    tensors
}

/// A palettized export of a 2-bit small CNN at `path`, with `edit` applied
/// to its tensors.
fn export(path: &Path, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) {
    let (model, clustering) = common::clustered_small_cnn();
    clustering
        .palettize(&model, LutDType::F32)
        .unwrap()
        .save(path)
        .unwrap();
    let metadata = idkm::checkpoint::metadata(path).unwrap();
    let mut tensors: BTreeMap<String, Tensor> = candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    edit(&mut tensors);
    idkm::checkpoint::save(&tensors, &metadata, path).unwrap();
}

/// `idkm eval` of the model file `path` is refused with `needles`.
fn eval_refused(path: &Path, needles: &[&str]) {
    refused(
        &[
            "eval",
            "--model",
            s(path),
            "--data",
            &common::fashion_mnist_arg(),
            "--test-limit",
            "10",
        ],
        needles,
    );
}

fn temp(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

#[test]
fn a_truncated_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = temp(&dir, "model.safetensors");
    state_dict(&path);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    refused(
        &["export", "--model", s(&path), "-o", s(&temp(&dir, "o"))],
        &["model.safetensors"],
    );
}

#[test]
fn a_header_that_lies_about_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let path = temp(&dir, "model.safetensors");
    state_dict(&path);
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    // The first end offset pushed far past the file; same header length.
    let at = header.find("\"data_offsets\":[").unwrap() + 16;
    let end = at + header[at..].find(']').unwrap();
    let fake = format!("0,{}", "9".repeat(end - at - 2));
    let header = format!("{}{fake}{}", &header[..at], &header[end..]);
    let mut lying = bytes[..8].to_vec();
    lying.extend(header.as_bytes());
    lying.extend(&bytes[8 + n..]);
    std::fs::write(&path, lying).unwrap();
    refused(
        &["export", "--model", s(&path), "-o", s(&temp(&dir, "o"))],
        &["model.safetensors"],
    );
}

#[test]
fn a_broken_pytorch_zip() {
    let dir = tempfile::tempdir().unwrap();
    let path = temp(&dir, "broken.pth");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch/small_cnn.pth");
    let bytes = std::fs::read(fixture).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 64]).unwrap();
    refused(
        &["export", "--model", s(&path), "-o", s(&temp(&dir, "o"))],
        &["broken.pth"],
    );
}

#[test]
fn an_export_whose_packed_indices_are_too_short() {
    let dir = tempfile::tempdir().unwrap();
    let path = temp(&dir, "short.safetensors");
    export(&path, |t| {
        let indices = t.get_mut("fc1.weight.indices").unwrap();
        *indices = indices.narrow(0, 0, 10).unwrap();
    });
    eval_refused(
        &path,
        &[
            "short.safetensors",
            "fc1.weight",
            "bytes of packed indices, expected",
        ],
    );
}

#[test]
fn an_export_whose_indices_are_past_its_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = temp(&dir, "lut.safetensors");
    // Two of the four entries: 2-bit indices reach past it.
    export(&path, |t| {
        let lut = t.get_mut("fc1.weight.lut").unwrap();
        *lut = lut.narrow(0, 0, 2).unwrap();
    });
    eval_refused(
        &path,
        &[
            "lut.safetensors",
            "fc1.weight",
            "past the lookup table's 2 entries",
        ],
    );
}

#[test]
fn bits_outside_one_to_eight() {
    refused(&["cluster", "--bits", "9"], &["bits"]);
    refused(&["cluster", "--bits", "0"], &["bits"]);
}

#[test]
fn a_temperature_that_is_not_positive_and_finite() {
    for tau in ["0", "-1e-4", "NaN", "inf"] {
        refused(&["cluster", &format!("--tau={tau}")], &["tau"]);
    }
}

#[test]
fn non_finite_weights_in_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = temp(&dir, "nan.safetensors");
    let mut tensors = state_dict(&path);
    let w = tensors.get_mut("fc1.weight").unwrap();
    let mut values = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    values[7] = f32::NAN;
    *w = Tensor::from_vec(values, w.shape(), &Device::Cpu).unwrap();
    idkm::checkpoint::save(&tensors, &Default::default(), &path).unwrap();
    refused(
        &[
            "quantize",
            "--model",
            s(&path),
            "--data",
            &common::fashion_mnist_arg(),
            "--train-limit",
            "64",
            "--test-limit",
            "64",
            "-o",
            s(&temp(&dir, "o")),
        ],
        &["nan.safetensors", "fc1.weight", "non-finite"],
    );
}

#[test]
fn a_data_directory_with_a_missing_or_short_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = common::fashion_mnist();
    for name in [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
    ] {
        std::fs::copy(src.join(name), dir.path().join(name)).unwrap();
    }
    refused(
        &[
            "eval",
            "--model",
            "small-cnn-none.safetensors",
            "--data",
            s(dir.path()),
        ],
        &["t10k-labels-idx1-ubyte"],
    );
    // The test labels: the header says 10,000, the file holds 10.
    let mut labels = 2049u32.to_be_bytes().to_vec();
    labels.extend(10_000u32.to_be_bytes());
    labels.extend([0u8; 10]);
    std::fs::write(dir.path().join("t10k-labels-idx1-ubyte"), labels).unwrap();
    refused(
        &[
            "eval",
            "--model",
            "small-cnn-none.safetensors",
            "--data",
            s(dir.path()),
        ],
        &["t10k-labels-idx1-ubyte"],
    );
}

#[test]
fn an_unknown_hub_id_while_offline() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_idkm"))
        .args(["pull", "nobody/no-such-model"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("nobody/no-such-model") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[test]
fn an_output_path_that_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let file = temp(&dir, "a-file");
    std::fs::write(&file, b"").unwrap();
    let output = file.join("out.safetensors");
    refused(
        &["cluster", "--output", s(&output)],
        &["a-file/out.safetensors"],
    );
}
