//! `idkm export`: writes the palettized model of a clustered checkpoint.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use idkm::quantize::{snapshot, LutDType};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// Checkpoint written by `idkm quantize`: a local file or a hub repo id.
    #[arg(long)]
    model: String,
    /// Where to write the palettized model (safetensors).
    #[arg(long, short)]
    output: PathBuf,
    /// Float type of the lookup tables, f32 | f16 [default: the one
    /// `idkm quantize` measured the hard accuracy with].
    #[arg(long)]
    lut: Option<LutDType>,
}

pub fn run(a: ExportArgs) -> Result<()> {
    let path = idkm::hub::resolve(&a.model.parse()?).with_context(|| format!("resolving --model {}", a.model))?;
    let s = snapshot::load(&path, &Device::Cpu).with_context(|| format!("loading {}", path.display()))?;
    let Some(clustering) = s.clustering else {
        bail!("{} has no clustering: it is a float checkpoint (run `idkm quantize` on it first)", path.display());
    };
    let lut = match (a.lut, s.metadata.get("idkm.lut")) {
        (Some(lut), _) => lut,
        (None, Some(text)) => text.parse()?,
        (None, None) => LutDType::F32,
    };
    let palettized = clustering.palettize(&s.model, lut)?;
    palettized.save(&a.output).with_context(|| format!("writing {}", a.output.display()))?;
    let (before, after) = (palettized.float_bytes(), palettized.bytes());
    println!("{} -> {}", path.display(), a.output.display());
    println!("clustered tensors  {} ({} LUT)", palettized.packed.len(), lut);
    println!("original size      {before} B (fp32)");
    println!("compressed size    {after} B");
    println!("ratio              {:.2}x", before as f64 / after as f64);
    if let Some(acc) = s.metadata.get("idkm.hard_accuracy") {
        println!("hard accuracy      {:.2}% (as measured by quantize)", 100.0 * acc.parse::<f64>().unwrap_or(f64::NAN));
    }
    Ok(())
}
