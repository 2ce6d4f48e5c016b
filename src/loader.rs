//! The one loader behind every `--model`: a model file, whatever wrote it,
//! becomes a [`Model`] (and, for `idkm quantize`'s checkpoints, its
//! [`Clustering`]).
//!
//! What the file is comes from its bytes and metadata, never its name:
//! a checkpoint written by `idkm train`/`quantize` ([`Kind::Snapshot`]), a
//! palettized model written by `idkm export` ([`Kind::Palettized`]), or a
//! state dict from anywhere else ([`Kind::StateDict`]: safetensors or
//! PyTorch, including `idkm export --format torch`). For a state dict the
//! architecture is the one asked for or, when none is, inferred from the
//! tensor names and shapes ([`infer_arch`]); the input channels and the
//! number of classes come from the first convolution and the classifier.

use crate::checkpoint::{self, Format, LoadOptions};
use crate::error::{Error, Result};
use crate::model::{Arch, Model};
use crate::quantize::{snapshot, Clustering, Palettized};
use candle_core::Device;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// What the caller knows about the model it wants.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The architecture, when the user named one (`--arch`).
    pub arch: Option<Arch>,
    /// Input channels of the data, for a state dict without a first
    /// convolution to take them from.
    pub channels: Option<usize>,
    /// Classes of the data, for a state dict whose classifier is skipped
    /// (a new head) or absent.
    pub classes: Option<usize>,
    /// State-dict tensors with these name prefixes are left out (`fc.`).
    pub skip: Vec<String>,
    /// Seed of the variables a state dict does not fill.
    pub seed: u64,
}

/// What a model file turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A checkpoint written by `idkm train` or `idkm quantize`.
    Snapshot,
    /// A palettized model written by `idkm export`, with its number of clustered tensors.
    Palettized { clustered: usize },
    /// A state dict of float tensors from elsewhere, in this format.
    StateDict(Format),
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kind::Snapshot => f.write_str("idkm checkpoint"),
            Kind::Palettized { clustered } => {
                write!(f, "palettized, {clustered} clustered tensors")
            }
            Kind::StateDict(format) => write!(f, "{format} state dict"),
        }
    }
}

/// A model read from a file.
pub struct Loaded {
    /// The model with the file's weights.
    pub model: Model,
    /// The clustered layers of a checkpoint written by `idkm quantize`.
    pub clustering: Option<Clustering>,
    /// What the file was.
    pub kind: Kind,
    /// The file's safetensors metadata (empty for PyTorch files).
    pub metadata: HashMap<String, String>,
}

/// Reads the model in `path` onto `device`.
pub fn load(path: &Path, request: &Request, device: &Device) -> Result<Loaded> {
    let format = checkpoint::detect(path)?;
    let metadata = match format {
        Format::Safetensors => checkpoint::metadata(path)?,
        Format::TorchZip | Format::TorchLegacy => HashMap::new(),
    };
    let mismatch = |found: Arch| Error::Checkpoint {
        path: path.to_path_buf(),
        details: format!(
            "it holds a {found} model, not {} (--arch)",
            request.arch.unwrap_or(found)
        ),
    };
    match metadata.get("idkm.format").map(String::as_str) {
        Some(crate::quantize::PALETTIZED_FORMAT) => {
            let p = Palettized::load(path)?;
            if request.arch.is_some_and(|a| a != p.arch) {
                return Err(mismatch(p.arch));
            }
            let model = Model::new(p.arch, p.channels, p.classes, request.seed, device)?;
            model.assign(p.tensors()?, path)?;
            let kind = Kind::Palettized {
                clustered: p.packed.len(),
            };
            Ok(Loaded {
                model,
                clustering: None,
                kind,
                metadata,
            })
        }
        None if snapshot::is_snapshot(path) => {
            let s = snapshot::load(path, device)?;
            if request.arch.is_some_and(|a| a != s.model.arch()) {
                return Err(mismatch(s.model.arch()));
            }
            Ok(Loaded {
                model: s.model,
                clustering: s.clustering,
                kind: Kind::Snapshot,
                metadata: s.metadata,
            })
        }
        None | Some(crate::quantize::TORCH_FORMAT) => {
            let model = state_dict(path, checkpoint::read(path)?, request, device)?;
            Ok(Loaded {
                model,
                clustering: None,
                kind: Kind::StateDict(format),
                metadata,
            })
        }
        Some(other) => Err(Error::Format {
            path: path.to_path_buf(),
            msg: format!("idkm format `{other}`, which this version of idkm does not read"),
        }),
    }
}

/// A model filled from a state dict.
fn state_dict(
    path: &Path,
    tensors: checkpoint::NamedTensors,
    request: &Request,
    device: &Device,
) -> Result<Model> {
    let names: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
    let known: HashSet<String> = ["conv1.weight", "fc.weight", "fc.bias"]
        .map(String::from)
        .into();
    let shapes: HashMap<String, Vec<usize>> = checkpoint::canonical_names(&names, &known)
        .into_iter()
        .zip(tensors.iter().map(|(_, t)| t.dims().to_vec()))
        .collect();
    let arch = match request.arch {
        Some(arch) => arch,
        None => {
            let (arch, evidence) = infer_arch(&shapes).map_err(|why| Error::Format {
                path: path.to_path_buf(),
                msg: format!("cannot tell the architecture from the tensors ({why}); pass --arch"),
            })?;
            tracing::info!(path = %path.display(), %arch, "architecture inferred from the tensors: {evidence} (--arch chooses another)");
            arch
        }
    };
    let skipped = |name: &str| request.skip.iter().any(|p| name.starts_with(p.as_str()));
    let head = if arch == Arch::SmallCnn {
        "fc2.weight"
    } else {
        "fc.weight"
    };
    let channels = shapes
        .get("conv1.weight")
        .and_then(|s| s.get(1).copied())
        .or(request.channels);
    let classes = shapes
        .get(head)
        .filter(|_| !skipped(head))
        .and_then(|s| s.first().copied())
        .or(request.classes);
    let (Some(channels), Some(classes)) = (channels, classes) else {
        return Err(Error::Format {
            path: path.to_path_buf(),
            msg: format!(
                "has no conv1.weight or {head} to take the input channels and the classes from"
            ),
        });
    };
    let model = Model::new(arch, channels, classes, request.seed, device)?;
    let options = LoadOptions {
        skip_prefixes: request.skip.clone(),
        allow_unexpected: false,
    };
    let report = checkpoint::load_tensors(model.varmap(), tensors, path, &options)?;
    tracing::info!(path = %path.display(), loaded = report.loaded, skipped = report.skipped.len(), "loaded the state dict");
    Ok(model)
}

/// The architecture whose layers a state dict holds (names after
/// [`checkpoint::canonical_names`], with their shapes), with the evidence
/// for the log; or why none fits.
///
/// `layer1.0` … `layer4.1` of basic blocks make a ResNet18, whose stem is
/// told by `conv1.weight`: 7x7 is the ImageNet layout, 3x3 the CIFAR stem.
/// `conv1`, `conv2`, `fc1` and `fc2` with a 16-filter 3x3 `conv1` make the
/// small CNN.
pub fn infer_arch(
    shapes: &HashMap<String, Vec<usize>>,
) -> std::result::Result<(Arch, String), String> {
    let has = |name: &str| shapes.contains_key(name);
    let Some(conv1) = shapes.get("conv1.weight") else {
        let mut names: Vec<&String> = shapes.keys().collect();
        names.sort();
        let shown: Vec<&str> = names.iter().take(5).map(|s| s.as_str()).collect();
        return Err(format!(
            "no conv1.weight among {} tensors: {}, …",
            names.len(),
            shown.join(", ")
        ));
    };
    if has("layer1.0.conv1.weight") && has("layer4.1.conv2.weight") {
        if has("layer1.0.conv3.weight") {
            return Err(
                "a ResNet with bottleneck blocks (ResNet-50 or deeper); idkm has ResNet18".into(),
            );
        }
        if has("layer1.2.conv1.weight") || has("layer3.2.conv1.weight") {
            return Err(
                "a ResNet with more than two blocks per stage (ResNet-34?); idkm has ResNet18"
                    .into(),
            );
        }
        return match conv1.as_slice() {
            [64, _, 7, 7] => Ok((
                Arch::ResNet18,
                "layer1..layer4 of basic blocks and a 7x7 conv1".into(),
            )),
            [64, _, 3, 3] => Ok((
                Arch::ResNet18Cifar,
                "layer1..layer4 of basic blocks and a 3x3 conv1 (CIFAR stem)".into(),
            )),
            other => Err(format!(
                "a ResNet whose conv1.weight is {other:?}, neither the 7x7 nor the 3x3 stem"
            )),
        };
    }
    if has("conv2.weight") && has("fc1.weight") && has("fc2.weight") {
        return match conv1.as_slice() {
            [16, _, 3, 3] => Ok((Arch::SmallCnn, "conv1, conv2, fc1 and fc2 with a 16-filter 3x3 conv1".into())),
            other => Err(format!("conv1, conv2, fc1 and fc2 as in the small CNN, but conv1.weight is {other:?}, not [16, C, 3, 3]")),
        };
    }
    Err(format!("conv1.weight {conv1:?}, but neither ResNet18's layer1..layer4 nor the small CNN's conv2, fc1, fc2"))
}
