//! A clustered weight: soft k-means on the forward pass, with warm start,
//! the configured gradient, hard assignment for inference and export.

use super::backward::{Adjoint, AdjointLog, AdjointStats, BackwardConfig};
use super::config::{Init, KmeansConfig, Method, Solver};
use super::forward::ForwardFactor;
use super::newton::{self, ForwardReport};
use super::ops::{FixedPoint, HardAssign, ImplicitGrad, SoftAssign};
use super::streaming::{Geometry, Real};
use super::{init, reference, temperature};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::{Arc, Mutex};

/// One weight tensor clustered into `2^bits` centroids.
///
/// Each [`forward`](Self::forward) starts k-means from the previous call's
/// fixed point (warm start; k-means++ or optimal 1-D on the first call).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use idkm::cluster::{ClusteredWeight, KmeansConfig};
/// # fn main() -> idkm::Result<()> {
/// let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (64, 3, 3, 3), &Device::Cpu)?)?;
/// let layer = ClusteredWeight::new("conv1.weight", KmeansConfig { bits: 2, ..Default::default() })?;
/// let soft = layer.forward(&w)?;                  // differentiable, same shape as w
/// let grads = soft.sqr()?.sum_all()?.backward()?; // implicit gradient reaches w
/// assert_eq!(grads.get(&w).unwrap().dims(), w.dims());
/// let (indices, centroids) = layer.palettize(&w)?;
/// assert_eq!((indices.dims1()?, centroids.dims2()?), (1728, (4, 1)));
/// # Ok(()) }
/// ```
pub struct ClusteredWeight {
    name: String,
    config: KmeansConfig,
    state: Mutex<State>,
    adjoint: Arc<Mutex<AdjointLog>>,
    factor: Arc<Mutex<Option<ForwardFactor>>>,
}

#[derive(Default)]
struct State {
    /// The last fixed point (k x d), detached.
    centroids: Option<Tensor>,
    /// The centroids the last forward pass started from.
    start: Option<Tensor>,
    /// The temperature: the configured one, or the one derived from the
    /// weights on the first forward pass (or restored).
    tau: Option<f64>,
    /// The last forward solve.
    report: Option<ForwardReport>,
    /// The forward solves since [`ClusteredWeight::take_stats`].
    stats: ForwardStats,
    /// Problems already warned about (see [`ClusteredWeight::check`]).
    warned: Warned,
    /// What became non-finite in a forward solve, until taken.
    diverged: Option<String>,
}

/// Which problems of the forward solve a layer has warned about (once each).
#[derive(Default)]
struct Warned {
    unconverged: bool,
    merged: bool,
    unstable: bool,
    ill_conditioned: bool,
}

/// `cond(I - J)` above which a fixed point is reported as badly conditioned:
/// the adjoint then loses about 4 of f32's 7 digits.
pub const ILL_CONDITIONED: f64 = 1e4;

/// A summary of forward solves (for the epoch log).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ForwardStats {
    /// Solves.
    pub solves: usize,
    /// Iterations, summed.
    pub iterations: usize,
    /// The most iterations of one solve.
    pub max_iterations: usize,
    /// Passes over the weights and over bins, summed.
    pub passes: usize,
    /// The largest distance estimate (relative to the spread).
    pub max_distance: f64,
    /// The largest condition number of `I - J`.
    pub max_cond: f64,
    /// The fewest distinct centroids.
    pub min_distinct: usize,
    /// Plain steps taken as fallbacks, summed.
    pub plain_steps: usize,
    /// Solves that missed the tolerance.
    pub unconverged: usize,
    /// Solves that ended where the curvature was not positive definite.
    pub unstable: usize,
}

/// A summary of the forward and the adjoint solves (for the epoch log).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SolveStats {
    /// The forward k-means solves.
    pub forward: ForwardStats,
    /// The adjoint solves of the backward passes.
    pub adjoint: AdjointStats,
}

impl SolveStats {
    /// The summary of `self` and `other` together.
    pub fn merge(&self, other: &SolveStats) -> SolveStats {
        SolveStats {
            forward: self.forward.merge(&other.forward),
            adjoint: self.adjoint.merge(&other.adjoint),
        }
    }
}

impl ForwardStats {
    fn add(&mut self, r: &ForwardReport) {
        self.min_distinct = if self.solves == 0 {
            r.distinct
        } else {
            self.min_distinct.min(r.distinct)
        };
        self.solves += 1;
        self.iterations += r.iterations;
        self.max_iterations = self.max_iterations.max(r.iterations);
        self.passes += r.weight_passes + r.bin_passes;
        self.max_distance = self.max_distance.max(r.distance);
        self.max_cond = self.max_cond.max(r.cond.unwrap_or(0.0));
        self.plain_steps += r.plain_steps;
        self.unconverged += usize::from(!r.converged);
        self.unstable += usize::from(r.stable == Some(false));
    }

    /// The summary of `self` and `other` together.
    pub fn merge(&self, other: &ForwardStats) -> ForwardStats {
        if self.solves == 0 {
            return *other;
        }
        if other.solves == 0 {
            return *self;
        }
        ForwardStats {
            solves: self.solves + other.solves,
            iterations: self.iterations + other.iterations,
            max_iterations: self.max_iterations.max(other.max_iterations),
            passes: self.passes + other.passes,
            max_distance: self.max_distance.max(other.max_distance),
            max_cond: self.max_cond.max(other.max_cond),
            min_distinct: self.min_distinct.min(other.min_distinct),
            plain_steps: self.plain_steps + other.plain_steps,
            unconverged: self.unconverged + other.unconverged,
            unstable: self.unstable + other.unstable,
        }
    }
}

impl ClusteredWeight {
    /// A clustered weight named `name` (used in errors and logs).
    pub fn new(name: impl Into<String>, config: KmeansConfig) -> Result<Self> {
        config.validate()?;
        let state = State {
            tau: config.tau,
            ..State::default()
        };
        Ok(Self {
            name: name.into(),
            config,
            state: Mutex::new(state),
            adjoint: Arc::default(),
            factor: Arc::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &KmeansConfig {
        &self.config
    }

    /// The name of the weight tensor.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The temperature: the configured one, or the one derived from the
    /// weights by the first forward pass (or restored from a checkpoint);
    /// `None` before that.
    pub fn tau(&self) -> Option<f64> {
        self.state.lock().expect("state lock").tau
    }

    /// Sets the temperature (as a checkpoint restores it), unless the
    /// configuration fixes one.
    pub fn set_tau(&self, tau: f64) -> Result<()> {
        if !(tau > 0.0 && tau.is_finite()) {
            return Err(Error::Config(format!(
                "temperature of `{}` must be positive and finite, got {tau}",
                self.name
            )));
        }
        if self.config.tau.is_none() {
            self.state.lock().expect("state lock").tau = Some(tau);
        }
        Ok(())
    }

    /// The geometry at the resolved temperature (see [`Self::start`]).
    fn geometry(&self) -> Result<Geometry> {
        let tau = self.tau().ok_or_else(|| {
            Error::Config(format!("the temperature of `{}` is not set yet", self.name))
        })?;
        Ok(Geometry {
            k: self.config.k(),
            d: self.config.cluster_dim,
            tau,
            distance: self.config.distance,
        })
    }

    /// Derives the temperature from the weights `host` (m x d, on the CPU)
    /// and the centroids `c` they start from (see [`temperature`]), unless
    /// it is known, and logs it.
    fn resolve_tau<T: Real>(&self, host: &[T], c: &[T]) -> Result<()> {
        if self.tau().is_some() {
            return Ok(());
        }
        let d = self.config.cluster_dim;
        let mse = temperature::hard_mse(host, c, d);
        let scale = self.config.tau_scale;
        let tau =
            temperature::from_error(mse, d, self.config.distance, scale).unwrap_or_else(|| {
                // Every weight sits on a centroid: any temperature serves; one
                // from the weights' range keeps the logits moderate.
                let (lo, hi) = host
                    .iter()
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
                        (lo.min(x.wide()), hi.max(x.wide()))
                    });
                let cell = ((hi - lo) / self.config.k() as f64).max(f64::EPSILON);
                scale * cell * cell
            });
        tracing::info!(layer = %self.name, tau, hard_error = mse, scale, "temperature from the weights");
        self.state.lock().expect("state lock").tau = Some(tau);
        Ok(())
    }

    /// `w` viewed as m x d vectors, after checking dtype, divisibility and size.
    fn vectors(&self, w: &Tensor) -> Result<Tensor> {
        let (d, k, numel) = (self.config.cluster_dim, self.config.k(), w.elem_count());
        if !matches!(w.dtype(), DType::F32 | DType::F64) {
            return Err(Error::Shape {
                tensor: self.name.clone(),
                expected: "an f32 or f64 tensor".into(),
                got: format!("{:?}", w.dtype()),
            });
        }
        if numel % d != 0 {
            return Err(Error::NotDivisible {
                tensor: self.name.clone(),
                numel,
                dim: d,
            });
        }
        if numel / d < k {
            return Err(Error::TooFewVectors {
                tensor: self.name.clone(),
                vectors: numel / d,
                dim: d,
                k,
            });
        }
        Ok(w.flatten_all()?.reshape((numel / d, d))?)
    }

    /// The centroids the next k-means run starts from: the last fixed point,
    /// else the initialisation; the temperature is resolved on the way.
    /// Scalar centroids on the CPU are put in ascending order, which k-means
    /// keeps: the streaming passes then attend each tile of weights only to
    /// the centroids within its reach.
    fn start(&self, vectors: &Tensor) -> Result<Tensor> {
        let c = self.unordered_start(vectors)?;
        if self.config.cluster_dim == 1 && c.device().is_cpu() {
            return Ok(c.flatten_all()?.sort_last_dim(true)?.0.reshape(c.shape())?);
        }
        Ok(c)
    }

    fn unordered_start(&self, vectors: &Tensor) -> Result<Tensor> {
        let (k, d) = (self.config.k(), self.config.cluster_dim);
        let last = self.state.lock().expect("state lock").centroids.clone();
        let last = last.filter(|c| c.dims() == [k, d]);
        if let Some(c) = &last {
            if self.tau().is_some()
                && c.dtype() == vectors.dtype()
                && c.device().same_device(vectors.device())
            {
                return Ok(c.clone());
            }
        }
        // Initialisation (and the temperature) runs once per layer, on the host.
        let host = vectors.detach().to_device(&Device::Cpu)?;
        let c = match host.dtype() {
            DType::F64 => self.initial(
                &host.flatten_all()?.to_vec1::<f64>()?,
                last.as_ref(),
                vectors.device(),
            )?,
            _ => self.initial(
                &host.flatten_all()?.to_vec1::<f32>()?,
                last.as_ref(),
                vectors.device(),
            )?,
        };
        Ok(c.to_dtype(vectors.dtype())?)
    }

    /// The initial centroids for the weights `w` (or the `last` ones, when
    /// known), after checking the weights, and the temperature.
    fn initial<T: Real>(&self, w: &[T], last: Option<&Tensor>, device: &Device) -> Result<Tensor> {
        if let Some(index) = w.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                tensor: self.name.clone(),
                index,
                value: w[index].wide(),
            });
        }
        let (k, d, seed) = (self.config.k(), self.config.cluster_dim, self.config.seed);
        let c: Vec<T> = match last {
            Some(c) => c
                .to_device(&Device::Cpu)?
                .to_dtype(T::DTYPE)?
                .flatten_all()?
                .to_vec1::<T>()?,
            None => match self.config.init.resolve(d) {
                Init::Optimal1d => init::optimal_1d(w, k, seed),
                _ => init::kmeans_plus_plus_refined(w, d, k, seed),
            },
        };
        let mut sorted = c.clone();
        if d == 1 {
            sorted.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
        }
        self.resolve_tau(w, &sorted)?;
        Ok(Tensor::from_vec(c, (k, d), device)?)
    }

    /// Initialises the centroids and the temperature for the weights `w`
    /// now rather than on the first forward pass (which then starts from
    /// them); nothing when they are known.
    pub fn prepare(&self, w: &Tensor) -> Result<()> {
        let vectors = self.vectors(&w.detach())?;
        let c = self.start(&vectors)?;
        self.state.lock().expect("state lock").centroids = Some(c);
        Ok(())
    }

    /// The spread of `vectors` (m x d), the RMS distance of a vector from
    /// their mean, `sqrt(sum ||w_i||^2 / m - ||mean||^2)`. The sum of squares
    /// is a 1 x 1 matrix product, so no weight-sized temporary is allocated
    /// (the streaming passes' memory bound holds).
    fn spread(vectors: &Tensor) -> Result<f64> {
        let v = vectors.detach();
        let m = v.dim(0)? as f64;
        let flat = v.flatten_all()?;
        let squares = flat.unsqueeze(0)?.matmul(&flat.unsqueeze(1)?)?;
        let squares = squares
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?[0];
        let mean: Vec<f64> = v
            .sum(0)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?
            .iter()
            .map(|s| s / m)
            .collect();
        let variance = squares / m - mean.iter().map(|x| x * x).sum::<f64>();
        Ok(variance.max(0.0).sqrt())
    }

    /// Runs k-means to its fixed point without a graph and remembers it.
    fn fixed_point(&self, vectors: &Tensor) -> Result<Tensor> {
        let c0 = self.start(vectors)?;
        let spread = Self::spread(vectors)?;
        let op = FixedPoint {
            tensor: self.name.clone(),
            geo: self.geometry()?,
            forward: self.config.forward,
            max_iter: self.config.max_iter,
            tol: self.config.tol * spread,
            spread,
            report: Mutex::default(),
            failure: Mutex::default(),
            factor: self.factor.clone(),
            settle: self.config.method == Method::Idkm
                && matches!(
                    self.config
                        .solver
                        .resolve(self.config.k() * self.config.cluster_dim),
                    Solver::Dense
                ),
        };
        let c = match vectors.detach().apply_op2_no_bwd(&c0, &op) {
            Ok(c) => c,
            Err(e) => {
                if let Some(failure) = op.failure.lock().expect("failure lock").take() {
                    self.state.lock().expect("state lock").diverged = Some(failure);
                }
                return Err(e.into());
            }
        };
        self.check_centroids(&c)?;
        let report = *op.report.lock().expect("report lock");
        let mut state = self.state.lock().expect("state lock");
        state.start = Some(c0);
        state.centroids = Some(c.clone());
        if let Some(r) = report {
            tracing::trace!(layer = %self.name, ?r, "k-means fixed point");
            state.stats.add(&r);
            self.check(&r, &mut state.warned);
        }
        state.report = report;
        Ok(c)
    }

    /// Fails (and records, see [`Self::take_divergence`]) when the
    /// centroids `c` of a solve hold a non-finite value.
    fn check_centroids(&self, c: &Tensor) -> Result<()> {
        let host: Vec<f64> = c.detach().to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let Some(index) = host.iter().position(|x| !x.is_finite()) else {
            return Ok(());
        };
        let detail = format!(
            "the solve's centroids hold {} at index {index}",
            host[index]
        );
        self.state.lock().expect("state lock").diverged = Some(detail.clone());
        Err(Error::Numerical(format!(
            "the k-means solve of `{}`: {detail}",
            self.name
        )))
    }

    /// What became non-finite in a forward solve since the last call (a
    /// step diagnosing its divergence), reset.
    pub fn take_divergence(&self) -> Option<String> {
        self.state.lock().expect("state lock").diverged.take()
    }

    /// Warns when a forward solve missed its tolerance (once per layer
    /// and summary, see [`Self::take_stats`]), merged centroids, ended at
    /// an unstable point or at a badly conditioned one (once per layer),
    /// with the numbers.
    fn check(&self, r: &ForwardReport, warned: &mut Warned) {
        let k = self.config.k();
        let name = &self.name;
        if !r.converged && !warned.unconverged {
            warned.unconverged = true;
            tracing::warn!(
                layer = %name, iterations = r.iterations, distance = r.distance, residual = r.residual, cond = r.cond,
                "the k-means solve stopped short of its tolerance (at --max-iter, or where the rounding of the passes hides \
                 the residual: see the distance and the condition): the gradient is that of a nearby point \
                 (raise --max-iter, or lower --tau-scale where the condition is large; further cases this epoch are \
                 counted in the epoch summary)"
            );
        }
        if r.distinct < k && !warned.merged {
            warned.merged = true;
            tracing::warn!(
                layer = %name, distinct = r.distinct, k, tau = r.tau,
                "centroids merged at the fixed point: the temperature is above the critical temperature of some clusters \
                 (lower --tau or --tau-scale)"
            );
        }
        if r.stable == Some(false) && !warned.unstable {
            warned.unstable = true;
            tracing::warn!(layer = %name, iterations = r.iterations, "the k-means solve ended where the fixed point is not stable");
        }
        if r.cond.is_some_and(|c| c > ILL_CONDITIONED) && !warned.ill_conditioned {
            warned.ill_conditioned = true;
            tracing::warn!(
                layer = %name, cond = r.cond, tau = r.tau,
                "the fixed point is badly conditioned: cond(I - J) above {ILL_CONDITIONED:e} (lower --tau or --tau-scale)"
            );
        }
    }

    /// The soft-clustered weights `A(C*, W) C*`, shaped like `w`.
    ///
    /// With DKM the k-means steps are recorded by autograd; with IDKM and
    /// IDKM-JFB they run without a graph and the backward is implicit.
    pub fn forward(&self, w: &Tensor) -> Result<Tensor> {
        let vectors = self.vectors(w)?;
        let out = match self.config.method {
            Method::Dkm => {
                let c0 = self.start(&vectors)?;
                let spread = Self::spread(&vectors)?;
                let geo = self.geometry()?;
                let (out, c, steps) = reference::dkm(
                    &vectors,
                    &c0,
                    &geo,
                    self.config.max_iter,
                    self.config.tol * spread,
                )?;
                self.check_centroids(&c)?;
                let host: Vec<f64> = c.detach().to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
                let report = ForwardReport {
                    iterations: steps,
                    weight_passes: steps,
                    residual: f64::NAN,
                    distance: f64::NAN,
                    converged: steps < self.config.max_iter,
                    distinct: newton::distinct(&host, geo.d, newton::DISTINCT * spread),
                    tau: geo.tau,
                    ..ForwardReport::default()
                };
                let mut state = self.state.lock().expect("state lock");
                state.start = Some(c0);
                state.centroids = Some(c.detach());
                state.stats.add(&report);
                state.report = Some(report);
                out
            }
            Method::Idkm | Method::IdkmJfb => {
                let c = self.fixed_point(&vectors)?;
                vectors.apply_op2(&c, self.soft_assign()?)?
            }
        };
        Ok(out.reshape(w.shape())?)
    }

    /// `dL/dw` for the upstream gradient `grad = dL/dWt` (shaped like `w`), at
    /// the fixed point of the last forward pass (run first if there was
    /// none): what the backward of [`forward`](Self::forward) computes,
    /// without a loss graph. With IDKM this needs only the streaming passes'
    /// memory; with DKM it replays the recorded iterations.
    pub fn weight_grad(&self, w: &Tensor, grad: &Tensor) -> Result<Tensor> {
        if grad.dims() != w.dims() {
            return Err(Error::Shape {
                tensor: format!("gradient of {}", self.name),
                expected: format!("{:?}", w.dims()),
                got: format!("{:?}", grad.dims()),
            });
        }
        let vectors = self.vectors(&w.detach())?;
        if self.tau().is_none() {
            self.start(&vectors)?;
        }
        let g = grad
            .detach()
            .reshape(vectors.shape())?
            .to_dtype(vectors.dtype())?;
        let gw = match self.config.method {
            Method::Dkm => {
                let var = candle_core::Var::from_tensor(&vectors)?;
                let last = self.state.lock().expect("state lock").start.clone();
                let c0 = match last {
                    Some(c0) => c0,
                    None => self.start(&vectors)?,
                };
                let tol = self.config.tol * Self::spread(&vectors)?;
                let (out, _, _) =
                    reference::dkm(&var, &c0, &self.geometry()?, self.config.max_iter, tol)?;
                let grads = (out * g)?.sum_all()?.backward()?;
                grads.get(&var).cloned().unwrap_or(var.zeros_like()?)
            }
            Method::Idkm | Method::IdkmJfb => {
                let c = match self.centroids() {
                    Some(c) if c.dims() == [self.config.k(), self.config.cluster_dim] => c,
                    _ => self.fixed_point(&vectors)?,
                };
                vectors.apply_op3_no_bwd(
                    &c,
                    &g.contiguous()?,
                    &ImplicitGrad(self.soft_assign()?),
                )?
            }
        };
        Ok(gw.reshape(w.shape())?)
    }

    fn soft_assign(&self) -> Result<SoftAssign> {
        Ok(SoftAssign {
            tensor: self.name.as_str().into(),
            geo: self.geometry()?,
            backward: BackwardConfig {
                method: self.config.method,
                solver: self.config.solver,
                tol: self.config.solver_tol,
                max_steps: self.config.solver_max_steps,
            },
            adjoint: self.adjoint.clone(),
            factor: self.factor.clone(),
        })
    }

    /// The fixed point of the last forward pass (k x d), if any.
    pub fn centroids(&self) -> Option<Tensor> {
        self.state.lock().expect("state lock").centroids.clone()
    }

    /// Sets the fixed point (k x d), as a checkpoint restores it: the next
    /// forward pass starts from it and [`palettize`](Self::palettize) uses it.
    pub fn set_centroids(&self, centroids: Tensor) -> Result<()> {
        let (k, d) = (self.config.k(), self.config.cluster_dim);
        if centroids.dims() != [k, d] {
            return Err(Error::Shape {
                tensor: format!("centroids of {}", self.name),
                expected: format!("[{k}, {d}]"),
                got: format!("{:?}", centroids.dims()),
            });
        }
        let mut state = self.state.lock().expect("state lock");
        state.centroids = Some(centroids.detach());
        Ok(())
    }

    /// The factorisation the last Newton solve left (which the next solve
    /// starts from), as an f64 vector for a checkpoint; `None` without one.
    pub fn warm_start(&self) -> Option<Tensor> {
        let factor = self.factor.lock().expect("factor lock");
        let data = factor.as_ref()?.encode();
        let len = data.len();
        Tensor::from_vec(data, len, &Device::Cpu).ok()
    }

    /// Restores [`Self::warm_start`], as a checkpoint holds it: the next
    /// solve then starts exactly as it would have in the run that wrote it.
    pub fn set_warm_start(&self, data: &Tensor) -> Result<()> {
        let values = data.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let factor = ForwardFactor::decode(&values).ok_or_else(|| Error::Shape {
            tensor: format!("warm start of {}", self.name),
            expected: "an encoded factorisation".into(),
            got: format!("{} values that do not decode", values.len()),
        })?;
        *self.factor.lock().expect("factor lock") = Some(factor);
        Ok(())
    }

    /// What the last forward k-means solve did.
    pub fn last_forward(&self) -> Option<ForwardReport> {
        self.state.lock().expect("state lock").report
    }

    /// The summary of the forward and adjoint solves since the last call
    /// (an epoch), reset: the next solve to miss its tolerance is warned
    /// about again.
    pub fn take_stats(&self) -> SolveStats {
        let mut state = self.state.lock().expect("state lock");
        state.warned.unconverged = false;
        SolveStats {
            forward: std::mem::take(&mut state.stats),
            adjoint: self.adjoint.lock().expect("adjoint lock").take_stats(),
        }
    }

    /// How the adjoint of the last backward pass was obtained.
    pub fn last_adjoint(&self) -> Option<Adjoint> {
        self.adjoint.lock().expect("adjoint lock").last
    }

    /// Hard assignment for export: `(indices [m] u32, centroids [k, d])`, with
    /// the centroids of the last forward pass (k-means is run first if there
    /// was none). `index_i = argmin_j dist(w_i, c_j)`.
    pub fn palettize(&self, w: &Tensor) -> Result<(Tensor, Tensor)> {
        let vectors = self.vectors(w)?.detach();
        let c = match self.centroids() {
            Some(c) if c.dims() == [self.config.k(), self.config.cluster_dim] => c,
            _ => self.fixed_point(&vectors)?,
        };
        let indices = vectors
            .contiguous()?
            .apply_op2_no_bwd(&c.contiguous()?, &HardAssign)?;
        Ok((indices, c))
    }

    /// The hard-clustered (palettized) weights `c_{index_i}`, shaped like `w`,
    /// as used at inference.
    pub fn hard(&self, w: &Tensor) -> Result<Tensor> {
        let (indices, c) = self.palettize(w)?;
        Ok(c.index_select(&indices, 0)?.reshape(w.shape())?)
    }
}
