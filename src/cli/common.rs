//! Arguments and steps shared by several commands.

use super::fit::Settings;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use idkm::cluster::config::{DEFAULT_NEWTON_ITER, DEFAULT_PLAIN_ITER, DEFAULT_TAU_SCALE};
use idkm::cluster::{Distance, Forward, Init, KmeansConfig, Method, Solver};
use idkm::data::{self, DataSplit};
use idkm::hub::{self, ModelSource};
use idkm::loader::{Kind, Request};
use idkm::model::{Arch, Model};
use idkm::quantize::Clustering;
use idkm::train::{OptimizerKind, SgdConfig};
use std::path::PathBuf;

/// How one weight tensor is clustered.
#[derive(clap::Args, Debug, Clone)]
pub struct KmeansArgs {
    /// Bits per index (k = 2^bits centroids), 1..=8.
    #[arg(long, default_value_t = 4)]
    pub bits: u32,
    /// Consecutive weights per vector: 1, 2, 4 or 8.
    #[arg(long, default_value_t = 1)]
    pub cluster_dim: usize,
    /// Softmax temperature for every layer, absolute (squared weight units
    /// with the squared distance) [default: derived from each layer's own
    /// weights, see --tau-scale].
    #[arg(long)]
    pub tau: Option<f64>,
    /// Without --tau, each layer's temperature is this times its
    /// hard-quantization error (the mean squared distance of a weight to its
    /// nearest initial centroid, per coordinate): small enough that every
    /// centroid stays distinct and the fixed point well conditioned.
    #[arg(long, default_value_t = DEFAULT_TAU_SCALE)]
    pub tau_scale: f64,
    /// How the forward pass reaches the k-means fixed point: newton (to
    /// the fixed point, where the implicit gradient is exact) or plain
    /// (k-means steps until --tol or --max-iter, as in the DKM and IDKM
    /// papers; DKM always steps).
    #[arg(long, default_value_t = Forward::Newton)]
    pub forward: Forward,
    /// squared | euclidean.
    #[arg(long, default_value_t = Distance::Squared)]
    pub distance: Distance,
    /// dkm | idkm | idkm-jfb.
    #[arg(long, default_value_t = Method::Idkm)]
    pub method: Method,
    /// Adjoint solver: auto | dense | cg | gmres | neumann.
    #[arg(long, default_value_t = KmeansConfig::default().solver)]
    pub solver: Solver,
    /// Most iterations per forward pass: Newton iterations, or plain
    /// k-means steps (which DKM unrolls) [default: 100 with newton, 30 with
    /// plain steps or DKM].
    #[arg(long)]
    pub max_iter: Option<usize>,
    /// k-means tolerance relative to the spread of the weights (their RMS
    /// distance from the mean): Newton stops when its step, the distance to
    /// the fixed point, is below it (0: as far as rounding allows); plain
    /// steps when a step moves no centroid further (0: exactly --max-iter).
    #[arg(long, default_value_t = KmeansConfig::default().tol)]
    pub tol: f64,
    /// Relative residual of the adjoint solve.
    #[arg(long, default_value_t = KmeansConfig::default().solver_tol)]
    pub solver_tol: f64,
    /// Maximum adjoint solver steps.
    #[arg(long, default_value_t = KmeansConfig::default().solver_max_steps)]
    pub solver_max_steps: usize,
    /// Initialisation: auto (optimal-1d for scalar weights, else kmeans++)
    /// | kmeans++ | optimal-1d.
    #[arg(long, default_value_t = Init::Auto)]
    pub init: Init,
}

impl KmeansArgs {
    /// The clustering configuration these arguments describe, with `seed`
    /// for the initialisation.
    pub fn config(&self, seed: u64) -> KmeansConfig {
        let steps = self.method == Method::Dkm || self.forward == Forward::Plain;
        KmeansConfig {
            bits: self.bits,
            cluster_dim: self.cluster_dim,
            tau: self.tau,
            tau_scale: self.tau_scale,
            forward: self.forward,
            max_iter: self.max_iter.unwrap_or(if steps {
                DEFAULT_PLAIN_ITER
            } else {
                DEFAULT_NEWTON_ITER
            }),
            tol: self.tol,
            distance: self.distance,
            method: self.method,
            solver: self.solver,
            solver_tol: self.solver_tol,
            solver_max_steps: self.solver_max_steps,
            init: self.init,
            seed,
        }
    }
}

/// Which data set, and how much of it.
#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    /// Data set directory: CIFAR-10 (binary or the hub's parquet files) or
    /// (Fashion-)MNIST IDX files [default: Debian's Fashion-MNIST in
    /// /usr/share/datasets/fashion-mnist].
    #[arg(long, env = "IDKM_DATA")]
    pub data: Option<PathBuf>,
    /// Use only the first N training samples.
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Use only the first N test samples.
    #[arg(long)]
    pub test_limit: Option<usize>,
}

impl DataArgs {
    /// Loads the data set and applies the limits.
    pub fn load(&self) -> Result<DataSplit> {
        let dir = match &self.data {
            Some(dir) => dir.clone(),
            None => data::fashion_mnist_dir().context(
                "no --data given and Fashion-MNIST is not installed: \
                 run `sudo apt-get install dataset-fashion-mnist` or pass --data DIR",
            )?,
        };
        let mut split = data::load(&dir)
            .with_context(|| format!("loading the data set in {}", dir.display()))?;
        if let Some(n) = self.train_limit {
            split.train = split.train.take(n)?;
        }
        if let Some(n) = self.test_limit {
            split.test = split.test.take(n)?;
        }
        if split.train.is_empty() || split.test.is_empty() {
            bail!(
                "the data set in {} has an empty training or test part",
                dir.display()
            );
        }
        Ok(split)
    }
}

/// Which model to start from.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Checkpoint to start from: a local file or directory, or a Hugging
    /// Face hub repo id `owner/name[@revision]` [default: a fresh,
    /// seeded initialisation].
    #[arg(long)]
    pub model: Option<String>,
    /// File inside the hub repo (with a repo id in --model).
    #[arg(long)]
    pub model_file: Option<String>,
    /// Architecture: resnet18-cifar | resnet18 | small-cnn [default: what
    /// an idkm checkpoint records or a state dict's tensors show; without
    /// --model, small-cnn for 28x28 grey images, resnet18-cifar otherwise].
    #[arg(long)]
    pub arch: Option<Arch>,
    /// Leave checkpoint tensors with these name prefixes out (for example
    /// `fc.` to train a new head for another number of classes).
    #[arg(long, value_delimiter = ',')]
    pub skip: Vec<String>,
}

impl ModelArgs {
    /// Builds the model for `data`, from the checkpoint if one is given
    /// (any file [`idkm::loader`] reads).
    pub fn load(&self, data: &DataSplit, seed: u64, device: &Device) -> Result<Loaded> {
        let channels = data.train.channels();
        let requested = self.arch;
        let Some(spec) = &self.model else {
            let default = if channels == 1 && data.train.height() == 28 {
                Arch::SmallCnn
            } else {
                Arch::ResNet18Cifar
            };
            let model = Model::new(
                requested.unwrap_or(default),
                channels,
                data.classes,
                seed,
                device,
            )?;
            return Ok(Loaded {
                model,
                clustering: None,
            });
        };
        let path = resolve_model(spec, self.model_file.as_deref())?;
        let request = Request {
            arch: requested,
            channels: Some(channels),
            classes: Some(data.classes),
            skip: self.skip.clone(),
            seed,
        };
        let loaded = idkm::loader::load(&path, &request, device)
            .with_context(|| format!("loading {}", path.display()))?;
        check_fits(&loaded.model, &loaded.kind, channels, data.classes, &path)?;
        tracing::info!(path = %path.display(), kind = %loaded.kind, arch = %loaded.model.arch(), "loaded the model");
        Ok(Loaded {
            model: loaded.model,
            clustering: loaded.clustering,
        })
    }
}

/// A model and, when the checkpoint was written by `idkm quantize`, its clustering.
pub struct Loaded {
    pub model: Model,
    pub clustering: Option<Clustering>,
}

/// The local file of `--model` (a path, or a hub repo id with `--model-file`).
pub fn resolve_model(spec: &str, model_file: Option<&str>) -> Result<PathBuf> {
    let mut source: ModelSource = spec.parse()?;
    if let (ModelSource::Hub { file, .. }, Some(f)) = (&mut source, model_file) {
        *file = Some(f.to_string());
    }
    hub::resolve(&source).with_context(|| format!("resolving --model {spec}"))
}

/// Fails unless `model` takes the data's channels and classes.
pub fn check_fits(
    model: &Model,
    kind: &Kind,
    channels: usize,
    classes: usize,
    path: &std::path::Path,
) -> Result<()> {
    if model.channels() == channels && model.classes() == classes {
        return Ok(());
    }
    let hint = match kind {
        Kind::StateDict(_) if model.classes() != classes => {
            " (--skip fc. trains a new head for them)"
        }
        _ => "",
    };
    bail!(
        "{} is a model for {} channels and {} classes; the data has {channels} and {classes}{hint}",
        path.display(),
        model.channels(),
        model.classes(),
    )
}

/// The optimiser and its schedule.
#[derive(clap::Args, Debug, Clone)]
pub struct OptimArgs {
    /// Epochs (at least 1: the checkpoint is written after each).
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub epochs: usize,
    /// Samples per batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Initial learning rate (cosine decay to 0).
    #[arg(long, default_value_t = 0.05)]
    pub lr: f64,
    /// The optimiser.
    #[arg(long, value_enum, default_value_t = OptimizerName::Sgd)]
    pub optimizer: OptimizerName,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Nesterov momentum.
    #[arg(long)]
    pub nesterov: bool,
    /// Weight decay.
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    /// Seed of the initialisation, shuffling and augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl OptimArgs {
    /// The optimiser these arguments describe.
    pub fn kind(&self) -> OptimizerKind {
        match self.optimizer {
            OptimizerName::Sgd => OptimizerKind::Sgd(SgdConfig {
                momentum: self.momentum,
                nesterov: self.nesterov,
                weight_decay: self.weight_decay,
            }),
            OptimizerName::Adamw => OptimizerKind::AdamW {
                weight_decay: self.weight_decay,
            },
        }
    }
}

/// The optimisers `--optimizer` names.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerName {
    /// SGD with (Nesterov) momentum and weight decay.
    Sgd,
    /// AdamW with decoupled weight decay.
    Adamw,
}

/// Peak resident memory of this process (VmHWM), in bytes.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes as MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

// --- Memory budget (`--memory-budget`) ------------------------------------

/// The memory budget of a training run.
#[derive(clap::Args, Debug, Clone)]
pub struct BudgetArgs {
    /// Refuse to start a run whose predicted peak memory (training step or
    /// evaluation) exceeds this, e.g. `7GiB` for a Jetson Orin Nano; the
    /// message says which method, batch size or bits would fit [default:
    /// the memory available when the run starts].
    #[arg(long, value_parser = parse_budget)]
    pub memory_budget: Option<u64>,
}

/// The memory budget: `--memory-budget`, or else the memory available now
/// (`None` where the system does not say), with how to name it in a message.
pub fn budget_or_available(budget: Option<u64>) -> Option<(u64, &'static str)> {
    match budget {
        Some(b) => Some((b, "--memory-budget")),
        None => idkm::memory::available_memory()
            .map(|a| (a, "the memory available now (--memory-budget overrides it)")),
    }
}

/// A byte count as `--memory-budget` takes it (`6GiB`, `512MiB`, `1e9`).
pub fn parse_budget(text: &str) -> std::result::Result<u64, String> {
    idkm::memory::parse_bytes(text)
}

/// Samples per evaluation batch in [`super::fit::fit`].
const EVAL_BATCH: usize = 256;

impl BudgetArgs {
    /// Checks the run against the budget before it starts; returns the
    /// predicted peak, for [`out_of_memory`].
    pub fn check(
        &self,
        model: &Model,
        clustering: Option<&Clustering>,
        split: &DataSplit,
        optim: &OptimArgs,
    ) -> Result<u64> {
        use idkm::memory::{self, ModelShape, Workload};
        let shape = ModelShape::of(model);
        let specs = match clustering {
            Some(c) => memory::clustering_specs(&shape, c),
            None => memory::float_specs(&shape),
        };
        let work = Workload {
            batch: optim.batch_size.clamp(1, split.train.len().max(1)),
            channels: split.train.channels(),
            height: split.train.height(),
            width: split.train.width(),
            classes: split.classes,
            optimizer_slots: Workload::slots(&optim.kind()),
            eval_batch: EVAL_BATCH.min(split.test.len()),
            data_bytes: memory::storage_bytes(&split.train.images)
                + memory::storage_bytes(&split.test.images),
        };
        let Some((budget, source)) = budget_or_available(self.memory_budget) else {
            return Ok(memory::estimate(&shape, &specs, &work).total());
        };
        match memory::check_budget(&shape, &specs, &work, budget) {
            Ok(e) => {
                tracing::info!(predicted = %memory::gib(e.total()), budget = %memory::gib(budget), "within the memory budget");
                Ok(e.total())
            }
            Err(msg) => bail!("{msg} [budget: {source}]"),
        }
    }
}

/// Whether `err` is a device's out-of-memory error (the CUDA driver's
/// `CUDA_ERROR_OUT_OF_MEMORY`, as candle passes it on) anywhere in its
/// chain of causes.
pub fn is_out_of_memory(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        let text = cause.to_string().to_ascii_lowercase();
        text.contains("out_of_memory") || text.contains("out of memory")
    })
}

/// `err` as it should reach the user: a device's out-of-memory error
/// becomes a message with the memory model's prediction for the run
/// (`predicted` bytes, from [`BudgetArgs::check`]) and what to change; any
/// other error is returned as it is. On a GPU it also gives the device's
/// total and free memory; the CUDA driver does not say how many bytes the
/// failed allocation asked for.
pub fn out_of_memory(err: anyhow::Error, predicted: u64, device: &Device) -> anyhow::Error {
    if !is_out_of_memory(&err) {
        return err;
    }
    let predicted = idkm::memory::human(predicted);
    let has = idkm::device::memory_info(device).map_or(String::new(), |(free, total)| {
        format!(
            " (it has {}, of which {} are free now that the run's tensors are released)",
            idkm::memory::human(total),
            idkm::memory::human(free)
        )
    });
    err.context(format!(
        "the {}{has} ran out of memory during the run; the memory model predicts a peak of {predicted} for it. \
         To fit: --method idkm-jfb (no adjoint system), fewer --bits, a smaller --batch-size, \
         or give --memory-budget the device's memory so that the run is checked before it starts \
         (`idkm profile --predict-only` prints the prediction of each choice)",
        device_name(device)
    ))
}

/// How a message names `device`.
fn device_name(device: &Device) -> &'static str {
    if device.is_cuda() {
        "GPU"
    } else {
        "device"
    }
}

/// `--resume`: continue an interrupted or crashed run.
#[derive(clap::Args, Debug, Clone)]
pub struct ResumeArgs {
    /// Continue the run that wrote this checkpoint where it stopped (after
    /// an interrupt, a crash or any epoch): its weights, clustering,
    /// optimiser state, learning-rate schedule and data order, so that it
    /// ends as the uninterrupted run would have. The other flags must be
    /// the run's own.
    #[arg(long, conflicts_with = "model")]
    pub resume: Option<PathBuf>,
}

impl DataArgs {
    /// The data flags a continued run must share with its run.
    pub fn settings(&self) -> Settings {
        let opt = |v: Option<usize>| v.map_or("-".to_string(), |n| n.to_string());
        Settings::from([
            (
                "--data".into(),
                self.data
                    .as_ref()
                    .map_or("(Fashion-MNIST)".into(), |d| d.display().to_string()),
            ),
            ("--train-limit".into(), opt(self.train_limit)),
            ("--test-limit".into(), opt(self.test_limit)),
        ])
    }
}

impl OptimArgs {
    /// The optimiser flags a continued run must share with its run.
    pub fn settings(&self) -> Settings {
        Settings::from([
            ("--epochs".into(), self.epochs.to_string()),
            ("--batch-size".into(), self.batch_size.to_string()),
            ("--lr".into(), self.lr.to_string()),
            (
                "--optimizer".into(),
                format!("{:?}", self.optimizer).to_lowercase(),
            ),
            ("--momentum".into(), self.momentum.to_string()),
            ("--nesterov".into(), self.nesterov.to_string()),
            ("--weight-decay".into(), self.weight_decay.to_string()),
            ("--seed".into(), self.seed.to_string()),
        ])
    }
}

/// The clustering flags of `config`, as a continued run must share them.
pub fn kmeans_settings(config: &KmeansConfig) -> Settings {
    match config.to_json() {
        serde_json::Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| (format!("--{}", k.replace('_', "-")), v.to_string()))
            .collect(),
        other => Settings::from([("clustering".into(), other.to_string())]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The driver's error as candle passes it on, under the step's context:
    /// the message keeps it and adds the prediction and what to change; any
    /// other error is left as it is.
    #[test]
    fn a_device_out_of_memory_error_names_the_prediction_and_what_to_change() {
        let driver = candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        );
        let err = anyhow::Error::from(driver).context("training step 3");
        let text = format!("{:#}", out_of_memory(err, 3 << 30, &Device::Cpu));
        for part in [
            "ran out of memory",
            "predicts a peak of 3.00 GiB",
            "--method idkm-jfb",
            "--batch-size",
            "--memory-budget",
            "training step 3",
            "CUDA_ERROR_OUT_OF_MEMORY",
        ] {
            assert!(text.contains(part), "`{part}` missing from: {text}");
        }
        let other = anyhow::anyhow!("shape mismatch for `fc.weight`");
        assert_eq!(
            format!("{:#}", out_of_memory(other, 3 << 30, &Device::Cpu)),
            "shape mismatch for `fc.weight`"
        );
    }
}
