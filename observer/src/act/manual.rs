//! Ending one connection by hand (`observer kill`, and `s`/`d` in `observer top`): the socket is
//! looked up afresh in the kernel's table and must be held by the given process and match every
//! key given (cookie, addresses) before anything is done to it. An orphan, which no process
//! holds any more, must match all three keys.
use std::net::SocketAddr;

use observer_common::{TcpState, TcpStates};

use super::{ActResult, Holder, Mode, Outcome, SocketRef};
use crate::{
    kernel::{
        netns,
        privileges::{Cap, Caps},
        procfs::{self, ProcError, ProcessIdentity},
        sock_diag::{DiagSocket, DiagSocketHandle},
    },
    snapshot::{Identity, WorkloadOptions, is_orphan_entry, workload::Resolver},
};

/// Which connection to end, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The process holding the socket.
    pub pid: u32,
    /// Keys the socket must match: the cookie and/or both addresses.
    pub cookie: Option<u64>,
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    pub mode: Mode,
    pub dry_run: bool,
}

/// Finds the socket and ends it (or, in a dry run, checks it): the identity of what was found
/// (or, when nothing was, what was asked for) and the result.
pub fn end(request: &Request, workloads: &WorkloadOptions) -> (Identity, ActResult) {
    match resolve(request, workloads) {
        Ok((target, identity, mut diag)) => {
            (identity, super::perform(request.mode, &target, &mut diag, request.dry_run))
        }
        Err(refused) => (refused.identity.unwrap_or_else(|| request.identity()), refused.result),
    }
}

impl Request {
    /// What was asked for, as an `action` event names it when nothing matched.
    fn identity(&self) -> Identity {
        Identity {
            pid: Some(self.pid),
            cookie: self.cookie,
            local: self.local,
            remote: self.remote,
            ..Identity::of_none()
        }
    }

    /// Names one connection by every key: its cookie and both addresses.
    fn names_exactly(&self) -> bool {
        self.cookie.is_some() && self.local.is_some() && self.remote.is_some()
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(c) = self.cookie {
            parts.push(format!("cookie {c}"));
        }
        if let (Some(l), Some(r)) = (self.local, self.remote) {
            parts.push(format!("{l} -> {r}"));
        }
        parts.join(" and ")
    }
}

type Resolved = (SocketRef, Identity, DiagSocketHandle);

/// Why nothing was done, and what is known of the socket.
struct Refused {
    identity: Option<Identity>,
    result: ActResult,
}

fn refuse(identity: Option<Identity>, outcome: Outcome, msg: impl Into<String>) -> Box<Refused> {
    Box::new(Refused { identity, result: ActResult::fail(outcome, msg) })
}

/// Finds the one socket the request names, held by its process, or says why not.
fn resolve(request: &Request, workloads: &WorkloadOptions) -> Result<Resolved, Box<Refused>> {
    // Destroying always needs CAP_NET_ADMIN; shutting down needs ptrace access, which a
    // process of the same user may have without CAP_SYS_PTRACE: the attempt tells.
    if request.mode == Mode::Destroy && !Caps::effective().has(Cap::NetAdmin) {
        let msg = "destroy needs CAP_NET_ADMIN: run observer as root or grant it CAP_NET_ADMIN \
                   (or use --mode shutdown)";
        return Err(refuse(None, Outcome::NotPermitted, msg));
    }
    let pid = request.pid;
    let process = ProcessIdentity::of(pid).map_err(|e| {
        let outcome = match e {
            ProcError::NoSuchProcess(_) => Outcome::AlreadyGone,
            ProcError::NotPermitted { .. } => Outcome::NotPermitted,
            _ => Outcome::Failed,
        };
        refuse(None, outcome, e.to_string())
    })?;
    let mut diag =
        netns::diag_socket_in(pid).map_err(|e| refuse(None, Outcome::Failed, e.to_string()))?;
    let table = diag
        .dump_tcp(TcpStates::HELD)
        .map_err(|e| refuse(None, Outcome::Failed, format!("reading the socket table: {e}")))?;
    let owners = procfs::scan_fds(Some(&[pid])).owners;
    let wanted = |s: &DiagSocket| {
        request.cookie.is_none_or(|c| c == s.cookie)
            && request.local.is_none_or(|a| a == s.local.addr())
            && request.remote.is_none_or(|a| a == s.remote.addr())
    };
    let held = table.iter().position(|s| wanted(s) && owners.contains_key(&s.inode));
    // An orphan (closed by its application, no fd left) cannot be tied to the process any
    // more: only all three keys together make it provably the one asked for.
    let orphan = || table.iter().position(|s| wanted(s) && is_orphan_entry(s));
    let Some(at) = held.or_else(orphan) else {
        let msg = format!(
            "pid {pid} holds no TCP socket matching {}; nothing was touched",
            request.describe()
        );
        return Err(refuse(None, Outcome::AlreadyGone, msg));
    };
    let socket = &table[at];
    let fd = owners.get(&socket.inode).map(|owner| owner.fd);
    if fd.is_none() && !request.names_exactly() {
        let msg = format!(
            "the connection matching {} is an orphan (its application closed it, no fd is \
             left): give --cookie, --local and --remote together, as its alert has them; \
             nothing was touched",
            request.describe()
        );
        return Err(refuse(None, Outcome::Failed, msg));
    }
    let identity = Identity {
        pid: Some(pid),
        comm: Some(std::sync::Arc::from(process.comm.as_str())),
        fd,
        cookie: Some(socket.cookie),
        local: Some(socket.local.addr()),
        remote: Some(socket.remote.addr()),
        state: Some(socket.state.name()),
        // The socket table was read in the process's namespace.
        netns: netns::of_pid(pid).ok(),
        workload: Some(Resolver::new(workloads).process_once(pid)),
    };
    if socket.state == TcpState::Listen {
        let msg = "refusing to end a listening socket: that stops the service; end its connections instead";
        return Err(refuse(Some(identity), Outcome::Failed, msg));
    }
    let target = SocketRef {
        holder: fd.map(|fd| Holder { pid, fd }),
        cookie: socket.cookie,
        local: socket.local.addr(),
        remote: socket.remote.addr(),
        interface: socket.interface,
    };
    Ok((target, identity, diag))
}
