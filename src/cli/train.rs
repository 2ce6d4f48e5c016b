//! `idkm train`: float training from scratch or from a checkpoint.

use super::common::{BudgetArgs, DataArgs, ModelArgs, OptimArgs};
use super::fit::fit;
use anyhow::{bail, Result};
use idkm::device::DeviceSpec;
use idkm::quantize::LutDType;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    optim: OptimArgs,
    #[command(flatten)]
    budget: BudgetArgs,
    /// cpu | cuda | cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Checkpoint written after every epoch (safetensors).
    #[arg(long, short, default_value = "idkm-float.safetensors")]
    output: PathBuf,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let device = a.device.open()?;
    let split = a.data.load()?;
    let loaded = a.model.load(&split, a.optim.seed, &device)?;
    if loaded.clustering.is_some() {
        bail!("this checkpoint was written by `idkm quantize`; continue it with `idkm quantize --model ...`");
    }
    let model = loaded.model;
    a.budget.check(&model, None, &split, &a.optim)?;
    println!(
        "{} on {} ({} train / {} test), {} parameters",
        model.arch(),
        split.name,
        split.train.len(),
        split.test.len(),
        model.parameter_count()
    );
    fit(
        &model,
        None,
        &split,
        &a.optim,
        LutDType::F32,
        &a.output,
        &device,
    )?;
    Ok(())
}
