//! Layer benchmark: forward + backward of one clustered layer with reference
//! DKM (t = 1, 5, 10, 30), streaming IDKM and IDKM-JFB (t = 30), d = 1.
//! Prints a table of seconds (for IDKM and IDKM-JFB the median of three
//! warm steps), peak extra bytes (counting allocator), the
//! k-means steps the forward ran, the solver steps and, for the streaming
//! methods, the nanoseconds per weight-centroid pair and pass over the weights.
//! A DKM configuration predicted not to fit the memory budget
//! (`IDKM_BENCH_BUDGET_GIB`, default 16) is reported, not run.
//!
//! `cargo bench --bench layer` (all sizes), or a subset with
//! `IDKM_BENCH_SIZES=65536,589824 IDKM_BENCH_BITS=4 cargo bench --bench layer`.
//! `IDKM_BENCH_TAUS` lists the temperatures (default 1e-4), every one run at
//! every size and bit width; at 8 bits, `IDKM_BENCH_TAUS=1e-4,3.9e-7` shows
//! what windowed passes save at a temperature matched to the centroid
//! spacing (the last column: nanoseconds per weight and pass).

use candle_core::{Device, Tensor, Var};
use idkm::cluster::backward::Adjoint;
use idkm::cluster::{ClusteredWeight, Forward, KmeansConfig, Method};
use std::time::Instant;

#[global_allocator]
static GLOBAL: idkm::alloc::Counting = idkm::alloc::Counting;

/// Seconds and peak extra bytes of `f`.
fn measure(f: impl FnOnce() -> candle_core::Result<()>) -> candle_core::Result<(f64, usize)> {
    let start = Instant::now();
    let (result, peak) = idkm::alloc::peak_extra(f);
    result?;
    Ok((start.elapsed().as_secs_f64(), peak))
}

/// One step of the layer: forward, then the gradient of <g, Wt> with respect
/// to the weight. DKM backpropagates through candle's autograd (its
/// recorded iterations are what it costs); IDKM and IDKM-JFB run the
/// streaming backward directly (`weight_grad`, what their `bwd` computes),
/// so the table shows the clustering's own memory, not candle's gradient
/// bookkeeping, which is the same for every method.
fn step(layer: &ClusteredWeight, w: &Tensor, g: &Tensor) -> candle_core::Result<()> {
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
    Ok(())
}

/// Plain steps (`t` of them: tol = 0) for DKM and the `plain` rows; the
/// default Newton solve (to its tolerance) for the others.
fn config(bits: u32, tau: Option<f64>, method: Method, forward: Forward, t: usize) -> KmeansConfig {
    match forward {
        Forward::Plain => KmeansConfig {
            bits,
            method,
            forward,
            max_iter: t,
            tol: 0.0,
            tau,
            ..Default::default()
        },
        Forward::Newton => KmeansConfig {
            bits,
            method,
            tau,
            ..Default::default()
        },
    }
}

fn gib(bytes: f64) -> f64 {
    bytes / (1u64 << 30) as f64
}

fn main() -> candle_core::Result<()> {
    let sizes: Vec<usize> = std::env::var("IDKM_BENCH_SIZES")
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|_| vec![65_536, 589_824, 2_359_296]);
    let bits: Vec<u32> = std::env::var("IDKM_BENCH_BITS")
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|_| vec![2, 4, 8]);
    // `auto` (the default) derives each layer's temperature from its weights.
    let taus: Vec<Option<f64>> = std::env::var("IDKM_BENCH_TAUS")
        .map(|s| s.split(',').map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|_| vec![None]);
    let budget: f64 = std::env::var("IDKM_BENCH_BUDGET_GIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16.0);
    println!("| m | k | tau | method | forward | fwd+bwd s | peak extra MiB | x weight bytes | k-means iterations | passes (weights + bins) | distance | solver steps | ns per weight and pass |");
    println!("|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &m in &sizes {
        let weight_bytes = (m * 4) as f64;
        let w = Tensor::randn(0f32, 0.05, (m, 1), &Device::Cpu)?;
        let g = Tensor::randn(0f32, 1.0, (m, 1), &Device::Cpu)?;
        for (&bits, &tau) in bits.iter().flat_map(|b| taus.iter().map(move |t| (b, t))) {
            let k = 1usize << bits;
            let tau_text = tau.map_or("auto".to_string(), |t| format!("{t:e}"));
            // Calibrate DKM's bytes per attention element per iteration on a small slice.
            let probe = 16_384.min(m);
            let dkm_per_elem = {
                let layer = ClusteredWeight::new(
                    "probe",
                    config(bits, tau, Method::Dkm, Forward::Plain, 2),
                )?;
                let wp = w.narrow(0, 0, probe)?;
                let gp = g.narrow(0, 0, probe)?;
                step(&layer, &wp, &gp)?;
                let (_, peak) = measure(|| step(&layer, &wp, &gp))?;
                peak as f64 / (2 * probe * k) as f64
            };
            let (plain, newton) = (Forward::Plain, Forward::Newton);
            let runs = [
                (Method::Dkm, plain, 1),
                (Method::Dkm, plain, 5),
                (Method::Dkm, plain, 10),
                (Method::Dkm, plain, 30),
                (Method::Idkm, plain, 30),
                (Method::IdkmJfb, plain, 30),
                (Method::Idkm, newton, 0),
                (Method::IdkmJfb, newton, 0),
            ];
            for (method, forward, t) in runs {
                let name = method.to_string();
                let solve = match forward {
                    Forward::Plain => format!("plain t={t}"),
                    Forward::Newton => "newton".to_string(),
                };
                if method == Method::Dkm {
                    let predicted = dkm_per_elem * (t * m * k) as f64;
                    if gib(predicted) > budget {
                        println!("| {m} | {k} | {tau_text} | {name} | {solve} | does not fit | ~{:.0} (predicted) | {:.0} | - | - | - | - | - |", predicted / 1048576.0, predicted / weight_bytes);
                        continue;
                    }
                }
                let layer = ClusteredWeight::new("bench", config(bits, tau, method, forward, t))?;
                step(&layer, &w, &g)?; // initialise and warm start, as in training
                                       // The median of three steps (IDKM's take a fraction of a
                                       // second, where this machine's noise shows), the largest peak.
                let reps = if method == Method::Dkm { 1 } else { 3 };
                let mut runs = (0..reps)
                    .map(|_| measure(|| step(&layer, &w, &g)))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                runs.sort_by(|a, b| a.0.total_cmp(&b.0));
                let (secs, peak) = (
                    runs[reps / 2].0,
                    runs.iter().map(|r| r.1).max().unwrap_or(0),
                );
                let report = layer.last_forward().unwrap_or_default();
                let passes = report.weight_passes + report.bin_passes;
                let (solver, solved) = match layer.last_adjoint() {
                    Some(Adjoint::Reused { .. }) => (Some(0), " (forward's factor)".to_string()),
                    Some(Adjoint::Solved(r)) => (Some(r.steps), String::new()),
                    Some(Adjoint::BestIterate(r)) => (
                        Some(r.steps),
                        format!(" (missed: best iterate, residual {:.0e})", r.rel_residual),
                    ),
                    Some(Adjoint::FellBackToJfb(r)) => (
                        Some(r.steps),
                        format!(" (diverged: JFB, residual {:.0e})", r.rel_residual),
                    ),
                    _ => (None, String::new()),
                };
                // Passes: the forward solve's, the soft output, the moments with
                // the cotangent, each solver step and the weight gradient (an
                // average: passes over bins and matrix passes cost otherwise).
                let per_weight = match method {
                    Method::Dkm => "-".to_string(),
                    _ => format!(
                        "{:.1}",
                        secs * 1e9 / ((passes + 3 + solver.unwrap_or(0)) as f64 * m as f64)
                    ),
                };
                let distance = if report.distance.is_finite() {
                    format!("{:.1e}", report.distance)
                } else {
                    "-".into()
                };
                println!(
                    "| {m} | {k} | {} | {name} | {solve} | {secs:.2} | {:.1} | {:.2} | {} | {} + {} | {distance} | {}{solved} | {per_weight} |",
                    layer.tau().map_or(tau_text.clone(), |t| format!("{t:.2e}")),
                    peak as f64 / 1048576.0,
                    peak as f64 / weight_bytes,
                    report.iterations,
                    report.weight_passes,
                    report.bin_passes,
                    solver.map_or("-".to_string(), |s| s.to_string()),
                );
            }
        }
    }
    Ok(())
}
