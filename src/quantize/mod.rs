//! Clustering a whole model: which layers, with which configuration, and
//! the palettized form that `idkm export` writes.

mod palette;
mod plan;
pub mod snapshot;
mod torch;

pub use palette::{pack, unpack, LutDType, PackedTensor, Palettized, FORMAT as PALETTIZED_FORMAT};
pub use plan::{LayerOverride, QuantizePlan};
pub use torch::{save_torch, torch_state_dict, TORCH_FORMAT};

use crate::cluster::ClusteredWeight;
use crate::error::Result;
use crate::model::{Model, WeightSource};
use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};

/// The clustered layers of a model, each with its own warm-started k-means.
pub struct Clustering {
    layers: BTreeMap<String, ClusteredWeight>,
}

impl Clustering {
    /// Clusters the conv and linear weights of `model` that `plan` selects.
    pub fn new(model: &Model, plan: &QuantizePlan) -> Result<Self> {
        let weights = model.weights();
        plan.check_names(weights.iter().map(|(n, _)| n.as_str()))?;
        let mut layers = BTreeMap::new();
        for (name, w) in &weights {
            if let Some(config) = plan.layer(name, w.elem_count())? {
                layers.insert(name.clone(), ClusteredWeight::new(name.clone(), config)?);
            }
        }
        Ok(Self { layers })
    }

    /// Clustered layers as they are (restored from a checkpoint).
    pub fn from_layers(layers: BTreeMap<String, ClusteredWeight>) -> Self {
        Self { layers }
    }

    /// The weight to use for the parameter `name`: soft-clustered
    /// (differentiably) if the layer is clustered, else `param` itself.
    pub fn weight(&self, name: &str, param: &Tensor) -> Result<Tensor> {
        match self.layers.get(name) {
            Some(layer) => layer.forward(param),
            None => Ok(param.clone()),
        }
    }

    /// Initialises every clustered layer's centroids and temperature from
    /// `model`'s weights (see [`ClusteredWeight::prepare`]).
    pub fn prepare(&self, model: &Model) -> Result<()> {
        for (name, w) in model.weights() {
            if let Some(layer) = self.layers.get(&name) {
                layer.prepare(&w)?;
            }
        }
        Ok(())
    }

    /// The summary of every layer's forward and adjoint solves since the
    /// last call, reset.
    pub fn take_stats(&self) -> crate::cluster::layer::SolveStats {
        self.layers.values().fold(Default::default(), |all, layer| {
            all.merge(&layer.take_stats())
        })
    }

    /// The clustered layers by weight name.
    pub fn layers(&self) -> &BTreeMap<String, ClusteredWeight> {
        &self.layers
    }

    /// The palettized form of `model`: hard assignment of each clustered
    /// weight to the centroids of its last forward pass (k-means is run
    /// first for a layer that has none).
    pub fn palettize(&self, model: &Model, lut: LutDType) -> Result<Palettized> {
        let data = model.varmap().data().lock().expect("varmap lock").clone();
        let mut packed = BTreeMap::new();
        let mut dense = BTreeMap::new();
        for (name, var) in data {
            let tensor = var
                .as_detached_tensor()
                .to_device(&candle_core::Device::Cpu)?;
            match self.layers.get(&name) {
                Some(layer) => {
                    let (indices, centroids) = layer.palettize(&tensor)?;
                    let bits = layer.config().bits;
                    packed.insert(
                        name,
                        PackedTensor::new(tensor.dims(), bits, &indices, &centroids, lut)?,
                    );
                }
                None => {
                    dense.insert(name, tensor);
                }
            }
        }
        let configs = self
            .layers
            .iter()
            .map(|(n, l)| (n.clone(), l.config().to_json()))
            .collect();
        let channels = model.channels();
        Ok(Palettized {
            arch: model.arch(),
            channels,
            classes: model.classes(),
            packed,
            dense,
            configs,
        })
    }

    /// The hard (palettized) weights of the clustered layers, exactly as an
    /// export with `lut` would hold them, on `model`'s device.
    pub fn hard_weights(&self, model: &Model, lut: LutDType) -> Result<HashMap<String, Tensor>> {
        let device = model.device();
        let mut out = HashMap::new();
        for (name, w) in model.weights() {
            if let Some(layer) = self.layers.get(&name) {
                let w = w.detach().to_device(&candle_core::Device::Cpu)?;
                let (indices, centroids) = layer.palettize(&w)?;
                let packed =
                    PackedTensor::new(w.dims(), layer.config().bits, &indices, &centroids, lut)?;
                out.insert(name.clone(), packed.dequantize(&name)?.to_device(&device)?);
            }
        }
        Ok(out)
    }

    /// The soft-clustered weights without a graph (for evaluation).
    pub fn soft_weights(&self, model: &Model) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, w) in model.weights() {
            if let Some(layer) = self.layers.get(&name) {
                out.insert(name, layer.forward(&w.detach())?.detach());
            }
        }
        Ok(out)
    }
}

impl WeightSource for Clustering {
    fn weight(&self, name: &str, param: &Tensor) -> Result<Tensor> {
        Clustering::weight(self, name, param)
    }

    fn replaces(&self, name: &str) -> bool {
        self.layers.contains_key(name)
    }

    fn take_divergence(&self) -> Option<(String, String)> {
        let mut found = None;
        for (name, layer) in &self.layers {
            if let Some(detail) = layer.take_divergence() {
                found.get_or_insert((name.clone(), detail));
            }
        }
        found
    }
}
