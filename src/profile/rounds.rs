//! Repeated profiles: the configurations run in rounds, each round all of
//! them one after another, so that a noisy machine's slow spells fall on
//! every configuration alike; each one's median round, and its ratio to
//! the fp32 step of the same round.

use super::Record;
use std::fmt::Write as _;

/// The lower median of `x` (not empty), by `total_cmp`.
fn lower_median(mut x: Vec<f64>) -> f64 {
    x.sort_by(f64::total_cmp);
    x[(x.len() - 1) / 2]
}

/// For `rounds` rounds of n configurations (round r of configuration i at
/// `values[r * n + i]`), the index into `values` of each configuration's
/// median round by value (the lower median for an even number); rounds
/// without a value (not measured) are left out, and a configuration with
/// none keeps its first round.
pub fn median_rounds(values: &[Option<f64>], rounds: usize) -> Vec<usize> {
    let n = values.len() / rounds.max(1);
    (0..n)
        .map(|i| {
            let mut measured: Vec<(f64, usize)> = (0..rounds)
                .map(|r| r * n + i)
                .filter_map(|j| values[j].map(|v| (v, j)))
                .collect();
            if measured.is_empty() {
                return i;
            }
            measured.sort_by(|a, b| a.0.total_cmp(&b.0));
            measured[(measured.len() - 1) / 2].1
        })
        .collect()
}

/// The records of `rounds` rounds of the same configurations, in the order
/// [`median_rounds`] takes: each configuration's median round by step
/// time, and a Markdown table of every round's seconds per step and ratio
/// to the fp32 step of the same round, with their (lower) medians.
pub fn median_of_rounds(records: &[Record], rounds: usize) -> (Vec<Record>, String) {
    let rounds = rounds.max(1);
    let n = records.len() / rounds;
    let seconds: Vec<Option<f64>> = records
        .iter()
        .map(|r| r.measured().map(|m| m.seconds_per_step))
        .collect();
    let fp32 = records[..n].iter().position(|r| r.config.method.is_none());
    let mut table = String::from(
        "| config | s/step, each round | median s/step | x fp32 time, each round | median x fp32 |\n\
         |---|---|---:|---|---:|\n",
    );
    let list = |x: &[f64]| {
        if x.is_empty() {
            return "-".to_string();
        }
        x.iter()
            .map(|v| format!("{v:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let median = |x: &[f64]| {
        if x.is_empty() {
            "-".to_string()
        } else {
            format!("{:.2}", lower_median(x.to_vec()))
        }
    };
    for i in 0..n {
        let times: Vec<f64> = (0..rounds).filter_map(|r| seconds[r * n + i]).collect();
        let ratios: Vec<f64> = match fp32.filter(|&f| f != i) {
            Some(f) => (0..rounds)
                .filter_map(|r| Some(seconds[r * n + i]? / seconds[r * n + f]?))
                .collect(),
            None => Vec::new(),
        };
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} |",
            records[i].config.label(),
            list(&times),
            median(&times),
            list(&ratios),
            median(&ratios),
        );
    }
    let chosen = median_rounds(&seconds, rounds)
        .into_iter()
        .map(|j| records[j].clone())
        .collect();
    (chosen, table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_round_of_each_configuration() {
        // Three rounds of three configurations; the second never ran in
        // round 1, the third never ran at all.
        let values = [
            Some(3.0),
            Some(9.0),
            None,
            Some(1.0),
            None,
            None,
            Some(2.0),
            Some(7.0),
            None,
        ];
        // Configuration 0: 3, 1, 2 -> 2 (index 6); configuration 1: 9, 7 ->
        // the lower median 7 (index 7); configuration 2: its first round.
        assert_eq!(median_rounds(&values, 3), vec![6, 7, 2]);
        assert_eq!(median_rounds(&values[..3], 1), vec![0, 1, 2]);
    }

    #[test]
    fn lower_median_of_even_and_odd_counts() {
        assert_eq!(lower_median(vec![4.0, 1.0, 3.0, 2.0]), 2.0);
        assert_eq!(lower_median(vec![5.0, 1.0, 3.0]), 3.0);
    }
}
