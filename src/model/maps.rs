//! The feature maps of a network's forward pass, described by the network
//! itself from its layers: what the memory model counts.

/// A sliding window over the spatial dimensions (a convolution, a pooling
/// or a zero padding), as it changes the height and width of a map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Kernel height and width.
    pub kernel: (usize, usize),
    /// Stride along both dimensions.
    pub stride: usize,
    /// Zero padding on each side of the height and of the width.
    pub padding: (usize, usize),
}

impl Window {
    /// A square `kernel x kernel` window.
    pub fn square(kernel: usize, stride: usize, padding: usize) -> Self {
        Self {
            kernel: (kernel, kernel),
            stride,
            padding: (padding, padding),
        }
    }

    /// The output height and width for an `h x w` input.
    pub fn apply(&self, (h, w): (usize, usize)) -> (usize, usize) {
        let out =
            |size: usize, k: usize, p: usize| (size + 2 * p).saturating_sub(k) / self.stride + 1;
        (
            out(h, self.kernel.0, self.padding.0),
            out(w, self.kernel.1, self.padding.1),
        )
    }
}

/// What produces a feature map, which decides how many tensors of its size
/// the recorded graph keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// A convolution, its batch norm and a ReLU.
    ConvBnRelu,
    /// A convolution and its batch norm.
    ConvBn,
    /// A convolution, its batch norm, a residual add and a ReLU.
    ConvBnAddRelu,
    /// One tensor op (a pooling, a padding, a mean).
    Op,
    /// A linear layer (the product and the bias add).
    Linear,
    /// A linear layer and a ReLU.
    LinearRelu,
}

/// One feature map of a forward pass on one sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureMap {
    /// What produces it.
    pub kind: MapKind,
    /// Its channels (features, for a flat map).
    pub channels: usize,
    /// The windows from the network's input to this map, in order; `None`
    /// for a flat map (one value per channel).
    pub windows: Option<Vec<Window>>,
    /// The conv weight that produces it, if a convolution does.
    pub weight: Option<String>,
}

impl FeatureMap {
    /// A flat map of `features` values made by `kind`.
    pub fn flat(kind: MapKind, features: usize) -> Self {
        Self {
            kind,
            channels: features,
            windows: None,
            weight: None,
        }
    }

    /// Its height and width for an `h x w` network input.
    pub fn size(&self, input: (usize, usize)) -> (usize, usize) {
        match &self.windows {
            Some(windows) => windows.iter().fold(input, |hw, win| win.apply(hw)),
            None => (1, 1),
        }
    }

    /// Its elements for an `h x w` network input.
    pub fn elems(&self, input: (usize, usize)) -> usize {
        let (h, w) = self.size(input);
        self.channels * h * w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_pytorch_output_sizes() {
        // floor((size + 2p - k) / s) + 1, as torch.nn.Conv2d and MaxPool2d.
        assert_eq!(Window::square(3, 1, 1).apply((32, 32)), (32, 32));
        assert_eq!(Window::square(3, 2, 1).apply((32, 31)), (16, 16));
        assert_eq!(Window::square(7, 2, 3).apply((224, 224)), (112, 112));
        assert_eq!(Window::square(1, 2, 0).apply((15, 15)), (8, 8));
        assert_eq!(Window::square(2, 2, 0).apply((28, 28)), (14, 14));
        let pad_height = Window {
            kernel: (1, 1),
            stride: 1,
            padding: (1, 0),
        };
        assert_eq!(pad_height.apply((112, 112)), (114, 112));
    }
}
