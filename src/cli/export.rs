//! `idkm export`: writes the palettized model of a clustered checkpoint, or
//! the clustered model as a plain PyTorch state dict.

use super::common::resolve_model;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use idkm::loader::{self, Kind, Request};
use idkm::quantize::{save_torch, LutDType};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// What `idkm export` writes.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// Per clustered tensor its lookup table and packed indices (idkm's
    /// palettized format).
    Palettized,
    /// A float state dict with torchvision's names, each clustered tensor
    /// holding only its centroid values, for `model.load_state_dict`.
    Torch,
}

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// Checkpoint written by `idkm quantize` (or, for --format torch, a
    /// palettized model): a local file or a hub repo id.
    #[arg(long)]
    model: String,
    /// File inside the hub repo (with a repo id in --model).
    #[arg(long)]
    model_file: Option<String>,
    /// Where to write the model (safetensors).
    #[arg(long, short)]
    output: PathBuf,
    /// palettized | torch.
    #[arg(long, value_enum, default_value_t = ExportFormat::Palettized)]
    format: ExportFormat,
    /// Float type of the lookup tables, f32 | f16 [default: the one
    /// `idkm quantize` measured the hard accuracy with].
    #[arg(long)]
    lut: Option<LutDType>,
}

pub fn run(a: ExportArgs) -> Result<()> {
    let path = resolve_model(&a.model, a.model_file.as_deref())?;
    let loaded = loader::load(&path, &Request::default(), &Device::Cpu)
        .with_context(|| format!("loading {}", path.display()))?;
    let lut = match (a.lut, loaded.metadata.get("idkm.lut")) {
        (Some(lut), _) => lut,
        (None, Some(text)) => text.parse()?,
        (None, None) => LutDType::F32,
    };
    let model = &loaded.model;
    match (a.format, &loaded.kind, &loaded.clustering) {
        (ExportFormat::Palettized, Kind::Snapshot, Some(clustering)) => {
            let palettized = clustering.palettize(model, lut)?;
            palettized.save(&a.output).with_context(|| format!("writing {}", a.output.display()))?;
            let (before, after) = (palettized.float_bytes(), palettized.bytes());
            println!("{} -> {}", path.display(), a.output.display());
            println!("clustered tensors  {} ({} LUT)", palettized.packed.len(), lut);
            println!("original size      {before} B (fp32)");
            println!("compressed size    {after} B");
            println!("ratio              {:.2}x", before as f64 / after as f64);
        }
        (ExportFormat::Torch, Kind::Snapshot, Some(clustering)) => {
            let hard = clustering.hard_weights(model, lut)?;
            let configs: BTreeMap<String, serde_json::Value> =
                clustering.layers().iter().map(|(n, l)| (n.clone(), l.config().to_json())).collect();
            save_torch(model, &hard, &configs, &a.output).with_context(|| format!("writing {}", a.output.display()))?;
            println!("{} -> {}", path.display(), a.output.display());
            println!("clustered tensors  {} (each holds only its {} centroid values)", hard.len(), lut);
        }
        (ExportFormat::Torch, Kind::Palettized { clustered }, _) => {
            let configs: BTreeMap<String, serde_json::Value> = match loaded.metadata.get("idkm.clustering") {
                Some(text) => serde_json::from_str(text).context("reading the metadata `idkm.clustering`")?,
                None => BTreeMap::new(),
            };
            save_torch(model, &HashMap::new(), &configs, &a.output).with_context(|| format!("writing {}", a.output.display()))?;
            println!("{} -> {}", path.display(), a.output.display());
            println!("clustered tensors  {clustered} (each holds only its centroid values)");
        }
        (ExportFormat::Palettized, Kind::Palettized { .. }, _) => {
            bail!("{} is already a palettized model (--format torch writes it as a PyTorch state dict)", path.display())
        }
        (_, kind, _) => bail!(
            "{} has no clustering: its weights are all float ({kind}); run `idkm quantize` on it first",
            path.display()
        ),
    }
    if let Some(acc) = loaded.metadata.get("idkm.hard_accuracy") {
        println!(
            "hard accuracy      {:.2}% (as measured by quantize)",
            100.0 * acc.parse::<f64>().unwrap_or(f64::NAN)
        );
    }
    Ok(())
}
