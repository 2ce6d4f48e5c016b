//! Chunks of rows, the passes run on them, and their dispatch to the
//! widest instruction set compiled in.

use super::*;

/// At most this many chunks: bounds the memory of the per-chunk partial sums.
pub(super) const MAX_CHUNKS: usize = 128;
/// At least this many rows per chunk: amortises the per-chunk scratch.
pub(super) const MIN_CHUNK_ROWS: usize = 1024;

/// Rows per centroid a chunk of a windowed pass holds at least, so that a
/// tile of rows in order of value spans a fraction of the gap between
/// centroids and its window holds only the few centroids within reach: with
/// 128 chunks of a layer of 150,000 weights at 8 bits, a tile spanned seven
/// gaps and attended to 24 centroids on average (the matrix pass costs
/// window^2 multiply-adds a row): `idkm cluster` on such a layer took
/// 1.36 s instead of 0.47 s.
pub(super) const WINDOWED_ROWS_PER_CENTROID: usize = 64;

/// At least this many rows per chunk for a pass with geometry `geo`:
/// [`MIN_CHUNK_ROWS`], or [`WINDOWED_ROWS_PER_CENTROID`] per centroid where
/// the pass windows its centroids (see [`Visit`]).
pub(super) fn min_chunk_rows(geo: &Geometry) -> usize {
    if windowed(geo) {
        MIN_CHUNK_ROWS.max(WINDOWED_ROWS_PER_CENTROID * geo.k)
    } else {
        MIN_CHUNK_ROWS
    }
}

/// Rows per matrix entry a chunk of a pass that assembles the n x n matrix
/// holds at least (see [`matrix_chunk_rows`]).
pub(super) const MATRIX_ROWS_PER_ENTRY: usize = 2;

/// At least this many rows per chunk for a pass with geometry `geo` that
/// assembles the n x n matrix (n = k d): [`min_chunk_rows`], or
/// [`MATRIX_ROWS_PER_ENTRY`] n^2. Each chunk zeroes its own n^2 partial
/// sums and the reduction adds them one chunk at a time, so fewer chunks
/// cost less; and in a longer chunk visited in order of value a tile's rows
/// lie closer together, so its window holds fewer centroids, and the
/// matrix costs the square of the window a row. On 2.4 million Student-t
/// weights at 8 bits (a 3x3 512-channel layer) the forward solve's matrix
/// pass took 82-88 ms in 18 chunks of 131,072 rows against 90-141 ms in
/// 128 chunks of 18,432 (alternating runs on 2 cores).
pub(super) fn matrix_chunk_rows(geo: &Geometry) -> usize {
    let n = geo.k * geo.d;
    min_chunk_rows(geo).max(MATRIX_ROWS_PER_ENTRY * n * n)
}

/// Rows per chunk for m rows and at least `min_rows` a chunk, a multiple
/// of [`TILE`]; a function of m and `min_rows` only (determinism).
pub(super) fn chunk_rows(m: usize, min_rows: usize) -> usize {
    min_rows.max(m.div_ceil(MAX_CHUNKS)).next_multiple_of(TILE)
}

/// The work of one pass on one chunk of rows: the unit a thread runs.
pub(super) trait Pass: Sync {
    /// What the pass writes: f64 partial sums (reducing passes, see
    /// [`sum_rows`]) or output rows (mapping passes, see [`map_rows`]).
    type Out: Send;

    /// Processes `rows`, adding into (reducing) or writing (mapping) `out`.
    /// Implementations are `#[inline(always)]`, so that the body is compiled
    /// into each instruction-set version of [`run_chunk`].
    fn chunk(&self, rows: Range<usize>, out: &mut [Self::Out]);

    /// The fewest rows a chunk of this pass should hold.
    fn min_chunk_rows(&self) -> usize {
        MIN_CHUNK_ROWS
    }
}

/// Runs `pass` on one chunk with the widest vector instructions the CPU
/// offers among those the passes are compiled for: on x86-64, AVX-512 (with
/// 256-bit vectors: its 32 registers avoid the spills of AVX2), AVX2, or the
/// SSE2 baseline. The passes never fuse a multiply and an add, so every
/// version computes bit-for-bit the same result.
pub(super) fn run_chunk<P: Pass>(pass: &P, rows: Range<usize>, out: &mut [P::Out]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            // SAFETY: the CPU supports every feature `chunk_avx512` is
            // compiled for (checked by `has_avx512`).
            return unsafe { chunk_avx512(pass, rows, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, the one feature `chunk_avx2` is
            // compiled for, as checked just above.
            return unsafe { chunk_avx2(pass, rows, out) };
        }
    }
    pass.chunk(rows, out)
}

/// Whether the CPU has the AVX-512 features [`chunk_avx512`] is compiled for.
#[cfg(target_arch = "x86_64")]
pub(super) fn has_avx512() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx512f") && has!("avx512vl") && has!("avx512bw") && has!("avx512dq")
}

/// [`Pass::chunk`] compiled for AVX-512 (F, VL, BW, DQ).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
pub(super) fn chunk_avx512<P: Pass>(pass: &P, rows: Range<usize>, out: &mut [P::Out]) {
    pass.chunk(rows, out)
}

/// [`Pass::chunk`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) fn chunk_avx2<P: Pass>(pass: &P, rows: Range<usize>, out: &mut [P::Out]) {
    pass.chunk(rows, out)
}

/// Sums `len` f64 values over all m rows: each chunk adds its rows into its
/// own partial sums, and the partials are added in chunk order.
pub(super) fn sum_rows<P: Pass<Out = f64>>(m: usize, len: usize, pass: &P) -> Vec<f64> {
    let chunk = chunk_rows(m, pass.min_chunk_rows());
    let chunks = m.div_ceil(chunk);
    let mut total = vec![0f64; len];
    // Chunks run in parallel a batch at a time, so that the partials alive
    // at once stay within PARTIALS_BYTES (at least 2 of them, at most
    // SUM_BATCH); they are added in chunk order, so the batch size does not
    // change the result.
    let batch_len = (PARTIALS_BYTES / (len.max(1) * 8)).clamp(2, SUM_BATCH);
    for batch in (0..chunks).step_by(batch_len) {
        let partials: Vec<Vec<f64>> = (batch..chunks.min(batch + batch_len))
            .into_par_iter()
            .map(|n| {
                let mut partial = vec![0f64; len];
                run_chunk(pass, n * chunk..m.min((n + 1) * chunk), &mut partial);
                partial
            })
            .collect();
        for partial in partials {
            total.iter_mut().zip(partial).for_each(|(t, p)| *t += p);
        }
    }
    total
}

/// Most chunks of a reducing pass in flight at once (see [`sum_rows`]).
pub(super) const SUM_BATCH: usize = 16;
/// Bytes of partial sums a reducing pass keeps alive at once, beyond two
/// partials (see [`sum_rows`]): only the dense adjoint's (k d)^2 sums reach it.
pub(super) const PARTIALS_BYTES: usize = 1 << 20;

/// Runs `pass` over chunks of the rows of `out` (one `P::Out` a row), in
/// parallel; each chunk gets its rows' slice of `out`.
pub(super) fn map_rows<P: Pass>(out: &mut [P::Out], pass: &P) {
    let chunk = chunk_rows(out.len(), pass.min_chunk_rows());
    out.par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(n, rows)| run_chunk(pass, n * chunk..n * chunk + rows.len(), rows));
}

/// Runs `$body` with the const `$D` equal to the weight dimension `$d`:
/// the passes are compiled for d in {1, 2, 4, 8} (as the CUDA kernels).
macro_rules! with_dim {
    ($d:expr, $D:ident => $body:expr) => {
        match $d {
            1 => {
                const $D: usize = 1;
                $body
            }
            2 => {
                const $D: usize = 2;
                $body
            }
            4 => {
                const $D: usize = 4;
                $body
            }
            8 => {
                const $D: usize = 8;
                $body
            }
            d => panic!("weight dimension {d}: the passes run on d = 1, 2, 4 or 8"),
        }
    };
}
pub(super) use with_dim;

/// `x` (a multiple of `D` values) as vectors of dimension `D`.
pub(super) fn vectors<T, const D: usize>(x: &[T]) -> &[[T; D]] {
    x.as_chunks::<D>().0
}

/// `x` (a multiple of `D` values) as mutable vectors of dimension `D`.
pub(super) fn vectors_mut<T, const D: usize>(x: &mut [T]) -> &mut [[T; D]] {
    x.as_chunks_mut::<D>().0
}
