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
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x.wide() - y.wide()).powi(2))
        .sum()
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
        tracing::warn!(
            k,
            "fewer distinct weight vectors than centroids: some centroids start as duplicates"
        );
    }
    c
}

/// Bins of the sorted sample for [`optimal_1d`]: at most `bins` weights
/// each (quantile edges) and at most `1/bins` of the range wide (uniform
/// edges), so that both the dense middle and the sparse tails of a
/// heavy-tailed layer are resolved. (count, sum, sum of squares) each.
fn histogram(sorted: &[f64], bins: usize) -> Vec<(f64, f64, f64)> {
    let n = sorted.len();
    let (lo, hi) = (sorted[0], sorted[n - 1]);
    let mut starts: Vec<usize> = (0..bins).map(|b| b * n / bins).collect();
    starts.extend(
        (1..bins).map(|b| sorted.partition_point(|&x| x < lo + (hi - lo) * b as f64 / bins as f64)),
    );
    starts.sort_unstable();
    starts.dedup();
    starts.push(n);
    starts
        .windows(2)
        .filter(|edge| edge[1] > edge[0])
        .map(|edge| {
            let part = &sorted[edge[0]..edge[1]];
            (
                part.len() as f64,
                part.iter().sum(),
                part.iter().map(|x| x * x).sum(),
            )
        })
        .collect()
}

/// Optimal 1-D k-means (`d = 1`) by dynamic programming over the bins of
/// [`histogram`] (up to 2048) of the (sub)sampled weights: the partition
/// into `k` contiguous groups of bins that minimises the within-group sum
/// of squares. The best start of a last group is monotone in its end (the
/// cost is a Monge array), so each of the k layers is filled by divide and
/// conquer in O(bins log bins). Centroids are the group means, ascending.
pub fn optimal_1d<T: Real>(w: &[T], k: usize, seed: u64) -> Vec<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sorted: Vec<f64> = sample(w.len(), &mut rng)
        .into_iter()
        .map(|i| w[i].wide())
        .collect();
    sorted.sort_unstable_by(f64::total_cmp);
    let bins = histogram(&sorted, 1024);
    let nb = bins.len();
    if nb <= k {
        // No more groups than centroids: one centroid a group, the rest duplicates.
        let mut c: Vec<T> = bins.iter().map(|&(n, s, _)| T::of(s / n)).collect();
        if nb < k {
            tracing::warn!(
                k,
                groups = nb,
                "fewer distinct weights than centroids: some centroids start as duplicates"
            );
        }
        c.resize(k, c[nb - 1]);
        return c;
    }
    // Prefix sums of count, sum and sum of squares.
    let mut pre = vec![(0.0, 0.0, 0.0); nb + 1];
    for (b, &(n, s, q)) in bins.iter().enumerate() {
        pre[b + 1] = (pre[b].0 + n, pre[b].1 + s, pre[b].2 + q);
    }
    // Sum of squared deviations of bins lo..hi (exclusive) around their mean.
    let cost = |lo: usize, hi: usize| {
        let (n, s, q) = (
            pre[hi].0 - pre[lo].0,
            pre[hi].1 - pre[lo].1,
            pre[hi].2 - pre[lo].2,
        );
        if n > 0.0 {
            (q - s * s / n).max(0.0)
        } else {
            0.0
        }
    };
    // best[b]: cost of the first b bins in j + 1 groups (two rows kept);
    // cut[j][b]: start of the last group (all rows, as u16: nb <= 2048).
    let mut best: Vec<f64> = (0..=nb)
        .map(|b| if b == 0 { f64::INFINITY } else { cost(0, b) })
        .collect();
    let mut next = vec![f64::INFINITY; nb + 1];
    let mut cut = vec![vec![0u16; nb + 1]; k];
    for (j, cut_j) in cut.iter_mut().enumerate().skip(1) {
        next.fill(f64::INFINITY);
        let fill = Layer {
            prev: &best,
            cost: &cost,
            best: &mut next,
            cut: cut_j,
        };
        fill.solve(j + 1, nb, j, nb);
        std::mem::swap(&mut best, &mut next);
    }
    let mut c = vec![T::zero(); k];
    let mut hi = nb;
    for j in (0..k).rev() {
        let lo = if j == 0 { 0 } else { usize::from(cut[j][hi]) };
        let (n, s) = (pre[hi].0 - pre[lo].0, pre[hi].1 - pre[lo].1);
        c[j] = T::of(if n > 0.0 { s / n } else { sorted[0] });
        hi = lo;
    }
    c
}

/// One layer of [`optimal_1d`]'s table: `best[b] = min_{lo < b} prev[lo] + cost(lo, b)`.
struct Layer<'a, C> {
    prev: &'a [f64],
    cost: &'a C,
    best: &'a mut [f64],
    cut: &'a mut [u16],
}

impl<C: Fn(usize, usize) -> f64> Layer<'_, C> {
    /// Fills `b` in `lo..=hi`, knowing that their best cuts lie in `cut_lo..=cut_hi`.
    fn solve(self, lo: usize, hi: usize, cut_lo: usize, cut_hi: usize) {
        let mut stack = vec![(lo, hi, cut_lo, cut_hi)];
        while let Some((lo, hi, cut_lo, cut_hi)) = stack.pop() {
            if lo > hi {
                continue;
            }
            let b = (lo + hi) / 2;
            let (mut value, mut at) = (f64::INFINITY, cut_lo);
            for start in cut_lo..=cut_hi.min(b - 1) {
                let v = self.prev[start] + (self.cost)(start, b);
                if v < value {
                    (value, at) = (v, start);
                }
            }
            self.best[b] = value;
            self.cut[b] = u16::try_from(at).expect("at most 2048 bins");
            if b > lo {
                stack.push((lo, b - 1, cut_lo, at));
            }
            stack.push((b + 1, hi, at, cut_hi));
        }
    }
}

/// Hard k-means (Lloyd) steps from `c` on the rows of `w` (m x d) at
/// `rows`, at most `steps` of them, stopping once no row changes cluster.
/// A cluster that loses all its rows keeps its centroid.
fn lloyd<T: Real>(w: &[T], d: usize, rows: &[usize], c: &mut [T], steps: usize) {
    let k = c.len() / d;
    let mut assigned = vec![usize::MAX; rows.len()];
    for _ in 0..steps {
        let mut changed = false;
        let (mut count, mut sum) = (vec![0f64; k], vec![0f64; k * d]);
        for (slot, &i) in assigned.iter_mut().zip(rows) {
            let row = &w[i * d..(i + 1) * d];
            let nearest = (0..k)
                .min_by(|&a, &b| {
                    dist2(row, &c[a * d..(a + 1) * d])
                        .total_cmp(&dist2(row, &c[b * d..(b + 1) * d]))
                })
                .unwrap_or(0);
            changed |= *slot != nearest;
            *slot = nearest;
            count[nearest] += 1.0;
            for (s, x) in sum[nearest * d..(nearest + 1) * d].iter_mut().zip(row) {
                *s += x.wide();
            }
        }
        if !changed {
            break;
        }
        for j in (0..k).filter(|&j| count[j] > 0.0) {
            for e in 0..d {
                c[j * d + e] = T::of(sum[j * d + e] / count[j]);
            }
        }
    }
}

/// Multiply-adds that the Lloyd refinement of [`kmeans_plus_plus`] may spend
/// (about a second on one core).
const LLOYD_BUDGET: usize = 1 << 30;

/// k-means++ seeding of `k` centroids from `w` (m x d), then hard k-means
/// steps on the same sample (as many as [`LLOYD_BUDGET`] allows, at most
/// 20), deterministic for a seed.
pub fn kmeans_plus_plus_refined<T: Real>(w: &[T], d: usize, k: usize, seed: u64) -> Vec<T> {
    let mut c = kmeans_plus_plus(w, d, k, seed);
    let mut rng = StdRng::seed_from_u64(seed);
    let rows = sample(w.len() / d, &mut rng);
    let steps = (LLOYD_BUDGET / (rows.len() * k * d).max(1)).min(20);
    lloyd(w, d, &rows, &mut c, steps);
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

    /// Against an exhaustive O(k n^2) table on a small heavy-tailed sample
    /// (few enough values that every value is its own bin).
    #[test]
    fn optimal_1d_matches_exhaustive_dynamic_programming() {
        let w: Vec<f64> = (0..300)
            .map(|i: i32| {
                let x = (i as f64 * 0.7137).sin() * 3.0;
                x * x * x
            })
            .collect();
        let k = 6;
        let c = optimal_1d(&w, k, 0);
        let mut sorted = w.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let cost = |lo: usize, hi: usize| {
            let part = &sorted[lo..hi];
            let mean = part.iter().sum::<f64>() / part.len() as f64;
            part.iter().map(|x| (x - mean).powi(2)).sum::<f64>()
        };
        let mut best = vec![vec![f64::INFINITY; n + 1]; k + 1];
        best[0][0] = 0.0;
        for j in 1..=k {
            for b in j..=n {
                best[j][b] = (j - 1..b)
                    .map(|lo| best[j - 1][lo] + cost(lo, b))
                    .fold(f64::INFINITY, f64::min);
            }
        }
        let mse = |c: &[f64]| {
            w.iter()
                .map(|x| {
                    c.iter()
                        .map(|c| (x - c).powi(2))
                        .fold(f64::INFINITY, f64::min)
                })
                .sum::<f64>()
        };
        assert!(c.windows(2).all(|p| p[0] < p[1]), "{c:?}");
        assert!(
            (mse(&c) - best[k][n]).abs() <= 1e-9 * best[k][n],
            "{} vs {}",
            mse(&c),
            best[k][n]
        );
    }

    #[test]
    fn lloyd_refinement_lowers_the_error_of_kmeans_plus_plus() {
        let w: Vec<f32> = (0..4000)
            .map(|i| ((i * 7919) % 4001) as f32 / 4001.0 + if i % 2 == 0 { 0.0 } else { 3.0 })
            .collect();
        let mse = |c: &[f32]| -> f64 {
            w.chunks(2)
                .map(|r| {
                    c.chunks(2)
                        .map(|c| dist2(r, c))
                        .fold(f64::INFINITY, f64::min)
                })
                .sum()
        };
        let seeded = kmeans_plus_plus(&w, 2, 8, 1);
        let refined = kmeans_plus_plus_refined(&w, 2, 8, 1);
        assert!(
            mse(&refined) < mse(&seeded),
            "{} vs {}",
            mse(&refined),
            mse(&seeded)
        );
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
