//! Threads inside a TCP send or receive, for the fentry and kprobe backends: the entry probe
//! records which socket and since when, the exit probe clears it and books the data moved. A
//! thread blocked in write() is visible the moment it blocks.
use aya_ebpf::{macros::map, maps::HashMap};
use observer_common::{BPF_F_NO_PREALLOC, Direction, MSG_PEEK, ThreadTcpCall};

use crate::{
    activity,
    filter::{self, Ids},
    store::{Known, Store, record_data},
};

/// Thread id -> its current (or last) TCP send/receive. Updated in place; removed at thread exit.
#[map]
static THREAD_TCP_CALLS: HashMap<u32, ThreadTcpCall> =
    HashMap::with_max_entries(65_536, BPF_F_NO_PREALLOC);

/// A thread enters tcp_sendmsg/tcp_recvmsg on socket `sk` (known by `cookie`; 0 if unknown yet).
#[inline(always)]
pub fn enter(sk: *const u8, cookie: u64, direction: Direction, flags: u32) {
    let Some(ids) = filter::watched_current() else {
        return;
    };
    let call = ThreadTcpCall {
        enter_ns: activity::now_ns(),
        cookie,
        sk: sk as u64,
        tgid: ids.tgid,
        direction: direction as u8,
        peek: u8::from(flags & MSG_PEEK != 0),
        _pad: [0; 2],
    };
    activity::record_for_thread(&THREAD_TCP_CALLS, ids.tid, call);
}

/// The current thread returns `ret` from the call `enter` recorded. Returns that call, and the
/// thread, when it moved data (ret > 0, not a peek), for the caller to book.
#[inline(always)]
pub fn exit(ret: i64) -> Option<(ThreadTcpCall, Ids)> {
    let ids = filter::current_ids();
    let slot = THREAD_TCP_CALLS.get_ptr_mut(ids.tid)?;
    let call = unsafe {
        if (*slot).enter_ns == 0 {
            return None;
        }
        (*slot).enter_ns = 0;
        *slot
    };
    (ret > 0 && call.peek == 0).then_some((call, ids))
}

/// Books data moved on the socket of `call`, in the record `S` keeps.
#[inline(always)]
pub fn book<S: Store>(
    sk: *mut core::ffi::c_void,
    cookie: impl FnOnce() -> u64,
    (call, ids): (ThreadTcpCall, Ids),
) {
    let direction = Direction::from_raw(call.direction);
    if let Some(entry) = S::entry(sk, cookie, Known::Tcp) {
        record_data(entry, direction, ids);
    }
}

/// Thread `tid` is exiting: forget its calls.
#[inline(always)]
pub fn thread_exit(tid: u32) {
    let _ = THREAD_TCP_CALLS.remove(tid);
}
