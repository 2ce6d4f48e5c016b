//! idkm's own checkpoints: a model's tensors, and for a clustered model the
//! centroids of every clustered layer (`NAME.centroids`) with its
//! configuration, so that training resumes and export reproduces exactly
//! the hard weights that were evaluated.
//!
//! Metadata: `idkm.arch`, `idkm.channels`, `idkm.classes`, optionally
//! `idkm.clustering` (JSON: weight name -> clustering config) with
//! `idkm.tau` (JSON: weight name -> the temperature each layer uses,
//! derived from its weights unless configured), and whatever the caller
//! adds (epoch, accuracy).

use super::Clustering;
use crate::cluster::{ClusteredWeight, KmeansConfig};
use crate::error::{Error, Result};
use crate::model::{Arch, Model};
use crate::train::OptimizerState;
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

const CENTROIDS: &str = ".centroids";
/// Name suffix of a clustered layer's warm start (its last factorisation).
const WARM_START: &str = ".warm_start";
/// Name prefix of the optimiser's state tensors (then the state's name
/// for the tensor: see `train::OptimizerState`).
const OPTIMIZER: &str = "idkm.optimizer.";
/// Metadata: the optimiser that made the state (`sgd`, `adamw`); missing
/// in checkpoints written before AdamW could be saved, which only SGD's
/// runs were.
const OPTIMIZER_KIND: &str = "idkm.optimizer";
/// Metadata: the optimiser's step count.
const OPTIMIZER_STEPS: &str = "idkm.optimizer.steps";

/// Writes `model` (and `clustering`'s state) with `extra` metadata, atomically.
pub fn save(
    model: &Model,
    clustering: Option<&Clustering>,
    extra: &[(&str, String)],
    path: &Path,
) -> Result<()> {
    save_run(model, clustering, extra, None, path)
}

/// [`save`], with the optimiser's state of a run (see
/// `train::Optimizer::state`), so that the run can continue exactly.
pub fn save_run(
    model: &Model,
    clustering: Option<&Clustering>,
    extra: &[(&str, String)],
    optimizer: Option<&OptimizerState>,
    path: &Path,
) -> Result<()> {
    let mut tensors = model.tensors();
    let mut metadata: HashMap<String, String> = HashMap::from([
        ("idkm.arch".into(), model.arch().to_string()),
        ("idkm.channels".into(), model.channels().to_string()),
        ("idkm.classes".into(), model.classes().to_string()),
    ]);
    if let Some(state) = optimizer {
        for (name, t) in &state.tensors {
            tensors.insert(format!("{OPTIMIZER}{name}"), t.clone());
        }
        metadata.insert(OPTIMIZER_KIND.into(), state.kind.clone());
        metadata.insert(OPTIMIZER_STEPS.into(), state.steps.to_string());
    }
    if let Some(clustering) = clustering {
        let (mut configs, mut taus) = (serde_json::Map::new(), serde_json::Map::new());
        for (name, layer) in clustering.layers() {
            configs.insert(name.clone(), layer.config().to_json());
            if let Some(c) = layer.centroids() {
                tensors.insert(format!("{name}{CENTROIDS}"), c);
            }
            if let Some(w) = layer.warm_start() {
                tensors.insert(format!("{name}{WARM_START}"), w);
            }
            if let Some(tau) = layer.tau() {
                taus.insert(name.clone(), tau.into());
            }
        }
        metadata.insert(
            "idkm.clustering".into(),
            serde_json::Value::Object(configs).to_string(),
        );
        metadata.insert(
            "idkm.tau".into(),
            serde_json::Value::Object(taus).to_string(),
        );
    }
    metadata.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    crate::checkpoint::save(&tensors, &metadata, path)
}

/// Whether `path` is a checkpoint written by [`save`] (exports, which
/// name their `idkm.format`, are not).
pub fn is_snapshot(path: &Path) -> bool {
    crate::checkpoint::metadata(path)
        .is_ok_and(|m| m.contains_key("idkm.arch") && !m.contains_key("idkm.format"))
}

/// A checkpoint read back: the model, its clustering if it had one, and the metadata.
pub struct Snapshot {
    /// The model with the checkpoint's tensors.
    pub model: Model,
    /// The clustered layers with their saved centroids.
    pub clustering: Option<Clustering>,
    /// All metadata.
    pub metadata: HashMap<String, String>,
    /// The optimiser's state, if the run saved it ([`save_run`]; empty
    /// tensors otherwise).
    pub optimizer: OptimizerState,
}

/// Reads a checkpoint written by [`save`] onto `device`.
pub fn load(path: &Path, device: &Device) -> Result<Snapshot> {
    let metadata = crate::checkpoint::metadata(path)?;
    let format_error = |msg: String| Error::Format {
        path: path.into(),
        msg,
    };
    let field = |key: &str| {
        metadata.get(key).ok_or_else(|| {
            format_error(format!(
                "metadata `{key}` missing: not a checkpoint written by idkm"
            ))
        })
    };
    let number = |key: &str| -> Result<usize> {
        field(key)?
            .parse()
            .map_err(|_| format_error(format!("metadata `{key}` is not a number")))
    };
    let arch: Arch = field("idkm.arch")?.parse()?;
    let model = Model::new(
        arch,
        number("idkm.channels")?,
        number("idkm.classes")?,
        0,
        device,
    )?;
    let mut tensors: BTreeMap<String, Tensor> = candle_core::safetensors::load(path, &Device::Cpu)?
        .into_iter()
        .collect();
    let centroids: BTreeMap<String, Tensor> = {
        let names: Vec<String> = tensors
            .keys()
            .filter(|n| n.ends_with(CENTROIDS) || n.ends_with(WARM_START))
            .cloned()
            .collect();
        names
            .into_iter()
            .filter_map(|n| tensors.remove(&n).map(|t| (n, t)))
            .collect()
    };
    let optimizer_names: Vec<String> = tensors
        .keys()
        .filter(|n| n.starts_with(OPTIMIZER))
        .cloned()
        .collect();
    let mut optimizer = OptimizerState {
        kind: metadata
            .get(OPTIMIZER_KIND)
            .cloned()
            .unwrap_or_else(|| "sgd".into()),
        steps: match metadata.get(OPTIMIZER_STEPS) {
            Some(_) => number(OPTIMIZER_STEPS)?,
            None => 0,
        },
        tensors: Vec::new(),
    };
    for name in optimizer_names {
        if let Some(t) = tensors.remove(&name) {
            optimizer
                .tensors
                .push((name[OPTIMIZER.len()..].to_string(), t));
        }
    }
    model.assign(tensors, path)?;
    let clustering = match metadata.get("idkm.clustering") {
        None => None,
        Some(text) => {
            let configs: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
                .map_err(|e| format_error(format!("metadata `idkm.clustering`: {e}")))?;
            let taus: serde_json::Map<String, serde_json::Value> = match metadata.get("idkm.tau") {
                Some(text) => serde_json::from_str(text)
                    .map_err(|e| format_error(format!("metadata `idkm.tau`: {e}")))?,
                None => serde_json::Map::new(),
            };
            let mut layers = BTreeMap::new();
            for (name, json) in configs {
                let config = KmeansConfig::from_json(&json)
                    .map_err(|e| format_error(format!("clustering of `{name}`: {e}")))?;
                let layer = ClusteredWeight::new(name.clone(), config)?;
                if let Some(c) = centroids.get(&format!("{name}{CENTROIDS}")) {
                    layer.set_centroids(c.clone())?;
                }
                if let Some(w) = centroids.get(&format!("{name}{WARM_START}")) {
                    layer
                        .set_warm_start(w)
                        .map_err(|e| format_error(format!("tensor `{name}{WARM_START}`: {e}")))?;
                }
                if let Some(tau) = taus.get(&name) {
                    let tau = tau.as_f64().ok_or_else(|| {
                        format_error(format!("metadata `idkm.tau` of `{name}` is not a number"))
                    })?;
                    layer
                        .set_tau(tau)
                        .map_err(|e| format_error(format!("metadata `idkm.tau`: {e}")))?;
                }
                layers.insert(name, layer);
            }
            Some(Clustering::from_layers(layers))
        }
    };
    Ok(Snapshot {
        model,
        clustering,
        metadata,
        optimizer,
    })
}
