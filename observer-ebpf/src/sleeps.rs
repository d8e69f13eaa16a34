//! When each watched thread last went to sleep, from the scheduler's context switches: how the
//! tracepoint backend tells how long a thread has been blocked without hooking any syscall.
//! For a thread blocked in a call now, the time since it last went to sleep is the whole wait
//! when the call blocked once, and a lower bound when something woke it within the call.
use aya_ebpf::{macros::map, maps::Array};
use observer_common::{THREAD_SLEEP_SLOTS, ThreadSleep};

use crate::{activity, filter};

/// When each watched thread last switched out of the CPU voluntarily (to wait for something),
/// in the slot of its id modulo the table's size. An array, not a hash map: this runs on every
/// context switch of a watched thread, and a hash lookup was most of its cost.
#[map]
static THREAD_SLEEPS: Array<ThreadSleep> = Array::with_max_entries(THREAD_SLEEP_SLOTS, 0);

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
    if let Some(slot) = THREAD_SLEEPS.get_ptr_mut(ids.tid % THREAD_SLEEP_SLOTS) {
        // SAFETY: an element of a preallocated array.
        unsafe { *slot = ThreadSleep { tid: ids.tid, _pad: 0, since_ns: activity::now_ns() } };
    }
}

/// The current thread is exiting: its slot no longer speaks for it.
#[inline(always)]
pub fn thread_exit(tid: u32) {
    if let Some(slot) = THREAD_SLEEPS.get_ptr_mut(tid % THREAD_SLEEP_SLOTS) {
        // SAFETY: as above.
        unsafe {
            if (*slot).tid == tid {
                (*slot).since_ns = 0;
            }
        }
    }
}
