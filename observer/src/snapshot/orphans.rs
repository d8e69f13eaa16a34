//! Who held a socket that no fd holds any more. Once an application closes a connection that
//! cannot finish closing (unsent data, an unanswered FIN), the kernel keeps it as an orphan: no
//! fd, no inode, nothing in /proc. The agent names the process that held it when it saw it do so:
//! in the previous poll (the socket was in that snapshot with an owner), in an earlier one (it
//! was already an orphan then), or through the probes (a process moved data through it).
//!
//! Remembering the previous poll costs a pass over its sockets for their owners' pids, and
//! keeps its cookie index alive until the next snapshot reuses it.
use std::sync::Arc;

use observer_common::TcpState;

use super::{FormerOwner, Snapshot, SocketView};
use crate::{
    fastmap::FastMap,
    kernel::{probes::Activity, sock_diag::DiagSocket},
};

/// What the last snapshot knew of owners, for the orphans of the next.
#[derive(Default)]
pub struct Memory {
    /// The last snapshot's cookie index, and each of its sockets' owner pid (0: none).
    index: FastMap<u64, usize>,
    pids: Vec<u32>,
    /// The last snapshot's orphans' former owners.
    former: FastMap<u64, FormerOwner>,
    /// The names of the last snapshot's processes.
    comms: FastMap<u32, Arc<str>>,
}

/// The states a closed connection waits in for the peer to acknowledge its data and FIN, holding
/// its buffers and retransmitting. (A closed one in FIN_WAIT2 has had everything acknowledged:
/// the kernel keeps at most a small TIME_WAIT-like record of it, and only for tcp_fin_timeout.)
fn closing(state: TcpState) -> bool {
    matches!(state, TcpState::FinWait1 | TcpState::LastAck | TcpState::Closing)
}

/// A socket no fd holds any more that still waits for its peer.
pub fn is_orphan(socket: &SocketView) -> bool {
    socket.owner.is_none() && is_orphan_entry(&socket.diag)
}

/// Whether a sock_diag entry is an orphan: no inode (no fd can hold it) and still closing.
pub fn is_orphan_entry(diag: &DiagSocket) -> bool {
    diag.inode == 0 && closing(diag.state)
}

impl Memory {
    /// Takes in a finished snapshot; returns its socket buffer, emptied, for reuse.
    pub fn remember(&mut self, mut snapshot: Snapshot) -> Vec<SocketView> {
        self.former = std::mem::take(&mut snapshot.former_owners);
        self.comms = snapshot.processes.iter().map(|p| (p.pid, p.comm.clone())).collect();
        let (mut sockets, index) = snapshot.into_parts();
        self.pids.clear();
        self.pids.extend(sockets.iter().map(|s| s.owner.as_ref().map_or(0, |o| o.pid)));
        self.index = index;
        sockets.clear();
        sockets
    }

    /// Who held socket `cookie` as of the last snapshot, if anyone visibly did.
    pub fn former_owner(&self, cookie: u64) -> Option<FormerOwner> {
        if let Some(former) = self.former.get(&cookie) {
            return Some(former.clone());
        }
        let pid = *self.pids.get(*self.index.get(&cookie)?)?;
        (pid != 0).then(|| FormerOwner { pid, comm: self.comms.get(&pid).cloned() })
    }

    /// The last snapshot's cookie index, for the next one to rebuild in place.
    pub fn take_index(&mut self) -> FastMap<u64, usize> {
        std::mem::take(&mut self.index)
    }
}

/// The process the probes saw moving data through a socket, if they did.
pub fn seen_by_probes(
    activity: Option<&Activity>,
    comm_of: impl Fn(u32) -> Option<Arc<str>>,
) -> Option<FormerOwner> {
    let pid = activity.map(|a| a.last_tgid).filter(|&pid| pid != 0)?;
    Some(FormerOwner { pid, comm: comm_of(pid) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{ProcessView, fixtures::*};

    #[test]
    fn an_owner_seen_last_poll_is_remembered_and_then_carried() {
        let held = socket(7, TcpState::Established, 0, 0);
        let mut unheld = socket(8, TcpState::Established, 0, 0);
        unheld.owner = None;
        let server = ProcessView { pid: 42, comm: "server".into(), ..ProcessView::default() };
        let mut memory = Memory::default();
        let buffer =
            memory.remember(Snapshot::new(NOW_NS, vec![held, unheld], vec![server], vec![]));
        assert!(buffer.is_empty() && buffer.capacity() >= 2, "the buffer comes back for reuse");
        let former = memory.former_owner(7).unwrap();
        assert_eq!((former.pid, former.comm.as_deref()), (42, Some("server")));
        assert_eq!(memory.former_owner(8), None, "nobody held it: never guessed");
        assert_eq!(memory.former_owner(9), None);

        // The next poll finds 7 orphaned and records its former owner: the one after still knows.
        let mut orphan = socket(7, TcpState::FinWait1, 0, 0);
        (orphan.owner, orphan.diag.inode) = (None, 0);
        assert!(is_orphan(&orphan));
        let acknowledged = SocketView {
            diag: crate::kernel::sock_diag::DiagSocket {
                state: TcpState::FinWait2,
                ..orphan.diag.clone()
            },
            ..orphan.clone()
        };
        assert!(!is_orphan(&acknowledged), "the kernel ends it after tcp_fin_timeout");
        let mut next =
            Snapshot::with_index(NOW_NS, vec![orphan], vec![], vec![], memory.take_index());
        next.former_owners.insert(7, former.clone());
        memory.remember(next);
        assert_eq!(memory.former_owner(7), Some(former));
    }

    #[test]
    fn the_probes_name_the_process_that_moved_data() {
        let a = Activity { last_tgid: 42, last_tid: 43, ..Activity::default() };
        let named = seen_by_probes(Some(&a), |_| Some("server".into())).unwrap();
        assert_eq!((named.pid, named.comm.as_deref()), (42, Some("server")));
        assert_eq!(seen_by_probes(Some(&Activity::default()), |_| None), None);
        assert_eq!(seen_by_probes(None, |_| None), None);
    }
}
