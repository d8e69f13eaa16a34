//! Which processes' calls are recorded, and their ids as the agent's pid namespace numbers them.
use aya_ebpf::{
    bindings::bpf_pidns_info,
    helpers::{bpf_get_current_pid_tgid, generated::bpf_get_ns_current_pid_tgid},
    macros::map,
    maps::Array,
};
use observer_common::WATCHED_WORDS;

use crate::activity::LoadTime;

/// The watched processes, one bit per process id (as the agent's pid namespace numbers them):
/// word `tgid / 64`, bit `tgid % 64`. An array lookup, which the verifier inlines, and a bit test
/// cost the same for one watched process or ten thousand, and the agent can change the set while
/// the probes run (a restarted server, a forked child). Sized by the agent from pid_max.
#[map]
static WATCHED: Array<u64> = Array::with_max_entries(WATCHED_WORDS, 0);

/// Whether only the processes in `WATCHED` are recorded (0: every process).
#[unsafe(no_mangle)]
static FILTERING: LoadTime<u32> = LoadTime::new(0);
/// The agent's pid namespace (device and inode of its nsfs file), when it is not the initial
/// one: ids are then translated into it. 0: the agent sees the kernel's own ids.
#[unsafe(no_mangle)]
static PIDNS_DEV: LoadTime<u64> = LoadTime::new(0);
#[unsafe(no_mangle)]
static PIDNS_INO: LoadTime<u64> = LoadTime::new(0);

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
