// Forward passes of soft k-means: the CUDA twins of the forward section of
// src/cluster/streaming.rs (soft_assign_reduce, Moments::update,
// Moments::inverse_mass, soft_assign_output, hard_assign).
//
// Compile: nvcc --ptx -arch=sm_90 -O3 kernels/soft_assign.cu   (scripts/ptx-check.sh)
//
// Entry points. Those with a row dimension are instantiated once per weight
// dimension d in {1, 2, 4, 8}: the name ends in _d1, _d2, _d4 or _d8 (the host
// picks the name from d; there is no runtime d). The others take d as an int.
//
//   soft_assign_reduce_f32_dD  one k-means step's sums, per-block partials
//   reduce_partials            partials -> one vector, blocks in fixed order
//   kmeans_update              F(C) (dead centroids kept), max shift (on the f32 values), converged flag
//   inverse_mass               1/S_j or 0 for a dead centroid
//   soft_assign_output_f32_dD  Wt_i = sum_j a_ij c_j
//   hard_assign_f32_dD         argmin_j ||w_i - c_j|| (ties to the lower j)
//   first_non_finite_f32       smallest index of a NaN or infinite value (ops.rs: check_finite)
//
// Algorithm (see common.cuh for the group-per-row attention):
//
// soft_assign_reduce: grid-wide sums S_j = sum_i a_ij and sum_i a_ij w_i,
// k*(d+1) doubles. Block b takes the contiguous rows
// [b*ceil(m/grid), (b+1)*ceil(m/grid)) and walks them in tiles of R rows
// (R*k <= 2048). Phase 1: each group computes a_i. for its rows of the tile
// into shared memory (a: R x k floats, w: R x d floats). Barrier. Phase 2:
// the k*(d+1) sums are owned by threads (register accumulators, doubles;
// with (d+1)*BLOCK "virtual threads", so P = (d+1)*BLOCK / (k*(d+1)) row
// lanes each add every P-th row of the tile).
// Barrier. After the last tile the row lanes are added in order and the block
// writes its k*(d+1) partial sums. No atomics: reduce_partials adds the
// blocks in index order, so the result is deterministic for a given grid.
// Versions: 1 (this one).
//
// soft_assign_output: one group per row (rows batched BLOCK/G per block,
// grid-stride), lane partial sums of a_ij c_j reduced over the group.
//
// hard_assign: one thread per row (no softmax, no row-wide reduction), the
// centroids in shared memory are read as broadcasts.
//
// Launch configurations (BLOCK = 256; all shared memory is static: launch
// with 0 bytes of dynamic shared memory):
//   soft_assign_reduce_f32_dD  grid = any nb >= 1 (suggested
//                              min(1024, max(1, CEIL_DIV(m, 256)))), block = 256;
//                              partials holds nb * k*(d+1) doubles.
//   reduce_partials            grid = CEIL_DIV(len, 256), block = 256.
//   kmeans_update              grid = 1, block = 256.
//   inverse_mass               grid = CEIL_DIV(k, 256), block = 256.
//   soft_assign_output_f32_dD  grid = any (suggested min(CEIL_DIV(m, 8), 65535)), block = 256.
//   hard_assign_f32_dD         grid = any (suggested min(CEIL_DIV(m, 256), 65535)), block = 256.
//   first_non_finite_f32       grid = any (suggested min(CEIL_DIV(n, 256), 1024)), block = any.
// Requirements: 1 <= k <= 256, blockDim.x == 256 for the _dD kernels (else
// they trap); m >= 0; inv_tau = (1/tau) rounded to f32; euclidean = 0
// (squared distance) or 1 (Euclidean).

#include "common.cuh"

using namespace idkm;

// Traps on a launch that breaks the kernels' assumptions (a loud failure is
// better than an out-of-bounds shared-memory write).
__device__ __forceinline__ void check_launch(int k) {
    if (k < 1 || k > KMAX || blockDim.x != BLOCK) __trap();
}

// ----------------------------------------------------------------------------
// soft_assign_reduce

template <int D>
__device__ __forceinline__ void soft_assign_reduce_body(const float* __restrict__ w_in, const float* __restrict__ c_in,
                                                        int m, int k, float inv_tau, bool euclidean,
                                                        double* __restrict__ partials) {
    constexpr int SLOTS = D + 1;  // ceil(KMAX * (D + 1) / BLOCK)
    static_assert(KMAX * (D + 1) <= SLOTS * BLOCK, "accumulator slots");
    constexpr int TILE_BYTES = (TILE_ELEMS + TILE_ROWS_MAX * D) * 4;
    constexpr int RED_BYTES = SLOTS * BLOCK * 8;
    constexpr int SCRATCH = TILE_BYTES > RED_BYTES ? TILE_BYTES : RED_BYTES;
    __shared__ __align__(16) float cs[KMAX * D];
    __shared__ __align__(16) unsigned char scratch[SCRATCH];
    float* as = reinterpret_cast<float*>(scratch);  // R x k attention
    float* ws = as + TILE_ELEMS;                      // R x D weights
    double* red = reinterpret_cast<double*>(scratch);  // after the last tile

    check_launch(k);
    const int tid = threadIdx.x;
    for (int x = tid; x < k * D; x += BLOCK) cs[x] = c_in[x];
    const int G = group_lanes(k), lane = tid & (G - 1), group = tid / G, ngroups = BLOCK / G;
    const int R = tile_rows(k, ngroups);
    const int nacc = k * (D + 1);
    const int P = (SLOTS * BLOCK) / nacc;
    int start, end;
    block_rows(m, start, end);
    double acc[SLOTS];
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) acc[s] = 0.0;
    __syncthreads();

    for (int t0 = start; t0 < end; t0 += R) {
        const int nrows = min(R, end - t0);
        // Phase 1: attention rows of the tile (rows >= nrows are computed on
        // zeros and ignored, so every group runs R / ngroups rows).
        for (int r = group; r < R; r += ngroups) {
            float w[D];
            load_row<D>(w_in, t0 + r, r < nrows, w);
            attend_row<D, false>(w, cs, k, G, lane, inv_tau, euclidean, as + r * k, nullptr);
            if (lane == 0) {
#pragma unroll
                for (int e = 0; e < D; ++e) ws[r * D + e] = w[e];
            }
        }
        __syncthreads();
        // Phase 2: accumulator x < k is S_x, else sum a_ij w_ie with
        // (j, e) = ((x - k) / D, (x - k) % D).
#pragma unroll
        for (int s = 0; s < SLOTS; ++s) {
            const int v = tid + s * BLOCK;
            const int p = v / nacc, x = v - p * nacc;
            if (p < P) {
                if (x < k) {
                    for (int r = p; r < nrows; r += P) acc[s] += (double)as[r * k + x];
                } else {
                    const int j = (x - k) / D, e = (x - k) % D;
                    for (int r = p; r < nrows; r += P)
                        acc[s] += (double)as[r * k + j] * (double)ws[r * D + e];
                }
            }
        }
        __syncthreads();
    }
    finish_partials<SLOTS>(acc, nacc, red, partials);
}

#define SOFT_ASSIGN_REDUCE(D)                                                                        \
    extern "C" __global__ void __launch_bounds__(BLOCK, MIN_BLOCKS) soft_assign_reduce_f32_d##D(                 \
        const float* __restrict__ w,   /* m x D weights, row-major */                                \
        const float* __restrict__ c,   /* k x D centroids */                                         \
        const int m, const int k, const float inv_tau, const int euclidean,                          \
        double* __restrict__ partials  /* gridDim.x x k*(D+1): per block [S (k), sum a w (k x D)] */ \
    ) {                                                                                              \
        soft_assign_reduce_body<D>(w, c, m, k, inv_tau, euclidean != 0, partials);                   \
    }
SOFT_ASSIGN_REDUCE(1)
SOFT_ASSIGN_REDUCE(2)
SOFT_ASSIGN_REDUCE(4)
SOFT_ASSIGN_REDUCE(8)

// ----------------------------------------------------------------------------
// reduce_partials: out[x] = sum_b partials[b][x], b = 0, 1, ... in order.

extern "C" __global__ void reduce_partials(
    const double* __restrict__ partials,  // num_blocks x len
    const int num_blocks, const int len,
    double* __restrict__ out              // len
) {
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= len) return;
    double t = 0.0;
#pragma unroll 8
    for (int b = 0; b < num_blocks; ++b) t += partials[(size_t)b * len + x];
    out[x] = t;
}

// ----------------------------------------------------------------------------
// kmeans_update (streaming.rs: Moments::update and the test in fixed_point)

extern "C" __global__ void kmeans_update(
    const double* __restrict__ sums,  // k*(d+1): S (k) then sum_i a_ij w_i (k x d)
    const float* __restrict__ c,      // k x d current centroids
    const int k, const int d, const double tol,
    float* __restrict__ next,         // k x d new centroids (distinct from c)
    double* __restrict__ shift,       // 1: max_j ||next_j - c_j||
    unsigned int* __restrict__ converged  // 1: 1 if shift <= tol else 0
) {
    __shared__ double red[32];
    double local = 0.0;
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
        const double s = sums[j];
        double moved = 0.0;
        for (int e = 0; e < d; ++e) {
            // The move is measured on the stored (f32-rounded) centroid, as
            // the twin does; _rn: no FMA contraction, the same bits as the twin.
            const float cj = c[j * d + e];
            const float v = s > DEAD_MASS ? (float)(sums[k + j * d + e] / s) : cj;
            const double diff = (double)v - (double)cj;
            moved = __dadd_rn(moved, __dmul_rn(diff, diff));
            next[j * d + e] = v;
        }
        local = fmax(local, sqrt(moved));
    }
    const double total = block_max(local, red);
    if (threadIdx.x == 0) {
        *shift = total;
        *converged = total <= tol ? 1u : 0u;
    }
}

// ----------------------------------------------------------------------------
// inverse_mass (streaming.rs: Moments::inverse_mass)

extern "C" __global__ void inverse_mass(
    const double* __restrict__ mass,  // k: S_j (the first k entries of the reduced sums)
    const int k,
    double* __restrict__ inv_mass     // k: 1/S_j, or 0 when S_j <= DEAD_MASS
) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < k) inv_mass[j] = mass[j] > DEAD_MASS ? 1.0 / mass[j] : 0.0;
}

// ----------------------------------------------------------------------------
// soft_assign_output

template <int D>
__device__ __forceinline__ void soft_assign_output_body(const float* __restrict__ w_in, const float* __restrict__ c_in,
                                                        int m, int k, float inv_tau, bool euclidean,
                                                        float* __restrict__ out) {
    __shared__ __align__(16) float cs[KMAX * D];
    __shared__ __align__(16) float as[TILE_ELEMS];  // (BLOCK / G) x k, one row per group
    check_launch(k);
    const int tid = threadIdx.x;
    for (int x = tid; x < k * D; x += BLOCK) cs[x] = c_in[x];
    __syncthreads();
    const int G = group_lanes(k), lane = tid & (G - 1), group = tid / G, ngroups = BLOCK / G;
    float* a = as + group * k;
    // base is uniform over the block: every warp runs the same iterations.
    for (long long base = (long long)blockIdx.x * ngroups; base < m; base += (long long)gridDim.x * ngroups) {
        const int i = (int)base + group;
        const bool valid = i < m;
        float w[D];
        load_row<D>(w_in, i, valid, w);
        attend_row<D, false>(w, cs, k, G, lane, inv_tau, euclidean, a, nullptr);
        float o[D];
#pragma unroll
        for (int e = 0; e < D; ++e) o[e] = 0.f;
        for (int j = lane; j < k; j += G) {
            float cj[D];
            load_vec<D>(cs + j * D, cj);
            const float aj = a[j];
#pragma unroll
            for (int e = 0; e < D; ++e) o[e] += aj * cj[e];
        }
        group_sum_vec<D>(o, G);
        if (valid && lane == 0) {
#pragma unroll
            for (int e = 0; e < D; ++e) out[(size_t)i * D + e] = o[e];
        }
    }
}

#define SOFT_ASSIGN_OUTPUT(D)                                                          \
    extern "C" __global__ void __launch_bounds__(BLOCK, MIN_BLOCKS) soft_assign_output_f32_d##D(   \
        const float* __restrict__ w,  /* m x D weights */                              \
        const float* __restrict__ c,  /* k x D centroids */                            \
        const int m, const int k, const float inv_tau, const int euclidean,            \
        float* __restrict__ out       /* m x D soft-clustered weights */               \
    ) {                                                                                \
        soft_assign_output_body<D>(w, c, m, k, inv_tau, euclidean != 0, out);          \
    }
SOFT_ASSIGN_OUTPUT(1)
SOFT_ASSIGN_OUTPUT(2)
SOFT_ASSIGN_OUTPUT(4)
SOFT_ASSIGN_OUTPUT(8)

// ----------------------------------------------------------------------------
// hard_assign

template <int D>
__device__ __forceinline__ void hard_assign_body(const float* __restrict__ w_in, const float* __restrict__ c_in,
                                                 int m, int k, unsigned int* __restrict__ out) {
    __shared__ __align__(16) float cs[KMAX * D];
    check_launch(k);
    for (int x = threadIdx.x; x < k * D; x += BLOCK) cs[x] = c_in[x];
    __syncthreads();
    for (long long i = (long long)blockIdx.x * BLOCK + threadIdx.x; i < m; i += (long long)gridDim.x * BLOCK) {
        float w[D];
        load_row<D>(w_in, (int)i, true, w);
        float best = INFINITY;
        unsigned int index = 0;
        for (int j = 0; j < k; ++j) {
            float cj[D];
            load_vec<D>(cs + j * D, cj);
            float e2 = 0.f;
#pragma unroll
            for (int e = 0; e < D; ++e) {
                const float df = w[e] - cj[e];
                e2 += df * df;
            }
            if (e2 < best) {  // strict: ties (and NaN) keep the lower index
                best = e2;
                index = (unsigned int)j;
            }
        }
        out[i] = index;
    }
}

#define HARD_ASSIGN(D)                                                               \
    extern "C" __global__ void __launch_bounds__(BLOCK, MIN_BLOCKS) hard_assign_f32_d##D(        \
        const float* __restrict__ w,  /* m x D weights */                            \
        const float* __restrict__ c,  /* k x D centroids */                          \
        const int m, const int k,                                                    \
        unsigned int* __restrict__ out  /* m: index of the nearest centroid */       \
    ) {                                                                              \
        hard_assign_body<D>(w, c, m, k, out);                                        \
    }
HARD_ASSIGN(1)
HARD_ASSIGN(2)
HARD_ASSIGN(4)
HARD_ASSIGN(8)

// ----------------------------------------------------------------------------
// first_non_finite (ops.rs: check_finite, run before the k-means steps)
//
// Lowers *first to the smallest index i < n with x[i] NaN or infinite; the
// host sets *first to ULLONG_MAX before the launch, and it stays so when every
// value is finite. Each thread visits increasing indices, so it stops at its
// first hit. Integer atomicMin: the result does not depend on the order.

extern "C" __global__ void first_non_finite_f32(
    const float* __restrict__ x,              // n values
    const unsigned long long n,
    unsigned long long* __restrict__ first    // 1: in: ULLONG_MAX; out: smallest bad index
) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        if (!isfinite(x[i])) {
            atomicMin(first, i);
            return;
        }
    }
}
