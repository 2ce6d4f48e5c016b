//! The implicit backward of the streaming path: one pass for the moments and
//! the centroid cotangent, the adjoint solve (one pass per solver step), and
//! the weight-gradient pass. Each step maps onto one kernel launch (or a few
//! per solver step) on CUDA.

use super::binned;
use super::config::{Method, Solver};
use super::forward::ForwardFactor;
use super::solve::{self, SolveReport};
use super::streaming::{self as pass, Geometry, Real};

/// The settings of the backward pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackwardConfig {
    /// `Idkm` solves the adjoint system; `IdkmJfb` takes `u = h`.
    pub method: Method,
    /// Which solver IDKM uses.
    pub solver: Solver,
    /// Relative residual at which the solver stops.
    pub tol: f64,
    /// Maximum solver steps (passes over the weights).
    pub max_steps: usize,
}

/// How the adjoint `u` was obtained.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Adjoint {
    /// JFB by request: no solve.
    JacobianFree,
    /// The solver reached its tolerance.
    Solved(SolveReport),
    /// The solver missed its tolerance; its best iterate was used.
    BestIterate(SolveReport),
    /// The solver missed its tolerance and did worse than nothing: JFB was used.
    FellBackToJfb(SolveReport),
    /// The forward Newton solve's factorisation was reused (no assembly):
    /// its matrix was assembled this far (relative to the spread of the
    /// weights) from the centroids, its last Newton step.
    Reused {
        /// Distance of the assembly point, relative to the spread.
        distance: f64,
    },
}

/// A summary of adjoint solves (for the epoch log).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AdjointStats {
    /// Backward passes that ran a solver (not JFB, not a reused factorisation).
    pub solves: usize,
    /// Solves that missed their tolerance and used their best iterate.
    pub best_iterates: usize,
    /// Solves that missed their tolerance and fell back to JFB.
    pub fell_back: usize,
    /// The largest relative residual of a solve.
    pub max_residual: f64,
}

impl AdjointStats {
    /// Solves that missed their tolerance.
    pub fn missed(&self) -> usize {
        self.best_iterates + self.fell_back
    }

    /// The summary of `self` and `other` together.
    pub fn merge(&self, other: &AdjointStats) -> AdjointStats {
        AdjointStats {
            solves: self.solves + other.solves,
            best_iterates: self.best_iterates + other.best_iterates,
            fell_back: self.fell_back + other.fell_back,
            max_residual: self.max_residual.max(other.max_residual),
        }
    }
}

/// The adjoints of one layer's backward passes: the last one, and the
/// summary since [`AdjointLog::take_stats`].
#[derive(Debug, Default)]
pub struct AdjointLog {
    /// How the adjoint of the last backward pass was obtained.
    pub last: Option<Adjoint>,
    stats: AdjointStats,
    /// Whether a missed tolerance was warned about since the last summary.
    warned: bool,
}

impl AdjointLog {
    /// Records the adjoint of a backward pass of the layer `name` (solved
    /// to tolerance `tol`). The first solve to miss its tolerance since the
    /// last summary is a warning; later ones are counted in the summary.
    pub fn record(&mut self, adjoint: Adjoint, name: &str, tol: f64) {
        self.last = Some(adjoint);
        let report = match adjoint {
            Adjoint::Solved(r) | Adjoint::BestIterate(r) | Adjoint::FellBackToJfb(r) => r,
            Adjoint::JacobianFree | Adjoint::Reused { .. } => return,
        };
        let stats = &mut self.stats;
        stats.solves += 1;
        if report.rel_residual.is_finite() {
            stats.max_residual = stats.max_residual.max(report.rel_residual);
        }
        let what = match adjoint {
            Adjoint::BestIterate(_) => {
                stats.best_iterates += 1;
                "using its best iterate"
            }
            Adjoint::FellBackToJfb(_) => {
                stats.fell_back += 1;
                "it diverged: falling back to the Jacobian-free (JFB) gradient"
            }
            _ => return,
        };
        if !self.warned {
            self.warned = true;
            tracing::warn!(
                layer = name,
                steps = report.steps,
                residual = report.rel_residual,
                tol,
                "the adjoint solve missed its tolerance ({what}): raise --solver-max-steps \
                 (further cases this epoch are counted in the epoch summary)"
            );
        }
    }

    /// The summary since the last call, reset (the next missed tolerance
    /// is warned about again).
    pub fn take_stats(&mut self) -> AdjointStats {
        self.warned = false;
        std::mem::take(&mut self.stats)
    }
}

/// Computes `dL/dW` (m x d) into `out` for upstream gradient `g` (m x d) at the
/// fixed point `c` (k x d). The dense solver reuses `factor`, the forward
/// solve's factorisation, when given. `name` labels the log lines.
#[allow(clippy::too_many_arguments)]
pub fn implicit_backward<T: Real>(
    w: &[T],
    c: &[T],
    g: &[T],
    geo: &Geometry,
    cfg: &BackwardConfig,
    factor: Option<&ForwardFactor>,
    name: &str,
    out: &mut [T],
) -> Adjoint {
    let d = geo.d;
    let (moments, h) = pass::cotangent_reduce(w, c, g, geo);
    let inv_mass = moments.inverse_mass();
    // F(C): C itself at an exact fixed point; the Jacobians are taken at F.
    let mut f = c.to_vec();
    moments.update(c, &mut f, d);
    let jt = |u: &[f64]| pass::adjoint_matvec(w, c, &f, &inv_mass, u, geo);
    let (u, adjoint) = match cfg.method {
        Method::IdkmJfb | Method::Dkm => (h, Adjoint::JacobianFree),
        Method::Idkm
            if matches!(cfg.solver.resolve(h.len()), Solver::Dense) && factor.is_some() =>
        {
            let factor = factor.expect("checked");
            tracing::debug!(
                layer = name,
                distance = factor.distance,
                "adjoint: the forward solve's factorisation"
            );
            (
                factor.factor.adjoint(&h),
                Adjoint::Reused {
                    distance: factor.distance,
                },
            )
        }
        Method::Idkm => {
            let (u, report) = match cfg.solver.resolve(h.len()) {
                Solver::Cg => {
                    symmetrised_cg(&moments.mass, &inv_mass, d, jt, &h, cfg.tol, cfg.max_steps)
                }
                Solver::Dense | Solver::Auto => solve::dense(
                    &binned::adjoint_matrix(w, c, &f, &inv_mass, geo),
                    &h,
                    cfg.tol,
                    1,
                ),
                Solver::Gmres => {
                    let apply = |u: &[f64]| {
                        let jtu = jt(u);
                        u.iter().zip(jtu).map(|(a, b)| a - b).collect()
                    };
                    solve::gmres(apply, &h, cfg.tol, cfg.max_steps, GMRES_RESTART)
                }
                Solver::Neumann => solve::neumann(jt, &h, cfg.tol, cfg.max_steps),
            };
            let (adjoint, use_solution) = fallback(report, cfg.tol, name);
            (if use_solution { u } else { h }, adjoint)
        }
    };
    pass::weight_grad(w, c, &f, g, &inv_mass, &u, geo, out);
    adjoint
}

/// CG on the symmetrised adjoint system `B v = h`, `B v = D v - J^T (D v)`,
/// `u = D v`, with `D = diag(S_j)` from the masses (1 for a dead centroid,
/// whose `inv_mass` is 0 and which decouples), `jt` the matvec `J^T`. B is
/// symmetric when F(C) = C; away from the fixed point (a forward stopped
/// early) it is not quite, and CG needs more steps than k d, or breaks down
/// (then see [`fallback`]). Returns `u` and the solver's report.
pub fn symmetrised_cg(
    mass: &[f64],
    inv_mass: &[f64],
    d: usize,
    jt: impl Fn(&[f64]) -> Vec<f64>,
    h: &[f64],
    tol: f64,
    max_steps: usize,
) -> (Vec<f64>, SolveReport) {
    let scale: Vec<f64> = mass
        .iter()
        .zip(inv_mass)
        .flat_map(|(&s, &inv)| std::iter::repeat_n(if inv > 0.0 { s } else { 1.0 }, d))
        .collect();
    let apply = |v: &[f64]| {
        let dv: Vec<f64> = v.iter().zip(&scale).map(|(v, s)| v * s).collect();
        let jtdv = jt(&dv);
        dv.iter().zip(jtdv).map(|(a, b)| a - b).collect()
    };
    let (v, report) = solve::conjugate_gradient(apply, h, tol, max_steps);
    (v.iter().zip(&scale).map(|(v, s)| v * s).collect(), report)
}

/// The policy after an adjoint solve, shared by the CPU and CUDA backwards:
/// converged gives [`Adjoint::Solved`]; a missed tolerance with a relative
/// residual below 1 (better than `u = 0`) gives [`Adjoint::BestIterate`];
/// otherwise [`Adjoint::FellBackToJfb`]. Logs the outcome for the layer
/// `name` at debug level (a missed tolerance is warned about by the
/// layer's [`AdjointLog`], once per summary). Returns the outcome and
/// whether to use the solver's `u` (`true`) or the JFB adjoint `u = h`.
pub(crate) fn fallback(report: SolveReport, tol: f64, name: &str) -> (Adjoint, bool) {
    if report.converged {
        tracing::debug!(
            layer = name,
            steps = report.steps,
            residual = report.rel_residual,
            "adjoint solved"
        );
        (Adjoint::Solved(report), true)
    } else if report.rel_residual < 1.0 {
        tracing::debug!(
            layer = name,
            steps = report.steps,
            residual = report.rel_residual,
            tol,
            "adjoint solver missed its tolerance: using its best iterate"
        );
        (Adjoint::BestIterate(report), true)
    } else {
        tracing::debug!(
            layer = name,
            steps = report.steps,
            residual = report.rel_residual,
            "adjoint solver diverged: falling back to the Jacobian-free (JFB) gradient"
        );
        (Adjoint::FellBackToJfb(report), false)
    }
}

/// GMRES restart length: the Krylov basis is kept in memory, so it is capped.
pub const GMRES_RESTART: usize = 64;
