// Shared device helpers of the idkm kernels (soft_assign.cu, adjoint.cu).
//
// defines: CEIL_DIV, the launch constants (BLOCK, KMAX, TILE_*), DEAD_MASS,
//          group/warp/block reductions, the per-row attention `attend_row`
//          and the tile-geometry helpers shared by the row-reducing kernels.
//
// Parallelisation used by every kernel that needs the attention row a_i.
// -------------------------------------------------------------------
// A "group" of G lanes of one warp handles one weight row i: G = the smallest
// power of two >= k, clamped to [2, 32], so a warp holds 32/G groups and a
// block of BLOCK = 256 threads holds BLOCK/G groups. Lane l of a group owns the
// centroids j = l, l+G, l+2G, ... (k/G <= 8 of them): it computes their
// logits, keeps the per-(i,j) values (a_ij, coef_ij, ...) in *shared memory*
// (one slot per (row, j), written and read back by the owning lane only, so no
// barrier is needed inside a row), and the row-wide quantities (max, softmax
// denominator, the centring means, output vectors) are reduced over the G
// lanes with xor-shuffles. The centroids (k x d floats) sit in shared memory.
// No per-thread array is indexed dynamically: nothing lands in local memory.
//
// Build: C++17 (`if constexpr`; nvcc's default dialect since CUDA 12), and no
// --use_fast_math: the twins use IEEE expf, sqrtf and division.
//
// Per-row arithmetic is float, as in the CPU twins (src/cluster/streaming.rs);
// the order of the per-row float sums differs from the twins' sequential
// folds (tree over lanes), so results agree to float rounding, not bit for bit.
#pragma once

#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))

namespace idkm {

// Threads per block of every row kernel (the kernels assume exactly this).
constexpr int BLOCK = 256;
// __launch_bounds__(BLOCK, MIN_BLOCKS) of the row kernels: caps registers at
// 128 a thread. Without the second argument ptxas 13.0 capped some d = 8
// kernels at 64-80 registers and spilled; with 2 it uses at most ~93 and
// spills nothing (scripts/ptx-check.sh).
constexpr int MIN_BLOCKS = 2;
// Largest number of centroids (k = 2^bits, bits <= 8).
constexpr int KMAX = 256;
// Floats in one (rows x k) shared tile array of the row-reducing kernels.
constexpr int TILE_ELEMS = 2048;
// Most rows in one tile.
constexpr int TILE_ROWS_MAX = 128;
// A centroid with mass S_j <= DEAD_MASS is dead (streaming.rs: DEAD_MASS).
constexpr double DEAD_MASS = 1e-6;

// Lanes per row: smallest power of two >= k, within [2, 32].
__device__ __forceinline__ int group_lanes(int k) {
    int g = 2;
    while (g < k && g < 32) g <<= 1;
    return g;
}

// Rows per tile of the row-reducing kernels: R * k <= TILE_ELEMS,
// R <= TILE_ROWS_MAX, and R a multiple of the number of groups so every group
// (hence every warp) runs the same number of rows per tile.
__device__ __forceinline__ int tile_rows(int k, int ngroups) {
    int r = min(TILE_ROWS_MAX, TILE_ELEMS / k);
    r = (r / ngroups) * ngroups;
    return max(r, ngroups);
}

// [start, end) rows of this block: a contiguous chunk of ceil(m / gridDim.x).
__device__ __forceinline__ void block_rows(int m, int& start, int& end) {
    const long long chunk = CEIL_DIV((long long)m, (long long)gridDim.x);
    const long long s = (long long)blockIdx.x * chunk;
    start = (int)min((long long)m, s);
    end = (int)min((long long)m, s + chunk);
}

// Loads D consecutive floats from shared memory, vectorised when aligned
// (p must be 16-byte aligned for D % 4 == 0, 8-byte aligned for D == 2).
template <int D>
__device__ __forceinline__ void load_vec(const float* p, float (&v)[D]) {
    if constexpr (D % 4 == 0) {
#pragma unroll
        for (int e = 0; e < D; e += 4) {
            const float4 q = *reinterpret_cast<const float4*>(p + e);
            v[e] = q.x; v[e + 1] = q.y; v[e + 2] = q.z; v[e + 3] = q.w;
        }
    } else if constexpr (D == 2) {
        const float2 q = *reinterpret_cast<const float2*>(p);
        v[0] = q.x; v[1] = q.y;
    } else {
#pragma unroll
        for (int e = 0; e < D; ++e) v[e] = p[e];
    }
}

// Row i of a row-major m x D global array, or zeros when !valid.
template <int D>
__device__ __forceinline__ void load_row(const float* __restrict__ x, int i, bool valid, float (&v)[D]) {
#pragma unroll
    for (int e = 0; e < D; ++e) v[e] = valid ? x[(size_t)i * D + e] : 0.f;
}

// ----------------------------------------------------------------------------
// Reductions

// Over the G lanes of a group (G a power of two <= 32). Every lane of the warp
// must call it (groups of a warp run in lockstep); all lanes get the result.
__device__ __forceinline__ float group_max(float v, int G) {
    for (int off = G >> 1; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

__device__ __forceinline__ float group_sum(float v, int G) {
    for (int off = G >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

template <int D>
__device__ __forceinline__ void group_sum_vec(float (&v)[D], int G) {
#pragma unroll
    for (int e = 0; e < D; ++e) v[e] = group_sum(v[e], G);
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

__device__ __forceinline__ double warp_max(double v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

// Sum over the block in double, in a fixed order (deterministic for a given
// blockDim.x, which must be a multiple of 32). `red`: shared, 32 doubles.
// Every thread must call it and every thread gets the result.
__device__ __forceinline__ double block_sum(double v, double* red) {
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    __syncthreads();  // a previous call may still be reading red
    if (lane == 0) red[warp] = v;
    __syncthreads();
    double t = 0.0;
    for (int w = 0; w < nwarps; ++w) t += red[w];
    return t;
}

// Max over the block (NaN ignored, like f64::max). Same contract as block_sum.
__device__ __forceinline__ double block_max(double v, double* red) {
    v = warp_max(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    double t = red[0];
    for (int w = 1; w < nwarps; ++w) t = fmax(t, red[w]);
    return t;
}

// ----------------------------------------------------------------------------
// The attention row (streaming.rs: Row::attend)

// For the weight vector w (registers) against the centroids c (shared, k x D),
// writes for every j owned by this lane (j = lane, lane + G, ...):
//   a[j]    = softmax_j(z_ij), z_ij = -dist(w, c_j) * inv_tau, max subtracted;
//   coef[j] = dz_ij/dw_i / e_ij: -2*inv_tau (squared), -inv_tau/||e|| or 0
//             when ||e|| == 0 (Euclidean); only when COEF.
// a and coef point at this row's k slots in shared memory. inv_tau is
// (1/tau) rounded to float, as the twin's T::of(1.0 / tau).
template <int D, bool COEF>
__device__ __forceinline__ void attend_row(const float (&w)[D], const float* c, int k, int G, int lane,
                                           float inv_tau, bool euclidean, float* a, float* coef) {
    float zmax = -INFINITY;
    for (int j = lane; j < k; j += G) {
        float cj[D];
        load_vec<D>(c + j * D, cj);
        float e2 = 0.f;
#pragma unroll
        for (int e = 0; e < D; ++e) {
            const float df = w[e] - cj[e];
            e2 += df * df;
        }
        float z;
        if (euclidean) {
            const float dist = sqrtf(e2);
            if constexpr (COEF) coef[j] = dist > 0.f ? -inv_tau / dist : 0.f;
            z = -dist * inv_tau;
        } else {
            if constexpr (COEF) coef[j] = -2.f * inv_tau;
            z = -e2 * inv_tau;
        }
        a[j] = z;
        zmax = fmaxf(zmax, z);
    }
    zmax = group_max(zmax, G);
    float sum = 0.f;
    for (int j = lane; j < k; j += G) {
        const float x = expf(a[j] - zmax);
        a[j] = x;
        sum += x;
    }
    const float inv_sum = 1.f / group_sum(sum, G);
    for (int j = lane; j < k; j += G) a[j] *= inv_sum;
}

// q_ij = g_i . (c_j - w_i) (streaming.rs: Tile::set_output_dots): g_i . c_j
// shifted by the per-row constant -g_i . w_i, which centring removes; the
// shift keeps q_ij small where a_ij is large, so q_ij - qbar_i loses few bits.
template <int D>
__device__ __forceinline__ float dot_gcw(const float (&g)[D], const float (&cj)[D], const float (&w)[D]) {
    float s = g[0] * (cj[0] - w[0]);
#pragma unroll
    for (int e = 1; e < D; ++e) s += g[e] * (cj[e] - w[e]);
    return s;
}

// r_ij = (w_i - f_j) . v_j with f = F(C), v_j = u_j / S_j (streaming.rs: dot_e;
// adjoint.cu passes f_j, not c_j, as the second argument).
template <int D>
__device__ __forceinline__ float dot_e(const float (&w)[D], const float (&cj)[D], const float (&vj)[D]) {
    float s = (w[0] - cj[0]) * vj[0];
#pragma unroll
    for (int e = 1; e < D; ++e) s += (w[e] - cj[e]) * vj[e];
    return s;
}

// ----------------------------------------------------------------------------
// Per-block accumulation of the row-reducing kernels
//
// NACC accumulators (doubles) per block, held in registers: "virtual thread"
// v = threadIdx.x + s * BLOCK (s < SLOTS, unrolled) owns accumulator
// x = v % nacc of row lane p = v / nacc; there are P = SLOTS*BLOCK / nacc row
// lanes (virtual threads with p >= P idle), lane p adds rows p, p+P, ... of
// each tile. At the end the P lane sums of each accumulator are added in
// lane order through shared memory (`finish_partials`). Everything is in a
// fixed order: the partials are deterministic for a given grid.

// Writes this block's nacc sums to partials[blockIdx.x * nacc ...], adding
// the P row-lane sums in order. `red`: shared, SLOTS * BLOCK doubles, may
// alias the tile arrays (the caller has synchronised after the last tile).
template <int SLOTS>
__device__ __forceinline__ void finish_partials(const double (&acc)[SLOTS], int nacc, double* red,
                                                double* __restrict__ partials) {
    const int P = (SLOTS * BLOCK) / nacc;
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) red[threadIdx.x + s * BLOCK] = acc[s];
    __syncthreads();
    for (int x = threadIdx.x; x < nacc; x += BLOCK) {
        double t = 0.0;
        for (int p = 0; p < P; ++p) t += red[p * nacc + x];
        partials[(size_t)blockIdx.x * nacc + x] = t;
    }
}

}  // namespace idkm
