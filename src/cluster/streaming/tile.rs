//! Tiles of rows held as lanes, their sums over rows, and the attention
//! of one tile.

use super::*;

/// Rows per tile (at most). Every per-row quantity of a tile is a slice of
/// its rows (`x[r]`, one per row), so the arithmetic is a sequence of simple
/// element-wise loops over the rows that the compiler vectorises.
pub(super) const TILE: usize = 32;

/// Largest product of row sums that [`Tile::add_energy`] keeps before
/// taking its logarithm: one more factor (at most k) stays finite.
const FOLD_PRODUCT: f64 = 1e250;

/// The tiles of `rows`: `(first row, number of rows)`.
pub(super) fn tiles(rows: Range<usize>) -> impl Iterator<Item = (usize, usize)> {
    let end = rows.end;
    rows.step_by(TILE)
        .map(move |start| (start, TILE.min(end - start)))
}

/// The `n` lanes of quantity `x` in a lane buffer (`TILE` lanes a quantity).
#[inline(always)]
pub(super) fn lanes<T>(buf: &[T], x: usize, n: usize) -> &[T] {
    &buf[x * TILE..x * TILE + n]
}

/// The `n` lanes of quantity `x` in a lane buffer, mutably.
#[inline(always)]
pub(super) fn lanes_mut<T>(buf: &mut [T], x: usize, n: usize) -> &mut [T] {
    &mut buf[x * TILE..x * TILE + n]
}

/// The rows of a tile, transposed into the lane buffer `lanes` (`D` quantities).
#[inline(always)]
pub(super) fn load_lanes<T: Real, const D: usize>(rows: &[[T; D]], buf: &mut [T]) {
    for e in 0..D {
        for (x, row) in lanes_mut(buf, e, rows.len()).iter_mut().zip(rows) {
            *x = row[e];
        }
    }
}

/// The lane buffer `buf` (`D` quantities) transposed into `rows`.
#[inline(always)]
pub(super) fn store_lanes<T: Real, const D: usize>(buf: &[T], rows: &mut [[T; D]]) {
    for e in 0..D {
        for (row, &x) in rows.iter_mut().zip(lanes(buf, e, TILE)) {
            row[e] = x;
        }
    }
}

/// Tiles whose contributions a [`LaneSums`] adds in the float type before
/// widening them into its f64 sums.
pub(super) const FOLD: usize = 4;

/// Per-row partial sums of `len` quantities over the tiles of a chunk. Each
/// tile adds its rows lane by lane in the float type (`x[r]`, one lane per
/// row of a tile); every [`FOLD`] tiles the lanes are added into f64 lanes,
/// and [`Self::finish`] adds the f64 lanes, in order, into the chunk's
/// partial sums. A sum over m rows thus takes at most `FOLD` terms in the
/// float type and the rest in f64.
pub(super) struct LaneSums<T> {
    /// The lanes of the current tiles.
    pub(super) narrow: Vec<T>,
    /// The lanes of the tiles folded so far.
    pub(super) wide: Vec<f64>,
    /// Tiles added to `narrow` since the last fold.
    pub(super) tiles: usize,
    /// Ranges covering the quantities added to since the last fold (see
    /// [`Self::touch`]; windowed tiles touch few of them).
    pub(super) touched: Vec<Range<usize>>,
}

impl<T: Real> LaneSums<T> {
    pub(super) fn new(len: usize) -> Self {
        Self {
            narrow: vec![T::zero(); len * TILE],
            wide: vec![0.0; len * TILE],
            tiles: 0,
            touched: Vec::new(),
        }
    }

    /// The lanes of quantity `x`, for a tile of `n` rows.
    #[inline(always)]
    pub(super) fn get(&mut self, x: usize, n: usize) -> &mut [T] {
        lanes_mut(&mut self.narrow, x, n)
    }

    /// Records that the current tile adds to the quantities `xs` (and to no
    /// quantity outside the ranges it records): only those are folded.
    #[inline(always)]
    pub(super) fn touch(&mut self, xs: Range<usize>) {
        match self
            .touched
            .iter_mut()
            .find(|r| r.start <= xs.end && xs.start <= r.end)
        {
            Some(r) => *r = r.start.min(xs.start)..r.end.max(xs.end),
            None => self.touched.push(xs),
        }
    }

    /// Marks the end of a tile's contributions.
    #[inline(always)]
    pub(super) fn end_tile(&mut self) {
        self.tiles += 1;
        if self.tiles == FOLD {
            self.fold();
        }
    }

    /// Adds the narrow lanes of the quantities touched since the last fold
    /// into the wide ones and clears them (the others hold zeros).
    #[inline(always)]
    pub(super) fn fold(&mut self) {
        for xs in self.touched.drain(..) {
            let lanes = xs.start * TILE..xs.end * TILE;
            for (w, v) in self.wide[lanes.clone()]
                .iter_mut()
                .zip(&mut self.narrow[lanes])
            {
                *w += v.wide();
                *v = T::zero();
            }
        }
        self.tiles = 0;
    }

    /// Adds the sums of the lanes into `out` (one value a quantity).
    #[inline(always)]
    pub(super) fn finish(mut self, out: &mut [f64]) {
        self.fold();
        for (o, lanes) in out.iter_mut().zip(self.wide.chunks_exact(TILE)) {
            *o += lanes.iter().sum::<f64>();
        }
    }
}

/// The attention of one tile of rows.
pub(super) struct Tile<T, const D: usize> {
    /// Distance in the logits.
    pub(super) distance: Distance,
    /// `1/tau` in `T`.
    pub(super) inv_tau: T,
    /// Rows in the tile.
    pub(super) n: usize,
    /// Centroids the tile attends to (its window, see [`Visit::window`]).
    pub(super) k: usize,
    /// The tile's weight vectors: lanes of `w_ie` (D quantities).
    pub(super) w: Vec<T>,
    /// Lanes of `a_ij` (k quantities).
    pub(super) a: Vec<T>,
    /// Lanes of `coef_ij` (Euclidean distance; k quantities), then, after
    /// [`Self::weigh`], of `b_ij = a_ij coef_ij` (any distance).
    pub(super) b: Vec<T>,
    /// Per-row scratch: the row maxima of the logits.
    pub(super) row: Vec<T>,
    /// Per-row scratch: the softmax denominators (after the maxima are
    /// subtracted from the logits).
    pub(super) sum: Vec<T>,
    /// Per-row scratch: `1 / sum`.
    pub(super) inv: Vec<T>,
}

impl<T: Real, const D: usize> Tile<T, D> {
    #[inline(always)]
    pub(super) fn new(geo: &Geometry) -> Self {
        Self {
            distance: geo.distance,
            inv_tau: T::of(1.0 / geo.tau),
            n: 0,
            k: 0,
            w: vec![T::zero(); D * TILE],
            a: vec![T::zero(); geo.k * TILE],
            b: vec![T::zero(); geo.k * TILE],
            row: vec![T::zero(); TILE],
            sum: vec![T::zero(); TILE],
            inv: vec![T::zero(); TILE],
        }
    }

    /// The lanes of `w_ie` for coordinate `e`.
    #[inline(always)]
    pub(super) fn w(&self, e: usize) -> &[T] {
        lanes(&self.w, e, self.n)
    }

    /// The lanes of `a_ij` for centroid `j`.
    #[inline(always)]
    pub(super) fn a(&self, j: usize) -> &[T] {
        lanes(&self.a, j, self.n)
    }

    /// Loads the weight vectors `rows` (at most [`TILE`]) and computes their
    /// attention against the centroids `c` (the tile's window: lane `j` is
    /// `c[j]`). The softmax subtracts the row maximum.
    #[inline(always)]
    pub(super) fn attend(&mut self, rows: &[[T; D]], c: &[[T; D]]) {
        let n = rows.len();
        self.n = n;
        self.k = c.len();
        load_lanes(rows, &mut self.w);
        let inv_tau = self.inv_tau;
        let zmax = &mut self.row[..n];
        zmax.fill(T::neg_infinity());
        for (j, cj) in c.iter().enumerate() {
            let z = lanes_mut(&mut self.a, j, n);
            for (e, &ce) in cj.iter().enumerate() {
                for (z, &w) in z.iter_mut().zip(lanes(&self.w, e, n)) {
                    let x = w - ce;
                    *z = if e == 0 { x * x } else { *z + x * x };
                }
            }
            match self.distance {
                Distance::Squared => {
                    for (z, m) in z.iter_mut().zip(zmax.iter_mut()) {
                        *z = -*z * inv_tau;
                        *m = num_traits::Float::max(*m, *z);
                    }
                }
                Distance::Euclidean => {
                    let coef = lanes_mut(&mut self.b, j, n);
                    for ((z, m), coef) in z.iter_mut().zip(zmax.iter_mut()).zip(coef) {
                        let dist = z.sqrt();
                        *z = -dist * inv_tau;
                        *coef = if dist > T::zero() {
                            -inv_tau / dist
                        } else {
                            T::zero()
                        };
                        *m = num_traits::Float::max(*m, *z);
                    }
                }
            }
        }
        let sum = &mut self.sum[..n];
        sum.fill(T::zero());
        for j in 0..c.len() {
            for ((a, &m), s) in lanes_mut(&mut self.a, j, n)
                .iter_mut()
                .zip(zmax.iter())
                .zip(sum.iter_mut())
            {
                *a = (*a - m).softmax_exp();
                *s += *a;
            }
        }
        let inv_sum = &mut self.inv[..n];
        for (inv, &s) in inv_sum.iter_mut().zip(sum.iter()) {
            *inv = s.recip();
        }
        for j in 0..c.len() {
            for (a, &inv) in lanes_mut(&mut self.a, j, n).iter_mut().zip(inv_sum.iter()) {
                *a *= inv;
            }
        }
    }

    /// Adds each row's free energy `-tau ln sum_j exp(z_ij)` (times its
    /// count, `count[r][0]`, when given) into quantity `x` of `sums`.
    #[inline(always)]
    pub(super) fn add_energy(
        &self,
        sums: &mut LaneSums<T>,
        x: usize,
        tau: T,
        count: Option<&[[T; 1]]>,
    ) {
        let n = self.n;
        sums.touch(x..x + 1);
        let lanes = sums.get(x, n);
        let Some(count) = count else {
            // One logarithm a tile, not one a row: each row's sum is at
            // least 1 (its largest term is 1) and at most k, so the
            // product of a tile's sums only grows, and is folded into the
            // logarithm before it can leave f64's range.
            let (mut rows, mut product) = (0.0, 1.0);
            for (&m, &s) in self.row[..n].iter().zip(&self.sum[..n]) {
                rows += m.wide();
                product *= s.wide();
                if product > FOLD_PRODUCT {
                    rows += product.ln();
                    product = 1.0;
                }
            }
            lanes[0] += T::of(-tau.wide() * (rows + product.ln()));
            return;
        };
        for (r, (e, (&m, &s))) in lanes
            .iter_mut()
            .zip(self.row.iter().zip(&self.sum))
            .enumerate()
        {
            *e += -tau * (m + s.ln()) * count[r][0];
        }
    }

    /// Multiplies the attention of each row by its count (`count[r][0]`):
    /// the row stands for that many equal weight vectors.
    #[inline(always)]
    pub(super) fn repeat(&mut self, count: &[[T; 1]]) {
        for j in 0..self.k {
            for (a, n) in lanes_mut(&mut self.a, j, self.n).iter_mut().zip(count) {
                *a *= n[0];
            }
        }
    }

    /// `xbar_i = sum_j a_ij x_ij` into `mean` for the lanes `x` (k quantities).
    #[inline(always)]
    pub(super) fn mean(&self, x: &[T], mean: &mut [T]) {
        let mean = &mut mean[..self.n];
        mean.fill(T::zero());
        for j in 0..self.k {
            for ((m, &a), &x) in mean.iter_mut().zip(self.a(j)).zip(lanes(x, j, self.n)) {
                *m += a * x;
            }
        }
    }

    /// Sets the lanes of `b_ij = a_ij coef_ij`, with which the backward
    /// passes weigh the logit derivatives.
    #[inline(always)]
    pub(super) fn weigh(&mut self) {
        let n = self.n;
        for j in 0..self.k {
            let (a, b) = (lanes(&self.a, j, n), lanes_mut(&mut self.b, j, n));
            match self.distance {
                Distance::Squared => {
                    let coef = -T::of(2.0) * self.inv_tau;
                    b.iter_mut().zip(a).for_each(|(b, &a)| *b = a * coef);
                }
                Distance::Euclidean => b.iter_mut().zip(a).for_each(|(b, &a)| *b = a * *b),
            }
        }
    }

    /// `xc_ij coef_ij = b_ij (x_ij - xbar_i)` over the tile's rows, for the
    /// per-(i,j) values `x` (lanes, k quantities) and `xbar` from
    /// [`Self::mean`]; needs [`Self::weigh`].
    #[inline(always)]
    pub(super) fn centred<'s>(
        &'s self,
        j: usize,
        x: &'s [T],
        xbar: &'s [T],
    ) -> impl Iterator<Item = T> + 's {
        let n = self.n;
        lanes(&self.b, j, n)
            .iter()
            .zip(lanes(x, j, n))
            .zip(xbar)
            .map(|((&b, &x), &xbar)| b * (x - xbar))
    }

    /// Adds the tile's `a_ij` into quantity `lo + j` of `sums` and `a_ij w_ie`
    /// into quantity `k + (lo + j) D + e`, for a window of the `k` centroids
    /// that starts at `lo`.
    #[inline(always)]
    pub(super) fn add_moments(&self, sums: &mut LaneSums<T>, lo: usize, k: usize) {
        let n = self.n;
        sums.touch(lo..lo + self.k);
        sums.touch(k + lo * D..k + (lo + self.k) * D);
        for j in 0..self.k {
            for (s, &a) in sums.get(lo + j, n).iter_mut().zip(self.a(j)) {
                *s += a;
            }
            for e in 0..D {
                let s = sums.get(k + (lo + j) * D + e, n);
                for ((s, &a), &w) in s.iter_mut().zip(self.a(j)).zip(self.w(e)) {
                    *s += a * w;
                }
            }
        }
    }

    /// `x_ij = g_i . (c_j - w_i)` (lanes, k quantities) from the lanes of `g`
    /// (D quantities): the `q_ij` of the direct terms, shifted by the per-row
    /// constant `-g_i . w_i`, which centring removes. The shift keeps the
    /// values small where the attention is large, so that `q_ij - qbar_i`
    /// loses few bits to cancellation.
    #[inline(always)]
    pub(super) fn set_output_dots(&self, g: &[T], c: &[[T; D]], x: &mut [T]) {
        let n = self.n;
        for (j, cj) in c.iter().enumerate() {
            let xj = lanes_mut(x, j, n);
            for (e, &ce) in cj.iter().enumerate() {
                for ((x, &g), &w) in xj.iter_mut().zip(lanes(g, e, n)).zip(self.w(e)) {
                    let y = g * (ce - w);
                    *x = if e == 0 { y } else { *x + y };
                }
            }
        }
    }

    /// `x_ij = sum_e (w_ie - f_je) v_je` (lanes, k quantities): the `r_ij`
    /// of the adjoint terms.
    #[inline(always)]
    pub(super) fn set_adjoint_dots(&self, f: &[[T; D]], v: &[[T; D]], x: &mut [T]) {
        for (j, (fj, vj)) in f.iter().zip(v).enumerate() {
            let xj = lanes_mut(x, j, self.n);
            for e in 0..D {
                for (x, &w) in xj.iter_mut().zip(self.w(e)) {
                    let y = (w - fj[e]) * vj[e];
                    *x = if e == 0 { y } else { *x + y };
                }
            }
        }
    }
}
