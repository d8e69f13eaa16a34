//! Where each socket's activity is kept. The fentry and tracepoint backends use socket-local
//! storage: a pointer off the socket itself (no key, no hash, no capacity; freed with the
//! socket), which the agent reads back in its sock_diag walk. kprobes cannot use socket
//! storage, so that backend keeps a hash map by socket cookie, read in batches.
use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    btf_maps::SkStorage,
    helpers::generated::bpf_sk_storage_get,
    macros::{btf_map, map},
    maps::{HashMap, LruHashMap},
};
use observer_common::{
    BPF_F_NO_PREALLOC, Counter, DEFAULT_MAX_TRACKED_SOCKETS, Direction, SockActivity,
};

use crate::{
    activity::{self, offset, read_at},
    filter::Ids,
};

const BPF_NOEXIST: u64 = 1;
const IPPROTO_TCP: u16 = 6;
const SOCK_STREAM: u16 = 1;

/// Each TCP socket's activity, in the socket itself (fentry and tracepoint backends).
#[btf_map]
static SK_ACTIVITY: SkStorage<SockActivity> = SkStorage::new();

/// Socket cookie -> activity (kprobe backend). Sized by the agent at load time; entries are
/// allocated on demand.
#[map]
static SOCKETS: HashMap<u64, SockActivity> =
    HashMap::with_max_entries(DEFAULT_MAX_TRACKED_SOCKETS, BPF_F_NO_PREALLOC);

/// Sockets that could not be given a record (a full map, no memory), so that each is counted once
/// in `TrackFailed` although every later event of it fails again. Least recently used ones make
/// room: only beyond 65,536 untracked sockets can one be counted twice.
#[map]
static UNTRACKED: LruHashMap<u64, u8> = LruHashMap::with_max_entries(65_536, 0);

/// Whether the caller has already established that `sk` is a TCP socket.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Known {
    Tcp,
    Unchecked,
}

/// Where records live. `cookie` is only asked for where the store needs it.
pub trait Store {
    /// The socket's record, if it has one.
    fn existing(sk: *mut c_void, cookie: impl FnOnce() -> u64) -> Option<*mut SockActivity>;
    /// The socket's record, created if the socket is TCP and has none yet. A socket that cannot
    /// be given one is counted in `Counter::TrackFailed` so the agent can report it.
    fn entry(
        sk: *mut c_void,
        cookie: impl FnOnce() -> u64,
        known: Known,
    ) -> Option<*mut SockActivity>;
}

/// Socket-local storage.
pub struct InSocket;

impl Store for InSocket {
    #[inline(always)]
    fn existing(sk: *mut c_void, _: impl FnOnce() -> u64) -> Option<*mut SockActivity> {
        storage(sk, 0)
    }

    #[inline(always)]
    fn entry(
        sk: *mut c_void,
        cookie: impl FnOnce() -> u64,
        known: Known,
    ) -> Option<*mut SockActivity> {
        if let Some(found) = storage(sk, 0) {
            return Some(found);
        }
        if known == Known::Unchecked && !is_tcp_stream(sk.cast()) {
            return None;
        }
        let created = storage(sk, BPF_SK_STORAGE_GET_F_CREATE.into());
        match created {
            Some(_) => activity::count(Counter::SocketsTracked),
            None => untracked(cookie()),
        }
        created
    }
}

#[inline(always)]
fn storage(sk: *mut c_void, flags: u64) -> Option<*mut SockActivity> {
    let map = ptr::from_ref(&SK_ACTIVITY).cast_mut().cast::<c_void>();
    // SAFETY: a BTF-typed socket pointer from the program's arguments, and no initial value
    // (a new record starts zeroed).
    let found = unsafe { bpf_sk_storage_get(map, sk, ptr::null_mut(), flags) };
    (!found.is_null()).then_some(found.cast::<SockActivity>())
}

/// A hash map by socket cookie.
pub struct ByCookie;

impl Store for ByCookie {
    #[inline(always)]
    fn existing(_: *mut c_void, cookie: impl FnOnce() -> u64) -> Option<*mut SockActivity> {
        SOCKETS.get_ptr_mut(cookie())
    }

    #[inline(always)]
    fn entry(
        sk: *mut c_void,
        cookie: impl FnOnce() -> u64,
        known: Known,
    ) -> Option<*mut SockActivity> {
        let cookie = cookie();
        if let Some(found) = SOCKETS.get_ptr_mut(cookie) {
            return Some(found);
        }
        if known == Known::Unchecked && !is_tcp_stream(sk.cast()) {
            return None;
        }
        // NOEXIST: another CPU may have created it meanwhile; then we use theirs below.
        let fresh = SockActivity::default();
        if SOCKETS.insert(cookie, fresh, BPF_NOEXIST).is_ok() {
            activity::count(Counter::SocketsTracked);
        } else if SOCKETS.get_ptr(cookie).is_none() {
            untracked(cookie);
            return None;
        }
        SOCKETS.get_ptr_mut(cookie)
    }
}

impl ByCookie {
    /// The socket is gone: so is its record.
    pub fn forget(cookie: u64) {
        let _ = SOCKETS.remove(cookie);
    }
}

/// Counts a socket that could not be given a record, once.
#[inline(always)]
fn untracked(cookie: u64) {
    if UNTRACKED.insert(cookie, 1u8, BPF_NOEXIST).is_ok() {
        activity::count(Counter::TrackFailed);
    }
}

/// Only TCP stream sockets get records: the generic send/receive tracepoints also fire for UNIX
/// and UDP sockets (which the hash map would never see destroyed).
#[inline(always)]
fn is_tcp_stream(sk: *const u8) -> bool {
    let (protocol_at, type_at) = (offset!(sk_protocol), offset!(sk_type));
    if protocol_at == 0 || type_at == 0 {
        return false;
    }
    read_at::<u16>(sk, protocol_at) == IPPROTO_TCP && read_at::<u16>(sk, type_at) == SOCK_STREAM
}

/// Application data moved through the socket in the thread `by`. Updated in place through the
/// record's pointer: no second map operation on the hot path.
#[inline(always)]
pub fn record_data(entry: *mut SockActivity, direction: Direction, by: Ids) {
    let now = activity::now_ns();
    // SAFETY: a valid record pointer from the store.
    unsafe {
        match direction {
            Direction::Send => (*entry).last_send_ns = now,
            Direction::Recv => (*entry).last_recv_ns = now,
        }
    }
    record_user(entry, by);
}

/// The thread `by` used the socket (moved data, connected, closed): the one to name for it.
#[inline(always)]
pub fn record_user(entry: *mut SockActivity, by: Ids) {
    // SAFETY: a valid record pointer from the store.
    unsafe {
        (*entry).last_tgid = by.tgid;
        (*entry).last_tid = by.tid;
    }
}

#[inline(always)]
pub fn record_state(entry: *mut SockActivity, state: u32) {
    // SAFETY: a valid record pointer from the store.
    unsafe {
        (*entry).state = state;
        (*entry).state_since_ns = activity::now_ns();
    }
}
