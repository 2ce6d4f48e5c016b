// Over 800 lines: one check per kernel, each with its launch sequence, on one emulator binding.
//! The CUDA kernels (kernels/*.cu, unmodified) run on the CPU by an emulator
//! (tests/kernel_emu/: fibers for the threads of a block, real barriers and
//! warp shuffles, divergence detection) against their Rust twins in
//! `streaming`, with the launch sequences of src/cluster/cuda.rs. Needs a
//! C++17 compiler (`c++`, or `$CXX`): the test builds the emulator into a
//! shared object under the cargo target directory and loads it with dlopen.
//!
//! Every launch runs twice, with the threads of each block resumed in forward
//! and in reverse order (and some in a random order): the kernels are
//! deterministic, so the outputs must agree bit for bit, and a missing
//! barrier shows up as a difference. Outputs are poisoned (NaN, u32::MAX)
//! before each launch.
//!
//! What an emulator cannot show: real warp scheduling and independent thread
//! scheduling, the memory model (visibility without a barrier between
//! blocks, caching), occupancy, register pressure or timing, out-of-bounds
//! accesses (no bounds checks), reads of uninitialised shared memory (shared
//! arrays persist between blocks here), nvcc's FMA contraction (the emulator
//! never fuses), and CUDA's expf/sqrtf (here the C library's). The GPU checks
//! (tests/gpu.rs) remain the ground truth on a real device.

mod common;

use common::{rel_poisoned as rel, wide, KernelCase as Case};
use idkm::cluster::backward::{self, BackwardConfig};
use idkm::cluster::streaming::{self as pass, Geometry, Moments};
use idkm::cluster::{Distance, Method, Solver};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Relative error bound of a kernel against its twin (as tests/gpu.rs).
const KERNEL_TOL: f64 = 1e-5;

// ----------------------------------------------------------------------------
// The emulator: build, load, launch

type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    c_uint,
    c_uint,
    c_uint,
    c_int,
    *const *mut c_void,
    *const usize,
    c_int,
) -> c_int;
type ErrorFn = unsafe extern "C" fn() -> *const c_char;

struct Emu {
    launch: LaunchFn,
    error: ErrorFn,
}

fn emu() -> &'static Emu {
    static EMU: OnceLock<Emu> = OnceLock::new();
    EMU.get_or_init(build)
}

/// Compiles tests/kernel_emu/*.cpp (which include kernels/*.cu) into a
/// shared object and loads it.
fn build() -> Emu {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("tests/kernel_emu");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel_emu");
    std::fs::create_dir_all(&out).expect("create the emulator's build directory");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let flags = [
        "-std=c++17",
        "-O2",
        "-fPIC",
        "-ffp-contract=off",
        "-fno-strict-aliasing",
        "-U_FORTIFY_SOURCE",
        "-Wall",
        "-Wno-unknown-pragmas",
        "-Werror",
    ];
    let pid = std::process::id();
    let units = ["runtime", "soft_assign", "adjoint", "selftest"];
    let objects: Vec<PathBuf> = units
        .iter()
        .map(|u| out.join(format!("{u}.{pid}.o")))
        .collect();
    let children: Vec<_> = units
        .iter()
        .zip(&objects)
        .map(|(unit, obj)| {
            let mut cmd = Command::new(&cxx);
            cmd.args(flags).arg("-I").arg(root.join("kernels")).arg("-c").arg(src.join(format!("{unit}.cpp")));
            cmd.arg("-o").arg(obj);
            let child = cmd.spawn().unwrap_or_else(|e| {
                panic!(
                    "the kernel emulator needs a C++17 compiler, but `{cxx}` could not be run ({e}); \
                     install one (Debian: apt-get install g++) or set CXX"
                )
            });
            (unit, child)
        })
        .collect();
    for (unit, child) in children {
        let status = child
            .wait_with_output()
            .expect("wait for the C++ compiler")
            .status;
        assert!(
            status.success(),
            "`{cxx}` failed on tests/kernel_emu/{unit}.cpp ({status}); see its output above"
        );
    }
    let lib = out.join(format!("libkernel_emu.{pid}.so"));
    let status = Command::new(&cxx)
        .arg("-shared")
        .arg("-o")
        .arg(&lib)
        .args(&objects)
        .status()
        .expect("run the linker");
    assert!(
        status.success(),
        "linking the kernel emulator failed ({status})"
    );
    let path = CString::new(lib.to_str().expect("UTF-8 path")).unwrap();
    // SAFETY: dlopen/dlsym with valid C strings; the symbols have the
    // signatures declared above (tests/kernel_emu/runtime.cpp).
    let emu = unsafe {
        let handle = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        assert!(
            !handle.is_null(),
            "dlopen {}: {:?}",
            lib.display(),
            CStr::from_ptr(libc::dlerror())
        );
        let sym = |name: &CStr| {
            let p = libc::dlsym(handle, name.as_ptr());
            assert!(!p.is_null(), "{name:?} missing from the emulator");
            p
        };
        Emu {
            launch: std::mem::transmute::<*mut c_void, LaunchFn>(sym(c"emu_launch")),
            error: std::mem::transmute::<*mut c_void, ErrorFn>(sym(c"emu_error")),
        }
    };
    for file in objects.iter().chain([&lib]) {
        let _ = std::fs::remove_file(file);
    }
    emu
}

/// The arguments of one launch, as cudarc's launch builder takes them
/// (`b.arg(...)` in cuda.rs): scalars by value, buffers as raw pointers.
#[derive(Default)]
struct Args {
    words: Vec<u64>,
    sizes: Vec<usize>,
}

impl Args {
    fn arg<V: Copy>(&mut self, v: V) -> &mut Self {
        let size = std::mem::size_of::<V>();
        assert!(size <= 8, "argument of {size} bytes");
        let mut word = 0u64;
        // SAFETY: copies the `size` bytes of `v` into the 8-byte word.
        unsafe {
            std::ptr::copy_nonoverlapping(
                &v as *const V as *const u8,
                &mut word as *mut u64 as *mut u8,
                size,
            )
        };
        self.words.push(word);
        self.sizes.push(size);
        self
    }

    /// A device buffer the kernel reads.
    fn buf<T>(&mut self, x: &[T]) -> &mut Self {
        self.arg(x.as_ptr())
    }

    /// A device buffer the kernel writes.
    fn out<T>(&mut self, x: &mut [T]) -> &mut Self {
        self.arg(x.as_mut_ptr())
    }
}

/// Order in which the emulator resumes the threads of a block (and the blocks).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Order {
    Forward,
    Reverse,
    Random(u32),
}

impl Order {
    fn code(self) -> c_int {
        match self {
            Order::Forward => 0,
            Order::Reverse => 1,
            Order::Random(seed) => 2 + seed as c_int,
        }
    }
}

/// Runs `kernel` on `grid` blocks of `block` threads (0 bytes of dynamic
/// shared memory, as cuda.rs's launch_cfg).
fn launch(kernel: &str, grid: usize, block: u32, order: Order, args: &Args) -> Result<(), String> {
    let e = emu();
    let name = CString::new(kernel).unwrap();
    let ptrs: Vec<*mut c_void> = args
        .words
        .iter()
        .map(|w| w as *const u64 as *mut c_void)
        .collect();
    // SAFETY: every pointer argument points at a live buffer of the size the
    // kernel's contract asks for (the callers mirror cuda.rs); the emulator
    // checks the number and sizes of the arguments.
    let rc = unsafe {
        (e.launch)(
            name.as_ptr(),
            grid as c_uint,
            block,
            0,
            order.code(),
            ptrs.as_ptr(),
            args.sizes.as_ptr(),
            ptrs.len() as c_int,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        // SAFETY: emu_error returns this thread's NUL-terminated message.
        Err(unsafe { CStr::from_ptr((e.error)()) }
            .to_string_lossy()
            .into_owned())
    }
}

/// [`launch`], panicking on an emulator error (divergence, trap, ...).
fn run(kernel: &str, grid: usize, block: u32, order: Order, args: &Args) {
    if let Err(e) = launch(kernel, grid, block, order, args) {
        panic!("{kernel} (order {order:?}): {e}");
    }
}

// ----------------------------------------------------------------------------
// Launch geometry (src/cluster/cuda.rs)

const BLOCK: u32 = 256;
const CG_BLOCK: u32 = 1024;
const MAX_REDUCE_BLOCKS: usize = 1024;
const MAX_ROW_BLOCKS: usize = 65535;
const CG_CHECK_EVERY: usize = 4;
const CG_STATE_LEN: usize = 8;
const CG_BEST_REL: usize = 2;
const CG_STEPS: usize = 5;
const CG_STATUS: usize = 6;

/// A problem as cuda.rs's `Problem` sees it.
#[derive(Clone, Copy)]
struct Shape {
    m: usize,
    k: usize,
    d: usize,
    inv_tau: f32,
    euclidean: i32,
}

impl Shape {
    fn of(m: usize, geo: &Geometry) -> Self {
        Self {
            m,
            k: geo.k,
            d: geo.d,
            inv_tau: (1.0 / geo.tau) as f32,
            euclidean: i32::from(geo.distance == Distance::Euclidean),
        }
    }

    fn kernel(&self, name: &str) -> String {
        format!("{name}_f32_d{}", self.d)
    }

    fn n(&self) -> usize {
        self.k * self.d
    }

    fn reduce_blocks(&self) -> usize {
        self.m.div_ceil(BLOCK as usize).clamp(1, MAX_REDUCE_BLOCKS)
    }

    fn row_blocks(&self) -> usize {
        let mut g = 2;
        while g < self.k && g < 32 {
            g <<= 1;
        }
        self.m.div_ceil(BLOCK as usize / g).clamp(1, MAX_ROW_BLOCKS)
    }
}

// ----------------------------------------------------------------------------
// The launch sequences of cuda.rs, on host buffers

/// cuda.rs `reduce_partials`.
fn reduce_partials(order: Order, partials: &[f64], blocks: usize, len: usize) -> Vec<f64> {
    let mut out = vec![f64::NAN; len];
    let mut a = Args::default();
    a.buf(partials)
        .arg(blocks as i32)
        .arg(len as i32)
        .out(&mut out);
    run(
        "reduce_partials",
        len.div_ceil(BLOCK as usize),
        BLOCK,
        order,
        &a,
    );
    out
}

/// cuda.rs `soft_assign_reduce`: the kernel, then reduce_partials.
fn soft_assign_reduce(order: Order, p: &Shape, w: &[f32], c: &[f32]) -> Vec<f64> {
    let (len, nb) = (p.k * (p.d + 1), p.reduce_blocks());
    let mut partials = vec![f64::NAN; nb * len];
    let mut a = Args::default();
    a.buf(w)
        .buf(c)
        .arg(p.m as i32)
        .arg(p.k as i32)
        .arg(p.inv_tau)
        .arg(p.euclidean)
        .out(&mut partials);
    run(&p.kernel("soft_assign_reduce"), nb, BLOCK, order, &a);
    reduce_partials(order, &partials, nb, len)
}

/// cuda.rs `kmeans_update`: (next, shift, converged).
fn kmeans_update(
    order: Order,
    p: &Shape,
    sums: &[f64],
    c: &[f32],
    tol: f64,
) -> (Vec<f32>, f64, u32) {
    let (mut next, mut shift, mut converged) = (vec![f32::NAN; p.n()], [f64::NAN], [u32::MAX]);
    let mut a = Args::default();
    a.buf(sums)
        .buf(c)
        .arg(p.k as i32)
        .arg(p.d as i32)
        .arg(tol)
        .out(&mut next)
        .out(&mut shift)
        .out(&mut converged);
    run("kmeans_update", 1, BLOCK, order, &a);
    (next, shift[0], converged[0])
}

/// cuda.rs `inverse_mass`.
fn inverse_mass(order: Order, p: &Shape, sums: &[f64]) -> Vec<f64> {
    let mut inv = vec![f64::NAN; p.k];
    let mut a = Args::default();
    a.buf(sums).arg(p.k as i32).out(&mut inv);
    run(
        "inverse_mass",
        p.k.div_ceil(BLOCK as usize),
        BLOCK,
        order,
        &a,
    );
    inv
}

/// cuda.rs `fixed_point`: (centroids, steps, last shift).
fn fixed_point(
    order: Order,
    p: &Shape,
    w: &[f32],
    c0: &[f32],
    max_iter: usize,
    tol: f64,
) -> (Vec<f32>, usize, f64) {
    let mut c = c0.to_vec();
    let (mut shift, mut steps) = (f64::INFINITY, 0);
    while steps < max_iter {
        let sums = soft_assign_reduce(order, p, w, &c);
        let (next, s, _) = kmeans_update(order, p, &sums, &c, tol);
        c = next;
        steps += 1;
        shift = s;
        if shift <= tol {
            break;
        }
    }
    (c, steps, shift)
}

/// cuda.rs `soft_assign_output` (`grid`: `None` for cuda.rs's grid).
fn soft_assign_output(
    order: Order,
    p: &Shape,
    w: &[f32],
    c: &[f32],
    grid: Option<usize>,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; p.m * p.d];
    let mut a = Args::default();
    a.buf(w)
        .buf(c)
        .arg(p.m as i32)
        .arg(p.k as i32)
        .arg(p.inv_tau)
        .arg(p.euclidean)
        .out(&mut out);
    run(
        &p.kernel("soft_assign_output"),
        grid.unwrap_or(p.row_blocks()),
        BLOCK,
        order,
        &a,
    );
    out
}

/// cuda.rs `hard_assign` (`grid`: `None` for cuda.rs's grid).
fn hard_assign(order: Order, p: &Shape, w: &[f32], c: &[f32], grid: Option<usize>) -> Vec<u32> {
    let mut out = vec![u32::MAX; p.m];
    let mut a = Args::default();
    a.buf(w)
        .buf(c)
        .arg(p.m as i32)
        .arg(p.k as i32)
        .out(&mut out);
    let grid = grid.unwrap_or(p.m.div_ceil(BLOCK as usize).clamp(1, MAX_ROW_BLOCKS));
    run(&p.kernel("hard_assign"), grid, BLOCK, order, &a);
    out
}

/// cuda.rs `check_finite`: the first non-finite index, or u64::MAX.
fn first_non_finite(order: Order, x: &[f32]) -> u64 {
    let mut first = [u64::MAX];
    let mut a = Args::default();
    a.buf(x).arg(x.len() as u64).out(&mut first);
    run(
        "first_non_finite_f32",
        x.len().div_ceil(BLOCK as usize).clamp(1, MAX_REDUCE_BLOCKS),
        BLOCK,
        order,
        &a,
    );
    first[0]
}

/// cuda.rs `centroid_cotangent`: the kernel, then reduce_partials.
fn centroid_cotangent(order: Order, p: &Shape, w: &[f32], c: &[f32], g: &[f32]) -> Vec<f64> {
    let nb = p.reduce_blocks();
    let mut partials = vec![f64::NAN; nb * p.n()];
    let mut a = Args::default();
    a.buf(w)
        .buf(c)
        .buf(g)
        .arg(p.m as i32)
        .arg(p.k as i32)
        .arg(p.inv_tau)
        .arg(p.euclidean)
        .out(&mut partials);
    run(&p.kernel("centroid_cotangent"), nb, BLOCK, order, &a);
    reduce_partials(order, &partials, nb, p.n())
}

/// cuda.rs `adjoint_matvec`: the kernel, then reduce_partials.
#[allow(clippy::too_many_arguments)]
fn adjoint_matvec(
    order: Order,
    p: &Shape,
    w: &[f32],
    c: &[f32],
    f: &[f32],
    inv_mass: &[f64],
    u: &[f64],
) -> Vec<f64> {
    let nb = p.reduce_blocks();
    let mut partials = vec![f64::NAN; nb * p.n()];
    let mut a = Args::default();
    a.buf(w).buf(c).buf(f).buf(inv_mass).buf(u);
    a.arg(p.m as i32)
        .arg(p.k as i32)
        .arg(p.inv_tau)
        .arg(p.euclidean)
        .out(&mut partials);
    run(&p.kernel("adjoint_matvec"), nb, BLOCK, order, &a);
    reduce_partials(order, &partials, nb, p.n())
}

/// cuda.rs `weight_grad` (`grid`: `None` for cuda.rs's grid).
#[allow(clippy::too_many_arguments)]
fn weight_grad(
    order: Order,
    p: &Shape,
    w: &[f32],
    c: &[f32],
    f: &[f32],
    g: &[f32],
    inv_mass: &[f64],
    u: &[f64],
    grid: Option<usize>,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; p.m * p.d];
    let mut a = Args::default();
    a.buf(w).buf(c).buf(f).buf(g).buf(inv_mass).buf(u);
    a.arg(p.m as i32)
        .arg(p.k as i32)
        .arg(p.inv_tau)
        .arg(p.euclidean)
        .out(&mut out);
    run(
        &p.kernel("weight_grad"),
        grid.unwrap_or(p.row_blocks()),
        BLOCK,
        order,
        &a,
    );
    out
}

/// cuda.rs `AtFixedPoint::new`: (sums, inv_mass, f).
fn at_fixed_point(order: Order, p: &Shape, w: &[f32], c: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f32>) {
    let sums = soft_assign_reduce(order, p, w, c);
    let inv = inverse_mass(order, p, &sums);
    let (f, _, _) = kmeans_update(order, p, &sums, c, 0.0);
    (sums, inv, f)
}

/// What the device CG returns: u = D x_best and the final state.
struct DeviceCg {
    u: Vec<f64>,
    steps: usize,
    rel: f64,
}

/// cuda.rs `conjugate_gradient`: cg_init, then per step cg_matvec,
/// reduce_partials and cg_update, the state read every CG_CHECK_EVERY
/// steps, then cg_finish.
#[allow(clippy::too_many_arguments)]
fn conjugate_gradient(
    order: Order,
    p: &Shape,
    w: &[f32],
    c: &[f32],
    at: &(Vec<f64>, Vec<f64>, Vec<f32>),
    h: &[f64],
    tol: f64,
    max_steps: usize,
) -> DeviceCg {
    let (sums, inv_mass, f) = at;
    let (n, nb) = (p.n(), p.reduce_blocks());
    let max_steps_i32 = max_steps.min(i32::MAX as usize) as i32;
    let [mut x, mut r, mut dir, mut x_best] = std::array::from_fn(|_| vec![f64::NAN; n]);
    let mut state = vec![f64::NAN; CG_STATE_LEN];
    let mut a = Args::default();
    a.buf(h)
        .arg(n as i32)
        .arg(max_steps_i32)
        .out(&mut x)
        .out(&mut r)
        .out(&mut dir)
        .out(&mut x_best)
        .out(&mut state);
    run("cg_init", 1, CG_BLOCK, order, &a);
    let mut partials = vec![f64::NAN; nb * n];
    let mut launched = 0;
    while state[CG_STATUS] == 0.0 && launched < max_steps {
        for _ in 0..CG_CHECK_EVERY.min(max_steps - launched) {
            let mut a = Args::default();
            a.buf(w)
                .buf(c)
                .buf(f)
                .buf(sums)
                .buf(inv_mass)
                .buf(&dir)
                .buf(&state);
            a.arg(p.m as i32)
                .arg(p.k as i32)
                .arg(p.inv_tau)
                .arg(p.euclidean)
                .out(&mut partials);
            run(&p.kernel("cg_matvec"), nb, BLOCK, order, &a);
            let jt = reduce_partials(order, &partials, nb, n);
            let mut a = Args::default();
            a.buf(&jt)
                .arg(1i32)
                .buf(sums)
                .buf(inv_mass)
                .arg(p.k as i32)
                .arg(p.d as i32)
                .arg(tol)
                .arg(max_steps_i32);
            a.out(&mut x)
                .out(&mut r)
                .out(&mut dir)
                .out(&mut x_best)
                .out(&mut state);
            run("cg_update", 1, CG_BLOCK, order, &a);
            launched += 1;
        }
    }
    let mut u = vec![f64::NAN; n];
    let mut a = Args::default();
    a.buf(sums)
        .buf(inv_mass)
        .buf(&x_best)
        .arg(p.k as i32)
        .arg(p.d as i32)
        .out(&mut u);
    run("cg_finish", 1, CG_BLOCK, order, &a);
    DeviceCg {
        u,
        steps: state[CG_STEPS] as usize,
        rel: state[CG_BEST_REL],
    }
}

// ----------------------------------------------------------------------------
// Cases and comparisons

/// The launch shape of a case.
trait Launch {
    fn shape(&self) -> Shape;
}

impl Launch for Case {
    fn shape(&self) -> Shape {
        Shape::of(self.m, &self.geo)
    }
}

/// k in {2, 16, 256} (and 1 and 5: lanes without a centroid), d in {1, 2,
/// 4, 8}, m never a multiple of the block, the tile or a block's chunk, both
/// distances, a dead centroid, and a centroid equal to a weight vector (a
/// zero Euclidean distance).
fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let mut seed = 1;
    for k in [2usize, 16, 256] {
        for d in [1usize, 2, 4, 8] {
            for (m, distance) in [(k + 37, Distance::Euclidean), (1037, Distance::Squared)] {
                out.push(Case::new(m, k, d, distance, seed, false));
                seed += 1;
            }
        }
    }
    let mut on_a_row = Case::new(2_999, 16, 2, Distance::Euclidean, seed, false);
    on_a_row.c[..2].copy_from_slice(&on_a_row.w[..2]);
    out.push(on_a_row);
    out.push(Case::new(301, 1, 4, Distance::Euclidean, seed + 4, false));
    out.push(Case::new(1_503, 5, 2, Distance::Squared, seed + 1, false));
    out.push(Case::new(1_503, 16, 1, Distance::Squared, seed + 2, true));
    out.push(Case::new(1_503, 16, 4, Distance::Euclidean, seed + 3, true));
    out
}

/// The bits of a result, to compare runs in different orders exactly.
trait Bits {
    fn bits(&self) -> Vec<u64>;
}
impl Bits for Vec<f32> {
    fn bits(&self) -> Vec<u64> {
        self.iter().map(|x| x.to_bits() as u64).collect()
    }
}
impl Bits for Vec<f64> {
    fn bits(&self) -> Vec<u64> {
        self.iter().map(|x| x.to_bits()).collect()
    }
}
impl Bits for Vec<u32> {
    fn bits(&self) -> Vec<u64> {
        self.iter().map(|&x| x as u64).collect()
    }
}

/// Runs `f` in forward and reverse order (and a random one when `random`)
/// and returns its forward result; fails unless every run gives the same bits.
fn in_every_order<R: Bits>(what: &str, random: bool, f: impl Fn(Order) -> R) -> R {
    let first = f(Order::Forward);
    let mut orders = vec![Order::Reverse];
    if random {
        orders.push(Order::Random(7));
    }
    for order in orders {
        let other = f(order);
        assert!(
            other.bits() == first.bits(),
            "{what}: the result depends on the order of the threads (forward vs {order:?}): a missing barrier?"
        );
    }
    first
}

/// Runs `check` on every case and fails listing each error above `tol`.
fn for_each_case(kernel: &str, tol: f64, cases: &[Case], check: impl Fn(&Case) -> f64) {
    let mut failures = Vec::new();
    let mut worst = 0f64;
    for case in cases {
        let err = check(case);
        worst = worst.max(err);
        if err.is_nan() || err > tol {
            failures.push(format!("{}: rel err {err:.3e}", case.label()));
        }
    }
    println!(
        "{kernel}: worst rel err {worst:.3e} over {} cases",
        cases.len()
    );
    assert!(
        failures.is_empty(),
        "{kernel} differs from its CPU twin (tol {tol:e}):\n{}",
        failures.join("\n")
    );
}

// ----------------------------------------------------------------------------
// Forward kernels

#[test]
fn soft_assign_reduce_matches_twin() {
    for_each_case("soft_assign_reduce", KERNEL_TOL, &cases(), |case| {
        let p = case.shape();
        let got = in_every_order(&case.label(), p.m < 500, |o| {
            soft_assign_reduce(o, &p, &case.w, &case.c)
        });
        let twin = pass::soft_assign_reduce(&case.w, &case.c, &case.geo);
        let want: Vec<f64> = twin.mass.iter().chain(&twin.weighted).copied().collect();
        rel(&got, &want)
    });
}

#[test]
fn kmeans_update_and_inverse_mass_match_twin_exactly() {
    // From the same sums, the same f64 arithmetic and the same rounding to
    // f32: F(C), the shift, the flag and 1/S bit for bit.
    for_each_case("kmeans_update + inverse_mass", 0.0, &cases(), |case| {
        let p = case.shape();
        let sums = soft_assign_reduce(Order::Forward, &p, &case.w, &case.c);
        let moments = Moments {
            mass: sums[..p.k].to_vec(),
            weighted: sums[p.k..].to_vec(),
        };
        let mut want_next = case.c.clone();
        let want_shift = moments.update(&case.c, &mut want_next, p.d);
        let mut err = 0.0;
        for tol in [0.0, want_shift, 0.5 * want_shift] {
            let (next, shift, converged) = kmeans_update(Order::Forward, &p, &sums, &case.c, tol);
            let (next_r, shift_r, converged_r) =
                kmeans_update(Order::Reverse, &p, &sums, &case.c, tol);
            assert!(
                next.bits() == next_r.bits()
                    && shift.to_bits() == shift_r.to_bits()
                    && converged == converged_r
            );
            if next.bits() != want_next.bits() || shift.to_bits() != want_shift.to_bits() {
                println!("{}: shift {shift:e} vs {want_shift:e}", case.label());
                err = f64::INFINITY;
            }
            if converged != u32::from(want_shift <= tol) {
                err = f64::INFINITY;
            }
        }
        let inv = in_every_order("inverse_mass", false, |o| inverse_mass(o, &p, &sums));
        if inv.bits() != moments.inverse_mass().bits() {
            err = f64::INFINITY;
        }
        if case.c[0] == 1e3 {
            assert_eq!(
                moments.dead(),
                1,
                "{}: centroid 0 should be dead",
                case.label()
            );
            assert_eq!(inv[0], 0.0);
        }
        err
    });
}

#[test]
fn fixed_point_matches_twin() {
    // tol = 0: both run exactly max_iter steps (the last shift compared too).
    let cases: Vec<Case> = cases()
        .into_iter()
        .filter(|c| c.m < 1100 && c.geo.k <= 16)
        .collect();
    for_each_case("fixed_point (3 steps)", KERNEL_TOL, &cases, |case| {
        let p = case.shape();
        let (c, steps, shift) = fixed_point(Order::Forward, &p, &case.w, &case.c, 3, 0.0);
        let (want, want_steps, want_shift) = pass::fixed_point(&case.w, &case.c, &case.geo, 3, 0.0);
        assert_eq!(steps, want_steps, "{}", case.label());
        let shift_err = (shift - want_shift).abs() / want_shift.abs().max(1e-30);
        rel(&wide(&c), &wide(&want)).max(if shift_err <= 1e-3 { 0.0 } else { shift_err })
    });
}

#[test]
fn soft_assign_output_matches_twin() {
    for_each_case("soft_assign_output", KERNEL_TOL, &cases(), |case| {
        let p = case.shape();
        let got = in_every_order(&case.label(), p.m < 500, |o| {
            soft_assign_output(o, &p, &case.w, &case.c, None)
        });
        // Row-parallel: any grid (here a grid-stride loop) gives the same bits.
        let strided = soft_assign_output(Order::Forward, &p, &case.w, &case.c, Some(3));
        assert!(
            strided.bits() == got.bits(),
            "{}: a grid of 3 blocks differs",
            case.label()
        );
        let mut want = vec![0f32; p.m * p.d];
        pass::soft_assign_output(&case.w, &case.c, &case.geo, &mut want);
        rel(&wide(&got), &wide(&want))
    });
}

#[test]
fn hard_assign_matches_twin_exactly() {
    // The same unfused float sums in the same order: the same indices.
    for_each_case(
        "hard_assign (fraction of rows differing)",
        0.0,
        &cases(),
        |case| {
            let p = case.shape();
            let got = in_every_order(&case.label(), false, |o| {
                hard_assign(o, &p, &case.w, &case.c, None)
            });
            let strided = hard_assign(Order::Forward, &p, &case.w, &case.c, Some(2));
            assert!(
                strided == got,
                "{}: a grid of 2 blocks differs",
                case.label()
            );
            let mut want = vec![0u32; p.m];
            pass::hard_assign(&case.w, &case.c, p.d, &mut want);
            got.iter().zip(&want).filter(|(a, b)| a != b).count() as f64 / p.m as f64
        },
    );
}

#[test]
fn no_weights() {
    // m = 0: zero sums (every centroid dead), nothing written, no trap.
    let case = Case::new(0, 16, 2, Distance::Squared, 3, false);
    let p = case.shape();
    let sums = soft_assign_reduce(Order::Forward, &p, &case.w, &case.c);
    assert!(sums.iter().all(|&x| x == 0.0), "{sums:?}");
    let (next, shift, converged) = kmeans_update(Order::Forward, &p, &sums, &case.c, 0.0);
    assert!(next == case.c && shift == 0.0 && converged == 1);
    assert!(soft_assign_output(Order::Forward, &p, &case.w, &case.c, None).is_empty());
    let h = centroid_cotangent(Order::Forward, &p, &case.w, &case.c, &case.g);
    assert!(h.iter().all(|&x| x == 0.0), "{h:?}");
    let inv = inverse_mass(Order::Forward, &p, &sums);
    assert!(weight_grad(
        Order::Forward,
        &p,
        &case.w,
        &case.c,
        &case.c,
        &case.g,
        &inv,
        &case.u,
        None
    )
    .is_empty());
}

#[test]
fn first_non_finite_finds_the_first_bad_value() {
    let mut x: Vec<f32> = common::normal(300_001, 5)
        .iter()
        .map(|&x| x as f32)
        .collect();
    assert_eq!(first_non_finite(Order::Forward, &x), u64::MAX);
    x[250_000] = f32::NEG_INFINITY;
    x[123_457] = f32::NAN;
    x[299_999] = f32::INFINITY;
    for order in [Order::Forward, Order::Reverse, Order::Random(3)] {
        assert_eq!(first_non_finite(order, &x), 123_457, "{order:?}");
    }
}

// ----------------------------------------------------------------------------
// Backward kernels

#[test]
fn centroid_cotangent_matches_twin() {
    for_each_case("centroid_cotangent", KERNEL_TOL, &cases(), |case| {
        let p = case.shape();
        let got = in_every_order(&case.label(), p.m < 500, |o| {
            centroid_cotangent(o, &p, &case.w, &case.c, &case.g)
        });
        rel(
            &got,
            &pass::centroid_cotangent(&case.w, &case.c, &case.g, &case.geo),
        )
    });
}

#[test]
fn adjoint_matvec_matches_twin() {
    for_each_case("adjoint_matvec", KERNEL_TOL, &cases(), |case| {
        let p = case.shape();
        let (f, inv) = case.twin_at();
        let got = in_every_order(&case.label(), p.m < 500, |o| {
            adjoint_matvec(o, &p, &case.w, &case.c, &f, &inv, &case.u)
        });
        rel(
            &got,
            &pass::adjoint_matvec(&case.w, &case.c, &f, &inv, &case.u, &case.geo),
        )
    });
}

#[test]
fn weight_grad_matches_twin() {
    for_each_case("weight_grad", KERNEL_TOL, &cases(), |case| {
        let p = case.shape();
        let (f, inv) = case.twin_at();
        let got = in_every_order(&case.label(), p.m < 500, |o| {
            weight_grad(o, &p, &case.w, &case.c, &f, &case.g, &inv, &case.u, None)
        });
        let strided = weight_grad(
            Order::Forward,
            &p,
            &case.w,
            &case.c,
            &f,
            &case.g,
            &inv,
            &case.u,
            Some(3),
        );
        assert!(
            strided.bits() == got.bits(),
            "{}: a grid of 3 blocks differs",
            case.label()
        );
        let mut want = vec![0f32; p.m * p.d];
        pass::weight_grad(
            &case.w, &case.c, &f, &case.g, &inv, &case.u, &case.geo, &mut want,
        );
        rel(&wide(&got), &wide(&want))
    });
}

#[test]
fn device_cg_and_backward_match_cpu() {
    // At a converged fixed point (attracting: CG applies), the launch
    // sequence of cuda.rs implicit_backward with Solver::Cg (AtFixedPoint,
    // centroid_cotangent, the device CG, weight_grad) against
    // the CPU's CG (backward::symmetrised_cg), and against
    // backward::implicit_backward.
    // The last case (k d = 2048 = the most cg_update takes: two entries a
    // thread) stops at max_steps without converging.
    let tol = 1e-6;
    let mut failures = Vec::new();
    for (k, d, m, seed, max_steps) in [
        (16usize, 1usize, 2_011usize, 31u64, 200usize),
        (5, 2, 1_503, 32, 200),
        (16, 4, 1_203, 33, 200),
        (2, 8, 777, 34, 200),
        (256, 8, 301, 35, 6),
    ] {
        let mut case = Case::new(m, k, d, Distance::Squared, seed, false);
        let (c, _, _) = pass::fixed_point(&case.w, &case.c, &case.geo, 300, 1e-7);
        case.c = c;
        let p = case.shape();
        let order = if seed % 2 == 0 {
            Order::Forward
        } else {
            Order::Reverse
        };

        let at = at_fixed_point(order, &p, &case.w, &case.c);
        let h = centroid_cotangent(order, &p, &case.w, &case.c, &case.g);
        let cg = conjugate_gradient(order, &p, &case.w, &case.c, &at, &h, tol, max_steps);
        let grad = weight_grad(
            order, &p, &case.w, &case.c, &at.2, &case.g, &at.1, &cg.u, None,
        );

        // The CPU side: backward.rs with Solver::Cg.
        let (moments, h_cpu) = pass::cotangent_reduce(&case.w, &case.c, &case.g, &case.geo);
        let inv_mass = moments.inverse_mass();
        let mut f = case.c.clone();
        moments.update(&case.c, &mut f, d);
        let jt = |u: &[f64]| pass::adjoint_matvec(&case.w, &case.c, &f, &inv_mass, u, &case.geo);
        let (u_cpu, report) =
            backward::symmetrised_cg(&moments.mass, &inv_mass, d, jt, &h_cpu, tol, max_steps);
        let cfg = BackwardConfig {
            method: Method::Idkm,
            solver: Solver::Cg,
            tol,
            max_steps,
        };
        let mut want = vec![0f32; m * d];
        backward::implicit_backward(
            &case.w, &case.c, &case.g, &case.geo, &cfg, None, "cpu", &mut want,
        );

        let (err_h, err_u, err_grad) = (
            rel(&h, &h_cpu),
            rel(&cg.u, &u_cpu),
            rel(&wide(&grad), &wide(&want)),
        );
        let line = format!(
            "{} {order:?}: h {err_h:.2e}, u {err_u:.2e}, grad {err_grad:.2e}, steps {} vs {}, residual {:.2e} vs {:.2e}",
            case.label(),
            cg.steps,
            report.steps,
            cg.rel,
            report.rel_residual
        );
        println!("{line}");
        let same_outcome = (cg.rel <= tol) == report.converged;
        if !(err_h <= KERNEL_TOL
            && err_u <= 1e-4
            && err_grad <= 1e-4
            && cg.steps.abs_diff(report.steps) <= 1
            && same_outcome)
        {
            failures.push(line);
        }
    }
    assert!(
        failures.is_empty(),
        "device CG differs from the CPU:\n{}",
        failures.join("\n")
    );
}

#[test]
fn device_cg_sequence_is_order_independent() {
    // The whole CG sequence on one small case, in three thread orders: the
    // same bits (every reduction is in a fixed order).
    let mut case = Case::new(555, 16, 2, Distance::Squared, 41, false);
    let (c, _, _) = pass::fixed_point(&case.w, &case.c, &case.geo, 300, 1e-7);
    case.c = c;
    let p = case.shape();
    in_every_order("device CG", true, |o| {
        let at = at_fixed_point(o, &p, &case.w, &case.c);
        let h = centroid_cotangent(o, &p, &case.w, &case.c, &case.g);
        let cg = conjugate_gradient(o, &p, &case.w, &case.c, &at, &h, 1e-6, 50);
        let mut out = cg.u;
        out.extend([cg.steps as f64, cg.rel]);
        out
    });
}

// ----------------------------------------------------------------------------
// The emulator itself

#[test]
fn emulator_shuffles_and_barriers_work() {
    let x: Vec<f64> = (0..512).map(|i| (i as f64) * 0.5 - 3.0).collect();
    let mut out = vec![f64::NAN; 32];
    let mut a = Args::default();
    a.buf(&x).out(&mut out);
    run("selftest_warp_sum", 2, 256, Order::Random(1), &a);
    for w in 0..16 {
        let want: f64 = x[w * 32..(w + 1) * 32].iter().sum();
        assert_eq!(out[2 * w], want, "warp {w} (double)");
        assert!(
            (out[2 * w + 1] - want).abs() <= 1e-4 * want.abs().max(1.0),
            "warp {w} (float)"
        );
    }
    for order in [Order::Forward, Order::Reverse, Order::Random(9)] {
        let mut ids = vec![-7i32; 2 * 128];
        let mut a = Args::default();
        a.arg(1i32).out(&mut ids);
        run("selftest_neighbour", 2, 128, order, &a);
        assert!(
            ids.iter()
                .enumerate()
                .all(|(i, &v)| v as usize == (i % 128 + 1) % 128),
            "{order:?}: {ids:?}"
        );
    }
}

#[test]
fn emulator_finds_a_missing_barrier() {
    let results: Vec<Vec<i32>> = [Order::Forward, Order::Reverse]
        .into_iter()
        .map(|order| {
            let mut ids = vec![-7i32; 128];
            let mut a = Args::default();
            a.arg(0i32).out(&mut ids);
            run("selftest_neighbour", 1, 128, order, &a);
            ids
        })
        .collect();
    let right: Vec<i32> = (0..128).map(|i| (i + 1) % 128).collect();
    assert!(results[0] != results[1] && results[0] != right && results[1] != right);
}

#[test]
fn emulator_fails_loudly_on_divergence_and_traps() {
    let mut out = vec![0i32; 256];
    let mut a = Args::default();
    a.out(&mut out);
    for order in [Order::Forward, Order::Reverse] {
        let err = launch("selftest_divergent_barrier", 1, 256, order, &a).unwrap_err();
        assert!(err.contains("divergent barrier"), "{order:?}: {err}");
        let err = launch("selftest_divergent_shuffle", 1, 64, order, &a).unwrap_err();
        assert!(err.contains("divergent warp"), "{order:?}: {err}");
    }
    let mut t = Args::default();
    t.arg(1i32);
    assert!(launch("selftest_trap", 3, 64, Order::Forward, &t)
        .unwrap_err()
        .contains("__trap()"));
    t = Args::default();
    t.arg(0i32);
    launch("selftest_trap", 3, 64, Order::Forward, &t).expect("no trap");
    // The kernels' own launch checks: a k above KMAX traps.
    let (w, c) = (vec![0f32; 10], vec![0f32; 300]);
    let mut partials = vec![0f64; 300 * 2];
    let mut a = Args::default();
    a.buf(&w)
        .buf(&c)
        .arg(10i32)
        .arg(300i32)
        .arg(1f32)
        .arg(0i32)
        .out(&mut partials);
    let err = launch("soft_assign_reduce_f32_d1", 1, BLOCK, Order::Forward, &a).unwrap_err();
    assert!(err.contains("__trap()"), "{err}");
    // A wrong argument list is refused.
    let mut a = Args::default();
    a.buf(&w).arg(1i32);
    assert!(launch("reduce_partials", 1, BLOCK, Order::Forward, &a)
        .unwrap_err()
        .contains("arguments"));
}
