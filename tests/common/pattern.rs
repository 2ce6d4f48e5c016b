//! The closed-form weights and inputs of the PyTorch fixtures
//! (`pattern` in tests/fixtures/torch/generate.py), bit for bit: splitmix64
//! seeded by the FNV-1a hash of the tensor's name, scaled by exactly
//! rounded IEEE operations in the same order as the generator.

use candle_core::{Device, Tensor};

/// FNV-1a, 64 bits, of the bytes of `text`.
pub fn fnv1a64(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `n` values in [0, 1), 24 bits each, from splitmix64 seeded by `name`.
pub fn uniform(name: &str, n: usize) -> Vec<f64> {
    let seed = fnv1a64(name);
    (1..=n as u64)
        .map(|j| {
            let mut z = seed.wrapping_add(j.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            (z >> 40) as f64 / (1u64 << 24) as f64
        })
        .collect()
}

/// The value of the state-dict entry `name` (or of the input, `input`), as
/// f32 with PyTorch's shape.
pub fn pattern(name: &str, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = uniform(name, n)
        .into_iter()
        .map(|u| {
            let v = if name == "input" {
                2.0 * u - 1.0
            } else if name.ends_with("running_mean") || name.ends_with(".bias") {
                (u - 0.5) * 0.2
            } else if name.ends_with("running_var") {
                u + 0.5
            } else if shape.len() == 1 {
                u * 0.5 + 0.5
            } else if shape.len() == 4 {
                (2.0 * u - 1.0) * (3.0 / shape[1..].iter().product::<usize>() as f64).sqrt()
            } else {
                (2.0 * u - 1.0) * (192.0 / shape[1] as f64).sqrt()
            };
            v as f32
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}
