//! Threads inside a TCP send or receive, for the fentry and kprobe backends: the entry probe
//! records which socket and since when, the exit probe clears it and books the data moved. A
//! thread blocked in write() is visible the moment it blocks.
use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::map, maps::HashMap};
use observer_common::{CALL_SEND, Counter, SockCall};

use crate::activity::{self, Direction, Known};

const BPF_F_NO_PREALLOC: u32 = 1;
const MSG_PEEK: u32 = 2;

/// Thread id -> its current (or last) TCP send/receive. Updated in place; removed at thread exit.
#[map]
static SOCK_CALLS: HashMap<u32, SockCall> = HashMap::with_max_entries(65_536, BPF_F_NO_PREALLOC);

/// A thread enters tcp_sendmsg/tcp_recvmsg on socket `sk` (known by `cookie`; 0 if unknown yet).
#[inline(always)]
pub fn enter(sk: *const u8, cookie: u64, direction: u16, flags: u32) {
    if !activity::current_is_watched() {
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let call = SockCall {
        enter_ns: activity::now_ns(),
        cookie,
        sk: sk as u64,
        tgid: (pid_tgid >> 32) as u32,
        direction,
        peek: u16::from(flags & MSG_PEEK != 0),
    };
    let tid = pid_tgid as u32;
    match SOCK_CALLS.get_ptr_mut(tid) {
        Some(slot) => unsafe { *slot = call },
        None => {
            if SOCK_CALLS.insert(tid, call, 0).is_err() {
                activity::count(Counter::ThreadTrackFailed);
            }
        }
    }
}

/// The current thread returns `ret` from the call `enter` recorded. Returns that call when it
/// moved data (ret > 0, not a peek), for the caller to book.
#[inline(always)]
pub fn exit(ret: i64) -> Option<SockCall> {
    let slot = SOCK_CALLS.get_ptr_mut(bpf_get_current_pid_tgid() as u32)?;
    let call = unsafe {
        if (*slot).enter_ns == 0 {
            return None;
        }
        (*slot).enter_ns = 0;
        *slot
    };
    (ret > 0 && call.peek == 0).then_some(call)
}

/// Books `bytes` moved on the socket of `call`.
#[inline(always)]
pub fn book(sk: *mut core::ffi::c_void, cookie: u64, call: &SockCall, bytes: i64) {
    activity::count(if call.direction == CALL_SEND {
        Counter::SendEvents
    } else {
        Counter::RecvEvents
    });
    let direction = if call.direction == CALL_SEND { Direction::Send } else { Direction::Recv };
    if let Some(entry) = activity::entry(sk, cookie, Known::Tcp) {
        activity::record_data(entry, direction, bytes as u64);
    }
}

/// The current thread is exiting: forget its calls.
#[inline(always)]
pub fn thread_exit() {
    let _ = SOCK_CALLS.remove(bpf_get_current_pid_tgid() as u32);
}
