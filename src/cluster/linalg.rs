//! Dense linear algebra on the small k·d x k·d systems of the forward
//! Newton solve and the adjoint: Cholesky (with a diagonal shift), LU with
//! partial pivoting (solves with the matrix and its transpose), and
//! estimates of extreme eigenvalues and of the condition number. Matrices
//! are row-major `n * n` slices of f64.

/// `x . y`.
pub fn dot(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// `||x||_2`.
pub fn norm(x: &[f64]) -> f64 {
    dot(x, x).sqrt()
}

/// `a x` for the row-major `n x n` matrix `a`.
pub fn matvec(a: &[f64], x: &[f64]) -> Vec<f64> {
    a.chunks_exact(x.len()).map(|row| dot(row, x)).collect()
}

/// `a^T x` for the row-major `n x n` matrix `a`.
pub fn matvec_transposed(a: &[f64], x: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    for (row, &xr) in a.chunks_exact(x.len()).zip(x) {
        out.iter_mut().zip(row).for_each(|(o, &v)| *o += v * xr);
    }
    out
}

/// The Cholesky factor `L` (lower triangular, `a = L L^T`) of a symmetric
/// positive definite matrix, stored by its envelope: each row from its
/// first non-zero entry to the diagonal. The Newton matrix of scalar
/// centroids is banded (the attention reaches a few neighbouring
/// centroids), so that a layer's kept factor at 256 centroids holds a few
/// thousand numbers instead of 65,536.
#[derive(Clone, Debug, PartialEq)]
pub struct Cholesky {
    n: usize,
    /// Each row's first stored column.
    first: Vec<usize>,
    /// Where each row starts in `l`: row `i` holds columns `first[i]..=i`.
    start: Vec<usize>,
    /// The rows, one after another.
    l: Vec<f64>,
}

impl Cholesky {
    /// Each row's first stored column, and the rows' entries one after
    /// another, as [`Self::from_envelope`] takes them.
    pub fn envelope(&self) -> (&[usize], &[f64]) {
        (&self.first, &self.l)
    }

    /// The factor of size `n` whose rows start at the columns `first` (each
    /// at most its row), with the rows' entries at the front of `data`
    /// (as [`Self::envelope`] gave them), and the rest of `data`; `None`
    /// when they do not make one.
    pub fn from_envelope(n: usize, first: Vec<usize>, data: &[f64]) -> Option<(Self, &[f64])> {
        if first.len() != n || first.iter().enumerate().any(|(i, &j)| j > i) {
            return None;
        }
        let mut start = Vec::with_capacity(n);
        let mut len = 0;
        for (i, &j) in first.iter().enumerate() {
            start.push(len);
            len += i - j + 1;
        }
        let (l, rest) = (data.len() >= len).then(|| data.split_at(len))?;
        let l = l.to_vec();
        Some((Self { n, first, start, l }, rest))
    }

    /// The factor as a row-major `n x n` matrix (the upper triangle zero).
    #[cfg(test)]
    pub fn dense(&self) -> Vec<f64> {
        let n = self.n;
        let mut out = vec![0.0; n * n];
        for i in 0..n {
            out[i * n + self.first[i]..=i * n + i].copy_from_slice(self.row(i));
        }
        out
    }

    /// The factor of size `n` from its row-major matrix `l` (the upper
    /// triangle is not read), as checkpoints of earlier versions hold it.
    pub fn from_dense(n: usize, l: &[f64]) -> Option<Self> {
        if l.len() != n * n {
            return None;
        }
        let mut chol = Self::empty(n);
        for i in 0..n {
            let row = &l[i * n..i * n + i + 1];
            let first = row[..i].iter().position(|&x| x != 0.0).unwrap_or(i);
            chol.first.push(first);
            chol.start.push(chol.l.len());
            chol.l.extend_from_slice(&row[first..]);
        }
        Some(chol)
    }

    fn empty(n: usize) -> Self {
        Self {
            n,
            first: Vec::with_capacity(n),
            start: Vec::with_capacity(n),
            l: Vec::new(),
        }
    }

    /// Row `i`'s stored entries, columns `first[i]..=i`.
    fn row(&self, i: usize) -> &[f64] {
        &self.l[self.start[i]..self.start[i] + i - self.first[i] + 1]
    }

    /// The factor of the symmetric `a` (n x n; only its lower triangle is
    /// read), or `None` when `a` is not positive definite (a pivot is not
    /// positive, at a relative threshold of 1e-14 of the diagonal's size).
    ///
    /// Only the envelope of `a` is worked on (in each row, from the first
    /// non-zero entry on): `L` has no entries before it, so that a banded
    /// matrix costs `n b^2` instead of `n^3 / 3`, with the same result as
    /// the full factorisation to the bit.
    pub fn new(a: &[f64], n: usize) -> Option<Self> {
        Self::shifted(a, n, &[])
    }

    /// The factor of `a + diag(shift)` as [`Self::new`] finds it, without
    /// a copy of `a`; an empty `shift` adds nothing.
    pub fn shifted(a: &[f64], n: usize, shift: &[f64]) -> Option<Self> {
        let diagonal = |i: usize| a[i * n + i] + shift.get(i).copied().unwrap_or(0.0);
        let scale = (0..n).map(|i| diagonal(i).abs()).fold(0.0, f64::max);
        let mut chol = Self::empty(n);
        for i in 0..n {
            let first = (0..i).find(|&j| a[i * n + j] != 0.0).unwrap_or(i);
            let base = chol.l.len();
            chol.first.push(first);
            chol.start.push(base);
            for j in first..i {
                // Row i's and row j's entries in columns from..j.
                let from = first.max(chol.first[j]);
                let row_j = chol.start[j] - chol.first[j];
                let s = a[i * n + j]
                    - dot(
                        &chol.l[base + from - first..base + j - first],
                        &chol.l[row_j + from..row_j + j],
                    );
                let pivot = chol.l[row_j + j];
                chol.l.push(s / pivot);
            }
            let row = &chol.l[base..];
            let s = diagonal(i) - dot(row, row);
            if s.is_nan() || s <= 1e-14 * scale {
                return None;
            }
            chol.l.push(s.sqrt());
        }
        Some(chol)
    }

    /// Solves `a x = b`.
    pub fn solve(&self, b: &[f64]) -> Vec<f64> {
        let n = self.n;
        let mut y = b.to_vec();
        for i in 0..n {
            let (diagonal, row) = self.row(i).split_last().expect("a row holds its diagonal");
            y[i] = (y[i] - dot(row, &y[self.first[i]..i])) / diagonal;
        }
        for i in (0..n).rev() {
            let s: f64 = (i + 1..n)
                .filter(|&j| self.first[j] <= i)
                .map(|j| self.l[self.start[j] + i - self.first[j]] * y[j])
                .sum();
            y[i] = (y[i] - s) / self.l[self.start[i] + i - self.first[i]];
        }
        y
    }
}

/// LU factors with partial pivoting, `P a = L U`.
#[derive(Clone, Debug, PartialEq)]
pub struct Lu {
    n: usize,
    /// `L` (unit diagonal, below) and `U` (on and above), row-major.
    lu: Vec<f64>,
    /// Row `i` of `P a` is row `perm[i]` of `a`.
    perm: Vec<usize>,
}

impl Lu {
    /// Its size, factors and row permutation, as [`Self::from_parts`] takes them.
    pub fn parts(&self) -> (usize, &[f64], &[usize]) {
        (self.n, &self.lu, &self.perm)
    }

    /// The factors of size `n` (as [`Self::parts`] gave them).
    pub fn from_parts(n: usize, lu: Vec<f64>, perm: Vec<usize>) -> Option<Self> {
        let valid = lu.len() == n * n && perm.len() == n && perm.iter().all(|&p| p < n);
        valid.then_some(Self { n, lu, perm })
    }

    /// The factors of `a` (n x n), or `None` when a pivot vanishes (a
    /// singular matrix, at a relative threshold of 1e-14 of its largest entry).
    pub fn new(a: &[f64], n: usize) -> Option<Self> {
        let scale = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let mut lu = a.to_vec();
        let mut perm: Vec<usize> = (0..n).collect();
        for col in 0..n {
            let piv = (col..n)
                .max_by(|&x, &y| lu[x * n + col].abs().total_cmp(&lu[y * n + col].abs()))?;
            if lu[piv * n + col].is_nan() || lu[piv * n + col].abs() <= 1e-14 * scale {
                return None;
            }
            if piv != col {
                for j in 0..n {
                    lu.swap(col * n + j, piv * n + j);
                }
                perm.swap(col, piv);
            }
            let pivot = lu[col * n + col];
            for r in col + 1..n {
                let f = lu[r * n + col] / pivot;
                lu[r * n + col] = f;
                if f != 0.0 {
                    for j in col + 1..n {
                        lu[r * n + j] -= f * lu[col * n + j];
                    }
                }
            }
        }
        Some(Self { n, lu, perm })
    }

    /// Solves `a x = b`.
    pub fn solve(&self, b: &[f64]) -> Vec<f64> {
        let (n, lu) = (self.n, &self.lu);
        let mut y: Vec<f64> = self.perm.iter().map(|&p| b[p]).collect();
        for i in 0..n {
            y[i] -= dot(&lu[i * n..i * n + i], &y[..i]);
        }
        for i in (0..n).rev() {
            y[i] = (y[i] - dot(&lu[i * n + i + 1..(i + 1) * n], &y[i + 1..])) / lu[i * n + i];
        }
        y
    }

    /// Solves `a^T x = b`.
    pub fn solve_transposed(&self, b: &[f64]) -> Vec<f64> {
        let (n, lu) = (self.n, &self.lu);
        // a^T = U^T L^T P: solve U^T z = b, then L^T y = z, then x = P^T y.
        let mut z = b.to_vec();
        for i in 0..n {
            let s: f64 = (0..i).map(|j| lu[j * n + i] * z[j]).sum();
            z[i] = (z[i] - s) / lu[i * n + i];
        }
        for i in (0..n).rev() {
            let s: f64 = (i + 1..n).map(|j| lu[j * n + i] * z[j]).sum();
            z[i] -= s;
        }
        let mut x = vec![0.0; n];
        for (i, &p) in self.perm.iter().enumerate() {
            x[p] = z[i];
        }
        x
    }
}

/// Iterations of the power and inverse iterations in [`condition`].
const POWER_STEPS: usize = 60;

/// An estimate of the 2-norm condition number `sigma_max / sigma_min` of
/// `a` (n x n, factored as `lu`): power iteration on `a^T a` for the
/// largest singular value and on `(a^T a)^-1` (through `lu`) for the
/// smallest, from a fixed start. Accurate to a few percent, which is what
/// a report needs.
pub fn condition(a: &[f64], lu: &Lu) -> f64 {
    let n = lu.n;
    let start: Vec<f64> = (0..n)
        .map(|i| 1.0 + (i as f64 * 0.618_033_988_75).fract())
        .collect();
    let largest = power(&start, |x| matvec_transposed(a, &matvec(a, x)));
    let smallest = power(&start, |x| lu.solve(&lu.solve_transposed(x)));
    (largest * smallest).sqrt()
}

/// An estimate of the spectral radius of `a` (n x n, any): the growth rate
/// of `||a^s x||` over the last half of [`POWER_STEPS`] power steps from a
/// fixed start (which also covers a complex pair of dominant eigenvalues).
pub fn spectral_radius(a: &[f64], n: usize) -> f64 {
    let mut x: Vec<f64> = (0..n)
        .map(|i| 1.0 + (i as f64 * 0.618_033_988_75).fract())
        .collect();
    let mut log_growth = 0.0;
    for step in 0..POWER_STEPS {
        let size = norm(&x);
        if size == 0.0 || !size.is_finite() {
            return 0.0;
        }
        x.iter_mut().for_each(|v| *v /= size);
        x = matvec(a, &x);
        if step >= POWER_STEPS / 2 {
            log_growth += norm(&x).max(f64::MIN_POSITIVE).ln();
        }
    }
    (log_growth / (POWER_STEPS - POWER_STEPS / 2) as f64).exp()
}

/// A power iteration in [`condition`] stops once its estimate grows by
/// less than this fraction in a step: it grows at each step (the matrices
/// are positive semi-definite), by about `1 - rho^2` times its remaining
/// error for a ratio `rho` of the two largest eigenvalues, so the estimate
/// is then within a few percent where `rho < 0.99`.
const POWER_TOL: f64 = 1e-4;

/// The largest eigenvalue of the symmetric positive semi-definite `apply`
/// by power iteration from `start`: at most [`POWER_STEPS`] steps, fewer
/// once the estimate settles (see [`POWER_TOL`]).
fn power(start: &[f64], apply: impl Fn(&[f64]) -> Vec<f64>) -> f64 {
    let mut x: Vec<f64> = start.to_vec();
    let mut value = 0.0;
    for _ in 0..POWER_STEPS {
        let size = norm(&x);
        if size == 0.0 || !size.is_finite() {
            return value;
        }
        x.iter_mut().for_each(|v| *v /= size);
        let y = apply(&x);
        let next = dot(&x, &y);
        let settled = next - value <= POWER_TOL * next.abs();
        value = next;
        if settled {
            break;
        }
        x = y;
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spd() -> (Vec<f64>, usize) {
        (vec![4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 2.0], 3)
    }

    #[test]
    fn cholesky_solves_and_refuses_indefinite() {
        let (a, n) = spd();
        let x = [1.0, -2.0, 0.5];
        let b = matvec(&a, &x);
        let got = Cholesky::new(&a, n).unwrap().solve(&b);
        assert!(
            got.iter().zip(x).all(|(g, x)| (g - x).abs() < 1e-12),
            "{got:?}"
        );
        let indefinite = [1.0, 2.0, 2.0, 1.0];
        assert!(Cholesky::new(&indefinite, 2).is_none());
    }

    /// A shift on the diagonal factors as the shifted copy does, to the
    /// bit, and turns an indefinite matrix definite.
    #[test]
    fn shifted_cholesky_is_the_factor_of_the_shifted_matrix() {
        let indefinite = [1.0, 2.0, 0.0, 2.0, 1.0, 0.5, 0.0, 0.5, 3.0];
        let shift = [1.5, 1.25, 0.0];
        let mut copy = indefinite.to_vec();
        for (i, s) in shift.iter().enumerate() {
            copy[i * 3 + i] += s;
        }
        assert!(Cholesky::new(&indefinite, 3).is_none());
        let shifted = Cholesky::shifted(&indefinite, 3, &shift).unwrap();
        assert_eq!(shifted, Cholesky::new(&copy, 3).unwrap());
        assert!(Cholesky::shifted(&indefinite, 3, &[0.5, 0.5, 0.0]).is_none());
    }

    /// A banded matrix with a varying envelope (as the Newton matrix of
    /// scalar centroids has): the factor stays inside the envelope and
    /// reproduces the matrix.
    #[test]
    fn cholesky_of_a_banded_matrix_stays_in_its_envelope() {
        let n = 40;
        let band = |i: usize| 1 + i % 3;
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            a[i * n + i] = 4.0 + (i % 5) as f64;
            for j in i.saturating_sub(band(i))..i {
                let v = -0.5 - 0.1 * ((i + j) % 4) as f64;
                a[i * n + j] = v;
                a[j * n + i] = v;
            }
        }
        let chol = Cholesky::new(&a, n).unwrap();
        let l = chol.dense();
        for i in 0..n {
            for j in 0..i.saturating_sub(band(i)) {
                assert_eq!(l[i * n + j], 0.0, "({i}, {j}) outside the envelope");
            }
            for j in 0..=i {
                let llt = dot(&l[i * n..i * n + j + 1], &l[j * n..j * n + j + 1]);
                assert!(
                    (llt - a[i * n + j]).abs() < 1e-12,
                    "({i}, {j}): {llt} vs {}",
                    a[i * n + j]
                );
            }
        }
        // Only the envelope is stored, and the dense form reads back as is.
        let envelope: usize = (0..n).map(|i| band(i).min(i) + 1).sum();
        let (first, entries) = chol.envelope();
        assert_eq!(entries.len(), envelope);
        assert_eq!(Cholesky::from_dense(n, &l), Some(chol.clone()));
        let mut data = entries.to_vec();
        data.push(7.0);
        let read = Cholesky::from_envelope(n, first.to_vec(), &data);
        assert_eq!(read, Some((chol.clone(), &[7.0][..])));
        assert!(Cholesky::from_envelope(n, first.to_vec(), &entries[1..]).is_none());
        let mut beyond = first.to_vec();
        beyond[3] = 4;
        assert!(Cholesky::from_envelope(n, beyond, &data).is_none());
        let x: Vec<f64> = (0..n).map(|i| (i as f64 * 0.7).sin()).collect();
        let got = chol.solve(&matvec(&a, &x));
        assert!(
            got.iter().zip(&x).all(|(g, x)| (g - x).abs() < 1e-12),
            "{got:?}"
        );
    }

    #[test]
    fn lu_solves_both_ways() {
        let a = [0.0, 2.0, 1.0, 1.0, 1.0, 0.0, 3.0, 0.5, 4.0];
        let x = [0.3, 1.0, -1.5];
        let lu = Lu::new(&a, 3).unwrap();
        let got = lu.solve(&matvec(&a, &x));
        let got_t = lu.solve_transposed(&matvec_transposed(&a, &x));
        for i in 0..3 {
            assert!(
                (got[i] - x[i]).abs() < 1e-12 && (got_t[i] - x[i]).abs() < 1e-12,
                "{got:?} {got_t:?}"
            );
        }
        assert!(Lu::new(&[1.0, 2.0, 2.0, 4.0], 2).is_none());
    }

    #[test]
    fn spectral_radius_of_a_rotation_and_a_contraction() {
        // A rotation by 90 degrees scaled by 0.9: complex eigenvalues of modulus 0.9.
        let r = spectral_radius(&[0.0, -0.9, 0.9, 0.0], 2);
        assert!((r - 0.9).abs() < 1e-9, "{r}");
        let r = spectral_radius(&[1.2, 0.3, 0.0, 0.5], 2);
        assert!((r - 1.2).abs() < 1e-6, "{r}");
    }

    #[test]
    fn condition_of_a_rotated_matrix_stops_early_within_a_percent() {
        // A = H diag(s) H with a Householder reflection H: singular values s.
        let n = 40;
        let s: Vec<f64> = (0..n).map(|i| 0.5 * 1.15f64.powi(i as i32)).collect();
        let v: Vec<f64> = (0..n).map(|i| ((i * 7 + 3) % 11) as f64 - 5.0).collect();
        let vv = dot(&v, &v);
        let h = |i: usize, j: usize| f64::from(u8::from(i == j)) - 2.0 * v[i] * v[j] / vv;
        let a: Vec<f64> = (0..n * n)
            .map(|ij| {
                let (i, j) = (ij / n, ij % n);
                (0..n).map(|l| h(i, l) * s[l] * h(l, j)).sum()
            })
            .collect();
        let cond = condition(&a, &Lu::new(&a, n).unwrap());
        let exact = s[n - 1] / s[0];
        assert!((cond / exact - 1.0).abs() < 1e-2, "{cond} against {exact}");
    }

    #[test]
    fn condition_of_a_diagonal_matrix() {
        let a = [10.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.5];
        let cond = condition(&a, &Lu::new(&a, 3).unwrap());
        assert!((cond / 20.0 - 1.0).abs() < 1e-4, "{cond}");
    }
}
