//! One training step: the same for the trainer, the profiler and the
//! benchmarks.

use super::{Optimizer, OptimizerState};
use crate::error::{Error, Result};
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
    /// `weights` provides. A non-finite loss fails the step before anything
    /// is updated.
    pub fn run(
        &mut self,
        model: &Model,
        weights: &Weights,
        x: &Tensor,
        y: &Tensor,
    ) -> Result<StepOutput> {
        let logits = model.forward(x, true, weights)?;
        let loss = candle_nn::loss::cross_entropy(&logits, y)?;
        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Err(Error::NonFiniteLoss {
                value,
                step: self.count,
            });
        }
        self.optimizer.step(&loss.backward()?)?;
        self.count += 1;
        Ok(StepOutput {
            logits: logits.detach(),
            loss: value,
        })
    }
}
