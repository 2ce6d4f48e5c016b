//! Training and evaluation loops.

mod adamw;
mod optim;
mod step;

pub use adamw::{AdamW, AdamWConfig};
pub use optim::{cosine_lr, Optimizer, OptimizerKind, OptimizerState, Sgd, SgdConfig};
pub use step::{StepOutput, TrainStep};

use crate::data::Batcher;
use crate::error::Result;
use crate::model::{Model, Weights};
use candle_core::{DType, Tensor, D};
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Loss and accuracy over a pass through a data set.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EpochStats {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Fraction of correct top-1 predictions.
    pub accuracy: f64,
    /// Samples seen.
    pub samples: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Batches run (fewer than the pass has when it was stopped).
    pub batches: usize,
}

/// Sums of loss and correct predictions, batch by batch.
#[derive(Default)]
struct Tally {
    loss: f64,
    correct: usize,
    samples: usize,
    batches: usize,
}

impl Tally {
    fn add(&mut self, logits: &Tensor, labels: &Tensor, loss: f64) -> Result<()> {
        let n = labels.dim(0)?;
        let predicted = logits.argmax(D::Minus1)?;
        self.correct += predicted
            .eq(labels)?
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()? as usize;
        self.loss += loss * n as f64;
        self.samples += n;
        self.batches += 1;
        Ok(())
    }

    fn stats(&self, start: Instant) -> EpochStats {
        let n = self.samples.max(1) as f64;
        EpochStats {
            loss: self.loss / n,
            accuracy: self.correct as f64 / n,
            samples: self.samples,
            seconds: start.elapsed().as_secs_f64(),
            batches: self.batches,
        }
    }
}

fn progress(label: &str, batches: usize) -> ProgressBar {
    let bar = ProgressBar::new(batches as u64);
    let style = ProgressStyle::with_template(
        "{prefix:>12} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
    )
    .expect("valid template")
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(label.to_string());
    bar
}

/// Runs an optimiser over epochs with a cosine learning-rate schedule.
pub struct Trainer {
    step: TrainStep,
    lr: f64,
    total_steps: usize,
    stop: Option<Arc<AtomicBool>>,
}

impl Trainer {
    /// A trainer of `model`'s trainable variables for `total_steps` steps.
    pub fn new(model: &Model, kind: OptimizerKind, lr: f64, total_steps: usize) -> Result<Self> {
        let vars = model.trainable().into_iter().map(|(_, v)| v).collect();
        Ok(Self {
            step: TrainStep::new(Optimizer::new(kind, vars, lr)?),
            lr,
            total_steps,
            stop: None,
        })
    }

    /// Ends each pass after the step during which `flag` was raised (an
    /// interrupt): the caller sees fewer batches than the pass has.
    pub fn stop_on(&mut self, flag: Arc<AtomicBool>) {
        self.stop = Some(flag);
    }

    /// Steps taken so far (the schedule's position).
    pub fn steps(&self) -> usize {
        self.step.count()
    }

    /// Continues a run that took `steps` steps, with its optimiser's saved
    /// state.
    pub fn resume(&mut self, steps: usize, state: OptimizerState) -> Result<()> {
        self.step.resume(steps, state)
    }

    /// The optimiser's state, for a checkpoint to continue from.
    pub fn optimizer_state(&self) -> OptimizerState {
        self.step.optimizer_state()
    }

    /// A trainer for `epochs` passes over `samples` training samples in
    /// batches of `batch_size`: the schedule spans all of their steps.
    pub fn for_epochs(
        model: &Model,
        kind: OptimizerKind,
        lr: f64,
        samples: usize,
        batch_size: usize,
        epochs: usize,
    ) -> Result<Self> {
        let batches_per_epoch = samples.div_ceil(batch_size.max(1));
        Self::new(model, kind, lr, batches_per_epoch * epochs)
    }

    /// One pass over `batches`, with the weights that `weights` provides.
    pub fn epoch(
        &mut self,
        model: &Model,
        weights: &Weights,
        batches: Batcher,
        label: &str,
    ) -> Result<EpochStats> {
        let (start, bar) = (Instant::now(), progress(label, batches.size_hint().0));
        let mut tally = Tally::default();
        for batch in batches {
            let (x, y) = batch?;
            self.step
                .set_lr(cosine_lr(self.lr, self.step.count(), self.total_steps));
            let out = self.step.run(model, weights, &x, &y)?;
            tally.add(&out.logits, &y, out.loss)?;
            bar.inc(1);
            bar.set_message(format!(
                "loss {:.4} acc {:.2}%",
                tally.loss / tally.samples as f64,
                100.0 * tally.correct as f64 / tally.samples as f64
            ));
            if self.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
                break;
            }
        }
        bar.finish_and_clear();
        Ok(tally.stats(start))
    }
}

/// Loss and accuracy of `model` in evaluation mode over `batches`.
pub fn evaluate(
    model: &Model,
    weights: &Weights,
    batches: Batcher,
    label: &str,
) -> Result<EpochStats> {
    let (start, bar) = (Instant::now(), progress(label, batches.num_batches()));
    let mut tally = Tally::default();
    for batch in batches {
        let (x, y) = batch?;
        let logits = model.forward(&x, false, weights)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64;
        tally.add(&logits, &y, loss)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(tally.stats(start))
}
