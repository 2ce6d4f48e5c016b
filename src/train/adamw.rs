//! AdamW (as PyTorch's `torch.optim.AdamW` and candle-nn's `AdamW`), with
//! its moments exposed so that a run can be saved and continued exactly.

use super::optim::{contiguous, contiguous_mut, float_inplace};
use candle_core::backprop::GradStore;
use candle_core::{
    bail, CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var, WithDType,
};

/// Hyper-parameters of AdamW.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay (`w *= 1 - lr * weight_decay`).
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// PyTorch's defaults (beta1 0.9, beta2 0.999, eps 1e-8) with this
    /// weight decay.
    pub fn with_weight_decay(weight_decay: f64) -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        }
    }
}

/// AdamW with bias correction by the step count:
/// `m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;`
/// `w = w (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`.
pub struct AdamW {
    vars: Vec<Var>,
    /// First moments, one per variable.
    first: Vec<Tensor>,
    /// Second moments, one per variable.
    second: Vec<Tensor>,
    /// Steps taken (`t` of the bias correction).
    steps: usize,
    config: AdamWConfig,
    pub(super) lr: f64,
}

impl AdamW {
    /// An optimiser of `vars` at learning rate `lr`; the moments start at 0.
    pub fn new(vars: Vec<Var>, lr: f64, config: AdamWConfig) -> Result<Self> {
        let first = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let second = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            vars,
            first,
            second,
            steps: 0,
            config,
            lr,
        })
    }

    /// The variables, in order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Steps taken.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The first and second moments of each variable.
    pub fn moments(&self) -> impl Iterator<Item = (&Tensor, &Tensor)> {
        self.first.iter().zip(&self.second)
    }

    /// Restores the state of a run that took `steps` steps: the moments
    /// `(first, second)` of variable `index`. Each must match the
    /// variable's shape (checked by the caller); a copy of its own is kept
    /// on the variable's device.
    pub fn set_moments(&mut self, index: usize, first: &Tensor, second: &Tensor) -> Result<()> {
        let var = &self.vars[index];
        let own = |t: &Tensor| t.to_device(var.device())?.to_dtype(var.dtype())?.copy();
        self.first[index] = own(first)?;
        self.second[index] = own(second)?;
        Ok(())
    }

    /// Sets the step count (the bias correction's `t`).
    pub fn set_steps(&mut self, steps: usize) {
        self.steps = steps;
    }

    /// The bias corrections `1 / (1 - beta^t)` of both moments at step `t`.
    fn scales(config: &AdamWConfig, t: usize) -> (f64, f64) {
        let t = t as i32;
        (
            1.0 / (1.0 - config.beta1.powi(t)),
            1.0 / (1.0 - config.beta2.powi(t)),
        )
    }

    /// One update from `grads`; variables without a gradient are left alone
    /// (the step count advances regardless, as in candle-nn). On the CPU
    /// (f32, f64) the moments and the variable are updated in place, one
    /// pass each ([`AdamMoment`], [`AdamDescend`]); elsewhere with tensor
    /// ops ([`AdamW::step_composed`]). Both round the same operations in
    /// the same order, so they agree bit for bit.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.steps += 1;
        let (scale_m, scale_v) = Self::scales(&self.config, self.steps);
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        for ((var, m), v) in self.vars.iter().zip(&mut self.first).zip(&mut self.second) {
            let Some(g) = grads.get(var) else { continue };
            let in_place = var.device().is_cpu()
                && var.is_contiguous()
                && g.is_contiguous()
                && m.is_contiguous()
                && v.is_contiguous();
            if !in_place {
                Self::step_composed(self.config, self.lr, self.steps, var, g, m, v)?;
                continue;
            }
            m.inplace_op2(
                g,
                &AdamMoment {
                    beta: beta1,
                    square: false,
                },
            )?;
            v.inplace_op2(
                g,
                &AdamMoment {
                    beta: beta2,
                    square: true,
                },
            )?;
            var.as_tensor().inplace_op3(
                m,
                v,
                &AdamDescend {
                    lr: self.lr,
                    weight_decay,
                    eps,
                    scale_m,
                    scale_v,
                },
            )?;
        }
        Ok(())
    }

    /// One update of `var` at step `t` (counted from 1) with tensor ops,
    /// candle-nn's formulation: the reference of the in-place update and
    /// the update on other devices.
    pub fn step_composed(
        config: AdamWConfig,
        lr: f64,
        t: usize,
        var: &Var,
        g: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
    ) -> Result<()> {
        let (scale_m, scale_v) = Self::scales(&config, t);
        // Detached: a gradient can reference the step's graph, which the
        // moments would otherwise keep alive step after step.
        let g = g.detach();
        let next_m = ((&*m * config.beta1)? + (&g * (1.0 - config.beta1))?)?;
        let next_v = ((&*v * config.beta2)? + (g.sqr()? * (1.0 - config.beta2))?)?;
        let m_hat = (&next_m * scale_m)?;
        let v_hat = (&next_v * scale_v)?;
        let decayed = (var.as_detached_tensor() * (1.0 - lr * config.weight_decay))?;
        let adjusted = (m_hat / (v_hat.sqrt()? + config.eps)?)?;
        var.set(&(decayed - (adjusted * lr)?)?)?;
        *m = next_m;
        *v = next_v;
        Ok(())
    }
}

/// `m = beta * m + (1 - beta) * g` (or `g^2` with `square`) in place on the
/// moment `m`, with the argument `g`.
pub struct AdamMoment {
    /// Decay of the moment.
    pub beta: f64,
    /// The second moment (of `g^2`) rather than the first.
    pub square: bool,
}

impl AdamMoment {
    fn run<T: WithDType>(&self, m: &mut [T], g: &[T]) -> Result<()> {
        let (beta, rest) = (T::from_f64(self.beta), T::from_f64(1.0 - self.beta));
        for (m, &g) in m.iter_mut().zip(g) {
            let g = if self.square { g * g } else { g };
            *m = *m * beta + g * rest;
        }
        Ok(())
    }
}

impl InplaceOp2 for AdamMoment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(&self, m: &mut CpuStorage, ml: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        match (m, g) {
            (CpuStorage::F32(m), CpuStorage::F32(g)) => {
                self.run(contiguous_mut(m, ml)?, contiguous(g, gl)?)
            }
            (CpuStorage::F64(m), CpuStorage::F64(g)) => {
                self.run(contiguous_mut(m, ml)?, contiguous(g, gl)?)
            }
            _ => bail!("{}: f32 or f64 tensors of one dtype", self.name()),
        }
    }
}

/// `w = w * (1 - lr * wd) - lr * (m * scale_m) / (sqrt(v * scale_v) + eps)`
/// in place on the variable `w`, with the arguments `(m, v)` (the moments
/// after this step's update).
pub struct AdamDescend {
    /// Learning rate.
    pub lr: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Bias correction of the first moment, `1 / (1 - beta1^t)`.
    pub scale_m: f64,
    /// Bias correction of the second moment, `1 / (1 - beta2^t)`.
    pub scale_v: f64,
}

impl AdamDescend {
    fn run<T: WithDType + num_traits::Float>(&self, w: &mut [T], m: &[T], v: &[T]) -> Result<()> {
        let (keep, lr, eps, scale_m, scale_v) = (
            T::from_f64(1.0 - self.lr * self.weight_decay),
            T::from_f64(self.lr),
            T::from_f64(self.eps),
            T::from_f64(self.scale_m),
            T::from_f64(self.scale_v),
        );
        for ((w, &m), &v) in w.iter_mut().zip(m).zip(v) {
            let adjusted = (m * scale_m) / ((v * scale_v).sqrt() + eps);
            *w = *w * keep - adjusted * lr;
        }
        Ok(())
    }
}

impl InplaceOp3 for AdamDescend {
    fn name(&self) -> &'static str {
        "adamw-descend"
    }

    fn cpu_fwd(
        &self,
        w: &mut CpuStorage,
        wl: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        float_inplace!(
            self.name(),
            |w, m, v| self.run(w, m, v),
            (w, wl),
            (m, ml),
            (v, vl)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::Optimizer as _;

    /// A few steps on `sum(a * (w - b)^2)` against candle-nn's AdamW, the
    /// reference: the same weights to 1e-6 relative, f32 and f64.
    #[test]
    fn adamw_matches_candle_nn_on_a_quadratic() -> Result<()> {
        for dtype in [DType::F32, DType::F64] {
            let dev = &Device::Cpu;
            let a = Tensor::new(&[1.0f64, 3.0, 0.5, 2.0, 10.0, 0.1], dev)?.to_dtype(dtype)?;
            let b = Tensor::new(&[0.5f64, -1.0, 2.0, 0.0, 0.3, -4.0], dev)?.to_dtype(dtype)?;
            let w0 = Tensor::new(&[1.0f64, -2.0, 0.25, 3.0, -0.5, 1.5], dev)?.to_dtype(dtype)?;
            let (ours, theirs) = (Var::from_tensor(&w0)?, Var::from_tensor(&w0)?);
            let (lr, weight_decay) = (0.05, 0.1);
            let mut adamw = AdamW::new(
                vec![ours.clone()],
                lr,
                AdamWConfig::with_weight_decay(weight_decay),
            )?;
            let mut reference = candle_nn::AdamW::new(
                vec![theirs.clone()],
                candle_nn::ParamsAdamW {
                    lr,
                    weight_decay,
                    ..Default::default()
                },
            )?;
            let loss = |w: &Var| (w.as_tensor() - &b)?.sqr()?.mul(&a)?.sum_all();
            for step in 0..8 {
                // The schedule changes the rate between steps, as a run's does.
                let lr = lr * (1.0 - step as f64 / 10.0);
                adamw.lr = lr;
                reference.set_learning_rate(lr);
                adamw.step(&loss(&ours)?.backward()?)?;
                reference.step(&loss(&theirs)?.backward()?)?;
                let x = ours.as_tensor().to_dtype(DType::F64)?.to_vec1::<f64>()?;
                let y = theirs.as_tensor().to_dtype(DType::F64)?.to_vec1::<f64>()?;
                for (x, y) in x.iter().zip(&y) {
                    assert!(
                        (x - y).abs() <= 1e-6 * y.abs().max(1e-3),
                        "{dtype:?} step {step}: {x} vs {y}"
                    );
                }
            }
        }
        Ok(())
    }

    /// A saved state restores AdamW exactly (the next step as the
    /// uninterrupted optimiser's), and one optimiser's state is refused to
    /// the other, naming `--optimizer`.
    #[test]
    fn adamw_state_round_trips_and_sgd_state_is_refused() -> crate::error::Result<()> {
        use crate::train::{Optimizer, OptimizerKind, SgdConfig};
        let dev = &Device::Cpu;
        let w0 = Tensor::randn(0f32, 1.0, (4, 3), dev)?;
        let (a, b) = (
            Var::from_tensor(&w0.copy()?)?,
            Var::from_tensor(&w0.copy()?)?,
        );
        let kind = OptimizerKind::AdamW { weight_decay: 0.01 };
        let mut first = Optimizer::new(kind, vec![a.clone()], 0.01)?;
        let loss = |w: &Var| w.as_tensor().sqr()?.sum_all()?.backward();
        for _ in 0..3 {
            first.step(&loss(&a)?)?;
        }
        let state = first.state();
        assert_eq!((state.kind.as_str(), state.steps), ("adamw", 3));
        b.set(a.as_tensor())?;
        let mut second = Optimizer::new(kind, vec![b.clone()], 0.01)?;
        second.load_state(state.clone())?;
        first.step(&loss(&a)?)?;
        second.step(&loss(&b)?)?;
        assert_eq!(
            a.as_tensor().flatten_all()?.to_vec1::<f32>()?,
            b.as_tensor().flatten_all()?.to_vec1::<f32>()?
        );

        let sgd = OptimizerKind::Sgd(SgdConfig {
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
        });
        let mut other = Optimizer::new(sgd, vec![b.clone()], 0.01)?;
        let refused = other.load_state(state).unwrap_err().to_string();
        assert!(
            refused.contains("adamw") && refused.contains("--optimizer adamw"),
            "{refused}"
        );
        other.step(&loss(&b)?)?;
        let refused = second.load_state(other.state()).unwrap_err().to_string();
        assert!(refused.contains("--optimizer sgd"), "{refused}");
        Ok(())
    }

    /// The in-place update against the composed one, bit for bit, over
    /// four steps, with and without weight decay, f32 and f64.
    #[test]
    fn in_place_adamw_matches_the_composed_update_exactly() -> Result<()> {
        for weight_decay in [0.0, 0.01] {
            let config = AdamWConfig::with_weight_decay(weight_decay);
            for dtype in [DType::F32, DType::F64] {
                let w0 = Tensor::randn(0f64, 1.0, (37, 5), &Device::Cpu)?.to_dtype(dtype)?;
                let (a, b) = (
                    Var::from_tensor(&w0.copy()?)?,
                    Var::from_tensor(&w0.copy()?)?,
                );
                let mut adamw = AdamW::new(vec![a.clone()], 0.01, config)?;
                let (mut m, mut v) = (b.zeros_like()?, b.zeros_like()?);
                for t in 1..=4 {
                    let g = Tensor::randn(0f64, 1.0, (37, 5), &Device::Cpu)?.to_dtype(dtype)?;
                    let mut grads = a.as_tensor().sum_all()?.backward()?;
                    grads.insert(a.as_tensor(), g.clone());
                    let first = adamw.first[0].id();
                    adamw.step(&grads)?;
                    assert_eq!(first, adamw.first[0].id(), "the moment was replaced");
                    AdamW::step_composed(config, 0.01, t, &b, &g, &mut m, &mut v)?;
                    let flat = |t: &Tensor| -> Result<Vec<f64>> {
                        t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
                    };
                    assert_eq!(flat(a.as_tensor())?, flat(b.as_tensor())?, "{dtype:?} {t}");
                    assert_eq!(flat(&adamw.first[0])?, flat(&m)?);
                    assert_eq!(flat(&adamw.second[0])?, flat(&v)?);
                }
            }
        }
        Ok(())
    }
}
