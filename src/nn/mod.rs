//! CPU training ops with their own backward, used by every model in the
//! crate: 2-D convolution as im2col + GEMM ([`conv2d`]) and training-mode
//! batch norm fused with the ReLU and residual add that follow it
//! ([`batch_norm_train`]). On other devices and dtypes they fall back to
//! candle's own ops, which are also their reference in the tests
//! ([`conv2d_reference`], candle-nn's `BatchNorm`).

mod batch_norm;
mod conv;
pub mod gemm;
pub mod im2col;

pub use batch_norm::{batch_norm_train, Activation, BatchNormTrain, BatchStats};
pub use conv::{conv2d, conv2d_reference, Conv2d, Conv2dParams};

/// The float types the CPU ops run on (f32, f64), with the conversions
/// their f64 reductions need.
pub trait Float: candle_core::WithDType + num_traits::Float + Send + Sync + 'static {
    /// The value as f64.
    fn wide(self) -> f64;
    /// The f64 value rounded to this type.
    fn narrow(v: f64) -> Self;
}

impl Float for f32 {
    fn wide(self) -> f64 {
        self as f64
    }
    fn narrow(v: f64) -> Self {
        v as f32
    }
}

impl Float for f64 {
    fn wide(self) -> f64 {
        self
    }
    fn narrow(v: f64) -> Self {
        v
    }
}

/// Runs `f` on the contiguous data of the CPU tensor `t`; `op` names the
/// caller in the error for a tensor on another device or not contiguous.
fn cpu_data<T: Float, R>(
    op: &str,
    t: &candle_core::Tensor,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("{op}: expected a CPU tensor, got {:?}", t.device())
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: expected a contiguous tensor")
    };
    f(&T::cpu_storage_as_slice(cpu)?[start..end])
}
