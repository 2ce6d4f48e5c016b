//! idkm's fp32 ResNet18-CIFAR training step on the CPU, side by side with
//! PyTorch's, and the CPU ops of `idkm::nn` against candle's own.
//!
//! ```text
//! cargo bench --profile dev --bench cpu_step
//! IDKM_TORCH_PYTHON=/opt/torchenv/bin/python cargo bench --profile dev --bench cpu_step
//! ```
//!
//! The step is the one `idkm train` runs: forward, cross-entropy, backward,
//! SGD (momentum 0.9, weight decay 5e-4) on a synthetic batch. With
//! `IDKM_TORCH_PYTHON` naming a Python with PyTorch, `scripts/torch_step.py`
//! runs PyTorch's same step in a child process with as many threads as
//! rayon's pool, and the two alternate step by step (one idkm step, one
//! PyTorch step, ...), so that both see the same machine load; the table
//! gives both medians and the median of the per-pair ratios.
//!
//! The op table times each distinct convolution of ResNet18-CIFAR at the
//! batch size (forward, input gradient, weight gradient) and each batch
//! norm + ReLU (forward and backward) against candle's own ops (its
//! `conv2d`, the `conv_transpose2d` and batch-as-channels `conv2d` of its
//! backward, candle-nn's `BatchNorm`), and the in-place SGD update against
//! the same update with tensor ops, interleaved the same way.
//!
//! Environment (all optional): `IDKM_CPU_BATCH` (32), `IDKM_CPU_STEPS` (5
//! measured steps after one warm-up each), `IDKM_CPU_OP_REPS` (5),
//! `IDKM_CPU_OPS` (1; 0 skips the op table), `IDKM_TORCH_PYTHON`.

use candle_core::CustomOp2;
use candle_core::{DType, Device, ModuleT, Tensor, Var};
use idkm::model::{Arch, BatchNorm, Model, Weights};
use idkm::nn::{conv2d, Conv2d, Conv2dParams};
use idkm::train::{Optimizer, OptimizerKind, Sgd, SgdConfig, TrainStep};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

fn seconds(f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed().as_secs_f64())
}

fn uniform(dims: &[usize], seed: u64) -> anyhow::Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
}

/// PyTorch's step in a child process, one step per request.
struct TorchStep {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl TorchStep {
    fn start(python: &str, batch: usize, threads: usize) -> anyhow::Result<Self> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/torch_step.py");
        let mut child = Command::new(python)
            .args([
                script,
                "--batch",
                &batch.to_string(),
                "--threads",
                &threads.to_string(),
            ])
            // OpenMP's worker threads otherwise spin after each parallel
            // region and take the cores from idkm's next step (and rayon's
            // from PyTorch's): alternating steps would time each other's
            // spinning. Passive waiting makes the two independent.
            .env("OMP_WAIT_POLICY", "PASSIVE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        anyhow::ensure!(
            line.trim() == "ready",
            "{python} {script}: expected `ready`, got {line:?}"
        );
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    fn request(&mut self, what: &str) -> anyhow::Result<Vec<String>> {
        writeln!(self.stdin, "{what}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        Ok(line.split_whitespace().map(str::to_string).collect())
    }

    /// Seconds of one step.
    fn step(&mut self) -> anyhow::Result<f64> {
        let reply = self.request("step")?;
        anyhow::ensure!(
            reply.first().map(String::as_str) == Some("step"),
            "PyTorch replied {reply:?}"
        );
        Ok(reply[1].parse()?)
    }

    /// Ends the child; returns its peak resident set in bytes.
    fn finish(mut self) -> anyhow::Result<u64> {
        let reply = self.request("quit")?;
        self.child.wait()?;
        anyhow::ensure!(
            reply.first().map(String::as_str) == Some("peak_rss"),
            "PyTorch replied {reply:?}"
        );
        Ok(reply[1].parse()?)
    }
}

fn step_table(batch: usize, steps: usize, threads: usize) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let model = Model::new(Arch::ResNet18Cifar, 3, 10, 0, &dev)?;
    let x = uniform(&[batch, 3, 32, 32], 1)?;
    let y = Tensor::from_vec(
        (0..batch as u32).map(|i| i % 10).collect::<Vec<_>>(),
        batch,
        &dev,
    )?;
    let vars = model.trainable().into_iter().map(|(_, v)| v).collect();
    let sgd = SgdConfig {
        momentum: 0.9,
        nesterov: false,
        weight_decay: 5e-4,
    };
    let mut train = TrainStep::new(Optimizer::new(OptimizerKind::Sgd(sgd), vars, 0.01)?);
    let mut idkm_step = || {
        seconds(|| {
            train.run(&model, &Weights::Float, &x, &y)?;
            Ok(())
        })
    };
    let mut torch = match std::env::var("IDKM_TORCH_PYTHON") {
        Ok(python) => Some(TorchStep::start(&python, batch, threads)?),
        Err(_) => None,
    };
    // One warm-up step each.
    idkm_step()?;
    if let Some(t) = torch.as_mut() {
        t.step()?;
    }
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        ours.push(idkm_step()?);
        if let Some(t) = torch.as_mut() {
            theirs.push(t.step()?);
        }
    }
    let peak = idkm::memory::peak_rss().unwrap_or(0);
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!("ResNet18-CIFAR fp32 training step, batch {batch}, {threads} threads, median of {steps} steps after one warm-up\n");
    println!("| | s/step (median) | s/step (min) | peak RSS MiB |");
    println!("|---|---:|---:|---:|");
    println!(
        "| idkm | {:.3} | {:.3} | {:.0} |",
        median(&ours),
        ours.iter().cloned().fold(f64::INFINITY, f64::min),
        mib(peak)
    );
    if let Some(t) = torch {
        let peak = t.finish()?;
        println!(
            "| PyTorch | {:.3} | {:.3} | {:.0} |",
            median(&theirs),
            theirs.iter().cloned().fold(f64::INFINITY, f64::min),
            mib(peak)
        );
        let ratios: Vec<f64> = ours.iter().zip(&theirs).map(|(a, b)| a / b).collect();
        println!(
            "\nidkm / PyTorch: {:.2}x (median of the per-pair ratios; each pair ran back to back; range {:.2}-{:.2})",
            median(&ratios),
            ratios.iter().cloned().fold(f64::INFINITY, f64::min),
            ratios.iter().cloned().fold(0.0, f64::max)
        );
    }
    Ok(())
}

/// Times `ours` and `theirs` alternately, `reps` times each after one
/// warm-up (their results dropped); returns the medians in milliseconds.
fn versus<A, B>(
    reps: usize,
    mut ours: impl FnMut() -> candle_core::Result<A>,
    mut theirs: impl FnMut() -> candle_core::Result<B>,
) -> anyhow::Result<(f64, f64)> {
    ours()?;
    theirs()?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        a.push(seconds(|| Ok(ours().map(|_| ())?))?);
        b.push(seconds(|| Ok(theirs().map(|_| ())?))?);
    }
    Ok((1e3 * median(&a), 1e3 * median(&b)))
}

fn op_row(name: &str, (ours, candle): (f64, f64)) {
    println!(
        "| {name} | {ours:.1} | {candle:.1} | {:.1}x |",
        candle / ours
    );
}

/// The distinct convolutions of ResNet18-CIFAR: (cin, cout, size, kernel, stride).
const RESNET18_CIFAR_CONVS: [(usize, usize, usize, usize, usize); 11] = [
    (3, 64, 32, 3, 1),
    (64, 64, 32, 3, 1),
    (64, 128, 32, 3, 2),
    (64, 128, 32, 1, 2),
    (128, 128, 16, 3, 1),
    (128, 256, 16, 3, 2),
    (128, 256, 16, 1, 2),
    (256, 256, 8, 3, 1),
    (256, 512, 8, 3, 2),
    (256, 512, 8, 1, 2),
    (512, 512, 4, 3, 1),
];

fn op_table(batch: usize, reps: usize) -> anyhow::Result<()> {
    println!(
        "\nOps of ResNet18-CIFAR at batch {batch}, f32: median ms of {reps} alternating runs\n"
    );
    println!("| op | idkm ms | candle ms | speed-up |");
    println!("|---|---:|---:|---:|");
    for (i, &(cin, cout, size, k, stride)) in RESNET18_CIFAR_CONVS.iter().enumerate() {
        let padding = k / 2;
        let p = Conv2dParams {
            padding,
            stride,
            dilation: 1,
        };
        let x = uniform(&[batch, cin, size, size], 10 + i as u64)?;
        let w = (uniform(&[cout, cin, k, k], 20 + i as u64)? * 0.05)?;
        let y = conv2d(&x, &w, p)?;
        let dy = uniform(y.dims(), 30 + i as u64)?;
        let (xv, wv) = (Var::from_tensor(&x)?, Var::from_tensor(&w)?);
        let name = format!("{cin}->{cout} {k}x{k}/{stride} at {size}x{size}");
        let op = Conv2d(p);
        let forward = versus(
            reps,
            || conv2d(&x, &w, p),
            || x.conv2d(&w, padding, stride, 1, 1),
        )?;
        op_row(&format!("conv forward {name}"), forward);
        // Our backward gives the gradients of the tracked arguments only:
        // with a variable x, the input gradient; with a variable w, the
        // weight gradient. candle's are the ops of its conv2d backward.
        let out_padding = size - ((y.dim(2)? - 1) * stride + k - 2 * padding);
        let input_grad = versus(
            reps,
            || op.bwd(xv.as_tensor(), &w, &y, &dy),
            || dy.conv_transpose2d(&w, padding, out_padding, stride, 1),
        )?;
        op_row(&format!("conv input grad {name}"), input_grad);
        let weight_grad = versus(
            reps,
            || op.bwd(&x, wv.as_tensor(), &y, &dy),
            || {
                x.transpose(0, 1)?
                    .conv2d(&dy.transpose(0, 1)?, padding, 1, stride, 1)?
                    .transpose(0, 1)
            },
        )?;
        op_row(&format!("conv weight grad {name}"), weight_grad);
    }
    for (c, size) in [(64, 32), (128, 16), (256, 8), (512, 4)] {
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let bn = BatchNorm::new(c, 1e-5, vb.pp("ours"))?;
        let reference = candle_nn::batch_norm(c, 1e-5, vb.pp("candle"))?;
        let x = Var::from_tensor(&uniform(&[batch, c, size, size], 40)?)?;
        let dy = uniform(&[batch, c, size, size], 41)?;
        let step = |y: Tensor| (y * &dy)?.sum_all()?.backward();
        let both = versus(
            reps,
            || step(bn.forward_relu(x.as_tensor(), true)?),
            || step(reference.forward_t(x.as_tensor(), true)?.relu()?),
        )?;
        op_row(
            &format!("batch norm + ReLU, fwd + bwd, {c} x {size}x{size}"),
            both,
        );
    }
    // The optimiser: one SGD update of every ResNet18-CIFAR parameter, in
    // place against the composed tensor ops (the update before).
    let model = Model::new(Arch::ResNet18Cifar, 3, 10, 0, &Device::Cpu)?;
    let x = uniform(&[batch, 3, 32, 32], 50)?;
    let labels = Tensor::from_vec(
        (0..batch as u32).map(|i| i % 10).collect::<Vec<_>>(),
        batch,
        &Device::Cpu,
    )?;
    let logits = model.forward(&x, true, &Weights::Float)?;
    let grads = candle_nn::loss::cross_entropy(&logits, &labels)?.backward()?;
    let vars: Vec<Var> = model.trainable().into_iter().map(|(_, v)| v).collect();
    let config = SgdConfig {
        momentum: 0.9,
        nesterov: false,
        weight_decay: 5e-4,
    };
    let mut sgd = Sgd::new(vars.clone(), 0.01, config);
    let mut velocity = vec![None; vars.len()];
    let sgd_step = versus(
        reps,
        || sgd.step(&grads),
        || {
            for (v, b) in vars.iter().zip(velocity.iter_mut()) {
                Sgd::step_composed(config, 0.01, v, grads.get(v).expect("a gradient"), b)?;
            }
            Ok(())
        },
    )?;
    let params: usize = vars.iter().map(|v| v.elem_count()).sum();
    op_row(
        &format!(
            "SGD update (momentum, weight decay), {:.1}M parameters",
            params as f64 / 1e6
        ),
        sgd_step,
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let batch = env_or("IDKM_CPU_BATCH", 32);
    let threads = rayon::current_num_threads();
    step_table(batch, env_or("IDKM_CPU_STEPS", 5), threads)?;
    if env_or("IDKM_CPU_OPS", 1) != 0 {
        op_table(batch, env_or("IDKM_CPU_OP_REPS", 5))?;
    }
    Ok(())
}
