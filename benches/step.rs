//! Whole-step benchmark: training steps of ResNet18-CIFAR at batch 32,
//! fp32 against DKM (t = 1, 3, 10, 30), IDKM and IDKM-JFB (t = 30) at 4 and 8
//! bits, each configuration in a fresh process (this binary, re-executed), so
//! that peaks do not mix. Reports seconds per step, the peak resident set,
//! the bytes counted by the allocator and the memory model's prediction. A
//! configuration predicted over the budget is reported as "does not fit",
//! not run; a child that still runs out of its limit fails alone.
//!
//! ```text
//! cargo bench --profile dev --bench step                 # the full table, ~25 min on 2 cores
//! IDKM_STEP_BATCH=8 IDKM_STEP_BITS=4 cargo bench --profile dev --bench step   # a quick look
//! ```
//!
//! Environment (all optional): `IDKM_STEP_ARCH` (resnet18-cifar),
//! `IDKM_STEP_BATCH` (32), `IDKM_STEP_BITS` (4,8), `IDKM_STEP_DKM_ITERS`
//! (1,3,10,30), `IDKM_STEP_ITERS` (30: t of IDKM and IDKM-JFB, the most
//! k-means iterations of a forward pass), `IDKM_STEP_TOL` (the trainer's
//! default k-means tolerance, for IDKM and IDKM-JFB; 0 forces exactly t
//! iterations, as DKM always runs), `IDKM_STEP_STEADY_BITS` (4,8: the bits
//! of the steady-state rows, IDKM and IDKM-JFB starting every step at the
//! k-means fixed point, as a long fine-tune does; empty for none),
//! `IDKM_STEP_CONVERGE_ITERS` (1000: k-means iterations that reach it first),
//! `IDKM_STEP_TAU` (1e-4: the temperature at 4 bits; at b bits every method
//! runs with `tau 4^(4-b)`, which keeps the attention as local relative to
//! the centroid spacing, proportional to `2^-b`, as at 4 bits),
//! `IDKM_STEP_METHODS` (dkm,idkm,idkm-jfb), `IDKM_STEP_ROUNDS` (1: run
//! all configurations this many times, one round after another, and
//! report each one's median round; with more than one, `step-rounds.md`
//! lists every round's time and its ratio to the same round's fp32 step,
//! which a machine's slow spells move less than the times), `IDKM_STEP_BUDGET_GIB` (16, and
//! never more than the memory available less 1 GiB), `IDKM_STEP_WARMUP`
//! (1), `IDKM_STEP_STEPS` (3: measured steps, averaged), `IDKM_STEP_TIMEOUT_S` (600 per
//! configuration; one predicted to need more, from the fp32 step's time and
//! the layer benchmark's cost per pass, is reported, not run),
//! `IDKM_STEP_OUT` (docs/bench, relative to the crate).
//!
//! `IDKM_STEP_REPLOT=docs/bench/step.json` redraws the tables and plots of
//! an earlier run without running anything.
//!
//! `IDKM_STEP_BREAKDOWN=1` prints instead where one step's memory goes, phase
//! by phase (the calibration of the memory model, docs/memory-model.md).

use idkm::cluster::{Forward, KmeansConfig, Method};
use idkm::device::DeviceSpec;
use idkm::memory;
use idkm::model::Arch;
use idkm::profile::{self, Record, StepConfig};

#[global_allocator]
static GLOBAL: idkm::alloc::Counting = idkm::alloc::Counting;

const CHILD_ENV: &str = "IDKM_STEP_CHILD";
const LIMIT_ENV: &str = "IDKM_STEP_LIMIT";

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// The comma-separated values of the variable `name`; a value that does
/// not parse is an error that names the variable.
fn list<T: std::str::FromStr>(name: &str, default: &str) -> anyhow::Result<Vec<T>>
where
    T::Err: std::fmt::Display,
{
    env_or(name, default)
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|e| anyhow::anyhow!("{name}: `{s}`: {e}")))
        .collect()
}

fn main() -> anyhow::Result<()> {
    // The child: one configuration, its result as one line on stdout.
    if let Ok(json) = std::env::var(CHILD_ENV) {
        let config: StepConfig = serde_json::from_str(&json)?;
        let limit = std::env::var(LIMIT_ENV).ok().and_then(|s| s.parse().ok());
        std::process::exit(profile::child_main(&config, limit));
    }
    if let Ok(path) = std::env::var("IDKM_STEP_REPLOT") {
        let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        let records: Vec<Record> = serde_json::from_value(doc["records"].clone())?;
        let command = doc["command"].as_str().unwrap_or("").to_string();
        let (dir, name) = (
            std::path::Path::new(&path)
                .parent()
                .unwrap_or(std::path::Path::new(".")),
            "step",
        );
        let rounds = command
            .split_whitespace()
            .find_map(|w| w.strip_prefix("IDKM_STEP_ROUNDS="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        let title = title(&records, rounds);
        for p in profile::write_outputs(&records, dir, name, &title, &command)? {
            eprintln!("wrote {}", p.display());
        }
        return Ok(());
    }
    if std::env::var("IDKM_STEP_BREAKDOWN").is_ok_and(|v| v == "1") {
        return breakdown();
    }
    // The memory model's prediction of one configuration, as JSON.
    if let Ok(json) = std::env::var("IDKM_STEP_PREDICT") {
        let config: StepConfig = serde_json::from_str(&json)?;
        let shape = memory::ModelShape::of_arch(
            config.arch,
            if config.arch == Arch::SmallCnn { 1 } else { 3 },
            config.classes,
        )?;
        println!("{}", serde_json::to_string(&config.predict(&shape)?)?);
        return Ok(());
    }
    let arch: Arch = env_or("IDKM_STEP_ARCH", "resnet18-cifar").parse()?;
    let batch: usize = env_or("IDKM_STEP_BATCH", "32").parse()?;
    let bits: Vec<u32> = list("IDKM_STEP_BITS", "4,8")?;
    let dkm_iters: Vec<usize> = list("IDKM_STEP_DKM_ITERS", "1,3,10,30")?;
    let iters: usize = env_or("IDKM_STEP_ITERS", "30").parse()?;
    let steady_bits: Vec<u32> = list("IDKM_STEP_STEADY_BITS", "4,8")?;
    let converge: usize = env_or("IDKM_STEP_CONVERGE_ITERS", "1000").parse()?;
    // The plain rows run the earlier setting: an absolute tau (1e-4 at 4
    // bits, 4x smaller per extra bit), at most `iters` plain steps stopped
    // at a move of `plain_tol` of the spread. The Newton rows run the
    // defaults: tau from each layer's weights, Newton to its tolerance.
    let tau4: f64 = env_or("IDKM_STEP_TAU", "1e-4").parse()?;
    let tau = |bits: u32| tau4 * 4f64.powi(4 - bits as i32);
    let plain_tol: f64 = env_or("IDKM_STEP_PLAIN_TOL", "1e-4").parse()?;
    let forwards: Vec<Forward> = list("IDKM_STEP_FORWARDS", "newton,plain")?;
    let newton = KmeansConfig::default();
    let methods: Vec<Method> = list("IDKM_STEP_METHODS", "dkm,idkm,idkm-jfb")?;
    let warmup: usize = env_or("IDKM_STEP_WARMUP", "1").parse()?;
    let rounds: usize = env_or("IDKM_STEP_ROUNDS", "1").parse::<usize>()?.max(1);
    let steps: usize = env_or("IDKM_STEP_STEPS", "3").parse()?;
    let timeout: f64 = env_or("IDKM_STEP_TIMEOUT_S", "600").parse()?;
    let out_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(env_or("IDKM_STEP_OUT", "docs/bench"));
    let mut budget =
        (env_or("IDKM_STEP_BUDGET_GIB", "16").parse::<f64>()? * (1u64 << 30) as f64) as u64;
    if let Some(avail) = memory::available_memory() {
        let cap = avail.saturating_sub(1 << 30);
        if cap < budget {
            eprintln!(
                "budget lowered from {} to {} (memory available less 1 GiB)",
                memory::gib(budget),
                memory::gib(cap)
            );
            budget = cap;
        }
    }

    let base = StepConfig {
        arch,
        batch,
        method: None,
        bits: 4,
        cluster_dim: 1,
        iters,
        tol: 0.0,
        tau: None,
        forward: Forward::Plain,
        solver: KmeansConfig::default().solver,
        min_weights: idkm::quantize::QuantizePlan::MIN_WEIGHTS,
        classes: 10,
        warmup,
        steps,
        max_seconds: timeout * 0.8,
        device: DeviceSpec::Cpu,
        data: None,
        checkpoint: None,
        seed: 0,
        converge_iters: None,
    };
    let mut configs = vec![base.clone()];
    for &b in &bits {
        for &m in &methods {
            if m == Method::Dkm {
                // DKM runs exactly t plain steps: its memory grows with them.
                for &t in &dkm_iters {
                    configs.push(StepConfig {
                        method: Some(m),
                        bits: b,
                        iters: t,
                        ..base.clone()
                    });
                }
                continue;
            }
            for &f in &forwards {
                configs.push(solve_config(
                    &base,
                    m,
                    b,
                    f,
                    None,
                    &newton,
                    tau(b),
                    plain_tol,
                ));
            }
        }
    }
    // The steady state of a long fine-tune: k-means starts each step at its
    // fixed point (reached here by up to `converge` iterations first).
    for &b in &steady_bits {
        for &m in methods.iter().filter(|m| **m != Method::Dkm) {
            for &f in &forwards {
                configs.push(solve_config(
                    &base,
                    m,
                    b,
                    f,
                    Some(converge),
                    &newton,
                    tau(b),
                    plain_tol,
                ));
            }
        }
    }
    let channels = if arch == Arch::SmallCnn { 1 } else { 3 };
    let shape = memory::ModelShape::of_arch(arch, channels, base.classes)?;
    let exe = std::env::current_exe()?;
    let command = |config: &StepConfig, limit: u64| -> anyhow::Result<std::process::Command> {
        eprintln!("running {} ...", config.label());
        let mut cmd = std::process::Command::new(&exe);
        cmd.env(CHILD_ENV, serde_json::to_string(config)?)
            .env(LIMIT_ENV, limit.to_string());
        Ok(cmd)
    };
    let report = |r: &Record| eprintln!("{}", profile::table_row(r));
    let all: Vec<StepConfig> = (0..rounds).flat_map(|_| configs.clone()).collect();
    let records = profile::profile(&shape, &all, budget, timeout, command, report)?;
    let run = Run {
        batch,
        steps,
        bits: &bits,
        budget,
        rounds,
    };
    let records = if rounds > 1 {
        let (records, table) = profile::median_of_rounds(&records, rounds);
        println!("{table}");
        let path = out_dir.join("step-rounds.md");
        let text = format!(
            "{}\n\n`{}`\n\n{table}",
            title(&records, rounds),
            run.command()
        );
        std::fs::create_dir_all(&out_dir)?;
        idkm::io::write_bytes_atomic(&path, text.as_bytes())?;
        eprintln!("wrote {}", path.display());
        records
    } else {
        records
    };
    finish(&records, &run, &out_dir)
}

/// What a run of the benchmark measured, for its command line and titles.
struct Run<'a> {
    batch: usize,
    steps: usize,
    bits: &'a [u32],
    budget: u64,
    rounds: usize,
}

impl Run<'_> {
    /// The command that repeats the run.
    fn command(&self) -> String {
        let rounds = if self.rounds > 1 {
            format!(" IDKM_STEP_ROUNDS={}", self.rounds)
        } else {
            String::new()
        };
        // The build that ran: `--profile dev` has debug assertions.
        let profile = if cfg!(debug_assertions) {
            " --profile dev"
        } else {
            ""
        };
        format!(
            "IDKM_STEP_BATCH={} IDKM_STEP_BITS={} IDKM_STEP_STEPS={}{rounds} IDKM_STEP_BUDGET_GIB={:.0} cargo bench{profile} --bench step",
            self.batch,
            self.bits.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(","),
            self.steps,
            self.budget as f64 / (1u64 << 30) as f64,
        )
    }
}

/// A Newton row (the defaults) or a plain row (absolute `tau`, plain steps
/// stopped at `plain_tol`) of `method` at `bits`.
#[allow(clippy::too_many_arguments)]
fn solve_config(
    base: &StepConfig,
    method: Method,
    bits: u32,
    forward: Forward,
    converge: Option<usize>,
    newton: &KmeansConfig,
    tau: f64,
    plain_tol: f64,
) -> StepConfig {
    let common = StepConfig {
        method: Some(method),
        bits,
        forward,
        converge_iters: converge,
        ..base.clone()
    };
    match forward {
        Forward::Newton => StepConfig {
            tau: None,
            tol: newton.tol,
            iters: newton.max_iter,
            ..common
        },
        Forward::Plain => StepConfig {
            tau: Some(tau),
            tol: plain_tol,
            ..common
        },
    }
}

fn finish(records: &[Record], run: &Run, out_dir: &std::path::Path) -> anyhow::Result<()> {
    println!("{}", profile::table(records));
    println!("{}", profile::layer_table(records));
    let title = title(records, run.rounds);
    let written = profile::write_outputs(records, out_dir, "step", &title, &run.command())?;
    for p in written {
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

/// The title of the tables and plots, from the first record's
/// configuration: the model, the batch, the steps measured and the rounds.
fn title(records: &[Record], rounds: usize) -> String {
    let Some(c) = records.first().map(|r| &r.config) else {
        return String::new();
    };
    let steps = match c.steps {
        1 => "one training step".to_string(),
        n => format!("mean of {n} training steps"),
    };
    let rounds = if rounds > 1 {
        format!(", the median of {rounds} rounds")
    } else {
        String::new()
    };
    format!(
        "{}, batch {}, {steps}{rounds} (SGD), this machine",
        c.arch, c.batch
    )
}

/// `IDKM_STEP_BREAKDOWN=1`: where one step's memory goes, phase by phase
/// (counted bytes), for the calibration of the memory model
/// (docs/memory-model.md). Uses `IDKM_STEP_ARCH`, `IDKM_STEP_BATCH`, and
/// `IDKM_STEP_METHODS`, `IDKM_STEP_BITS`, `IDKM_STEP_ITERS` (first of each;
/// `fp32` as the method for the float step).
fn breakdown() -> anyhow::Result<()> {
    use candle_core::{Device, Tensor};
    use idkm::model::{Model, Weights};
    let dev = Device::Cpu;
    let arch: Arch = env_or("IDKM_STEP_ARCH", "small-cnn").parse()?;
    let n: usize = env_or("IDKM_STEP_BATCH", "8").parse()?;
    let method = env_or("IDKM_STEP_METHODS", "fp32")
        .split(',')
        .next()
        .unwrap_or("fp32")
        .to_string();
    let (c, hw) = if arch == Arch::SmallCnn {
        (1, 28)
    } else {
        (3, 32)
    };
    let mb = |b: usize| b as f64 / 1048576.0;
    let model = Model::new(arch, c, 10, 0, &dev)?;
    let clustering = if method == "fp32" {
        None
    } else {
        let cfg = idkm::cluster::KmeansConfig {
            bits: list::<u32>("IDKM_STEP_BITS", "4")?[0],
            method: method.parse()?,
            max_iter: list::<usize>("IDKM_STEP_ITERS", "3")?[0],
            tol: 0.0,
            ..Default::default()
        };
        Some(idkm::quantize::Clustering::new(
            &model,
            &idkm::quantize::QuantizePlan::new(cfg),
        )?)
    };
    let weights = match &clustering {
        Some(c) => Weights::Clustered(c),
        None => Weights::Float,
    };
    let vars = model.trainable().into_iter().map(|(_, v)| v).collect();
    let sgd = idkm::train::SgdConfig {
        momentum: 0.9,
        nesterov: false,
        weight_decay: 5e-4,
    };
    let mut opt = idkm::train::Optimizer::new(idkm::train::OptimizerKind::Sgd(sgd), vars, 0.01)?;
    let x = Tensor::randn(0f32, 1.0, (n, c, hw, hw), &dev)?;
    let y = Tensor::from_vec((0..n as u32).map(|i| i % 10).collect::<Vec<_>>(), n, &dev)?;
    for step in 0..2 {
        let l0 = idkm::alloc::live_bytes();
        idkm::alloc::reset_peak();
        let logits = model.forward(&x, true, &weights)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        let (l1, p1) = (idkm::alloc::live_bytes(), idkm::alloc::peak_bytes());
        idkm::alloc::reset_peak();
        let grads = loss.backward()?;
        let (l2, p2) = (idkm::alloc::live_bytes(), idkm::alloc::peak_bytes());
        idkm::alloc::reset_peak();
        opt.step(&grads)?;
        let p3 = idkm::alloc::peak_bytes();
        drop((grads, loss, logits));
        eprintln!(
            "step {step}: live at start {:.1} MiB; forward keeps {:.1} (transient +{:.1}); backward leaves {:.1} \
             (peak +{:.1} above the graph); optimizer +{:.1} above that; step peak {:.1}",
            mb(l0), mb(l1 - l0), mb(p1 - l1), mb(l2 - l1), mb(p2 - l1), mb(p3.saturating_sub(l2)), mb(p1.max(p2).max(p3))
        );
    }
    Ok(())
}
