//! candle `CustomOp`s around the streaming passes: the fixed-point iteration
//! (no graph), the soft-clustered output with its implicit backward, and the
//! hard assignment. `cpu_fwd` runs the CPU twins of `streaming`; with the
//! `cuda` feature, `cuda_fwd` runs their CUDA kernels (f32 only) through the
//! launchers of `cuda`.

use super::backward::{implicit_backward, Adjoint, AdjointLog, BackwardConfig};
use super::binned;
use super::config::Forward;
use super::forward::{self, ForwardFactor};
use super::newton::{self, ForwardReport};
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

/// `(W [m, d], C0 [k, d]) -> C* [k, d]`: the k-means fixed point from `C0`,
/// without a graph (see [`Forward`]). Also rejects non-finite weights. On
/// the CPU, passes run on bins of scalar weights where that pays (see
/// [`binned`]); on CUDA every pass runs on the weights. Newton leaves the
/// factorisation of its last iteration in `factor` for the backward.
pub struct FixedPoint {
    /// Name of the weight tensor, for errors and logs.
    pub tensor: String,
    /// Problem geometry.
    pub geo: Geometry,
    /// How the fixed point is reached.
    pub forward: Forward,
    /// Maximum iterations.
    pub max_iter: usize,
    /// Stopping tolerance (absolute; the layer scales its relative
    /// tolerance by the spread of the weights).
    pub tol: f64,
    /// The spread of the weights, for the report's relative figures.
    pub spread: f64,
    /// Filled by the forward pass.
    pub report: Mutex<Option<ForwardReport>>,
    /// Filled when the solve failed on non-finite values (what failed).
    pub failure: Mutex<Option<String>>,
    /// Filled by a Newton forward pass on the CPU, for the backward; the
    /// previous one is the first matrix of a warm start.
    pub factor: Arc<Mutex<Option<ForwardFactor>>>,
    /// Whether the backward will solve the adjoint system with the dense
    /// solver: the solve then factors the matrix of the fixed point itself.
    pub settle: bool,
}

impl FixedPoint {
    fn run<T: Real>(&self, w: &[T], c0: &[T]) -> Result<Vec<T>> {
        check_finite(w, &self.tensor)?;
        let (c, report, factor) = match self.forward {
            Forward::Plain => {
                let run = binned::fixed_point(w, c0, &self.geo, self.max_iter, self.tol);
                let c: Vec<f64> = run.c.iter().map(|x| x.wide()).collect();
                let report = plain_report(
                    &c,
                    run.steps(),
                    run.shift,
                    (run.weight_steps, run.bin_steps),
                    self,
                );
                (run.c, report, None)
            }
            Forward::Newton => {
                let previous = self.factor.lock().expect("factor lock").take();
                let warm = previous.as_ref().and_then(|f| f.warm_start(c0));
                let solution = forward::newton_fixed_point(
                    w,
                    c0,
                    &self.geo,
                    self.max_iter,
                    self.tol,
                    self.spread,
                    warm,
                    self.settle,
                )
                .inspect_err(|e| {
                    if let Error::Numerical(what) = e {
                        *self.failure.lock().expect("failure lock") = Some(what.clone());
                    }
                })?;
                let spread = self.spread.max(f64::MIN_POSITIVE);
                let distance = solution
                    .c
                    .iter()
                    .zip(&solution.factor_at)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max)
                    / spread;
                let factor = solution.factor.map(|factor| ForwardFactor {
                    centroids: solution.c.clone(),
                    checksum: forward::checksum(w),
                    factor,
                    distance,
                });
                (
                    solution.c.iter().map(|&x| T::of(x)).collect(),
                    solution.report,
                    factor,
                )
            }
        };
        *self.report.lock().expect("report lock") = Some(report);
        *self.factor.lock().expect("factor lock") = factor;
        Ok(c)
    }
}

/// The report of plain steps: `steps` of them, the last moving a centroid
/// by `shift`, `passes` over the weights and over bins.
fn plain_report(
    c: &[f64],
    steps: usize,
    shift: f64,
    passes: (usize, usize),
    op: &FixedPoint,
) -> ForwardReport {
    let spread = op.spread.max(f64::MIN_POSITIVE);
    ForwardReport {
        iterations: steps,
        weight_passes: passes.0,
        bin_passes: passes.1,
        residual: shift / spread,
        distance: shift / spread,
        converged: shift <= op.tol,
        distinct: newton::distinct(c, op.geo.d, newton::DISTINCT * spread),
        tau: op.geo.tau,
        ..ForwardReport::default()
    }
}

impl CustomOp2 for FixedPoint {
    fn name(&self) -> &'static str {
        "kmeans-fixed-point"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = l2.shape().clone();
        let out = with_float!(self.name(), (s1, l1, w), (s2, l2, c), {
            self.run(w, c).map(storage)
        })?;
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s1.device();
        let (m, d) = l1.shape().dims2()?;
        let w = cuda::view_f32(self.name(), &self.tensor, "weights", s1, l1)?;
        let c0 = cuda::view_f32(self.name(), &self.tensor, "initial centroids", s2, l2)?;
        let p = cuda::Problem::new(m, d, &self.geo)?;
        cuda::check_finite(dev, &w, &self.tensor)?;
        let (c, report) = match self.forward {
            Forward::Plain => {
                let (c, steps, shift) =
                    cuda::fixed_point(dev, &p, &w, &c0, self.max_iter, self.tol)?;
                let host: Vec<f64> = dev.clone_dtoh(&c)?.iter().map(|&x| f64::from(x)).collect();
                (c, plain_report(&host, steps, shift, (steps, 0), self))
            }
            Forward::Newton => {
                let settings = newton::Settings {
                    k: self.geo.k,
                    d,
                    distance: self.geo.distance,
                    tol: self.tol,
                    spread: self.spread,
                    max_iter: self.max_iter,
                    condition: true,
                };
                cuda::newton_fixed_point(dev, &p, &w, &c0, settings)?
            }
        };
        *self.report.lock().expect("report lock") = Some(ForwardReport {
            tau: self.geo.tau,
            ..report
        });
        Ok((
            CudaStorage::wrap_cuda_slice(c, dev.clone()),
            l2.shape().clone(),
        ))
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
    pub adjoint: Arc<Mutex<AdjointLog>>,
    /// The forward solve's factorisation, which the backward reuses when it
    /// belongs to the same weights and centroids.
    pub factor: Arc<Mutex<Option<ForwardFactor>>>,
}

impl CustomOp2 for SoftAssign {
    fn name(&self) -> &'static str {
        "kmeans-soft-assign"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = l1.shape().clone();
        let out = with_float!(self.name(), (s1, l1, w), (s2, l2, c), {
            let mut out = vec![Real::of(0.0); w.len()];
            pass::soft_assign_output(w, c, &self.geo, &mut out);
            Ok(storage(out))
        })?;
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s1.device();
        let (m, d) = l1.shape().dims2()?;
        let w = cuda::view_f32(self.name(), &self.tensor, "weights", s1, l1)?;
        let c = cuda::view_f32(self.name(), &self.tensor, "centroids", s2, l2)?;
        let p = cuda::Problem::new(m, d, &self.geo)?;
        // SAFETY: soft_assign_output writes every element.
        let mut out = unsafe { dev.alloc::<f32>(m * d) }?;
        cuda::soft_assign_output(dev, &p, &w, &c, &mut out)?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        w: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
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
        let run = |adjoint: Adjoint| {
            op.adjoint
                .lock()
                .expect("adjoint lock")
                .record(adjoint, &op.tensor, op.backward.tol)
        };
        let factor = op.factor.lock().expect("factor lock").clone();
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(w), CpuStorage::F32(c), CpuStorage::F32(g)) => {
                let (w, c, g) = (
                    contiguous(w, l1, self.name())?,
                    contiguous(c, l2, self.name())?,
                    contiguous(g, l3, self.name())?,
                );
                let mut out = vec![0f32; w.len()];
                let factor = factor.as_ref().filter(|f| f.serves(w, c));
                run(implicit_backward(
                    w,
                    c,
                    g,
                    &op.geo,
                    &op.backward,
                    factor,
                    &op.tensor,
                    &mut out,
                ));
                storage(out)
            }
            (CpuStorage::F64(w), CpuStorage::F64(c), CpuStorage::F64(g)) => {
                let (w, c, g) = (
                    contiguous(w, l1, self.name())?,
                    contiguous(c, l2, self.name())?,
                    contiguous(g, l3, self.name())?,
                );
                let mut out = vec![0f64; w.len()];
                let factor = factor.as_ref().filter(|f| f.serves(w, c));
                run(implicit_backward(
                    w,
                    c,
                    g,
                    &op.geo,
                    &op.backward,
                    factor,
                    &op.tensor,
                    &mut out,
                ));
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
        let (out, adjoint) =
            cuda::implicit_backward(dev, &p, &w, &c, &g, &op.backward, &op.tensor)?;
        op.adjoint
            .lock()
            .expect("adjoint lock")
            .record(adjoint, &op.tensor, op.backward.tol);
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            l1.shape().clone(),
        ))
    }
}

/// `(W [m, d], C [k, d]) -> indices [m]` (u32): the nearest centroid of each vector.
pub struct HardAssign;

impl CustomOp2 for HardAssign {
    fn name(&self) -> &'static str {
        "kmeans-hard-assign"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, d) = l1.shape().dims2()?;
        let out = with_float!(self.name(), (s1, l1, w), (s2, l2, c), {
            let mut out = vec![0u32; m];
            pass::hard_assign(w, c, d, &mut out);
            Ok(storage(out))
        })?;
        Ok((out, Shape::from(m)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s1.device();
        let (m, d) = l1.shape().dims2()?;
        let (k, dc) = l2.shape().dims2()?;
        if dc != d {
            candle_core::bail!(
                "{}: weights of dimension {d} and centroids of dimension {dc}",
                self.name()
            );
        }
        let w = cuda::view_f32(self.name(), "", "weights", s1, l1)?;
        let c = cuda::view_f32(self.name(), "", "centroids", s2, l2)?;
        let p = cuda::Problem::shape(m, k, d)?;
        // SAFETY: hard_assign writes every element.
        let mut out = unsafe { dev.alloc::<u32>(m.max(1)) }?;
        cuda::hard_assign(dev, &p, &w, &c, &mut out)?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(m),
        ))
    }
}
