//! Solvers of the small adjoint system `(I - J)^T u = h` (k*d unknowns).
//!
//! Every matvec is a full pass over the weights, so the solvers are written
//! against a matvec closure and count the passes. Each keeps its best iterate
//! (smallest residual) and reports the final relative residual
//! `||h - A u|| / ||h||`; the caller decides what to do when the tolerance is
//! missed (see [`super::backward`]).

/// What a solve did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SolveReport {
    /// Matvecs (passes over the weights) spent.
    pub steps: usize,
    /// Relative residual of the returned iterate.
    pub rel_residual: f64,
    /// Whether the relative residual reached the tolerance.
    pub converged: bool,
}

use super::linalg::{dot, norm, Lu};

/// `y += alpha x`.
fn axpy(y: &mut [f64], alpha: f64, x: &[f64]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += alpha * x);
}

fn trivial(n: usize) -> (Vec<f64>, SolveReport) {
    (
        vec![0.0; n],
        SolveReport {
            steps: 0,
            rel_residual: 0.0,
            converged: true,
        },
    )
}

/// Conjugate gradient for a symmetric positive definite `apply` (`x -> A x`).
pub fn conjugate_gradient(
    mut apply: impl FnMut(&[f64]) -> Vec<f64>,
    b: &[f64],
    tol: f64,
    max_steps: usize,
) -> (Vec<f64>, SolveReport) {
    let bnorm = norm(b);
    if bnorm == 0.0 {
        return trivial(b.len());
    }
    let mut x = vec![0.0; b.len()];
    let mut r = b.to_vec();
    let mut p = r.clone();
    let mut rs = dot(&r, &r);
    let mut best = (x.clone(), 1.0);
    let mut steps = 0;
    while steps < max_steps {
        let ap = apply(&p);
        steps += 1;
        let pap = dot(&p, &ap);
        if pap.is_nan() || pap <= 0.0 {
            // Not positive definite along p (a repelling fixed point) or a breakdown.
            tracing::debug!(
                steps,
                pap,
                "conjugate gradient: non-positive curvature, stopping"
            );
            break;
        }
        let alpha = rs / pap;
        axpy(&mut x, alpha, &p);
        axpy(&mut r, -alpha, &ap);
        let rs_next = dot(&r, &r);
        let rel = rs_next.sqrt() / bnorm;
        if rel < best.1 {
            best = (x.clone(), rel);
        }
        if rel <= tol {
            break;
        }
        let beta = rs_next / rs;
        p.iter_mut().zip(&r).for_each(|(p, r)| *p = r + beta * *p);
        rs = rs_next;
    }
    let (x, rel) = best;
    (
        x,
        SolveReport {
            steps,
            rel_residual: rel,
            converged: rel <= tol,
        },
    )
}

/// Restarted GMRES for a general `apply` (`x -> A x`), restart length `restart`.
pub fn gmres(
    mut apply: impl FnMut(&[f64]) -> Vec<f64>,
    b: &[f64],
    tol: f64,
    max_steps: usize,
    restart: usize,
) -> (Vec<f64>, SolveReport) {
    let n = b.len();
    let bnorm = norm(b);
    if bnorm == 0.0 {
        return trivial(n);
    }
    let restart = restart.clamp(1, n);
    let mut x = vec![0.0; n];
    let mut r = b.to_vec();
    let mut rel = 1.0;
    let mut steps = 0;
    while steps < max_steps && rel > tol {
        let beta = norm(&r);
        let mut basis: Vec<Vec<f64>> = vec![r.iter().map(|v| v / beta).collect()];
        // Hessenberg columns after Givens rotations, the rotations, and the rotated rhs.
        let mut hcols: Vec<Vec<f64>> = Vec::new();
        let mut rot: Vec<(f64, f64)> = Vec::new();
        let mut g = vec![beta];
        for jj in 0..restart {
            if steps >= max_steps {
                break;
            }
            let mut v = apply(&basis[jj]);
            steps += 1;
            let mut h = Vec::with_capacity(jj + 2);
            for q in &basis {
                let hij = dot(&v, q);
                axpy(&mut v, -hij, q);
                h.push(hij);
            }
            let hnext = norm(&v);
            h.push(hnext);
            for (i, &(cs, sn)) in rot.iter().enumerate() {
                let (a, b) = (h[i], h[i + 1]);
                h[i] = cs * a + sn * b;
                h[i + 1] = -sn * a + cs * b;
            }
            let denom = h[jj].hypot(h[jj + 1]);
            let (cs, sn) = if denom == 0.0 {
                (1.0, 0.0)
            } else {
                (h[jj] / denom, h[jj + 1] / denom)
            };
            h[jj] = denom;
            h[jj + 1] = 0.0;
            rot.push((cs, sn));
            g.push(-sn * g[jj]);
            g[jj] *= cs;
            hcols.push(h);
            rel = g[jj + 1].abs() / bnorm;
            if rel <= tol || hnext == 0.0 {
                break;
            }
            basis.push(v.iter().map(|x| x / hnext).collect());
        }
        // Back substitution for the least-squares coefficients.
        let m = hcols.len();
        let mut y = vec![0.0; m];
        for i in (0..m).rev() {
            let s: f64 = (i + 1..m).map(|l| hcols[l][i] * y[l]).sum();
            y[i] = if hcols[i][i] != 0.0 {
                (g[i] - s) / hcols[i][i]
            } else {
                0.0
            };
        }
        for (yi, q) in y.iter().zip(&basis) {
            axpy(&mut x, *yi, q);
        }
        // True residual before a restart (costs one matvec, avoids drift).
        if rel > tol && steps < max_steps {
            let ax = apply(&x);
            steps += 1;
            r = b.iter().zip(&ax).map(|(b, a)| b - a).collect();
            rel = norm(&r) / bnorm;
        }
    }
    (
        x,
        SolveReport {
            steps,
            rel_residual: rel,
            converged: rel <= tol,
        },
    )
}

/// Fixed-point (Neumann series) iteration `u <- h + J^T u` with
/// `apply_jt(u) = J^T u`. Converges when the fixed point is attracting.
pub fn neumann(
    mut apply_jt: impl FnMut(&[f64]) -> Vec<f64>,
    h: &[f64],
    tol: f64,
    max_steps: usize,
) -> (Vec<f64>, SolveReport) {
    let hnorm = norm(h);
    if hnorm == 0.0 {
        return trivial(h.len());
    }
    let mut u = h.to_vec();
    let mut best = (u.clone(), f64::INFINITY);
    let mut steps = 0;
    while steps < max_steps {
        let mut next = apply_jt(&u);
        steps += 1;
        axpy(&mut next, 1.0, h);
        // Residual of u: h - (u - J^T u) = next - u.
        let rel = next
            .iter()
            .zip(&u)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt()
            / hnorm;
        if rel < best.1 {
            best = (u.clone(), rel);
        }
        u = next;
        if rel <= tol || !rel.is_finite() {
            break;
        }
    }
    let (u, rel) = best;
    (
        u,
        SolveReport {
            steps,
            rel_residual: rel,
            converged: rel <= tol,
        },
    )
}

/// The adjoint system `(I - J^T) u = h` solved directly, given `J^T` (n x n,
/// row-major), with its relative residual checked against `tol`. `steps` is
/// the passes over the weights that assembling `J^T` took. A singular system
/// returns `u = 0` with relative residual 1 (the fallback policy then takes
/// the JFB gradient).
pub fn dense(jt: &[f64], h: &[f64], tol: f64, steps: usize) -> (Vec<f64>, SolveReport) {
    let n = h.len();
    let h_norm = norm(h);
    if h_norm == 0.0 {
        return trivial(n);
    }
    let a: Vec<f64> = jt
        .iter()
        .enumerate()
        .map(|(i, &x)| f64::from(u8::from(i / n == i % n)) - x)
        .collect();
    let Some(lu) = Lu::new(&a, n) else {
        return (
            vec![0.0; n],
            SolveReport {
                steps,
                rel_residual: 1.0,
                converged: false,
            },
        );
    };
    let u = lu.solve(h);
    let residual: Vec<f64> = jt
        .chunks_exact(n)
        .zip(h)
        .zip(&u)
        .map(|((row, &hr), &ur)| hr - ur + dot(row, &u))
        .collect();
    let rel_residual = norm(&residual) / h_norm;
    (
        u,
        SolveReport {
            steps,
            rel_residual,
            converged: rel_residual <= tol,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A = I - J^T with a known small J; checks every solver against a direct solve.
    fn system() -> (Vec<Vec<f64>>, Vec<f64>, Vec<f64>) {
        // Symmetric positive definite A (3 x 3) and the solution of A x = b.
        let a = vec![
            vec![4.0, 1.0, 0.5],
            vec![1.0, 3.0, 0.2],
            vec![0.5, 0.2, 2.0],
        ];
        let x = vec![1.0, -2.0, 0.5];
        let b = a.iter().map(|row| dot(row, &x)).collect();
        (a, x, b)
    }

    fn matvec(a: &[Vec<f64>], x: &[f64]) -> Vec<f64> {
        a.iter().map(|row| dot(row, x)).collect()
    }

    #[test]
    fn cg_and_gmres_solve_spd_system() {
        let (a, x, b) = system();
        let (xc, rc) = conjugate_gradient(|v| matvec(&a, v), &b, 1e-12, 10);
        let (xg, rg) = gmres(|v| matvec(&a, v), &b, 1e-12, 10, 3);
        assert!(rc.converged && rc.steps <= 3, "{rc:?}");
        assert!(rg.converged && rg.steps <= 3, "{rg:?}");
        for i in 0..3 {
            assert!((xc[i] - x[i]).abs() < 1e-10, "cg {xc:?}");
            assert!((xg[i] - x[i]).abs() < 1e-10, "gmres {xg:?}");
        }
    }

    #[test]
    fn gmres_and_neumann_solve_nonsymmetric_system() {
        // J^T with spectral radius < 1, not symmetric.
        let jt = vec![
            vec![0.2, 0.3, 0.0],
            vec![-0.1, 0.1, 0.4],
            vec![0.05, 0.0, 0.3],
        ];
        let x = vec![0.3, 1.0, -1.5];
        let a: Vec<Vec<f64>> = (0..3)
            .map(|i| {
                (0..3)
                    .map(|j| f64::from(u8::from(i == j)) - jt[i][j])
                    .collect()
            })
            .collect();
        let h = matvec(&a, &x);
        let (xg, rg) = gmres(|v| matvec(&a, v), &h, 1e-12, 100, 2);
        let (xn, rn) = neumann(|v| matvec(&jt, v), &h, 1e-12, 500);
        assert!(rg.converged, "{rg:?}");
        assert!(rn.converged, "{rn:?}");
        for i in 0..3 {
            assert!((xg[i] - x[i]).abs() < 1e-9, "gmres {xg:?}");
            assert!((xn[i] - x[i]).abs() < 1e-9, "neumann {xn:?}");
        }
    }

    #[test]
    fn missed_tolerance_is_reported() {
        let (a, _, b) = system();
        let (_, report) = conjugate_gradient(|v| matvec(&a, v), &b, 1e-14, 1);
        assert!(!report.converged && report.steps == 1 && report.rel_residual < 1.0);
    }
}
