//! Counting allocations per thread, to bound what one decode allocates.
//!
//! Counts are per thread so replay tests running in parallel do not see
//! each other. Memory freed on another thread than the one that allocated
//! it is not subtracted here, so a measurement can only come out high.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    // `const` and without a destructor: reachable from inside the
    // allocator at any point of a thread's life, without allocating.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    // The peak [`assert_within`] saw closest to its bound on this thread,
    // and that bound: what the replay test reports.
    static WORST: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

fn add(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

/// The system allocator, counting live bytes per thread. Install it with
/// `#[global_allocator]` in a binary.
pub struct CountingAlloc;

// SAFETY: every call is passed unchanged to `System`, which upholds the
// `GlobalAlloc` contract; the bookkeeping only reads the layout.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout contract is forwarded unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            add(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator with this layout.
        unsafe { System.dealloc(ptr, layout) };
        add(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Counted as the moving allocator that realloc may be: the new
        // block is live before the old one is freed.
        add(new_size as isize);
        // SAFETY: as for `dealloc`; `new_size` is the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            add(-(new_size as isize));
        } else {
            add(-(layout.size() as isize));
        }
        p
    }
}

/// Runs `f` and returns its result with the most bytes it had live at
/// once on this thread beyond what was live when it started.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let r = f();
    let peak = PEAK.with(Cell::get);
    (r, (peak - start).max(0) as usize)
}

/// Whether [`CountingAlloc`] is this process's allocator (a replay test
/// checks, so its bounds are not vacuous).
pub fn counting() -> bool {
    let (b, bytes) = measure(|| std::hint::black_box(vec![0u8; 4096]));
    drop(b);
    bytes >= 4096
}

/// Asserts a decode's peak stayed within `per_byte * len + fixed`.
#[track_caller]
pub fn assert_within(what: &str, peak: usize, len: usize, per_byte: usize, fixed: usize) {
    let bound = per_byte.saturating_mul(len).saturating_add(fixed);
    WORST.with(|w| {
        let (p, b) = w.get();
        if b == 0 || peak as u128 * b as u128 > p as u128 * bound as u128 {
            w.set((peak, bound));
        }
    });
    assert!(
        peak <= bound,
        "{what}: {peak} bytes live at once for {len} bytes decoded (bound {per_byte} * {len} + {fixed} = {bound})"
    );
}

/// The peak checked on this thread since the last call that came closest
/// to its bound, and that bound; resets it.
pub fn take_worst() -> (usize, usize) {
    WORST.with(|w| w.replace((0, 0)))
}
