//! Training augmentation: random crop of a zero-padded image and random horizontal flip.

use rand::Rng;

/// Augmentation applied to each training image as batches are assembled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Augment {
    /// Zero padding on each side before cropping back to the image size (4 for CIFAR, 0 = off).
    pub pad_crop: usize,
    /// Mirror left-right with probability 0.5.
    pub hflip: bool,
}

impl Augment {
    /// No augmentation (evaluation, MNIST).
    pub fn none() -> Self {
        Self {
            pad_crop: 0,
            hflip: false,
        }
    }

    /// The usual CIFAR recipe: pad 4 and crop, random horizontal flip.
    pub fn cifar() -> Self {
        Self {
            pad_crop: 4,
            hflip: true,
        }
    }

    /// Whether every image passes unchanged.
    pub(super) fn is_identity(&self) -> bool {
        self.pad_crop == 0 && !self.hflip
    }

    /// Draws the crop offset and flip for one image.
    pub(super) fn draw(&self, rng: &mut impl Rng) -> Transform {
        let pad = self.pad_crop as i64;
        let mut offset = || {
            if pad > 0 {
                rng.random_range(-pad..=pad) as isize
            } else {
                0
            }
        };
        let (dy, dx) = (offset(), offset());
        let flip = self.hflip && rng.random_bool(0.5);
        Transform { dy, dx, flip }
    }
}

/// One drawn augmentation: output pixel `(y, x)` takes input pixel `(y + dy, x + dx)`, zero
/// where that falls outside the image, and the result is then mirrored when `flip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Transform {
    pub dy: isize,
    pub dx: isize,
    pub flip: bool,
}

impl Transform {
    /// Writes the transformed `src` into `dst`; both hold whole `h x w` CHW planes.
    pub(super) fn apply(&self, src: &[u8], dst: &mut [u8], h: usize, w: usize) {
        if h == 0 || w == 0 {
            return;
        }
        let (hi, wi) = (h as isize, w as isize);
        // Output columns lo..hi read input columns lo + dx..hi + dx, the rest is padding.
        let lo = (-self.dx).clamp(0, wi);
        let hi_x = (wi - self.dx).clamp(lo, wi);
        let (lo, hi_x, src_lo) = (lo as usize, hi_x as usize, (lo + self.dx).max(0) as usize);
        for (src_plane, dst_plane) in src.chunks_exact(h * w).zip(dst.chunks_exact_mut(h * w)) {
            for (y, row) in dst_plane.chunks_exact_mut(w).enumerate() {
                let sy = y as isize + self.dy;
                if !(0..hi).contains(&sy) {
                    row.fill(0);
                    continue;
                }
                let src_row = &src_plane[sy as usize * w..][..w];
                row[..lo].fill(0);
                row[hi_x..].fill(0);
                row[lo..hi_x].copy_from_slice(&src_row[src_lo..src_lo + (hi_x - lo)]);
                if self.flip {
                    row.reverse();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2x3 image with two channels, all values distinct and non-zero.
    const SRC: [u8; 12] = [1, 2, 3, 4, 5, 6, 11, 12, 13, 14, 15, 16];

    fn apply(dy: isize, dx: isize, flip: bool) -> Vec<u8> {
        let mut dst = vec![99; SRC.len()];
        Transform { dy, dx, flip }.apply(&SRC, &mut dst, 2, 3);
        dst
    }

    #[test]
    fn identity_copies() {
        assert_eq!(apply(0, 0, false), SRC);
    }

    #[test]
    fn shifts_fill_with_zeros() {
        assert_eq!(apply(0, 1, false), [2, 3, 0, 5, 6, 0, 12, 13, 0, 15, 16, 0]);
        assert_eq!(
            apply(0, -1, false),
            [0, 1, 2, 0, 4, 5, 0, 11, 12, 0, 14, 15]
        );
        assert_eq!(apply(1, 0, false), [4, 5, 6, 0, 0, 0, 14, 15, 16, 0, 0, 0]);
        assert_eq!(apply(-1, 2, false), [0, 0, 0, 3, 0, 0, 0, 0, 0, 13, 0, 0]);
        assert_eq!(apply(0, 3, false), [0; 12]);
        assert_eq!(apply(-5, 0, false), [0; 12]);
    }

    #[test]
    fn flip_mirrors_after_crop() {
        assert_eq!(
            apply(0, 0, true),
            [3, 2, 1, 6, 5, 4, 13, 12, 11, 16, 15, 14]
        );
        assert_eq!(apply(0, 1, true), [0, 3, 2, 0, 6, 5, 0, 13, 12, 0, 16, 15]);
    }

    #[test]
    fn draws_stay_in_range_and_vary() {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
        let draws: Vec<Transform> = (0..200).map(|_| Augment::cifar().draw(&mut rng)).collect();
        assert!(draws.iter().all(|t| t.dy.abs() <= 4 && t.dx.abs() <= 4));
        assert!(draws.iter().any(|t| t.dx == -4) && draws.iter().any(|t| t.dx == 4));
        let flips = draws.iter().filter(|t| t.flip).count();
        assert!((60..140).contains(&flips), "{flips} flips of 200");
        let none = Augment::none().draw(&mut rng);
        assert_eq!(
            none,
            Transform {
                dy: 0,
                dx: 0,
                flip: false
            }
        );
    }
}
