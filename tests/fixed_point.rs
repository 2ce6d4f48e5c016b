//! The forward solve reaches the k-means fixed point at the default
//! settings, and the gradient there is the implicit-function gradient,
//! against an independent f64 oracle (dense attention rows, the Jacobian
//! and the gradient written out from the chain rule; checked against finite
//! differences itself): heavy-tailed scalar weights (Student-t, 5 degrees
//! of freedom, like a trained conv layer) at 4, 6 and 8 bits, spreads from
//! 0.003 to 0.06, cold and warm starts.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use idkm::cluster::{ClusteredWeight, KmeansConfig, Method};
use idkm::model::{Arch, Model};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StudentT};

/// Scalar soft k-means in f64, written from the definitions.
mod oracle {
    /// Attention entries below this are dropped (their terms are below any
    /// tolerance here; f64 itself rounds them away next to the large ones).
    const NEGLIGIBLE: f64 = 1e-20;

    /// One weight's attention: `(j, a_ij)` for the centroids it attends to.
    pub fn attention(w: f64, c: &[f64], tau: f64) -> Vec<(usize, f64)> {
        let z: Vec<f64> = c.iter().map(|&c| -(w - c) * (w - c) / tau).collect();
        let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|z| (z - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.iter()
            .enumerate()
            .map(|(j, &e)| (j, e / sum))
            .filter(|&(_, a)| a > NEGLIGIBLE)
            .collect()
    }

    /// The k-means step `F(C)`, the masses `S` and the Jacobian
    /// `J_jl = dF_j/dc_l = (2/tau)/S_j sum_i a_ij (w_i - F_j)(delta_jl - a_il)(w_i - c_l)`.
    pub fn step_and_jacobian(w: &[f64], c: &[f64], tau: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let k = c.len();
        let rows: Vec<Vec<(usize, f64)>> = w.iter().map(|&x| attention(x, c, tau)).collect();
        let (mut s, mut sw) = (vec![0.0; k], vec![0.0; k]);
        for (x, row) in w.iter().zip(&rows) {
            for &(j, a) in row {
                s[j] += a;
                sw[j] += a * x;
            }
        }
        let f: Vec<f64> = sw.iter().zip(&s).map(|(a, b)| a / b).collect();
        let mut jac = vec![0.0; k * k];
        for (x, row) in w.iter().zip(&rows) {
            for &(j, aj) in row {
                for &(l, al) in row {
                    let delta = if j == l { 1.0 } else { 0.0 };
                    jac[j * k + l] += aj * (x - f[j]) * (delta - al) * (x - c[l]);
                }
            }
        }
        for j in 0..k {
            for l in 0..k {
                jac[j * k + l] *= 2.0 / tau / s[j];
            }
        }
        (f, s, jac)
    }

    /// Solves `a x = b` (row-major n x n) by Gaussian elimination with pivoting.
    pub fn solve(mut a: Vec<f64>, mut b: Vec<f64>) -> Vec<f64> {
        let n = b.len();
        for col in 0..n {
            let piv = (col..n)
                .max_by(|&x, &y| a[x * n + col].abs().total_cmp(&a[y * n + col].abs()))
                .unwrap();
            for j in 0..n {
                a.swap(col * n + j, piv * n + j);
            }
            b.swap(col, piv);
            for r in col + 1..n {
                let f = a[r * n + col] / a[col * n + col];
                for j in col..n {
                    a[r * n + j] -= f * a[col * n + j];
                }
                b[r] -= f * b[col];
            }
        }
        let mut x = vec![0.0; n];
        for r in (0..n).rev() {
            let s: f64 = (r + 1..n).map(|j| a[r * n + j] * x[j]).sum();
            x[r] = (b[r] - s) / a[r * n + r];
        }
        x
    }

    /// Newton's method `(I - J) dC = F(C) - C` from `c`, to `1e-13` of `scale`.
    pub fn fixed_point(w: &[f64], c: &[f64], tau: f64, scale: f64) -> Vec<f64> {
        let k = c.len();
        let mut c = c.to_vec();
        for _ in 0..50 {
            let (f, _, jac) = step_and_jacobian(w, &c, tau);
            let a: Vec<f64> = (0..k * k)
                .map(|i| if i / k == i % k { 1.0 } else { 0.0 } - jac[i])
                .collect();
            let delta = solve(a, f.iter().zip(&c).map(|(f, c)| f - c).collect());
            c.iter_mut().zip(&delta).for_each(|(c, d)| *c += d);
            if delta.iter().all(|d| d.abs() < 1e-13 * scale) {
                return c;
            }
        }
        panic!("the oracle's Newton iteration did not converge");
    }

    /// Whether the fixed point `c` is stable: `D (I - J)` (symmetric for
    /// the squared distance) positive definite, by Cholesky.
    pub fn stable(w: &[f64], c: &[f64], tau: f64) -> bool {
        let k = c.len();
        let (_, s, jac) = step_and_jacobian(w, c, tau);
        let b: Vec<f64> = (0..k * k)
            .map(|i| {
                let (j, l) = (i / k, i % k);
                let sym = 0.5 * (s[j] * jac[j * k + l] + s[l] * jac[l * k + j]);
                if j == l {
                    s[j] - sym
                } else {
                    -sym
                }
            })
            .collect();
        let mut lower = vec![0.0; k * k];
        for i in 0..k {
            for j in 0..=i {
                let sum: f64 = (0..j).map(|p| lower[i * k + p] * lower[j * k + p]).sum();
                let v = b[i * k + j] - sum;
                if i == j {
                    if v <= 0.0 {
                        return false;
                    }
                    lower[i * k + i] = v.sqrt();
                } else {
                    lower[i * k + j] = v / lower[j * k + j];
                }
            }
        }
        true
    }

    /// `dL/dw` for `L = sum_i g_i Wt_i`, `Wt_i = sum_j a_ij c_j`, at the
    /// fixed point `c`: the direct term `g_i (2/tau) Var_a(c)`, plus
    /// `F_W^T u` with `(I - J)^T u = h` (or `u = h`: JFB), where
    /// `h_l = sum_i g_i (a_il + (2/tau) a_il (w_i - c_l)(c_l - cbar_i))` and
    /// `dF_j/dw_i = (a_ij / S_j)(1 + (2/tau)(w_i - c_j)(c_j - cbar_i))`.
    pub fn gradient(w: &[f64], c: &[f64], g: &[f64], tau: f64, exact: bool) -> Vec<f64> {
        let k = c.len();
        let (_, s, jac) = step_and_jacobian(w, c, tau);
        let rows: Vec<Vec<(usize, f64)>> = w.iter().map(|&x| attention(x, c, tau)).collect();
        let cbar: Vec<f64> = rows
            .iter()
            .map(|row| row.iter().map(|&(j, a)| a * c[j]).sum())
            .collect();
        let mut h = vec![0.0; k];
        for i in 0..w.len() {
            for &(l, a) in &rows[i] {
                h[l] += g[i] * (a + 2.0 / tau * a * (w[i] - c[l]) * (c[l] - cbar[i]));
            }
        }
        let u = if exact {
            let a: Vec<f64> = (0..k * k)
                .map(|i| if i / k == i % k { 1.0 } else { 0.0 } - jac[(i % k) * k + i / k])
                .collect();
            solve(a, h)
        } else {
            h
        };
        (0..w.len())
            .map(|i| {
                let var: f64 = rows[i]
                    .iter()
                    .map(|&(j, a)| a * (c[j] - cbar[i]) * (c[j] - cbar[i]))
                    .sum();
                let implicit: f64 = rows[i]
                    .iter()
                    .map(|&(j, a)| {
                        u[j] * a / s[j] * (1.0 + 2.0 / tau * (w[i] - c[j]) * (c[j] - cbar[i]))
                    })
                    .sum();
                g[i] * 2.0 / tau * var + implicit
            })
            .collect()
    }
}

/// `m` Student-t (5 degrees of freedom) weights with standard deviation `spread`.
fn heavy_tailed(m: usize, spread: f64, seed: u64) -> Vec<f32> {
    let t = StudentT::new(5.0).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let scale = spread / (5.0f64 / 3.0).sqrt();
    (0..m)
        .map(|_| (t.sample(&mut rng) * scale) as f32)
        .collect()
}

fn tensor(v: &[f32]) -> Tensor {
    Tensor::from_vec(v.to_vec(), (v.len(), 1), &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    (diff / norm).sqrt()
}

/// The gradient of `sum(g * forward(w))` with respect to `w` through `layer`.
fn gradient(layer: &ClusteredWeight, w: &[f32], g: &[f32]) -> Vec<f64> {
    let var = Var::from_tensor(&tensor(w)).unwrap();
    let out = layer.forward(&var).unwrap();
    let grads = (out * tensor(g))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    values(grads.get(&var).unwrap())
}

/// Checks the layer's last fixed point on `w` against the oracle; returns
/// the centroids.
fn check(
    label: &str,
    layer: &ClusteredWeight,
    jfb: &ClusteredWeight,
    w: &[f32],
    g: &[f32],
    spread: f64,
) -> Vec<f64> {
    let grad = gradient(layer, w, g);
    let report = layer.last_forward().unwrap();
    let c = values(&layer.centroids().unwrap());
    let k = c.len();
    let tau = layer.tau().unwrap();
    assert!(report.converged, "{label}: {report:?}");
    let mut sorted = c.clone();
    sorted.sort_by(f64::total_cmp);
    let min_gap = sorted
        .windows(2)
        .map(|p| p[1] - p[0])
        .fold(f64::INFINITY, f64::min);
    assert!(
        min_gap > 1e-3 * spread,
        "{label}: centroids merged (smallest gap {:.1e} of the spread)",
        min_gap / spread
    );
    assert_eq!(report.distinct, k, "{label}: {report:?}");
    // The f64 fixed point nearest to idkm's centroids, and its stability.
    let w64: Vec<f64> = w.iter().map(|&x| f64::from(x)).collect();
    let g64: Vec<f64> = g.iter().map(|&x| f64::from(x)).collect();
    let star = oracle::fixed_point(&w64, &c, tau, spread);
    let distance = c
        .iter()
        .zip(&star)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
        / spread;
    assert!(
        distance <= 1e-3,
        "{label}: {distance:.1e} of the spread from the f64 fixed point ({report:?})"
    );
    assert!(
        oracle::stable(&w64, &star, tau),
        "{label}: the fixed point is not stable"
    );
    // The gradients at that fixed point.
    let exact = oracle::gradient(&w64, &star, &g64, tau, true);
    let err = rel_l2(&grad, &exact);
    assert!(err <= 1e-3, "{label}: IDKM gradient {err:.1e} from the implicit gradient at the fixed point ({report:?}, {:?})", layer.last_adjoint());
    let jfb_grad = gradient(jfb, w, g);
    let jfb_exact = oracle::gradient(&w64, &star, &g64, tau, false);
    let jfb_err = rel_l2(&jfb_grad, &jfb_exact);
    assert!(
        jfb_err <= 1e-3,
        "{label}: JFB gradient {jfb_err:.1e} from JFB at the fixed point"
    );
    eprintln!(
        "{label}: tau {tau:.2e}, {} iterations, {} + {} passes, distance {distance:.1e} (reported {:.1e}), cond {:.0}, \
         gradient error {err:.1e} (JFB {jfb_err:.1e}, JFB vs IDKM {:.2})",
        report.iterations,
        report.weight_passes,
        report.bin_passes,
        report.distance,
        report.cond.unwrap_or(f64::NAN),
        rel_l2(&jfb_exact, &exact)
    );
    c
}

#[test]
fn oracle_gradient_matches_finite_differences() {
    let w: Vec<f64> = heavy_tailed(60, 1.0, 7)
        .iter()
        .map(|&x| f64::from(x))
        .collect();
    let g: Vec<f64> = common::normal(60, 8);
    let tau = 0.3;
    let c0 = [-1.0, -0.2, 0.4, 1.3];
    let star = oracle::fixed_point(&w, &c0, tau, 1.0);
    let loss = |w: &[f64]| -> f64 {
        let c = oracle::fixed_point(w, &star, tau, 1.0);
        w.iter()
            .zip(&g)
            .map(|(&x, g)| {
                g * oracle::attention(x, &c, tau)
                    .iter()
                    .map(|&(j, a)| a * c[j])
                    .sum::<f64>()
            })
            .sum()
    };
    let grad = oracle::gradient(&w, &star, &g, tau, true);
    let eps = 1e-6;
    let fd: Vec<f64> = (0..w.len())
        .map(|i| {
            let (mut up, mut down) = (w.clone(), w.clone());
            up[i] += eps;
            down[i] -= eps;
            (loss(&up) - loss(&down)) / (2.0 * eps)
        })
        .collect();
    let err = rel_l2(&grad, &fd);
    assert!(err < 1e-6, "oracle vs finite differences: {err:e}");
}

/// Cold start (first forward) and warm start (the weights moved as by an
/// optimiser step), at the default configuration.
#[test]
fn default_solve_reaches_a_stable_fixed_point_with_the_exact_gradient() {
    for (bits, m) in [(4u32, 20_000usize), (6, 40_000), (8, 60_000)] {
        for spread in [0.003, 0.02, 0.06] {
            let seed = u64::from(bits) * 100 + (spread * 1000.0) as u64;
            let w = heavy_tailed(m, spread, seed);
            let g: Vec<f32> = common::normal(m, seed + 1)
                .iter()
                .map(|&x| x as f32)
                .collect();
            let config = KmeansConfig {
                bits,
                ..Default::default()
            };
            let layer = ClusteredWeight::new("w", config.clone()).unwrap();
            let jfb = ClusteredWeight::new(
                "w",
                KmeansConfig {
                    method: Method::IdkmJfb,
                    ..config
                },
            )
            .unwrap();
            let label = format!("{bits} bits, spread {spread}, cold");
            check(&label, &layer, &jfb, &w, &g, spread);
            let step: Vec<f32> = common::normal(m, seed + 2)
                .iter()
                .map(|&x| (x * 1e-3 * spread) as f32)
                .collect();
            let moved: Vec<f32> = w.iter().zip(&step).map(|(a, b)| a + b).collect();
            let label = format!("{bits} bits, spread {spread}, warm");
            check(&label, &layer, &jfb, &moved, &g, spread);
        }
    }
}

/// Weights times 10: the temperature times 100, the centroids times 10 and
/// the same hard assignments.
#[test]
fn weights_times_ten_give_centroids_times_ten() {
    let m = 40_000;
    let w = heavy_tailed(m, 0.02, 11);
    let run = |scale: f32| {
        let layer = ClusteredWeight::new(
            "w",
            KmeansConfig {
                bits: 4,
                ..Default::default()
            },
        )
        .unwrap();
        let scaled: Vec<f32> = w.iter().map(|x| x * scale).collect();
        let (indices, c) = layer.palettize(&tensor(&scaled)).unwrap();
        (
            indices.to_vec1::<u32>().unwrap(),
            values(&c),
            layer.tau().unwrap(),
        )
    };
    let (indices, c, tau) = run(1.0);
    let (indices10, c10, tau10) = run(10.0);
    assert!(
        (tau10 / tau - 100.0).abs() < 1e-3,
        "tau {tau:e} -> {tau10:e}"
    );
    let off = c
        .iter()
        .zip(&c10)
        .map(|(a, b)| (10.0 * a - b).abs())
        .fold(0.0, f64::max);
    assert!(off <= 1e-4 * 0.2, "centroids times 10 differ by {off:e}");
    let moved = indices
        .iter()
        .zip(&indices10)
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        moved <= m / 10_000,
        "{moved} of {m} weights changed cluster"
    );
}

/// A cold solve at 8 bits of the layer `name` of a freshly initialised
/// ResNet18-CIFAR (seed 0) at the temperature `tau` (None: derived):
/// asserts that it reaches a stable fixed point with every centroid
/// distinct, from runs of the weights, in at most three passes over them.
fn assert_few_passes_on_resnet18_layer(name: &str, tau: Option<f64>) {
    let model = Model::new(Arch::ResNet18Cifar, 3, 10, 0, &Device::Cpu).unwrap();
    let (_, w) = model
        .weights()
        .into_iter()
        .find(|(n, _)| n == name)
        .expect("the layer");
    let layer = ClusteredWeight::new(
        name,
        KmeansConfig {
            bits: 8,
            tau,
            ..Default::default()
        },
    )
    .unwrap();
    layer.forward(&w).unwrap();
    let r = layer.last_forward().unwrap();
    assert!(
        r.converged && r.stable == Some(true) && r.distinct == 256,
        "{name}: {r:?}"
    );
    assert!(r.bin_passes > 0 && r.weight_passes <= 3, "{name}: {r:?}");
}

/// A badly conditioned fixed point of a large layer: the last 3x3
/// convolution (2.4 M Kaiming-normal weights). The fixed point of runs of
/// nearby weights, as coarse as the other layers take, is badly
/// conditioned (cond(I - J) above 3,000) and was a saddle of the weights'
/// energy (22 damped passes over the weights from it, 78 where that runs'
/// solve, stopped by rounding, was not used); the finer runs leave two.
#[test]
fn a_badly_conditioned_large_layer_takes_few_passes_over_its_weights() {
    assert_few_passes_on_resnet18_layer("layer4.1.conv2.weight", None);
}

/// Near a saddle the residual of rounding size rises while the shifted
/// Newton steps leave it: the solve goes on rather than stopping there as
/// at a fixed point limited by rounding. `layer4.1.conv1` at a temperature
/// 1 % below its derived one at which both levels of runs come to
/// rounding size near a saddle (the path there is chaotic: 8.937e-9 does
/// not); stopped there, the solve discarded them and took 62 passes over
/// the weights from the optimal 1-D centroids, to a point neither
/// converged nor stable.
#[test]
fn a_solve_near_a_saddle_leaves_it() {
    assert_few_passes_on_resnet18_layer("layer4.1.conv1.weight", Some(8.937_232_767_905_648e-9));
}

/// Above the dense limit (k d > 256 unknowns) Newton's steps come from
/// conjugate gradient on matrix-vector products: the solve still ends at a
/// fixed point (one more k-means step moves no centroid by more than the
/// tolerance allows) and reports it stable.
#[test]
fn many_unknowns_reach_the_fixed_point_by_newton_krylov() {
    let (m, d, bits) = (20_000, 4, 7);
    let (w, _) = common::mixture(m, d, 1 << bits, 5, 0.3);
    let layer = ClusteredWeight::new(
        "w",
        KmeansConfig {
            bits,
            cluster_dim: d,
            ..Default::default()
        },
    )
    .unwrap();
    layer.forward(&w).unwrap();
    let report = layer.last_forward().unwrap();
    assert!(
        report.converged && report.stable == Some(true),
        "{report:?}"
    );
    assert_eq!(report.distinct, 1 << bits, "{report:?}");
    let c = layer.centroids().unwrap();
    let geo = idkm::cluster::streaming::Geometry {
        k: 1 << bits,
        d,
        tau: layer.tau().unwrap(),
        distance: idkm::cluster::Distance::Squared,
    };
    let next = idkm::cluster::reference::kmeans_step(&w, &c, &geo).unwrap();
    let shift = values(&(next - &c).unwrap().abs().unwrap().max(0).unwrap())
        .into_iter()
        .fold(0.0, f64::max);
    let spread = values(&w.sqr().unwrap().mean_all().unwrap())[0].sqrt();
    assert!(
        shift <= 1e-5 * spread,
        "a k-means step moves a centroid by {:.1e} of the spread",
        shift / spread
    );
}
