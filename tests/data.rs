//! Data loading and batching: CIFAR-10 (binary and parquet), (Fashion-)MNIST IDX, the batcher.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device, IndexOp, Tensor};
use idkm::data::{self, Augment, Batcher, Dataset};

/// A pixel value that differs between (h, w) and (w, h), between channels and between images.
fn pattern(n: usize, c: usize, h: usize, w: usize) -> u8 {
    ((n * 11 + c * 67 + h * 7 + w * 3) % 256) as u8
}

/// The CIFAR-10 images `first..first + count` as CHW bytes.
fn cifar_pixels(first: usize, count: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for n in first..first + count {
        for c in 0..3 {
            for h in 0..32 {
                for w in 0..32 {
                    out.push(pattern(n, c, h, w));
                }
            }
        }
    }
    out
}

fn cifar_label(n: usize) -> u8 {
    (n * 3 % 10) as u8
}

/// Writes batch files of 2 records each (3 for the test batch); returns nothing, the
/// training images are numbered 0..10 and the test images 100..103.
fn write_cifar_bin(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let write = |name: &str, first: usize, count: usize| -> Result<()> {
        let mut bytes = Vec::new();
        for n in first..first + count {
            bytes.push(cifar_label(n));
            bytes.extend(cifar_pixels(n, 1));
        }
        std::fs::write(dir.join(name), bytes)?;
        Ok(())
    };
    for k in 0..5 {
        write(&format!("data_batch_{}.bin", k + 1), 2 * k, 2)?;
    }
    write("test_batch.bin", 100, 3)
}

/// Checks a loaded CIFAR-10 split against the images written by the helpers.
fn check_cifar(split: &data::DataSplit) -> Result<()> {
    assert_eq!(split.name, "cifar10");
    assert_eq!(split.classes, 10);
    assert_eq!(split.mean, [0.4914, 0.4822, 0.4465]);
    assert_eq!(split.std, [0.2470, 0.2435, 0.2616]);
    assert_eq!(split.train.images.dims(), [10, 3, 32, 32]);
    assert_eq!(split.test.images.dims(), [3, 3, 32, 32]);
    assert_eq!(split.train.images.dtype(), DType::U8);
    assert_eq!(
        split.train.labels,
        (0..10).map(|n| cifar_label(n) as u32).collect::<Vec<_>>()
    );
    assert_eq!(
        split.test.labels,
        (100..103)
            .map(|n| cifar_label(n) as u32)
            .collect::<Vec<_>>()
    );
    // Chosen positions, with transposed twins, then everything.
    for (n, c, h, w) in [
        (0, 0, 1, 30),
        (0, 0, 30, 1),
        (7, 2, 5, 17),
        (7, 2, 17, 5),
        (9, 1, 31, 0),
    ] {
        let got = split.train.images.i((n, c, h, w))?.to_scalar::<u8>()?;
        assert_eq!(got, pattern(n, c, h, w), "train pixel ({n}, {c}, {h}, {w})");
    }
    assert_eq!(
        split.train.images.flatten_all()?.to_vec1::<u8>()?,
        cifar_pixels(0, 10)
    );
    assert_eq!(
        split.test.images.flatten_all()?.to_vec1::<u8>()?,
        cifar_pixels(100, 3)
    );
    Ok(())
}

#[test]
fn cifar_binary_loads_in_place_and_one_level_up() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("cifar-10-batches-bin");
    write_cifar_bin(&dir)?;
    check_cifar(&data::load(&dir)?)?;
    check_cifar(&data::load(tmp.path())?)?;
    Ok(())
}

#[test]
fn cifar_binary_rejects_truncated_and_bad_files() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_cifar_bin(tmp.path())?;
    let batch = tmp.path().join("data_batch_3.bin");
    let bytes = std::fs::read(&batch)?;
    std::fs::write(&batch, &bytes[..bytes.len() - 100])?;
    let msg = data::load(tmp.path()).unwrap_err().to_string();
    assert!(msg.contains("data_batch_3.bin"), "{msg}");
    assert!(
        msg.contains(&(2 * 3073 - 100).to_string()) && msg.contains("3073"),
        "{msg}"
    );

    let mut bad_label = bytes.clone();
    bad_label[3073] = 10;
    std::fs::write(&batch, bad_label)?;
    let msg = data::load(tmp.path()).unwrap_err().to_string();
    assert!(
        msg.contains("data_batch_3.bin") && msg.contains("record 1 has label 10"),
        "{msg}"
    );

    std::fs::write(&batch, &bytes)?;
    std::fs::remove_file(tmp.path().join("test_batch.bin"))?;
    let msg = data::load(tmp.path()).unwrap_err().to_string();
    assert!(msg.contains("test_batch.bin"), "{msg}");
    Ok(())
}

#[test]
fn unknown_directory_lists_what_was_looked_for() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    std::fs::write(tmp.path().join("readme.txt"), "nothing here")?;
    let msg = data::load(tmp.path()).unwrap_err().to_string();
    for expected in [
        "data_batch_1.bin",
        "cifar-10-batches-bin",
        "parquet",
        "train-images-idx3-ubyte",
    ] {
        assert!(msg.contains(expected), "{msg}");
    }
    let msg = data::load(&tmp.path().join("missing"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("missing") && msg.contains("does not exist"),
        "{msg}"
    );
    Ok(())
}

mod parquet_files {
    use super::*;
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    /// The hub's schema as written by hand, with a required group and label.
    const REQUIRED: &str =
        "message schema { required group img { optional binary bytes; optional binary path (UTF8); } required int64 label; }";
    /// The schema as arrow writes it (everything nullable), like the hub's files.
    const OPTIONAL: &str =
        "message schema { optional group img { optional binary bytes; optional binary path (UTF8); } optional int64 label; }";

    fn png(n: usize) -> Result<Vec<u8>> {
        let mut rgb = Vec::new();
        for h in 0..32 {
            for w in 0..32 {
                rgb.extend((0..3).map(|c| pattern(n, c, h, w)));
            }
        }
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, 32, 32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&rgb)?;
        writer.finish()?;
        Ok(out)
    }

    /// Writes images `first..first + count`, with null paths, in one row group.
    fn write(path: &Path, schema: &str, first: usize, count: usize) -> Result<()> {
        let optional = schema == OPTIONAL;
        let schema = Arc::new(parse_message_type(schema)?);
        let props = Arc::new(
            WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .build(),
        );
        let mut writer = SerializedFileWriter::new(std::fs::File::create(path)?, schema, props)?;
        let mut group = writer.next_row_group()?;
        let pngs = (first..first + count)
            .map(|n| png(n).map(ByteArray::from))
            .collect::<Result<Vec<_>>>()?;
        let labels: Vec<i64> = (first..first + count)
            .map(|n| i64::from(cifar_label(n)))
            .collect();
        let leaf_def = if optional { 2 } else { 1 };

        let mut column = group.next_column()?.expect("img.bytes");
        column
            .typed::<ByteArrayType>()
            .write_batch(&pngs, Some(&vec![leaf_def; count]), None)?;
        column.close()?;
        let mut column = group.next_column()?.expect("img.path");
        column
            .typed::<ByteArrayType>()
            .write_batch(&[], Some(&vec![leaf_def - 1; count]), None)?;
        column.close()?;
        let mut column = group.next_column()?.expect("label");
        let label_def = vec![1; count];
        column.typed::<Int64Type>().write_batch(
            &labels,
            optional.then_some(&label_def[..]),
            None,
        )?;
        column.close()?;
        group.close()?;
        writer.close()?;
        Ok(())
    }

    #[test]
    fn cifar_parquet_in_hub_layout() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("plain_text");
        std::fs::create_dir(&dir)?;
        write(&dir.join("train-00000-of-00002.parquet"), REQUIRED, 0, 6)?;
        write(&dir.join("train-00001-of-00002.parquet"), REQUIRED, 6, 4)?;
        write(&dir.join("test-00000-of-00001.parquet"), REQUIRED, 100, 3)?;
        check_cifar(&data::load(tmp.path())?)?;
        Ok(())
    }

    #[test]
    fn cifar_parquet_nullable_schema_directly_in_dir() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        write(
            &tmp.path().join("train-00000-of-00001.parquet"),
            OPTIONAL,
            0,
            10,
        )?;
        write(
            &tmp.path().join("test-00000-of-00001.parquet"),
            OPTIONAL,
            100,
            3,
        )?;
        check_cifar(&data::load(tmp.path())?)?;
        Ok(())
    }

    #[test]
    fn cifar_parquet_errors_name_the_file() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        write(
            &tmp.path().join("train-00000-of-00001.parquet"),
            REQUIRED,
            0,
            2,
        )?;
        let msg = data::load(tmp.path()).unwrap_err().to_string();
        assert!(msg.contains("no test-*.parquet"), "{msg}");

        std::fs::write(
            tmp.path().join("test-00000-of-00001.parquet"),
            b"not parquet",
        )?;
        let msg = data::load(tmp.path()).unwrap_err().to_string();
        assert!(
            msg.contains("test-00000-of-00001.parquet") && msg.contains("parquet"),
            "{msg}"
        );
        Ok(())
    }
}

mod idx_files {
    use super::*;

    const ROWS: usize = 7;
    const COLS: usize = 5;

    fn images_file(magic: u32, first: usize, count: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for v in [magic, count as u32, ROWS as u32, COLS as u32] {
            out.extend(v.to_be_bytes());
        }
        for n in first..first + count {
            for h in 0..ROWS {
                for w in 0..COLS {
                    out.push(pattern(n, 0, h, w));
                }
            }
        }
        out
    }

    fn labels_file(first: usize, count: usize) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(2049u32.to_be_bytes());
        out.extend((count as u32).to_be_bytes());
        out.extend((first..first + count).map(cifar_label));
        out
    }

    /// Writes 6 training and 4 test images, gzipped or not.
    fn write_all(dir: &Path, gz: bool) -> Result<()> {
        let files = [
            ("train-images-idx3-ubyte", images_file(2051, 0, 6)),
            ("train-labels-idx1-ubyte", labels_file(0, 6)),
            ("t10k-images-idx3-ubyte", images_file(2051, 50, 4)),
            ("t10k-labels-idx1-ubyte", labels_file(50, 4)),
        ];
        for (name, bytes) in files {
            write_file(dir, name, &bytes, gz)?;
        }
        Ok(())
    }

    fn write_file(dir: &Path, name: &str, bytes: &[u8], gz: bool) -> Result<()> {
        if gz {
            let file = std::fs::File::create(dir.join(format!("{name}.gz")))?;
            let mut encoder = flate2::write::GzEncoder::new(file, flate2::Compression::default());
            encoder.write_all(bytes)?;
            encoder.finish()?;
        } else {
            std::fs::write(dir.join(name), bytes)?;
        }
        Ok(())
    }

    #[test]
    fn plain_and_gzipped_load_identically() -> Result<()> {
        let plain = tempfile::Builder::new().prefix("digits").tempdir()?;
        let gz = tempfile::Builder::new().prefix("Fashion-data").tempdir()?;
        write_all(plain.path(), false)?;
        write_all(gz.path(), true)?;
        let a = data::load(plain.path())?;
        let b = data::load(gz.path())?;
        assert_eq!(
            (a.name.as_str(), a.mean.as_slice(), a.std.as_slice()),
            ("mnist", &[0.1307][..], &[0.3081][..])
        );
        assert_eq!(
            (b.name.as_str(), b.mean.as_slice(), b.std.as_slice()),
            ("fashion-mnist", &[0.2860][..], &[0.3530][..])
        );
        for split in [&a, &b] {
            assert_eq!(split.classes, 10);
            assert_eq!(split.train.images.dims(), [6, 1, ROWS, COLS]);
            assert_eq!(split.test.images.dims(), [4, 1, ROWS, COLS]);
            assert_eq!(
                split.train.labels,
                (0..6).map(|n| cifar_label(n) as u32).collect::<Vec<_>>()
            );
            assert_eq!(
                split.test.labels,
                (50..54).map(|n| cifar_label(n) as u32).collect::<Vec<_>>()
            );
            for (n, h, w) in [(0, 1, 4), (3, 4, 1), (5, 6, 0)] {
                assert_eq!(
                    split.train.images.i((n, 0, h, w))?.to_scalar::<u8>()?,
                    pattern(n, 0, h, w)
                );
            }
            assert_eq!(
                split.test.images.i((2, 0, 6, 4))?.to_scalar::<u8>()?,
                pattern(52, 0, 6, 4)
            );
        }
        let flat = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<u8>());
        assert_eq!(flat(&a.train.images)?, flat(&b.train.images)?);
        assert_eq!(flat(&a.test.images)?, flat(&b.test.images)?);
        Ok(())
    }

    #[test]
    fn bad_magic_and_count_mismatch_are_reported() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        write_all(tmp.path(), false)?;
        write_file(
            tmp.path(),
            "t10k-images-idx3-ubyte",
            &images_file(2049, 50, 4),
            false,
        )?;
        let msg = data::load(tmp.path()).unwrap_err().to_string();
        assert!(
            msg.contains("t10k-images-idx3-ubyte") && msg.contains("magic number 2049"),
            "{msg}"
        );
        assert!(msg.contains("expected 2051"), "{msg}");

        write_all(tmp.path(), false)?;
        write_file(
            tmp.path(),
            "train-labels-idx1-ubyte",
            &labels_file(0, 5),
            false,
        )?;
        let msg = data::load(tmp.path()).unwrap_err().to_string();
        assert!(
            msg.contains("train-labels-idx1-ubyte") && msg.contains("5 labels"),
            "{msg}"
        );
        assert!(
            msg.contains("train-images-idx3-ubyte") && msg.contains("6 images"),
            "{msg}"
        );

        write_all(tmp.path(), false)?;
        let mut images = images_file(2051, 0, 6);
        images.pop();
        write_file(tmp.path(), "train-images-idx3-ubyte", &images, false)?;
        let msg = data::load(tmp.path()).unwrap_err().to_string();
        assert!(
            msg.contains("train-images-idx3-ubyte") && msg.contains("does not match its header"),
            "{msg}"
        );

        write_all(tmp.path(), false)?;
        let mut labels = labels_file(0, 6);
        labels[10] = 12;
        write_file(tmp.path(), "train-labels-idx1-ubyte", &labels, false)?;
        let msg = data::load(tmp.path()).unwrap_err().to_string();
        assert!(msg.contains("label 2 is 12"), "{msg}");
        Ok(())
    }

    #[test]
    fn debian_fashion_mnist() -> Result<()> {
        let Some(dir) = data::fashion_mnist_dir() else {
            println!(
                "skipped: Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
            );
            return Ok(());
        };
        let start = std::time::Instant::now();
        let split = data::load(&dir)?;
        println!(
            "loaded Fashion-MNIST from {} in {:.2?}",
            dir.display(),
            start.elapsed()
        );
        assert_eq!(split.name, "fashion-mnist");
        assert_eq!(split.train.images.dims(), [60000, 1, 28, 28]);
        assert_eq!(split.test.images.dims(), [10000, 1, 28, 28]);
        assert_eq!((split.train.len(), split.test.len()), (60000, 10000));
        // The classes are balanced: 6000 training and 1000 test images each.
        for (set, per_class) in [(&split.train, 6000), (&split.test, 1000)] {
            let mut counts = [0usize; 10];
            for &l in &set.labels {
                counts[l as usize] += 1;
            }
            assert_eq!(counts, [per_class; 10]);
        }
        Ok(())
    }
}

mod batching {
    use super::*;

    /// `n` images of shape (c, h, w) given by `pixel(n, c, h, w)`, labelled by index mod 10.
    fn dataset(
        n: usize,
        (c, h, w): (usize, usize, usize),
        pixel: impl Fn(usize, usize, usize, usize) -> u8,
    ) -> Result<Dataset> {
        let mut bytes = Vec::new();
        for i in 0..n {
            for ci in 0..c {
                for hi in 0..h {
                    for wi in 0..w {
                        bytes.push(pixel(i, ci, hi, wi));
                    }
                }
            }
        }
        let images = Tensor::from_vec(bytes, (n, c, h, w), &Device::Cpu)?;
        Ok(Dataset {
            images,
            labels: (0..n as u32).map(|i| i % 10).collect(),
        })
    }

    fn batches(b: Batcher) -> Result<Vec<(Tensor, Tensor)>> {
        Ok(b.collect::<idkm::Result<Vec<_>>>()?)
    }

    /// The bytes behind normalised images (exact: pixel values are 1/255/std apart).
    fn recover(images: &Tensor, mean: f32, std: f32) -> Result<Vec<u8>> {
        let v = images.flatten_all()?.to_vec1::<f32>()?;
        Ok(v.iter()
            .map(|x| ((x * std + mean) * 255.0).round() as u8)
            .collect())
    }

    /// The first pixel of each sample identifies it (pixel value = sample index).
    fn order(b: Batcher) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for (images, labels) in batches(b)? {
            let ids = recover(&images.i((.., 0, 0, 0))?, 0.0, 1.0)?;
            let labels = labels.to_vec1::<u32>()?;
            for (&id, &label) in ids.iter().zip(&labels) {
                assert_eq!(label, u32::from(id) % 10, "label travels with its image");
            }
            out.extend(ids.iter().map(|&i| u32::from(i)));
        }
        Ok(out)
    }

    #[test]
    fn shuffled_epochs_cover_every_sample_once() -> Result<()> {
        let data = dataset(23, (2, 3, 3), |n, _, _, _| n as u8)?;
        let cpu = Device::Cpu;
        let make = |shuffle| {
            Batcher::new(
                &data,
                5,
                shuffle,
                Augment::none(),
                &[0.0, 0.0],
                &[1.0, 1.0],
                &cpu,
            )
        };
        let b = make(Some((42, 0)));
        assert_eq!(b.num_batches(), 5);
        let sizes: Vec<usize> = batches(make(Some((42, 0))))?
            .iter()
            .map(|(x, _)| x.dims()[0])
            .collect();
        assert_eq!(sizes, [5, 5, 5, 5, 3]);
        let (x, y) = batches(make(Some((42, 0))))?.remove(0);
        assert_eq!(
            (x.dims(), x.dtype(), y.dims(), y.dtype()),
            (&[5, 2, 3, 3][..], DType::F32, &[5][..], DType::U32)
        );

        let epoch0 = order(make(Some((42, 0))))?;
        let mut sorted = epoch0.clone();
        sorted.sort();
        assert_eq!(sorted, (0..23).collect::<Vec<_>>());
        assert_ne!(epoch0, sorted, "shuffled");
        assert_eq!(
            order(make(Some((42, 0))))?,
            epoch0,
            "same seed and epoch, same order"
        );
        assert_ne!(
            order(make(Some((42, 1))))?,
            epoch0,
            "another epoch, another order"
        );
        assert_ne!(
            order(make(Some((43, 0))))?,
            epoch0,
            "another seed, another order"
        );
        assert_eq!(
            order(make(None))?,
            sorted,
            "no shuffle keeps the data set order"
        );
        Ok(())
    }

    #[test]
    fn normalisation_is_per_channel() -> Result<()> {
        let values = [0u8, 128, 255];
        let data = dataset(2, (3, 2, 2), |_, c, _, _| values[c])?;
        let (mean, std) = ([0.4914f32, 0.4822, 0.4465], [0.2470f32, 0.2435, 0.2616]);
        let (x, _) = batches(Batcher::new(
            &data,
            2,
            None,
            Augment::none(),
            &mean,
            &std,
            &Device::Cpu,
        ))?
        .remove(0);
        for c in 0..3 {
            let expected = (f32::from(values[c]) / 255.0 - mean[c]) / std[c];
            for v in x.i((.., c))?.flatten_all()?.to_vec1::<f32>()? {
                assert!(
                    (v - expected).abs() < 1e-6,
                    "channel {c}: {v} vs {expected}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn flip_mirrors_about_half_the_images() -> Result<()> {
        let (h, w) = (3, 4);
        let data = dataset(64, (1, h, w), |_, _, hi, wi| (1 + hi * w + wi) as u8)?;
        let original: Vec<u8> = (0..h * w).map(|i| 1 + i as u8).collect();
        let mirrored: Vec<u8> = (0..h)
            .flat_map(|hi| (0..w).rev().map(move |wi| (1 + hi * w + wi) as u8))
            .collect();
        let augment = Augment {
            pad_crop: 0,
            hflip: true,
        };
        let (x, _) = batches(Batcher::new(
            &data,
            64,
            Some((1, 0)),
            augment,
            &[0.5],
            &[0.25],
            &Device::Cpu,
        ))?
        .remove(0);
        let bytes = recover(&x, 0.5, 0.25)?;
        let flipped = bytes
            .chunks(h * w)
            .map(|img| {
                assert!(img == original || img == mirrored, "{img:?}");
                img == mirrored
            })
            .filter(|&f| f)
            .count();
        assert!((16..=48).contains(&flipped), "{flipped} of 64 flipped");
        Ok(())
    }

    #[test]
    fn crop_shifts_within_the_padding() -> Result<()> {
        let (h, w, pad) = (8usize, 8usize, 4isize);
        let data = dataset(64, (1, h, w), |_, _, hi, wi| (1 + hi * w + wi) as u8)?;
        let shifted = |dy: isize, dx: isize| -> Vec<u8> {
            let at = |y: isize, x: isize| {
                let (sy, sx) = (y + dy, x + dx);
                if (0..h as isize).contains(&sy) && (0..w as isize).contains(&sx) {
                    (1 + sy as usize * w + sx as usize) as u8
                } else {
                    0
                }
            };
            (0..h as isize)
                .flat_map(|y| (0..w as isize).map(move |x| at(y, x)))
                .collect()
        };
        let (mean, std) = (0.2860f32, 0.3530f32);
        let augment = Augment {
            pad_crop: pad as usize,
            hflip: false,
        };
        let run = |epoch| {
            Batcher::new(
                &data,
                20,
                Some((9, epoch)),
                augment,
                &[mean],
                &[std],
                &Device::Cpu,
            )
        };
        let mut shifts = HashSet::new();
        let mut padded = 0;
        for (x, _) in batches(run(0))? {
            let values = x.flatten_all()?.to_vec1::<f32>()?;
            for (img, raw) in recover(&x, mean, std)?
                .chunks(h * w)
                .zip(values.chunks(h * w))
            {
                let found = (-pad..=pad)
                    .flat_map(|dy| (-pad..=pad).map(move |dx| (dy, dx)))
                    .find(|&(dy, dx)| shifted(dy, dx) == img);
                let (dy, dx) =
                    found.unwrap_or_else(|| panic!("no crop of the padded image gives {img:?}"));
                shifts.insert((dy, dx));
                // The corner pixel (value 1) moves by the shift; padding is (0 - mean) / std.
                if dy <= 0 && dx <= 0 {
                    assert_eq!(img[(-dy) as usize * w + (-dx) as usize], 1);
                }
                if (dy, dx) != (0, 0) {
                    padded += 1;
                    let zero = raw[img.iter().position(|&v| v == 0).unwrap_or_default()];
                    assert!((zero - (0.0 - mean) / std).abs() < 1e-6, "{zero}");
                }
            }
        }
        assert!(
            shifts.len() > 20,
            "only {} distinct shifts: {shifts:?}",
            shifts.len()
        );
        assert!(padded > 0);

        let first = |epoch| -> Result<Vec<f32>> {
            Ok(batches(run(epoch))?.remove(0).0.flatten_all()?.to_vec1()?)
        };
        assert_eq!(first(0)?, first(0)?, "augmentation is reproducible");
        assert_ne!(first(0)?, first(1)?, "and changes with the epoch");
        Ok(())
    }

    #[test]
    fn invalid_requests_fail_on_first_batch() -> Result<()> {
        let data = dataset(4, (1, 2, 2), |_, _, _, _| 0)?;
        let cpu = Device::Cpu;
        let mut b = Batcher::new(&data, 0, None, Augment::none(), &[0.0], &[1.0], &cpu);
        assert!(b.next().is_some_and(|r| r.is_err()));
        assert!(b.next().is_none());
        let mut b = Batcher::new(
            &data,
            2,
            None,
            Augment::none(),
            &[0.0, 0.0],
            &[1.0, 1.0],
            &cpu,
        );
        let msg = b
            .next()
            .map(|r| r.map(|_| ()).unwrap_err().to_string())
            .unwrap_or_default();
        assert!(msg.contains("one per channel"), "{msg}");
        let mut b = Batcher::new(&data, 2, None, Augment::none(), &[0.0], &[0.0], &cpu);
        assert!(b.next().is_some_and(|r| r.is_err()));
        let wrong = Dataset {
            images: data.images.clone(),
            labels: vec![0; 3],
        };
        assert!(
            Batcher::new(&wrong, 2, None, Augment::none(), &[0.0], &[1.0], &cpu)
                .next()
                .is_some_and(|r| r.is_err())
        );
        Ok(())
    }

    #[test]
    fn take_and_accessors() -> Result<()> {
        let data = dataset(5, (3, 4, 6), |n, _, _, _| n as u8)?;
        assert_eq!(
            (data.len(), data.channels(), data.height(), data.width()),
            (5, 3, 4, 6)
        );
        let head = data.take(2)?;
        assert_eq!((head.len(), head.images.dims()), (2, &[2, 3, 4, 6][..]));
        assert!(!head.is_empty() && data.take(0)?.is_empty());
        assert_eq!(data.take(99)?.len(), 5);
        // A narrowed view batches from the right rows.
        let tail = Dataset {
            images: data.images.narrow(0, 3, 2)?,
            labels: vec![3, 4],
        };
        let ids = order(Batcher::new(
            &tail,
            2,
            None,
            Augment::none(),
            &[0.0; 3],
            &[1.0; 3],
            &Device::Cpu,
        ))?;
        assert_eq!(ids, [3, 4]);
        Ok(())
    }
}
