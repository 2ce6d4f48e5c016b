//! Convolution and linear layers whose weight can be swapped for a
//! clustered one on each forward pass, and batch norm.

use super::maps::{FeatureMap, MapKind, Window};
use super::Weights;
use crate::nn::{self, Activation, Conv2dParams};
use candle_core::{Module, ModuleT, Result, Tensor, Var};
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
    pub fn new(
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints(
            (cout, cin, kernel, kernel),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        Ok(Self {
            name: format!("{}.weight", vb.prefix()),
            weight,
            stride,
            padding,
        })
    }

    /// The weight's full name (for example `layer1.0.conv1.weight`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The float weight (a variable while training).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Its window over the input's height and width.
    pub fn window(&self) -> Window {
        let (_, _, kh, kw) = self.weight.dims4().expect("a conv weight is 4-D");
        Window {
            kernel: (kh, kw),
            stride: self.stride,
            padding: (self.padding, self.padding),
        }
    }

    /// The feature map this convolution makes (with what follows it, `kind`)
    /// from an input reached through `windows`.
    pub fn feature_map(&self, kind: MapKind, windows: &[Window]) -> FeatureMap {
        let mut windows = windows.to_vec();
        windows.push(self.window());
        FeatureMap {
            kind,
            channels: self.weight.dim(0).expect("a conv weight is 4-D"),
            windows: Some(windows),
            weight: Some(self.name.clone()),
        }
    }

    /// Convolves `x` with the weight that `weights` provides (through
    /// [`nn::conv2d`]: im2col + GEMM on the CPU, candle's conv elsewhere).
    pub fn forward(&self, x: &Tensor, weights: &Weights) -> Result<Tensor> {
        let w = weights.resolve(&self.name, &self.weight)?;
        nn::conv2d(
            x,
            &w,
            Conv2dParams {
                padding: self.padding,
                stride: self.stride,
                dilation: 1,
            },
        )
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
        let weight = vb.get_with_hints(
            (outputs, inputs),
            "weight",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let bias = vb.get_with_hints(
            outputs,
            "bias",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        Ok(Self {
            name: format!("{}.weight", vb.prefix()),
            weight,
            bias,
        })
    }

    /// The weight's full name (for example `fc.weight`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The float weight (a variable while training).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Its output features.
    pub fn outputs(&self) -> usize {
        self.weight.dim(0).expect("a linear weight is 2-D")
    }

    /// Applies the layer with the weight that `weights` provides.
    pub fn forward(&self, x: &Tensor, weights: &Weights) -> Result<Tensor> {
        let w = weights.resolve(&self.name, &self.weight)?;
        candle_nn::Linear::new(w, Some(self.bias.clone())).forward(x)
    }
}

/// Batch norm over the channels (dim 1), with candle-nn's parameters,
/// buffers and update of the running statistics (momentum 0.1, the
/// unbiased batch variance), followed by an optional residual add and ReLU.
///
/// In training mode on the CPU it runs as one fused op
/// ([`nn::batch_norm_train`]); in evaluation mode and on other devices it
/// is candle-nn's `BatchNorm`, which is also the reference in the tests.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    inner: candle_nn::BatchNorm,
    running_mean: Var,
    running_var: Var,
    weight: Tensor,
    bias: Tensor,
}

impl BatchNorm {
    /// A batch norm of `channels` from `vb`'s `weight`, `bias`,
    /// `running_mean` and `running_var` (initialised to 1, 0, 0, 1).
    pub fn new(channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let running_mean =
            Var::from_tensor(&vb.get_with_hints(channels, "running_mean", Init::Const(0.))?)?;
        let running_var =
            Var::from_tensor(&vb.get_with_hints(channels, "running_var", Init::Const(1.))?)?;
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.))?;
        let inner = candle_nn::BatchNorm::new(
            channels,
            running_mean.as_tensor().clone(),
            running_var.as_tensor().clone(),
            weight.clone(),
            bias.clone(),
            eps,
        )?;
        Ok(Self {
            inner,
            running_mean,
            running_var,
            weight,
            bias,
        })
    }

    /// `bn(x)`; `train` normalises with the batch statistics and updates
    /// the running ones.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_fused(x, None, Activation::Identity, train)
    }

    /// `relu(bn(x))`.
    pub fn forward_relu(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_fused(x, None, Activation::Relu, train)
    }

    /// `relu(bn(x) + residual)`.
    pub fn forward_add_relu(&self, x: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_fused(x, Some(residual), Activation::Relu, train)
    }

    fn forward_fused(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        act: Activation,
        train: bool,
    ) -> Result<Tensor> {
        if train
            && x.device().is_cpu()
            && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
        {
            let eps = self.inner.eps();
            let (y, stats) = nn::batch_norm_train(x, &self.weight, &self.bias, residual, act, eps)?;
            self.update_running(&stats)?;
            return Ok(y);
        }
        let y = self.inner.forward_t(x, train)?;
        let y = match residual {
            Some(r) => (y + r)?,
            None => y,
        };
        match act {
            Activation::Identity => Ok(y),
            Activation::Relu => y.relu(),
        }
    }

    /// The running statistics' update, as candle-nn's `BatchNorm` does it.
    fn update_running(&self, stats: &nn::BatchStats) -> Result<()> {
        let momentum = self.inner.momentum();
        let mean = self.running_mean.as_detached_tensor();
        self.running_mean
            .set(&((mean * (1.0 - momentum))? + (&stats.mean * momentum)?)?)?;
        let n = stats.count as f64;
        let var = self.running_var.as_detached_tensor();
        self.running_var
            .set(&((var * (1.0 - momentum))? + (&stats.var * (momentum * n / (n - 1.0)))?)?)
    }
}
