//! Optimisers: SGD with momentum, Nesterov and weight decay (as PyTorch's
//! `torch.optim.SGD`), and candle's AdamW.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::{AdamW, Optimizer as _, ParamsAdamW};

/// Hyper-parameters of SGD.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    /// Momentum factor (0 = plain SGD).
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 penalty added to the gradient (`g + wd * w`).
    pub weight_decay: f64,
}

/// SGD with momentum, in PyTorch's formulation:
/// `g += wd * w; b = mu * b + g; step = nesterov ? g + mu * b : b; w -= lr * step`.
pub struct Sgd {
    vars: Vec<Var>,
    velocity: Vec<Option<Tensor>>,
    config: SgdConfig,
    lr: f64,
}

impl Sgd {
    /// An optimiser of `vars` with learning rate `lr`.
    pub fn new(vars: Vec<Var>, lr: f64, config: SgdConfig) -> Self {
        let velocity = vec![None; vars.len()];
        Self { vars, velocity, config, lr }
    }

    /// One update from `grads`; variables without a gradient are left alone.
    /// Everything is computed on detached tensors, so no graph outlives the step.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let SgdConfig { momentum, nesterov, weight_decay } = self.config;
        for (var, velocity) in self.vars.iter().zip(self.velocity.iter_mut()) {
            // Detached: a gradient can reference the step's graph, which
            // the momentum buffer would otherwise keep alive step after step.
            let Some(g) = grads.get(var) else { continue };
            let mut g = g.detach();
            if weight_decay != 0.0 {
                g = (g + (var.as_detached_tensor() * weight_decay)?)?;
            }
            let step = if momentum != 0.0 {
                let b = match velocity.take() {
                    Some(b) => ((b * momentum)? + &g)?,
                    None => g.clone(),
                };
                let step = if nesterov { (&g + (&b * momentum)?)? } else { b.clone() };
                *velocity = Some(b);
                step
            } else {
                g
            };
            var.set(&(var.as_detached_tensor() - (step * self.lr)?)?)?;
        }
        Ok(())
    }
}

/// The optimiser of a training run.
pub enum Optimizer {
    /// SGD with momentum.
    Sgd(Sgd),
    /// AdamW (candle-nn).
    AdamW(AdamW),
}

/// Which optimiser to build.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerKind {
    /// SGD with momentum.
    Sgd(SgdConfig),
    /// AdamW with this weight decay.
    AdamW { weight_decay: f64 },
}

impl Optimizer {
    /// An optimiser of `vars` at learning rate `lr`.
    pub fn new(kind: OptimizerKind, vars: Vec<Var>, lr: f64) -> Result<Self> {
        Ok(match kind {
            OptimizerKind::Sgd(config) => Optimizer::Sgd(Sgd::new(vars, lr, config)),
            OptimizerKind::AdamW { weight_decay } => {
                Optimizer::AdamW(AdamW::new(vars, ParamsAdamW { lr, weight_decay, ..Default::default() })?)
            }
        })
    }

    /// One update.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        match self {
            Optimizer::Sgd(o) => o.step(grads),
            Optimizer::AdamW(o) => o.step(grads),
        }
    }

    /// Sets the learning rate of the next steps.
    pub fn set_lr(&mut self, lr: f64) {
        match self {
            Optimizer::Sgd(o) => o.lr = lr,
            Optimizer::AdamW(o) => o.set_learning_rate(lr),
        }
    }
}

/// Cosine decay from `lr` to 0 over `total` steps: `lr * (1 + cos(pi * step / total)) / 2`.
pub fn cosine_lr(lr: f64, step: usize, total: usize) -> f64 {
    let t = step.min(total) as f64 / total.max(1) as f64;
    lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two steps of PyTorch's SGD on w = [1, -2], loss = sum(w^2), by hand.
    #[test]
    fn sgd_matches_pytorch_formulas() -> Result<()> {
        let config = SgdConfig { momentum: 0.9, nesterov: true, weight_decay: 0.1 };
        let w = Var::new(&[1.0f64, -2.0], &Device::Cpu)?;
        let mut sgd = Sgd::new(vec![w.clone()], 0.1, config);
        let (mut x, mut b) = ([1.0f64, -2.0], [0.0f64; 2]);
        for step in 0..2 {
            let grads = w.as_tensor().sqr()?.sum_all()?.backward()?;
            sgd.step(&grads)?;
            for i in 0..2 {
                let g = 2.0 * x[i] + 0.1 * x[i];
                b[i] = if step == 0 { g } else { 0.9 * b[i] + g };
                x[i] -= 0.1 * (g + 0.9 * b[i]);
            }
            let got = w.as_tensor().to_vec1::<f64>()?;
            assert!((got[0] - x[0]).abs() < 1e-12 && (got[1] - x[1]).abs() < 1e-12, "{got:?} vs {x:?}");
        }
        Ok(())
    }

    #[test]
    fn cosine_schedule_ends_at_zero() {
        assert_eq!(cosine_lr(0.1, 0, 10), 0.1);
        assert!((cosine_lr(0.1, 5, 10) - 0.05).abs() < 1e-12);
        assert!(cosine_lr(0.1, 10, 10).abs() < 1e-12);
    }
}
