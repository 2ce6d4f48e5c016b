//! A clustered weight: soft k-means on the forward pass, with warm start,
//! the configured gradient, hard assignment for inference and export.

use super::backward::{Adjoint, BackwardConfig};
use super::config::{Init, KmeansConfig, Method};
use super::init;
use super::ops::{FixedPoint, FixedPointReport, HardAssign, ImplicitGrad, SoftAssign};
use super::reference;
use super::streaming::{Geometry, Real};
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
/// let layer = ClusteredWeight::new("conv1.weight", KmeansConfig { bits: 2, tau: 0.05, ..Default::default() })?;
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
    adjoint: Arc<Mutex<Option<Adjoint>>>,
}

#[derive(Default)]
struct State {
    /// The last fixed point (k x d), detached.
    centroids: Option<Tensor>,
    /// The centroids the last forward pass started from.
    start: Option<Tensor>,
    /// The last forward iteration.
    report: Option<FixedPointReport>,
}

impl ClusteredWeight {
    /// A clustered weight named `name` (used in errors and logs).
    pub fn new(name: impl Into<String>, config: KmeansConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self { name: name.into(), config, state: Mutex::default(), adjoint: Arc::default() })
    }

    /// The configuration.
    pub fn config(&self) -> &KmeansConfig {
        &self.config
    }

    /// The name of the weight tensor.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            k: self.config.k(),
            d: self.config.cluster_dim,
            tau: self.config.tau,
            distance: self.config.distance,
        }
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
            return Err(Error::NotDivisible { tensor: self.name.clone(), numel, dim: d });
        }
        if numel / d < k {
            return Err(Error::TooFewVectors { tensor: self.name.clone(), vectors: numel / d, dim: d, k });
        }
        Ok(w.flatten_all()?.reshape((numel / d, d))?)
    }

    /// The centroids the next k-means run starts from: the last fixed point,
    /// else the initialisation. Scalar centroids on the CPU are put in
    /// ascending order, which k-means keeps: the streaming passes then
    /// attend each tile of weights only to the centroids within its reach.
    fn start(&self, vectors: &Tensor) -> Result<Tensor> {
        let c = self.unordered_start(vectors)?;
        if self.config.cluster_dim == 1 && c.device().is_cpu() {
            return Ok(c.flatten_all()?.sort_last_dim(true)?.0.reshape(c.shape())?);
        }
        Ok(c)
    }

    fn unordered_start(&self, vectors: &Tensor) -> Result<Tensor> {
        let geo = self.geometry();
        if let Some(c) = self.state.lock().expect("state lock").centroids.as_ref() {
            if c.dims() == [geo.k, geo.d] && c.dtype() == vectors.dtype() && c.device().same_device(vectors.device()) {
                return Ok(c.clone());
            }
        }
        // Initialisation runs once per layer, on the host.
        let host = vectors.detach().to_device(&Device::Cpu)?;
        let c = match host.dtype() {
            DType::F64 => self.initial(&host.flatten_all()?.to_vec1::<f64>()?, vectors.device())?,
            _ => self.initial(&host.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?, vectors.device())?,
        };
        Ok(c.to_dtype(vectors.dtype())?)
    }

    fn initial<T: Real>(&self, w: &[T], device: &Device) -> Result<Tensor> {
        if let Some(index) = w.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite { tensor: self.name.clone(), index, value: w[index].wide() });
        }
        let (k, d, seed) = (self.config.k(), self.config.cluster_dim, self.config.seed);
        let c = match self.config.init {
            Init::KmeansPlusPlus => init::kmeans_plus_plus(w, d, k, seed),
            Init::Optimal1d => init::optimal_1d(w, k, seed),
        };
        Ok(Tensor::from_vec(c, (k, d), device)?)
    }

    /// The largest centroid move at which k-means stops: the configured
    /// tolerance times the spread of `vectors` (m x d), the RMS distance of a
    /// vector from their mean, `sqrt(sum ||w_i||^2 / m - ||mean||^2)`. The
    /// sum of squares is a 1 x 1 matrix product, so no weight-sized
    /// temporary is allocated (the streaming passes' memory bound holds).
    fn stopping_shift(&self, vectors: &Tensor) -> Result<f64> {
        if self.config.tol == 0.0 {
            return Ok(0.0);
        }
        let v = vectors.detach();
        let m = v.dim(0)? as f64;
        let flat = v.flatten_all()?;
        let squares = flat.unsqueeze(0)?.matmul(&flat.unsqueeze(1)?)?;
        let squares = squares.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0];
        let mean: Vec<f64> = v.sum(0)?.to_dtype(DType::F64)?.to_vec1::<f64>()?.iter().map(|s| s / m).collect();
        let variance = squares / m - mean.iter().map(|x| x * x).sum::<f64>();
        Ok(self.config.tol * variance.max(0.0).sqrt())
    }

    /// Runs k-means to its fixed point without a graph and remembers it.
    fn fixed_point(&self, vectors: &Tensor) -> Result<Tensor> {
        let c0 = self.start(vectors)?;
        let op = FixedPoint {
            tensor: self.name.clone(),
            geo: self.geometry(),
            max_iter: self.config.max_iter,
            tol: self.stopping_shift(vectors)?,
            report: Mutex::default(),
        };
        let c = vectors.detach().apply_op2_no_bwd(&c0, &op)?;
        let report = *op.report.lock().expect("report lock");
        if let Some(r) = report {
            tracing::trace!(layer = %self.name, steps = r.steps, shift = r.shift, "k-means fixed point");
        }
        let mut state = self.state.lock().expect("state lock");
        state.start = Some(c0);
        state.centroids = Some(c.clone());
        state.report = report;
        Ok(c)
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
                let tol = self.stopping_shift(&vectors)?;
                let (out, c, steps) = reference::dkm(&vectors, &c0, &self.geometry(), self.config.max_iter, tol)?;
                let mut state = self.state.lock().expect("state lock");
                state.start = Some(c0);
                state.centroids = Some(c.detach());
                state.report = Some(FixedPointReport { steps, shift: f64::NAN });
                out
            }
            Method::Idkm | Method::IdkmJfb => {
                let c = self.fixed_point(&vectors)?;
                vectors.apply_op2(&c, self.soft_assign())?
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
        let g = grad.detach().reshape(vectors.shape())?.to_dtype(vectors.dtype())?;
        let gw = match self.config.method {
            Method::Dkm => {
                let var = candle_core::Var::from_tensor(&vectors)?;
                let last = self.state.lock().expect("state lock").start.clone();
                let c0 = match last {
                    Some(c0) => c0,
                    None => self.start(&vectors)?,
                };
                let tol = self.stopping_shift(&vectors)?;
                let (out, _, _) = reference::dkm(&var, &c0, &self.geometry(), self.config.max_iter, tol)?;
                let grads = (out * g)?.sum_all()?.backward()?;
                grads.get(&var).cloned().unwrap_or(var.zeros_like()?)
            }
            Method::Idkm | Method::IdkmJfb => {
                let c = match self.centroids() {
                    Some(c) if c.dims() == [self.config.k(), self.config.cluster_dim] => c,
                    _ => self.fixed_point(&vectors)?,
                };
                vectors.apply_op3_no_bwd(&c, &g.contiguous()?, &ImplicitGrad(self.soft_assign()))?
            }
        };
        Ok(gw.reshape(w.shape())?)
    }

    fn soft_assign(&self) -> SoftAssign {
        SoftAssign {
            tensor: self.name.as_str().into(),
            geo: self.geometry(),
            backward: BackwardConfig {
                method: self.config.method,
                solver: self.config.solver,
                tol: self.config.solver_tol,
                max_steps: self.config.solver_max_steps,
            },
            adjoint: self.adjoint.clone(),
        }
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

    /// Steps and final shift of the last forward k-means run.
    pub fn last_forward(&self) -> Option<FixedPointReport> {
        self.state.lock().expect("state lock").report
    }

    /// How the adjoint of the last backward pass was obtained.
    pub fn last_adjoint(&self) -> Option<Adjoint> {
        *self.adjoint.lock().expect("adjoint lock")
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
        let indices = vectors.contiguous()?.apply_op2_no_bwd(&c.contiguous()?, &HardAssign)?;
        Ok((indices, c))
    }

    /// The hard-clustered (palettized) weights `c_{index_i}`, shaped like `w`,
    /// as used at inference.
    pub fn hard(&self, w: &Tensor) -> Result<Tensor> {
        let (indices, c) = self.palettize(w)?;
        Ok(c.index_select(&indices, 0)?.reshape(w.shape())?)
    }
}
