//! `observer kill`: end one stuck connection by hand, printing one `action` line.
use std::{net::SocketAddr, process::ExitCode, time::SystemTime};

use observer_common::{TcpState, TcpStates};

use crate::{
    act::{self, ActResult, Mode, Outcome, SocketRef},
    kernel::{
        netns,
        privileges::{Cap, Caps},
        procfs::{self, ProcError, ProcessIdentity},
        sock_diag::{DiagSocket, DiagSocketHandle},
    },
    report::{ActionEvent, Event, Output},
    snapshot::{Identity, WorkloadOptions, workload::Resolver},
};

/// Which connection to end, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// The process holding the socket.
    pub pid: u32,
    /// Keys the socket must match: the cookie and/or both addresses.
    pub cookie: Option<u64>,
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    pub mode: Mode,
    pub dry_run: bool,
    /// What names the socket's container, pod and node in the `action` line.
    pub workloads: WorkloadOptions,
}

pub fn run(args: &Options) -> anyhow::Result<ExitCode> {
    let requested = Identity {
        pid: Some(args.pid),
        cookie: args.cookie,
        local: args.local,
        remote: args.remote,
        ..Identity::of_none()
    };
    let (identity, result) = match resolve(args) {
        Ok((target, identity, mut diag)) => {
            (identity, act::perform(args.mode, &target, &mut diag, args.dry_run))
        }
        Err(refused) => (refused.identity.unwrap_or(requested), refused.result),
    };
    if let Some(error) = &result.error {
        log::error!("{error}");
    }
    let ok = result.outcome == Outcome::Ok;
    let event =
        ActionEvent::new(SystemTime::now(), args.mode, args.dry_run, result, identity, None);
    let mut out = Output::new(std::io::stdout().lock());
    out.emit(&Event::Action(event))?;
    out.flush()?;
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
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

/// Finds the one socket the arguments name, held by the given process, or says why not.
fn resolve(args: &Options) -> Result<Resolved, Box<Refused>> {
    // Destroying always needs CAP_NET_ADMIN; shutting down needs ptrace access, which a
    // process of the same user may have without CAP_SYS_PTRACE: the attempt tells.
    if args.mode == Mode::Destroy && !Caps::effective().has(Cap::NetAdmin) {
        let msg = "destroy needs CAP_NET_ADMIN: run observer as root or grant it CAP_NET_ADMIN \
                   (or use --mode shutdown)";
        return Err(refuse(None, Outcome::NotPermitted, msg));
    }
    let process = ProcessIdentity::of(args.pid).map_err(|e| {
        let outcome = match e {
            ProcError::NoSuchProcess(_) => Outcome::AlreadyGone,
            ProcError::NotPermitted { .. } => Outcome::NotPermitted,
            _ => Outcome::Failed,
        };
        refuse(None, outcome, e.to_string())
    })?;
    let mut diag = netns::diag_socket_in(args.pid)
        .map_err(|e| refuse(None, Outcome::Failed, e.to_string()))?;
    let table = diag
        .dump_tcp(TcpStates::HELD)
        .map_err(|e| refuse(None, Outcome::Failed, format!("reading the socket table: {e}")))?;
    let owners = procfs::scan_fds(Some(&[args.pid])).owners;
    let wanted = |s: &DiagSocket| {
        args.cookie.is_none_or(|c| c == s.cookie)
            && args.local.is_none_or(|a| a == s.local.addr())
            && args.remote.is_none_or(|a| a == s.remote.addr())
    };
    let Some(socket) = table.into_iter().find(|s| wanted(s) && owners.contains_key(&s.inode))
    else {
        let msg = format!(
            "pid {} holds no TCP socket matching {}; nothing was touched",
            args.pid,
            describe(args)
        );
        return Err(refuse(None, Outcome::AlreadyGone, msg));
    };
    let owner = &owners[&socket.inode];
    let identity = Identity {
        pid: Some(args.pid),
        comm: Some(std::sync::Arc::from(process.comm.as_str())),
        fd: Some(owner.fd),
        cookie: Some(socket.cookie),
        local: Some(socket.local.addr()),
        remote: Some(socket.remote.addr()),
        state: Some(socket.state.name()),
        // The socket table was read in the process's namespace.
        netns: netns::of_pid(args.pid).ok(),
        workload: Some(Resolver::new(&args.workloads).process_once(args.pid)),
    };
    if socket.state == TcpState::Listen {
        let msg = "refusing to end a listening socket: that stops the service; end its connections instead";
        return Err(refuse(Some(identity), Outcome::Failed, msg));
    }
    let target = SocketRef {
        pid: args.pid,
        fd: owner.fd,
        cookie: socket.cookie,
        local: socket.local.addr(),
        remote: socket.remote.addr(),
        interface: socket.interface,
    };
    Ok((target, identity, diag))
}

fn describe(args: &Options) -> String {
    let mut parts = Vec::new();
    if let Some(c) = args.cookie {
        parts.push(format!("cookie {c}"));
    }
    if let (Some(l), Some(r)) = (args.local, args.remote) {
        parts.push(format!("{l} -> {r}"));
    }
    parts.join(" and ")
}
