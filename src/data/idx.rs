//! The IDX format of MNIST and Fashion-MNIST, plain or gzipped.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use flate2::read::MultiGzDecoder;

use super::{DataSplit, Dataset};
use crate::{Error, Result};

/// Training images (the stem: `.gz` may follow).
pub(super) const TRAIN_IMAGES: &str = "train-images-idx3-ubyte";
const TRAIN_LABELS: &str = "train-labels-idx1-ubyte";
const TEST_IMAGES: &str = "t10k-images-idx3-ubyte";
const TEST_LABELS: &str = "t10k-labels-idx1-ubyte";

/// Magic number of an IDX file of unsigned bytes with three dimensions.
const IMAGES_MAGIC: u32 = 2051;
/// Magic number of an IDX file of unsigned bytes with one dimension.
const LABELS_MAGIC: u32 = 2049;
const CLASSES: usize = 10;

/// Whether `dir` holds the training images, plain or gzipped.
pub(super) fn is_present(dir: &Path) -> bool {
    find(dir, TRAIN_IMAGES).is_some()
}

/// Whether `dir` holds all four files, each plain or gzipped.
pub(super) fn has_all_files(dir: &Path) -> bool {
    [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS]
        .iter()
        .all(|stem| find(dir, stem).is_some())
}

/// Reads the four IDX files in `dir`; the split is named after the path.
pub(super) fn load(dir: &Path) -> Result<DataSplit> {
    let train = read_pair(dir, TRAIN_IMAGES, TRAIN_LABELS)?;
    let test = read_pair(dir, TEST_IMAGES, TEST_LABELS)?;
    if (train.channels(), train.height(), train.width())
        != (test.channels(), test.height(), test.width())
    {
        return Err(Error::Format {
            path: dir.to_path_buf(),
            msg: format!(
                "training images are {}x{} but test images are {}x{}",
                train.height(),
                train.width(),
                test.height(),
                test.width()
            ),
        });
    }
    let fashion = dir.to_string_lossy().to_lowercase().contains("fashion");
    let (name, mean, std) = if fashion {
        ("fashion-mnist", 0.2860, 0.3530)
    } else {
        ("mnist", 0.1307, 0.3081)
    };
    Ok(DataSplit {
        name: name.into(),
        train,
        test,
        classes: CLASSES,
        mean: vec![mean],
        std: vec![std],
    })
}

/// `dir/stem`, else `dir/stem.gz`, when one exists.
fn find(dir: &Path, stem: &str) -> Option<PathBuf> {
    [dir.join(stem), dir.join(format!("{stem}.gz"))]
        .into_iter()
        .find(|p| p.is_file())
}

/// Reads an images file and its labels file, checking that they agree.
fn read_pair(dir: &Path, images_stem: &str, labels_stem: &str) -> Result<Dataset> {
    let images_path = locate(dir, images_stem)?;
    let labels_path = locate(dir, labels_stem)?;
    let (n, rows, cols, pixels) = parse_images(&images_path, read(&images_path)?)?;
    let labels = parse_labels(&labels_path, &read(&labels_path)?)?;
    if labels.len() != n {
        return Err(Error::Format {
            path: labels_path,
            msg: format!(
                "holds {} labels but {} holds {n} images",
                labels.len(),
                images_path.display()
            ),
        });
    }
    let images = Tensor::from_vec(pixels, (n, 1, rows, cols), &Device::Cpu)?;
    Ok(Dataset { images, labels })
}

fn locate(dir: &Path, stem: &str) -> Result<PathBuf> {
    find(dir, stem).ok_or_else(|| Error::Io {
        path: dir.join(stem),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("neither {stem} nor {stem}.gz exists"),
        ),
    })
}

/// The file's bytes, decompressed when its name ends in `.gz`.
fn read(path: &Path) -> Result<Vec<u8>> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    if path.extension().is_some_and(|e| e == "gz") {
        let file = std::fs::File::open(path).map_err(io)?;
        let mut bytes = Vec::new();
        MultiGzDecoder::new(std::io::BufReader::new(file))
            .read_to_end(&mut bytes)
            .map_err(io)?;
        Ok(bytes)
    } else {
        std::fs::read(path).map_err(io)
    }
}

/// Big-endian `u32` header fields, `count` of them after the magic number.
fn header(path: &Path, bytes: &[u8], magic: u32, what: &str, count: usize) -> Result<Vec<usize>> {
    let format_err = |msg: String| Error::Format {
        path: path.to_path_buf(),
        msg,
    };
    let words: Vec<u32> = bytes
        .chunks_exact(4)
        .take(1 + count)
        .map(|w| u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
        .collect();
    if words.len() < 1 + count {
        return Err(format_err(format!(
            "{} bytes is too short for an IDX {what} header ({} bytes)",
            bytes.len(),
            4 * (1 + count)
        )));
    }
    if words[0] != magic {
        return Err(format_err(format!(
            "magic number {} does not mark an IDX {what} file (expected {magic})",
            words[0]
        )));
    }
    Ok(words[1..].iter().map(|&d| d as usize).collect())
}

/// Checks an images file: returns the count, rows, columns and the pixels.
fn parse_images(path: &Path, mut bytes: Vec<u8>) -> Result<(usize, usize, usize, Vec<u8>)> {
    let format_err = |msg: String| Error::Format {
        path: path.to_path_buf(),
        msg,
    };
    let dims = header(path, &bytes, IMAGES_MAGIC, "images", 3)?;
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    if rows == 0 || cols == 0 {
        return Err(format_err(format!("image size {rows}x{cols} is empty")));
    }
    let expected = n
        .checked_mul(rows)
        .and_then(|v| v.checked_mul(cols))
        .and_then(|v| v.checked_add(16));
    if expected != Some(bytes.len()) {
        return Err(format_err(format!(
            "size {} bytes does not match its header: 16 + {n} images of {rows}x{cols} bytes",
            bytes.len()
        )));
    }
    bytes.drain(..16);
    Ok((n, rows, cols, bytes))
}

/// Checks a labels file: returns the labels.
fn parse_labels(path: &Path, bytes: &[u8]) -> Result<Vec<u32>> {
    let format_err = |msg: String| Error::Format {
        path: path.to_path_buf(),
        msg,
    };
    let n = header(path, bytes, LABELS_MAGIC, "labels", 1)?[0];
    if n.checked_add(8) != Some(bytes.len()) {
        return Err(format_err(format!(
            "size {} bytes does not match its header: 8 + {n} labels",
            bytes.len()
        )));
    }
    let labels = &bytes[8..];
    if let Some((i, &l)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| usize::from(l) >= CLASSES)
    {
        return Err(format_err(format!(
            "label {i} is {l}, expected a class below {CLASSES}"
        )));
    }
    Ok(labels.iter().map(|&l| u32::from(l)).collect())
}
