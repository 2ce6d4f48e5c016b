//! Centroid initialisation for the first forward pass: k-means++ seeding and,
//! for scalar clustering, optimal 1-D k-means by dynamic programming.

use super::streaming::Real;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Above this many weight vectors, initialisation runs on a seeded random
/// subsample of this size (the k-means iterations that follow use them all).
pub const INIT_SAMPLE: usize = 1 << 17;

/// Indices of the vectors that take part in the initialisation.
fn sample(m: usize, rng: &mut StdRng) -> Vec<usize> {
    if m <= INIT_SAMPLE {
        return (0..m).collect();
    }
    let mut idx: Vec<usize> = (0..INIT_SAMPLE).map(|_| rng.random_range(0..m)).collect();
    idx.sort_unstable();
    idx
}

fn dist2<T: Real>(a: &[T], b: &[T]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| (x.wide() - y.wide()).powi(2)).sum()
}

/// k-means++ seeding of `k` centroids from `w` (m x d), deterministic for a seed.
///
/// When `w` holds fewer than `k` distinct vectors, the remaining centroids
/// duplicate chosen ones (duplicates share their attention equally and stay
/// duplicates); a warning says so.
pub fn kmeans_plus_plus<T: Real>(w: &[T], d: usize, k: usize, seed: u64) -> Vec<T> {
    let m = w.len() / d;
    let mut rng = StdRng::seed_from_u64(seed);
    let rows = sample(m, &mut rng);
    let row = |n: usize| &w[rows[n] * d..(rows[n] + 1) * d];
    let mut c: Vec<T> = Vec::with_capacity(k * d);
    c.extend_from_slice(row(rng.random_range(0..rows.len())));
    let mut nearest: Vec<f64> = (0..rows.len()).map(|n| dist2(row(n), &c[..d])).collect();
    let mut duplicated = false;
    for _ in 1..k {
        let total: f64 = nearest.iter().sum();
        let pick = if total > 0.0 {
            let mut target = rng.random::<f64>() * total;
            let mut pick = rows.len() - 1;
            for (n, &p) in nearest.iter().enumerate() {
                if target < p {
                    pick = n;
                    break;
                }
                target -= p;
            }
            pick
        } else {
            duplicated = true;
            rng.random_range(0..rows.len())
        };
        let start = c.len();
        c.extend_from_slice(row(pick));
        for (n, best) in nearest.iter_mut().enumerate() {
            *best = best.min(dist2(row(n), &c[start..]));
        }
    }
    if duplicated {
        tracing::warn!(k, "fewer distinct weight vectors than centroids: some centroids start as duplicates");
    }
    c
}

/// Quantile bins of the sorted sample: (count, sum, sum of squares) each.
fn quantile_bins(sorted: &[f64], bins: usize) -> Vec<(f64, f64, f64)> {
    let n = sorted.len();
    (0..bins)
        .map(|b| {
            let part = &sorted[b * n / bins..(b + 1) * n / bins];
            let sum: f64 = part.iter().sum();
            let sq: f64 = part.iter().map(|x| x * x).sum();
            (part.len() as f64, sum, sq)
        })
        .collect()
}

/// Optimal 1-D k-means (`d = 1`) by dynamic programming over at most 1024
/// quantile bins of the (sub)sampled weights: the partition into `k`
/// contiguous groups of bins that minimises the within-group sum of squares.
/// Centroids are the group means, sorted ascending.
pub fn optimal_1d<T: Real>(w: &[T], k: usize, seed: u64) -> Vec<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sorted: Vec<f64> = sample(w.len(), &mut rng).into_iter().map(|i| w[i].wide()).collect();
    sorted.sort_unstable_by(f64::total_cmp);
    let bins = quantile_bins(&sorted, sorted.len().min(1024).max(k));
    let nb = bins.len();
    // Prefix sums of count, sum and sum of squares.
    let mut pre = vec![(0.0, 0.0, 0.0); nb + 1];
    for (b, &(n, s, q)) in bins.iter().enumerate() {
        pre[b + 1] = (pre[b].0 + n, pre[b].1 + s, pre[b].2 + q);
    }
    // Sum of squared deviations of bins lo..hi (exclusive) around their mean.
    let cost = |lo: usize, hi: usize| {
        let (n, s, q) = (pre[hi].0 - pre[lo].0, pre[hi].1 - pre[lo].1, pre[hi].2 - pre[lo].2);
        if n > 0.0 { (q - s * s / n).max(0.0) } else { 0.0 }
    };
    // best[j][b]: cost of the first b bins in j + 1 groups; cut[j][b]: start of the last group.
    let mut best = vec![vec![f64::INFINITY; nb + 1]; k];
    let mut cut = vec![vec![0usize; nb + 1]; k];
    for (b, first) in best[0].iter_mut().enumerate().skip(1) {
        *first = cost(0, b);
    }
    for j in 1..k {
        for b in j + 1..=nb {
            for lo in j..b {
                let v = best[j - 1][lo] + cost(lo, b);
                if v < best[j][b] {
                    best[j][b] = v;
                    cut[j][b] = lo;
                }
            }
        }
    }
    let mut c = vec![T::zero(); k];
    let mut hi = nb;
    for j in (0..k).rev() {
        let lo = if j == 0 { 0 } else { cut[j][hi] };
        let (n, s) = (pre[hi].0 - pre[lo].0, pre[hi].1 - pre[lo].1);
        c[j] = T::of(if n > 0.0 { s / n } else { sorted[0] });
        hi = lo;
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optimal_1d_finds_separated_groups() {
        let w: Vec<f64> = [-3.0, -3.1, -2.9, 0.0, 0.1, -0.1, 5.0, 5.2, 4.8]
            .iter()
            .flat_map(|&x| [x, x])
            .collect();
        let c = optimal_1d(&w, 3, 0);
        let expect = [-3.0, 0.0, 5.0];
        for (a, b) in c.iter().zip(expect) {
            assert!((a - b).abs() < 1e-12, "{c:?}");
        }
    }

    #[test]
    fn kmeans_plus_plus_picks_distinct_points_and_is_seeded() {
        let w: Vec<f32> = (0..100).map(|i| (i % 7) as f32).collect();
        let a = kmeans_plus_plus(&w, 1, 7, 3);
        let b = kmeans_plus_plus(&w, 1, 7, 3);
        assert_eq!(a, b);
        let mut sorted = a.clone();
        sorted.sort_by(f32::total_cmp);
        assert_eq!(sorted, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }
}
