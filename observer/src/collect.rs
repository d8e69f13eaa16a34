//! One poll's I/O: reads the kernel's socket table in every watched network namespace, the
//! probes' map and /proc, and joins them into a [`Snapshot`].
use std::collections::{BTreeMap, btree_map::Entry};

use anyhow::Context;

use crate::{
    kernel::{netns, sock_diag::DiagSocketHandle},
    probes::Probes,
    procfs,
    snapshot::{Snapshot, SocketView},
    system,
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

    /// Stops looking for sockets of processes that are gone.
    pub fn retain_pids(&mut self, alive: &[u32]) {
        if let Some(pids) = &mut self.pids {
            pids.retain(|p| alive.contains(p));
        }
    }

    pub fn collect(&mut self, probes: &Probes) -> anyhow::Result<Snapshot> {
        let owners = procfs::socket_owners(self.pids.as_deref());
        let mut dumped = Vec::new();
        for handle in self.namespaces.values_mut() {
            dumped.extend(
                handle
                    .dump_tcp(DUMP_STATES)
                    .context("reading the TCP socket table")?,
            );
        }
        // tcp_info's "ms since" fields are relative to the dump; take the probes' clock right after.
        let taken_ns = system::monotonic_ns();
        let activity = probes.activity();
        let ports = &self.ports;
        let sockets = dumped
            .into_iter()
            .filter(|s| {
                ports.is_empty()
                    || ports.contains(&s.local.port())
                    || ports.contains(&s.remote.port())
            })
            .filter_map(|diag| {
                let owner = (diag.inode != 0)
                    .then(|| owners.get(&diag.inode).cloned())
                    .flatten();
                // With --pid, a socket is in scope only if a watched process holds it.
                if self.pids.is_some() && owner.is_none() {
                    return None;
                }
                let activity = activity.get(&diag.cookie).copied();
                Some(SocketView {
                    diag,
                    owner,
                    activity,
                })
            })
            .collect();
        Ok(Snapshot { taken_ns, sockets })
    }
}
