//! The memory model: a training step's peak predicted from the model's
//! shapes, the clustering config and the workload.

use crate::cluster::{Forward, KmeansConfig, Method, Solver};
use crate::model::{Arch, FeatureMap, MapKind, Model};
use crate::quantize::{Clustering, QuantizePlan};
use crate::train::OptimizerKind;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// Bytes per element: the models train in f32.
const F32: u64 = 4;

/// Feature maps the recorded graph keeps for the backward, per layer kind.
#[derive(Debug, Clone, Copy)]
struct KeptMaps {
    /// A conv and its batch norm (with a fused ReLU and residual add, if any).
    conv_bn: u64,
    /// A ReLU after a batch norm.
    relu: u64,
    /// A residual add and the ReLU after it.
    add_relu: u64,
}

/// Training on the CPU: the conv output and the output of the fused batch
/// norm (`crate::nn`), which also does the ReLU and the residual add.
const TRAIN_MAPS: KeptMaps = KeptMaps {
    conv_bn: 2,
    relu: 0,
    add_relu: 0,
};

/// Evaluation: the conv output, and candle-nn's batch norm's centred,
/// scaled, multiplied and shifted tensors, then the ReLU and the add
/// separately. The graph is recorded in evaluation too (the parameters are
/// variables) and lives until the batch's logits are dropped.
const EVAL_MAPS: KeptMaps = KeptMaps {
    conv_bn: 5,
    relu: 1,
    add_relu: 2,
};

/// Feature maps of the largest layer in flight on top of the graph and the
/// retained gradients near the end of the backward: the output gradient,
/// the fused batch norm's input and residual gradients, candle's
/// accumulation of each (zeros, then the sum) and the conv's input
/// gradient. Measured: 5.0 for ResNet18-CIFAR at batch 16 and 32; 9.0 for
/// the small CNN at batch 16 to 256, whose largest map also goes through
/// candle's max-pool backward (docs/memory-model.md).
fn transient_maps(arch: Arch) -> f64 {
    match arch {
        Arch::SmallCnn => 9.0,
        Arch::ResNet18Cifar | Arch::ResNet18 => 5.0,
    }
}

/// Optimiser step: copies of the largest parameter in flight on the first
/// step, which creates the momentum buffer with tensor ops (weight decay,
/// the update); later steps update in place. Measured: 2.9.
const OPTIMIZER_TRANSIENT_COPIES: f64 = 3.0;

/// Resident bytes of the process beyond what a counting allocator sees:
/// binary, libraries, thread stacks (6 MiB, a child's resident set at its
/// start) and what glibc's per-thread arenas keep resident beyond the live
/// heap (2 MiB: small-CNN steps peaked 1-4 MiB over the heap prediction
/// plus 6 MiB). Calibrated (docs/memory-model.md).
const BASE_RSS: u64 = 8 << 20;

/// Resident set beyond the live heap that the allocator keeps after a step
/// of a model with large convolutions: freed blocks the size of a conv
/// weight (the conv backward's per-thread weight-gradient sums, candle's
/// zeros and sums of the gradients) left between live ones, in multiples
/// of the largest conv weight. Measured on ResNet18-CIFAR: 3.1 at batch 8,
/// 4.8 at 16, 5.8 at 32 (the peak resident set less the heap model and
/// the base).
const RETAINED_CONV_WEIGHTS: f64 = 5.0;

/// Heap of the runtime whatever the model beyond gemm's packing buffers:
/// rayon's pool, candle's and tracing's bookkeeping.
const RUNTIME_BOOKKEEPING: u64 = 512 << 10;

/// Heap of the runtime whatever the model: the GEMM library keeps a
/// thread-local packing buffer the size of the L2 cache in every thread
/// that multiplies (the calling thread and rayon's workers), plus
/// bookkeeping. Measured live between steps of the small CNN on 2 cores:
/// 2.5-3 MiB with 1 MiB of L2, 6 MiB with 2 MiB.
fn runtime_heap() -> u64 {
    gemm_threads() * super::procfs::l2_cache_bytes() + RUNTIME_BOOKKEEPING
}

/// Threads that run GEMMs: the calling thread and rayon's workers.
fn gemm_threads() -> u64 {
    rayon::current_num_threads() as u64 + 1
}

/// The part of [`runtime_heap`] the resident set does not see: the
/// packing buffers are allocated at the L2's size, but GEMMs of these
/// models touch about 1 MiB of each (the small CNN's resident set on a
/// machine with 2 MiB of L2 is 3 MiB under its counted heap plus the base).
fn runtime_untouched() -> u64 {
    gemm_threads() * super::procfs::l2_cache_bytes().saturating_sub(1 << 20)
}

/// DKM: `m x k` tensors recorded per k-means iteration, beyond the two of
/// size `m x k x d` (difference and square): distance, scaled logits, and the
/// softmax's shifted logits, exponentials and quotient (5), plus candle's
/// small extras. From the layer benchmark: 7.7 per iteration at d = 1.
const DKM_MK_PER_ITER: f64 = 5.7;

/// DKM: `m x k` tensors in flight while one layer's recorded iterations are
/// differentiated (beyond the `2 d` of the difference's gradient). From the
/// layer benchmark: 9 at d = 1.
const DKM_MK_TRANSIENT: f64 = 7.0;

/// Streaming IDKM / IDKM-JFB: weight copies in flight in one layer's
/// backward beyond the kept soft weights (the upstream gradient of the soft
/// weights, the weight gradient, its accumulation).
const STREAMING_TRANSIENT_COPIES: f64 = 2.0;

/// The shapes the memory model needs from a model.
#[derive(Debug, Clone)]
pub struct ModelShape {
    /// The architecture.
    pub arch: Arch,
    /// Elements of every parameter and buffer.
    pub all_elements: u64,
    /// Elements of the trainable parameters.
    pub trainable_elements: u64,
    /// The conv and linear weights (clusterable), name and element count, in forward order.
    pub weights: Vec<(String, usize)>,
    /// The feature maps of a forward pass on one sample.
    pub maps: Vec<FeatureMap>,
}

impl ModelShape {
    /// The shapes of `model`.
    pub fn of(model: &Model) -> Self {
        let all_elements = model
            .tensors()
            .values()
            .map(|t| t.elem_count() as u64)
            .sum();
        let trainable_elements = model.parameter_count() as u64;
        let weights = model
            .weights()
            .into_iter()
            .map(|(n, t)| (n, t.elem_count()))
            .collect();
        Self {
            arch: model.arch(),
            all_elements,
            trainable_elements,
            weights,
            maps: model.feature_maps(),
        }
    }

    /// The shapes of a freshly built `arch` for `channels` and `classes`
    /// (builds it on the CPU: a ResNet18 takes about a second).
    pub fn of_arch(arch: Arch, channels: usize, classes: usize) -> crate::Result<Self> {
        Ok(Self::of(&Model::new(
            arch,
            channels,
            classes,
            0,
            &Device::Cpu,
        )?))
    }
}

/// One weight and how it is clustered (`None`: stays in float).
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// The weight's name.
    pub name: String,
    /// Its element count.
    pub numel: usize,
    /// Its clustering, if any.
    pub config: Option<KmeansConfig>,
}

/// The clustering `plan` would apply to `shape`'s weights.
pub fn plan_specs(shape: &ModelShape, plan: &QuantizePlan) -> crate::Result<Vec<ClusterSpec>> {
    shape
        .weights
        .iter()
        .map(|(name, numel)| {
            Ok(ClusterSpec {
                name: name.clone(),
                numel: *numel,
                config: plan.layer(name, *numel)?,
            })
        })
        .collect()
}

/// The layers of an existing `clustering` over `shape`'s weights.
pub fn clustering_specs(shape: &ModelShape, clustering: &Clustering) -> Vec<ClusterSpec> {
    shape
        .weights
        .iter()
        .map(|(name, numel)| ClusterSpec {
            name: name.clone(),
            numel: *numel,
            config: clustering.layers().get(name).map(|l| l.config().clone()),
        })
        .collect()
}

/// Every weight in float (the fp32 step).
pub fn float_specs(shape: &ModelShape) -> Vec<ClusterSpec> {
    shape
        .weights
        .iter()
        .map(|(n, m)| ClusterSpec {
            name: n.clone(),
            numel: *m,
            config: None,
        })
        .collect()
}

/// What one training step processes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Workload {
    /// Samples per batch.
    pub batch: usize,
    /// Image channels.
    pub channels: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Number of classes.
    pub classes: usize,
    /// Optimiser state per parameter: 1 for SGD with momentum, 2 for AdamW, 0 for plain SGD.
    pub optimizer_slots: usize,
    /// Samples per evaluation batch between epochs (0: no evaluation).
    pub eval_batch: usize,
    /// Bytes of the data set held in memory for the whole run (0 for
    /// synthetic batches); see [`storage_bytes`].
    pub data_bytes: u64,
}

impl Workload {
    /// The usual input of `arch`: 3x32x32 CIFAR for resnet18-cifar, 3x224x224
    /// for resnet18, 1x28x28 for small-cnn; SGD with momentum.
    pub fn for_arch(arch: Arch, batch: usize, classes: usize) -> Self {
        let (channels, size) = match arch {
            Arch::ResNet18Cifar => (3, 32),
            Arch::ResNet18 => (3, 224),
            Arch::SmallCnn => (1, 28),
        };
        Self {
            batch,
            channels,
            height: size,
            width: size,
            classes,
            optimizer_slots: 1,
            eval_batch: 0,
            data_bytes: 0,
        }
    }

    /// Optimiser state slots of `kind`.
    pub fn slots(kind: &OptimizerKind) -> usize {
        match kind {
            OptimizerKind::Sgd(c) if c.momentum == 0.0 => 0,
            OptimizerKind::Sgd(_) => 1,
            OptimizerKind::AdamW { .. } => 2,
        }
    }
}

/// Bytes of the storage behind `t` (a narrowed tensor keeps all of it alive).
pub fn storage_bytes(t: &Tensor) -> u64 {
    use candle_core::{CpuStorage, Storage};
    let (storage, _) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::U8(v)) => v.len() as u64,
        Storage::Cpu(CpuStorage::F32(v)) => 4 * v.len() as u64,
        _ => (t.elem_count() * t.dtype().size_in_bytes()) as u64,
    }
}

/// The predicted extra memory of one clustered layer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerEstimate {
    /// The weight's name.
    pub name: String,
    /// Its element count.
    pub numel: usize,
    /// `dkm`, `idkm` or `idkm-jfb`.
    pub method: String,
    /// Bytes its forward keeps until the step ends.
    pub kept_bytes: u64,
    /// Bytes in flight while its backward runs.
    pub transient_bytes: u64,
}

/// A predicted peak, by part (bytes).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Estimate {
    /// Parameters and buffers.
    pub params: u64,
    /// Parameter gradients, with what candle's gradient store keeps of
    /// their computation.
    pub grads: u64,
    /// Optimiser state.
    pub optimizer: u64,
    /// The batch, and the data set when it is held in memory.
    pub input: u64,
    /// Tensors the forward graph keeps (float model).
    pub activations: u64,
    /// What the clustering's forward keeps, all layers.
    pub clustering: u64,
    /// The largest short-lived working set on top (feature maps or one
    /// clustered layer's backward).
    pub transient: u64,
    /// Runtime heap (thread pools, per-thread buffers).
    pub runtime: u64,
    /// Process base beyond the heap (binary, libraries, stacks), less the
    /// runtime heap that is allocated but not resident.
    pub base: u64,
    /// Peak heap of an evaluation pass (0 without one): parameters,
    /// optimiser state, the evaluation batch's graph, the precomputed soft
    /// and hard weights of the clustered layers.
    #[serde(default)]
    pub eval: u64,
    /// Per clustered layer.
    pub layers: Vec<LayerEstimate>,
}

impl Estimate {
    /// Predicted peak bytes a counting allocator sees.
    pub fn heap(&self) -> u64 {
        self.params
            + self.grads
            + self.optimizer
            + self.input
            + self.activations
            + self.clustering
            + self.transient
            + self.runtime
    }

    /// Predicted peak resident set: the training step's or, when larger,
    /// the evaluation's.
    pub fn total(&self) -> u64 {
        self.heap().max(self.eval) + self.base
    }
}

/// What the forward graph of `arch` holds per sample.
struct Walk {
    /// Feature-map elements the forward graph keeps for the backward.
    kept: u64,
    /// The largest single feature map.
    largest: u64,
    /// Output elements of each convolution, by weight name.
    conv_outputs: Vec<(String, u64)>,
}

/// Walks the forward pass of a model with feature maps `maps` on the
/// workload's inputs, counting what candle records (per sample).
fn activation_walk(maps: &[FeatureMap], w: &Workload, kept: KeptMaps) -> Walk {
    let mut walk = Walk {
        kept: 0,
        largest: 0,
        conv_outputs: Vec::new(),
    };
    for map in maps {
        let elems = map.elems((w.height, w.width)) as u64;
        let copies = match map.kind {
            MapKind::ConvBnRelu => kept.conv_bn + kept.relu,
            MapKind::ConvBn => kept.conv_bn,
            MapKind::ConvBnAddRelu => kept.conv_bn + kept.add_relu,
            MapKind::Op => 1,
            MapKind::Linear => 2,
            MapKind::LinearRelu => 3,
        };
        walk.kept += copies * elems;
        walk.largest = walk.largest.max(elems);
        if let Some(weight) = &map.weight {
            walk.conv_outputs.push((weight.clone(), elems));
        }
    }
    // The loss: log-softmax (max, shifted, exp, sum, log, difference) and the pick.
    walk.kept += 4 * w.classes as u64;
    walk.largest = walk.largest.max(w.classes as u64);
    walk
}

/// Predicted extra bytes of clustering one layer: (kept, transient).
pub fn layer_bytes(numel: usize, config: &KmeansConfig) -> (u64, u64) {
    let d = config.cluster_dim as f64;
    let m = (numel / config.cluster_dim) as f64;
    let k = config.k() as f64;
    let t = config.max_iter as f64;
    match config.method {
        Method::Dkm => {
            let per_pass = m * k * (2.0 * d + DKM_MK_PER_ITER);
            // t recorded iterations and the output's attention, plus the
            // output, and the weight gradient's chain of 2t + 3 terms.
            let kept = (t + 1.0) * per_pass + m * d + (2.0 * t + 3.0) * m * d;
            let transient = m * k * (2.0 * d + DKM_MK_TRANSIENT);
            ((kept * F32 as f64) as u64, (transient * F32 as f64) as u64)
        }
        Method::Idkm | Method::IdkmJfb => {
            // The soft weights; the per-chunk partial sums (f64) are small,
            // except the dense adjoint's: (k d)^2 doubles each, at least two
            // and up to 1 MiB of them in flight, plus the matrix and its LU.
            let kept = numel as f64;
            let n = k * d;
            let dense = if config.method == Method::Idkm
                && config.solver.resolve(n as usize) == Solver::Dense
            {
                let partial = n * n * 8.0;
                let in_flight = ((1u64 << 20) as f64 / partial).floor().clamp(2.0, 16.0);
                partial * (in_flight + 2.0) / F32 as f64
            } else {
                0.0
            };
            let transient = STREAMING_TRANSIENT_COPIES * numel as f64 + 64.0 * k * d * 2.0 + dense;
            ((kept * F32 as f64) as u64, (transient * F32 as f64) as u64)
        }
    }
}

/// Predicts the peak memory of one training step of `shape` with `specs`
/// (which weights are clustered, how) on `work`.
///
/// Besides the gradients themselves, candle's backward keeps, until the
/// gradient store is dropped, what the gradient of a float linear weight
/// was computed from: two more copies of the weight (the zeros it was
/// accumulated into and the product). The convolutions of `crate::nn`
/// return plain tensors, and a clustered weight's gradient comes from the
/// soft weights' gradient, which is consumed and freed: they keep nothing
/// more.
pub fn estimate(shape: &ModelShape, specs: &[ClusterSpec], work: &Workload) -> Estimate {
    let n = work.batch as u64;
    let walk = activation_walk(&shape.maps, work, TRAIN_MAPS);
    let mut layers = Vec::new();
    let (mut clustering, mut cluster_transient) = (0u64, 0u64);
    let mut retained = shape.trainable_elements * F32;
    for spec in specs {
        match &spec.config {
            Some(config) => {
                let (kept, transient) = layer_bytes(spec.numel, config);
                clustering += kept;
                cluster_transient = cluster_transient.max(transient);
                layers.push(LayerEstimate {
                    name: spec.name.clone(),
                    numel: spec.numel,
                    method: config.method.to_string(),
                    kept_bytes: kept,
                    transient_bytes: transient,
                });
            }
            None => {
                if !walk.conv_outputs.iter().any(|(name, _)| *name == spec.name) {
                    retained += 2 * spec.numel as u64 * F32;
                }
            }
        }
    }
    let input = n * (work.channels * work.height * work.width) as u64 * F32;
    let largest_param = shape
        .weights
        .iter()
        .map(|(_, m)| *m as u64)
        .max()
        .unwrap_or(0);
    let largest_conv = shape
        .weights
        .iter()
        .filter(|(name, _)| walk.conv_outputs.iter().any(|(c, _)| c == name))
        .map(|(_, m)| *m as u64)
        .max()
        .unwrap_or(0);
    let map_transient = (transient_maps(shape.arch) * (walk.largest * n * F32) as f64) as u64;
    // The conv backward's weight-gradient accumulators, one per thread.
    let conv_transient = rayon::current_num_threads() as u64 * largest_conv * F32;
    let optimizer_transient = (OPTIMIZER_TRANSIENT_COPIES * (largest_param * F32) as f64) as u64;
    let params = shape.all_elements * F32;
    let optimizer = work.optimizer_slots as u64 * shape.trainable_elements * F32;
    let eval = if work.eval_batch == 0 {
        0
    } else {
        let e = work.eval_batch as u64;
        let eval_walk = activation_walk(&shape.maps, work, EVAL_MAPS);
        let clustered: u64 = specs
            .iter()
            .filter(|s| s.config.is_some())
            .map(|s| s.numel as u64)
            .sum();
        params
            + work.data_bytes
            + optimizer
            + runtime_heap()
            + e * (work.channels * work.height * work.width) as u64 * F32
            + eval_walk.kept * e * F32
            + 2 * clustered * F32
            + 2 * eval_walk.largest * e * F32
    };
    Estimate {
        params,
        grads: retained,
        optimizer,
        input: input + n * 4 + work.data_bytes,
        activations: walk.kept * n * F32,
        clustering,
        transient: map_transient
            .max(conv_transient)
            .max(cluster_transient)
            .max(optimizer_transient),
        runtime: runtime_heap(),
        base: (BASE_RSS + (RETAINED_CONV_WEIGHTS * (largest_conv * F32) as f64) as u64)
            .saturating_sub(runtime_untouched()),
        eval,
        layers,
    }
}

/// Seconds per `m x k` element of one streaming pass (IDKM, IDKM-JFB) on
/// this project's CI-class machine, from the layer benchmark (the
/// vectorised passes: 0.3-0.5 ns on 2 threads).
const STREAMING_SECONDS_PER_MK: f64 = 5e-10;

/// Seconds per `m x k` element and recorded iteration of reference DKM
/// (forward and backward), from the layer benchmark.
const DKM_SECONDS_PER_MK_ITER: f64 = 2.8e-7;

/// Newton iterations a forward solve typically takes below
/// [`MANY_CENTROIDS`] (cold starts 4-8, steps during training 3-25), and
/// at or above it (8 bits: 8-30).
const NEWTON_TYPICAL_ITERS: (f64, f64) = (8.0, 30.0);

/// Centroids from which Newton's method needs tens of iterations
/// (`docs/design.md`, the temperature).
const MANY_CENTROIDS: usize = 64;

/// Centroids a windowed pass (scalar weights, at least 8 centroids: each
/// tile attends only to the centroids within reach) costs as, whatever k:
/// the layer and step benchmarks' passes at 4 and 8 bits.
const WINDOWED_PASS_CENTROIDS: usize = 16;

/// A rough prediction of the seconds per step with `specs`, given the fp32
/// step's: the clustering's passes over the weights, costed as in the layer
/// benchmark on this project's 2-core machine. Only used to skip
/// configurations that would not finish in a time limit; it goes stale as
/// the passes get faster (measured within 3x of the step benchmark's
/// times at 4 and 8 bits).
pub fn predict_seconds(specs: &[ClusterSpec], fp32_seconds: f64) -> f64 {
    let mut s = fp32_seconds;
    for spec in specs {
        let Some(c) = &spec.config else { continue };
        let windowed = c.cluster_dim == 1 && c.k() >= 8 && c.method != Method::Dkm;
        let k = if windowed {
            c.k().min(WINDOWED_PASS_CENTROIDS)
        } else {
            c.k()
        };
        let mk = (spec.numel / c.cluster_dim * k) as f64;
        let n = k * c.cluster_dim;
        // Passes of the forward solve: t plain steps, or Newton iterations
        // (up to `max_iter`, the cap, but most stop earlier), each a pass
        // that also assembles J.
        let t = match c.forward {
            Forward::Newton if c.method != Method::Dkm => {
                let typical = if c.k() >= MANY_CENTROIDS {
                    NEWTON_TYPICAL_ITERS.1
                } else {
                    NEWTON_TYPICAL_ITERS.0
                };
                typical.min(c.max_iter as f64) * (1.0 + n as f64 / 8.0)
            }
            _ => c.max_iter as f64,
        };
        s += match c.method {
            Method::Dkm => DKM_SECONDS_PER_MK_ITER * mk * (t + 1.0),
            // The fixed point, the output pass, the moments-and-cotangent and
            // gradient passes, and the solve: the dense assembly costs about
            // k d / 8 passes (measured at k d = 16 and 256), a Krylov
            // solver one pass a step (about 35 at tau = 1e-4).
            Method::Idkm => {
                let solve = match c.solver.resolve(n) {
                    Solver::Dense => (n as f64 / 8.0).max(1.0),
                    _ => c.solver_max_steps.min(35) as f64,
                };
                STREAMING_SECONDS_PER_MK * mk * (t + 3.0 + solve)
            }
            Method::IdkmJfb => STREAMING_SECONDS_PER_MK * mk * (t + 3.0),
        };
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The walk over the feature maps the models describe, against the
    /// architectures counted by hand (per sample, kept elements, the
    /// largest map, the conv outputs) with the training and evaluation
    /// graphs.
    #[test]
    fn the_models_feature_maps_give_the_hand_counted_walks() {
        for (arch, (train, eval, largest)) in [
            (Arch::SmallCnn, (42_588, 117_852, 12_544)),
            (Arch::ResNet18Cifar, (1_229_372, 3_875_388, 65_536)),
            (Arch::ResNet18, (6_817_596, 17_329_468, 831_744)),
        ] {
            let channels = if arch == Arch::SmallCnn { 1 } else { 3 };
            let shape = ModelShape::of_arch(arch, channels, 10).unwrap();
            let work = Workload::for_arch(arch, 1, 10);
            let walk = activation_walk(&shape.maps, &work, TRAIN_MAPS);
            assert_eq!((walk.kept, walk.largest), (train, largest), "{arch}");
            assert_eq!(
                activation_walk(&shape.maps, &work, EVAL_MAPS).kept,
                eval,
                "{arch}"
            );
            let convs: Vec<&str> = walk.conv_outputs.iter().map(|(n, _)| n.as_str()).collect();
            let weights: Vec<&str> = shape
                .weights
                .iter()
                .map(|(n, _)| n.as_str())
                .filter(|n| !n.starts_with("fc"))
                .collect();
            assert_eq!(convs, weights, "{arch}");
        }
    }

    #[test]
    fn dkm_grows_with_t_and_idkm_does_not() {
        let cfg = |method, t| KmeansConfig {
            method,
            max_iter: t,
            ..Default::default()
        };
        let (d1, _) = layer_bytes(1 << 20, &cfg(Method::Dkm, 1));
        let (d30, _) = layer_bytes(1 << 20, &cfg(Method::Dkm, 30));
        let (i1, _) = layer_bytes(1 << 20, &cfg(Method::Idkm, 1));
        let (i30, _) = layer_bytes(1 << 20, &cfg(Method::Idkm, 30));
        assert!(d30 > 10 * d1);
        assert_eq!(i1, i30);
        assert_eq!(i30, 4 << 20);
    }
}
