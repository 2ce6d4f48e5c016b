//! The networks that idkm trains and compresses: ResNet18 (CIFAR and
//! ImageNet stems, torchvision parameter names) and a small CNN for 28x28
//! grey images.

mod arch;
mod cnn;
mod layers;
mod maps;
mod resnet;

pub use arch::Arch;
pub use cnn::SmallCnn;
pub use layers::{BatchNorm, Conv, Linear};
pub use maps::{FeatureMap, MapKind, Window};
pub use resnet::{ResNet18, Stem};

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Replaces a model's float weights on a forward pass, differentiably (a
/// clustering of the model, for training).
pub trait WeightSource {
    /// The weight to use for the parameter `name`, whose float value is `param`.
    fn weight(&self, name: &str, param: &Tensor) -> Result<Tensor>;

    /// Whether the weight `name` comes from this source (its gradient
    /// from the source's backward).
    fn replaces(&self, _name: &str) -> bool {
        false
    }

    /// The parameter whose weight computation gave non-finite values
    /// since the last call, with what became non-finite (reset).
    fn take_divergence(&self) -> Option<(String, String)> {
        None
    }
}

/// Where conv and linear layers take their weights from on a forward pass.
pub enum Weights<'a> {
    /// The float parameters.
    Float,
    /// Soft-clustered on every pass, differentiably (training with clustering).
    Clustered(&'a dyn WeightSource),
    /// Precomputed weights replace the named parameters (hard or frozen soft
    /// weights, for evaluation); other parameters are used as they are.
    Fixed(&'a HashMap<String, Tensor>),
}

impl Weights<'_> {
    /// The weight to use for the parameter `name`.
    pub fn resolve(&self, name: &str, param: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Weights::Float => Ok(param.clone()),
            Weights::Clustered(c) => Ok(c.weight(name, param)?),
            Weights::Fixed(map) => Ok(map.get(name).cloned().unwrap_or_else(|| param.clone())),
        }
    }
}

/// A network's forward pass and its clusterable weights.
pub trait Network: std::fmt::Debug + Send + Sync {
    /// Logits for the batch `x` (N, C, H, W); `train` selects batch statistics
    /// in batch norm (and updates the running ones).
    fn forward(&self, x: &Tensor, train: bool, weights: &Weights) -> candle_core::Result<Tensor>;

    /// The conv and linear weights, in forward order: what clustering may replace.
    fn weights(&self) -> Vec<(&str, &Tensor)>;

    /// The feature maps of a forward pass on one sample, in order.
    fn feature_maps(&self) -> Vec<FeatureMap>;
}

/// A network with its parameters.
pub struct Model {
    arch: Arch,
    channels: usize,
    classes: usize,
    device: Device,
    varmap: VarMap,
    net: Box<dyn Network>,
}

impl Model {
    /// A freshly initialised model, reproducible from `seed`: conv weights
    /// Kaiming-normal, linear layers uniform in ±1/sqrt(fan_in), batch norm
    /// at identity.
    pub fn new(
        arch: Arch,
        channels: usize,
        classes: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let net: Box<dyn Network> = match arch {
            Arch::ResNet18Cifar => Box::new(ResNet18::new(Stem::Cifar, classes, vb)?),
            Arch::ResNet18 => Box::new(ResNet18::new(Stem::ImageNet, classes, vb)?),
            Arch::SmallCnn => Box::new(SmallCnn::new(channels, classes, vb)?),
        };
        if arch != Arch::SmallCnn && channels != 3 {
            return Err(Error::Model(format!(
                "{arch} takes 3 input channels, the data has {channels}"
            )));
        }
        let model = Self {
            arch,
            channels,
            classes,
            device: device.clone(),
            varmap,
            net,
        };
        model.initialise(seed)?;
        Ok(model)
    }

    fn initialise(&self, seed: u64) -> Result<()> {
        let mut vars: Vec<(String, Var)> = self
            .varmap
            .data()
            .lock()
            .expect("varmap lock")
            .clone()
            .into_iter()
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let rank2_inputs = |weight: &str| -> Option<usize> {
            vars.iter()
                .find(|(n, v)| n == weight && v.rank() == 2)
                .map(|(_, v)| v.dims()[1])
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for (name, var) in &vars {
            let dims = var.dims().to_vec();
            let n = var.elem_count();
            let uniform = |rng: &mut rand::rngs::StdRng, inputs: usize| -> Vec<f32> {
                let bound = 1.0 / (inputs as f32).sqrt();
                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
            };
            let values = match dims.as_slice() {
                [_, cin, kh, kw] => {
                    let std = (2.0 / (cin * kh * kw) as f32).sqrt();
                    let normal = Normal::new(0.0, std).map_err(|e| Error::Model(e.to_string()))?;
                    (0..n).map(|_| normal.sample(&mut rng)).collect()
                }
                [_, inputs] => uniform(&mut rng, *inputs),
                [_] => match name
                    .strip_suffix(".bias")
                    .and_then(|p| rank2_inputs(&format!("{p}.weight")))
                {
                    Some(inputs) => uniform(&mut rng, inputs),
                    None => continue,
                },
                _ => continue,
            };
            var.set(&Tensor::from_vec(values, dims, var.device())?)?;
        }
        Ok(())
    }

    /// The architecture.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The number of input channels.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The device the parameters live on.
    pub fn device(&self) -> Device {
        self.device.clone()
    }

    /// The number of classes.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// All parameters and buffers (batch-norm running statistics included),
    /// by their checkpoint names.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The variables the optimiser updates: everything but batch-norm
    /// running statistics, sorted by name.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut vars: Vec<_> = data
            .iter()
            .filter(|(n, _)| !n.ends_with(".running_mean") && !n.ends_with(".running_var"))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// The conv and linear weights by name, in forward order.
    pub fn weights(&self) -> Vec<(String, Tensor)> {
        self.net
            .weights()
            .into_iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect()
    }

    /// The feature maps of a forward pass on one sample; see
    /// [`Network::feature_maps`].
    pub fn feature_maps(&self) -> Vec<FeatureMap> {
        self.net.feature_maps()
    }

    /// Logits for `x`; see [`Network::forward`].
    pub fn forward(&self, x: &Tensor, train: bool, weights: &Weights) -> Result<Tensor> {
        Ok(self.net.forward(x, train, weights)?)
    }

    /// Every parameter and buffer by name, detached.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        let data = self.varmap.data().lock().expect("varmap lock");
        data.iter()
            .map(|(n, v)| (n.clone(), v.as_detached_tensor()))
            .collect()
    }

    /// Sets every parameter and buffer from `tensors` (exact names and
    /// shapes, as idkm writes them); `source` names the file in errors.
    /// Missing, unexpected and mis-shaped tensors are listed together.
    pub fn assign(
        &self,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        source: &Path,
    ) -> Result<()> {
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut problems = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for (name, t) in tensors {
            match data.get(&name) {
                Some(var) if var.dims() == t.dims() => {
                    var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
                    seen.insert(name);
                }
                Some(var) => problems.push(format!(
                    "  {name}: expected shape {:?}, found {:?}",
                    var.dims(),
                    t.dims()
                )),
                None => problems.push(format!(
                    "  {name}: not a tensor of {} (shape {:?})",
                    self.arch,
                    t.dims()
                )),
            }
        }
        let mut missing: Vec<_> = data.iter().filter(|(n, _)| !seen.contains(*n)).collect();
        missing.sort_by(|a, b| a.0.cmp(b.0));
        for (name, var) in missing {
            problems.push(format!(
                "  {name}: missing (expected shape {:?})",
                var.dims()
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Checkpoint {
                path: source.into(),
                details: problems.join("\n"),
            })
        }
    }

    /// The number of parameters (running statistics excluded).
    pub fn parameter_count(&self) -> usize {
        self.trainable().iter().map(|(_, v)| v.elem_count()).sum()
    }
}
