//! Command-line arguments (parsed loosely by clap) and their dispatch.

mod cluster;
mod common;
mod demo;
mod eval;
mod export;
mod fit;
mod profile;
mod pull;
mod quantize;
mod train;

use clap::{Parser, Subcommand};

/// Compress neural networks by train-time weight clustering with implicit,
/// differentiable k-means (IDKM).
#[derive(Parser, Debug)]
#[command(name = "idkm", version, about)]
pub struct Args {
    /// Log filter (tracing's `RUST_LOG` syntax, e.g. `debug` or `idkm=trace`).
    #[arg(long, global = true, default_value = "info", env = "RUST_LOG")]
    pub log: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Cluster one tensor of a safetensors file and write the results.
    Cluster(cluster::ClusterArgs),
    /// Fetch a checkpoint from the Hugging Face hub (or find it in the
    /// cache) and print its local path.
    Pull(pull::PullArgs),
    /// The whole pipeline on Fashion-MNIST in a few minutes: float training,
    /// 2-bit IDKM, export, evaluation of the export.
    Demo(demo::DemoArgs),
    /// Float training from scratch or from a checkpoint.
    Train(train::TrainArgs),
    /// Fine-tune a float model with clustering on its conv and linear weights.
    Quantize(quantize::QuantizeArgs),
    /// Write the palettized model (packed indices + lookup tables) of a
    /// clustered checkpoint.
    Export(export::ExportArgs),
    /// Evaluate a checkpoint or a palettized model on a test set.
    Eval(eval::EvalArgs),
    /// Peak memory and step time of fp32, DKM, IDKM and IDKM-JFB training
    /// steps side by side, each in a fresh process, beside the memory
    /// model's prediction: a table, a JSON file and plots.
    Profile(profile::ProfileArgs),
}

/// Logs to standard error through tracing.
pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Runs one command.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Cluster(a) => cluster::run(a),
        Command::Pull(a) => pull::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Train(a) => train::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Export(a) => export::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Profile(a) => profile::run(a),
    }
}
