//! Relations between the three gradients: DKM unrolled from the fixed point
//! tends to IDKM, JFB tends to IDKM as tau -> 0, and the solvers agree.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{randn, rel_err};
use idkm::cluster::reference;
use idkm::cluster::streaming::Geometry;
use idkm::cluster::{ClusteredWeight, Distance, KmeansConfig, Method, Solver};

fn grad_of(layer: &ClusteredWeight, w: &Tensor, g: &Tensor) -> Tensor {
    let var = Var::from_tensor(w).unwrap();
    let out = layer.forward(&var).unwrap();
    (out * g).unwrap().sum_all().unwrap().backward().unwrap().get(&var).unwrap().clone()
}

fn tight(method: Method, tau: f64, distance: Distance, solver: Solver) -> KmeansConfig {
    KmeansConfig {
        bits: 2,
        tau,
        distance,
        method,
        solver,
        max_iter: 20_000,
        tol: 1e-14,
        solver_tol: 1e-13,
        solver_max_steps: 2000,
        ..Default::default()
    }
}

#[test]
fn dkm_from_the_fixed_point_converges_to_idkm() {
    let (w, g) = (randn(60, 1, 1, DType::F64), randn(60, 1, 2, DType::F64));
    let tau = 0.6;
    let idkm = ClusteredWeight::new("w", tight(Method::Idkm, tau, Distance::Squared, Solver::Cg)).unwrap();
    let exact = grad_of(&idkm, &w, &g);
    let c_star = idkm.centroids().unwrap();
    let geo = Geometry { k: 4, d: 1, tau, distance: Distance::Squared };
    let mut errors = Vec::new();
    for t in [1, 2, 4, 8, 16, 32, 64, 128] {
        let var = Var::from_tensor(&w).unwrap();
        let (out, _, _) = reference::dkm(&var, &c_star, &geo, t, -1.0).unwrap();
        let grad = (out * &g).unwrap().sum_all().unwrap().backward().unwrap().get(&var).unwrap().clone();
        errors.push(rel_err(&grad, &exact));
    }
    // A truncated Neumann series: the error shrinks geometrically with t.
    for pair in errors.windows(2) {
        assert!(pair[1] < pair[0] || pair[1] < 1e-12, "not decreasing: {errors:?}");
    }
    assert!(errors[0] > 1e-3, "t = 1 should differ visibly: {errors:?}");
    assert!(*errors.last().unwrap() < 1e-8, "t = 128 should match: {errors:?}");
}

#[test]
fn jfb_tends_to_idkm_as_tau_vanishes() {
    // Four well separated groups, one per centroid, so that no decision
    // boundary runs through the data: the assignment hardens as tau -> 0 and
    // J vanishes. (Where a boundary cuts through dense data, J keeps a
    // boundary term even for hard k-means, and JFB stays approximate.)
    let base = randn(120, 1, 3, DType::F64);
    let offsets: Vec<f64> = (0..120).map(|i| [-9.0, -3.0, 3.0, 9.0][i % 4]).collect();
    let w = (base * 0.5).unwrap().add(&Tensor::from_vec(offsets, (120, 1), &Device::Cpu).unwrap()).unwrap();
    let g = randn(120, 1, 4, DType::F64);
    let mut gaps = Vec::new();
    for tau in [16.0, 8.0, 4.0, 2.0, 1.0] {
        let cfg = |m| KmeansConfig { bits: 2, init: idkm::cluster::Init::Optimal1d, ..tight(m, tau, Distance::Squared, Solver::Cg) };
        let exact = grad_of(&ClusteredWeight::new("w", cfg(Method::Idkm)).unwrap(), &w, &g);
        let jfb = grad_of(&ClusteredWeight::new("w", cfg(Method::IdkmJfb)).unwrap(), &w, &g);
        gaps.push(rel_err(&jfb, &exact));
    }
    for pair in gaps.windows(2) {
        assert!(pair[1] < pair[0] || pair[1] < 1e-12, "JFB does not approach IDKM: {gaps:?}");
    }
    assert!(gaps[0] > 1e-2 && gaps[4] < 1e-8, "{gaps:?}");
}

#[test]
fn solvers_agree() {
    let (w, g) = (randn(80, 2, 5, DType::F64), randn(80, 2, 6, DType::F64));
    let grad = |distance, solver, tau| {
        let cfg = KmeansConfig { cluster_dim: 2, ..tight(Method::Idkm, tau, distance, solver) };
        let layer = ClusteredWeight::new("w", cfg).unwrap();
        let grad = grad_of(&layer, &w, &g);
        (grad, layer.last_adjoint().unwrap())
    };
    let (cg, a) = grad(Distance::Squared, Solver::Cg, 0.8);
    let (gmres, b) = grad(Distance::Squared, Solver::Gmres, 0.8);
    let (neumann, c) = grad(Distance::Squared, Solver::Neumann, 0.8);
    assert!(rel_err(&gmres, &cg) < 1e-9, "gmres vs cg ({a:?}, {b:?})");
    assert!(rel_err(&neumann, &cg) < 1e-9, "neumann vs cg ({a:?}, {c:?})");
    let (gmres, _) = grad(Distance::Euclidean, Solver::Gmres, 0.4);
    let (neumann, _) = grad(Distance::Euclidean, Solver::Neumann, 0.4);
    assert!(rel_err(&neumann, &gmres) < 1e-9, "euclidean: neumann vs gmres");
    // CG needs fewer passes than the fixed-point iteration.
    let steps = |a: idkm::cluster::backward::Adjoint| match a {
        idkm::cluster::backward::Adjoint::Solved(r) => r.steps,
        other => panic!("not solved: {other:?}"),
    };
    assert!(steps(a) < steps(c), "cg {a:?} vs neumann {c:?}");
}
