//! Every process this pid namespace shows in /proc, with what selecting targets needs: parent,
//! name, start time and whether it is a kernel thread.
use std::{fs, sync::Arc};

use crate::fastmap::FastMap;

/// PF_KTHREAD in /proc/PID/stat's flags: a kernel thread, which holds no sockets of its own.
const PF_KTHREAD: u32 = 0x0020_0000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessEntry {
    pub pid: u32,
    pub ppid: u32,
    /// Clock ticks after boot: tells a process from a later one that reused its pid.
    pub start_time: u64,
    pub comm: Arc<str>,
    pub kernel_thread: bool,
    /// A zombie: exited, not yet reaped.
    pub zombie: bool,
    /// CPU time used in user and system mode, in clock ticks (`CLK_TCK`).
    pub cpu_ticks: u64,
}

impl ProcessEntry {
    /// Parses /proc/PID/stat. The name sits in parentheses and may itself hold spaces and
    /// parentheses, so the fields after it are counted from the last ')'.
    pub fn parse(pid: u32, stat: &str) -> Option<ProcessEntry> {
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let comm = stat.get(open + 1..close)?;
        // After the name: state ppid pgrp session tty_nr tpgid flags ... (field 3 onwards).
        let rest: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
        let state = rest.first()?.chars().next()?;
        let ppid = rest.get(1)?.parse().ok()?;
        let flags: u32 = rest.get(6)?.parse().ok()?;
        // utime and stime are fields 14 and 15, starttime field 22; `rest` starts at field 3.
        let ticks = |i: usize| rest.get(i).and_then(|t| t.parse::<u64>().ok());
        let cpu_ticks = ticks(11)?.saturating_add(ticks(12)?);
        let start_time = rest.get(19)?.parse().ok()?;
        Some(ProcessEntry {
            pid,
            ppid,
            start_time,
            comm: Arc::from(comm),
            kernel_thread: flags & PF_KTHREAD != 0,
            zombie: matches!(state, 'Z' | 'X'),
            cpu_ticks,
        })
    }

    pub fn read(pid: u32) -> Option<ProcessEntry> {
        ProcessEntry::parse(pid, &fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }
}

/// The CPU time process `pid` has used, user and system, in nanoseconds (at the resolution of a
/// clock tick, 10 ms on most systems).
pub fn cpu_time_ns(pid: u32) -> Option<u64> {
    // SAFETY: sysconf has no preconditions.
    let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?;
    let ticks = ProcessEntry::read(pid)?.cpu_ticks;
    (per_second > 0).then(|| ticks.saturating_mul(1_000_000_000) / per_second)
}

/// The process list, re-read on demand. Names are shared with the entries of the previous
/// read, so a steady list allocates nothing.
#[derive(Default)]
pub struct ProcessTable {
    entries: FastMap<u32, ProcessEntry>,
}

impl ProcessTable {
    /// Re-reads every process's stat (a name can change at exec, a parent at re-parenting).
    pub fn refresh(&mut self) -> &FastMap<u32, ProcessEntry> {
        let Ok(dir) = fs::read_dir("/proc") else {
            return &self.entries;
        };
        let mut fresh = FastMap::default();
        fresh.reserve(self.entries.len());
        for pid in dir.flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()) {
            let Some(mut entry) = ProcessEntry::read(pid) else { continue };
            if let Some(old) = self.entries.get(&pid)
                && old.comm == entry.comm
            {
                entry.comm = old.comm.clone();
            }
            fresh.insert(pid, entry);
        }
        self.entries = fresh;
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_spaces_and_parentheses_are_read_whole() {
        let stat = "4242 (my (odd) srv) S 1 4242 4242 0 -1 4194560 120 0 0 0 3 1 0 0 20 0 5 0 \
                    987654 12345678 300 18446744073709551615";
        let e = ProcessEntry::parse(4242, stat).unwrap();
        assert_eq!((&*e.comm, e.ppid, e.start_time), ("my (odd) srv", 1, 987_654));
        assert_eq!(e.cpu_ticks, 3 + 1, "utime + stime");
        assert!(!e.kernel_thread && !e.zombie);
    }

    #[test]
    fn kernel_threads_and_zombies_are_told_apart() {
        let kthread = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 2 0 0";
        assert!(ProcessEntry::parse(2, kthread).unwrap().kernel_thread);
        let zombie = "77 (gone) Z 1 77 77 0 -1 4194316 0 0 0 0 0 0 0 0 20 0 1 0 500 0 0";
        assert!(ProcessEntry::parse(77, zombie).unwrap().zombie);
        assert_eq!(ProcessEntry::parse(1, "garbage"), None);
        assert_eq!(ProcessEntry::parse(1, "1 (x) S"), None);
    }

    #[test]
    fn cpu_time_grows_while_a_process_works() {
        let me = std::process::id();
        let before = cpu_time_ns(me).unwrap();
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(60) {
            std::hint::black_box(0u64.wrapping_add(1));
        }
        assert!(cpu_time_ns(me).unwrap() > before);
    }

    #[test]
    fn the_table_lists_this_process_under_its_parent() {
        let mut table = ProcessTable::default();
        let me = std::process::id();
        let entry = table.refresh()[&me].clone();
        assert_eq!(entry.ppid, std::os::unix::process::parent_id());
        assert!(!entry.kernel_thread);
    }
}
