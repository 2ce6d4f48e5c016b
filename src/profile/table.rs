//! The profile as Markdown tables.

use super::{Outcome, Record};
use crate::memory::gib;
use std::fmt::Write as _;

fn mib(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / (1u64 << 20) as f64)
}

/// The row of [`table`] for one record, as printed when its configuration
/// has finished.
pub fn table_row(record: &Record) -> String {
    table(std::slice::from_ref(record))
        .lines()
        .last()
        .unwrap_or("")
        .to_string()
}

/// The records as a Markdown table (also readable on a terminal): method,
/// bits, t, seconds per step and of the first warm-up step (from the
/// initial centroids: a cold start, unless the row is `steady`), measured
/// peak RSS and counted
/// peak, prediction and its error, ratios to the fp32 row,
/// solver steps.
pub fn table(records: &[Record]) -> String {
    let base = records
        .iter()
        .find(|r| r.config.method.is_none())
        .and_then(|r| r.measured().cloned());
    let mut s = String::new();
    s.push_str("| config | s/step | first step s | peak RSS MiB | counted MiB | predicted MiB | error | x fp32 mem | x fp32 time | k-means iters | solver steps (max) | worst residual |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in records {
        let label = r.config.label();
        let pred = mib(r.predicted.total());
        match &r.outcome {
            Outcome::Measured(m) => {
                let rss = m.peak_rss_bytes.map(mib).unwrap_or_else(|| "?".into());
                let counted = m.peak_counted_bytes.map(mib).unwrap_or_else(|| "-".into());
                let err = r
                    .rss_error()
                    .map(|e| format!("{:+.1}%", 100.0 * e))
                    .unwrap_or_else(|| "-".into());
                let xmem = match (&base, m.peak_rss_bytes) {
                    (Some(b), Some(p)) if r.config.method.is_some() => b
                        .peak_rss_bytes
                        .map(|b| format!("{:.2}", p as f64 / b as f64))
                        .unwrap_or_else(|| "-".into()),
                    _ => "-".into(),
                };
                let xtime = match &base {
                    Some(b) if r.config.method.is_some() => {
                        format!("{:.2}", m.seconds_per_step / b.seconds_per_step)
                    }
                    _ => "-".into(),
                };
                let secs = if m.warmup_only {
                    format!("{:.1} (warm-up)", m.seconds_per_step)
                } else {
                    format!("{:.1}", m.seconds_per_step)
                };
                let first = m
                    .warmup_seconds
                    .first()
                    .map_or_else(|| "-".into(), |s| format!("{s:.1}"));
                let iters = {
                    let it: Vec<usize> = m.layers.iter().filter_map(|l| l.forward_iters).collect();
                    match (it.iter().min(), it.iter().max()) {
                        (Some(a), Some(b)) if a == b => a.to_string(),
                        (Some(a), Some(b)) => format!("{a}-{b}"),
                        _ => "-".into(),
                    }
                };
                let steps = m
                    .layers
                    .iter()
                    .filter_map(|l| l.solver_steps)
                    .max()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into());
                let resid = m
                    .layers
                    .iter()
                    .filter_map(|l| l.residual)
                    .fold(None, |a: Option<f64>, r| Some(a.map_or(r, |a| a.max(r))))
                    .map(|r| format!("{r:.1e}"))
                    .unwrap_or_else(|| "-".into());
                let _ = writeln!(
                    s,
                    "| {label} | {secs} | {first} | {rss} | {counted} | {pred} | {err} | {xmem} | {xtime} | {iters} | {steps} | {resid} |"
                );
            }
            Outcome::DoesNotFit { budget_bytes } => {
                let _ = writeln!(
                    s,
                    "| {label} | does not fit (predicted {}, budget {}) | - | - | - | {pred} | - | - | - | - | - | - |",
                    gib(r.predicted.total()),
                    gib(*budget_bytes)
                );
            }
            Outcome::TooSlow {
                predicted_seconds,
                limit_seconds,
            } => {
                let _ = writeln!(
                    s,
                    "| {label} | not run: ~{:.0} s per step predicted, over the {:.0} s limit | - | - | - | {pred} | - | - | - | - | - | - |",
                    predicted_seconds, limit_seconds
                );
            }
            Outcome::Failed { reason } => {
                let reason = reason.replace('|', "/");
                let _ = writeln!(
                    s,
                    "| {label} | failed: {reason} | - | - | - | {pred} | - | - | - | - | - | - |"
                );
            }
        }
    }
    s
}

/// Per clustered layer of each measured record: predicted extra bytes,
/// forward iterations, solver steps and residual (Markdown).
pub fn layer_table(records: &[Record]) -> String {
    let mut s = String::from("| config | layer | weights | kept MiB (pred.) | in-flight MiB (pred.) | tau | k-means iters | passes | distance | cond | distinct | fallbacks | adjoint | solver steps | residual |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|\n");
    let opt = |x: Option<String>| x.unwrap_or_else(|| "-".into());
    for r in records {
        let Some(m) = r.measured() else { continue };
        for l in &m.layers {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.config.label(),
                l.name,
                l.numel,
                l.kept_bytes as f64 / (1u64 << 20) as f64,
                l.transient_bytes as f64 / (1u64 << 20) as f64,
                opt(l.tau.map(|t| format!("{t:.2e}"))),
                opt(l.forward_iters.map(|i| i.to_string())),
                opt(l.forward_passes.map(|i| i.to_string())),
                opt(l.forward_distance.map(|x| format!("{x:.1e}"))),
                opt(l.forward_cond.map(|x| format!("{x:.0}"))),
                opt(l.distinct.map(|x| x.to_string())),
                opt(l.forward_fallbacks.map(|x| x.to_string())),
                l.adjoint.as_deref().unwrap_or("-"),
                l.solver_steps
                    .map(|i| i.to_string())
                    .unwrap_or_else(|| "-".into()),
                l.residual
                    .map(|r| format!("{r:.1e}"))
                    .unwrap_or_else(|| "-".into()),
            );
        }
    }
    s
}
