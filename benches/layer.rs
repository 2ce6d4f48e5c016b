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
use idkm::cluster::{ClusteredWeight, KmeansConfig, Method};
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

fn config(bits: u32, tau: f64, method: Method, t: usize) -> KmeansConfig {
    // tol = 0: (almost) every configuration runs exactly t iterations.
    KmeansConfig { bits, method, max_iter: t, tol: 0.0, tau, ..Default::default() }
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
    let taus: Vec<f64> = std::env::var("IDKM_BENCH_TAUS")
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|_| vec![1e-4]);
    let budget: f64 = std::env::var("IDKM_BENCH_BUDGET_GIB").ok().and_then(|s| s.parse().ok()).unwrap_or(16.0);
    println!("| m | k | tau | method | t | fwd+bwd s | peak extra MiB | x weight bytes | k-means steps | solver steps | ns per pair and pass | ns per weight and pass |");
    println!("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &m in &sizes {
        let weight_bytes = (m * 4) as f64;
        let w = Tensor::randn(0f32, 0.05, (m, 1), &Device::Cpu)?;
        let g = Tensor::randn(0f32, 1.0, (m, 1), &Device::Cpu)?;
        for (&bits, &tau) in bits.iter().flat_map(|b| taus.iter().map(move |t| (b, t))) {
            let k = 1usize << bits;
            // Calibrate DKM's bytes per attention element per iteration on a small slice.
            let probe = 16_384.min(m);
            let dkm_per_elem = {
                let layer = ClusteredWeight::new("probe", config(bits, tau, Method::Dkm, 2))?;
                let wp = w.narrow(0, 0, probe)?;
                let gp = g.narrow(0, 0, probe)?;
                step(&layer, &wp, &gp)?;
                let (_, peak) = measure(|| step(&layer, &wp, &gp))?;
                peak as f64 / (2 * probe * k) as f64
            };
            let runs = [(Method::Dkm, 1), (Method::Dkm, 5), (Method::Dkm, 10), (Method::Dkm, 30), (Method::Idkm, 30), (Method::IdkmJfb, 30)];
            for (method, t) in runs {
                let name = method.to_string();
                if method == Method::Dkm {
                    let predicted = dkm_per_elem * (t * m * k) as f64;
                    if gib(predicted) > budget {
                        println!("| {m} | {k} | {tau:e} | {name} | {t} | does not fit | ~{:.0} (predicted) | {:.0} | - | - | - | - |", predicted / 1048576.0, predicted / weight_bytes);
                        continue;
                    }
                }
                let layer = ClusteredWeight::new("bench", config(bits, tau, method, t))?;
                step(&layer, &w, &g)?; // initialise and warm start, as in training
                // The median of three steps (IDKM's take a fraction of a
                // second, where this machine's noise shows), the largest peak.
                let reps = if method == Method::Dkm { 1 } else { 3 };
                let mut runs = (0..reps).map(|_| measure(|| step(&layer, &w, &g))).collect::<candle_core::Result<Vec<_>>>()?;
                runs.sort_by(|a, b| a.0.total_cmp(&b.0));
                let (secs, peak) = (runs[reps / 2].0, runs.iter().map(|r| r.1).max().unwrap_or(0));
                let forward = layer.last_forward().map_or(0, |r| r.steps);
                let (solver, solved) = match layer.last_adjoint() {
                    Some(Adjoint::Solved(r)) => (Some(r.steps), String::new()),
                    Some(Adjoint::BestIterate(r)) => (Some(r.steps), format!(" (missed: best iterate, residual {:.0e})", r.rel_residual)),
                    Some(Adjoint::FellBackToJfb(r)) => (Some(r.steps), format!(" (diverged: JFB, residual {:.0e})", r.rel_residual)),
                    _ => (None, String::new()),
                };
                // Streaming passes over the weights: the forward's k-means steps,
                // the soft output, the moments with the cotangent, each solver
                // step and the weight gradient.
                let (per_pair, per_weight) = match method {
                    Method::Dkm => ("-".to_string(), "-".to_string()),
                    _ => {
                        let passes = (forward + 3 + solver.unwrap_or(0)) as f64;
                        let per_weight = secs * 1e9 / (passes * m as f64);
                        (format!("{:.2}", per_weight / k as f64), format!("{per_weight:.1}"))
                    }
                };
                println!(
                    "| {m} | {k} | {tau:e} | {name} | {t} | {secs:.2} | {:.1} | {:.2} | {forward} | {}{solved} | {per_pair} | {per_weight} |",
                    peak as f64 / 1048576.0,
                    peak as f64 / weight_bytes,
                    solver.map_or("-".to_string(), |s| s.to_string()),
                );
            }
        }
    }
    Ok(())
}
