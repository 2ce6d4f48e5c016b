//! Runs survive interrupts: `idkm quantize` interrupted with SIGINT in the
//! middle of a seeded run writes a checkpoint and says how to continue;
//! continued with `--resume`, the run ends with the weights, centroids and
//! test accuracy of the uninterrupted run, bit for bit, with SGD and with
//! AdamW. A continuation with other settings is refused, naming the setting.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

/// The run's flags, writing to `output`.
fn quantize_args(data: &str, output: &Path) -> Vec<String> {
    [
        "quantize",
        "--bits",
        "2",
        "--epochs",
        "3",
        "--batch-size",
        "64",
        "--lr",
        "0.02",
        "--data",
        data,
        "--train-limit",
        "640",
        "--test-limit",
        "200",
        "-o",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([output.to_str().unwrap().to_string()])
    .collect()
}

fn idkm(args: &[String]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_idkm"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run idkm")
}

/// A file's tensors (name, raw bytes; sorted) and metadata.
type Contents = (
    Vec<(String, Vec<u8>)>,
    std::collections::HashMap<String, String>,
);

/// Every tensor of a safetensors file, as raw bytes, and its metadata.
fn contents(path: &Path) -> Contents {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().to_vec()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    (tensors, idkm::checkpoint::metadata(path).unwrap())
}

/// Starts idkm with `args` and returns once it has reported its first
/// epoch, with that row; its stdout is drained from then on, its stderr
/// kept for `wait_with_output`.
fn past_the_first_epoch(args: &[String]) -> (std::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_idkm"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let row = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find(|l| l.trim_start().starts_with("1 "))
        .expect("the first epoch's row");
    std::thread::spawn(move || lines.for_each(drop));
    (child, row)
}

#[test]
fn an_interrupted_run_continues_to_the_uninterrupted_result() {
    continues_to_the_uninterrupted_result(&[], ("--lr", "0.05", "--lr 0.02, not 0.05"));
}

/// The same with AdamW, whose moments and step count the checkpoint holds;
/// the state of one optimiser is refused to the other, naming the flag.
#[test]
fn an_interrupted_adamw_run_continues_to_the_uninterrupted_result() {
    continues_to_the_uninterrupted_result(
        &[
            "--optimizer",
            "adamw",
            "--lr",
            "0.002",
            "--weight-decay",
            "0.01",
        ],
        ("--optimizer", "sgd", "--optimizer adamw, not sgd"),
    );
}

/// [`quantize_args`] with `extra` flags (later ones win), run whole, then
/// interrupted after its first epoch and continued: the two end alike, bit
/// for bit. Before that, a continuation with `flag` set to `other` is
/// refused with `refusal` in its message.
fn continues_to_the_uninterrupted_result(
    extra: &[&str],
    (flag, other, refusal): (&str, &str, &str),
) {
    let data = common::fashion_mnist_arg();
    let dir = tempfile::tempdir().unwrap();
    let (whole, parts) = (
        dir.path().join("whole.safetensors"),
        dir.path().join("parts.safetensors"),
    );
    let args = |output: &Path| -> Vec<String> {
        let mut args = quantize_args(&data, output);
        for pair in extra.chunks(2) {
            match args.iter().position(|a| a == pair[0]) {
                Some(i) => args[i + 1] = pair[1].to_string(),
                None => args.extend(pair.iter().map(|s| s.to_string())),
            }
        }
        args
    };

    let run = idkm(&args(&whole));
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    // The same run, interrupted once its first epoch is reported.
    let (child, first_epoch) = past_the_first_epoch(&args(&parts));
    let interrupt = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupt.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the run ended despite the interrupt: {first_epoch}\n{stderr}"
    );
    assert!(
        stderr.contains("interrupted after") && stderr.contains("--resume"),
        "{stderr}"
    );
    let (interrupted, meta) = contents(&parts);
    assert!(meta.contains_key("idkm.run.steps"), "{meta:?}");

    // Other settings are refused, naming the flag.
    let mut different = args(&parts);
    let at = different.iter().position(|a| a == flag).unwrap() + 1;
    different[at] = other.into();
    different.extend(["--resume".into(), parts.to_str().unwrap().into()]);
    let refused = idkm(&different);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains(refusal),
        "{stderr}"
    );
    assert_eq!(
        contents(&parts).0,
        interrupted,
        "a refused continuation wrote the checkpoint"
    );

    let mut resume = args(&parts);
    resume.extend(["--resume".into(), parts.to_str().unwrap().into()]);
    let continued = idkm(&resume);
    assert!(
        continued.status.success(),
        "{}",
        String::from_utf8_lossy(&continued.stderr)
    );

    let ((a, meta_a), (b, meta_b)) = (contents(&whole), contents(&parts));
    assert_eq!(a.len(), b.len());
    for ((name_a, bytes_a), (name_b, bytes_b)) in a.iter().zip(&b) {
        assert_eq!(name_a, name_b);
        assert!(
            bytes_a == bytes_b,
            "`{name_a}` differs from the uninterrupted run's"
        );
    }
    for key in [
        "idkm.test_accuracy",
        "idkm.hard_accuracy",
        "idkm.tau",
        "idkm.run.steps",
        "idkm.optimizer",
        "idkm.optimizer.steps",
    ] {
        assert_eq!(meta_a.get(key), meta_b.get(key), "{key}");
    }
}

/// A second interrupt ends the run at once (status 130), and the last
/// checkpoint stays whole: the one written after the first epoch or the
/// one the first interrupt wrote.
#[test]
fn a_second_interrupt_exits_at_once_leaving_the_last_checkpoint() {
    let data = common::fashion_mnist_arg();
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("run.safetensors");
    let (mut child, _) = past_the_first_epoch(&quantize_args(&data, &output));
    // Into the second epoch's steps (past the checkpoint's write, during
    // which signals wait and two would be one).
    std::thread::sleep(std::time::Duration::from_millis(200));
    // Two signals a few milliseconds apart (signals of one kind pending
    // together are one), the second long before the step under way ends.
    let twice = format!("kill -INT {0}; sleep 0.003; kill -INT {0}", child.id());
    assert!(Command::new("sh")
        .args(["-c", &twice])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}");
    let (_, meta) = contents(&output);
    assert!(meta.contains_key("idkm.run.steps"), "{meta:?}");
}
