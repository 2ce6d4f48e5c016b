// Backward passes of the implicit k-means gradient: the CUDA twins of the
// backward section of src/cluster/streaming.rs (centroid_cotangent,
// adjoint_matvec, weight_grad) and a device-resident conjugate gradient for
// the symmetrised adjoint system of src/cluster/backward.rs (Solver::Cg).
//
// Compile: nvcc --ptx -arch=sm_90 -O3 kernels/adjoint.cu   (scripts/ptx-check.sh)
//
// Notation (docs/design.md): e_ij = w_i - c_j, coef_ij with
// dz_ij/dw_i = coef_ij e_ij, centred weights xc_ij = a_ij (x_ij - sum_l a_il x_il),
// q_ij = g_i . (c_j - w_i) (g_i . c_j shifted by a per-row constant that
// centring removes: the same qc_ij, far less cancellation in q_ij - qbar_i),
// r_ij = (u_j / S_j) . (w_i - f_j). Here f = F(C) (k x d) is
// the k-means map at the centroids c, computed by the host from the moments
// (f_j = sum_i a_ij w_i / S_j, or c_j for a dead centroid; the twins'
// Moments::update); it equals c at an exact fixed point. Only the r-terms use
// f: the logits, a_ij, coef_ij, q_ij and the e_ij multiplying coef_ij use c.
// The host passes inv_mass[j] = 1/S_j (0 for a dead centroid); the kernels
// form v_j = u_j * inv_mass_j in double and round it to float, as the twins'
// scale_rows + to_real.
//
// Entry points. Those with a row dimension are instantiated once per weight
// dimension d in {1, 2, 4, 8} (name suffix _d1, _d2, _d4, _d8; the host picks
// the name from d). The CG vector kernels take d as an int.
//
//   centroid_cotangent_f32_dD  h_j = sum_i a_ij g_i - sum_i qc_ij coef_ij e_ij, per-block partials
//   adjoint_matvec_f32_dD      (J^T u)_j = -sum_i rc_ij coef_ij e_ij, per-block partials
//                              (r_ij from f, e_ij from c)
//   cg_matvec_f32_dD           the same pass for u = D p, D p formed on device from the CG
//                              search direction p (no-op once the CG has stopped)
//   weight_grad_f32_dD         dL/dw_i = sum_j (qc_ij + rc_ij) coef_ij e_ij + sum_j a_ij v_j
//   cg_init                    x = 0, r = p = h, state
//   cg_update                  B p = D p - J^T(D p) from the partials, p.Bp, CG updates
//   cg_finish                  u = D x_best
//
// Algorithm. The three reducing passes use the tile scheme of
// soft_assign_reduce (see soft_assign.cu and common.cuh): per tile of R rows,
// phase 1 computes per row and per centroid the scalar weights of the row's
// contribution into shared memory (a_ij and t_ij = qc_ij coef_ij for the
// cotangent, t_ij = rc_ij coef_ij for the matvec) with one group of lanes per
// row; phase 2 has the k*d double accumulators owned by threads add the rows;
// each block writes its k*d partial sums, and reduce_partials (soft_assign.cu)
// or cg_update adds them in block order. No atomics: deterministic for a given
// grid. weight_grad is row-parallel (one group per row, like
// soft_assign_output) and writes its rows directly.
//
// Conjugate gradient on device (Solver::Cg; squared distance). The system is
// B v = h with B v = D v - J^T (D v), D = diag(S_j) repeated d times (1 for a
// dead centroid), and u = D v. Vectors x (= v), r, p, x_best (n = k*d doubles
// each) and `state` (CG_STATE_LEN doubles) live on the device:
//   cg_init(h)                               once
//   repeat: cg_matvec_f32_dD(p) -> partials  one pass over W
//           cg_update(partials)              one block: B p, alpha, x, r, rel, best, beta, p
//   (the host reads `state` every few steps; both kernels are no-ops once
//    state[CG_STATUS] != 0, so extra launches are harmless)
//   cg_finish -> u = D x_best
// This is solve::conjugate_gradient step for step: the best iterate
// (smallest relative residual, starting from x = 0 with residual 1) is kept,
// the solve stops on p.Bp <= 0 (or NaN), on rel <= tol, or after max_steps
// matvecs; the reported residual is state[CG_BEST_REL] and the solve has
// converged iff it is <= tol.
//
// state layout (doubles):
//   0 CG_RS        r.r of the current residual
//   1 CG_BNORM     ||h||
//   2 CG_BEST_REL  relative residual of x_best (what to report)
//   3 CG_REL       relative residual of the last iterate
//   4 CG_PAP       last p.Bp
//   5 CG_STEPS     matvecs spent (an integer)
//   6 CG_STATUS    0 running, 1 converged, 2 breakdown (p.Bp <= 0 or NaN),
//                  3 max_steps reached, 4 h = 0 (trivial: u = 0, converged)
//   7 (unused)
//
// Arguments of the _dD kernels, in order: w (m x D), c (k x D), then for
// adjoint_matvec, cg_matvec and weight_grad f (k x D, F(C) as above), then the
// rest as in each kernel's parameter list below.
//
// Launch configurations (BLOCK = 256; all shared memory is static: launch
// with 0 bytes of dynamic shared memory):
//   centroid_cotangent_f32_dD, adjoint_matvec_f32_dD, cg_matvec_f32_dD:
//       grid = any nb >= 1 (suggested min(1024, max(1, CEIL_DIV(m, 256)))),
//       block = 256; partials holds nb * k*d doubles.
//   weight_grad_f32_dD: grid = any (suggested min(CEIL_DIV(m, 8), 65535)), block = 256.
//   cg_init, cg_update, cg_finish: grid = 1, block = 1024 (any multiple of 32
//       up to 1024 works). cg_update reads num_partials * n doubles with one
//       block: with many blocks, first add them with reduce_partials and
//       pass its output with num_partials = 1.
// Requirements: 1 <= k <= 256, blockDim.x == 256 for the _dD kernels (else
// they trap); inv_tau = (1/tau) rounded to f32; euclidean = 0 (squared) or 1.

#include "common.cuh"

using namespace idkm;

enum CgState {
    CG_RS = 0,
    CG_BNORM = 1,
    CG_BEST_REL = 2,
    CG_REL = 3,
    CG_PAP = 4,
    CG_STEPS = 5,
    CG_STATUS = 6,
    CG_STATE_LEN = 8,
};
enum CgStatus { CG_RUNNING = 0, CG_CONVERGED = 1, CG_BREAKDOWN = 2, CG_MAX_STEPS = 3, CG_TRIVIAL = 4 };

__device__ __forceinline__ void check_launch(int k) {
    if (k < 1 || k > KMAX || blockDim.x != BLOCK) __trap();
}

// D_jj of the symmetrised system: S_j, or 1 for a dead centroid (backward.rs).
__device__ __forceinline__ double cg_scale(const double* mass, const double* inv_mass, int j) {
    return inv_mass[j] > 0.0 ? mass[j] : 1.0;
}

// ----------------------------------------------------------------------------
// centroid_cotangent

template <int D>
__device__ __forceinline__ void centroid_cotangent_body(const float* __restrict__ w_in, const float* __restrict__ c_in,
                                                        const float* __restrict__ g_in, int m, int k, float inv_tau,
                                                        bool euclidean, double* __restrict__ partials) {
    constexpr int SLOTS = D;  // ceil(KMAX * D / BLOCK)
    static_assert(KMAX * D <= SLOTS * BLOCK, "accumulator slots");
    constexpr int TILE_BYTES = (2 * TILE_ELEMS + 2 * TILE_ROWS_MAX * D) * 4;
    constexpr int RED_BYTES = SLOTS * BLOCK * 8;
    constexpr int SCRATCH = TILE_BYTES > RED_BYTES ? TILE_BYTES : RED_BYTES;
    __shared__ __align__(16) float cs[KMAX * D];
    __shared__ __align__(16) unsigned char scratch[SCRATCH];
    float* as = reinterpret_cast<float*>(scratch);  // R x k: a_ij
    float* ts = as + TILE_ELEMS;                      // R x k: coef_ij, then qc_ij coef_ij
    float* ws = ts + TILE_ELEMS;                      // R x D
    float* gs = ws + TILE_ROWS_MAX * D;               // R x D
    double* red = reinterpret_cast<double*>(scratch);

    check_launch(k);
    const int tid = threadIdx.x;
    for (int x = tid; x < k * D; x += BLOCK) cs[x] = c_in[x];
    const int G = group_lanes(k), lane = tid & (G - 1), group = tid / G, ngroups = BLOCK / G;
    const int R = tile_rows(k, ngroups);
    const int nacc = k * D;
    const int P = (SLOTS * BLOCK) / nacc;
    int start, end;
    block_rows(m, start, end);
    double acc[SLOTS];
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) acc[s] = 0.0;
    __syncthreads();

    for (int t0 = start; t0 < end; t0 += R) {
        const int nrows = min(R, end - t0);
        for (int r = group; r < R; r += ngroups) {
            const bool valid = r < nrows;
            float w[D], g[D];
            load_row<D>(w_in, t0 + r, valid, w);
            load_row<D>(g_in, t0 + r, valid, g);
            float* a = as + r * k;
            float* t = ts + r * k;
            attend_row<D, true>(w, cs, k, G, lane, inv_tau, euclidean, a, t);
            float mean = 0.f;  // sum_l a_il q_il, q_il = g_i . (c_l - w_i)
            for (int j = lane; j < k; j += G) {
                float cj[D];
                load_vec<D>(cs + j * D, cj);
                mean += a[j] * dot_gcw<D>(g, cj, w);
            }
            mean = group_sum(mean, G);
            for (int j = lane; j < k; j += G) {
                float cj[D];
                load_vec<D>(cs + j * D, cj);
                // qc_ij coef_ij as the twin rounds it: (a_ij coef_ij) (q_ij - qbar_i)
                t[j] = (a[j] * t[j]) * (dot_gcw<D>(g, cj, w) - mean);
            }
            if (lane == 0) {
#pragma unroll
                for (int e = 0; e < D; ++e) {
                    ws[r * D + e] = w[e];
                    gs[r * D + e] = g[e];
                }
            }
        }
        __syncthreads();
        // Accumulator x = j * D + e: h_je += a_ij g_ie - t_ij (w_ie - c_je).
#pragma unroll
        for (int s = 0; s < SLOTS; ++s) {
            const int v = tid + s * BLOCK;
            const int p = v / nacc, x = v - p * nacc;
            if (p < P) {
                const int j = x / D, e = x % D;
                const float cje = cs[x];
                for (int r = p; r < nrows; r += P) {
                    const float contrib = as[r * k + j] * gs[r * D + e] - ts[r * k + j] * (ws[r * D + e] - cje);
                    acc[s] += (double)contrib;
                }
            }
        }
        __syncthreads();
    }
    finish_partials<SLOTS>(acc, nacc, red, partials);
}

#define CENTROID_COTANGENT(D)                                                                   \
    extern "C" __global__ void __launch_bounds__(BLOCK, MIN_BLOCKS) centroid_cotangent_f32_d##D(            \
        const float* __restrict__ w,   /* m x D weights */                                      \
        const float* __restrict__ c,   /* k x D centroids (the fixed point) */                  \
        const float* __restrict__ g,   /* m x D upstream gradient dL/dWt */                     \
        const int m, const int k, const float inv_tau, const int euclidean,                     \
        double* __restrict__ partials  /* gridDim.x x k*D: per block partial h */               \
    ) {                                                                                         \
        centroid_cotangent_body<D>(w, c, g, m, k, inv_tau, euclidean != 0, partials);           \
    }
CENTROID_COTANGENT(1)
CENTROID_COTANGENT(2)
CENTROID_COTANGENT(4)
CENTROID_COTANGENT(8)

// ----------------------------------------------------------------------------
// adjoint_matvec and cg_matvec

// CG = false: v_j = u_j * inv_mass_j (adjoint_matvec, `u` = u).
// CG = true:  v_j = (p_j * scale_j) * inv_mass_j with scale_j = S_j or 1
//             (backward.rs: jt(D p)), `u` = p; no-op once the CG has stopped.
template <int D, bool CG>
__device__ __forceinline__ void adjoint_matvec_body(const float* __restrict__ w_in, const float* __restrict__ c_in,
                                                    const float* __restrict__ f_in, const double* __restrict__ mass,
                                                    const double* __restrict__ inv_mass,
                                                    const double* __restrict__ u, const double* __restrict__ state,
                                                    int m, int k, float inv_tau, bool euclidean,
                                                    double* __restrict__ partials) {
    constexpr int SLOTS = D;
    static_assert(KMAX * D <= SLOTS * BLOCK, "accumulator slots");
    constexpr int TILE_BYTES = (2 * TILE_ELEMS + TILE_ROWS_MAX * D) * 4;
    constexpr int RED_BYTES = SLOTS * BLOCK * 8;
    constexpr int SCRATCH = TILE_BYTES > RED_BYTES ? TILE_BYTES : RED_BYTES;
    __shared__ __align__(16) float cs[KMAX * D];  // c: logits and e_ij
    __shared__ __align__(16) float fs[KMAX * D];  // f = F(C): r_ij only
    __shared__ __align__(16) float vs[KMAX * D];
    __shared__ __align__(16) unsigned char scratch[SCRATCH];
    float* as = reinterpret_cast<float*>(scratch);  // R x k: a_ij
    float* ts = as + TILE_ELEMS;                      // R x k: coef_ij, then rc_ij coef_ij
    float* ws = ts + TILE_ELEMS;                      // R x D
    double* red = reinterpret_cast<double*>(scratch);

    if constexpr (CG) {
        if (state[CG_STATUS] != 0.0) return;  // uniform over the grid, before any barrier
    }
    check_launch(k);
    const int tid = threadIdx.x;
    for (int x = tid; x < k * D; x += BLOCK) {
        const int j = x / D;
        cs[x] = c_in[x];
        fs[x] = f_in[x];
        if constexpr (CG) {
            vs[x] = (float)((u[x] * cg_scale(mass, inv_mass, j)) * inv_mass[j]);
        } else {
            vs[x] = (float)(u[x] * inv_mass[j]);
        }
    }
    const int G = group_lanes(k), lane = tid & (G - 1), group = tid / G, ngroups = BLOCK / G;
    const int R = tile_rows(k, ngroups);
    const int nacc = k * D;
    const int P = (SLOTS * BLOCK) / nacc;
    int start, end;
    block_rows(m, start, end);
    double acc[SLOTS];
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) acc[s] = 0.0;
    __syncthreads();

    for (int t0 = start; t0 < end; t0 += R) {
        const int nrows = min(R, end - t0);
        for (int r = group; r < R; r += ngroups) {
            float w[D];
            load_row<D>(w_in, t0 + r, r < nrows, w);
            float* a = as + r * k;
            float* t = ts + r * k;
            attend_row<D, true>(w, cs, k, G, lane, inv_tau, euclidean, a, t);
            float mean = 0.f;  // sum_l a_il r_il, r_il = (w_i - f_l) . v_l
            for (int j = lane; j < k; j += G) {
                float fj[D], vj[D];
                load_vec<D>(fs + j * D, fj);
                load_vec<D>(vs + j * D, vj);
                mean += a[j] * dot_e<D>(w, fj, vj);
            }
            mean = group_sum(mean, G);
            for (int j = lane; j < k; j += G) {
                float fj[D], vj[D];
                load_vec<D>(fs + j * D, fj);
                load_vec<D>(vs + j * D, vj);
                // rc_ij coef_ij as the twin rounds it: (a_ij coef_ij) (r_ij - rbar_i)
                t[j] = (a[j] * t[j]) * (dot_e<D>(w, fj, vj) - mean);
            }
            if (lane == 0) {
#pragma unroll
                for (int e = 0; e < D; ++e) ws[r * D + e] = w[e];
            }
        }
        __syncthreads();
        // Accumulator x = j * D + e: out_je -= t_ij (w_ie - c_je) (e_ij from c, not f).
#pragma unroll
        for (int s = 0; s < SLOTS; ++s) {
            const int v = tid + s * BLOCK;
            const int p = v / nacc, x = v - p * nacc;
            if (p < P) {
                const int j = x / D, e = x % D;
                const float cje = cs[x];
                for (int r = p; r < nrows; r += P) acc[s] -= (double)(ts[r * k + j] * (ws[r * D + e] - cje));
            }
        }
        __syncthreads();
    }
    finish_partials<SLOTS>(acc, nacc, red, partials);
}

#define ADJOINT_MATVEC(D)                                                                         \
    extern "C" __global__ void __launch_bounds__(BLOCK, MIN_BLOCKS) adjoint_matvec_f32_d##D(                  \
        const float* __restrict__ w,          /* m x D weights */                                 \
        const float* __restrict__ c,          /* k x D centroids */                               \
        const float* __restrict__ f,          /* k x D F(C): k-means map at c (r-terms only) */   \
        const double* __restrict__ inv_mass,  /* k: 1/S_j, 0 for a dead centroid */               \
        const double* __restrict__ u,         /* k x D vector to multiply */                      \
        const int m, const int k, const float inv_tau, const int euclidean,                       \
        double* __restrict__ partials         /* gridDim.x x k*D: per block partial J^T u */      \
    ) {                                                                                           \
        adjoint_matvec_body<D, false>(w, c, f, nullptr, inv_mass, u, nullptr, m, k, inv_tau,      \
                                      euclidean != 0, partials);                                  \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(BLOCK, MIN_BLOCKS) cg_matvec_f32_d##D(                       \
        const float* __restrict__ w,          /* m x D weights */                                 \
        const float* __restrict__ c,          /* k x D centroids */                               \
        const float* __restrict__ f,          /* k x D F(C): k-means map at c (r-terms only) */   \
        const double* __restrict__ mass,      /* k: S_j */                                        \
        const double* __restrict__ inv_mass,  /* k: 1/S_j, 0 for a dead centroid */               \
        const double* __restrict__ p,         /* k x D CG search direction */                     \
        const double* __restrict__ state,     /* CG_STATE_LEN: read CG_STATUS only */             \
        const int m, const int k, const float inv_tau, const int euclidean,                       \
        double* __restrict__ partials         /* gridDim.x x k*D: per block partial J^T (D p) */  \
    ) {                                                                                           \
        adjoint_matvec_body<D, true>(w, c, f, mass, inv_mass, p, state, m, k, inv_tau,            \
                                     euclidean != 0, partials);                                   \
    }
ADJOINT_MATVEC(1)
ADJOINT_MATVEC(2)
ADJOINT_MATVEC(4)
ADJOINT_MATVEC(8)

// ----------------------------------------------------------------------------
// weight_grad

template <int D>
__device__ __forceinline__ void weight_grad_body(const float* __restrict__ w_in, const float* __restrict__ c_in,
                                                 const float* __restrict__ f_in, const float* __restrict__ g_in,
                                                 const double* __restrict__ inv_mass,
                                                 const double* __restrict__ u, int m, int k, float inv_tau,
                                                 bool euclidean, float* __restrict__ out) {
    __shared__ __align__(16) float cs[KMAX * D];  // c: logits, q_ij and e_ij
    __shared__ __align__(16) float fs[KMAX * D];  // f = F(C): r_ij only
    __shared__ __align__(16) float vs[KMAX * D];
    __shared__ __align__(16) float as[TILE_ELEMS];     // (BLOCK / G) x k: a_ij, one row per group
    __shared__ __align__(16) float coefs[TILE_ELEMS];  // (BLOCK / G) x k: coef_ij
    check_launch(k);
    const int tid = threadIdx.x;
    for (int x = tid; x < k * D; x += BLOCK) {
        cs[x] = c_in[x];
        fs[x] = f_in[x];
        vs[x] = (float)(u[x] * inv_mass[x / D]);
    }
    __syncthreads();
    const int G = group_lanes(k), lane = tid & (G - 1), group = tid / G, ngroups = BLOCK / G;
    float* a = as + group * k;
    float* coef = coefs + group * k;
    // base is uniform over the block: every warp runs the same iterations.
    for (long long base = (long long)blockIdx.x * ngroups; base < m; base += (long long)gridDim.x * ngroups) {
        const int i = (int)base + group;
        const bool valid = i < m;
        float w[D], g[D];
        load_row<D>(w_in, i, valid, w);
        load_row<D>(g_in, i, valid, g);
        attend_row<D, true>(w, cs, k, G, lane, inv_tau, euclidean, a, coef);
        // sum_l a_il q_il, sum_l a_il r_il (q_il = g_i . (c_l - w_i), r_il = (w_i - f_l) . v_l)
        float mq = 0.f, mr = 0.f;
        for (int j = lane; j < k; j += G) {
            float cj[D], fj[D], vj[D];
            load_vec<D>(cs + j * D, cj);
            load_vec<D>(fs + j * D, fj);
            load_vec<D>(vs + j * D, vj);
            mq += a[j] * dot_gcw<D>(g, cj, w);
            mr += a[j] * dot_e<D>(w, fj, vj);
        }
        mq = group_sum(mq, G);
        mr = group_sum(mr, G);
        float o[D];
#pragma unroll
        for (int e = 0; e < D; ++e) o[e] = 0.f;
        for (int j = lane; j < k; j += G) {
            float cj[D], fj[D], vj[D];
            load_vec<D>(cs + j * D, cj);
            load_vec<D>(fs + j * D, fj);
            load_vec<D>(vs + j * D, vj);
            const float aj = a[j];
            // (qc_ij + rc_ij) coef_ij as the twin rounds it, b_ij = a_ij coef_ij:
            // b_ij (q_ij - qbar_i) + b_ij (r_ij - rbar_i); times e_ij = w_i - c_j below.
            const float b = aj * coef[j];
            const float t = b * (dot_gcw<D>(g, cj, w) - mq) + b * (dot_e<D>(w, fj, vj) - mr);
#pragma unroll
            for (int e = 0; e < D; ++e) o[e] += t * (w[e] - cj[e]) + aj * vj[e];
        }
        group_sum_vec<D>(o, G);
        if (valid && lane == 0) {
#pragma unroll
            for (int e = 0; e < D; ++e) out[(size_t)i * D + e] = o[e];
        }
    }
}

#define WEIGHT_GRAD(D)                                                                        \
    extern "C" __global__ void __launch_bounds__(BLOCK, MIN_BLOCKS) weight_grad_f32_d##D(                 \
        const float* __restrict__ w,          /* m x D weights */                             \
        const float* __restrict__ c,          /* k x D centroids (the fixed point) */         \
        const float* __restrict__ f,          /* k x D F(C) at c: r-terms only */             \
        const float* __restrict__ g,          /* m x D upstream gradient dL/dWt */            \
        const double* __restrict__ inv_mass,  /* k: 1/S_j, 0 for a dead centroid */           \
        const double* __restrict__ u,         /* k x D adjoint (u = h for JFB) */             \
        const int m, const int k, const float inv_tau, const int euclidean,                   \
        float* __restrict__ out               /* m x D: dL/dW */                              \
    ) {                                                                                       \
        weight_grad_body<D>(w, c, f, g, inv_mass, u, m, k, inv_tau, euclidean != 0, out);     \
    }
WEIGHT_GRAD(1)
WEIGHT_GRAD(2)
WEIGHT_GRAD(4)
WEIGHT_GRAD(8)

// ----------------------------------------------------------------------------
// Conjugate gradient vector kernels (one block each)

extern "C" __global__ void cg_init(
    const double* __restrict__ h,  // n = k*d: right-hand side (the cotangent)
    const int n, const int max_steps,
    double* __restrict__ x,        // n: iterate, set to 0
    double* __restrict__ r,        // n: residual, set to h
    double* __restrict__ p,        // n: search direction, set to h
    double* __restrict__ x_best,   // n: best iterate, set to 0
    double* __restrict__ state     // CG_STATE_LEN
) {
    __shared__ double red[32];
    double local = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const double hi = h[i];
        x[i] = 0.0;
        r[i] = hi;
        p[i] = hi;
        x_best[i] = 0.0;
        local += hi * hi;
    }
    const double rs = block_sum(local, red);
    if (threadIdx.x == 0) {
        const double bnorm = sqrt(rs);
        const bool trivial = bnorm == 0.0;
        state[CG_RS] = rs;
        state[CG_BNORM] = bnorm;
        state[CG_BEST_REL] = trivial ? 0.0 : 1.0;
        state[CG_REL] = trivial ? 0.0 : 1.0;
        state[CG_PAP] = 0.0;
        state[CG_STEPS] = 0.0;
        state[CG_STATUS] = trivial ? CG_TRIVIAL : (max_steps <= 0 ? CG_MAX_STEPS : CG_RUNNING);
        state[7] = 0.0;
    }
}

extern "C" __global__ void cg_update(
    const double* __restrict__ partials,  // num_partials x n: J^T (D p) per block (cg_matvec)
    const int num_partials,
    const double* __restrict__ mass,      // k: S_j
    const double* __restrict__ inv_mass,  // k: 1/S_j, 0 for a dead centroid
    const int k, const int d, const double tol, const int max_steps,
    double* __restrict__ x,               // n = k*d: iterate v
    double* __restrict__ r,               // n: residual h - B x
    double* __restrict__ p,               // n: search direction
    double* __restrict__ x_best,          // n: iterate with the smallest residual
    double* __restrict__ state            // CG_STATE_LEN
) {
    __shared__ double bp[KMAX * 8];  // B p
    __shared__ double red[32];
    if (state[CG_STATUS] != 0.0) return;  // uniform, before any barrier
    const int n = k * d;
    if (n > KMAX * 8) __trap();
    const double rs = state[CG_RS], bnorm = state[CG_BNORM], best = state[CG_BEST_REL];
    const double steps = state[CG_STEPS] + 1.0;

    // B p = D p - J^T (D p), and p . B p.
    double local = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        double jt = 0.0;
        for (int b = 0; b < num_partials; ++b) jt += partials[(size_t)b * n + i];
        const double dp = p[i] * cg_scale(mass, inv_mass, i / d);
        const double api = dp - jt;
        bp[i] = api;
        local += p[i] * api;
    }
    const double pap = block_sum(local, red);  // also publishes bp to the block
    int status = CG_RUNNING;
    double rs_next = rs, rel = state[CG_REL];
    bool improved = false;
    if (!(pap > 0.0)) {
        status = CG_BREAKDOWN;  // not positive definite along p, or NaN
    } else {
        const double alpha = rs / pap;
        local = 0.0;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            x[i] += alpha * p[i];
            const double ri = r[i] - alpha * bp[i];
            r[i] = ri;
            local += ri * ri;
        }
        rs_next = block_sum(local, red);
        rel = sqrt(rs_next) / bnorm;
        improved = rel < best;
        if (improved)
            for (int i = threadIdx.x; i < n; i += blockDim.x) x_best[i] = x[i];
        if (rel <= tol) {
            status = CG_CONVERGED;
        } else if (steps >= (double)max_steps) {
            status = CG_MAX_STEPS;
        } else {
            const double beta = rs_next / rs;
            for (int i = threadIdx.x; i < n; i += blockDim.x) p[i] = r[i] + beta * p[i];
        }
    }
    __syncthreads();  // every thread has read state before it is written
    if (threadIdx.x == 0) {
        state[CG_RS] = rs_next;
        state[CG_REL] = rel;
        if (improved) state[CG_BEST_REL] = rel;
        state[CG_PAP] = pap;
        state[CG_STEPS] = steps;
        state[CG_STATUS] = (double)status;
    }
}

extern "C" __global__ void cg_finish(
    const double* __restrict__ mass,      // k: S_j
    const double* __restrict__ inv_mass,  // k: 1/S_j, 0 for a dead centroid
    const double* __restrict__ x_best,    // n = k*d: best CG iterate v
    const int k, const int d,
    double* __restrict__ u                // n: u = D v, the adjoint
) {
    for (int i = threadIdx.x; i < k * d; i += blockDim.x) u[i] = x_best[i] * cg_scale(mass, inv_mass, i / d);
}
