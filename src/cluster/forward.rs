//! The forward k-means solve of one layer on the CPU: Newton's method
//! ([`super::newton`]) on bins of the weights where they pay, corrected on
//! the weights, or on the weights themselves (a cold start of a large layer
//! from the fixed point of groups of them); and the factorisation it leaves
//! for the backward.

use super::binned::BinnedMap;
use super::config::Distance;
use super::newton::{self, Evaluation, Factor, ForwardReport, KmeansMap, Settings, Solution};
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
/// up to [`REFINE_STEPS`] chord steps), else on the weights (from the fixed
/// point of groups of them, for a `cold` start of a large layer, one from
/// the initialisation rather than from an earlier fixed point: see
/// [`coarse_start`]). `tol` is the absolute stopping tolerance, `spread`
/// the weights' spread; `warm` and `settle` as for [`newton::solve`].
#[allow(clippy::too_many_arguments)]
pub fn newton_fixed_point<T: Real>(
    w: &[T],
    c0: &[T],
    geo: &Geometry,
    max_iter: usize,
    tol: f64,
    spread: f64,
    warm: Option<&Factor>,
    cold: bool,
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
            let coarse = if cold
                && geo.distance == Distance::Squared
                && sorted.len() >= COARSE_START_WEIGHTS
            {
                Some(coarse_start(&sorted, &start, range.clone(), settings, geo)?)
            } else {
                None
            };
            let from = coarse.as_ref().map_or(&start, |(c, _)| c);
            let mut solution = newton::solve(
                &mut WeightsMap::new(&sorted, *geo),
                from,
                range,
                settings,
                warm,
                settle,
            )?;
            if let Some((_, report)) = coarse {
                solution.report.iterations += report.iterations;
                solution.report.bin_passes += report.bin_passes;
            }
            solution
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

/// Sorted weights per group in [`coarse_start`]. Heavy-tailed 2.4 M
/// weights at 8 bits: in groups of 16 the solve does not converge within
/// its iterations, in groups of 4 it does, and the solve on the weights
/// then takes 34 passes instead of 103.
const COARSE_GROUP: usize = 4;

/// Fewest weights at which a cold solve on the weights starts from the
/// fixed point of their groups ([`coarse_start`]).
const COARSE_START_WEIGHTS: usize = 1 << 18;

/// A cold start for the solve on the sorted weights `sorted`: the fixed
/// point, from `c0`, of their groups of [`COARSE_GROUP`] consecutive
/// weights, each group its mean and count (bins of equal counts), or `c0`
/// where that solve does not converge to a stable fixed point. From the
/// optimal 1-D centroids most of a cold solve's iterations are damped
/// ones, far from the fixed point; on the groups they cost about a quarter
/// of a pass each, and the solve on the weights starts nearer its fixed
/// point. Also the groups' report, whose passes are bin passes.
fn coarse_start<T: Real>(
    sorted: &[T],
    c0: &[f64],
    range: Vec<(f64, f64)>,
    settings: Settings,
    geo: &Geometry,
) -> Result<(Vec<f64>, ForwardReport)> {
    let (mean, count): (Vec<T>, Vec<T>) = sorted
        .chunks(COARSE_GROUP)
        .map(|group| {
            let sum: f64 = group.iter().map(|x| x.wide()).sum();
            let n = group.len() as f64;
            (T::of(sum / n), T::of(n))
        })
        .unzip();
    let mut groups = GroupsMap {
        mean: &mean,
        count: &count,
        geo: *geo,
        passes: 0,
    };
    let solution = newton::solve(&mut groups, c0, range, settings, None, false)?;
    let report = solution.report;
    let usable = report.converged && report.stable == Some(true);
    tracing::trace!(?report, usable, "coarse start on groups of the weights");
    Ok((if usable { solution.c } else { c0.to_vec() }, report))
}

/// The k-means map of weights grouped into points with counts.
struct GroupsMap<'a, T> {
    mean: &'a [T],
    count: &'a [T],
    geo: Geometry,
    passes: usize,
}

impl<T: Real> KmeansMap for GroupsMap<'_, T> {
    fn round(&self, c: &mut [f64]) {
        c.iter_mut().for_each(|x| *x = T::of(*x).wide());
    }

    fn evaluate(&mut self, c: &[f64]) -> Result<Evaluation> {
        self.passes += 1;
        let (moments, energy) =
            pass::counted_reduce_energy(self.mean, self.count, &narrow::<T>(c), &self.geo);
        Ok(Evaluation {
            moments,
            energy: Some(energy),
        })
    }

    fn matrix(&mut self, c: &[f64], f: &[f64], inv_mass: &[f64]) -> Result<Vec<f64>> {
        self.passes += 1;
        Ok(pass::counted_adjoint_matrix(
            self.mean,
            self.count,
            &narrow::<T>(c),
            &narrow::<T>(f),
            inv_mass,
            &self.geo,
        ))
    }

    fn matvec(&mut self, c: &[f64], f: &[f64], inv_mass: &[f64], u: &[f64]) -> Result<Vec<f64>> {
        // Through the matrix: the groups are few.
        Ok(super::linalg::matvec(&self.matrix(c, f, inv_mass)?, u))
    }

    fn passes(&self) -> (usize, usize) {
        (0, self.passes)
    }

    fn epsilon(&self) -> f64 {
        T::epsilon().wide()
    }
}

fn narrow<T: Real>(c: &[f64]) -> Vec<T> {
    c.iter().map(|&x| T::of(x)).collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{init, sample, temperature};

    /// Heavy-tailed weights: nine in ten from a normal of spread 0.02, one
    /// in ten from one five times wider.
    fn heavy_tailed(n: usize) -> Vec<f32> {
        sample::normal(n, 1.0, 7)
            .iter()
            .enumerate()
            .map(|(i, x)| (x * if i % 10 == 0 { 0.1 } else { 0.02 }) as f32)
            .collect()
    }

    /// A cold solve of a large layer at 6 bits from the optimal 1-D
    /// centroids, with the groups' fixed point as its start and without:
    /// both reach a stable fixed point with all centroids distinct; from
    /// the groups, one of no higher free energy, in fewer passes over the
    /// weights.
    #[test]
    fn a_cold_start_from_the_groups_takes_fewer_passes_to_as_low_an_energy() {
        let w = heavy_tailed(COARSE_START_WEIGHTS);
        let k = 64;
        let c0 = init::optimal_1d(&w, k, 0);
        let tau =
            temperature::from_error(temperature::hard_mse(&w, &c0, 1), 1, Distance::Squared, 0.5)
                .expect("a temperature");
        let geo = Geometry {
            k,
            d: 1,
            tau,
            distance: Distance::Squared,
        };
        let spread = (w.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        let tol = 1e-6 * spread;
        assert!(
            BinnedMap::new(&w, &c0, geo).is_none(),
            "bins pay here: the test needs a solve on the weights"
        );
        let grouped =
            newton_fixed_point(&w, &c0, &geo, 100, tol, spread, None, true, true).expect("solved");
        let start: Vec<f64> = c0.iter().map(|&x| f64::from(x)).collect();
        let settings = Settings {
            k,
            d: 1,
            distance: Distance::Squared,
            tol,
            spread,
            max_iter: 100,
        };
        let sorted = f32::sorted(&w);
        let direct = newton::solve(
            &mut WeightsMap::new(&sorted, geo),
            &start,
            bounds(&w, 1),
            settings,
            None,
            true,
        )
        .expect("solved");
        for (name, r) in [("grouped", grouped.report), ("direct", direct.report)] {
            assert!(
                r.converged && r.stable == Some(true) && r.distinct == k,
                "{name}: {r:?}"
            );
        }
        assert!(grouped.report.bin_passes > 0, "{:?}", grouped.report);
        // From a fixed point (not the initialisation) the solve stays on
        // the weights, and is done within a few passes.
        let near: Vec<f32> = grouped.c.iter().map(|&x| x as f32).collect();
        let again = newton_fixed_point(&w, &near, &geo, 100, tol, spread, None, false, true)
            .expect("solved");
        assert!(
            again.report.bin_passes == 0 && again.report.weight_passes <= 4,
            "{:?}",
            again.report
        );
        assert!(
            grouped.report.weight_passes < direct.report.weight_passes,
            "{:?} against {:?}",
            grouped.report,
            direct.report
        );
        let gap = grouped
            .c
            .iter()
            .zip(&direct.c)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        // Here the two starts lead to different fixed points, 1.5e-2 of the
        // spread apart; the groups' has the lower free energy.
        let energy = |c: &[f64]| pass::counted_reduce_energy(&w, &[], &narrow::<f32>(c), &geo).1;
        let (from_groups, from_start) = (energy(&grouped.c), energy(&direct.c));
        assert!(
            from_groups <= from_start,
            "free energy {from_groups:e} against {from_start:e} ({:e} of the spread apart)",
            gap / spread
        );
    }
}
