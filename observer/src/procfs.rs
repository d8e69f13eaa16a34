//! What /proc says about the watched processes: which fd of which process holds a socket, the
//! process's threads, and which of them are blocked in a socket call on which fd.
use std::{collections::HashMap, fs, io};

use thiserror::Error;

/// Socket inode -> the process and fd that hold it.
pub type SocketOwners = HashMap<u32, Owner>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub fd: i32,
    pub comm: String,
}

#[derive(Debug, Error)]
pub enum ProcError {
    #[error("no process with pid {0}: check the pid (e.g. `pgrep -f <server>`)")]
    NoSuchProcess(u32),
    #[error("pid {pid} is a thread of process {tgid}: use --pid {tgid}")]
    IsThread { pid: u32, tgid: u32 },
    #[error(
        "not allowed to inspect pid {pid}: observer needs ptrace access to the \
         target; run it as root, with at least the target's capabilities and outside its LSM \
         confinement"
    )]
    NotPermitted { pid: u32, source: io::Error },
    #[error("cannot read /proc/{pid}")]
    Other { pid: u32, source: io::Error },
}

fn classify(pid: u32, err: ::procfs::ProcError) -> ProcError {
    match err {
        ::procfs::ProcError::NotFound(_) => ProcError::NoSuchProcess(pid),
        ::procfs::ProcError::PermissionDenied(_) => ProcError::NotPermitted {
            pid,
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        },
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
        let stat = process.stat().map_err(|e| classify(pid, e))?;
        // Resolving fds is what every poll does; fail now, clearly, if the kernel forbids it
        // (listing the directory is allowed even where reading the links is not).
        let first_fd_link = fs::read_dir(format!("/proc/{pid}/fd"))
            .and_then(|mut dir| dir.next().transpose())
            .and_then(|entry| entry.map(|e| fs::read_link(e.path())).transpose());
        if let Err(source) = first_fd_link {
            return Err(match source.kind() {
                io::ErrorKind::PermissionDenied => ProcError::NotPermitted { pid, source },
                io::ErrorKind::NotFound => ProcError::NoSuchProcess(pid),
                _ => ProcError::Other { pid, source },
            });
        }
        Ok(ProcessIdentity { pid, start_time: stat.starttime, comm: stat.comm })
    }

    /// True while the same process (not a successor with the same pid) is alive and not a zombie.
    pub fn is_alive(&self) -> bool {
        match ::procfs::process::Process::new(self.pid as i32).and_then(|p| p.stat()) {
            Ok(stat) => stat.starttime == self.start_time && stat.state != 'Z' && stat.state != 'X',
            Err(_) => false,
        }
    }
}

/// One pass over the fd tables of the processes in scope.
#[derive(Debug, Default)]
pub struct FdScan {
    /// Socket inode -> who holds it.
    pub owners: SocketOwners,
    /// Process id -> (comm, open fds).
    pub processes: HashMap<u32, (String, u32)>,
}

/// Reads the fd tables of `pids`, or of every process when `pids` is `None`. Processes that
/// vanish or cannot be read while scanning are skipped: the next poll sees the truth.
pub fn scan_fds(pids: Option<&[u32]>) -> FdScan {
    let mut result = FdScan::default();
    let mut scan = |process: ::procfs::process::Process| {
        let Ok(fds) = process.fd() else { return };
        let comm = process.stat().map(|s| s.comm).unwrap_or_default();
        let mut count = 0;
        for fd in fds.flatten() {
            count += 1;
            if let ::procfs::process::FDTarget::Socket(inode) = fd.target {
                result.owners.entry(inode as u32).or_insert_with(|| Owner {
                    pid: process.pid as u32,
                    fd: fd.fd,
                    comm: comm.clone(),
                });
            }
        }
        result.processes.insert(process.pid as u32, (comm, count));
    };
    match pids {
        Some(pids) => {
            for &pid in pids {
                if let Ok(process) = ::procfs::process::Process::new(pid as i32) {
                    scan(process);
                }
            }
        }
        None => {
            if let Ok(all) = ::procfs::process::all_processes() {
                for process in all.flatten() {
                    scan(process);
                }
            }
        }
    }
    result
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

/// A thread of a watched process and, if it is blocked in a call on one fd, which call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadState {
    pub tid: u32,
    pub name: String,
    pub blocked: Option<BlockedCall>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockedCall {
    pub syscall: &'static str,
    pub fd: i32,
}

/// The threads of `pid` with what each is blocked in. Reading a thread's syscall file needs
/// ptrace access; without it the thread is listed as not blocked.
pub fn threads(pid: u32) -> Vec<ThreadState> {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    let mut threads: Vec<ThreadState> = entries
        .flatten()
        .filter_map(|entry| {
            let tid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let dir = entry.path();
            let name = fs::read_to_string(dir.join("comm")).ok()?.trim_end().to_owned();
            let blocked =
                fs::read_to_string(dir.join("syscall")).ok().and_then(|s| parse_syscall_line(&s));
            Some(ThreadState { tid, name, blocked })
        })
        .collect();
    threads.sort_by_key(|t| t.tid);
    threads
}

/// Parses /proc/PID/task/TID/syscall ("nr arg0 .. arg5 sp pc" for a thread inside a syscall,
/// "running" or "-1 sp pc" otherwise) into the socket call and fd it is blocked on, if any.
pub fn parse_syscall_line(line: &str) -> Option<BlockedCall> {
    let mut fields = line.split_whitespace();
    let nr: i64 = fields.next()?.parse().ok()?;
    let args: Vec<i64> = fields
        .take(6)
        .map(|a| i64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
        .collect::<Option<_>>()?;
    let call = crate::syscalls::by_nr(nr)?;
    let fd = *args.get(call.fd_arg)?;
    Some(BlockedCall { syscall: call.name, fd: i32::try_from(fd).ok()? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_read_names_call_and_fd() {
        let line = format!("{} 0x5 0x7ffd1c 0x400 0x0 0x0 0x0 0x7ffd00 0x7f12ab\n", libc::SYS_read);
        assert_eq!(parse_syscall_line(&line), Some(BlockedCall { syscall: "read", fd: 5 }));
    }

    #[test]
    fn blocked_sendto_on_large_fd() {
        let line = format!("{} 0x3e8 0x1 0x2 0x0 0x0 0x0 0x1 0x2", libc::SYS_sendto);
        assert_eq!(parse_syscall_line(&line), Some(BlockedCall { syscall: "sendto", fd: 1000 }));
    }

    #[test]
    fn running_or_not_in_syscall_or_other_call_is_not_blocked() {
        assert_eq!(parse_syscall_line("running\n"), None);
        assert_eq!(parse_syscall_line("-1 0x7ffd00 0x7f12ab"), None);
        let nanosleep = format!("{} 0x7ffd 0x0 0x0 0x0 0x0 0x0 0x1 0x2", libc::SYS_nanosleep);
        assert_eq!(parse_syscall_line(&nanosleep), None);
        assert_eq!(parse_syscall_line(""), None);
        assert_eq!(parse_syscall_line("0 zz"), None);
    }

    #[test]
    fn own_process_identity_and_threads() {
        let me = std::process::id();
        let id = ProcessIdentity::of(me).unwrap();
        assert!(id.is_alive());
        let gone = ProcessIdentity { start_time: id.start_time + 1, ..id };
        assert!(!gone.is_alive(), "a different start time is a different process");
        assert!(threads(me).iter().any(|t| t.tid == me));
    }

    #[test]
    fn missing_pid_is_reported_as_such() {
        // pid_max is at most 2^22, so this pid cannot exist.
        assert!(matches!(ProcessIdentity::of(999_999_999), Err(ProcError::NoSuchProcess(_))));
    }
}
