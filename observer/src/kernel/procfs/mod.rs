//! What /proc says about the watched processes: which fd of which process holds a socket, the
//! process's threads, and which of them are blocked in a socket call on which fd.
use std::{fs, io, sync::Arc};

use thiserror::Error;

use super::privileges::{Cap, Caps, names};

#[cfg(test)]
pub use self::threads::BlockedCall;
#[cfg(fuzzing)]
pub use self::threads::parse_syscall_line;
pub use self::{
    fds::{FdCache, HeldFds, scan_fds},
    processes::{ProcessEntry, ProcessTable, cpu_time_ns},
    threads::{ThreadState, thread_states},
};

pub mod cgroup;
mod fds;
mod processes;
mod threads;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub fd: i32,
    /// Shared by every socket of the process.
    pub comm: Arc<str>,
}

#[derive(Debug, Error)]
pub enum ProcError {
    #[error("no process with pid {0}: check the pid (e.g. `pgrep -f <server>`)")]
    NoSuchProcess(u32),
    #[error("pid {pid} is a thread of process {tgid}: use --pid {tgid}")]
    IsThread { pid: u32, tgid: u32 },
    #[error("pid {pid} is the kernel thread {comm}, which holds no sockets: give a server's pid")]
    KernelThread { pid: u32, comm: String },
    #[error("pid {pid} has exited (a zombie its parent has not reaped): nothing is left to watch")]
    Zombie { pid: u32 },
    #[error("not allowed to inspect pid {pid}: {why}")]
    NotPermitted { pid: u32, why: String },
    #[error("cannot read /proc/{pid}")]
    Other { pid: u32, source: io::Error },
}

fn classify(pid: u32, err: ::procfs::ProcError) -> ProcError {
    match err {
        ::procfs::ProcError::NotFound(_) => ProcError::NoSuchProcess(pid),
        ::procfs::ProcError::PermissionDenied(_) => not_permitted(pid),
        other => ProcError::Other { pid, source: io::Error::other(other.to_string()) },
    }
}

/// A process as the agent first saw it. The start time tells a live process from a new one that
/// reused its pid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessIdentity {
    pub pid: u32,
    pub start_time: u64,
    pub comm: String,
}

impl ProcessIdentity {
    /// Looks `pid` up, refusing threads: sockets belong to processes.
    pub fn of(pid: u32) -> Result<Self, ProcError> {
        let process = ::procfs::process::Process::new(pid as i32).map_err(|e| classify(pid, e))?;
        let status = process.status().map_err(|e| classify(pid, e))?;
        if status.tgid as u32 != pid {
            return Err(ProcError::IsThread { pid, tgid: status.tgid as u32 });
        }
        let stat = ProcessEntry::read(pid).ok_or(ProcError::NoSuchProcess(pid))?;
        if stat.kernel_thread {
            return Err(ProcError::KernelThread { pid, comm: stat.comm.to_string() });
        }
        if stat.zombie {
            return Err(ProcError::Zombie { pid });
        }
        check_access(pid)?;
        Ok(ProcessIdentity { pid, start_time: stat.start_time, comm: stat.comm.to_string() })
    }
}

/// Whether this process may do what every poll does to `pid`: list its fds and read their links.
/// Fails, clearly, when the kernel forbids it.
pub fn check_access(pid: u32) -> Result<(), ProcError> {
    // Listing the directory and reading a link are checked apart: either can be refused.
    let first_fd_link = fs::read_dir(format!("/proc/{pid}/fd"))
        .and_then(|mut dir| dir.next().transpose())
        .and_then(|entry| entry.map(|e| fs::read_link(e.path())).transpose());
    match first_fd_link {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(not_permitted(pid)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ProcError::NoSuchProcess(pid)),
        Err(source) => Err(ProcError::Other { pid, source }),
    }
}

/// The refusal to inspect `pid`, with what would allow it.
fn not_permitted(pid: u32) -> ProcError {
    use std::os::unix::fs::MetadataExt;
    let theirs = fs::metadata(format!("/proc/{pid}")).map(|m| m.uid()).ok();
    let ours = nix::unistd::geteuid().as_raw();
    let missing = Caps::effective().missing_to_inspect_others();
    let why = match theirs {
        Some(uid) if uid != ours && !missing.is_empty() => format!(
            "it runs as uid {uid} and observer as uid {ours} without {}; run observer as root \
             or grant it {}",
            names(&missing),
            names(&[Cap::SysPtrace, Cap::DacReadSearch])
        ),
        _ => "the kernel refuses ptrace access to it (a security module, or a process that is \
              not dumpable or has capabilities observer lacks); run observer as root, outside \
              the target's confinement"
            .to_owned(),
    };
    ProcError::NotPermitted { pid, why }
}

/// A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in KiB.
pub fn own_memory_kib(field: &str) -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let value = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    value.trim().trim_end_matches("kB").trim().parse().ok()
}

/// The name of thread `tid` of process `pid`, if it still exists.
pub fn thread_name(pid: u32, tid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok().map(|c| c.trim_end().to_owned())
}

/// The name of process `pid`, if it still exists.
pub fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|c| c.trim_end().to_owned())
}

/// The soft RLIMIT_NOFILE of `pid`; `None` when unlimited or unreadable.
pub fn fd_limit(pid: u32) -> Option<u64> {
    let limits = ::procfs::process::Process::new(pid as i32).ok()?.limits().ok()?;
    match limits.max_open_files.soft_limit {
        ::procfs::process::LimitValue::Value(v) => Some(v),
        ::procfs::process::LimitValue::Unlimited => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_identity_and_threads() {
        let me = std::process::id();
        let id = ProcessIdentity::of(me).unwrap();
        assert_eq!(id.start_time, ProcessEntry::read(me).unwrap().start_time);
        assert!(thread_states(me).iter().any(|t| t.tid == me));
    }

    #[test]
    fn kernel_threads_are_refused_by_name() {
        // kthreadd is pid 2 in the initial pid namespace; elsewhere pid 2 is something else.
        if let Ok(id) = ProcessIdentity::of(2) {
            assert_ne!(id.comm, "kthreadd");
        } else if let Some(entry) = ProcessEntry::read(2).filter(|e| e.kernel_thread) {
            let err = ProcessIdentity::of(2).unwrap_err().to_string();
            assert!(err.contains(&*entry.comm) && err.contains("kernel thread"), "{err}");
        }
    }

    #[test]
    fn missing_pid_is_reported_as_such() {
        // pid_max is at most 2^22, so this pid cannot exist.
        assert!(matches!(ProcessIdentity::of(999_999_999), Err(ProcError::NoSuchProcess(_))));
    }
}
