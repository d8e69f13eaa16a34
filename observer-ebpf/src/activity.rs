//! What every probe shares: the values the agent sets at load time, counters, the clock, and
//! per-thread records.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    },
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use observer_common::{Counter, KernelOffsets};

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// A value the agent sets at load time (`EbpfLoader::override_global`), read so the compiler
/// cannot fold it to its build-time value.
///
/// aya-ebpf's own `Global<T>` does this too, but it wraps the value in `MaybeUninit`, whose BTF
/// union name (`MaybeUninit<u32>`) bpf-linker 0.10 leaves unsanitized: the kernel then refuses
/// the whole object's BTF ("Invalid name"). This wrapper is a plain struct.
#[repr(transparent)]
pub struct LoadTime<T>(T);

impl<T: Copy> LoadTime<T> {
    pub const fn new(value: T) -> Self {
        LoadTime(value)
    }

    #[inline(always)]
    pub fn load(&self) -> T {
        // SAFETY: a read of a static's own value; volatile only to defeat constant folding.
        unsafe { core::ptr::read_volatile(&self.0) }
    }
}

// Set by the agent at load time (read-only data, so the verifier sees constants). The offsets come
// from the running kernel's BTF: Rust BPF has no CO-RE relocations.
#[unsafe(no_mangle)]
pub(crate) static OFFSETS: LoadTime<KernelOffsets> = LoadTime::new(KernelOffsets::ZERO);
/// One field of [`OFFSETS`], as an offset.
macro_rules! offset {
    ($field:ident) => {
        crate::activity::OFFSETS.load().$field as usize
    };
}
pub(crate) use offset;

/// Reads a `T` at `base + offset`; zero if the kernel refuses (the verifier requires the check).
#[inline(always)]
pub fn read_at<T: Default>(base: *const u8, offset: usize) -> T {
    unsafe { bpf_probe_read_kernel(base.add(offset).cast::<T>()) }.unwrap_or_default()
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *slot += 1 };
    }
}

/// Sets thread `tid`'s entry in a per-thread map; a full map is counted, never silent.
#[inline(always)]
pub fn record_for_thread<T>(map: &HashMap<u32, T>, tid: u32, value: T) {
    match map.get_ptr_mut(tid) {
        // In place: no allocation on the hot path once a thread has been seen.
        Some(slot) => unsafe { *slot = value },
        None => {
            if map.insert(tid, value, 0).is_err() {
                count(Counter::ThreadTrackFailed);
            }
        }
    }
}

/// CLOCK_MONOTONIC, the clock the agent reads. The cheaper coarse clock would do for whole-second
/// thresholds, but the verifier refuses it to tracing programs.
#[inline(always)]
pub fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub fn cookie_of(sk: *mut c_void) -> u64 {
    // Tracing programs get the BTF-typed variant of this helper, which takes a `struct sock *`.
    unsafe { bpf_get_socket_cookie(sk) }
}

/// `*target += value` as one BPF atomic instruction.
#[inline(always)]
pub unsafe fn atomic_add(target: *mut u64, value: u64) {
    #[cfg(target_arch = "bpf")]
    unsafe {
        use core::intrinsics::{AtomicOrdering, atomic_xadd};
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(target, value);
    }
    // The host build only type-checks this crate; it never runs.
    #[cfg(not(target_arch = "bpf"))]
    unsafe {
        *target += value
    };
}
