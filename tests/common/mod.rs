//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod local_hub;
pub mod pattern;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// `n` standard normal samples, seeded (Box-Muller).
pub fn normal(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        })
        .collect()
}

/// An m x d tensor of standard normal samples in `dtype`.
pub fn randn(m: usize, d: usize, seed: u64, dtype: DType) -> Tensor {
    Tensor::from_vec(normal(m * d, seed), (m, d), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// A flat f64 copy of a tensor.
pub fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `max |a - b| / max |b|`.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (flat(a), flat(b));
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-300);
    a.iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// A temperature that keeps the attention soft but not uniform for k
/// centroids spread over standard normal data of dimension d (squared
/// distance): about the squared spacing between neighbouring centroids.
pub fn soft_tau(k: usize, d: usize) -> f64 {
    let spacing = 3.0 / (k as f64).powf(1.0 / d as f64);
    0.5 * spacing * spacing
}

/// m vectors of dimension d drawn around k well-spread centres (a shuffled
/// grid in [-1, 1]^d, jittered), with within-group spread `spread` times the
/// centre spacing; returns the data and a temperature at which the
/// attention is soft across each group but not across the whole range.
pub fn mixture(m: usize, d: usize, k: usize, seed: u64, spread: f64) -> (Tensor, f64) {
    let per_axis = (k as f64).powf(1.0 / d as f64).ceil() as usize;
    let spacing = 2.0 / per_axis as f64;
    let noise = normal(m * d, seed);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let v: Vec<f64> = (0..m)
        .flat_map(|i| {
            let mut cell = rng.random_range(0..k);
            let noise = &noise;
            (0..d).map(move |e| {
                let coord = cell % per_axis;
                cell /= per_axis;
                -1.0 + spacing * (coord as f64 + 0.5) + spread * spacing * noise[i * d + e]
            })
        })
        .collect();
    let t = Tensor::from_vec(v, (m, d), &Device::Cpu).unwrap();
    (t, (spread * spacing).powi(2))
}

/// `||a - b||_2 / ||b||_2`.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (flat(a), flat(b));
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    (diff / norm.max(1e-300)).sqrt()
}

/// One random clustering problem for the kernel tests (tests/gpu.rs on a
/// device, tests/kernel_emu.rs on the emulator).
pub struct KernelCase {
    pub m: usize,
    pub geo: idkm::cluster::streaming::Geometry,
    pub w: Vec<f32>,
    pub c: Vec<f32>,
    pub g: Vec<f32>,
    /// A random adjoint vector (k x d).
    pub u: Vec<f64>,
}

impl KernelCase {
    /// Standard normal weights, centroids on k of the rows (spread over the
    /// data) plus jitter, a temperature at which the attention is soft but
    /// not uniform; `dead` moves centroid 0 far away (zero mass).
    pub fn new(
        m: usize,
        k: usize,
        d: usize,
        distance: idkm::cluster::Distance,
        seed: u64,
        dead: bool,
    ) -> Self {
        let w: Vec<f32> = normal(m * d, seed).iter().map(|&x| x as f32).collect();
        let jitter = normal(k * d, seed ^ 0xc0ffee);
        let mut c = Vec::with_capacity(k * d);
        for j in 0..k {
            let i = (j * m) / k;
            for e in 0..d {
                let row = if m > 0 { w[i * d + e] } else { 0.0 };
                c.push(row + 0.01 * jitter[j * d + e] as f32);
            }
        }
        if dead {
            c[..d].fill(1e3);
        }
        let sq = soft_tau(k, d);
        let tau = match distance {
            idkm::cluster::Distance::Squared => sq,
            idkm::cluster::Distance::Euclidean => sq.sqrt(),
        };
        let g: Vec<f32> = normal(m * d, seed ^ 0x9e37)
            .iter()
            .map(|&x| x as f32)
            .collect();
        let u = normal(k * d, seed ^ 0x51ab);
        Self {
            m,
            geo: idkm::cluster::streaming::Geometry {
                k,
                d,
                tau,
                distance,
            },
            w,
            c,
            g,
            u,
        }
    }

    /// `F(C)` and `1/S` from the CPU twin: the inputs of the adjoint passes.
    pub fn twin_at(&self) -> (Vec<f32>, Vec<f64>) {
        let moments = idkm::cluster::streaming::soft_assign_reduce(&self.w, &self.c, &self.geo);
        let mut f = self.c.clone();
        moments.update(&self.c, &mut f, self.geo.d);
        (f, moments.inverse_mass())
    }

    /// `m=.. k=.. d=.. Distance[ dead]`, for failure messages.
    pub fn label(&self) -> String {
        let dead = if self.c.first() == Some(&1e3) {
            " dead"
        } else {
            ""
        };
        format!(
            "m={} k={} d={} {:?}{dead}",
            self.m, self.geo.k, self.geo.d, self.geo.distance
        )
    }
}

/// `||a - b|| / ||b||` of slices (the absolute norm when `b` is 0); infinite
/// when `a` has a NaN or an infinity (an element a kernel did not write
/// keeps its NaN poison).
pub fn rel_poisoned(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths");
    if a.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// f32 values widened to f64.
pub fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// The directory of Debian's Fashion-MNIST package, which the end-to-end
/// tests need (`.ci/run` installs it).
pub fn fashion_mnist() -> std::path::PathBuf {
    idkm::data::fashion_mnist_dir().expect(
        "Fashion-MNIST is not installed: `apt-get install dataset-fashion-mnist` (.ci/run does this)",
    )
}

/// [`fashion_mnist`] as a command-line argument.
pub fn fashion_mnist_arg() -> String {
    fashion_mnist().display().to_string()
}

/// A freshly initialised small CNN (one channel, 10 classes, seed 0) and
/// its 2-bit clustering at an absolute temperature, initialised.
pub fn clustered_small_cnn() -> (idkm::model::Model, idkm::quantize::Clustering) {
    use idkm::cluster::KmeansConfig;
    use idkm::model::{Arch, Model};
    use idkm::quantize::{Clustering, QuantizePlan};
    let model = Model::new(Arch::SmallCnn, 1, 10, 0, &Device::Cpu).unwrap();
    let plan = QuantizePlan::new(KmeansConfig {
        bits: 2,
        tau: Some(1e-3),
        ..Default::default()
    });
    let clustering = Clustering::new(&model, &plan).unwrap();
    clustering.prepare(&model).unwrap();
    (model, clustering)
}
