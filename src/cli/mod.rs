//! Command-line arguments (parsed loosely by clap) and their dispatch.

mod cluster;

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
}

/// Logs to standard error through tracing.
pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// Runs one command.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Cluster(a) => cluster::run(a),
    }
}
