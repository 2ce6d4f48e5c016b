//! Streaming CPU passes of soft k-means: the twins of the CUDA kernels in `kernels/`.
//!
//! Every pass walks the m weight vectors once and recomputes the attention row
//! `a_i = softmax_j(-dist(w_i, c_j) / tau)` on the fly, so no m x k matrix is
//! ever allocated: the extra memory of a pass is O(k d) per thread plus its
//! output. Per-row arithmetic runs in the weights' float type (as the kernels
//! do in registers); every sum over rows is accumulated in f64.
//!
//! Rows are split into chunks whose size depends on m only, each chunk
//! reduces into its own partial sums, and the partials are added in chunk
//! order: the result is bit-for-bit the same whatever the number of threads
//! (the CUDA twin does the same with per-block partials).
//!
//! The formulas are those of `shared/DESIGN.md`. With `e_ij = w_i - c_j`, the
//! derivative of the logit `z_ij` with respect to `w_i` is `coef_ij e_ij`
//! (`coef = -2/tau` for the squared distance, `-1/(tau ||e_ij||)` for the
//! Euclidean one), and for a per-(i,j) scalar `x_ij` the centred weight is
//! `xc_ij = a_ij (x_ij - sum_l a_il x_il)`.

use super::config::Distance;
use rayon::prelude::*;
use std::ops::Range;

/// Float types the passes run on: `f32` (training) and `f64` (gradient checks).
pub trait Real:
    num_traits::Float + candle_core::WithDType + std::fmt::Debug
{
    /// Converts from f64, rounding to nearest.
    fn of(x: f64) -> Self;
    /// Widens to f64.
    fn wide(self) -> f64;
}

impl Real for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }
    fn wide(self) -> f64 {
        self as f64
    }
}

impl Real for f64 {
    fn of(x: f64) -> Self {
        x
    }
    fn wide(self) -> f64 {
        self
    }
}

/// Shape of the clustering problem: `k` centroids of dimension `d`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Geometry {
    /// Number of centroids.
    pub k: usize,
    /// Dimension of a weight vector and of a centroid.
    pub d: usize,
    /// Softmax temperature.
    pub tau: f64,
    /// Distance in the logits.
    pub distance: Distance,
}

/// A centroid whose attention mass is below this attracts no weight: it is
/// kept fixed in the forward pass and treated as a constant in the backward
/// pass (its `1/S_j` is taken as 0).
pub const DEAD_MASS: f64 = 1e-6;

/// Soft-assignment sums of one k-means step.
#[derive(Clone, Debug, PartialEq)]
pub struct Moments {
    /// `S_j = sum_i a_ij` (k).
    pub mass: Vec<f64>,
    /// `sum_i a_ij w_i` (k x d, row-major).
    pub weighted: Vec<f64>,
}

impl Moments {
    /// `1/S_j`, or 0 for a dead centroid (see [`DEAD_MASS`]).
    pub fn inverse_mass(&self) -> Vec<f64> {
        self.mass
            .iter()
            .map(|&s| if s > DEAD_MASS { 1.0 / s } else { 0.0 })
            .collect()
    }

    /// Number of dead centroids.
    pub fn dead(&self) -> usize {
        self.mass.iter().filter(|&&s| s <= DEAD_MASS).count()
    }

    /// The k-means update `F(C)_j = sum_i a_ij w_i / S_j` written into `next`
    /// (dead centroids keep their value from `c`). Returns the largest
    /// Euclidean distance a centroid moved.
    pub fn update<T: Real>(&self, c: &[T], next: &mut [T], d: usize) -> f64 {
        let mut shift = 0f64;
        for (j, (cj, nj)) in c.chunks_exact(d).zip(next.chunks_exact_mut(d)).enumerate() {
            let s = self.mass[j];
            let mut moved = 0f64;
            for e in 0..d {
                let v = if s > DEAD_MASS { self.weighted[j * d + e] / s } else { cj[e].wide() };
                moved += (v - cj[e].wide()).powi(2);
                nj[e] = T::of(v);
            }
            shift = shift.max(moved.sqrt());
        }
        shift
    }
}

// ----------------------------------------------------------------------------
// Rows and chunks

/// At most this many chunks: bounds the memory of the per-chunk partial sums.
const MAX_CHUNKS: usize = 128;
/// At least this many rows per chunk: amortises the per-chunk scratch.
const MIN_CHUNK_ROWS: usize = 1024;

/// Rows per chunk for m rows; a function of m only (determinism).
fn chunk_rows(m: usize) -> usize {
    MIN_CHUNK_ROWS.max(m.div_ceil(MAX_CHUNKS))
}

/// Sums `len` f64 values over all rows: `body(rows, partial)` adds the
/// contribution of `rows` into `partial`; chunk partials are added in order.
fn sum_rows(m: usize, len: usize, body: impl Fn(Range<usize>, &mut [f64]) + Sync) -> Vec<f64> {
    let chunk = chunk_rows(m);
    let partials: Vec<Vec<f64>> = (0..m.div_ceil(chunk))
        .into_par_iter()
        .map(|n| {
            let mut partial = vec![0f64; len];
            body(n * chunk..m.min((n + 1) * chunk), &mut partial);
            partial
        })
        .collect();
    let mut total = vec![0f64; len];
    for partial in partials {
        total.iter_mut().zip(partial).for_each(|(t, p)| *t += p);
    }
    total
}

/// Runs `body(rows, out_rows)` over chunks of rows, in parallel, where
/// `out_rows` is the slice of `out` (`width` values a row) for those rows.
fn map_rows<O: Send>(out: &mut [O], width: usize, body: impl Fn(Range<usize>, &mut [O]) + Sync) {
    let m = out.len() / width;
    let chunk = chunk_rows(m);
    out.par_chunks_mut(chunk * width)
        .enumerate()
        .for_each(|(n, rows)| body(n * chunk..n * chunk + rows.len() / width, rows));
}

/// The attention row of one weight vector, with the logit derivatives.
struct Row<T> {
    /// `a_ij` (k).
    a: Vec<T>,
    /// `coef_ij` with `dz_ij/dw_i = coef_ij e_ij` (k).
    coef: Vec<T>,
}

impl<T: Real> Row<T> {
    fn new(k: usize) -> Self {
        Self { a: vec![T::zero(); k], coef: vec![T::zero(); k] }
    }

    /// Computes `a_i.` and `coef_i.` for the weight vector `w` against all
    /// centroids `c` (k x d). The softmax subtracts the row maximum.
    fn attend(&mut self, w: &[T], c: &[T], geo: &Geometry) {
        let inv_tau = T::of(1.0 / geo.tau);
        let two = T::of(2.0);
        let mut zmax = T::neg_infinity();
        for ((cj, a), coef) in c.chunks_exact(geo.d).zip(&mut self.a).zip(&mut self.coef) {
            let mut e2 = T::zero();
            for (&we, &ce) in w.iter().zip(cj) {
                e2 = e2 + (we - ce) * (we - ce);
            }
            let z = match geo.distance {
                Distance::Squared => {
                    *coef = -two * inv_tau;
                    -e2 * inv_tau
                }
                Distance::Euclidean => {
                    let dist = e2.sqrt();
                    *coef = if dist > T::zero() { -inv_tau / dist } else { T::zero() };
                    -dist * inv_tau
                }
            };
            *a = z;
            zmax = num_traits::Float::max(zmax, z);
        }
        let mut sum = T::zero();
        for a in &mut self.a {
            *a = (*a - zmax).exp();
            sum = sum + *a;
        }
        let inv_sum = sum.recip();
        for a in &mut self.a {
            *a = *a * inv_sum;
        }
    }
}

/// `(w - cj) . v` for the row's weight vector `w` and a centroid `cj`.
#[inline]
fn dot_e<T: Real>(w: &[T], cj: &[T], v: &[T]) -> T {
    let mut s = T::zero();
    for ((&we, &ce), &ve) in w.iter().zip(cj).zip(v) {
        s = s + (we - ce) * ve;
    }
    s
}

/// Centred weights `xc_j = a_j (x_j - sum_l a_l x_l)`, in place.
#[inline]
fn centre<T: Real>(a: &[T], x: &mut [T]) {
    let mean = a.iter().zip(x.iter()).fold(T::zero(), |s, (&a, &x)| s + a * x);
    for (x, &a) in x.iter_mut().zip(a) {
        *x = a * (*x - mean);
    }
}

fn to_real<T: Real>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::of(x)).collect()
}

// ----------------------------------------------------------------------------
// Forward passes

/// Soft-assignment and reduce (one k-means step's sums).
///
/// `w`: m x d, `c`: k x d. Kernel: `soft_assign_reduce`.
pub fn soft_assign_reduce<T: Real>(w: &[T], c: &[T], geo: &Geometry) -> Moments {
    let (k, d) = (geo.k, geo.d);
    let sums = sum_rows(w.len() / d, k * (d + 1), |rows, acc| {
        let (mass, weighted) = acc.split_at_mut(k);
        let mut row = Row::new(k);
        for i in rows {
            let wi = &w[i * d..(i + 1) * d];
            row.attend(wi, c, geo);
            for (j, &a) in row.a.iter().enumerate() {
                let a = a.wide();
                mass[j] += a;
                for (acc, &we) in weighted[j * d..(j + 1) * d].iter_mut().zip(wi) {
                    *acc += a * we.wide();
                }
            }
        }
    });
    let (mass, weighted) = sums.split_at(k);
    Moments { mass: mass.to_vec(), weighted: weighted.to_vec() }
}

/// Runs k-means steps from `c0` until no centroid moves more than `tol` or
/// `max_iter` steps are done. Returns the centroids, the moments at them and
/// the number of steps. Kernel: `soft_assign_reduce` once per step.
pub fn fixed_point<T: Real>(
    w: &[T],
    c0: &[T],
    geo: &Geometry,
    max_iter: usize,
    tol: f64,
) -> (Vec<T>, usize, f64) {
    let mut c = c0.to_vec();
    let mut next = c0.to_vec();
    let mut shift = f64::INFINITY;
    let mut steps = 0;
    while steps < max_iter {
        let moments = soft_assign_reduce(w, &c, geo);
        shift = moments.update(&c, &mut next, geo.d);
        std::mem::swap(&mut c, &mut next);
        steps += 1;
        if shift <= tol {
            break;
        }
    }
    (c, steps, shift)
}

/// The soft-clustered weights `Wt_i = sum_j a_ij c_j` written into `out` (m x d).
/// Kernel: `soft_assign_output`.
pub fn soft_assign_output<T: Real>(w: &[T], c: &[T], geo: &Geometry, out: &mut [T]) {
    let d = geo.d;
    map_rows(out, d, |rows, out| {
        let mut row = Row::new(geo.k);
        for (i, oi) in rows.zip(out.chunks_exact_mut(d)) {
            row.attend(&w[i * d..(i + 1) * d], c, geo);
            oi.fill(T::zero());
            for (&a, cj) in row.a.iter().zip(c.chunks_exact(d)) {
                for (o, &ce) in oi.iter_mut().zip(cj) {
                    *o = *o + a * ce;
                }
            }
        }
    });
}

/// Hard assignment `index_i = argmin_j dist(w_i, c_j)` (ties go to the lower
/// index). Kernel: `hard_assign`.
pub fn hard_assign<T: Real>(w: &[T], c: &[T], d: usize, out: &mut [u32]) {
    map_rows(out, 1, |rows, out| {
        for (i, oi) in rows.zip(out.iter_mut()) {
            let wi = &w[i * d..(i + 1) * d];
            let mut best = (T::infinity(), 0u32);
            for (j, cj) in c.chunks_exact(d).enumerate() {
                let e2 = wi.iter().zip(cj).fold(T::zero(), |s, (&a, &b)| s + (a - b) * (a - b));
                if e2 < best.0 {
                    best = (e2, j as u32);
                }
            }
            *oi = best.1;
        }
    });
}

// ----------------------------------------------------------------------------
// Backward passes

/// Centroid cotangent `h = G_C^T g`:
/// `h_j = sum_i a_ij g_i - sum_i qc_ij coef_ij e_ij` with `q_ij = g_i . c_j`.
///
/// `g`: m x d upstream gradient. Returns k x d. Kernel: `centroid_cotangent`.
pub fn centroid_cotangent<T: Real>(w: &[T], c: &[T], g: &[T], geo: &Geometry) -> Vec<f64> {
    let (k, d) = (geo.k, geo.d);
    sum_rows(w.len() / d, k * d, |rows, h| {
        let mut row = Row::new(k);
        let mut q = vec![T::zero(); k];
        for i in rows {
            let (wi, gi) = (&w[i * d..(i + 1) * d], &g[i * d..(i + 1) * d]);
            row.attend(wi, c, geo);
            for (qj, cj) in q.iter_mut().zip(c.chunks_exact(d)) {
                *qj = gi.iter().zip(cj).fold(T::zero(), |s, (&a, &b)| s + a * b);
            }
            centre(&row.a, &mut q);
            for (j, cj) in c.chunks_exact(d).enumerate() {
                let (a, t) = (row.a[j], q[j] * row.coef[j]);
                for e in 0..d {
                    h[j * d + e] += (a * gi[e] - t * (wi[e] - cj[e])).wide();
                }
            }
        }
    })
}

/// One Krylov matvec: `(J^T u)_j = -sum_i rc_ij coef_ij e_ij` with
/// `r_ij = u_j . (w_i - f_j) / S_j`, where `f = F(C)` is the k-means map at
/// `c` (equal to `c` at an exact fixed point; using it keeps the Jacobian
/// exact when the forward iteration stopped early) and `inv_mass` holds
/// `1/S_j` (0 for a dead centroid). Returns k x d. Kernel: `adjoint_matvec`.
pub fn adjoint_matvec<T: Real>(
    w: &[T],
    c: &[T],
    f: &[T],
    inv_mass: &[f64],
    u: &[f64],
    geo: &Geometry,
) -> Vec<f64> {
    let (k, d) = (geo.k, geo.d);
    let v: Vec<T> = to_real(&scale_rows(u, inv_mass, d));
    sum_rows(w.len() / d, k * d, |rows, out| {
        let mut row = Row::new(k);
        let mut r = vec![T::zero(); k];
        for i in rows {
            let wi = &w[i * d..(i + 1) * d];
            row.attend(wi, c, geo);
            for ((rj, fj), vj) in r.iter_mut().zip(f.chunks_exact(d)).zip(v.chunks_exact(d)) {
                *rj = dot_e(wi, fj, vj);
            }
            centre(&row.a, &mut r);
            for (j, cj) in c.chunks_exact(d).enumerate() {
                let t = r[j] * row.coef[j];
                for e in 0..d {
                    out[j * d + e] -= (t * (wi[e] - cj[e])).wide();
                }
            }
        }
    })
}

/// The weight gradient, direct plus implicit term, written into `out` (m x d):
/// `sum_j qc_ij coef_ij e_ij + sum_j (a_ij / S_j) u_j + sum_j rc_ij coef_ij e_ij`,
/// with `r_ij` as in [`adjoint_matvec`] (`f = F(C)`). With `u = h` this is
/// the JFB gradient. Kernel: `weight_grad`.
pub fn weight_grad<T: Real>(
    w: &[T],
    c: &[T],
    f: &[T],
    g: &[T],
    inv_mass: &[f64],
    u: &[f64],
    geo: &Geometry,
    out: &mut [T],
) {
    let (k, d) = (geo.k, geo.d);
    let v: Vec<T> = to_real(&scale_rows(u, inv_mass, d));
    map_rows(out, d, |rows, out| {
        let mut row = Row::new(k);
        let mut q = vec![T::zero(); k];
        let mut r = vec![T::zero(); k];
        for (i, oi) in rows.zip(out.chunks_exact_mut(d)) {
            let (wi, gi) = (&w[i * d..(i + 1) * d], &g[i * d..(i + 1) * d]);
            row.attend(wi, c, geo);
            for (j, ((cj, fj), vj)) in c.chunks_exact(d).zip(f.chunks_exact(d)).zip(v.chunks_exact(d)).enumerate() {
                q[j] = gi.iter().zip(cj).fold(T::zero(), |s, (&a, &b)| s + a * b);
                r[j] = dot_e(wi, fj, vj);
            }
            centre(&row.a, &mut q);
            centre(&row.a, &mut r);
            oi.fill(T::zero());
            for (j, (cj, vj)) in c.chunks_exact(d).zip(v.chunks_exact(d)).enumerate() {
                let t = (q[j] + r[j]) * row.coef[j];
                let a = row.a[j];
                for e in 0..d {
                    oi[e] = oi[e] + t * (wi[e] - cj[e]) + a * vj[e];
                }
            }
        }
    });
}

/// `u_j / S_j` for every centroid j (k x d), with `inv_mass = 1/S`.
pub fn scale_rows(u: &[f64], inv_mass: &[f64], d: usize) -> Vec<f64> {
    u.chunks_exact(d)
        .zip(inv_mass)
        .flat_map(|(uj, &s)| uj.iter().map(move |&x| x * s))
        .collect()
}
