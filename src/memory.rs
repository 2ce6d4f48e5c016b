//! Memory of a training step: a model that predicts its peak from the
//! model's shapes and the clustering config, the profile runner behind
//! `idkm profile` and the step benchmark (each configuration in a fresh
//! process, with a memory and a time limit), its table, JSON and plots, and
//! a counting global allocator on the system allocator (or mimalloc).
//!
//! # The model
//!
//! A CPU training step (forward, `backward`, optimiser step, with the loss
//! and so the whole forward graph alive until the step ends) peaks near the
//! end of the backward pass. [`estimate`] adds up, in bytes:
//!
//! - **params**: every parameter and buffer (batch-norm statistics included);
//! - **grads**: one gradient per trainable parameter, and what candle's
//!   gradient store keeps of a float conv or linear weight's gradient until
//!   it is dropped (its output's gradient, two more weight copies), which a
//!   clustered weight does not keep;
//! - **optimizer**: SGD momentum (one slot per parameter) or AdamW (two);
//! - **input**: the batch;
//! - **activations**: the tensors the forward graph keeps for the backward,
//!   counted per operation as candle 0.11 records them (a convolution keeps
//!   its output, a training-mode batch norm six tensors of that size, a ReLU
//!   or a residual add one more);
//! - **clustering**: per clustered layer, what its forward keeps: the soft
//!   weights (one weight copy) for IDKM and IDKM-JFB, and for DKM the
//!   `m x k` tensors of every recorded k-means iteration and of the output;
//! - **transient**: the largest short-lived working set on top of that: the
//!   gradients and copies of the largest feature map in flight, one layer's
//!   DKM backward, the streaming backward of the largest layer, or the
//!   optimiser's copies of the largest parameter;
//! - **runtime** and **base**: thread pools' buffers, and the resident set
//!   beyond the heap (binary, libraries, stacks).
//!
//! With an evaluation batch in the [`Workload`] it also predicts the
//! evaluation between epochs and takes the larger peak.
//!
//! The per-operation counts come from reading candle's code and were
//! checked by counting (the step benchmark's `IDKM_STEP_BREAKDOWN=1`); the
//! transient coefficients and the base are calibrated on this project's
//! CI-class machine (`docs/memory-model.md`). The prediction is of the peak
//! resident set with the system allocator; [`Estimate::heap`] is the part a
//! counting allocator sees. [`check_budget`] turns it into the refusal of
//! `--memory-budget`, with the alternatives that fit.

use crate::cluster::backward::Adjoint;
use crate::cluster::{ClusteredWeight, Forward, KmeansConfig, Method, Solver};
use crate::model::{Arch, Model, Weights};
use crate::quantize::{Clustering, QuantizePlan};
use crate::train::{Optimizer, OptimizerKind, SgdConfig};
use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// The allocator
// ---------------------------------------------------------------------------

/// A counting global allocator on the system allocator or, with the
/// `mimalloc` feature, on mimalloc, chosen once per process by the
/// `IDKM_ALLOC` environment variable (`system` or `mimalloc`;
/// [`DEFAULT_ALLOC`] when unset), read without allocating on the process's
/// first allocation. (The allocator experiment of issue 5 found no gain from
/// mimalloc on this project's training steps: see docs/allocator.md.) Counts live and peak bytes
/// and can refuse allocations beyond a limit ([`set_counted_limit`]), which
/// makes the allocation fail (Rust then aborts the process) instead of
/// letting the machine run out of memory.
///
/// ```text
/// #[global_allocator]
/// static GLOBAL: idkm::memory::ProfileAlloc = idkm::memory::ProfileAlloc;
/// ```
pub struct ProfileAlloc;

/// The allocator a process uses when `IDKM_ALLOC` is not set.
pub const DEFAULT_ALLOC: AllocKind = AllocKind::System;

/// The environment variable that selects the allocator of [`ProfileAlloc`].
pub const ALLOC_ENV: &str = "IDKM_ALLOC";

/// Which allocator [`ProfileAlloc`] forwards to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllocKind {
    /// The system allocator (glibc's malloc on Linux).
    System,
    /// mimalloc (Microsoft's allocator, bundled by the `mimalloc` crate).
    Mimalloc,
}

impl std::fmt::Display for AllocKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AllocKind::System => "system",
            AllocKind::Mimalloc => "mimalloc",
        })
    }
}

impl std::str::FromStr for AllocKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "system" => Ok(AllocKind::System),
            "mimalloc" => Ok(AllocKind::Mimalloc),
            other => Err(format!(
                "unknown allocator `{other}` (expected system or mimalloc)"
            )),
        }
    }
}

static KIND: AtomicU8 = AtomicU8::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

const SYSTEM: u8 = 1;
const MIMALLOC: u8 = 2;

/// mimalloc when the `mimalloc` feature is on; the system allocator otherwise.
#[cfg(feature = "mimalloc")]
const MI: mimalloc::MiMalloc = mimalloc::MiMalloc;
#[cfg(not(feature = "mimalloc"))]
const MI: System = System;

fn kind_code() -> u8 {
    let k = KIND.load(Relaxed);
    if k != 0 {
        return k;
    }
    // The first allocation of the process (one thread): getenv does not allocate.
    // SAFETY: a NUL-terminated name; the result is read before anything can
    // change the environment.
    let chosen = unsafe {
        let v = libc::getenv(c"IDKM_ALLOC".as_ptr());
        match (v.is_null(), DEFAULT_ALLOC) {
            (false, _) if std::ffi::CStr::from_ptr(v).to_bytes() == b"mimalloc" => MIMALLOC,
            (false, _) if std::ffi::CStr::from_ptr(v).to_bytes() == b"system" => SYSTEM,
            (_, AllocKind::Mimalloc) => MIMALLOC,
            (_, AllocKind::System) => SYSTEM,
        }
    };
    // Without the `mimalloc` feature there is only the system allocator.
    let chosen = if cfg!(feature = "mimalloc") {
        chosen
    } else {
        SYSTEM
    };
    match KIND.compare_exchange(0, chosen, SeqCst, SeqCst) {
        Ok(_) => chosen,
        Err(existing) => existing,
    }
}

fn count_alloc(size: usize) {
    let now = LIVE.fetch_add(size, SeqCst) + size;
    PEAK.fetch_max(now, SeqCst);
}

fn over_limit(size: usize) -> bool {
    LIVE.load(Relaxed).saturating_add(size) > LIMIT.load(Relaxed)
}

// SAFETY: every call is forwarded unchanged to one allocator, the same for
// the whole process (chosen before the first allocation returns); the
// counters are bookkeeping only.
unsafe impl GlobalAlloc for ProfileAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if over_limit(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe {
            match kind_code() {
                MIMALLOC => MI.alloc(layout),
                _ => System.alloc(layout),
            }
        };
        if !p.is_null() {
            INSTALLED.store(true, Relaxed);
            count_alloc(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if over_limit(layout.size()) {
            return std::ptr::null_mut();
        }
        // Forwarded as such: calloc of fresh pages needs no memset.
        let p = unsafe {
            match kind_code() {
                MIMALLOC => MI.alloc_zeroed(layout),
                _ => System.alloc_zeroed(layout),
            }
        };
        if !p.is_null() {
            INSTALLED.store(true, Relaxed);
            count_alloc(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe {
            match kind_code() {
                MIMALLOC => MI.dealloc(p, layout),
                _ => System.dealloc(p, layout),
            }
        }
        LIVE.fetch_sub(layout.size(), SeqCst);
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() && over_limit(new_size - layout.size()) {
            return std::ptr::null_mut();
        }
        let q = unsafe {
            match kind_code() {
                MIMALLOC => MI.realloc(p, layout, new_size),
                _ => System.realloc(p, layout, new_size),
            }
        };
        if !q.is_null() {
            if new_size >= layout.size() {
                count_alloc(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, SeqCst);
            }
        }
        q
    }
}

/// Whether [`ProfileAlloc`] is this process's global allocator (it has served
/// an allocation).
pub fn counting_installed() -> bool {
    INSTALLED.load(Relaxed)
}

/// The allocator [`ProfileAlloc`] forwards to in this process.
pub fn allocator() -> AllocKind {
    match kind_code() {
        MIMALLOC => AllocKind::Mimalloc,
        _ => AllocKind::System,
    }
}

/// Bytes live now, as counted by [`ProfileAlloc`] (0 when not installed).
pub fn counted_live() -> usize {
    LIVE.load(SeqCst)
}

/// The most bytes live at once since the last [`reset_counted_peak`].
pub fn counted_peak() -> usize {
    PEAK.load(SeqCst)
}

/// Starts a new peak from the bytes live now.
pub fn reset_counted_peak() {
    PEAK.store(LIVE.load(SeqCst), SeqCst);
}

/// Makes [`ProfileAlloc`] refuse any allocation that would take the live
/// bytes beyond `bytes` (the process then aborts with Rust's "memory
/// allocation failed" message).
pub fn set_counted_limit(bytes: usize) {
    LIMIT.store(bytes, SeqCst);
}

/// Limits the address space of this process (`RLIMIT_AS`) to `bytes`: a
/// backstop for processes without [`ProfileAlloc`]. Allocations beyond it
/// fail instead of pushing the machine into swap or the OOM killer.
pub fn limit_address_space(bytes: u64) -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: bytes as libc::rlim_t,
        rlim_max: bytes as libc::rlim_t,
    };
    // SAFETY: a plain system call with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Peak resident set of this process (VmHWM), in bytes.
pub fn peak_rss() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|k| k * 1024)
}

/// Resident set of this process now (VmRSS), in bytes.
pub fn current_rss() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|k| k * 1024)
}

/// Resets the peak resident set (VmHWM) to the current one (Linux
/// `/proc/self/clear_refs`); false where that is not possible.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Memory the kernel says is available for new work (MemAvailable), in bytes.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|k| k * 1024)
}

// ---------------------------------------------------------------------------
// The memory model
// ---------------------------------------------------------------------------

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
const TRAIN_MAPS: KeptMaps = KeptMaps { conv_bn: 2, relu: 0, add_relu: 0 };

/// Evaluation: the conv output, and candle-nn's batch norm's centred,
/// scaled, multiplied and shifted tensors, then the ReLU and the add
/// separately. The graph is recorded in evaluation too (the parameters are
/// variables) and lives until the batch's logits are dropped.
const EVAL_MAPS: KeptMaps = KeptMaps { conv_bn: 5, relu: 1, add_relu: 2 };

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

/// Heap of the runtime whatever the model: rayon's pool, gemm's per-thread
/// packing buffers, candle's and tracing's bookkeeping. Measured: 2.5-3 MiB.
const RUNTIME_HEAP: u64 = 3 << 20;

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
    /// Process base beyond the heap (binary, libraries, stacks).
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

/// Walks `arch`'s forward pass on `c x h x w` inputs, counting what candle
/// records (per sample).
fn activation_walk(arch: Arch, w: &Workload, maps: KeptMaps) -> Walk {
    let out = |size: usize, k: usize, s: usize, p: usize| (size + 2 * p - k) / s + 1;
    let mut walk = Walk {
        kept: 0,
        largest: 0,
        conv_outputs: Vec::new(),
    };
    let map = |walk: &mut Walk, elems: usize, copies: u64| {
        walk.kept += copies * elems as u64;
        walk.largest = walk.largest.max(elems as u64);
    };
    match arch {
        Arch::ResNet18Cifar | Arch::ResNet18 => {
            let (mut h, mut wd) = (w.height, w.width);
            if arch == Arch::ResNet18Cifar {
                map(&mut walk, 64 * h * wd, maps.conv_bn + maps.relu);
            } else {
                h = out(h, 7, 2, 3);
                wd = out(wd, 7, 2, 3);
                map(&mut walk, 64 * h * wd, maps.conv_bn + maps.relu);
                // Two zero paddings (copies) and the max-pool.
                map(&mut walk, 64 * (h + 2) * wd, 1);
                map(&mut walk, 64 * (h + 2) * (wd + 2), 1);
            }
            walk.conv_outputs
                .push(("conv1.weight".into(), (64 * h * wd) as u64));
            if arch == Arch::ResNet18 {
                h = out(h + 2, 3, 2, 0);
                wd = out(wd + 2, 3, 2, 0);
                map(&mut walk, 64 * h * wd, 1);
            }
            let mut cin = 64;
            for (stage, cout) in [64usize, 128, 256, 512].into_iter().enumerate() {
                for block in 0..2 {
                    let stride = if stage > 0 && block == 0 { 2 } else { 1 };
                    let downsample = block == 0 && (stride != 1 || cin != cout);
                    h = out(h, 3, stride, 1);
                    wd = out(wd, 3, stride, 1);
                    let elems = cout * h * wd;
                    // conv1 + bn + relu, conv2 + bn, [downsample conv + bn], add, relu.
                    let kept = (maps.conv_bn + maps.relu)
                        + maps.conv_bn
                        + if downsample { maps.conv_bn } else { 0 }
                        + maps.add_relu;
                    map(&mut walk, elems, kept);
                    let prefix = format!("layer{}.{block}", stage + 1);
                    walk.conv_outputs
                        .push((format!("{prefix}.conv1.weight"), elems as u64));
                    walk.conv_outputs
                        .push((format!("{prefix}.conv2.weight"), elems as u64));
                    if downsample {
                        walk.conv_outputs
                            .push((format!("{prefix}.downsample.0.weight"), elems as u64));
                    }
                    cin = cout;
                }
            }
            // Global mean, then the classifier (matmul, bias).
            map(&mut walk, 512, 1);
            map(&mut walk, w.classes, 2);
        }
        Arch::SmallCnn => {
            let (h, wd) = (w.height, w.width);
            map(&mut walk, 16 * h * wd, maps.conv_bn + maps.relu);
            map(&mut walk, 16 * (h / 2) * (wd / 2), 1);
            map(&mut walk, 32 * (h / 2) * (wd / 2), maps.conv_bn + maps.relu);
            map(&mut walk, 32 * (h / 4) * (wd / 4), 1);
            map(&mut walk, 64, 3);
            map(&mut walk, w.classes, 2);
            walk.conv_outputs
                .push(("conv1.weight".into(), (16 * h * wd) as u64));
            walk.conv_outputs
                .push(("conv2.weight".into(), (32 * (h / 2) * (wd / 2)) as u64));
        }
    }
    // The loss: log-softmax (max, shifted, exp, sum, log, difference) and the pick.
    map(&mut walk, w.classes, 4);
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
            let dense = if config.method == Method::Idkm && config.solver.resolve(n as usize) == Solver::Dense {
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
    let walk = activation_walk(shape.arch, work, TRAIN_MAPS);
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
        let eval_walk = activation_walk(shape.arch, work, EVAL_MAPS);
        let clustered: u64 = specs
            .iter()
            .filter(|s| s.config.is_some())
            .map(|s| s.numel as u64)
            .sum();
        params
            + work.data_bytes
            + optimizer
            + RUNTIME_HEAP
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
        runtime: RUNTIME_HEAP,
        base: BASE_RSS + (RETAINED_CONV_WEIGHTS * (largest_conv * F32) as f64) as u64,
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

/// A rough prediction of the seconds per step with `specs`, given the fp32
/// step's: the clustering's passes over the weights, costed as in the layer
/// benchmark on this project's 2-core machine. Only used to skip
/// configurations that would not finish in a time limit; it goes stale as
/// the passes get faster, and overestimates windowed passes (d = 1, k >= 32
/// at a small tau, which attend to a few dozen centroids, not k).
pub fn predict_seconds(specs: &[ClusterSpec], fp32_seconds: f64) -> f64 {
    let mut s = fp32_seconds;
    for spec in specs {
        let Some(c) = &spec.config else { continue };
        let mk = (spec.numel / c.cluster_dim * c.k()) as f64;
        let t = c.max_iter as f64;
        s += match c.method {
            Method::Dkm => DKM_SECONDS_PER_MK_ITER * mk * (t + 1.0),
            // The fixed point, the output pass, the moments-and-cotangent and
            // gradient passes, and the solve: the dense assembly costs about
            // k d / 8 passes (measured at k d = 16 and 256), a Krylov
            // solver one pass a step (about 35 at tau = 1e-4).
            Method::Idkm => {
                let n = c.k() * c.cluster_dim;
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

// ---------------------------------------------------------------------------
// Budgets
// ---------------------------------------------------------------------------

/// Parses a byte count: `7GiB`, `512MiB`, `8GB`, `1.5G`, `1000000` (bytes).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 7GiB, 512MiB)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "gb" => 1e9,
        "t" | "tib" => 1024.0f64.powi(4),
        "tb" => 1e12,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{text}` (use B, KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    if !(value.is_finite() && value > 0.0) {
        return Err(format!("`{text}` is not a positive size"));
    }
    Ok((value * scale) as u64)
}

/// Bytes for people: MiB below 1 GiB, GiB with two decimals above.
pub fn human(bytes: u64) -> String {
    let mib = bytes as f64 / (1u64 << 20) as f64;
    if mib < 10.0 {
        format!("{mib:.1} MiB")
    } else if bytes < 1 << 30 {
        format!("{mib:.0} MiB")
    } else {
        gib(bytes)
    }
}

/// Bytes in GiB with two decimals.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Checks a run against a memory budget before it starts: `Ok` with the
/// estimate when it fits, otherwise an error message with the prediction
/// and the alternatives that fit (another method, a smaller batch, fewer
/// bits, fewer DKM iterations).
pub fn check_budget(
    shape: &ModelShape,
    specs: &[ClusterSpec],
    work: &Workload,
    budget: u64,
) -> Result<Estimate, String> {
    let est = estimate(shape, specs, work);
    if est.total() <= budget {
        return Ok(est);
    }
    let fits = |specs: &[ClusterSpec], work: &Workload| {
        let e = estimate(shape, specs, work);
        (e.total() <= budget).then_some(e.total())
    };
    let map = |f: &dyn Fn(&KmeansConfig) -> KmeansConfig| -> Vec<ClusterSpec> {
        specs
            .iter()
            .map(|s| ClusterSpec {
                config: s.config.as_ref().map(f),
                ..s.clone()
            })
            .collect()
    };
    let mut ideas: Vec<String> = Vec::new();
    let has_dkm = specs
        .iter()
        .any(|s| s.config.as_ref().is_some_and(|c| c.method == Method::Dkm));
    let clustered = specs.iter().any(|s| s.config.is_some());
    if has_dkm {
        for method in [Method::Idkm, Method::IdkmJfb] {
            let alt = map(&|c| KmeansConfig {
                method,
                ..c.clone()
            });
            if let Some(total) = fits(&alt, work) {
                ideas.push(format!(
                    "--method {method} (same bits and iterations): {}",
                    human(total)
                ));
            }
        }
        let max_t = specs
            .iter()
            .filter_map(|s| s.config.as_ref())
            .map(|c| c.max_iter)
            .max()
            .unwrap_or(1);
        if let Some(t) = (1..max_t).rev().find(|&t| {
            fits(
                &map(&|c| KmeansConfig {
                    max_iter: c.max_iter.min(t),
                    ..c.clone()
                }),
                work,
            )
            .is_some()
        }) {
            let total = fits(
                &map(&|c| KmeansConfig {
                    max_iter: c.max_iter.min(t),
                    ..c.clone()
                }),
                work,
            )
            .unwrap_or(0);
            ideas.push(format!("--max-iter {t} with DKM: {}", human(total)));
        }
        let max_bits = specs
            .iter()
            .filter_map(|s| s.config.as_ref())
            .map(|c| c.bits)
            .max()
            .unwrap_or(1);
        if let Some(b) = (1..max_bits).rev().find(|&b| {
            fits(
                &map(&|c| KmeansConfig {
                    bits: c.bits.min(b),
                    ..c.clone()
                }),
                work,
            )
            .is_some()
        }) {
            let total = fits(
                &map(&|c| KmeansConfig {
                    bits: c.bits.min(b),
                    ..c.clone()
                }),
                work,
            )
            .unwrap_or(0);
            ideas.push(format!("--bits {b} with DKM: {}", human(total)));
        }
    }
    let mut batch = work.batch / 2;
    while batch >= 1 {
        let w = Workload { batch, ..*work };
        if let Some(total) = fits(specs, &w) {
            ideas.push(format!("--batch-size {batch}: {}", human(total)));
            break;
        }
        batch /= 2;
    }
    let mut msg = format!(
        "this run is predicted to need {} at its peak, more than the memory budget of {}",
        human(est.total()),
        human(budget)
    );
    let _ =
        write!(
        msg,
        " (weights {}, gradients {}, optimizer {}, data {}, activations at batch {} {}{}, working set {})",
        human(est.params),
        human(est.grads),
        human(est.optimizer),
        human(est.input),
        work.batch,
        human(est.activations),
        if clustered { format!(", clustering {}", human(est.clustering)) } else { String::new() },
        human(est.transient),
    );
    if est.eval > est.heap() {
        let _ = write!(
            msg,
            "; the evaluation between epochs (batch {}) peaks at {}",
            work.eval_batch,
            human(est.eval + est.base)
        );
    }
    if ideas.is_empty() {
        msg.push_str("; nothing smaller that this model can run fits: raise --memory-budget");
    } else {
        msg.push_str(". These would fit: ");
        msg.push_str(&ideas.join("; "));
    }
    Err(msg)
}

// ---------------------------------------------------------------------------
// The profile: training steps in a fresh process per configuration
// ---------------------------------------------------------------------------

/// One configuration to profile.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepConfig {
    /// Architecture name (`resnet18-cifar`, `resnet18`, `small-cnn`).
    pub arch: String,
    /// Samples per batch.
    pub batch: usize,
    /// `fp32`, `dkm`, `idkm` or `idkm-jfb`.
    pub method: String,
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
    /// How the forward pass reaches the fixed point: `newton` or `plain`.
    #[serde(default = "default_forward")]
    pub forward: String,
    /// Adjoint solver of IDKM.
    pub solver: String,
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
    /// `cpu` or `cuda`.
    pub device: String,
    /// Data set directory for real batches (synthetic when absent).
    pub data: Option<PathBuf>,
    /// Seed of the model, the data and the clustering.
    pub seed: u64,
    /// k-means iterations run on each clustered layer before the warm-up
    /// (no graph), so that the steps start at the fixed point, as the steps
    /// of a long fine-tune do; `None` starts them cold.
    #[serde(default)]
    pub converge_iters: Option<usize>,
}

fn default_forward() -> String {
    Forward::default().to_string()
}

impl StepConfig {
    /// A short label such as `idkm 4-bit t=30` or `fp32`.
    pub fn label(&self) -> String {
        if self.method == "fp32" {
            "fp32".into()
        } else {
            let steady = if self.converge_iters.is_some() { " steady" } else { "" };
            let solve = match self.forward.as_str() {
                "newton" if self.method != "dkm" => "newton".to_string(),
                _ => format!("t={}", self.iters),
            };
            format!("{} {}-bit {solve}{steady}", self.method, self.bits)
        }
    }

    /// The architecture.
    pub fn arch(&self) -> anyhow::Result<Arch> {
        Ok(self.arch.parse()?)
    }

    /// The clustering method, `None` for fp32.
    pub fn method(&self) -> anyhow::Result<Option<Method>> {
        if self.method == "fp32" {
            Ok(None)
        } else {
            Ok(Some(self.method.parse()?))
        }
    }

    /// The clustering configuration of every clustered layer.
    pub fn kmeans(&self) -> anyhow::Result<Option<KmeansConfig>> {
        let Some(method) = self.method()? else {
            return Ok(None);
        };
        let solver: Solver = self.solver.parse()?;
        let config = KmeansConfig {
            bits: self.bits,
            cluster_dim: self.cluster_dim,
            tau: self.tau,
            forward: self.forward.parse()?,
            max_iter: self.iters,
            tol: self.tol,
            method,
            solver,
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
    pub fn workload(&self) -> anyhow::Result<Workload> {
        Ok(Workload::for_arch(self.arch()?, self.batch, self.classes))
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
        Ok(estimate(shape, &self.specs(shape)?, &self.workload()?))
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
    /// Peak bytes counted by [`ProfileAlloc`] over the measured steps (when installed).
    pub peak_counted_bytes: Option<u64>,
    /// The allocator.
    pub allocator: Option<AllocKind>,
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
    /// The allocator the child was asked to use.
    pub allocator: AllocKind,
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

fn synthetic_batch(
    work: &Workload,
    seed: u64,
    device: &Device,
) -> anyhow::Result<(Tensor, Tensor)> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_da7a);
    let n = work.batch * work.channels * work.height * work.width;
    let x: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    let y: Vec<u32> = (0..work.batch)
        .map(|_| rng.random_range(0..work.classes as u32))
        .collect();
    let x = Tensor::from_vec(
        x,
        (work.batch, work.channels, work.height, work.width),
        device,
    )?;
    Ok((x, Tensor::from_vec(y, work.batch, device)?))
}

fn data_batch(
    dir: &Path,
    batch: usize,
    device: &Device,
) -> anyhow::Result<(Tensor, Tensor, usize)> {
    let split = crate::data::load(dir).with_context(|| format!("loading {}", dir.display()))?;
    let mut batches = crate::data::Batcher::new(
        &split.train,
        batch,
        None,
        crate::data::Augment::none(),
        &split.mean,
        &split.std,
        device,
    );
    let (x, y) = batches.next().context("the data set is empty")??;
    Ok((x, y, split.classes))
}

fn adjoint_report(a: Option<Adjoint>) -> (Option<String>, Option<usize>, Option<f64>) {
    match a {
        None => (None, None, None),
        Some(Adjoint::JacobianFree) => (Some("jfb".into()), None, None),
        Some(Adjoint::Solved(r)) => (Some("solved".into()), Some(r.steps), Some(r.rel_residual)),
        Some(Adjoint::BestIterate(r)) => (
            Some("best-iterate".into()),
            Some(r.steps),
            Some(r.rel_residual),
        ),
        Some(Adjoint::FellBackToJfb(r)) => (
            Some("jfb-fallback".into()),
            Some(r.steps),
            Some(r.rel_residual),
        ),
        Some(Adjoint::Reused { .. }) => (Some("reused".into()), Some(0), None),
    }
}

/// Runs each clustered layer's k-means on the model's weights for up to
/// `iters` iterations, without a graph, and makes the result its warm start.
fn converge(model: &Model, clustering: &Clustering, iters: usize) -> anyhow::Result<()> {
    for (name, w) in model.weights() {
        let Some(layer) = clustering.layers().get(&name) else { continue };
        // The fixed point does not depend on the gradient method; DKM's would
        // record every iteration.
        let config = KmeansConfig { max_iter: iters, method: Method::IdkmJfb, ..layer.config().clone() };
        let long = ClusteredWeight::new(name.clone(), config)?;
        long.forward(&w.detach())?;
        let c = long.centroids().with_context(|| format!("no centroids for {name}"))?;
        layer.set_centroids(c)?;
        if let Some(tau) = long.tau() {
            layer.set_tau(tau)?;
        }
    }
    Ok(())
}

/// Runs the configuration's training steps in this process and measures
/// them: what a profile child does. Peaks are of the measured steps (the
/// resident-set peak and the counted peak are reset after the warm-up).
pub fn run_steps(config: &StepConfig) -> anyhow::Result<Measured> {
    let start = Instant::now();
    let device = match config.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => {
            Device::new_cuda(0).context("opening the CUDA device (built with --features cuda?)")?
        }
        other => bail!("unknown device `{other}` (expected cpu or cuda)"),
    };
    let base_rss = current_rss();
    let arch = config.arch()?;
    let mut work = config.workload()?;
    let (x, y) = match &config.data {
        Some(dir) => {
            let (x, y, classes) = data_batch(dir, config.batch, &device)?;
            work.classes = classes;
            (x, y)
        }
        None => synthetic_batch(&work, config.seed, &device)?,
    };
    let model = Model::new(arch, x.dim(1)?, work.classes, config.seed, &device)?;
    let clustering = match config.plan()? {
        Some(plan) => Some(Clustering::new(&model, &plan)?),
        None => None,
    };
    if let (Some(c), Some(iters)) = (&clustering, config.converge_iters) {
        converge(&model, c, iters)?;
    }
    let weights = match &clustering {
        Some(c) => Weights::Clustered(c),
        None => Weights::Float,
    };
    let vars = model.trainable().into_iter().map(|(_, v)| v).collect();
    let sgd = SgdConfig {
        momentum: 0.9,
        nesterov: false,
        weight_decay: 5e-4,
    };
    let mut optimizer = Optimizer::new(OptimizerKind::Sgd(sgd), vars, 0.01)?;
    let mut step = || -> anyhow::Result<(f64, f64)> {
        let t0 = Instant::now();
        let logits = model.forward(&x, true, &weights)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        let grads = loss.backward()?;
        optimizer.step(&grads)?;
        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
        device.synchronize()?;
        Ok((t0.elapsed().as_secs_f64(), value))
    };
    let mut warmup_seconds = Vec::new();
    let mut loss = f64::NAN;
    for _ in 0..config.warmup {
        let (s, l) = step()?;
        warmup_seconds.push(s);
        loss = l;
    }
    let warmup_peak = peak_rss();
    let warmup_counted = counted_peak();
    reset_counted_peak();
    let rss_reset = reset_peak_rss();
    let per_step = warmup_seconds.iter().cloned().fold(0.0, f64::max);
    let left = config.max_seconds - start.elapsed().as_secs_f64();
    let affordable = if per_step > 0.0 {
        (left / per_step).floor().max(0.0) as usize
    } else {
        config.steps
    };
    let measured_steps = config.steps.min(affordable);
    let mut step_seconds = Vec::new();
    for _ in 0..measured_steps {
        let (s, l) = step()?;
        step_seconds.push(s);
        loss = l;
    }
    let warmup_only = step_seconds.is_empty();
    let seconds_per_step = if warmup_only {
        warmup_seconds.iter().sum::<f64>() / warmup_seconds.len().max(1) as f64
    } else {
        step_seconds.iter().sum::<f64>() / step_seconds.len() as f64
    };
    let peak = peak_rss();
    let shape = ModelShape::of(&model);
    let layers = match &clustering {
        None => Vec::new(),
        Some(c) => clustering_specs(&shape, c)
            .into_iter()
            .filter_map(|s| {
                let cfg = s.config.as_ref()?;
                let layer = c.layers().get(&s.name)?;
                let (kept, transient) = layer_bytes(s.numel, cfg);
                let (adjoint, solver_steps, residual) = adjoint_report(layer.last_adjoint());
                let forward = layer.last_forward();
                Some(LayerReport {
                    name: s.name.clone(),
                    numel: s.numel,
                    kept_bytes: kept,
                    transient_bytes: transient,
                    forward_iters: forward.map(|r| r.iterations),
                    forward_passes: forward.map(|r| r.weight_passes + r.bin_passes),
                    forward_distance: forward.map(|r| r.distance).filter(|d| d.is_finite()),
                    forward_cond: forward.and_then(|r| r.cond),
                    distinct: forward.map(|r| r.distinct),
                    tau: layer.tau(),
                    forward_fallbacks: forward.map(|r| r.plain_steps),
                    adjoint,
                    solver_steps,
                    residual,
                })
            })
            .collect(),
    };
    Ok(Measured {
        warmup_seconds,
        step_seconds,
        seconds_per_step,
        warmup_only,
        // With only the warm-up, its peak; without a reset, the process's.
        peak_rss_bytes: if rss_reset && warmup_only { warmup_peak } else { peak },
        peak_rss_warmup_bytes: warmup_peak,
        base_rss_bytes: base_rss,
        peak_counted_bytes: counting_installed()
            .then(|| if warmup_only { warmup_counted } else { counted_peak() } as u64),
        allocator: counting_installed().then(allocator),
        loss,
        layers,
    })
}

/// The line prefix of a child's result on its standard output.
pub const RESULT_PREFIX: &str = "IDKM_PROFILE_RESULT ";

/// The child's side: limits its memory to `limit_bytes` (counted when
/// [`ProfileAlloc`] is installed, and its address space with some slack),
/// runs the steps and prints the result line. Returns the process exit code.
pub fn child_main(config: &StepConfig, limit_bytes: Option<u64>) -> i32 {
    if let Some(limit) = limit_bytes {
        set_counted_limit(limit as usize);
        // Address space is more than resident memory (thread stacks, arenas,
        // reserved but untouched pages): generous slack, a backstop only.
        let _ = limit_address_space(limit + limit / 2 + (4 << 30));
    }
    let result = run_steps(config);
    let outcome = match result {
        Ok(m) => Outcome::Measured(m),
        Err(e) => Outcome::Failed {
            reason: format!("{e:#}"),
        },
    };
    let ok = matches!(outcome, Outcome::Measured(_));
    match serde_json::to_string(&outcome) {
        Ok(line) => println!("{RESULT_PREFIX}{line}"),
        Err(e) => eprintln!("cannot encode the result: {e}"),
    }
    if ok {
        0
    } else {
        1
    }
}

/// Runs `command` (a child that calls [`child_main`]) with a wall-clock
/// limit and reads its outcome. A child that dies (killed by the kernel,
/// aborted on a refused allocation) or runs out of time is a `Failed`
/// outcome with the reason and the end of its standard error.
pub fn run_child(mut command: std::process::Command, timeout: Duration) -> Outcome {
    use std::io::Read;
    use std::process::Stdio;
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Outcome::Failed {
                reason: format!("cannot start the child: {e}"),
            }
        }
    };
    // Drain both pipes on threads so that a chatty child cannot block.
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => {
                return Outcome::Failed {
                    reason: format!("waiting for the child: {e}"),
                }
            }
        }
    };
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    let tail: String = {
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(3)..].join(" | ")
    };
    if let Some(line) = stdout.lines().find_map(|l| l.strip_prefix(RESULT_PREFIX)) {
        return match serde_json::from_str::<Outcome>(line) {
            Ok(o) => o,
            Err(e) => Outcome::Failed {
                reason: format!("unreadable child result ({e}): {line}"),
            },
        };
    }
    let reason = match status {
        None => format!(
            "ran past the time limit of {:.0} s and was stopped",
            timeout.as_secs_f64()
        ),
        Some(s) => {
            use std::os::unix::process::ExitStatusExt;
            match s.signal() {
                Some(9) => "killed (SIGKILL: out of memory?)".to_string(),
                Some(6) => {
                    "aborted (an allocation beyond the memory limit was refused?)".to_string()
                }
                Some(sig) => format!("killed by signal {sig}"),
                None => format!("exited with {s}"),
            }
        }
    };
    Outcome::Failed {
        reason: if tail.is_empty() {
            reason
        } else {
            format!("{reason}: {tail}")
        },
    }
}

/// Runs `configs` (each with the allocator its child is asked to use) one
/// after another, each in a fresh process that `command` builds (a child
/// calling [`child_main`] with the limit it is given). A configuration whose
/// predicted peak exceeds `budget` is not started (`DoesNotFit`), nor one
/// whose predicted time (from an fp32 row measured before it and
/// [`predict_seconds`]) for its warm-up and measured steps exceeds
/// `timeout` seconds (`TooSlow`); a child past `timeout` is stopped.
/// `report` sees each record as it is made.
pub fn profile(
    shape: &ModelShape,
    configs: &[(StepConfig, AllocKind)],
    budget: u64,
    timeout: f64,
    mut command: impl FnMut(&StepConfig, AllocKind, u64) -> anyhow::Result<std::process::Command>,
    mut report: impl FnMut(&Record),
) -> anyhow::Result<Vec<Record>> {
    let mut records: Vec<Record> = Vec::new();
    for (config, alloc) in configs {
        let alloc = *alloc;
        let specs = config.specs(shape)?;
        let predicted = estimate(shape, &specs, &config.workload()?);
        let fp32_seconds = records
            .iter()
            .filter(|r| r.config.method == "fp32" && r.config.batch == config.batch)
            .filter_map(|r| {
                r.measured()
                    .map(|m| (r.allocator == alloc, m.seconds_per_step))
            })
            .max_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, s)| s);
        let seconds = fp32_seconds.map(|s| predict_seconds(&specs, s));
        let outcome = if predicted.total() > budget {
            Outcome::DoesNotFit {
                budget_bytes: budget,
            }
        } else if let Some(s) =
            seconds.filter(|s| s * (config.warmup + config.steps) as f64 * 1.1 > timeout)
        {
            Outcome::TooSlow {
                predicted_seconds: s,
                limit_seconds: timeout,
            }
        } else {
            tracing::info!(config = %config.label(), allocator = %alloc, predicted = %gib(predicted.total()), "running");
            let mut config = config.clone();
            config.max_seconds = timeout * 0.8;
            run_child(
                command(&config, alloc, budget)?,
                Duration::from_secs_f64(timeout),
            )
        };
        let record = Record {
            config: config.clone(),
            allocator: alloc,
            predicted,
            outcome,
        };
        report(&record);
        records.push(record);
    }
    Ok(records)
}

// ---------------------------------------------------------------------------
// Output: table, JSON, plots
// ---------------------------------------------------------------------------

fn mib(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / (1u64 << 20) as f64)
}

/// The row of [`table`] for one record, as printed when its configuration
/// has finished.
pub fn table_row(record: &Record) -> String {
    table(std::slice::from_ref(record)).lines().last().unwrap_or("").to_string()
}

/// The records as a Markdown table (also readable on a terminal): method,
/// bits, t, allocator, seconds per step, measured peak RSS and counted
/// peak, prediction and its error, ratios to the fp32 row of the same
/// allocator, solver steps.
pub fn table(records: &[Record]) -> String {
    let fp32 = |alloc: AllocKind| {
        records
            .iter()
            .find(|r| r.config.method == "fp32" && r.allocator == alloc)
            .and_then(|r| r.measured().cloned())
    };
    let mut s = String::new();
    s.push_str("| config | alloc | s/step | peak RSS MiB | counted MiB | predicted MiB | error | x fp32 mem | x fp32 time | k-means iters | solver steps (max) | worst residual |\n");
    s.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in records {
        let label = r.config.label();
        let pred = mib(r.predicted.total());
        match &r.outcome {
            Outcome::Measured(m) => {
                let rss = m.peak_rss_bytes.map(mib).unwrap_or_else(|| "?".into());
                let counted = m.peak_counted_bytes.map(mib).unwrap_or_else(|| "-".into());
                let err = r
                    .rss_error()
                    .map(|e| format!("{:+.1}%", 100.0 * e))
                    .unwrap_or_else(|| "-".into());
                let base = fp32(r.allocator);
                let xmem = match (&base, m.peak_rss_bytes) {
                    (Some(b), Some(p)) if r.config.method != "fp32" => b
                        .peak_rss_bytes
                        .map(|b| format!("{:.2}", p as f64 / b as f64))
                        .unwrap_or_else(|| "-".into()),
                    _ => "-".into(),
                };
                let xtime = match &base {
                    Some(b) if r.config.method != "fp32" => {
                        format!("{:.2}", m.seconds_per_step / b.seconds_per_step)
                    }
                    _ => "-".into(),
                };
                let secs = if m.warmup_only {
                    format!("{:.1} (warm-up)", m.seconds_per_step)
                } else {
                    format!("{:.1}", m.seconds_per_step)
                };
                let iters = {
                    let it: Vec<usize> = m.layers.iter().filter_map(|l| l.forward_iters).collect();
                    match (it.iter().min(), it.iter().max()) {
                        (Some(a), Some(b)) if a == b => a.to_string(),
                        (Some(a), Some(b)) => format!("{a}-{b}"),
                        _ => "-".into(),
                    }
                };
                let steps = m
                    .layers
                    .iter()
                    .filter_map(|l| l.solver_steps)
                    .max()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into());
                let resid = m
                    .layers
                    .iter()
                    .filter_map(|l| l.residual)
                    .fold(None, |a: Option<f64>, r| Some(a.map_or(r, |a| a.max(r))))
                    .map(|r| format!("{r:.1e}"))
                    .unwrap_or_else(|| "-".into());
                let _ = writeln!(
                    s,
                    "| {label} | {} | {secs} | {rss} | {counted} | {pred} | {err} | {xmem} | {xtime} | {iters} | {steps} | {resid} |",
                    r.allocator
                );
            }
            Outcome::DoesNotFit { budget_bytes } => {
                let _ = writeln!(
                    s,
                    "| {label} | {} | does not fit (predicted {}, budget {}) | - | - | {pred} | - | - | - | - | - | - |",
                    r.allocator,
                    gib(r.predicted.total()),
                    gib(*budget_bytes)
                );
            }
            Outcome::TooSlow {
                predicted_seconds,
                limit_seconds,
            } => {
                let _ = writeln!(
                    s,
                    "| {label} | {} | not run: ~{:.0} s per step predicted, over the {:.0} s limit | - | - | {pred} | - | - | - | - | - | - |",
                    r.allocator, predicted_seconds, limit_seconds
                );
            }
            Outcome::Failed { reason } => {
                let reason = reason.replace('|', "/");
                let _ = writeln!(
                    s,
                    "| {label} | {} | failed: {reason} | - | - | {pred} | - | - | - | - | - | - |",
                    r.allocator
                );
            }
        }
    }
    s
}

/// Per clustered layer of each measured record: predicted extra bytes,
/// forward iterations, solver steps and residual (Markdown).
pub fn layer_table(records: &[Record]) -> String {
    let mut s = String::from("| config | layer | weights | kept MiB (pred.) | in-flight MiB (pred.) | tau | k-means iters | passes | distance | cond | distinct | fallbacks | adjoint | solver steps | residual |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|\n");
    let opt = |x: Option<String>| x.unwrap_or_else(|| "-".into());
    for r in records {
        let Some(m) = r.measured() else { continue };
        for l in &m.layers {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.config.label(),
                l.name,
                l.numel,
                l.kept_bytes as f64 / (1u64 << 20) as f64,
                l.transient_bytes as f64 / (1u64 << 20) as f64,
                opt(l.tau.map(|t| format!("{t:.2e}"))),
                opt(l.forward_iters.map(|i| i.to_string())),
                opt(l.forward_passes.map(|i| i.to_string())),
                opt(l.forward_distance.map(|x| format!("{x:.1e}"))),
                opt(l.forward_cond.map(|x| format!("{x:.0}"))),
                opt(l.distinct.map(|x| x.to_string())),
                opt(l.forward_fallbacks.map(|x| x.to_string())),
                l.adjoint.as_deref().unwrap_or("-"),
                l.solver_steps
                    .map(|i| i.to_string())
                    .unwrap_or_else(|| "-".into()),
                l.residual
                    .map(|r| format!("{r:.1e}"))
                    .unwrap_or_else(|| "-".into()),
            );
        }
    }
    s
}

/// Which quantity a plot shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlotKind {
    /// Peak resident set (measured; predicted where a configuration did not fit).
    Memory,
    /// Seconds per step.
    Time,
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // DejaVu Sans, embedded by the `dejavu` crate: no system fonts.
        let _ = plotters::style::register_font(
            "sans-serif",
            plotters::style::FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// Writes `<stem>.svg` and `<stem>.png`: peak memory (or step time) against
/// t, one line per method and bit width, with the fp32 step as a dashed
/// reference line. Configurations predicted not to fit appear as hollow
/// markers at their predicted peak (memory plot only). Only the records of
/// the first record's allocator are drawn.
pub fn write_plot(
    records: &[Record],
    kind: PlotKind,
    stem: &Path,
    title: &str,
) -> anyhow::Result<()> {
    register_font();
    let primary = records.first().map(|r| r.allocator);
    let records: Vec<Record> = records
        .iter()
        .filter(|r| Some(r.allocator) == primary)
        .cloned()
        .collect();
    let records = records.as_slice();
    let svg = stem.with_extension("svg");
    let png = stem.with_extension("png");
    {
        let root = plotters::backend::SVGBackend::new(&svg, (900, 580));
        draw(records, kind, title, root).with_context(|| format!("drawing {}", svg.display()))?;
    }
    let (w, h) = (900u32, 580u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = plotters::backend::BitMapBackend::with_buffer(&mut buf, (w, h));
        draw(records, kind, title, root).with_context(|| format!("drawing {}", png.display()))?;
    }
    let file =
        std::fs::File::create(&png).with_context(|| format!("creating {}", png.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()?.write_image_data(&buf)?;
    Ok(())
}

/// Ticks at 1, 2 and 5 times the powers of ten within `lo..hi`.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let v = decade * m;
            if v >= lo && v <= hi {
                ticks.push(v);
            }
        }
        decade *= 10.0;
    }
    ticks
}

fn draw<DB: plotters::prelude::DrawingBackend>(
    records: &[Record],
    kind: PlotKind,
    title: &str,
    backend: DB,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    use plotters::coord::combinators::BindKeyPoints;
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("{e}");
    let root = backend.into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (_, height) = root.dim_in_pixel();
    let (upper, lower) = root.split_vertically(height - 28);
    // (value, measured): memory plots also show the model's prediction for
    // what was not run.
    let value = |r: &Record| -> Option<(f64, bool)> {
        match (&r.outcome, kind) {
            (Outcome::Measured(m), PlotKind::Memory) => m
                .peak_rss_bytes
                .map(|b| (b as f64 / (1u64 << 30) as f64, true)),
            (Outcome::Measured(m), PlotKind::Time) => Some((m.seconds_per_step, true)),
            (Outcome::DoesNotFit { .. } | Outcome::TooSlow { .. }, PlotKind::Memory) => {
                Some((r.predicted.total() as f64 / (1u64 << 30) as f64, false))
            }
            _ => None,
        }
    };
    let points: Vec<f64> = records
        .iter()
        .filter_map(|r| value(r).map(|(v, _)| v))
        .collect();
    if points.is_empty() {
        bail!("nothing to plot");
    }
    let (lo, hi) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let (lo, hi) = ((lo * 0.7).max(1e-3), hi * 1.6);
    let mut ts: Vec<usize> = records
        .iter()
        .filter(|r| r.config.method != "fp32")
        .map(|r| r.config.iters)
        .collect();
    ts.sort_unstable();
    ts.dedup();
    let t_max = ts.last().copied().unwrap_or(30) as f64;
    let y_desc = match kind {
        PlotKind::Memory => "peak resident memory (GiB, log scale)",
        PlotKind::Time => "seconds per training step (log scale)",
    };
    let x_range = (0.8f64..t_max * 1.3)
        .log_scale()
        .with_key_points(ts.iter().map(|&t| t as f64).collect());
    let y_range = (lo..hi).log_scale().with_key_points(log_ticks(lo, hi));
    let mut chart = ChartBuilder::on(&upper)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range, y_range)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("k-means iterations per forward pass (t, log scale)")
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .light_line_style(RGBColor(240, 240, 240))
        .bold_line_style(RGBColor(210, 210, 210))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| {
            if *y >= 10.0 {
                format!("{y:.0}")
            } else {
                format!("{y}")
            }
        })
        .draw()
        .map_err(|e| err(&e))?;
    let colour = |method: &str| match method {
        "dkm" => RGBColor(214, 39, 40),
        "idkm" => RGBColor(31, 119, 180),
        "idkm-jfb" => RGBColor(44, 160, 44),
        _ => RGBColor(90, 90, 90),
    };
    // Methods side by side where their points coincide (same t).
    let nudge = |method: &str, bits: u32| {
        let step = if bits >= 8 { 0.08 } else { 0.04 };
        match method {
            "idkm" => 1.0 - step,
            "idkm-jfb" => 1.0 + step,
            _ => 1.0,
        }
    };
    for r in records.iter().filter(|r| r.config.method == "fp32") {
        if let Some((v, true)) = value(r) {
            let style = ShapeStyle::from(&BLACK).stroke_width(2);
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(0.8, v), (t_max * 1.3, v)],
                    8,
                    6,
                    style,
                ))
                .map_err(|e| err(&e))?
                .label("fp32 step")
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2))
                });
        }
    }
    let mut keys: Vec<(String, u32)> = Vec::new();
    // Steady-state rows share t with the cold ones: the table has them.
    for r in records.iter().filter(|r| r.config.method != "fp32" && r.config.converge_iters.is_none()) {
        let key = (r.config.method.clone(), r.config.bits);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    let mut any_predicted = false;
    let mut drawn: Vec<(f64, f64)> = Vec::new();
    for (method, bits) in keys {
        let c = colour(&method);
        let k = nudge(&method, bits);
        let mut pts: Vec<(f64, f64, bool)> = records
            .iter()
            .filter(|r| r.config.method == method && r.config.bits == bits && r.config.converge_iters.is_none())
            .filter_map(|r| value(r).map(|(v, ran)| (r.config.iters as f64 * k, v, ran)))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        if pts.is_empty() {
            continue;
        }
        let width = if bits >= 8 { 1 } else { 3 };
        let measured: Vec<(f64, f64)> = pts.iter().filter(|p| p.2).map(|p| (p.0, p.1)).collect();
        let predicted: Vec<(f64, f64)> = pts.iter().filter(|p| !p.2).map(|p| (p.0, p.1)).collect();
        let big = bits >= 8;
        drawn.extend(pts.iter().map(|p| (p.0, p.1)));
        chart
            .draw_series(LineSeries::new(
                measured.clone(),
                ShapeStyle::from(&c).stroke_width(width),
            ))
            .map_err(|e| err(&e))?
            .label(format!("{method} {bits}-bit"))
            .legend(move |(x, y)| {
                let line = PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(width));
                let mark: DynElement<_, _> = if big {
                    TriangleMarker::new((x + 10, y), 6, c.filled()).into_dyn()
                } else {
                    Circle::new((x + 10, y), 4, c.filled()).into_dyn()
                };
                EmptyElement::at((0, 0)) + line + mark
            });
        let marker = |(x, y): (f64, f64), filled: bool| -> DynElement<'static, DB, (f64, f64)> {
            let style = if filled {
                ShapeStyle::from(&c).filled()
            } else {
                ShapeStyle::from(&c).stroke_width(1)
            };
            if big {
                if filled {
                    TriangleMarker::new((x, y), 7, style).into_dyn()
                } else {
                    // plotters fills triangles whatever the style: a cross instead.
                    Cross::new((x, y), 6, style.stroke_width(2)).into_dyn()
                }
            } else {
                Circle::new((x, y), 5, style).into_dyn()
            }
        };
        chart
            .draw_series(measured.iter().map(|&p| marker(p, true)))
            .map_err(|e| err(&e))?;
        if !predicted.is_empty() {
            any_predicted = true;
            let mut line = measured.last().cloned().into_iter().collect::<Vec<_>>();
            line.extend(predicted.iter().cloned());
            if line.len() > 1 {
                chart
                    .draw_series(DashedLineSeries::new(
                        line,
                        4,
                        5,
                        ShapeStyle::from(&c).stroke_width(1),
                    ))
                    .map_err(|e| err(&e))?;
            }
            chart
                .draw_series(predicted.iter().map(|&p| marker(p, false)))
                .map_err(|e| err(&e))?;
        }
    }
    // The legend takes about the top third and a quarter of the width: it
    // goes in the upper corner that hides fewer points.
    let hidden = |left: bool| {
        let at = |v: f64, lo: f64, hi: f64| (v / lo).ln() / (hi / lo).ln();
        let in_corner = |&&(x, y): &&(f64, f64)| {
            let fx = at(x, 0.8, t_max * 1.3);
            at(y, lo, hi) > 0.6 && if left { fx < 0.3 } else { fx > 0.7 }
        };
        drawn.iter().filter(in_corner).count()
    };
    let corner = if hidden(true) <= hidden(false) {
        SeriesLabelPosition::UpperLeft
    } else {
        SeriesLabelPosition::UpperRight
    };
    chart
        .configure_series_labels()
        .position(corner)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    if any_predicted {
        lower
            .draw(&Text::new(
                "hollow circles and crosses: predicted by the memory model, not run (over the memory budget or the time limit)",
                (84, 4),
                ("sans-serif", 13),
            ))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Writes `<dir>/<name>.json` (the records), `<name>.md` (the tables) and
/// the memory and time plots (`<name>-memory.{svg,png}`, `<name>-time.{svg,png}`).
/// Returns the paths written.
pub fn write_outputs(
    records: &[Record],
    dir: &Path,
    name: &str,
    title: &str,
    command: &str,
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    let json = dir.join(format!("{name}.json"));
    let doc = serde_json::json!({ "command": command, "records": records });
    let text = serde_json::to_string_pretty(&doc)?;
    crate::io::write_atomic(&json, |tmp| std::fs::write(tmp, &text))?;
    written.push(json);
    let md = dir.join(format!("{name}.md"));
    let text = format!(
        "{title}\n\n`{command}`\n\n{}\n{}",
        table(records),
        layer_table(records)
    );
    crate::io::write_atomic(&md, |tmp| std::fs::write(tmp, &text))?;
    written.push(md);
    for (kind, suffix, what) in [
        (PlotKind::Memory, "memory", "peak memory"),
        (PlotKind::Time, "time", "step time"),
    ] {
        let stem = dir.join(format!("{name}-{suffix}"));
        match write_plot(records, kind, &stem, &format!("{title}: {what}")) {
            Ok(()) => {
                written.push(stem.with_extension("svg"));
                written.push(stem.with_extension("png"));
            }
            Err(e) => tracing::warn!("no {what} plot: {e:#}"),
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("7GiB").unwrap(), 7 << 30);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("8GB").unwrap(), 8_000_000_000);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert!(parse_bytes("7 parsecs").unwrap_err().contains("unit"));
        assert!(parse_bytes("-3G").is_err());
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
