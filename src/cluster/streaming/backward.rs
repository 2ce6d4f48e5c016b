//! Backward passes: the centroid cotangent, the adjoint matvec and its
//! dense matrix, the weight gradient.

use super::*;

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
    (
        Moments {
            mass: mass.to_vec(),
            weighted: weighted.to_vec(),
        },
        h.to_vec(),
    )
}

/// The centroid cotangent `h` alone (k x d): [`cotangent_reduce`] without
/// its moments. Kernel: `centroid_cotangent`.
pub fn centroid_cotangent<T: Real>(w: &[T], c: &[T], g: &[T], geo: &Geometry) -> Vec<f64> {
    cotangent_reduce(w, c, g, geo).1
}

/// [`cotangent_reduce`] on one chunk: partial sums `[S (k), sum a w (k x d), h (k x d)]`.
pub(super) struct Cotangent<'a, T, const D: usize> {
    pub(super) w: &'a [[T; D]],
    pub(super) c: &'a [[T; D]],
    pub(super) g: &'a [[T; D]],
    pub(super) geo: &'a Geometry,
}

impl<T: Real, const D: usize> Pass for Cotangent<'_, T, D> {
    fn min_chunk_rows(&self) -> usize {
        min_chunk_rows(self.geo)
    }

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
                    let h = sums
                        .get(k * (D + 1) + (win.start + j) * D + e, n)
                        .iter_mut();
                    let terms = h
                        .zip(tile.a(j))
                        .zip(lanes(&g, e, n))
                        .zip(tile.centred(j, &q, &qbar))
                        .zip(tile.w(e));
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
pub(super) fn scaled_adjoint<T: Real>(u: &[f64], inv_mass: &[f64], d: usize) -> Vec<T> {
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
pub(super) struct Matvec<'a, T, const D: usize> {
    pub(super) w: &'a [[T; D]],
    pub(super) c: &'a [[T; D]],
    pub(super) f: &'a [[T; D]],
    pub(super) v: &'a [[T; D]],
    pub(super) geo: &'a Geometry,
}

impl<T: Real, const D: usize> Pass for Matvec<'_, T, D> {
    fn min_chunk_rows(&self) -> usize {
        min_chunk_rows(self.geo)
    }

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
                    let terms = out
                        .iter_mut()
                        .zip(tile.centred(j, &x, &xbar))
                        .zip(tile.w(e));
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
pub fn adjoint_matrix<T: Real>(
    w: &[T],
    c: &[T],
    f: &[T],
    inv_mass: &[f64],
    geo: &Geometry,
) -> Vec<f64> {
    counted_adjoint_matrix(w, &[], c, f, inv_mass, geo)
}

/// [`adjoint_matrix`] where row i stands for `count[i]` equal weight
/// vectors (an empty `count` counts every row once), as
/// [`counted_reduce`].
pub fn counted_adjoint_matrix<T: Real>(
    w: &[T],
    count: &[T],
    c: &[T],
    f: &[T],
    inv_mass: &[f64],
    geo: &Geometry,
) -> Vec<f64> {
    let n = geo.k * geo.d;
    let mut jt = with_dim!(geo.d, D => {
        let pass = Assemble::<T, D> { w: vectors(w), count: vectors(count), c: vectors(c), f: vectors(f), geo };
        sum_rows(pass.w.len(), n * n, &pass)
    });
    for row in jt.chunks_exact_mut(n) {
        for (x, &s) in row
            .iter_mut()
            .zip(inv_mass.iter().flat_map(|s| std::iter::repeat_n(s, geo.d)))
        {
            *x *= s;
        }
    }
    jt
}

/// [`adjoint_matrix`] on one chunk, before the column scaling by `1/S_l`.
pub(super) struct Assemble<'a, T, const D: usize> {
    pub(super) w: &'a [[T; D]],
    /// Rows each row stands for; empty: one each.
    pub(super) count: &'a [[T; 1]],
    pub(super) c: &'a [[T; D]],
    pub(super) f: &'a [[T; D]],
    pub(super) geo: &'a Geometry,
}

impl<T: Real, const D: usize> Pass for Assemble<'_, T, D> {
    fn min_chunk_rows(&self) -> usize {
        matrix_chunk_rows(self.geo)
    }

    type Out = f64;

    #[inline(always)]
    fn chunk(&self, rows: Range<usize>, out: &mut [f64]) {
        let mut tile = Tile::<T, D>::new(self.geo);
        let mut scratch = AssembleLanes::new(self.geo.k * D, D);
        let visit = Visit::new(self.w, rows.clone(), self.c, self.geo);
        let count = if self.count.is_empty() {
            &[][..]
        } else {
            &self.count[rows.clone()]
        };
        let (w, mut wbuf) = (&self.w[rows], [[T::zero(); D]; TILE]);
        let (ones, mut nbuf) = ([[T::of(1.0); 1]; TILE], [[T::zero(); 1]; TILE]);
        for at in visit.tiles() {
            let win = visit.attend(&mut tile, w, at, &mut wbuf, self.c);
            let times = if count.is_empty() {
                &ones[..]
            } else {
                visit.rows(count, at, &mut nbuf)
            };
            tile.weigh();
            self.add_tile(&tile, win, times, &mut scratch, out);
        }
    }
}

/// Scratch lanes of [`Assemble`]: `x_(j,e) = b_ij (w_i - c_j)_e`,
/// `y_(l,e') = (w_i - f_l)_e'` and `a_il y_(l,e')`, each quantity's
/// [`TILE`] rows contiguous, so that each entry of a tile's block is a dot
/// product along the rows; and the block-diagonal terms `x_p . y_(j,e)`.
pub(super) struct AssembleLanes<T> {
    x: Vec<T>,
    y: Vec<T>,
    ay: Vec<T>,
    diag: Vec<T>,
}

impl<T: Real> AssembleLanes<T> {
    /// Lanes for `n` unknowns of dimension `d`.
    pub(super) fn new(n: usize, d: usize) -> Self {
        Self {
            x: vec![T::zero(); n * TILE],
            y: vec![T::zero(); n * TILE],
            ay: vec![T::zero(); n * TILE],
            diag: vec![T::zero(); n * d],
        }
    }
}

/// Rows of the block that [`Assemble::add_tile`] computes at once: the
/// accumulators of a 4 x 2 block of f32 dot products fill 8 of the 16
/// AVX2 registers (f64 lanes take two registers each, hence 2 x 2), and
/// each lane of x and of `a y` loaded serves 2 or 4 products.
const fn block_rows<T>() -> usize {
    if std::mem::size_of::<T>() == 4 {
        4
    } else {
        2
    }
}

/// Columns of the block that [`Assemble::add_tile`] computes at once.
const BLOCK_COLS: usize = 2;

impl<T: Real, const D: usize> Assemble<'_, T, D> {
    /// Adds the block of an attended and weighed `tile` (see
    /// [`Tile::weigh`]) whose window of centroids is `win`, its rows
    /// standing for `times` weights each, into `out` (n x n). The counts
    /// weigh x alone: each term is linear in x. A tile with a window of
    /// centroids adds only the window's block.
    #[inline(always)]
    pub(super) fn add_tile(
        &self,
        tile: &Tile<T, D>,
        win: Range<usize>,
        times: &[[T; 1]],
        scratch: &mut AssembleLanes<T>,
        out: &mut [f64],
    ) {
        let n = self.geo.k * D;
        let AssembleLanes { x, y, ay, diag } = scratch;
        let (c, f) = (&self.c[win.clone()], &self.f[win.clone()]);
        let (len, nw, first) = (tile.n, c.len() * D, win.start * D);
        for (j, (cj, fj)) in c.iter().zip(f).enumerate() {
            for e in 0..D {
                let q = j * D + e;
                let (b, a, wv) = (lanes(&tile.b, j, len), tile.a(j), tile.w(e));
                let xq = &mut x[q * TILE..q * TILE + len];
                let yq = &mut y[q * TILE..q * TILE + len];
                let ayq = &mut ay[q * TILE..q * TILE + len];
                for (i, &wi) in wv.iter().enumerate() {
                    xq[i] = times[i][0] * b[i] * (wi - cj[e]);
                    yq[i] = wi - fj[e];
                    ayq[i] = a[i] * yq[i];
                }
            }
        }
        // The block-diagonal term is summed in the same order as the outer
        // products, so that the two cancel exactly where they should
        // (a_il = 1).
        for p in 0..nw {
            let j = p / D;
            for e in 0..D {
                diag[p * D + e] = dot_lanes(lanes(x, p, len), lanes(y, j * D + e, len));
            }
        }
        let block = Block {
            x,
            ay,
            diag,
            len,
            nw,
        };
        let rows = block_rows::<T>();
        let mut p = 0;
        while p < nw {
            let at = (first + p) * n + first;
            if p + rows <= nw {
                match rows {
                    4 => block.add_rows::<4, D>(p, n, &mut out[at..]),
                    _ => block.add_rows::<2, D>(p, n, &mut out[at..]),
                }
                p += rows;
            } else {
                block.add_rows::<1, D>(p, n, &mut out[at..]);
                p += 1;
            }
        }
    }
}

/// The lanes of one tile's window that [`Assemble::add_tile`] multiplies.
struct Block<'a, T> {
    x: &'a [T],
    ay: &'a [T],
    diag: &'a [T],
    len: usize,
    nw: usize,
}

impl<T: Real> Block<'_, T> {
    /// Adds the window's rows `p0..p0 + P` of `x (a y)^T` less the block
    /// diagonal into `out` (rows n apart, `out[0]` the entry of row p0 and
    /// the window's first column), [`BLOCK_COLS`] columns at a time.
    #[inline(always)]
    fn add_rows<const P: usize, const D: usize>(&self, p0: usize, n: usize, out: &mut [f64]) {
        let mut q = 0;
        while q < self.nw {
            if q + BLOCK_COLS <= self.nw {
                let dots = dot_block::<T, P, BLOCK_COLS>(self.x, p0, self.ay, q, self.len);
                self.add_dots::<P, BLOCK_COLS, D>(&dots, p0, q, n, out);
                q += BLOCK_COLS;
            } else {
                let dots = dot_block::<T, P, 1>(self.x, p0, self.ay, q, self.len);
                self.add_dots::<P, 1, D>(&dots, p0, q, n, out);
                q += 1;
            }
        }
    }

    /// Adds the dot products of rows `p0..p0 + P`, columns `q0..q0 + Q`
    /// into `out`, less the block-diagonal terms where row and column
    /// belong to the same centroid.
    #[inline(always)]
    fn add_dots<const P: usize, const Q: usize, const D: usize>(
        &self,
        dots: &[[T; Q]; P],
        p0: usize,
        q0: usize,
        n: usize,
        out: &mut [f64],
    ) {
        for (a, row) in dots.iter().enumerate() {
            let p = p0 + a;
            for (b, &dot) in row.iter().enumerate() {
                let q = q0 + b;
                let mut v = dot;
                if q / D == p / D {
                    v -= self.diag[p * D + q % D];
                }
                out[a * n + q] += v.wide();
            }
        }
    }
}

/// `sum_i a_i b_i` over up to [`TILE`] lanes, in eight interleaved partial
/// sums added pairwise (a fixed order that vectorises; no fused
/// multiply-add, as everywhere in the passes).
#[inline(always)]
fn dot_lanes<T: Real>(a: &[T], b: &[T]) -> T {
    dot_block::<T, 1, 1>(a, 0, b, 0, a.len())[0][0]
}

/// The dot products of the lanes `p0..p0 + P` of `x` with the lanes
/// `q0..q0 + Q` of `y` (each [`TILE`] apart, `len` used), each summed
/// exactly as [`dot_lanes`] sums one: a block of dot products shares its
/// loads, and the result does not depend on the block's shape.
#[inline(always)]
fn dot_block<T: Real, const P: usize, const Q: usize>(
    x: &[T],
    p0: usize,
    y: &[T],
    q0: usize,
    len: usize,
) -> [[T; Q]; P] {
    let (x, y) = (&x[p0 * TILE..], &y[q0 * TILE..]);
    assert!(x.len() >= (P - 1) * TILE + len && y.len() >= (Q - 1) * TILE + len);
    let mut part = [[[T::zero(); 8]; Q]; P];
    let full = len / 8 * 8;
    for s in (0..full).step_by(8) {
        let mut xv = [[T::zero(); 8]; P];
        let mut yv = [[T::zero(); 8]; Q];
        for (a, v) in xv.iter_mut().enumerate() {
            v.copy_from_slice(&x[a * TILE + s..a * TILE + s + 8]);
        }
        for (b, v) in yv.iter_mut().enumerate() {
            v.copy_from_slice(&y[b * TILE + s..b * TILE + s + 8]);
        }
        for a in 0..P {
            for b in 0..Q {
                for l in 0..8 {
                    part[a][b][l] += xv[a][l] * yv[b][l];
                }
            }
        }
    }
    for l in 0..len - full {
        for a in 0..P {
            for b in 0..Q {
                part[a][b][l] += x[a * TILE + full + l] * y[b * TILE + full + l];
            }
        }
    }
    let mut dots = [[T::zero(); Q]; P];
    for (row, parts) in dots.iter_mut().zip(&part) {
        for (dot, p) in row.iter_mut().zip(parts) {
            *dot = ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7]));
        }
    }
    dots
}

/// The weight gradient, direct plus implicit term, written into `out` (m x d):
/// `sum_j (qc_ij + rc_ij) coef_ij e_ij + sum_j (a_ij / S_j) u_j`, with
/// `q_ij = g_i . c_j` and `r_ij` as in [`adjoint_matvec`] (`f = F(C)`).
/// With `u = h` this is the JFB gradient. Kernel: `weight_grad`.
#[allow(
    clippy::too_many_arguments,
    reason = "the arguments of its kernel, in the same order"
)]
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
pub(super) struct Grad<'a, T, const D: usize> {
    pub(super) w: &'a [[T; D]],
    pub(super) c: &'a [[T; D]],
    pub(super) f: &'a [[T; D]],
    pub(super) g: &'a [[T; D]],
    pub(super) v: &'a [[T; D]],
    pub(super) geo: &'a Geometry,
}

impl<T: Real, const D: usize> Pass for Grad<'_, T, D> {
    fn min_chunk_rows(&self) -> usize {
        min_chunk_rows(self.geo)
    }

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
                    let t = tile
                        .centred(j, &q, &qbar)
                        .zip(tile.centred(j, &r, &rbar))
                        .map(|(tq, tr)| tq + tr);
                    let terms = lanes_mut(&mut o, e, n)
                        .iter_mut()
                        .zip(t)
                        .zip(tile.w(e))
                        .zip(tile.a(j));
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

    /// Lanes of `x` quantities, [`TILE`] apart, of mixed signs and scales.
    fn lanes_of<T: Real>(x: usize, seed: u32) -> Vec<T> {
        (0..x * TILE)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761) >> 8;
                T::of((f64::from(h) / f64::from(1u32 << 24) - 0.5) * (1.0 + (i % 7) as f64))
            })
            .collect()
    }

    fn blocks_match_single_dots<T: Real, const P: usize, const Q: usize>() {
        let (x, y) = (lanes_of::<T>(P + 3, 1), lanes_of::<T>(Q + 3, 2));
        for len in [1, 5, 8, 13, TILE - 1, TILE] {
            for (p0, q0) in [(0, 0), (3, 1), (1, 3)] {
                let block = dot_block::<T, P, Q>(&x, p0, &y, q0, len);
                for (a, row) in block.iter().enumerate() {
                    for (b, &dot) in row.iter().enumerate() {
                        let single = dot_lanes(lanes(&x, p0 + a, len), lanes(&y, q0 + b, len));
                        assert_eq!(
                            dot.wide().to_bits(),
                            single.wide().to_bits(),
                            "{P}x{Q} len {len}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn dot_blocks_sum_each_product_as_a_single_dot_does() {
        blocks_match_single_dots::<f32, 4, 2>();
        blocks_match_single_dots::<f32, 1, 2>();
        blocks_match_single_dots::<f32, 4, 1>();
        blocks_match_single_dots::<f64, 2, 2>();
        blocks_match_single_dots::<f64, 2, 1>();
    }
}
