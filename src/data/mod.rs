//! Data sets: CIFAR-10 and (Fashion-)MNIST readers, augmentation, batching.
//!
//! [`load`] recognises a directory's format from its contents:
//!
//! - CIFAR-10 binary batches (`data_batch_1.bin` .. `data_batch_5.bin`, `test_batch.bin`),
//!   in the directory itself or in its `cifar-10-batches-bin/` subdirectory;
//! - CIFAR-10 as the Hugging Face hub's parquet files (`uoft-cs/cifar10`:
//!   `train-*.parquet` and `test-*.parquet`, in the directory or in `plain_text/`);
//! - MNIST or Fashion-MNIST IDX files (`train-images-idx3-ubyte` and friends), plain or `.gz`.
//!
//! Images are kept as one `u8` tensor of shape `(N, C, H, W)` on the CPU; [`Batcher`]
//! gathers, augments and normalises mini-batches from it on the fly.

mod augment;
mod batch;
mod cifar;
mod cifar_parquet;
mod idx;

pub use augment::Augment;
pub use batch::Batcher;

use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::{Error, Result};

/// Where Debian's `dataset-fashion-mnist` package installs the data set.
const FASHION_MNIST_DEBIAN: &str = "/usr/share/datasets/fashion-mnist";

/// Images with their class labels.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Pixels, `u8` of shape `(N, C, H, W)`, on the CPU.
    pub images: Tensor,
    /// One class index per image.
    pub labels: Vec<u32>,
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the data set holds no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The first `n` samples (all of them when there are fewer); shares the pixel storage.
    pub fn take(&self, n: usize) -> Result<Dataset> {
        let n = n.min(self.len());
        Ok(Dataset {
            images: self.images.narrow(0, 0, n)?,
            labels: self.labels[..n].to_vec(),
        })
    }

    /// Channels per image (`C`), 0 when `images` is not of rank 4.
    pub fn channels(&self) -> usize {
        self.chw().0
    }

    /// Image height (`H`), 0 when `images` is not of rank 4.
    pub fn height(&self) -> usize {
        self.chw().1
    }

    /// Image width (`W`), 0 when `images` is not of rank 4.
    pub fn width(&self) -> usize {
        self.chw().2
    }

    fn chw(&self) -> (usize, usize, usize) {
        match *self.images.dims() {
            [_, c, h, w] => (c, h, w),
            _ => (0, 0, 0),
        }
    }
}

/// A data set's training and test parts with its normalisation constants.
#[derive(Debug, Clone)]
pub struct DataSplit {
    /// `"cifar10"`, `"fashion-mnist"` or `"mnist"`.
    pub name: String,
    /// Training samples.
    pub train: Dataset,
    /// Test samples.
    pub test: Dataset,
    /// Number of classes.
    pub classes: usize,
    /// Per-channel mean, on the 0..1 scale.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation, on the 0..1 scale.
    pub std: Vec<f32>,
}

/// The on-disk layouts [`load`] recognises, with the files to read.
enum Format {
    CifarBinary(PathBuf),
    CifarParquet {
        train: Vec<PathBuf>,
        test: Vec<PathBuf>,
    },
    Idx(PathBuf),
}

/// Loads the data set in directory `path`, detecting its format from the files present.
pub fn load(path: &Path) -> Result<DataSplit> {
    let split = match detect(path)? {
        Format::CifarBinary(dir) => cifar::load(&dir)?,
        Format::CifarParquet { train, test } => cifar_parquet::load(&train, &test)?,
        Format::Idx(dir) => idx::load(&dir)?,
    };
    tracing::info!(
        name = %split.name,
        path = %path.display(),
        train = split.train.len(),
        test = split.test.len(),
        shape = ?(split.train.channels(), split.train.height(), split.train.width()),
        "loaded data set"
    );
    Ok(split)
}

/// The directory of Debian's Fashion-MNIST package, when its four files are installed.
pub fn fashion_mnist_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(FASHION_MNIST_DEBIAN);
    idx::has_all_files(&dir).then_some(dir)
}

fn detect(path: &Path) -> Result<Format> {
    if !path.is_dir() {
        let msg = if path.exists() {
            "is not a directory"
        } else {
            "does not exist"
        };
        return Err(Error::Format {
            path: path.to_path_buf(),
            msg: msg.into(),
        });
    }
    if cifar::is_present(path) {
        return Ok(Format::CifarBinary(path.to_path_buf()));
    }
    let nested = path.join(cifar::SUBDIR);
    if cifar::is_present(&nested) {
        return Ok(Format::CifarBinary(nested));
    }
    for dir in [path.join(cifar_parquet::SUBDIR), path.to_path_buf()] {
        if let Some((train, test)) = cifar_parquet::find_files(&dir)? {
            return Ok(Format::CifarParquet { train, test });
        }
    }
    if idx::is_present(path) {
        return Ok(Format::Idx(path.to_path_buf()));
    }
    Err(Error::Format {
        path: path.to_path_buf(),
        msg: format!(
            "no data set found; looked for CIFAR-10 binary batches ({} or {}/), \
             CIFAR-10 parquet files ({}/train-*.parquet and test-*.parquet, or directly here) \
             and MNIST IDX files ({}[.gz] and t10k-*)",
            cifar::TRAIN_FILES[0],
            cifar::SUBDIR,
            cifar_parquet::SUBDIR,
            idx::TRAIN_IMAGES,
        ),
    })
}
