//! The per-socket activity map and the updates every probe backend shares.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::bpf_get_socket_cookie,
    },
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use observer_common::{
    BPF_F_NO_PREALLOC, Counter, DEFAULT_MAX_TRACKED_SOCKETS, Direction, KernelOffsets, SockActivity,
};

const BPF_NOEXIST: u64 = 1;
const IPPROTO_TCP: u16 = 6;
const SOCK_STREAM: u16 = 1;

/// Socket cookie -> activity. Sized by the agent at load time; entries are allocated on demand.
#[map]
static SOCKETS: HashMap<u64, SockActivity> =
    HashMap::with_max_entries(DEFAULT_MAX_TRACKED_SOCKETS, BPF_F_NO_PREALLOC);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Process ids whose calls are recorded, beyond the first `INLINE_PIDS` (which live in
/// `WATCHED`, read-only data compared inline: this check runs on every syscall of the machine).
#[map]
static WATCHED_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(4096, 0);

const INLINE_PIDS: usize = observer_common::INLINE_PIDS;

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
/// How many processes are watched (0: every process).
#[unsafe(no_mangle)]
static FILTER_PIDS: LoadTime<u32> = LoadTime::new(0);
#[unsafe(no_mangle)]
static WATCHED: LoadTime<[u32; INLINE_PIDS]> = LoadTime::new([0; INLINE_PIDS]);

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

#[inline(always)]
pub fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub fn cookie_of(sk: *mut c_void) -> u64 {
    // Tracing programs get the BTF-typed variant of this helper, which takes a `struct sock *`.
    unsafe { bpf_get_socket_cookie(sk) }
}

/// True when only the watched processes' activity is recorded (`--pid`).
#[inline(always)]
pub fn filtering_pids() -> bool {
    FILTER_PIDS.load() != 0
}

/// True when the current process is one the agent watches (always true without `--pid`).
#[inline(always)]
pub fn current_is_watched() -> bool {
    if !filtering_pids() {
        return true;
    }
    is_watched((bpf_get_current_pid_tgid() >> 32) as u32)
}

/// Whether process `tgid` is watched (when filtering).
#[inline(always)]
pub fn is_watched(tgid: u32) -> bool {
    let count = FILTER_PIDS.load() as usize;
    let watched = WATCHED.load();
    // Indexed on purpose: a bounded counted loop is what the verifier unrolls cheaply.
    #[allow(clippy::needless_range_loop)]
    for i in 0..INLINE_PIDS {
        if i >= count {
            return false;
        }
        if watched[i] == tgid {
            return true;
        }
    }
    count > INLINE_PIDS && unsafe { WATCHED_PIDS.get(tgid) }.is_some()
}

#[inline(always)]
pub fn lookup(cookie: u64) -> Option<&'static SockActivity> {
    unsafe { SOCKETS.get(cookie) }
}

/// Only TCP stream sockets belong in the map: the generic send/receive tracepoints also fire for
/// UNIX and UDP sockets, whose entries would never be removed by tcp_destroy_sock.
#[inline(always)]
fn is_tcp_stream(sk: *const u8) -> bool {
    let (protocol_at, type_at) = (offset!(sk_protocol), offset!(sk_type));
    if protocol_at == 0 || type_at == 0 {
        return false;
    }
    read_at::<u16>(sk, protocol_at) == IPPROTO_TCP && read_at::<u16>(sk, type_at) == SOCK_STREAM
}

/// Whether the caller has already established that `sk` is a TCP socket.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Known {
    Tcp,
    Unchecked,
}

/// The socket's activity entry, created if the socket is TCP and not yet tracked. A full map is
/// counted in `Counter::TrackFailed` so the agent can report it.
#[inline(always)]
pub fn entry(sk: *mut c_void, cookie: u64, known: Known) -> Option<*mut SockActivity> {
    if let Some(found) = existing(cookie) {
        return Some(found);
    }
    if known == Known::Unchecked && !is_tcp_stream(sk.cast()) {
        return None;
    }
    let fresh = SockActivity { first_seen_ns: now_ns(), ..SockActivity::default() };
    // NOEXIST: another CPU may have created it meanwhile; then we use theirs below.
    if SOCKETS.insert(cookie, fresh, BPF_NOEXIST).is_err() && SOCKETS.get_ptr(cookie).is_none() {
        count(Counter::TrackFailed);
        return None;
    }
    SOCKETS.get_ptr_mut(cookie)
}

#[inline(always)]
pub fn existing(cookie: u64) -> Option<*mut SockActivity> {
    SOCKETS.get_ptr_mut(cookie)
}

pub fn forget(cookie: u64) {
    let _ = SOCKETS.remove(cookie);
}

/// Application data moved through the socket in the current thread.
#[inline(always)]
pub fn record_data(entry: *mut SockActivity, direction: Direction, bytes: u64) {
    let now = now_ns();
    let pid_tgid = bpf_get_current_pid_tgid();
    // Updated in place through the map pointer: no second map operation on the hot path.
    unsafe {
        let (stamp, total) = match direction {
            Direction::Send => (&raw mut (*entry).last_send_ns, &raw mut (*entry).bytes_sent),
            Direction::Recv => (&raw mut (*entry).last_recv_ns, &raw mut (*entry).bytes_received),
        };
        *stamp = now;
        // Two threads may send on one socket at once; the byte count must not lose either.
        atomic_add(total, bytes);
        (*entry).last_tgid = (pid_tgid >> 32) as u32;
        (*entry).last_tid = pid_tgid as u32;
    }
}

#[inline(always)]
pub fn record_retransmit(entry: *mut SockActivity) {
    unsafe {
        (*entry).last_retransmit_ns = now_ns();
        // Retransmits of one socket run under its lock: a plain increment does not race.
        (*entry).retransmits = (*entry).retransmits.wrapping_add(1);
    }
}

#[inline(always)]
pub fn record_state(entry: *mut SockActivity, state: u32) {
    unsafe {
        (*entry).state = state;
        (*entry).state_since_ns = now_ns();
    }
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
