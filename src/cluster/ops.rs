//! candle `CustomOp`s around the streaming passes: the fixed-point iteration
//! (no graph), the soft-clustered output with its implicit backward, and the
//! hard assignment. `cpu_fwd` runs the CPU twins of `streaming`; with the
//! `cuda` feature, `cuda_fwd` runs their CUDA kernels (f32 only) through the
//! launchers of `cuda`.

use super::backward::{implicit_backward, Adjoint, BackwardConfig};
use super::binned;
use super::streaming::{self as pass, Geometry, Real};
use crate::error::Error;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex};

#[cfg(feature = "cuda")]
use super::cuda;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

/// The contiguous slice of a storage under `layout`.
fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

/// Wraps a twin's output as CPU storage.
fn storage<T: candle_core::WithDType>(v: Vec<T>) -> CpuStorage {
    T::to_cpu_storage_owned(v)
}

/// Error for dtype combinations the passes do not run on.
fn unsupported(op: &str, s: &CpuStorage) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{op}: clustering runs on f32 or f64 weights of one dtype, got {:?}",
        s.dtype()
    ))
}

/// Dispatches `$body` with `$w`, `$c` bound to f32 or f64 slices.
macro_rules! with_float {
    ($op:expr, ($s1:expr, $l1:expr, $w:ident), ($s2:expr, $l2:expr, $c:ident), $body:expr) => {
        match ($s1, $s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                let $w = contiguous(a, $l1, $op)?;
                let $c = contiguous(b, $l2, $op)?;
                $body
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                let $w = contiguous(a, $l1, $op)?;
                let $c = contiguous(b, $l2, $op)?;
                $body
            }
            (s, _) => Err(unsupported($op, s)),
        }
    };
}

/// The first non-finite value of `w`, as an error naming the tensor.
fn check_finite<T: Real>(w: &[T], tensor: &str) -> Result<()> {
    match w.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(index) => Err(Error::NonFinite {
            tensor: tensor.to_string(),
            index,
            value: w[index].wide(),
        }
        .into()),
    }
}

/// What one forward fixed-point iteration did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FixedPointReport {
    /// k-means steps run.
    pub steps: usize,
    /// Largest centroid move in the last step.
    pub shift: f64,
}

/// `(W [m, d], C0 [k, d]) -> C* [k, d]`: k-means steps until convergence,
/// without a graph. Also rejects non-finite weights. On the CPU, all steps
/// but the last run on bins of scalar weights where that pays (see
/// [`binned`]); on CUDA every step runs on the weights.
pub struct FixedPoint {
    /// Name of the weight tensor, for errors and logs.
    pub tensor: String,
    /// Problem geometry.
    pub geo: Geometry,
    /// Maximum steps.
    pub max_iter: usize,
    /// Stop when no centroid moves more than this (absolute; the layer scales
    /// its relative tolerance by the spread of the weights).
    pub tol: f64,
    /// Filled by the forward pass.
    pub report: Mutex<Option<FixedPointReport>>,
}

impl FixedPoint {
    fn run<T: Real>(&self, w: &[T], c0: &[T]) -> Result<Vec<T>> {
        check_finite(w, &self.tensor)?;
        let (c, steps, shift) = binned::fixed_point(w, c0, &self.geo, self.max_iter, self.tol);
        *self.report.lock().expect("report lock") = Some(FixedPointReport { steps, shift });
        Ok(c)
    }
}

impl CustomOp2 for FixedPoint {
    fn name(&self) -> &'static str {
        "kmeans-fixed-point"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = l2.shape().clone();
        let out = with_float!(self.name(), (s1, l1, w), (s2, l2, c), {
            self.run(w, c).map(storage)
        })?;
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = s1.device();
        let (m, d) = l1.shape().dims2()?;
        let w = cuda::view_f32(self.name(), &self.tensor, "weights", s1, l1)?;
        let c0 = cuda::view_f32(self.name(), &self.tensor, "initial centroids", s2, l2)?;
        let p = cuda::Problem::new(m, d, &self.geo)?;
        cuda::check_finite(dev, &w, &self.tensor)?;
        let (c, steps, shift) = cuda::fixed_point(dev, &p, &w, &c0, self.max_iter, self.tol)?;
        *self.report.lock().expect("report lock") = Some(FixedPointReport { steps, shift });
        Ok((CudaStorage::wrap_cuda_slice(c, dev.clone()), l2.shape().clone()))
    }
}

/// `(W [m, d], C* [k, d]) -> Wt = A(C*, W) C* [m, d]`, whose backward is the
/// implicit (or Jacobian-free) gradient with respect to W. C* is a constant
/// of the graph: the gradient through it is what the adjoint accounts for.
#[derive(Clone)]
pub struct SoftAssign {
    /// Name of the weight tensor, for logs.
    pub tensor: Arc<str>,
    /// Problem geometry.
    pub geo: Geometry,
    /// Backward settings.
    pub backward: BackwardConfig,
    /// Filled by each backward pass.
    pub adjoint: Arc<Mutex<Option<Adjoint>>>,
}

impl CustomOp2 for SoftAssign {
    fn name(&self) -> &'static str {
        "kmeans-soft-assign"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = l1.shape().clone();
        let out = with_float!(self.name(), (s1, l1, w), (s2, l2, c), {
            let mut out = vec![Real::of(0.0); w.len()];
            pass::soft_assign_output(w, c, &self.geo, &mut out);
            Ok(storage(out))
        })?;
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = s1.device();
        let (m, d) = l1.shape().dims2()?;
        let w = cuda::view_f32(self.name(), &self.tensor, "weights", s1, l1)?;
        let c = cuda::view_f32(self.name(), &self.tensor, "centroids", s2, l2)?;
        let p = cuda::Problem::new(m, d, &self.geo)?;
        // SAFETY: soft_assign_output writes every element.
        let mut out = unsafe { dev.alloc::<f32>(m * d) }?;
        cuda::soft_assign_output(dev, &p, &w, &c, &mut out)?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), l1.shape().clone()))
    }

    fn bwd(&self, w: &Tensor, c: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let gw = w.apply_op3_no_bwd(c, &grad, &ImplicitGrad(self.clone()))?;
        Ok((Some(gw), None))
    }
}

/// `(W [m, d], C* [k, d], g [m, d]) -> dL/dW [m, d]`: the streaming backward.
pub struct ImplicitGrad(pub SoftAssign);

impl CustomOp3 for ImplicitGrad {
    fn name(&self) -> &'static str {
        "kmeans-implicit-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = &self.0;
        let run = |adjoint: Adjoint| *op.adjoint.lock().expect("adjoint lock") = Some(adjoint);
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(w), CpuStorage::F32(c), CpuStorage::F32(g)) => {
                let (w, c, g) = (contiguous(w, l1, self.name())?, contiguous(c, l2, self.name())?, contiguous(g, l3, self.name())?);
                let mut out = vec![0f32; w.len()];
                run(implicit_backward(w, c, g, &op.geo, &op.backward, &op.tensor, &mut out));
                storage(out)
            }
            (CpuStorage::F64(w), CpuStorage::F64(c), CpuStorage::F64(g)) => {
                let (w, c, g) = (contiguous(w, l1, self.name())?, contiguous(c, l2, self.name())?, contiguous(g, l3, self.name())?);
                let mut out = vec![0f64; w.len()];
                run(implicit_backward(w, c, g, &op.geo, &op.backward, &op.tensor, &mut out));
                storage(out)
            }
            (s, _, _) => return Err(unsupported(self.name(), s)),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = &self.0;
        let dev = s1.device();
        let (m, d) = l1.shape().dims2()?;
        let w = cuda::view_f32(self.name(), &op.tensor, "weights", s1, l1)?;
        let c = cuda::view_f32(self.name(), &op.tensor, "centroids", s2, l2)?;
        let g = cuda::view_f32(self.name(), &op.tensor, "upstream gradient", s3, l3)?;
        let p = cuda::Problem::new(m, d, &op.geo)?;
        let (out, adjoint) = cuda::implicit_backward(dev, &p, &w, &c, &g, &op.backward, &op.tensor)?;
        *op.adjoint.lock().expect("adjoint lock") = Some(adjoint);
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), l1.shape().clone()))
    }
}

/// `(W [m, d], C [k, d]) -> indices [m]` (u32): the nearest centroid of each vector.
pub struct HardAssign;

impl CustomOp2 for HardAssign {
    fn name(&self) -> &'static str {
        "kmeans-hard-assign"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, d) = l1.shape().dims2()?;
        let out = with_float!(self.name(), (s1, l1, w), (s2, l2, c), {
            let mut out = vec![0u32; m];
            pass::hard_assign(w, c, d, &mut out);
            Ok(storage(out))
        })?;
        Ok((out, Shape::from(m)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = s1.device();
        let (m, d) = l1.shape().dims2()?;
        let (k, dc) = l2.shape().dims2()?;
        if dc != d {
            candle_core::bail!("{}: weights of dimension {d} and centroids of dimension {dc}", self.name());
        }
        let w = cuda::view_f32(self.name(), "", "weights", s1, l1)?;
        let c = cuda::view_f32(self.name(), "", "centroids", s2, l2)?;
        let p = cuda::Problem::shape(m, k, d)?;
        // SAFETY: hard_assign writes every element.
        let mut out = unsafe { dev.alloc::<u32>(m.max(1)) }?;
        cuda::hard_assign(dev, &p, &w, &c, &mut out)?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(m)))
    }
}
