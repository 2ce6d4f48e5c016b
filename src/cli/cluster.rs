//! `idkm cluster`: cluster one tensor and, given an upstream gradient, its
//! gradient; for researchers inspecting a layer and for checks from outside.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use idkm::cluster::{ClusteredWeight, Distance, KmeansConfig, Method, Solver};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    /// Safetensors file holding the weight.
    #[arg(long)]
    input: PathBuf,
    /// Name of the weight tensor (needed when the file holds several).
    #[arg(long)]
    tensor: Option<String>,
    /// Safetensors file holding the upstream gradient dL/dWt (same shape).
    #[arg(long)]
    grad: Option<PathBuf>,
    /// Where to write weight_clustered, centroids, indices [and grad_weight].
    #[arg(long)]
    output: PathBuf,
    /// Bits per index (k = 2^bits centroids), 1..=8.
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// Consecutive weights per vector: 1, 2, 4 or 8.
    #[arg(long, default_value_t = 1)]
    cluster_dim: usize,
    /// Softmax temperature.
    #[arg(long, default_value_t = KmeansConfig::default().tau)]
    tau: f64,
    /// squared | euclidean.
    #[arg(long, default_value_t = Distance::Squared)]
    distance: Distance,
    /// dkm | idkm | idkm-jfb.
    #[arg(long, default_value_t = Method::Idkm)]
    method: Method,
    /// Adjoint solver: cg | gmres | neumann.
    #[arg(long, default_value_t = Solver::Cg)]
    solver: Solver,
    /// Maximum k-means iterations.
    #[arg(long, default_value_t = KmeansConfig::default().max_iter)]
    max_iter: usize,
    /// k-means tolerance (largest centroid move).
    #[arg(long, default_value_t = KmeansConfig::default().tol)]
    tol: f64,
    /// Relative residual of the adjoint solve.
    #[arg(long, default_value_t = KmeansConfig::default().solver_tol)]
    solver_tol: f64,
    /// Maximum adjoint solver steps.
    #[arg(long, default_value_t = KmeansConfig::default().solver_max_steps)]
    solver_max_steps: usize,
    /// Initialisation: kmeans++ | optimal-1d.
    #[arg(long, default_value_t = idkm::cluster::Init::KmeansPlusPlus)]
    init: idkm::cluster::Init,
    /// Seed of the initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Reads the tensor `name` (or the only tensor) of a safetensors file, as f32.
fn read_tensor(path: &Path, name: Option<&str>) -> Result<(String, Tensor)> {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading safetensors file {}", path.display()))?;
    let mut names: Vec<String> = tensors.keys().cloned().collect();
    names.sort();
    let name = match name {
        Some(n) => n.to_string(),
        None if names.len() == 1 => names[0].clone(),
        None => bail!(
            "{} holds {} tensors; choose one with --tensor: {}",
            path.display(),
            names.len(),
            names.join(", ")
        ),
    };
    let t = tensors.remove(&name).with_context(|| {
        format!("{} has no tensor `{name}`; it has: {}", path.display(), names.join(", "))
    })?;
    if !t.dtype().is_float() {
        bail!("tensor `{name}` in {} is {:?}, not a float tensor", path.display(), t.dtype());
    }
    Ok((name, t.to_dtype(DType::F32)?))
}

pub fn run(a: ClusterArgs) -> Result<()> {
    let config = KmeansConfig {
        bits: a.bits,
        cluster_dim: a.cluster_dim,
        tau: a.tau,
        max_iter: a.max_iter,
        tol: a.tol,
        distance: a.distance,
        method: a.method,
        solver: a.solver,
        solver_tol: a.solver_tol,
        solver_max_steps: a.solver_max_steps,
        init: a.init,
        seed: a.seed,
    };
    let (name, w) = read_tensor(&a.input, a.tensor.as_deref())?;
    let grad = match &a.grad {
        None => None,
        Some(path) => {
            let (gname, g) = read_tensor(path, a.tensor.as_deref())?;
            if g.dims() != w.dims() {
                bail!(
                    "gradient `{gname}` in {} has shape {:?}, expected the weight's shape {:?}",
                    path.display(),
                    g.dims(),
                    w.dims()
                );
            }
            Some(g)
        }
    };
    let layer = ClusteredWeight::new(name.clone(), config)?;
    let w = Var::from_tensor(&w)?;
    let start = std::time::Instant::now();
    let soft = layer.forward(&w)?;
    let mut out = HashMap::new();
    if let Some(g) = grad {
        let grads = (&soft * g)?.sum_all()?.backward()?;
        let gw = grads.get(&w).context("no gradient reached the weight")?;
        out.insert("grad_weight".to_string(), gw.clone());
    }
    let (indices, centroids) = layer.palettize(&w)?;
    let seconds = start.elapsed().as_secs_f64();
    out.insert("weight_clustered".to_string(), soft.detach());
    out.insert("centroids".to_string(), centroids.to_dtype(DType::F32)?);
    out.insert("indices".to_string(), indices);
    idkm::io::save_safetensors(&out, &a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    let fwd = layer.last_forward();
    tracing::info!(
        tensor = %name,
        k = layer.config().k(),
        kmeans_steps = fwd.map(|r| r.steps),
        adjoint = ?layer.last_adjoint(),
        seconds,
        output = %a.output.display(),
        "clustered"
    );
    Ok(())
}
