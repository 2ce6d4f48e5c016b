//! Training-mode batch norm on the CPU as one op with its own backward,
//! fused with an optional residual add and ReLU:
//! `y = act(gamma * (x - mean) / sqrt(var + eps) + beta [+ residual])`.
//!
//! The forward computes the per-channel statistics in one pass (f64 sums
//! of values shifted by the channel's first value) and the output in a
//! second; the backward reduces `Σ g` and `Σ g (x - mean)` per channel in
//! one pass, where `g` is the output gradient masked by `y > 0` after a
//! ReLU, and writes the input gradient (and the residual's, `g`) in a
//! second. The graph keeps only `x`, the output and the per-channel
//! statistics, against six feature maps for candle-nn's composition.

use super::{cpu_data, Float};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// What follows the normalisation (and the residual add).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Nothing.
    Identity,
    /// `max(0, .)`; its gradient passes where the output is positive.
    Relu,
}

/// Per-channel statistics of a training batch, in the input's dtype.
#[derive(Debug, Clone)]
pub struct BatchStats {
    /// Mean over the batch and spatial positions, shape (C,).
    pub mean: Tensor,
    /// Biased variance (divided by the count), shape (C,).
    pub var: Tensor,
    /// Values per channel: batch times spatial positions.
    pub count: usize,
}

/// The layout of a batch-norm input: `n` images of `c` channels of
/// `plane` values each.
#[derive(Debug, Clone, Copy)]
struct Dims {
    n: usize,
    c: usize,
    plane: usize,
}

impl Dims {
    fn of(shape: &Shape) -> Result<Self> {
        let dims = shape.dims();
        if dims.len() < 2 {
            bail!("batch norm: expected at least (N, C), got {shape:?}")
        }
        let (n, c) = (dims[0], dims[1]);
        let plane = dims[2..].iter().product();
        if n * plane < 2 {
            bail!("batch norm: the unbiased variance needs more than one value per channel, got {shape:?}")
        }
        Ok(Self { n, c, plane })
    }

    fn count(&self) -> usize {
        self.n * self.plane
    }

    /// The values of channel `ch` of image `b`.
    fn plane<'a, T>(&self, data: &'a [T], b: usize, ch: usize) -> &'a [T] {
        &data[(b * self.c + ch) * self.plane..][..self.plane]
    }
}

/// Lanes of the per-channel reductions: independent accumulators, so that
/// the loops vectorise.
const LANES: usize = 8;

/// Values summed in the input's dtype (a sixty-fourth of them per lane)
/// before the partial sums are added up in f64.
const BLOCK: usize = 512;

/// The sum of a lane accumulator, in f64.
fn wide_sum<T: Float>(lanes: &[T; LANES]) -> f64 {
    lanes.iter().map(|x| x.wide()).sum()
}

/// `(Σ v, Σ v²)` of `v = x - shift` over `xs`.
fn shifted_moments<T: Float>(xs: &[T], shift: T) -> (f64, f64) {
    let (mut s1, mut s2) = (0.0, 0.0);
    for block in xs.chunks(BLOCK) {
        let (chunks, rest) = block.as_chunks::<LANES>();
        let (mut u, mut v) = ([T::zero(); LANES], [T::zero(); LANES]);
        for c in chunks {
            for l in 0..LANES {
                let d = c[l] - shift;
                u[l] += d;
                v[l] += d * d;
            }
        }
        for &x in rest {
            let d = x - shift;
            u[0] += d;
            v[0] += d * d;
        }
        s1 += wide_sum(&u);
        s2 += wide_sum(&v);
    }
    (s1, s2)
}

/// `(Σ g, Σ g (x - mean))` over a plane, where `g` is the output gradient
/// `dy` after the activation's mask (from the output `y`; `RELU`).
fn grad_moments<T: Float, const RELU: bool>(xs: &[T], ys: &[T], dy: &[T], mean: T) -> (f64, f64) {
    let (mut s1, mut s2) = (0.0, 0.0);
    for ((xb, yb), gb) in xs.chunks(BLOCK).zip(ys.chunks(BLOCK)).zip(dy.chunks(BLOCK)) {
        let ((xc, xr), (yc, yr), (gc, gr)) = (
            xb.as_chunks::<LANES>(),
            yb.as_chunks::<LANES>(),
            gb.as_chunks::<LANES>(),
        );
        let (mut u, mut v) = ([T::zero(); LANES], [T::zero(); LANES]);
        for ((x, y), g) in xc.iter().zip(yc).zip(gc) {
            for l in 0..LANES {
                let g = masked::<T, RELU>(g[l], y[l]);
                u[l] += g;
                v[l] += g * (x[l] - mean);
            }
        }
        for ((&x, &y), &g) in xr.iter().zip(yr).zip(gr) {
            let g = masked::<T, RELU>(g, y);
            u[0] += g;
            v[0] += g * (x - mean);
        }
        s1 += wide_sum(&u);
        s2 += wide_sum(&v);
    }
    (s1, s2)
}

/// Per-channel mean and biased variance of `x`.
fn channel_stats<T: Float>(d: Dims, x: &[T]) -> Vec<(f64, f64)> {
    (0..d.c)
        .into_par_iter()
        .map(|ch| {
            // Sums of values shifted by one of them: no cancellation when
            // the mean is large against the spread.
            let shift = d.plane(x, 0, ch)[0];
            let (mut s1, mut s2) = (0.0, 0.0);
            for b in 0..d.n {
                let (a, q) = shifted_moments(d.plane(x, b, ch), shift);
                s1 += a;
                s2 += q;
            }
            let m = d.count() as f64;
            let delta = s1 / m;
            (shift.wide() + delta, (s2 / m - delta * delta).max(0.0))
        })
        .collect()
}

/// `act(x * scale + shift [+ residual])` per channel.
fn normalise<T: Float>(
    d: Dims,
    x: &[T],
    residual: Option<&[T]>,
    coef: &[(T, T)],
    act: Activation,
) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(d.c * d.plane)
        .enumerate()
        .for_each(|(b, image)| {
            for (ch, out) in image.chunks_exact_mut(d.plane).enumerate() {
                let (scale, shift) = coef[ch];
                let xs = d.plane(x, b, ch);
                match residual {
                    Some(r) => {
                        let rs = d.plane(r, b, ch);
                        for ((o, &v), &r) in out.iter_mut().zip(xs).zip(rs) {
                            *o = v * scale + shift + r;
                        }
                    }
                    None => {
                        for (o, &v) in out.iter_mut().zip(xs) {
                            *o = v * scale + shift;
                        }
                    }
                }
                if act == Activation::Relu {
                    for o in out.iter_mut() {
                        *o = num_traits::Float::max(*o, T::zero());
                    }
                }
            }
        });
    y
}

/// The output gradient after the activation's mask: `dy`, or with `RELU`
/// `dy` where the output `y` is positive and 0 elsewhere. A select, not a
/// branch, and the activation a constant, so that the loops vectorise (a
/// branch on a flag read in the loop kept the input gradient scalar).
#[inline(always)]
fn masked<T: Float, const RELU: bool>(dy: T, y: T) -> T {
    if RELU && y <= T::zero() {
        T::zero()
    } else {
        dy
    }
}

/// Per channel: `(Σ g, Σ g (x - mean))`.
fn grad_sums<T: Float>(
    d: Dims,
    x: &[T],
    y: &[T],
    dy: &[T],
    mean: &[f64],
    act: Activation,
) -> Vec<(f64, f64)> {
    (0..d.c)
        .into_par_iter()
        .map(|ch| {
            let (mut sg, mut sgx) = (0.0, 0.0);
            let m = T::narrow(mean[ch]);
            for b in 0..d.n {
                let (xs, ys, gs) = (d.plane(x, b, ch), d.plane(y, b, ch), d.plane(dy, b, ch));
                let (a, q) = match act {
                    Activation::Relu => grad_moments::<T, true>(xs, ys, gs, m),
                    Activation::Identity => grad_moments::<T, false>(xs, ys, gs, m),
                };
                sg += a;
                sgx += q;
            }
            (sg, sgx)
        })
        .collect()
}

/// One plane of [`input_grad`]: `dx = g * scale + x * a + c` and, if
/// asked, the residual's gradient `dr = g`.
fn input_grad_plane<T: Float, const RELU: bool>(
    dx: &mut [T],
    dr: Option<&mut [T]>,
    xs: &[T],
    ys: &[T],
    gs: &[T],
    (scale, a, c): (T, T, T),
) {
    for ((dx, &x), (&y, &g)) in dx.iter_mut().zip(xs).zip(ys.iter().zip(gs)) {
        *dx = masked::<T, RELU>(g, y) * scale + x * a + c;
    }
    if let Some(dr) = dr {
        for (r, (&y, &g)) in dr.iter_mut().zip(ys.iter().zip(gs)) {
            *r = masked::<T, RELU>(g, y);
        }
    }
}

/// The input gradient `g * scale + x * a + b` per channel and, with
/// `residual_grad`, the residual's gradient `g`.
fn input_grad<T: Float>(
    d: Dims,
    x: &[T],
    y: &[T],
    dy: &[T],
    coef: &[(T, T, T)],
    act: Activation,
    residual_grad: bool,
) -> (Vec<T>, Option<Vec<T>>) {
    let mut dx = vec![T::zero(); x.len()];
    let mut dr = residual_grad.then(|| vec![T::zero(); x.len()]);
    let image = d.c * d.plane;
    let dr_images: Vec<Option<&mut [T]>> = match dr.as_mut() {
        Some(dr) => dr.chunks_mut(image).map(Some).collect(),
        None => (0..d.n).map(|_| None).collect(),
    };
    dx.par_chunks_mut(image)
        .zip(dr_images)
        .enumerate()
        .for_each(|(b, (dx, mut dr))| {
            for (ch, dxs) in dx.chunks_exact_mut(d.plane).enumerate() {
                let (xs, ys, gs) = (d.plane(x, b, ch), d.plane(y, b, ch), d.plane(dy, b, ch));
                let dr = dr
                    .as_deref_mut()
                    .map(|dr| &mut dr[ch * d.plane..][..d.plane]);
                match act {
                    Activation::Relu => input_grad_plane::<T, true>(dxs, dr, xs, ys, gs, coef[ch]),
                    Activation::Identity => {
                        input_grad_plane::<T, false>(dxs, dr, xs, ys, gs, coef[ch])
                    }
                }
            }
        });
    (dx, dr)
}

/// The contiguous slice of a storage of dtype `T`.
fn slice<'a, T: Float>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("batch norm: expected a contiguous {what}")
    };
    Ok(&T::cpu_storage_as_slice(s)?[start..end])
}

/// Per-channel statistics of the forward pass, kept for the backward and
/// read by the caller for the running statistics.
#[derive(Debug, Clone)]
struct Saved {
    mean: Vec<f64>,
    /// Biased variance.
    var: Vec<f64>,
    inv_std: Vec<f64>,
}

/// `(x (N, C, ...), affine (2, C) [, residual like x]) -> y`: training-mode
/// batch norm with `gamma = affine[0]`, `beta = affine[1]`, then the
/// residual add and the activation, CPU only (f32, f64). As a
/// [`CustomOp2`] without the residual, as a [`CustomOp3`] with it
/// ([`batch_norm_train`] applies it).
#[derive(Debug)]
pub struct BatchNormTrain {
    eps: f64,
    act: Activation,
    saved: Arc<Mutex<Option<Saved>>>,
}

impl BatchNormTrain {
    fn forward<T: Float>(
        &self,
        d: Dims,
        x: &[T],
        affine: &[T],
        residual: Option<&[T]>,
    ) -> Result<Vec<T>> {
        if affine.len() != 2 * d.c {
            bail!(
                "batch norm: affine parameters for {} channels, the input has {}",
                affine.len() / 2,
                d.c
            )
        }
        let stats = channel_stats(d, x);
        let inv_std: Vec<f64> = stats
            .iter()
            .map(|&(_, var)| 1.0 / (var + self.eps).sqrt())
            .collect();
        let coef: Vec<(T, T)> = (0..d.c)
            .map(|ch| {
                let scale = affine[ch].wide() * inv_std[ch];
                (
                    T::narrow(scale),
                    T::narrow(affine[d.c + ch].wide() - stats[ch].0 * scale),
                )
            })
            .collect();
        let y = normalise(d, x, residual, &coef, self.act);
        let (mean, var) = stats.into_iter().unzip();
        *self.saved.lock().expect("saved lock") = Some(Saved { mean, var, inv_std });
        Ok(y)
    }

    fn cpu_forward(
        &self,
        x: (&CpuStorage, &Layout),
        affine: (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = x.1.shape().clone();
        let d = Dims::of(&shape)?;
        if let Some((_, l)) = residual {
            if l.shape() != &shape {
                bail!(
                    "batch norm: residual {:?} for an input {shape:?}",
                    l.shape()
                )
            }
        }
        let out = match x.0 {
            CpuStorage::F32(_) => {
                let r = residual
                    .map(|(s, l)| slice::<f32>(s, l, "residual"))
                    .transpose()?;
                CpuStorage::F32(self.forward(
                    d,
                    slice(x.0, x.1, "input")?,
                    slice(affine.0, affine.1, "affine")?,
                    r,
                )?)
            }
            CpuStorage::F64(_) => {
                let r = residual
                    .map(|(s, l)| slice::<f64>(s, l, "residual"))
                    .transpose()?;
                CpuStorage::F64(self.forward(
                    d,
                    slice(x.0, x.1, "input")?,
                    slice(affine.0, affine.1, "affine")?,
                    r,
                )?)
            }
            s => bail!("batch norm: f32 or f64, got {:?}", s.dtype()),
        };
        Ok((out, shape))
    }

    /// `(dx, d affine, d residual)`.
    fn typed_bwd<T: Float>(
        &self,
        x: &Tensor,
        affine: &Tensor,
        y: &Tensor,
        grad: &Tensor,
        residual: bool,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let d = Dims::of(x.shape())?;
        let saved = self.saved.lock().expect("saved lock").clone();
        let Some(Saved { mean, inv_std, .. }) = saved else {
            bail!("batch norm backward before its forward")
        };
        let (dx, dr, d_affine) = cpu_data::<T, _>("batch norm backward", x, |xs| {
            cpu_data::<T, _>("batch norm backward", affine, |gamma| {
                cpu_data::<T, _>("batch norm backward", y, |ys| {
                    cpu_data::<T, _>("batch norm backward", grad, |dy| {
                        let sums = grad_sums(d, xs, ys, dy, &mean, self.act);
                        let m = d.count() as f64;
                        let mut d_affine = vec![T::zero(); 2 * d.c];
                        let coef: Vec<(T, T, T)> = (0..d.c)
                            .map(|ch| {
                                let (sg, sgx) = sums[ch];
                                let scale = gamma[ch].wide() * inv_std[ch];
                                let a = -scale * inv_std[ch] * inv_std[ch] * sgx / m;
                                let c = -scale * sg / m - a * mean[ch];
                                d_affine[ch] = T::narrow(inv_std[ch] * sgx);
                                d_affine[d.c + ch] = T::narrow(sg);
                                (T::narrow(scale), T::narrow(a), T::narrow(c))
                            })
                            .collect();
                        let (dx, dr) = input_grad(d, xs, ys, dy, &coef, self.act, residual);
                        Ok((dx, dr, d_affine))
                    })
                })
            })
        })?;
        let dev = x.device();
        let dr = dr
            .map(|v| Tensor::from_vec(v, x.shape(), dev))
            .transpose()?;
        Ok((
            Tensor::from_vec(dx, x.shape(), dev)?,
            Tensor::from_vec(d_affine, affine.shape(), dev)?,
            dr,
        ))
    }

    fn bwd_any(
        &self,
        x: &Tensor,
        affine: &Tensor,
        y: &Tensor,
        grad: &Tensor,
        residual: bool,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        match x.dtype() {
            DType::F32 => self.typed_bwd::<f32>(x, affine, y, &grad, residual),
            DType::F64 => self.typed_bwd::<f64>(x, affine, y, &grad, residual),
            dtype => bail!("batch norm backward: f32 or f64, got {dtype:?}"),
        }
    }
}

impl CustomOp2 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_forward((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        affine: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, da, _) = self.bwd_any(x, affine, res, grad, false)?;
        Ok((Some(dx), Some(da)))
    }
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train-residual"
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
        self.cpu_forward((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        affine: &Tensor,
        _residual: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, da, dr) = self.bwd_any(x, affine, res, grad, true)?;
        Ok((Some(dx), Some(da), dr))
    }
}

/// Training-mode batch norm of `x` (N, C, ...) with the per-channel
/// `gamma` and `beta`, then `+ residual` and the activation, on the CPU in
/// f32 and f64 (the [`BatchNormTrain`] op). Returns the output and the
/// batch statistics (for the running ones). Other devices and dtypes are
/// refused: the caller runs candle-nn's batch norm there.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    residual: Option<&Tensor>,
    act: Activation,
    eps: f64,
) -> Result<(Tensor, BatchStats)> {
    if !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::F64) {
        bail!(
            "batch_norm_train: CPU f32 or f64 only, got {:?} {:?}",
            x.device(),
            x.dtype()
        )
    }
    let saved = Arc::new(Mutex::new(None));
    let op = BatchNormTrain {
        eps,
        act,
        saved: saved.clone(),
    };
    let affine = Tensor::stack(&[gamma, beta], 0)?.to_dtype(x.dtype())?;
    let x = x.contiguous()?;
    let y = match residual {
        Some(r) => x.apply_op3(&affine, &r.contiguous()?, op)?,
        None => x.apply_op2(&affine, op)?,
    };
    let Some(Saved { mean, var, .. }) = saved.lock().expect("saved lock").clone() else {
        bail!("batch norm: no statistics")
    };
    let count = Dims::of(x.shape())?.count();
    let channels = mean.len();
    let dev = x.device();
    let stats = BatchStats {
        mean: Tensor::from_vec(mean, channels, dev)?.to_dtype(x.dtype())?,
        var: Tensor::from_vec(var, channels, dev)?.to_dtype(x.dtype())?,
        count,
    };
    Ok((y, stats))
}
