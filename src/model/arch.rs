//! The architectures idkm builds, by name.

use crate::error::{Error, Result};

/// A network architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// ResNet18 with the CIFAR stem (3x3 stride-1 conv, no max-pool).
    ResNet18Cifar,
    /// ResNet18 in the torchvision/timm ImageNet layout.
    ResNet18,
    /// The small CNN for 28x28 grey images.
    SmallCnn,
}

impl Arch {
    const NAMES: [(Arch, &'static str); 3] = [
        (Arch::ResNet18Cifar, "resnet18-cifar"),
        (Arch::ResNet18, "resnet18"),
        (Arch::SmallCnn, "small-cnn"),
    ];
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = Self::NAMES
            .iter()
            .find(|(a, _)| a == self)
            .map(|(_, n)| *n)
            .unwrap_or("?");
        f.write_str(name)
    }
}

impl std::str::FromStr for Arch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::NAMES
            .iter()
            .find(|(_, n)| *n == s)
            .map(|(a, _)| *a)
            .ok_or_else(|| Error::UnknownName {
                what: "model architecture",
                got: s.to_string(),
                expected: Self::NAMES.map(|(_, n)| n).join(", "),
            })
    }
}

crate::names::serde_by_name!(Arch);
