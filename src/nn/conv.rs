//! 2-D convolution on the CPU as im2col + GEMM, with its own backward.
//!
//! The batch is cut into chunks of `nb` images whose column matrix stays
//! under [`COLUMN_BUDGET`] elements, and the chunks are spread over rayon's
//! threads (or, with fewer chunks than threads, each GEMM is):
//!
//! - forward: `Y = W · im2col(X)` per chunk;
//! - input gradient: `dX = col2im(W^T · dY)`;
//! - weight gradient: `dW^T = Σ im2col(X) · dY^T` over the chunks, one
//!   accumulator per thread, summed in a fixed order and transposed.
//!
//! candle's `conv2d` (its direct `conv_transpose2d` and batch-as-channels
//! `conv2d` in the backward) is the reference: [`conv2d_reference`].

use super::gemm::{matmul, Mat, MatMut};
use super::im2col::{col2im, im2col, ConvGeometry};
use super::{cpu_data, Float};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Most elements of one chunk's column matrix (4 MiB in f32); a single
/// image larger than that is one chunk.
const COLUMN_BUDGET: usize = 1 << 20;

/// Output pixels a chunk gathers at least (when the budget allows), so that
/// the GEMMs of small feature maps are not too thin.
const MIN_CHUNK_PIXELS: usize = 256;

/// Parameters of a 2-D convolution with one group, as candle's `conv2d`
/// takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dParams {
    /// Zero padding on every side.
    pub padding: usize,
    /// Stride along both axes.
    pub stride: usize,
    /// Dilation along both axes.
    pub dilation: usize,
}

impl Conv2dParams {
    /// The geometry of convolving `x` with `w`, checked.
    fn geometry(&self, x: &Shape, w: &Shape) -> Result<ConvGeometry> {
        let (batch, cin, h, w_) = x.dims4()?;
        let (cout, kcin, kh, kw) = w.dims4()?;
        if kcin != cin {
            bail!("conv2d: input has {cin} channels, the kernel {kcin} ({x:?} * {w:?})")
        }
        if self.stride == 0 || self.dilation == 0 {
            bail!("conv2d: stride and dilation must be positive ({self:?})")
        }
        if kh == 0
            || kw == 0
            || h + 2 * self.padding < self.dilation * (kh - 1) + 1
            || w_ + 2 * self.padding < self.dilation * (kw - 1) + 1
        {
            bail!("conv2d: kernel {w:?} does not fit the padded input {x:?} ({self:?})")
        }
        let p = *self;
        Ok(ConvGeometry {
            batch,
            cin,
            h,
            w: w_,
            cout,
            kh,
            kw,
            stride: p.stride,
            padding: p.padding,
            dilation: p.dilation,
        })
    }
}

/// Convolves `x` (N, C, H, W) with `w` (C_out, C, KH, KW). On the CPU in f32
/// and f64 this is the [`Conv2d`] op; on other devices and dtypes candle's
/// own `conv2d`.
pub fn conv2d(x: &Tensor, w: &Tensor, params: Conv2dParams) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.dtype() == w.dtype()
    {
        x.contiguous()?.apply_op2(&w.contiguous()?, Conv2d(params))
    } else {
        conv2d_reference(x, w, params)
    }
}

/// candle's `conv2d` and its backward: the reference of [`Conv2d`].
pub fn conv2d_reference(x: &Tensor, w: &Tensor, params: Conv2dParams) -> Result<Tensor> {
    x.conv2d(w, params.padding, params.stride, params.dilation, 1)
}

/// How a batch is cut into chunks and the chunks into one group per thread.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Images per chunk.
    nb: usize,
    /// Images per group (a multiple of `nb`, the last group may be short).
    per_group: usize,
    /// Whether each GEMM is split over the threads (fewer chunks than threads).
    parallel_gemm: bool,
}

impl Plan {
    fn new(geo: &ConvGeometry) -> Self {
        Self::for_threads(geo, rayon::current_num_threads())
    }

    fn for_threads(geo: &ConvGeometry, threads: usize) -> Self {
        let threads = threads.max(1);
        let pixels = geo.out_plane();
        let by_budget = (COLUMN_BUDGET / (geo.taps() * pixels).max(1)).max(1);
        let per_thread = geo.batch.div_ceil(threads).max(1);
        let widest = MIN_CHUNK_PIXELS
            .div_ceil(pixels)
            .min(by_budget)
            .min(per_thread)
            .max(1);
        // Chunks of equal size that fill each thread's share: 16 images a
        // thread at most 14 a chunk are two chunks of 8, not 14 + 2 (with
        // the last thread left 4 of 32 images).
        let nb = per_thread.div_ceil(per_thread.div_ceil(widest));
        let chunks = geo.batch.div_ceil(nb);
        if chunks >= threads {
            Plan {
                nb,
                per_group: chunks.div_ceil(threads) * nb,
                parallel_gemm: false,
            }
        } else {
            Plan {
                nb,
                per_group: geo.batch.max(1),
                parallel_gemm: true,
            }
        }
    }
}

/// Copies the output gradient of a chunk, `nb` images of `cout x P`, into
/// the GEMM layout `cout x nb * P`.
fn gather_chunk<T: Copy>(geo: &ConvGeometry, nb: usize, images: &[T], out: &mut [T]) {
    let (p, width) = (geo.out_plane(), nb * geo.out_plane());
    for (b, image) in images.chunks_exact(geo.out_image()).enumerate() {
        for (co, plane) in image.chunks_exact(p).enumerate() {
            out[co * width + b * p..][..p].copy_from_slice(plane);
        }
    }
}

/// The inverse of [`gather_chunk`].
fn scatter_chunk<T: Copy>(geo: &ConvGeometry, nb: usize, chunk: &[T], images: &mut [T]) {
    let (p, width) = (geo.out_plane(), nb * geo.out_plane());
    for (b, image) in images.chunks_exact_mut(geo.out_image()).enumerate() {
        for (co, plane) in image.chunks_exact_mut(p).enumerate() {
            plane.copy_from_slice(&chunk[co * width + b * p..][..p]);
        }
    }
}

/// One group's working buffers. The calling thread allocates them, so
/// that they come from (and go back to) its allocator arena: glibc keeps
/// what rayon's workers free in their own arenas, which raised the resident
/// set of a ResNet18-CIFAR step by about 60 MiB.
struct Scratch<T> {
    /// The column matrix of a chunk, `taps x nb * P`.
    cols: Vec<T>,
    /// A chunk's output (gradient) in the GEMM layout `cout x nb * P`
    /// (empty with one image per chunk: the image is that matrix).
    staging: Vec<T>,
    /// The weight gradient's partial sum over the group, transposed
    /// (`taps x cout`, backward only): with `taps` as the rows, the GEMM
    /// packs the column matrix along its contiguous axis, which made the
    /// weight gradient of a 64-channel 3x3 convolution at 32x32 about 2.7x
    /// faster than accumulating `cout x taps`.
    dw_t: Vec<T>,
}

impl<T: Float> Scratch<T> {
    fn for_groups(geo: &ConvGeometry, plan: &Plan, groups: usize, dw: bool) -> Vec<Self> {
        let width = plan.nb * geo.out_plane();
        let staging = if plan.nb > 1 { geo.cout * width } else { 0 };
        let dw = if dw { geo.cout * geo.taps() } else { 0 };
        (0..groups)
            .map(|_| Self {
                cols: vec![T::zero(); geo.taps() * width],
                staging: vec![T::zero(); staging],
                dw_t: vec![T::zero(); dw],
            })
            .collect()
    }
}

/// The forward pass: `y` of `(batch, cout, out_h, out_w)`.
fn forward<T: Float>(geo: &ConvGeometry, x: &[T], w: &[T]) -> Vec<T> {
    let plan = Plan::new(geo);
    let (taps, cout, pixels) = (geo.taps(), geo.cout, geo.out_plane());
    let mut y = vec![T::zero(); geo.batch * geo.out_image()];
    let groups: Vec<_> = x
        .chunks(plan.per_group * geo.in_image())
        .zip(y.chunks_mut(plan.per_group * geo.out_image()))
        .collect();
    let mut scratch = Scratch::for_groups(geo, &plan, groups.len(), false);
    groups
        .into_par_iter()
        .zip(&mut scratch)
        .for_each(|((x, y), scratch)| {
            for (x, y) in x
                .chunks(plan.nb * geo.in_image())
                .zip(y.chunks_mut(plan.nb * geo.out_image()))
            {
                let nb = x.len() / geo.in_image();
                let width = nb * pixels;
                let cols = &mut scratch.cols[..taps * width];
                im2col(geo, nb, x, cols);
                let (w, cols) = (Mat::rows(w, cout, taps), Mat::rows(cols, taps, width));
                if nb == 1 {
                    matmul(
                        MatMut::rows(y, cout, width),
                        false,
                        w,
                        cols,
                        plan.parallel_gemm,
                    );
                } else {
                    let product = &mut scratch.staging[..cout * width];
                    matmul(
                        MatMut::rows(product, cout, width),
                        false,
                        w,
                        cols,
                        plan.parallel_gemm,
                    );
                    scatter_chunk(geo, nb, product, y);
                }
            }
        });
    y
}

/// The backward pass: the input gradient (if `need_dx`) and the weight
/// gradient (if `need_dw`) from the output gradient `dy`.
fn backward<T: Float>(
    geo: &ConvGeometry,
    x: &[T],
    w: &[T],
    dy: &[T],
    need_dx: bool,
    need_dw: bool,
) -> (Option<Vec<T>>, Option<Vec<T>>) {
    let plan = Plan::new(geo);
    let (taps, cout, pixels) = (geo.taps(), geo.cout, geo.out_plane());
    let (in_image, out_image) = (geo.in_image(), geo.out_image());
    let mut dx = need_dx.then(|| vec![T::zero(); geo.batch * in_image]);
    let dx_groups: Vec<Option<&mut [T]>> = match dx.as_mut() {
        Some(dx) => dx.chunks_mut(plan.per_group * in_image).map(Some).collect(),
        None => x.chunks(plan.per_group * in_image).map(|_| None).collect(),
    };
    let groups: Vec<_> = x
        .chunks(plan.per_group * in_image)
        .zip(dy.chunks(plan.per_group * out_image))
        .zip(dx_groups)
        .map(|((x, dy), dx)| (x, dy, dx))
        .collect();
    let mut scratch = Scratch::for_groups(geo, &plan, groups.len(), need_dw);
    groups
        .into_par_iter()
        .zip(&mut scratch)
        .for_each(|((x, dy, mut dx), scratch)| {
            let chunks = x
                .chunks(plan.nb * in_image)
                .zip(dy.chunks(plan.nb * out_image));
            for (i, (x, dy)) in chunks.enumerate() {
                let nb = x.len() / in_image;
                let width = nb * pixels;
                let cols = &mut scratch.cols[..taps * width];
                let dy = if nb == 1 {
                    dy
                } else {
                    let gathered = &mut scratch.staging[..cout * width];
                    gather_chunk(geo, nb, dy, gathered);
                    &*gathered
                };
                if let Some(dx) = dx.as_deref_mut() {
                    let dx = &mut dx[i * plan.nb * in_image..][..nb * in_image];
                    let wt = Mat::rows(w, cout, taps).t();
                    matmul(
                        MatMut::rows(cols, taps, width),
                        false,
                        wt,
                        Mat::rows(dy, cout, width),
                        plan.parallel_gemm,
                    );
                    col2im(geo, nb, cols, dx);
                }
                if need_dw {
                    im2col(geo, nb, x, cols);
                    let dy_t = Mat::rows(dy, cout, width).t();
                    let dw_t = MatMut::rows(&mut scratch.dw_t, taps, cout);
                    matmul(
                        dw_t,
                        i > 0,
                        Mat::rows(&*cols, taps, width),
                        dy_t,
                        plan.parallel_gemm,
                    );
                }
            }
        });
    // The groups' partial weight gradients, summed in order and transposed.
    let mut partials = scratch.into_iter().map(|s| s.dw_t);
    let dw = need_dw.then(|| {
        let mut dw_t = partials.next().unwrap_or_default();
        for p in partials {
            dw_t.iter_mut().zip(&p).for_each(|(a, &b)| *a += b);
        }
        let mut dw = vec![T::zero(); dw_t.len()];
        for (tap, row) in dw_t.chunks_exact(cout).enumerate() {
            for (co, &v) in row.iter().enumerate() {
                dw[co * taps + tap] = v;
            }
        }
        dw
    });
    (dx, dw)
}

/// `(x, w) -> conv2d(x, w)` as im2col + GEMM, CPU only (f32, f64), with the
/// backward of the module docs. Its `bwd` skips the gradient of an argument
/// that does not need one (the input batch of the first layer).
#[derive(Debug, Clone, Copy)]
pub struct Conv2d(pub Conv2dParams);

impl Conv2d {
    fn typed_bwd<T: Float>(
        &self,
        geo: &ConvGeometry,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (need_dx, need_dw) = (x.track_op(), w.track_op());
        let (dx, dw) = cpu_data::<T, _>("conv2d backward", x, |xs| {
            cpu_data::<T, _>("conv2d backward", w, |ws| {
                cpu_data::<T, _>("conv2d backward", grad, |dy| {
                    Ok(backward(geo, xs, ws, dy, need_dx, need_dw))
                })
            })
        })?;
        let dx = dx
            .map(|v| Tensor::from_vec(v, x.shape(), x.device()))
            .transpose()?;
        let dw = dw
            .map(|v| Tensor::from_vec(v, w.shape(), w.device()))
            .transpose()?;
        Ok((dx, dw))
    }
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let geo = self.0.geometry(l1.shape(), l2.shape())?;
        let (Some((x0, x1)), Some((w0, w1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            bail!("conv2d: expected contiguous input and kernel")
        };
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                CpuStorage::F32(forward(&geo, &x[x0..x1], &w[w0..w1]))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w)) => {
                CpuStorage::F64(forward(&geo, &x[x0..x1], &w[w0..w1]))
            }
            _ => bail!(
                "conv2d: f32 or f64 input and kernel of one dtype, got {:?} and {:?}",
                s1.dtype(),
                s2.dtype()
            ),
        };
        Ok((
            out,
            Shape::from((geo.batch, geo.cout, geo.out_h(), geo.out_w())),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let geo = self.0.geometry(x.shape(), w.shape())?;
        let grad = grad.contiguous()?;
        match x.dtype() {
            DType::F32 => self.typed_bwd::<f32>(&geo, x, w, &grad),
            DType::F64 => self.typed_bwd::<f64>(&geo, x, w, &grad),
            dtype => bail!("conv2d backward: f32 or f64, got {dtype:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(batch: usize, cin: usize, size: usize, cout: usize, k: usize) -> ConvGeometry {
        ConvGeometry {
            batch,
            cin,
            h: size,
            w: size,
            cout,
            kh: k,
            kw: k,
            stride: 1,
            padding: k / 2,
            dilation: 1,
        }
    }

    /// Every group but the last holds the same whole number of equal
    /// chunks, the groups cover the batch, and no thread is left idle
    /// while another runs more than one chunk more than it.
    #[test]
    fn plans_cut_the_batch_into_equal_chunks_one_group_per_thread() {
        for (batch, cin, size, cout, k) in [
            (32, 512, 4, 512, 3),
            (32, 64, 32, 64, 3),
            (32, 256, 8, 256, 3),
            (31, 128, 16, 128, 3),
            (7, 3, 32, 64, 3),
            (1, 64, 32, 64, 1),
        ] {
            let geo = geometry(batch, cin, size, cout, k);
            for threads in [1, 2, 3, 8] {
                let plan = Plan::for_threads(&geo, threads);
                let what =
                    format!("batch {batch}, {cin}->{cout} at {size}, {threads} threads: {plan:?}");
                assert!(
                    plan.nb >= 1 && plan.per_group.is_multiple_of(plan.nb),
                    "{what}"
                );
                assert!(
                    plan.nb == 1 || plan.nb * geo.taps() * geo.out_plane() <= COLUMN_BUDGET,
                    "{what}"
                );
                let groups = batch.div_ceil(plan.per_group);
                if plan.parallel_gemm {
                    assert_eq!(groups, 1, "{what}");
                } else {
                    assert!(groups <= threads, "{what}");
                    assert_eq!(groups, batch.div_ceil(batch.div_ceil(threads)), "{what}");
                }
            }
        }
        // The case that motivated equal chunks: 16 images a thread, at most
        // 14 in the column budget, are two chunks of 8.
        let plan = Plan::for_threads(&geometry(32, 512, 4, 512, 3), 2);
        assert_eq!((plan.nb, plan.per_group), (8, 16));
    }
}
