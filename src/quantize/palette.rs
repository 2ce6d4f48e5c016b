//! The palettized model: per clustered tensor a lookup table (k x d) and
//! its indices packed at b bits; every other tensor as it is.
//!
//! File format (safetensors): `NAME.lut` (k x d, f32 or f16) and
//! `NAME.indices` (u8, `ceil(m * b / 8)` bytes) per clustered tensor `NAME`,
//! the other tensors under their own names, and metadata `idkm.format`
//! (`palettized-v1`), `idkm.arch`, `idkm.channels`, `idkm.classes`,
//! `idkm.tensors` (JSON: name -> `{shape, bits, cluster_dim}`) and
//! `idkm.clustering` (JSON: name -> the clustering configuration).
//! Indices are packed least-significant bit first: index `i` occupies bits
//! `i*b .. (i+1)*b` of the little-endian bit stream.

use crate::error::{Error, Result};
use crate::model::Arch;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The `idkm.format` metadata of a palettized model.
pub const FORMAT: &str = "palettized-v1";

/// The float type of the lookup tables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LutDType {
    /// 32-bit floats: the centroids exactly.
    #[default]
    F32,
    /// 16-bit floats: half the table size; centroids rounded.
    F16,
}

impl LutDType {
    fn dtype(self) -> DType {
        match self {
            LutDType::F32 => DType::F32,
            LutDType::F16 => DType::F16,
        }
    }
}

impl std::str::FromStr for LutDType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(LutDType::F32),
            "f16" => Ok(LutDType::F16),
            _ => Err(Error::UnknownName {
                what: "LUT type",
                got: s.to_string(),
                expected: "f32, f16".into(),
            }),
        }
    }
}

impl std::fmt::Display for LutDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LutDType::F32 => "f32",
            LutDType::F16 => "f16",
        })
    }
}

/// Packs `indices` (each `< 2^bits`) at `bits` bits each.
pub fn pack(indices: &[u32], bits: u32) -> Vec<u8> {
    let mut out = vec![0u8; (indices.len() * bits as usize).div_ceil(8)];
    for (i, &index) in indices.iter().enumerate() {
        for (bit, b) in (i * bits as usize..).zip(0..bits) {
            if index >> b & 1 == 1 {
                out[bit / 8] |= 1 << (bit % 8);
            }
        }
    }
    out
}

/// Unpacks `count` indices of `bits` bits; `None` if `bytes` is too short.
pub fn unpack(bytes: &[u8], bits: u32, count: usize) -> Option<Vec<u32>> {
    if bytes.len() < (count * bits as usize).div_ceil(8) {
        return None;
    }
    let indices = (0..count)
        .map(|i| {
            let start = i * bits as usize;
            (0..bits as usize).fold(0u32, |acc, b| {
                let bit = start + b;
                acc | (((bytes[bit / 8] >> (bit % 8)) & 1) as u32) << b
            })
        })
        .collect();
    Some(indices)
}

/// One clustered tensor in exported form.
#[derive(Debug, Clone)]
pub struct PackedTensor {
    /// Shape of the weight.
    pub shape: Vec<usize>,
    /// Bits per index.
    pub bits: u32,
    /// The lookup table, k x d.
    pub lut: Tensor,
    /// The packed indices.
    pub indices: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct PackedInfo {
    shape: Vec<usize>,
    bits: u32,
    cluster_dim: usize,
}

impl PackedTensor {
    /// Packs a hard assignment: `indices` (m, u32) into `centroids` (k x d),
    /// stored as `lut` type.
    pub fn new(
        shape: &[usize],
        bits: u32,
        indices: &Tensor,
        centroids: &Tensor,
        lut: LutDType,
    ) -> Result<Self> {
        let indices = indices.to_device(&Device::Cpu)?.to_vec1::<u32>()?;
        let lut = centroids.to_device(&Device::Cpu)?.to_dtype(lut.dtype())?;
        Ok(Self {
            shape: shape.to_vec(),
            bits,
            lut,
            indices: pack(&indices, bits),
        })
    }

    /// Its indices, unpacked, after checking that they fit the table and
    /// the shape: what is wrong otherwise, in words.
    fn indices(&self) -> std::result::Result<Vec<u32>, String> {
        let (k, d) = (self.lut.dim(0).unwrap_or(0), self.lut.dim(1).unwrap_or(0));
        let numel: usize = self.shape.iter().product();
        if self.lut.rank() != 2 || d == 0 || !numel.is_multiple_of(d) {
            return Err(format!(
                "a lookup table of shape {:?} does not fit a weight of shape {:?}",
                self.lut.dims(),
                self.shape
            ));
        }
        if !(1..=8).contains(&self.bits) || k == 0 || k > 1 << self.bits {
            return Err(format!(
                "{k} table entries do not fit {}-bit indices (1 to 2^bits entries)",
                self.bits
            ));
        }
        let count = numel / d;
        let expected = (count * self.bits as usize).div_ceil(8);
        if self.indices.len() != expected {
            return Err(format!(
                "{} bytes of packed indices, expected {expected} ({count} indices of {} bits)",
                self.indices.len(),
                self.bits
            ));
        }
        let indices = unpack(&self.indices, self.bits, count).unwrap_or_default();
        if let Some((at, i)) = indices.iter().enumerate().find(|(_, &i)| i as usize >= k) {
            return Err(format!(
                "index {i} at position {at} is past the lookup table's {k} entries"
            ));
        }
        Ok(indices)
    }

    /// The weight this tensor stands for: `lut[index]`, in f32.
    pub fn dequantize(&self, name: &str) -> Result<Tensor> {
        let indices = self
            .indices()
            .map_err(|msg| Error::Data(format!("palettized tensor `{name}`: {msg}")))?;
        let count = indices.len();
        let indices = Tensor::from_vec(indices, count, &Device::Cpu)?;
        Ok(self
            .lut
            .to_dtype(DType::F32)?
            .index_select(&indices, 0)?
            .reshape(self.shape.as_slice())?)
    }

    /// Bytes of the table and the packed indices.
    pub fn bytes(&self) -> usize {
        self.lut.elem_count() * self.lut.dtype().size_in_bytes() + self.indices.len()
    }
}

/// A palettized model.
#[derive(Debug, Clone)]
pub struct Palettized {
    /// The architecture.
    pub arch: Arch,
    /// Input channels.
    pub channels: usize,
    /// Output classes.
    pub classes: usize,
    /// Clustered tensors by weight name.
    pub packed: BTreeMap<String, PackedTensor>,
    /// All other tensors (float parameters, batch-norm statistics).
    pub dense: BTreeMap<String, Tensor>,
    /// The clustering configuration of each clustered tensor (JSON, as in
    /// `KmeansConfig::to_json`), for the record.
    pub configs: BTreeMap<String, serde_json::Value>,
}

impl Palettized {
    /// Every tensor of the model, the clustered ones dequantized: what a
    /// model loads to run.
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<_> = self
            .dense
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        for (name, p) in &self.packed {
            out.push((name.clone(), p.dequantize(name)?));
        }
        Ok(out)
    }

    /// Bytes on disk of the tensors (metadata excluded).
    pub fn bytes(&self) -> usize {
        let dense: usize = self
            .dense
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        dense + self.packed.values().map(PackedTensor::bytes).sum::<usize>()
    }

    /// Bytes of the same model with every tensor in f32.
    pub fn float_bytes(&self) -> usize {
        let dense: usize = self.dense.values().map(|t| t.elem_count() * 4).sum();
        dense
            + self
                .packed
                .values()
                .map(|p| p.shape.iter().product::<usize>() * 4)
                .sum::<usize>()
    }

    /// Writes the model atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = self.dense.clone();
        let mut info = BTreeMap::new();
        for (name, p) in &self.packed {
            tensors.insert(format!("{name}.lut"), p.lut.clone());
            let bytes = Tensor::from_vec(p.indices.clone(), p.indices.len(), &Device::Cpu)?;
            tensors.insert(format!("{name}.indices"), bytes);
            let (_, d) = p.lut.dims2()?;
            info.insert(
                name.clone(),
                PackedInfo {
                    shape: p.shape.clone(),
                    bits: p.bits,
                    cluster_dim: d,
                },
            );
        }
        let metadata = HashMap::from([
            ("idkm.format".to_string(), FORMAT.to_string()),
            ("idkm.arch".to_string(), self.arch.to_string()),
            ("idkm.channels".to_string(), self.channels.to_string()),
            ("idkm.classes".to_string(), self.classes.to_string()),
            (
                "idkm.tensors".to_string(),
                serde_json::to_string(&info).expect("serialisable"),
            ),
            (
                "idkm.clustering".to_string(),
                serde_json::to_string(&self.configs).expect("serialisable"),
            ),
        ]);
        crate::checkpoint::save(&tensors, &metadata, path)
    }

    /// Reads a model written by [`save`](Self::save).
    pub fn load(path: &Path) -> Result<Self> {
        let format_error = |msg: String| Error::Format {
            path: path.into(),
            msg,
        };
        let meta = crate::checkpoint::metadata(path)?;
        let field = |key: &str| {
            meta.get(key).ok_or_else(|| {
                format_error(format!(
                    "metadata `{key}` missing: not a palettized model written by `idkm export`"
                ))
            })
        };
        if field("idkm.format")? != FORMAT {
            return Err(format_error(format!(
                "format `{}` is not {FORMAT}",
                field("idkm.format")?
            )));
        }
        let number = |key: &str| -> Result<usize> {
            field(key)?
                .parse()
                .map_err(|_| format_error(format!("metadata `{key}` is not a number")))
        };
        let info: BTreeMap<String, PackedInfo> = serde_json::from_str(field("idkm.tensors")?)
            .map_err(|e| format_error(format!("metadata `idkm.tensors`: {e}")))?;
        let mut dense: BTreeMap<String, Tensor> =
            candle_core::safetensors::load(path, &Device::Cpu)?
                .into_iter()
                .collect();
        let mut packed = BTreeMap::new();
        for (name, i) in info {
            let mut take = |suffix: &str| {
                dense
                    .remove(&format!("{name}.{suffix}"))
                    .ok_or_else(|| format_error(format!("tensor `{name}.{suffix}` missing")))
            };
            let lut = take("lut")?;
            let indices = take("indices")?.to_vec1::<u8>()?;
            if lut.rank() != 2 || lut.dim(1)? != i.cluster_dim {
                return Err(format_error(format!(
                    "`{name}.lut` has shape {:?}, expected (k, {})",
                    lut.dims(),
                    i.cluster_dim
                )));
            }
            let tensor = PackedTensor {
                shape: i.shape,
                bits: i.bits,
                lut,
                indices,
            };
            tensor
                .indices()
                .map_err(|msg| format_error(format!("tensor `{name}`: {msg}")))?;
            packed.insert(name, tensor);
        }
        Ok(Self {
            arch: field("idkm.arch")?.parse()?,
            channels: number("idkm.channels")?,
            classes: number("idkm.classes")?,
            packed,
            dense,
            configs: match meta.get("idkm.clustering") {
                Some(text) => serde_json::from_str(text)
                    .map_err(|e| format_error(format!("metadata `idkm.clustering`: {e}")))?,
                None => BTreeMap::new(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trips_every_width() {
        for bits in 1..=8u32 {
            let indices: Vec<u32> = (0..37u32)
                .map(|i| i.wrapping_mul(2654435761).wrapping_add(i * i) % (1 << bits))
                .collect();
            let bytes = pack(&indices, bits);
            assert_eq!(bytes.len(), (37 * bits as usize).div_ceil(8));
            assert_eq!(unpack(&bytes, bits, 37).unwrap(), indices, "bits = {bits}");
            assert!(unpack(&bytes[..bytes.len() - 1], bits, 37).is_none());
        }
        // Least-significant bit first: 2-bit indices 1, 2, 3, 0 -> 0b00_11_10_01.
        assert_eq!(pack(&[1, 2, 3, 0], 2), vec![0b0011_1001]);
    }
}
