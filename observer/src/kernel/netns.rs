//! Network namespaces. sock_diag only sees the namespace its netlink socket was created in, so a
//! target in a container (or a sidecar's neighbour) needs a socket created inside its namespace.
use std::{collections::BTreeMap, fs::File, io, os::unix::fs::MetadataExt};

use nix::sched::{CloneFlags, setns};

use super::sock_diag::{DiagError, DiagSocketHandle};

/// Identifies a network namespace: the inode of its nsfs file.
pub type NetnsId = u64;

pub fn of_pid(pid: u32) -> io::Result<NetnsId> {
    Ok(std::fs::metadata(format!("/proc/{pid}/ns/net"))?.ino())
}

pub fn own() -> io::Result<NetnsId> {
    Ok(std::fs::metadata("/proc/self/ns/net")?.ino())
}

/// Every network namespace some process of this pid namespace lives in, each with the lowest
/// pid living there: the door to enter it by. One stat of /proc/PID/ns/net per process.
/// Processes that exit meanwhile, or that may not be inspected, are passed over.
pub fn all() -> BTreeMap<NetnsId, u32> {
    let mut found = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return found };
    for pid in dir.flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()) {
        if let Ok(id) = of_pid(pid) {
            found.entry(id).and_modify(|door: &mut u32| *door = (*door).min(pid)).or_insert(pid);
        }
    }
    found
}

/// A sock_diag socket in the network namespace of `pid`.
pub fn diag_socket_in(pid: u32) -> Result<DiagSocketHandle, DiagError> {
    let ns = File::open(format!("/proc/{pid}/ns/net")).map_err(DiagError::Open)?;
    if own().ok() == Some(ns.metadata().map_err(DiagError::Open)?.ino()) {
        return DiagSocketHandle::open();
    }
    // setns moves only the calling thread; a short-lived thread keeps the agent where it is. A
    // netlink socket stays in the namespace it was created in after that thread is gone.
    std::thread::spawn(move || {
        setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| DiagError::Open(e.into()))?;
        DiagSocketHandle::open()
    })
    .join()
    .unwrap_or_else(|_| Err(DiagError::Open(io::Error::other("namespace thread panicked"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_namespace_lists_this_process_s_own() {
        let all = all();
        let mine = own().unwrap();
        let door = all[&mine];
        assert!(door <= std::process::id());
        assert_eq!(of_pid(door).unwrap(), mine);
    }
}
