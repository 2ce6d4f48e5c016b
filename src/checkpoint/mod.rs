//! Reading and writing model checkpoints: safetensors and PyTorch files
//! (the zip archive of `torch.save` and its legacy format).
//!
//! [`read`] gives the float tensors of a checkpoint whatever its format
//! ([`format::detect`] tells it from the bytes), [`load_into`] copies them
//! into a model's [`VarMap`] by name (after [`canonical_names`] has mapped
//! the checkpoint's names onto the model's), and [`save`] writes a `VarMap`
//! back as safetensors with metadata.

pub mod format;
mod pickle;
mod torch;

pub use format::{detect, Format};
pub use torch::NESTED_KEYS;

use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::Path;

/// Tensors by name, as [`read`] gives them.
pub type NamedTensors = Vec<(String, Tensor)>;

/// Prefixes that wrappers put before every parameter name: `module.`
/// (DataParallel, DistributedDataParallel), `_orig_mod.` (`torch.compile`),
/// `model.`, `backbone.` and `net.` (training frameworks).
const WRAPPER_PREFIXES: [&str; 5] = ["module.", "_orig_mod.", "model.", "backbone.", "net."];

/// Classifier heads that other code bases name differently from
/// torchvision's `fc.`, tried in this order.
const HEAD_ALIASES: [(&str, &str); 4] = [
    ("head.fc.", "fc."),
    ("head.", "fc."),
    ("classifier.", "fc."),
    ("last_linear.", "fc."),
];

/// The largest safetensors header [`metadata`] accepts (the limit of the
/// safetensors crate).
const MAX_HEADER: u64 = 100_000_000;

/// How checkpoint tensors that do not match the model are treated by [`load_into`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Tensors whose (canonical) name starts with one of these are neither
    /// loaded nor required: `["fc."]` keeps a new 10-class head when
    /// fine-tuning from a 1000-class checkpoint.
    pub skip_prefixes: Vec<String>,
    /// Accept checkpoint tensors that the model has no variable for.
    pub allow_unexpected: bool,
}

/// What [`load_into`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Number of variables filled from the checkpoint.
    pub loaded: usize,
    /// Checkpoint tensors left out by [`LoadOptions::skip_prefixes`] (names as in the file, sorted).
    pub skipped: Vec<String>,
    /// Checkpoint tensors the model has no variable for (names as in the file, sorted).
    pub unexpected: Vec<String>,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn format_error(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Reads every float tensor of a checkpoint, as f32 on the CPU, sorted by name.
///
/// The format is recognised from the bytes ([`detect`]): safetensors, or a
/// PyTorch file (`.bin`, `.pth`, `.pt`; zip or legacy) holding a state dict
/// at the top level, nested in a training checkpoint under one of
/// [`NESTED_KEYS`] (the first that holds tensors), or as the parameters of
/// a whole pickled `nn.Module`. f16, bf16 and f64 tensors are converted;
/// PyTorch tensors are read through their offsets and strides, so views
/// into shared storages read as PyTorch shows them; integer tensors (such
/// as batch norm's `num_batches_tracked`) are skipped.
pub fn read(path: &Path) -> Result<NamedTensors> {
    match detect(path)? {
        Format::Safetensors => read_safetensors(path),
        Format::TorchZip => torch::read_zip(path),
        Format::TorchLegacy => torch::read_legacy(path),
    }
}

/// The float tensors of a safetensors file as f32, sorted by name.
fn read_safetensors(path: &Path) -> Result<NamedTensors> {
    use safetensors::Dtype;
    let bytes = std::fs::read(path).map_err(io_error(path))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| format_error(path, format!("reading safetensors: {e}")))?;
    let mut floats = Vec::new();
    for (name, view) in file.tensors() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect(),
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                tracing::debug!(tensor = %name, dtype = ?other, "skipping a non-float checkpoint tensor");
                continue;
            }
        };
        let tensor = Tensor::from_vec(values, view.shape(), &Device::Cpu)
            .map_err(|e| format_error(path, format!("tensor `{name}`: {e}")))?;
        floats.push((name, tensor));
    }
    floats.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(floats)
}

/// Maps checkpoint tensor names onto the variable names of a model, in the
/// same order. Two rules, applied in order:
///
/// 1. Wrapper prefixes. While every checkpoint name starts with one of
///    `module.`, `_orig_mod.`, `model.`, `backbone.`, `net.`, and no model
///    name does, that prefix is removed from every name (so
///    `module._orig_mod.conv1.weight` becomes `conv1.weight`).
/// 2. Classifier heads. A name that the model lacks and that starts with
///    `head.fc.`, `head.`, `classifier.` or `last_linear.` (the first that
///    matches) becomes `fc.` followed by the rest, provided the model has that
///    name and no other checkpoint name is or becomes it (timm's
///    `head.fc.weight` becomes `fc.weight`).
///
/// Every other name is kept as it is.
pub fn canonical_names(checkpoint: &[String], model: &HashSet<String>) -> Vec<String> {
    let mut names = checkpoint.to_vec();
    while let Some(prefix) = WRAPPER_PREFIXES.into_iter().find(|p| {
        !names.is_empty()
            && names.iter().all(|n| n.starts_with(p))
            && !model.iter().any(|m| m.starts_with(p))
    }) {
        for name in &mut names {
            name.drain(..prefix.len());
        }
    }
    let mut taken: HashSet<String> = names.iter().cloned().collect();
    for name in &mut names {
        if model.contains(name.as_str()) {
            continue;
        }
        let alias = HEAD_ALIASES
            .into_iter()
            .find_map(|(from, to)| name.strip_prefix(from).map(|rest| format!("{to}{rest}")));
        if let Some(alias) = alias.filter(|a| model.contains(a)) {
            if taken.insert(alias.clone()) {
                *name = alias;
            }
        }
    }
    names
}

/// A checkpoint tensor with its name in the file and in the model.
struct Entry {
    file_name: String,
    name: String,
    tensor: Tensor,
}

impl Entry {
    /// ` (`file name` in the file)` where the file's name differs, else nothing.
    fn file_note(&self) -> String {
        if self.file_name == self.name {
            String::new()
        } else {
            format!(" (`{}` in the file)", self.file_name)
        }
    }
}

/// Copies a checkpoint's tensors into every variable of `varmap`, matched by
/// [`canonical_names`] and requiring the exact shape (values are converted
/// to each variable's dtype and device).
///
/// All problems are reported together, and then nothing is copied: variables
/// without a tensor, tensors of the wrong shape, and (unless
/// [`LoadOptions::allow_unexpected`]) tensors without a variable give one
/// [`Error::Checkpoint`] that lists each name with the shapes, and for a
/// missing variable the closest unused checkpoint names.
pub fn load_into(varmap: &VarMap, path: &Path, options: &LoadOptions) -> Result<LoadReport> {
    load_tensors(varmap, read(path)?, path, options)
}

/// [`load_into`] with the tensors already read from `path` (which names
/// the file in errors).
pub fn load_tensors(
    varmap: &VarMap,
    tensors: NamedTensors,
    path: &Path,
    options: &LoadOptions,
) -> Result<LoadReport> {
    let vars = varmap
        .data()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let model: HashSet<String> = vars.keys().cloned().collect();
    let file_names: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
    let names = canonical_names(&file_names, &model);
    let skip = |name: &str| {
        options
            .skip_prefixes
            .iter()
            .any(|p| name.starts_with(p.as_str()))
    };

    let mut report = LoadReport::default();
    let (mut fits, mut misfits, mut unused) = (Vec::new(), Vec::new(), Vec::new());
    for ((file_name, tensor), name) in tensors.into_iter().zip(names) {
        let entry = Entry {
            file_name,
            name,
            tensor,
        };
        if skip(&entry.name) {
            report.skipped.push(entry.file_name);
            continue;
        }
        match vars.get(&entry.name) {
            None => unused.push(entry),
            Some(var) if var.dims() != entry.tensor.dims() => {
                misfits.push((var.dims().to_vec(), entry))
            }
            Some(var) => fits.push((var.clone(), entry)),
        }
    }
    let found: HashSet<&str> = fits
        .iter()
        .map(|(_, e)| e.name.as_str())
        .chain(misfits.iter().map(|(_, e)| e.name.as_str()))
        .collect();
    let mut missing: Vec<(&String, &Var)> = vars
        .iter()
        .filter(|(n, _)| !found.contains(n.as_str()) && !skip(n))
        .collect();
    missing.sort_by(|a, b| a.0.cmp(b.0));

    if !missing.is_empty()
        || !misfits.is_empty()
        || (!unused.is_empty() && !options.allow_unexpected)
    {
        let details = mismatch_details(&missing, &misfits, &unused, options.allow_unexpected);
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            details,
        });
    }
    for (var, entry) in fits {
        let copied = entry
            .tensor
            .to_dtype(var.dtype())
            .and_then(|t| t.to_device(var.device()))
            .and_then(|t| var.set(&t));
        copied.map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            details: format!("copying `{}` into the model: {e}", entry.file_name),
        })?;
        report.loaded += 1;
    }
    report.unexpected = unused.into_iter().map(|e| e.file_name).collect();
    Ok(report)
}

/// The body of [`Error::Checkpoint`]: a count, then one line per problem.
fn mismatch_details(
    missing: &[(&String, &Var)],
    misfits: &[(Vec<usize>, Entry)],
    unused: &[Entry],
    allow_unexpected: bool,
) -> String {
    let unexpected = if allow_unexpected { &[][..] } else { unused };
    let mut lines = vec![format!(
        "{} missing, {} mis-shaped, {} unexpected:",
        missing.len(),
        misfits.len(),
        unexpected.len()
    )];
    for (name, var) in missing {
        let mut line = format!("  missing     {name}: model {:?}", var.dims());
        let closest = closest(name, unused);
        if !closest.is_empty() {
            line.push_str(&format!(
                "; closest unused in the checkpoint: {}",
                closest.join(", ")
            ));
        }
        lines.push(line);
    }
    for (dims, entry) in misfits {
        let (name, found, note) = (&entry.name, entry.tensor.dims(), entry.file_note());
        lines.push(format!(
            "  mis-shaped  {name}: model {dims:?}, checkpoint {found:?}{note}"
        ));
    }
    for entry in unexpected {
        let (name, found, note) = (&entry.name, entry.tensor.dims(), entry.file_note());
        lines.push(format!("  unexpected  {name}: checkpoint {found:?}{note}"));
    }
    lines.push(
        "(LoadOptions::skip_prefixes leaves out tensors such as a classifier head; allow_unexpected accepts extra tensors)"
            .to_string(),
    );
    lines.join("\n")
}

/// Up to three unused checkpoint tensors whose names are closest to `name`
/// (edit distance at most half the name's length).
fn closest(name: &str, unused: &[Entry]) -> Vec<String> {
    let mut scored: Vec<(usize, &Entry)> = unused
        .iter()
        .map(|e| (edit_distance(name, &e.name), e))
        .filter(|(d, _)| *d <= name.len() / 2)
        .collect();
    scored.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
    scored
        .into_iter()
        .take(3)
        .map(|(_, e)| format!("{} {:?}{}", e.name, e.tensor.dims(), e.file_note()))
        .collect()
}

/// Levenshtein distance between two strings, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

/// Saves named tensors with string `metadata` as a safetensors file,
/// atomically: a temporary file next to `path` is renamed over it, so a
/// failed save leaves `path` as it was.
pub fn save(
    tensors: &BTreeMap<String, Tensor>,
    metadata: &HashMap<String, String>,
    path: &Path,
) -> Result<()> {
    let tensors = tensors
        .iter()
        .map(|(name, t)| Ok((name.clone(), t.to_device(&Device::Cpu)?)))
        .collect::<Result<BTreeMap<String, Tensor>>>()?;
    crate::io::write_atomic::<std::io::Error>(path, |tmp| {
        safetensors::serialize_to_file(&tensors, Some(metadata.clone()), tmp).map_err(|e| match e {
            // The OS error itself (a full disk keeps its kind and message).
            safetensors::SafeTensorError::IoError(e) => e,
            other => std::io::Error::other(other),
        })
    })
    .map_err(io_error(path))
}

/// Reads the string metadata (`__metadata__`) of a safetensors file, empty
/// when it has none; only the header is read.
pub fn metadata(path: &Path) -> Result<HashMap<String, String>> {
    let format = detect(path)?;
    if format != Format::Safetensors {
        return Err(format_error(
            path,
            format!("a {format} file, which has no safetensors metadata"),
        ));
    }
    let mut file = std::fs::File::open(path).map_err(io_error(path))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| format_error(path, "too short for a safetensors file"))?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER {
        return Err(format_error(
            path,
            format!("safetensors header of {len} bytes is implausibly large"),
        ));
    }
    let mut header = Vec::with_capacity(len as usize);
    file.take(len)
        .read_to_end(&mut header)
        .map_err(io_error(path))?;
    if header.len() as u64 != len {
        return Err(format_error(
            path,
            format!(
                "safetensors header truncated ({} of {len} bytes)",
                header.len()
            ),
        ));
    }
    let header: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| format_error(path, format!("safetensors header: {e}")))?;
    match header.get("__metadata__") {
        None => Ok(HashMap::new()),
        Some(meta) => serde_json::from_value(meta.clone()).map_err(|e| {
            format_error(
                path,
                format!("safetensors `__metadata__` is not a map of strings: {e}"),
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn set(v: &[&str]) -> HashSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn wrapper_prefixes_are_stripped_only_from_every_name() {
        let model = set(&["conv1.weight", "fc.weight"]);
        let nested = names(&[
            "module._orig_mod.conv1.weight",
            "module._orig_mod.fc.weight",
        ]);
        assert_eq!(
            canonical_names(&nested, &model),
            names(&["conv1.weight", "fc.weight"])
        );
        // One name without the prefix: nothing is stripped.
        let mixed = names(&["module.conv1.weight", "fc.weight"]);
        assert_eq!(canonical_names(&mixed, &model), mixed);
        // The model itself uses the prefix: nothing is stripped.
        let model = set(&["model.conv1.weight"]);
        assert_eq!(
            canonical_names(&names(&["model.conv1.weight"]), &model),
            names(&["model.conv1.weight"])
        );
    }

    #[test]
    fn heads_map_to_fc_only_when_the_model_has_it() {
        let model = set(&["conv1.weight", "fc.weight", "fc.bias"]);
        let timm = names(&["conv1.weight", "head.fc.weight", "head.fc.bias"]);
        assert_eq!(
            canonical_names(&timm, &model),
            names(&["conv1.weight", "fc.weight", "fc.bias"])
        );
        let other = names(&["classifier.weight", "last_linear.bias"]);
        assert_eq!(
            canonical_names(&other, &model),
            names(&["fc.weight", "fc.bias"])
        );
        // The model has no `fc.`: kept as is.
        let cnn = set(&["classifier.weight"]);
        assert_eq!(
            canonical_names(&names(&["classifier.weight"]), &cnn),
            names(&["classifier.weight"])
        );
        // `fc.weight` is already in the checkpoint: the head is not renamed onto it.
        let both = names(&["fc.weight", "head.fc.weight"]);
        assert_eq!(canonical_names(&both, &model), both);
        // Two aliases of one name: the first keeps it.
        let two = names(&["classifier.weight", "head.weight"]);
        assert_eq!(
            canonical_names(&two, &model),
            names(&["fc.weight", "head.weight"])
        );
    }

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("bn1.running_var", "bn1.running_var"), 0);
        assert_eq!(edit_distance("bn1.running_var", "bn1.runing_var"), 1);
        assert_eq!(edit_distance("fc.weight", "fc.bias"), 5); // w deleted, e→b, i, g→a, h→s, t deleted
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
