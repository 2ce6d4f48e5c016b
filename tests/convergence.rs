//! Relations between the three gradients: DKM unrolled from the fixed point
//! tends to IDKM, JFB tends to IDKM as tau -> 0, and the solvers agree; and
//! when the forward k-means stops.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{randn, rel_err};
use idkm::cluster::reference;
use idkm::cluster::streaming::Geometry;
use idkm::cluster::{ClusteredWeight, Distance, Forward, Init, KmeansConfig, Method, Solver};

fn grad_of(layer: &ClusteredWeight, w: &Tensor, g: &Tensor) -> Tensor {
    let var = Var::from_tensor(w).unwrap();
    let out = layer.forward(&var).unwrap();
    (out * g)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
        .get(&var)
        .unwrap()
        .clone()
}

fn tight(method: Method, tau: f64, distance: Distance, solver: Solver) -> KmeansConfig {
    KmeansConfig {
        bits: 2,
        tau: Some(tau),
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
    let idkm =
        ClusteredWeight::new("w", tight(Method::Idkm, tau, Distance::Squared, Solver::Cg)).unwrap();
    let exact = grad_of(&idkm, &w, &g);
    let c_star = idkm.centroids().unwrap();
    let geo = Geometry {
        k: 4,
        d: 1,
        tau,
        distance: Distance::Squared,
    };
    let mut errors = Vec::new();
    for t in [1, 2, 4, 8, 16, 32, 64, 128] {
        let var = Var::from_tensor(&w).unwrap();
        let (out, _, _) = reference::dkm(&var, &c_star, &geo, t, -1.0).unwrap();
        let grad = (out * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(&var)
            .unwrap()
            .clone();
        errors.push(rel_err(&grad, &exact));
    }
    // A truncated Neumann series: the error shrinks geometrically with t.
    for pair in errors.windows(2) {
        assert!(
            pair[1] < pair[0] || pair[1] < 1e-12,
            "not decreasing: {errors:?}"
        );
    }
    assert!(errors[0] > 1e-3, "t = 1 should differ visibly: {errors:?}");
    assert!(
        *errors.last().unwrap() < 1e-8,
        "t = 128 should match: {errors:?}"
    );
}

#[test]
fn jfb_tends_to_idkm_as_tau_vanishes() {
    // Four well separated groups, one per centroid, so that no decision
    // boundary runs through the data: the assignment hardens as tau -> 0 and
    // J vanishes. (Where a boundary cuts through dense data, J keeps a
    // boundary term even for hard k-means, and JFB stays approximate.)
    let base = randn(120, 1, 3, DType::F64);
    let offsets: Vec<f64> = (0..120).map(|i| [-9.0, -3.0, 3.0, 9.0][i % 4]).collect();
    let w = (base * 0.5)
        .unwrap()
        .add(&Tensor::from_vec(offsets, (120, 1), &Device::Cpu).unwrap())
        .unwrap();
    let g = randn(120, 1, 4, DType::F64);
    let mut gaps = Vec::new();
    for tau in [16.0, 8.0, 4.0, 2.0, 1.0] {
        let cfg = |m| KmeansConfig {
            bits: 2,
            init: idkm::cluster::Init::Optimal1d,
            ..tight(m, tau, Distance::Squared, Solver::Cg)
        };
        let exact = grad_of(
            &ClusteredWeight::new("w", cfg(Method::Idkm)).unwrap(),
            &w,
            &g,
        );
        let jfb = grad_of(
            &ClusteredWeight::new("w", cfg(Method::IdkmJfb)).unwrap(),
            &w,
            &g,
        );
        gaps.push(rel_err(&jfb, &exact));
    }
    for pair in gaps.windows(2) {
        assert!(
            pair[1] < pair[0] || pair[1] < 1e-12,
            "JFB does not approach IDKM: {gaps:?}"
        );
    }
    assert!(gaps[0] > 1e-2 && gaps[4] < 1e-8, "{gaps:?}");
}

#[test]
fn solvers_agree() {
    let (w, g) = (randn(80, 2, 5, DType::F64), randn(80, 2, 6, DType::F64));
    let grad = |distance, solver, tau| {
        let cfg = KmeansConfig {
            cluster_dim: 2,
            ..tight(Method::Idkm, tau, distance, solver)
        };
        let layer = ClusteredWeight::new("w", cfg).unwrap();
        let grad = grad_of(&layer, &w, &g);
        (grad, layer.last_adjoint().unwrap())
    };
    let (cg, a) = grad(Distance::Squared, Solver::Cg, 0.8);
    let (gmres, b) = grad(Distance::Squared, Solver::Gmres, 0.8);
    let (neumann, c) = grad(Distance::Squared, Solver::Neumann, 0.8);
    assert!(rel_err(&gmres, &cg) < 1e-9, "gmres vs cg ({a:?}, {b:?})");
    assert!(
        rel_err(&neumann, &cg) < 1e-9,
        "neumann vs cg ({a:?}, {c:?})"
    );
    let (dense, e) = grad(Distance::Squared, Solver::Dense, 0.8);
    assert!(rel_err(&dense, &cg) < 1e-9, "dense vs cg ({a:?}, {e:?})");
    let (gmres, x) = grad(Distance::Euclidean, Solver::Gmres, 0.4);
    let (neumann, y) = grad(Distance::Euclidean, Solver::Neumann, 0.4);
    let (dense, z) = grad(Distance::Euclidean, Solver::Dense, 0.4);
    assert!(
        rel_err(&neumann, &gmres) < 1e-9,
        "euclidean: neumann vs gmres ({x:?}, {y:?})"
    );
    assert!(
        rel_err(&dense, &gmres) < 1e-9,
        "euclidean: dense vs gmres ({x:?}, {z:?})"
    );
    // CG needs fewer passes than the fixed-point iteration; the dense solver
    // none: it reuses the forward solve's factorisation.
    assert!(
        matches!(e, idkm::cluster::backward::Adjoint::Reused { .. }),
        "{e:?}"
    );
    let steps = |a: idkm::cluster::backward::Adjoint| match a {
        idkm::cluster::backward::Adjoint::Solved(r) => r.steps,
        other => panic!("not solved: {other:?}"),
    };
    assert!(steps(a) < steps(c), "cg {a:?} vs neumann {c:?}");
}

/// The k-means tolerance and the temperature are relative to the weights:
/// weights scaled by 2^10 (so that the derived tau scales by 2^20 and every
/// logit is bit for bit the same) stop after the same number of iterations
/// at centroids scaled exactly by 2^10, with plain steps and with Newton.
/// An absolute tolerance would stop the two at different steps.
#[test]
fn kmeans_tolerance_and_temperature_are_relative_to_the_weights() {
    let w = randn(5000, 1, 21, DType::F32);
    let run = |scale: f64, forward: Forward| {
        let config = KmeansConfig {
            bits: 3,
            forward,
            tol: 1e-4,
            max_iter: 500,
            ..Default::default()
        };
        let layer = ClusteredWeight::new("scaled", config).unwrap();
        layer.forward(&(&w * scale).unwrap()).unwrap();
        (
            layer.last_forward().unwrap().iterations,
            layer.centroids().unwrap(),
            layer.tau().unwrap(),
        )
    };
    for forward in [Forward::Plain, Forward::Newton] {
        let (steps, c, tau) = run(1.0, forward);
        let (steps_scaled, c_scaled, tau_scaled) = run(1024.0, forward);
        assert!(
            steps > 1 && steps < 500,
            "{forward}: a cold start takes some iterations, not the limit: {steps}"
        );
        assert_eq!(
            steps, steps_scaled,
            "{forward}: the same iterations at any weight scale"
        );
        assert_eq!(
            tau * 1024.0 * 1024.0,
            tau_scaled,
            "{forward}: tau scales with the squared weights"
        );
        let diff = ((c * 1024.0).unwrap() - c_scaled)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(
            diff, 0.0,
            "{forward}: centroids scale exactly with the weights"
        );
    }
}

/// Warm start: once k-means has reached its fixed point, a forward pass on
/// slightly moved weights starts there and stops within a few steps (plain
/// steps) or one or two iterations (Newton). (Weights in 16 well-separated
/// groups: on unimodal weights plain soft k-means drifts for hundreds of
/// steps, and the warm start continues that drift.)
#[test]
fn warm_start_stops_within_a_few_steps() {
    let m = 20_000;
    let noise = randn(m, 1, 22, DType::F32);
    let groups: Vec<f32> = (0..m).map(|i| (i % 16) as f32).collect();
    let w = (Tensor::from_vec(groups, (m, 1), &Device::Cpu).unwrap() + (noise * 0.05).unwrap())
        .unwrap();
    let nudged = (&w + (randn(m, 1, 23, DType::F32) * 1e-3).unwrap()).unwrap();
    for forward in [Forward::Plain, Forward::Newton] {
        // k-means++: a start away from the groups (the optimal 1-D one is at them).
        let config = KmeansConfig {
            bits: 4,
            tau: Some(1e-2),
            forward,
            tol: 1e-4,
            max_iter: 300,
            init: Init::KmeansPlusPlus,
            ..Default::default()
        };
        let layer = ClusteredWeight::new("warm", config).unwrap();
        layer.forward(&w).unwrap();
        let cold = layer.last_forward().unwrap();
        layer.forward(&nudged).unwrap();
        let warm = layer.last_forward().unwrap();
        assert!(
            cold.converged && warm.converged,
            "{forward}: cold {cold:?}, warm {warm:?}"
        );
        let passes = |r: idkm::cluster::ForwardReport| r.weight_passes + r.bin_passes;
        match forward {
            Forward::Plain => assert!(
                warm.iterations <= 3 && cold.iterations >= 3 * warm.iterations,
                "cold {cold:?}, warm {warm:?}"
            ),
            Forward::Newton => assert!(
                warm.iterations <= 2 && passes(warm) < passes(cold),
                "cold {cold:?}, warm {warm:?}"
            ),
        }
    }
}

/// Scalar centroids on the CPU start every k-means run in ascending order
/// (which lets the streaming passes window them), whatever order k-means++
/// or a restored checkpoint gave them, and k-means keeps that order.
#[test]
fn scalar_centroids_are_kept_ascending() {
    let w = randn(20_000, 1, 24, DType::F32);
    let config = KmeansConfig {
        bits: 6,
        tau: Some(1e-4),
        max_iter: 20,
        ..Default::default()
    };
    let layer = ClusteredWeight::new("ascending", config.clone()).unwrap();
    let values = |c: Tensor| c.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let ascending = |v: &[f32]| v.windows(2).all(|p| p[0] <= p[1]);
    layer.forward(&w).unwrap();
    let c = values(layer.centroids().unwrap());
    assert!(ascending(&c), "after a k-means++ start: {c:?}");
    // Continuing from the centroids in descending order is continuing from them.
    let restored = |c: Vec<f32>| {
        let layer = ClusteredWeight::new("restored", config.clone()).unwrap();
        layer
            .set_centroids(Tensor::from_vec(c, (64, 1), &Device::Cpu).unwrap())
            .unwrap();
        let out = layer.forward(&w).unwrap();
        (out, values(layer.centroids().unwrap()))
    };
    let (out, _) = restored(c.clone());
    let (out_reversed, c_reversed) = restored(c.iter().rev().copied().collect());
    assert!(
        ascending(&c_reversed),
        "after a descending start: {c_reversed:?}"
    );
    let diff = (out - out_reversed)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
}
