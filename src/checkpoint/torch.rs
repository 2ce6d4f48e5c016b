//! PyTorch files: the zip archive that `torch.save` writes since PyTorch 1.6
//! and the legacy format before it (pickles followed by the raw storages).
//!
//! The pickled object is read as data ([`super::pickle`]), never run. The
//! state dict is found in it (at the top level, nested in a training
//! checkpoint, or as the parameters of a whole pickled `nn.Module`), and
//! every float tensor is materialised as f32 from its storage through its
//! offset and strides, so views into shared storages, transposed and
//! stepped tensors and stride-0 expansions read as PyTorch shows them.

use super::pickle::{self, Value};
use super::NamedTensors;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::collections::{HashMap, HashSet};
use std::io::{BufReader, Read};
use std::path::Path;

/// Keys under which training scripts nest the state dict, tried in this
/// order (the first that holds tensors wins, so the plain weights before
/// an exponential moving average of them).
pub const NESTED_KEYS: [&str; 9] = [
    "state_dict",
    "model",
    "model_state_dict",
    "module",
    "net",
    "ema",
    "model_ema",
    "state_dict_ema",
    "ema_state_dict",
];

/// The magic number that starts a legacy PyTorch file (a pickled int).
pub const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// How deep [`find_state_dict`] looks into nested dicts.
const MAX_NESTING: usize = 3;

fn format_error(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// The element type of a storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    F64,
    F32,
    F16,
    BF16,
    /// Integers and booleans, of this many bytes: skipped.
    Other(usize),
}

impl Elem {
    fn of_storage(class: &str) -> Option<Self> {
        Some(match class {
            "DoubleStorage" => Elem::F64,
            "FloatStorage" => Elem::F32,
            "HalfStorage" => Elem::F16,
            "BFloat16Storage" => Elem::BF16,
            "LongStorage" => Elem::Other(8),
            "IntStorage" => Elem::Other(4),
            "ShortStorage" => Elem::Other(2),
            "CharStorage" | "ByteStorage" | "BoolStorage" => Elem::Other(1),
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Elem::F64 => 8,
            Elem::F32 => 4,
            Elem::F16 | Elem::BF16 => 2,
            Elem::Other(size) => size,
        }
    }

    fn is_float(self) -> bool {
        !matches!(self, Elem::Other(_))
    }

    /// The element at `bytes` (little-endian), as f32.
    fn to_f32(self, bytes: &[u8]) -> f32 {
        match self {
            Elem::F64 => f64::from_le_bytes(bytes.try_into().expect("8 bytes")) as f32,
            Elem::F32 => f32::from_le_bytes(bytes.try_into().expect("4 bytes")),
            Elem::F16 => {
                half::f16::from_bits(u16::from_le_bytes(bytes.try_into().expect("2 bytes")))
                    .to_f32()
            }
            Elem::BF16 => {
                half::bf16::from_bits(u16::from_le_bytes(bytes.try_into().expect("2 bytes")))
                    .to_f32()
            }
            Elem::Other(_) => f32::NAN,
        }
    }
}

/// A storage as a persistent id names it.
#[derive(Debug, Clone)]
struct StorageRef {
    key: String,
    elem: Elem,
    /// Length in elements.
    numel: usize,
}

/// A tensor as `_rebuild_tensor_v2` describes it: a view into a storage.
#[derive(Debug, Clone)]
struct TensorRef {
    storage: StorageRef,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// The storage of a persistent id `('storage', FloatStorage, key, location, numel[, view])`,
/// with the element offset of a legacy storage view.
fn storage_ref(id: &Value) -> std::result::Result<(StorageRef, usize), String> {
    let items = id
        .items()
        .ok_or_else(|| format!("a storage id that is a {}", id.kind()))?;
    let (Some(tag), Some(class), Some(key), Some(numel)) =
        (items.first(), items.get(1), items.get(2), items.get(4))
    else {
        return Err(format!("a storage id of {} items", items.len()));
    };
    if tag.as_str() != Some("storage") {
        return Err(format!("a persistent id tagged {}", tag.kind()));
    }
    let class = match class {
        Value::Global { name, .. } => name.clone(),
        other => return Err(format!("a storage type that is a {}", other.kind())),
    };
    let elem = Elem::of_storage(&class)
        .ok_or_else(|| format!("storage type {class}, which idkm does not read"))?;
    let key = match key {
        Value::Str(k) => k.clone(),
        Value::Int(i) => i.to_string(),
        other => return Err(format!("a storage key that is a {}", other.kind())),
    };
    let numel = numel
        .as_int()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or("a storage of no valid size")?;
    // Legacy files could name a view of the storage: (view key, offset, size).
    let view_offset = match items.get(5).and_then(Value::items) {
        Some(view) => view
            .get(1)
            .and_then(Value::as_int)
            .and_then(|o| usize::try_from(o).ok())
            .unwrap_or(0),
        None => 0,
    };
    Ok((StorageRef { key, elem, numel }, view_offset))
}

fn usizes(value: &Value, what: &str) -> std::result::Result<Vec<usize>, String> {
    let items = value
        .items()
        .ok_or_else(|| format!("a {what} that is a {}", value.kind()))?;
    items
        .iter()
        .map(|v| {
            v.as_int()
                .and_then(|i| usize::try_from(i).ok())
                .ok_or_else(|| format!("a {what} entry that is not a size"))
        })
        .collect()
}

/// The tensor a value rebuilds, `None` when it is not a tensor.
fn tensor_ref(value: &Value) -> std::result::Result<Option<TensorRef>, String> {
    let Value::Call(call) = value else {
        return Ok(None);
    };
    rebuilt(&call.callable, &call.args)
}

fn rebuilt(callable: &Value, args: &Value) -> std::result::Result<Option<TensorRef>, String> {
    let Some(name) = callable.global_name() else {
        return Ok(None);
    };
    let args = args.items().unwrap_or_default();
    match name.as_str() {
        "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
            let [storage, offset, shape, stride, ..] = args.as_slice() else {
                return Err(format!("{name} with {} arguments", args.len()));
            };
            let Value::Persistent(id) = storage else {
                return Err(format!("a tensor whose storage is a {}", storage.kind()));
            };
            let (storage, view_offset) = storage_ref(id)?;
            let offset = offset
                .as_int()
                .and_then(|o| usize::try_from(o).ok())
                .ok_or("a tensor with an invalid offset")?;
            let (shape, stride) = (usizes(shape, "shape")?, usizes(stride, "stride")?);
            if shape.len() != stride.len() {
                return Err(format!(
                    "a tensor of shape {shape:?} with strides {stride:?}"
                ));
            }
            Ok(Some(TensorRef {
                storage,
                offset: offset.saturating_add(view_offset),
                shape,
                stride,
            }))
        }
        // nn.Parameter(data, requires_grad, hooks[, state]).
        "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
            match args.first() {
                Some(data) => tensor_ref(data),
                None => Err(format!("{name} without arguments")),
            }
        }
        // Tensor subclasses: func(*args) turned into new_type.
        "torch._tensor._rebuild_from_type_v2" | "torch._tensor._rebuild_from_type" => {
            match args.as_slice() {
                [func, _new_type, inner, ..] => rebuilt(func, inner),
                _ => Err(format!("{name} with {} arguments", args.len())),
            }
        }
        other if other.starts_with("torch._utils._rebuild_") => Err(format!(
            "a tensor rebuilt by {other} (quantized, sparse or meta tensors are not read)"
        )),
        _ => Ok(None),
    }
}

/// Entries of a dict, keyed by string.
fn string_items(dict: &Value) -> Vec<(String, Value)> {
    match dict {
        Value::Dict(d) => d
            .borrow()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.clone())))
            .collect(),
        _ => Vec::new(),
    }
}

/// The named tensors of a dict that holds at least one, `None` if it holds none.
fn dict_tensors(dict: &Value) -> std::result::Result<Option<Vec<(String, TensorRef)>>, String> {
    let mut tensors = Vec::new();
    for (name, value) in string_items(dict) {
        match tensor_ref(&value) {
            Ok(Some(t)) => tensors.push((name, t)),
            Ok(None) => {}
            Err(e) => return Err(format!("tensor `{name}`: {e}")),
        }
    }
    Ok((!tensors.is_empty()).then_some(tensors))
}

/// The parameters and buffers of a pickled `nn.Module` (`torch.save(model)`),
/// named as its state dict names them; `None` if `value` is not a module.
fn module_tensors(value: &Value) -> std::result::Result<Option<Vec<(String, TensorRef)>>, String> {
    fn walk(
        value: &Value,
        prefix: &str,
        out: &mut Vec<(String, TensorRef)>,
        depth: usize,
    ) -> std::result::Result<bool, String> {
        let Value::Call(call) = value else {
            return Ok(false);
        };
        let state = call.state.borrow();
        let Some(state) = state.as_ref() else {
            return Ok(false);
        };
        let fields: HashMap<String, Value> = string_items(state).into_iter().collect();
        if !fields.contains_key("_parameters") || depth > 64 {
            return Ok(false);
        }
        for field in ["_parameters", "_buffers"] {
            for (name, v) in fields.get(field).map(string_items).unwrap_or_default() {
                if let Some(t) =
                    tensor_ref(&v).map_err(|e| format!("tensor `{prefix}{name}`: {e}"))?
                {
                    out.push((format!("{prefix}{name}"), t));
                }
            }
        }
        for (name, child) in fields.get("_modules").map(string_items).unwrap_or_default() {
            walk(&child, &format!("{prefix}{name}."), out, depth + 1)?;
        }
        Ok(true)
    }
    let mut out = Vec::new();
    Ok(walk(value, "", &mut out, 0)?.then_some(out))
}

/// A state dict found in a pickle: its tensors and where it was (`None`
/// for the top level, else the nested keys joined by dots).
type Found = (Vec<(String, TensorRef)>, Option<String>);

/// The state dict in a pickled object, nested state dicts first.
fn find_state_dict(root: &Value) -> std::result::Result<Option<Found>, String> {
    fn search(value: &Value, path: &[&str]) -> std::result::Result<Option<Found>, String> {
        // Nested state dicts first: a training checkpoint may hold tensors
        // of its own beside them (torchvision's scripts save `best_acc1`).
        if path.len() < MAX_NESTING {
            let items: HashMap<String, Value> = string_items(value).into_iter().collect();
            for key in NESTED_KEYS {
                if let Some(inner) = items.get(key) {
                    let inner_path: Vec<&str> = path.iter().copied().chain([key]).collect();
                    if let Some(found) = search(inner, &inner_path)? {
                        return Ok(Some(found));
                    }
                }
            }
        }
        let place = (!path.is_empty()).then(|| path.join("."));
        if let Some(tensors) = dict_tensors(value)? {
            return Ok(Some((tensors, place)));
        }
        Ok(module_tensors(value)?.map(|tensors| (tensors, place)))
    }
    search(root, &[])
}

/// What the top of a pickle without tensors holds, for the error message.
fn outline(root: &Value) -> String {
    match root {
        Value::Dict(_) => {
            let keys: Vec<String> = string_items(root)
                .iter()
                .take(12)
                .map(|(k, v)| format!("{k} ({})", v.kind()))
                .collect();
            if keys.is_empty() {
                "an empty dict".into()
            } else {
                format!("a dict with keys {}", keys.join(", "))
            }
        }
        other => format!("a {}", other.kind()),
    }
}

/// Every storage that any persistent id in `root` names (optimiser state
/// included), by key: the legacy format needs their sizes to skip them.
fn all_storages(root: &Value) -> HashMap<String, StorageRef> {
    let mut seen = HashSet::new();
    let mut out = HashMap::new();
    let mut stack = vec![root.clone()];
    while let Some(value) = stack.pop() {
        match &value {
            Value::Persistent(id) => {
                if let Ok((s, _)) = storage_ref(id) {
                    out.insert(s.key.clone(), s);
                }
            }
            Value::Tuple(items) => stack.extend(items.iter().cloned()),
            Value::List(l) if seen.insert(std::rc::Rc::as_ptr(l) as usize) => {
                stack.extend(l.borrow().iter().cloned())
            }
            Value::Dict(d) if seen.insert(std::rc::Rc::as_ptr(d) as usize) => {
                stack.extend(d.borrow().iter().flat_map(|(k, v)| [k.clone(), v.clone()]))
            }
            Value::Call(c) if seen.insert(std::rc::Rc::as_ptr(c) as usize) => {
                stack.push(c.args.clone());
                stack.extend(c.state.borrow().clone());
            }
            _ => {}
        }
    }
    out
}

/// Materialises a tensor from its storage's bytes (native order given by
/// `little_endian`), as f32.
fn materialise(
    name: &str,
    t: &TensorRef,
    bytes: &[u8],
    little_endian: bool,
) -> std::result::Result<Tensor, String> {
    let size = t.storage.elem.size();
    let available = bytes.len() / size;
    // In checked arithmetic: a damaged file may name any sizes.
    let numel = t.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    let last = t
        .shape
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset, |acc, (&d, &s)| {
            d.saturating_sub(1)
                .checked_mul(s)
                .and_then(|reach| acc.checked_add(reach))
        });
    let numel = match (numel, last) {
        (Some(0), _) => 0,
        (Some(numel), Some(last)) if last < available => numel,
        _ => {
            return Err(format!(
                "tensor `{name}` (shape {:?}, strides {:?}, offset {}) reaches beyond storage `{}`, which holds {available} elements",
                t.shape, t.stride, t.offset, t.storage.key
            ))
        }
    };
    let element = |index: usize| {
        let start = index * size;
        let raw = &bytes[start..start + size];
        if little_endian {
            t.storage.elem.to_f32(raw)
        } else {
            let swapped: Vec<u8> = raw.iter().rev().copied().collect();
            t.storage.elem.to_f32(&swapped)
        }
    };
    let mut values = Vec::with_capacity(numel);
    let mut index = vec![0usize; t.shape.len()];
    for _ in 0..numel {
        let flat = t.offset
            + index
                .iter()
                .zip(&t.stride)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        values.push(element(flat));
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < t.shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Tensor::from_vec(values, t.shape.as_slice(), &Device::Cpu)
        .map_err(|e| format!("tensor `{name}`: {e}"))
}

/// The float tensors of a found state dict, materialised from `storage`
/// (the bytes of a storage key), sorted by name.
fn materialise_all(
    path: &Path,
    refs: Vec<(String, TensorRef)>,
    mut storage: impl FnMut(&StorageRef) -> Result<std::rc::Rc<Vec<u8>>>,
    little_endian: bool,
) -> Result<NamedTensors> {
    let mut out = Vec::with_capacity(refs.len());
    for (name, t) in refs {
        if !t.storage.elem.is_float() {
            tracing::debug!(tensor = %name, "skipping a non-float checkpoint tensor");
            continue;
        }
        let bytes = storage(&t.storage)?;
        let tensor =
            materialise(&name, &t, &bytes, little_endian).map_err(|e| format_error(path, e))?;
        out.push((name, tensor));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The state dict of an unpickled object, or an error naming what it holds.
fn state_dict_of(path: &Path, root: &Value) -> Result<Vec<(String, TensorRef)>> {
    match find_state_dict(root).map_err(|e| format_error(path, e))? {
        Some((tensors, place)) => {
            if let Some(place) = place {
                tracing::info!(path = %path.display(), key = %place, "reading the state dict nested under `{place}`");
            }
            Ok(tensors)
        }
        None => Err(format_error(
            path,
            format!(
                "the pickle holds no tensors, neither at the top level nor under {}; it holds {}",
                NESTED_KEYS.join(", "),
                outline(root)
            ),
        )),
    }
}

/// Reads the float tensors of a PyTorch zip archive.
pub fn read_zip(path: &Path) -> Result<NamedTensors> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| format_error(path, format!("a damaged zip archive: {e}")))?;
    let names: Vec<String> = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| format_error(path, format!("a damaged zip archive: {e}")))?;
    let Some(pickle_name) = names
        .iter()
        .filter(|n| n.ends_with("data.pkl"))
        .min_by_key(|n| n.len())
        .cloned()
    else {
        return Err(format_error(path, super::format::describe_zip(&names)));
    };
    let prefix = pickle_name
        .strip_suffix("data.pkl")
        .expect("suffix")
        .to_string();
    let entry =
        |zip: &mut zip::ZipArchive<BufReader<std::fs::File>>, name: &str| -> Result<Vec<u8>> {
            let mut file = zip
                .by_name(name)
                .map_err(|e| format_error(path, format!("archive entry {name}: {e}")))?;
            let mut bytes = Vec::with_capacity(file.size() as usize);
            file.read_to_end(&mut bytes)
                .map_err(|e| format_error(path, format!("reading archive entry {name}: {e}")))?;
            Ok(bytes)
        };
    let little_endian = match names.contains(&format!("{prefix}byteorder")) {
        true => entry(&mut zip, &format!("{prefix}byteorder"))?.trim_ascii() != b"big",
        false => true,
    };
    let pickled = entry(&mut zip, &pickle_name)?;
    let root = pickle::load(&mut pickled.as_slice())
        .map_err(|e| format_error(path, format!("{pickle_name}: {e}")))?;
    let refs = state_dict_of(path, &root)?;
    let mut cache: HashMap<String, std::rc::Rc<Vec<u8>>> = HashMap::new();
    let storage = |s: &StorageRef| -> Result<std::rc::Rc<Vec<u8>>> {
        if let Some(bytes) = cache.get(&s.key) {
            return Ok(bytes.clone());
        }
        let bytes = std::rc::Rc::new(entry(&mut zip, &format!("{prefix}data/{}", s.key))?);
        if bytes.len() < s.numel.saturating_mul(s.elem.size()) {
            return Err(format_error(
                path,
                format!(
                    "storage `{}` holds {} bytes, less than its {} elements of {} bytes",
                    s.key,
                    bytes.len(),
                    s.numel,
                    s.elem.size()
                ),
            ));
        }
        cache.insert(s.key.clone(), bytes.clone());
        Ok(bytes)
    };
    materialise_all(path, refs, storage, little_endian)
}

/// Reads the float tensors of a legacy PyTorch file: the magic number, the
/// protocol version and the system information, each pickled, then the
/// pickled object, the pickled list of storage keys, and each storage as
/// its element count (8 bytes) and its elements.
pub fn read_legacy(path: &Path) -> Result<NamedTensors> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = BufReader::new(file);
    let mut next = |what: &str| {
        pickle::load(&mut reader)
            .map_err(|e| format_error(path, format!("legacy PyTorch file, its {what}: {e}")))
    };
    match next("magic number")? {
        Value::BigInt(bytes) if bytes == LEGACY_MAGIC => {}
        other => {
            return Err(format_error(
                path,
                format!(
                    "a pickle that starts with a {} instead of PyTorch's magic number",
                    other.kind()
                ),
            ))
        }
    }
    let version = next("protocol version")?;
    if version.as_int() != Some(1001) {
        return Err(format_error(
            path,
            format!("legacy PyTorch protocol version {version:?}, expected 1001"),
        ));
    }
    let info = next("system information")?;
    let little_endian = string_items(&info)
        .iter()
        .find(|(k, _)| k == "little_endian")
        .is_none_or(|(_, v)| v.as_int() != Some(0));
    let root = next("pickled object")?;
    let keys = next("storage keys")?;
    let keys: Vec<String> = keys
        .items()
        .unwrap_or_default()
        .iter()
        .map(|k| {
            k.as_str()
                .map(str::to_string)
                .ok_or_else(|| format_error(path, format!("a storage key that is a {}", k.kind())))
        })
        .collect::<Result<_>>()?;
    let refs = state_dict_of(path, &root)?;
    let needed: HashSet<String> = refs.iter().map(|(_, t)| t.storage.key.clone()).collect();
    let storages = all_storages(&root);
    let mut data: HashMap<String, std::rc::Rc<Vec<u8>>> = HashMap::new();
    for key in keys {
        let Some(s) = storages.get(&key) else {
            return Err(format_error(
                path,
                format!("storage `{key}` is listed but no tensor names it, so its size is unknown"),
            ));
        };
        let mut count = [0u8; 8];
        reader
            .read_exact(&mut count)
            .map_err(|_| format_error(path, format!("the file ends before storage `{key}`")))?;
        let count = if little_endian {
            u64::from_le_bytes(count)
        } else {
            u64::from_be_bytes(count)
        } as usize;
        let len = count
            .checked_mul(s.elem.size())
            .ok_or_else(|| format_error(path, format!("storage `{key}` of {count} elements")))?;
        let mut bytes = Vec::new();
        (&mut reader)
            .take(len as u64)
            .read_to_end(&mut bytes)
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if bytes.len() != len {
            return Err(format_error(
                path,
                format!(
                    "the file ends {} bytes into storage `{key}` of {len} bytes",
                    bytes.len()
                ),
            ));
        }
        if needed.contains(&key) {
            data.insert(key, std::rc::Rc::new(bytes));
        }
    }
    let storage = |s: &StorageRef| {
        data.get(&s.key)
            .cloned()
            .ok_or_else(|| format_error(path, format!("storage `{}` is not in the file", s.key)))
    };
    materialise_all(path, refs, storage, little_endian)
}
