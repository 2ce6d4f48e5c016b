//! `idkm quantize`: fine-tunes a float model with clustering on its conv and
//! linear weights.

use super::common::{
    kmeans_settings, out_of_memory, BudgetArgs, DataArgs, KmeansArgs, Loaded, ModelArgs, OptimArgs,
    ResumeArgs,
};
use super::fit::{fit, Resume};
use anyhow::{bail, Context, Result};
use idkm::device::DeviceSpec;
use idkm::quantize::snapshot;
use idkm::quantize::{Clustering, LutDType, QuantizePlan};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct QuantizeArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    optim: OptimArgs,
    #[command(flatten)]
    kmeans: KmeansArgs,
    #[command(flatten)]
    budget: BudgetArgs,
    /// Layers with fewer weights stay in float.
    #[arg(long, default_value_t = QuantizePlan::MIN_WEIGHTS)]
    min_weights: usize,
    /// TOML file of per-layer overrides (bits, cluster_dim, tau, method,
    /// skip), e.g. `[layers.conv1]\nbits = 8`.
    #[arg(long)]
    layers: Option<PathBuf>,
    /// Float type of the exported lookup tables (f32 | f16); the hard-weight
    /// accuracy is measured with it.
    #[arg(long, default_value = "f32")]
    lut: LutDType,
    /// cpu | cuda | cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    #[command(flatten)]
    resume: ResumeArgs,
    /// Checkpoint written after every epoch: the float weights with every
    /// clustered layer's centroids and config (input of `idkm export`).
    #[arg(long, short, default_value = "idkm-clustered.safetensors")]
    output: PathBuf,
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    let device = a.device.open()?;
    let split = a.data.load()?;
    let mut settings = a.data.settings();
    settings.extend(a.optim.settings());
    settings.extend(kmeans_settings(&a.kmeans.config(a.optim.seed)));
    settings.insert("--min-weights".into(), a.min_weights.to_string());
    settings.insert(
        "--layers".into(),
        a.layers
            .as_ref()
            .map_or("-".into(), |p| p.display().to_string()),
    );
    let (loaded, resume) = match &a.resume.resume {
        Some(path) => {
            let mut snapshot = snapshot::load(path, &device)
                .with_context(|| format!("loading {}", path.display()))?;
            if snapshot.clustering.is_none() {
                bail!(
                    "{} was written by `idkm train`: continue it with `idkm train --resume`",
                    path.display()
                );
            }
            let resume = Resume::of(&mut snapshot, path, &settings)?;
            (
                Loaded {
                    model: snapshot.model,
                    clustering: snapshot.clustering,
                },
                Some(resume),
            )
        }
        None => (a.model.load(&split, a.optim.seed, &device)?, None),
    };
    let model = loaded.model;
    let clustering = match loaded.clustering {
        // Continue a clustered checkpoint with its own per-layer configs.
        Some(c) => c,
        None => {
            let mut plan = QuantizePlan::new(a.kmeans.config(a.optim.seed));
            plan.min_weights = a.min_weights;
            if let Some(path) = &a.layers {
                plan = plan.with_overrides_file(path)?;
            }
            Clustering::new(&model, &plan).context("planning the clustering")?
        }
    };
    let predicted = a
        .budget
        .check(&model, Some(&clustering), &split, &a.optim)?;
    println!(
        "{} on {} ({} train / {} test)",
        model.arch(),
        split.name,
        split.train.len(),
        split.test.len()
    );
    clustering
        .prepare(&model)
        .with_context(|| match (&a.resume.resume, &a.model.model) {
            (Some(path), _) => format!("initialising the clustering of {}", path.display()),
            (None, Some(model)) => format!("initialising the clustering of {model}"),
            (None, None) => "initialising the clustering".into(),
        })?;
    for (name, layer) in clustering.layers() {
        let c = layer.config();
        let rule = if c.tau.is_some() {
            "given".to_string()
        } else {
            format!("{} x its hard-quantization error", c.tau_scale)
        };
        let tau = layer.tau().map_or("-".into(), |t| format!("{t:.3e}"));
        println!(
            "  {name}: {} bits, d = {}, {}, {} forward, tau {tau} ({rule})",
            c.bits, c.cluster_dim, c.method, c.forward
        );
    }
    fit(
        &model,
        Some(&clustering),
        &split,
        &a.optim,
        a.lut,
        &a.output,
        &device,
        &settings,
        resume,
    )
    .map_err(|e| out_of_memory(e, predicted, &device))?;
    Ok(())
}
