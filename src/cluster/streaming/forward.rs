//! Forward passes: a k-means step's sums, the fixed point, the soft and
//! hard assignments.

use super::*;
use std::cmp::Ordering;

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
pub fn counted_reduce_energy<T: Real>(
    w: &[T],
    count: &[T],
    c: &[T],
    geo: &Geometry,
) -> (Moments, f64) {
    let (moments, energy) = reduce(w, count, c, geo, true);
    (moments, energy.unwrap_or(f64::NAN))
}

pub(super) fn reduce<T: Real>(
    w: &[T],
    count: &[T],
    c: &[T],
    geo: &Geometry,
    energy: bool,
) -> (Moments, Option<f64>) {
    let k = geo.k;
    let sums = with_dim!(geo.d, D => {
        let pass = Reduce::<T, D> { w: vectors(w), count: vectors(count), c: vectors(c), geo, energy };
        sum_rows(pass.w.len(), k * (D + 1) + usize::from(energy), &pass)
    });
    let (mass, rest) = sums.split_at(k);
    let (weighted, energy) = rest.split_at(k * geo.d);
    (
        Moments {
            mass: mass.to_vec(),
            weighted: weighted.to_vec(),
        },
        energy.first().copied(),
    )
}

/// [`counted_reduce`] on one chunk: partial sums `[S (k), sum a w (k x d)]`,
/// then the energy when asked for.
pub(super) struct Reduce<'a, T, const D: usize> {
    pub(super) w: &'a [[T; D]],
    /// Rows each row stands for; empty: one each.
    pub(super) count: &'a [[T; 1]],
    pub(super) c: &'a [[T; D]],
    pub(super) geo: &'a Geometry,
    /// Whether to sum the free energy too.
    pub(super) energy: bool,
}

impl<T: Real, const D: usize> Pass for Reduce<'_, T, D> {
    fn min_chunk_rows(&self) -> usize {
        min_chunk_rows(self.geo)
    }

    type Out = f64;

    #[inline(always)]
    fn chunk(&self, rows: Range<usize>, out: &mut [f64]) {
        let mut tile = Tile::<T, D>::new(self.geo);
        let mut sums = LaneSums::<T>::new(out.len());
        let visit = Visit::new(self.w, rows.clone(), self.c, self.geo);
        let count = if self.count.is_empty() {
            &[][..]
        } else {
            &self.count[rows.clone()]
        };
        let (w, mut wbuf, mut nbuf) = (
            &self.w[rows],
            [[T::zero(); D]; TILE],
            [[T::zero(); 1]; TILE],
        );
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
pub(super) struct Output<'a, T, const D: usize> {
    pub(super) w: &'a [[T; D]],
    pub(super) c: &'a [[T; D]],
    pub(super) geo: &'a Geometry,
}

impl<T: Real, const D: usize> Pass for Output<'_, T, D> {
    fn min_chunk_rows(&self) -> usize {
        min_chunk_rows(self.geo)
    }

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
/// index). Kernel: `hard_assign`. Scalar weights compare with the
/// centroids around them in value order ([`NearestScalar`]): the same
/// index as comparing with all of them, in about `log k` steps instead of
/// `k` (2.4 million weights at 8 bits took most of `idkm cluster`'s time).
pub fn hard_assign<T: Real>(w: &[T], c: &[T], d: usize, out: &mut [u32]) {
    if d == 1 && !c.is_empty() {
        map_rows(out, &NearestScalar::new(w, c))
    } else {
        map_rows(out, &HardAssign { w, c, d })
    }
}

/// [`hard_assign`] of scalar weights: the centroids in value order, each
/// with the lowest index among the centroids of its value.
pub(super) struct NearestScalar<'a, T> {
    w: &'a [T],
    /// The centroid values, ascending.
    values: Vec<T>,
    /// The lowest index of a centroid of each value.
    index: Vec<u32>,
}

impl<'a, T: Real> NearestScalar<'a, T> {
    fn new(w: &'a [T], c: &[T]) -> Self {
        let mut order: Vec<u32> = (0..c.len() as u32).collect();
        order.sort_by(|&a, &b| {
            let (x, y) = (c[a as usize], c[b as usize]);
            x.partial_cmp(&y).unwrap_or(Ordering::Equal).then(a.cmp(&b))
        });
        let (mut values, mut index) = (Vec::new(), Vec::new());
        for j in order {
            let v = c[j as usize];
            // Equal values keep the first (lowest) index of their run.
            if values.last() != Some(&v) {
                values.push(v);
                index.push(j);
            }
        }
        Self { w, values, index }
    }
}

impl<T: Real> Pass for NearestScalar<'_, T> {
    type Out = u32;

    #[inline(always)]
    fn chunk(&self, rows: Range<usize>, out: &mut [u32]) {
        let (values, index) = (&self.values, &self.index);
        for (&x, oi) in self.w[rows].iter().zip(out.iter_mut()) {
            // (x - c)^2 in T does not shrink away from x on either side, so
            // the nearest centroids are the two around x and those beside
            // them that round to the same distance; of those, the lowest
            // index, as comparing with every centroid gives.
            let dist = |p: usize| (x - values[p]) * (x - values[p]);
            let above = values.partition_point(|&v| v <= x);
            let nearest = [
                above.checked_sub(1),
                (above < values.len()).then_some(above),
            ];
            let best = nearest
                .iter()
                .flatten()
                .map(|&p| dist(p))
                .fold(T::infinity(), |a, b| if b < a { b } else { a });
            let mut lowest = u32::MAX;
            for p in (0..above).rev().take_while(|&p| dist(p) == best) {
                lowest = lowest.min(index[p]);
            }
            for p in (above..values.len()).take_while(|&p| dist(p) == best) {
                lowest = lowest.min(index[p]);
            }
            *oi = lowest;
        }
    }
}

/// [`hard_assign`] on one chunk.
pub(super) struct HardAssign<'a, T> {
    pub(super) w: &'a [T],
    pub(super) c: &'a [T],
    pub(super) d: usize,
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
                let e2 = wi
                    .iter()
                    .zip(cj)
                    .fold(T::zero(), |s, (&a, &b)| s + (a - b) * (a - b));
                if e2 < best.0 {
                    best = (e2, j as u32);
                }
            }
            *oi = best.1;
        }
    }
}
