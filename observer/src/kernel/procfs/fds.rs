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
/// are unchanged. A scan lists the fds only of processes that may have changed: new ones, and
/// those whose fd count changed; the others keep their table. Should a socket then still be
/// unknown (a process closed an fd and opened a socket, its count unchanged), every process is
/// listed. Listing re-reads only fds that are
/// new, not sockets (their number may have been reused by a socket) or whose socket has left
/// the kernel's table. With every process in scope (node mode) on a busy machine, some count
/// changes every poll: only those processes are listed, not every fd of the machine.
#[derive(Default)]
pub struct FdCache {
    processes: FastMap<u32, ProcessFds>,
    last: FdScan,
    /// Sockets in the table that no watched process held at the last scan.
    foreign: FastSet<u32>,
    scanned_pids: Option<Vec<u32>>,
    polls_since_scan: u32,
    /// Fd tables listed so far (to see what a scan costs).
    listings: u64,
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
        let listed_all = self.pass(&wanted, present, false);
        let unknown =
            present.iter().any(|i| !self.last.owners.contains_key(i) && !self.foreign.contains(i));
        if unknown && !listed_all {
            self.pass(&wanted, present, true);
        }
        let owners = &self.last.owners;
        self.foreign = present.iter().copied().filter(|i| !owners.contains_key(i)).collect();
        self.scanned_pids = pids.map(<[u32]>::to_vec);
        self.polls_since_scan = 0;
    }

    /// Reads the fd tables of `wanted` into `last`: each listed anew if `relist` or if it may
    /// have changed. Returns whether every one was listed.
    fn pass(&mut self, wanted: &[u32], present: &FastSet<u32>, relist: bool) -> bool {
        let still_exists = |inode: u32| present.is_empty() || present.contains(&inode);
        let mut result = FdScan::default();
        let mut seen = FastMap::default();
        seen.reserve(wanted.len());
        let listings_before = self.listings;
        for &pid in wanted {
            let Some(cached) = self.refresh(pid, &still_exists, relist) else { continue };
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
        let listed_all = self.listings - listings_before >= seen.len() as u64;
        self.processes = seen;
        self.last = result;
        listed_all
    }

    /// The fd table of `pid`, re-reading only what may have changed; listed anew unless it
    /// cannot have changed (and `relist` is not asked for).
    fn refresh(
        &mut self,
        pid: u32,
        still_exists: &impl Fn(u32) -> bool,
        relist: bool,
    ) -> Option<ProcessFds> {
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
        // As many fds as last time: unchanged, unless one was closed and another opened in its
        // place. A socket opened so is unknown to the caller, who then lists every process. (A
        // socket that left the table cannot tell: out of scope, say under --port, is alike. A
        // socket closed here but still held elsewhere keeps this fd until the count changes;
        // acting on a socket checks its cookie first.)
        let unchanged =
            !relist && !cached.fds.is_empty() && fd_count(pid) == Some(cached.fds.len() as u32);
        if unchanged {
            return Some(cached);
        }
        self.listings += 1;
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

    #[test]
    fn only_processes_that_may_have_changed_are_listed_again() {
        use std::{io::Write, process::Command, time::Duration, time::Instant};
        let started = |child: &std::process::Child, name: &str| {
            let deadline = Instant::now() + Duration::from_secs(5);
            // Its fds are in flux until it has exec'd.
            while super::super::comm(child.id()).as_deref() != Some(name) {
                assert!(Instant::now() < deadline, "{name} did not start");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let idle = Command::new("sleep").arg("30").spawn().unwrap();
        let mut busy = Command::new("sh")
            .args(["-c", "read x; exec 3</dev/null; read y"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        started(&idle, "sleep");
        started(&busy, "sh");
        let pids = [idle.id(), busy.id()];
        let mut cache = FdCache::default();
        let none = FastSet::default();
        cache.scan(Some(&pids), &none);
        assert_eq!(cache.listings, 2);
        // The busy one opens a file: it is listed again, the idle one is not.
        let before = fd_count(busy.id());
        let mut stdin = busy.stdin.take().unwrap();
        stdin.write_all(b"go\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while fd_count(busy.id()) == before {
            assert!(Instant::now() < deadline, "sh did not open its file");
            std::thread::sleep(Duration::from_millis(5));
        }
        cache.scan(Some(&pids), &none);
        assert_eq!(cache.listings, 3);
        // A socket no count change explains: every process is listed, then it is known to be
        // nobody's.
        let stray: FastSet<u32> = [u32::MAX].into_iter().collect();
        cache.scan(Some(&pids), &stray);
        assert_eq!(cache.listings, 5);
        assert!(cache.foreign.contains(&u32::MAX));
        cache.scan(Some(&pids), &stray);
        assert_eq!(cache.listings, 5, "nothing changed");
        drop(stdin);
        for mut child in [idle, busy] {
            let _ = child.kill();
            child.wait().unwrap();
        }
    }
}
