//! `idkm train`: float training from scratch or from a checkpoint.

use super::common::{out_of_memory, BudgetArgs, DataArgs, ModelArgs, OptimArgs, ResumeArgs};
use super::fit::{fit, Resume};
use anyhow::{bail, Context, Result};
use idkm::device::DeviceSpec;
use idkm::quantize::snapshot;
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
    #[command(flatten)]
    resume: ResumeArgs,
    /// Checkpoint written after every epoch (safetensors).
    #[arg(long, short, default_value = "idkm-float.safetensors")]
    output: PathBuf,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let device = a.device.open()?;
    let split = a.data.load()?;
    let mut settings = a.data.settings();
    settings.extend(a.optim.settings());
    let (model, resume) = match &a.resume.resume {
        Some(path) => {
            let mut snapshot = snapshot::load(path, &device)
                .with_context(|| format!("loading {}", path.display()))?;
            if snapshot.clustering.is_some() {
                bail!(
                    "{} was written by `idkm quantize`: continue it with `idkm quantize --resume`",
                    path.display()
                );
            }
            let resume = Resume::of(&mut snapshot, path, &settings)?;
            (snapshot.model, Some(resume))
        }
        None => {
            let loaded = a.model.load(&split, a.optim.seed, &device)?;
            if loaded.clustering.is_some() {
                bail!("this checkpoint was written by `idkm quantize`; continue it with `idkm quantize --model ...`");
            }
            (loaded.model, None)
        }
    };
    let predicted = a.budget.check(&model, None, &split, &a.optim)?;
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
        &settings,
        resume,
    )
    .map_err(|e| out_of_memory(e, predicted, &device))?;
    Ok(())
}
