//! Running a configuration's steps: in this process (the child's side), in
//! a child process with limits, and a whole profile of them.

use super::{LayerReport, Measured, Outcome, Record, StepConfig};
use crate::alloc;
use crate::cluster::backward::Adjoint;
use crate::cluster::{ClusteredWeight, KmeansConfig, Method};
use crate::memory::{
    clustering_specs, current_rss, estimate, gib, layer_bytes, limit_address_space, peak_rss,
    predict_seconds, reset_peak_rss, ModelShape, Workload,
};
use crate::model::{Model, Weights};
use crate::quantize::Clustering;
use crate::train::{Optimizer, OptimizerKind, SgdConfig, TrainStep};
use anyhow::Context;
use candle_core::{Device, Tensor};
use std::path::Path;
use std::time::{Duration, Instant};

fn synthetic_batch(
    work: &Workload,
    seed: u64,
    device: &Device,
) -> anyhow::Result<(Tensor, Tensor)> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_da7a);
    let n = work.batch * work.channels * work.height * work.width;
    let x: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    let y: Vec<u32> = (0..work.batch)
        .map(|_| rng.random_range(0..work.classes as u32))
        .collect();
    let x = Tensor::from_vec(
        x,
        (work.batch, work.channels, work.height, work.width),
        device,
    )?;
    Ok((x, Tensor::from_vec(y, work.batch, device)?))
}

fn data_batch(
    dir: &Path,
    batch: usize,
    device: &Device,
) -> anyhow::Result<(Tensor, Tensor, usize)> {
    let split = crate::data::load(dir).with_context(|| format!("loading {}", dir.display()))?;
    let mut batches = crate::data::Batcher::new(
        &split.train,
        batch,
        None,
        crate::data::Augment::none(),
        &split.mean,
        &split.std,
        device,
    );
    let (x, y) = batches.next().context("the data set is empty")??;
    Ok((x, y, split.classes))
}

fn adjoint_report(a: Option<Adjoint>) -> (Option<String>, Option<usize>, Option<f64>) {
    match a {
        None => (None, None, None),
        Some(Adjoint::JacobianFree) => (Some("jfb".into()), None, None),
        Some(Adjoint::Solved(r)) => (Some("solved".into()), Some(r.steps), Some(r.rel_residual)),
        Some(Adjoint::BestIterate(r)) => (
            Some("best-iterate".into()),
            Some(r.steps),
            Some(r.rel_residual),
        ),
        Some(Adjoint::FellBackToJfb(r)) => (
            Some("jfb-fallback".into()),
            Some(r.steps),
            Some(r.rel_residual),
        ),
        Some(Adjoint::Reused { .. }) => (Some("reused".into()), Some(0), None),
    }
}

/// Runs each clustered layer's k-means on the model's weights for up to
/// `iters` iterations, without a graph, and makes the result its warm start.
fn converge(model: &Model, clustering: &Clustering, iters: usize) -> anyhow::Result<()> {
    for (name, w) in model.weights() {
        let Some(layer) = clustering.layers().get(&name) else {
            continue;
        };
        // The fixed point does not depend on the gradient method; DKM's would
        // record every iteration.
        let config = KmeansConfig {
            max_iter: iters,
            method: Method::IdkmJfb,
            ..layer.config().clone()
        };
        let long = ClusteredWeight::new(name.clone(), config)?;
        long.forward(&w.detach())?;
        let c = long
            .centroids()
            .with_context(|| format!("no centroids for {name}"))?;
        layer.set_centroids(c)?;
        if let Some(tau) = long.tau() {
            layer.set_tau(tau)?;
        }
    }
    Ok(())
}

/// Runs the configuration's training steps in this process and measures
/// them: what a profile child does. Peaks are of the measured steps (the
/// resident-set peak and the counted peak are reset after the warm-up).
pub fn run_steps(config: &StepConfig) -> anyhow::Result<Measured> {
    let start = Instant::now();
    let device = config.device.open()?;
    let base_rss = current_rss();
    let arch = config.arch;
    let mut work = config.workload();
    let (x, y) = match &config.data {
        Some(dir) => {
            let (x, y, classes) = data_batch(dir, config.batch, &device)?;
            work.classes = classes;
            (x, y)
        }
        None => synthetic_batch(&work, config.seed, &device)?,
    };
    let model = match &config.checkpoint {
        Some(path) => {
            let request = crate::loader::Request {
                arch: Some(arch),
                channels: Some(x.dim(1)?),
                classes: Some(work.classes),
                seed: config.seed,
                ..Default::default()
            };
            crate::loader::load(path, &request, &device)
                .with_context(|| format!("loading {}", path.display()))?
                .model
        }
        None => Model::new(arch, x.dim(1)?, work.classes, config.seed, &device)?,
    };
    let clustering = match config.plan()? {
        Some(plan) => Some(Clustering::new(&model, &plan)?),
        None => None,
    };
    if let (Some(c), Some(iters)) = (&clustering, config.converge_iters) {
        converge(&model, c, iters)?;
    }
    let weights = match &clustering {
        Some(c) => Weights::Clustered(c),
        None => Weights::Float,
    };
    let vars = model.trainable().into_iter().map(|(_, v)| v).collect();
    let sgd = SgdConfig {
        momentum: 0.9,
        nesterov: false,
        weight_decay: 5e-4,
    };
    let mut train = TrainStep::new(Optimizer::new(OptimizerKind::Sgd(sgd), vars, 0.01)?);
    let mut step = || -> anyhow::Result<(f64, f64)> {
        let t0 = Instant::now();
        let out = train.run(&model, &weights, &x, &y)?;
        device.synchronize()?;
        Ok((t0.elapsed().as_secs_f64(), out.loss))
    };
    let mut warmup_seconds = Vec::new();
    let mut loss = f64::NAN;
    for _ in 0..config.warmup {
        let (s, l) = step()?;
        warmup_seconds.push(s);
        loss = l;
    }
    let warmup_peak = peak_rss();
    let warmup_counted = alloc::peak_bytes();
    alloc::reset_peak();
    let rss_reset = reset_peak_rss();
    let per_step = warmup_seconds.iter().cloned().fold(0.0, f64::max);
    let left = config.max_seconds - start.elapsed().as_secs_f64();
    let affordable = if per_step > 0.0 {
        (left / per_step).floor().max(0.0) as usize
    } else {
        config.steps
    };
    let measured_steps = config.steps.min(affordable);
    let mut step_seconds = Vec::new();
    for _ in 0..measured_steps {
        let (s, l) = step()?;
        step_seconds.push(s);
        loss = l;
    }
    let warmup_only = step_seconds.is_empty();
    let seconds_per_step = if warmup_only {
        warmup_seconds.iter().sum::<f64>() / warmup_seconds.len().max(1) as f64
    } else {
        step_seconds.iter().sum::<f64>() / step_seconds.len() as f64
    };
    let peak = peak_rss();
    let shape = ModelShape::of(&model);
    let layers = match &clustering {
        None => Vec::new(),
        Some(c) => clustering_specs(&shape, c)
            .into_iter()
            .filter_map(|s| {
                let cfg = s.config.as_ref()?;
                let layer = c.layers().get(&s.name)?;
                let (kept, transient) = layer_bytes(s.numel, cfg);
                let (adjoint, solver_steps, residual) = adjoint_report(layer.last_adjoint());
                let forward = layer.last_forward();
                Some(LayerReport {
                    name: s.name.clone(),
                    numel: s.numel,
                    kept_bytes: kept,
                    transient_bytes: transient,
                    forward_iters: forward.map(|r| r.iterations),
                    forward_passes: forward.map(|r| r.weight_passes + r.bin_passes),
                    forward_distance: forward.map(|r| r.distance).filter(|d| d.is_finite()),
                    forward_cond: forward.and_then(|r| r.cond),
                    distinct: forward.map(|r| r.distinct),
                    tau: layer.tau(),
                    forward_fallbacks: forward.map(|r| r.plain_steps),
                    adjoint,
                    solver_steps,
                    residual,
                })
            })
            .collect(),
    };
    Ok(Measured {
        warmup_seconds,
        step_seconds,
        seconds_per_step,
        warmup_only,
        // With only the warm-up, its peak; without a reset, the process's.
        peak_rss_bytes: if rss_reset && warmup_only { warmup_peak } else { peak },
        peak_rss_warmup_bytes: warmup_peak,
        base_rss_bytes: base_rss,
        peak_counted_bytes: alloc::installed()
            .then(|| if warmup_only { warmup_counted } else { alloc::peak_bytes() } as u64),
        loss,
        layers,
    })
}

/// The line prefix of a child's result on its standard output.
pub const RESULT_PREFIX: &str = "IDKM_PROFILE_RESULT ";

/// The child's side: limits its memory to `limit_bytes` (counted when
/// [`alloc::Counting`] is installed, and its address space with some slack),
/// runs the steps and prints the result line. Returns the process exit code.
pub fn child_main(config: &StepConfig, limit_bytes: Option<u64>) -> i32 {
    if let Some(limit) = limit_bytes {
        alloc::set_limit(limit as usize);
        // Address space is more than resident memory (thread stacks, arenas,
        // reserved but untouched pages): generous slack, a backstop only.
        let _ = limit_address_space(limit + limit / 2 + (4 << 30));
    }
    let result = run_steps(config);
    let outcome = match result {
        Ok(m) => Outcome::Measured(m),
        Err(e) => Outcome::Failed {
            reason: format!("{e:#}"),
        },
    };
    let ok = matches!(outcome, Outcome::Measured(_));
    match serde_json::to_string(&outcome) {
        Ok(line) => println!("{RESULT_PREFIX}{line}"),
        Err(e) => eprintln!("cannot encode the result: {e}"),
    }
    if ok {
        0
    } else {
        1
    }
}

/// Runs `command` (a child that calls [`child_main`]) with a wall-clock
/// limit and reads its outcome. A child that dies (killed by the kernel,
/// aborted on a refused allocation) or runs out of time is a `Failed`
/// outcome with the reason and the end of its standard error.
pub fn run_child(mut command: std::process::Command, timeout: Duration) -> Outcome {
    use std::io::Read;
    use std::process::Stdio;
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Outcome::Failed {
                reason: format!("cannot start the child: {e}"),
            }
        }
    };
    // Drain both pipes on threads so that a chatty child cannot block.
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => {
                return Outcome::Failed {
                    reason: format!("waiting for the child: {e}"),
                }
            }
        }
    };
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    let tail: String = {
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(3)..].join(" | ")
    };
    if let Some(line) = stdout.lines().find_map(|l| l.strip_prefix(RESULT_PREFIX)) {
        return match serde_json::from_str::<Outcome>(line) {
            Ok(o) => o,
            Err(e) => Outcome::Failed {
                reason: format!("unreadable child result ({e}): {line}"),
            },
        };
    }
    let reason = match status {
        None => format!(
            "ran past the time limit of {:.0} s and was stopped",
            timeout.as_secs_f64()
        ),
        Some(s) => {
            use std::os::unix::process::ExitStatusExt;
            match s.signal() {
                Some(9) => "killed (SIGKILL: out of memory?)".to_string(),
                Some(6) => {
                    "aborted (an allocation beyond the memory limit was refused?)".to_string()
                }
                Some(sig) => format!("killed by signal {sig}"),
                None => format!("exited with {s}"),
            }
        }
    };
    Outcome::Failed {
        reason: if tail.is_empty() {
            reason
        } else {
            format!("{reason}: {tail}")
        },
    }
}

/// Runs `configs` one after another, each in a fresh process that `command` builds (a child
/// calling [`child_main`] with the limit it is given). A configuration whose
/// predicted peak exceeds `budget` is not started (`DoesNotFit`), nor one
/// whose predicted time (from an fp32 row measured before it and
/// [`predict_seconds`]) for its warm-up and measured steps exceeds
/// `timeout` seconds (`TooSlow`); a child past `timeout` is stopped.
/// `report` sees each record as it is made.
pub fn profile(
    shape: &ModelShape,
    configs: &[StepConfig],
    budget: u64,
    timeout: f64,
    mut command: impl FnMut(&StepConfig, u64) -> anyhow::Result<std::process::Command>,
    mut report: impl FnMut(&Record),
) -> anyhow::Result<Vec<Record>> {
    let mut records: Vec<Record> = Vec::new();
    for config in configs {
        let specs = config.specs(shape)?;
        let predicted = estimate(shape, &specs, &config.workload());
        let fp32_seconds = records
            .iter()
            .filter(|r| r.config.method.is_none() && r.config.batch == config.batch)
            .filter_map(|r| r.measured().map(|m| m.seconds_per_step))
            .next_back();
        let seconds = fp32_seconds.map(|s| predict_seconds(&specs, s));
        let outcome = if predicted.total() > budget {
            Outcome::DoesNotFit {
                budget_bytes: budget,
            }
        } else if let Some(s) =
            seconds.filter(|s| s * (config.warmup + config.steps) as f64 * 1.1 > timeout)
        {
            Outcome::TooSlow {
                predicted_seconds: s,
                limit_seconds: timeout,
            }
        } else {
            tracing::info!(config = %config.label(), predicted = %gib(predicted.total()), "running");
            let mut config = config.clone();
            config.max_seconds = timeout * 0.8;
            run_child(command(&config, budget)?, Duration::from_secs_f64(timeout))
        };
        let record = Record {
            config: config.clone(),
            predicted,
            outcome,
        };
        report(&record);
        records.push(record);
    }
    Ok(records)
}
