//! `idkm eval`: evaluates any model file on a test set.

use super::common::{check_fits, resolve_model, DataArgs};
use super::fit::eval_batches;
use anyhow::{Context, Result};
use idkm::device::DeviceSpec;
use idkm::loader::{self, Kind, Request};
use idkm::model::{Arch, Weights};
use idkm::train::evaluate;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    data: DataArgs,
    /// The model: a checkpoint of `idkm train`/`quantize`, a palettized model
    /// of `idkm export`, or a state dict (safetensors, PyTorch .pth/.bin);
    /// a local file or directory, or a hub repo id `owner/name[@revision]`.
    #[arg(long)]
    model: String,
    /// File inside the hub repo (with a repo id in --model).
    #[arg(long)]
    model_file: Option<String>,
    /// Architecture of a state dict: resnet18-cifar | resnet18 | small-cnn
    /// [default: inferred from its tensor names and shapes].
    #[arg(long)]
    arch: Option<Arch>,
    /// Samples per batch.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// cpu | cuda | cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

/// Test accuracy of the model in `--model` on the data's test part.
pub fn run(a: EvalArgs) -> Result<()> {
    let device = a.device.open()?;
    let split = a.data.load()?;
    let path = resolve_model(&a.model, a.model_file.as_deref())?;
    let request = Request {
        arch: a.arch,
        channels: Some(split.test.channels()),
        classes: Some(split.classes),
        ..Request::default()
    };
    let loaded = loader::load(&path, &request, &device)
        .with_context(|| format!("loading {}", path.display()))?;
    check_fits(
        &loaded.model,
        &loaded.kind,
        split.test.channels(),
        split.classes,
        &path,
    )?;
    let kind = match &loaded.kind {
        Kind::Palettized { .. } => loaded.kind.to_string(),
        other => format!("float weights, {other}"),
    };
    let model = loaded.model;
    let stats = evaluate(
        &model,
        &Weights::Float,
        eval_batches(&split.test, &split, a.batch_size, &device),
        "eval",
    )?;
    println!(
        "{} ({}, {kind}) on {} test ({} samples): accuracy {:.2}%, loss {:.4}",
        path.display(),
        model.arch(),
        split.name,
        stats.samples,
        100.0 * stats.accuracy,
        stats.loss
    );
    Ok(())
}
