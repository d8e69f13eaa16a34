//! Which fd of which process holds each socket, read cheaply poll after poll.
use std::{fs, sync::Arc};

use super::Owner;
use crate::fastmap::{FastMap, FastSet};

/// Socket inode -> the process and fd that hold it.
pub type SocketOwners = FastMap<u32, Owner>;

/// One pass over the fd tables of the processes in scope.
#[derive(Debug, Default)]
pub struct FdScan {
    /// Socket inode -> who holds it.
    pub owners: SocketOwners,
    /// Process id -> its name, start time and open fds.
    pub processes: FastMap<u32, HeldFds>,
}

/// A process whose fd table was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldFds {
    pub comm: Arc<str>,
    /// Clock ticks after boot: tells the process from a later one that reused its pid.
    pub start_time: u64,
    /// Open fds.
    pub count: u32,
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
        for (&pid, held) in &self.last.processes {
            match fd_count(pid) {
                Some(n) if n != held.count => return true,
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
            let held = HeldFds {
                comm: cached.comm.clone(),
                start_time: cached.start_time,
                count: cached.fds.len() as u32,
            };
            result.processes.insert(pid, held);
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(first.processes[&me].count >= 1);
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
}
