//! When each watched thread last went to sleep, from the scheduler's context switches: how the
//! tracepoint backend tells how long a thread has been blocked without hooking any syscall.
//! For a thread blocked in a call now, the time since it last went to sleep is the whole wait
//! when the call blocked once, and a lower bound when something woke it within the call.
use aya_ebpf::{macros::map, maps::HashMap};
use observer_common::BPF_F_NO_PREALLOC;

use crate::{activity, filter};

/// Thread id -> when it last switched out of the CPU voluntarily (to wait for something).
#[map]
static THREAD_SLEEPS: HashMap<u32, u64> = HashMap::with_max_entries(65_536, BPF_F_NO_PREALLOC);

/// The current thread leaves the CPU; `preempt` when it was made to (it stays runnable).
#[inline(always)]
pub fn switched_out(preempt: bool) {
    if preempt {
        return;
    }
    // Every context switch of the machine comes here: the filter rules others out first.
    let Some(ids) = filter::watched_current() else {
        return;
    };
    activity::record_for_thread(&THREAD_SLEEPS, ids.tid, activity::now_ns());
}

/// The current thread is exiting: forget it.
#[inline(always)]
pub fn thread_exit(tid: u32) {
    let _ = THREAD_SLEEPS.remove(tid);
}
