//! Memory of a training step: a model that predicts its peak from the
//! model's shapes and the clustering config, and what the operating system
//! reports of this process's memory. The profile runner that measures steps
//! against the model is [`crate::profile`]; the counting allocator is
//! [`crate::alloc`].
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

mod budget;
mod model;
mod procfs;

pub use budget::{check_budget, gib, human, parse_bytes};
pub use model::{
    clustering_specs, estimate, float_specs, layer_bytes, plan_specs, predict_seconds,
    storage_bytes, ClusterSpec, Estimate, LayerEstimate, ModelShape, Workload,
};
pub use procfs::{available_memory, current_rss, limit_address_space, peak_rss, reset_peak_rss};
