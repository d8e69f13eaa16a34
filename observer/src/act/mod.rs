//! Ending stuck connections, safely: only a socket that provably is the one asked for (same
//! cookie, same addresses, held by the same process) is ever touched.
//!
//! - `destroy`: sock_diag SOCK_DESTROY, as `ss -K` does. The kernel aborts the socket (tcp_abort):
//!   the peer gets a reset, blocked threads wake with ECONNABORTED. The kernel itself re-checks
//!   the cookie (ESTALE on mismatch), so a reused 4-tuple can never be hit.
//! - `shutdown`: duplicate the owner's fd with pidfd_getfd(2), check the duplicate's SO_COOKIE,
//!   then shutdown(SHUT_RDWR): the peer gets a FIN, blocked readers see EOF and writers EPIPE,
//!   and the application closes the socket through its normal path.
pub mod manual;
pub mod respond;

use std::{
    collections::VecDeque,
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use serde::Serialize;

use crate::kernel::sock_diag::{DiagError, DiagSocketHandle, SockId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// SOCK_DESTROY through sock_diag (as `ss -K`): reset to the peer, ECONNABORTED locally.
    Destroy,
    /// shutdown(SHUT_RDWR) on a duplicate of the owner's fd: FIN to the peer, EOF locally.
    Shutdown,
}

impl Mode {
    pub const ALL: [Mode; 2] = [Mode::Destroy, Mode::Shutdown];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Destroy => "destroy",
            Mode::Shutdown => "shutdown",
        }
    }

    /// What it does, in a line.
    pub fn description(self) -> &'static str {
        match self {
            Mode::Destroy => {
                "SOCK_DESTROY through sock_diag (as `ss -K`): reset to the peer, ECONNABORTED locally"
            }
            Mode::Shutdown => {
                "shutdown(SHUT_RDWR) on a duplicate of the owner's fd: FIN to the peer, EOF locally"
            }
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown mode '{s}' (known: destroy, shutdown)"))
    }
}

/// The contract's `result` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    /// The socket no longer exists or is no longer the one asked for; nothing was touched.
    AlreadyGone,
    NotPermitted,
    /// The kernel cannot do this (no SOCK_DESTROY, no pidfd_getfd).
    Unsupported,
    Failed,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Ok,
        Outcome::AlreadyGone,
        Outcome::NotPermitted,
        Outcome::Unsupported,
        Outcome::Failed,
    ];

    /// The name in the `action` event's `result` field.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::AlreadyGone => "already_gone",
            Outcome::NotPermitted => "not_permitted",
            Outcome::Unsupported => "unsupported",
            Outcome::Failed => "failed",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActResult {
    pub outcome: Outcome,
    /// What went wrong, and what to do about it.
    pub error: Option<String>,
}

impl ActResult {
    pub fn ok() -> Self {
        ActResult { outcome: Outcome::Ok, error: None }
    }

    pub fn fail(outcome: Outcome, error: impl Into<String>) -> Self {
        ActResult { outcome, error: Some(error.into()) }
    }
}

/// The process and fd that hold a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub fd: i32,
}

/// Exactly which socket to end: every key it must still match when acted on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketRef {
    /// `None` for an orphan: its application closed it, and no fd is left.
    pub holder: Option<Holder>,
    pub cookie: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub interface: u32,
}

/// Performs `mode` on `target`. `diag` must be a sock_diag socket in the target's network
/// namespace. With `dry_run`, everything is checked and nothing is changed.
pub fn perform(
    mode: Mode,
    target: &SocketRef,
    diag: &mut DiagSocketHandle,
    dry_run: bool,
) -> ActResult {
    match mode {
        Mode::Destroy if dry_run => ActResult::ok(),
        Mode::Destroy => {
            let id = SockId {
                local: target.local,
                remote: target.remote,
                interface: target.interface,
                cookie: target.cookie,
            };
            match diag.destroy(&id) {
                Ok(()) => ActResult::ok(),
                Err(DiagError::Io(e) | DiagError::Open(e)) => destroy_error(&e),
                Err(e) => ActResult::fail(Outcome::Failed, e.to_string()),
            }
        }
        Mode::Shutdown => shutdown(target, dry_run),
    }
}

/// What a SOCK_DESTROY errno means for the user.
pub fn destroy_error(e: &io::Error) -> ActResult {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ESTALE) => ActResult::fail(
            Outcome::AlreadyGone,
            "no socket with that cookie and those addresses exists any more; nothing was touched",
        ),
        Some(libc::EPERM) | Some(libc::EACCES) => ActResult::fail(
            Outcome::NotPermitted,
            "destroying sockets needs CAP_NET_ADMIN in the socket's network namespace: run \
             observer as root or grant it CAP_NET_ADMIN",
        ),
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => ActResult::fail(
            Outcome::Unsupported,
            "this kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY is off): use --mode shutdown",
        ),
        _ => ActResult::fail(Outcome::Failed, format!("SOCK_DESTROY failed: {e}")),
    }
}

fn shutdown(target: &SocketRef, dry_run: bool) -> ActResult {
    let Some(Holder { pid, fd }) = target.holder else {
        return ActResult::fail(
            Outcome::Unsupported,
            "the socket is an orphan: its application already closed it, so no fd is left to \
             shut down; only destroy can end it (--action destroy)",
        );
    };
    let duplicate = match duplicate_fd(pid, fd) {
        Ok(fd) => fd,
        Err(result) => return result,
    };
    // The fd number may have been closed and reused since we looked: the cookie says whether
    // the duplicate is the very socket we were asked about.
    match crate::kernel::socket_cookie(&duplicate) {
        Ok(cookie) if cookie == target.cookie => {}
        Ok(_) | Err(_) => {
            return ActResult::fail(
                Outcome::AlreadyGone,
                format!("fd {fd} of pid {pid} is no longer that socket; nothing was touched"),
            );
        }
    }
    if dry_run {
        return ActResult::ok();
    }
    // SAFETY: shutdown(2) on an fd we own.
    if unsafe { libc::shutdown(duplicate.as_raw_fd(), libc::SHUT_RDWR) } != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOTCONN) => {
                ActResult::fail(Outcome::AlreadyGone, "the socket is no longer connected")
            }
            _ => ActResult::fail(Outcome::Failed, format!("shutdown failed: {e}")),
        };
    }
    ActResult::ok()
}

/// A duplicate of `pid`'s `fd` in this process, through pidfd_getfd(2).
fn duplicate_fd(pid: u32, fd: i32) -> Result<OwnedFd, ActResult> {
    // SAFETY: plain syscalls; every returned fd is owned right away.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(pidfd_error(&io::Error::last_os_error(), pid));
    }
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if dup < 0 {
        return Err(pidfd_error(&io::Error::last_os_error(), pid));
    }
    Ok(unsafe { OwnedFd::from_raw_fd(dup as i32) })
}

pub fn pidfd_error(e: &io::Error, pid: u32) -> ActResult {
    match e.raw_os_error() {
        Some(libc::ESRCH) | Some(libc::EBADF) => ActResult::fail(
            Outcome::AlreadyGone,
            format!("pid {pid} or its fd is gone; nothing was touched"),
        ),
        Some(libc::EPERM) | Some(libc::EACCES) => ActResult::fail(
            Outcome::NotPermitted,
            format!(
                "not allowed to take pid {pid}'s fd: shutdown needs ptrace access to it \
                 (CAP_SYS_PTRACE for another user's process; run observer as root or grant it, \
                 or use --mode destroy)"
            ),
        ),
        Some(libc::ENOSYS) => ActResult::fail(
            Outcome::Unsupported,
            "this kernel has no pidfd_getfd (Linux 5.6+): use --mode destroy",
        ),
        _ => ActResult::fail(Outcome::Failed, format!("pidfd_getfd failed: {e}")),
    }
}

/// At most `max` actions in any 60 seconds, on a clock of nanoseconds the caller passes in.
pub struct RateLimit {
    max: usize,
    recent: VecDeque<u64>,
}

const RATE_WINDOW_NS: u64 = 60_000_000_000;

impl RateLimit {
    pub fn per_minute(max: usize) -> Self {
        RateLimit { max, recent: VecDeque::new() }
    }

    /// Takes a slot if one is free at `now_ns`.
    pub fn try_take(&mut self, now_ns: u64) -> bool {
        let now = now_ns;
        while self.recent.front().is_some_and(|&t| now.saturating_sub(t) >= RATE_WINDOW_NS) {
            self.recent.pop_front();
        }
        if self.recent.len() >= self.max {
            return false;
        }
        self.recent.push_back(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(errno: i32) -> io::Error {
        io::Error::from_raw_os_error(errno)
    }

    #[test]
    fn outcome_names_are_the_contract_values() {
        for outcome in Outcome::ALL {
            assert_eq!(serde_json::to_value(outcome).unwrap(), outcome.name());
        }
    }

    #[test]
    fn destroy_errors_map_to_the_contract() {
        assert_eq!(destroy_error(&err(libc::ESTALE)).outcome, Outcome::AlreadyGone);
        assert_eq!(destroy_error(&err(libc::ENOENT)).outcome, Outcome::AlreadyGone);
        assert_eq!(destroy_error(&err(libc::EPERM)).outcome, Outcome::NotPermitted);
        let unsupported = destroy_error(&err(libc::EOPNOTSUPP));
        assert_eq!(unsupported.outcome, Outcome::Unsupported);
        assert!(unsupported.error.unwrap().contains("--mode shutdown"));
        assert_eq!(destroy_error(&err(libc::EIO)).outcome, Outcome::Failed);
    }

    #[test]
    fn pidfd_errors_map_to_the_contract() {
        assert_eq!(pidfd_error(&err(libc::ESRCH), 1).outcome, Outcome::AlreadyGone);
        assert_eq!(pidfd_error(&err(libc::EBADF), 1).outcome, Outcome::AlreadyGone);
        assert_eq!(pidfd_error(&err(libc::EPERM), 1).outcome, Outcome::NotPermitted);
        assert_eq!(pidfd_error(&err(libc::ENOSYS), 1).outcome, Outcome::Unsupported);
    }

    #[test]
    fn rate_limit_allows_max_per_sliding_minute() {
        const S: u64 = 1_000_000_000;
        let start = 5 * S;
        let mut limit = RateLimit::per_minute(2);
        assert!(limit.try_take(start));
        assert!(limit.try_take(start + S));
        assert!(!limit.try_take(start + 2 * S), "third within the minute");
        assert!(!limit.try_take(start + 59 * S));
        assert!(limit.try_take(start + 60 * S), "the first slot freed");
        assert!(!limit.try_take(start + 60 * S));
        assert!(limit.try_take(start + 61 * S));
    }

    #[test]
    fn zero_means_never() {
        assert!(!RateLimit::per_minute(0).try_take(0));
    }

    #[test]
    fn shutdown_of_an_own_socket_is_verified_by_cookie() {
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let cookie = crate::kernel::socket_cookie(&server).unwrap();
        let target = SocketRef {
            holder: Some(Holder { pid: std::process::id(), fd: server.as_raw_fd() }),
            cookie,
            local: server.local_addr().unwrap(),
            remote: server.peer_addr().unwrap(),
            interface: 0,
        };
        // pidfd_getfd on ourselves needs no privilege beyond our own.
        let wrong = SocketRef { cookie: cookie + 1, ..target };
        assert_eq!(shutdown(&wrong, false).outcome, Outcome::AlreadyGone);
        assert_eq!(shutdown(&target, true), ActResult::ok(), "dry run");
        let mut buf = [0u8; 1];
        client.set_nonblocking(true).unwrap();
        assert!(std::io::Read::read(&mut &client, &mut buf).is_err(), "dry run changed nothing");
        assert_eq!(shutdown(&target, false), ActResult::ok());
        client.set_nonblocking(false).unwrap();
        assert_eq!(std::io::Read::read(&mut &client, &mut buf).unwrap(), 0, "the peer saw a FIN");
        let orphan = SocketRef { holder: None, ..target };
        let refused = shutdown(&orphan, false);
        assert_eq!(refused.outcome, Outcome::Unsupported);
        assert!(refused.error.unwrap().contains("orphan"), "says why, and what works");
    }
}
