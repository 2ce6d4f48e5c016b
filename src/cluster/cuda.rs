// Over 800 lines: every launcher shares the PTX modules, the device buffers and the checks of one Problem.
//! Host-side launchers of the CUDA kernels in `kernels/` (feature `cuda`).
//!
//! Each launcher is the device twin of one CPU pass in [`super::streaming`]
//! and has the same arguments, with device buffers; [`fixed_point`] and
//! [`implicit_backward`] string them together exactly as
//! `streaming::fixed_point` and `backward::implicit_backward` do, and the
//! `CustomOp`s in [`super::ops`] call those two (plus [`soft_assign_output`],
//! [`hard_assign`] and [`check_finite`]) from their `cuda_fwd`.
//!
//! - f32 only: the kernels read and write f32 (sums over rows in f64, as the
//!   twins). An f64 tensor on a CUDA device is refused with an error naming
//!   the tensor and the dtype.
//! - The k-means loop reads back one 8-byte value per step (the largest
//!   centroid move, which decides convergence); everything else stays on the
//!   device.
//! - Solver::Cg runs on the device: per CG step one fused pass over W
//!   (`cg_matvec`), one small reduce of the per-block partials and one
//!   single-block update kernel (`cg_update`); the host reads the 64-byte
//!   CG state every [`CG_CHECK_EVERY`] steps (the kernels are no-ops once the
//!   solve has stopped, so the steps are exactly those of
//!   `solve::conjugate_gradient`).
//! - Solver::Gmres, Solver::Neumann and Solver::Dense (whose J^T is
//!   assembled from n device matvecs) run the host solvers of
//!   [`super::solve`] unchanged, each matvec being one `adjoint_matvec`
//!   pass on the device with the k*d vector copied in and out (a few KiB).
//! - Determinism: every reduction goes through per-block partials added in
//!   block order, with a grid that depends on m only: the same inputs give
//!   the same bits on every run (and on any GPU with the same PTX).
//!
//! The PTX is compiled by `build.rs` for `CUDA_COMPUTE_CAP` (default 90) and
//! loaded once per device with `CudaDevice::get_or_load_custom_func`.

use super::backward::{fallback, Adjoint, BackwardConfig, GMRES_RESTART};
use super::config::{Distance, Method, Solver};
use super::newton::{self, Evaluation, ForwardReport, KmeansMap, Settings};
use super::solve::{self, SolveReport};
use super::streaming::{Geometry, Moments};
use crate::error::Error;
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaSlice, CudaView, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result};

/// PTX of `kernels/soft_assign.cu` (forward passes, k-means update, finite check).
pub const SOFT_ASSIGN_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/soft_assign.ptx"));
/// PTX of `kernels/adjoint.cu` (backward passes and the device conjugate gradient).
pub const ADJOINT_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adjoint.ptx"));
/// The target the PTX was compiled for (`sm_90` unless `CUDA_COMPUTE_CAP` said otherwise).
pub const ARCH: &str = env!("IDKM_CUDA_ARCH");

/// Threads per block of the row kernels (common.cuh: BLOCK).
const BLOCK: u32 = 256;
/// Threads of the single-block CG kernels.
const CG_BLOCK: u32 = 1024;
/// Largest k the kernels take (common.cuh: KMAX).
pub const KMAX: usize = 256;
/// Most blocks of a reducing pass: bounds the partial sums (nb x k*(d+1) doubles).
const MAX_REDUCE_BLOCKS: usize = 1024;
/// Most blocks of a row-parallel pass (they stride over the rows).
const MAX_ROW_BLOCKS: usize = 65535;
/// The host reads the CG state after every this many steps.
pub const CG_CHECK_EVERY: usize = 4;

// adjoint.cu: CgState.
const CG_STATE_LEN: usize = 8;
const CG_BEST_REL: usize = 2;
const CG_STEPS: usize = 5;
const CG_STATUS: usize = 6;

#[derive(Clone, Copy)]
enum Module {
    SoftAssign,
    Adjoint,
}

/// The kernel `name` of `module`; the module is loaded once per device.
/// Launch it on `dev.cuda_stream()`, the stream of candle's own work.
fn func(dev: &CudaDevice, module: Module, name: &str) -> Result<CudaFunction> {
    let (module_name, ptx) = match module {
        Module::SoftAssign => ("idkm_soft_assign", SOFT_ASSIGN_PTX),
        Module::Adjoint => ("idkm_adjoint", ADJOINT_PTX),
    };
    Ok(dev
        .get_or_load_custom_func(name, module_name, ptx)?
        .into_cuda_function())
}

fn launch_cfg(grid: usize, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid as u32, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launches the kernel `f` on `dev.cuda_stream()`, the stream of candle's
/// own work, with `grid` blocks of `block` threads and the arguments in the
/// kernel's parameter order.
macro_rules! launch {
    ($dev:expr, $f:expr, ($grid:expr, $block:expr), $($arg:expr),+ $(,)?) => {{
        let stream = $dev.cuda_stream();
        let mut builder = stream.launch_builder($f);
        $(builder.arg($arg);)+
        // SAFETY: the arguments are the kernel's parameters in number, type
        // and order (kernels/*.cu), and every launcher checks its buffers'
        // lengths against what the kernel reads and writes.
        unsafe { builder.launch(launch_cfg($grid, $block)) }.w()?;
    }};
}

/// Allocates `len` elements without initialising them (every launcher
/// writes all of its output).
fn alloc<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    dev: &CudaDevice,
    len: usize,
) -> Result<CudaSlice<T>> {
    // SAFETY: callers only read what a kernel has written first.
    unsafe { dev.alloc::<T>(len.max(1)) }
}

// ----------------------------------------------------------------------------
// Inputs

/// The f32 device view of `storage` under a contiguous `layout`; `op`,
/// `tensor` (the weight's name, or "" when unknown) and `what` name it in
/// errors.
pub fn view_f32<'a>(
    op: &str,
    tensor: &str,
    what: &str,
    storage: &'a CudaStorage,
    layout: &Layout,
) -> Result<CudaView<'a, f32>> {
    let of = if tensor.is_empty() {
        String::new()
    } else {
        format!(" of `{tensor}`")
    };
    let dtype = storage.dtype();
    if dtype != DType::F32 {
        bail!(
            "{op}: the CUDA kernels run on f32 only, but the {what}{of} {} {dtype:?} \
             (convert to f32, or cluster {dtype:?} weights on the CPU)",
            if what.ends_with('s') { "are" } else { "is" }
        );
    }
    let slice = storage.as_cuda_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(slice.slice(start..end)),
        None => bail!("{op}: expected contiguous {what}{of}"),
    }
}

/// The shape of one clustering problem on the device: m weight vectors of
/// dimension d against k centroids, with the logits' temperature and
/// distance. Checks what the kernels assume (they trap otherwise, which
/// poisons the CUDA context).
#[derive(Clone, Copy, Debug)]
pub struct Problem {
    /// Weight vectors (rows).
    pub m: usize,
    /// Centroids.
    pub k: usize,
    /// Dimension of a vector.
    pub d: usize,
    /// `(1/tau)` rounded to f32, as the twins' `T::of(1.0 / tau)`.
    pub inv_tau: f32,
    /// 1 for the Euclidean distance, 0 for the squared one.
    pub euclidean: i32,
}

impl Problem {
    /// `m` rows of dimension `d` clustered as `geo` says.
    pub fn new(m: usize, d: usize, geo: &Geometry) -> Result<Self> {
        if d != geo.d {
            bail!("clustering on CUDA: the weights have rows of {d} values but the cluster dimension is {}", geo.d);
        }
        let p = Self::shape(m, geo.k, d)?;
        if !geo.tau.is_finite() || geo.tau <= 0.0 {
            bail!(
                "clustering on CUDA: tau must be positive and finite, got {}",
                geo.tau
            );
        }
        Ok(Self {
            inv_tau: (1.0 / geo.tau) as f32,
            euclidean: i32::from(geo.distance == Distance::Euclidean),
            ..p
        })
    }

    /// A problem with only its shape (hard assignment needs no tau).
    pub fn shape(m: usize, k: usize, d: usize) -> Result<Self> {
        if !matches!(d, 1 | 2 | 4 | 8) {
            bail!("clustering on CUDA: cluster dimension {d} is not supported (1, 2, 4 or 8)");
        }
        if k == 0 || k > KMAX {
            bail!("clustering on CUDA: {k} centroids (the kernels take 1 to {KMAX})");
        }
        if m > i32::MAX as usize {
            bail!(
                "clustering on CUDA: {m} weight vectors (the kernels take at most {})",
                i32::MAX
            );
        }
        Ok(Self {
            m,
            k,
            d,
            inv_tau: 1.0,
            euclidean: 0,
        })
    }

    /// `name` with the `_f32_dD` suffix of its instantiation for this d.
    fn kernel(&self, name: &str) -> String {
        format!("{name}_f32_d{}", self.d)
    }

    fn m_i32(&self) -> i32 {
        self.m as i32
    }

    fn k_i32(&self) -> i32 {
        self.k as i32
    }

    /// Blocks of a reducing pass: a function of m only (determinism).
    pub fn reduce_blocks(&self) -> usize {
        self.m.div_ceil(BLOCK as usize).clamp(1, MAX_REDUCE_BLOCKS)
    }

    /// Blocks of a row-parallel pass with one lane group per row (common.cuh:
    /// group_lanes).
    fn row_blocks(&self) -> usize {
        let mut g = 2;
        while g < self.k && g < 32 {
            g <<= 1;
        }
        let rows_per_block = BLOCK as usize / g;
        self.m.div_ceil(rows_per_block).clamp(1, MAX_ROW_BLOCKS)
    }

    /// `k * d`: the length of a centroid-sized vector.
    pub fn n(&self) -> usize {
        self.k * self.d
    }

    fn check(&self, what: &str, len: usize, expected: usize) -> Result<()> {
        if len != expected {
            bail!("clustering on CUDA: {what} has {len} values, expected {expected}");
        }
        Ok(())
    }
}

/// Fails with [`Error::NonFinite`] naming `tensor` at the first NaN or
/// infinite value of `w` (the twin of `ops::check_finite`). One pass and a
/// read of 8 bytes.
pub fn check_finite(dev: &CudaDevice, w: &CudaView<f32>, tensor: &str) -> Result<()> {
    let n = w.len();
    if n == 0 {
        return Ok(());
    }
    let mut first = dev.clone_htod(&[u64::MAX])?;
    let f = func(dev, Module::SoftAssign, "first_non_finite_f32")?;
    let n64 = n as u64;
    let grid = n.div_ceil(BLOCK as usize).clamp(1, MAX_REDUCE_BLOCKS);
    launch!(dev, &f, (grid, BLOCK), w, &n64, &mut first);
    let index = dev.clone_dtoh(&first)?[0];
    if index == u64::MAX {
        return Ok(());
    }
    let index = index as usize;
    let value = dev.clone_dtoh(&w.slice(index..index + 1))?[0];
    Err(Error::NonFinite {
        tensor: tensor.to_string(),
        index,
        value: value as f64,
    }
    .into())
}

// ----------------------------------------------------------------------------
// Forward passes (streaming/forward.rs: soft_assign_reduce, Moments, soft_assign_output, hard_assign)

/// `reduce_partials`: `out[x] = sum_b partials[b * len + x]`, blocks in order.
fn reduce_partials(
    dev: &CudaDevice,
    partials: &CudaSlice<f64>,
    blocks: usize,
    len: usize,
    out: &mut CudaSlice<f64>,
) -> Result<()> {
    let f = func(dev, Module::SoftAssign, "reduce_partials")?;
    let (nb, n) = (blocks as i32, len as i32);
    launch!(
        dev,
        &f,
        (len.div_ceil(BLOCK as usize), BLOCK),
        partials,
        &nb,
        &n,
        out
    );
    Ok(())
}

/// Scratch of the reducing passes: per-block partial sums.
pub struct Partials {
    buf: CudaSlice<f64>,
    blocks: usize,
}

impl Partials {
    /// Room for a pass of `p` whose blocks each write `len` sums.
    pub fn new(dev: &CudaDevice, p: &Problem, len: usize) -> Result<Self> {
        let blocks = p.reduce_blocks();
        Ok(Self {
            buf: alloc(dev, blocks * len)?,
            blocks,
        })
    }
}

/// One k-means step's sums into `sums` (k*(d+1) doubles: `S_j` (k), then
/// `sum_i a_ij w_i` (k x d)): the twin of `streaming::soft_assign_reduce`.
pub fn soft_assign_reduce(
    dev: &CudaDevice,
    p: &Problem,
    w: &CudaView<f32>,
    c: &CudaView<f32>,
    scratch: &mut Partials,
    sums: &mut CudaSlice<f64>,
) -> Result<()> {
    let len = p.k * (p.d + 1);
    p.check("the weights", w.len(), p.m * p.d)?;
    p.check("the centroids", c.len(), p.n())?;
    p.check("the sums", sums.len(), len)?;
    p.check("the partial sums", scratch.buf.len(), scratch.blocks * len)?;
    let f = func(dev, Module::SoftAssign, &p.kernel("soft_assign_reduce"))?;
    let (m, k) = (p.m_i32(), p.k_i32());
    launch!(
        dev,
        &f,
        (scratch.blocks, BLOCK),
        w,
        c,
        &m,
        &k,
        &p.inv_tau,
        &p.euclidean,
        &mut scratch.buf
    );
    reduce_partials(dev, &scratch.buf, scratch.blocks, len, sums)
}

/// The k-means update from the sums (`Moments::update`): `next` (k x d) gets
/// `F(C)` (dead centroids keep their value from `c`), `shift` the largest
/// centroid move and `converged` 1 if it is `<= tol`.
#[allow(clippy::too_many_arguments)]
pub fn kmeans_update(
    dev: &CudaDevice,
    p: &Problem,
    sums: &CudaSlice<f64>,
    c: &CudaView<f32>,
    tol: f64,
    next: &mut CudaSlice<f32>,
    shift: &mut CudaSlice<f64>,
    converged: &mut CudaSlice<u32>,
) -> Result<()> {
    p.check("the sums", sums.len(), p.k * (p.d + 1))?;
    p.check("the centroids", c.len(), p.n())?;
    p.check("the updated centroids", next.len(), p.n())?;
    let f = func(dev, Module::SoftAssign, "kmeans_update")?;
    let (k, d) = (p.k_i32(), p.d as i32);
    launch!(
        dev,
        &f,
        (1, BLOCK),
        sums,
        c,
        &k,
        &d,
        &tol,
        next,
        shift,
        converged
    );
    Ok(())
}

/// `1/S_j`, or 0 for a dead centroid (`Moments::inverse_mass`), from the
/// first k values of `sums`.
pub fn inverse_mass(
    dev: &CudaDevice,
    p: &Problem,
    sums: &CudaSlice<f64>,
    inv_mass: &mut CudaSlice<f64>,
) -> Result<()> {
    p.check("the inverse masses", inv_mass.len(), p.k)?;
    let f = func(dev, Module::SoftAssign, "inverse_mass")?;
    let k = p.k_i32();
    launch!(
        dev,
        &f,
        (p.k.div_ceil(BLOCK as usize), BLOCK),
        sums,
        &k,
        inv_mass
    );
    Ok(())
}

/// `Wt_i = sum_j a_ij c_j` into `out` (m x d): `streaming::soft_assign_output`.
pub fn soft_assign_output(
    dev: &CudaDevice,
    p: &Problem,
    w: &CudaView<f32>,
    c: &CudaView<f32>,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    p.check("the weights", w.len(), p.m * p.d)?;
    p.check("the centroids", c.len(), p.n())?;
    p.check("the output", out.len(), p.m * p.d)?;
    let f = func(dev, Module::SoftAssign, &p.kernel("soft_assign_output"))?;
    let (m, k) = (p.m_i32(), p.k_i32());
    launch!(
        dev,
        &f,
        (p.row_blocks(), BLOCK),
        w,
        c,
        &m,
        &k,
        &p.inv_tau,
        &p.euclidean,
        out
    );
    Ok(())
}

/// `index_i = argmin_j ||w_i - c_j||` into `out` (m): `streaming::hard_assign`.
pub fn hard_assign(
    dev: &CudaDevice,
    p: &Problem,
    w: &CudaView<f32>,
    c: &CudaView<f32>,
    out: &mut CudaSlice<u32>,
) -> Result<()> {
    p.check("the weights", w.len(), p.m * p.d)?;
    p.check("the centroids", c.len(), p.n())?;
    p.check("the indices", out.len(), p.m.max(1))?;
    if p.m == 0 {
        return Ok(());
    }
    let f = func(dev, Module::SoftAssign, &p.kernel("hard_assign"))?;
    let (m, k) = (p.m_i32(), p.k_i32());
    launch!(
        dev,
        &f,
        (p.m.div_ceil(BLOCK as usize).clamp(1, MAX_ROW_BLOCKS), BLOCK),
        w,
        c,
        &m,
        &k,
        out
    );
    Ok(())
}

/// `streaming::fixed_point` on the device: k-means steps from `c0` until no
/// centroid moves more than `tol` or `max_iter` steps are done. Returns the
/// centroids (k x d), the steps and the last shift (infinite if no step).
pub fn fixed_point(
    dev: &CudaDevice,
    p: &Problem,
    w: &CudaView<f32>,
    c0: &CudaView<f32>,
    max_iter: usize,
    tol: f64,
) -> Result<(CudaSlice<f32>, usize, f64)> {
    p.check("the initial centroids", c0.len(), p.n())?;
    let mut c = alloc::<f32>(dev, p.n())?;
    dev.memcpy_dtod(c0, &mut c)?;
    let mut next = alloc::<f32>(dev, p.n())?;
    let mut sums = alloc::<f64>(dev, p.k * (p.d + 1))?;
    let mut scratch = Partials::new(dev, p, p.k * (p.d + 1))?;
    let mut shift_dev = alloc::<f64>(dev, 1)?;
    let mut converged = alloc::<u32>(dev, 1)?;
    let (mut shift, mut steps) = (f64::INFINITY, 0);
    while steps < max_iter {
        soft_assign_reduce(dev, p, w, &c.as_view(), &mut scratch, &mut sums)?;
        kmeans_update(
            dev,
            p,
            &sums,
            &c.as_view(),
            tol,
            &mut next,
            &mut shift_dev,
            &mut converged,
        )?;
        std::mem::swap(&mut c, &mut next);
        steps += 1;
        // The one value read per step: the convergence test (as the twin, in f64).
        shift = dev.clone_dtoh(&shift_dev)?[0];
        if shift <= tol {
            break;
        }
    }
    Ok((c, steps, shift))
}

/// The k-means map on the device for the forward Newton solve
/// ([`super::newton`]): each k-means pass is one `soft_assign_reduce`
/// (the sums copied back, k (d + 1) doubles); the matrix is assembled from
/// n = k d `adjoint_matvec` passes of the unit vectors, as the dense
/// adjoint solver does here (there is no kernel for the one-pass assembly
/// the CPU has). No free energy: the line search uses the residual.
struct DeviceMap<'a> {
    dev: &'a CudaDevice,
    p: &'a Problem,
    w: &'a CudaView<'a, f32>,
    scratch: Partials,
    sums: CudaSlice<f64>,
    passes: usize,
}

impl DeviceMap<'_> {
    fn upload_f32(&self, x: &[f64]) -> Result<CudaSlice<f32>> {
        let narrow: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        self.dev.clone_htod(&narrow)
    }
}

impl KmeansMap for DeviceMap<'_> {
    fn round(&self, c: &mut [f64]) {
        c.iter_mut().for_each(|x| *x = f64::from(*x as f32));
    }

    fn evaluate(&mut self, c: &[f64]) -> crate::error::Result<Evaluation> {
        let c = self.upload_f32(c)?;
        soft_assign_reduce(
            self.dev,
            self.p,
            self.w,
            &c.as_view(),
            &mut self.scratch,
            &mut self.sums,
        )?;
        self.passes += 1;
        let sums = self.dev.clone_dtoh(&self.sums)?;
        let (mass, weighted) = sums.split_at(self.p.k);
        Ok(Evaluation {
            moments: Moments {
                mass: mass.to_vec(),
                weighted: weighted.to_vec(),
            },
            energy: None,
        })
    }

    fn matrix(&mut self, c: &[f64], f: &[f64], inv_mass: &[f64]) -> crate::error::Result<Vec<f64>> {
        let n = self.p.n();
        let (c, f) = (self.upload_f32(c)?, self.upload_f32(f)?);
        let inv_mass = self.dev.clone_htod(inv_mass)?;
        let mut scratch = Partials::new(self.dev, self.p, n)?;
        let mut u = alloc::<f64>(self.dev, n)?;
        let mut out = alloc::<f64>(self.dev, n)?;
        let mut columns = vec![0f64; n * n];
        let mut unit = vec![0f64; n];
        for q in 0..n {
            unit[q] = 1.0;
            self.dev.memcpy_htod(&unit, &mut u)?;
            adjoint_matvec(
                self.dev,
                self.p,
                self.w,
                &c.as_view(),
                &f.as_view(),
                &inv_mass,
                &u,
                &mut scratch,
                &mut out,
            )?;
            for (r, x) in self.dev.clone_dtoh(&out)?.into_iter().enumerate() {
                columns[r * n + q] = x;
            }
            unit[q] = 0.0;
        }
        self.passes += n;
        Ok(columns)
    }

    fn matvec(
        &mut self,
        c: &[f64],
        f: &[f64],
        inv_mass: &[f64],
        u: &[f64],
    ) -> crate::error::Result<Vec<f64>> {
        let n = self.p.n();
        let (c, f) = (self.upload_f32(c)?, self.upload_f32(f)?);
        let inv_mass = self.dev.clone_htod(inv_mass)?;
        let u = self.dev.clone_htod(u)?;
        let mut scratch = Partials::new(self.dev, self.p, n)?;
        let mut out = alloc::<f64>(self.dev, n)?;
        adjoint_matvec(
            self.dev,
            self.p,
            self.w,
            &c.as_view(),
            &f.as_view(),
            &inv_mass,
            &u,
            &mut scratch,
            &mut out,
        )?;
        self.passes += 1;
        Ok(self.dev.clone_dtoh(&out)?)
    }

    fn passes(&self) -> (usize, usize) {
        (self.passes, 0)
    }

    fn epsilon(&self) -> f64 {
        f64::from(f32::EPSILON)
    }
}

/// `forward::newton_fixed_point` on the device: Newton's method from `c0`
/// with [`DeviceMap`]. Returns the centroids (k x d) and the report. The
/// weights' range (which the centroids must keep to) is read once.
pub fn newton_fixed_point(
    dev: &CudaDevice,
    p: &Problem,
    w: &CudaView<f32>,
    c0: &CudaView<f32>,
    settings: Settings,
) -> Result<(CudaSlice<f32>, ForwardReport)> {
    p.check("the initial centroids", c0.len(), p.n())?;
    let start: Vec<f64> = dev.clone_dtoh(c0)?.iter().map(|&x| f64::from(x)).collect();
    let bounds = super::forward::bounds(&dev.clone_dtoh(w)?, p.d);
    let len = p.k * (p.d + 1);
    let mut map = DeviceMap {
        dev,
        p,
        w,
        scratch: Partials::new(dev, p, len)?,
        sums: alloc::<f64>(dev, len)?,
        passes: 0,
    };
    let solution = newton::solve(&mut map, &start, bounds, settings, None, false)?;
    let c: Vec<f32> = solution.c.iter().map(|&x| x as f32).collect();
    Ok((dev.clone_htod(&c)?, solution.report))
}

// ----------------------------------------------------------------------------
// Backward passes (streaming/backward.rs: centroid_cotangent, adjoint_matvec, weight_grad)

/// `h = G_C^T g` (k x d doubles): `streaming::centroid_cotangent`.
pub fn centroid_cotangent(
    dev: &CudaDevice,
    p: &Problem,
    w: &CudaView<f32>,
    c: &CudaView<f32>,
    g: &CudaView<f32>,
    scratch: &mut Partials,
    h: &mut CudaSlice<f64>,
) -> Result<()> {
    p.check("the weights", w.len(), p.m * p.d)?;
    p.check("the centroids", c.len(), p.n())?;
    p.check("the upstream gradient", g.len(), p.m * p.d)?;
    p.check("the cotangent", h.len(), p.n())?;
    p.check(
        "the partial sums",
        scratch.buf.len(),
        scratch.blocks * p.n(),
    )?;
    let f = func(dev, Module::Adjoint, &p.kernel("centroid_cotangent"))?;
    let (m, k) = (p.m_i32(), p.k_i32());
    launch!(
        dev,
        &f,
        (scratch.blocks, BLOCK),
        w,
        c,
        g,
        &m,
        &k,
        &p.inv_tau,
        &p.euclidean,
        &mut scratch.buf
    );
    reduce_partials(dev, &scratch.buf, scratch.blocks, p.n(), h)
}

/// `J^T u` (k x d doubles) at `c` with `f = F(C)`: `streaming::adjoint_matvec`.
#[allow(clippy::too_many_arguments)]
pub fn adjoint_matvec(
    dev: &CudaDevice,
    p: &Problem,
    w: &CudaView<f32>,
    c: &CudaView<f32>,
    f: &CudaView<f32>,
    inv_mass: &CudaSlice<f64>,
    u: &CudaSlice<f64>,
    scratch: &mut Partials,
    out: &mut CudaSlice<f64>,
) -> Result<()> {
    p.check("the weights", w.len(), p.m * p.d)?;
    p.check("the centroids", c.len(), p.n())?;
    p.check("F(C)", f.len(), p.n())?;
    p.check("the inverse masses", inv_mass.len(), p.k)?;
    p.check("the adjoint vector", u.len(), p.n())?;
    p.check("the product", out.len(), p.n())?;
    p.check(
        "the partial sums",
        scratch.buf.len(),
        scratch.blocks * p.n(),
    )?;
    let kernel = func(dev, Module::Adjoint, &p.kernel("adjoint_matvec"))?;
    let (m, k) = (p.m_i32(), p.k_i32());
    launch!(
        dev,
        &kernel,
        (scratch.blocks, BLOCK),
        w,
        c,
        f,
        inv_mass,
        u,
        &m,
        &k,
        &p.inv_tau,
        &p.euclidean,
        &mut scratch.buf
    );
    reduce_partials(dev, &scratch.buf, scratch.blocks, p.n(), out)
}

/// `dL/dW` (m x d) into `out`, direct plus implicit term, for the adjoint `u`
/// (`u = h` gives JFB): `streaming::weight_grad`.
#[allow(clippy::too_many_arguments)]
pub fn weight_grad(
    dev: &CudaDevice,
    p: &Problem,
    w: &CudaView<f32>,
    c: &CudaView<f32>,
    f: &CudaView<f32>,
    g: &CudaView<f32>,
    inv_mass: &CudaSlice<f64>,
    u: &CudaSlice<f64>,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    p.check("the weights", w.len(), p.m * p.d)?;
    p.check("the centroids", c.len(), p.n())?;
    p.check("F(C)", f.len(), p.n())?;
    p.check("the upstream gradient", g.len(), p.m * p.d)?;
    p.check("the inverse masses", inv_mass.len(), p.k)?;
    p.check("the adjoint vector", u.len(), p.n())?;
    p.check("the gradient", out.len(), p.m * p.d)?;
    let kernel = func(dev, Module::Adjoint, &p.kernel("weight_grad"))?;
    let (m, k) = (p.m_i32(), p.k_i32());
    launch!(
        dev,
        &kernel,
        (p.row_blocks(), BLOCK),
        w,
        c,
        f,
        g,
        inv_mass,
        u,
        &m,
        &k,
        &p.inv_tau,
        &p.euclidean,
        out
    );
    Ok(())
}

// ----------------------------------------------------------------------------
// The adjoint solve

/// What the backward needs at the fixed point `c`: the sums of one k-means
/// step (`S_j` are its first k values), `1/S_j` and `F(C)`.
pub struct AtFixedPoint {
    /// `[S (k), sum_i a_ij w_i (k x d)]`.
    pub sums: CudaSlice<f64>,
    /// `1/S_j`, 0 for a dead centroid.
    pub inv_mass: CudaSlice<f64>,
    /// `F(C)` (k x d): `c` at an exact fixed point.
    pub f: CudaSlice<f32>,
}

impl AtFixedPoint {
    /// One `soft_assign_reduce` pass at `c`, then `inverse_mass` and the
    /// k-means update (backward.rs: `moments`, `inv_mass`, `f`).
    pub fn new(
        dev: &CudaDevice,
        p: &Problem,
        w: &CudaView<f32>,
        c: &CudaView<f32>,
    ) -> Result<Self> {
        let len = p.k * (p.d + 1);
        let mut sums = alloc::<f64>(dev, len)?;
        let mut scratch = Partials::new(dev, p, len)?;
        soft_assign_reduce(dev, p, w, c, &mut scratch, &mut sums)?;
        let mut inv_mass = alloc::<f64>(dev, p.k)?;
        inverse_mass(dev, p, &sums, &mut inv_mass)?;
        let mut f = alloc::<f32>(dev, p.n())?;
        let mut shift = alloc::<f64>(dev, 1)?;
        let mut converged = alloc::<u32>(dev, 1)?;
        kmeans_update(dev, p, &sums, c, 0.0, &mut f, &mut shift, &mut converged)?;
        Ok(Self { sums, inv_mass, f })
    }
}

/// The symmetrised adjoint system `B v = h` (backward.rs, Solver::Cg) solved
/// by conjugate gradient on the device; returns `u = D v_best` (k x d) and the
/// report of `solve::conjugate_gradient`.
#[allow(clippy::too_many_arguments)]
pub fn conjugate_gradient(
    dev: &CudaDevice,
    p: &Problem,
    w: &CudaView<f32>,
    c: &CudaView<f32>,
    at: &AtFixedPoint,
    h: &CudaSlice<f64>,
    tol: f64,
    max_steps: usize,
) -> Result<(CudaSlice<f64>, SolveReport)> {
    let n = p.n();
    p.check("the cotangent", h.len(), n)?;
    let max_steps_i32 = max_steps.min(i32::MAX as usize) as i32;
    let (k, d, n_i32, m) = (p.k_i32(), p.d as i32, n as i32, p.m_i32());
    let mut x = alloc::<f64>(dev, n)?;
    let mut r = alloc::<f64>(dev, n)?;
    let mut dir = alloc::<f64>(dev, n)?;
    let mut x_best = alloc::<f64>(dev, n)?;
    let mut state = alloc::<f64>(dev, CG_STATE_LEN)?;
    let mut scratch = Partials::new(dev, p, n)?;
    let mut jt = alloc::<f64>(dev, n)?;
    let (init, matvec, update, finish) = (
        func(dev, Module::Adjoint, "cg_init")?,
        func(dev, Module::Adjoint, &p.kernel("cg_matvec"))?,
        func(dev, Module::Adjoint, "cg_update")?,
        func(dev, Module::Adjoint, "cg_finish")?,
    );
    launch!(
        dev,
        &init,
        (1, CG_BLOCK),
        h,
        &n_i32,
        &max_steps_i32,
        &mut x,
        &mut r,
        &mut dir,
        &mut x_best,
        &mut state
    );
    let one = 1i32;
    let mut launched = 0;
    let mut host_state = dev.clone_dtoh(&state)?;
    while host_state[CG_STATUS] == 0.0 && launched < max_steps {
        for _ in 0..CG_CHECK_EVERY.min(max_steps - launched) {
            launch!(
                dev,
                &matvec,
                (scratch.blocks, BLOCK),
                w,
                c,
                &at.f,
                &at.sums,
                &at.inv_mass,
                &dir,
                &state,
                &m,
                &k,
                &p.inv_tau,
                &p.euclidean,
                &mut scratch.buf
            );
            reduce_partials(dev, &scratch.buf, scratch.blocks, n, &mut jt)?;
            launch!(
                dev,
                &update,
                (1, CG_BLOCK),
                &jt,
                &one,
                &at.sums,
                &at.inv_mass,
                &k,
                &d,
                &tol,
                &max_steps_i32,
                &mut x,
                &mut r,
                &mut dir,
                &mut x_best,
                &mut state
            );
            launched += 1;
        }
        host_state = dev.clone_dtoh(&state)?;
    }
    let mut u = alloc::<f64>(dev, n)?;
    launch!(
        dev,
        &finish,
        (1, CG_BLOCK),
        &at.sums,
        &at.inv_mass,
        &x_best,
        &k,
        &d,
        &mut u
    );
    let rel = host_state[CG_BEST_REL];
    let report = SolveReport {
        steps: host_state[CG_STEPS] as usize,
        rel_residual: rel,
        converged: rel <= tol,
    };
    Ok((u, report))
}

/// GMRES or Neumann (`solver`) with the host solvers of `solve`, each
/// matvec `J^T u` one `adjoint_matvec` pass on the device.
#[allow(clippy::too_many_arguments)]
fn host_solve(
    dev: &CudaDevice,
    p: &Problem,
    w: &CudaView<f32>,
    c: &CudaView<f32>,
    at: &AtFixedPoint,
    h: &CudaSlice<f64>,
    solver: Solver,
    tol: f64,
    max_steps: usize,
) -> Result<(CudaSlice<f64>, SolveReport)> {
    let n = p.n();
    let h_host = dev.clone_dtoh(h)?;
    let mut u_dev = alloc::<f64>(dev, n)?;
    let mut out = alloc::<f64>(dev, n)?;
    let mut scratch = Partials::new(dev, p, n)?;
    let mut failure: Option<candle_core::Error> = None;
    let f = at.f.as_view();
    // The solvers take infallible closures: a CUDA error is kept, the
    // remaining matvecs return NaN (each solver then stops or runs out its
    // few steps without launching anything), and the error is returned.
    let mut jt = |u: &[f64]| -> Vec<f64> {
        if failure.is_some() {
            return vec![f64::NAN; n];
        }
        let mut run = || -> Result<Vec<f64>> {
            dev.memcpy_htod(u, &mut u_dev)?;
            adjoint_matvec(
                dev,
                p,
                w,
                c,
                &f,
                &at.inv_mass,
                &u_dev,
                &mut scratch,
                &mut out,
            )?;
            dev.clone_dtoh(&out)
        };
        match run() {
            Ok(v) => v,
            Err(e) => {
                failure = Some(e);
                vec![f64::NAN; n]
            }
        }
    };
    let (u, report) = match solver {
        Solver::Gmres => {
            let apply = |u: &[f64]| {
                let jtu = jt(u);
                u.iter().zip(jtu).map(|(a, b)| a - b).collect()
            };
            solve::gmres(apply, &h_host, tol, max_steps, GMRES_RESTART)
        }
        Solver::Neumann => solve::neumann(&mut jt, &h_host, tol, max_steps),
        // J^T column by column: n device matvecs of the unit vectors (the
        // CPU assembles it in one pass; there is no kernel for that).
        Solver::Dense | Solver::Auto => {
            let mut columns = vec![0f64; n * n];
            let mut unit = vec![0f64; n];
            for q in 0..n {
                unit[q] = 1.0;
                for (r, x) in jt(&unit).into_iter().enumerate() {
                    columns[r * n + q] = x;
                }
                unit[q] = 0.0;
            }
            solve::dense(&columns, &h_host, tol, n)
        }
        Solver::Cg => unreachable!("CG runs on the device"),
    };
    if let Some(e) = failure {
        return Err(e);
    }
    Ok((dev.clone_htod(&u)?, report))
}

/// `backward::implicit_backward` on the device: `dL/dW` (m x d) for the
/// upstream gradient `g` at the fixed point `c`, and how the adjoint was
/// obtained (with the same log lines and the same fallback policy).
#[allow(clippy::too_many_arguments)]
pub fn implicit_backward(
    dev: &CudaDevice,
    p: &Problem,
    w: &CudaView<f32>,
    c: &CudaView<f32>,
    g: &CudaView<f32>,
    cfg: &BackwardConfig,
    name: &str,
) -> Result<(CudaSlice<f32>, Adjoint)> {
    let at = AtFixedPoint::new(dev, p, w, c)?;
    let mut h = alloc::<f64>(dev, p.n())?;
    {
        let mut scratch = Partials::new(dev, p, p.n())?;
        centroid_cotangent(dev, p, w, c, g, &mut scratch, &mut h)?;
    }
    let (u, adjoint): (Option<CudaSlice<f64>>, Adjoint) = match cfg.method {
        Method::IdkmJfb | Method::Dkm => (None, Adjoint::JacobianFree),
        Method::Idkm => {
            let solver = cfg.solver.resolve(p.n());
            let (u, report) = match solver {
                Solver::Cg => conjugate_gradient(dev, p, w, c, &at, &h, cfg.tol, cfg.max_steps)?,
                _ => host_solve(dev, p, w, c, &at, &h, solver, cfg.tol, cfg.max_steps)?,
            };
            // backward.rs: the same policy and log lines.
            let (adjoint, use_solution) = fallback(report, cfg.tol, name);
            (use_solution.then_some(u), adjoint)
        }
    };
    let mut out = alloc::<f32>(dev, p.m * p.d)?;
    weight_grad(
        dev,
        p,
        w,
        c,
        &at.f.as_view(),
        g,
        &at.inv_mass,
        u.as_ref().unwrap_or(&h),
        &mut out,
    )?;
    Ok((out, adjoint))
}

// ----------------------------------------------------------------------------
// Device memory

/// Bytes in use and the high-water mark of the device's current memory pool,
/// which serves candle's allocations (`cuMemAllocAsync`) on GPUs with memory
/// pools. Allocations made outside the pool (cuBLAS's own workspace) are not
/// counted.
pub fn pool_memory(dev: &CudaDevice) -> Result<(u64, u64)> {
    let pool = pool(dev)?;
    let (mut used, mut high) = (0u64, 0u64);
    // SAFETY: `pool` is the device's pool; each attribute is a u64 (cuuint64_t).
    unsafe {
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
            &mut used as *mut u64 as *mut _,
        )
        .result()
        .w()?;
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            &mut high as *mut u64 as *mut _,
        )
        .result()
        .w()?;
    }
    Ok((used, high))
}

/// Resets the pool's high-water mark to what is in use now (after a
/// synchronisation, so that pending frees are counted).
pub fn reset_pool_peak(dev: &CudaDevice) -> Result<()> {
    dev.synchronize()?;
    let pool = pool(dev)?;
    let mut zero = 0u64;
    // SAFETY: setting USED_MEM_HIGH takes a u64, and only 0 (reset) is allowed.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            &mut zero as *mut u64 as *mut _,
        )
        .result()
        .w()?;
    }
    Ok(())
}

fn pool(dev: &CudaDevice) -> Result<sys::CUmemoryPool> {
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    if !ctx.has_async_alloc() {
        bail!("this GPU has no stream-ordered memory pools: its peak memory cannot be read from the pool");
    }
    let mut pool = std::ptr::null_mut();
    // SAFETY: plain driver query for the device of this context.
    unsafe {
        sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device())
            .result()
            .w()?
    };
    Ok(pool)
}
