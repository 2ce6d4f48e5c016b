//! The CPU ops of `idkm::nn` against candle's own ops: forward and every
//! gradient on random shapes (odd sizes, strides, padding, dilation, 1x1 to
//! 7x7 kernels, batch 1, chunked batches), in f64 to ~1e-12 and in f32 to
//! ~1e-5, and the running statistics of batch norm.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{normal, rel_err};
use idkm::cluster::{ClusteredWeight, KmeansConfig, Method};
use idkm::model::BatchNorm;
use idkm::nn::{conv2d, conv2d_reference, Conv2dParams};

fn tensor(dims: &[usize], seed: u64, dtype: DType) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(normal(n, seed), dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// (batch, cin, h, w, cout, kernel, stride, padding, dilation)
type ConvCase = (
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
);

const CONV_CASES: [ConvCase; 10] = [
    (1, 3, 7, 5, 4, 3, 1, 1, 1),   // batch 1, odd sizes
    (2, 5, 9, 9, 3, 3, 2, 1, 1),   // stride 2
    (3, 4, 8, 11, 6, 1, 1, 0, 1),  // 1x1
    (2, 6, 9, 7, 5, 1, 2, 0, 1),   // 1x1 stride 2 (ResNet's downsample)
    (2, 3, 19, 17, 4, 7, 2, 3, 1), // 7x7 stride 2 (ImageNet stem)
    (2, 3, 11, 10, 2, 3, 1, 2, 2), // dilation 2
    (1, 2, 9, 9, 3, 3, 3, 0, 2),   // stride 3, dilation 2, no padding
    (7, 8, 5, 5, 9, 3, 1, 1, 1),   // several images per chunk (gathered GEMM)
    (5, 16, 3, 3, 8, 3, 2, 1, 1),  // tiny maps: one chunk of all images
    (9, 4, 17, 16, 4, 3, 1, 1, 1), // one image per chunk, more chunks than threads
];

/// Output and gradients of `<conv(x, w), r>` with respect to x and w.
fn conv_step(
    f: fn(&Tensor, &Tensor, Conv2dParams) -> candle_core::Result<Tensor>,
    x: &Var,
    w: &Var,
    r: &Tensor,
    p: Conv2dParams,
) -> (Tensor, Tensor, Tensor) {
    let y = f(x.as_tensor(), w.as_tensor(), p).unwrap();
    let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    (
        y,
        grads.get(x).unwrap().clone(),
        grads.get(w).unwrap().clone(),
    )
}

#[test]
fn conv2d_matches_candle_forward_and_both_gradients() {
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
        for (i, &(n, cin, h, wd, cout, k, stride, padding, dilation)) in
            CONV_CASES.iter().enumerate()
        {
            let p = Conv2dParams {
                padding,
                stride,
                dilation,
            };
            let seed = 10 * i as u64;
            let x = Var::from_tensor(&tensor(&[n, cin, h, wd], seed, dtype)).unwrap();
            let w = Var::from_tensor(&tensor(&[cout, cin, k, k], seed + 1, dtype)).unwrap();
            let out = conv2d_reference(x.as_tensor(), w.as_tensor(), p).unwrap();
            let r = tensor(out.dims(), seed + 2, dtype);
            let (y0, dx0, dw0) = conv_step(conv2d_reference, &x, &w, &r, p);
            let (y, dx, dw) = conv_step(conv2d, &x, &w, &r, p);
            let case = format!("{dtype:?} case {i}: {:?}", CONV_CASES[i]);
            assert_eq!(y.dims(), y0.dims(), "{case}");
            assert!(
                rel_err(&y, &y0) < tol,
                "{case}: forward {}",
                rel_err(&y, &y0)
            );
            assert!(
                rel_err(&dx, &dx0) < tol,
                "{case}: input gradient {}",
                rel_err(&dx, &dx0)
            );
            assert!(
                rel_err(&dw, &dw0) < tol,
                "{case}: weight gradient {}",
                rel_err(&dw, &dw0)
            );
        }
    }
}

#[test]
fn conv2d_skips_the_gradient_of_an_input_that_needs_none() {
    let p = Conv2dParams {
        padding: 1,
        stride: 1,
        dilation: 1,
    };
    let x = tensor(&[2, 3, 6, 6], 1, DType::F64);
    let w = Var::from_tensor(&tensor(&[4, 3, 3, 3], 2, DType::F64)).unwrap();
    let grads = conv2d(&x, w.as_tensor(), p)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let want = conv2d_reference(&x, w.as_tensor(), p)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(&x).is_none());
    assert!(rel_err(grads.get(&w).unwrap(), want.get(&w).unwrap()) < 1e-12);
}

/// The weight gradient flows through the conv into a soft-clustered weight
/// (another custom op with its own backward) and on to the float weight.
#[test]
fn conv2d_weight_gradient_reaches_a_clustered_weight() {
    let p = Conv2dParams {
        padding: 1,
        stride: 2,
        dilation: 1,
    };
    let x = tensor(&[3, 8, 9, 9], 3, DType::F32);
    let w = Var::from_tensor(&(tensor(&[16, 8, 3, 3], 4, DType::F32) * 0.1).unwrap()).unwrap();
    let config = KmeansConfig {
        bits: 3,
        method: Method::Idkm,
        max_iter: 50,
        ..Default::default()
    };
    let layer = ClusteredWeight::new("conv.weight", config).unwrap();
    let soft = layer.forward(w.as_tensor()).unwrap();
    let r = tensor(&[3, 16, 5, 5], 5, DType::F32);
    let grad_w = |f: fn(&Tensor, &Tensor, Conv2dParams) -> candle_core::Result<Tensor>| {
        let loss = (f(&x, &soft, p).unwrap() * &r).unwrap().sum_all().unwrap();
        loss.backward().unwrap().get(&w).unwrap().clone()
    };
    let (got, want) = (grad_w(conv2d), grad_w(conv2d_reference));
    assert!(common::flat(&want).iter().any(|g| g.abs() > 1e-3));
    assert!(rel_err(&got, &want) < 2e-5, "{}", rel_err(&got, &want));
}

/// A batch norm layer under `name` in a fresh varmap with random affine
/// parameters and running statistics (the same for the same seed).
fn batch_norm(c: usize, seed: u64, dtype: DType) -> (BatchNorm, candle_nn::BatchNorm, Vec<Var>) {
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
    let bn = BatchNorm::new(c, 1e-5, vb.pp("bn")).unwrap();
    let data = varmap.data().lock().unwrap();
    let var = |name: &str| data[&format!("bn.{name}")].clone();
    let (gamma, beta, mean, v) = (
        var("weight"),
        var("bias"),
        var("running_mean"),
        var("running_var"),
    );
    gamma
        .set(&tensor(&[c], seed, dtype).affine(0.3, 1.0).unwrap())
        .unwrap();
    beta.set(&tensor(&[c], seed + 1, dtype)).unwrap();
    mean.set(&(tensor(&[c], seed + 2, dtype) * 0.1).unwrap())
        .unwrap();
    v.set(&tensor(&[c], seed + 3, dtype).abs().unwrap())
        .unwrap();
    let reference = candle_nn::BatchNorm::new(
        c,
        mean.as_tensor().clone(),
        v.as_tensor().clone(),
        gamma.as_tensor().clone(),
        beta.as_tensor().clone(),
        1e-5,
    )
    .unwrap();
    (bn, reference, vec![gamma, beta, mean, v])
}

#[test]
fn fused_batch_norm_matches_candle_nn_forward_gradients_and_running_statistics() {
    use candle_core::ModuleT;
    let shapes: [&[usize]; 5] = [
        &[4, 3, 5, 7],
        &[1, 5, 3, 3],
        &[7, 2, 1, 3],
        &[6, 4],
        &[3, 6, 8, 8],
    ];
    for (dtype, tol) in [(DType::F64, 1e-11), (DType::F32, 2e-5)] {
        for (i, dims) in shapes.iter().enumerate() {
            for (relu, with_residual) in
                [(false, false), (true, false), (true, true), (false, true)]
            {
                let case = format!("{dtype:?} {dims:?} relu {relu} residual {with_residual}");
                let seed = 100 * i as u64;
                let c = dims[1];
                // The input off centre, so that the statistics matter.
                let x = Var::from_tensor(&tensor(dims, seed + 4, dtype).affine(2.0, 3.0).unwrap())
                    .unwrap();
                let res = Var::from_tensor(&tensor(dims, seed + 5, dtype)).unwrap();
                let r = tensor(dims, seed + 6, dtype);
                let run = |fused: bool| {
                    let (bn, reference, vars) = batch_norm(c, seed, dtype);
                    let y = if fused {
                        match (relu, with_residual) {
                            (false, false) => bn.forward_t(x.as_tensor(), true),
                            (true, false) => bn.forward_relu(x.as_tensor(), true),
                            (true, true) => {
                                bn.forward_add_relu(x.as_tensor(), res.as_tensor(), true)
                            }
                            (false, true) => {
                                // No such layer method: the op with the identity.
                                let (gamma, beta) = (vars[0].as_tensor(), vars[1].as_tensor());
                                idkm::nn::batch_norm_train(
                                    x.as_tensor(),
                                    gamma,
                                    beta,
                                    Some(res.as_tensor()),
                                    idkm::nn::Activation::Identity,
                                    1e-5,
                                )
                                .map(|(y, _)| y)
                            }
                        }
                    } else {
                        let y = reference.forward_t(x.as_tensor(), true).unwrap();
                        let y = if with_residual {
                            (y + res.as_tensor()).unwrap()
                        } else {
                            y
                        };
                        Ok(if relu { y.relu().unwrap() } else { y })
                    }
                    .unwrap();
                    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    let g = |v: &Var| grads.get(v).cloned();
                    (y, g(&x), g(&vars[0]), g(&vars[1]), g(&res), vars)
                };
                let (y, dx, dg, db, dr, vars) = run(true);
                let (y0, dx0, dg0, db0, dr0, vars0) = run(false);
                assert!(
                    rel_err(&y, &y0) < tol,
                    "{case}: forward {}",
                    rel_err(&y, &y0)
                );
                for (name, a, b) in [("x", dx, dx0), ("gamma", dg, dg0), ("beta", db, db0)] {
                    let (a, b) = (a.unwrap(), b.unwrap());
                    assert!(
                        rel_err(&a, &b) < tol,
                        "{case}: gradient of {name} {}",
                        rel_err(&a, &b)
                    );
                }
                assert_eq!(dr.is_some(), with_residual, "{case}");
                if let (Some(a), Some(b)) = (dr, dr0) {
                    assert!(
                        rel_err(&a, &b) < tol,
                        "{case}: gradient of the residual {}",
                        rel_err(&a, &b)
                    );
                }
                // Only the layer updates the running statistics.
                if relu || !with_residual {
                    for k in 2..4 {
                        let (a, b) = (vars[k].as_tensor(), vars0[k].as_tensor());
                        assert!(
                            rel_err(a, b) < tol,
                            "{case}: running statistic {k} {}",
                            rel_err(a, b)
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn evaluation_mode_uses_the_running_statistics() {
    use candle_core::ModuleT;
    let (bn, reference, _) = batch_norm(3, 7, DType::F32);
    let x = tensor(&[2, 3, 4, 4], 8, DType::F32);
    let (y, y0) = (
        bn.forward_relu(&x, false).unwrap(),
        reference.forward_t(&x, false).unwrap().relu().unwrap(),
    );
    assert!(rel_err(&y, &y0) < 1e-6);
}
