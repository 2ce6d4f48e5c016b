//! A counting global allocator on the system allocator: live and peak
//! bytes, for memory tests, benchmarks and profiles (counts, not timings),
//! and an optional limit beyond which allocations are refused, which makes
//! the allocation fail (Rust then aborts the process) instead of letting the
//! machine run out of memory.
//!
//! ```text
//! #[global_allocator]
//! static ALLOC: idkm::alloc::Counting = idkm::alloc::Counting;
//! let (result, peak_extra_bytes) = idkm::alloc::peak_extra(|| work());
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};

/// Wraps the system allocator and counts live and peak bytes.
pub struct Counting;

static INSTALLED: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

fn count_alloc(size: usize) {
    INSTALLED.store(true, Relaxed);
    let now = LIVE.fetch_add(size, SeqCst) + size;
    PEAK.fetch_max(now, SeqCst);
}

fn over_limit(size: usize) -> bool {
    LIVE.load(Relaxed).saturating_add(size) > LIMIT.load(Relaxed)
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counters are bookkeeping only, and a refused allocation returns null as
// the `GlobalAlloc` contract allows.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if over_limit(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's layout, forwarded unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count_alloc(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if over_limit(layout.size()) {
            return std::ptr::null_mut();
        }
        // Forwarded as such: calloc of fresh pages needs no memset.
        // SAFETY: the caller's layout, forwarded unchanged.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count_alloc(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        // SAFETY: `p` came from this allocator, that is from `System`, with `layout`.
        unsafe { System.dealloc(p, layout) };
        LIVE.fetch_sub(layout.size(), SeqCst);
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() && over_limit(new_size - layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: `p` came from `System` with `layout`; the caller's arguments, unchanged.
        let q = unsafe { System.realloc(p, layout, new_size) };
        if !q.is_null() {
            if new_size >= layout.size() {
                count_alloc(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, SeqCst);
            }
        }
        q
    }
}

/// Whether [`Counting`] is this process's global allocator (it has served
/// an allocation).
pub fn installed() -> bool {
    INSTALLED.load(Relaxed)
}

/// Bytes live now (0 unless [`Counting`] is the global allocator).
pub fn live_bytes() -> usize {
    LIVE.load(SeqCst)
}

/// The most bytes live at once since the last [`reset_peak`].
pub fn peak_bytes() -> usize {
    PEAK.load(SeqCst)
}

/// Starts a new peak from the bytes live now.
pub fn reset_peak() {
    PEAK.store(LIVE.load(SeqCst), SeqCst);
}

/// Makes [`Counting`] refuse any allocation that would take the live bytes
/// beyond `bytes` (the process then aborts with Rust's "memory allocation
/// failed" message).
pub fn set_limit(bytes: usize) {
    LIMIT.store(bytes, SeqCst);
}

/// Runs `f` and returns its result with the peak bytes allocated beyond what
/// was live before. Only meaningful with [`Counting`] as the global
/// allocator and nothing else allocating meanwhile.
pub fn peak_extra<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.load(SeqCst);
    PEAK.store(base, SeqCst);
    let r = f();
    (r, peak_bytes().saturating_sub(base))
}
