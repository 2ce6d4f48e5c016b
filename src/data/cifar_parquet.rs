//! CIFAR-10 as the Hugging Face hub stores it (`uoft-cs/cifar10`): parquet files with an
//! `img` struct holding PNG `bytes` and an int64 `label`.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use parquet::data_type::ByteArray;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use rayon::prelude::*;

use super::cifar::{CLASSES, MEAN, SHAPE, STD};
use super::{DataSplit, Dataset};
use crate::{Error, Result};

/// The hub's configuration directory holding the parquet files.
pub(super) const SUBDIR: &str = "plain_text";

const IMAGE_BYTES: usize = SHAPE.0 * SHAPE.1 * SHAPE.2;

/// The sorted `train-*.parquet` and `test-*.parquet` files of `dir`; `None` when there are
/// none of either, an error when only one split is there.
pub(super) fn find_files(dir: &Path) -> Result<Option<(Vec<PathBuf>, Vec<PathBuf>)>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for entry in entries {
        let path = entry
            .map_err(|source| Error::Io {
                path: dir.to_path_buf(),
                source,
            })?
            .path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.ends_with(".parquet") {
            continue;
        }
        if name.starts_with("train-") {
            train.push(path);
        } else if name.starts_with("test-") {
            test.push(path);
        }
    }
    match (train.is_empty(), test.is_empty()) {
        (true, true) => Ok(None),
        (false, false) => {
            train.sort();
            test.sort();
            Ok(Some((train, test)))
        }
        (_, test_missing) => Err(Error::Format {
            path: dir.to_path_buf(),
            msg: format!(
                "holds {}-*.parquet files but no {}-*.parquet files",
                if test_missing { "train" } else { "test" },
                if test_missing { "test" } else { "train" },
            ),
        }),
    }
}

/// Reads the training and test files.
pub(super) fn load(train: &[PathBuf], test: &[PathBuf]) -> Result<DataSplit> {
    Ok(DataSplit {
        name: "cifar10".into(),
        train: read_files(train)?,
        test: read_files(test)?,
        classes: CLASSES,
        mean: MEAN.to_vec(),
        std: STD.to_vec(),
    })
}

/// Concatenates the rows of `files`, decoding the PNGs in parallel.
fn read_files(files: &[PathBuf]) -> Result<Dataset> {
    let mut labels = Vec::new();
    let mut pixels = Vec::new();
    for path in files {
        let (pngs, file_labels) = read_rows(path)?;
        let start = pixels.len();
        pixels.resize(start + pngs.len() * IMAGE_BYTES, 0u8);
        pixels[start..]
            .par_chunks_exact_mut(IMAGE_BYTES)
            .zip(pngs.par_iter())
            .enumerate()
            .try_for_each(|(i, (out, png))| {
                decode_png(png.data(), out).map_err(|msg| Error::Format {
                    path: path.clone(),
                    msg: format!("row {i}: {msg}"),
                })
            })?;
        labels.extend(file_labels);
    }
    let (c, h, w) = SHAPE;
    let images = Tensor::from_vec(pixels, (labels.len(), c, h, w), &Device::Cpu)?;
    Ok(Dataset { images, labels })
}

/// The encoded images and the labels of one parquet file.
fn read_rows(path: &Path) -> Result<(Vec<ByteArray>, Vec<u32>)> {
    let format_err = |msg: String| Error::Format {
        path: path.to_path_buf(),
        msg,
    };
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| format_err(format!("not a readable parquet file: {e}")))?;
    let (mut pngs, mut labels) = (Vec::new(), Vec::new());
    for (i, row) in reader
        .get_row_iter(None)
        .map_err(|e| format_err(e.to_string()))?
        .enumerate()
    {
        let row = row.map_err(|e| format_err(format!("row {i}: {e}")))?;
        let (png, label) = split_row(row).map_err(|msg| format_err(format!("row {i}: {msg}")))?;
        pngs.push(png);
        labels.push(label);
    }
    Ok((pngs, labels))
}

/// The PNG bytes of column `img.bytes` and the class of column `label`.
fn split_row(row: Row) -> std::result::Result<(ByteArray, u32), String> {
    let (mut png, mut label) = (None, None);
    for (name, field) in row.into_columns() {
        match (name.as_str(), field) {
            ("img", Field::Group(img)) => {
                png = img
                    .into_columns()
                    .into_iter()
                    .find_map(|(name, field)| match field {
                        Field::Bytes(bytes) if name == "bytes" => Some(bytes),
                        _ => None,
                    })
            }
            ("label", Field::Long(l)) => label = Some(l),
            ("label", Field::Int(l)) => label = Some(i64::from(l)),
            _ => {}
        }
    }
    let png =
        png.ok_or("expected a struct column `img` with a non-null binary field `bytes` (PNG)")?;
    let label = label.ok_or("expected a non-null integer column `label`")?;
    match u32::try_from(label) {
        Ok(l) if (l as usize) < CLASSES => Ok((png, l)),
        _ => Err(format!("label {label}, expected a class below {CLASSES}")),
    }
}

/// Decodes a CIFAR-10 PNG into `out`, 3x32x32 CHW.
fn decode_png(bytes: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    let (_, h, w) = SHAPE;
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(|e| format!("bad PNG: {e}"))?;
    let size = reader.output_buffer_size().ok_or("PNG too large")?;
    let mut buf = vec![0u8; size];
    let frame = reader
        .next_frame(&mut buf)
        .map_err(|e| format!("bad PNG: {e}"))?;
    if (frame.height as usize, frame.width as usize) != (h, w) {
        return Err(format!(
            "image is {}x{} (height x width), expected {h}x{w}",
            frame.height, frame.width
        ));
    }
    let channels = frame.color_type.samples();
    // Gray (1, 2 samples) is replicated to RGB; alpha (2, 4 samples) is dropped.
    let color = |c: usize| if channels >= 3 { c } else { 0 };
    for (y, line) in buf.chunks_exact(frame.line_size).take(h).enumerate() {
        for (x, px) in line.chunks_exact(channels).take(w).enumerate() {
            for c in 0..SHAPE.0 {
                out[(c * h + y) * w + x] = px[color(c)];
            }
        }
    }
    Ok(())
}
