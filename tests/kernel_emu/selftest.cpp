// Small kernels with known defects, to check that the emulator (cuda_emu.h)
// finds them: tests/kernel_emu.rs, `emulator_*` tests.
#include "cuda_emu.h"

// Each thread writes its id to shared memory and reads its right neighbour's
// id. With the barrier (`with_barrier` = 1) out[i] = (i + 1) % n in any
// order; without it the result depends on the order of the threads.
extern "C" __global__ void selftest_neighbour(int with_barrier, int* out) {
    __shared__ int ids[1024];
    const int t = threadIdx.x, n = blockDim.x;
    ids[t] = -1;
    __syncthreads();
    // A shuffle (a warp-level yield point) between the write and the read.
    const int v = __shfl_xor_sync(0xffffffffu, t, 1);
    ids[t] = v ^ 1;
    if (with_barrier) __syncthreads();
    out[blockIdx.x * n + t] = ids[(t + 1) % n];
}

// A barrier reached by the first warp only.
extern "C" __global__ void selftest_divergent_barrier(int* out) {
    if (threadIdx.x < 32) __syncthreads();
    out[threadIdx.x] = 1;
}

// Threads of one warp at two different shuffles.
extern "C" __global__ void selftest_divergent_shuffle(int* out) {
    int v = threadIdx.x;
    if (threadIdx.x & 1)
        v = __shfl_xor_sync(0xffffffffu, v, 2);
    else
        v = __shfl_xor_sync(0xffffffffu, v, 4);
    out[threadIdx.x] = v;
}

// Warp sums with xor shuffles (float and double), written by lane 0.
extern "C" __global__ void selftest_warp_sum(const double* x, double* out) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    double v = x[t];
    float f = (float)x[t];
    for (int off = 16; off > 0; off >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, off);
        f += __shfl_xor_sync(0xffffffffu, f, off);
    }
    if ((threadIdx.x & 31) == 0) {
        out[2 * (t / 32)] = v;
        out[2 * (t / 32) + 1] = f;
    }
}

// __trap on a bad argument.
extern "C" __global__ void selftest_trap(int bad) {
    if (bad) __trap();
}

EMU_KERNEL_TABLE(emu_table_selftest, EMU_KERNEL(selftest_neighbour) EMU_KERNEL(selftest_divergent_barrier)
                                         EMU_KERNEL(selftest_divergent_shuffle) EMU_KERNEL(selftest_warp_sum)
                                         EMU_KERNEL(selftest_trap))
