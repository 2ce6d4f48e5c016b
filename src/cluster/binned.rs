// Over 800 lines with its unit tests (about 240): the binned passes share one bin layout.
//! k-means steps and the dense adjoint on scalar weights grouped into narrow
//! bins.
//!
//! With scalar weights (d = 1) and the squared distance, the attention
//! `a_j(w)` of a weight is a smooth function of its value, whose rate of
//! change is `|dz_j/dw - sum_l a_l dz_l/dw| = 2 |c_j - cbar| / tau` for the
//! logits `z`, where `cbar` is the attention's mean centroid. Both lie
//! within the weight's window (the centroids within `R = sqrt((g/2)^2 + L
//! tau)` of it, g the gap between the centroids around it and L the passes'
//! logit cutoff),
//! so `a_j` changes over a transition width of at least `tau / (4 R)`.
//! Weights that share a bin far narrower than that are represented by their
//! mean and their count: a step's sums over a bin are then exact to first
//! order in the bin's width (the mean carries the linear term), and the
//! second-order error is a fraction `(h / width)^2 / 8` of a term at most.
//! With bins an eighth of the transition width, steps on the bins move the
//! centroids as steps on the weights do to within 10^-6 of the weights'
//! spread (see the tests; the default stopping tolerance is 10^-4 of it).
//!
//! The weights' range is cut at the centroids, and each interval gets bins
//! for its own transition width (from its own gap): narrow in the sparse
//! tails, where bins mostly hold one weight (exact), wide in the dense
//! middle, where they hold many. The widths allow each centroid to move by
//! a margin before the bins must be rebuilt.
//!
//! [`fixed_point`] runs all but the last step on the bins, and the last
//! one, which gives the centroids, the reported shift and the stopping
//! test, on the weights themselves. [`adjoint_matrix`] assembles the dense
//! adjoint matrix of the implicit backward on the bins built for the fixed
//! point, each bin as two points that keep its mean and its variance
//! ([`Bins::two_point`]), in f64: closer to the matrix in exact arithmetic
//! than the pass on the f32 weights is (see the tests). The backward's
//! other passes, which weigh each weight by its own upstream gradient, run
//! on the weights.
//!
//! The CUDA path runs every pass on the weights, and so do the steps with
//! the Euclidean distance, whose logits have a kink at every centroid, where
//! a bin's mean does not carry the linear term.

use super::config::Distance;
use super::newton::{Evaluation, KmeansMap};
use super::streaming::{self as pass, counted_reduce, Geometry, Real};
use crate::error::Result;

/// The weights of one slot while bins are built (the count as a float:
/// one 24-byte record a slot, updated in one place).
#[derive(Clone, Copy, Default)]
struct Tally {
    count: f64,
    sum: f64,
    squares: f64,
}

/// Cells of the slot lookup's grid per interval between centroids: fine
/// enough that a cell rarely holds the start of an interval (where the
/// lookup scans on).
const CELLS_PER_INTERVAL: usize = 64;

/// Bins per transition width (see the module docs).
const BIN_SPLIT: f64 = 8.0;

/// How far each centroid may move before the bins are rebuilt: this
/// fraction of its half-gaps, or [`MOVE_REACH`] of the window reach
/// `sqrt(L tau)`, whichever is larger. The bin widths allow for it.
const MOVE_MARGIN: f64 = 0.25;

/// The move allowed beyond [`MOVE_MARGIN`], as a fraction of the window
/// reach `sqrt(L tau)`. The attended centroids' spread is bounded by
/// `2 sqrt(D^2 + L tau)` for a weight at distance D from its nearest
/// centroid, so allowing moves of half the reach widens that bound by at
/// most `sqrt(1.25)` where the gaps are small (about 12% more bins), while
/// centroids that creep by a fraction of their gap each step (as at 8 bits)
/// no longer force a rebuild every few steps.
const MOVE_REACH: f64 = 0.5;

/// Fewest weights per bin slot (empty or not) at which bins are built,
/// unless they take at most [`FEW_SLOTS`]: the slots' tallies (24 bytes
/// each, while the bins are built) then take at most 3 bytes a weight, or
/// 6 MiB, on each of the threads that tally (see [`TALLY_SPLIT_WEIGHTS`]).
const MIN_WEIGHTS_PER_SLOT: usize = 8;

/// Fewest weights at which [`Slots::tally`] tallies the two halves of
/// the weights on two threads, each into its own slots (twice the tallies'
/// memory, at most 6 bytes a weight, while the bins are built). The
/// tally's reads and writes land at random slots, so it is bound by the
/// memory's latency. Student-t weights, 4 bits, their temperature, on 2
/// cores: 2.4 million weights took 27 ms in one tally and 21 ms in two
/// halves; 2^18 weights 3.0-4.7 ms and 2.8-3.1 ms, where the second
/// half's slots (allocated, zeroed, added) eat most of the gain.
const TALLY_SPLIT_WEIGHTS: usize = 1 << 18;

/// Slots that are always allowed (see [`MIN_WEIGHTS_PER_SLOT`]): the sparse
/// tails of a layer of a few hundred thousand weights take many slots, but
/// few bins.
const FEW_SLOTS: usize = 1 << 18;

/// Fewest weights per (non-empty) bin at which k-means steps run on the
/// bins: a step on them then costs at most half one on the weights, which
/// pays for building them (about two thirds of a step on the weights)
/// within the first steps.
const STEP_WEIGHTS_PER_BIN: usize = 2;

/// Fewest weights per (non-empty) bin at which the dense adjoint is
/// assembled on the bins. Its pass costs several steps, so fewer would
/// pay, but its bins (three f64 a bin) and their two points (four f64)
/// then hold at most 7 bytes a weight.
const ADJOINT_WEIGHTS_PER_BIN: usize = 8;

/// Scalar weights grouped into narrow bins: the mean, the count and the
/// standard deviation of each non-empty bin, in ascending order, and how
/// far the centroids they were built for may move before they must be
/// rebuilt.
#[derive(Clone, Debug, PartialEq)]
pub struct Bins<T> {
    /// Mean of the weights in each bin.
    pub mean: Vec<T>,
    /// Number of weights in each bin.
    pub count: Vec<T>,
    /// Standard deviation of the weights in each bin.
    pub deviation: Vec<T>,
    /// The centroids the widths were set for (ascending).
    built_for: Vec<f64>,
    /// How far each of them may move (see [`MOVE_MARGIN`]).
    allowed_move: Vec<f64>,
}

/// The slots of [`Bins::new`]: the weights' range cut at the centroids
/// into k + 1 intervals, each split into slots of one width.
struct Slots {
    /// Start of each interval: the lowest weight, then the centroids.
    start: Vec<f64>,
    /// First slot of each interval, and the total number of slots.
    offset: Vec<usize>,
    /// Slots per unit length in each interval.
    density: Vec<f64>,
    /// Lowest weight and grid cells per unit length, for the lookup.
    lo: f64,
    scale: f64,
    /// The interval that contains the start of each grid cell.
    cell_interval: Vec<u32>,
}

impl Slots {
    /// The slots for the weights `lo..=hi`, the ascending centroids `c`
    /// and the moves `allowed` of each (see [`allowed_moves`]), or `None`
    /// beyond `max_slots`. The intervals start at the centroids clamped
    /// into the range; their widths come from the centroids' gaps.
    ///
    /// A weight at distance D from its nearest centroid attends only to
    /// centroids within `sqrt(D^2 + L tau)` of it, so to a spread of
    /// `2 sqrt(D^2 + L tau)` at most. Between two centroids a half-gap `h`
    /// apart, D is at most h, and at most `h + a` once the centroids have
    /// moved by up to a (the larger of their allowed moves). Beyond the
    /// outermost centroid the attended centroids lie within
    /// `sqrt(D^2 + L tau) - D <= sqrt(L tau)` of it, or, once it has moved
    /// outwards by up to a, the weight is within a of it. A bin of width
    /// `w` then holds weights whose attention changes at a rate of
    /// `2 spread / tau` at most.
    fn new(
        lo: f64,
        hi: f64,
        c: &[f64],
        allowed: &[f64],
        geo: &Geometry,
        cutoff: f64,
        max_slots: usize,
    ) -> Option<Self> {
        let k = c.len();
        let start: Vec<f64> = std::iter::once(lo)
            .chain(c.iter().map(|x| x.clamp(lo, hi)))
            .collect();
        let end = |j: usize| start.get(j + 1).copied().unwrap_or(hi);
        let spread = |distance: f64| 2.0 * (distance.powi(2) + cutoff * geo.tau).sqrt();
        let (mut offset, mut density) = (vec![0usize; k + 2], vec![0f64; k + 1]);
        for j in 0..=k {
            let spread = match j {
                0 => spread(allowed[0]),
                j if j == k => spread(allowed[k - 1]),
                j => spread(half_gap(c, j) + allowed[j - 1].max(allowed[j])),
            };
            density[j] = 2.0 * spread * BIN_SPLIT / geo.tau;
            let slots = ((end(j) - start[j]) * density[j]).ceil().max(1.0);
            if slots.is_nan() || offset[j] as f64 + slots > max_slots as f64 {
                return None;
            }
            offset[j + 1] = offset[j] + slots as usize;
        }
        let cells = CELLS_PER_INTERVAL * (k + 1);
        let scale = if hi > lo {
            cells as f64 / (hi - lo)
        } else {
            0.0
        };
        let cell_interval = (0..cells)
            .map(|cell| {
                let at = lo + cell as f64 / scale.max(f64::MIN_POSITIVE);
                (start.partition_point(|&s| s <= at).max(1) - 1) as u32
            })
            .collect();
        Some(Self {
            start,
            offset,
            density,
            lo,
            scale,
            cell_interval,
        })
    }

    /// The count, sum and sum of squares of the weights `w` in each of the
    /// `total` slots: from [`TALLY_SPLIT_WEIGHTS`] weights on, each half of
    /// `w` on its own thread, then the halves' sums added (the same result
    /// on any number of threads); below, in the order of `w`.
    fn tally<W: Real>(&self, w: &[W], total: usize) -> Vec<Tally> {
        if w.len() < TALLY_SPLIT_WEIGHTS {
            return self.tally_in_order(w, total);
        }
        let (first, second) = w.split_at(w.len() / 2);
        let (mut tally, other) = rayon::join(
            || self.tally_in_order(first, total),
            || self.tally_in_order(second, total),
        );
        for (t, o) in tally.iter_mut().zip(&other) {
            t.count += o.count;
            t.sum += o.sum;
            t.squares += o.squares;
        }
        tally
    }

    /// [`Self::tally`] on one thread, summed in the order of `w`.
    fn tally_in_order<W: Real>(&self, w: &[W], total: usize) -> Vec<Tally> {
        let mut tally = vec![Tally::default(); total];
        for x in w {
            let x = x.wide();
            let t = &mut tally[self.slot(x)];
            t.count += 1.0;
            t.sum += x;
            t.squares += x * x;
        }
        tally
    }

    /// The slot of the weight `x` (within the range).
    #[inline(always)]
    fn slot(&self, x: f64) -> usize {
        let cells = self.cell_interval.len();
        let cell = (((x - self.lo) * self.scale) as usize).min(cells - 1);
        let mut j = self.cell_interval[cell] as usize;
        while j + 1 < self.start.len() && x >= self.start[j + 1] {
            j += 1;
        }
        let within = ((x - self.start[j]) * self.density[j]) as usize;
        self.offset[j] + within.min(self.offset[j + 1] - self.offset[j] - 1)
    }
}

impl<T: Real> Bins<T> {
    /// `w` (finite) grouped into bins for the scalar centroids `c`: between
    /// two centroids, or beyond the outermost, bins an eighth of the
    /// attention's transition width there (see the module docs), or `None`
    /// when that takes more than `max_slots` slots. The bins' means and
    /// counts are rounded to `T`, which may be wider than the weights'
    /// type `W`; the widths are those of the passes in `W`.
    pub fn new<W: Real>(w: &[W], c: &[W], geo: &Geometry, max_slots: usize) -> Option<Self> {
        if w.is_empty() {
            return None;
        }
        let (lo, hi) = range(w);
        let mut sorted: Vec<f64> = c.iter().map(|x| x.wide()).collect();
        sorted.sort_by(f64::total_cmp);
        let cutoff = pass::cutoff::<W>(geo.k);
        let allowed_move = allowed_moves(&sorted, (cutoff * geo.tau).sqrt());
        let slots = Slots::new(lo, hi, &sorted, &allowed_move, geo, cutoff, max_slots)?;
        let total = slots.offset[slots.offset.len() - 1];
        let tally = slots.tally(w, total);
        // Sized exactly: with many slots, growth by doubling would hold up
        // to twice the bins' memory.
        let filled = tally.iter().filter(|t| t.count > 0.0).count();
        let (mut mean, mut deviation, mut count) = (
            Vec::with_capacity(filled),
            Vec::with_capacity(filled),
            Vec::with_capacity(filled),
        );
        for t in tally.iter().filter(|t| t.count > 0.0) {
            let m = t.sum / t.count;
            mean.push(T::of(m));
            deviation.push(T::of((t.squares / t.count - m * m).max(0.0).sqrt()));
            count.push(T::of(t.count));
        }
        Some(Self {
            mean,
            count,
            deviation,
            built_for: sorted,
            allowed_move,
        })
    }

    /// Each bin as two points, its mean less and plus its deviation, that
    /// stand for half its weights each (or as its mean alone, where the
    /// deviation is 0): the points and their counts. They keep each bin's
    /// count, sum and sum of squares, so that a sum of a smooth function of
    /// the weights over them is exact to second order in the bins' widths,
    /// where one point a bin is exact to first order.
    pub fn two_point(&self) -> (Vec<T>, Vec<T>) {
        let half = T::of(0.5);
        let mut points = (
            Vec::with_capacity(2 * self.len()),
            Vec::with_capacity(2 * self.len()),
        );
        for ((&m, &n), &s) in self.mean.iter().zip(&self.count).zip(&self.deviation) {
            if s > T::zero() {
                points.0.extend([m - s, m + s]);
                points.1.extend([n * half, n * half]);
            } else {
                points.0.push(m);
                points.1.push(n);
            }
        }
        points
    }

    /// Number of non-empty bins.
    pub fn len(&self) -> usize {
        self.mean.len()
    }

    /// Whether there are no bins.
    pub fn is_empty(&self) -> bool {
        self.mean.is_empty()
    }

    /// Whether the bins still serve the centroids `c`: none has moved
    /// further from those they were built for than its margin allows.
    pub fn serve<W: Real>(&self, c: &[W]) -> bool {
        let mut sorted: Vec<f64> = c.iter().map(|x| x.wide()).collect();
        sorted.sort_by(f64::total_cmp);
        sorted
            .iter()
            .zip(&self.built_for)
            .zip(&self.allowed_move)
            .all(|((x, b), m)| (x - b).abs() <= *m)
    }
}

impl Bins<f64> {
    /// The same bins in `T`: each mean, count and deviation rounded from
    /// the f64 tallies as [`Bins::new`] rounds them into `T`, so the result
    /// is the bins `Bins::<T>::new` builds, without a second tally.
    pub fn narrow<T: Real>(self) -> Bins<T> {
        let narrow = |x: Vec<f64>| x.into_iter().map(T::of).collect();
        Bins {
            mean: narrow(self.mean),
            count: narrow(self.count),
            deviation: narrow(self.deviation),
            built_for: self.built_for,
            allowed_move: self.allowed_move,
        }
    }
}

/// The smallest and the largest of the (finite) values `x`, not empty.
fn range<W: Real>(x: &[W]) -> (f64, f64) {
    // Eight running extremes, which the compiler keeps in vector registers.
    let (mut lo, mut hi) = ([x[0]; 8], [x[0]; 8]);
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for ((l, h), &v) in lo.iter_mut().zip(&mut hi).zip(chunk) {
            *l = if v < *l { v } else { *l };
            *h = if v > *h { v } else { *h };
        }
    }
    let lo = lo
        .iter()
        .chain(rest)
        .map(|v| v.wide())
        .fold(f64::INFINITY, f64::min);
    let hi = hi
        .iter()
        .chain(rest)
        .map(|v| v.wide())
        .fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

/// How far each of the ascending centroids `c` may move before bins built
/// for them are rebuilt: [`MOVE_MARGIN`] of the smaller of its half-gaps,
/// or [`MOVE_REACH`] of the window reach `reach = sqrt(L tau)`, whichever
/// is larger.
fn allowed_moves(c: &[f64], reach: f64) -> Vec<f64> {
    let k = c.len();
    (0..k)
        .map(|j| {
            let gaps = (j.max(1)..=(j + 1).min(k - 1)).map(|i| half_gap(c, i));
            let margin = gaps.reduce(f64::min).map_or(0.0, |h| MOVE_MARGIN * h);
            margin.max(MOVE_REACH * reach)
        })
        .collect()
}

/// Half the gap between the ascending centroids `c[j - 1]` and `c[j]`.
fn half_gap(c: &[f64], j: usize) -> f64 {
    (c[j] - c[j - 1]) / 2.0
}

/// Whether the weights may be binned at all: scalar weights and the
/// squared distance.
fn binnable(geo: &Geometry) -> bool {
    geo.d == 1 && geo.distance == Distance::Squared
}

/// The bins for the centroids `c`, when they pay (see [`binnable`]): at
/// most [`FEW_SLOTS`] slots or [`MIN_WEIGHTS_PER_SLOT`] weights a slot,
/// and at least `weights_per_bin` weights a bin.
pub fn bins_for<W: Real, T: Real>(
    w: &[W],
    c: &[W],
    geo: &Geometry,
    weights_per_bin: usize,
) -> Option<Bins<T>> {
    if !binnable(geo) {
        return None;
    }
    let bins = Bins::new(w, c, geo, FEW_SLOTS.max(w.len() / MIN_WEIGHTS_PER_SLOT))?;
    (bins.len() * weights_per_bin <= w.len()).then_some(bins)
}

/// What [`fixed_point`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct PlainRun<T> {
    /// The centroids.
    pub c: Vec<T>,
    /// Steps on bins.
    pub bin_steps: usize,
    /// Steps on the weights (the last one always is).
    pub weight_steps: usize,
    /// The largest centroid move of the last step.
    pub shift: f64,
}

impl<T> PlainRun<T> {
    /// All steps.
    pub fn steps(&self) -> usize {
        self.bin_steps + self.weight_steps
    }
}

/// [`streaming::fixed_point`](pass::fixed_point) with all but the last step
/// on bins of the weights where that pays (see [`bins_for`]; they are
/// rebuilt when the centroids move beyond their margins): steps run on the
/// bins until one moves no centroid more than `tol` or one step is left,
/// then on the weights until the same test or `max_iter` steps in all.
/// The shift is the last step's, always one on the weights.
pub fn fixed_point<T: Real>(
    w: &[T],
    c0: &[T],
    geo: &Geometry,
    max_iter: usize,
    tol: f64,
) -> PlainRun<T> {
    let on_weights = |c: &[T], max_iter: usize, bin_steps: usize| {
        let (c, weight_steps, shift) = pass::fixed_point(w, c, geo, max_iter, tol);
        PlainRun {
            c,
            bin_steps,
            weight_steps,
            shift,
        }
    };
    let Some(mut bins) = (max_iter >= 2)
        .then(|| bins_for(w, c0, geo, STEP_WEIGHTS_PER_BIN))
        .flatten()
    else {
        return on_weights(c0, max_iter, 0);
    };
    let (mut c, mut next) = (c0.to_vec(), c0.to_vec());
    let (mut steps, mut builds) = (0, 1);
    while steps + 1 < max_iter {
        if !bins.serve(&c) {
            match bins_for(w, &c, geo, STEP_WEIGHTS_PER_BIN) {
                Some(rebuilt) => (bins, builds) = (rebuilt, builds + 1),
                None => break,
            }
        }
        let shift = counted_reduce(&bins.mean, &bins.count, &c, geo).update(&c, &mut next, 1);
        std::mem::swap(&mut c, &mut next);
        steps += 1;
        if shift <= tol {
            break;
        }
    }
    let run = on_weights(&c, max_iter - steps, steps);
    tracing::trace!(
        bins = bins.len(),
        builds,
        binned = steps,
        full = run.weight_steps,
        "k-means steps"
    );
    run
}

/// [`streaming::adjoint_matrix`](pass::adjoint_matrix) at the centroids `c`
/// (with `f = F(C)` and `inv_mass` as there), assembled on bins of the
/// weights built for `c` where that pays (see [`bins_for`]), in f64. Its
/// terms are smooth functions of a weight that change over the attention's
/// transitions, as a step's are, so the bins give the matrix as accurately
/// as the pass on the weights does (see the tests). The pass runs in f64:
/// in f32 the bins' fewer, heavier terms round further from the exact
/// matrix than the weights' do (3e-7 of its norm against 2e-7 at 8 bits,
/// 800 000 weights), in f64 they are within 1e-9 of it.
pub fn adjoint_matrix<T: Real>(
    w: &[T],
    c: &[T],
    f: &[T],
    inv_mass: &[f64],
    geo: &Geometry,
) -> Vec<f64> {
    let wide = |x: &[T]| x.iter().map(|v| v.wide()).collect::<Vec<f64>>();
    match bins_for::<T, f64>(w, c, geo, ADJOINT_WEIGHTS_PER_BIN) {
        Some(bins) => {
            let (points, count) = bins.two_point();
            pass::counted_adjoint_matrix(&points, &count, &wide(c), &wide(f), inv_mass, geo)
        }
        None => pass::adjoint_matrix(w, c, f, inv_mass, geo),
    }
}

/// The bins a [`BinnedMap`] runs on.
enum Binning<T> {
    /// Bins of at least [`ADJOINT_WEIGHTS_PER_BIN`] weights, in f64: the
    /// k-means passes and the matrix assembly both run on them.
    Fine(Bins<f64>),
    /// Bins of at least [`STEP_WEIGHTS_PER_BIN`] weights: the k-means
    /// passes run on them, the matrix on the weights.
    Steps(Bins<T>),
}

impl<T: Real> Binning<T> {
    /// The bins for `c` (in the weights' type), finest first, if any pay:
    /// one tally of the weights decides both.
    fn new(w: &[T], c: &[T], geo: &Geometry) -> Option<Self> {
        let bins = bins_for::<T, f64>(w, c, geo, STEP_WEIGHTS_PER_BIN)?;
        Some(if bins.len() * ADJOINT_WEIGHTS_PER_BIN <= w.len() {
            Binning::Fine(bins)
        } else {
            Binning::Steps(bins.narrow())
        })
    }

    fn serve(&self, c: &[T]) -> bool {
        match self {
            Binning::Fine(b) => b.serve(c),
            Binning::Steps(b) => b.serve(c),
        }
    }
}

/// The k-means map of scalar weights evaluated on bins of them (see the
/// module docs), for the forward Newton solve: its k-means passes (with
/// the free energy) run on the bins, its matrix on their two points where
/// the bins hold at least [`ADJOINT_WEIGHTS_PER_BIN`] weights each (else on
/// the weights). The bins are rebuilt when the centroids leave their
/// margins; where no bins pay any more, the passes run on the weights.
/// Its fixed point is within the bins' error of the weights'; the solve
/// corrects it on the weights ([`super::newton::refine`]).
pub struct BinnedMap<'a, T: Real> {
    w: &'a [T],
    geo: Geometry,
    bins: Option<Binning<T>>,
    /// Passes over the weights and over the bins.
    passes: (usize, usize),
    /// Times the bins were built.
    builds: usize,
}

impl<'a, T: Real> BinnedMap<'a, T> {
    /// The map for the weights `w` binned for the centroids `c`, or `None`
    /// when bins do not pay (see [`bins_for`]).
    pub fn new(w: &'a [T], c: &[T], geo: Geometry) -> Option<Self> {
        let bins = Binning::new(w, c, &geo)?;
        Some(Self {
            w,
            geo,
            bins: Some(bins),
            passes: (0, 0),
            builds: 1,
        })
    }

    /// Times the bins were built.
    pub fn builds(&self) -> usize {
        self.builds
    }

    /// Bins that serve `c`, rebuilt if need be; `None` where none pay.
    fn bins_at(&mut self, c: &[T]) -> Option<&Binning<T>> {
        if !self.bins.as_ref().is_some_and(|b| b.serve(c)) {
            self.bins = Binning::new(self.w, c, &self.geo);
            self.builds += usize::from(self.bins.is_some());
        }
        self.bins.as_ref()
    }
}

fn narrow<T: Real>(c: &[f64]) -> Vec<T> {
    c.iter().map(|&x| T::of(x)).collect()
}

impl<T: Real> KmeansMap for BinnedMap<'_, T> {
    fn round(&self, c: &mut [f64]) {
        c.iter_mut().for_each(|x| *x = T::of(*x).wide());
    }

    fn evaluate(&mut self, c: &[f64]) -> Result<Evaluation> {
        let narrow = narrow::<T>(c);
        let geo = self.geo;
        let (moments, energy) = match self.bins_at(&narrow) {
            Some(Binning::Fine(b)) => pass::counted_reduce_energy(&b.mean, &b.count, c, &geo),
            Some(Binning::Steps(b)) => {
                pass::counted_reduce_energy(&b.mean, &b.count, &narrow, &geo)
            }
            None => {
                self.passes.0 += 1;
                let (moments, energy) = pass::counted_reduce_energy(self.w, &[], &narrow, &geo);
                return Ok(Evaluation {
                    moments,
                    energy: Some(energy),
                });
            }
        };
        self.passes.1 += 1;
        Ok(Evaluation {
            moments,
            energy: Some(energy),
        })
    }

    fn matrix(&mut self, c: &[f64], f: &[f64], inv_mass: &[f64]) -> Result<Vec<f64>> {
        let narrow_c = narrow::<T>(c);
        let geo = self.geo;
        if let Some(Binning::Fine(b)) = self.bins_at(&narrow_c) {
            let (points, count) = b.two_point();
            self.passes.1 += 1;
            return Ok(pass::counted_adjoint_matrix(
                &points, &count, c, f, inv_mass, &geo,
            ));
        }
        self.passes.0 += 1;
        Ok(pass::adjoint_matrix(
            self.w,
            &narrow_c,
            &narrow::<T>(f),
            inv_mass,
            &geo,
        ))
    }

    fn matvec(&mut self, c: &[f64], f: &[f64], inv_mass: &[f64], u: &[f64]) -> Result<Vec<f64>> {
        self.passes.0 += 1;
        Ok(pass::adjoint_matvec(
            self.w,
            &narrow::<T>(c),
            &narrow::<T>(f),
            inv_mass,
            u,
            &self.geo,
        ))
    }

    fn passes(&self) -> (usize, usize) {
        self.passes
    }

    fn epsilon(&self) -> f64 {
        T::epsilon().wide()
    }
}

#[cfg(test)]
mod tests {
    use super::super::sample::normal;
    use super::super::solve;
    use super::*;

    fn geometry(k: usize, tau: f64, distance: Distance) -> Geometry {
        Geometry {
            k,
            d: 1,
            tau,
            distance,
        }
    }

    /// `k` centroids at the quantiles of `w`, ascending.
    fn quantiles<T: Real>(w: &[T], k: usize) -> Vec<T> {
        let mut sorted = w.to_vec();
        sorted.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
        (0..k)
            .map(|j| sorted[(2 * j + 1) * w.len() / (2 * k)])
            .collect()
    }

    #[test]
    fn counted_rows_sum_as_repeated_rows() {
        let geo = geometry(64, 1e-3, Distance::Squared);
        let x = normal(500, 0.05, 1);
        let count: Vec<f64> = (0..x.len()).map(|i| (1 + i % 7) as f64).collect();
        let repeated: Vec<f64> = x
            .iter()
            .zip(&count)
            .flat_map(|(&x, &n)| std::iter::repeat_n(x, n as usize))
            .collect();
        let c = quantiles(&x, geo.k);
        let counted = counted_reduce(&x, &count, &c, &geo);
        let full = pass::soft_assign_reduce(&repeated, &c, &geo);
        for (a, b) in counted
            .mass
            .iter()
            .chain(&counted.weighted)
            .zip(full.mass.iter().chain(&full.weighted))
        {
            assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{a} vs {b}");
        }
    }

    #[test]
    fn bins_keep_count_and_sum() {
        let w: Vec<f32> = normal(10_000, 0.02, 2).iter().map(|&x| x as f32).collect();
        let geo = geometry(16, 1e-4, Distance::Squared);
        let c = quantiles(&w, geo.k);
        let bins = Bins::new(&w, &c, &geo, 5000).expect("fits");
        assert!(bins.mean.windows(2).all(|p| p[0] < p[1]));
        assert_eq!(bins.count.iter().sum::<f32>(), 10_000.0);
        let sum: f64 = bins
            .mean
            .iter()
            .zip(&bins.count)
            .map(|(&m, &n)| f64::from(m) * f64::from(n))
            .sum();
        let want: f64 = w.iter().map(|&x| f64::from(x)).sum();
        assert!((sum - want).abs() < 1e-6, "{sum} vs {want}");
        let squares: f64 = (0..bins.len())
            .map(|b| {
                f64::from(bins.count[b])
                    * (f64::from(bins.mean[b]).powi(2) + f64::from(bins.deviation[b]).powi(2))
            })
            .sum();
        let want: f64 = w.iter().map(|&x| f64::from(x).powi(2)).sum();
        assert!((squares - want).abs() < 1e-6 * want, "{squares} vs {want}");
        let moments = |x: &[f32], n: &[f32]| {
            x.iter().zip(n).fold([0f64; 3], |[a, b, c], (&x, &n)| {
                let (x, n) = (f64::from(x), f64::from(n));
                [a + n, b + n * x, c + n * x * x]
            })
        };
        let (points, counts) = bins.two_point();
        let [n, sum, sq] = moments(&points, &counts);
        assert_eq!(n, 10_000.0);
        assert!(
            (sum - moments(&bins.mean, &bins.count)[1]).abs() < 1e-6,
            "two points: sum {sum}"
        );
        assert!(
            (sq - squares).abs() < 1e-6 * squares,
            "two points: squares {sq} vs {squares}"
        );
        assert!(bins.serve(&c));
        let moved: Vec<f32> = c.iter().map(|x| x + 0.05).collect();
        assert!(!bins.serve(&moved));
        assert!(Bins::<f32>::new(&w, &c, &geo, 100).is_none());
    }

    #[test]
    fn tally_in_halves_sums_as_the_tally_in_order() {
        let w: Vec<f32> = normal(TALLY_SPLIT_WEIGHTS + 1001, 0.02, 6)
            .iter()
            .map(|&x| x as f32)
            .collect();
        let geo = geometry(16, 1e-5, Distance::Squared);
        let c: Vec<f64> = quantiles(&w, geo.k).iter().map(|&x| f64::from(x)).collect();
        let (lo, hi) = range(&w);
        let cutoff = pass::cutoff::<f32>(geo.k);
        let allowed = allowed_moves(&c, (cutoff * geo.tau).sqrt());
        let slots = Slots::new(lo, hi, &c, &allowed, &geo, cutoff, 1 << 20).expect("fits");
        let total = slots.offset[slots.offset.len() - 1];
        let (halves, in_order) = (slots.tally(&w, total), slots.tally_in_order(&w, total));
        assert!(halves.iter().filter(|t| t.count > 1.0).count() > 1000);
        for (a, b) in halves.iter().zip(&in_order) {
            assert_eq!(a.count, b.count);
            assert!(
                (a.sum - b.sum).abs() <= 1e-12 * b.count * 0.5,
                "{} vs {}",
                a.sum,
                b.sum
            );
            assert!((a.squares - b.squares).abs() <= 1e-12 * b.squares.max(1e-300));
        }
    }

    #[test]
    fn narrowed_bins_are_the_bins_built_narrow() {
        let w: Vec<f32> = normal(20_000, 0.03, 5).iter().map(|&x| x as f32).collect();
        let geo = geometry(16, 2e-5, Distance::Squared);
        let c = quantiles(&w, geo.k);
        let wide = Bins::<f64>::new(&w, &c, &geo, 50_000).expect("fits");
        let narrow = Bins::<f32>::new(&w, &c, &geo, 50_000).expect("fits");
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let narrowed = wide.narrow::<f32>();
        assert!(narrowed.len() > 1000, "{} bins", narrowed.len());
        assert_eq!(bits(&narrowed.mean), bits(&narrow.mean));
        assert_eq!(bits(&narrowed.count), bits(&narrow.count));
        assert_eq!(bits(&narrowed.deviation), bits(&narrow.deviation));
        assert_eq!(narrowed, narrow);
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
            let bins = bins_for::<_, f32>(&w, &c0, &geo, STEP_WEIGHTS_PER_BIN)
                .expect("the steps run on bins");
            let run = fixed_point(&w, &c0, &geo, 10, 0.0);
            let (c, steps, shift) = (run.c.clone(), run.steps(), run.shift);
            let (want, want_steps, want_shift) = pass::fixed_point(&w, &c0, &geo, 10, 0.0);
            let err = c
                .iter()
                .zip(&want)
                .map(|(a, b)| f64::from((a - b).abs()))
                .fold(0.0, f64::max);
            eprintln!("{geo:?}: {} bins, max |c - c_full| = {err:.2e}, shift {shift:.3e} vs {want_shift:.3e}", bins.len());
            assert_eq!((steps, want_steps), (10, 10));
            assert!(err <= 1e-6 * std, "{geo:?}: centroids differ by {err:e}");
            assert!(
                (shift - want_shift).abs() <= 1e-6 * std,
                "{geo:?}: shift {shift:e} vs {want_shift:e}"
            );
        }
    }

    /// The adjoint matrix on bins of f32 weights, the adjoint solved with
    /// it and the weight gradient with that adjoint, against those on the
    /// weights in f64, for 800 000 Gaussian weights at centroids five steps
    /// from the quantiles: all closer than the same on the f32 weights
    /// themselves. (At 8 bits the adjoint system is ill-conditioned: the
    /// pass on the f32 weights gets the adjoint to 2e-4 only.)
    #[test]
    fn binned_adjoint_matrix_matches_full_matrix() {
        let norm = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
        let rel = |x: &[f64], y: &[f64]| {
            norm(&x.iter().zip(y).map(|(a, b)| a - b).collect::<Vec<_>>()) / norm(y)
        };
        let wide = |x: &[f32]| x.iter().map(|&v| f64::from(v)).collect::<Vec<f64>>();
        let w: Vec<f32> = normal(800_000, 0.02, 5).iter().map(|&x| x as f32).collect();
        let g: Vec<f32> = normal(800_000, 1.0, 6).iter().map(|&x| x as f32).collect();
        let (w64, g64) = (wide(&w), wide(&g));
        for geo in [
            geometry(256, 3.9e-7, Distance::Squared),
            geometry(16, 1e-4, Distance::Squared),
        ] {
            let (c, _, _) = pass::fixed_point(&w, &quantiles(&w, geo.k), &geo, 5, 0.0);
            let moments = pass::soft_assign_reduce(&w, &c, &geo);
            let inv_mass = moments.inverse_mass();
            let mut f = c.clone();
            moments.update(&c, &mut f, 1);
            let (c64, f64_) = (wide(&c), wide(&f));
            assert!(
                bins_for::<_, f64>(&w, &c, &geo, ADJOINT_WEIGHTS_PER_BIN).is_some(),
                "{geo:?}: not binned"
            );
            let (_, h) = pass::cotangent_reduce(&w, &c, &g, &geo);
            let (_, h64) = pass::cotangent_reduce(&w64, &c64, &g64, &geo);
            let exact = pass::adjoint_matrix(&w64, &c64, &f64_, &inv_mass, &geo);
            let u_exact = solve::dense(&exact, &h64, 1e-12, 1).0;
            let mut grad_exact = vec![0f64; w.len()];
            pass::weight_grad(
                &w64,
                &c64,
                &f64_,
                &g64,
                &inv_mass,
                &u_exact,
                &geo,
                &mut grad_exact,
            );
            // Matrix, adjoint and gradient errors of a matrix on f32 weights.
            let errors = |jt: &[f64]| {
                let u = solve::dense(jt, &h, 1e-12, 1).0;
                let mut grad = vec![0f32; w.len()];
                pass::weight_grad(&w, &c, &f, &g, &inv_mass, &u, &geo, &mut grad);
                [
                    rel(jt, &exact),
                    rel(&u, &u_exact),
                    rel(&wide(&grad), &grad_exact),
                ]
            };
            let binned = errors(&adjoint_matrix(&w, &c, &f, &inv_mass, &geo));
            let full = errors(&pass::adjoint_matrix(&w, &c, &f, &inv_mass, &geo));
            let show = |e: [f64; 3]| e.map(|x| format!("{x:.2e}")).join(", ");
            eprintln!(
                "{geo:?}: errors of J, u, dL/dW: on bins {}; on the weights {}",
                show(binned),
                show(full)
            );
            for (what, (b, f)) in ["matrix", "adjoint", "gradient"]
                .iter()
                .zip(binned.iter().zip(&full))
            {
                assert!(
                    b <= f,
                    "{geo:?}: {what} on bins off by {b:e}, on the weights by {f:e}"
                );
            }
        }
    }

    #[test]
    fn few_weights_one_step_or_euclidean_run_on_the_weights() {
        let geo = geometry(256, 3.9e-7, Distance::Squared);
        let w: Vec<f32> = normal(600_000, 0.02, 4).iter().map(|&x| x as f32).collect();
        let c0 = quantiles(&w, geo.k);
        assert!(bins_for::<_, f32>(&w[..20_000], &c0, &geo, STEP_WEIGHTS_PER_BIN).is_none());
        let plain = |run: PlainRun<f32>| (run.c.clone(), run.steps(), run.shift);
        assert_eq!(
            plain(fixed_point(&w[..20_000], &c0, &geo, 10, 0.0)),
            pass::fixed_point(&w[..20_000], &c0, &geo, 10, 0.0)
        );
        assert_eq!(
            plain(fixed_point(&w, &c0, &geo, 1, 0.0)),
            pass::fixed_point(&w, &c0, &geo, 1, 0.0)
        );
        let euclidean = Geometry {
            distance: Distance::Euclidean,
            tau: 1e-3,
            ..geo
        };
        assert!(bins_for::<_, f32>(&w, &c0, &euclidean, STEP_WEIGHTS_PER_BIN).is_none());
    }
}
