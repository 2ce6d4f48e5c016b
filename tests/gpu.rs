// Over 800 lines: one check per kernel and per device path, all on the shared fixtures of one file.
//! GPU checks (feature `cuda`; need an NVIDIA GPU): every kernel against its
//! CPU twin in `streaming` on random inputs, the device conjugate gradient
//! and the whole IDKM forward and backward on CUDA against the CPU, the
//! gradient against the dense f64 reference, a ResNet18 training step, and
//! (ignored; `scripts/gpu-check.sh` runs it) the layer benchmark on the GPU.
//!
//! `cargo test --release --features cuda --test gpu` on a machine with a GPU,
//! or build here and run there with `scripts/gpu-check.sh`.
#![cfg(feature = "cuda")]

mod common;

use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Device, Tensor, Var};
use common::{rel_poisoned as rel, wide, KernelCase as Case};
use idkm::cluster::backward::{self, Adjoint, BackwardConfig};
use idkm::cluster::cuda::{self, AtFixedPoint, Partials, Problem};
use idkm::cluster::forward;
use idkm::cluster::newton::Settings;
use idkm::cluster::reference;
use idkm::cluster::solve::SolveReport;
use idkm::cluster::streaming::{self as pass, Moments};
use idkm::cluster::{ClusteredWeight, Distance, KmeansConfig, Method, Solver};
use std::time::Instant;

/// Relative error bound of one kernel against its twin (f32 arithmetic in
/// both, rows summed in f64; only the order of the float operations differs).
const KERNEL_TOL: f64 = 1e-5;

fn gpu() -> Device {
    Device::new_cuda(0).expect(
        "no CUDA device: these tests need an NVIDIA GPU (scripts/gpu-check.sh runs them on one)",
    )
}

fn cuda_dev(dev: &Device) -> &CudaDevice {
    dev.as_cuda_device().expect("a CUDA device")
}

fn up<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr + 'static>(
    cd: &CudaDevice,
    v: &[T],
) -> CudaSlice<T> {
    cd.clone_htod(v).expect("copy to the device")
}

fn down<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr + Default + Clone>(
    cd: &CudaDevice,
    s: &CudaSlice<T>,
) -> Vec<T> {
    cd.clone_dtoh(s).expect("copy from the device")
}

/// An output buffer filled with NaN (f32).
fn poison_f32(cd: &CudaDevice, n: usize) -> CudaSlice<f32> {
    up(cd, &vec![f32::NAN; n])
}

/// An output buffer filled with NaN (f64).
fn poison_f64(cd: &CudaDevice, n: usize) -> CudaSlice<f64> {
    up(cd, &vec![f64::NAN; n])
}

/// The launch shape of a case on the device.
trait OnDevice {
    fn problem(&self) -> Problem;
}

impl OnDevice for Case {
    fn problem(&self) -> Problem {
        Problem::new(self.m, self.geo.d, &self.geo).expect("valid problem")
    }
}

/// k in {2, 16, 256}, d in {1, 2, 4, 8}, m with tails (never a multiple of
/// the block, the tile or the per-block chunk), both distances, and a dead
/// centroid.
fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let mut seed = 1;
    for k in [2usize, 16, 256] {
        for d in [1usize, 2, 4, 8] {
            for (m, distance) in [
                (k + 37, Distance::Euclidean),
                (1037, Distance::Squared),
                (1037, Distance::Euclidean),
                (70_001, Distance::Squared),
            ] {
                out.push(Case::new(m, k, d, distance, seed, false));
                seed += 1;
            }
        }
    }
    out.push(Case::new(5003, 16, 1, Distance::Squared, seed, true));
    out.push(Case::new(5003, 16, 4, Distance::Euclidean, seed + 1, true));
    out
}

/// Runs `check` on every case, prints one line each, and fails listing
/// every case whose error exceeds `tol`.
fn for_each_case(kernel: &str, tol: f64, mut check: impl FnMut(&CudaDevice, &Case) -> f64) {
    let dev = gpu();
    let cd = cuda_dev(&dev);
    let mut failures = Vec::new();
    let mut worst = 0f64;
    let mut count = 0;
    for case in cases() {
        count += 1;
        let err = check(cd, &case);
        worst = worst.max(err);
        if err.is_nan() || err > tol {
            failures.push(format!("{}: rel err {err:.3e}", case.label()));
        }
    }
    println!("{kernel}: worst rel err {worst:.3e} over {count} cases");
    assert!(
        failures.is_empty(),
        "{kernel} differs from its CPU twin (tol {tol:e}):\n{}",
        failures.join("\n")
    );
}

fn moments_from(sums: &[f64], k: usize) -> Moments {
    Moments {
        mass: sums[..k].to_vec(),
        weighted: sums[k..].to_vec(),
    }
}

// ----------------------------------------------------------------------------
// Kernels against their twins

#[test]
fn soft_assign_reduce_matches_twin() {
    for_each_case("soft_assign_reduce", KERNEL_TOL, |cd, case| {
        let p = case.problem();
        let (w, c) = (up(cd, &case.w), up(cd, &case.c));
        let len = p.k * (p.d + 1);
        let mut sums = poison_f64(cd, len);
        let mut scratch = Partials::new(cd, &p, len).unwrap();
        cuda::soft_assign_reduce(cd, &p, &w.as_view(), &c.as_view(), &mut scratch, &mut sums)
            .unwrap();
        let got = down(cd, &sums);
        let twin = pass::soft_assign_reduce(&case.w, &case.c, &case.geo);
        let want: Vec<f64> = twin.mass.iter().chain(&twin.weighted).copied().collect();
        rel(&got, &want)
    });
}

#[test]
fn kmeans_update_and_inverse_mass_match_twin() {
    // From the same sums (the device's), the update is the same f64
    // arithmetic: F(C) and 1/S bit for bit, and the shift too (measured on
    // the f32-rounded centroids, the sum of squares unfused with
    // __dadd_rn/__dmul_rn); the bound leaves room for a libm difference.
    for_each_case("kmeans_update + inverse_mass", 1e-12, |cd, case| {
        let p = case.problem();
        let (w, c) = (up(cd, &case.w), up(cd, &case.c));
        let len = p.k * (p.d + 1);
        let mut sums = poison_f64(cd, len);
        let mut scratch = Partials::new(cd, &p, len).unwrap();
        cuda::soft_assign_reduce(cd, &p, &w.as_view(), &c.as_view(), &mut scratch, &mut sums)
            .unwrap();
        let mut next = poison_f32(cd, p.n());
        let mut shift = poison_f64(cd, 1);
        let mut converged = up(cd, &[7u32]);
        let tol = 1e-3;
        cuda::kmeans_update(
            cd,
            &p,
            &sums,
            &c.as_view(),
            tol,
            &mut next,
            &mut shift,
            &mut converged,
        )
        .unwrap();
        let mut inv = poison_f64(cd, p.k);
        cuda::inverse_mass(cd, &p, &sums, &mut inv).unwrap();

        let moments = moments_from(&down(cd, &sums), p.k);
        let mut want_next = case.c.clone();
        let want_shift = moments.update(&case.c, &mut want_next, p.d);
        let got_next = down(cd, &next);
        let got_shift = down(cd, &shift)[0];
        let got_conv = down(cd, &converged)[0];
        let got_inv = down(cd, &inv);
        let mut err = rel(&wide(&got_next), &wide(&want_next));
        err = err.max(rel(&got_inv, &moments.inverse_mass()));
        err = err.max(rel(&[got_shift], &[want_shift]));
        if got_conv != u32::from(want_shift <= tol) {
            err = f64::INFINITY;
        }
        if case.c[0] == 1e3 {
            assert_eq!(
                moments.dead(),
                1,
                "{}: centroid 0 should be dead",
                case.label()
            );
            assert_eq!(got_inv[0], 0.0);
        }
        err
    });
}

#[test]
fn soft_assign_output_matches_twin() {
    for_each_case("soft_assign_output", KERNEL_TOL, |cd, case| {
        let p = case.problem();
        let (w, c) = (up(cd, &case.w), up(cd, &case.c));
        let mut out = poison_f32(cd, p.m * p.d);
        cuda::soft_assign_output(cd, &p, &w.as_view(), &c.as_view(), &mut out).unwrap();
        let mut want = vec![0f32; p.m * p.d];
        pass::soft_assign_output(&case.w, &case.c, &case.geo, &mut want);
        rel(&wide(&down(cd, &out)), &wide(&want))
    });
}

#[test]
fn hard_assign_matches_twin() {
    // Indices must agree, except where two centroids are equally near to
    // float rounding (the kernel may fuse multiply-adds).
    for_each_case(
        "hard_assign (fraction of rows differing)",
        0.0,
        |cd, case| {
            let p = case.problem();
            let (w, c) = (up(cd, &case.w), up(cd, &case.c));
            let mut out = up(cd, &vec![u32::MAX; p.m]);
            cuda::hard_assign(cd, &p, &w.as_view(), &c.as_view(), &mut out).unwrap();
            let got = down(cd, &out);
            let mut want = vec![0u32; p.m];
            pass::hard_assign(&case.w, &case.c, p.d, &mut want);
            let dist = |i: usize, j: u32| -> f64 {
                (0..p.d)
                    .map(|e| {
                        (case.w[i * p.d + e] as f64 - case.c[j as usize * p.d + e] as f64).powi(2)
                    })
                    .sum()
            };
            let mut bad = 0;
            for i in 0..p.m {
                if got[i] as usize >= p.k {
                    bad += 1;
                } else if got[i] != want[i] {
                    let (a, b) = (dist(i, got[i]), dist(i, want[i]));
                    if (a - b).abs() > 1e-6 * b.max(1e-12) {
                        bad += 1;
                    }
                }
            }
            bad as f64 / p.m as f64
        },
    );
}

#[test]
fn centroid_cotangent_matches_twin() {
    for_each_case("centroid_cotangent", KERNEL_TOL, |cd, case| {
        let p = case.problem();
        let (w, c, g) = (up(cd, &case.w), up(cd, &case.c), up(cd, &case.g));
        let mut h = poison_f64(cd, p.n());
        let mut scratch = Partials::new(cd, &p, p.n()).unwrap();
        cuda::centroid_cotangent(
            cd,
            &p,
            &w.as_view(),
            &c.as_view(),
            &g.as_view(),
            &mut scratch,
            &mut h,
        )
        .unwrap();
        rel(
            &down(cd, &h),
            &pass::centroid_cotangent(&case.w, &case.c, &case.g, &case.geo),
        )
    });
}

#[test]
fn adjoint_matvec_matches_twin() {
    for_each_case("adjoint_matvec", KERNEL_TOL, |cd, case| {
        let p = case.problem();
        let (f, inv) = case.twin_at();
        let (w, c, fd, invd, u) = (
            up(cd, &case.w),
            up(cd, &case.c),
            up(cd, &f),
            up(cd, &inv),
            up(cd, &case.u),
        );
        let mut out = poison_f64(cd, p.n());
        let mut scratch = Partials::new(cd, &p, p.n()).unwrap();
        cuda::adjoint_matvec(
            cd,
            &p,
            &w.as_view(),
            &c.as_view(),
            &fd.as_view(),
            &invd,
            &u,
            &mut scratch,
            &mut out,
        )
        .unwrap();
        rel(
            &down(cd, &out),
            &pass::adjoint_matvec(&case.w, &case.c, &f, &inv, &case.u, &case.geo),
        )
    });
}

#[test]
fn weight_grad_matches_twin() {
    for_each_case("weight_grad", KERNEL_TOL, |cd, case| {
        let p = case.problem();
        let (f, inv) = case.twin_at();
        let (w, c, fd, g, invd, u) = (
            up(cd, &case.w),
            up(cd, &case.c),
            up(cd, &f),
            up(cd, &case.g),
            up(cd, &inv),
            up(cd, &case.u),
        );
        let mut out = poison_f32(cd, p.m * p.d);
        cuda::weight_grad(
            cd,
            &p,
            &w.as_view(),
            &c.as_view(),
            &fd.as_view(),
            &g.as_view(),
            &invd,
            &u,
            &mut out,
        )
        .unwrap();
        let mut want = vec![0f32; p.m * p.d];
        pass::weight_grad(
            &case.w, &case.c, &f, &case.g, &inv, &case.u, &case.geo, &mut want,
        );
        rel(&wide(&down(cd, &out)), &wide(&want))
    });
}

#[test]
fn first_non_finite_finds_the_first_bad_value() {
    let dev = gpu();
    let cd = cuda_dev(&dev);
    let mut w: Vec<f32> = common::normal(300_001, 5)
        .iter()
        .map(|&x| x as f32)
        .collect();
    let wd = up(cd, &w);
    cuda::check_finite(cd, &wd.as_view(), "layer.weight").expect("all finite");
    w[250_000] = f32::NEG_INFINITY;
    w[123_457] = f32::NAN;
    w[299_999] = f32::INFINITY;
    let wd = up(cd, &w);
    let err = cuda::check_finite(cd, &wd.as_view(), "layer.weight")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layer.weight") && err.contains("123457"),
        "{err}"
    );
}

#[test]
fn fixed_point_matches_twin() {
    // tol = 0: both run exactly max_iter steps.
    for_each_case("fixed_point (5 steps)", KERNEL_TOL, |cd, case| {
        let p = case.problem();
        let (w, c0) = (up(cd, &case.w), up(cd, &case.c));
        let (c, steps, shift) =
            cuda::fixed_point(cd, &p, &w.as_view(), &c0.as_view(), 5, 0.0).unwrap();
        let (want, want_steps, want_shift) = pass::fixed_point(&case.w, &case.c, &case.geo, 5, 0.0);
        assert_eq!(steps, want_steps, "{}", case.label());
        assert!(
            shift.is_finite() && (shift - want_shift).abs() <= 1e-3 * want_shift.abs() + 1e-6,
            "{}: shift {shift} vs {want_shift}",
            case.label()
        );
        rel(&wide(&down(cd, &c)), &wide(&want))
    });
    // Convergence stops the loop where the twin stops (same shift test).
    let dev = gpu();
    let cd = cuda_dev(&dev);
    let case = Case::new(20_011, 16, 1, Distance::Squared, 99, false);
    let p = case.problem();
    let (w, c0) = (up(cd, &case.w), up(cd, &case.c));
    let (_, steps, shift) =
        cuda::fixed_point(cd, &p, &w.as_view(), &c0.as_view(), 500, 1e-4).unwrap();
    let (_, want_steps, _) = pass::fixed_point(&case.w, &case.c, &case.geo, 500, 1e-4);
    assert!(
        shift <= 1e-4 && steps.abs_diff(want_steps) <= 1,
        "steps {steps} vs {want_steps}, shift {shift}"
    );
}

/// Root-mean-square distance of the weights (m x d) from their mean.
fn spread(w: &[f32], d: usize) -> f64 {
    let m = (w.len() / d) as f64;
    let mut mean = vec![0f64; d];
    w.chunks(d).for_each(|row| {
        row.iter()
            .zip(&mut mean)
            .for_each(|(&x, s)| *s += f64::from(x) / m)
    });
    let squares: f64 = w
        .chunks(d)
        .flat_map(|row| {
            row.iter()
                .zip(&mean)
                .map(|(&x, s)| (f64::from(x) - s).powi(2))
        })
        .sum();
    (squares / m).sqrt()
}

#[test]
fn newton_fixed_point_matches_twin() {
    // The device map (k-means passes by kernel, the matrix column by column)
    // drives the same Newton iteration as the CPU: both reach the same fixed
    // point, to f32 rounding relative to the spread.
    let dev = gpu();
    let cd = cuda_dev(&dev);
    for (k, d, seed) in [(16usize, 1usize, 41u64), (16, 4, 42), (64, 2, 43)] {
        let case = Case::new(20_011, k, d, Distance::Squared, seed, false);
        let spread = spread(&case.w, d);
        let want = forward::newton_fixed_point(
            &case.w, &case.c, &case.geo, 100, 1e-6, spread, None, false,
        )
        .unwrap();
        let settings = Settings {
            k,
            d,
            distance: Distance::Squared,
            tol: 1e-6,
            spread,
            max_iter: 100,
            condition: true,
        };
        let p = case.problem();
        let (w, c0) = (up(cd, &case.w), up(cd, &case.c));
        let (c, report) =
            cuda::newton_fixed_point(cd, &p, &w.as_view(), &c0.as_view(), settings).unwrap();
        let got = down(cd, &c);
        let gap = got
            .iter()
            .zip(&want.c)
            .map(|(&a, &b)| (f64::from(a) - b).abs())
            .fold(0.0, f64::max)
            / spread;
        println!(
            "{}: gap {gap:.2e} of the spread, gpu {report:?}, cpu {:?}",
            case.label(),
            want.report
        );
        assert!(
            report.converged && want.report.converged,
            "{}: not converged",
            case.label()
        );
        assert!(
            gap < 1e-4,
            "{}: device fixed point {gap:.2e} of the spread from the CPU's",
            case.label()
        );
    }
}

// ----------------------------------------------------------------------------
// The backward as a whole

fn report(a: &Adjoint) -> Option<SolveReport> {
    match a {
        Adjoint::Solved(r) | Adjoint::BestIterate(r) | Adjoint::FellBackToJfb(r) => Some(*r),
        Adjoint::JacobianFree | Adjoint::Reused { .. } => None,
    }
}

#[test]
fn implicit_backward_matches_cpu() {
    // At a converged fixed point (attracting: CG applies), every method and
    // solver: the device CG, and GMRES / Neumann / dense (auto: dense up to
    // k d = 256, GMRES above) from the host loop.
    let dev = gpu();
    let cd = cuda_dev(&dev);
    let mut failures = Vec::new();
    let mut seed = 500;
    for (k, d) in [(2usize, 1usize), (16, 1), (16, 4), (256, 1), (256, 2)] {
        for (distance, method, solver) in [
            (Distance::Squared, Method::Idkm, Solver::Cg),
            (Distance::Squared, Method::IdkmJfb, Solver::Cg),
            (Distance::Squared, Method::Idkm, Solver::Neumann),
            (Distance::Euclidean, Method::Idkm, Solver::Gmres),
            (Distance::Euclidean, Method::Idkm, Solver::Auto),
        ] {
            seed += 1;
            let mut case = Case::new(20_011, k, d, distance, seed, false);
            let (c, _, _) = pass::fixed_point(&case.w, &case.c, &case.geo, 200, 1e-7);
            case.c = c;
            let cfg = BackwardConfig {
                method,
                solver,
                tol: 1e-6,
                max_steps: 200,
            };
            let mut want = vec![0f32; case.m * d];
            let want_adj = backward::implicit_backward(
                &case.w, &case.c, &case.g, &case.geo, &cfg, None, "cpu", &mut want,
            );
            let p = case.problem();
            let (w, c, g) = (up(cd, &case.w), up(cd, &case.c), up(cd, &case.g));
            let (out, adj) = cuda::implicit_backward(
                cd,
                &p,
                &w.as_view(),
                &c.as_view(),
                &g.as_view(),
                &cfg,
                "gpu",
            )
            .unwrap();
            let err = rel(&wide(&down(cd, &out)), &wide(&want));
            let same_kind = std::mem::discriminant(&adj) == std::mem::discriminant(&want_adj);
            let steps = (
                report(&adj).map(|r| r.steps),
                report(&want_adj).map(|r| r.steps),
            );
            println!(
                "{} {method:?} {solver:?}: rel err {err:.2e}, gpu {adj:?}, cpu {want_adj:?}",
                case.label()
            );
            let close_steps = match steps {
                (Some(a), Some(b)) => a.abs_diff(b) <= 3,
                (None, None) => true,
                _ => false,
            };
            if err.is_nan() || err > 1e-4 || !same_kind || !close_steps {
                failures.push(format!(
                    "{} {method:?} {solver:?}: rel err {err:.2e}, gpu {adj:?}, cpu {want_adj:?}",
                    case.label()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn device_cg_matches_host_cg_step_for_step() {
    // The same system solved by the device CG and by solve::conjugate_gradient
    // with device matvecs: the same steps, residuals within rounding.
    let dev = gpu();
    let cd = cuda_dev(&dev);
    for (k, d) in [(16usize, 1usize), (256, 1), (64, 8)] {
        let mut case = Case::new(30_011, k, d, Distance::Squared, 77 + k as u64, false);
        let (c, _, _) = pass::fixed_point(&case.w, &case.c, &case.geo, 200, 1e-7);
        case.c = c;
        let p = case.problem();
        let (w, c, g) = (up(cd, &case.w), up(cd, &case.c), up(cd, &case.g));
        let at = AtFixedPoint::new(cd, &p, &w.as_view(), &c.as_view()).unwrap();
        let mut h = poison_f64(cd, p.n());
        let mut scratch = Partials::new(cd, &p, p.n()).unwrap();
        cuda::centroid_cotangent(
            cd,
            &p,
            &w.as_view(),
            &c.as_view(),
            &g.as_view(),
            &mut scratch,
            &mut h,
        )
        .unwrap();
        for max_steps in [0usize, 1, 3, 200] {
            let (u, rep) = cuda::conjugate_gradient(
                cd,
                &p,
                &w.as_view(),
                &c.as_view(),
                &at,
                &h,
                1e-8,
                max_steps,
            )
            .unwrap();
            // Host CG with the device's matvec.
            let (mass, inv) = {
                let sums = down(cd, &at.sums);
                (sums[..p.k].to_vec(), down(cd, &at.inv_mass))
            };
            let scale: Vec<f64> = (0..p.n())
                .map(|i| {
                    if inv[i / p.d] > 0.0 {
                        mass[i / p.d]
                    } else {
                        1.0
                    }
                })
                .collect();
            let mut out = poison_f64(cd, p.n());
            let mut ud = poison_f64(cd, p.n());
            let apply = |v: &[f64]| -> Vec<f64> {
                let dv: Vec<f64> = v.iter().zip(&scale).map(|(a, s)| a * s).collect();
                cd.memcpy_htod(&dv, &mut ud).unwrap();
                cuda::adjoint_matvec(
                    cd,
                    &p,
                    &w.as_view(),
                    &c.as_view(),
                    &at.f.as_view(),
                    &at.inv_mass,
                    &ud,
                    &mut scratch,
                    &mut out,
                )
                .unwrap();
                let jt = down(cd, &out);
                dv.iter().zip(jt).map(|(a, b)| a - b).collect()
            };
            let (v, want) =
                idkm::cluster::solve::conjugate_gradient(apply, &down(cd, &h), 1e-8, max_steps);
            let want_u: Vec<f64> = v.iter().zip(&scale).map(|(a, s)| a * s).collect();
            let err = rel(&down(cd, &u), &want_u);
            println!("k={k} d={d} max_steps={max_steps}: device {rep:?}, host {want:?}, u rel err {err:.2e}");
            // The matvecs are the same kernel on the same vectors; only the
            // order of the dot products' additions differs.
            assert!(
                rep.steps.abs_diff(want.steps) <= 1,
                "k={k} d={d} max_steps={max_steps}: steps"
            );
            assert_eq!(
                rep.converged, want.converged,
                "k={k} d={d} max_steps={max_steps}"
            );
            if max_steps <= 3 {
                assert_eq!(rep.steps, want.steps);
                assert!(err <= 1e-6, "u rel err {err}");
                assert!(
                    (rep.rel_residual - want.rel_residual).abs()
                        <= 1e-6 * want.rel_residual + 1e-15,
                    "residual"
                );
            } else {
                assert!(err <= 1e-5, "u rel err {err}");
            }
        }
    }
}

// ----------------------------------------------------------------------------
// Through candle: the CustomOps and the layer

fn tensor_f32(v: &[f32], shape: (usize, usize), dev: &Device) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, dev).unwrap()
}

fn flat(t: &Tensor) -> Vec<f64> {
    common::flat(&t.to_device(&Device::Cpu).unwrap())
}

#[test]
fn layer_on_cuda_matches_cpu() {
    let dev = gpu();
    let mut failures = Vec::new();
    for (bits, d, distance, method, solver) in [
        (4u32, 1usize, Distance::Squared, Method::Idkm, Solver::Cg),
        (4, 2, Distance::Squared, Method::IdkmJfb, Solver::Cg),
        (2, 4, Distance::Euclidean, Method::Idkm, Solver::Gmres),
        (8, 1, Distance::Squared, Method::Idkm, Solver::Cg),
        (4, 1, Distance::Squared, Method::Idkm, Solver::Auto),
        (3, 1, Distance::Squared, Method::Dkm, Solver::Cg),
    ] {
        let k = 1usize << bits;
        let m = 9_001;
        let case = Case::new(m, k, d, distance, 900 + bits as u64, false);
        let config = KmeansConfig {
            bits,
            cluster_dim: d,
            tau: Some(case.geo.tau),
            distance,
            method,
            solver,
            max_iter: 30,
            tol: 0.0,
            ..Default::default()
        };
        let label = format!("bits={bits} d={d} {distance:?} {method:?} {solver:?}");
        let shape = (m, d);
        let (w_cpu, g_cpu) = (
            tensor_f32(&case.w, shape, &Device::Cpu),
            tensor_f32(&case.g, shape, &Device::Cpu),
        );
        let (w_gpu, g_gpu) = (
            tensor_f32(&case.w, shape, &dev),
            tensor_f32(&case.g, shape, &dev),
        );
        let cpu = ClusteredWeight::new("cpu.weight", config.clone()).unwrap();
        let gpu_layer = ClusteredWeight::new("gpu.weight", config.clone()).unwrap();
        // Forward twice (the second warm-starts), then the gradient.
        for _ in 0..2 {
            let (a, b) = (
                cpu.forward(&w_cpu).unwrap(),
                gpu_layer.forward(&w_gpu).unwrap(),
            );
            assert!(b.device().is_cuda());
            let err = rel(&flat(&b), &flat(&a));
            if err.is_nan() || err > 1e-4 {
                failures.push(format!("{label}: forward rel err {err:.2e}"));
            }
        }
        let cerr = rel(
            &flat(&gpu_layer.centroids().unwrap()),
            &flat(&cpu.centroids().unwrap()),
        );
        let (ga, gb) = (
            cpu.weight_grad(&w_cpu, &g_cpu).unwrap(),
            gpu_layer.weight_grad(&w_gpu, &g_gpu).unwrap(),
        );
        let gerr = rel(&flat(&gb), &flat(&ga));
        // Autograd through the op's bwd on CUDA gives the same gradient.
        let var = Var::from_tensor(&w_gpu).unwrap();
        let out = gpu_layer.forward(&var).unwrap();
        let grads = (out * &g_gpu)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let aerr = rel(&flat(grads.get(&var).unwrap()), &flat(&ga));
        let (ia, _) = cpu.palettize(&w_cpu).unwrap();
        let (ib, _) = gpu_layer.palettize(&w_gpu).unwrap();
        let (ia, ib) = (
            ia.to_vec1::<u32>().unwrap(),
            ib.to_device(&Device::Cpu)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap(),
        );
        let differ = ia.iter().zip(&ib).filter(|(a, b)| a != b).count() as f64 / m as f64;
        println!(
            "{label}: centroids {cerr:.2e}, grad {gerr:.2e}, autograd {aerr:.2e}, indices differing {differ:.1e}, adjoint gpu {:?} cpu {:?}",
            gpu_layer.last_adjoint(),
            cpu.last_adjoint()
        );
        let tol = if method == Method::Dkm { 1e-3 } else { 1e-4 };
        if !(cerr <= 1e-4 && gerr <= tol && aerr <= tol && differ <= 1e-3) {
            failures.push(format!("{label}: centroids {cerr:.2e}, grad {gerr:.2e}, autograd {aerr:.2e}, indices {differ:.1e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn cuda_gradient_matches_dense_reference() {
    // The GPU's IDKM gradient at its own fixed point against the dense f64
    // implicit gradient (autograd VJPs and a direct solve) at that point.
    let dev = gpu();
    for (d, distance, solver) in [
        (1usize, Distance::Squared, Solver::Cg),
        (2, Distance::Euclidean, Solver::Gmres),
    ] {
        let (m, bits) = (2_000, 2u32);
        let case = Case::new(m, 1 << bits, d, distance, 4242 + d as u64, false);
        let config = KmeansConfig {
            bits,
            cluster_dim: d,
            tau: Some(case.geo.tau),
            distance,
            solver,
            max_iter: 300,
            tol: 1e-7,
            solver_tol: 1e-9,
            solver_max_steps: 300,
            ..Default::default()
        };
        let layer = ClusteredWeight::new("ref.weight", config).unwrap();
        let (w, g) = (
            tensor_f32(&case.w, (m, d), &dev),
            tensor_f32(&case.g, (m, d), &dev),
        );
        layer.forward(&w).unwrap();
        let got = layer.weight_grad(&w, &g).unwrap();
        let c = layer
            .centroids()
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let w64 = w
            .to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let g64 = g
            .to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let want =
            reference::implicit_grad(&w64, &c, &g64, &case.geo, reference::Adjoint::Exact).unwrap();
        let err = rel(&flat(&got), &flat(&want));
        println!("d={d} {distance:?} {solver:?}: GPU gradient vs dense f64 reference: rel err {err:.2e} ({:?})", layer.last_adjoint());
        assert!(err <= 1e-3, "rel err {err}");
    }
}

#[test]
fn cuda_refuses_f64_and_non_finite_weights_by_name() {
    let dev = gpu();
    let w = Tensor::randn(0f64, 1.0, (512, 1), &dev).unwrap();
    let layer = ClusteredWeight::new(
        "conv9.weight",
        KmeansConfig {
            bits: 2,
            tau: Some(0.1),
            ..Default::default()
        },
    )
    .unwrap();
    let err = layer.forward(&w).unwrap_err().to_string();
    assert!(
        err.contains("conv9.weight") && err.contains("f32") && err.contains("F64"),
        "{err}"
    );

    // The host checks the weights at initialisation; on a warm start the
    // device kernel does.
    let mut v: Vec<f32> = common::normal(512, 3).iter().map(|&x| x as f32).collect();
    let layer = ClusteredWeight::new(
        "conv9.weight",
        KmeansConfig {
            bits: 2,
            tau: Some(0.1),
            ..Default::default()
        },
    )
    .unwrap();
    layer.forward(&tensor_f32(&v, (512, 1), &dev)).unwrap();
    v[301] = f32::NAN;
    let err = layer
        .forward(&tensor_f32(&v, (512, 1), &dev))
        .unwrap_err()
        .to_string();
    assert!(err.contains("conv9.weight") && err.contains("301"), "{err}");
}

// ----------------------------------------------------------------------------
// A ResNet18 training step on CUDA

fn peak_mib(cd: &CudaDevice, base: u64) -> f64 {
    let (_, high) = cuda::pool_memory(cd).unwrap();
    high.saturating_sub(base) as f64 / 1048576.0
}

#[test]
fn resnet18_training_step_on_cuda() {
    use idkm::model::{Arch, Model, Weights};
    use idkm::quantize::{Clustering, QuantizePlan};
    use idkm::train::{Optimizer, OptimizerKind, SgdConfig};

    let dev = gpu();
    let cd = cuda_dev(&dev);
    let batch = 32;
    let x: Vec<f32> = common::normal(batch * 3 * 32 * 32, 11)
        .iter()
        .map(|&x| x as f32)
        .collect();
    let labels: Vec<u32> = (0..batch as u32).map(|i| (i * 7) % 10).collect();
    let step = |clustered: bool| -> (f32, f32, f64, f64) {
        let model = Model::new(Arch::ResNet18Cifar, 3, 10, 5, &dev).unwrap();
        let clustering = clustered.then(|| {
            let config = KmeansConfig {
                bits: 4,
                method: Method::Idkm,
                ..Default::default()
            };
            Clustering::new(&model, &QuantizePlan::new(config)).unwrap()
        });
        let weights = match &clustering {
            Some(c) => Weights::Clustered(c),
            None => Weights::Float,
        };
        let xs = Tensor::from_vec(x.clone(), (batch, 3, 32, 32), &dev).unwrap();
        let ys = Tensor::from_vec(labels.clone(), batch, &dev).unwrap();
        let vars: Vec<_> = model.trainable().into_iter().map(|(_, v)| v).collect();
        let sgd = OptimizerKind::Sgd(SgdConfig {
            momentum: 0.9,
            nesterov: false,
            weight_decay: 5e-4,
        });
        let mut opt = Optimizer::new(sgd, vars, 0.01).unwrap();
        let loss = || {
            let logits = model.forward(&xs, true, &weights).unwrap();
            candle_nn::loss::cross_entropy(&logits, &ys).unwrap()
        };
        // Warm-up step (initialises the clustering, loads the kernels), then a timed one.
        let l0 = loss();
        opt.step(&l0.backward().unwrap()).unwrap();
        cuda::reset_pool_peak(cd).unwrap();
        let (base, _) = cuda::pool_memory(cd).unwrap();
        let start = Instant::now();
        let l = loss();
        let grads = l.backward().unwrap();
        for (name, var) in model.trainable() {
            let g = grads
                .get(&var)
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm.is_finite(), "{name}: gradient norm {norm}");
        }
        opt.step(&grads).unwrap();
        dev.synchronize().unwrap();
        let secs = start.elapsed().as_secs_f64();
        if let Some(c) = &clustering {
            let mut kinds = std::collections::BTreeMap::new();
            for (name, layer) in c.layers() {
                let adj = layer
                    .last_adjoint()
                    .unwrap_or_else(|| panic!("{name}: no backward ran"));
                let kind = format!("{adj:?}")
                    .split('(')
                    .next()
                    .unwrap_or("")
                    .to_string();
                *kinds.entry(kind).or_insert(0) += 1;
            }
            println!("resnet18-cifar 4-bit IDKM: adjoint solves per outcome {kinds:?}");
        }
        let l1 = loss().to_scalar::<f32>().unwrap();
        (l.to_scalar::<f32>().unwrap(), l1, secs, peak_mib(cd, base))
    };
    let (fp_loss, fp_after, fp_secs, fp_mib) = step(false);
    let (q_loss, q_after, q_secs, q_mib) = step(true);
    println!("resnet18-cifar step, batch {batch}: fp32 {fp_secs:.3} s, peak +{fp_mib:.0} MiB, loss {fp_loss:.4} -> {fp_after:.4}");
    println!("resnet18-cifar step, batch {batch}: 4-bit IDKM {q_secs:.3} s, peak +{q_mib:.0} MiB, loss {q_loss:.4} -> {q_after:.4}");
    assert!(
        fp_loss.is_finite() && q_loss.is_finite() && fp_after.is_finite() && q_after.is_finite()
    );

    // The float forward agrees with the CPU (same seed, same batch).
    let cpu_model = Model::new(Arch::ResNet18Cifar, 3, 10, 5, &Device::Cpu).unwrap();
    let gpu_model = Model::new(Arch::ResNet18Cifar, 3, 10, 5, &dev).unwrap();
    let xs = Tensor::from_vec(x.clone(), (batch, 3, 32, 32), &Device::Cpu).unwrap();
    let a = cpu_model.forward(&xs, false, &Weights::Float).unwrap();
    let b = gpu_model
        .forward(&xs.to_device(&dev).unwrap(), false, &Weights::Float)
        .unwrap();
    let err = rel(&flat(&b), &flat(&a));
    println!("resnet18-cifar eval forward, GPU vs CPU: rel err {err:.2e}");
    assert!(err <= 1e-3, "GPU and CPU logits differ: {err}");
}

// ----------------------------------------------------------------------------
// The layer benchmark on the GPU (ignored: scripts/gpu-check.sh runs it)

fn env_list<T: std::str::FromStr + Clone>(name: &str, default: &[T]) -> Vec<T> {
    std::env::var(name)
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

/// Forward + backward of one layer, as `benches/layer.rs` (DKM through
/// autograd, IDKM and IDKM-JFB through `weight_grad`), then a device sync.
fn bench_step(layer: &ClusteredWeight, w: &Tensor, g: &Tensor) -> candle_core::Result<()> {
    if layer.config().method == Method::Dkm {
        let var = Var::from_tensor(w)?;
        let out = layer.forward(&var)?;
        let grads = (out * g)?.sum_all()?.backward()?;
        assert!(grads.get(&var).is_some());
    } else {
        let out = layer.forward(w)?;
        let grad = layer.weight_grad(w, g)?;
        assert_eq!(out.dims(), grad.dims());
    }
    w.device().synchronize()
}

/// Seconds (median of `reps`) and peak extra pool bytes of `f`.
fn measure(
    cd: &CudaDevice,
    reps: usize,
    mut f: impl FnMut() -> candle_core::Result<()>,
) -> candle_core::Result<(f64, u64)> {
    let mut times = Vec::new();
    let mut peak = 0;
    for _ in 0..reps {
        cuda::reset_pool_peak(cd)?;
        let (base, _) = cuda::pool_memory(cd)?;
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
        let (_, high) = cuda::pool_memory(cd)?;
        peak = peak.max(high.saturating_sub(base));
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], peak))
}

#[test]
#[ignore = "layer benchmark: run by scripts/gpu-check.sh (cargo test --release --features cuda --test gpu -- --ignored layer_bench --nocapture)"]
fn layer_bench() {
    let dev = gpu();
    let cd = cuda_dev(&dev);
    let sizes: Vec<usize> = env_list("IDKM_GPU_BENCH_SIZES", &[2_359_296]);
    let bits: Vec<u32> = env_list("IDKM_GPU_BENCH_BITS", &[4, 8]);
    let budget: f64 = std::env::var("IDKM_GPU_BENCH_BUDGET_GIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100.0);
    let reps: usize = std::env::var("IDKM_GPU_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let config = |bits: u32, method: Method, t: usize| KmeansConfig {
        bits,
        method,
        max_iter: t,
        tol: 0.0,
        tau: Some(1e-4),
        ..Default::default()
    };
    let mut rows = vec![
        "| m | k | method | t | fwd+bwd ms | peak extra MiB | x weight bytes | solver steps |"
            .to_string(),
        "|---:|---:|---|---:|---:|---:|---:|---:|".to_string(),
    ];
    for &m in &sizes {
        let weight_bytes = (m * 4) as f64;
        let w = Tensor::randn(0f32, 0.05, (m, 1), &dev).unwrap();
        let g = Tensor::randn(0f32, 1.0, (m, 1), &dev).unwrap();
        for &bits in &bits {
            let k = 1usize << bits;
            // One initialisation (k-means++ on the host) shared by every run.
            let init = ClusteredWeight::new("init", config(bits, Method::IdkmJfb, 1)).unwrap();
            init.forward(&w).unwrap();
            let c0 = init.centroids().unwrap();
            // DKM's pool bytes per attention element per iteration, on a slice.
            let probe = 16_384.min(m);
            let per_elem = {
                let layer = ClusteredWeight::new("probe", config(bits, Method::Dkm, 2)).unwrap();
                let (wp, gp) = (
                    w.narrow(0, 0, probe).unwrap(),
                    g.narrow(0, 0, probe).unwrap(),
                );
                bench_step(&layer, &wp, &gp).unwrap();
                let (_, peak) = measure(cd, 1, || bench_step(&layer, &wp, &gp)).unwrap();
                peak as f64 / (2 * probe * k) as f64
            };
            let runs = [
                (Method::Dkm, 1),
                (Method::Dkm, 5),
                (Method::Dkm, 10),
                (Method::Dkm, 30),
                (Method::Idkm, 30),
                (Method::IdkmJfb, 30),
            ];
            for (method, t) in runs {
                let name = method.to_string();
                if method == Method::Dkm {
                    let predicted = per_elem * (t * m * k) as f64;
                    if predicted / (1u64 << 30) as f64 > budget {
                        rows.push(format!(
                            "| {m} | {k} | {name} | {t} | does not fit {budget} GiB | ~{:.0} (predicted) | {:.0} | - |",
                            predicted / 1048576.0,
                            predicted / weight_bytes
                        ));
                        println!("{}", rows.last().unwrap());
                        continue;
                    }
                }
                let layer = ClusteredWeight::new("bench", config(bits, method, t)).unwrap();
                layer.set_centroids(c0.clone()).unwrap();
                let row = bench_step(&layer, &w, &g) // warm start, as in training
                    .and_then(|_| measure(cd, reps, || bench_step(&layer, &w, &g)));
                let row = match row {
                    Ok((secs, peak)) => {
                        let steps = match layer.last_adjoint() {
                            Some(
                                Adjoint::Solved(r)
                                | Adjoint::BestIterate(r)
                                | Adjoint::FellBackToJfb(r),
                            ) => r.steps.to_string(),
                            _ => "-".into(),
                        };
                        format!(
                            "| {m} | {k} | {name} | {t} | {:.1} | {:.1} | {:.2} | {steps} |",
                            secs * 1e3,
                            peak as f64 / 1048576.0,
                            peak as f64 / weight_bytes
                        )
                    }
                    Err(e) => format!(
                        "| {m} | {k} | {name} | {t} | failed: {} | | | |",
                        e.to_string().lines().next().unwrap_or("")
                    ),
                };
                println!("{row}");
                rows.push(row);
            }
        }
    }
    println!("\nlayer benchmark on {} (PTX {}), median of {reps}, peak = pool high-water mark beyond the inputs:", gpu_name(), cuda::ARCH);
    for r in rows {
        println!("{r}");
    }
}

fn gpu_name() -> String {
    std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "the GPU".into())
}
