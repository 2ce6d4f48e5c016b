//! Checkpoints: safetensors and PyTorch files into a `VarMap` by name, clear
//! errors for what does not fit, and atomic saves with metadata.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarMap};
use idkm::checkpoint::{self, LoadOptions, LoadReport};
use idkm::Error;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

/// The variables of a tiny torchvision-style ResNet, all zeros.
const MODEL: [(&str, &[usize]); 8] = [
    ("conv1.weight", &[4, 3, 3, 3]),
    ("bn1.weight", &[4]),
    ("bn1.bias", &[4]),
    ("bn1.running_mean", &[4]),
    ("bn1.running_var", &[4]),
    ("layer1.0.downsample.0.weight", &[4, 4, 1, 1]),
    ("fc.weight", &[10, 4]),
    ("fc.bias", &[10]),
];

/// The variables of `varmap` by name, as `checkpoint::save` takes them.
fn tensors(varmap: &VarMap) -> BTreeMap<String, Tensor> {
    varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect()
}

fn model() -> VarMap {
    let varmap = VarMap::new();
    for (name, shape) in MODEL {
        varmap
            .get(shape, name, Init::Const(0.0), DType::F32, &Device::Cpu)
            .unwrap();
    }
    varmap
}

/// Distinct values for every tensor (`seed` tells tensors apart); for the
/// model's sizes they are multiples of 0.25 below 64, exact even in bf16.
fn values(shape: &[usize], seed: usize) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| seed as f32 * 4.0 + i as f32 * 0.25 - 3.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The model's names with distinct values.
fn weights() -> Vec<(String, Tensor)> {
    MODEL
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| (name.to_string(), values(shape, i + 1)))
        .collect()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn var(varmap: &VarMap, name: &str) -> Vec<f32> {
    flat(varmap.data().lock().unwrap()[name].as_tensor())
}

fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) {
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

fn assert_holds(varmap: &VarMap, tensors: &[(String, Tensor)]) {
    for (name, t) in tensors {
        assert_eq!(var(varmap, name), flat(t), "{name}");
    }
}

fn checkpoint_details(e: Error) -> String {
    match e {
        Error::Checkpoint { details, .. } => details,
        other => panic!("expected a checkpoint error, got {other}"),
    }
}

#[test]
fn safetensors_fill_every_variable_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    save_safetensors(&path, &weights());
    let varmap = model();
    let report = checkpoint::load_into(&varmap, &path, &LoadOptions::default()).unwrap();
    assert_eq!(
        report,
        LoadReport {
            loaded: MODEL.len(),
            ..Default::default()
        }
    );
    assert_holds(&varmap, &weights());
}

#[test]
fn wrapper_prefixes_are_stripped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ddp.safetensors");
    let wrapped: Vec<_> = weights()
        .into_iter()
        .map(|(n, t)| (format!("module._orig_mod.{n}"), t))
        .collect();
    save_safetensors(&path, &wrapped);
    let varmap = model();
    let report = checkpoint::load_into(&varmap, &path, &LoadOptions::default()).unwrap();
    assert_eq!(report.loaded, MODEL.len());
    assert_holds(&varmap, &weights());
}

#[test]
fn half_and_double_inputs_are_converted_and_integers_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.safetensors");
    let dtypes = [DType::F16, DType::BF16, DType::F64, DType::F32];
    let mut tensors: Vec<_> = weights()
        .into_iter()
        .enumerate()
        .map(|(i, (n, t))| (n, t.to_dtype(dtypes[i % dtypes.len()]).unwrap()))
        .collect();
    tensors.push((
        "bn1.num_batches_tracked".to_string(),
        Tensor::new(7i64, &Device::Cpu).unwrap(),
    ));
    save_safetensors(&path, &tensors);

    let read = checkpoint::read(&path).unwrap();
    let names: Vec<&str> = read.iter().map(|(n, _)| n.as_str()).collect();
    let mut expected: Vec<&str> = MODEL.iter().map(|(n, _)| *n).collect();
    expected.sort();
    assert_eq!(names, expected, "sorted, integer tensor dropped");
    assert!(read.iter().all(|(_, t)| t.dtype() == DType::F32));

    let varmap = model();
    checkpoint::load_into(&varmap, &path, &LoadOptions::default()).unwrap();
    assert_holds(&varmap, &weights());
}

#[test]
fn every_misfit_is_listed_in_one_error_and_nothing_is_copied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    let mut tensors: Vec<_> = weights()
        .into_iter()
        .filter(|(n, _)| n != "bn1.running_var" && n != "bn1.bias")
        .map(|(n, t)| {
            if n == "fc.weight" {
                (n, values(&[1000, 4], 9))
            } else {
                (n, t)
            }
        })
        .collect();
    tensors.push(("bn1.runing_var".to_string(), values(&[4], 10)));
    tensors.push(("extra.weight".to_string(), values(&[3, 2], 11)));
    save_safetensors(&path, &tensors);

    let varmap = model();
    let e = checkpoint::load_into(&varmap, &path, &LoadOptions::default()).unwrap_err();
    let message = e.to_string();
    assert!(message.contains(&*path.to_string_lossy()), "{message}");
    let details = checkpoint_details(e);
    assert!(
        details.starts_with("2 missing, 1 mis-shaped, 2 unexpected"),
        "{details}"
    );
    let line = |start: &str| {
        details
            .lines()
            .find(|l| l.trim_start().starts_with(start))
            .unwrap_or_else(|| panic!("no `{start}` in:\n{details}"))
            .to_string()
    };
    assert_eq!(
        line("missing     bn1.bias"),
        "  missing     bn1.bias: model [4]",
        "{details}"
    );
    let running_var = line("missing     bn1.running_var: model [4]");
    assert!(
        running_var.contains("closest unused in the checkpoint: bn1.runing_var [4]"),
        "{details}"
    );
    assert!(
        line("mis-shaped  fc.weight").ends_with("fc.weight: model [10, 4], checkpoint [1000, 4]"),
        "{details}"
    );
    assert!(
        line("unexpected  extra.weight").ends_with("checkpoint [3, 2]"),
        "{details}"
    );
    assert!(
        line("unexpected  bn1.runing_var").ends_with("checkpoint [4]"),
        "{details}"
    );
    // Nothing was copied, not even the tensors that fit.
    assert_eq!(var(&varmap, "conv1.weight"), vec![0.0; 108]);
}

#[test]
fn skip_prefixes_keep_the_new_head_and_unexpected_can_be_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imagenet.safetensors");
    let mut tensors: Vec<_> = weights()
        .into_iter()
        .map(|(n, t)| match n.as_str() {
            "fc.weight" => (n, values(&[1000, 4], 20)),
            "fc.bias" => (n, values(&[1000], 21)),
            _ => (n, t),
        })
        .collect();
    save_safetensors(&path, &tensors);

    let varmap = model();
    let strict = checkpoint::load_into(&varmap, &path, &LoadOptions::default()).unwrap_err();
    assert!(checkpoint_details(strict).starts_with("0 missing, 2 mis-shaped"));
    let options = LoadOptions {
        skip_prefixes: vec!["fc.".to_string()],
        ..Default::default()
    };
    let report = checkpoint::load_into(&varmap, &path, &options).unwrap();
    assert_eq!(report.loaded, MODEL.len() - 2);
    assert_eq!(report.skipped, ["fc.bias", "fc.weight"]);
    assert_eq!(
        var(&varmap, "fc.weight"),
        vec![0.0; 40],
        "the head keeps its own values"
    );
    assert_eq!(var(&varmap, "conv1.weight"), flat(&weights()[0].1));

    tensors.push(("aux.weight".to_string(), values(&[2], 22)));
    save_safetensors(&path, &tensors);
    let e = checkpoint::load_into(&varmap, &path, &options).unwrap_err();
    assert!(checkpoint_details(e).contains("unexpected  aux.weight: checkpoint [2]"));
    let options = LoadOptions {
        allow_unexpected: true,
        ..options
    };
    let report = checkpoint::load_into(&varmap, &path, &options).unwrap();
    assert_eq!(report.unexpected, ["aux.weight"]);
}

#[test]
fn save_then_read_round_trips_with_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let (source, saved) = (
        dir.path().join("in.safetensors"),
        dir.path().join("out.safetensors"),
    );
    save_safetensors(&source, &weights());
    assert!(checkpoint::metadata(&source).unwrap().is_empty());
    let varmap = model();
    checkpoint::load_into(&varmap, &source, &LoadOptions::default()).unwrap();

    let metadata: HashMap<String, String> =
        [("bits", "4"), ("method", "idkm"), ("arch", "resnet18")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    std::fs::write(&saved, b"an older file").unwrap();
    checkpoint::save(&tensors(&varmap), &metadata, &saved).unwrap();
    assert_eq!(checkpoint::metadata(&saved).unwrap(), metadata);
    let mut expected = weights();
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    let read = checkpoint::read(&saved).unwrap();
    assert_eq!(read.len(), expected.len());
    for ((name, t), (expected_name, expected_t)) in read.iter().zip(&expected) {
        assert_eq!(
            (name, t.dims(), flat(t)),
            (expected_name, expected_t.dims(), flat(expected_t))
        );
    }
    let mut entries: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        ["in.safetensors", "out.safetensors"],
        "no temporary file left"
    );
}

#[test]
fn a_failed_save_leaves_the_target_and_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    // The target is a non-empty directory: the temporary file is written in
    // full, and the final rename over the directory fails.
    let target = dir.path().join("out.safetensors");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep"), b"kept").unwrap();
    let e = checkpoint::save(&tensors(&model()), &HashMap::new(), &target).unwrap_err();
    assert!(
        matches!(&e, Error::Io { path, .. } if *path == target),
        "{e}"
    );
    assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"kept");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary file left"
    );
}

#[test]
fn save_replaces_the_path_instead_of_writing_into_it() {
    // A temporary file renamed over the path replaces a symlink there, so the
    // file it pointed to is never half-overwritten.
    let dir = tempfile::tempdir().unwrap();
    let (old, link) = (
        dir.path().join("old.safetensors"),
        dir.path().join("link.safetensors"),
    );
    std::fs::write(&old, b"old contents").unwrap();
    std::os::unix::fs::symlink(&old, &link).unwrap();
    checkpoint::save(&tensors(&model()), &HashMap::new(), &link).unwrap();
    assert_eq!(std::fs::read(&old).unwrap(), b"old contents");
    assert!(!std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(checkpoint::read(&link).unwrap().len(), MODEL.len());
}

#[test]
fn unreadable_files_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, b"not a checkpoint at all").unwrap();
    let e = checkpoint::read(&junk).unwrap_err();
    assert!(
        matches!(&e, Error::Format { path, .. } if *path == junk),
        "{e}"
    );
    // The magic number of a legacy PyTorch file, and then nothing.
    let legacy = dir.path().join("legacy.pth");
    std::fs::write(
        &legacy,
        b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.",
    )
    .unwrap();
    let e = checkpoint::read(&legacy).unwrap_err().to_string();
    assert!(
        e.contains("legacy PyTorch file, its protocol version: pickle byte 0"),
        "{e}"
    );
    let e = checkpoint::read(&junk).unwrap_err().to_string();
    assert!(
        e.contains("matches no known format") && e.contains("(\"not a checkpoint\")"),
        "{e}"
    );
    let missing = dir.path().join("missing.safetensors");
    assert!(matches!(checkpoint::read(&missing), Err(Error::Io { path, .. }) if path == missing));
    assert!(matches!(
        checkpoint::metadata(&junk),
        Err(Error::Format { .. })
    ));
}

/// A pickle (protocol 2) writer for the few opcodes `torch.save` uses for a
/// state dict.
#[derive(Default)]
struct Pickle(Vec<u8>);

impl Pickle {
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }
    fn str(&mut self, s: &str) {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn int(&mut self, i: usize) {
        self.0.push(b'J');
        self.0.extend_from_slice(&(i as i32).to_le_bytes());
    }
    fn ints(&mut self, v: &[usize]) {
        self.0.push(b'(');
        v.iter().for_each(|&i| self.int(i));
        self.0.push(b't');
    }
    /// `collections.OrderedDict()`, left on the stack.
    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.0.extend_from_slice(b")R");
    }
    /// `_rebuild_tensor_v2(persistent_load(('storage', storage, key, 'cpu', numel)), offset, size, stride, False, OrderedDict())`.
    fn tensor(&mut self, storage: &str, key: &str, numel: usize, offset: usize, size: &[usize]) {
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.0.push(b'(');
        self.0.push(b'(');
        self.str("storage");
        self.global("torch", storage);
        self.str(key);
        self.str("cpu");
        self.int(numel);
        self.0.extend_from_slice(b"tQ");
        self.int(offset);
        self.ints(size);
        let stride: Vec<usize> = (0..size.len())
            .map(|d| size[d + 1..].iter().product())
            .collect();
        self.ints(&stride);
        self.0.push(0x89); // False
        self.ordered_dict();
        self.0.extend_from_slice(b"tR");
    }
}

/// One state-dict entry of a PyTorch file: name, storage key, offset into it, size.
struct Entry {
    name: String,
    key: String,
    offset: usize,
    size: Vec<usize>,
}

/// Writes a PyTorch zip archive: the entries over `f32` storages plus an
/// `i64` `num_batches_tracked`, the state dict nested under `nest` when given.
fn write_pytorch(
    path: &Path,
    entries: &[Entry],
    storages: &[(String, Vec<f32>)],
    nest: Option<&str>,
) {
    let mut p = Pickle::default();
    p.0.extend_from_slice(&[0x80, 2]);
    if let Some(key) = nest {
        p.0.extend_from_slice(b"}(");
        p.str(key);
    }
    p.ordered_dict();
    p.0.push(b'(');
    for e in entries {
        let numel = storages.iter().find(|(k, _)| *k == e.key).unwrap().1.len();
        p.str(&e.name);
        p.tensor("FloatStorage", &e.key, numel, e.offset, &e.size);
    }
    p.str("bn1.num_batches_tracked");
    p.tensor("LongStorage", "long", 1, 0, &[]);
    p.0.push(b'u');
    if nest.is_some() {
        p.str("epoch");
        p.int(90);
        p.0.push(b'u');
    }
    p.0.push(b'.');

    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", stored).unwrap();
    zip.write_all(&p.0).unwrap();
    for (key, data) in storages {
        zip.start_file(format!("archive/data/{key}"), stored)
            .unwrap();
        data.iter()
            .for_each(|x| zip.write_all(&x.to_le_bytes()).unwrap());
    }
    zip.start_file("archive/data/long", stored).unwrap();
    zip.write_all(&1234i64.to_le_bytes()).unwrap();
    zip.start_file("archive/version", stored).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}

/// Writes the model's tensors (names through `rename`) as a PyTorch file,
/// one storage each except `fc.bias`, which shares `fc.weight`'s storage at
/// an offset, as views do in PyTorch.
fn write_model_pytorch(path: &Path, rename: impl Fn(&str) -> String, nest: Option<&str>) {
    let mut entries = Vec::new();
    let mut storages: Vec<(String, Vec<f32>)> = Vec::new();
    for (i, (name, t)) in weights().into_iter().enumerate() {
        let (data, size) = (flat(&t), t.dims().to_vec());
        if name == "fc.bias" {
            let fc = storages.iter_mut().find(|(k, _)| k == "fc").unwrap();
            entries.push(Entry {
                name: rename(&name),
                key: "fc".to_string(),
                offset: fc.1.len(),
                size,
            });
            fc.1.extend(data);
        } else {
            let key = if name == "fc.weight" {
                "fc".to_string()
            } else {
                i.to_string()
            };
            entries.push(Entry {
                name: rename(&name),
                key: key.clone(),
                offset: 0,
                size,
            });
            storages.push((key, data));
        }
    }
    write_pytorch(path, &entries, &storages, nest);
}

#[test]
fn pytorch_state_dict_loads_with_exact_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resnet.pth");
    write_model_pytorch(&path, str::to_string, None);
    let read = checkpoint::read(&path).unwrap();
    assert_eq!(
        read.len(),
        MODEL.len(),
        "num_batches_tracked (int64) is skipped"
    );
    let varmap = model();
    let report = checkpoint::load_into(&varmap, &path, &LoadOptions::default()).unwrap();
    assert_eq!(report.loaded, MODEL.len());
    assert_holds(&varmap, &weights());
}

#[test]
fn pytorch_nested_state_dict_loads() {
    let dir = tempfile::tempdir().unwrap();
    for key in ["state_dict", "model"] {
        let path = dir.path().join(format!("{key}.pt"));
        write_model_pytorch(&path, |n| format!("module.{n}"), Some(key));
        let varmap = model();
        let report = checkpoint::load_into(&varmap, &path, &LoadOptions::default()).unwrap();
        assert_eq!(report.loaded, MODEL.len(), "{key}");
        assert_holds(&varmap, &weights());
    }
    let path = dir.path().join("other.pt");
    write_model_pytorch(&path, str::to_string, Some("weights"));
    let e = checkpoint::read(&path).unwrap_err();
    assert!(e.to_string().contains("holds no tensors"), "{e}");
}

#[test]
fn timm_style_bin_maps_the_head_onto_fc() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pytorch_model.bin");
    write_model_pytorch(
        &path,
        |n| {
            n.strip_prefix("fc.")
                .map_or(n.to_string(), |rest| format!("head.fc.{rest}"))
        },
        None,
    );
    let names: Vec<String> = checkpoint::read(&path)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(names.contains(&"head.fc.weight".to_string()), "{names:?}");
    let varmap = model();
    let report = checkpoint::load_into(&varmap, &path, &LoadOptions::default()).unwrap();
    assert_eq!(report.loaded, MODEL.len());
    assert_holds(&varmap, &weights());
    // skip_prefixes applies to the model's name of the head.
    let options = LoadOptions {
        skip_prefixes: vec!["fc.".to_string()],
        ..Default::default()
    };
    let report = checkpoint::load_into(&model(), &path, &options).unwrap();
    assert_eq!(report.skipped, ["head.fc.bias", "head.fc.weight"]);
    // Errors give the file's name of a mapped tensor too.
    let five_classes = VarMap::new();
    five_classes
        .get(
            (5, 4),
            "fc.weight",
            Init::Const(0.0),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
    let options = LoadOptions {
        allow_unexpected: true,
        ..Default::default()
    };
    let details =
        checkpoint_details(checkpoint::load_into(&five_classes, &path, &options).unwrap_err());
    assert!(
        details.contains("mis-shaped  fc.weight: model [5, 4], checkpoint [10, 4] (`head.fc.weight` in the file)"),
        "{details}"
    );
}

#[test]
fn views_beyond_their_storage_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let storages = vec![("0".to_string(), vec![0.5f32; 108])];
    let cases: [(usize, Vec<usize>); 2] =
        [(100, vec![4, 3, 3, 3]), (0, vec![i32::MAX as usize; 3])];
    for (offset, size) in cases {
        let path = dir.path().join("bad.pth");
        let entries = [Entry {
            name: "conv1.weight".into(),
            key: "0".into(),
            offset,
            size: size.clone(),
        }];
        write_pytorch(&path, &entries, &storages, None);
        let e = checkpoint::read(&path).unwrap_err().to_string();
        assert!(
            e.contains("tensor `conv1.weight`")
                && e.contains("reaches beyond storage `0`, which holds 108"),
            "{size:?}: {e}"
        );
    }
}
