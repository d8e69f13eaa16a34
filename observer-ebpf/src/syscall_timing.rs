//! Per-thread socket calls of the watched processes: which call on which fd, since when. This is
//! what turns "a thread is blocked in read" into "blocked in read on this socket for 42 s".
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap},
};
use observer_common::{BPF_F_NO_PREALLOC, Counter, MAX_SYSCALL_NR, ThreadSyscall, syscall_kind};

use crate::{
    activity::{self, offset, read_at},
    filter,
};

const EMFILE: i64 = 24;
const ENFILE: i64 = 23;

/// Thread id -> its current or last tracked call. Updated in place; removed when the thread exits.
#[map]
static THREAD_SYSCALLS: HashMap<u32, ThreadSyscall> =
    HashMap::with_max_entries(65_536, BPF_F_NO_PREALLOC);

/// Syscall number -> `syscall_kind`, filled by the agent with this architecture's numbers.
#[map]
static TRACKED_SYSCALLS: Array<u32> = Array::with_max_entries(MAX_SYSCALL_NR, 0);

/// Process id -> accept()/accept4() calls that failed with EMFILE or ENFILE.
#[map]
static ACCEPT_ERRORS: HashMap<u32, u64> = HashMap::with_max_entries(4096, 0);

#[inline(always)]
fn kind_of(nr: i64) -> u32 {
    if !(0..MAX_SYSCALL_NR as i64).contains(&nr) {
        return syscall_kind::NONE;
    }
    TRACKED_SYSCALLS.get(nr as u32).copied().unwrap_or(syscall_kind::NONE)
}

/// A watched thread enters syscall `nr` with user registers `regs`.
#[inline(always)]
pub fn enter(regs: *const u8, nr: i64) {
    // Every syscall of the machine starts here: the inline pid check first, then the table.
    let Some(ids) = filter::watched_current() else {
        return;
    };
    if kind_of(nr) == syscall_kind::NONE {
        return;
    }
    let fd: u64 = read_at(regs, offset!(regs_arg0));
    let call = ThreadSyscall { enter_ns: activity::now_ns(), nr: nr as u32, fd: fd as i32 };
    activity::record_for_thread(&THREAD_SYSCALLS, ids.tid, call);
}

/// The current thread leaves a syscall with result `ret`.
#[inline(always)]
pub fn exit(ret: i64) {
    let ids = filter::current_ids();
    // Every syscall of the machine ends here: rule other processes out before any map lookup.
    // (The syscall programs are attached only when processes are named, so is_watched, which
    // is false for everyone outside that set, is the complete check.)
    if !filter::is_watched(ids.tgid) {
        return;
    }
    let Some(slot) = THREAD_SYSCALLS.get_ptr_mut(ids.tid) else {
        return;
    };
    let nr = unsafe {
        if (*slot).enter_ns == 0 {
            return;
        }
        (*slot).enter_ns = 0;
        (*slot).nr
    };
    if (ret == -EMFILE || ret == -ENFILE) && kind_of(nr as i64) == syscall_kind::ACCEPT {
        count_accept_error(ids.tgid);
    }
}

fn count_accept_error(tgid: u32) {
    activity::count(Counter::AcceptErrors);
    match ACCEPT_ERRORS.get_ptr_mut(tgid) {
        Some(total) => unsafe { activity::atomic_add(total, 1) },
        None => {
            let _ = ACCEPT_ERRORS.insert(tgid, 1, 0);
        }
    }
}

/// Thread `tid` is exiting: forget its calls.
#[inline(always)]
pub fn thread_exit(tid: u32) {
    let _ = THREAD_SYSCALLS.remove(tid);
}
