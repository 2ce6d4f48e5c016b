//! One training step: the same for the trainer, the profiler and the
//! benchmarks.

use super::{Optimizer, OptimizerState};
use crate::error::{Error, Result, Stage};
use crate::model::{Model, Weights};
use candle_core::{DType, Tensor};

/// What one step leaves of its batch.
#[derive(Debug)]
pub struct StepOutput {
    /// The batch's logits, detached from the step's graph.
    pub logits: Tensor,
    /// The mean cross-entropy.
    pub loss: f64,
}

/// Training steps with one optimiser: forward in training mode, mean
/// cross-entropy, backward (through the clustered layers' gradients when
/// the weights are clustered) and the optimiser's update.
pub struct TrainStep {
    optimizer: Optimizer,
    count: usize,
}

impl TrainStep {
    /// Steps that update with `optimizer`.
    pub fn new(optimizer: Optimizer) -> Self {
        Self {
            optimizer,
            count: 0,
        }
    }

    /// Steps taken so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Continues a run that took `count` steps, with its optimiser's
    /// saved state (see [`Optimizer::state`]).
    pub fn resume(&mut self, count: usize, state: OptimizerState) -> Result<()> {
        self.optimizer.load_state(state)?;
        self.count = count;
        Ok(())
    }

    /// The optimiser's state, for a checkpoint to continue from.
    pub fn optimizer_state(&self) -> OptimizerState {
        self.optimizer.state()
    }

    /// Sets the learning rate of the next steps.
    pub fn set_lr(&mut self, lr: f64) {
        self.optimizer.set_lr(lr);
    }

    /// One step on the batch `x` with labels `y`, with the weights that
    /// `weights` provides. A value that becomes non-finite fails the step
    /// with [`Error::Diverged`], naming the stage and, where known, the
    /// layer: non-finite centroids from a clustered layer's forward solve,
    /// the loss, a gradient (from a clustered layer's implicit backward or
    /// the rest of the backward pass), all before anything is updated; or
    /// a parameter after the optimiser's update.
    pub fn run(
        &mut self,
        model: &Model,
        weights: &Weights,
        x: &Tensor,
        y: &Tensor,
    ) -> Result<StepOutput> {
        let step = self.count;
        let diverged = |stage, layer, detail| Error::Diverged {
            step,
            stage,
            layer,
            detail,
        };
        // A forward solve's divergence, whichever way it surfaced.
        let forward_divergence = || match weights {
            Weights::Clustered(source) => source
                .take_divergence()
                .map(|(layer, detail)| diverged(Stage::ForwardKmeans, Some(layer), detail)),
            _ => None,
        };
        let logits = model
            .forward(x, true, weights)
            .map_err(|e| forward_divergence().unwrap_or(e))?;
        let loss = candle_nn::loss::cross_entropy(&logits, y)?;
        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Err(forward_divergence().unwrap_or_else(|| {
                diverged(Stage::Loss, None, format!("the loss became {value}"))
            }));
        }
        let grads = loss.backward()?;
        let trainable = model.trainable();
        let gradients = trainable
            .iter()
            .filter_map(|(name, var)| grads.get(var).map(|g| (name.as_str(), g)));
        if let Some((name, bad)) = first_non_finite(gradients)? {
            let stage = match weights {
                Weights::Clustered(source) if source.replaces(name) => Stage::AdjointSolve,
                _ => Stage::Backward,
            };
            return Err(diverged(
                stage,
                Some(name.to_string()),
                format!("its gradient holds {bad}"),
            ));
        }
        self.optimizer.step(&grads)?;
        let parameters = trainable
            .iter()
            .map(|(name, var)| (name.as_str(), var.as_tensor()));
        if let Some((name, bad)) = first_non_finite(parameters)? {
            return Err(diverged(
                Stage::Optimizer,
                Some(name.to_string()),
                format!("the parameter holds {bad} after the update"),
            ));
        }
        self.count += 1;
        Ok(StepOutput {
            logits: logits.detach(),
            loss: value,
        })
    }
}

/// The first of the named `tensors` that holds a non-finite value, with
/// that value. One reduction per tensor and one transfer for all (the
/// sums of finite tensors are finite unless they overflow; an overflowed
/// sum is confirmed element by element).
fn first_non_finite<'a>(
    tensors: impl Iterator<Item = (&'a str, &'a Tensor)>,
) -> Result<Option<(&'a str, f64)>> {
    let tensors: Vec<_> = tensors.collect();
    if tensors.is_empty() {
        return Ok(None);
    }
    let sums = tensors
        .iter()
        .map(|(_, t)| t.sum_all()?.to_dtype(DType::F64))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let sums = Tensor::stack(&sums, 0)?.to_device(&candle_core::Device::Cpu)?;
    for ((name, t), sum) in tensors.iter().zip(sums.to_vec1::<f64>()?) {
        if sum.is_finite() {
            continue;
        }
        let values = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        if let Some(bad) = values.into_iter().find(|v| !v.is_finite()) {
            return Ok(Some((name, bad)));
        }
    }
    Ok(None)
}
