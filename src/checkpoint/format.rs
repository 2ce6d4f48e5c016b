//! Which checkpoint format a file is, told from its bytes, never its name;
//! and for a file that is none of them, what it looks like instead.

use super::torch::LEGACY_MAGIC;
use crate::{Error, Result};
use std::io::Read;
use std::path::Path;

/// The checkpoint formats idkm reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// safetensors: an 8-byte header length, a JSON header, the tensors.
    Safetensors,
    /// The zip archive `torch.save` writes since PyTorch 1.6.
    TorchZip,
    /// The pickle stream `torch.save` wrote before PyTorch 1.6 (and with
    /// `_use_new_zipfile_serialization=False`).
    TorchLegacy,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Safetensors => "safetensors",
            Format::TorchZip => "PyTorch zip",
            Format::TorchLegacy => "PyTorch legacy",
        })
    }
}

/// Bytes read from the start of a file to recognise it.
const HEAD: usize = 512;

/// The format of the file at `path`; for a file that is none of them, an
/// [`Error::Format`] that says what the file looks like.
pub fn detect(path: &Path) -> Result<Format> {
    let mut file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut head = Vec::with_capacity(HEAD);
    (&mut file)
        .take(HEAD as u64)
        .read_to_end(&mut head)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
    recognise(&head, len).map_err(|looks_like| Error::Format {
        path: path.to_path_buf(),
        msg: format!(
            "not a checkpoint (safetensors, or a PyTorch .pth/.bin/.pt file): {looks_like}"
        ),
    })
}

/// The format of a file that starts with `head` and is `len` bytes long,
/// or what it looks like instead.
fn recognise(head: &[u8], len: u64) -> std::result::Result<Format, String> {
    if head.starts_with(b"PK\x03\x04") {
        return Ok(Format::TorchZip);
    }
    if let [0x80, _, 0x8a, 10, magic @ ..] = head {
        if magic.starts_with(&LEGACY_MAGIC) {
            return Ok(Format::TorchLegacy);
        }
    }
    if head.len() >= 9 && head[8] == b'{' {
        let header = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        if header.saturating_add(8) <= len {
            return Ok(Format::Safetensors);
        }
        return Err(format!(
            "it starts like safetensors, but its header of {header} bytes is longer than the {len}-byte file (a truncated download?)"
        ));
    }
    Err(describe(head, len))
}

/// What a file that is no checkpoint looks like.
fn describe(head: &[u8], len: u64) -> String {
    let text = |prefix: &str| {
        head.len() >= prefix.len() && head[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    };
    let first_text = std::str::from_utf8(&head[..head.len().min(64)])
        .unwrap_or("")
        .trim_start();
    if len == 0 {
        "the file is empty".into()
    } else if text("version https://git-lfs") {
        "it is a Git LFS pointer, not the file it points to (a clone without `git lfs`: run `git lfs pull`, \
         or pass the hub repo id owner/name instead)"
            .into()
    } else if text("<!doctype html") || text("<html") || first_text.starts_with("<!DOCTYPE") {
        "it is an HTML page (a download link that answered with a web page?)".into()
    } else if first_text.starts_with('{') || first_text.starts_with('[') {
        "it is a JSON document (such as a config.json), not weights".into()
    } else if head.starts_with(&[0x1f, 0x8b]) {
        "it is gzip-compressed: decompress it first".into()
    } else if head.starts_with(b"\x89HDF\r\n\x1a\n") {
        "it is an HDF5 file (Keras or TensorFlow weights), which idkm does not read".into()
    } else if head.starts_with(b"GGUF") {
        "it is a GGUF file (llama.cpp), which idkm does not read".into()
    } else if head.starts_with(b"\x93NUMPY") {
        "it is a NumPy .npy array, not a state dict".into()
    } else if head.len() > 262 && &head[257..262] == b"ustar" {
        "it is a tar archive (the format of PyTorch before 0.4): load it in Python and save it again with torch.save".into()
    } else if head.first() == Some(&0x80) {
        "it is a Python pickle without PyTorch's magic number (pickle.dump, not torch.save), which idkm does not read".into()
    } else {
        let shown = &head[..head.len().min(16)];
        let hex: Vec<String> = shown.iter().map(|b| format!("{b:02x}")).collect();
        let ascii: String = shown
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        format!(
            "its {len} bytes start with {} (\"{ascii}\"), which matches no known format",
            hex.join(" ")
        )
    }
}

/// What a zip archive without a pickled state dict holds.
pub(super) fn describe_zip(entries: &[String]) -> String {
    let shown: Vec<&str> = entries.iter().take(6).map(String::as_str).collect();
    let more = if entries.len() > shown.len() {
        format!(" and {} more", entries.len() - shown.len())
    } else {
        String::new()
    };
    let kind = if entries.iter().any(|e| e.ends_with(".npy")) {
        "a NumPy .npz archive"
    } else if entries
        .iter()
        .any(|e| e.contains("/code/") || e.ends_with("constants.pkl"))
    {
        "a TorchScript archive (torch.jit.save): save its model.state_dict() instead"
    } else {
        "a zip archive"
    };
    format!(
        "{kind} without the data.pkl of a torch.save file (it holds {}{more})",
        shown.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn looks(bytes: &[u8]) -> String {
        recognise(bytes, bytes.len() as u64).unwrap_err()
    }

    #[test]
    fn formats_are_told_by_their_first_bytes() {
        assert_eq!(recognise(b"PK\x03\x04rest", 100), Ok(Format::TorchZip));
        let mut legacy = vec![0x80, 2, 0x8a, 10];
        legacy.extend(LEGACY_MAGIC);
        assert_eq!(recognise(&legacy, 1000), Ok(Format::TorchLegacy));
        let mut st = 20u64.to_le_bytes().to_vec();
        st.extend(b"{\"a\":1}");
        assert_eq!(recognise(&st, 28), Ok(Format::Safetensors));
        assert!(recognise(&st, 27)
            .unwrap_err()
            .contains("header of 20 bytes is longer than the 27-byte file"));
    }

    #[test]
    fn other_files_say_what_they_look_like() {
        assert_eq!(recognise(b"", 0).unwrap_err(), "the file is empty");
        assert!(
            looks(b"version https://git-lfs.github.com/spec/v1\noid sha256:ab")
                .contains("Git LFS pointer")
        );
        assert!(looks(b"<!DOCTYPE html><html>").contains("HTML page"));
        assert!(looks(b"  {\"architectures\": []}").contains("JSON document"));
        assert!(looks(&[0x1f, 0x8b, 8, 0]).contains("gzip"));
        assert!(looks(b"\x89HDF\r\n\x1a\n\0\0").contains("HDF5"));
        assert!(looks(b"GGUF\x03\0\0\0").contains("GGUF"));
        assert!(looks(b"\x93NUMPY\x01\0").contains("NumPy .npy"));
        assert!(looks(b"\x80\x04\x95\x10\0\0").contains("without PyTorch's magic number"));
        let mut tar = vec![b'a'; 300];
        tar[257..262].copy_from_slice(b"ustar");
        assert!(looks(&tar).contains("tar archive"));
        assert_eq!(
            looks(b"\x08\x07\x12\x07pytorch"),
            "its 11 bytes start with 08 07 12 07 70 79 74 6f 72 63 68 (\"....pytorch\"), which matches no known format"
        );
        let npz = describe_zip(&["w.npy".into(), "b.npy".into()]);
        assert!(
            npz.starts_with("a NumPy .npz archive without the data.pkl")
                && npz.contains("w.npy, b.npy"),
            "{npz}"
        );
    }
}
