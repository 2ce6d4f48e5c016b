//! Writes survive a killed process: a child that overwrites a file in a
//! loop through `idkm::io::write_atomic` (the helper behind every
//! checkpoint, export, report and plot) is killed with SIGKILL at many
//! points of its writes, and the file is always complete and one of the
//! versions written, never empty or partial.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// The file's path, for the child (this test binary, re-executed).
const CHILD: &str = "IDKM_DURABILITY_CHILD";
/// Chunks a version is written in, with a pause after each (as a
/// serialiser that computes between writes), and bytes a chunk.
const CHUNKS: usize = 16;
const CHUNK: usize = 64 << 10;

/// Writes version `v` (every byte `v % 251`, the version in the first
/// four bytes) in chunks.
fn write(path: &Path, version: u32) -> std::io::Result<()> {
    idkm::io::write_atomic(path, |tmp| {
        let mut file = std::fs::File::create(tmp)?;
        let mut chunk = vec![(version % 251) as u8; CHUNK];
        chunk[..4].copy_from_slice(&version.to_le_bytes());
        for _ in 0..CHUNKS {
            file.write_all(&chunk)?;
            std::thread::sleep(Duration::from_micros(300));
        }
        Ok(())
    })
}

/// The version a complete file holds; panics on anything else.
fn version(path: &Path) -> u32 {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(bytes.len(), CHUNKS * CHUNK, "a partial file");
    let version = u32::from_le_bytes(bytes[..4].try_into().unwrap());
    for chunk in bytes.chunks(CHUNK) {
        assert_eq!(&chunk[..4], &version.to_le_bytes(), "versions mixed");
        assert!(
            chunk[4..].iter().all(|&b| b == (version % 251) as u8),
            "versions mixed"
        );
    }
    version
}

#[test]
fn a_killed_writer_never_leaves_a_partial_file() {
    if let Ok(path) = std::env::var(CHILD) {
        // The child: overwrite until killed.
        for v in 1.. {
            write(Path::new(&path), v).unwrap();
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("latest.bin");
    write(&path, 0).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut newest = 0;
    for trial in 0..40u64 {
        let mut child = std::process::Command::new(&exe)
            .args(["--exact", "a_killed_writer_never_leaves_a_partial_file"])
            .env(CHILD, &path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill points spread over the child's writes, after its start.
        std::thread::sleep(Duration::from_micros(60_000 + (trial * 37_129) % 90_000));
        child.kill().unwrap();
        child.wait().unwrap();
        newest = newest.max(version(&path));
    }
    assert!(newest > 0, "the children never completed a write");
    // The next write removes what killed writers left behind.
    write(&path, newest + 1).unwrap();
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left, ["latest.bin"], "{left:?}");
}
