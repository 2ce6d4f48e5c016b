//! The pass of one Newton iteration of the forward solve (squared
//! distance): the moments, the free energy and the curvature matrix at the
//! same centroids, from one attention per row instead of one per quantity.

use super::backward::{Assemble, AssembleLanes};
use super::*;

/// At `c`: the moments (as [`counted_reduce`]), the free energy (as
/// [`counted_reduce_energy`]) and the curvature `M`, the matrix of
/// [`adjoint_matrix`] at `f = c` with unit masses, in one pass over the
/// weights `w` (m x d; every row counted once). The matrix is
/// [`adjoint_matrix`]'s bit for bit; the moments and the energy are the
/// sums of [`counted_reduce_energy`] over the matrix pass's longer chunks
/// (see [`matrix_chunk_rows`]), so they agree with it up to the rounding
/// of the partial sums. No kernel: the forward Newton solve on the CPU
/// uses it.
pub fn reduce_energy_curvature<T: Real>(
    w: &[T],
    c: &[T],
    geo: &Geometry,
) -> (Moments, f64, Vec<f64>) {
    let (k, d) = (geo.k, geo.d);
    let head = k * (d + 1) + 1;
    let sums = with_dim!(d, D => {
        let assemble = Assemble::<T, D> { w: vectors(w), count: &[], c: vectors(c), f: vectors(c), geo };
        let pass = Curvature { assemble };
        sum_rows(pass.assemble.w.len(), head + k * d * k * d, &pass)
    });
    let (mass, rest) = sums.split_at(k);
    let (weighted, rest) = rest.split_at(k * d);
    let (energy, matrix) = rest.split_at(1);
    (
        Moments {
            mass: mass.to_vec(),
            weighted: weighted.to_vec(),
        },
        energy[0],
        matrix.to_vec(),
    )
}

/// [`reduce_energy_curvature`] on one chunk: partial sums
/// `[S (k), sum a w (k x d), energy, M (n x n)]`.
struct Curvature<'a, T, const D: usize> {
    assemble: Assemble<'a, T, D>,
}

impl<T: Real, const D: usize> Pass for Curvature<'_, T, D> {
    fn min_chunk_rows(&self) -> usize {
        matrix_chunk_rows(self.assemble.geo)
    }

    type Out = f64;

    #[inline(always)]
    fn chunk(&self, rows: Range<usize>, out: &mut [f64]) {
        let Assemble { w, c, geo, .. } = self.assemble;
        let k = geo.k;
        let (head, matrix) = out.split_at_mut(k * (D + 1) + 1);
        let mut tile = Tile::<T, D>::new(geo);
        let mut sums = LaneSums::<T>::new(head.len());
        let mut scratch = AssembleLanes::new(k * D, D);
        let visit = Visit::new(w, rows.clone(), c, geo);
        let (w, mut wbuf) = (&w[rows], [[T::zero(); D]; TILE]);
        let ones = [[T::of(1.0); 1]; TILE];
        let tau = T::of(geo.tau);
        for at in visit.tiles() {
            let win = visit.attend(&mut tile, w, at, &mut wbuf, c);
            tile.add_energy(&mut sums, k * (D + 1), tau, None);
            tile.add_moments(&mut sums, win.start, k);
            sums.end_tile();
            tile.weigh();
            self.assemble
                .add_tile(&tile, win, &ones, &mut scratch, matrix);
        }
        sums.finish(head);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within `tol` of the sum of the magnitudes of `expected`, entry by
    /// entry.
    fn close(got: &[f64], expected: &[f64], tol: f64) -> bool {
        let scale = tol * expected.iter().map(|x| x.abs()).sum::<f64>();
        got.len() == expected.len()
            && got
                .iter()
                .zip(expected)
                .all(|(a, b)| (a - b).abs() <= scale)
    }

    /// The fused pass gives the matrix pass's matrix bit for bit and the
    /// reduce's moments and energy up to the rounding of their partial
    /// sums (grouped into other chunks): scalar weights at 8 bits
    /// (windowed tiles, several chunks) and pairs at 4.
    #[test]
    fn one_pass_matches_the_reduce_and_the_matrix() {
        let mut state = 7u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for (m, k, d, tau) in [(40_000, 256, 1, 2e-7), (3_001, 16, 2, 1e-3)] {
            let w: Vec<f32> = (0..m * d).map(|_| next() * (next() + 0.6)).collect();
            let mut c: Vec<f32> = (0..k * d).map(|_| 0.5 * next()).collect();
            if d == 1 {
                c.sort_by(f32::total_cmp);
            }
            let geo = Geometry {
                k,
                d,
                tau,
                distance: Distance::Squared,
            };
            let (moments, energy, curvature) = reduce_energy_curvature(&w, &c, &geo);
            let (expected, expected_energy) = counted_reduce_energy(&w, &[], &c, &geo);
            assert!(close(&moments.mass, &expected.mass, 1e-9));
            assert!(close(&moments.weighted, &expected.weighted, 1e-9));
            // Each row's energy is rounded to f32 and added in f32 lanes
            // over a few tiles: an f32 rounding of the total.
            assert!(close(&[energy], &[expected_energy], f32::EPSILON.into()));
            assert_eq!(curvature, adjoint_matrix(&w, &c, &c, &vec![1.0; k], &geo));
            assert!(curvature.iter().any(|&x| x != 0.0));
        }
    }
}
