//! A small CNN for 28x28 grey images (MNIST, Fashion-MNIST).

use super::layers::{BatchNorm, Conv, Linear};
use super::maps::{FeatureMap, MapKind, Window};
use super::{Network, Weights};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// conv(1→16) bn relu pool, conv(16→32) bn relu pool, fc(1568→64) relu, fc(64→classes).
#[derive(Debug)]
pub struct SmallCnn {
    conv1: Conv,
    bn1: BatchNorm,
    conv2: Conv,
    bn2: BatchNorm,
    fc1: Linear,
    fc2: Linear,
}

impl SmallCnn {
    /// Builds the network under `vb` for `channels` input channels.
    pub fn new(channels: usize, classes: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv1: Conv::new(channels, 16, 3, 1, 1, vb.pp("conv1"))?,
            bn1: BatchNorm::new(16, 1e-5, vb.pp("bn1"))?,
            conv2: Conv::new(16, 32, 3, 1, 1, vb.pp("conv2"))?,
            bn2: BatchNorm::new(32, 1e-5, vb.pp("bn2"))?,
            fc1: Linear::new(32 * 7 * 7, 64, vb.pp("fc1"))?,
            fc2: Linear::new(64, classes, vb.pp("fc2"))?,
        })
    }
}

impl Network for SmallCnn {
    fn forward(&self, x: &Tensor, train: bool, weights: &Weights) -> Result<Tensor> {
        let x = self.conv1.forward(x, weights)?;
        let x = self.bn1.forward_relu(&x, train)?.max_pool2d(2)?;
        let x = self.conv2.forward(&x, weights)?;
        let x = self.bn2.forward_relu(&x, train)?.max_pool2d(2)?;
        let x = self.fc1.forward(&x.flatten_from(1)?, weights)?.relu()?;
        self.fc2.forward(&x, weights)
    }

    fn feature_maps(&self) -> Vec<FeatureMap> {
        let pool = Window::square(2, 2, 0);
        let conv1 = self.conv1.feature_map(MapKind::ConvBnRelu, &[]);
        let pooled1 = [conv1.windows.clone().unwrap_or_default(), vec![pool]].concat();
        let conv2 = self.conv2.feature_map(MapKind::ConvBnRelu, &pooled1);
        let pooled2 = [conv2.windows.clone().unwrap_or_default(), vec![pool]].concat();
        let op = |channels, windows: Vec<Window>| FeatureMap {
            kind: MapKind::Op,
            channels,
            windows: Some(windows),
            weight: None,
        };
        vec![
            conv1.clone(),
            op(conv1.channels, pooled1),
            conv2.clone(),
            op(conv2.channels, pooled2),
            FeatureMap::flat(MapKind::LinearRelu, self.fc1.outputs()),
            FeatureMap::flat(MapKind::Linear, self.fc2.outputs()),
        ]
    }

    fn weights(&self) -> Vec<(&str, &Tensor)> {
        let convs = [&self.conv1, &self.conv2].map(|c| (c.name(), c.weight()));
        let fcs = [&self.fc1, &self.fc2].map(|l| (l.name(), l.weight()));
        convs.into_iter().chain(fcs).collect()
    }
}
