//! k-means steps on scalar weights grouped into narrow bins.
//!
//! With scalar weights (d = 1) and the squared distance, the attention
//! `a_j(w)` of a weight is a smooth function of its value, whose rate of
//! change is `|dz_j/dw - sum_l a_l dz_l/dw| = 2 |c_j - cbar| / tau` for the
//! logits `z`, where `cbar` is the attention's mean centroid. Both lie
//! within the weight's window (the centroids within `R = sqrt((g/2)^2 + L
//! tau)` of it, g the largest centroid gap and L the passes' logit cutoff),
//! so `a_j` changes over a transition width of at least `tau / (4 R)`.
//! Weights that share a bin far narrower than that are represented by their
//! mean and their count: a step's sums over a bin are then exact to first
//! order in the bin's width (the mean carries the linear term), and the
//! second-order error is a fraction `(h / width)^2 / 8` of a term at most.
//! With bins an eighth of the transition width, steps on the bins move the
//! centroids as steps on the weights do to within 10^-6 of the weights'
//! spread (see the tests; the default stopping tolerance is 10^-4 of it).
//!
//! The width is set by the largest centroid gap, found in the sparse tails,
//! so most of the tails' bins are empty or hold a single weight (exact),
//! and the weights fill bins only in the dense middle. [`fixed_point`] runs
//! all but the last step on the bins, and the last one, which gives the
//! centroids, the reported shift and the stopping test, on the weights
//! themselves. The implicit backward then differentiates the exact k-means
//! map at those centroids, as before.
//!
//! The CUDA path runs every step on the weights, and so do the steps with
//! the Euclidean distance, whose logits have a kink at every centroid, where
//! a bin's mean does not carry the linear term.

use super::config::Distance;
use super::streaming::{self as pass, counted_reduce, Geometry, Real};

/// Bins per transition width (see the module docs).
const BIN_SPLIT: f64 = 8.0;

/// Fewest weights per bin slot (empty or not) at which steps run on bins.
/// One width serves the whole range, so in the sparse tails most slots are
/// empty and only the dense middle fills them; the slots' counts and sums
/// (12 bytes each, while the bins are built) then take at most 1.5 bytes a
/// weight, and the non-empty bins fewer still.
const MIN_WEIGHTS_PER_SLOT: usize = 8;

/// Scalar weights grouped into bins of equal width over their range: the
/// mean and the count of each non-empty bin, in ascending order.
#[derive(Clone, Debug, PartialEq)]
pub struct Bins<T> {
    /// Mean of the weights in each bin.
    pub mean: Vec<T>,
    /// Number of weights in each bin.
    pub count: Vec<T>,
}

impl<T: Real> Bins<T> {
    /// `w` grouped into bins of width `width`, or `None` when its range
    /// spans more than `max_slots` of them. The weights must be finite.
    pub fn new(w: &[T], width: f64, max_slots: usize) -> Option<Self> {
        let (lo, hi) = w.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(x.wide()), hi.max(x.wide()))
        });
        let span = hi - lo;
        let bins = (span / width).ceil().max(1.0);
        if w.is_empty() || bins.is_nan() || bins > max_slots as f64 {
            return None;
        }
        let bins = bins as usize;
        let scale = if span > 0.0 { bins as f64 / span } else { 0.0 };
        let (mut count, mut sum) = (vec![0u32; bins], vec![0f64; bins]);
        for x in w {
            let b = (((x.wide() - lo) * scale) as usize).min(bins - 1);
            count[b] += 1;
            sum[b] += x.wide();
        }
        let (mean, count) = count
            .iter()
            .zip(&sum)
            .filter(|(&n, _)| n > 0)
            .map(|(&n, &s)| (T::of(s / f64::from(n)), T::of(f64::from(n))))
            .unzip();
        Some(Self { mean, count })
    }

    /// Number of non-empty bins.
    pub fn len(&self) -> usize {
        self.mean.len()
    }

    /// Whether there are no bins.
    pub fn is_empty(&self) -> bool {
        self.mean.is_empty()
    }
}

/// The bin width at which steps from the scalar centroids `c` on bins match
/// steps on the weights, with the squared distance: the attention's
/// transition width over [`BIN_SPLIT`] (see the module docs).
pub fn bin_width<T: Real>(c: &[T], geo: &Geometry) -> f64 {
    let mut sorted: Vec<f64> = c.iter().map(|x| x.wide()).collect();
    sorted.sort_by(f64::total_cmp);
    let gap = sorted.windows(2).map(|p| p[1] - p[0]).fold(0.0, f64::max);
    let reach = ((gap / 2.0).powi(2) + pass::cutoff::<T>(geo.k) * geo.tau).sqrt();
    geo.tau / (4.0 * reach) / BIN_SPLIT
}

/// The bins the steps from `c0` run on, when they pay: scalar weights, the
/// squared distance, at least two steps, and at least
/// [`MIN_WEIGHTS_PER_SLOT`] weights a slot.
pub fn bins_for<T: Real>(w: &[T], c0: &[T], geo: &Geometry, max_iter: usize) -> Option<Bins<T>> {
    if geo.d != 1 || geo.distance != Distance::Squared || max_iter < 2 {
        return None;
    }
    Bins::new(w, bin_width(c0, geo), w.len() / MIN_WEIGHTS_PER_SLOT)
}

/// [`streaming::fixed_point`](pass::fixed_point) with all but the last step
/// on bins of the weights where that pays (see [`bins_for`]): steps run on
/// the bins until one moves no centroid more than `tol` or one step is
/// left, then on the weights until the same test or `max_iter` steps in
/// all. Returns the centroids, the number of steps (both kinds) and the
/// shift of the last step, always one on the weights.
pub fn fixed_point<T: Real>(w: &[T], c0: &[T], geo: &Geometry, max_iter: usize, tol: f64) -> (Vec<T>, usize, f64) {
    let Some(bins) = bins_for(w, c0, geo, max_iter) else {
        return pass::fixed_point(w, c0, geo, max_iter, tol);
    };
    let mut c = c0.to_vec();
    let mut next = c0.to_vec();
    let mut steps = 0;
    while steps + 1 < max_iter {
        let shift = counted_reduce(&bins.mean, &bins.count, &c, geo).update(&c, &mut next, 1);
        std::mem::swap(&mut c, &mut next);
        steps += 1;
        if shift <= tol {
            break;
        }
    }
    let (c, last, shift) = pass::fixed_point(w, &c, geo, max_iter - steps, tol);
    tracing::trace!(bins = bins.len(), binned = steps, full = last, "k-means steps");
    (c, steps + last, shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` standard normal values (Box-Muller over a fixed linear
    /// congruential sequence) times `std`.
    fn normal(n: usize, std: f64, seed: u64) -> Vec<f64> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut uniform = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let (u, v) = (uniform(), uniform());
                std * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
            })
            .collect()
    }

    fn geometry(k: usize, tau: f64, distance: Distance) -> Geometry {
        Geometry { k, d: 1, tau, distance }
    }

    /// `k` centroids at the quantiles of `w`, ascending.
    fn quantiles<T: Real>(w: &[T], k: usize) -> Vec<T> {
        let mut sorted = w.to_vec();
        sorted.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
        (0..k).map(|j| sorted[(2 * j + 1) * w.len() / (2 * k)]).collect()
    }

    #[test]
    fn counted_rows_sum_as_repeated_rows() {
        let geo = geometry(64, 1e-3, Distance::Squared);
        let x = normal(500, 0.05, 1);
        let count: Vec<f64> = (0..x.len()).map(|i| (1 + i % 7) as f64).collect();
        let repeated: Vec<f64> = x.iter().zip(&count).flat_map(|(&x, &n)| std::iter::repeat_n(x, n as usize)).collect();
        let c = quantiles(&x, geo.k);
        let counted = counted_reduce(&x, &count, &c, &geo);
        let full = pass::soft_assign_reduce(&repeated, &c, &geo);
        for (a, b) in counted.mass.iter().chain(&counted.weighted).zip(full.mass.iter().chain(&full.weighted)) {
            assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{a} vs {b}");
        }
    }

    #[test]
    fn bins_keep_count_and_sum() {
        let w: Vec<f32> = normal(10_000, 0.02, 2).iter().map(|&x| x as f32).collect();
        let bins = Bins::new(&w, 1e-3, 1000).expect("fits");
        assert!(bins.mean.windows(2).all(|p| p[0] < p[1]));
        assert_eq!(bins.count.iter().sum::<f32>(), 10_000.0);
        let sum: f64 = bins.mean.iter().zip(&bins.count).map(|(&m, &n)| f64::from(m) * f64::from(n)).sum();
        let want: f64 = w.iter().map(|&x| f64::from(x)).sum();
        assert!((sum - want).abs() < 1e-6, "{sum} vs {want}");
        assert!(Bins::new(&w, 1e-6, 1000).is_none());
    }

    /// Ten steps on bins (nine, then one on the weights) against ten steps
    /// on the weights, from the same start, for 800 000 Gaussian weights.
    #[test]
    fn binned_steps_match_full_steps() {
        let std = 0.02;
        let w: Vec<f32> = normal(800_000, std, 3).iter().map(|&x| x as f32).collect();
        for geo in [
            geometry(256, 3.9e-7, Distance::Squared),
            geometry(16, 1e-4, Distance::Squared),
        ] {
            let c0 = quantiles(&w, geo.k);
            let bins = bins_for(&w, &c0, &geo, 10).expect("the steps run on bins");
            let (c, steps, shift) = fixed_point(&w, &c0, &geo, 10, 0.0);
            let (want, want_steps, want_shift) = pass::fixed_point(&w, &c0, &geo, 10, 0.0);
            let err = c.iter().zip(&want).map(|(a, b)| f64::from((a - b).abs())).fold(0.0, f64::max);
            eprintln!("{geo:?}: {} bins, max |c - c_full| = {err:.2e}, shift {shift:.3e} vs {want_shift:.3e}", bins.len());
            assert_eq!((steps, want_steps), (10, 10));
            assert!(err <= 1e-6 * std, "{geo:?}: centroids differ by {err:e}");
            assert!((shift - want_shift).abs() <= 1e-6 * std, "{geo:?}: shift {shift:e} vs {want_shift:e}");
        }
    }

    #[test]
    fn few_weights_one_step_or_euclidean_run_on_the_weights() {
        let geo = geometry(256, 3.9e-7, Distance::Squared);
        let w: Vec<f32> = normal(600_000, 0.02, 4).iter().map(|&x| x as f32).collect();
        let c0 = quantiles(&w, geo.k);
        assert!(bins_for(&w[..20_000], &c0, &geo, 10).is_none());
        assert_eq!(fixed_point(&w[..20_000], &c0, &geo, 10, 0.0), pass::fixed_point(&w[..20_000], &c0, &geo, 10, 0.0));
        assert_eq!(fixed_point(&w, &c0, &geo, 1, 0.0), pass::fixed_point(&w, &c0, &geo, 1, 0.0));
        let euclidean = Geometry { distance: Distance::Euclidean, tau: 1e-3, ..geo };
        assert!(bins_for(&w, &c0, &euclidean, 10).is_none());
    }
}
