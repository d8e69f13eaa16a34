//! One poll's I/O: reads the kernel's socket table in every watched network namespace, the
//! probes' maps and /proc, and joins them into a [`Snapshot`].
use std::{
    collections::{BTreeMap, HashMap, btree_map::Entry},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use anyhow::Context;
use observer_common::{RESET_SENT, ResetEvent};

use crate::{
    kernel::{netns, sock_diag::DiagSocketHandle},
    probes::Probes,
    procfs::{self, Owner},
    snapshot::{ProcessView, ResetView, Snapshot, SocketView},
    system, threads,
};

/// Every TCP state except TIME_WAIT and NEW_SYN_RECV, which are not full sockets: they have no
/// owner, no fd and cannot hold a thread.
const DUMP_STATES: u32 = ((1 << 12) - 2) & !(1 << 6);

pub struct Collector {
    /// One sock_diag socket per watched network namespace.
    namespaces: BTreeMap<netns::NetnsId, DiagSocketHandle>,
    /// Watched processes; `None` watches every socket in the agent's own namespace.
    pids: Option<Vec<u32>>,
    ports: Vec<u16>,
}

impl Collector {
    pub fn new(pids: &[u32], ports: &[u16]) -> anyhow::Result<Self> {
        let mut namespaces = BTreeMap::new();
        if pids.is_empty() {
            let own = netns::own().context("cannot read /proc/self/ns/net")?;
            namespaces.insert(own, DiagSocketHandle::open()?);
        }
        for &pid in pids {
            let id = netns::of_pid(pid)
                .with_context(|| format!("cannot read the network namespace of pid {pid}"))?;
            if let Entry::Vacant(slot) = namespaces.entry(id) {
                slot.insert(netns::diag_socket_in(pid).with_context(|| {
                    format!("cannot enter the network namespace of pid {pid} (needs CAP_SYS_ADMIN)")
                })?);
            }
        }
        Ok(Collector {
            namespaces,
            pids: (!pids.is_empty()).then(|| pids.to_vec()),
            ports: ports.to_vec(),
        })
    }

    /// The sock_diag socket of a watched network namespace, to act on sockets there.
    pub fn diag_for(&mut self, netns: netns::NetnsId) -> Option<&mut DiagSocketHandle> {
        self.namespaces.get_mut(&netns)
    }

    /// Stops looking for sockets of processes that are gone.
    pub fn retain_pids(&mut self, alive: &[u32]) {
        if let Some(pids) = &mut self.pids {
            pids.retain(|p| alive.contains(p));
        }
    }

    fn port_in_scope(&self, local: u16, remote: u16) -> bool {
        self.ports.is_empty() || self.ports.contains(&local) || self.ports.contains(&remote)
    }

    fn pid_in_scope(&self, pid: u32) -> bool {
        self.pids.as_ref().is_none_or(|pids| pids.contains(&pid))
    }

    pub fn collect(&mut self, probes: &mut Probes) -> anyhow::Result<Snapshot> {
        let fds = procfs::scan_fds(self.pids.as_deref());
        let mut dumped = Vec::new();
        for (&netns, handle) in &mut self.namespaces {
            let table = handle.dump_tcp(DUMP_STATES).context("reading the TCP socket table")?;
            dumped.extend(table.into_iter().map(|diag| (netns, diag)));
        }
        // tcp_info's "ms since" fields are relative to the dump; take the probes' clock right after.
        let taken_ns = system::monotonic_ns();
        let activity = probes.activity();
        let sockets: Vec<SocketView> = dumped
            .into_iter()
            .filter(|(_, s)| self.port_in_scope(s.local.port(), s.remote.port()))
            .filter_map(|(netns, diag)| {
                let owner =
                    (diag.inode != 0).then(|| fds.owners.get(&diag.inode).cloned()).flatten();
                // With --pid, a socket is in scope only if a watched process holds it.
                if self.pids.is_some() && owner.is_none() {
                    return None;
                }
                let activity = activity.get(&diag.cookie).copied();
                Some(SocketView { diag, netns, owner, activity })
            })
            .collect();

        let accept_errors = probes.tracks_threads().then(|| probes.accept_errors());
        // Without --pid, the processes worth watching are those holding a watched socket.
        let holders: Vec<u32> = match &self.pids {
            Some(pids) => pids.clone(),
            None => {
                let mut holders: Vec<u32> =
                    sockets.iter().filter_map(|s| Some(s.owner.as_ref()?.pid)).collect();
                holders.sort_unstable();
                holders.dedup();
                holders
            }
        };
        let processes = holders
            .into_iter()
            .filter_map(|pid| {
                let (comm, fds_used) = fds.processes.get(&pid)?.clone();
                Some(ProcessView {
                    pid,
                    comm,
                    fds_used,
                    fd_limit: procfs::fd_limit(pid),
                    accept_errors: accept_errors
                        .as_ref()
                        .map(|e| e.get(&pid).copied().unwrap_or(0)),
                })
            })
            .collect();

        let by_cookie: HashMap<u64, &Owner> =
            sockets.iter().filter_map(|s| Some((s.cookie(), s.owner.as_ref()?))).collect();
        let resets = probes
            .drain_resets()
            .into_iter()
            .map(|event| reset_view(&event, by_cookie.get(&event.cookie).copied()))
            .filter(|r| {
                self.pid_in_scope(r.pid) && self.port_in_scope(r.local.port(), r.remote.port())
            })
            .collect();
        let thread_calls =
            if probes.tracks_threads() { probes.thread_calls() } else { HashMap::new() };
        Ok(Snapshot::new(taken_ns, sockets, processes, resets, thread_calls)
            .with_sock_calls(probes.sock_calls()))
    }
}

fn reset_view(event: &ResetEvent, owner: Option<&Owner>) -> ResetView {
    let addr = |raw: &[u8; 16], port: u16| -> SocketAddr {
        let ip = if event.family == libc::AF_INET as u16 {
            IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(*raw))
        };
        SocketAddr::new(ip, port)
    };
    ResetView {
        cookie: event.cookie,
        // The process still holding the socket is the surest owner; else whom the probes saw.
        pid: owner.map_or(event.tgid, |o| o.pid),
        tid: event.tid,
        thread_name: threads::comm_str(&event.comm),
        // Alerts name the process; the thread's own name goes in `threads`.
        comm: owner.map(|o| o.comm.clone()).unwrap_or_else(|| {
            procfs::comm(event.tgid).unwrap_or_else(|| threads::comm_str(&event.comm))
        }),
        fd: owner.map(|o| o.fd),
        local: addr(&event.local_addr, event.local_port),
        remote: addr(&event.remote_addr, event.remote_port),
        state: event.state,
        sent: event.direction == RESET_SENT,
        unread: event.unread,
        unsent: event.unsent,
    }
}
