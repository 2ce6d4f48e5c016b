//! The CIFAR-10 binary format: records of one label byte followed by 3x32x32 CHW pixels.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::{DataSplit, Dataset};
use crate::{Error, Result};

/// Name of the directory the CIFAR-10 binary archive unpacks to.
pub(super) const SUBDIR: &str = "cifar-10-batches-bin";
/// The training batches.
pub(super) const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The test batch.
const TEST_FILE: &str = "test_batch.bin";

/// Channels, height and width of a CIFAR-10 image.
pub(super) const SHAPE: (usize, usize, usize) = (3, 32, 32);
/// Number of classes.
pub(super) const CLASSES: usize = 10;
/// Per-channel mean of the training set, on the 0..1 scale.
pub(super) const MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
/// Per-channel standard deviation of the training set, on the 0..1 scale.
pub(super) const STD: [f32; 3] = [0.2470, 0.2435, 0.2616];

const IMAGE_BYTES: usize = SHAPE.0 * SHAPE.1 * SHAPE.2;
const RECORD_BYTES: usize = 1 + IMAGE_BYTES;

/// Whether `dir` holds any of the CIFAR-10 binary batch files.
pub(super) fn is_present(dir: &Path) -> bool {
    TRAIN_FILES
        .iter()
        .chain([&TEST_FILE])
        .any(|f| dir.join(f).is_file())
}

/// Reads the five training batches and the test batch in `dir`.
pub(super) fn load(dir: &Path) -> Result<DataSplit> {
    Ok(DataSplit {
        name: "cifar10".into(),
        train: read_batches(dir, &TRAIN_FILES)?,
        test: read_batches(dir, &[TEST_FILE])?,
        classes: CLASSES,
        mean: MEAN.to_vec(),
        std: STD.to_vec(),
    })
}

/// Concatenates the records of `files` into one data set.
fn read_batches(dir: &Path, files: &[&str]) -> Result<Dataset> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for file in files {
        let path = dir.join(file);
        let bytes = std::fs::read(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        if bytes.is_empty() || bytes.len() % RECORD_BYTES != 0 {
            return Err(Error::Format {
                path,
                msg: format!(
                    "size {} bytes is not a positive multiple of the CIFAR-10 record size {RECORD_BYTES} \
                     (1 label byte + {IMAGE_BYTES} pixel bytes); the file is truncated or not a CIFAR-10 batch",
                    bytes.len()
                ),
            });
        }
        pixels.reserve(bytes.len() / RECORD_BYTES * IMAGE_BYTES);
        for (i, record) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
            let label = u32::from(record[0]);
            if label as usize >= CLASSES {
                return Err(Error::Format {
                    path,
                    msg: format!("record {i} has label {label}, expected a class below {CLASSES}"),
                });
            }
            labels.push(label);
            pixels.extend_from_slice(&record[1..]);
        }
    }
    let (c, h, w) = SHAPE;
    let images = Tensor::from_vec(pixels, (labels.len(), c, h, w), &Device::Cpu)?;
    Ok(Dataset { images, labels })
}
