//! The profile behind `idkm profile` and the step benchmark: training steps
//! of each configuration in a fresh process, with a memory and a time
//! limit, measured beside the memory model's prediction; its table, JSON
//! and plots.

mod plot;
mod rounds;
mod run;
mod table;

pub use plot::{write_outputs, write_plot, PlotKind};
pub use rounds::{median_of_rounds, median_rounds};
pub use run::{child_main, profile, run_child, run_steps, RESULT_PREFIX};
pub use table::{layer_table, table, table_row};

use crate::cluster::{Forward, KmeansConfig, Method, Solver};
use crate::device::DeviceSpec;
use crate::memory::{
    estimate, float_specs, plan_specs, ClusterSpec, Estimate, ModelShape, Workload,
};
use crate::model::Arch;
use crate::quantize::QuantizePlan;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One configuration to profile.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepConfig {
    /// The architecture.
    pub arch: Arch,
    /// Samples per batch.
    pub batch: usize,
    /// The clustering method; `None` (spelled `fp32`) trains in float.
    #[serde(with = "method_or_fp32")]
    pub method: Option<Method>,
    /// Bits per index (clustered methods).
    pub bits: u32,
    /// Cluster dimension.
    pub cluster_dim: usize,
    /// k-means iterations per forward pass (t).
    pub iters: usize,
    /// k-means tolerance: 0 runs exactly `iters` iterations.
    pub tol: f64,
    /// Softmax temperature; `None` derives it from each layer's weights.
    pub tau: Option<f64>,
    /// How the forward pass reaches the fixed point.
    #[serde(default)]
    pub forward: Forward,
    /// Adjoint solver of IDKM.
    pub solver: Solver,
    /// Layers with fewer weights stay in float.
    pub min_weights: usize,
    /// Number of classes.
    pub classes: usize,
    /// Untimed warm-up steps (initialisation, warm start).
    pub warmup: usize,
    /// Measured steps.
    pub steps: usize,
    /// Wall-clock seconds the child may spend; measured steps that would not
    /// fit after the warm-up are dropped (the warm-up is then reported).
    pub max_seconds: f64,
    /// Where the steps run.
    pub device: DeviceSpec,
    /// Data set directory for real batches (synthetic when absent).
    pub data: Option<PathBuf>,
    /// A model file (any the loader reads) whose weights the steps start
    /// from; a fresh, seeded initialisation when absent.
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
    /// Seed of the model, the data and the clustering.
    pub seed: u64,
    /// k-means iterations run on each clustered layer before the warm-up
    /// (no graph), so that the steps start at the fixed point, as the steps
    /// of a long fine-tune do; `None` starts them cold.
    #[serde(default)]
    pub converge_iters: Option<usize>,
}

impl StepConfig {
    /// A short label such as `idkm 4-bit t=30` or `fp32`.
    pub fn label(&self) -> String {
        if let Some(method) = self.method {
            let steady = if self.converge_iters.is_some() {
                " steady"
            } else {
                ""
            };
            let solve = if self.newton() {
                "newton".to_string()
            } else {
                format!("t={}", self.iters)
            };
            format!("{method} {}-bit {solve}{steady}", self.bits)
        } else {
            "fp32".into()
        }
    }

    /// Whether the clustered layers reach the fixed point by Newton's
    /// method, which has no t (DKM always steps).
    pub fn newton(&self) -> bool {
        self.forward == Forward::Newton && self.method.is_some_and(|m| m != Method::Dkm)
    }

    /// The clustering configuration of every clustered layer.
    pub fn kmeans(&self) -> anyhow::Result<Option<KmeansConfig>> {
        let Some(method) = self.method else {
            return Ok(None);
        };
        let config = KmeansConfig {
            bits: self.bits,
            cluster_dim: self.cluster_dim,
            tau: self.tau,
            forward: self.forward,
            max_iter: self.iters,
            tol: self.tol,
            method,
            solver: self.solver,
            seed: self.seed,
            ..Default::default()
        };
        config.validate()?;
        Ok(Some(config))
    }

    /// The plan of the clustered layers.
    pub fn plan(&self) -> anyhow::Result<Option<QuantizePlan>> {
        Ok(self.kmeans()?.map(|base| QuantizePlan {
            min_weights: self.min_weights,
            ..QuantizePlan::new(base)
        }))
    }

    /// The workload of one step.
    pub fn workload(&self) -> Workload {
        Workload::for_arch(self.arch, self.batch, self.classes)
    }

    /// Which weights this configuration clusters, and how.
    pub fn specs(&self, shape: &ModelShape) -> anyhow::Result<Vec<ClusterSpec>> {
        Ok(match self.plan()? {
            Some(plan) => plan_specs(shape, &plan)?,
            None => float_specs(shape),
        })
    }

    /// The memory model's prediction for this configuration.
    pub fn predict(&self, shape: &ModelShape) -> anyhow::Result<Estimate> {
        Ok(estimate(shape, &self.specs(shape)?, &self.workload()))
    }
}

/// A profile record's method: a clustering method's name, or `fp32`.
mod method_or_fp32 {
    use crate::cluster::Method;
    use serde::{Deserialize, Deserializer, Serializer};

    const FP32: &str = "fp32";

    pub fn serialize<S: Serializer>(method: &Option<Method>, s: S) -> Result<S::Ok, S::Error> {
        match method {
            Some(m) => s.collect_str(m),
            None => s.serialize_str(FP32),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Method>, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if name == FP32 {
            return Ok(None);
        }
        name.parse().map(Some).map_err(serde::de::Error::custom)
    }
}

/// One clustered layer after the last measured step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerReport {
    /// The weight's name.
    pub name: String,
    /// Its element count.
    pub numel: usize,
    /// Predicted extra bytes its forward keeps.
    pub kept_bytes: u64,
    /// Predicted extra bytes in flight in its backward.
    pub transient_bytes: u64,
    /// k-means iterations of the last forward pass.
    pub forward_iters: Option<usize>,
    /// Passes (over the weights and over bins) of the last forward solve.
    #[serde(default)]
    pub forward_passes: Option<usize>,
    /// Its distance estimate to the fixed point, relative to the spread.
    #[serde(default)]
    pub forward_distance: Option<f64>,
    /// `cond(I - J)` at its fixed point (Newton only).
    #[serde(default)]
    pub forward_cond: Option<f64>,
    /// Distinct centroids at its fixed point.
    #[serde(default)]
    pub distinct: Option<usize>,
    /// The layer's temperature.
    #[serde(default)]
    pub tau: Option<f64>,
    /// Plain steps the Newton solve fell back to.
    #[serde(default)]
    pub forward_fallbacks: Option<usize>,
    /// How the adjoint was obtained: `solved`, `best-iterate`, `jfb-fallback`, `jfb`, or none (DKM).
    pub adjoint: Option<String>,
    /// Solver steps of the last backward (IDKM).
    pub solver_steps: Option<usize>,
    /// Relative residual of the last adjoint solve (IDKM).
    pub residual: Option<f64>,
}

/// What a child measured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Measured {
    /// Seconds of each warm-up step.
    pub warmup_seconds: Vec<f64>,
    /// Seconds of each measured step.
    pub step_seconds: Vec<f64>,
    /// Mean seconds per measured step (the warm-up's when none could be measured).
    pub seconds_per_step: f64,
    /// True when only the warm-up ran (the time limit left no room).
    pub warmup_only: bool,
    /// Peak resident set over the measured steps (VmHWM after a reset).
    pub peak_rss_bytes: Option<u64>,
    /// Peak resident set up to the end of the warm-up (building the model,
    /// initialising the clustering, the warm-up steps).
    pub peak_rss_warmup_bytes: Option<u64>,
    /// Resident set before the model was built.
    pub base_rss_bytes: Option<u64>,
    /// Peak bytes counted by [`crate::alloc::Counting`] over the measured steps (when installed).
    pub peak_counted_bytes: Option<u64>,
    /// Loss of the last step (a sanity check: finite).
    pub loss: f64,
    /// Per clustered layer.
    pub layers: Vec<LayerReport>,
}

/// The outcome of one configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum Outcome {
    /// Ran and measured.
    Measured(Measured),
    /// Predicted over the budget: not started.
    DoesNotFit {
        /// The budget in bytes.
        budget_bytes: u64,
    },
    /// Predicted to take longer than the time limit: not started.
    TooSlow {
        /// Predicted seconds per step.
        predicted_seconds: f64,
        /// The limit for the whole configuration (warm-up and measured steps).
        limit_seconds: f64,
    },
    /// Started and failed (out of memory, time limit, error).
    Failed {
        /// Why.
        reason: String,
    },
}

/// One row of a profile: the configuration, the prediction and the outcome.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// The configuration.
    pub config: StepConfig,
    /// The memory model's prediction.
    pub predicted: Estimate,
    /// What happened.
    pub outcome: Outcome,
}

impl Record {
    /// The measurement, if the configuration ran.
    pub fn measured(&self) -> Option<&Measured> {
        match &self.outcome {
            Outcome::Measured(m) => Some(m),
            _ => None,
        }
    }

    /// Relative error of the prediction against the measured peak resident set.
    pub fn rss_error(&self) -> Option<f64> {
        let m = self.measured()?.peak_rss_bytes? as f64;
        Some((self.predicted.total() as f64 - m) / m)
    }

    /// Relative error of the heap prediction against the counted peak.
    pub fn counted_error(&self) -> Option<f64> {
        let m = self.measured()?.peak_counted_bytes? as f64;
        Some((self.predicted.heap() as f64 - m) / m)
    }
}
