//! Memory budgets: sizes as people write them, and the check behind
//! `--memory-budget` with the alternatives that fit.

use super::model::{estimate, ClusterSpec, Estimate, ModelShape, Workload};
use crate::cluster::{KmeansConfig, Method};
use std::fmt::Write as _;

/// Parses a byte count: `7GiB`, `512MiB`, `8GB`, `1.5G`, `1000000` (bytes).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 7GiB, 512MiB)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "gb" => 1e9,
        "t" | "tib" => 1024.0f64.powi(4),
        "tb" => 1e12,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{text}` (use B, KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    if !(value.is_finite() && value > 0.0) {
        return Err(format!("`{text}` is not a positive size"));
    }
    Ok((value * scale) as u64)
}

/// Bytes for people: MiB below 1 GiB, GiB with two decimals above.
pub fn human(bytes: u64) -> String {
    let mib = bytes as f64 / (1u64 << 20) as f64;
    if mib < 10.0 {
        format!("{mib:.1} MiB")
    } else if bytes < 1 << 30 {
        format!("{mib:.0} MiB")
    } else {
        gib(bytes)
    }
}

/// Bytes in GiB with two decimals.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Checks a run against a memory budget before it starts: `Ok` with the
/// estimate when it fits, otherwise an error message with the prediction
/// and the alternatives that fit (another method, a smaller batch, fewer
/// bits, fewer DKM iterations).
pub fn check_budget(
    shape: &ModelShape,
    specs: &[ClusterSpec],
    work: &Workload,
    budget: u64,
) -> Result<Estimate, String> {
    let est = estimate(shape, specs, work);
    if est.total() <= budget {
        return Ok(est);
    }
    let fits = |specs: &[ClusterSpec], work: &Workload| {
        let e = estimate(shape, specs, work);
        (e.total() <= budget).then_some(e.total())
    };
    let map = |f: &dyn Fn(&KmeansConfig) -> KmeansConfig| -> Vec<ClusterSpec> {
        specs
            .iter()
            .map(|s| ClusterSpec {
                config: s.config.as_ref().map(f),
                ..s.clone()
            })
            .collect()
    };
    let mut ideas: Vec<String> = Vec::new();
    let has_dkm = specs
        .iter()
        .any(|s| s.config.as_ref().is_some_and(|c| c.method == Method::Dkm));
    let clustered = specs.iter().any(|s| s.config.is_some());
    if has_dkm {
        for method in [Method::Idkm, Method::IdkmJfb] {
            let alt = map(&|c| KmeansConfig {
                method,
                ..c.clone()
            });
            if let Some(total) = fits(&alt, work) {
                ideas.push(format!(
                    "--method {method} (same bits and iterations): {}",
                    human(total)
                ));
            }
        }
        let max_t = specs
            .iter()
            .filter_map(|s| s.config.as_ref())
            .map(|c| c.max_iter)
            .max()
            .unwrap_or(1);
        if let Some(t) = (1..max_t).rev().find(|&t| {
            fits(
                &map(&|c| KmeansConfig {
                    max_iter: c.max_iter.min(t),
                    ..c.clone()
                }),
                work,
            )
            .is_some()
        }) {
            let total = fits(
                &map(&|c| KmeansConfig {
                    max_iter: c.max_iter.min(t),
                    ..c.clone()
                }),
                work,
            )
            .unwrap_or(0);
            ideas.push(format!("--max-iter {t} with DKM: {}", human(total)));
        }
        let max_bits = specs
            .iter()
            .filter_map(|s| s.config.as_ref())
            .map(|c| c.bits)
            .max()
            .unwrap_or(1);
        if let Some(b) = (1..max_bits).rev().find(|&b| {
            fits(
                &map(&|c| KmeansConfig {
                    bits: c.bits.min(b),
                    ..c.clone()
                }),
                work,
            )
            .is_some()
        }) {
            let total = fits(
                &map(&|c| KmeansConfig {
                    bits: c.bits.min(b),
                    ..c.clone()
                }),
                work,
            )
            .unwrap_or(0);
            ideas.push(format!("--bits {b} with DKM: {}", human(total)));
        }
    }
    let mut batch = work.batch / 2;
    while batch >= 1 {
        let w = Workload { batch, ..*work };
        if let Some(total) = fits(specs, &w) {
            ideas.push(format!("--batch-size {batch}: {}", human(total)));
            break;
        }
        batch /= 2;
    }
    let mut msg = format!(
        "this run is predicted to need {} at its peak, more than the memory budget of {}",
        human(est.total()),
        human(budget)
    );
    let _ =
        write!(
        msg,
        " (weights {}, gradients {}, optimizer {}, data {}, activations at batch {} {}{}, working set {})",
        human(est.params),
        human(est.grads),
        human(est.optimizer),
        human(est.input),
        work.batch,
        human(est.activations),
        if clustered { format!(", clustering {}", human(est.clustering)) } else { String::new() },
        human(est.transient),
    );
    if est.eval > est.heap() {
        let _ = write!(
            msg,
            "; the evaluation between epochs (batch {}) peaks at {}",
            work.eval_batch,
            human(est.eval + est.base)
        );
    }
    if ideas.is_empty() {
        msg.push_str("; nothing smaller that this model can run fits: raise --memory-budget");
    } else {
        msg.push_str(". These would fit: ");
        msg.push_str(&ideas.join("; "));
    }
    Err(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("7GiB").unwrap(), 7 << 30);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("8GB").unwrap(), 8_000_000_000);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert!(parse_bytes("7 parsecs").unwrap_err().contains("unit"));
        assert!(parse_bytes("-3G").is_err());
    }
}
