//! `idkm eval`: evaluates a float checkpoint or a palettized model.

use super::common::{device, DataArgs};
use super::fit::eval_batches;
use anyhow::{bail, Context, Result};
use idkm::model::{Model, Weights};
use idkm::quantize::{snapshot, Palettized};
use idkm::train::evaluate;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    data: DataArgs,
    /// A checkpoint written by `idkm train`/`quantize` or a palettized model
    /// written by `idkm export`: a local file or a hub repo id.
    #[arg(long)]
    model: String,
    /// Samples per batch.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// cpu | cuda | cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// Test accuracy of the model in `path` on `data`'s test part.
pub fn run(a: EvalArgs) -> Result<()> {
    let device = device(&a.device)?;
    let split = a.data.load()?;
    let path = idkm::hub::resolve(&a.model.parse()?).with_context(|| format!("resolving --model {}", a.model))?;
    let metadata = idkm::checkpoint::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
    let (model, kind) = if metadata.contains_key("idkm.format") {
        let p = Palettized::load(&path)?;
        let model = Model::new(p.arch, p.channels, p.classes, 0, &device)?;
        model.assign(p.tensors()?, &path)?;
        (model, format!("palettized, {} clustered tensors", p.packed.len()))
    } else {
        let s = snapshot::load(&path, &device).with_context(|| format!("loading {}", path.display()))?;
        (s.model, "float weights".to_string())
    };
    if model.classes() != split.classes || model.channels() != split.test.channels() {
        bail!(
            "{} is a model for {} channels and {} classes; the data has {} and {}",
            path.display(),
            model.channels(),
            model.classes(),
            split.test.channels(),
            split.classes
        );
    }
    let stats = evaluate(&model, &Weights::Float, eval_batches(&split.test, &split, a.batch_size, &device), "eval")?;
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
