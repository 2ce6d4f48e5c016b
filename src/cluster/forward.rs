//! The forward k-means solve of one layer on the CPU: Newton's method
//! ([`super::newton`]) on bins of the weights where they pay, corrected on
//! the weights, or on the weights themselves; and the factorisation it
//! leaves for the backward.

use super::binned::BinnedMap;
use super::newton::{self, Evaluation, Factor, KmeansMap, Settings, Solution};
use super::streaming::{self as pass, Geometry, Real};
use crate::error::Result;
use rayon::prelude::*;

/// Chord steps on the weights after a solve on bins (each one pass).
const REFINE_STEPS: usize = 3;

/// The k-means map on the weights themselves.
pub struct WeightsMap<'a, T> {
    w: &'a [T],
    geo: Geometry,
    passes: usize,
}

impl<'a, T: Real> WeightsMap<'a, T> {
    /// The map of the weights `w` (m x d).
    pub fn new(w: &'a [T], geo: Geometry) -> Self {
        Self { w, geo, passes: 0 }
    }
}

impl<T: Real> KmeansMap for WeightsMap<'_, T> {
    fn round(&self, c: &mut [f64]) {
        c.iter_mut().for_each(|x| *x = T::of(*x).wide());
    }

    fn evaluate(&mut self, c: &[f64]) -> Result<Evaluation> {
        let c: Vec<T> = c.iter().map(|&x| T::of(x)).collect();
        self.passes += 1;
        let (moments, energy) = pass::counted_reduce_energy(self.w, &[], &c, &self.geo);
        Ok(Evaluation {
            moments,
            energy: Some(energy),
        })
    }

    fn evaluate_moments(&mut self, c: &[f64]) -> Result<Evaluation> {
        let c: Vec<T> = c.iter().map(|&x| T::of(x)).collect();
        self.passes += 1;
        Ok(Evaluation {
            moments: pass::counted_reduce(self.w, &[], &c, &self.geo),
            energy: None,
        })
    }

    fn matrix(&mut self, c: &[f64], f: &[f64], inv_mass: &[f64]) -> Result<Vec<f64>> {
        let narrow = |x: &[f64]| x.iter().map(|&v| T::of(v)).collect::<Vec<T>>();
        self.passes += 1;
        Ok(pass::adjoint_matrix(
            self.w,
            &narrow(c),
            &narrow(f),
            inv_mass,
            &self.geo,
        ))
    }

    fn evaluate_with_curvature(&mut self, c: &[f64]) -> Result<(Evaluation, Option<Vec<f64>>)> {
        let c: Vec<T> = c.iter().map(|&x| T::of(x)).collect();
        self.passes += 1;
        let (moments, energy, curvature) = pass::reduce_energy_curvature(self.w, &c, &self.geo);
        let eval = Evaluation {
            moments,
            energy: Some(energy),
        };
        Ok((eval, Some(curvature)))
    }

    fn matvec(&mut self, c: &[f64], f: &[f64], inv_mass: &[f64], u: &[f64]) -> Result<Vec<f64>> {
        let narrow = |x: &[f64]| x.iter().map(|&v| T::of(v)).collect::<Vec<T>>();
        self.passes += 1;
        Ok(pass::adjoint_matvec(
            self.w,
            &narrow(c),
            &narrow(f),
            inv_mass,
            u,
            &self.geo,
        ))
    }

    fn passes(&self) -> (usize, usize) {
        (self.passes, 0)
    }

    fn epsilon(&self) -> f64 {
        T::epsilon().wide()
    }
}

/// The range of the weights `w` (m x d) in each coordinate.
pub fn bounds<T: Real>(w: &[T], d: usize) -> Vec<(f64, f64)> {
    (0..d)
        .map(|e| {
            w.iter()
                .skip(e)
                .step_by(d)
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
                    (lo.min(x.wide()), hi.max(x.wide()))
                })
        })
        .collect()
}

/// The fixed point from `c0` by Newton's method (see [`newton::solve`]),
/// on bins of the weights where they pay (then corrected on the weights by
/// up to [`REFINE_STEPS`] chord steps), else on the weights. `tol` is the
/// absolute stopping tolerance, `spread` the weights' spread; `warm` and
/// `settle` as for [`newton::solve`].
#[allow(clippy::too_many_arguments)]
pub fn newton_fixed_point<T: Real>(
    w: &[T],
    c0: &[T],
    geo: &Geometry,
    max_iter: usize,
    tol: f64,
    spread: f64,
    warm: Option<&Factor>,
    settle: bool,
) -> Result<Solution> {
    let settings = Settings {
        k: geo.k,
        d: geo.d,
        distance: geo.distance,
        tol,
        spread,
        max_iter,
    };
    let start: Vec<f64> = c0.iter().map(|x| x.wide()).collect();
    let range = bounds(w, geo.d);
    let mut solution = match BinnedMap::new(w, c0, *geo) {
        Some(mut binned) => {
            let mut solution = newton::solve(&mut binned, &start, range, settings, warm, settle)?;
            tracing::trace!(builds = binned.builds(), "bins of the forward solve");
            newton::refine(
                &mut WeightsMap::new(w, *geo),
                &mut solution,
                settings,
                REFINE_STEPS,
            )?;
            solution
        }
        None if pass::windowed(geo) => {
            // Every iteration's passes would order each chunk's weights by
            // value again: order them once, for the whole solve.
            let sorted = T::sorted(w);
            newton::solve(
                &mut WeightsMap::new(&sorted, *geo),
                &start,
                range,
                settings,
                warm,
                settle,
            )?
        }
        None => newton::solve(
            &mut WeightsMap::new(w, *geo),
            &start,
            range,
            settings,
            warm,
            settle,
        )?,
    };
    solution.report.tau = geo.tau;
    Ok(solution)
}

/// A fingerprint of the weights `w`: a sum with position-dependent
/// factors, so that the same values in another order differ (f64; one
/// parallel pass, far cheaper than a k-means pass; the chunks' sums are
/// added in order, so it is the same on every call).
pub fn checksum<T: Real>(w: &[T]) -> f64 {
    const CHUNK: usize = 1 << 16;
    let parts: Vec<f64> = w
        .par_chunks(CHUNK)
        .enumerate()
        .map(|(b, chunk)| {
            chunk
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    x.wide() * (1.0 + ((b * CHUNK + i).wrapping_mul(2_654_435_761) % 1021) as f64)
                })
                .sum::<f64>()
        })
        .collect();
    parts.iter().sum()
}

/// The factorisation a forward solve leaves for the backward of the same
/// step: the matrix of its last Newton iteration, which at the fixed point
/// is the adjoint system's (see [`Factor::adjoint`]).
#[derive(Clone, Debug)]
pub struct ForwardFactor {
    /// The centroids the solve returned.
    pub centroids: Vec<f64>,
    /// [`checksum`] of the weights it ran on.
    pub checksum: f64,
    /// The factored matrix.
    pub factor: Factor,
    /// How far (relative to the spread) the matrix was assembled from the
    /// returned centroids.
    pub distance: f64,
}

/// A factorisation assembled further than this from the fixed point
/// (relative to the spread) is not reused by the backward, which assembles
/// its own: the adjoint would be off by about this much times the
/// condition of `I - J`.
pub const REUSE_DISTANCE: f64 = 1e-5;

impl ForwardFactor {
    /// The factorisation as numbers, exactly, for a checkpoint: a run that
    /// continues from it warm-starts its next solve as the uninterrupted
    /// run would have ([`Self::decode`] reads it back).
    pub fn encode(&self) -> Vec<f64> {
        let mut out = vec![self.centroids.len() as f64];
        out.extend_from_slice(&self.centroids);
        out.extend([self.checksum, self.distance]);
        self.factor.encode(&mut out);
        out
    }

    /// Reads what [`Self::encode`] wrote; `None` when `data` is not that.
    pub fn decode(data: &[f64]) -> Option<Self> {
        let (&len, rest) = data.split_first()?;
        let len = len as usize;
        if rest.len() < len + 2 {
            return None;
        }
        let (centroids, rest) = rest.split_at(len);
        let (checksum, distance) = (rest[0], rest[1]);
        let (factor, rest) = Factor::decode(&rest[2..])?;
        rest.is_empty().then(|| Self {
            centroids: centroids.to_vec(),
            checksum,
            factor,
            distance,
        })
    }

    /// Whether this factorisation belongs to the weights `w` and centroids
    /// `c` and was assembled within [`REUSE_DISTANCE`] of them.
    pub fn serves<T: Real>(&self, w: &[T], c: &[T]) -> bool {
        self.distance <= REUSE_DISTANCE
            && self.centroids.len() == c.len()
            && self.centroids.iter().zip(c).all(|(a, b)| *a == b.wide())
            && checksum(w) == self.checksum
    }

    /// The factor, as the first matrix of a solve that starts from `c0`
    /// (the centroids this one belongs to), whatever the weights now.
    pub fn warm_start<T: Real>(&self, c0: &[T]) -> Option<&Factor> {
        let same = self.centroids.len() == c0.len()
            && self.centroids.iter().zip(c0).all(|(a, b)| *a == b.wide());
        same.then_some(&self.factor)
    }
}
