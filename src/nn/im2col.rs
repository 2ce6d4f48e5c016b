//! The geometry of a 2-D convolution and the column matrix that turns it
//! into a GEMM: `im2col` gathers every input patch into a column, `col2im`
//! scatters (adds) columns back onto the input.
//!
//! For a chunk of `nb` images the column matrix has one row per kernel tap
//! `(ci, ky, kx)` (the order of the weight's `cin x kh x kw`) and one column
//! per output pixel, image after image: row `r`, column `b * P + p`, where
//! `P = out_h * out_w`.

/// Shapes and parameters of a 2-D convolution of `(batch, cin, h, w)`
/// inputs with a `(cout, cin, kh, kw)` kernel (one group, the same stride,
/// padding and dilation along both axes, as candle's `conv2d`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Images in the batch.
    pub batch: usize,
    /// Input channels.
    pub cin: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub cout: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
    /// Dilation of the kernel.
    pub dilation: usize,
}

impl ConvGeometry {
    fn out_size(&self, size: usize, k: usize) -> usize {
        (size + 2 * self.padding - self.dilation * (k - 1) - 1) / self.stride + 1
    }

    /// Output height.
    pub fn out_h(&self) -> usize {
        self.out_size(self.h, self.kh)
    }

    /// Output width.
    pub fn out_w(&self) -> usize {
        self.out_size(self.w, self.kw)
    }

    /// Output pixels per channel, `P`.
    pub fn out_plane(&self) -> usize {
        self.out_h() * self.out_w()
    }

    /// Taps of the kernel per output channel, `cin * kh * kw`: the rows of
    /// the column matrix.
    pub fn taps(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    /// Elements of one input image.
    pub fn in_image(&self) -> usize {
        self.cin * self.h * self.w
    }

    /// Elements of one output image.
    pub fn out_image(&self) -> usize {
        self.cout * self.out_plane()
    }

    /// The output columns `lo..hi` whose input column `ox * stride + kx *
    /// dilation - padding` lies inside the image, and the input column of
    /// `lo` (0 when the range is empty).
    fn valid_columns(&self, kx: usize) -> (usize, usize, usize) {
        let shift = kx * self.dilation;
        let ow = self.out_w();
        let lo = self
            .padding
            .saturating_sub(shift)
            .div_ceil(self.stride)
            .min(ow);
        let hi = if self.w + self.padding > shift {
            (self.w - 1 + self.padding - shift) / self.stride + 1
        } else {
            0
        };
        let hi = hi.clamp(lo, ow);
        // lo * stride + shift >= padding whenever the range is not empty.
        let offset = if lo < hi {
            lo * self.stride + shift - self.padding
        } else {
            0
        };
        (lo, hi, offset)
    }

    /// The input row of output row `oy` at kernel row `ky`, if inside.
    fn input_row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.stride + ky * self.dilation)
            .checked_sub(self.padding)
            .filter(|&iy| iy < self.h)
    }
}

/// Gathers the patches of `nb` images (`images`, contiguous NCHW) into
/// `cols` (`taps x nb * P`), zeros in the padding.
pub fn im2col<T: Copy + num_traits::Zero>(
    geo: &ConvGeometry,
    nb: usize,
    images: &[T],
    cols: &mut [T],
) {
    let (p, ow, plane, stride) = (geo.out_plane(), geo.out_w(), geo.h * geo.w, geo.stride);
    let width = nb * p;
    assert_eq!(
        images.len(),
        nb * geo.in_image(),
        "im2col: input chunk size"
    );
    assert_eq!(cols.len(), geo.taps() * width, "im2col: column matrix size");
    let mut rows = cols.chunks_exact_mut(width);
    for ci in 0..geo.cin {
        for ky in 0..geo.kh {
            for kx in 0..geo.kw {
                let row = rows.next().expect("one row per tap");
                let (lo, hi, offset) = geo.valid_columns(kx);
                for (b, image_row) in row.chunks_exact_mut(p).enumerate() {
                    let channel = &images[(b * geo.cin + ci) * plane..][..plane];
                    for (oy, out) in image_row.chunks_exact_mut(ow).enumerate() {
                        let Some(iy) = geo.input_row(oy, ky) else {
                            out.fill(T::zero());
                            continue;
                        };
                        let input = &channel[iy * geo.w..][..geo.w];
                        out[..lo].fill(T::zero());
                        out[hi..].fill(T::zero());
                        let out = &mut out[lo..hi];
                        if stride == 1 {
                            out.copy_from_slice(&input[offset..offset + out.len()]);
                        } else {
                            for (j, o) in out.iter_mut().enumerate() {
                                *o = input[offset + j * stride];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Adds the columns `cols` (`taps x nb * P`) back onto the `nb` images
/// `images` they were gathered from: the adjoint of [`im2col`].
pub fn col2im<T: Copy + std::ops::AddAssign>(
    geo: &ConvGeometry,
    nb: usize,
    cols: &[T],
    images: &mut [T],
) {
    let (p, ow, plane, stride) = (geo.out_plane(), geo.out_w(), geo.h * geo.w, geo.stride);
    let width = nb * p;
    assert_eq!(
        images.len(),
        nb * geo.in_image(),
        "col2im: input chunk size"
    );
    assert_eq!(cols.len(), geo.taps() * width, "col2im: column matrix size");
    let mut rows = cols.chunks_exact(width);
    for ci in 0..geo.cin {
        for ky in 0..geo.kh {
            for kx in 0..geo.kw {
                let row = rows.next().expect("one row per tap");
                let (lo, hi, offset) = geo.valid_columns(kx);
                for (b, image_row) in row.chunks_exact(p).enumerate() {
                    let channel = &mut images[(b * geo.cin + ci) * plane..][..plane];
                    for (oy, col_row) in image_row.chunks_exact(ow).enumerate() {
                        let Some(iy) = geo.input_row(oy, ky) else {
                            continue;
                        };
                        let input = &mut channel[iy * geo.w..][..geo.w];
                        let col_row = &col_row[lo..hi];
                        if stride == 1 {
                            for (i, &c) in input[offset..offset + col_row.len()]
                                .iter_mut()
                                .zip(col_row)
                            {
                                *i += c;
                            }
                        } else {
                            for (j, &c) in col_row.iter().enumerate() {
                                input[offset + j * stride] += c;
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(
        h: usize,
        w: usize,
        k: usize,
        stride: usize,
        padding: usize,
        dilation: usize,
    ) -> ConvGeometry {
        ConvGeometry {
            batch: 2,
            cin: 3,
            h,
            w,
            cout: 1,
            kh: k,
            kw: k,
            stride,
            padding,
            dilation,
        }
    }

    /// The column entry by its definition, for every tap and pixel.
    fn naive_im2col(geo: &ConvGeometry, nb: usize, x: &[f64]) -> Vec<f64> {
        let (oh, ow) = (geo.out_h(), geo.out_w());
        let mut cols = Vec::new();
        for ci in 0..geo.cin {
            for ky in 0..geo.kh {
                for kx in 0..geo.kw {
                    for b in 0..nb {
                        for oy in 0..oh {
                            for ox in 0..ow {
                                let iy = (oy * geo.stride + ky * geo.dilation) as isize
                                    - geo.padding as isize;
                                let ix = (ox * geo.stride + kx * geo.dilation) as isize
                                    - geo.padding as isize;
                                let inside = (0..geo.h as isize).contains(&iy)
                                    && (0..geo.w as isize).contains(&ix);
                                let at = ((b * geo.cin + ci) * geo.h + iy.max(0) as usize) * geo.w
                                    + ix.max(0) as usize;
                                cols.push(if inside { x[at] } else { 0.0 });
                            }
                        }
                    }
                }
            }
        }
        cols
    }

    #[test]
    fn im2col_matches_the_definition_and_col2im_is_its_adjoint() {
        for (h, w, k, s, p, d) in [
            (5, 7, 3, 1, 1, 1),
            (6, 5, 3, 2, 1, 1),
            (7, 7, 3, 2, 2, 2),
            (4, 9, 1, 3, 0, 1),
            (9, 8, 7, 2, 3, 1),
            (3, 3, 3, 1, 0, 1),
        ] {
            let geo = geometry(h, w, k, s, p, d);
            let x: Vec<f64> = (0..2 * geo.in_image())
                .map(|i| (i as f64 * 0.61).sin())
                .collect();
            let mut cols = vec![f64::NAN; geo.taps() * 2 * geo.out_plane()];
            im2col(&geo, 2, &x, &mut cols);
            assert_eq!(cols, naive_im2col(&geo, 2, &x), "{geo:?}");
            // <im2col(x), c> = <x, col2im(c)> for any c.
            let c: Vec<f64> = (0..cols.len()).map(|i| (i as f64 * 0.29).cos()).collect();
            let mut back = vec![0.0; x.len()];
            col2im(&geo, 2, &c, &mut back);
            let lhs: f64 = cols.iter().zip(&c).map(|(a, b)| a * b).sum();
            let rhs: f64 = x.iter().zip(&back).map(|(a, b)| a * b).sum();
            assert!(
                (lhs - rhs).abs() < 1e-9 * lhs.abs().max(1.0),
                "{geo:?}: {lhs} vs {rhs}"
            );
        }
    }
}
