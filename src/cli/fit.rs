//! The epoch loop shared by `idkm train` and `idkm quantize`.

use super::common::{mib, peak_rss, OptimArgs};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use idkm::cluster::layer::SolveStats;
use idkm::data::{Augment, Batcher, DataSplit, Dataset};
use idkm::model::{Model, Weights};
use idkm::quantize::{snapshot, Clustering, LutDType};
use idkm::train::{evaluate, EpochStats, OptimizerState, Trainer};
use signal_hook::consts::{SIGINT, SIGTERM};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// What one epoch measured.
pub struct EpochReport {
    /// Test accuracy with float weights (no clustering) or soft-clustered weights.
    pub test: EpochStats,
    /// Test accuracy with hard (palettized) weights, when clustering.
    pub hard: Option<EpochStats>,
}

/// One line on an epoch's forward k-means solves and adjoint solves, with
/// the solves that missed their tolerance counted.
fn solve_summary(stats: &SolveStats) -> String {
    let s = &stats.forward;
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
        (s.unconverged, "solves short of --tol"),
        (s.unstable, "unstable ends"),
    ] {
        if count > 0 {
            line.push_str(&format!(", {count} {what}"));
        }
    }
    let a = &stats.adjoint;
    if a.solves > 0 {
        line.push_str(&format!(
            "; adjoint: {} solves, relative residual <= {:.1e}",
            a.solves, a.max_residual
        ));
        if a.missed() > 0 {
            line.push_str(&format!(
                ", {} missed --solver-tol ({} best iterates, {} JFB fallbacks)",
                a.missed(),
                a.best_iterates,
                a.fell_back
            ));
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

/// The settings a continued run must share with the run it continues, by
/// flag.
pub type Settings = BTreeMap<String, String>;

/// Metadata of a checkpoint's run state: steps taken, the epoch and the
/// batch within it where the run continues, the run's settings (JSON).
const RUN_STEPS: &str = "idkm.run.steps";
const RUN_EPOCH: &str = "idkm.run.epoch";
const RUN_BATCH: &str = "idkm.run.batch";
const RUN_SETTINGS: &str = "idkm.run.settings";

/// Where a run continues (`--resume`): the position and the optimiser's
/// state that its checkpoint holds.
pub struct Resume {
    steps: usize,
    epoch: usize,
    batch: usize,
    optimizer: OptimizerState,
}

impl Resume {
    /// The run state of the checkpoint `snapshot` read from `path`, which
    /// must have been written with the same `settings`.
    pub fn of(snapshot: &mut snapshot::Snapshot, path: &Path, settings: &Settings) -> Result<Self> {
        let meta = &snapshot.metadata;
        let field = |key: &str| -> Result<&String> {
            meta.get(key).with_context(|| {
                format!(
                    "{} holds no run state (`{key}`): it was not written during a run of idkm",
                    path.display()
                )
            })
        };
        let number = |key: &str| -> Result<usize> {
            field(key)?
                .parse()
                .with_context(|| format!("{}: metadata `{key}` is not a number", path.display()))
        };
        let saved: Settings = serde_json::from_str(field(RUN_SETTINGS)?)
            .with_context(|| format!("{}: metadata `{RUN_SETTINGS}`", path.display()))?;
        for (flag, value) in settings {
            let was = saved.get(flag).map_or("(not set)", String::as_str);
            if was != value {
                bail!(
                    "{} was written by a run with {flag} {was}, not {value}: a run continues with the settings it started with",
                    path.display()
                );
            }
        }
        Ok(Self {
            steps: number(RUN_STEPS)?,
            epoch: number(RUN_EPOCH)?,
            batch: number(RUN_BATCH)?,
            optimizer: std::mem::take(&mut snapshot.optimizer),
        })
    }
}

/// Raised by SIGINT or SIGTERM; a second signal while it is raised exits
/// at once (status 130), leaving the last checkpoint as it was.
fn interrupt_flag() -> Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        for signal in [SIGINT, SIGTERM] {
            // The conditional shutdown first: it sees the flag as the
            // previous signal left it.
            let registered = signal_hook::flag::register_conditional_shutdown(signal, 130, flag.clone())
                .and_then(|_| signal_hook::flag::register(signal, flag.clone()));
            if let Err(e) = registered {
                tracing::warn!(signal, error = %e, "cannot catch the signal: an interrupt ends the run without a checkpoint");
            }
        }
        flag
    })
    .clone()
}

/// The error of a run interrupted after `point`, its run state in `output`.
fn interrupted(point: &str, output: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "interrupted after {point}: {} holds the run; continue it with the same command and --resume {}",
        output.display(),
        output.display()
    )
}

/// Trains `model` for `args.epochs` epochs, with `clustering` if given,
/// reporting each epoch and writing a checkpoint to `output` after each,
/// with the run's state (see [`Resume`]).
/// From `resume`, the run continues where it stopped. An interrupt
/// (SIGINT, SIGTERM) ends it after the current step with a checkpoint.
#[allow(clippy::too_many_arguments)]
pub fn fit(
    model: &Model,
    clustering: Option<&Clustering>,
    split: &DataSplit,
    args: &OptimArgs,
    lut: LutDType,
    output: &Path,
    device: &Device,
    settings: &Settings,
    resume: Option<Resume>,
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
    let stop = interrupt_flag();
    trainer.stop_on(stop.clone());
    let (first_epoch, first_batch) = match resume {
        Some(r) => {
            trainer
                .resume(r.steps, r.optimizer)
                .context("restoring the optimiser's state")?;
            tracing::info!(
                epoch = r.epoch + 1,
                batch = r.batch,
                steps = r.steps,
                "continuing the run"
            );
            (r.epoch, r.batch)
        }
        None => (0, 0),
    };
    let settings_json = serde_json::to_string(settings)?;
    // Writes the checkpoint; with the run's state, where the next step is
    // batch `batch` of epoch `epoch`.
    let save = |trainer: &Trainer, extra: &mut Vec<(&str, String)>, epoch: usize, batch: usize| {
        let state = trainer.optimizer_state();
        extra.extend([
            (RUN_STEPS, trainer.steps().to_string()),
            (RUN_EPOCH, epoch.to_string()),
            (RUN_BATCH, batch.to_string()),
            (RUN_SETTINGS, settings_json.clone()),
        ]);
        snapshot::save_run(model, clustering, extra, Some(&state), output)
            .with_context(|| format!("writing {}", output.display()))
    };
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
    for epoch in first_epoch..args.epochs {
        let start = if epoch == first_epoch { first_batch } else { 0 };
        let batches = Batcher::new(
            &split.train,
            args.batch_size,
            Some((args.seed, epoch as u64)),
            augment,
            &split.mean,
            &split.std,
            device,
        )
        .starting_at(start);
        let in_epoch = batches.num_batches();
        let label = format!("epoch {}/{}", epoch + 1, args.epochs);
        let train = trainer.epoch(model, &weights, batches, &label)?;
        let done = start + train.batches;
        if done < in_epoch {
            save(
                &trainer,
                &mut vec![("idkm.epoch", epoch.to_string())],
                epoch,
                done,
            )?;
            return Err(interrupted(
                &format!(
                    "step {} (epoch {}, batch {done} of {in_epoch})",
                    trainer.steps(),
                    epoch + 1
                ),
                output,
            ));
        }
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
        // The epoch's solves, the evaluation's included: each solve to miss
        // its tolerance is warned about once per layer and epoch.
        let solves = clustering.map(Clustering::take_stats);
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
        if let Some(stats) = solves.filter(|s| s.forward.solves > 0) {
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
        save(&trainer, &mut extra, epoch + 1, 0)?;
        reports.push(EpochReport { test, hard });
        if stop.load(Ordering::SeqCst) && epoch + 1 < args.epochs {
            return Err(interrupted(&format!("epoch {}", epoch + 1), output));
        }
    }
    tracing::info!(path = %output.display(), "wrote checkpoint");
    Ok(reports)
}
