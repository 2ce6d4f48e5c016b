//! The streaming path against the reference (composed candle ops, autograd,
//! dense adjoint solve): soft weights, fixed point and weight gradient.
//! Streaming runs in f32; the reference runs in f64, on the same (f32-rounded)
//! inputs, as ground truth.
//!
//! How close f32 can get is set by the problem: the gradient is a sum of
//! terms of size ~spacing^2/tau times the result that cancel, so the f32
//! floor is about 6e-8 x that ratio x the conditioning of the adjoint system.
//! The cases below are soft (tau of the order of the squared centroid
//! spacing, many solver steps) yet within 1e-5.

mod common;

use candle_core::{DType, Tensor, Var};
use common::{mixture, randn, rel_err, soft_tau};
use idkm::cluster::reference::{self, Adjoint};
use idkm::cluster::streaming::{self as pass, Geometry};
use idkm::cluster::{ClusteredWeight, Distance, KmeansConfig, Method, Solver};

/// The reference fixed point: k-means steps in composed ops, from `c0`.
fn reference_fixed_point(w: &Tensor, c0: &Tensor, geo: &Geometry, tol: f64) -> Tensor {
    let mut c = c0.clone();
    for _ in 0..2000 {
        let next = reference::kmeans_step(w, &c, geo).unwrap();
        let shift = (&next - &c)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        c = next;
        if shift <= tol {
            break;
        }
    }
    c
}

/// Where the weights come from.
#[derive(Clone, Copy)]
enum Data {
    /// Standard normal, tau from [`soft_tau`] times this factor.
    Normal(f64),
    /// Groups around k centres with this spread; tau = (spread x spacing)^2 x factor.
    Mixture { spread: f64, factor: f64 },
}

struct Case {
    m: usize,
    d: usize,
    bits: u32,
    seed: u64,
    distance: Distance,
    data: Data,
}

fn check(case: &Case, method: Method) -> Vec<String> {
    let Case {
        m,
        d,
        bits,
        seed,
        distance,
        data,
    } = *case;
    let k = 1usize << bits;
    let (w64, tau) = match data {
        Data::Normal(factor) => (randn(m, d, seed, DType::F64), soft_tau(k, d) * factor),
        Data::Mixture { spread, factor } => {
            let (w, tau) = mixture(m, d, k, seed, spread);
            (w, tau * factor)
        }
    };
    let geo = Geometry {
        k,
        d,
        tau,
        distance,
    };
    let config = KmeansConfig {
        bits,
        cluster_dim: d,
        tau: Some(tau),
        distance,
        method,
        solver: if distance == Distance::Squared {
            Solver::Cg
        } else {
            Solver::Gmres
        },
        max_iter: 3000,
        // Relative to the spread of the weights (up to about 1.4 here): f32
        // centroids at their fixed point, to a few ulps.
        tol: 5e-8,
        solver_tol: 1e-7,
        solver_max_steps: 400,
        seed,
        ..Default::default()
    };
    let w = w64.to_dtype(DType::F32).unwrap();
    let g = randn(m, d, seed + 1000, DType::F32);
    let (w64, g64) = (
        w.to_dtype(DType::F64).unwrap(),
        g.to_dtype(DType::F64).unwrap(),
    );

    let layer = ClusteredWeight::new("twin", config).unwrap();
    let var = Var::from_tensor(&w).unwrap();
    let soft = layer.forward(&var).unwrap();
    let grad = (&soft * &g)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
        .get(&var)
        .unwrap()
        .clone();
    let c = layer.centroids().unwrap();

    // The reference converges from the streaming result's neighbourhood to its own fixed point.
    let c_ref = reference_fixed_point(&w64, &c.to_dtype(DType::F64).unwrap(), &geo, 1e-13);
    let soft_ref = reference::soft_output(&w64, &c_ref, &geo).unwrap();
    let adjoint = if method == Method::Idkm {
        Adjoint::Exact
    } else {
        Adjoint::JacobianFree
    };
    // The gradient is compared at the same centroids: how far the f32 fixed
    // point sits from the f64 one is what the centroid comparison measures.
    let c64 = c.to_dtype(DType::F64).unwrap();
    let grad_ref = reference::implicit_grad(&w64, &c64, &g64, &geo, adjoint).unwrap();

    // One k-means step at the same centroids: the map itself, to f32 rounding.
    let step = reference::kmeans_step(&w64, &c64, &geo).unwrap();
    let mut step_streaming = vec![0f32; k * d];
    let c32: Vec<f32> = c.flatten_all().unwrap().to_vec1().unwrap();
    let w32: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    idkm::cluster::streaming::soft_assign_reduce(&w32, &c32, &geo).update(
        &c32,
        &mut step_streaming,
        d,
    );
    let step_streaming = Tensor::from_vec(step_streaming, (k, d), w.device()).unwrap();

    let label = format!("m={m} d={d} k={k} seed={seed} {distance:?} {method:?}");
    let es = rel_err(&step_streaming, &step);
    eprintln!(
        "{label}: step {es:.1e} centroids {:.1e} soft {:.1e} grad {:.1e} (forward {:?})",
        rel_err(&c, &c_ref),
        rel_err(&soft, &soft_ref),
        rel_err(&grad, &grad_ref),
        layer.last_forward()
    );
    let mut failures = Vec::new();
    if es >= 1e-6 {
        failures.push(format!(
            "{label}: one k-means step differs, relative {es:e}"
        ));
    }
    let (ec, ew, eg) = (
        rel_err(&c, &c_ref),
        rel_err(&soft, &soft_ref),
        rel_err(&grad, &grad_ref),
    );
    for (what, err) in [
        ("centroids", ec),
        ("soft weights", ew),
        ("weight gradients", eg),
    ] {
        if err >= 1e-5 {
            failures.push(format!("{label}: {what} differ, relative {err:e}"));
        }
    }
    failures
}

#[test]
fn streaming_matches_reference_squared() {
    let mixture = Data::Mixture {
        spread: 0.2,
        factor: 4.0,
    };
    let cases = [
        (400, 1, 1, Data::Normal(0.5)),
        (1000, 1, 2, Data::Normal(0.5)),
        (1500, 2, 4, Data::Normal(0.5)),
        (2000, 1, 4, mixture),
        (800, 4, 3, mixture),
        (600, 8, 2, Data::Normal(0.5)),
    ];
    let mut failures = Vec::new();
    for (n, (m, d, bits, data)) in cases.into_iter().enumerate() {
        let case = Case {
            m,
            d,
            bits,
            seed: n as u64,
            distance: Distance::Squared,
            data,
        };
        for method in [Method::Idkm, Method::IdkmJfb] {
            failures.extend(check(&case, method));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn streaming_matches_reference_euclidean() {
    let mut failures = Vec::new();
    for (n, (m, d, bits)) in [(500, 1, 2), (1200, 2, 3), (2000, 1, 4)]
        .into_iter()
        .enumerate()
    {
        let case = Case {
            m,
            d,
            bits,
            seed: 100 + n as u64,
            distance: Distance::Euclidean,
            data: Data::Normal(0.5),
        };
        for method in [Method::Idkm, Method::IdkmJfb] {
            failures.extend(check(&case, method));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn streaming_matches_reference_many_centroids() {
    let cases = [
        (
            4096,
            1,
            8,
            Data::Mixture {
                spread: 0.2,
                factor: 4.0,
            },
        ),
        (
            4096,
            1,
            8,
            Data::Mixture {
                spread: 0.1,
                factor: 16.0,
            },
        ),
        (
            2048,
            2,
            6,
            Data::Mixture {
                spread: 0.2,
                factor: 4.0,
            },
        ),
    ];
    let mut failures = Vec::new();
    for (n, (m, d, bits, data)) in cases.into_iter().enumerate() {
        failures.extend(check(
            &Case {
                m,
                d,
                bits,
                seed: 7 + n as u64,
                distance: Distance::Squared,
                data,
            },
            Method::Idkm,
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `adjoint_matrix` (J^T assembled in one pass, for the dense solver) times
/// a random u equals the matvec pass `adjoint_matvec(u)`, for k d up to
/// 256, both distances and a dead centroid (whose column is zero).
#[test]
fn adjoint_matrix_matches_the_matvec() {
    let mut failures = Vec::new();
    let mut seed = 500;
    for (k, d) in [
        (2, 1),
        (2, 8),
        (4, 4),
        (16, 1),
        (16, 2),
        (16, 4),
        (32, 2),
        (64, 1),
        (256, 1),
        (128, 2),
    ] {
        for distance in [Distance::Squared, Distance::Euclidean] {
            seed += 1;
            let case = common::KernelCase::new(1037, k, d, distance, seed, seed % 3 == 0);
            let (f, inv_mass) = case.twin_at();
            let jt = pass::adjoint_matrix(&case.w, &case.c, &f, &inv_mass, &case.geo);
            let n = k * d;
            let by_matrix: Vec<f64> = jt
                .chunks_exact(n)
                .map(|row| row.iter().zip(&case.u).map(|(a, b)| a * b).sum())
                .collect();
            let by_pass = pass::adjoint_matvec(&case.w, &case.c, &f, &inv_mass, &case.u, &case.geo);
            let scale = by_pass.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-30);
            let err = by_matrix
                .iter()
                .zip(&by_pass)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>()
                .sqrt()
                / scale;
            if err.is_nan() || err > 1e-5 {
                failures.push(format!("{}: relative error {err:e}", case.label()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
