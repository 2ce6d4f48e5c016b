//! Gradients of DKM, IDKM and IDKM-JFB against central finite differences, in f64.

mod common;

use candle_core::{DType, Tensor, Var};
use common::{flat, randn, rel_err};
use idkm::cluster::reference::{self, Adjoint as RefAdjoint};
use idkm::cluster::streaming::Geometry;
use idkm::cluster::{init, ClusteredWeight, Distance, Init, KmeansConfig, Method, Solver};

const EPS: f64 = 1e-6;

/// Central differences of `loss` at `w` (m x d, f64).
fn finite_differences(w: &Tensor, mut loss: impl FnMut(&Tensor) -> f64) -> Tensor {
    let base = flat(w);
    let fd: Vec<f64> = (0..base.len())
        .map(|i| {
            let mut plus = base.clone();
            let mut minus = base.clone();
            plus[i] += EPS;
            minus[i] -= EPS;
            let at = |v: Vec<f64>| Tensor::from_vec(v, w.shape(), w.device()).unwrap();
            (loss(&at(plus)) - loss(&at(minus))) / (2.0 * EPS)
        })
        .collect();
    Tensor::from_vec(fd, w.shape(), w.device()).unwrap()
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    (a * b)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

struct Case {
    m: usize,
    d: usize,
    bits: u32,
    tau: f64,
    distance: Distance,
}

const CASES: [Case; 4] = [
    Case {
        m: 30,
        d: 1,
        bits: 2,
        tau: 0.5,
        distance: Distance::Squared,
    },
    Case {
        m: 20,
        d: 2,
        bits: 2,
        tau: 0.8,
        distance: Distance::Squared,
    },
    Case {
        m: 30,
        d: 1,
        bits: 2,
        tau: 0.3,
        distance: Distance::Euclidean,
    },
    Case {
        m: 20,
        d: 2,
        bits: 2,
        tau: 0.4,
        distance: Distance::Euclidean,
    },
];

fn config(case: &Case, method: Method) -> KmeansConfig {
    KmeansConfig {
        bits: case.bits,
        cluster_dim: case.d,
        tau: Some(case.tau),
        distance: case.distance,
        method,
        solver: if case.distance == Distance::Squared {
            Solver::Cg
        } else {
            Solver::Gmres
        },
        max_iter: 20_000,
        tol: 1e-14,
        solver_tol: 1e-12,
        solver_max_steps: 500,
        ..Default::default()
    }
}

fn geometry(case: &Case) -> Geometry {
    Geometry {
        k: 1 << case.bits,
        d: case.d,
        tau: case.tau,
        distance: case.distance,
    }
}

/// The layer's gradient of `<g, forward(w)>` through candle's autograd.
fn layer_grad(layer: &ClusteredWeight, w: &Tensor, g: &Tensor) -> Tensor {
    let var = Var::from_tensor(w).unwrap();
    let out = layer.forward(&var).unwrap();
    let grads = (out * g).unwrap().sum_all().unwrap().backward().unwrap();
    grads.get(&var).unwrap().clone()
}

#[test]
fn idkm_gradient_matches_finite_differences() {
    for (n, case) in CASES.iter().enumerate() {
        let w = randn(case.m, case.d, 10 + n as u64, DType::F64);
        let g = randn(case.m, case.d, 20 + n as u64, DType::F64);
        // The Krylov solver of the distance, then the dense solver.
        for solver in [config(case, Method::Idkm).solver, Solver::Dense] {
            let layer = ClusteredWeight::new(
                "w",
                KmeansConfig {
                    solver,
                    ..config(case, Method::Idkm)
                },
            )
            .unwrap();
            let grad = layer_grad(&layer, &w, &g);
            // Each evaluation warm-starts from the last fixed point and converges to 1e-14.
            let fd = finite_differences(&w, |w| dot(&layer.forward(w).unwrap(), &g));
            let err = rel_err(&grad, &fd);
            assert!(
                err < 1e-6,
                "case {n} ({:?}, d = {}, {solver}): relative error {err:e}",
                case.distance,
                case.d
            );
        }
    }
}

#[test]
fn dkm_gradient_matches_finite_differences() {
    for (n, case) in CASES.iter().enumerate() {
        let w = randn(case.m, case.d, 30 + n as u64, DType::F64);
        let g = randn(case.m, case.d, 40 + n as u64, DType::F64);
        let cfg = KmeansConfig {
            max_iter: 3,
            tol: 0.0,
            init: Init::KmeansPlusPlus,
            ..config(case, Method::Dkm)
        };
        let layer = ClusteredWeight::new("w", cfg.clone()).unwrap();
        let grad = layer_grad(&layer, &w, &g);
        // The layer's first forward starts from k-means++ (refined) with its seed.
        let c0 = init::kmeans_plus_plus_refined(&flat(&w), case.d, 1 << case.bits, cfg.seed);
        let c0 = Tensor::from_vec(c0, (1 << case.bits, case.d), w.device()).unwrap();
        let fd = finite_differences(&w, |w| {
            dot(
                &reference::dkm(w, &c0, &geometry(case), 3, 0.0).unwrap().0,
                &g,
            )
        });
        let err = rel_err(&grad, &fd);
        assert!(err < 1e-6, "case {n}: relative error {err:e}");
    }
}

/// JFB is the exact gradient of one k-means step from a constant fixed point:
/// `L(W) = <g, A(F(C*, W), W) F(C*, W)>`.
#[test]
fn jfb_gradient_matches_finite_differences_of_one_step() {
    for (n, case) in CASES.iter().enumerate() {
        let w = randn(case.m, case.d, 50 + n as u64, DType::F64);
        let g = randn(case.m, case.d, 60 + n as u64, DType::F64);
        let layer = ClusteredWeight::new("w", config(case, Method::IdkmJfb)).unwrap();
        let grad = layer_grad(&layer, &w, &g);
        let c_star = layer.centroids().unwrap();
        let geo = geometry(case);
        let fd = finite_differences(&w, |w| {
            let c = reference::kmeans_step(w, &c_star, &geo).unwrap();
            dot(&reference::soft_output(w, &c, &geo).unwrap(), &g)
        });
        let err = rel_err(&grad, &fd);
        assert!(err < 1e-6, "case {n}: relative error {err:e}");
        // And the reference formulation of JFB agrees.
        let r = reference::implicit_grad(&w, &c_star, &g, &geo, RefAdjoint::JacobianFree).unwrap();
        assert!(
            rel_err(&grad, &r) < 1e-9,
            "case {n}: streaming vs reference JFB"
        );
    }
}
