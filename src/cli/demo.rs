//! `idkm demo`: the whole pipeline on Fashion-MNIST in a few minutes: float
//! training of the small CNN, 2-bit IDKM fine-tuning, export, evaluation of
//! the export, and a summary table.

use super::common::{mib, peak_rss, DataArgs, OptimArgs, OptimizerName};
use super::fit::{eval_batches, fit, Settings};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use idkm::cluster::config::DEFAULT_PLAIN_ITER;
use idkm::cluster::{Forward, Init, KmeansConfig};
use idkm::data;
use idkm::model::{Arch, Model, Weights};
use idkm::quantize::{Clustering, LutDType, Palettized, QuantizePlan};
use idkm::train::evaluate;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Directory for the checkpoints and the exported model.
    #[arg(long, default_value = "idkm-demo")]
    out_dir: PathBuf,
    /// Training samples used (of 60,000).
    #[arg(long, default_value_t = 12_000)]
    train_limit: usize,
    /// Test samples used (of 10,000).
    #[arg(long, default_value_t = 10_000)]
    test_limit: usize,
    /// Float epochs.
    #[arg(long, default_value_t = 2)]
    float_epochs: usize,
    /// Clustering epochs.
    #[arg(long, default_value_t = 1)]
    quantize_epochs: usize,
    /// Bits per weight of the clustered layers.
    #[arg(long, default_value_t = 2)]
    bits: u32,
    /// Softmax temperature of the clustering [default: derived from each
    /// layer's weights].
    #[arg(long)]
    tau: Option<f64>,
    /// How the forward pass reaches the k-means fixed point: newton, or
    /// plain, which runs the papers' setting (k-means++, at most 30 plain
    /// steps stopped at a move of 1e-4 of the spread; give --tau with it).
    #[arg(long, default_value_t = Forward::Newton)]
    forward: Forward,
    /// Seed of everything.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Finds Fashion-MNIST, installing Debian's package when possible.
fn fashion_mnist() -> Result<PathBuf> {
    if let Some(dir) = data::fashion_mnist_dir() {
        return Ok(dir);
    }
    let how = "install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu) \
               or pass a directory of IDX files with `idkm quantize --data DIR`";
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if !root {
        bail!("Fashion-MNIST is not installed: {how}");
    }
    eprintln!("Fashion-MNIST is not installed; running `apt-get install -y dataset-fashion-mnist`");
    let status = std::process::Command::new("apt-get")
        .args(["install", "-y", "-q", "dataset-fashion-mnist"])
        .status()
        .context("running apt-get")?;
    match data::fashion_mnist_dir() {
        Some(dir) if status.success() => Ok(dir),
        _ => bail!("apt-get could not install Fashion-MNIST ({status}): {how}"),
    }
}

pub fn run(a: DemoArgs) -> Result<()> {
    let start = Instant::now();
    let device = Device::Cpu;
    let data_args = DataArgs {
        data: Some(fashion_mnist()?),
        train_limit: Some(a.train_limit),
        test_limit: Some(a.test_limit),
    };
    let split = data_args.load()?;
    std::fs::create_dir_all(&a.out_dir)
        .with_context(|| format!("creating {}", a.out_dir.display()))?;
    let path = |name: &str| a.out_dir.join(name);

    println!(
        "== float training: small CNN on {} ({} samples)",
        split.name,
        split.train.len()
    );
    let model = Model::new(Arch::SmallCnn, 1, split.classes, a.seed, &device)?;
    let optim = OptimArgs {
        epochs: a.float_epochs,
        batch_size: 64,
        lr: 0.05,
        optimizer: OptimizerName::Sgd,
        momentum: 0.9,
        nesterov: true,
        weight_decay: 5e-4,
        seed: a.seed,
    };
    let t = Instant::now();
    let float = fit(
        &model,
        None,
        &split,
        &optim,
        LutDType::F32,
        &path("float.safetensors"),
        &device,
        &Settings::new(),
        None,
    )?;
    let float_secs = t.elapsed().as_secs_f64();
    let float_acc = float.last().map_or(0.0, |r| r.test.accuracy);

    println!("\n== {}-bit IDKM fine-tuning", a.bits);
    let config = match a.forward {
        Forward::Newton => KmeansConfig {
            bits: a.bits,
            tau: a.tau,
            ..Default::default()
        },
        Forward::Plain => KmeansConfig {
            bits: a.bits,
            tau: a.tau,
            forward: Forward::Plain,
            max_iter: DEFAULT_PLAIN_ITER,
            tol: 1e-4,
            init: Init::KmeansPlusPlus,
            ..Default::default()
        },
    };
    let clustering = Clustering::new(&model, &QuantizePlan::new(config))?;
    clustering.prepare(&model)?;
    for (name, layer) in clustering.layers() {
        let tau = layer.tau().map_or("-".into(), |t| format!("{t:.2e}"));
        println!(
            "  {name}: {} bits, k = {}, tau {tau}, {} forward",
            layer.config().bits,
            layer.config().k(),
            layer.config().forward
        );
    }
    let optim = OptimArgs {
        epochs: a.quantize_epochs,
        lr: 0.01,
        ..optim
    };
    let t = Instant::now();
    let quantized = fit(
        &model,
        Some(&clustering),
        &split,
        &optim,
        LutDType::F32,
        &path("clustered.safetensors"),
        &device,
        &Settings::new(),
        None,
    )?;
    let quantize_secs = t.elapsed().as_secs_f64();
    let last = quantized.last().context("no clustering epoch ran")?;
    let hard_acc = last.hard.map_or(0.0, |h| h.accuracy);

    println!("\n== export and evaluation of the export");
    let export_path = path("palettized.safetensors");
    let palettized = clustering.palettize(&model, LutDType::F32)?;
    palettized.save(&export_path)?;
    let exported = evaluate_export(&export_path, &split, &device)?;

    let (before, after) = (palettized.float_bytes(), palettized.bytes());
    let row =
        |label: &str, acc: f64, rest: &str| println!("{label:<22}{:>7.2}%   {rest}", 100.0 * acc);
    println!("\n{:<22}{:>8}   size", "", "accuracy");
    row("fp32", float_acc, &format!("{before:>9} B"));
    row(
        &format!("{}-bit IDKM (soft)", a.bits),
        last.test.accuracy,
        "",
    );
    let ratio = before as f64 / after as f64;
    row(
        &format!("{}-bit IDKM (hard)", a.bits),
        hard_acc,
        &format!("{after:>9} B  ({ratio:.1}x smaller)"),
    );
    row(
        "exported, evaluated",
        exported,
        &export_path.display().to_string(),
    );
    println!("time                  float {float_secs:.0} s, clustering {quantize_secs:.0} s, total {:.0} s", start.elapsed().as_secs_f64());
    println!(
        "peak memory           {}",
        peak_rss().map(mib).unwrap_or_else(|| "?".into())
    );
    if exported != hard_acc {
        bail!("the exported model's accuracy {exported} differs from the hard-weight accuracy {hard_acc}");
    }
    Ok(())
}

/// Test accuracy of the palettized model in `path`.
fn evaluate_export(path: &Path, split: &data::DataSplit, device: &Device) -> Result<f64> {
    let p = Palettized::load(path)?;
    let model = Model::new(p.arch, p.channels, p.classes, 0, device)?;
    model.assign(p.tensors()?, path)?;
    Ok(evaluate(
        &model,
        &Weights::Float,
        eval_batches(&split.test, split, 256, device),
        "export",
    )?
    .accuracy)
}
