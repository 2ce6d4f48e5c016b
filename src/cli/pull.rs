//! `idkm pull`: fetch a checkpoint from the Hugging Face hub into the local
//! cache (or find it there) and print its path.

use anyhow::{Context, Result};
use idkm::hub::{self, ModelSource};

#[derive(clap::Args, Debug)]
pub struct PullArgs {
    /// Hub repo id: `owner/name` or `owner/name@revision`.
    repo: String,
    /// Branch, tag or commit hash (overrides an `@revision` in the repo id)
    /// [default: main].
    #[arg(long)]
    revision: Option<String>,
    /// File of the repo to fetch [default: the first of model.safetensors,
    /// pytorch_model.bin, model.bin, *.pth that the repo has].
    #[arg(long)]
    file: Option<String>,
}

pub fn run(a: PullArgs) -> Result<()> {
    let source = ModelSource::hub(&a.repo, a.revision, a.file)?;
    let path = hub::resolve(&source).with_context(|| format!("pulling {}", a.repo))?;
    println!("{}", path.display());
    Ok(())
}
