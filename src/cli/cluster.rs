//! `idkm cluster`: cluster one tensor and, given an upstream gradient, its
//! gradient; for researchers inspecting a layer and for checks from outside.

use super::common::{budget_or_available, parse_budget, KmeansArgs};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use idkm::cluster::backward::Adjoint;
use idkm::cluster::{ClusteredWeight, Forward, ForwardReport, KmeansConfig, Method};
use idkm::memory;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    /// Safetensors file holding the weight [default: a built-in example
    /// layer, 64x64x3x3 seeded normal weights with a seeded gradient].
    #[arg(long)]
    input: Option<PathBuf>,
    /// Name of the weight tensor (needed when the file holds several).
    #[arg(long)]
    tensor: Option<String>,
    /// Safetensors file holding the upstream gradient dL/dWt (same shape).
    #[arg(long)]
    grad: Option<PathBuf>,
    /// Where to write weight_clustered, centroids, indices [and grad_weight]
    /// as safetensors (nothing is written without it).
    #[arg(long)]
    output: Option<PathBuf>,
    #[command(flatten)]
    kmeans: KmeansArgs,
    /// Refuse a clustering predicted to need more memory than this
    /// [default: the memory available now].
    #[arg(long, value_parser = parse_budget)]
    memory_budget: Option<u64>,
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
        format!(
            "{} has no tensor `{name}`; it has: {}",
            path.display(),
            names.join(", ")
        )
    })?;
    if !t.dtype().is_float() {
        bail!(
            "tensor `{name}` in {} is {:?}, not a float tensor",
            path.display(),
            t.dtype()
        );
    }
    Ok((name, t.to_dtype(DType::F32)?))
}

pub fn run(a: ClusterArgs) -> Result<()> {
    let config = a.kmeans.config(a.seed);
    let (name, w, grad) = match &a.input {
        Some(input) => {
            let (name, w) = read_tensor(input, a.tensor.as_deref())?;
            let grad = match &a.grad {
                None => None,
                Some(path) => Some(read_grad(path, a.tensor.as_deref(), &w)?),
            };
            (name, w, grad)
        }
        None => {
            let (w, g) = example_layer()?;
            ("example.conv.weight".to_string(), w, Some(g))
        }
    };
    check_memory(&name, w.elem_count(), &config, a.memory_budget)?;
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
    let hard = centroids.index_select(&indices, 0)?.reshape(w.shape())?;
    out.insert("weight_hard".to_string(), hard.to_dtype(DType::F32)?);
    out.insert("weight_clustered".to_string(), soft.detach());
    out.insert("centroids".to_string(), centroids.to_dtype(DType::F32)?);
    out.insert("indices".to_string(), indices);
    print_summary(&name, &layer, &out, seconds)?;
    if let Some(path) = &a.output {
        let tau = layer.tau().context("the temperature was not set")?;
        let metadata = HashMap::from([("tau".to_string(), tau.to_string())]);
        let tensors = out.into_iter().collect();
        idkm::checkpoint::save(&tensors, &metadata, path)
            .with_context(|| format!("writing {}", path.display()))?;
        tracing::info!(path = %path.display(), "wrote results");
    }
    Ok(())
}

/// Reads the upstream gradient and checks it has the weight's shape.
fn read_grad(path: &Path, tensor: Option<&str>, w: &Tensor) -> Result<Tensor> {
    let (name, g) = read_tensor(path, tensor)?;
    if g.dims() != w.dims() {
        bail!(
            "gradient `{name}` in {} has shape {:?}, expected the weight's shape {:?}",
            path.display(),
            g.dims(),
            w.dims()
        );
    }
    Ok(g)
}

/// The built-in example: a 64x64x3x3 conv weight (std 0.05) and a gradient, seeded.
fn example_layer() -> Result<(Tensor, Tensor)> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(2312);
    let mut normal = |n: usize, std: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
                std * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect()
    };
    let shape = (64, 64, 3, 3);
    let w = Tensor::from_vec(normal(36_864, 0.05), shape, &Device::Cpu)?;
    let g = Tensor::from_vec(normal(36_864, 1.0), shape, &Device::Cpu)?;
    Ok((w, g))
}

/// The forward solve's line of the summary.
fn forward_summary(cfg: &idkm::cluster::KmeansConfig, r: &ForwardReport) -> String {
    let k = cfg.k();
    if cfg.method == Method::Dkm {
        return format!(
            "k-means         {} steps recorded by autograd; {} of {k} centroids distinct",
            r.iterations, r.distinct
        );
    }
    let passes = match (r.weight_passes, r.bin_passes) {
        (w, 0) => format!("{w} passes"),
        (w, b) => format!("{w} passes over the weights + {b} over bins"),
    };
    let outcome = if r.converged {
        "converged"
    } else if r.at_rounding {
        "stopped short of --tol where the rounding of the passes hides the residual"
    } else {
        "stopped at --max-iter"
    };
    let mut line = match cfg.forward {
        Forward::Newton => format!(
            "k-means         newton: {} iterations, {passes}, {outcome}; distance to the fixed point {:.1e} of the spread, residual {:.1e}",
            r.iterations, r.distance, r.residual
        ),
        Forward::Plain => format!("k-means         {} plain steps ({passes}), {outcome}; last move {:.1e} of the spread", r.iterations, r.distance),
    };
    let stable = match r.stable {
        Some(true) => ", stable",
        Some(false) => ", NOT stable",
        None => "",
    };
    let cond = r
        .cond
        .map(|c| format!(", cond(I - J) {c:.0}"))
        .unwrap_or_default();
    line.push_str(&format!(
        "\nfixed point     {} of {k} centroids distinct{stable}{cond}",
        r.distinct
    ));
    if r.damped + r.backtracks + r.plain_steps > 0 {
        line.push_str(&format!(
            "\nsafeguards      {} damped iterations, {} shortened steps, {} plain steps",
            r.damped, r.backtracks, r.plain_steps
        ));
    }
    line
}

/// Prints what was computed, for a person at a terminal.
fn print_summary(
    name: &str,
    layer: &ClusteredWeight,
    out: &HashMap<String, Tensor>,
    seconds: f64,
) -> Result<()> {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let cfg = layer.config();
    let soft = &out["weight_clustered"];
    let (numel, k) = (soft.elem_count(), cfg.k());
    let vectors = numel / cfg.cluster_dim;
    let packed = (vectors * cfg.bits as usize).div_ceil(8) + k * cfg.cluster_dim * 4;
    writeln!(
        o,
        "tensor          {name} {:?} ({numel} weights)",
        soft.dims()
    )?;
    let tau = match (cfg.tau, layer.tau()) {
        (Some(tau), _) => format!("tau = {tau:.3e} (given)"),
        (None, Some(tau)) => format!(
            "tau = {tau:.3e} ({} x the hard-quantization error)",
            cfg.tau_scale
        ),
        (None, None) => "tau not set".into(),
    };
    writeln!(
        o,
        "clustering      {} | {} bits, k = {k}, d = {} | {tau} | {} distance",
        cfg.method, cfg.bits, cfg.cluster_dim, cfg.distance
    )?;
    if let Some(r) = layer.last_forward() {
        writeln!(o, "{}", forward_summary(cfg, &r))?;
    }
    match layer.last_adjoint() {
        Some(Adjoint::JacobianFree) => writeln!(o, "adjoint         u = h (Jacobian-free)")?,
        Some(Adjoint::Solved(r)) => writeln!(o, "adjoint         {} solved in {} steps (relative residual {:.1e})", cfg.solver, r.steps, r.rel_residual)?,
        Some(Adjoint::BestIterate(r)) => writeln!(o, "adjoint         {} missed its tolerance: best iterate after {} steps (residual {:.1e})", cfg.solver, r.steps, r.rel_residual)?,
        Some(Adjoint::FellBackToJfb(r)) => writeln!(o, "adjoint         {} diverged after {} steps (residual {:.1e}): JFB used", cfg.solver, r.steps, r.rel_residual)?,
        Some(Adjoint::Reused { distance }) => writeln!(
            o,
            "adjoint         dense, the forward solve's factorisation (assembled {distance:.1e} of the spread from the fixed point)"
        )?,
        None if out.contains_key("grad_weight") => writeln!(o, "adjoint         autograd through the recorded iterations")?,
        None => {}
    }
    if let Some(g) = out.get("grad_weight") {
        writeln!(
            o,
            "grad norm       {:.4e}",
            g.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt()
        )?;
    }
    writeln!(
        o,
        "size            {} B fp32 -> {packed} B palettized ({:.1}x smaller)",
        numel * 4,
        (numel * 4) as f64 / packed as f64
    )?;
    writeln!(o, "time            {seconds:.3} s")?;
    Ok(())
}

/// Refuses a clustering of `numel` weights predicted to need more than the
/// budget: the weights, the soft weights and their gradient, and what the
/// method keeps and holds in flight (DKM's graph grows with --max-iter).
fn check_memory(
    name: &str,
    numel: usize,
    config: &KmeansConfig,
    budget: Option<u64>,
) -> Result<()> {
    let Some((budget, source)) = budget_or_available(budget) else {
        return Ok(());
    };
    let need = |c: &KmeansConfig| {
        let (kept, transient) = memory::layer_bytes(numel, c);
        kept + transient + 3 * 4 * numel as u64
    };
    let needed = need(config);
    if needed <= budget {
        return Ok(());
    }
    let mut hint = String::new();
    if config.method == Method::Dkm {
        let idkm = need(&KmeansConfig {
            method: Method::Idkm,
            ..config.clone()
        });
        hint = format!(
            "; --method idkm needs {} (its memory does not grow with the iterations)",
            memory::human(idkm)
        );
    }
    bail!(
        "clustering `{name}` ({numel} weights, {} at {} bits, {} iterations) is predicted to need {}, more than {source}: {}{hint}",
        config.method,
        config.bits,
        config.max_iter,
        memory::human(needed),
        memory::human(budget),
    )
}
