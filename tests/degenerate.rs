//! Degenerate inputs: clear errors where it is the user's fault, no NaN otherwise.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{flat, randn, rel_err};
use idkm::cluster::streaming::{self as pass, Geometry};
use idkm::cluster::{ClusteredWeight, Distance, KmeansConfig, Method, Solver};
use idkm::Error;

fn forward_backward(cfg: KmeansConfig, w: &Tensor) -> (Tensor, Tensor) {
    let layer = ClusteredWeight::new("layer1.weight", cfg).unwrap();
    let var = Var::from_tensor(w).unwrap();
    let out = layer.forward(&var).unwrap();
    let g = Tensor::ones_like(w).unwrap();
    let grad = (&out * g)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
        .get(&var)
        .unwrap()
        .clone();
    (out, grad)
}

fn finite(t: &Tensor) -> bool {
    flat(t).iter().all(|x| x.is_finite())
}

#[test]
fn user_errors_are_specific() {
    let w = randn(10, 1, 0, DType::F32);
    let err = |cfg: KmeansConfig, w: &Tensor| {
        ClusteredWeight::new("layer1.weight", cfg)
            .and_then(|l| l.forward(w).map(|_| ()))
            .unwrap_err()
    };
    let e = err(
        KmeansConfig {
            bits: 4,
            ..Default::default()
        },
        &w,
    );
    assert!(
        matches!(
            e,
            Error::TooFewVectors {
                vectors: 10,
                k: 16,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("layer1.weight"), "{e}");
    let e = err(
        KmeansConfig {
            bits: 1,
            cluster_dim: 4,
            ..Default::default()
        },
        &w,
    );
    assert!(
        matches!(
            e,
            Error::NotDivisible {
                numel: 10,
                dim: 4,
                ..
            }
        ),
        "{e}"
    );
    let e = err(
        KmeansConfig {
            tau: Some(0.0),
            ..Default::default()
        },
        &w,
    );
    assert!(e.to_string().contains("tau"), "{e}");
    let e = err(
        KmeansConfig {
            tau: Some(-0.1),
            ..Default::default()
        },
        &w,
    );
    assert!(matches!(e, Error::Config(_)), "{e}");

    let mut v = flat(&w);
    v[7] = f64::NAN;
    let bad = Tensor::from_vec(v, (10, 1), &Device::Cpu).unwrap();
    let e = err(
        KmeansConfig {
            bits: 1,
            ..Default::default()
        },
        &bad,
    );
    assert!(matches!(e, Error::NonFinite { index: 7, .. }), "{e}");
    assert!(e.to_string().contains("layer1.weight"), "{e}");
    // Also on a warm start (the fixed-point pass checks, not only the initialisation).
    let layer = ClusteredWeight::new(
        "layer2.weight",
        KmeansConfig {
            bits: 1,
            ..Default::default()
        },
    )
    .unwrap();
    layer.forward(&w.to_dtype(DType::F64).unwrap()).unwrap();
    let e = layer
        .forward(&bad.affine(1.0, f64::INFINITY).unwrap())
        .unwrap_err();
    assert!(
        e.to_string().contains("layer2.weight") && e.to_string().contains("non-finite"),
        "{e}"
    );
}

#[test]
fn all_weights_equal() {
    for distance in [Distance::Squared, Distance::Euclidean] {
        let solver = if distance == Distance::Squared {
            Solver::Cg
        } else {
            Solver::Gmres
        };
        for method in [Method::Dkm, Method::Idkm, Method::IdkmJfb] {
            let w = Tensor::full(0.25f32, (64, 2), &Device::Cpu).unwrap();
            let cfg = KmeansConfig {
                bits: 2,
                cluster_dim: 2,
                tau: Some(0.1),
                distance,
                method,
                solver,
                ..Default::default()
            };
            let (out, grad) = forward_backward(cfg, &w);
            assert!(rel_err(&out, &w) < 1e-6, "{method:?} {distance:?}");
            assert!(finite(&grad), "{method:?} {distance:?}: {:?}", flat(&grad));
        }
    }
}

#[test]
fn duplicate_weights() {
    // Only three distinct values, four centroids: two start (and stay) duplicates.
    let v: Vec<f32> = (0..90).map(|i| [-1.0, 0.0, 2.0][i % 3]).collect();
    let w = Tensor::from_vec(v, (90, 1), &Device::Cpu).unwrap();
    for method in [Method::Dkm, Method::Idkm, Method::IdkmJfb] {
        let cfg = KmeansConfig {
            bits: 2,
            tau: Some(0.05),
            method,
            ..Default::default()
        };
        let (out, grad) = forward_backward(cfg, &w);
        assert!(finite(&out) && finite(&grad), "{method:?}");
        assert!(
            rel_err(&out, &w) < 1e-4,
            "{method:?}: soft weights should sit on the values"
        );
    }
}

/// A centroid far from every weight has attention mass 0: it stays where it
/// is, and the gradient equals that of the problem without it.
#[test]
fn dead_centroid_is_kept_fixed_and_ignored() {
    let w: Vec<f64> = flat(&randn(200, 1, 9, DType::F64));
    let live = [-1.0, 0.0, 1.0];
    let with_dead = [-1.0, 0.0, 1.0, 1e4];
    let geo = |k| Geometry {
        k,
        d: 1,
        tau: 0.2,
        distance: Distance::Squared,
    };
    let (c3, _, _) = pass::fixed_point(&w, &live, &geo(3), 10_000, 1e-14);
    let (c4, _, _) = pass::fixed_point(&w, &with_dead, &geo(4), 10_000, 1e-14);
    assert_eq!(c4[3], 1e4);
    assert!(pass::soft_assign_reduce(&w, &c4, &geo(4)).dead() == 1);
    for j in 0..3 {
        assert!((c3[j] - c4[j]).abs() < 1e-12);
    }
    let g: Vec<f64> = flat(&randn(200, 1, 10, DType::F64));
    let cfg = idkm::cluster::backward::BackwardConfig {
        method: Method::Idkm,
        solver: Solver::Cg,
        tol: 1e-12,
        max_steps: 100,
    };
    let mut g3 = vec![0.0; 200];
    let mut g4 = vec![0.0; 200];
    idkm::cluster::backward::implicit_backward(&w, &c3, &g, &geo(3), &cfg, None, "w", &mut g3);
    idkm::cluster::backward::implicit_backward(&w, &c4, &g, &geo(4), &cfg, None, "w", &mut g4);
    for (a, b) in g3.iter().zip(&g4) {
        assert!((a - b).abs() < 1e-9 * (1.0 + a.abs()), "{a} vs {b}");
    }
}

#[test]
fn hard_assignment_and_export() {
    let v: Vec<f32> = (0..100)
        .map(|i| [-2.0, -1.0, 1.0, 3.0][i % 4] + 0.01 * (i % 7) as f32)
        .collect();
    let w = Tensor::from_vec(v.clone(), (10, 10), &Device::Cpu).unwrap();
    let layer = ClusteredWeight::new(
        "fc.weight",
        KmeansConfig {
            bits: 2,
            tau: Some(0.01),
            ..Default::default()
        },
    )
    .unwrap();
    let (indices, centroids) = layer.palettize(&w).unwrap();
    assert_eq!(indices.dtype(), DType::U32);
    let c = flat(&centroids);
    let idx: Vec<u32> = indices.to_vec1().unwrap();
    let hard = flat(&layer.hard(&w).unwrap());
    for (i, x) in v.iter().enumerate() {
        let nearest = (0..4)
            .min_by(|&a, &b| {
                (c[a] - *x as f64)
                    .abs()
                    .total_cmp(&(c[b] - *x as f64).abs())
            })
            .unwrap();
        assert_eq!(idx[i] as usize, nearest);
        assert_eq!(hard[i], c[nearest]);
        assert!((hard[i] - *x as f64).abs() < 0.05);
    }
}
