//! The clustered model as a plain PyTorch state dict: every tensor in
//! float with torchvision's names, each clustered weight holding only its
//! centroid values, and batch norm's `num_batches_tracked` as
//! `load_state_dict` expects, in a safetensors file that
//! `model.load_state_dict(safetensors.torch.load_file(path))` accepts.

use crate::error::Result;
use crate::model::Model;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The `idkm.format` metadata of [`save_torch`]'s files.
pub const TORCH_FORMAT: &str = "torch-state-dict";

/// The state dict of `model` with the weights in `replaced` (the hard,
/// palettized weights of the clustered layers) instead of its own: f32
/// tensors on the CPU, plus an `int64` scalar `num_batches_tracked` (0)
/// beside every batch norm's running statistics.
pub fn torch_state_dict(
    model: &Model,
    replaced: &HashMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (name, tensor) in model.tensors() {
        let tensor = replaced
            .get(&name)
            .unwrap_or(&tensor)
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?;
        if let Some(bn) = name.strip_suffix(".running_mean") {
            out.insert(
                format!("{bn}.num_batches_tracked"),
                Tensor::new(0i64, &Device::Cpu)?,
            );
        }
        out.insert(name, tensor);
    }
    Ok(out)
}

/// Writes [`torch_state_dict`] atomically, with metadata: `format` = `pt`
/// (as PyTorch's safetensors files have it), `idkm.format`, `idkm.arch`
/// and `idkm.clustering` (the clustered tensors' configurations, JSON).
pub fn save_torch(
    model: &Model,
    replaced: &HashMap<String, Tensor>,
    clustering: &BTreeMap<String, serde_json::Value>,
    path: &Path,
) -> Result<()> {
    let tensors = torch_state_dict(model, replaced)?;
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("idkm.format".to_string(), TORCH_FORMAT.to_string()),
        ("idkm.arch".to_string(), model.arch().to_string()),
        (
            "idkm.clustering".to_string(),
            serde_json::to_string(clustering).expect("serialisable"),
        ),
    ]);
    crate::checkpoint::save(&tensors, &metadata, path)
}
