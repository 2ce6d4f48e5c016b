//! Which weights are clustered, and how: one base configuration, a size
//! threshold, and per-layer overrides from a TOML file.

use crate::cluster::{KmeansConfig, Method};
use crate::error::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Per-layer changes to the base configuration.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerOverride {
    /// Bits per index.
    pub bits: Option<u32>,
    /// Cluster dimension.
    pub cluster_dim: Option<usize>,
    /// Softmax temperature.
    pub tau: Option<f64>,
    /// Gradient method (`dkm`, `idkm`, `idkm-jfb`).
    pub method: Option<String>,
    /// Keep this layer in float.
    #[serde(default)]
    pub skip: bool,
}

/// The TOML file: an optional threshold and a table of layers, keyed by the
/// weight's name with or without the `.weight` suffix:
///
/// ```toml
/// min_weights = 2048
/// [layers.conv1]
/// bits = 8
/// [layers.fc]
/// skip = true
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OverrideFile {
    min_weights: Option<usize>,
    #[serde(default)]
    layers: BTreeMap<String, LayerOverride>,
}

/// The clustering plan of a whole model.
#[derive(Debug, Clone)]
pub struct QuantizePlan {
    /// Configuration of every clustered layer unless overridden.
    pub base: KmeansConfig,
    /// Layers with fewer weights stay in float.
    pub min_weights: usize,
    /// Overrides by layer name (`conv1` or `conv1.weight`).
    pub overrides: BTreeMap<String, LayerOverride>,
}

impl QuantizePlan {
    /// The default threshold: layers with fewer weights stay in float.
    pub const MIN_WEIGHTS: usize = 2048;

    /// Every layer with at least [`Self::MIN_WEIGHTS`] weights clustered with `base`.
    pub fn new(base: KmeansConfig) -> Self {
        Self {
            base,
            min_weights: Self::MIN_WEIGHTS,
            overrides: BTreeMap::new(),
        }
    }

    /// Reads overrides (and optionally the threshold) from a TOML file.
    pub fn with_overrides_file(mut self, path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.into(),
            source,
        })?;
        let file: OverrideFile = toml::from_str(&text).map_err(|e| Error::Format {
            path: path.into(),
            msg: e.to_string(),
        })?;
        if let Some(n) = file.min_weights {
            self.min_weights = n;
        }
        self.overrides.extend(file.layers);
        Ok(self)
    }

    /// The configuration of the weight `name` with `numel` elements, or
    /// `None` when it stays in float.
    pub fn layer(&self, name: &str, numel: usize) -> Result<Option<KmeansConfig>> {
        let short = name.strip_suffix(".weight").unwrap_or(name);
        let over = self
            .overrides
            .get(name)
            .or_else(|| self.overrides.get(short));
        let Some(over) = over else {
            return Ok((numel >= self.min_weights).then(|| self.base.clone()));
        };
        if over.skip {
            return Ok(None);
        }
        let mut config = self.base.clone();
        config.bits = over.bits.unwrap_or(config.bits);
        config.cluster_dim = over.cluster_dim.unwrap_or(config.cluster_dim);
        config.tau = over.tau.or(config.tau);
        if let Some(m) = &over.method {
            config.method = m.parse::<Method>()?;
        }
        config
            .validate()
            .map_err(|e| Error::Config(format!("override of `{name}`: {e}")))?;
        Ok(Some(config))
    }

    /// Checks that every override names one of `weights`.
    pub fn check_names<'a>(
        &self,
        weights: impl IntoIterator<Item = &'a str> + Clone,
    ) -> Result<()> {
        for key in self.overrides.keys() {
            let known = weights
                .clone()
                .into_iter()
                .any(|w| w == key || w.strip_suffix(".weight") == Some(key));
            if !known {
                let names: Vec<_> = weights.clone().into_iter().collect();
                return Err(Error::Config(format!(
                    "override for `{key}` matches no conv or linear weight; the model has: {}",
                    names.join(", ")
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_threshold_and_skip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layers.toml");
        std::fs::write(
            &path,
            "min_weights = 100\n[layers.conv1]\nbits = 8\n[layers.\"fc.weight\"]\nskip = true\n",
        )
        .unwrap();
        let plan = QuantizePlan::new(KmeansConfig {
            bits: 2,
            ..Default::default()
        })
        .with_overrides_file(&path)
        .unwrap();
        assert_eq!(plan.layer("conv1.weight", 50).unwrap().unwrap().bits, 8);
        assert_eq!(plan.layer("fc.weight", 5000).unwrap(), None);
        assert_eq!(plan.layer("layer1.0.conv1.weight", 99).unwrap(), None);
        assert_eq!(
            plan.layer("layer1.0.conv1.weight", 100)
                .unwrap()
                .unwrap()
                .bits,
            2
        );
        plan.check_names(["conv1.weight", "fc.weight"]).unwrap();
        let err = plan.check_names(["conv1.weight"]).unwrap_err().to_string();
        assert!(
            err.contains("`fc.weight`") && err.contains("conv1.weight"),
            "{err}"
        );
    }

    #[test]
    fn bad_files_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layers.toml");
        std::fs::write(&path, "[layers.conv1]\nbitz = 8\n").unwrap();
        let err = QuantizePlan::new(KmeansConfig::default())
            .with_overrides_file(&path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("layers.toml") && err.contains("bitz"), "{err}");
        std::fs::write(&path, "[layers.conv1]\nbits = 9\n").unwrap();
        let plan = QuantizePlan::new(KmeansConfig::default())
            .with_overrides_file(&path)
            .unwrap();
        assert!(plan
            .layer("conv1.weight", 10_000)
            .unwrap_err()
            .to_string()
            .contains("conv1"));
    }
}
