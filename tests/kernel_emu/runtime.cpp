// The fiber scheduler of the CUDA emulator (see cuda_emu.h) and its C ABI:
//
//   int emu_launch(const char* name, unsigned grid, unsigned block,
//                  unsigned shared_bytes, int order,
//                  void* const* args, const size_t* sizes, int nargs);
//       Runs kernel `name` (1-D grid and block) to completion; args as for
//       cuLaunchKernel, sizes[i] = the byte size of parameter i (checked).
//       order: 0 forward, 1 reverse, >= 2 a random permutation seeded with
//       `order` (fibers in each scheduling round, and blocks).
//       Returns 0, or 1 with emu_error() saying why.
//   const char* emu_error(void);   the last error of this OS thread
//
// Launches on different OS threads are independent (all state is thread_local).
#include "cuda_emu.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <vector>

extern "C" const emu::Entry* emu_table_soft_assign(int* n);
extern "C" const emu::Entry* emu_table_adjoint(int* n);
extern "C" const emu::Entry* emu_table_selftest(int* n);

namespace emu {
namespace {

constexpr std::size_t STACK_BYTES = 64 * 1024;  // per fiber, plus a guard page
constexpr unsigned MAX_THREADS = 1024;

enum State { RUNNABLE, AT_BARRIER, AT_SHUFFLE, DONE };

}  // namespace

struct Fiber {
    std::jmp_buf ctx;
    uint3 tid{0, 0, 0};
    State state = RUNNABLE;
    bool started = false;
    // Shuffle operands and result.
    std::uint64_t value = 0, result = 0;
    unsigned size = 0;
    int src = 0;
    // Where the fiber waits (barrier or shuffle).
    int line = 0;
    const char* file = "";
    char* stack = nullptr;  // lowest usable byte (above the guard page)
};

namespace {

struct Warp {
    int arrived = 0;  // lanes waiting at a shuffle
    int exited = 0;
    int line = 0;
    const char* file = "";
    unsigned size = 0;
};

struct Scheduler {
    std::jmp_buf ctx;
    ucontext_t boot;
    Fiber* cur = nullptr;
    Launch launch;
    Fiber fibers[MAX_THREADS];
    Warp warps[MAX_THREADS / 32];
    unsigned nthreads = 0;
    unsigned live = 0, exited = 0, at_barrier = 0;
    int barrier_line = 0;
    const char* barrier_file = "";
    void* kernel = nullptr;
    Thunk thunk = nullptr;
    void* const* args = nullptr;
    std::string error;
    std::size_t page = 0;

    ~Scheduler() {
        for (Fiber& f : fibers)
            if (f.stack) munmap(f.stack - page, STACK_BYTES + page);
    }
};

thread_local Scheduler S;

std::string format(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

// Back to the scheduler; returns when the scheduler resumes this fiber.
void yield(Fiber* f) {
    if (!_setjmp(f->ctx)) _longjmp(S.ctx, 1);
}

[[noreturn]] void abort_launch(std::string msg) {
    const Fiber* f = S.cur;
    S.error = format("block %u thread %u: ", S.launch.block_idx.x, f ? f->tid.x : 0u) + msg;
    _longjmp(S.ctx, 2);
}

const char* state_name(State s) {
    switch (s) {
        case RUNNABLE: return "runnable";
        case AT_BARRIER: return "at __syncthreads";
        case AT_SHUFFLE: return "at a shuffle";
        default: return "exited";
    }
}

void fiber_exit(Fiber* f) {
    if (S.at_barrier > 0)
        abort_launch(format("exits while %u thread(s) wait at __syncthreads (%s:%d): divergent barrier",
                            S.at_barrier, S.barrier_file, S.barrier_line));
    Warp& w = S.warps[f->tid.x / 32];
    if (w.arrived > 0)
        abort_launch(format("exits while %d lane(s) of its warp wait at a shuffle (%s:%d)", w.arrived, w.file, w.line));
    f->state = DONE;
    ++w.exited;
    ++S.exited;
    --S.live;
    _longjmp(S.ctx, 1);
}

void fiber_main() {
    Fiber* f = S.cur;
    S.thunk(S.kernel, S.args);
    fiber_exit(f);
}

void start(Fiber* f) {
    if (!f->stack) {
        char* base = static_cast<char*>(
            mmap(nullptr, STACK_BYTES + S.page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
        if (base == MAP_FAILED) abort_launch("mmap of a fiber stack failed");
        mprotect(base, S.page, PROT_NONE);  // guard: an overflow faults instead of corrupting
        f->stack = base + S.page;
    }
    getcontext(&S.boot);
    S.boot.uc_stack.ss_sp = f->stack;
    S.boot.uc_stack.ss_size = STACK_BYTES;
    S.boot.uc_link = nullptr;
    makecontext(&S.boot, fiber_main, 0);
    setcontext(&S.boot);
}

// xorshift64*: the random scheduling orders.
std::uint64_t next_random(std::uint64_t& s) {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 2685821657736338717ull;
}

void permute(std::vector<unsigned>& v, int order, std::uint64_t& rng) {
    for (unsigned i = 0; i < v.size(); ++i) v[i] = i;
    if (order == 1) {
        std::reverse(v.begin(), v.end());
    } else if (order >= 2) {
        for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[next_random(rng) % i]);
    }
}

std::string deadlock_report() {
    std::string s = "deadlock: no thread can run;";
    int shown = 0;
    for (unsigned t = 0; t < S.nthreads && shown < 8; ++t) {
        const Fiber& f = S.fibers[t];
        if (f.state == AT_BARRIER || f.state == AT_SHUFFLE) {
            s += format(" thread %u %s (%s:%d);", t, state_name(f.state), f.file, f.line);
            ++shown;
        }
    }
    return s;
}

// Runs block S.launch.block_idx to completion. False on an error (S.error).
bool run_block(int order, std::uint64_t& rng) {
    S.live = S.nthreads;
    S.exited = S.at_barrier = 0;
    for (unsigned t = 0; t < S.nthreads; ++t) {
        Fiber& f = S.fibers[t];
        f.tid = uint3{t, 0, 0};
        f.state = RUNNABLE;
        f.started = false;
    }
    for (unsigned w = 0; w < (S.nthreads + 31) / 32; ++w) S.warps[w] = Warp{};
    std::vector<unsigned> sequence(S.nthreads);
    for (;;) {
        permute(sequence, order, rng);
        bool ran = false;
        for (unsigned t : sequence) {
            Fiber* f = &S.fibers[t];
            if (f->state != RUNNABLE) continue;
            ran = true;
            S.cur = f;
            switch (_setjmp(S.ctx)) {
                case 0:
                    if (!f->started) {
                        f->started = true;
                        start(f);
                    }
                    _longjmp(f->ctx, 1);
                case 1:
                    break;
                default:
                    S.cur = nullptr;
                    return false;
            }
            S.cur = nullptr;
        }
        if (S.live == 0) return true;
        if (!ran) {
            S.error = format("block %u: ", S.launch.block_idx.x) + deadlock_report();
            return false;
        }
    }
}

}  // namespace

Launch& launch_state() { return S.launch; }

Fiber* current() { return S.cur; }

const uint3& thread_idx(Fiber* f) {
    if (!f) {
        std::fprintf(stderr, "cuda_emu: threadIdx read outside a kernel\n");
        std::abort();
    }
    return f->tid;
}

void fail(const char* what, int line, const char* file) {
    if (!S.cur) {
        std::fprintf(stderr, "cuda_emu: %s (%s:%d) outside a kernel\n", what, file, line);
        std::abort();
    }
    abort_launch(format("%s at %s:%d", what, file, line));
}

void syncthreads(int line, const char* file) {
    Fiber* f = S.cur;
    if (S.exited > 0)
        abort_launch(format("__syncthreads at %s:%d after %u thread(s) of the block exited: divergent barrier", file,
                            line, S.exited));
    if (S.at_barrier == 0) {
        S.barrier_line = line;
        S.barrier_file = file;
    } else if (line != S.barrier_line || std::strcmp(file, S.barrier_file) != 0) {
        abort_launch(format("__syncthreads at %s:%d while %u thread(s) wait at %s:%d: divergent barriers", file, line,
                            S.at_barrier, S.barrier_file, S.barrier_line));
    }
    f->state = AT_BARRIER;
    f->line = line;
    f->file = file;
    if (++S.at_barrier == S.live) {
        for (unsigned t = 0; t < S.nthreads; ++t)
            if (S.fibers[t].state == AT_BARRIER) S.fibers[t].state = RUNNABLE;
        S.at_barrier = 0;
    }
    yield(f);
}

std::uint64_t shuffle(std::uint64_t bits, unsigned size, unsigned mask, int src_lane, int line, const char* file) {
    Fiber* f = S.cur;
    if (mask != 0xffffffffu) abort_launch(format("shuffle at %s:%d with mask %#x: only full warps are emulated", file, line, mask));
    if (S.nthreads % 32 != 0) abort_launch(format("shuffle at %s:%d in a block of %u threads", file, line, S.nthreads));
    Warp& w = S.warps[f->tid.x / 32];
    if (w.exited > 0)
        abort_launch(format("shuffle at %s:%d after %d lane(s) of the warp exited", file, line, w.exited));
    if (w.arrived == 0) {
        w.line = line;
        w.file = file;
        w.size = size;
    } else if (line != w.line || std::strcmp(file, w.file) != 0 || size != w.size) {
        abort_launch(format("shuffle at %s:%d (%u bytes) while %d lane(s) of the warp wait at %s:%d (%u bytes): "
                            "divergent warp",
                            file, line, size, w.arrived, w.file, w.line, w.size));
    }
    f->value = bits;
    f->src = src_lane;
    f->state = AT_SHUFFLE;
    f->line = line;
    f->file = file;
    if (++w.arrived == 32) {
        Fiber* lanes = &S.fibers[f->tid.x & ~31u];
        for (int l = 0; l < 32; ++l) {
            lanes[l].result = lanes[lanes[l].src].value;
            lanes[l].state = RUNNABLE;
        }
        w.arrived = 0;
    }
    yield(f);
    return f->result;
}

}  // namespace emu

using namespace emu;

static const Entry* find_kernel(const char* name) {
    for (auto table : {emu_table_soft_assign, emu_table_adjoint, emu_table_selftest}) {
        int n = 0;
        const Entry* e = table(&n);
        for (int i = 0; i < n; ++i)
            if (std::strcmp(e[i].name, name) == 0) return &e[i];
    }
    return nullptr;
}

extern "C" const char* emu_error(void) { return S.error.c_str(); }

extern "C" int emu_launch(const char* name, unsigned grid, unsigned block, unsigned shared_bytes, int order,
                          void* const* args, const std::size_t* sizes, int nargs) {
    S.error.clear();
    const Entry* e = find_kernel(name);
    if (!e) {
        S.error = format("no kernel named %s", name);
        return 1;
    }
    if (nargs != e->nargs) {
        S.error = format("%s takes %d arguments, got %d", name, e->nargs, nargs);
        return 1;
    }
    for (int i = 0; i < nargs; ++i) {
        if (sizes[i] != e->sizes[i]) {
            S.error = format("%s: argument %d has %zu bytes, the kernel takes %zu", name, i, sizes[i], e->sizes[i]);
            return 1;
        }
    }
    if (grid == 0 || block == 0 || block > MAX_THREADS) {
        S.error = format("%s: launch of %u blocks of %u threads", name, grid, block);
        return 1;
    }
    if (shared_bytes != 0) {
        S.error = format("%s: %u bytes of dynamic shared memory (not emulated; the kernels use static shared memory)",
                         name, shared_bytes);
        return 1;
    }
    if (S.page == 0) S.page = (std::size_t)sysconf(_SC_PAGESIZE);
    S.kernel = e->kernel;
    S.thunk = e->thunk;
    S.args = args;
    S.nthreads = block;
    S.launch.block_dim = uint3{block, 1, 1};
    S.launch.grid_dim = uint3{grid, 1, 1};
    std::uint64_t rng = 0x9e3779b97f4a7c15ull ^ (std::uint64_t)order;
    std::vector<unsigned> blocks(grid);
    permute(blocks, order, rng);
    for (unsigned b : blocks) {
        S.launch.block_idx = uint3{b, 0, 0};
        if (!run_block(order, rng)) {
            S.error = std::string(name) + ": " + S.error;
            return 1;
        }
    }
    return 0;
}
