// Over 800 lines with its unit tests (about 100): one safeguarded solver on one evaluator trait.
//! The forward solve: Newton's method for the soft k-means fixed point
//! `C* = F(C*)`, safeguarded, on any evaluator of the k-means map.
//!
//! Plain steps `C <- F(C)` contract at the spectral radius of `J = dF/dC`,
//! which is 0.96-0.99 on the weights of trained layers: hundreds to
//! thousands of steps, and a small step says little about the distance to
//! the fixed point. Newton's method converges quadratically near it, from
//! the same passes: one pass gives the moments (hence `F(C)`), one more the
//! matrix of `J`.
//!
//! For the squared distance the fixed points are the stationary points of
//! the free energy `E(C) = -tau sum_i ln sum_j exp(-||w_i - c_j||^2 / tau)`,
//! with gradient `-2 D r` (`D = diag(S_j)`, `r = F(C) - C`) and Hessian
//! `2 (D - M)`, where `M` is the matrix of [`super::streaming::adjoint_matrix`]
//! at `f = c` and unit masses (symmetric). A Newton step solves
//! `(D - M) dC = D r`; where `D - M` is not positive definite (near a
//! saddle, or far from a minimum) the curvature is damped to
//! `D - theta M`, the largest `theta = 1 / (1 + lambda)` that is positive
//! definite (`theta = 0` is the plain step). Steps are accepted by
//! backtracking on the energy (Armijo) or, near convergence, where the
//! energy's rounding hides its decrease, on the residual `||D r||` with no
//! rise of the energy beyond its rounding; a plain step, which never
//! raises the energy, is the last resort. The iteration stops at a point
//! where `D - M` is positive definite (a minimum of E: every eigenvalue of
//! J below 1, a stable fixed point) and the Newton step, which estimates
//! the distance to the fixed point, is below the tolerance, or where the
//! residual is all rounding and no step lowers it any more. At the fixed
//! point `D - M` is also the matrix of the symmetrised adjoint system, so
//! its Cholesky factor serves the backward ([`Factor`]).
//!
//! The Euclidean distance has no such energy: Newton on `F(C) - C` with
//! `(I - J) dC = r` (damped to `I - theta J` where it is singular),
//! accepted on the residual, with plain steps as the last resort.

use super::config::{Distance, DENSE_MAX_UNKNOWNS};
use super::linalg::{self, Cholesky, Lu};
use super::streaming::{Moments, DEAD_MASS};
use crate::error::Result;

/// One evaluation of the k-means map at some centroids.
#[derive(Clone, Debug)]
pub struct Evaluation {
    /// The soft-assignment sums.
    pub moments: Moments,
    /// The free energy, where the evaluator computes it (squared distance).
    pub energy: Option<f64>,
}

/// The k-means map of one layer's weights, as the solver sees it: the
/// passes over the weights (or over bins of them, or on a device).
/// Centroids are k x d values, row-major, in f64.
pub trait KmeansMap {
    /// Rounds the centroids to the values the passes will use.
    fn round(&self, c: &mut [f64]);
    /// One k-means pass at `c`.
    fn evaluate(&mut self, c: &[f64]) -> Result<Evaluation>;
    /// [`Self::evaluate`] where the caller needs no free energy (the chord
    /// steps of [`refine`], which search no line): a map whose energy
    /// costs extra in its pass (a logarithm a row of counted points, a tile
    /// of weights) leaves it out.
    fn evaluate_moments(&mut self, c: &[f64]) -> Result<Evaluation> {
        self.evaluate(c)
    }
    /// The matrix of [`super::streaming::adjoint_matrix`] at `c`, with
    /// `f` and `inv_mass`: `J^T` for `f = F(C)` and the inverse masses, the
    /// curvature `M` for `f = c` and unit masses.
    fn matrix(&mut self, c: &[f64], f: &[f64], inv_mass: &[f64]) -> Result<Vec<f64>>;
    /// [`Self::evaluate`] and, where the map computes both from one
    /// attention per row in one pass, the curvature `M` at `c` (the
    /// [`Self::matrix`] at `f = c` and unit masses; squared distance). A
    /// map that cannot returns no curvature, and the solver assembles the
    /// matrix only where it needs it.
    fn evaluate_with_curvature(&mut self, c: &[f64]) -> Result<(Evaluation, Option<Vec<f64>>)> {
        Ok((self.evaluate(c)?, None))
    }
    /// `matrix(c, f, inv_mass) u` without the matrix: one
    /// [`super::streaming::adjoint_matvec`] pass (for many unknowns).
    fn matvec(&mut self, c: &[f64], f: &[f64], inv_mass: &[f64], u: &[f64]) -> Result<Vec<f64>>;
    /// Passes run so far: over the weights, and over bins of them.
    fn passes(&self) -> (usize, usize);
    /// The relative rounding of the passes' arithmetic (machine epsilon).
    fn epsilon(&self) -> f64;
}

/// Settings of one solve.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    /// Number of centroids.
    pub k: usize,
    /// Dimension of a centroid.
    pub d: usize,
    /// Distance in the logits.
    pub distance: Distance,
    /// Stop when the Newton step is at most this (absolute).
    pub tol: f64,
    /// Scale of the weights (their spread), for the relative figures of the
    /// report and the test of distinct centroids.
    pub spread: f64,
    /// Most iterations.
    pub max_iter: usize,
    /// Whether the report estimates cond(I - J), a dense LU and power
    /// iterations (milliseconds at 256 unknowns): a solve whose result
    /// only starts another one goes without.
    pub condition: bool,
}

/// What a solve did, for the logs and the summaries.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ForwardReport {
    /// Iterations (Newton iterations, or steps of the plain solver).
    pub iterations: usize,
    /// Passes over the weights: k-means passes plus matrix assemblies.
    pub weight_passes: usize,
    /// Passes over bins of the weights (see `binned`), or over groups of
    /// them (the cold start of a large layer, see `forward`).
    pub bin_passes: usize,
    /// `max_j ||F(C)_j - C_j||` at the last evaluation, over the spread.
    pub residual: f64,
    /// The last step (Newton step, or plain step for the plain solver)
    /// over the spread: for Newton, an estimate of the distance to the
    /// fixed point from the point before it.
    pub distance: f64,
    /// Iterations whose curvature was shifted (not positive definite).
    pub damped: usize,
    /// Newton steps shortened by the line search.
    pub backtracks: usize,
    /// Plain steps taken because no Newton step was accepted.
    pub plain_steps: usize,
    /// Whether the stopping test was met (not `max_iter`, not a stop at
    /// the rounding with the last Newton step above the tolerance).
    pub converged: bool,
    /// Whether the solve stopped where the rounding of the passes hides
    /// the residual (see [`STAGNANT_ITERATIONS`]).
    pub at_rounding: bool,
    /// Whether the fixed point is stable: every eigenvalue of J below 1 in
    /// magnitude (for the squared distance, `D - M` positive definite: a
    /// minimum of the energy); `None` where not tested (plain steps).
    pub stable: Option<bool>,
    /// The 2-norm condition number of `I - J` at the last assembly.
    pub cond: Option<f64>,
    /// Centroids farther than [`DISTINCT`] times the spread from every
    /// other one.
    pub distinct: usize,
    /// The temperature of the solve.
    pub tau: f64,
}

/// Two centroids closer than this fraction of the spread count as merged.
pub const DISTINCT: f64 = 1e-3;

/// Full Newton steps that no longer halve once below this many roundings
/// (the map's epsilon) of the spread have reached the rounding of the
/// passes: the solve stops there.
const STALLED: f64 = 10.0;

/// Iterations in a row whose residual, at the rounding of the passes
/// ([`STALLED`] roundings of the spread), is no lower than the lowest so
/// far: the iterate is then a fixed point to the precision of the passes
/// and the solve stops there (converged only if its last Newton step was
/// within the tolerance). Near a degenerate fixed point (a direction of
/// almost no curvature) the Newton steps stay large while no step can lower
/// a residual that is all rounding: 8-bit solves on 600,000 heavy-tailed
/// weights ran their 100 iterations there without it.
const STAGNANT_ITERATIONS: usize = 3;

/// Halvings of a Newton step before a plain step is taken instead.
const MAX_HALVINGS: usize = 4;

/// Levenberg-Marquardt shifts where `D - M` is not positive definite: the
/// least of `FIRST_SHIFT * 4^level` at which the matrix factors.
const FIRST_SHIFT: f64 = 1e-3;

/// The shift of a `level` of [`FIRST_SHIFT`]'s grid (exact: powers of 4
/// only move the exponent).
fn shift_at(level: i32) -> f64 {
    FIRST_SHIFT * 4f64.powi(level)
}

/// A shift beyond this means the matrix was not finite.
const MAX_SHIFT: f64 = 1e12;

/// Armijo's sufficient-decrease fraction.
const ARMIJO: f64 = 1e-4;

/// The rounding of the free energy, in roundings of the passes (the map's
/// epsilon) times its magnitude: a step that raises the energy by more
/// is refused whatever it does to the residual.
const ENERGY_ROUNDING: f64 = 64.0;

/// A centroid may not lose its last weights to a step: a step that leaves
/// a live centroid with less attention mass than this is refused.
const MIN_MASS: f64 = 0.25;

/// A step may not shrink the gap between neighbouring scalar centroids
/// below this fraction of what it was.
const MIN_GAP_RATIO: f64 = 0.05;

/// The first `len` values of `data` and the rest, if it has that many.
fn split(data: &[f64], len: usize) -> Option<(&[f64], &[f64])> {
    (data.len() >= len).then(|| data.split_at(len))
}

/// The factored matrix of the last Newton iteration: solves Newton steps
/// at nearby points and the adjoint system of the backward.
#[derive(Clone, Debug)]
pub enum Factor {
    /// `B = D - M` (n x n; dead centroids' rows identity), Cholesky.
    Symmetric {
        /// The factor of B.
        chol: Cholesky,
        /// The masses of `D`, one per unknown (1 for a dead centroid).
        mass: Vec<f64>,
        /// The unknowns of dead centroids.
        dead: Vec<bool>,
    },
    /// `I - J` (dead centroids' rows identity), LU.
    General {
        /// The factors.
        lu: Lu,
        /// The unknowns of dead centroids.
        dead: Vec<bool>,
    },
}

/// The encodings of a [`Factor`] (its first number).
mod kind {
    /// A Cholesky factor as a dense n x n matrix (as checkpoints of earlier
    /// versions hold it; read, not written).
    pub const SYMMETRIC_DENSE: f64 = 0.0;
    /// LU factors and their permutation.
    pub const GENERAL: f64 = 1.0;
    /// A Cholesky factor by its envelope: each row's first column, then
    /// the rows' entries.
    pub const SYMMETRIC_ENVELOPE: f64 = 2.0;
}

/// `x` as a count or an index, if it is a whole number in range.
fn whole(x: f64) -> Option<usize> {
    (x >= 0.0 && x.fract() == 0.0 && x < u32::MAX as f64).then_some(x as usize)
}

impl Factor {
    /// Appends the factor to `out` as numbers (exactly: integers and flags
    /// as f64), for a checkpoint; [`Self::decode`] reads it back.
    pub fn encode(&self, out: &mut Vec<f64>) {
        let flags = |v: &[bool]| {
            v.iter()
                .map(|&b| f64::from(u8::from(b)))
                .collect::<Vec<_>>()
        };
        match self {
            Factor::Symmetric { chol, mass, dead } => {
                let (first, l) = chol.envelope();
                out.extend([kind::SYMMETRIC_ENVELOPE, mass.len() as f64]);
                out.extend(first.iter().map(|&j| j as f64));
                out.extend_from_slice(l);
                out.extend_from_slice(mass);
                out.extend(flags(dead));
            }
            Factor::General { lu, dead } => {
                let (n, factors, perm) = lu.parts();
                out.extend([kind::GENERAL, n as f64]);
                out.extend_from_slice(factors);
                out.extend(perm.iter().map(|&p| p as f64));
                out.extend(flags(dead));
            }
        }
    }

    /// Reads a factor that [`Self::encode`] (or an earlier version, with a
    /// dense Cholesky factor) wrote at the front of `data`, and the rest of
    /// `data`; `None` when it is not one.
    pub fn decode(data: &[f64]) -> Option<(Self, &[f64])> {
        let (&encoding, rest) = data.split_first()?;
        let (&n, rest) = rest.split_first()?;
        let n = whole(n)?;
        let flags = |x: &[f64]| x.iter().map(|&x| x != 0.0).collect();
        let (factor, rest) = if encoding == kind::GENERAL {
            let (matrix, rest) = split(rest, n.checked_mul(n)?)?;
            let (perm, rest) = split(rest, n)?;
            let (dead, rest) = split(rest, n)?;
            let perm = perm.iter().map(|&p| whole(p)).collect::<Option<_>>()?;
            let lu = Lu::from_parts(n, matrix.to_vec(), perm)?;
            let dead = flags(dead);
            (Factor::General { lu, dead }, rest)
        } else {
            let (chol, rest) = if encoding == kind::SYMMETRIC_ENVELOPE {
                let (first, rest) = split(rest, n)?;
                let first = first.iter().map(|&j| whole(j)).collect::<Option<_>>()?;
                Cholesky::from_envelope(n, first, rest)?
            } else if encoding == kind::SYMMETRIC_DENSE {
                let (matrix, rest) = split(rest, n.checked_mul(n)?)?;
                (Cholesky::from_dense(n, matrix)?, rest)
            } else {
                return None;
            };
            let (mass, rest) = split(rest, n)?;
            let (dead, rest) = split(rest, n)?;
            let (mass, dead) = (mass.to_vec(), flags(dead));
            (Factor::Symmetric { chol, mass, dead }, rest)
        };
        Some((factor, rest))
    }

    /// The Newton step for the residual `r` with the masses `mass` (one per
    /// unknown) of the point where `r` was evaluated.
    fn step(&self, r: &[f64], mass: &[f64]) -> Vec<f64> {
        match self {
            Factor::Symmetric { chol, dead, .. } => {
                let rhs: Vec<f64> = r
                    .iter()
                    .zip(mass)
                    .zip(dead)
                    .map(|((r, s), &x)| if x { 0.0 } else { r * s })
                    .collect();
                chol.solve(&rhs)
            }
            Factor::General { lu, dead } => {
                let rhs: Vec<f64> = r
                    .iter()
                    .zip(dead)
                    .map(|(&r, &x)| if x { 0.0 } else { r })
                    .collect();
                lu.solve(&rhs)
            }
        }
    }

    /// The adjoint `u` of `(I - J)^T u = h` with this matrix: for the
    /// symmetric form, `B v = h` and `u = D v`; a dead centroid's `u` is its `h`.
    pub fn adjoint(&self, h: &[f64]) -> Vec<f64> {
        match self {
            Factor::Symmetric { chol, mass, .. } => {
                chol.solve(h).iter().zip(mass).map(|(v, s)| v * s).collect()
            }
            Factor::General { lu, .. } => lu.solve_transposed(h),
        }
    }
}

/// A solve's outcome: the centroids, the report, and the factor of the
/// last iteration (`None` when the last iteration's matrix was shifted,
/// when no iteration ran, or for the plain solver).
pub struct Solution {
    /// The centroids (k x d, rounded by the map).
    pub c: Vec<f64>,
    /// What the solve did.
    pub report: ForwardReport,
    /// The factored matrix of the last iteration.
    pub factor: Option<Factor>,
    /// The centroids the factor was assembled at.
    pub factor_at: Vec<f64>,
}

/// The iterate and what is known at it.
struct Point {
    c: Vec<f64>,
    eval: Evaluation,
    /// `F(C) - C` (0 for dead centroids).
    r: Vec<f64>,
    /// Masses per unknown (1 for dead centroids).
    mass: Vec<f64>,
    /// `||D r||`.
    merit: f64,
    /// The curvature `M` at `c`, where the evaluation computed it.
    curvature: Option<Vec<f64>>,
}

impl Point {
    fn new(c: Vec<f64>, eval: Evaluation, dead: &[bool], d: usize) -> Self {
        let mut f = c.clone();
        eval.moments.update(&c, &mut f, d);
        let r: Vec<f64> = f
            .iter()
            .zip(&c)
            .zip(dead)
            .map(|((f, c), &x)| if x { 0.0 } else { f - c })
            .collect();
        let mass: Vec<f64> = eval
            .moments
            .mass
            .iter()
            .flat_map(|&s| std::iter::repeat_n(if s > DEAD_MASS { s } else { 1.0 }, d))
            .collect();
        let merit = linalg::norm(&r.iter().zip(&mass).map(|(r, s)| r * s).collect::<Vec<_>>());
        Self {
            c,
            eval,
            r,
            mass,
            merit,
            curvature: None,
        }
    }

    fn f(&self) -> Vec<f64> {
        self.c.iter().zip(&self.r).map(|(c, r)| c + r).collect()
    }
}

/// The largest Euclidean norm of a centroid's part of `x` (k x d).
fn max_norm(x: &[f64], d: usize) -> f64 {
    x.chunks_exact(d).map(linalg::norm).fold(0.0, f64::max)
}

/// The number of centroids (k x d) not within `threshold` of another.
pub fn distinct(c: &[f64], d: usize, threshold: f64) -> usize {
    let rows: Vec<&[f64]> = c.chunks_exact(d).collect();
    let merged = (1..rows.len())
        .filter(|&j| {
            rows[..j].iter().any(|other| {
                linalg::norm(
                    &other
                        .iter()
                        .zip(rows[j])
                        .map(|(a, b)| a - b)
                        .collect::<Vec<_>>(),
                ) <= threshold
            })
        })
        .count();
    rows.len() - merged
}

/// The solver's state across iterations.
struct Solver<'m, M> {
    map: &'m mut M,
    s: Settings,
    /// Per coordinate, the range of the weights (centroids must stay in it).
    bounds: Vec<(f64, f64)>,
    /// Unknowns of centroids that were dead at the start (kept fixed).
    dead: Vec<bool>,
    /// The level of the last shift (see [`shift_at`]), where the search
    /// for the next starts.
    shift_level: i32,
    report: ForwardReport,
}

impl<M: KmeansMap> Solver<'_, M> {
    fn evaluate(&mut self, c: Vec<f64>) -> Result<Point> {
        let eval = self.map.evaluate(&c)?;
        Ok(Point::new(c, eval, &self.dead, self.s.d))
    }

    /// [`Self::evaluate`], with the curvature at `c` when `curvature` is
    /// set and the distance is squared (the next Newton matrix, from the
    /// same pass where the map can).
    fn evaluate_for_newton(&mut self, c: Vec<f64>, curvature: bool) -> Result<Point> {
        if !curvature || self.s.distance != Distance::Squared {
            return self.evaluate(c);
        }
        let (eval, m) = self.map.evaluate_with_curvature(&c)?;
        let mut p = Point::new(c, eval, &self.dead, self.s.d);
        p.curvature = m;
        Ok(p)
    }

    /// The shifted matrix and its factor at `p`, the shift and the unshifted
    /// matrix; no factor for the Euclidean distance where the spectral
    /// radius of J is at least 1 (an unstable region, which plain steps
    /// leave and Newton steps could converge into).
    fn factor(&mut self, p: &Point) -> Result<(Option<Factor>, f64, Vec<f64>)> {
        let n = p.c.len();
        let (raw, symmetric) = match self.s.distance {
            Distance::Squared => match &p.curvature {
                Some(m) => (m.clone(), true),
                None => (self.map.matrix(&p.c, &p.c, &vec![1.0; self.s.k])?, true),
            },
            Distance::Euclidean => {
                let inv_mass = p.eval.moments.inverse_mass();
                (self.map.matrix(&p.c, &p.f(), &inv_mass)?, false)
            }
        };
        let a = newton_matrix(&raw, &p.mass, &self.dead, symmetric);
        if !symmetric {
            let j: Vec<f64> = a
                .iter()
                .enumerate()
                .map(|(i, &x)| f64::from(u8::from(i / n == i % n)) - x)
                .collect();
            if linalg::spectral_radius(&j, n) >= 1.0 {
                return Ok((None, f64::INFINITY, a));
            }
        }
        if let Some(factor) = self.factor_shifted(&a, p, symmetric, 0.0) {
            return Ok((Some(factor), 0.0, a));
        }
        // The least shift of the grid that factors, searched from the last
        // iteration's: it moves a level or two between iterations, where a
        // search from the bottom took five to nine factorisations.
        let mut level = self.shift_level;
        let mut found = None;
        while found.is_none() {
            let shift = shift_at(level);
            if shift > MAX_SHIFT {
                // Not reachable for a matrix with finite entries; a NaN would end here.
                return Err(crate::error::Error::Numerical(
                    "k-means Newton solve: the curvature matrix is not finite".into(),
                ));
            }
            match self.factor_shifted(&a, p, symmetric, shift) {
                Some(factor) => found = Some(factor),
                None => level += 1,
            }
        }
        if level == self.shift_level {
            while level > 0 {
                match self.factor_shifted(&a, p, symmetric, shift_at(level - 1)) {
                    Some(factor) => {
                        found = Some(factor);
                        level -= 1;
                    }
                    None => break,
                }
            }
        }
        self.shift_level = level;
        Ok((found, shift_at(level), a))
    }

    /// The factor of the unshifted matrix `a` at `p` plus `shift` times
    /// the masses (or the identity) on the live unknowns' diagonal, if it
    /// factors.
    fn factor_shifted(&self, a: &[f64], p: &Point, symmetric: bool, shift: f64) -> Option<Factor> {
        let n = p.c.len();
        let diagonal: Vec<f64> = if shift == 0.0 {
            Vec::new()
        } else {
            (0..n)
                .map(|i| match (self.dead[i], symmetric) {
                    (true, _) => 0.0,
                    (false, true) => shift * p.mass[i],
                    (false, false) => shift,
                })
                .collect()
        };
        if symmetric {
            Cholesky::shifted(a, n, &diagonal).map(|chol| Factor::Symmetric {
                chol,
                mass: p.mass.clone(),
                dead: self.dead.clone(),
            })
        } else {
            let mut shifted = a.to_vec();
            for (i, x) in diagonal.iter().enumerate() {
                shifted[i * n + i] += x;
            }
            Lu::new(&shifted, n).map(|lu| Factor::General {
                lu,
                dead: self.dead.clone(),
            })
        }
    }

    /// Whether `c` may be tried: finite, in the weights' range, and (d = 1)
    /// in the same order as `from` with no gap shrunk below
    /// [`MIN_GAP_RATIO`] of what it was.
    fn admissible(&self, c: &[f64], from: &[f64]) -> bool {
        let d = self.s.d;
        let in_range = c.iter().enumerate().all(|(i, &x)| {
            let (lo, hi) = self.bounds[i % d];
            x.is_finite() && x >= lo && x <= hi
        });
        in_range
            && (d != 1
                || c.windows(2).zip(from.windows(2)).all(|(new, old)| {
                    let (gap, was) = (new[1] - new[0], old[1] - old[0]);
                    if was > 0.0 {
                        gap >= MIN_GAP_RATIO * was
                    } else {
                        gap >= 0.0
                    }
                }))
    }

    /// Whether `next` keeps every live centroid of `p` alive.
    fn keeps_mass(&self, p: &Point, next: &Point) -> bool {
        p.eval
            .moments
            .mass
            .iter()
            .zip(&next.eval.moments.mass)
            .all(|(&was, &now)| was < MIN_MASS || now >= MIN_MASS)
    }

    /// Whether `next` is an acceptable result of the step `delta` (scaled
    /// by `alpha`) from `p`.
    fn accepts(&self, p: &Point, next: &Point, delta: &[f64], alpha: f64, unshifted: bool) -> bool {
        if !self.keeps_mass(p, next) || !next.merit.is_finite() {
            return false;
        }
        let energy = match (p.eval.energy, next.eval.energy, self.s.distance) {
            (Some(e0), Some(e1), Distance::Squared) => Some((e0, e1)),
            _ => None,
        };
        match energy {
            Some((e0, e1)) => {
                // dE/dalpha = -2 (D r) . delta.
                let slope = -2.0
                    * p.r
                        .iter()
                        .zip(&p.mass)
                        .zip(delta)
                        .map(|((r, s), d)| r * s * d)
                        .sum::<f64>();
                // Near convergence the energy's rounding hides its decrease:
                // there a smaller residual is accepted, but never a rise of
                // the energy beyond its rounding (a step out of the basin).
                let rounding = ENERGY_ROUNDING * self.map.epsilon() * e0.abs();
                e1 <= e0 + ARMIJO * alpha * slope
                    || (unshifted && next.merit < p.merit && e1 <= e0 + rounding)
            }
            None => next.merit < (1.0 - ARMIJO * alpha) * p.merit,
        }
    }

    fn finish(&mut self, p: &Point, factor: Option<(&Factor, &[f64])>) {
        (self.report.weight_passes, self.report.bin_passes) = self.map.passes();
        let spread = self.s.spread.max(f64::MIN_POSITIVE);
        self.report.residual = max_norm(&p.r, self.s.d) / spread;
        self.report.distinct = distinct(&p.c, self.s.d, DISTINCT * spread);
        if let Some((factor, a)) = factor.filter(|_| self.s.condition) {
            let n = p.c.len();
            // I - J from the unshifted matrix: D^-1 B for the symmetric form.
            let i_minus_j: Vec<f64> = match factor {
                Factor::Symmetric { mass, .. } => a
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| x / mass[i / n])
                    .collect(),
                Factor::General { .. } => a.to_vec(),
            };
            self.report.cond = Lu::new(&i_minus_j, n).map(|lu| linalg::condition(&i_minus_j, &lu));
        }
    }
}

/// Side of the square tiles in which [`newton_matrix`] reads the map's
/// matrix and its transpose, so that both stay in the first-level cache.
const TILE: usize = 16;

/// The unshifted matrix of a Newton step from the map's matrix `raw`
/// (n x n, row-major): `B = D - (M + M^T) / 2` with `D = diag(mass)` where
/// `symmetric`, else `I - J` (`raw` holds `J^T`). The rows and columns of
/// `dead` unknowns are the identity's.
fn newton_matrix(raw: &[f64], mass: &[f64], dead: &[bool], symmetric: bool) -> Vec<f64> {
    let n = dead.len();
    let mut a = vec![0.0; n * n];
    for top in (0..n).step_by(TILE) {
        for left in (0..n).step_by(TILE) {
            for i in top..(top + TILE).min(n) {
                for j in left..(left + TILE).min(n) {
                    a[i * n + j] = if symmetric {
                        -0.5 * (raw[i * n + j] + raw[j * n + i])
                    } else {
                        -raw[j * n + i]
                    };
                }
            }
        }
    }
    for i in 0..n {
        a[i * n + i] += if symmetric { mass[i] } else { 1.0 };
    }
    for i in (0..n).filter(|&i| dead[i]) {
        for j in 0..n {
            a[i * n + j] = 0.0;
            a[j * n + i] = 0.0;
        }
        a[i * n + i] = 1.0;
    }
    a
}

/// A factored matrix and the point it was assembled at.
struct Assembled {
    factor: Factor,
    /// The centroids it was assembled at; `None` for the factor of another
    /// solve (other weights).
    at: Option<Vec<f64>>,
    /// Its shift (0: the matrix itself).
    shift: f64,
    /// The unshifted matrix, when assembled in this solve.
    matrix: Option<Vec<f64>>,
}

/// A chord step (with a matrix assembled elsewhere) is taken only while the
/// steps shrink at least this fast; otherwise the matrix is assembled anew.
const CHORD_RATE: f64 = 0.25;

/// Newton's method from `c0` (k x d) on `map`: see the module docs.
/// `bounds` is the range of the weights per coordinate. `warm`, the factor
/// of a previous solve at `c0` (for other weights), serves as the first
/// matrix: chord steps `B0 dC = D r` cost one k-means pass each and are
/// taken while they shrink by [`CHORD_RATE`] or faster. With `settle`, the
/// matrix is assembled at the fixed point unless the last one was assembled
/// within the tolerance of it, so that the factor returned is that of the
/// fixed point (for the backward) and the report's stability and condition
/// are the fixed point's.
pub fn solve<M: KmeansMap>(
    map: &mut M,
    c0: &[f64],
    bounds: Vec<(f64, f64)>,
    settings: Settings,
    warm: Option<&Factor>,
    settle: bool,
) -> Result<Solution> {
    let (n, d) = (settings.k * settings.d, settings.d);
    let spread = settings.spread.max(f64::MIN_POSITIVE);
    let mut solver = Solver {
        map,
        s: settings,
        bounds,
        dead: vec![false; n],
        shift_level: 0,
        report: ForwardReport::default(),
    };
    let mut c = c0.to_vec();
    solver.map.round(&mut c);
    let warm_dead = |f: &Factor| match f {
        Factor::Symmetric { dead, .. } | Factor::General { dead, .. } => dead.len() == n,
    };
    let warm = warm.filter(|f| warm_dead(f));
    // A cold dense solve needs the matrix at the start at once.
    let mut p = solver.evaluate_for_newton(c, warm.is_none() && n <= DENSE_MAX_UNKNOWNS)?;
    solver.dead = p
        .eval
        .moments
        .mass
        .iter()
        .flat_map(|&s| std::iter::repeat_n(s <= DEAD_MASS, d))
        .collect();
    let curvature = p.curvature.take();
    p = Point::new(p.c, p.eval, &solver.dead, d);
    p.curvature = curvature;
    if n > DENSE_MAX_UNKNOWNS {
        return solve_krylov(solver, p);
    }
    let mut current: Option<Assembled> = warm.map(|factor| Assembled {
        factor: factor.clone(),
        at: None,
        shift: 0.0,
        matrix: None,
    });
    let mut previous_step = f64::INFINITY;
    let mut chord_failed = false;
    let (mut lowest, mut stagnant) = (f64::INFINITY, 0);
    while solver.report.iterations < settings.max_iter {
        let residual = max_norm(&p.r, d);
        // Where the last matrix had to be shifted the point is near a
        // saddle: there the residual rises while the steps leave it along
        // the direction of negative curvature, which is no sign of rounding.
        let saddle = current.as_ref().is_some_and(|cur| cur.shift > 0.0);
        stagnant =
            if !saddle && residual >= lowest && residual <= STALLED * solver.map.epsilon() * spread
            {
                stagnant + 1
            } else {
                0
            };
        lowest = lowest.min(residual);
        if stagnant >= STAGNANT_ITERATIONS {
            // Converged if the last Newton step was within the tolerance;
            // else the distance to the fixed point stays unknown below it.
            solver.report.converged = solver.report.distance * spread <= settings.tol;
            solver.report.at_rounding = true;
            break;
        }
        solver.report.iterations += 1;
        // The current matrix, if it was assembled here or its chord step
        // still contracts; else a new one.
        let first_warm = warm.is_some() && solver.report.iterations == 1;
        let chord_step = current
            .as_ref()
            .filter(|cur| cur.at.as_ref() != Some(&p.c) && cur.shift == 0.0 && !chord_failed)
            .map(|cur| cur.factor.step(&p.r, &p.mass));
        // A chord step only where no matrix at p is at hand.
        let keep = p.curvature.is_none()
            && chord_step.as_ref().is_some_and(|step| {
                first_warm
                    || (previous_step.is_finite()
                        && max_norm(step, d) <= CHORD_RATE * previous_step)
            });
        if !keep
            && current
                .as_ref()
                .is_none_or(|cur| cur.at.as_ref() != Some(&p.c))
        {
            chord_failed = false;
            let (factor, shift, matrix) = solver.factor(&p)?;
            let Some(factor) = factor else {
                // Euclidean distance, unstable region: a plain step.
                solver.report.plain_steps += 1;
                solver.report.stable = Some(false);
                previous_step = f64::INFINITY;
                current = None;
                let mut f = p.f();
                solver.map.round(&mut f);
                p = solver.evaluate(f)?;
                continue;
            };
            current = Some(Assembled {
                factor,
                at: Some(p.c.clone()),
                shift,
                matrix: Some(matrix),
            });
        }
        let cur = current.as_ref().expect("a matrix");
        let fresh = cur.at.as_ref() == Some(&p.c);
        // A shifted matrix `(1 + lambda) D - M` is `(1 + lambda)` times
        // `D - theta M` with `theta = 1 / (1 + lambda)`: the step of the
        // curvature damped towards the plain step's (`theta = 0`), at its
        // full length rather than shortened `(1 + lambda)` times.
        let delta: Vec<f64> = cur
            .factor
            .step(&p.r, &p.mass)
            .into_iter()
            .map(|x| x * (1.0 + cur.shift))
            .collect();
        let size = max_norm(&delta, d);
        let unshifted = cur.shift == 0.0;
        tracing::trace!(
            iteration = solver.report.iterations,
            step = size / spread,
            residual = max_norm(&p.r, d) / spread,
            shift = cur.shift,
            fresh,
            energy = p.eval.energy,
            "newton"
        );
        if fresh {
            solver.report.stable = Some(unshifted);
            solver.report.damped += usize::from(!unshifted);
        }
        // Converged: each centroid's step (an estimate of its distance to
        // the fixed point) is within the tolerance or within two roundings
        // of the centroid, or full steps stopped shrinking where rounding
        // limits them.
        let eps = solver.map.epsilon();
        let within = delta
            .chunks_exact(d)
            .zip(p.c.chunks_exact(d))
            .all(|(step, c)| linalg::norm(step) <= settings.tol.max(2.0 * eps * linalg::norm(c)));
        let stalled = size > 0.5 * previous_step && size <= STALLED * eps * spread;
        solver.report.distance = size / spread;
        if unshifted && (within || stalled) {
            let mut c: Vec<f64> = p.c.iter().zip(&delta).map(|(c, x)| c + x).collect();
            solver.map.round(&mut c);
            if !solver.admissible(&c, &p.c) {
                c.clone_from(&p.c);
            }
            solver.report.converged = true;
            let cur = current.take().expect("a matrix");
            let far = match &cur.at {
                Some(at) => {
                    max_norm(
                        &at.iter().zip(&c).map(|(a, b)| a - b).collect::<Vec<_>>(),
                        d,
                    ) > settings.tol
                }
                None => true,
            };
            if settle && far {
                // The matrix of the fixed point, for the backward and the report.
                let q = solver.evaluate_for_newton(c, true)?;
                let (factor, shift, matrix) = solver.factor(&q)?;
                let stable = factor.is_some() && shift == 0.0;
                solver.report.stable = Some(stable);
                solver.finish(&q, factor.as_ref().map(|f| (f, matrix.as_slice())));
                let factor = factor.filter(|_| stable);
                return Ok(Solution {
                    factor_at: q.c.clone(),
                    c: q.c,
                    report: solver.report,
                    factor,
                });
            }
            solver.finish(&p, cur.matrix.as_deref().map(|m| (&cur.factor, m)));
            let factor_at = cur.at.unwrap_or_default();
            let factor = Some(cur.factor).filter(|_| !factor_at.is_empty());
            return Ok(Solution {
                c,
                report: solver.report,
                factor,
                factor_at,
            });
        }
        previous_step = if unshifted { size } else { f64::INFINITY };
        // Line search: full step, then halvings; then a plain step. A
        // chord step is tried at full length only: where it fails, the
        // matrix it stood in for is off, and the matrix at p is assembled
        // instead of halving a poor step (at 8 bits the first chord step of
        // a warm start failed in 13 of 20 layers of a ResNet18 step, each
        // failure costing five passes with halvings). Once Newton steps use
        // matrices assembled at their points, each trial point computes its
        // own (needed if it is accepted) in the pass that evaluates it;
        // but a small full step where no factor of the fixed point is
        // wanted is likely the last, and its point is evaluated without:
        // there the chord step estimates the distance to the fixed point
        // (a matrix pass follows only if that step does not contract).
        let likely_last = !settle && unshifted && size <= (settings.tol * spread).sqrt();
        let mut next = None;
        let mut alpha = 1.0;
        let halvings = if fresh { MAX_HALVINGS } else { 0 };
        for halving in 0..=halvings {
            let mut trial: Vec<f64> = p.c.iter().zip(&delta).map(|(c, x)| c + alpha * x).collect();
            solver.map.round(&mut trial);
            if solver.admissible(&trial, &p.c) {
                let curvature = fresh && !(likely_last && halving == 0);
                let q = solver.evaluate_for_newton(trial, curvature)?;
                if solver.accepts(&p, &q, &delta, alpha, unshifted) {
                    if halving > 0 {
                        solver.report.backtracks += 1;
                        previous_step = f64::INFINITY;
                    }
                    next = Some(q);
                    break;
                }
            }
            alpha *= 0.5;
        }
        p = match next {
            Some(q) => q,
            None if !fresh => {
                chord_failed = true;
                previous_step = f64::INFINITY;
                continue;
            }
            None => {
                solver.report.plain_steps += 1;
                previous_step = f64::INFINITY;
                let mut f = p.f();
                solver.map.round(&mut f);
                solver.evaluate_for_newton(f, true)?
            }
        };
    }
    let stable = solver.report.stable != Some(false);
    solver.finish(
        &p,
        current
            .as_ref()
            .and_then(|cur| cur.matrix.as_deref().map(|m| (&cur.factor, m))),
    );
    let (factor, factor_at) = match current {
        Some(Assembled {
            factor,
            at: Some(at),
            ..
        }) if stable => (Some(factor), at),
        _ => (None, Vec::new()),
    };
    Ok(Solution {
        c: p.c,
        report: solver.report,
        factor,
        factor_at,
    })
}

/// Most conjugate-gradient steps (passes) of one Newton step in
/// [`solve_krylov`].
const KRYLOV_STEPS: usize = 50;

/// Newton's method for more than [`DENSE_MAX_UNKNOWNS`] unknowns, where
/// the matrix is not assembled: each Newton step solves `(D - M) dC = D r`
/// by conjugate gradient on matrix-vector products (one pass each), to a
/// relative residual of `min(0.1, sqrt(||D r|| / ||D r0||))` (inexact
/// Newton), stopped at negative curvature (then the steepest-descent
/// direction `r`, a plain step, is taken). The same line search and
/// stopping rule as [`solve`]; no factor is left (the backward solves by
/// GMRES there). The Euclidean distance takes plain steps.
fn solve_krylov<M: KmeansMap>(mut solver: Solver<'_, M>, mut p: Point) -> Result<Solution> {
    let s = solver.s;
    let (n, d) = (s.k * s.d, s.d);
    let spread = s.spread.max(f64::MIN_POSITIVE);
    let first = p.merit.max(f64::MIN_POSITIVE);
    let ones = vec![1.0; s.k];
    while solver.report.iterations < s.max_iter {
        solver.report.iterations += 1;
        let rhs: Vec<f64> = p.r.iter().zip(&p.mass).map(|(r, m)| r * m).collect();
        let (delta, curved) = if s.distance == Distance::Squared {
            // CG on (D - M + lambda D) dC = D r, lambda raised from 0 (as the
            // dense solve's shift) while CG meets non-positive curvature.
            let forcing = (p.merit / first).sqrt().min(0.1);
            let mut shift = 0.0;
            loop {
                let mut failure = None;
                let mut apply = |x: &[f64]| -> Vec<f64> {
                    let mx = solver.map.matvec(&p.c, &p.c, &ones, x).unwrap_or_else(|e| {
                        failure = Some(e);
                        vec![f64::NAN; n]
                    });
                    x.iter()
                        .zip(&p.mass)
                        .zip(mx)
                        .zip(&solver.dead)
                        .map(
                            |(((x, m), mx), &dead)| {
                                if dead {
                                    *x
                                } else {
                                    (1.0 + shift) * m * x - mx
                                }
                            },
                        )
                        .collect()
                };
                let (x, report) = super::solve::conjugate_gradient(
                    &mut apply,
                    &rhs,
                    forcing,
                    KRYLOV_STEPS.min(n),
                );
                if let Some(e) = failure {
                    return Err(e);
                }
                if report.converged || report.steps >= KRYLOV_STEPS.min(n) {
                    if shift > 0.0 {
                        solver.report.damped += 1;
                    }
                    break (x, shift == 0.0);
                }
                shift = if shift == 0.0 {
                    FIRST_SHIFT
                } else {
                    shift * 4.0
                };
                if shift > 1e3 {
                    break (p.r.clone(), false);
                }
            }
        } else {
            (p.r.clone(), false)
        };
        solver.report.stable = Some(curved);
        let size = max_norm(&delta, d);
        solver.report.distance = size / spread;
        let eps = solver.map.epsilon();
        let within = delta
            .chunks_exact(d)
            .zip(p.c.chunks_exact(d))
            .all(|(step, c)| linalg::norm(step) <= s.tol.max(2.0 * eps * linalg::norm(c)));
        if curved && within {
            let mut c: Vec<f64> = p.c.iter().zip(&delta).map(|(c, x)| c + x).collect();
            solver.map.round(&mut c);
            solver.report.converged = true;
            solver.finish(&p, None);
            return Ok(Solution {
                c,
                report: solver.report,
                factor: None,
                factor_at: Vec::new(),
            });
        }
        let mut next = None;
        let mut alpha = 1.0;
        for _ in 0..=MAX_HALVINGS {
            let mut trial: Vec<f64> = p.c.iter().zip(&delta).map(|(c, x)| c + alpha * x).collect();
            solver.map.round(&mut trial);
            if solver.admissible(&trial, &p.c) {
                let q = solver.evaluate(trial)?;
                if solver.accepts(&p, &q, &delta, alpha, curved) {
                    next = Some(q);
                    break;
                }
            }
            alpha *= 0.5;
            solver.report.backtracks += 1;
        }
        p = match next {
            Some(q) => q,
            None => {
                solver.report.plain_steps += 1;
                let mut f = p.f();
                solver.map.round(&mut f);
                solver.evaluate(f)?
            }
        };
    }
    solver.finish(&p, None);
    Ok(Solution {
        c: p.c,
        report: solver.report,
        factor: None,
        factor_at: Vec::new(),
    })
}

/// Corrects `solution`, found on an approximation of the map (bins), on
/// the exact `map` (the weights): chord steps with the approximation's
/// factor from one exact pass each, until the step is at most `tol` or
/// `steps` passes were spent. The report's residual and distance become
/// the exact pass's.
pub fn refine<M: KmeansMap>(
    map: &mut M,
    solution: &mut Solution,
    settings: Settings,
    steps: usize,
) -> Result<()> {
    let Some(factor) = &solution.factor else {
        return Ok(());
    };
    let d = settings.d;
    let spread = settings.spread.max(f64::MIN_POSITIVE);
    let dead: Vec<bool> = match factor {
        Factor::Symmetric { dead, .. } | Factor::General { dead, .. } => dead.clone(),
    };
    let mut passes = map.passes();
    for _ in 0..steps {
        let eval = map.evaluate_moments(&solution.c)?;
        let (weights, bins) = map.passes();
        (solution.report.weight_passes, solution.report.bin_passes) = (
            solution.report.weight_passes + weights - passes.0,
            solution.report.bin_passes + bins - passes.1,
        );
        passes = (weights, bins);
        let p = Point::new(solution.c.clone(), eval, &dead, d);
        let delta = factor.step(&p.r, &p.mass);
        let size = max_norm(&delta, d);
        solution.report.residual = max_norm(&p.r, d) / spread;
        solution.report.distance = size / spread;
        let eps = map.epsilon();
        let within = delta
            .chunks_exact(d)
            .zip(p.c.chunks_exact(d))
            .all(|(step, c)| linalg::norm(step) <= settings.tol.max(2.0 * eps * linalg::norm(c)));
        let mut c: Vec<f64> = p.c.iter().zip(&delta).map(|(c, x)| c + x).collect();
        map.round(&mut c);
        solution.c = c;
        if within {
            return Ok(());
        }
    }
    solution.report.converged = false;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::streaming::{self as pass, Geometry};

    /// A factor reads back as written, in the envelope encoding and in
    /// the dense one of earlier checkpoints; malformed numbers are refused.
    #[test]
    fn factors_decode_as_encoded() {
        let n = 6;
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            a[i * n + i] = 3.0 + i as f64;
            if i > 0 {
                a[i * n + i - 1] = -1.0;
                a[(i - 1) * n + i] = -1.0;
            }
        }
        let chol = Cholesky::new(&a, n).unwrap();
        let mass: Vec<f64> = (0..n).map(|i| 1.0 + i as f64).collect();
        let dead = vec![false, false, true, false, false, false];
        let factor = Factor::Symmetric {
            chol: chol.clone(),
            mass: mass.clone(),
            dead: dead.clone(),
        };
        let mut data = Vec::new();
        factor.encode(&mut data);
        // Six rows of a tridiagonal factor: 1 + 2 * 5 entries, not 36.
        assert_eq!(data.len(), 2 + n + 11 + 2 * n);
        data.push(9.0);
        let (read, rest) = Factor::decode(&data).unwrap();
        assert_eq!(rest, &[9.0]);
        let mut again = Vec::new();
        read.encode(&mut again);
        assert_eq!(again, data[..data.len() - 1]);
        let h = [1.0, -2.0, 0.5, 0.0, 3.0, 1.5];
        assert_eq!(read.adjoint(&h), factor.adjoint(&h));

        let mut dense = vec![kind::SYMMETRIC_DENSE, n as f64];
        dense.extend(chol.dense());
        dense.extend(&mass);
        dense.extend(dead.iter().map(|&x| f64::from(u8::from(x))));
        let (read, rest) = Factor::decode(&dense).unwrap();
        assert!(rest.is_empty());
        assert_eq!(read.adjoint(&h), factor.adjoint(&h));

        for bad_n in [f64::NAN, -1.0, 2.5, 1e30] {
            let mut bad = data.clone();
            bad[1] = bad_n;
            assert!(Factor::decode(&bad).is_none(), "n = {bad_n}");
        }
        let mut bad = data.clone();
        bad[2 + 3] = 4.0; // row 3 starting beyond its diagonal
        assert!(Factor::decode(&bad).is_none());
        assert!(Factor::decode(&data[..data.len() - 2]).is_none());
    }

    /// The map on f64 weights through the streaming passes. With `noise`,
    /// the passes round: each centroid's next value is off by up to
    /// `noise` (a hash of the centroids), and `epsilon` says so.
    struct Plain<'a> {
        w: &'a [f64],
        geo: Geometry,
        noise: f64,
    }

    impl KmeansMap for Plain<'_> {
        fn round(&self, _: &mut [f64]) {}
        fn evaluate(&mut self, c: &[f64]) -> Result<Evaluation> {
            let (mut moments, energy) = pass::counted_reduce_energy(self.w, &[], c, &self.geo);
            let hash = c.iter().fold(0u64, |h, x| {
                (h ^ x.to_bits()).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            });
            for (j, (w, s)) in moments.weighted.iter_mut().zip(&moments.mass).enumerate() {
                let unit = ((hash >> (8 * j)) & 0xff) as f64 / 255.0 - 0.5;
                *w += s * self.noise * unit;
            }
            Ok(Evaluation {
                moments,
                energy: Some(energy),
            })
        }
        fn matrix(&mut self, c: &[f64], f: &[f64], inv_mass: &[f64]) -> Result<Vec<f64>> {
            Ok(pass::adjoint_matrix(self.w, c, f, inv_mass, &self.geo))
        }
        fn matvec(
            &mut self,
            c: &[f64],
            f: &[f64],
            inv_mass: &[f64],
            u: &[f64],
        ) -> Result<Vec<f64>> {
            Ok(pass::adjoint_matvec(self.w, c, f, inv_mass, u, &self.geo))
        }
        fn passes(&self) -> (usize, usize) {
            (0, 0)
        }
        fn epsilon(&self) -> f64 {
            self.noise.max(f64::EPSILON)
        }
    }

    fn settings(k: usize) -> Settings {
        Settings {
            k,
            d: 1,
            distance: Distance::Squared,
            tol: 1e-12,
            spread: 1.0,
            max_iter: 50,
            condition: true,
        }
    }

    /// The settled solve of scalar centroids from `c0` in `range`, with
    /// [`settings`].
    fn solve_from(map: &mut impl KmeansMap, c0: &[f64], range: (f64, f64)) -> Solution {
        solve(map, c0, vec![range], settings(c0.len()), None, true).unwrap()
    }

    #[test]
    fn converges_quadratically_to_a_stable_fixed_point() {
        // Three clumps; a start between them.
        let w: Vec<f64> = (0..3000)
            .map(|i| [-1.0, 0.2, 1.5][i % 3] + 0.3 * ((i as f64) * 0.61).sin())
            .collect();
        let geo = Geometry {
            k: 3,
            d: 1,
            tau: 0.05,
            distance: Distance::Squared,
        };
        let mut map = Plain {
            w: &w,
            geo,
            noise: 0.0,
        };
        let sol = solve_from(&mut map, &[-0.5, 0.1, 0.9], (-2.0, 2.0));
        let r = sol.report;
        assert!(
            r.converged && r.stable == Some(true) && r.distinct == 3,
            "{r:?}"
        );
        assert!(r.iterations <= 8, "{r:?}");
        // A fixed point: one more k-means step does not move it.
        let m = pass::soft_assign_reduce(&w, &sol.c, &geo);
        let mut next = sol.c.clone();
        let shift = m.update(&sol.c, &mut next, 1);
        assert!(shift < 1e-12, "shift {shift:e}");
        // The factor solves the adjoint system (I - J^T) u = h.
        let f = next;
        let jt = pass::adjoint_matrix(&w, &sol.c, &f, &m.inverse_mass(), &geo);
        let h = [0.3, -1.0, 0.7];
        let u = sol.factor.unwrap().adjoint(&h);
        let jtu = linalg::matvec(&jt, &u);
        for i in 0..3 {
            assert!((u[i] - jtu[i] - h[i]).abs() < 1e-9, "{u:?}");
        }
    }

    #[test]
    fn stops_where_rounding_hides_the_residual_of_a_flat_fixed_point() {
        // One normal clump split in two just below its critical temperature
        // (tau = 2 sigma^2): the split is a direction of little curvature,
        // so Newton steps are many times the rounding of the residual.
        let w = crate::cluster::sample::normal(4000, 1.0, 3);
        let geo = Geometry {
            k: 2,
            d: 1,
            tau: 1.96,
            distance: Distance::Squared,
        };
        let noise = 1e-9;
        let mut map = Plain { w: &w, geo, noise };
        let sol = solve_from(&mut map, &[-0.5, 0.5], (-5.0, 5.0));
        let r = sol.report;
        // Stopped long before `max_iter`, short of the tolerance: the
        // distance to the fixed point is not known below the rounding.
        assert!(
            !r.converged && r.at_rounding && r.stable == Some(true) && r.distinct == 2,
            "{r:?}"
        );
        assert!(r.iterations < 30, "{r:?}");
        // The flat direction amplifies the rounding: the Newton step
        // stays above the stall bound while the residual is rounding.
        assert!(r.distance > STALLED * noise, "{r:?}");
        assert!(r.residual <= STALLED * noise, "{r:?}");
        // Still at the fixed point of the exact map, to the rounding
        // times the condition of I - J.
        let exact = solve_from(
            &mut Plain {
                w: &w,
                geo,
                noise: 0.0,
            },
            &sol.c,
            (-5.0, 5.0),
        );
        let cond = r.cond.expect("a condition number");
        for (a, b) in sol.c.iter().zip(&exact.c) {
            assert!(
                (a - b).abs() <= 4.0 * cond * noise,
                "{:?} {:?}",
                sol.c,
                exact.c
            );
        }
    }

    #[test]
    fn counts_distinct_centroids() {
        assert_eq!(distinct(&[0.0, 1e-9, 1.0, 2.0], 1, 1e-6), 3);
        assert_eq!(distinct(&[0.0, 0.0, 1.0, 1.0], 2, 1e-6), 2);
    }
}
