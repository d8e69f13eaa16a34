//! What /proc says about the watched processes: which fd of which process holds a socket, the
//! process's threads, and which of them are blocked in a socket call on which fd.
use std::{fs, io, sync::Arc};

use thiserror::Error;

use crate::fastmap::{FastMap, FastSet};

/// Socket inode -> the process and fd that hold it.
pub type SocketOwners = FastMap<u32, Owner>;

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
    pub processes: FastMap<u32, (Arc<str>, u32)>,
}

/// Reads the fd tables of `pids`, or of every process when `pids` is `None`, from scratch.
pub fn scan_fds(pids: Option<&[u32]>) -> FdScan {
    let mut cache = FdCache::default();
    cache.rescan(pids, &FastSet::default());
    cache.last
}

/// What a cached fd refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FdTarget {
    Socket(u32),
    /// Anything else. Re-read every scan: its number may be reused by a new socket.
    Other,
}

/// Polls without a full scan before one is forced anyway, on kernels that cannot report a
/// process's fd count cheaply (before Linux 6.2): keeps fd counts (fd_pressure) fresh.
const FORCED_RESCAN_EVERY: u32 = 10;

/// Remembers which fd holds which socket, so that a poll of processes with 100k sockets
/// neither reads 100k symlinks nor, when no socket came or went, even lists their fds.
///
/// A scan is skipped when every socket in the kernel's table is already known (held by a
/// watched process, or known to be someone else's), no known socket vanished, and the fd counts
/// are unchanged. A scan re-reads only fds that are new, not sockets (their number may have been
/// reused by a socket) or whose socket has left the kernel's table.
#[derive(Default)]
pub struct FdCache {
    processes: FastMap<u32, ProcessFds>,
    last: FdScan,
    /// Sockets in the table that no watched process held at the last scan.
    foreign: FastSet<u32>,
    scanned_pids: Option<Vec<u32>>,
    polls_since_scan: u32,
}

#[derive(Default)]
struct ProcessFds {
    start_time: u64,
    comm: Arc<str>,
    fds: FastMap<i32, FdTarget>,
}

impl FdCache {
    /// Who holds the sockets in `present` (the inodes in the kernel's table this poll), for
    /// `pids` (or every process).
    pub fn scan(&mut self, pids: Option<&[u32]>, present: &FastSet<u32>) -> &FdScan {
        if self.needs_rescan(pids, present) {
            self.rescan(pids, present);
        } else {
            self.polls_since_scan += 1;
        }
        &self.last
    }

    fn needs_rescan(&mut self, pids: Option<&[u32]>, present: &FastSet<u32>) -> bool {
        if self.scanned_pids.as_deref() != pids || self.last.processes.is_empty() {
            return true;
        }
        let unknown =
            present.iter().any(|i| !self.last.owners.contains_key(i) && !self.foreign.contains(i));
        let vanished = self.last.owners.keys().any(|i| !present.contains(i));
        if unknown || vanished {
            return true;
        }
        // Other fds opened or closed: fd_pressure needs the count.
        let mut counts_known = true;
        for (&pid, (_, fds)) in &self.last.processes {
            match fd_count(pid) {
                Some(n) if n != *fds => return true,
                Some(_) => {}
                None => counts_known = false,
            }
        }
        !counts_known && self.polls_since_scan + 1 >= FORCED_RESCAN_EVERY
    }

    fn rescan(&mut self, pids: Option<&[u32]>, present: &FastSet<u32>) {
        let wanted: Vec<u32> = match pids {
            Some(pids) => pids.to_vec(),
            None => match fs::read_dir("/proc") {
                Ok(dir) => {
                    dir.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect()
                }
                Err(_) => vec![],
            },
        };
        let still_exists = |inode: u32| present.is_empty() || present.contains(&inode);
        let mut result = FdScan::default();
        let mut seen = FastMap::default();
        seen.reserve(wanted.len());
        for pid in wanted {
            let Some(cached) = self.refresh(pid, &still_exists) else { continue };
            for (&fd, target) in &cached.fds {
                if let FdTarget::Socket(inode) = *target {
                    result.owners.entry(inode).or_insert_with(|| Owner {
                        pid,
                        fd,
                        comm: cached.comm.clone(),
                    });
                }
            }
            result.processes.insert(pid, (cached.comm.clone(), cached.fds.len() as u32));
            seen.insert(pid, cached);
        }
        // Processes gone (or out of scope) are forgotten.
        self.processes = seen;
        self.foreign = present.iter().copied().filter(|i| !result.owners.contains_key(i)).collect();
        self.last = result;
        self.scanned_pids = pids.map(<[u32]>::to_vec);
        self.polls_since_scan = 0;
    }

    /// The fd table of `pid`, re-reading only what may have changed.
    fn refresh(&mut self, pid: u32, still_exists: &impl Fn(u32) -> bool) -> Option<ProcessFds> {
        let stat = ::procfs::process::Process::new(pid as i32).ok()?.stat().ok()?;
        let mut cached = self
            .processes
            .remove(&pid)
            .filter(|c| c.start_time == stat.starttime)
            .unwrap_or_default();
        cached.start_time = stat.starttime;
        if cached.comm.is_empty() || *cached.comm != *stat.comm {
            cached.comm = Arc::from(stat.comm.as_str());
        }
        let dir = format!("/proc/{pid}/fd");
        let entries = fs::read_dir(&dir).ok()?;
        let mut fds = FastMap::default();
        fds.reserve(cached.fds.len());
        for entry in entries.flatten() {
            let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let target = match cached.fds.get(&fd) {
                Some(&FdTarget::Socket(inode)) if still_exists(inode) => FdTarget::Socket(inode),
                _ => match fs::read_link(entry.path()) {
                    Ok(link) => socket_inode(&link).map_or(FdTarget::Other, FdTarget::Socket),
                    Err(_) => continue, // closed meanwhile
                },
            };
            fds.insert(fd, target);
        }
        cached.fds = fds;
        Some(cached)
    }
}

/// How many fds `pid` has open, from the size of /proc/PID/fd (Linux 6.2+; `None` before).
fn fd_count(pid: u32) -> Option<u32> {
    let size = fs::metadata(format!("/proc/{pid}/fd")).ok()?.len();
    (size > 0).then_some(size as u32)
}

/// The inode in an fd link of the form `socket:[12345]`.
fn socket_inode(link: &std::path::Path) -> Option<u32> {
    link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
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
pub fn thread_states(pid: u32) -> Vec<ThreadState> {
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
    let call = super::syscalls::by_nr(nr)?;
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
        assert!(thread_states(me).iter().any(|t| t.tid == me));
    }

    #[test]
    fn socket_links_are_parsed() {
        assert_eq!(socket_inode(std::path::Path::new("socket:[4242]")), Some(4242));
        assert_eq!(socket_inode(std::path::Path::new("pipe:[4242]")), None);
        assert_eq!(socket_inode(std::path::Path::new("/var/log/x")), None);
    }

    #[test]
    fn cache_follows_sockets_opening_closing_and_fd_reuse() {
        use std::os::fd::AsRawFd;
        let me = std::process::id();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let inode = |s: &dyn AsRawFd| {
            let link = fs::read_link(format!("/proc/self/fd/{}", s.as_raw_fd())).unwrap();
            socket_inode(&link).unwrap()
        };
        let listener_inode = inode(&listener);
        let mut cache = FdCache::default();
        let table: FastSet<u32> = [listener_inode].into_iter().collect();
        let first = cache.scan(Some(&[me]), &table);
        assert_eq!(first.owners[&listener_inode].fd, listener.as_raw_fd());
        assert!(first.processes[&me].1 >= 1);
        // Close the listener and open another socket: it may take the same fd number. Its
        // inode is new to the cache, and the old one left the table: the cache rescans.
        drop(listener);
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other_inode = inode(&other);
        let table: FastSet<u32> = [other_inode].into_iter().collect();
        let second = cache.scan(Some(&[me]), &table);
        assert_eq!(second.owners[&other_inode].fd, other.as_raw_fd());
        assert!(!second.owners.contains_key(&listener_inode));
        // Nothing changed: the answer stands.
        assert_eq!(cache.scan(Some(&[me]), &table).owners[&other_inode].fd, other.as_raw_fd());
    }

    #[test]
    fn missing_pid_is_reported_as_such() {
        // pid_max is at most 2^22, so this pid cannot exist.
        assert!(matches!(ProcessIdentity::of(999_999_999), Err(ProcError::NoSuchProcess(_))));
    }
}
