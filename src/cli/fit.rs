//! The epoch loop shared by `idkm train` and `idkm quantize`.

use super::common::{mib, peak_rss, OptimArgs};
use anyhow::{Context, Result};
use candle_core::Device;
use idkm::cluster::layer::ForwardStats;
use idkm::data::{Augment, Batcher, DataSplit, Dataset};
use idkm::model::{Model, Weights};
use idkm::quantize::{snapshot, Clustering, LutDType};
use idkm::train::{evaluate, EpochStats, Trainer};
use std::io::Write;
use std::path::Path;

/// What one epoch measured.
pub struct EpochReport {
    /// Test accuracy with float weights (no clustering) or soft-clustered weights.
    pub test: EpochStats,
    /// Test accuracy with hard (palettized) weights, when clustering.
    pub hard: Option<EpochStats>,
}

/// One line on an epoch's forward k-means solves.
fn solve_summary(s: &ForwardStats) -> String {
    let mut line = format!(
        "k-means: {} solves, {:.1} iterations (at most {}), {:.1} passes each; distance to the fixed point <= {:.1e} of the spread",
        s.solves,
        s.iterations as f64 / s.solves as f64,
        s.max_iterations,
        s.passes as f64 / s.solves as f64,
        s.max_distance,
    );
    if s.max_cond > 0.0 {
        line.push_str(&format!(", cond(I - J) <= {:.0}", s.max_cond));
    }
    line.push_str(&format!(", >= {} distinct centroids", s.min_distinct));
    for (count, what) in [
        (s.plain_steps, "plain fallback steps"),
        (s.unconverged, "solves at --max-iter"),
        (s.unstable, "unstable ends"),
    ] {
        if count > 0 {
            line.push_str(&format!(", {count} {what}"));
        }
    }
    line
}

/// Evaluation batches over `data` (fixed order, no augmentation).
pub fn eval_batches<'a>(
    data: &'a Dataset,
    split: &'a DataSplit,
    batch: usize,
    device: &Device,
) -> Batcher<'a> {
    Batcher::new(
        data,
        batch,
        None,
        Augment::none(),
        &split.mean,
        &split.std,
        device,
    )
}

/// Trains `model` for `args.epochs` epochs, with `clustering` if given,
/// reporting each epoch and writing a checkpoint to `output` after each.
pub fn fit(
    model: &Model,
    clustering: Option<&Clustering>,
    split: &DataSplit,
    args: &OptimArgs,
    lut: LutDType,
    output: &Path,
    device: &Device,
) -> Result<Vec<EpochReport>> {
    let augment = if split.train.channels() == 3 {
        Augment::cifar()
    } else {
        Augment::none()
    };
    let mut trainer = Trainer::for_epochs(
        model,
        args.kind(),
        args.lr,
        split.train.len(),
        args.batch_size,
        args.epochs,
    )?;
    let weights = match clustering {
        Some(c) => Weights::Clustered(c),
        None => Weights::Float,
    };
    let mut out = std::io::stdout().lock();
    let hard_column = if clustering.is_some() {
        "   test soft   test hard"
    } else {
        "        test"
    };
    writeln!(
        out,
        "epoch   train loss   train acc{hard_column}      time    peak RSS"
    )?;
    let mut reports = Vec::with_capacity(args.epochs);
    for epoch in 0..args.epochs {
        let batches = Batcher::new(
            &split.train,
            args.batch_size,
            Some((args.seed, epoch as u64)),
            augment,
            &split.mean,
            &split.std,
            device,
        );
        let label = format!("epoch {}/{}", epoch + 1, args.epochs);
        let train = trainer.epoch(model, &weights, batches, &label)?;
        let solves = clustering.map(Clustering::take_stats);
        let (test, hard) = match clustering {
            None => (
                evaluate(
                    model,
                    &Weights::Float,
                    eval_batches(&split.test, split, 256, device),
                    "test",
                )?,
                None,
            ),
            Some(c) => {
                let soft = c.soft_weights(model)?;
                let test = evaluate(
                    model,
                    &Weights::Fixed(&soft),
                    eval_batches(&split.test, split, 256, device),
                    "test soft",
                )?;
                let hard = c.hard_weights(model, lut)?;
                let hard = evaluate(
                    model,
                    &Weights::Fixed(&hard),
                    eval_batches(&split.test, split, 256, device),
                    "test hard",
                )?;
                (test, Some(hard))
            }
        };
        let hard_text = hard
            .map(|h| format!("  {:>9.2}%", 100.0 * h.accuracy))
            .unwrap_or_default();
        writeln!(
            out,
            "{:>5}   {:>10.4}   {:>8.2}%  {:>9.2}%{hard_text}   {:>6.1} s   {}",
            epoch + 1,
            train.loss,
            100.0 * train.accuracy,
            100.0 * test.accuracy,
            train.seconds,
            peak_rss().map(mib).unwrap_or_else(|| "?".into()),
        )?;
        if let Some(stats) = solves.filter(|s| s.solves > 0) {
            writeln!(out, "        {}", solve_summary(&stats))?;
        }
        let mut extra = vec![
            ("idkm.epoch", (epoch + 1).to_string()),
            ("idkm.test_accuracy", test.accuracy.to_string()),
        ];
        if let Some(h) = hard {
            extra.push(("idkm.hard_accuracy", h.accuracy.to_string()));
            extra.push(("idkm.lut", lut.to_string()));
        }
        snapshot::save(model, clustering, &extra, output)
            .with_context(|| format!("writing {}", output.display()))?;
        reports.push(EpochReport { test, hard });
    }
    tracing::info!(path = %output.display(), "wrote checkpoint");
    Ok(reports)
}
