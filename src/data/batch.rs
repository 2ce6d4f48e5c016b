//! Mini-batches: seeded shuffling, on-the-fly augmentation, normalisation on the device.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::{Augment, Dataset};
use crate::{Error, Result};

/// Streams of the seeded generators, so that shuffling and augmentation draw independently.
const SHUFFLE_STREAM: u64 = 1;
const AUGMENT_STREAM: u64 = 2;

/// Iterates over a data set in mini-batches of normalised `f32` images and `u32` labels.
///
/// Each batch's pixels are gathered (and augmented) once into a `u8` buffer, moved to the
/// device as `u8`, and converted and normalised there: `(x / 255 - mean) / std`.
pub struct Batcher<'a> {
    data: &'a Dataset,
    batch_size: usize,
    /// Sample indices in iteration order.
    order: Vec<usize>,
    augment: Augment,
    /// Seed and epoch of the augmentation draws.
    seed: (u64, u64),
    device: Device,
    /// Mean and std as `(1, C, 1, 1)` on the device, or why batching cannot proceed
    /// (reported once, by the first `next`).
    norm: std::result::Result<(Tensor, Tensor), Option<Error>>,
    /// Index of the next batch.
    next_batch: usize,
}

impl<'a> Batcher<'a> {
    /// Batches of `batch_size` samples of `data`; the last one may be smaller.
    ///
    /// `shuffle` is `(seed, epoch)` to visit the samples in a permutation fixed by both, or
    /// `None` for the data set's order (evaluation). `augment` is drawn per image, seeded by
    /// (seed, epoch, batch index), with seed and epoch 0 when not shuffling. `mean` and `std`
    /// are per channel on the 0..1 scale. Invalid arguments (shapes, a zero batch size, a
    /// non-positive std) make the first `next` return the error.
    pub fn new(
        data: &'a Dataset,
        batch_size: usize,
        shuffle: Option<(u64, u64)>,
        augment: Augment,
        mean: &[f32],
        std: &[f32],
        device: &Device,
    ) -> Self {
        let mut order: Vec<usize> = (0..data.len()).collect();
        if let Some((seed, epoch)) = shuffle {
            order.shuffle(&mut StdRng::seed_from_u64(mix(&[
                seed,
                epoch,
                SHUFFLE_STREAM,
            ])));
        }
        Self {
            data,
            batch_size,
            order,
            augment,
            seed: shuffle.unwrap_or((0, 0)),
            device: device.clone(),
            norm: normaliser(data, batch_size, mean, std, device).map_err(Some),
            next_batch: 0,
        }
    }

    /// Starts the pass at batch `index` (continuing an interrupted pass: the
    /// order and each batch's augmentation are those of the whole pass).
    pub fn starting_at(mut self, index: usize) -> Self {
        self.next_batch = index;
        self
    }

    /// Number of batches per pass, the partial last one included.
    pub fn num_batches(&self) -> usize {
        match self.batch_size {
            0 => 0,
            b => self.order.len().div_ceil(b),
        }
    }

    /// Assembles batch `index` from the samples at `indices`.
    fn batch(
        &self,
        index: usize,
        indices: &[usize],
        mean: &Tensor,
        std: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (c, h, w) = (self.data.channels(), self.data.height(), self.data.width());
        let pixels = self.gather(index, indices, h, w)?;
        let images = Tensor::from_vec(pixels, (indices.len(), c, h, w), &Device::Cpu)?
            .to_device(&self.device)?
            .to_dtype(DType::F32)?;
        let images = ((images / 255.0)?.broadcast_sub(mean)?).broadcast_div(std)?;
        let labels: Vec<u32> = indices.iter().map(|&i| self.data.labels[i]).collect();
        let labels = Tensor::from_vec(labels, indices.len(), &self.device)?;
        Ok((images, labels))
    }

    /// Copies (and augments) the pixels of the samples at `indices` into one buffer.
    fn gather(&self, index: usize, indices: &[usize], h: usize, w: usize) -> Result<Vec<u8>> {
        let sample = self.data.channels() * h * w;
        let (storage, layout) = self.data.images.storage_and_layout();
        let Storage::Cpu(CpuStorage::U8(all)) = &*storage else {
            return Err(Error::Data("images must be u8 on the CPU".into()));
        };
        let pixels = layout
            .contiguous_offsets()
            .and_then(|(start, end)| all.get(start..end));
        let pixels = pixels.ok_or_else(|| Error::Data("images must be contiguous".into()))?;
        let mut out = vec![0u8; indices.len() * sample];
        let mut rng = StdRng::seed_from_u64(mix(&[
            self.seed.0,
            self.seed.1,
            index as u64,
            AUGMENT_STREAM,
        ]));
        for (dst, &i) in out.chunks_exact_mut(sample).zip(indices) {
            let src = pixels
                .get(i * sample..(i + 1) * sample)
                .ok_or_else(|| Error::Data(format!("sample {i} is outside the images tensor")))?;
            if self.augment.is_identity() {
                dst.copy_from_slice(src);
            } else {
                self.augment.draw(&mut rng).apply(src, dst, h, w);
            }
        }
        Ok(out)
    }
}

impl Iterator for Batcher<'_> {
    type Item = Result<(Tensor, Tensor)>;

    fn next(&mut self) -> Option<Self::Item> {
        let (mean, std) = match &mut self.norm {
            Ok((mean, std)) => (mean.clone(), std.clone()),
            Err(e) => return e.take().map(Err),
        };
        let index = self.next_batch;
        let start = index * self.batch_size;
        let indices = self
            .order
            .get(start..)?
            .get(..self.batch_size.min(self.order.len() - start))?;
        if indices.is_empty() {
            return None;
        }
        self.next_batch += 1;
        Some(self.batch(index, indices, &mean, &std))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = match &self.norm {
            Ok(_) => self.num_batches().saturating_sub(self.next_batch),
            Err(e) => usize::from(e.is_some()),
        };
        (left, Some(left))
    }
}

/// Checks that `data` can be batched and puts mean and std on the device as `(1, C, 1, 1)`.
fn normaliser(
    data: &Dataset,
    batch_size: usize,
    mean: &[f32],
    std: &[f32],
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let images = &data.images;
    let &[n, c, h, w] = images.dims() else {
        return Err(Error::Shape {
            tensor: "images".into(),
            expected: "rank 4 (N, C, H, W)".into(),
            got: format!("{:?}", images.dims()),
        });
    };
    if images.dtype() != DType::U8 || !images.device().is_cpu() {
        return Err(Error::Data(format!(
            "images must be u8 on the CPU, got {:?} on {:?}",
            images.dtype(),
            images.device().location()
        )));
    }
    if n != data.labels.len() {
        return Err(Error::Shape {
            tensor: "labels".into(),
            expected: format!("{n} labels, one per image"),
            got: data.labels.len().to_string(),
        });
    }
    if c * h * w == 0 {
        return Err(Error::Data(format!(
            "images of shape {c}x{h}x{w} are empty"
        )));
    }
    if batch_size == 0 {
        return Err(Error::Data("batch size must be at least 1".into()));
    }
    if mean.len() != c || std.len() != c {
        return Err(Error::Shape {
            tensor: "mean/std".into(),
            expected: format!("{c} values each, one per channel"),
            got: format!("{} and {}", mean.len(), std.len()),
        });
    }
    if let Some(s) = std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
        return Err(Error::Data(format!(
            "std must be positive and finite, got {s}"
        )));
    }
    let mean = Tensor::from_slice(mean, (1, c, 1, 1), device)?;
    let std = Tensor::from_slice(std, (1, c, 1, 1), device)?;
    Ok((mean, std))
}

/// Hashes `words` into one seed (SplitMix64 steps), so nearby seeds and epochs diverge.
fn mix(words: &[u64]) -> u64 {
    words.iter().fold(0x9E37_79B9_7F4A_7C15, |h, &w| {
        let mut z = (h ^ w).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}
