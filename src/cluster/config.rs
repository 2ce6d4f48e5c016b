//! Configuration of one clustered layer: how many centroids, which distance,
//! which gradient and which adjoint solver.

use crate::error::{Error, Result};

/// The distance between a weight vector and a centroid in the attention logits
/// `z_ij = -dist(w_i, c_j) / tau`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Distance {
    /// `||w - c||^2`, as in coremltools. The adjoint system is symmetric: CG applies.
    #[default]
    Squared,
    /// `||w - c||`, as in the DKM paper. The adjoint system is not symmetric.
    Euclidean,
}

/// How the gradient through the k-means fixed point is obtained.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Method {
    /// Autograd through every k-means iteration (memory grows with the iterations).
    Dkm,
    /// Implicit function theorem: exact gradient from a small adjoint solve.
    #[default]
    Idkm,
    /// Jacobian-free backpropagation: the adjoint solve is skipped (`u = h`).
    IdkmJfb,
}

/// The Krylov or fixed-point method for the adjoint system `(I - J)^T u = h`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Solver {
    /// Conjugate gradient on the symmetrised system (squared distance only).
    /// The system is symmetric only at an exact fixed point; a forward pass
    /// stopped by `max_iter` leaves it slightly unsymmetric, and CG can then
    /// miss its tolerance.
    Cg,
    /// Restarted GMRES (any distance): needs no symmetry and fewer steps
    /// than CG on the systems of training, but about k d of them.
    Gmres,
    /// Plain fixed-point iteration `u <- h + J^T u` (any distance).
    Neumann,
    /// `J^T` (k d x k d) assembled in one pass over the weights and the
    /// system solved by LU (any distance): exact whether or not the forward
    /// pass reached its fixed point, and one pass instead of up to k d; the
    /// pass costs (k d)^2 multiply-adds per weight vector (about k d / 8
    /// ordinary passes), and its memory is independent of m: partial sums of
    /// 8 (k d)^2 bytes, as many as fit in 1 MiB (at least 2), plus the matrix
    /// and its LU copy; for k d <= [`DENSE_MAX_UNKNOWNS`].
    Dense,
    /// [`Solver::Dense`] for k d <= [`DENSE_MAX_UNKNOWNS`], [`Solver::Gmres`] above.
    #[default]
    Auto,
}

/// The most unknowns (k d) of [`Solver::Dense`].
pub const DENSE_MAX_UNKNOWNS: usize = 256;

impl Solver {
    /// The solver that runs for `unknowns` = k d: `Auto` resolved.
    pub fn resolve(self, unknowns: usize) -> Solver {
        match self {
            Solver::Auto if unknowns <= DENSE_MAX_UNKNOWNS => Solver::Dense,
            Solver::Auto => Solver::Gmres,
            other => other,
        }
    }
}

/// How the centroids are chosen before the first k-means iteration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Init {
    /// [`Init::Optimal1d`] for scalar weights, [`Init::KmeansPlusPlus`] otherwise.
    #[default]
    Auto,
    /// k-means++ seeding, deterministic for a given seed, refined by hard
    /// k-means (Lloyd) steps on the sample it was drawn from.
    KmeansPlusPlus,
    /// Optimal 1-D k-means by dynamic programming on a histogram of the
    /// weights whose bins are narrow both in count and in value (d = 1 only).
    Optimal1d,
}

impl Init {
    /// The initialisation that runs for vectors of dimension `d`: `Auto` resolved.
    pub fn resolve(self, d: usize) -> Init {
        match self {
            Init::Auto if d == 1 => Init::Optimal1d,
            Init::Auto => Init::KmeansPlusPlus,
            other => other,
        }
    }
}

/// How the forward pass reaches the k-means fixed point `C* = F(C*)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Forward {
    /// Newton's method on the fixed-point residual `F(C) - C`, safeguarded
    /// (damping where the curvature is not positive, backtracking, plain
    /// steps as the last resort), stopped when the Newton step, an estimate
    /// of the distance to the fixed point, is below `tol` times the spread
    /// of the weights. See `docs/design.md`.
    #[default]
    Newton,
    /// Plain k-means steps `C <- F(C)`, stopped when a step moves no
    /// centroid by more than `tol` times the spread, or after `max_iter`
    /// steps: the setting of the DKM and IDKM papers. DKM always runs this.
    Plain,
}

/// Configuration of train-time clustering of one weight tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct KmeansConfig {
    /// Bits per index: `k = 2^bits` centroids, `1..=8`.
    pub bits: u32,
    /// Number of consecutive weights that share one index: 1, 2, 4 or 8.
    pub cluster_dim: usize,
    /// Softmax temperature, `> 0`, in the units of the distance (squared
    /// weight units for the squared distance). `None` (the default) derives
    /// it from the layer's own weights on the first forward pass: see
    /// [`tau_scale`](Self::tau_scale) and [`super::temperature`].
    pub tau: Option<f64>,
    /// The temperature relative to the layer's hard-quantization error when
    /// [`tau`](Self::tau) is `None`: `tau = tau_scale * mse / d` for the
    /// squared distance, with `mse` the mean squared distance of a weight
    /// vector to its nearest initial centroid.
    pub tau_scale: f64,
    /// How the forward pass reaches the fixed point.
    pub forward: Forward,
    /// Maximum number of iterations per forward pass: Newton iterations
    /// (each one pass that gives the curvature and one or more k-means
    /// passes), or plain k-means steps (DKM unrolls exactly these).
    pub max_iter: usize,
    /// Stopping tolerance relative to the spread of the weights (the RMS
    /// distance of a weight vector from their mean), so that it does not
    /// depend on the weights' scale. Newton stops when its step, which
    /// estimates the distance to the fixed point, is below it; plain steps
    /// stop when a step moves no centroid by more than it. `0` runs exactly
    /// `max_iter` plain steps.
    pub tol: f64,
    /// Distance in the attention logits.
    pub distance: Distance,
    /// Gradient method.
    pub method: Method,
    /// Adjoint solver of IDKM.
    pub solver: Solver,
    /// Relative residual at which the adjoint solver stops.
    pub solver_tol: f64,
    /// Maximum number of solver steps (each is one pass over the weights).
    pub solver_max_steps: usize,
    /// Centroid initialisation on the first forward pass.
    pub init: Init,
    /// Seed of the initialisation.
    pub seed: u64,
}

impl Default for KmeansConfig {
    fn default() -> Self {
        Self {
            bits: 4,
            cluster_dim: 1,
            tau: None,
            tau_scale: DEFAULT_TAU_SCALE,
            forward: Forward::Newton,
            max_iter: DEFAULT_NEWTON_ITER,
            tol: DEFAULT_TOL,
            distance: Distance::Squared,
            method: Method::Idkm,
            solver: Solver::Auto,
            solver_tol: 1e-6,
            solver_max_steps: 100,
            init: Init::Auto,
            seed: 0,
        }
    }
}

/// Default [`KmeansConfig::tau_scale`]: measured to keep every centroid
/// distinct and `I - J` well conditioned (condition 30-50) at 2 to 8 bits on
/// heavy-tailed weights (see `docs/design.md`).
pub const DEFAULT_TAU_SCALE: f64 = 0.5;

/// Default [`KmeansConfig::max_iter`] of the Newton forward solve: cold
/// starts take 4-10 iterations at 4 and 6 bits and up to about 50 at 8
/// bits on heavy-tailed weights, warm starts fewer (see `docs/design.md`).
pub const DEFAULT_NEWTON_ITER: usize = 100;

/// Default [`KmeansConfig::max_iter`] of plain steps (and DKM's unrolled
/// iterations).
pub const DEFAULT_PLAIN_ITER: usize = 30;

/// Default [`KmeansConfig::tol`]: about where f32 rounding of the passes
/// stops Newton's steps from shrinking.
pub const DEFAULT_TOL: f64 = 1e-6;

impl KmeansConfig {
    /// Number of centroids, `2^bits`.
    pub fn k(&self) -> usize {
        1usize << self.bits
    }

    /// Checks every value's range, and that the solver fits the distance.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if !(1..=8).contains(&self.bits) {
            return bad(format!("bits must be in 1..=8, got {}", self.bits));
        }
        if ![1, 2, 4, 8].contains(&self.cluster_dim) {
            return bad(format!(
                "cluster dimension must be 1, 2, 4 or 8, got {}",
                self.cluster_dim
            ));
        }
        if let Some(tau) = self.tau {
            if !(tau > 0.0 && tau.is_finite()) {
                return bad(format!(
                    "temperature tau must be positive and finite, got {tau}"
                ));
            }
        }
        if !(self.tau_scale > 0.0 && self.tau_scale.is_finite()) {
            return bad(format!(
                "temperature scale must be positive and finite, got {}",
                self.tau_scale
            ));
        }
        if self.max_iter == 0 {
            return bad("max_iter must be at least 1".into());
        }
        if !(self.tol >= 0.0 && self.tol.is_finite()) {
            return bad(format!(
                "tolerance must be non-negative and finite, got {}",
                self.tol
            ));
        }
        if !(self.solver_tol > 0.0 && self.solver_tol < 1.0) {
            return bad(format!(
                "solver tolerance must be in (0, 1), got {}",
                self.solver_tol
            ));
        }
        if self.solver_max_steps == 0 {
            return bad("solver_max_steps must be at least 1".into());
        }
        if self.method == Method::Idkm
            && self.solver == Solver::Cg
            && self.distance == Distance::Euclidean
        {
            return bad(
                "conjugate gradient needs the symmetric system of the squared distance; \
                 use the gmres or neumann solver with the euclidean distance"
                    .into(),
            );
        }
        let unknowns = self.k() * self.cluster_dim;
        if self.solver == Solver::Dense && unknowns > DENSE_MAX_UNKNOWNS {
            return bad(format!(
                "the dense solver takes at most {DENSE_MAX_UNKNOWNS} unknowns (k * cluster dimension), got {unknowns}; \
                 use gmres or auto"
            ));
        }
        if self.init == Init::Optimal1d && self.cluster_dim != 1 {
            return bad("optimal 1-D initialisation needs cluster dimension 1".into());
        }
        Ok(())
    }
}

impl KmeansConfig {
    /// The configuration as JSON, enums by their CLI names (stored in checkpoints).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "bits": self.bits,
            "cluster_dim": self.cluster_dim,
            "tau": self.tau,
            "tau_scale": self.tau_scale,
            "forward": self.forward.to_string(),
            "max_iter": self.max_iter,
            "tol": self.tol,
            "distance": self.distance.to_string(),
            "method": self.method.to_string(),
            "solver": self.solver.to_string(),
            "solver_tol": self.solver_tol,
            "solver_max_steps": self.solver_max_steps,
            "init": self.init.to_string(),
            "seed": self.seed,
        })
    }

    /// Reads what [`to_json`](Self::to_json) wrote; every field is required
    /// except `tau_scale` and `forward`, which checkpoints written before
    /// they existed lack (their layers then keep their absolute `tau` and
    /// plain steps).
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let field = |key: &str| {
            value
                .get(key)
                .ok_or_else(|| Error::Config(format!("clustering config lacks `{key}`")))
        };
        let number = |key: &str| {
            field(key)?
                .as_f64()
                .ok_or_else(|| Error::Config(format!("`{key}` is not a number")))
        };
        let count = |key: &str| {
            field(key)?
                .as_u64()
                .ok_or_else(|| Error::Config(format!("`{key}` is not a whole number")))
        };
        let name = |key: &str| {
            field(key)?
                .as_str()
                .ok_or_else(|| Error::Config(format!("`{key}` is not a string")))
        };
        let config = Self {
            bits: count("bits")? as u32,
            cluster_dim: count("cluster_dim")? as usize,
            tau: match field("tau")? {
                serde_json::Value::Null => None,
                _ => Some(number("tau")?),
            },
            tau_scale: match value.get("tau_scale") {
                None => DEFAULT_TAU_SCALE,
                Some(_) => number("tau_scale")?,
            },
            forward: match value.get("forward") {
                None => Forward::Plain,
                Some(_) => name("forward")?.parse()?,
            },
            max_iter: count("max_iter")? as usize,
            tol: number("tol")?,
            distance: name("distance")?.parse()?,
            method: name("method")?.parse()?,
            solver: name("solver")?.parse()?,
            solver_tol: number("solver_tol")?,
            solver_max_steps: count("solver_max_steps")? as usize,
            init: name("init")?.parse()?,
            seed: count("seed")?,
        };
        config.validate()?;
        Ok(config)
    }
}

/// Implements `FromStr` and `Display` with the CLI spelling of each variant.
macro_rules! cli_names {
    ($ty:ident, $what:literal, $($variant:ident => $name:literal),+) => {
        impl std::str::FromStr for $ty {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                match s.to_ascii_lowercase().as_str() {
                    $($name => Ok(Self::$variant),)+
                    _ => Err(Error::UnknownName {
                        what: $what,
                        got: s.to_string(),
                        expected: [$($name),+].join(", "),
                    }),
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(match self { $(Self::$variant => $name,)+ })
            }
        }
    };
}

cli_names!(Distance, "distance", Squared => "squared", Euclidean => "euclidean");
cli_names!(Method, "method", Dkm => "dkm", Idkm => "idkm", IdkmJfb => "idkm-jfb");
cli_names!(Solver, "solver", Cg => "cg", Gmres => "gmres", Neumann => "neumann", Dense => "dense", Auto => "auto");
cli_names!(Init, "initialisation", Auto => "auto", KmeansPlusPlus => "kmeans++", Optimal1d => "optimal-1d");
cli_names!(Forward, "forward solver", Newton => "newton", Plain => "plain");
crate::names::serde_by_name!(Distance, Method, Solver, Init, Forward);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_rejects_out_of_range_values() {
        let ok = KmeansConfig::default();
        assert!(ok.validate().is_ok());
        for bad in [
            KmeansConfig {
                bits: 0,
                ..ok.clone()
            },
            KmeansConfig {
                bits: 9,
                ..ok.clone()
            },
            KmeansConfig {
                cluster_dim: 3,
                ..ok.clone()
            },
            KmeansConfig {
                tau: Some(0.0),
                ..ok.clone()
            },
            KmeansConfig {
                tau: Some(-1.0),
                ..ok.clone()
            },
            KmeansConfig {
                tau: Some(f64::NAN),
                ..ok.clone()
            },
            KmeansConfig {
                tau_scale: 0.0,
                ..ok.clone()
            },
            KmeansConfig {
                tau_scale: f64::INFINITY,
                ..ok.clone()
            },
            KmeansConfig {
                max_iter: 0,
                ..ok.clone()
            },
            KmeansConfig {
                distance: Distance::Euclidean,
                solver: Solver::Cg,
                ..ok.clone()
            },
            KmeansConfig {
                init: Init::Optimal1d,
                cluster_dim: 2,
                ..ok.clone()
            },
            KmeansConfig {
                solver: Solver::Dense,
                bits: 7,
                cluster_dim: 4,
                ..ok.clone()
            },
        ] {
            assert!(matches!(bad.validate(), Err(Error::Config(_))), "{bad:?}");
        }
    }

    #[test]
    fn json_round_trip() {
        let config = KmeansConfig {
            bits: 3,
            method: Method::IdkmJfb,
            init: Init::Optimal1d,
            tau: Some(0.25),
            ..Default::default()
        };
        assert_eq!(KmeansConfig::from_json(&config.to_json()).unwrap(), config);
        let derived = KmeansConfig {
            tau_scale: 0.3,
            forward: Forward::Plain,
            ..Default::default()
        };
        assert_eq!(
            KmeansConfig::from_json(&derived.to_json()).unwrap(),
            derived
        );
        // A checkpoint from before the derived temperature: absolute tau, plain steps.
        let mut old = config.to_json();
        old.as_object_mut()
            .unwrap()
            .retain(|key, _| key != "tau_scale" && key != "forward");
        assert_eq!(
            KmeansConfig::from_json(&old).unwrap(),
            KmeansConfig {
                forward: Forward::Plain,
                ..config
            }
        );
        let mut json = config.to_json();
        json.as_object_mut().unwrap().remove("tau");
        assert!(KmeansConfig::from_json(&json)
            .unwrap_err()
            .to_string()
            .contains("tau"));
    }

    #[test]
    fn names_round_trip() {
        for m in [Method::Dkm, Method::Idkm, Method::IdkmJfb] {
            assert_eq!(m.to_string().parse::<Method>().unwrap(), m);
        }
        let err = "lbfgs".parse::<Solver>().unwrap_err().to_string();
        assert!(err.contains("cg, gmres, neumann"), "{err}");
    }
}
