//! A safe front to the `gemm` crate (the GEMM candle-core's CPU matmul runs
//! on): strided matrix views over slices, checked against their extents.

use super::Float;
use gemm::Parallelism;

/// Checks that every element of a `rows x cols` view with strides `rs`,
/// `cs` lies in a slice of `len` elements.
fn check_extent(what: &str, len: usize, rows: usize, cols: usize, rs: usize, cs: usize) {
    if rows > 0 && cols > 0 {
        let last = (rows - 1) * rs + (cols - 1) * cs;
        assert!(
            last < len,
            "gemm: {what} view {rows}x{cols} (strides {rs}, {cs}) exceeds its {len} elements"
        );
    }
}

/// A read-only matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major `rows x cols` matrix (row stride `cols`).
    pub fn rows(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols, 1)
    }

    /// A view with explicit row and column strides.
    pub fn strided(data: &'a [T], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        check_extent("input", data.len(), rows, cols, rs, cs);
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// A mutable matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
pub struct MatMut<'a, T> {
    data: &'a mut [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T> MatMut<'a, T> {
    /// A row-major `rows x cols` matrix (row stride `cols`).
    pub fn rows(data: &'a mut [T], rows: usize, cols: usize) -> Self {
        check_extent("output", data.len(), rows, cols, cols, 1);
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }
}

/// `dst = lhs · rhs`, or `dst += lhs · rhs` with `accumulate`. With
/// `parallel`, the product is split over rayon's threads.
///
/// # Panics
///
/// If the shapes do not fit together.
pub fn matmul<T: Float>(
    dst: MatMut<T>,
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
    parallel: bool,
) {
    assert!(
        dst.rows == lhs.rows && lhs.cols == rhs.rows && dst.cols == rhs.cols,
        "gemm: {}x{} = {}x{} · {}x{}",
        dst.rows,
        dst.cols,
        lhs.rows,
        lhs.cols,
        rhs.rows,
        rhs.cols
    );
    let threads = rayon::current_num_threads();
    let parallelism = if parallel && threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: every view was checked to lie inside its slice, `dst` is
    // borrowed mutably and the inputs immutably, so they do not overlap,
    // and `T` is f32 or f64, which `gemm` supports.
    unsafe {
        gemm::gemm(
            dst.rows,
            dst.cols,
            lhs.cols,
            dst.data.as_mut_ptr(),
            dst.cs as isize,
            dst.rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(
        m: usize,
        n: usize,
        k: usize,
        a: impl Fn(usize, usize) -> f64,
        b: impl Fn(usize, usize) -> f64,
    ) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|l| a(i, l) * b(l, j)).sum();
            }
        }
        c
    }

    #[test]
    fn strided_and_transposed_views_multiply_and_accumulate() {
        let (m, n, k) = (7, 5, 11);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        // b stored transposed: b[l][j] at bt[j * k + l].
        let bt: Vec<f64> = (0..n * k).map(|i| (i as f64 * 0.91).cos()).collect();
        let want = naive(m, n, k, |i, l| a[i * k + l], |l, j| bt[j * k + l]);
        for parallel in [false, true] {
            let mut c = vec![1.0; m * n];
            matmul(
                MatMut::rows(&mut c, m, n),
                false,
                Mat::rows(&a, m, k),
                Mat::rows(&bt, n, k).t(),
                parallel,
            );
            assert!(c.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-12));
            matmul(
                MatMut::rows(&mut c, m, n),
                true,
                Mat::rows(&a, m, k),
                Mat::strided(&bt, k, n, 1, k),
                parallel,
            );
            assert!(c
                .iter()
                .zip(&want)
                .all(|(x, y)| (x - 2.0 * y).abs() < 1e-12));
        }
    }

    #[test]
    #[should_panic(expected = "exceeds")]
    fn a_view_past_its_slice_is_refused() {
        let a = [0.0f32; 5];
        let _ = Mat::rows(&a, 2, 3);
    }
}
