// A CUDA emulator for the CPU, just large enough to run the unmodified
// kernels/*.cu under g++ (C++17) in an ordinary `cargo test`
// (tests/kernel_emu.rs builds tests/kernel_emu/*.cpp into a shared object).
//
// Execution model. A launch runs the blocks one after another on the calling
// OS thread. The threads of a block are fibers (one small mmap'd stack each,
// started with makecontext, switched with _setjmp/_longjmp: no system call
// per switch). A fiber runs until it reaches a barrier, a warp shuffle or its
// end, then the scheduler resumes the next runnable fiber, visiting the
// fibers in the launch's order (forward, reverse, or a seeded random
// permutation per round): a missing barrier shows up as a result that depends
// on the order.
//
//   __syncthreads     completes when every thread of the block has reached it,
//                     all at the same source line; a barrier reached after a
//                     thread of the block exited, or a thread exiting while
//                     others wait at a barrier, is an error (divergence).
//   __shfl_xor_sync   completes when all 32 lanes of the warp have reached it,
//                     at the same source line, with the full mask.
//   __shared__        `static thread_local`: one copy per kernel (per template
//                     instance) and OS thread, shared by the fibers of a block;
//                     the blocks of a launch run one after another.
//   __trap            fails the launch with a message.
// Errors abort the launch: emu_launch returns nonzero and emu_error() says why.
// Nothing is fused: compile with -ffp-contract=off (the twins never fuse).
#pragma once

#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

// ----------------------------------------------------------------------------
// CUDA keywords and types

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static thread_local

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
struct __attribute__((aligned(8))) float2 {
    float x, y;
};
struct __attribute__((aligned(16))) float4 {
    float x, y, z, w;
};

namespace emu {

struct Fiber;

// The state of the launch running on this OS thread.
struct Launch {
    uint3 block_idx{0, 0, 0};
    uint3 block_dim{1, 1, 1};
    uint3 grid_dim{1, 1, 1};
};

Launch& launch_state();
Fiber* current();
const uint3& thread_idx(Fiber* f);

// Fiber-side entry points (runtime.cpp).
[[noreturn]] void fail(const char* what, int line, const char* file);
void syncthreads(int line, const char* file);
std::uint64_t shuffle(std::uint64_t bits, unsigned size, unsigned mask, int src_lane, int line, const char* file);

template <typename T>
inline T shfl_xor(int line, const char* file, unsigned mask, T v, int lane_mask, int width = 32) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a scalar");
    if (width != 32) fail("__shfl_xor_sync with width != 32 is not emulated", line, file);
    const int lane = (int)(thread_idx(current()).x & 31);
    std::uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bits = shuffle(bits, sizeof(T), mask, lane ^ (lane_mask & 31), line, file);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

template <typename T>
inline T shfl_down(int line, const char* file, unsigned mask, T v, unsigned delta, int width = 32) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a scalar");
    if (width != 32) fail("__shfl_down_sync with width != 32 is not emulated", line, file);
    const int lane = (int)(thread_idx(current()).x & 31);
    const int src = lane + (int)delta < 32 ? lane + (int)delta : lane;
    std::uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bits = shuffle(bits, sizeof(T), mask, src, line, file);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

}  // namespace emu

#define threadIdx (::emu::thread_idx(::emu::current()))
#define blockIdx (::emu::launch_state().block_idx)
#define blockDim (::emu::launch_state().block_dim)
#define gridDim (::emu::launch_state().grid_dim)

#define __syncthreads() ::emu::syncthreads(__LINE__, __FILE__)
#define __shfl_xor_sync(...) ::emu::shfl_xor(__LINE__, __FILE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::emu::shfl_down(__LINE__, __FILE__, __VA_ARGS__)
#define __trap() ::emu::fail("__trap()", __LINE__, __FILE__)

// ----------------------------------------------------------------------------
// Device functions (IEEE, unfused: the kernels are built without fast math)

using std::isfinite;
using std::sqrt;

inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }

template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
    return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
    return a < b ? b : a;
}

// Fibers of one OS thread never run concurrently: a read-modify-write is atomic.
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    const unsigned long long old = *p;
    if (v < old) *p = v;
    return old;
}
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
    const unsigned int old = *p;
    *p = old + v;
    return old;
}

// ----------------------------------------------------------------------------
// Kernel tables: each kernels/*.cu is compiled in its own translation unit
// (they define the same helper names), which lists its entry points with
// EMU_KERNEL_TABLE. emu_launch finds a kernel by name and calls it with the
// argument array of cuLaunchKernel: args[i] points at parameter i, whose size
// must be sizes[i].

namespace emu {

using Thunk = void (*)(void* kernel, void* const* args);

struct Entry {
    const char* name;
    void* kernel;
    Thunk thunk;
    int nargs;
    const std::size_t* sizes;
};

template <typename... A>
struct Signature {
    static constexpr std::size_t sizes[sizeof...(A) + 1] = {sizeof(A)..., 0};

    template <std::size_t... I>
    static void call(void (*k)(A...), void* const* args, std::index_sequence<I...>) {
        k(*static_cast<std::remove_cv_t<A>*>(args[I])...);
    }

    static void thunk(void* kernel, void* const* args) {
        call(reinterpret_cast<void (*)(A...)>(kernel), args, std::index_sequence_for<A...>{});
    }
};

template <typename... A>
inline Entry entry(const char* name, void (*k)(A...)) {
    return Entry{name, reinterpret_cast<void*>(k), &Signature<A...>::thunk, (int)sizeof...(A), Signature<A...>::sizes};
}

}  // namespace emu

#define EMU_KERNEL(name) ::emu::entry(#name, &name),
#define EMU_KERNEL_TABLE(table, ...)                                             \
    extern "C" const ::emu::Entry* table(int* n) {                             \
        static const ::emu::Entry entries[] = {__VA_ARGS__};                   \
        *n = (int)(sizeof(entries) / sizeof(entries[0]));                      \
        return entries;                                                        \
    }
