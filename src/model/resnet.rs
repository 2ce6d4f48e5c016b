//! ResNet18 in torchvision's parameter layout, with the CIFAR stem (3x3
//! stride-1 conv, no max-pool) or the ImageNet stem (7x7 stride-2 conv and a
//! 3x3 stride-2 max-pool).

use super::layers::{BatchNorm, Conv, Linear};
use super::maps::{FeatureMap, MapKind, Window};
use super::{Network, Weights};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// The first layers of the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stem {
    /// 3x3 convolution, stride 1, no pooling: 32x32 inputs.
    Cifar,
    /// 7x7 convolution, stride 2, then 3x3 max-pool with stride 2.
    ImageNet,
}

#[derive(Debug)]
struct BasicBlock {
    conv1: Conv,
    bn1: BatchNorm,
    conv2: Conv,
    bn2: BatchNorm,
    downsample: Option<(Conv, BatchNorm)>,
}

impl BasicBlock {
    fn new(cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let downsample = if stride != 1 || cin != cout {
            let vb = vb.pp("downsample");
            Some((
                Conv::new(cin, cout, 1, stride, 0, vb.pp("0"))?,
                BatchNorm::new(cout, 1e-5, vb.pp("1"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            conv1: Conv::new(cin, cout, 3, stride, 1, vb.pp("conv1"))?,
            bn1: BatchNorm::new(cout, 1e-5, vb.pp("bn1"))?,
            conv2: Conv::new(cout, cout, 3, 1, 1, vb.pp("conv2"))?,
            bn2: BatchNorm::new(cout, 1e-5, vb.pp("bn2"))?,
            downsample,
        })
    }

    fn forward(&self, x: &Tensor, train: bool, weights: &Weights) -> Result<Tensor> {
        let y = self
            .bn1
            .forward_relu(&self.conv1.forward(x, weights)?, train)?;
        let shortcut = match &self.downsample {
            Some((conv, bn)) => bn.forward_t(&conv.forward(x, weights)?, train)?,
            None => x.clone(),
        };
        self.bn2
            .forward_add_relu(&self.conv2.forward(&y, weights)?, &shortcut, train)
    }

    /// Its feature maps, from an input reached through `windows`: the first
    /// conv's, the second's (with the add), the shortcut conv's.
    fn feature_maps(&self, windows: &[Window]) -> Vec<FeatureMap> {
        let first = self.conv1.feature_map(MapKind::ConvBnRelu, windows);
        let second = self.conv2.feature_map(
            MapKind::ConvBnAddRelu,
            first.windows.as_deref().unwrap_or_default(),
        );
        let shortcut = self
            .downsample
            .as_ref()
            .map(|(conv, _)| conv.feature_map(MapKind::ConvBn, windows));
        [first, second].into_iter().chain(shortcut).collect()
    }

    fn convs(&self) -> impl Iterator<Item = &Conv> {
        [&self.conv1, &self.conv2]
            .into_iter()
            .chain(self.downsample.as_ref().map(|(c, _)| c))
    }
}

/// ResNet18: a stem, four stages of two basic blocks (64, 128, 256, 512
/// channels) and a linear classifier `fc`.
#[derive(Debug)]
pub struct ResNet18 {
    stem: Stem,
    conv1: Conv,
    bn1: BatchNorm,
    blocks: Vec<BasicBlock>,
    fc: Linear,
}

impl ResNet18 {
    /// Builds the network under `vb` (names as torchvision and timm).
    pub fn new(stem: Stem, classes: usize, vb: VarBuilder) -> Result<Self> {
        let conv1 = match stem {
            Stem::Cifar => Conv::new(3, 64, 3, 1, 1, vb.pp("conv1"))?,
            Stem::ImageNet => Conv::new(3, 64, 7, 2, 3, vb.pp("conv1"))?,
        };
        let mut blocks = Vec::with_capacity(8);
        let mut cin = 64;
        for (stage, cout) in [64, 128, 256, 512].into_iter().enumerate() {
            let vb = vb.pp(format!("layer{}", stage + 1));
            let stride = if stage == 0 { 1 } else { 2 };
            blocks.push(BasicBlock::new(cin, cout, stride, vb.pp("0"))?);
            blocks.push(BasicBlock::new(cout, cout, 1, vb.pp("1"))?);
            cin = cout;
        }
        Ok(Self {
            stem,
            conv1,
            bn1: BatchNorm::new(64, 1e-5, vb.pp("bn1"))?,
            blocks,
            fc: Linear::new(512, classes, vb.pp("fc"))?,
        })
    }
}

impl Network for ResNet18 {
    fn forward(&self, x: &Tensor, train: bool, weights: &Weights) -> Result<Tensor> {
        let mut x = self
            .bn1
            .forward_relu(&self.conv1.forward(x, weights)?, train)?;
        if self.stem == Stem::ImageNet {
            // After a ReLU every value is >= 0, so zero padding acts as the
            // -inf padding of PyTorch's max-pool.
            x = x
                .pad_with_zeros(2, 1, 1)?
                .pad_with_zeros(3, 1, 1)?
                .max_pool2d_with_stride(3, 2)?;
        }
        for block in &self.blocks {
            x = block.forward(&x, train, weights)?;
        }
        self.fc.forward(&x.mean((2, 3))?, weights)
    }

    fn feature_maps(&self) -> Vec<FeatureMap> {
        let stem = self.conv1.feature_map(MapKind::ConvBnRelu, &[]);
        let mut windows = stem.windows.clone().unwrap_or_default();
        let mut maps = vec![stem.clone()];
        if self.stem == Stem::ImageNet {
            // Zero padding of the height, then of the width, then the max-pool.
            for (padding, kernel) in [((1, 0), (1, 1)), ((0, 1), (1, 1)), ((0, 0), (3, 3))] {
                let stride = if kernel.0 == 3 { 2 } else { 1 };
                windows.push(Window {
                    kernel,
                    stride,
                    padding,
                });
                maps.push(FeatureMap {
                    kind: MapKind::Op,
                    channels: stem.channels,
                    windows: Some(windows.clone()),
                    weight: None,
                });
            }
        }
        for block in &self.blocks {
            let block_maps = block.feature_maps(&windows);
            windows = block_maps[1].windows.clone().unwrap_or_default();
            maps.extend(block_maps);
        }
        let features = maps.last().map_or(0, |m| m.channels);
        maps.push(FeatureMap::flat(MapKind::Op, features));
        maps.push(FeatureMap::flat(MapKind::Linear, self.fc.outputs()));
        maps
    }

    fn weights(&self) -> Vec<(&str, &Tensor)> {
        let convs = std::iter::once(&self.conv1).chain(self.blocks.iter().flat_map(|b| b.convs()));
        convs
            .map(|c| (c.name(), c.weight()))
            .chain([(self.fc.name(), self.fc.weight())])
            .collect()
    }
}
