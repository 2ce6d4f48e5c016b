//! A counting global allocator: live and peak bytes, for memory tests,
//! benchmarks and profiles (counts, not timings).
//!
//! ```text
//! #[global_allocator]
//! static ALLOC: idkm::alloc::Counting = idkm::alloc::Counting;
//! let (result, peak_extra_bytes) = idkm::alloc::peak_extra(|| work());
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

/// Wraps the system allocator and counts live and peak bytes.
pub struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counters are only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), SeqCst) + layout.size();
            PEAK.fetch_max(now, SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        CURRENT.fetch_sub(layout.size(), SeqCst);
    }
}

/// Bytes live now (0 unless [`Counting`] is the global allocator).
pub fn live_bytes() -> usize {
    CURRENT.load(SeqCst)
}

/// Runs `f` and returns its result with the peak bytes allocated beyond what
/// was live before. Only meaningful with [`Counting`] as the global
/// allocator and nothing else allocating meanwhile.
pub fn peak_extra<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = CURRENT.load(SeqCst);
    PEAK.store(base, SeqCst);
    let r = f();
    (r, PEAK.load(SeqCst).saturating_sub(base))
}
