//! Solves that miss their tolerance are counted in the epoch summary and
//! warned about once per layer and epoch: a short `idkm quantize` run with
//! one Newton iteration per forward solve (`--max-iter 1`) and one CG step
//! per adjoint solve (`--solver-max-steps 1`), where every solve misses.

mod common;

use std::process::Command;

/// `text` without ANSI escape sequences (the log's colours).
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte (a letter).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn unconverged_solves_are_counted_per_epoch_and_warned_once_per_layer_and_epoch() {
    let data = common::fashion_mnist_arg();
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("q.safetensors");
    let epochs = 2;
    let run = Command::new(env!("CARGO_BIN_EXE_idkm"))
        .args([
            "quantize",
            "--bits",
            "4",
            "--batch-size",
            "64",
            "--data",
            &data,
        ])
        .args(["--epochs", &epochs.to_string()])
        .args(["--train-limit", "256", "--test-limit", "100"])
        .args([
            "--max-iter",
            "1",
            "--solver",
            "cg",
            "--solver-max-steps",
            "1",
        ])
        .arg("-o")
        .arg(&output)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        plain(&String::from_utf8_lossy(&run.stdout)),
        plain(&String::from_utf8_lossy(&run.stderr)),
    );
    assert!(run.status.success(), "{stderr}");

    // Each epoch's summary counts the solves that missed, forward and adjoint.
    let summaries: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("k-means:"))
        .collect();
    assert_eq!(summaries.len(), epochs, "{stdout}");
    for line in &summaries {
        let count = |what: &str| -> usize {
            let before = &line[..line
                .find(what)
                .unwrap_or_else(|| panic!("no `{what}`: {line}"))];
            before.rsplit(' ').next().unwrap().parse().unwrap()
        };
        // 4 steps of 2 layers, and the evaluation's solve of each layer.
        assert_eq!(count(" solves short of --tol"), 10, "{line}");
        assert_eq!(count(" missed --solver-tol"), 8, "{line}");
    }

    // One warning of each kind per layer and epoch, naming the layer.
    let layers = ["conv2.weight", "fc1.weight"];
    for (what, kind) in [
        (
            "the k-means solve stopped short of its tolerance",
            "forward",
        ),
        ("the adjoint solve missed its tolerance", "adjoint"),
    ] {
        for layer in layers {
            let warnings = stderr
                .lines()
                .filter(|l| l.contains("WARN") && l.contains(what))
                .filter(|l| {
                    l.contains(&format!("layer={layer}"))
                        || l.contains(&format!("layer=\"{layer}\""))
                })
                .count();
            assert_eq!(warnings, epochs, "{kind} warnings of {layer}:\n{stderr}");
        }
    }
}
