//! Training must not keep memory from one step to the next: live bytes
//! (counted by a global allocator) stay flat over steps, with SGD momentum
//! and weight decay, in float and with clustering.

use candle_core::{Device, Tensor};
use idkm::alloc::live_bytes;
use idkm::cluster::{KmeansConfig, Method};
use idkm::model::{Arch, Model, Weights};
use idkm::quantize::{Clustering, QuantizePlan};
use idkm::train::{Optimizer, OptimizerKind, SgdConfig};

#[global_allocator]
static GLOBAL: idkm::alloc::Counting = idkm::alloc::Counting;

/// Live bytes after each of `steps` SGD steps on one fixed batch.
fn live_after_steps(clustering: bool, steps: usize) -> Vec<usize> {
    let model = Model::new(Arch::SmallCnn, 1, 10, 0, &Device::Cpu).unwrap();
    let config = KmeansConfig {
        bits: 2,
        tau: Some(2e-4),
        method: Method::Idkm,
        ..Default::default()
    };
    let clustering =
        clustering.then(|| Clustering::new(&model, &QuantizePlan::new(config)).unwrap());
    let weights = match &clustering {
        Some(c) => Weights::Clustered(c),
        None => Weights::Float,
    };
    let x = Tensor::randn(0f32, 1.0, (32, 1, 28, 28), &Device::Cpu).unwrap();
    let y = Tensor::from_vec((0..32u32).map(|i| i % 10).collect(), 32, &Device::Cpu).unwrap();
    let vars = model.trainable().into_iter().map(|(_, v)| v).collect();
    let sgd = OptimizerKind::Sgd(SgdConfig {
        momentum: 0.9,
        nesterov: true,
        weight_decay: 5e-4,
    });
    let mut optimizer = Optimizer::new(sgd, vars, 0.01).unwrap();
    (0..steps)
        .map(|_| {
            let logits = model.forward(&x, true, &weights).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
            optimizer.step(&loss.backward().unwrap()).unwrap();
            live_bytes()
        })
        .collect()
}

#[test]
fn live_memory_stays_flat_across_steps() {
    for clustering in [false, true] {
        let live = live_after_steps(clustering, 12);
        // One step's activations are about 4 MB; after the momentum buffers
        // exist (step 2) nothing may accumulate. A buffer that a thread
        // allocates once and keeps (the GEMM library's packing buffer, about
        // 1 MiB) can appear in a later step, when a busy machine first
        // hands that thread a product. So live bytes may rise on two of the
        // nine steps, by less than a step's activations in all; a leak
        // rises step after step.
        let growth = live[11] as i64 - live[2] as i64;
        let rises = live[2..].windows(2).filter(|p| p[1] > p[0]).count();
        assert!(
            growth < 4 << 20 && rises <= 2,
            "clustering {clustering}: live bytes grew by {growth} over 9 steps, \
             rising in {rises} of them: {live:?}"
        );
    }
}
