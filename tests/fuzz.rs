//! Every reader against corrupted files: each file of a seed corpus
//! (PyTorch's own files in `tests/fixtures/torch`, and an idkm checkpoint,
//! a palettized export, (Fashion-)MNIST IDX files, CIFAR-10 batches and a
//! layer config written here) is mutated many times, seeded: bit flips,
//! overwritten bytes, truncations, insertions, lengths that lie. Every
//! reader must answer with the model or data, or an error, and never panic.
//!
//! `IDKM_FUZZ_ITERS` sets the mutations per file (default 300, about a
//! second); `just fuzz` runs many more. A mutation that made a reader
//! panic is printed with its seed, to become a regression test.

mod common;

use candle_core::Device;
use idkm::cluster::KmeansConfig;
use idkm::loader::{self, Request};
use idkm::quantize::{LutDType, Palettized, QuantizePlan};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

fn iterations() -> usize {
    std::env::var("IDKM_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300)
}

/// One random corruption of `bytes`.
fn mutate(bytes: &mut Vec<u8>, rng: &mut StdRng) {
    let len = bytes.len().max(1);
    match rng.random_range(0..6) {
        0 => {
            for _ in 0..rng.random_range(1..8) {
                let i = rng.random_range(0..len).min(bytes.len().saturating_sub(1));
                if let Some(b) = bytes.get_mut(i) {
                    *b ^= 1 << rng.random_range(0..8);
                }
            }
        }
        1 => {
            // Interesting values in the first bytes (headers, lengths).
            let i = rng.random_range(0..len.min(256));
            let v = [0u8, 0xff, 0x7f, 0x80, 1][rng.random_range(0..5)];
            if let Some(b) = bytes.get_mut(i) {
                *b = v;
            }
        }
        2 => bytes.truncate(rng.random_range(0..len)),
        3 => {
            let i = rng.random_range(0..=bytes.len());
            let extra: Vec<u8> = (0..rng.random_range(1..64)).map(|_| rng.random()).collect();
            bytes.splice(i..i, extra);
        }
        4 => {
            // A length that lies: a little-endian or big-endian integer.
            if bytes.len() >= 8 {
                let i = rng.random_range(0..bytes.len().min(512) - 7);
                let v: u64 = [0, 1, u32::MAX as u64, u64::MAX, 1 << 40][rng.random_range(0..5)];
                let b = if rng.random() {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                bytes[i..i + 8].copy_from_slice(&b);
            }
        }
        _ => {
            // A chunk copied over another place.
            if bytes.len() >= 2 {
                let (a, b) = (
                    rng.random_range(0..bytes.len()),
                    rng.random_range(0..bytes.len()),
                );
                let n = rng.random_range(1..=bytes.len() - a.max(b));
                let chunk = bytes[a..a + n].to_vec();
                bytes[b..b + n].copy_from_slice(&chunk);
            }
        }
    }
}

/// Mutates `seed` (written at `path`) many times; `read` must not panic.
fn fuzz(name: &str, seed: &[u8], path: &Path, read: &dyn Fn(&Path)) {
    for i in 0..iterations() {
        let mut rng = StdRng::seed_from_u64(i as u64 ^ (name.len() as u64) << 32);
        let mut bytes = seed.to_vec();
        for _ in 0..rng.random_range(1..4) {
            mutate(&mut bytes, &mut rng);
        }
        std::fs::write(path, &bytes).unwrap();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| read(path)));
        assert!(
            outcome.is_ok(),
            "{name}: mutation {i} made the reader panic"
        );
    }
}

fn read_model(path: &Path) {
    let _ = loader::load(path, &Request::default(), &Device::Cpu);
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch")
}

#[test]
fn model_readers_never_panic_on_corrupted_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut corpus: Vec<(String, Vec<u8>)> = std::fs::read_dir(fixtures())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("pth" | "bin" | "safetensors")
            ) && std::fs::metadata(p).unwrap().len() < 200_000
        })
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    // An idkm checkpoint of a clustered small CNN and its palettized export.
    let (model, clustering) = common::clustered_small_cnn();
    let checkpoint = dir.path().join("checkpoint.safetensors");
    idkm::quantize::snapshot::save(&model, Some(&clustering), &[], &checkpoint).unwrap();
    let export = dir.path().join("export.safetensors");
    clustering
        .palettize(&model, LutDType::F32)
        .unwrap()
        .save(&export)
        .unwrap();
    for path in [&checkpoint, &export] {
        corpus.push((
            path.file_name().unwrap().to_string_lossy().into_owned(),
            std::fs::read(path).unwrap(),
        ));
    }
    assert!(corpus.len() >= 8, "the seed corpus is missing files");
    let target = dir.path().join("mutated");
    for (name, bytes) in &corpus {
        fuzz(name, bytes, &target, &read_model);
    }
    fuzz(
        "export (decoded)",
        &std::fs::read(&export).unwrap(),
        &target,
        &|p| {
            if let Ok(p) = Palettized::load(p) {
                let _ = p.tensors();
            }
        },
    );
}

/// An IDX file: `magic` (2051 images, 2049 labels), then its dimensions and data.
fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend(d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[test]
fn data_readers_never_panic_on_corrupted_files() {
    let dir = tempfile::tempdir().unwrap();
    let read = |p: &Path| {
        let _ = idkm::data::load(p.parent().unwrap());
    };
    // (Fashion-)MNIST: four IDX files, one of them corrupted at a time.
    let images: Vec<u8> = (0..4 * 28 * 28).map(|i| (i % 251) as u8).collect();
    let files = [
        ("train-images-idx3-ubyte", idx(2051, &[4, 28, 28], &images)),
        ("train-labels-idx1-ubyte", idx(2049, &[4], &[0, 1, 2, 3])),
        ("t10k-images-idx3-ubyte", idx(2051, &[4, 28, 28], &images)),
        ("t10k-labels-idx1-ubyte", idx(2049, &[4], &[3, 2, 1, 0])),
    ];
    let mnist = dir.path().join("mnist");
    std::fs::create_dir(&mnist).unwrap();
    for (name, bytes) in &files {
        std::fs::write(mnist.join(name), bytes).unwrap();
    }
    assert!(idkm::data::load(&mnist).is_ok());
    for (name, bytes) in &files {
        fuzz(name, bytes, &mnist.join(name), &read);
        std::fs::write(mnist.join(name), bytes).unwrap();
    }
    // CIFAR-10 binary batches: two records each.
    let record = |label: u8| {
        let mut r = vec![label];
        r.extend((0..3072).map(|i| (i % 256) as u8));
        r
    };
    let batch: Vec<u8> = [record(1), record(7)].concat();
    let cifar = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&cifar).unwrap();
    let names = (1..=5)
        .map(|i| format!("data_batch_{i}.bin"))
        .chain(["test_batch.bin".to_string()]);
    for name in names {
        std::fs::write(cifar.join(name), &batch).unwrap();
    }
    assert!(idkm::data::load(&cifar).is_ok());
    fuzz(
        "data_batch_1.bin",
        &batch,
        &cifar.join("data_batch_1.bin"),
        &read,
    );
}

#[test]
fn the_layer_config_reader_never_panics_on_corrupted_files() {
    let dir = tempfile::tempdir().unwrap();
    let seed = b"min_weights = 2048\n[layers.conv1]\nbits = 8\ncluster_dim = 2\ntau = 1e-4\nmethod = \"idkm-jfb\"\n[layers.fc]\nskip = true\n";
    fuzz("layers.toml", seed, &dir.path().join("layers.toml"), &|p| {
        let _ = QuantizePlan::new(KmeansConfig::default()).with_overrides_file(p);
    });
}
