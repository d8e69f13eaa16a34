//! One poll's joined view of the watched sockets: the kernel's table (sock_diag), what the probes
//! recorded, and which process and fd own each socket. Everything downstream (detection, alerts,
//! output) is a pure function of snapshots.
use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use observer_common::{Direction, TcpState, ThreadSyscall, ThreadTcpCall};
use serde::Serialize;

pub use self::{
    collect::{Collector, Scope},
    workload::{Placement, Workload, WorkloadOptions},
};
use crate::{
    fastmap::FastMap,
    kernel::{
        probes::{Activity, SleepTable},
        procfs::Owner,
        sock_diag::DiagSocket,
    },
};

mod collect;
mod orphans;
pub use orphans::is_orphan_entry;
pub mod targets;
pub mod workload;

#[derive(Clone, Debug)]
pub struct SocketView {
    pub diag: DiagSocket,
    /// The network namespace the socket lives in (where it must be acted on).
    pub netns: u64,
    pub owner: Option<Owner>,
    /// The owner's container and pod (for a socket without owner, only the node).
    pub workload: Option<Arc<Workload>>,
}

/// A watched process as a whole (for fd exhaustion and its accept loop).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessView {
    pub pid: u32,
    pub comm: Arc<str>,
    pub fds_used: u32,
    /// Soft RLIMIT_NOFILE; `None` when unlimited or unreadable.
    pub fd_limit: Option<u64>,
    /// accept() failures for lack of fds since the agent started (needs --pid).
    pub accept_errors: Option<u64>,
    /// Connections waiting in the accept queues of its listeners.
    pub listen_queue: u32,
    /// CPU time it has used (user and system, nanoseconds), read only while it is near its fd
    /// limit: what `accept_spinning` measures.
    pub cpu_ns: Option<u64>,
    pub netns: Option<u64>,
    pub workload: Option<Arc<Workload>>,
}

/// Who held a socket that no fd holds any more (an orphan, on its way out), as the agent saw
/// it: in an earlier poll, or moving data through the probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormerOwner {
    pub pid: u32,
    /// `None` when the process is gone and its name was never seen.
    pub comm: Option<Arc<str>>,
}

/// A data-losing reset the probes reported since the previous snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct ResetView {
    pub cookie: u64,
    pub pid: u32,
    pub tid: u32,
    /// The process's name, and the name of the thread that was using the socket.
    pub comm: String,
    pub thread_name: String,
    /// The fd, if the process still holds the socket.
    pub fd: Option<i32>,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// `None` for a state the probes' number does not name.
    pub state: Option<TcpState>,
    /// `Send` when this side sent the reset, `Recv` when it received it.
    pub direction: Direction,
    pub unread: u32,
    pub unsent: u32,
    /// The socket's network namespace, when it is still in the snapshot.
    pub netns: Option<u64>,
    pub workload: Option<Arc<Workload>>,
}

/// When threads last went to sleep: the probes' table, asked one thread at a time, or (in unit
/// tests) a fixed set.
#[derive(Clone, Debug, Default)]
pub enum SleepTimes {
    #[default]
    Unknown,
    Table(Arc<SleepTable>),
    #[cfg(test)]
    Known(HashMap<u32, u64>),
}

impl SleepTimes {
    pub fn since(&self, tid: u32) -> Option<u64> {
        match self {
            SleepTimes::Unknown => None,
            SleepTimes::Table(table) => table.since(tid),
            #[cfg(test)]
            SleepTimes::Known(known) => known.get(&tid).copied(),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// CLOCK_MONOTONIC nanoseconds when the snapshot was taken (the probes' clock).
    pub taken_ns: u64,
    pub sockets: Vec<SocketView>,
    pub processes: Vec<ProcessView>,
    pub resets: Vec<ResetView>,
    /// Each watched thread's current or last socket syscall (empty without --syscall-timing).
    pub thread_syscalls: HashMap<u32, ThreadSyscall>,
    /// Threads inside a TCP send or receive now (fentry and kprobe backends).
    pub thread_tcp_calls: HashMap<u32, ThreadTcpCall>,
    /// When watched threads last went to sleep (tracepoint backend, named processes).
    pub thread_sleeps: SleepTimes,
    /// Entries in the probes' socket map (for the agent's own health report).
    pub map_entries: usize,
    /// Orphaned sockets in this snapshot, by cookie: who held them before they were closed.
    pub former_owners: FastMap<u64, FormerOwner>,
    by_cookie: FastMap<u64, usize>,
}

impl Snapshot {
    #[cfg(test)]
    pub fn new(
        taken_ns: u64,
        sockets: Vec<SocketView>,
        processes: Vec<ProcessView>,
        resets: Vec<ResetView>,
    ) -> Snapshot {
        Snapshot::with_index(taken_ns, sockets, processes, resets, FastMap::default())
    }

    /// A snapshot of `sockets`, its cookie index built in `index` (a previous snapshot's, emptied
    /// here): at 100k sockets the index is then neither reallocated nor faulted in again.
    pub fn with_index(
        taken_ns: u64,
        sockets: Vec<SocketView>,
        processes: Vec<ProcessView>,
        resets: Vec<ResetView>,
        mut index: FastMap<u64, usize>,
    ) -> Snapshot {
        index.clear();
        index.extend(sockets.iter().enumerate().map(|(i, s)| (s.diag.cookie, i)));
        Snapshot {
            taken_ns,
            sockets,
            processes,
            resets,
            thread_syscalls: HashMap::new(),
            thread_tcp_calls: HashMap::new(),
            thread_sleeps: SleepTimes::default(),
            map_entries: 0,
            former_owners: FastMap::default(),
            by_cookie: index,
        }
    }

    /// Adds a socket found after the snapshot was built.
    pub fn push(&mut self, socket: SocketView) {
        self.by_cookie.insert(socket.cookie(), self.sockets.len());
        self.sockets.push(socket);
    }

    /// Records what the probes saw about the socket `cookie`, if it is in this snapshot; returns
    /// whether it is. Lets the probe map stream in without a second table of every socket.
    pub fn set_activity(&mut self, cookie: u64, activity: Activity) -> bool {
        match self.by_cookie.get(&cookie) {
            Some(&i) => {
                self.sockets[i].diag.activity = Some(activity);
                true
            }
            None => false,
        }
    }

    /// The socket records and the cookie index, for reuse of their buffers.
    pub fn into_parts(self) -> (Vec<SocketView>, FastMap<u64, usize>) {
        (self.sockets, self.by_cookie)
    }

    /// Who and what `socket` of this snapshot is: for an orphan, the process that held it.
    pub fn identity_of(&self, socket: &SocketView) -> Identity {
        let mut identity = Identity::of_socket(socket);
        if socket.owner.is_none()
            && let Some(former) = self.former_owners.get(&socket.cookie())
        {
            identity.pid = Some(former.pid);
            identity.comm = former.comm.clone();
        }
        identity
    }

    pub fn find(&self, cookie: u64) -> Option<&SocketView> {
        self.by_cookie.get(&cookie).map(|&i| &self.sockets[i])
    }

    pub fn process(&self, pid: u32) -> Option<&ProcessView> {
        self.processes.iter().find(|p| p.pid == pid)
    }
}

/// Who and what an alert is about: the fields every alert, clear and action event carries.
/// Process-level alerts (fd exhaustion) have no socket fields. Compact (no owned strings): the
/// alert book keeps one per standing alert.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub pid: Option<u32>,
    pub comm: Option<Arc<str>>,
    pub fd: Option<i32>,
    pub cookie: Option<u64>,
    /// Serialized as `ip:port`, IPv6 as `[::1]:8080`.
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    pub state: Option<&'static str>,
    /// Where it lives, each left out when not known: the network namespace (its nsfs inode),
    /// then the container, pod and node ([`Workload`]'s fields, in that order).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u64>,
    #[serde(flatten)]
    pub workload: Option<Arc<Workload>>,
}

impl Identity {
    /// Nothing known yet.
    pub fn of_none() -> Self {
        Identity {
            pid: None,
            comm: None,
            fd: None,
            cookie: None,
            local: None,
            remote: None,
            state: None,
            netns: None,
            workload: None,
        }
    }

    pub fn of_socket(socket: &SocketView) -> Self {
        Identity {
            pid: socket.owner.as_ref().map(|o| o.pid),
            comm: socket.owner.as_ref().map(|o| o.comm.clone()),
            fd: socket.owner.as_ref().map(|o| o.fd),
            cookie: Some(socket.cookie()),
            local: Some(socket.local()),
            remote: Some(socket.remote()),
            state: Some(socket.diag.state.name()),
            netns: Some(socket.netns),
            workload: socket.workload.clone(),
        }
    }

    pub fn of_process(process: &ProcessView) -> Self {
        Identity {
            pid: Some(process.pid),
            comm: Some(process.comm.clone()),
            fd: None,
            cookie: None,
            local: None,
            remote: None,
            state: None,
            netns: process.netns,
            workload: process.workload.clone(),
        }
    }

    pub fn of_reset(reset: &ResetView) -> Self {
        Identity {
            pid: Some(reset.pid),
            comm: Some(Arc::from(reset.comm.as_str())),
            fd: reset.fd,
            cookie: Some(reset.cookie),
            local: Some(reset.local),
            remote: Some(reset.remote),
            state: Some(reset.state.map_or("UNKNOWN", TcpState::name)),
            netns: reset.netns,
            workload: reset.workload.clone(),
        }
    }
}

fn ms_since(now_ns: u64, then_ns: u64) -> Option<u64> {
    (then_ns != 0).then(|| now_ns.saturating_sub(then_ns) / 1_000_000)
}

impl SocketView {
    pub fn cookie(&self) -> u64 {
        self.diag.cookie
    }

    /// Whether no fd holds this socket any more and it is on its way out (see `orphans`).
    pub fn is_orphan(&self) -> bool {
        orphans::is_orphan(self)
    }

    pub fn local(&self) -> SocketAddr {
        self.diag.local.addr()
    }

    pub fn remote(&self) -> SocketAddr {
        self.diag.remote.addr()
    }

    /// Milliseconds since data last went out: the more recent of what the probes saw the
    /// application send and what tcp_info says TCP last sent. tcp_info alone covers sockets
    /// that were already open when the agent started.
    pub fn last_send_ms(&self, now_ns: u64) -> Option<u64> {
        let probe = self.diag.activity.and_then(|a| ms_since(now_ns, a.last_send_ns));
        let kernel = self.kernel_times().map(|t| u64::from(t.last_data_sent_ms));
        min_known(probe, kernel)
    }

    /// Milliseconds since data last came in (see [`Self::last_send_ms`]).
    pub fn last_recv_ms(&self, now_ns: u64) -> Option<u64> {
        let probe = self.diag.activity.and_then(|a| ms_since(now_ns, a.last_recv_ns));
        let kernel = self.kernel_times().map(|t| u64::from(t.last_data_recv_ms));
        min_known(probe, kernel)
    }

    /// tcp_info, where its "time since" fields mean something: before the handshake completes
    /// nothing was ever sent or received, and they count from an unset stamp (hours).
    fn kernel_times(&self) -> Option<crate::kernel::tcp_info::TcpInfo> {
        self.diag.tcp.filter(|_| self.diag.state != TcpState::SynSent)
    }

    /// Milliseconds since data moved in either direction.
    pub fn idle_ms(&self, now_ns: u64) -> Option<u64> {
        min_known(self.last_send_ms(now_ns), self.last_recv_ms(now_ns))
    }

    /// Bytes over the socket's whole life, from the kernel's counters.
    pub fn bytes_sent(&self) -> u64 {
        self.diag.tcp.map_or(0, |t| t.bytes_sent)
    }

    pub fn bytes_received(&self) -> u64 {
        self.diag.tcp.map_or(0, |t| t.bytes_received)
    }

    pub fn retransmits(&self) -> u64 {
        self.diag.tcp.map_or(0, |t| u64::from(t.total_retrans))
    }
}

fn min_known(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
pub mod fixtures {
    //! Synthetic sockets for the pure tests.
    use super::*;
    use crate::kernel::tcp_info::TcpInfo;

    pub const NOW_NS: u64 = 1_000_000_000_000;

    pub fn snapshot(sockets: Vec<SocketView>) -> Snapshot {
        Snapshot::new(NOW_NS, sockets, vec![], vec![])
    }

    pub fn socket(
        cookie: u64,
        state: TcpState,
        last_sent_ms: u32,
        last_recv_ms: u32,
    ) -> SocketView {
        SocketView {
            netns: 1,
            diag: DiagSocket {
                family: libc::AF_INET as u8,
                state,
                timer: 0,
                timer_expires_ms: 0,
                local: "127.0.0.1:8080".parse().unwrap(),
                remote: format!("127.0.0.1:{}", 40000 + cookie).parse().unwrap(),
                interface: 0,
                cookie,
                rqueue: 0,
                wqueue: 0,
                inode: 1000 + cookie as u32,
                drops: None,
                tcp: Some(TcpInfo {
                    state: state as u8,
                    last_data_sent_ms: last_sent_ms,
                    last_data_recv_ms: last_recv_ms,
                    last_ack_recv_ms: last_recv_ms,
                    bytes_sent: 10,
                    bytes_received: 20,
                    ..TcpInfo::default()
                }),
                activity: None,
            },
            owner: Some(Owner { pid: 42, fd: 3 + cookie as i32, comm: "server".into() }),
            workload: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fixtures::*, *};

    #[test]
    fn kernel_times_cover_sockets_the_probes_never_saw() {
        let s = socket(1, TcpState::Established, 5000, 7000);
        assert_eq!(s.last_send_ms(NOW_NS), Some(5000));
        assert_eq!(s.last_recv_ms(NOW_NS), Some(7000));
        assert_eq!(s.idle_ms(NOW_NS), Some(5000));
    }

    #[test]
    fn the_more_recent_of_probe_and_kernel_time_wins() {
        let mut s = socket(1, TcpState::Established, 5000, 7000);
        s.diag.activity = Some(Activity {
            last_send_ns: NOW_NS - 9_000_000_000,
            last_recv_ns: NOW_NS - 200_000_000,
            ..Activity::default()
        });
        assert_eq!(s.last_send_ms(NOW_NS), Some(5000), "kernel sent more recently than the app");
        assert_eq!(s.last_recv_ms(NOW_NS), Some(200), "the app read more recently");
        assert_eq!(s.idle_ms(NOW_NS), Some(200));
    }

    #[test]
    fn streamed_activity_lands_on_its_socket_only() {
        let mut snap = snapshot(vec![
            socket(1, TcpState::Established, 0, 0),
            socket(2, TcpState::Established, 0, 0),
        ]);
        let seen = Activity { last_tid: 42, ..Activity::default() };
        assert!(snap.set_activity(2, seen));
        assert!(!snap.set_activity(3, seen), "a socket outside the snapshot is skipped");
        assert_eq!(snap.find(1).unwrap().diag.activity, None);
        assert_eq!(snap.find(2).unwrap().diag.activity, Some(seen));
    }
}
