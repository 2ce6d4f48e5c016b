//! Convolution and linear layers whose weight can be swapped for a
//! clustered one on each forward pass.

use super::Weights;
use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// A 2-D convolution without bias (every conv in the models is followed by
/// batch norm), named as its weight tensor is in checkpoints.
#[derive(Debug, Clone)]
pub struct Conv {
    name: String,
    weight: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv {
    /// A `kernel x kernel` convolution from `vb`'s `weight`, Kaiming-initialised.
    pub fn new(cin: usize, cout: usize, kernel: usize, stride: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((cout, cin, kernel, kernel), "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
        Ok(Self { name: format!("{}.weight", vb.prefix()), weight, stride, padding })
    }

    /// The weight's full name (for example `layer1.0.conv1.weight`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The float weight (a variable while training).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Convolves `x` with the weight that `weights` provides.
    pub fn forward(&self, x: &Tensor, weights: &Weights) -> Result<Tensor> {
        let w = weights.resolve(&self.name, &self.weight)?;
        x.conv2d(&w, self.padding, self.stride, 1, 1)
    }
}

/// A fully connected layer `y = x W^T + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    name: String,
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// A linear layer from `vb`'s `weight` and `bias`, initialised as in PyTorch.
    pub fn new(inputs: usize, outputs: usize, vb: VarBuilder) -> Result<Self> {
        let bound = 1.0 / (inputs as f64).sqrt();
        let weight = vb.get_with_hints((outputs, inputs), "weight", Init::Uniform { lo: -bound, up: bound })?;
        let bias = vb.get_with_hints(outputs, "bias", Init::Uniform { lo: -bound, up: bound })?;
        Ok(Self { name: format!("{}.weight", vb.prefix()), weight, bias })
    }

    /// The weight's full name (for example `fc.weight`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The float weight (a variable while training).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Applies the layer with the weight that `weights` provides.
    pub fn forward(&self, x: &Tensor, weights: &Weights) -> Result<Tensor> {
        let w = weights.resolve(&self.name, &self.weight)?;
        candle_nn::Linear::new(w, Some(self.bias.clone())).forward(x)
    }
}
