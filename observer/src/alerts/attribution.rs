//! Which threads are stuck with a socket: those blocked in a call on its fd right now (with how
//! long, when the probes timed the call), or failing that, the one that last moved data on it.
use std::collections::HashMap;

use observer_common::{Direction, TcpState, ThreadSyscall, ThreadTcpCall};
use serde::Serialize;

use crate::{
    detect::{Finding, Target},
    kernel::{
        probes::Activity,
        procfs::{self, Owner, ThreadState},
        syscalls,
    },
    snapshot::{SleepTimes, Snapshot, SocketView},
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ThreadInfo {
    pub tid: u32,
    pub name: String,
    /// The call the thread is blocked in on this socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_in: Option<&'static str>,
    /// How long it has been inside that call, as timed by the probes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_ms: Option<u64>,
    /// How `blocked_ms` was measured: `call` from the call's entry (exact), `sleep` since the
    /// thread last went to sleep (exact when the call blocked once; if something woke it within
    /// the call, the call has lasted at least that long).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_ms_from: Option<&'static str>,
    /// For a thread that is not blocked on the socket: how long ago it last moved data on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_io_ms: Option<u64>,
}

/// What the probes know that bears on who is stuck with a socket.
pub struct Probed<'a> {
    /// Per-thread socket syscalls (--syscall-timing): which fd, since when.
    pub syscalls: &'a HashMap<u32, ThreadSyscall>,
    /// Per-thread TCP sends and receives in progress (fentry/kprobe backends): which socket.
    pub tcp_calls: &'a HashMap<u32, ThreadTcpCall>,
    /// When each thread last went to sleep (tracepoint backend, named processes).
    pub sleeps: &'a SleepTimes,
    /// The socket's own record: who last moved data on it.
    pub activity: Option<&'a Activity>,
}

pub fn attribute(
    owner: &Owner,
    cookie: u64,
    threads: &[ThreadState],
    probed: &Probed,
    now_ns: u64,
) -> Vec<ThreadInfo> {
    let since = |enter_ns: u64| now_ns.saturating_sub(enter_ns) / 1_000_000;
    let blocked: Vec<ThreadInfo> = threads
        .iter()
        .filter_map(|t| {
            // The probes' records are exact and timed; /proc covers what they do not see.
            let syscall =
                probed.syscalls.get(&t.tid).filter(|c| c.enter_ns != 0 && c.fd == owner.fd);
            let kernel = probed
                .tcp_calls
                .get(&t.tid)
                .filter(|c| c.enter_ns != 0 && c.cookie == cookie && c.tgid == owner.pid);
            let seen = t.blocked.filter(|b| b.fd == owner.fd);
            let blocked_in = syscall
                .and_then(|c| syscalls::by_nr(i64::from(c.nr)).map(|s| s.name))
                .or(seen.map(|b| b.syscall))
                .or(kernel.map(|c| match Direction::from_raw(c.direction) {
                    Direction::Send => "tcp_sendmsg",
                    Direction::Recv => "tcp_recvmsg",
                }))?;
            // A thread blocked in connect() on a socket still in SYN_SENT entered it when the
            // SYN went out: the probes' exact state time is its time in the call.
            let connecting = (blocked_in == "connect")
                .then_some(probed.activity)
                .flatten()
                .filter(|a| a.state == TcpState::SynSent as u32 && a.state_since_ns != 0)
                .map(|a| a.state_since_ns);
            let timed = syscall.map(|c| c.enter_ns).or(kernel.map(|c| c.enter_ns)).or(connecting);
            // Only for a thread /proc shows waiting on this very fd: then its last sleep is
            // this wait (or, if it was woken meanwhile, the latest part of it).
            let slept = seen.and_then(|_| probed.sleeps.since(t.tid)).filter(|&at| at != 0);
            let (blocked_ms, blocked_ms_from) = match (timed, slept) {
                (Some(entered), _) => (Some(since(entered)), Some("call")),
                (None, Some(slept)) => (Some(since(slept)), Some("sleep")),
                (None, None) => (None, None),
            };
            Some(ThreadInfo {
                tid: t.tid,
                name: t.name.clone(),
                blocked_in: Some(blocked_in),
                blocked_ms,
                blocked_ms_from,
                last_io_ms: None,
            })
        })
        .collect();
    if !blocked.is_empty() {
        return blocked;
    }
    let Some(last) = probed.activity.filter(|a| a.last_tid != 0 && a.last_tgid == owner.pid) else {
        return vec![];
    };
    // A thread that has exited since is still worth naming by its id.
    let name = threads
        .iter()
        .find(|t| t.tid == last.last_tid)
        .map_or_else(|| "(exited)".to_owned(), |t| t.name.clone());
    let last_io_ns = last.last_send_ns.max(last.last_recv_ns);
    vec![ThreadInfo {
        tid: last.last_tid,
        name,
        blocked_in: None,
        blocked_ms: None,
        blocked_ms_from: None,
        last_io_ms: Some(since(last_io_ns)),
    }]
}

/// The threads stuck with the socket or process of `finding`, as of `snapshot`. /proc is read
/// once per process per poll (through `cache`), and only for processes with a new alert.
pub fn for_finding(
    snapshot: &Snapshot,
    finding: &Finding,
    cache: &mut HashMap<u32, Vec<ThreadState>>,
) -> Vec<ThreadInfo> {
    let Target::Socket(cookie) = finding.target else { return vec![] };
    if let Some(socket) = snapshot.find(cookie)
        && let Some(owner) = &socket.owner
    {
        let threads = cache.entry(owner.pid).or_insert_with(|| procfs::thread_states(owner.pid));
        let probed = Probed {
            syscalls: &snapshot.thread_syscalls,
            tcp_calls: &snapshot.thread_tcp_calls,
            sleeps: &snapshot.thread_sleeps,
            activity: socket.diag.activity.as_ref(),
        };
        return attribute(owner, cookie, threads, &probed, snapshot.taken_ns);
    }
    // A socket already gone (a reset on close): the thread that was using it.
    snapshot
        .resets
        .iter()
        .find(|r| r.cookie == cookie && r.tid != 0)
        .map(|r| ThreadInfo {
            tid: r.tid,
            name: r.thread_name.clone(),
            blocked_in: None,
            blocked_ms: None,
            blocked_ms_from: None,
            last_io_ms: None,
        })
        .into_iter()
        .collect()
}

/// Names the threads of many sockets of one snapshot, as a live table of every connection needs
/// each poll. Each owner's threads are read from /proc once and indexed by the fd and the socket
/// they are busy with, so a socket costs a few lookups rather than a pass over every thread of
/// its process; what [`attribute`] then sees are the only threads it could name.
pub struct ThreadIndex<'s, R> {
    snapshot: &'s Snapshot,
    read_threads: R,
    processes: HashMap<u32, ProcessThreads>,
}

/// One process's threads, indexed.
struct ProcessThreads {
    threads: Vec<ThreadState>,
    by_tid: HashMap<u32, usize>,
    /// Threads that /proc or their syscall record shows inside a call on each fd.
    by_fd: HashMap<i32, Vec<usize>>,
    /// Threads inside a TCP send or receive on each socket.
    by_cookie: HashMap<u64, Vec<usize>>,
}

impl<'s> ThreadIndex<'s, fn(u32) -> Vec<ThreadState>> {
    /// Reads threads from /proc, once per process, as sockets ask for them.
    pub fn new(snapshot: &'s Snapshot) -> Self {
        ThreadIndex::with_reader(snapshot, procfs::thread_states)
    }
}

impl<'s, R: FnMut(u32) -> Vec<ThreadState>> ThreadIndex<'s, R> {
    /// With `read_threads` standing in for /proc.
    pub fn with_reader(snapshot: &'s Snapshot, read_threads: R) -> Self {
        ThreadIndex { snapshot, read_threads, processes: HashMap::new() }
    }

    /// What [`attribute`] says of `socket`'s owner's threads (nothing for an unowned socket).
    pub fn threads_of(&mut self, socket: &SocketView) -> Vec<ThreadInfo> {
        let Some(owner) = &socket.owner else { return vec![] };
        let snapshot = self.snapshot;
        let process = self.processes.entry(owner.pid).or_insert_with(|| {
            ProcessThreads::index(owner.pid, (self.read_threads)(owner.pid), snapshot)
        });
        let cookie = socket.cookie();
        let mut picked: Vec<usize> = Vec::new();
        picked.extend(process.by_fd.get(&owner.fd).into_iter().flatten());
        picked.extend(process.by_cookie.get(&cookie).into_iter().flatten());
        if let Some(last) = socket.diag.activity.as_ref().map(|a| a.last_tid) {
            picked.extend(process.by_tid.get(&last));
        }
        // In /proc's order (by tid), as attribute() would have met them.
        picked.sort_unstable();
        picked.dedup();
        let candidates: Vec<ThreadState> =
            picked.iter().map(|&i| process.threads[i].clone()).collect();
        let probed = Probed {
            syscalls: &snapshot.thread_syscalls,
            tcp_calls: &snapshot.thread_tcp_calls,
            sleeps: &snapshot.thread_sleeps,
            activity: socket.diag.activity.as_ref(),
        };
        attribute(owner, cookie, &candidates, &probed, snapshot.taken_ns)
    }
}

impl ProcessThreads {
    fn index(pid: u32, threads: Vec<ThreadState>, snapshot: &Snapshot) -> Self {
        let mut by_tid = HashMap::with_capacity(threads.len());
        let mut by_fd: HashMap<i32, Vec<usize>> = HashMap::new();
        let mut by_cookie: HashMap<u64, Vec<usize>> = HashMap::new();
        for (i, t) in threads.iter().enumerate() {
            by_tid.insert(t.tid, i);
            if let Some(blocked) = t.blocked {
                by_fd.entry(blocked.fd).or_default().push(i);
            }
            if let Some(call) = snapshot.thread_syscalls.get(&t.tid).filter(|c| c.enter_ns != 0)
                && t.blocked.is_none_or(|b| b.fd != call.fd)
            {
                by_fd.entry(call.fd).or_default().push(i);
            }
            if let Some(call) =
                snapshot.thread_tcp_calls.get(&t.tid).filter(|c| c.enter_ns != 0 && c.tgid == pid)
            {
                by_cookie.entry(call.cookie).or_default().push(i);
            }
        }
        ProcessThreads { threads, by_tid, by_fd, by_cookie }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::procfs::BlockedCall;

    fn probed<'a>(
        syscalls: &'a HashMap<u32, ThreadSyscall>,
        tcp_calls: &'a HashMap<u32, ThreadTcpCall>,
        activity: Option<&'a Activity>,
    ) -> Probed<'a> {
        Probed { syscalls, tcp_calls, sleeps: &SleepTimes::Unknown, activity }
    }

    fn owner() -> Owner {
        Owner { pid: 100, fd: 7, comm: "srv".into() }
    }

    fn thread(tid: u32, name: &str, blocked: Option<(&'static str, i32)>) -> ThreadState {
        ThreadState {
            tid,
            name: name.into(),
            blocked: blocked.map(|(syscall, fd)| BlockedCall { syscall, fd }),
        }
    }

    #[test]
    fn threads_blocked_on_the_socket_fd_are_named() {
        let threads = [
            thread(100, "main", Some(("accept4", 3))),
            thread(101, "worker-1", Some(("read", 7))),
            thread(102, "worker-2", Some(("read", 8))),
        ];
        let got =
            attribute(&owner(), 1, &threads, &probed(&HashMap::new(), &HashMap::new(), None), 0);
        assert_eq!(
            got,
            vec![ThreadInfo {
                tid: 101,
                name: "worker-1".into(),
                blocked_in: Some("read"),
                blocked_ms: None,
                blocked_ms_from: None,
                last_io_ms: None
            }]
        );
    }

    #[test]
    fn probe_timed_calls_give_blocked_ms() {
        let threads = [thread(101, "worker-1", Some(("read", 7))), thread(102, "worker-2", None)];
        let calls = HashMap::from([
            (101, ThreadSyscall { enter_ns: 1_000_000_000, nr: libc::SYS_recvfrom as u32, fd: 7 }),
            // Thread 102's last call on this fd has returned: not blocked.
            (102, ThreadSyscall { enter_ns: 0, nr: libc::SYS_recvfrom as u32, fd: 7 }),
        ]);
        let got = attribute(
            &owner(),
            1,
            &threads,
            &probed(&calls, &HashMap::new(), None),
            43_000_000_000,
        );
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].blocked_in, got[0].blocked_ms), (Some("recvfrom"), Some(42_000)));
    }

    #[test]
    fn a_blocked_thread_is_timed_from_its_last_sleep_and_a_call_time_wins() {
        let threads = [
            thread(101, "worker-1", Some(("read", 7))),
            // Asleep too, but not on this socket's fd: its sleep says nothing about it.
            thread(102, "worker-2", Some(("read", 9))),
        ];
        let sleeps = SleepTimes::Known(HashMap::from([(101, 3_000_000_000), (102, 1)]));
        let (no_calls, no_tcp) = (HashMap::new(), HashMap::new());
        let probed =
            Probed { syscalls: &no_calls, tcp_calls: &no_tcp, sleeps: &sleeps, activity: None };
        let got = attribute(&owner(), 1, &threads, &probed, 10_000_000_000);
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].tid, got[0].blocked_ms, got[0].blocked_ms_from),
            (101, Some(7_000), Some("sleep"))
        );
        // The call's own entry time, where a probe took it, is exact and preferred.
        let calls = HashMap::from([(
            101,
            ThreadSyscall { enter_ns: 2_000_000_000, nr: libc::SYS_read as u32, fd: 7 },
        )]);
        let probed =
            Probed { syscalls: &calls, tcp_calls: &no_tcp, sleeps: &sleeps, activity: None };
        let got = attribute(&owner(), 1, &threads, &probed, 10_000_000_000);
        assert_eq!((got[0].blocked_ms, got[0].blocked_ms_from), (Some(8_000), Some("call")));
    }

    #[test]
    fn without_a_blocked_thread_the_last_thread_to_do_io_is_named() {
        let activity = Activity {
            last_tgid: 100,
            last_tid: 105,
            last_recv_ns: 4_000_000_000,
            ..Default::default()
        };
        let (none, no_calls) = (HashMap::new(), HashMap::new());
        let probed = probed(&none, &no_calls, Some(&activity));
        let got = attribute(&owner(), 1, &[thread(100, "main", None)], &probed, 5_000_000_000);
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].tid, got[0].name.as_str(), got[0].last_io_ms),
            (105, "(exited)", Some(1000))
        );
    }

    #[test]
    fn io_by_another_process_is_not_attributed_to_the_owner() {
        let activity = Activity { last_tgid: 999, last_tid: 999, ..Default::default() };
        assert!(
            attribute(
                &owner(),
                1,
                &[],
                &probed(&HashMap::new(), &HashMap::new(), Some(&activity)),
                0
            )
            .is_empty()
        );
    }

    #[test]
    fn kernel_side_calls_name_and_time_threads_on_that_socket_only() {
        let threads =
            [thread(101, "worker-1", None), thread(102, "worker-2", None), thread(103, "w3", None)];
        let call = |cookie, tgid, direction: Direction| ThreadTcpCall {
            enter_ns: 2_000_000_000,
            cookie,
            tgid,
            direction: direction as u8,
            ..ThreadTcpCall::default()
        };
        let tcp_calls = HashMap::from([
            (101, call(1, 100, Direction::Send)),
            (102, call(2, 100, Direction::Recv)), // another socket
            (103, call(1, 999, Direction::Recv)), // same cookie, another process: impossible, ignored
        ]);
        let got = attribute(
            &owner(),
            1,
            &threads,
            &probed(&HashMap::new(), &tcp_calls, None),
            5_000_000_000,
        );
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].tid, got[0].blocked_in, got[0].blocked_ms),
            (101, Some("tcp_sendmsg"), Some(3000))
        );
    }

    #[test]
    fn a_thread_blocked_in_connect_is_timed_from_the_syn() {
        let threads = [thread(101, "caller", Some(("connect", 7)))];
        let syn_sent = Activity {
            state: TcpState::SynSent as u32,
            state_since_ns: 2_000_000_000,
            ..Default::default()
        };
        let (none, no_calls) = (HashMap::new(), HashMap::new());
        let got = attribute(
            &owner(),
            1,
            &threads,
            &probed(&none, &no_calls, Some(&syn_sent)),
            9e9 as u64,
        );
        assert_eq!((got[0].blocked_in, got[0].blocked_ms), (Some("connect"), Some(7000)));
        // Without the probes' state time (a connect begun before the agent), no time is guessed.
        let got = attribute(&owner(), 1, &threads, &probed(&none, &no_calls, None), 9e9 as u64);
        assert_eq!((got[0].blocked_in, got[0].blocked_ms), (Some("connect"), None));
    }

    #[test]
    fn proc_names_the_syscall_and_the_kernel_probe_times_it() {
        let threads = [thread(101, "worker-1", Some(("write", 7)))];
        let tcp_calls = HashMap::from([(
            101,
            ThreadTcpCall {
                enter_ns: 1_000_000_000,
                cookie: 1,
                tgid: 100,
                direction: Direction::Send as u8,
                ..ThreadTcpCall::default()
            },
        )]);
        let got = attribute(
            &owner(),
            1,
            &threads,
            &probed(&HashMap::new(), &tcp_calls, None),
            4_000_000_000,
        );
        assert_eq!((got[0].blocked_in, got[0].blocked_ms), (Some("write"), Some(3000)));
    }

    #[test]
    fn the_index_names_the_same_threads_as_a_pass_over_all_of_them() {
        use crate::snapshot::fixtures::{NOW_NS, snapshot as snapshot_of, socket};
        use observer_common::TcpState;

        // Socket n is fd 3 + n of pid 42 (the fixtures' owner).
        let mut sockets: Vec<SocketView> =
            (1..=5).map(|c| socket(c, TcpState::Established, 0, 0)).collect();
        sockets[4].diag.activity = Some(Activity {
            last_tgid: 42,
            last_tid: 205,
            last_recv_ns: NOW_NS - 3_000_000_000,
            ..Default::default()
        });
        sockets[2].owner = None;
        let mut snap = snapshot_of(sockets);
        let threads = vec![
            thread(201, "worker-1", Some(("read", 4))), // socket 1, seen in /proc
            thread(202, "worker-2", None),              // socket 2, timed by its syscall record
            thread(203, "worker-3", None),              // socket 4, inside tcp_recvmsg
            thread(204, "idle", Some(("nanosleep", 99))),
            thread(205, "worker-5", None), // socket 5's last reader
        ];
        snap.thread_syscalls = HashMap::from([(
            202,
            ThreadSyscall { enter_ns: NOW_NS - 1_000_000_000, nr: libc::SYS_read as u32, fd: 5 },
        )]);
        snap.thread_tcp_calls = HashMap::from([(
            203,
            ThreadTcpCall {
                enter_ns: NOW_NS - 2_000_000_000,
                cookie: 4,
                tgid: 42,
                direction: Direction::Recv as u8,
                ..ThreadTcpCall::default()
            },
        )]);
        let mut reads = 0;
        let mut index = ThreadIndex::with_reader(&snap, |_| {
            reads += 1;
            threads.clone()
        });
        let got: Vec<Vec<ThreadInfo>> = snap.sockets.iter().map(|s| index.threads_of(s)).collect();
        drop(index);
        assert_eq!(reads, 1, "/proc read once per process");
        let expected: Vec<Vec<ThreadInfo>> = snap
            .sockets
            .iter()
            .map(|s| match &s.owner {
                None => vec![],
                Some(owner) => {
                    let probed = Probed {
                        syscalls: &snap.thread_syscalls,
                        tcp_calls: &snap.thread_tcp_calls,
                        sleeps: &snap.thread_sleeps,
                        activity: s.diag.activity.as_ref(),
                    };
                    attribute(owner, s.cookie(), &threads, &probed, snap.taken_ns)
                }
            })
            .collect();
        assert_eq!(got, expected);
        let names: Vec<Vec<&str>> =
            got.iter().map(|ts| ts.iter().map(|t| t.name.as_str()).collect()).collect();
        assert_eq!(
            names,
            vec![vec!["worker-1"], vec!["worker-2"], vec![], vec!["worker-3"], vec!["worker-5"]]
        );
    }
}
