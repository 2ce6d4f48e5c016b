//! File output that never leaves a half-written file behind.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A sibling temporary path of `path` in the same directory (so that the
/// final rename stays on one file system).
fn temporary(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes a file atomically and durably: `write` fills a temporary file
/// next to `path`, which is flushed to the disk, renamed over `path`, and
/// the directory flushed too, so that neither a crash nor a power loss
/// leaves `path` empty or partial: it holds the old contents or the new.
/// On error the temporary file is removed and `path` is left as it was.
pub fn write_atomic<E>(path: &Path, write: impl FnOnce(&Path) -> Result<(), E>) -> Result<(), E>
where
    E: From<std::io::Error>,
{
    let tmp = temporary(path);
    let result = write(&tmp)
        .and_then(|()| sync_file(&tmp).map_err(E::from))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(E::from))
        .and_then(|()| sync_parent(path).map_err(E::from));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    } else {
        remove_stale_temporaries(path);
    }
    result
}

/// Removes the temporary files of `path` that killed writers left behind
/// (those of processes that no longer run; Linux only, elsewhere nothing).
fn remove_stale_temporaries(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(pid) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else {
            continue;
        };
        let alive = Path::new("/proc").join(pid).exists();
        if pid.parse::<u32>().is_ok() && !alive && Path::new("/proc/self").exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Writes `bytes` to `path` with [`write_atomic`]. An error (a full disk,
/// an unwritable directory) names `path` and keeps the OS error's kind;
/// the previous file is left as it was and the temporary file removed.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_through(path, |file| file, |w| w.write_all(bytes))
}

/// [`write_atomic`] of the file that `fill` writes into the writer that
/// `wrap` makes of the temporary file (the file itself, or in the tests
/// one that fails part way). Errors name `path`.
fn write_through<W: Write>(
    path: &Path,
    wrap: impl FnOnce(std::fs::File) -> W,
    fill: impl FnOnce(&mut W) -> std::io::Result<()>,
) -> std::io::Result<()> {
    write_atomic(path, |tmp| {
        let mut writer = wrap(std::fs::File::create(tmp)?);
        fill(&mut writer)?;
        writer.flush()
    })
    .map_err(|e| std::io::Error::new(e.kind(), format!("writing {}: {e}", path.display())))
}

/// Flushes a written file's data and metadata to the disk.
fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .sync_all()
}

/// Flushes the directory holding `path`, which makes a rename into it
/// durable. File systems that cannot sync a directory are let be.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported
            ) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Saves named tensors as safetensors, atomically.
pub fn save_safetensors(
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
    path: &Path,
) -> candle_core::Result<()> {
    write_atomic(path, |tmp| candle_core::safetensors::save(tensors, tmp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_leaves_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        std::fs::write(&path, b"old").unwrap();
        let r: std::io::Result<()> = write_atomic(&path, |tmp| {
            std::fs::write(tmp, b"partial")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        write_atomic::<std::io::Error>(&path, |tmp| std::fs::write(tmp, b"new")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }

    /// A file that takes `room` bytes, then fails as a full disk does
    /// (ENOSPC).
    struct FullAfter {
        file: std::fs::File,
        room: usize,
    }

    impl Write for FullAfter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.room == 0 {
                return Err(std::io::Error::from_raw_os_error(28));
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.file.write(&buf[..n])
        }

        fn flush(&mut self) -> std::io::Result<()> {
            self.file.flush()
        }
    }

    /// A disk that fills up part way through a write: the previous file
    /// is left as it was, the temporary file is removed, and the error
    /// names the destination and the OS error (its kind kept).
    #[test]
    fn a_full_disk_leaves_the_previous_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.safetensors");
        std::fs::write(&path, b"the previous checkpoint").unwrap();
        let e = write_through(
            &path,
            |file| FullAfter { file, room: 4096 },
            |w| w.write_all(&[7u8; 100_000]),
        )
        .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}");
        let message = e.to_string();
        assert!(
            message.contains(&path.display().to_string())
                && message.contains("No space left on device (os error 28)"),
            "{message}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"the previous checkpoint");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("run.safetensors")]);
        // The same write with room enough replaces the file.
        write_through(
            &path,
            |file| FullAfter {
                file,
                room: 200_000,
            },
            |w| w.write_all(&[7u8; 100_000]),
        )
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap().len(), 100_000);
    }
}
