//! The per-socket activity map and the updates every probe backend shares.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::bpf_pidns_info,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{bpf_get_ns_current_pid_tgid, bpf_get_socket_cookie},
    },
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use observer_common::{
    BPF_F_NO_PREALLOC, Counter, DEFAULT_MAX_TRACKED_SOCKETS, Direction, KernelOffsets,
    SockActivity, WATCHED_WORDS,
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

/// Sockets that could not be added to `SOCKETS` (it was full), so that each is counted once in
/// `TrackFailed` although every later event of it fails again. Least recently used ones make
/// room: only beyond 65,536 untracked sockets can one be counted twice.
#[map]
static UNTRACKED: LruHashMap<u64, u8> = LruHashMap::with_max_entries(65_536, 0);

/// The watched processes, one bit per process id (as the agent's pid namespace numbers them):
/// word `tgid / 64`, bit `tgid % 64`. An array lookup, which the verifier inlines, and a bit test
/// cost the same for one watched process or ten thousand, and the agent can change the set while
/// the probes run (a restarted server, a forked child). Sized by the agent from pid_max.
#[map]
static WATCHED: Array<u64> = Array::with_max_entries(WATCHED_WORDS, 0);

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
/// Whether only the processes in `WATCHED` are recorded (0: every process).
#[unsafe(no_mangle)]
static FILTERING: LoadTime<u32> = LoadTime::new(0);
/// The agent's pid namespace (device and inode of its nsfs file), when it is not the initial
/// one: ids are then translated into it. 0: the agent sees the kernel's own ids.
#[unsafe(no_mangle)]
static PIDNS_DEV: LoadTime<u64> = LoadTime::new(0);
#[unsafe(no_mangle)]
static PIDNS_INO: LoadTime<u64> = LoadTime::new(0);

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

/// True when only the watched processes' activity is recorded (`--pid`, `--comm`).
#[inline(always)]
pub fn filtering_pids() -> bool {
    FILTERING.load() != 0
}

/// A thread's process and thread ids as the agent's pid namespace numbers them; 0 for a thread
/// outside that namespace (or in interrupt context with no task of ours).
#[derive(Clone, Copy)]
pub struct Ids {
    pub tgid: u32,
    pub tid: u32,
}

/// The current thread's ids, in the agent's pid namespace.
///
/// A sidecar's agent numbers processes as its own pid namespace does, while the kernel's
/// `bpf_get_current_pid_tgid` returns the initial namespace's ids. When the agent is not in the
/// initial namespace, `bpf_get_ns_current_pid_tgid` (Linux 5.7+, every tracing program type, so
/// every backend) translates: ids then match /proc as the agent sees it, in the filter, in
/// every record and in the output. It costs more than the plain helper, so the agent enables it
/// only where it is needed.
#[inline(always)]
pub fn current_ids() -> Ids {
    let ino = PIDNS_INO.load();
    if ino == 0 {
        let pid_tgid = bpf_get_current_pid_tgid();
        return Ids { tgid: (pid_tgid >> 32) as u32, tid: pid_tgid as u32 };
    }
    let mut info = bpf_pidns_info { pid: 0, tgid: 0 };
    let size = core::mem::size_of::<bpf_pidns_info>() as u32;
    // SAFETY: info is a valid, writable bpf_pidns_info of the size passed.
    match unsafe { bpf_get_ns_current_pid_tgid(PIDNS_DEV.load(), ino, &mut info, size) } {
        0 => Ids { tgid: info.tgid, tid: info.pid },
        _ => Ids { tgid: 0, tid: 0 },
    }
}

/// Whether process `tgid` (in the agent's namespace) is watched: always without a filter.
#[inline(always)]
pub fn is_watched(tgid: u32) -> bool {
    if !filtering_pids() {
        return true;
    }
    tgid != 0 && WATCHED.get(tgid / 64).is_some_and(|word| word & (1 << (tgid % 64)) != 0)
}

/// The current thread's ids if its process is watched.
#[inline(always)]
pub fn watched_current() -> Option<Ids> {
    let ids = current_ids();
    is_watched(ids.tgid).then_some(ids)
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
        if UNTRACKED.insert(cookie, 1u8, BPF_NOEXIST).is_ok() {
            count(Counter::TrackFailed);
        }
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

/// Application data moved through the socket in the thread `by`.
#[inline(always)]
pub fn record_data(entry: *mut SockActivity, direction: Direction, bytes: u64, by: Ids) {
    let now = now_ns();
    // Updated in place through the map pointer: no second map operation on the hot path.
    unsafe {
        let (stamp, total) = match direction {
            Direction::Send => (&raw mut (*entry).last_send_ns, &raw mut (*entry).bytes_sent),
            Direction::Recv => (&raw mut (*entry).last_recv_ns, &raw mut (*entry).bytes_received),
        };
        *stamp = now;
        // Two threads may send on one socket at once; the byte count must not lose either.
        atomic_add(total, bytes);
        (*entry).last_tgid = by.tgid;
        (*entry).last_tid = by.tid;
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
