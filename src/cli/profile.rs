//! `idkm profile`: peak memory and time of training steps with fp32, DKM,
//! IDKM and IDKM-JFB side by side, each configuration in a fresh process
//! (this binary, re-executed), beside the memory model's prediction.

use super::common::{parse_budget, resolve_model};
use anyhow::{bail, Context, Result};
use idkm::cluster::{Forward, KmeansConfig, Method, Solver};
use idkm::device::DeviceSpec;
use idkm::loader::Request;
use idkm::memory;
use idkm::model::Arch;
use idkm::profile::{self, Outcome, Record, StepConfig};
use idkm::quantize::QuantizePlan;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ProfileArgs {
    /// The model: an architecture (resnet18-cifar | resnet18 | small-cnn,
    /// freshly initialised) or a checkpoint whose weights the steps start
    /// from (a local file or directory, or a hub repo id
    /// `owner/name[@revision]`; any file `--model` takes elsewhere).
    #[arg(long, visible_alias = "arch", default_value = "resnet18-cifar")]
    model: ModelChoice,
    /// File inside the hub repo (with a repo id in --model).
    #[arg(long)]
    model_file: Option<String>,
    /// Bits per index (k = 2^bits), one or several: `4,8`.
    #[arg(long, value_delimiter = ',', default_value = "4")]
    bits: Vec<u32>,
    /// Consecutive weights per vector: 1, 2, 4 or 8.
    #[arg(long, default_value_t = 1)]
    cluster_dim: usize,
    /// Methods to compare: dkm, idkm, idkm-jfb.
    #[arg(long, value_delimiter = ',', default_value = "dkm,idkm,idkm-jfb")]
    methods: Vec<Method>,
    /// k-means iterations per forward pass (t) of DKM and of plain steps
    /// (`--forward plain`): each runs every t. A Newton solve has no t: IDKM
    /// and IDKM-JFB then run once per bit width, to --tol, in at most the
    /// trainer's 100 iterations.
    #[arg(long, value_delimiter = ',', default_value = "1,3,10,30")]
    iters: Vec<usize>,
    /// Samples per batch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Untimed warm-up steps per configuration (initialisation, warm start).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Measured steps per configuration.
    #[arg(long, default_value_t = 1)]
    steps: usize,
    /// cpu | cuda | cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// A data set directory for real batches (the first batch of its
    /// training part) [default: synthetic inputs of the model's shape].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Softmax temperature, absolute: one for all bit widths, or one per
    /// `--bits` [default: derived from each layer's weights].
    #[arg(long, value_delimiter = ',')]
    tau: Vec<f64>,
    /// How the forward pass reaches the fixed point: newton | plain (DKM
    /// always steps).
    #[arg(long, default_value_t = Forward::Newton)]
    forward: Forward,
    /// k-means tolerance relative to the weights' spread [default: 0 for
    /// DKM and plain steps, which then run exactly t iterations; the
    /// trainer's 1e-6 for Newton].
    #[arg(long)]
    tol: Option<f64>,
    /// Before the warm-up, run each clustered layer's k-means for up to N
    /// iterations (no graph), so that the measured steps start at its fixed
    /// point, as the steps of a long fine-tune do (with --tol > 0 they then
    /// stop early) [default: start cold].
    #[arg(long, value_name = "N")]
    steady: Option<usize>,
    /// Adjoint solver of IDKM: auto | dense | cg | gmres | neumann.
    #[arg(long, default_value_t = KmeansConfig::default().solver)]
    solver: Solver,
    /// Layers with fewer weights stay in float.
    #[arg(long, default_value_t = QuantizePlan::MIN_WEIGHTS)]
    min_weights: usize,
    /// Number of classes of the synthetic data.
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// Configurations predicted to need more memory are reported, not run;
    /// each child is also limited to it [default: the memory available now,
    /// less 1 GiB].
    #[arg(long, value_parser = parse_budget)]
    memory_budget: Option<u64>,
    /// Wall-clock limit per configuration, in seconds; one predicted to need
    /// more is reported, not run.
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
    /// Leave out the fp32 reference step.
    #[arg(long)]
    no_fp32: bool,
    /// Only print the memory model's predictions; run nothing.
    #[arg(long)]
    predict_only: bool,
    /// Output prefix: writes PREFIX.json, PREFIX.md, PREFIX-memory.{svg,png}
    /// and PREFIX-time.{svg,png}.
    #[arg(long, short, default_value = "idkm-profile")]
    output: PathBuf,
    /// Seed of the model, the data and the clustering.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// (internal) Run one configuration, given as JSON, and print its result.
    #[arg(long, hide = true)]
    child: Option<String>,
    /// (internal) The child's memory limit in bytes.
    #[arg(long, hide = true)]
    child_limit: Option<u64>,
}

pub fn run(a: ProfileArgs) -> Result<()> {
    if let Some(json) = &a.child {
        let config: StepConfig =
            serde_json::from_str(json).context("reading the child's configuration")?;
        std::process::exit(profile::child_main(&config, a.child_limit));
    }
    if a.batch == 0 || a.steps == 0 {
        bail!("--batch and --steps must be at least 1");
    }
    let budget = match a.memory_budget {
        Some(bytes) => bytes,
        None => memory::available_memory()
            .map(|m| m.saturating_sub(1 << 30))
            .unwrap_or(8 << 30),
    };
    if a.tau.len() > 1 && a.tau.len() != a.bits.len() {
        bail!(
            "--tau takes one temperature for all bit widths or one per --bits: got {} for {} bit widths",
            a.tau.len(),
            a.bits.len()
        );
    }
    let tau = |n: usize| a.tau.get(n.min(a.tau.len().saturating_sub(1))).copied();
    let (shape, checkpoint, classes) = match &a.model {
        ModelChoice::Arch(arch) => {
            let channels = if *arch == Arch::SmallCnn { 1 } else { 3 };
            let shape = memory::ModelShape::of_arch(*arch, channels, a.classes)?;
            (shape, None, a.classes)
        }
        ModelChoice::Checkpoint(spec) => {
            let path = resolve_model(spec, a.model_file.as_deref())?;
            let loaded = idkm::loader::load(
                &path,
                &Request::default(),
                &idkm::device::DeviceSpec::Cpu.open()?,
            )
            .with_context(|| format!("loading {}", path.display()))?;
            let model = loaded.model;
            tracing::info!(path = %path.display(), arch = %model.arch(), classes = model.classes(), "profiling the checkpoint's weights");
            (memory::ModelShape::of(&model), Some(path), model.classes())
        }
    };
    let arch = shape.arch;
    let base = StepConfig {
        arch,
        batch: a.batch,
        method: None,
        bits: a.bits.first().copied().unwrap_or(4),
        cluster_dim: a.cluster_dim,
        iters: a.iters.iter().copied().max().unwrap_or(30),
        tol: a.tol.unwrap_or(0.0),
        tau: tau(0),
        forward: a.forward,
        solver: a.solver,
        min_weights: a.min_weights,
        classes,
        warmup: a.warmup,
        steps: a.steps,
        max_seconds: a.timeout * 0.8,
        device: a.device,
        data: a.data.clone(),
        checkpoint,
        seed: a.seed,
        converge_iters: a.steady,
    };
    let mut configs = Vec::new();
    if !a.no_fp32 {
        configs.push(base.clone());
    }
    for (n, &bits) in a.bits.iter().enumerate() {
        for &method in &a.methods {
            let row = StepConfig {
                method: Some(method),
                bits,
                tau: tau(n),
                ..base.clone()
            };
            let (iters, tol) = if row.newton() {
                let trainer = KmeansConfig::default();
                (vec![trainer.max_iter], a.tol.unwrap_or(trainer.tol))
            } else {
                (a.iters.clone(), a.tol.unwrap_or(0.0))
            };
            for t in iters {
                let c = StepConfig {
                    iters: t,
                    tol,
                    ..row.clone()
                };
                c.kmeans()?; // validate before anything runs
                configs.push(c);
            }
        }
    }
    let mut out = std::io::stdout().lock();
    if a.predict_only {
        writeln!(out, "| config | predicted peak | weights | grads | optimizer | activations | clustering | working set |")?;
        writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
        for c in &configs {
            let e = c.predict(&shape)?;
            writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |{}",
                c.label(),
                memory::human(e.total()),
                memory::human(e.params),
                memory::human(e.grads),
                memory::human(e.optimizer),
                memory::human(e.activations),
                memory::human(e.clustering),
                memory::human(e.transient),
                if e.total() > budget {
                    " over the budget"
                } else {
                    ""
                }
            )?;
        }
        return Ok(());
    }
    let exe = std::env::current_exe().context("finding this executable")?;
    let command = |config: &StepConfig, limit: u64| -> Result<std::process::Command> {
        eprintln!("running {} ...", config.label());
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("profile")
            .arg("--child")
            .arg(serde_json::to_string(config)?)
            .arg("--child-limit")
            .arg(limit.to_string())
            .env("RUST_LOG", "warn");
        Ok(cmd)
    };
    let report = |r: &Record| eprintln!("{}", profile::table_row(r));
    let records = profile::profile(&shape, &configs, budget, a.timeout, command, report)?;
    // A binary without the counting allocator counts nothing.
    let uncounted = records
        .iter()
        .any(|r| matches!(&r.outcome, Outcome::Measured(m) if m.peak_counted_bytes.is_none()));
    writeln!(out, "{}", profile::table(&records))?;
    writeln!(out, "{}", profile::layer_table(&records))?;
    if uncounted {
        writeln!(
            out,
            "(this binary does not install idkm::alloc::Counting: no counted bytes)"
        )?;
    }
    let dir = match a.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = a
        .output
        .file_name()
        .and_then(|n| n.to_str())
        .context("--output needs a file name")?
        .to_string();
    let title = format!("{arch}, batch {}, {} steps", a.batch, a.device);
    let command_line: Vec<String> = std::env::args().collect();
    for path in profile::write_outputs(&records, &dir, &name, &title, &command_line.join(" "))? {
        writeln!(out, "wrote {}", path.display())?;
    }
    Ok(())
}

/// `--model`: an architecture by name, or anything else as a checkpoint.
#[derive(Debug, Clone)]
enum ModelChoice {
    Arch(Arch),
    Checkpoint(String),
}

impl std::str::FromStr for ModelChoice {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(match s.parse() {
            Ok(arch) => ModelChoice::Arch(arch),
            Err(_) => ModelChoice::Checkpoint(s.to_string()),
        })
    }
}
