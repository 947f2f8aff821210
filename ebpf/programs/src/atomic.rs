//! Atomic operations on map values.
//!
//! The BPF target has no `core::sync::atomic` read-modify-write support, so
//! the BPF build uses compiler intrinsics. Two traps, both measured:
//! - a *Relaxed* fetch-add whose result is used compiles to the legacy XADD,
//!   which returns nothing: the "result" is garbage. Fetching operations here
//!   are therefore SeqCst (BPF_FETCH), relaxed only where the result is unused;
//! - compare-exchange and fetch variants need `-C target-cpu=v3`, which the
//!   build script passes.
//!
//! On the host (for `cargo check`/clippy of this crate) the same API is
//! backed by `core::sync::atomic`.

#[cfg(target_arch = "bpf")]
mod imp {
    use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

    #[inline(always)]
    pub unsafe fn add_u64(p: *mut u64, v: u64) {
        // SAFETY: caller guarantees `p` points into a map value.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
    }

    #[inline(always)]
    pub unsafe fn fetch_add_i64(p: *mut i64, v: i64) -> i64 {
        // SAFETY: as above.
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::SeqCst }>(p, v) }
    }

    #[inline(always)]
    pub unsafe fn cas_u64(p: *mut u64, old: u64, new: u64) -> bool {
        // SAFETY: as above.
        unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new)
                .1
        }
    }
}

#[cfg(not(target_arch = "bpf"))]
mod imp {
    use core::sync::atomic::{AtomicI64, AtomicU64, Ordering};

    #[inline(always)]
    pub unsafe fn add_u64(p: *mut u64, v: u64) {
        // SAFETY: caller guarantees `p` is valid and aligned.
        unsafe { AtomicU64::from_ptr(p) }.fetch_add(v, Ordering::Relaxed);
    }

    #[inline(always)]
    pub unsafe fn fetch_add_i64(p: *mut i64, v: i64) -> i64 {
        // SAFETY: as above.
        unsafe { AtomicI64::from_ptr(p) }.fetch_add(v, Ordering::SeqCst)
    }

    #[inline(always)]
    pub unsafe fn cas_u64(p: *mut u64, old: u64, new: u64) -> bool {
        // SAFETY: as above.
        unsafe { AtomicU64::from_ptr(p) }
            .compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}

/// `*p += v`, result unused.
///
/// # Safety
/// `p` must point to an aligned `u64` inside a map value.
#[inline(always)]
pub unsafe fn add(p: *mut u64, v: u64) {
    // SAFETY: forwarded.
    unsafe { imp::add_u64(p, v) }
}

/// `*p += v`, returning the value after the addition.
///
/// # Safety
/// As for [`add`].
#[inline(always)]
pub unsafe fn add_fetch_i64(p: *mut i64, v: i64) -> i64 {
    // SAFETY: forwarded.
    unsafe { imp::fetch_add_i64(p, v) }.wrapping_add(v)
}

/// Atomically replaces `old` with `new`; true when this caller won.
///
/// # Safety
/// As for [`add`].
#[inline(always)]
pub unsafe fn cas(p: *mut u64, old: u64, new: u64) -> bool {
    // SAFETY: forwarded.
    unsafe { imp::cas_u64(p, old, new) }
}

/// `*p = p.saturating_sub(v)` without losing a concurrent `add` (a plain
/// read-modify-write would: the dirty hook adds while the bio hook
/// subtracts on another CPU, and lost additions make a dirty file look
/// clean). Gives up after a few lost races; the next update corrects.
///
/// # Safety
/// As for [`add`].
#[inline(always)]
pub unsafe fn sub_saturating(p: *mut u64, v: u64) {
    for _ in 0..4 {
        // SAFETY: forwarded.
        let old = unsafe { read(p) };
        // SAFETY: forwarded.
        if unsafe { cas(p, old, qos_common::io::settle(old, v)) } {
            return;
        }
    }
}

/// Volatile read of a field another CPU may be updating.
///
/// # Safety
/// `p` must be valid for reads.
#[inline(always)]
pub unsafe fn read<T: Copy>(p: *const T) -> T {
    // SAFETY: forwarded.
    unsafe { core::ptr::read_volatile(p) }
}
