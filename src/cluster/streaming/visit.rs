//! Visits: the order of a chunk's rows and the centroid window of each
//! tile.

use super::*;

/// Fewest centroids at which a pass orders its rows and windows its
/// centroids (see [`Visit`]). With a temperature derived from the weights
/// the attention of a weight reaches only its few nearest centroids, so
/// windows pay from k = 8 on (a 4-bit ResNet18-CIFAR IDKM step took 2.0 s
/// instead of 3.0 s beside a 1.0 s fp32 step, measured with
/// `idkm profile`); at k = 4 a tile's window holds most centroids anyway.
pub(super) const WINDOW_MIN_K: usize = 8;

/// Whether passes with geometry `geo` order their rows and window their
/// centroids (see [`Visit`]; the centroids must also be in ascending order).
pub fn windowed(geo: &Geometry) -> bool {
    geo.d == 1 && geo.k >= WINDOW_MIN_K
}

/// Rows per bucket (on average) of the counting sort that orders a chunk.
pub(super) const BUCKET_ROWS: usize = 8;

/// How a pass visits the rows of one chunk, and which centroids each tile
/// attends to.
///
/// With scalar weights (d = 1), at least [`WINDOW_MIN_K`] centroids and the
/// centroids in ascending order (as the clustered layer keeps them), the
/// chunk's rows are visited in order of value (a counting sort into buckets
/// of the chunk's range), so that a tile's rows lie close together, and the
/// tile attends only to the centroids within reach of them: every centroid
/// outside the window has a logit at least `cutoff` below the row maximum
/// of every row of the tile, for `cutoff = ln k + (p + 8) ln 2` with p the
/// float type's mantissa bits. The dropped attention of a row is then below
/// `2^-(p+8)` in all and its weight in the backward terms (`a_ij |z_ij|`)
/// below `2^-(p+3)`: under a rounding of the row's sums. Otherwise rows are
/// visited in order and every tile attends to all centroids.
///
/// The visit order and the windows are functions of the data only, so the
/// results stay deterministic.
pub(super) struct Visit {
    /// Number of rows in the chunk.
    pub(super) len: usize,
    /// Number of centroids.
    pub(super) k: usize,
    /// The chunk's rows (relative to its first) in visiting order; empty
    /// when they are visited in order (not windowed, or already ascending).
    pub(super) order: Vec<u32>,
    /// The centroids in ascending order (d = 1) when tiles are windowed.
    pub(super) sorted: Vec<f64>,
    /// Largest logit gap a window keeps, times tau.
    pub(super) reach: f64,
    /// Distance in the logits.
    pub(super) distance: Distance,
}

impl Visit {
    /// The visit of chunk `rows` of `w` for the centroids `c`.
    #[inline(always)]
    pub(super) fn new<T: Real, const D: usize>(
        w: &[[T; D]],
        rows: Range<usize>,
        c: &[[T; D]],
        geo: &Geometry,
    ) -> Self {
        let mut visit = Self {
            len: rows.len(),
            k: c.len(),
            order: Vec::new(),
            sorted: Vec::new(),
            reach: 0.0,
            distance: geo.distance,
        };
        let ascending =
            c.windows(2).all(|p| p[0][0] <= p[1][0]) && c.iter().all(|x| x[0].is_finite());
        if !windowed(geo) || !ascending {
            return visit;
        }
        visit.reach = cutoff::<T>(c.len()) * geo.tau;
        visit.sorted = c.iter().map(|x| x[0].wide()).collect();
        // Rows already in order of value (the bins of `binned`) keep it.
        let rows = &w[rows];
        if !rows.is_sorted_by(|a, b| a[0] <= b[0]) {
            visit.order = value_order(rows, |x| x[0].wide());
        }
        visit
    }

    /// The tiles in visiting order: `(first position, number of rows)`.
    pub(super) fn tiles(&self) -> impl Iterator<Item = (usize, usize)> {
        tiles(0..self.len)
    }

    /// The rows of `x` (the chunk's slice of a per-row input) at positions
    /// `p..p + n` of the visit: a slice of `x`, or gathered into `buf`.
    #[inline(always)]
    pub(super) fn rows<'x, T: Copy, const D: usize>(
        &self,
        x: &'x [[T; D]],
        (p, n): (usize, usize),
        buf: &'x mut [[T; D]],
    ) -> &'x [[T; D]] {
        if self.order.is_empty() {
            return &x[p..p + n];
        }
        for (b, &i) in buf.iter_mut().zip(&self.order[p..p + n]) {
            *b = x[i as usize];
        }
        &buf[..n]
    }

    /// Writes the lanes `buf` (`D` quantities) into the rows of `out` (the
    /// chunk's slice of the output) at positions `p..p + n` of the visit.
    #[inline(always)]
    pub(super) fn store<T: Real, const D: usize>(
        &self,
        buf: &[T],
        (p, n): (usize, usize),
        out: &mut [[T; D]],
    ) {
        if self.order.is_empty() {
            return store_lanes(buf, &mut out[p..p + n]);
        }
        for (r, &i) in self.order[p..p + n].iter().enumerate() {
            for e in 0..D {
                out[i as usize][e] = buf[e * TILE + r];
            }
        }
    }

    /// The centroids (a range of indices) the tile of weight vectors `rows`
    /// attends to: all of them, or, when windowed, those within reach.
    ///
    /// With `lo..=hi` the tile's range and `D` the distance from `lo` to its
    /// nearest centroid, no row is farther than `D + hi - lo` from its
    /// nearest centroid (the distance to the nearest centroid is
    /// 1-Lipschitz). A centroid whose distance to every row exceeds
    /// `sqrt((D + hi - lo)^2 + reach)` (squared distance) or
    /// `D + hi - lo + reach` (Euclidean) is thus out of reach of every row.
    #[inline(always)]
    pub(super) fn window<T: Real, const D: usize>(&self, rows: &[[T; D]]) -> Range<usize> {
        let c = &self.sorted;
        if c.is_empty() {
            return 0..self.k;
        }
        let (lo, hi) = rows
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
                (lo.min(x[0].wide()), hi.max(x[0].wide()))
            });
        let next = c.partition_point(|&x| x < lo);
        let below = if next > 0 {
            lo - c[next - 1]
        } else {
            f64::INFINITY
        };
        let above = if next < c.len() {
            c[next] - lo
        } else {
            f64::INFINITY
        };
        let far = below.min(above) + (hi - lo);
        let radius = match self.distance {
            Distance::Squared => (far * far + self.reach).sqrt(),
            Distance::Euclidean => far + self.reach,
        };
        // A relative margin covers the rounding of the bound itself.
        let radius = radius * (1.0 + 1e-9) + f64::MIN_POSITIVE;
        // The window's ends by walking out from `next`: the window holds a
        // few centroids, fewer steps than two more binary searches.
        let mut start = next;
        while start > 0 && c[start - 1] >= lo - radius {
            start -= 1;
        }
        let mut end = next;
        while end < c.len() && c[end] <= hi + radius {
            end += 1;
        }
        start..end
    }

    /// Loads the tile of `w` (the chunk's weight vectors) at positions `at`
    /// of the visit into `tile`, attends it to its window of the centroids
    /// `c`, and returns the window.
    #[inline(always)]
    pub(super) fn attend<T: Real, const D: usize>(
        &self,
        tile: &mut Tile<T, D>,
        w: &[[T; D]],
        at: (usize, usize),
        buf: &mut [[T; D]],
        c: &[[T; D]],
    ) -> Range<usize> {
        let rows = self.rows(w, at, buf);
        let win = self.window(rows);
        tile.attend(rows, &c[win.clone()]);
        win
    }
}

/// The logit gap `ln k + (p + 8) ln 2` (p: the mantissa bits of `T`) beyond
/// which a centroid's attention is dropped (see [`Visit`]).
pub fn cutoff<T: Real>(k: usize) -> f64 {
    let bits = if std::mem::size_of::<T>() == 4 {
        f32::MANTISSA_DIGITS
    } else {
        f64::MANTISSA_DIGITS
    };
    (k as f64).ln() + f64::from(bits + 8) * std::f64::consts::LN_2
}

/// The positions `0..x.len()` ordered by `key` up to buckets: a stable
/// counting sort into `x.len() / BUCKET_ROWS` buckets of equal width over
/// the range of the keys (all finite). The sort is compiled into each
/// instruction-set version of the pass that calls it (a 4-bit reducing pass
/// over the 2.4 million weights of a 512-channel 3x3 layer took 12-14 ms
/// instead of 16-17 ms).
#[inline(always)]
pub(super) fn value_order<X>(x: &[X], key: impl Fn(&X) -> f64) -> Vec<u32> {
    let (lo, hi) = x
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(key(v)), hi.max(key(v)))
        });
    let buckets = (x.len() / BUCKET_ROWS).max(1);
    let scale = if hi > lo {
        buckets as f64 / (hi - lo)
    } else {
        0.0
    };
    let last = (buckets - 1) as u32;
    let bucket = |v: &X| (((key(v) - lo) * scale) as u32).min(last) as usize;
    let mut start = vec![0u32; buckets + 1];
    for v in x {
        start[bucket(v) + 1] += 1;
    }
    for b in 1..=buckets {
        start[b] += start[b - 1];
    }
    let mut order = vec![0u32; x.len()];
    for (i, v) in x.iter().enumerate() {
        let at = &mut start[bucket(v)];
        order[*at as usize] = i as u32;
        *at += 1;
    }
    order
}
