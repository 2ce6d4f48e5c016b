//! Where a command runs: `cpu`, `cuda` or `cuda:N`.

use crate::error::{Error, Result};

/// A device by name, validated when parsed and opened when needed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU.
    #[default]
    Cpu,
    /// The CUDA device with this ordinal.
    Cuda(usize),
}

impl DeviceSpec {
    /// Opens the device (CUDA needs a binary built with `--features cuda`).
    pub fn open(self) -> Result<candle_core::Device> {
        match self {
            DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
            DeviceSpec::Cuda(ordinal) => candle_core::Device::new_cuda(ordinal).map_err(|e| {
                Error::Model(format!(
                    "opening CUDA device {ordinal} (is this binary built with --features cuda?): {e}"
                ))
            }),
        }
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let unknown = || Error::UnknownName {
            what: "device",
            got: s.to_string(),
            expected: "cpu, cuda, cuda:N".into(),
        };
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(unknown),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(0) => f.write_str("cuda"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

crate::names::serde_by_name!(DeviceSpec);

/// The free and the total memory of `device` in bytes, where it can say
/// (a CUDA device); `None` for the CPU or when the query fails.
#[cfg(feature = "cuda")]
pub fn memory_info(device: &candle_core::Device) -> Option<(u64, u64)> {
    let candle_core::Device::Cuda(cuda) = device else {
        return None;
    };
    let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
    Some((free as u64, total as u64))
}

/// The free and the total memory of `device` in bytes, where it can say
/// (a CUDA device, in a build with `--features cuda`).
#[cfg(not(feature = "cuda"))]
pub fn memory_info(_device: &candle_core::Device) -> Option<(u64, u64)> {
    None
}

#[cfg(test)]
mod tests {
    use super::DeviceSpec;

    #[test]
    fn names_round_trip_and_bad_ones_are_refused() {
        for (name, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            assert_eq!(name.parse::<DeviceSpec>().unwrap(), spec);
            assert_eq!(spec.to_string().parse::<DeviceSpec>().unwrap(), spec);
        }
        for bad in ["gpu", "cuda:", "cuda:x", "CPU "] {
            let err = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(
                err.contains("unknown device") && err.contains("cuda:N"),
                "{err}"
            );
        }
        let json = serde_json::to_string(&DeviceSpec::Cuda(1)).unwrap();
        assert_eq!(json, "\"cuda:1\"");
        assert_eq!(
            serde_json::from_str::<DeviceSpec>(&json).unwrap(),
            DeviceSpec::Cuda(1)
        );
    }
}
