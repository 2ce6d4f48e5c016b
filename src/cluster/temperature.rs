//! The softmax temperature of a layer, derived from its own weights.
//!
//! Soft k-means keeps k distinct centroids only while the temperature is
//! below the critical temperature of every cluster (about twice the
//! variance of the weights a cluster holds, as in deterministic annealing):
//! above it neighbouring centroids merge and `I - J` becomes singular.
//! Far below it the attention is nearly hard and the soft output carries
//! little gradient across the boundaries between clusters. The temperature
//! is therefore set relative to the layer's hard-quantization error, the
//! mean squared distance of a weight vector to its nearest initial
//! centroid, which the optimal initialisation makes about the variance of
//! a cluster in the dense middle of the weights:
//!
//! - squared distance: `tau = scale * mse / d` (per coordinate);
//! - Euclidean distance: `tau = scale * sqrt(mse / d) / sqrt(12)`, which
//!   gives the attention's transition between two centroids of a typical
//!   cell (width `sqrt(12 mse / d)`) the same width as the squared
//!   distance does.
//!
//! Weights scaled by s then get a temperature scaled by s^2 (s for the
//! Euclidean distance): the same centroids times s and the same
//! assignments. The default scale and how it was chosen are in
//! `docs/design.md`.

use super::config::Distance;
use super::streaming::Real;
use rayon::prelude::*;

/// Rows per parallel chunk of [`hard_mse`].
const CHUNK: usize = 1 << 14;

/// The mean squared distance of the m vectors of `w` (m x d) to their
/// nearest centroid of `c` (k x d). Scalar centroids in ascending order are
/// looked up ([`Cells`], else by bisection), others searched exhaustively.
/// Sums in f64.
pub fn hard_mse<T: Real>(w: &[T], c: &[T], d: usize) -> f64 {
    let m = w.len() / d;
    if m == 0 {
        return 0.0;
    }
    let wide: Vec<f64> = c.iter().map(|x| x.wide()).collect();
    let sorted = d == 1 && wide.windows(2).all(|p| p[0] <= p[1]);
    let cells = if sorted { Cells::new(&wide) } else { None };
    let nearest = |row: &[T]| -> f64 {
        if sorted {
            let x = row[0].wide();
            let at = match &cells {
                Some(cells) => cells.count_below(x),
                None => wide.partition_point(|&c| c < x),
            };
            let below = at
                .checked_sub(1)
                .map_or(f64::INFINITY, |j| (x - wide[j]).powi(2));
            let above = wide.get(at).map_or(f64::INFINITY, |&c| (x - c).powi(2));
            below.min(above)
        } else {
            wide.chunks_exact(d)
                .map(|cj| {
                    row.iter()
                        .zip(cj)
                        .map(|(x, c)| (x.wide() - c).powi(2))
                        .sum::<f64>()
                })
                .fold(f64::INFINITY, f64::min)
        }
    };
    let total: f64 = w
        .par_chunks(CHUNK * d)
        .map(|chunk| chunk.chunks_exact(d).map(nearest).sum::<f64>())
        .sum();
    total / m as f64
}

/// Most cells of a [`Cells`] (half a MiB of tables).
const MAX_CELLS: usize = 1 << 16;

/// Ascending scalar centroids and equal cells of their range, fine enough
/// that no cell holds two of them: the number of centroids below a weight
/// is then that of the cells below its own plus one comparison, with no
/// branch on the weight. A bisection mispredicts about every other step,
/// and the search cost as much as a k-means pass over the weights (15-20
/// ms on each of ResNet18's 2.4 M-weight layers on two cores).
struct Cells {
    lo: f64,
    /// Cells per unit of weight.
    scale: f64,
    /// Centroids in the cells below each cell.
    below: Vec<u32>,
    /// The centroid in each cell, infinity where none.
    inside: Vec<f64>,
}

impl Cells {
    /// The cells of the ascending `c`, four a centroid or as many more
    /// (doubling) as keep two centroids out of every cell; None for
    /// repeated or non-finite centroids, or past [`MAX_CELLS`].
    fn new(c: &[f64]) -> Option<Self> {
        let (lo, hi) = (*c.first()?, *c.last()?);
        if !(lo.is_finite() && hi.is_finite() && hi > lo) {
            return None;
        }
        let mut cells = 4 * c.len();
        while cells <= MAX_CELLS {
            let scale = cells as f64 / (hi - lo);
            let mut table = Self {
                lo,
                scale,
                below: vec![0; cells],
                inside: vec![f64::INFINITY; cells],
            };
            let mut count = vec![0u32; cells];
            for &v in c {
                let g = table.cell(v);
                count[g] += 1;
                table.inside[g] = v;
            }
            if count.iter().all(|&n| n <= 1) {
                let mut sum = 0;
                for (below, n) in table.below.iter_mut().zip(count) {
                    *below = sum;
                    sum += n;
                }
                return Some(table);
            }
            cells *= 2;
        }
        None
    }

    /// The cell of `x` (the first or last beyond the range; the first for
    /// NaN), non-decreasing in `x`: a centroid in a cell below x's is
    /// below x, one in a cell above it above.
    fn cell(&self, x: f64) -> usize {
        ((x - self.lo) * self.scale).clamp(0.0, (self.below.len() - 1) as f64) as usize
    }

    /// `c.partition_point(|&v| v < x)`.
    fn count_below(&self, x: f64) -> usize {
        let g = self.cell(x);
        self.below[g] as usize + usize::from(self.inside[g] < x)
    }
}

/// The temperature for a layer whose hard-quantization error is `mse` (per
/// vector of dimension `d`), at `scale` (see the module docs). `None` when
/// the error is 0 or not finite (every weight sits on a centroid: any
/// temperature serves, the caller picks one).
pub fn from_error(mse: f64, d: usize, distance: Distance, scale: f64) -> Option<f64> {
    let per_coordinate = mse / d as f64;
    let tau = match distance {
        Distance::Squared => scale * per_coordinate,
        Distance::Euclidean => scale * per_coordinate.sqrt() / 12f64.sqrt(),
    };
    (tau > 0.0 && tau.is_finite()).then_some(tau)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cells count as the bisection does, for weights inside, outside
    /// and on the centroids (at the cells' edges too), with two centroids
    /// close enough to need finer cells; repeated centroids have none.
    #[test]
    fn cells_count_as_the_bisection() {
        let dense_middle: Vec<f64> = (0..256)
            .map(|j| ((f64::from(j) - 127.5) / 40.0).sinh())
            .collect();
        let close = vec![-0.08, -0.02, -0.019_99, 0.0, 0.03, 0.09];
        let edges: Vec<f64> = (0..16).map(|j| f64::from(j) * 0.25).collect();
        for c in [dense_middle, close, edges, vec![0.5, 1.0]] {
            let cells = Cells::new(&c).expect("cells");
            let mut xs: Vec<f64> = (-3000..3000).map(|i| f64::from(i) * 1e-2).collect();
            xs.extend(c.iter().flat_map(|&v| [v, v.next_down(), v.next_up()]));
            xs.extend([f64::NEG_INFINITY, f64::INFINITY, -1e300, 1e300, f64::NAN]);
            for x in xs {
                let expected = c.partition_point(|&v| v < x);
                assert_eq!(cells.count_below(x), expected, "{x} in {c:?}");
            }
        }
        assert!(Cells::new(&[-0.1, 0.2, 0.2, 0.3]).is_none());
        assert!(Cells::new(&[0.5]).is_none());
        assert!(
            Cells::new(&[0.0, 1e-9, 1.0]).is_none(),
            "beyond the most cells"
        );
    }

    #[test]
    fn hard_error_by_lookup_matches_exhaustive_search() {
        let w: Vec<f32> = (0..10_001)
            .map(|i| ((i as f32) * 0.37).sin() * 0.1)
            .collect();
        let c = [-0.08f32, -0.02, 0.0, 0.03, 0.09];
        let exhaustive: f64 = w
            .iter()
            .map(|&x| {
                c.iter()
                    .map(|&c| (f64::from(x) - f64::from(c)).powi(2))
                    .fold(f64::INFINITY, f64::min)
            })
            .sum::<f64>()
            / w.len() as f64;
        let mse = hard_mse(&w, &c, 1);
        assert!(
            (mse - exhaustive).abs() <= 1e-12 * exhaustive,
            "{mse} vs {exhaustive}"
        );
        // Unsorted centroids take the exhaustive path and agree.
        let shuffled = [0.03f32, -0.08, 0.09, 0.0, -0.02];
        assert!((hard_mse(&w, &shuffled, 1) - exhaustive).abs() <= 1e-12 * exhaustive);
    }

    #[test]
    fn temperature_scales_with_the_weights() {
        let tau = from_error(4e-4, 1, Distance::Squared, 0.5).unwrap();
        assert!((tau - 2e-4).abs() < 1e-18);
        // Weights times 10: error times 100, tau times 100 (squared), 10 (Euclidean).
        let scaled = from_error(4e-2, 1, Distance::Squared, 0.5).unwrap();
        assert!((scaled / tau - 100.0).abs() < 1e-9);
        let e = from_error(4e-4, 2, Distance::Euclidean, 0.5).unwrap();
        let e10 = from_error(4e-2, 2, Distance::Euclidean, 0.5).unwrap();
        assert!((e10 / e - 10.0).abs() < 1e-9);
        assert_eq!(from_error(0.0, 1, Distance::Squared, 0.5), None);
    }
}
