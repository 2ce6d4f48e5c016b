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
//! With scalar weights (d = 1), at least 32 centroids and the centroids in
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

use super::config::Distance;
use rayon::prelude::*;
use std::ops::Range;

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
        let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
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
        self.mass.iter().map(|&s| if s > DEAD_MASS { 1.0 / s } else { 0.0 }).collect()
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
                nj[e] = if s > DEAD_MASS { T::of(self.weighted[j * d + e] / s) } else { cj[e] };
                moved += (nj[e].wide() - cj[e].wide()).powi(2);
            }
            shift = shift.max(moved.sqrt());
        }
        shift
    }
}

// ----------------------------------------------------------------------------
// Chunks, passes and their dispatch

/// At most this many chunks: bounds the memory of the per-chunk partial sums.
const MAX_CHUNKS: usize = 128;
/// At least this many rows per chunk: amortises the per-chunk scratch.
const MIN_CHUNK_ROWS: usize = 1024;

/// Rows per chunk for m rows, a multiple of [`TILE`]; a function of m only
/// (determinism).
fn chunk_rows(m: usize) -> usize {
    MIN_CHUNK_ROWS.max(m.div_ceil(MAX_CHUNKS)).next_multiple_of(TILE)
}

/// The work of one pass on one chunk of rows: the unit a thread runs.
trait Pass: Sync {
    /// What the pass writes: f64 partial sums (reducing passes, see
    /// [`sum_rows`]) or output rows (mapping passes, see [`map_rows`]).
    type Out: Send;

    /// Processes `rows`, adding into (reducing) or writing (mapping) `out`.
    /// Implementations are `#[inline(always)]`, so that the body is compiled
    /// into each instruction-set version of [`run_chunk`].
    fn chunk(&self, rows: Range<usize>, out: &mut [Self::Out]);
}

/// Runs `pass` on one chunk with the widest vector instructions the CPU
/// offers among those the passes are compiled for: on x86-64, AVX-512 (with
/// 256-bit vectors: its 32 registers avoid the spills of AVX2), AVX2, or the
/// SSE2 baseline. The passes never fuse a multiply and an add, so every
/// version computes bit-for-bit the same result.
fn run_chunk<P: Pass>(pass: &P, rows: Range<usize>, out: &mut [P::Out]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            // SAFETY: the CPU supports every feature `chunk_avx512` is
            // compiled for (checked by `has_avx512`).
            return unsafe { chunk_avx512(pass, rows, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, the one feature `chunk_avx2` is
            // compiled for, as checked just above.
            return unsafe { chunk_avx2(pass, rows, out) };
        }
    }
    pass.chunk(rows, out)
}

/// Whether the CPU has the AVX-512 features [`chunk_avx512`] is compiled for.
#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx512f") && has!("avx512vl") && has!("avx512bw") && has!("avx512dq")
}

/// [`Pass::chunk`] compiled for AVX-512 (F, VL, BW, DQ).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
fn chunk_avx512<P: Pass>(pass: &P, rows: Range<usize>, out: &mut [P::Out]) {
    pass.chunk(rows, out)
}

/// [`Pass::chunk`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn chunk_avx2<P: Pass>(pass: &P, rows: Range<usize>, out: &mut [P::Out]) {
    pass.chunk(rows, out)
}

/// Sums `len` f64 values over all m rows: each chunk adds its rows into its
/// own partial sums, and the partials are added in chunk order.
fn sum_rows<P: Pass<Out = f64>>(m: usize, len: usize, pass: &P) -> Vec<f64> {
    let chunk = chunk_rows(m);
    let chunks = m.div_ceil(chunk);
    let mut total = vec![0f64; len];
    // Chunks run in parallel a batch at a time, so that the partials alive
    // at once stay within PARTIALS_BYTES (at least 2 of them, at most
    // SUM_BATCH); they are added in chunk order, so the batch size does not
    // change the result.
    let batch_len = (PARTIALS_BYTES / (len.max(1) * 8)).clamp(2, SUM_BATCH);
    for batch in (0..chunks).step_by(batch_len) {
        let partials: Vec<Vec<f64>> = (batch..chunks.min(batch + batch_len))
            .into_par_iter()
            .map(|n| {
                let mut partial = vec![0f64; len];
                run_chunk(pass, n * chunk..m.min((n + 1) * chunk), &mut partial);
                partial
            })
            .collect();
        for partial in partials {
            total.iter_mut().zip(partial).for_each(|(t, p)| *t += p);
        }
    }
    total
}

/// Most chunks of a reducing pass in flight at once (see [`sum_rows`]).
const SUM_BATCH: usize = 16;
/// Bytes of partial sums a reducing pass keeps alive at once, beyond two
/// partials (see [`sum_rows`]): only the dense adjoint's (k d)^2 sums reach it.
const PARTIALS_BYTES: usize = 1 << 20;

/// Runs `pass` over chunks of the rows of `out` (one `P::Out` a row), in
/// parallel; each chunk gets its rows' slice of `out`.
fn map_rows<P: Pass>(out: &mut [P::Out], pass: &P) {
    let chunk = chunk_rows(out.len());
    out.par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(n, rows)| run_chunk(pass, n * chunk..n * chunk + rows.len(), rows));
}

/// Runs `$body` with the const `$D` equal to the weight dimension `$d`:
/// the passes are compiled for d in {1, 2, 4, 8} (as the CUDA kernels).
macro_rules! with_dim {
    ($d:expr, $D:ident => $body:expr) => {
        match $d {
            1 => {
                const $D: usize = 1;
                $body
            }
            2 => {
                const $D: usize = 2;
                $body
            }
            4 => {
                const $D: usize = 4;
                $body
            }
            8 => {
                const $D: usize = 8;
                $body
            }
            d => panic!("weight dimension {d}: the passes run on d = 1, 2, 4 or 8"),
        }
    };
}

/// `x` (a multiple of `D` values) as vectors of dimension `D`.
fn vectors<T, const D: usize>(x: &[T]) -> &[[T; D]] {
    x.as_chunks::<D>().0
}

/// `x` (a multiple of `D` values) as mutable vectors of dimension `D`.
fn vectors_mut<T, const D: usize>(x: &mut [T]) -> &mut [[T; D]] {
    x.as_chunks_mut::<D>().0
}

// ----------------------------------------------------------------------------
// Tiles

/// Rows per tile (at most). Every per-row quantity of a tile is a slice of
/// its rows (`x[r]`, one per row), so the arithmetic is a sequence of simple
/// element-wise loops over the rows that the compiler vectorises.
const TILE: usize = 32;

/// The tiles of `rows`: `(first row, number of rows)`.
fn tiles(rows: Range<usize>) -> impl Iterator<Item = (usize, usize)> {
    let end = rows.end;
    rows.step_by(TILE).map(move |start| (start, TILE.min(end - start)))
}

/// The `n` lanes of quantity `x` in a lane buffer (`TILE` lanes a quantity).
#[inline(always)]
fn lanes<T>(buf: &[T], x: usize, n: usize) -> &[T] {
    &buf[x * TILE..x * TILE + n]
}

/// The `n` lanes of quantity `x` in a lane buffer, mutably.
#[inline(always)]
fn lanes_mut<T>(buf: &mut [T], x: usize, n: usize) -> &mut [T] {
    &mut buf[x * TILE..x * TILE + n]
}

/// The rows of a tile, transposed into the lane buffer `lanes` (`D` quantities).
#[inline(always)]
fn load_lanes<T: Real, const D: usize>(rows: &[[T; D]], buf: &mut [T]) {
    for e in 0..D {
        for (x, row) in lanes_mut(buf, e, rows.len()).iter_mut().zip(rows) {
            *x = row[e];
        }
    }
}

/// The lane buffer `buf` (`D` quantities) transposed into `rows`.
#[inline(always)]
fn store_lanes<T: Real, const D: usize>(buf: &[T], rows: &mut [[T; D]]) {
    for e in 0..D {
        for (row, &x) in rows.iter_mut().zip(lanes(buf, e, TILE)) {
            row[e] = x;
        }
    }
}

/// Tiles whose contributions a [`LaneSums`] adds in the float type before
/// widening them into its f64 sums.
const FOLD: usize = 4;

/// Per-row partial sums of `len` quantities over the tiles of a chunk. Each
/// tile adds its rows lane by lane in the float type (`x[r]`, one lane per
/// row of a tile); every [`FOLD`] tiles the lanes are added into f64 lanes,
/// and [`Self::finish`] adds the f64 lanes, in order, into the chunk's
/// partial sums. A sum over m rows thus takes at most `FOLD` terms in the
/// float type and the rest in f64.
struct LaneSums<T> {
    /// The lanes of the current tiles.
    narrow: Vec<T>,
    /// The lanes of the tiles folded so far.
    wide: Vec<f64>,
    /// Tiles added to `narrow` since the last fold.
    tiles: usize,
    /// Ranges covering the quantities added to since the last fold (see
    /// [`Self::touch`]; windowed tiles touch few of them).
    touched: Vec<Range<usize>>,
}

impl<T: Real> LaneSums<T> {
    fn new(len: usize) -> Self {
        Self {
            narrow: vec![T::zero(); len * TILE],
            wide: vec![0.0; len * TILE],
            tiles: 0,
            touched: Vec::new(),
        }
    }

    /// The lanes of quantity `x`, for a tile of `n` rows.
    #[inline(always)]
    fn get(&mut self, x: usize, n: usize) -> &mut [T] {
        lanes_mut(&mut self.narrow, x, n)
    }

    /// Records that the current tile adds to the quantities `xs` (and to no
    /// quantity outside the ranges it records): only those are folded.
    #[inline(always)]
    fn touch(&mut self, xs: Range<usize>) {
        match self.touched.iter_mut().find(|r| r.start <= xs.end && xs.start <= r.end) {
            Some(r) => *r = r.start.min(xs.start)..r.end.max(xs.end),
            None => self.touched.push(xs),
        }
    }

    /// Marks the end of a tile's contributions.
    #[inline(always)]
    fn end_tile(&mut self) {
        self.tiles += 1;
        if self.tiles == FOLD {
            self.fold();
        }
    }

    /// Adds the narrow lanes of the quantities touched since the last fold
    /// into the wide ones and clears them (the others hold zeros).
    #[inline(always)]
    fn fold(&mut self) {
        for xs in self.touched.drain(..) {
            let lanes = xs.start * TILE..xs.end * TILE;
            for (w, v) in self.wide[lanes.clone()].iter_mut().zip(&mut self.narrow[lanes]) {
                *w += v.wide();
                *v = T::zero();
            }
        }
        self.tiles = 0;
    }

    /// Adds the sums of the lanes into `out` (one value a quantity).
    #[inline(always)]
    fn finish(mut self, out: &mut [f64]) {
        self.fold();
        for (o, lanes) in out.iter_mut().zip(self.wide.chunks_exact(TILE)) {
            *o += lanes.iter().sum::<f64>();
        }
    }
}

// ----------------------------------------------------------------------------
// Visits: row order and centroid windows

/// Fewest centroids at which a pass orders its rows and windows its
/// centroids (see [`Visit`]): below it the attention of a tile spans most
/// centroids anyway.
const WINDOW_MIN_K: usize = 32;

/// Rows per bucket (on average) of the counting sort that orders a chunk.
const BUCKET_ROWS: usize = 8;

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
struct Visit {
    /// Number of rows in the chunk.
    len: usize,
    /// Number of centroids.
    k: usize,
    /// The chunk's rows (relative to its first) in visiting order; empty
    /// when they are visited in order (not windowed, or already ascending).
    order: Vec<u32>,
    /// The centroids in ascending order (d = 1) when tiles are windowed.
    sorted: Vec<f64>,
    /// Largest logit gap a window keeps, times tau.
    reach: f64,
    /// Distance in the logits.
    distance: Distance,
}

impl Visit {
    /// The visit of chunk `rows` of `w` for the centroids `c`.
    #[inline(always)]
    fn new<T: Real, const D: usize>(w: &[[T; D]], rows: Range<usize>, c: &[[T; D]], geo: &Geometry) -> Self {
        let mut visit = Self { len: rows.len(), k: c.len(), order: Vec::new(), sorted: Vec::new(), reach: 0.0, distance: geo.distance };
        let ascending = c.windows(2).all(|p| p[0][0] <= p[1][0]) && c.iter().all(|x| x[0].is_finite());
        if D != 1 || c.len() < WINDOW_MIN_K || !ascending {
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
    fn tiles(&self) -> impl Iterator<Item = (usize, usize)> {
        tiles(0..self.len)
    }

    /// The rows of `x` (the chunk's slice of a per-row input) at positions
    /// `p..p + n` of the visit: a slice of `x`, or gathered into `buf`.
    #[inline(always)]
    fn rows<'x, T: Copy, const D: usize>(&self, x: &'x [[T; D]], (p, n): (usize, usize), buf: &'x mut [[T; D]]) -> &'x [[T; D]] {
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
    fn store<T: Real, const D: usize>(&self, buf: &[T], (p, n): (usize, usize), out: &mut [[T; D]]) {
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
    fn window<T: Real, const D: usize>(&self, rows: &[[T; D]]) -> Range<usize> {
        let c = &self.sorted;
        if c.is_empty() {
            return 0..self.k;
        }
        let (lo, hi) = rows.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(x[0].wide()), hi.max(x[0].wide()))
        });
        let next = c.partition_point(|&x| x < lo);
        let below = if next > 0 { lo - c[next - 1] } else { f64::INFINITY };
        let above = if next < c.len() { c[next] - lo } else { f64::INFINITY };
        let far = below.min(above) + (hi - lo);
        let radius = match self.distance {
            Distance::Squared => (far * far + self.reach).sqrt(),
            Distance::Euclidean => far + self.reach,
        };
        // A relative margin covers the rounding of the bound itself.
        let radius = radius * (1.0 + 1e-9) + f64::MIN_POSITIVE;
        c.partition_point(|&x| x < lo - radius)..c.partition_point(|&x| x <= hi + radius)
    }

    /// Loads the tile of `w` (the chunk's weight vectors) at positions `at`
    /// of the visit into `tile`, attends it to its window of the centroids
    /// `c`, and returns the window.
    #[inline(always)]
    fn attend<T: Real, const D: usize>(
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
    let bits = if std::mem::size_of::<T>() == 4 { f32::MANTISSA_DIGITS } else { f64::MANTISSA_DIGITS };
    (k as f64).ln() + f64::from(bits + 8) * std::f64::consts::LN_2
}

/// The positions `0..x.len()` ordered by `key` up to buckets: a stable
/// counting sort into `x.len() / BUCKET_ROWS` buckets of equal width over
/// the range of the keys (all finite).
fn value_order<X>(x: &[X], key: impl Fn(&X) -> f64) -> Vec<u32> {
    let (lo, hi) = x.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(key(v)), hi.max(key(v))));
    let buckets = (x.len() / BUCKET_ROWS).max(1);
    let scale = if hi > lo { buckets as f64 / (hi - lo) } else { 0.0 };
    let bucket = |v: &X| (((key(v) - lo) * scale) as usize).min(buckets - 1);
    let mut start = vec![0u32; buckets + 1];
    for v in x {
        start[bucket(v) + 1] += 1;
    }
    for b in 1..=buckets {
        start[b] += start[b - 1];
    }
    let mut order = vec![0u32; x.len()];
    for (i, v) in x.iter().enumerate() {
        let b = bucket(v);
        order[start[b] as usize] = i as u32;
        start[b] += 1;
    }
    order
}

/// The attention of one tile of rows.
struct Tile<T, const D: usize> {
    /// Distance in the logits.
    distance: Distance,
    /// `1/tau` in `T`.
    inv_tau: T,
    /// Rows in the tile.
    n: usize,
    /// Centroids the tile attends to (its window, see [`Visit::window`]).
    k: usize,
    /// The tile's weight vectors: lanes of `w_ie` (D quantities).
    w: Vec<T>,
    /// Lanes of `a_ij` (k quantities).
    a: Vec<T>,
    /// Lanes of `coef_ij` (Euclidean distance; k quantities), then, after
    /// [`Self::weigh`], of `b_ij = a_ij coef_ij` (any distance).
    b: Vec<T>,
    /// Per-row scratch: the row maxima of the logits.
    row: Vec<T>,
    /// Per-row scratch: the softmax denominators (after the maxima are
    /// subtracted from the logits).
    sum: Vec<T>,
    /// Per-row scratch: `1 / sum`.
    inv: Vec<T>,
}

impl<T: Real, const D: usize> Tile<T, D> {
    #[inline(always)]
    fn new(geo: &Geometry) -> Self {
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
    fn w(&self, e: usize) -> &[T] {
        lanes(&self.w, e, self.n)
    }

    /// The lanes of `a_ij` for centroid `j`.
    #[inline(always)]
    fn a(&self, j: usize) -> &[T] {
        lanes(&self.a, j, self.n)
    }

    /// Loads the weight vectors `rows` (at most [`TILE`]) and computes their
    /// attention against the centroids `c` (the tile's window: lane `j` is
    /// `c[j]`). The softmax subtracts the row maximum.
    #[inline(always)]
    fn attend(&mut self, rows: &[[T; D]], c: &[[T; D]]) {
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
                        *coef = if dist > T::zero() { -inv_tau / dist } else { T::zero() };
                        *m = num_traits::Float::max(*m, *z);
                    }
                }
            }
        }
        let sum = &mut self.sum[..n];
        sum.fill(T::zero());
        for j in 0..c.len() {
            for ((a, &m), s) in lanes_mut(&mut self.a, j, n).iter_mut().zip(zmax.iter()).zip(sum.iter_mut()) {
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
    fn add_energy(&self, sums: &mut LaneSums<T>, x: usize, tau: T, count: Option<&[[T; 1]]>) {
        let n = self.n;
        sums.touch(x..x + 1);
        let lanes = sums.get(x, n);
        for (r, (e, (&m, &s))) in lanes.iter_mut().zip(self.row.iter().zip(&self.sum)).enumerate() {
            let energy = -tau * (m + s.ln());
            *e += count.map_or(energy, |count| energy * count[r][0]);
        }
    }

    /// Multiplies the attention of each row by its count (`count[r][0]`):
    /// the row stands for that many equal weight vectors.
    #[inline(always)]
    fn repeat(&mut self, count: &[[T; 1]]) {
        for j in 0..self.k {
            for (a, n) in lanes_mut(&mut self.a, j, self.n).iter_mut().zip(count) {
                *a *= n[0];
            }
        }
    }

    /// `xbar_i = sum_j a_ij x_ij` into `mean` for the lanes `x` (k quantities).
    #[inline(always)]
    fn mean(&self, x: &[T], mean: &mut [T]) {
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
    fn weigh(&mut self) {
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
    fn centred<'s>(&'s self, j: usize, x: &'s [T], xbar: &'s [T]) -> impl Iterator<Item = T> + 's {
        let n = self.n;
        lanes(&self.b, j, n).iter().zip(lanes(x, j, n)).zip(xbar).map(|((&b, &x), &xbar)| b * (x - xbar))
    }

    /// Adds the tile's `a_ij` into quantity `lo + j` of `sums` and `a_ij w_ie`
    /// into quantity `k + (lo + j) D + e`, for a window of the `k` centroids
    /// that starts at `lo`.
    #[inline(always)]
    fn add_moments(&self, sums: &mut LaneSums<T>, lo: usize, k: usize) {
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
    fn set_output_dots(&self, g: &[T], c: &[[T; D]], x: &mut [T]) {
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
    fn set_adjoint_dots(&self, f: &[[T; D]], v: &[[T; D]], x: &mut [T]) {
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

// ----------------------------------------------------------------------------
// Forward passes

/// Soft-assignment and reduce (one k-means step's sums).
///
/// `w`: m x d, `c`: k x d. Kernel: `soft_assign_reduce`.
pub fn soft_assign_reduce<T: Real>(w: &[T], c: &[T], geo: &Geometry) -> Moments {
    counted_reduce(w, &[], c, geo)
}

/// [`soft_assign_reduce`] where row i stands for `count[i]` equal weight
/// vectors (an empty `count` counts every row once): the sums of a k-means
/// step over weights grouped into bins (see `binned`).
pub fn counted_reduce<T: Real>(w: &[T], count: &[T], c: &[T], geo: &Geometry) -> Moments {
    reduce(w, count, c, geo, false).0
}

/// [`counted_reduce`] and the free energy of the soft assignment,
/// `E(C) = -tau sum_i ln sum_j exp(z_ij)` (summed over the counted rows):
/// the function whose stationary points are the fixed points of the
/// k-means map for the squared distance (`dE/dc_j = 2 S_j (c_j - F_j)`),
/// and which a k-means step never increases. No kernel: the forward Newton
/// solve's line search on the CPU uses it.
pub fn counted_reduce_energy<T: Real>(w: &[T], count: &[T], c: &[T], geo: &Geometry) -> (Moments, f64) {
    let (moments, energy) = reduce(w, count, c, geo, true);
    (moments, energy.unwrap_or(f64::NAN))
}

fn reduce<T: Real>(w: &[T], count: &[T], c: &[T], geo: &Geometry, energy: bool) -> (Moments, Option<f64>) {
    let k = geo.k;
    let sums = with_dim!(geo.d, D => {
        let pass = Reduce::<T, D> { w: vectors(w), count: vectors(count), c: vectors(c), geo, energy };
        sum_rows(pass.w.len(), k * (D + 1) + usize::from(energy), &pass)
    });
    let (mass, rest) = sums.split_at(k);
    let (weighted, energy) = rest.split_at(k * geo.d);
    (Moments { mass: mass.to_vec(), weighted: weighted.to_vec() }, energy.first().copied())
}

/// [`counted_reduce`] on one chunk: partial sums `[S (k), sum a w (k x d)]`,
/// then the energy when asked for.
struct Reduce<'a, T, const D: usize> {
    w: &'a [[T; D]],
    /// Rows each row stands for; empty: one each.
    count: &'a [[T; 1]],
    c: &'a [[T; D]],
    geo: &'a Geometry,
    /// Whether to sum the free energy too.
    energy: bool,
}

impl<T: Real, const D: usize> Pass for Reduce<'_, T, D> {
    type Out = f64;

    #[inline(always)]
    fn chunk(&self, rows: Range<usize>, out: &mut [f64]) {
        let mut tile = Tile::<T, D>::new(self.geo);
        let mut sums = LaneSums::<T>::new(out.len());
        let visit = Visit::new(self.w, rows.clone(), self.c, self.geo);
        let count = if self.count.is_empty() { &[][..] } else { &self.count[rows.clone()] };
        let (w, mut wbuf, mut nbuf) = (&self.w[rows], [[T::zero(); D]; TILE], [[T::zero(); 1]; TILE]);
        let tau = T::of(self.geo.tau);
        for at in visit.tiles() {
            let win = visit.attend(&mut tile, w, at, &mut wbuf, self.c);
            let counts = (!count.is_empty()).then(|| visit.rows(count, at, &mut nbuf));
            if self.energy {
                tile.add_energy(&mut sums, self.geo.k * (D + 1), tau, counts);
            }
            if let Some(counts) = counts {
                tile.repeat(counts);
            }
            tile.add_moments(&mut sums, win.start, self.geo.k);
            sums.end_tile();
        }
        sums.finish(out);
    }
}

/// Runs k-means steps from `c0` until no centroid moves more than `tol` or
/// `max_iter` steps are done. Returns the centroids, the number of steps and
/// the last shift (see [`Moments::update`]: with `tol = 0` the iteration
/// stops once it repeats itself exactly). Kernel: `soft_assign_reduce` once
/// per step.
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
    with_dim!(geo.d, D => map_rows(vectors_mut(out), &Output::<T, D> { w: vectors(w), c: vectors(c), geo }))
}

/// [`soft_assign_output`] on one chunk.
struct Output<'a, T, const D: usize> {
    w: &'a [[T; D]],
    c: &'a [[T; D]],
    geo: &'a Geometry,
}

impl<T: Real, const D: usize> Pass for Output<'_, T, D> {
    type Out = [T; D];

    #[inline(always)]
    fn chunk(&self, rows: Range<usize>, out: &mut [[T; D]]) {
        let mut tile = Tile::<T, D>::new(self.geo);
        let mut o = vec![T::zero(); D * TILE];
        let visit = Visit::new(self.w, rows.clone(), self.c, self.geo);
        let (w, mut wbuf) = (&self.w[rows], [[T::zero(); D]; TILE]);
        for at in visit.tiles() {
            let c = &self.c[visit.attend(&mut tile, w, at, &mut wbuf, self.c)];
            let n = tile.n;
            o.fill(T::zero());
            for (j, cj) in c.iter().enumerate() {
                for (e, &ce) in cj.iter().enumerate() {
                    for (o, &a) in lanes_mut(&mut o, e, n).iter_mut().zip(tile.a(j)) {
                        *o += a * ce;
                    }
                }
            }
            visit.store(&o, at, out);
        }
    }
}

/// Hard assignment `index_i = argmin_j dist(w_i, c_j)` (ties go to the lower
/// index). Kernel: `hard_assign`.
pub fn hard_assign<T: Real>(w: &[T], c: &[T], d: usize, out: &mut [u32]) {
    map_rows(out, &HardAssign { w, c, d })
}

/// [`hard_assign`] on one chunk.
struct HardAssign<'a, T> {
    w: &'a [T],
    c: &'a [T],
    d: usize,
}

impl<T: Real> Pass for HardAssign<'_, T> {
    type Out = u32;

    #[inline(always)]
    fn chunk(&self, rows: Range<usize>, out: &mut [u32]) {
        let d = self.d;
        for (i, oi) in rows.zip(out.iter_mut()) {
            let wi = &self.w[i * d..(i + 1) * d];
            let mut best = (T::infinity(), 0u32);
            for (j, cj) in self.c.chunks_exact(d).enumerate() {
                let e2 = wi.iter().zip(cj).fold(T::zero(), |s, (&a, &b)| s + (a - b) * (a - b));
                if e2 < best.0 {
                    best = (e2, j as u32);
                }
            }
            *oi = best.1;
        }
    }
}

// ----------------------------------------------------------------------------
// Backward passes

/// The sums the backward needs before its solve, in one pass: the moments
/// at `c` (as [`soft_assign_reduce`]) and the centroid cotangent `h = G_C^T g`,
/// `h_j = sum_i a_ij g_i - sum_i qc_ij coef_ij e_ij` with `q_ij = g_i . c_j`.
///
/// `g`: m x d upstream gradient. Returns the moments and h (k x d).
/// Kernels: `soft_assign_reduce` and `centroid_cotangent` (same attention).
pub fn cotangent_reduce<T: Real>(w: &[T], c: &[T], g: &[T], geo: &Geometry) -> (Moments, Vec<f64>) {
    let (k, d) = (geo.k, geo.d);
    let sums = with_dim!(d, D => {
        let pass = Cotangent::<T, D> { w: vectors(w), c: vectors(c), g: vectors(g), geo };
        sum_rows(pass.w.len(), k * (2 * D + 1), &pass)
    });
    let (mass, rest) = sums.split_at(k);
    let (weighted, h) = rest.split_at(k * d);
    (Moments { mass: mass.to_vec(), weighted: weighted.to_vec() }, h.to_vec())
}

/// The centroid cotangent `h` alone (k x d): [`cotangent_reduce`] without
/// its moments. Kernel: `centroid_cotangent`.
pub fn centroid_cotangent<T: Real>(w: &[T], c: &[T], g: &[T], geo: &Geometry) -> Vec<f64> {
    cotangent_reduce(w, c, g, geo).1
}

/// [`cotangent_reduce`] on one chunk: partial sums `[S (k), sum a w (k x d), h (k x d)]`.
struct Cotangent<'a, T, const D: usize> {
    w: &'a [[T; D]],
    c: &'a [[T; D]],
    g: &'a [[T; D]],
    geo: &'a Geometry,
}

impl<T: Real, const D: usize> Pass for Cotangent<'_, T, D> {
    type Out = f64;

    #[inline(always)]
    fn chunk(&self, rows: Range<usize>, out: &mut [f64]) {
        let k = self.geo.k;
        let mut tile = Tile::<T, D>::new(self.geo);
        let mut sums = LaneSums::<T>::new(out.len());
        let mut g = vec![T::zero(); D * TILE];
        let (mut q, mut qbar) = (vec![T::zero(); k * TILE], vec![T::zero(); TILE]);
        let visit = Visit::new(self.w, rows.clone(), self.c, self.geo);
        let (w, mut wbuf) = (&self.w[rows.clone()], [[T::zero(); D]; TILE]);
        let (gs, mut gbuf) = (&self.g[rows], [[T::zero(); D]; TILE]);
        for at in visit.tiles() {
            let win = visit.attend(&mut tile, w, at, &mut wbuf, self.c);
            let c = &self.c[win.clone()];
            let n = tile.n;
            tile.add_moments(&mut sums, win.start, k);
            tile.weigh();
            load_lanes(visit.rows(gs, at, &mut gbuf), &mut g);
            tile.set_output_dots(&g, c, &mut q);
            tile.mean(&q, &mut qbar);
            sums.touch(k * (D + 1) + win.start * D..k * (D + 1) + win.end * D);
            for (j, cj) in c.iter().enumerate() {
                for (e, &ce) in cj.iter().enumerate() {
                    let h = sums.get(k * (D + 1) + (win.start + j) * D + e, n).iter_mut();
                    let terms = h.zip(tile.a(j)).zip(lanes(&g, e, n)).zip(tile.centred(j, &q, &qbar)).zip(tile.w(e));
                    for ((((h, &a), &g), t), &w) in terms {
                        *h += a * g - t * (w - ce);
                    }
                }
            }
            sums.end_tile();
        }
        sums.finish(out);
    }
}

/// `u_j / S_j` for every centroid j (k x d), with `inv_mass = 1/S`, rounded to `T`.
fn scaled_adjoint<T: Real>(u: &[f64], inv_mass: &[f64], d: usize) -> Vec<T> {
    u.chunks_exact(d)
        .zip(inv_mass)
        .flat_map(|(uj, &s)| uj.iter().map(move |&x| T::of(x * s)))
        .collect()
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
    let v: Vec<T> = scaled_adjoint(u, inv_mass, geo.d);
    with_dim!(geo.d, D => {
        let pass = Matvec::<T, D> { w: vectors(w), c: vectors(c), f: vectors(f), v: vectors(&v), geo };
        sum_rows(pass.w.len(), geo.k * D, &pass)
    })
}

/// [`adjoint_matvec`] on one chunk, with `v = u / S` in `T`.
struct Matvec<'a, T, const D: usize> {
    w: &'a [[T; D]],
    c: &'a [[T; D]],
    f: &'a [[T; D]],
    v: &'a [[T; D]],
    geo: &'a Geometry,
}

impl<T: Real, const D: usize> Pass for Matvec<'_, T, D> {
    type Out = f64;

    #[inline(always)]
    fn chunk(&self, rows: Range<usize>, out: &mut [f64]) {
        let mut tile = Tile::<T, D>::new(self.geo);
        let mut sums = LaneSums::<T>::new(out.len());
        let (mut x, mut xbar) = (vec![T::zero(); self.geo.k * TILE], vec![T::zero(); TILE]);
        let visit = Visit::new(self.w, rows.clone(), self.c, self.geo);
        let (w, mut wbuf) = (&self.w[rows], [[T::zero(); D]; TILE]);
        for at in visit.tiles() {
            let win = visit.attend(&mut tile, w, at, &mut wbuf, self.c);
            let c = &self.c[win.clone()];
            let n = tile.n;
            tile.weigh();
            tile.set_adjoint_dots(&self.f[win.clone()], &self.v[win.clone()], &mut x);
            tile.mean(&x, &mut xbar);
            sums.touch(win.start * D..win.end * D);
            for (j, cj) in c.iter().enumerate() {
                for (e, &ce) in cj.iter().enumerate() {
                    let out = sums.get((win.start + j) * D + e, n);
                    let terms = out.iter_mut().zip(tile.centred(j, &x, &xbar)).zip(tile.w(e));
                    for ((o, t), &w) in terms {
                        *o -= t * (w - ce);
                    }
                }
            }
            sums.end_tile();
        }
        sums.finish(out);
    }
}

/// The whole matrix of [`adjoint_matvec`], `J^T` (n x n with n = k d,
/// row-major, unknowns ordered as u), in one pass instead of n matvecs:
/// `(J^T)_{(j,e),(l,e')} = -S_l^{-1} sum_i b_ij (w_i - c_j)_e
/// (delta_jl - a_il) (w_i - f_l)_e'` (`inv_mass` 0 zeroes a dead centroid's
/// column). Per row it costs n^2 multiply-adds on top of the attention, and
/// its partial sums n^2 f64 per chunk: meant for small n (see
/// `Solver::Dense`). No kernel: on CUDA the matrix is assembled from n
/// device matvecs.
pub fn adjoint_matrix<T: Real>(w: &[T], c: &[T], f: &[T], inv_mass: &[f64], geo: &Geometry) -> Vec<f64> {
    counted_adjoint_matrix(w, &[], c, f, inv_mass, geo)
}

/// [`adjoint_matrix`] where row i stands for `count[i]` equal weight
/// vectors (an empty `count` counts every row once), as
/// [`counted_reduce`].
pub fn counted_adjoint_matrix<T: Real>(w: &[T], count: &[T], c: &[T], f: &[T], inv_mass: &[f64], geo: &Geometry) -> Vec<f64> {
    let n = geo.k * geo.d;
    let mut jt = with_dim!(geo.d, D => {
        let pass = Assemble::<T, D> { w: vectors(w), count: vectors(count), c: vectors(c), f: vectors(f), geo };
        sum_rows(pass.w.len(), n * n, &pass)
    });
    for row in jt.chunks_exact_mut(n) {
        for (x, &s) in row.iter_mut().zip(inv_mass.iter().flat_map(|s| std::iter::repeat_n(s, geo.d))) {
            *x *= s;
        }
    }
    jt
}

/// [`adjoint_matrix`] on one chunk, before the column scaling by `1/S_l`.
struct Assemble<'a, T, const D: usize> {
    w: &'a [[T; D]],
    /// Rows each row stands for; empty: one each.
    count: &'a [[T; 1]],
    c: &'a [[T; D]],
    f: &'a [[T; D]],
    geo: &'a Geometry,
}

impl<T: Real, const D: usize> Pass for Assemble<'_, T, D> {
    type Out = f64;

    #[inline(always)]
    fn chunk(&self, rows: Range<usize>, out: &mut [f64]) {
        let n = self.geo.k * D;
        let mut tile = Tile::<T, D>::new(self.geo);
        // Lanes of x_(j,e) = b_ij (w_i - c_j)_e and y_(l,e') = (w_i - f_l)_e';
        // a_il y_(l,e') row by row (lane-major), so that the outer products
        // run along contiguous rows; `acc` is one output row of a tile. A
        // tile with a window of centroids adds only the window's block.
        let (mut x, mut y) = (vec![T::zero(); n * TILE], vec![T::zero(); n * TILE]);
        let (mut ay, mut acc) = (vec![T::zero(); TILE * n], vec![T::zero(); n]);
        let visit = Visit::new(self.w, rows.clone(), self.c, self.geo);
        let count = if self.count.is_empty() { &[][..] } else { &self.count[rows.clone()] };
        let (w, mut wbuf) = (&self.w[rows], [[T::zero(); D]; TILE]);
        // The rows' counts (ones when uncounted) weigh x alone: each term
        // is linear in x.
        let (ones, mut nbuf) = ([[T::of(1.0); 1]; TILE], [[T::zero(); 1]; TILE]);
        for at in visit.tiles() {
            let win = visit.attend(&mut tile, w, at, &mut wbuf, self.c);
            let (c, f) = (&self.c[win.clone()], &self.f[win.clone()]);
            let times = if count.is_empty() { &ones[..] } else { visit.rows(count, at, &mut nbuf) };
            tile.weigh();
            let (len, nw, first) = (tile.n, c.len() * D, win.start * D);
            for (j, (cj, fj)) in c.iter().zip(f).enumerate() {
                for e in 0..D {
                    let q = j * D + e;
                    let (b, a, wv) = (lanes(&tile.b, j, len), tile.a(j), tile.w(e));
                    for (i, &wi) in wv.iter().enumerate() {
                        x[q * TILE + i] = times[i][0] * b[i] * (wi - cj[e]);
                        let yi = wi - fj[e];
                        y[q * TILE + i] = yi;
                        ay[i * nw + q] = a[i] * yi;
                    }
                }
            }
            for p in 0..nw {
                // The block-diagonal term is summed in the same lane order as
                // the outer products, so that the two cancel exactly where
                // they should (a_il = 1).
                let j = p / D;
                let acc = &mut acc[..nw];
                acc.fill(T::zero());
                let mut diag = [T::zero(); D];
                for (i, &xi) in lanes(&x, p, len).iter().enumerate() {
                    for (o, &v) in acc.iter_mut().zip(&ay[i * nw..(i + 1) * nw]) {
                        *o += xi * v;
                    }
                    for (e, dg) in diag.iter_mut().enumerate() {
                        *dg += xi * y[(j * D + e) * TILE + i];
                    }
                }
                for (e, &dg) in diag.iter().enumerate() {
                    acc[j * D + e] -= dg;
                }
                let row = (first + p) * n + first;
                for (o, &a) in out[row..row + nw].iter_mut().zip(acc.iter()) {
                    *o += a.wide();
                }
            }
        }
    }
}

/// The weight gradient, direct plus implicit term, written into `out` (m x d):
/// `sum_j (qc_ij + rc_ij) coef_ij e_ij + sum_j (a_ij / S_j) u_j`, with
/// `q_ij = g_i . c_j` and `r_ij` as in [`adjoint_matvec`] (`f = F(C)`).
/// With `u = h` this is the JFB gradient. Kernel: `weight_grad`.
#[allow(clippy::too_many_arguments, reason = "the arguments of its kernel, in the same order")]
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
    let v: Vec<T> = scaled_adjoint(u, inv_mass, geo.d);
    with_dim!(geo.d, D => {
        let pass = Grad::<T, D> { w: vectors(w), c: vectors(c), f: vectors(f), g: vectors(g), v: vectors(&v), geo };
        map_rows(vectors_mut(out), &pass)
    })
}

/// [`weight_grad`] on one chunk, with `v = u / S` in `T`.
struct Grad<'a, T, const D: usize> {
    w: &'a [[T; D]],
    c: &'a [[T; D]],
    f: &'a [[T; D]],
    g: &'a [[T; D]],
    v: &'a [[T; D]],
    geo: &'a Geometry,
}

impl<T: Real, const D: usize> Pass for Grad<'_, T, D> {
    type Out = [T; D];

    #[inline(always)]
    fn chunk(&self, rows: Range<usize>, out: &mut [[T; D]]) {
        let k = self.geo.k;
        let mut tile = Tile::<T, D>::new(self.geo);
        let mut g = vec![T::zero(); D * TILE];
        let (mut q, mut qbar) = (vec![T::zero(); k * TILE], vec![T::zero(); TILE]);
        let (mut r, mut rbar) = (vec![T::zero(); k * TILE], vec![T::zero(); TILE]);
        let mut o = vec![T::zero(); D * TILE];
        let visit = Visit::new(self.w, rows.clone(), self.c, self.geo);
        let (w, mut wbuf) = (&self.w[rows.clone()], [[T::zero(); D]; TILE]);
        let (gs, mut gbuf) = (&self.g[rows], [[T::zero(); D]; TILE]);
        for at in visit.tiles() {
            let win = visit.attend(&mut tile, w, at, &mut wbuf, self.c);
            let (c, v) = (&self.c[win.clone()], &self.v[win.clone()]);
            let n = tile.n;
            tile.weigh();
            load_lanes(visit.rows(gs, at, &mut gbuf), &mut g);
            tile.set_output_dots(&g, c, &mut q);
            tile.set_adjoint_dots(&self.f[win], v, &mut r);
            tile.mean(&q, &mut qbar);
            tile.mean(&r, &mut rbar);
            o.fill(T::zero());
            for (j, (cj, vj)) in c.iter().zip(v).enumerate() {
                for e in 0..D {
                    let t = tile.centred(j, &q, &qbar).zip(tile.centred(j, &r, &rbar)).map(|(tq, tr)| tq + tr);
                    let terms = lanes_mut(&mut o, e, n).iter_mut().zip(t).zip(tile.w(e)).zip(tile.a(j));
                    for (((o, t), &w), &a) in terms {
                        *o += t * (w - cj[e]) + a * vj[e];
                    }
                }
            }
            visit.store(&o, at, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` values uniform in [-1, 1), from a fixed linear congruential sequence.
    fn uniform(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
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
            assert!(v == &versions[0], "{what}: version {n} differs from the baseline");
        }
    }

    fn versions_agree<const D: usize>(distance: Distance) {
        // 777 rows: full tiles, a partial one, and several folds.
        let (m, k) = (777, 5);
        let geo = Geometry { k, d: D, tau: 0.3, distance };
        let (w, g) = (uniform(m * D, 1), uniform(m * D, 2));
        let (c, v) = (uniform(k * D, 3), uniform(k * D, 4));
        let f: Vec<f32> = c.iter().zip(uniform(k * D, 5)).map(|(c, x)| c + 0.01 * x).collect();
        let (w, g, c, f, v) = (vectors::<_, D>(&w), vectors(&g), vectors(&c), vectors(&f), vectors(&v));
        let label = |pass| format!("{pass} d={D} {distance:?}");
        assert_same(&label("reduce"), every_version(&Reduce { w, count: &[], c, geo: &geo, energy: true }, m, k * (D + 1) + 1, 0.0));
        assert_same(&label("output"), every_version(&Output { w, c, geo: &geo }, m, m, [0.0; D]));
        assert_same(&label("cotangent"), every_version(&Cotangent { w, c, g, geo: &geo }, m, k * (2 * D + 1), 0.0));
        assert_same(&label("matvec"), every_version(&Matvec { w, c, f, v, geo: &geo }, m, k * D, 0.0));
        assert_same(&label("grad"), every_version(&Grad { w, c, f, g, v, geo: &geo }, m, m, [0.0; D]));
    }

    /// Every pass at ascending centroids (windowed tiles) against the same
    /// pass at the centroids in descending order (no windows), with the
    /// per-centroid results put back in ascending order. Returns the largest
    /// difference relative to the largest magnitude of each result.
    fn windowed_vs_full<T: Real>(w: &[T], g: &[T], c: &[T], geo: &Geometry) -> f64 {
        let k = geo.k;
        let rev = |x: &[T]| x.iter().rev().copied().collect::<Vec<T>>();
        let f: Vec<T> = c.iter().zip(uniform(k, 7)).map(|(&c, x)| c + T::of(1e-4 * x as f64)).collect();
        let u: Vec<f64> = uniform(k, 8).iter().map(|&x| x as f64).collect();
        let (cr, fr, ur) = (rev(c), rev(&f), u.iter().rev().copied().collect::<Vec<f64>>());
        let back = |x: Vec<f64>| x.chunks_exact(k).flat_map(|b| b.iter().rev().copied().collect::<Vec<_>>()).collect::<Vec<_>>();
        let mut worst = 0f64;
        let mut compare = |what: &str, a: &[f64], b: &[f64]| {
            assert_eq!(a.len(), b.len(), "{what}");
            let scale = b.iter().fold(0f64, |s, x| s.max(x.abs())).max(f64::MIN_POSITIVE);
            let diff = a.iter().zip(b).fold(0f64, |s, (x, y)| s.max((x - y).abs())) / scale;
            worst = worst.max(diff);
            eprintln!("{what}: {diff:e}");
        };
        let (mw, mf) = (soft_assign_reduce(w, c, geo), soft_assign_reduce(w, &cr, geo));
        compare("mass", &mw.mass, &back(mf.mass.clone()));
        compare("weighted", &mw.weighted, &back(mf.weighted.clone()));
        let inv = mw.inverse_mass();
        let inv_r: Vec<f64> = inv.iter().rev().copied().collect();
        let widen = |x: Vec<T>| x.iter().map(|v| v.wide()).collect::<Vec<f64>>();
        let (mut ow, mut of) = (vec![T::zero(); w.len()], vec![T::zero(); w.len()]);
        soft_assign_output(w, c, geo, &mut ow);
        soft_assign_output(w, &cr, geo, &mut of);
        compare("output", &widen(ow), &widen(of));
        let (hw, hf) = (centroid_cotangent(w, c, g, geo), centroid_cotangent(w, &cr, g, geo));
        compare("cotangent", &hw, &back(hf));
        let (vw, vf) = (adjoint_matvec(w, c, &f, &inv, &u, geo), adjoint_matvec(w, &cr, &fr, &inv_r, &ur, geo));
        compare("matvec", &vw, &back(vf));
        let (jw, jf) = (adjoint_matrix(w, c, &f, &inv, geo), adjoint_matrix(w, &cr, &fr, &inv_r, geo));
        let jf: Vec<f64> = jf.chunks_exact(k).rev().flat_map(|row| row.iter().rev().copied().collect::<Vec<_>>()).collect();
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
        let total: usize = visit.tiles().map(|at| visit.window(visit.rows(w, at, &mut buf)).len() * at.1).sum();
        total as f64 / w.len() as f64
    }

    /// Centroids at `k` quantiles of `w`, ascending.
    fn quantiles<T: Real>(w: &[T], k: usize) -> Vec<T> {
        let mut sorted = w.to_vec();
        sorted.sort_by(|a, b| a.wide().total_cmp(&b.wide()));
        (0..k).map(|j| sorted[(2 * j + 1) * w.len() / (2 * k)]).collect()
    }

    #[test]
    fn windowed_tiles_match_full_passes() {
        // Gaussian-like weights (sum of three uniforms), 2 chunks and a
        // partial tile; taus from local (a few centroids per tile) to global.
        let m = 3001;
        let w: Vec<f32> = (0..m).map(|i| 0.01 * (uniform(3 * m, 11)[3 * i..3 * i + 3].iter().sum::<f32>())).collect();
        let g = uniform(m, 12);
        for (k, tau, distance, local) in [
            (64, 1e-7, Distance::Squared, true),
            (256, 4e-8, Distance::Squared, true),
            (256, 1e-4, Distance::Squared, false),
            (64, 2e-5, Distance::Euclidean, true),
        ] {
            let geo = Geometry { k, d: 1, tau, distance };
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

    #[test]
    fn value_order_is_a_permutation_by_bucket() {
        let x = uniform(1000, 13);
        let order = value_order(&x, |&v| v as f64);
        let mut seen = order.clone();
        seen.sort_unstable();
        assert!(seen.iter().enumerate().all(|(i, &p)| p as usize == i));
        // Buckets of width 2 / (1000 / BUCKET_ROWS): out of order by less.
        let width = 2.0 / (1000 / BUCKET_ROWS) as f32;
        assert!(order.windows(2).all(|p| x[p[1] as usize] > x[p[0] as usize] - width));
        assert_eq!(value_order(&[3.0f32; 5], |&v| v as f64), vec![0, 1, 2, 3, 4]);
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
