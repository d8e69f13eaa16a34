//! One poll's I/O: reads the kernel's socket table in every watched network namespace, the
//! probes' maps and /proc, and joins them into a [`Snapshot`].
//!
//! At 100k sockets the work is dominated by the kernel filling in socket details and by /proc,
//! so the collector asks the kernel only for what it needs (listeners with their drop counters;
//! connections with tcp_info, filtered to the watched ports or away from the watched server's
//! local clients) and reads only the fd links that may have changed since the last poll.
use std::{
    collections::{BTreeMap, btree_map::Entry},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::BorrowedFd,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use observer_common::{Direction, ResetEvent, TcpState, TcpStates};

use super::{
    FormerOwner, ProcessView, ResetView, SleepTimes, Snapshot, SocketView, Workload,
    WorkloadOptions,
    orphans::{self, Memory},
    workload::Resolver,
};
use crate::{
    fastmap::{FastMap, FastSet},
    kernel::{
        netns,
        probes::{self, Probes},
        procfs::{self, FdCache, Owner},
        sock_diag::{DiagError, DiagSocket, DiagSocketHandle, Dump, Extensions, PortFilter},
        system,
    },
};
/// From this many sockets on, the connection dump is split in two and run on two threads. Each
/// still walks the whole table, but fills in and hands over only its half (at 100k watched
/// sockets: ~147 ms against ~187 ms on one thread).
const PARALLEL_DUMP_FROM: usize = 20_000;
/// Records per hand-off from the second dump thread: few enough to stay small in memory, many
/// enough that the channel costs nothing next to the dump.
const HANDOFF_BATCH: usize = 512;

/// Which sockets a collector reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Every socket in the agent's own network namespace.
    OwnNamespace,
    /// Every socket in every network namespace some process lives in (node mode): each
    /// container's and pod's, found through /proc/*/ns/net at every poll.
    AllNamespaces,
    /// The sockets these processes hold, in whatever namespaces they live.
    Processes(&'a [u32]),
}

pub struct Collector {
    /// One sock_diag socket per watched network namespace.
    namespaces: BTreeMap<netns::NetnsId, DiagSocketHandle>,
    /// A second one, for the parallel half of big dumps; and a process in each namespace, to
    /// open it there.
    helpers: BTreeMap<netns::NetnsId, DiagSocketHandle>,
    namespace_pids: BTreeMap<netns::NetnsId, Option<u32>>,
    /// Namespaces where that second socket could not be opened (reported once).
    helper_failed: std::collections::BTreeSet<netns::NetnsId>,
    /// Namespaces of watched processes that could not be entered (reported once).
    entry_failed: std::collections::BTreeSet<netns::NetnsId>,
    /// The remote port that splits the last poll's connections in halves.
    split_port: u16,
    /// Watched processes; `None` watches every socket in the agent's own namespace, or with
    /// `all_namespaces` in every namespace.
    pids: Option<Vec<u32>>,
    all_namespaces: bool,
    /// Each owner's container and pod, cached per process.
    workloads: Resolver,
    ports: Vec<u16>,
    fd_cache: FdCache,
    /// The watched processes' listening ports, as of the last poll.
    listen_ports: Vec<u16>,
    /// Sockets the last dump returned, to size the next one's buffer.
    last_count: usize,
    /// The last snapshot's socket buffer, emptied, for the next poll to fill: a big table is
    /// then neither reallocated nor faulted in again every poll.
    spare: Vec<SocketView>,
    /// Who held what in the last snapshot: orphans are named after it.
    memory: Memory,
}

impl Collector {
    /// A collector of the sockets `scope` names; with `ports`, only connections with one of
    /// them at either end.
    pub fn new(scope: Scope, ports: &[u16], workloads: &WorkloadOptions) -> anyhow::Result<Self> {
        let mut collector = Collector {
            namespaces: BTreeMap::new(),
            helpers: BTreeMap::new(),
            namespace_pids: BTreeMap::new(),
            split_port: 32768,
            helper_failed: Default::default(),
            entry_failed: Default::default(),
            pids: None,
            all_namespaces: scope == Scope::AllNamespaces,
            workloads: Resolver::new(workloads),
            ports: ports.to_vec(),
            fd_cache: FdCache::default(),
            listen_ports: Vec::new(),
            last_count: 0,
            spare: Vec::new(),
            memory: Memory::default(),
        };
        match scope {
            Scope::OwnNamespace | Scope::AllNamespaces => {
                let own = netns::own().context("cannot read /proc/self/ns/net")?;
                collector.namespaces.insert(own, DiagSocketHandle::open()?);
                collector.namespace_pids.insert(own, None);
                if collector.all_namespaces {
                    collector.discover_namespaces();
                }
            }
            Scope::Processes(pids) => {
                collector.pids = Some(Vec::new());
                for &pid in pids {
                    let id = netns::of_pid(pid).with_context(|| {
                        format!("pid {pid} exited while observer started (its network namespace is gone)")
                    })?;
                    collector.enter(id, pid).map_err(anyhow::Error::msg)?;
                }
                collector.pids = Some(pids.to_vec());
            }
        }
        Ok(collector)
    }

    /// Opens a sock_diag socket in network namespace `id`, where `pid` lives, unless one is open.
    fn enter(&mut self, id: netns::NetnsId, pid: u32) -> Result<(), String> {
        if let Entry::Vacant(slot) = self.namespaces.entry(id) {
            let handle = netns::diag_socket_in(pid).map_err(|e| {
                format!(
                    "cannot read the sockets of pid {pid} in its network namespace: {e} (entering \
                     another network namespace needs CAP_SYS_ADMIN)"
                )
            })?;
            slot.insert(handle);
            self.namespace_pids.insert(id, Some(pid));
        }
        Ok(())
    }

    /// Follows the watched processes as they come and go: opens the network namespaces of new
    /// ones, and closes those no watched process lives in any more. A namespace that cannot be
    /// entered is reported once and skipped.
    pub fn set_pids(&mut self, pids: &[u32]) {
        let Some(current) = &self.pids else { return };
        if current.as_slice() == pids {
            return;
        }
        let mut wanted = std::collections::BTreeSet::new();
        for &pid in pids {
            // A process that exited meanwhile is reported by the target list, not here.
            let Ok(id) = netns::of_pid(pid) else { continue };
            wanted.insert(id);
            if let Err(e) = self.enter(id, pid)
                && self.entry_failed.insert(id)
            {
                log::warn!("{e}; its connections are not watched");
            }
        }
        self.namespaces.retain(|id, _| wanted.contains(id));
        self.helpers.retain(|id, _| wanted.contains(id));
        self.namespace_pids.retain(|id, _| wanted.contains(id));
        self.pids = Some(pids.to_vec());
    }

    /// Node mode: follows the machine's network namespaces. Opens a sock_diag socket in each new
    /// one and closes those no process lives in any more (which lets the kernel free them). A
    /// namespace that cannot be entered is reported once and skipped from then on.
    fn discover_namespaces(&mut self) {
        let found = netns::all();
        for (&id, &door) in &found {
            if self.entry_failed.contains(&id) {
                continue;
            }
            if let Err(e) = self.enter(id, door) {
                // A door that closed meanwhile (the process exited) is no failure: another
                // process, or the next poll, opens it.
                if netns::of_pid(door).is_ok_and(|now| now == id) && self.entry_failed.insert(id) {
                    log::warn!("{e}; its connections are not watched");
                }
                continue;
            }
            // The lowest pid there now: the door for a second socket, should one be needed.
            self.namespace_pids.insert(id, Some(door));
        }
        self.namespaces.retain(|id, _| found.contains_key(id));
        self.helpers.retain(|id, _| found.contains_key(id));
        self.namespace_pids.retain(|id, _| found.contains_key(id));
        self.entry_failed.retain(|id| found.contains_key(id));
    }

    /// How many network namespaces are watched now.
    pub fn namespace_count(&self) -> usize {
        self.namespaces.len()
    }

    /// The sock_diag socket of a watched network namespace, to act on sockets there.
    pub fn diag_for(&mut self, netns: netns::NetnsId) -> Option<&mut DiagSocketHandle> {
        self.namespaces.get_mut(&netns)
    }

    /// The kernel-side filter for connection dumps.
    fn connection_filter(&self) -> Option<PortFilter> {
        if !self.ports.is_empty() {
            Some(PortFilter::Either(self.ports.clone()))
        } else if self.pids.is_some() && !self.listen_ports.is_empty() {
            // A watched server's clients on loopback belong to other processes: skip them. (A
            // watched process that connects to its own port over loopback has that end skipped
            // too.)
            Some(PortFilter::NotLoopbackClientOf(self.listen_ports.clone()))
        } else {
            None
        }
    }

    /// Takes back a finished snapshot: its buffers for the next poll, and who held what.
    pub fn recycle(&mut self, snapshot: Snapshot) {
        self.spare = self.memory.remember(snapshot);
    }

    /// The socket table of every watched namespace, as snapshot records still to be joined;
    /// with `storage`, each socket carries what the probes keep in its storage.
    fn dump(&mut self, storage: Option<BorrowedFd<'_>>) -> anyhow::Result<Vec<SocketView>> {
        let filter = self.connection_filter();
        fn connections<'a>(
            filter: Option<&'a PortFilter>,
            storage: Option<BorrowedFd<'a>>,
        ) -> Dump<'a> {
            Dump { states: TcpStates::CONNECTIONS, extensions: Extensions::INFO, filter, storage }
        }
        // Listeners are few; their drop counter (meminfo) tells of accept queue overflows.
        let listeners = Dump {
            states: TcpStates::LISTENING,
            extensions: Extensions::MEMINFO,
            filter: None,
            storage: None,
        };
        let parallel = self.last_count >= PARALLEL_DUMP_FROM;
        // Room for what the last poll saw: growing by doubling would leave up to half unused.
        let room = self.last_count + self.last_count / 32 + 64;
        let mut sockets = std::mem::take(&mut self.spare);
        if sockets.capacity() > 2 * room {
            sockets = Vec::new(); // the table shrank a lot: give the memory back
        }
        sockets.reserve_exact(room);
        let split = u32::from(self.split_port);
        for (&netns, handle) in &mut self.namespaces {
            let view = |diag| SocketView { diag, netns, owner: None, workload: None };
            handle
                .dump_each(&listeners, |d| sockets.push(view(d)))
                .context("reading the TCP socket table")?;
            let helper = if parallel {
                match self.helpers.entry(netns) {
                    Entry::Occupied(h) => Some(h.into_mut()),
                    Entry::Vacant(_) if self.helper_failed.contains(&netns) => None,
                    Entry::Vacant(slot) => {
                        let opened = match self.namespace_pids.get(&netns).copied().flatten() {
                            Some(pid) => netns::diag_socket_in(pid),
                            None => DiagSocketHandle::open(),
                        };
                        match opened {
                            Ok(h) => Some(slot.insert(h)),
                            Err(e) => {
                                log::warn!(
                                    "big socket tables will be read on one thread: cannot open a \
                                     second sock_diag socket: {e:#}"
                                );
                                self.helper_failed.insert(netns);
                                None
                            }
                        }
                    }
                }
            } else {
                None
            };
            let Some(helper) = helper else {
                handle
                    .dump_each(&connections(filter.as_ref(), storage), |d| sockets.push(view(d)))
                    .context("reading the TCP socket table")?;
                continue;
            };
            let half = |from, to| {
                let range = PortFilter::RemotePorts { from, to };
                Some(match &filter {
                    Some(f) => PortFilter::Both(Box::new(f.clone()), Box::new(range)),
                    None => range,
                })
            };
            let (low, high) = (half(0, split), half(split as u16, 65536));
            // The helper's records come over in small batches that this thread appends as it
            // goes, so the other half is never held twice (once as records, once as views).
            let take = |sockets: &mut Vec<SocketView>, batch: Vec<DiagSocket>| {
                sockets.extend(batch.into_iter().map(view));
            };
            let (mine, theirs) = std::thread::scope(|scope| {
                // Created in the scope, so that were this thread to panic, the receiver would go
                // with it and a helper blocked on a full channel would not hang the scope.
                let (batches, arrivals) = std::sync::mpsc::sync_channel::<Vec<DiagSocket>>(64);
                let theirs = scope.spawn(move || {
                    let mut batch = Vec::with_capacity(HANDOFF_BATCH);
                    let result = helper.dump_each(&connections(high.as_ref(), storage), |d| {
                        batch.push(d);
                        if batch.len() == HANDOFF_BATCH {
                            let full =
                                std::mem::replace(&mut batch, Vec::with_capacity(HANDOFF_BATCH));
                            // The receiver lives until this thread is joined.
                            let _ = batches.send(full);
                        }
                    });
                    let _ = batches.send(batch);
                    result
                });
                let mine = handle.dump_each(&connections(low.as_ref(), storage), |d| {
                    sockets.push(view(d));
                    while let Ok(batch) = arrivals.try_recv() {
                        take(&mut sockets, batch);
                    }
                });
                // The rest, until the helper hangs up.
                for batch in arrivals.iter() {
                    take(&mut sockets, batch);
                }
                let theirs = theirs
                    .join()
                    .unwrap_or(Err(DiagError::Malformed("the second dump thread failed")));
                (mine, theirs)
            });
            mine.and(theirs).context("reading the TCP socket table")?;
        }
        // Sized by what the kernel returned (before the scope filter): that is what the next
        // dump fills and what splitting it in two divides.
        self.last_count = sockets.len();
        if sockets.len() >= PARALLEL_DUMP_FROM {
            let mut remote: Vec<u16> = sockets
                .iter()
                .filter(|s| s.diag.state != TcpState::Listen)
                .map(|s| s.diag.remote.port())
                .collect();
            let middle = remote.len() / 2;
            if let Some((_, &mut median, _)) =
                (middle < remote.len()).then(|| remote.select_nth_unstable(middle))
            {
                self.split_port = median.max(1);
            }
        }
        Ok(sockets)
    }

    pub fn collect(&mut self, probes: &mut Probes) -> anyhow::Result<Snapshot> {
        let mut phases = Phases::start();
        if self.all_namespaces {
            self.discover_namespaces();
            phases.mark("namespaces");
        }
        let mut sockets = self.dump(probes.activity_in_dump())?;
        // tcp_info's "ms since" fields are relative to the dump; take the probes' clock right after.
        let taken_ns = system::monotonic_ns();
        phases.mark("sock_diag dump");
        let present: FastSet<u32> =
            sockets.iter().map(|s| s.diag.inode).filter(|&i| i != 0).collect();
        // Disjoint borrows: the scan result lives in the cache, the scope in the other fields.
        let (ports, pids, workloads) = (&self.ports, &self.pids, &mut self.workloads);
        let port_in_scope = |local: u16, remote: u16| {
            ports.is_empty() || ports.contains(&local) || ports.contains(&remote)
        };
        let fds = self.fd_cache.scan(pids.as_deref(), &present);
        phases.mark("fd scan");
        let memory = &self.memory;
        let watched = |pid: u32| pids.as_ref().is_none_or(|p| p.contains(&pid));
        workloads.begin_poll();
        // Each owner's workload, once per poll: sockets share their process's.
        let mut by_pid: FastMap<u32, Arc<Workload>> = FastMap::default();
        let unowned = workloads.unowned();
        let mut listen_ports = Vec::new();
        let mut listen_queues: FastMap<u32, u32> = FastMap::default();
        let mut former_owners: FastMap<u64, FormerOwner> = FastMap::default();
        // Orphans nobody was seen holding: the probes may know who used them (with --pid,
        // they are in scope only if that was a watched process).
        let mut unnamed: Vec<SocketView> = Vec::new();
        sockets.retain_mut(|socket| {
            let diag = &socket.diag;
            if !port_in_scope(diag.local.port(), diag.remote.port()) {
                return false;
            }
            socket.owner =
                (diag.inode != 0).then(|| fds.owners.get(&diag.inode).cloned()).flatten();
            // An orphan has no holder to place: only the node.
            socket.workload = Some(match &socket.owner {
                Some(owner) => match by_pid.get(&owner.pid) {
                    Some(known) => known.clone(),
                    None => {
                        let workload = match fds.processes.get(&owner.pid) {
                            Some(held) => workloads.process(owner.pid, held).0,
                            None => unowned.clone(),
                        };
                        by_pid.insert(owner.pid, workload.clone());
                        workload
                    }
                },
                None => unowned.clone(),
            });
            if orphans::is_orphan(socket) {
                return match memory.former_owner(diag.cookie) {
                    Some(former) if watched(former.pid) => {
                        former_owners.insert(diag.cookie, former);
                        true
                    }
                    Some(_) => false,
                    None => {
                        unnamed.push(socket.clone());
                        false
                    }
                };
            }
            let Some(owner) = &socket.owner else {
                // With --pid, a socket is in scope only if a watched process holds it.
                return pids.is_none();
            };
            if diag.state == TcpState::Listen {
                listen_ports.push(diag.local.port());
                *listen_queues.entry(owner.pid).or_default() += diag.rqueue;
            }
            true
        });
        listen_ports.sort_unstable();
        listen_ports.dedup();
        let accept_errors = probes.tracks_threads().then(|| probes.accept_errors());
        // Without --pid, the processes worth watching are those holding a watched socket.
        let holders: Vec<u32> = match pids {
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
                let held = fds.processes.get(&pid)?;
                let (workload, netns) = workloads.process(pid, held);
                let fd_limit = procfs::fd_limit(pid);
                // Near its fd limit the accept loop may spin (accept_spinning): its CPU time is
                // worth a read of /proc/PID/stat.
                let near_limit = fd_limit.is_some_and(|l| u64::from(held.count) * 10 >= l * 9);
                Some(ProcessView {
                    pid,
                    comm: held.comm.clone(),
                    fds_used: held.count,
                    fd_limit,
                    accept_errors: accept_errors
                        .as_ref()
                        .map(|e| e.get(&pid).copied().unwrap_or(0)),
                    listen_queue: listen_queues.get(&pid).copied().unwrap_or(0),
                    cpu_ns: if near_limit { procfs::cpu_time_ns(pid) } else { None },
                    netns,
                    workload: Some(workload),
                })
            })
            .collect();

        let events = probes.drain_resets();
        let by_cookie: FastMap<u64, &SocketView> = if events.is_empty() {
            FastMap::default()
        } else {
            sockets.iter().map(|s| (s.cookie(), s)).collect()
        };
        let resets = events
            .into_iter()
            .map(|event| {
                let socket = by_cookie.get(&event.cookie).copied();
                let mut reset = reset_view(&event, socket.and_then(|s| s.owner.as_ref()));
                (reset.netns, reset.workload) = match socket {
                    Some(s) => (Some(s.netns), s.workload.clone()),
                    // Gone: the namespace it was in is not known, its process's place is.
                    None => (None, Some(workloads.process_once(reset.pid))),
                };
                reset
            })
            .filter(|r| {
                pids.as_ref().is_none_or(|p| p.contains(&r.pid))
                    && port_in_scope(r.local.port(), r.remote.port())
            })
            .collect();
        workloads.end_poll();
        let index = self.memory.take_index();
        let mut snapshot = Snapshot::with_index(taken_ns, sockets, processes, resets, index);
        snapshot.former_owners = former_owners;
        if probes.tracks_threads() {
            snapshot.thread_syscalls = probes.thread_syscalls();
        }
        snapshot.thread_tcp_calls = probes.thread_tcp_calls();
        if probes.times_sleeps() {
            snapshot.thread_sleeps = SleepTimes::Table(probes.sleep_table());
        }
        phases.mark("join");
        snapshot.map_entries = if probes.activity_in_dump().is_some() {
            // Each socket's record came with it in the dump: nothing to read or join.
            snapshot.sockets.iter().chain(&unnamed).filter(|s| s.diag.activity.is_some()).count()
        } else {
            // Streamed into the snapshot's sockets: a table of 100k entries would be built
            // otherwise.
            let unnamed_at: FastMap<u64, usize> =
                unnamed.iter().enumerate().map(|(i, s)| (s.cookie(), i)).collect();
            probes
                .for_each_activity(|cookie, activity| {
                    if !snapshot.set_activity(cookie, activity)
                        && let Some(&i) = unnamed_at.get(&cookie)
                    {
                        unnamed[i].diag.activity = Some(activity);
                    }
                })
                .context("reading the probes' socket map")?
        };
        let comm_of = |pid: u32| {
            fds.processes
                .get(&pid)
                .map(|held| held.comm.clone())
                .or_else(|| procfs::comm(pid).map(Arc::from))
        };
        for orphan in unnamed {
            let former = orphans::seen_by_probes(orphan.diag.activity.as_ref(), comm_of);
            match former {
                Some(former) if watched(former.pid) => {
                    snapshot.former_owners.insert(orphan.cookie(), former);
                    snapshot.push(orphan);
                }
                // Unattributed orphans are in scope only when every socket is.
                None if pids.is_none() => snapshot.push(orphan),
                _ => {}
            }
        }
        phases.mark("probe map");
        self.listen_ports = listen_ports;
        phases.log();
        Ok(snapshot)
    }
}

/// Durations of a poll's phases, logged at debug level (RUST_LOG=observer=debug).
struct Phases {
    last: Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn start() -> Self {
        Phases { last: Instant::now(), done: Vec::new() }
    }

    fn mark(&mut self, phase: &'static str) {
        let now = Instant::now();
        self.done.push((phase, now - self.last));
        self.last = now;
    }

    fn log(&self) {
        if log::log_enabled!(log::Level::Debug) {
            let parts: Vec<String> = self
                .done
                .iter()
                .map(|(p, d)| format!("{p} {:.1}ms", d.as_secs_f64() * 1e3))
                .collect();
            log::debug!("collect: {}", parts.join(", "));
        }
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
        thread_name: match probes::comm_str(&event.comm) {
            // In softirq the probes only know the socket's last user: name it from /proc.
            name if name.is_empty() => {
                procfs::thread_name(event.tgid, event.tid).unwrap_or_else(|| "(exited)".into())
            }
            name => name,
        },
        // Alerts name the process; the thread's own name goes in `threads`.
        comm: owner.map(|o| o.comm.to_string()).unwrap_or_else(|| {
            procfs::comm(event.tgid).unwrap_or_else(|| probes::comm_str(&event.comm))
        }),
        fd: owner.map(|o| o.fd),
        local: addr(&event.local_addr, event.local_port),
        remote: addr(&event.remote_addr, event.remote_port),
        state: TcpState::from_raw(u32::from(event.state)),
        direction: Direction::from_raw(event.direction),
        unread: event.unread,
        unsent: event.unsent,
        netns: None,
        workload: None,
    }
}
