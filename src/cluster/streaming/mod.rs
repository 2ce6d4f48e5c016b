//! Streaming CPU passes of soft k-means: the twins of the CUDA kernels in `kernels/`.
//!
//! Every pass walks the m weight vectors once and recomputes the attention row
//! `a_i = softmax_j(-dist(w_i, c_j) / tau)` on the fly, so no m x k matrix is
//! ever allocated: the extra memory of a pass is O(k d) per thread plus its
//! output. Per-row arithmetic runs in the weights' float type (as the kernels
//! do in registers); sums over rows are accumulated in f64 (after at most
//! `FOLD` terms in the float type).
//!
//! Rows are split into chunks whose size depends on m only, each chunk
//! reduces into its own partial sums, and the partials are added in chunk
//! order: the result is bit-for-bit the same whatever the number of threads
//! (the CUDA twin does the same with per-block partials).
//!
//! Within a chunk the rows are processed in tiles of up to `TILE`
//! consecutive rows, and every per-row quantity of a tile is held as a slice
//! with one lane per row (`lanes[x * TILE + r]` for quantity x, row r). The
//! per-row work is then a loop over the centroids (in centroid order, as a
//! scalar loop would do it) whose body is a few simple element-wise loops
//! over the lanes, which the compiler turns into SIMD instructions across
//! rows. Each chunk runs the widest instruction set the CPU offers among
//! those compiled in (`run_chunk`); no multiply and add are ever fused, so
//! the results do not depend on it. A sum over rows adds each lane's terms
//! for `FOLD` tiles in the float type and then in f64 (`LaneSums`).
//!
//! With scalar weights (d = 1), at least 8 centroids and the centroids in
//! ascending order (as the clustered layer keeps them on the CPU), a chunk's
//! rows are visited in order of value and each tile attends only to the
//! centroids within reach of its rows: those whose logits are not at least
//! `ln k + (p + 8) ln 2` below every row's maximum (p: the float type's
//! mantissa bits), so the dropped terms stay under a rounding of the row's
//! sums (see `Visit`). At a temperature matched to the centroid spacing a
//! tile then attends to a few dozen of 256 centroids; at a large one, to
//! all of them, as the kernels always do.
//!
//! The formulas are those of `docs/design.md`. With `e_ij = w_i - c_j`, the
//! derivative of the logit `z_ij` with respect to `w_i` is `coef_ij e_ij`
//! (`coef = -2/tau` for the squared distance, `-1/(tau ||e_ij||)` for the
//! Euclidean one), and for a per-(i,j) scalar `x_ij` the centred weight is
//! `xc_ij = a_ij (x_ij - sum_l a_il x_il)`.

mod backward;
mod curvature;
mod dispatch;
mod forward;
mod tile;
mod visit;

pub use backward::{
    adjoint_matrix, adjoint_matvec, centroid_cotangent, cotangent_reduce, counted_adjoint_matrix,
    weight_grad,
};
pub use curvature::reduce_energy_curvature;
pub use forward::{
    counted_reduce, counted_reduce_energy, fixed_point, hard_assign, soft_assign_output,
    soft_assign_reduce,
};
pub use visit::{cutoff, windowed};

use dispatch::*;
use tile::*;
use visit::*;

use super::config::Distance;
use rayon::prelude::*;
use std::ops::{BitAnd, BitOr, Not, Range};

/// Float types the passes run on: `f32` (training) and `f64` (gradient checks).
pub trait Real: num_traits::Float + candle_core::WithDType + std::fmt::Debug {
    /// Converts from f64, rounding to nearest.
    fn of(x: f64) -> Self;
    /// Widens to f64.
    fn wide(self) -> f64;
    /// `e^x` for the softmax, where `x <= 0`.
    ///
    /// `f64`: the library `exp`. `f32`: a branch-free polynomial that the
    /// compiler vectorises, within one ulp of `e^x` on `[-80, 0]` (relative
    /// error below 1e-7) and 0 below -80: `e^-80 = 1.8e-35` is far below what
    /// a softmax term can add to a row whose largest term is 1, and flushing
    /// keeps the products of the attention out of the subnormal range, where
    /// the CPU is slow.
    fn softmax_exp(self) -> Self;
    /// The values of `w` in ascending order (that of `total_cmp`).
    fn sorted(w: &[Self]) -> Vec<Self>;
}

/// Keys whose median [`sorted_by_bits`] estimates to split the keys in two.
const PIVOT_SAMPLE: usize = 1024;

/// `w` sorted as unsigned integers in the order of the values: the bits
/// (`to_bits`, with the sign bit `sign`) of a negative value all flipped,
/// of the others with the sign bit set; `from_bits` maps them back. The
/// keys are split at the median of a sample (the lower ones to the front
/// of the buffer, the others to its back, without a branch), and each part
/// is radix sorted on a thread of its own: 2.4 million Student-t f32 in
/// 26-39 ms, against 46-62 ms for a parallel comparison sort of the same
/// keys and 35-45 ms for one radix sort of them all (2 cores). The keys'
/// buffer becomes the result's.
fn sorted_by_bits<F, K>(w: &[F], to_bits: fn(F) -> K, from_bits: fn(K) -> F, sign: K) -> Vec<F>
where
    F: Send + Sync + Copy,
    K: radsort::Key
        + Ord
        + Send
        + Sync
        + Copy
        + Default
        + Not<Output = K>
        + BitAnd<Output = K>
        + BitOr<Output = K>,
{
    let zero = K::default();
    let key = |x: F| match to_bits(x) {
        b if b & sign != zero => !b,
        b => b | sign,
    };
    let mut sample: Vec<K> = w
        .iter()
        .step_by((w.len() / PIVOT_SAMPLE).max(1))
        .map(|&x| key(x))
        .collect();
    sample.sort_unstable();
    let Some(&pivot) = sample.get(sample.len() / 2) else {
        return Vec::new();
    };
    let mut keys = vec![zero; w.len()];
    // Each key is written at both ends; the end whose part it joins moves
    // on, and the other copy is overwritten by the next key.
    let (mut low, mut high) = (0, w.len());
    for &x in w {
        let k = key(x);
        keys[low] = k;
        keys[high - 1] = k;
        let below = k < pivot;
        low += usize::from(below);
        high -= usize::from(!below);
    }
    let (below, above) = keys.split_at_mut(low);
    rayon::join(|| radsort::sort(below), || radsort::sort(above));
    keys.into_iter()
        .map(|k| from_bits(if k & sign != zero { k & !sign } else { !k }))
        .collect()
}

impl Real for f32 {
    #[inline(always)]
    fn of(x: f64) -> Self {
        x as f32
    }

    #[inline(always)]
    fn wide(self) -> f64 {
        self as f64
    }

    #[inline(always)]
    fn softmax_exp(self) -> Self {
        // e^x = 2^n e^r with n = round(x / ln 2), |r| <= ln 2 / 2 (Cephes expf).
        const LO: f32 = -80.0;
        const HI: f32 = 88.0;
        // Adding 1.5 * 2^23 rounds |y| < 2^22 to an integer, which then sits
        // in the low mantissa bits of the sum.
        const SHIFTER: f32 = 12_582_912.0;
        const SHIFTER_BITS: u32 = 0x4B40_0000;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        let x = self.clamp(LO, HI);
        let t = x * std::f32::consts::LOG2_E + SHIFTER;
        let n = t - SHIFTER;
        let r = (x - n * LN2_HI) - n * LN2_LO;
        let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
            * r
            + 1.666_666_5e-1)
            * r
            + 0.5;
        let y = p * r * r + r + 1.0;
        // 2^n from the biased exponent n + 127 (in 12..=254 after the clamp).
        let two_n = f32::from_bits(t.to_bits().wrapping_sub(SHIFTER_BITS - 127) << 23);
        if self < LO {
            0.0
        } else {
            y * two_n
        }
    }

    fn sorted(w: &[Self]) -> Vec<Self> {
        sorted_by_bits(w, f32::to_bits, f32::from_bits, 1 << 31)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn of(x: f64) -> Self {
        x
    }

    #[inline(always)]
    fn wide(self) -> f64 {
        self
    }

    #[inline(always)]
    fn softmax_exp(self) -> Self {
        self.exp()
    }

    fn sorted(w: &[Self]) -> Vec<Self> {
        sorted_by_bits(w, f64::to_bits, f64::from_bits, 1 << 63)
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
    /// Euclidean distance a centroid moved, measured on the stored (rounded)
    /// values: 0 exactly when `next == c`, where every further step would
    /// repeat this one.
    pub fn update<T: Real>(&self, c: &[T], next: &mut [T], d: usize) -> f64 {
        let mut shift = 0f64;
        for (j, (cj, nj)) in c.chunks_exact(d).zip(next.chunks_exact_mut(d)).enumerate() {
            let s = self.mass[j];
            let mut moved = 0f64;
            for e in 0..d {
                nj[e] = if s > DEAD_MASS {
                    T::of(self.weighted[j * d + e] / s)
                } else {
                    cj[e]
                };
                moved += (nj[e].wide() - cj[e].wide()).powi(2);
            }
            shift = shift.max(moved.sqrt());
        }
        shift
    }
}

#[cfg(test)]
mod tests {
    use super::backward::*;
    use super::forward::*;
    use super::*;

    /// Scalar hard assignment by value order gives the index that comparing
    /// with every centroid gives, ties (duplicate centroids, weights at a
    /// midpoint or on a centroid, signed zeros) to the lowest index.
    #[test]
    fn scalar_hard_assignment_matches_the_exhaustive_one() {
        let mut c: Vec<f32> = uniform(37, 5);
        c[7] = c[3];
        c[20] = c[3];
        c[11] = 0.0;
        c[12] = -0.0;
        let mut w = uniform(4000, 6);
        w[0] = 0.5 * (c[3] + c[9]);
        w[1] = c[20];
        w[2] = -0.0;
        w[3] = 2.0;
        w[4] = -2.0;
        for k in [1, 2, 37] {
            let c = &c[..k];
            let mut fast = vec![u32::MAX; w.len()];
            hard_assign(&w, c, 1, &mut fast);
            let mut all = vec![u32::MAX; w.len()];
            map_rows(&mut all, &HardAssign { w: &w, c, d: 1 });
            assert_eq!(fast, all, "k = {k}");
        }
        // Far from tiny centroids every distance rounds to the same value:
        // the lowest index, not the nearest value.
        let (far, tiny) = ([1000.0f32, -1000.0], [3e-9f32, 1e-9, 2e-9]);
        let mut fast = vec![u32::MAX; 2];
        hard_assign(&far, &tiny, 1, &mut fast);
        assert_eq!(fast, [0, 0]);
        let (w64, c64): (Vec<f64>, Vec<f64>) = (
            w.iter().map(|&x| f64::from(x)).collect(),
            c.iter().map(|&x| f64::from(x)).collect(),
        );
        let mut fast = vec![0; w.len()];
        hard_assign(&w64, &c64, 1, &mut fast);
        let mut all = vec![0; w.len()];
        map_rows(
            &mut all,
            &HardAssign {
                w: &w64,
                c: &c64,
                d: 1,
            },
        );
        assert_eq!(fast, all);
    }

    /// `n` values uniform in [-1, 1), from a fixed linear congruential sequence.
    fn uniform(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn softmax_exp_is_within_one_ulp() {
        let mut worst = 0f64;
        for n in 0..=800_000 {
            let x = -80.0 * n as f32 / 800_000.0;
            let exact = (x as f64).exp();
            worst = worst.max(((x.softmax_exp() as f64) - exact).abs() / exact);
        }
        assert!(worst < f32::EPSILON as f64, "relative error {worst:e}");
        assert_eq!((-80.5f32).softmax_exp(), 0.0);
        assert_eq!(f32::NEG_INFINITY.softmax_exp(), 0.0);
        assert_eq!(0f32.softmax_exp(), 1.0);
    }

    /// Runs `pass` on rows `0..m` with every instruction-set version of
    /// [`Pass::chunk`] the CPU supports, on `len` outputs set to `zero`.
    fn every_version<P: Pass>(pass: &P, m: usize, len: usize, zero: P::Out) -> Vec<Vec<P::Out>>
    where
        P::Out: Clone,
    {
        let run = |f: &dyn Fn(&mut [P::Out])| {
            let mut out = vec![zero.clone(); len];
            f(&mut out);
            out
        };
        #[allow(unused_mut)]
        let mut all = vec![run(&|out| pass.chunk(0..m, out))];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2 (checked just above).
                all.push(run(&|out| unsafe { chunk_avx2(pass, 0..m, out) }));
            }
            if has_avx512() {
                // SAFETY: the CPU supports the features (checked just above).
                all.push(run(&|out| unsafe { chunk_avx512(pass, 0..m, out) }));
            }
        }
        all
    }

    fn assert_same<O: PartialEq + std::fmt::Debug>(what: &str, versions: Vec<Vec<O>>) {
        for (n, v) in versions.iter().enumerate().skip(1) {
            assert!(
                v == &versions[0],
                "{what}: version {n} differs from the baseline"
            );
        }
    }

    fn versions_agree<const D: usize>(distance: Distance) {
        // 777 rows: full tiles, a partial one, and several folds.
        let (m, k) = (777, 5);
        let geo = Geometry {
            k,
            d: D,
            tau: 0.3,
            distance,
        };
        let (w, g) = (uniform(m * D, 1), uniform(m * D, 2));
        let (c, v) = (uniform(k * D, 3), uniform(k * D, 4));
        let f: Vec<f32> = c
            .iter()
            .zip(uniform(k * D, 5))
            .map(|(c, x)| c + 0.01 * x)
            .collect();
        let (w, g, c, f, v) = (
            vectors::<_, D>(&w),
            vectors(&g),
            vectors(&c),
            vectors(&f),
            vectors(&v),
        );
        let label = |pass| format!("{pass} d={D} {distance:?}");
        assert_same(
            &label("reduce"),
            every_version(
                &Reduce {
                    w,
                    count: &[],
                    c,
                    geo: &geo,
                    energy: true,
                },
                m,
                k * (D + 1) + 1,
                0.0,
            ),
        );
        assert_same(
            &label("output"),
            every_version(&Output { w, c, geo: &geo }, m, m, [0.0; D]),
        );
        assert_same(
            &label("cotangent"),
            every_version(&Cotangent { w, c, g, geo: &geo }, m, k * (2 * D + 1), 0.0),
        );
        assert_same(
            &label("matvec"),
            every_version(
                &Matvec {
                    w,
                    c,
                    f,
                    v,
                    geo: &geo,
                },
                m,
                k * D,
                0.0,
            ),
        );
        assert_same(
            &label("grad"),
            every_version(
                &Grad {
                    w,
                    c,
                    f,
                    g,
                    v,
                    geo: &geo,
                },
                m,
                m,
                [0.0; D],
            ),
        );
    }

    /// Every pass at ascending centroids (windowed tiles) against the same
    /// pass at the centroids in descending order (no windows), with the
    /// per-centroid results put back in ascending order. Returns the largest
    /// difference relative to the largest magnitude of each result.
    fn windowed_vs_full<T: Real>(w: &[T], g: &[T], c: &[T], geo: &Geometry) -> f64 {
        let k = geo.k;
        let rev = |x: &[T]| x.iter().rev().copied().collect::<Vec<T>>();
        let f: Vec<T> = c
            .iter()
            .zip(uniform(k, 7))
            .map(|(&c, x)| c + T::of(1e-4 * x as f64))
            .collect();
        let u: Vec<f64> = uniform(k, 8).iter().map(|&x| x as f64).collect();
        let (cr, fr, ur) = (
            rev(c),
            rev(&f),
            u.iter().rev().copied().collect::<Vec<f64>>(),
        );
        let back = |x: Vec<f64>| {
            x.chunks_exact(k)
                .flat_map(|b| b.iter().rev().copied().collect::<Vec<_>>())
                .collect::<Vec<_>>()
        };
        let mut worst = 0f64;
        let mut compare = |what: &str, a: &[f64], b: &[f64]| {
            assert_eq!(a.len(), b.len(), "{what}");
            let scale = b
                .iter()
                .fold(0f64, |s, x| s.max(x.abs()))
                .max(f64::MIN_POSITIVE);
            let diff = a.iter().zip(b).fold(0f64, |s, (x, y)| s.max((x - y).abs())) / scale;
            worst = worst.max(diff);
            eprintln!("{what}: {diff:e}");
        };
        let (mw, mf) = (
            soft_assign_reduce(w, c, geo),
            soft_assign_reduce(w, &cr, geo),
        );
        compare("mass", &mw.mass, &back(mf.mass.clone()));
        compare("weighted", &mw.weighted, &back(mf.weighted.clone()));
        let inv = mw.inverse_mass();
        let inv_r: Vec<f64> = inv.iter().rev().copied().collect();
        let widen = |x: Vec<T>| x.iter().map(|v| v.wide()).collect::<Vec<f64>>();
        let (mut ow, mut of) = (vec![T::zero(); w.len()], vec![T::zero(); w.len()]);
        soft_assign_output(w, c, geo, &mut ow);
        soft_assign_output(w, &cr, geo, &mut of);
        compare("output", &widen(ow), &widen(of));
        let (hw, hf) = (
            centroid_cotangent(w, c, g, geo),
            centroid_cotangent(w, &cr, g, geo),
        );
        compare("cotangent", &hw, &back(hf));
        let (vw, vf) = (
            adjoint_matvec(w, c, &f, &inv, &u, geo),
            adjoint_matvec(w, &cr, &fr, &inv_r, &ur, geo),
        );
        compare("matvec", &vw, &back(vf));
        let (jw, jf) = (
            adjoint_matrix(w, c, &f, &inv, geo),
            adjoint_matrix(w, &cr, &fr, &inv_r, geo),
        );
        let jf: Vec<f64> = jf
            .chunks_exact(k)
            .rev()
            .flat_map(|row| row.iter().rev().copied().collect::<Vec<_>>())
            .collect();
        compare("matrix", &jw, &jf);
        let (mut gw, mut gf) = (vec![T::zero(); w.len()], vec![T::zero(); w.len()]);
        weight_grad(w, c, &f, g, &inv, &u, geo, &mut gw);
        weight_grad(w, &cr, &fr, g, &inv_r, &ur, geo, &mut gf);
        compare("grad", &widen(gw), &widen(gf));
        worst
    }

    /// Mean number of centroids a tile attends to over the rows of `w`.
    fn mean_window<T: Real>(w: &[T], c: &[T], geo: &Geometry) -> f64 {
        let (w, c) = (vectors::<T, 1>(w), vectors::<T, 1>(c));
        let visit = Visit::new(w, 0..w.len(), c, geo);
        let mut buf = [[T::zero(); 1]; TILE];
        let total: usize = visit
            .tiles()
            .map(|at| visit.window(visit.rows(w, at, &mut buf)).len() * at.1)
            .sum();
        total as f64 / w.len() as f64
    }

    /// `m` Gaussian-like weights: sums of three uniforms, times 0.01.
    fn gaussian_like(m: usize) -> Vec<f32> {
        uniform(3 * m, 11)
            .chunks(3)
            .map(|x| 0.01 * x.iter().sum::<f32>())
            .collect()
    }

    /// Centroids at `k` quantiles of `w`, ascending.
    fn quantiles<T: Real>(w: &[T], k: usize) -> Vec<T> {
        let mut sorted = w.to_vec();
        sorted.sort_by(|a, b| a.wide().total_cmp(&b.wide()));
        (0..k)
            .map(|j| sorted[(2 * j + 1) * w.len() / (2 * k)])
            .collect()
    }

    #[test]
    fn windowed_tiles_match_full_passes() {
        // Gaussian-like weights (sum of three uniforms), 2 chunks and a
        // partial tile; taus from local (a few centroids per tile) to global.
        let m = 3001;
        let w = gaussian_like(m);
        let g = uniform(m, 12);
        for (k, tau, distance, local) in [
            (64, 1e-7, Distance::Squared, true),
            (256, 4e-8, Distance::Squared, true),
            (256, 1e-4, Distance::Squared, false),
            (64, 2e-5, Distance::Euclidean, true),
        ] {
            let geo = Geometry {
                k,
                d: 1,
                tau,
                distance,
            };
            let c = quantiles(&w, k);
            let window = mean_window(&w, &c, &geo);
            eprintln!("k={k} tau={tau:e} {distance:?}: mean window {window:.1}");
            assert!(window >= 1.0 && window <= k as f64);
            if local {
                assert!(window < k as f64 / 4.0, "window {window} of {k}");
            }
            let wide = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
            let f64_err = windowed_vs_full(&wide(&w), &wide(&g), &wide(&c), &geo);
            assert!(f64_err < 1e-12, "f64: {f64_err:e}");
            let f32_err = windowed_vs_full(&w, &g, &c, &geo);
            assert!(f32_err < 2e-5, "f32: {f32_err:e}");
        }
    }

    /// The free energy `-tau sum_i ln sum_j exp(z_ij)` of a pass over
    /// weights (a logarithm a tile) and over counted rows (a logarithm a
    /// row) against the sum written out in f64: windowed scalar tiles at
    /// 8 bits, full ones at a high temperature and pairs; counts against
    /// the weights they stand for.
    #[test]
    fn free_energy_matches_the_direct_sum() {
        let m = 3001;
        let all = gaussian_like(m);
        for (k, d, tau) in [(256, 1, 4e-8), (256, 1, 1e-4), (16, 2, 1e-5)] {
            let w = &all[..m / d * d];
            let geo = Geometry {
                k,
                d,
                tau,
                distance: Distance::Squared,
            };
            let c = if d == 1 {
                quantiles(w, k)
            } else {
                uniform(k * d, 5).iter().map(|x| 0.02 * x).collect()
            };
            let direct: f64 = w
                .chunks(d)
                .map(|x| {
                    let z: Vec<f64> = c
                        .chunks(d)
                        .map(|cj| {
                            let sq: f64 = x
                                .iter()
                                .zip(cj)
                                .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
                                .sum();
                            -sq / tau
                        })
                        .collect();
                    let top = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    -tau * (top + z.iter().map(|z| (z - top).exp()).sum::<f64>().ln())
                })
                .sum();
            let (_, energy) = counted_reduce_energy(w, &[], &c, &geo);
            let scale = direct.abs().max(tau * (m / d) as f64);
            assert!(
                (energy - direct).abs() <= 1e-5 * scale,
                "k={k} d={d} tau={tau:e}: {energy:e} against {direct:e}"
            );
            // Every row three times: the weights repeated, and once with a
            // count of 3.
            let thrice: Vec<f32> = w.chunks(d).flat_map(|x| x.repeat(3)).collect();
            let count = vec![3.0f32; m / d];
            let (_, repeated) = counted_reduce_energy(&thrice, &[], &c, &geo);
            let (_, counted) = counted_reduce_energy(w, &count, &c, &geo);
            for (name, e) in [("repeated", repeated), ("counted", counted)] {
                assert!(
                    (e - 3.0 * direct).abs() <= 3e-5 * scale,
                    "k={k} d={d} tau={tau:e} {name}: {e:e} against {:e}",
                    3.0 * direct
                );
            }
        }
    }

    fn sorts_as_total_cmp<T: Real>() {
        let mut w: Vec<T> = uniform(10_001, 7)
            .iter()
            .map(|&x| T::of(f64::from(x) * 1e3))
            .collect();
        w.extend([0.0, -0.0, f64::MIN_POSITIVE, -f64::MAX].map(T::of));
        let mut expected = w.clone();
        expected.sort_by(|a, b| a.wide().total_cmp(&b.wide()));
        let bits = |x: &[T]| x.iter().map(|v| v.wide().to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&T::sorted(&w)), bits(&expected));
        // Few keys, and keys all equal to the pivot (one part empty).
        for w in [vec![], vec![1.0], vec![2.0, -1.0], vec![-0.5; 3000]] {
            let w: Vec<T> = w.into_iter().map(T::of).collect();
            let mut expected = w.clone();
            expected.sort_by(|a, b| a.wide().total_cmp(&b.wide()));
            assert_eq!(bits(&T::sorted(&w)), bits(&expected));
        }
    }

    #[test]
    fn sorts_floats_as_total_cmp_does() {
        sorts_as_total_cmp::<f32>();
        sorts_as_total_cmp::<f64>();
    }

    #[test]
    fn value_order_is_a_permutation_by_bucket() {
        let x = uniform(1000, 13);
        let order = value_order(&x, |&v| v as f64);
        let mut seen = order.clone();
        seen.sort_unstable();
        assert!(seen.iter().enumerate().all(|(i, &p)| p as usize == i));
        // Buckets of width 2 / (1000 / BUCKET_ROWS): out of order by less.
        let width = 2.0 / (1000 / BUCKET_ROWS) as f32;
        assert!(order
            .windows(2)
            .all(|p| x[p[1] as usize] > x[p[0] as usize] - width));
        assert_eq!(
            value_order(&[3.0f32; 5], |&v| v as f64),
            vec![0, 1, 2, 3, 4]
        );
    }

    #[test]
    fn instruction_set_versions_agree_bit_for_bit() {
        for distance in [Distance::Squared, Distance::Euclidean] {
            versions_agree::<1>(distance);
            versions_agree::<2>(distance);
            versions_agree::<4>(distance);
            versions_agree::<8>(distance);
        }
    }
}
