//! Optimisers: SGD with momentum, Nesterov and weight decay (as PyTorch's
//! `torch.optim.SGD`), and AdamW (see [`super::adamw`]), with the state a
//! run needs to continue exactly.

use super::adamw::{AdamW, AdamWConfig};
use candle_core::backprop::GradStore;
use candle_core::{bail, CpuStorage, InplaceOp3, Layout, Result, Tensor, Var, WithDType};

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
        Self {
            vars,
            velocity,
            config,
            lr,
        }
    }

    /// One update from `grads`; variables without a gradient are left alone.
    /// On the CPU (f32, f64) the momentum buffer and the variable are
    /// updated in place, in one pass each ([`SgdMomentum`], [`SgdDescend`]);
    /// elsewhere with tensor ops ([`Sgd::step_composed`]). Both round the
    /// same operations in the same order, so they agree bit for bit.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let SgdConfig {
            momentum,
            nesterov,
            weight_decay,
        } = self.config;
        for (var, velocity) in self.vars.iter().zip(self.velocity.iter_mut()) {
            let Some(g) = grads.get(var) else { continue };
            let in_place = var.device().is_cpu()
                && var.is_contiguous()
                && g.is_contiguous()
                && velocity.as_ref().is_none_or(|b| b.is_contiguous())
                && (momentum == 0.0 || velocity.is_some());
            if !in_place {
                Self::step_composed(self.config, self.lr, var, g, velocity)?;
                continue;
            }
            let w = var.as_tensor();
            let b = match velocity {
                Some(b) => {
                    b.inplace_op3(
                        g,
                        w,
                        &SgdMomentum {
                            momentum,
                            weight_decay,
                        },
                    )?;
                    &*b
                }
                None => g,
            };
            w.inplace_op3(
                g,
                b,
                &SgdDescend {
                    lr: self.lr,
                    momentum,
                    weight_decay,
                    nesterov,
                },
            )?;
        }
        Ok(())
    }

    /// One update of `var` with tensor ops (new tensors each step): the
    /// reference of the in-place update, and the update on other devices
    /// and on the first step with momentum (which creates the buffer).
    pub fn step_composed(
        config: SgdConfig,
        lr: f64,
        var: &Var,
        g: &Tensor,
        velocity: &mut Option<Tensor>,
    ) -> Result<()> {
        let SgdConfig {
            momentum,
            nesterov,
            weight_decay,
        } = config;
        // Detached: a gradient can reference the step's graph, which
        // the momentum buffer would otherwise keep alive step after step.
        let mut g = g.detach();
        if weight_decay != 0.0 {
            g = (g + (var.as_detached_tensor() * weight_decay)?)?;
        }
        let step = if momentum != 0.0 {
            let b = match velocity.take() {
                Some(b) => ((b * momentum)? + &g)?,
                // A copy: the buffer is later updated in place, and `g` can
                // share its storage with the caller's gradient.
                None => g.copy()?,
            };
            let step = if nesterov {
                (&g + (&b * momentum)?)?
            } else {
                b.clone()
            };
            *velocity = Some(b);
            step
        } else {
            g
        };
        var.set(&(var.as_detached_tensor() - (step * lr)?)?)
    }
}

/// The contiguous slice of a tensor's storage.
pub(super) fn contiguous<'a, T>(data: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("optimizer: expected contiguous tensors"),
    }
}

/// The mutable contiguous slice of a tensor's storage.
pub(super) fn contiguous_mut<'a, T>(data: &'a mut [T], l: &Layout) -> Result<&'a mut [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut data[a..b]),
        None => bail!("optimizer: expected contiguous tensors"),
    }
}

/// Runs `$f::<T>($dst, $a, $b)` on f32 or f64 CPU storages of one dtype.
macro_rules! float_inplace {
    ($name:expr, $f:expr, ($dst:expr, $dl:expr), ($a:expr, $al:expr), ($b:expr, $bl:expr)) => {
        match ($dst, $a, $b) {
            (CpuStorage::F32(d), CpuStorage::F32(a), CpuStorage::F32(b)) => $f(
                contiguous_mut(d, $dl)?,
                contiguous(a, $al)?,
                contiguous(b, $bl)?,
            ),
            (CpuStorage::F64(d), CpuStorage::F64(a), CpuStorage::F64(b)) => $f(
                contiguous_mut(d, $dl)?,
                contiguous(a, $al)?,
                contiguous(b, $bl)?,
            ),
            _ => bail!("{}: f32 or f64 tensors of one dtype", $name),
        }
    };
}
pub(super) use float_inplace;

/// `b = momentum * b + (g + weight_decay * w)` in place on the momentum
/// buffer `b`, with the arguments `(g, w)`.
pub struct SgdMomentum {
    /// Momentum factor.
    pub momentum: f64,
    /// L2 penalty.
    pub weight_decay: f64,
}

impl SgdMomentum {
    fn run<T: WithDType>(&self, b: &mut [T], g: &[T], w: &[T]) -> Result<()> {
        let (mu, wd) = (T::from_f64(self.momentum), T::from_f64(self.weight_decay));
        let decay = self.weight_decay != 0.0;
        for ((b, &g), &w) in b.iter_mut().zip(g).zip(w) {
            let g = if decay { g + w * wd } else { g };
            *b = *b * mu + g;
        }
        Ok(())
    }
}

impl InplaceOp3 for SgdMomentum {
    fn name(&self) -> &'static str {
        "sgd-momentum"
    }

    fn cpu_fwd(
        &self,
        b: &mut CpuStorage,
        bl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<()> {
        float_inplace!(
            self.name(),
            |b, g, w| self.run(b, g, w),
            (b, bl),
            (g, gl),
            (w, wl)
        )
    }
}

/// `w -= lr * step` in place on the variable `w`, with the arguments
/// `(g, b)`: `step = g + weight_decay * w` without momentum, `b` with it,
/// `g + weight_decay * w + momentum * b` with Nesterov's.
pub struct SgdDescend {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0: `b` is not read).
    pub momentum: f64,
    /// L2 penalty.
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
}

impl SgdDescend {
    fn run<T: WithDType>(&self, w: &mut [T], g: &[T], b: &[T]) -> Result<()> {
        let (lr, mu, wd) = (
            T::from_f64(self.lr),
            T::from_f64(self.momentum),
            T::from_f64(self.weight_decay),
        );
        let decay = self.weight_decay != 0.0;
        let momentum = self.momentum != 0.0;
        for ((w, &g), &b) in w.iter_mut().zip(g).zip(b) {
            let step = if !momentum || self.nesterov {
                let g = if decay { g + *w * wd } else { g };
                if momentum {
                    g + b * mu
                } else {
                    g
                }
            } else {
                b
            };
            *w -= step * lr;
        }
        Ok(())
    }
}

impl InplaceOp3 for SgdDescend {
    fn name(&self) -> &'static str {
        "sgd-descend"
    }

    fn cpu_fwd(
        &self,
        w: &mut CpuStorage,
        wl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<()> {
        float_inplace!(
            self.name(),
            |w, g, b| self.run(w, g, b),
            (w, wl),
            (g, gl),
            (b, bl)
        )
    }
}

/// The optimiser of a training run.
pub enum Optimizer {
    /// SGD with momentum.
    Sgd(Sgd),
    /// AdamW.
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

/// What a run needs of its optimiser to continue exactly, as a checkpoint
/// holds it: which optimiser made it, its step count and its tensors by
/// name (SGD: `N`, the momentum buffer of variable N, for each variable
/// that has one; AdamW: `m.N` and `v.N`, the first and second moments of
/// variable N).
#[derive(Debug, Clone, Default)]
pub struct OptimizerState {
    /// `sgd` or `adamw` (as `--optimizer` names them).
    pub kind: String,
    /// Steps the optimiser took (AdamW's bias correction; 0 for SGD).
    pub steps: usize,
    /// The tensors, by name.
    pub tensors: Vec<(String, Tensor)>,
}

impl Optimizer {
    /// An optimiser of `vars` at learning rate `lr`.
    pub fn new(kind: OptimizerKind, vars: Vec<Var>, lr: f64) -> Result<Self> {
        Ok(match kind {
            OptimizerKind::Sgd(config) => Optimizer::Sgd(Sgd::new(vars, lr, config)),
            OptimizerKind::AdamW { weight_decay } => Optimizer::AdamW(AdamW::new(
                vars,
                lr,
                AdamWConfig::with_weight_decay(weight_decay),
            )?),
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
            Optimizer::AdamW(o) => o.lr = lr,
        }
    }

    /// The name `--optimizer` gives this optimiser.
    pub fn name(&self) -> &'static str {
        match self {
            Optimizer::Sgd(_) => "sgd",
            Optimizer::AdamW(_) => "adamw",
        }
    }

    /// The variables it updates, in order.
    pub fn vars(&self) -> &[Var] {
        match self {
            Optimizer::Sgd(o) => &o.vars,
            Optimizer::AdamW(o) => o.vars(),
        }
    }

    /// The state a run needs to continue exactly (see [`OptimizerState`]).
    pub fn state(&self) -> OptimizerState {
        let (steps, tensors) = match self {
            Optimizer::Sgd(o) => (
                0,
                o.velocity
                    .iter()
                    .enumerate()
                    .filter_map(|(i, b)| b.as_ref().map(|b| (i.to_string(), b.clone())))
                    .collect(),
            ),
            Optimizer::AdamW(o) => (
                o.steps(),
                o.moments()
                    .enumerate()
                    .flat_map(|(i, (m, v))| {
                        [(format!("m.{i}"), m.clone()), (format!("v.{i}"), v.clone())]
                    })
                    .collect(),
            ),
        };
        OptimizerState {
            kind: self.name().into(),
            steps,
            tensors,
        }
    }

    /// Restores [`Self::state`]: it must be this optimiser's, and each
    /// tensor must match its variable's shape.
    pub fn load_state(&mut self, state: OptimizerState) -> crate::error::Result<()> {
        use crate::error::Error;
        if state.kind != self.name() {
            return Err(Error::Resume(format!(
                "the checkpoint holds the state of {}, not of {}: continue it with --optimizer {}",
                state.kind,
                self.name(),
                state.kind
            )));
        }
        let vars = self.vars().to_vec();
        // Each tensor by kind ("" for SGD, "m" or "v" for AdamW) and index,
        // checked against its variable.
        let mut named = std::collections::BTreeMap::new();
        for (name, tensor) in state.tensors {
            let (prefix, index) = name.rsplit_once('.').unwrap_or(("", &name));
            let var = index
                .parse::<usize>()
                .ok()
                .and_then(|i| vars.get(i).map(|v| (i, v)));
            let Some((i, var)) = var else {
                return Err(Error::Shape {
                    tensor: format!("optimizer state `{name}`"),
                    expected: format!("one of {} variables", vars.len()),
                    got: format!("`{name}`"),
                });
            };
            if tensor.dims() != var.dims() {
                return Err(Error::Shape {
                    tensor: format!("optimizer state `{name}`"),
                    expected: format!("{:?}", var.dims()),
                    got: format!("{:?}", tensor.dims()),
                });
            }
            named.insert((prefix.to_string(), i), tensor);
        }
        match self {
            Optimizer::Sgd(o) => {
                for ((prefix, i), buffer) in named {
                    if !prefix.is_empty() {
                        return Err(Error::Resume(format!(
                            "the SGD state holds `{prefix}.{i}`, which SGD does not keep"
                        )));
                    }
                    let var = &o.vars[i];
                    // A buffer of its own on the variable's device: updated in place.
                    o.velocity[i] = Some(
                        buffer
                            .to_device(var.device())?
                            .to_dtype(var.dtype())?
                            .copy()?,
                    );
                }
            }
            Optimizer::AdamW(o) => {
                for i in 0..vars.len() {
                    let moment = |p: &str| {
                        named.get(&(p.to_string(), i)).ok_or_else(|| {
                            Error::Resume(format!(
                                "the AdamW state lacks `{p}.{i}` (a moment of variable {i})"
                            ))
                        })
                    };
                    o.set_moments(i, moment("m")?, moment("v")?)?;
                }
                o.set_steps(state.steps);
            }
        }
        Ok(())
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
    use candle_core::{DType, Device};

    /// Two steps of PyTorch's SGD on w = [1, -2], loss = sum(w^2), by hand.
    #[test]
    fn sgd_matches_pytorch_formulas() -> Result<()> {
        let config = SgdConfig {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.1,
        };
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
            assert!(
                (got[0] - x[0]).abs() < 1e-12 && (got[1] - x[1]).abs() < 1e-12,
                "{got:?} vs {x:?}"
            );
        }
        Ok(())
    }

    /// The in-place update against the composed one, bit for bit, over
    /// three steps of every configuration, f32 and f64.
    #[test]
    fn in_place_sgd_matches_the_composed_update_exactly() -> Result<()> {
        for (momentum, nesterov, weight_decay) in [
            (0.0, false, 0.0),
            (0.0, false, 0.01),
            (0.9, false, 0.0),
            (0.9, false, 5e-4),
            (0.8, true, 0.1),
        ] {
            let config = SgdConfig {
                momentum,
                nesterov,
                weight_decay,
            };
            for dtype in [DType::F32, DType::F64] {
                let w0 = Tensor::randn(0f64, 1.0, (37, 5), &Device::Cpu)?.to_dtype(dtype)?;
                let (a, b) = (
                    Var::from_tensor(&w0.copy()?)?,
                    Var::from_tensor(&w0.copy()?)?,
                );
                let mut sgd = Sgd::new(vec![a.clone()], 0.1, config);
                let mut velocity = None;
                let mut buffer = None;
                for _ in 0..3 {
                    let g = Tensor::randn(0f64, 1.0, (37, 5), &Device::Cpu)?.to_dtype(dtype)?;
                    let mut grads = a.as_tensor().sum_all()?.backward()?;
                    grads.insert(a.as_tensor(), g.clone());
                    sgd.step(&grads)?;
                    Sgd::step_composed(config, 0.1, &b, &g, &mut velocity)?;
                    let (x, y) = (
                        a.as_tensor().to_dtype(DType::F64)?,
                        b.as_tensor().to_dtype(DType::F64)?,
                    );
                    assert_eq!(
                        x.flatten_all()?.to_vec1::<f64>()?,
                        y.flatten_all()?.to_vec1::<f64>()?,
                        "{config:?} {dtype:?}"
                    );
                    // After the first step the buffer is the same tensor,
                    // updated in place (the composed update makes a new one).
                    let id = sgd.velocity[0].as_ref().map(|b| b.id());
                    assert!(
                        buffer.is_none() || buffer == id,
                        "{config:?}: the buffer was replaced"
                    );
                    buffer = id;
                }
            }
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
