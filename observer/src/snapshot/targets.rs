//! Which processes are watched, poll after poll: the ones named by pid (and what they fork), and
//! every process whose name matches, as they start and exit.
use std::{collections::BTreeMap, sync::Arc};

use crate::{
    fastmap::FastMap,
    kernel::procfs::{ProcError, ProcessEntry, ProcessIdentity, ProcessTable},
};

/// What decides which processes are watched. Empty: none in particular (every socket).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    /// These processes, as the agent's pid namespace numbers them.
    pub pids: Vec<u32>,
    /// Also every process they fork, now or later (`--pid` without `--pid-only`).
    pub descendants: bool,
    /// Every process whose name (/proc/PID/comm) is one of these, whenever it runs.
    pub comms: Vec<String>,
}

impl Selector {
    /// Whether no process in particular is selected: every socket is watched.
    pub fn is_everything(&self) -> bool {
        self.pids.is_empty() && self.comms.is_empty()
    }
}

/// Why a process is watched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// Named by `--pid`.
    Named,
    /// Forked, directly or not, by a named process.
    Descendant,
    /// Its name matched `--comm`.
    Name,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub pid: u32,
    pub start_time: u64,
    pub comm: Arc<str>,
    pub why: Why,
}

/// What changed at a refresh.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub started: Vec<Target>,
    pub exited: Vec<Target>,
}

pub struct Targets {
    selector: Selector,
    live: BTreeMap<u32, Target>,
    table: ProcessTable,
}

impl Targets {
    /// Checks every named process (each must be a live process, not a thread or a kernel
    /// thread); name matches and descendants join at the first refresh.
    pub fn new(selector: Selector) -> Result<Targets, ProcError> {
        let mut live = BTreeMap::new();
        for &pid in &selector.pids {
            let id = ProcessIdentity::of(pid)?;
            let comm = Arc::from(id.comm.as_str());
            live.insert(pid, Target { pid, start_time: id.start_time, comm, why: Why::Named });
        }
        Ok(Targets { selector, live, table: ProcessTable::default() })
    }

    /// The watched processes' ids, ascending.
    pub fn pids(&self) -> Vec<u32> {
        self.live.keys().copied().collect()
    }

    /// Whether watching is over: every selected process is gone and no name can match again.
    pub fn finished(&self) -> bool {
        !self.selector.is_everything() && self.selector.comms.is_empty() && self.live.is_empty()
    }

    /// Re-reads the process list: which watched processes exited, and which joined.
    pub fn refresh(&mut self) -> Changes {
        if self.selector.is_everything() {
            return Changes::default();
        }
        let changes = if self.selector.descendants || !self.selector.comms.is_empty() {
            select(&self.selector, &self.live, self.table.refresh())
        } else {
            // Only the named processes matter: read just those.
            let named: FastMap<u32, ProcessEntry> =
                self.live.keys().filter_map(|&pid| Some((pid, ProcessEntry::read(pid)?))).collect();
            select(&self.selector, &self.live, &named)
        };
        for gone in &changes.exited {
            self.live.remove(&gone.pid);
        }
        for new in &changes.started {
            self.live.insert(new.pid, new.clone());
        }
        changes
    }
}

/// The pure part of a refresh: given what is watched and the process list now, what exited and
/// what joins.
fn select(
    selector: &Selector,
    live: &BTreeMap<u32, Target>,
    table: &FastMap<u32, ProcessEntry>,
) -> Changes {
    let same_process =
        |t: &Target| table.get(&t.pid).is_some_and(|e| e.start_time == t.start_time && !e.zombie);
    let exited: Vec<Target> = live.values().filter(|t| !same_process(t)).cloned().collect();
    let mut watched: BTreeMap<u32, Why> =
        live.values().filter(|t| same_process(t)).map(|t| (t.pid, t.why)).collect();
    let candidate = |e: &ProcessEntry| !e.kernel_thread && !e.zombie;
    let mut started = Vec::new();
    let mut join = |e: &ProcessEntry, why: Why, watched: &mut BTreeMap<u32, Why>| {
        watched.insert(e.pid, why);
        started.push(Target { pid: e.pid, start_time: e.start_time, comm: e.comm.clone(), why });
    };
    let mut by_pid: Vec<&ProcessEntry> = table.values().filter(|e| candidate(e)).collect();
    by_pid.sort_by_key(|e| e.pid);
    for e in &by_pid {
        if !watched.contains_key(&e.pid) && selector.comms.iter().any(|c| **c == *e.comm) {
            join(e, Why::Name, &mut watched);
        }
    }
    if selector.descendants {
        // Children of named processes and of their descendants, to any depth. Re-parented
        // orphans stay watched: they were descendants when first seen.
        let mut children: FastMap<u32, Vec<&ProcessEntry>> = FastMap::default();
        for e in &by_pid {
            children.entry(e.ppid).or_default().push(e);
        }
        let mut queue: Vec<u32> = watched
            .iter()
            .filter(|(_, why)| matches!(why, Why::Named | Why::Descendant))
            .map(|(&pid, _)| pid)
            .collect();
        while let Some(parent) = queue.pop() {
            for child in children.get(&parent).into_iter().flatten() {
                if !watched.contains_key(&child.pid) {
                    join(child, Why::Descendant, &mut watched);
                    queue.push(child.pid);
                }
            }
        }
    }
    Changes { started, exited }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pid: u32, ppid: u32, comm: &str) -> ProcessEntry {
        ProcessEntry {
            pid,
            ppid,
            start_time: u64::from(pid) * 10,
            comm: comm.into(),
            kernel_thread: false,
            zombie: false,
            cpu_ticks: 0,
        }
    }

    fn table(entries: &[ProcessEntry]) -> FastMap<u32, ProcessEntry> {
        entries.iter().map(|e| (e.pid, e.clone())).collect()
    }

    fn target(e: &ProcessEntry, why: Why) -> Target {
        Target { pid: e.pid, start_time: e.start_time, comm: e.comm.clone(), why }
    }

    fn pids(targets: &[Target]) -> Vec<(u32, Why)> {
        targets.iter().map(|t| (t.pid, t.why)).collect()
    }

    #[test]
    fn descendants_join_at_any_depth_and_leave_when_they_exit() {
        let server = entry(100, 1, "srv");
        let selector = Selector { pids: vec![100], descendants: true, comms: vec![] };
        let live = BTreeMap::from([(100, target(&server, Why::Named))]);
        let now = table(&[
            server.clone(),
            entry(200, 100, "srv"),
            entry(300, 200, "helper"),
            entry(400, 1, "other"),
        ]);
        let changes = select(&selector, &live, &now);
        assert_eq!(pids(&changes.started), vec![(200, Why::Descendant), (300, Why::Descendant)]);
        assert!(changes.exited.is_empty());

        let live: BTreeMap<u32, Target> =
            [target(&server, Why::Named), target(&now[&200], Why::Descendant)]
                .into_iter()
                .map(|t| (t.pid, t))
                .collect();
        let child_gone = table(&[server]);
        assert_eq!(
            pids(&select(&selector, &live, &child_gone).exited),
            vec![(200, Why::Descendant)]
        );
    }

    #[test]
    fn without_descendants_only_the_named_process_is_watched() {
        let server = entry(100, 1, "srv");
        let selector = Selector { pids: vec![100], descendants: false, comms: vec![] };
        let live = BTreeMap::from([(100, target(&server, Why::Named))]);
        let changes = select(&selector, &live, &table(&[server, entry(200, 100, "srv")]));
        assert_eq!(changes, Changes::default());
    }

    #[test]
    fn names_match_exactly_and_a_restart_is_a_new_process() {
        let selector = Selector { pids: vec![], descendants: false, comms: vec!["nginx".into()] };
        let first = entry(100, 1, "nginx");
        let now = table(&[first.clone(), entry(101, 1, "nginx-debug"), entry(102, 1, "ngin")]);
        assert_eq!(
            pids(&select(&selector, &BTreeMap::new(), &now).started),
            vec![(100, Why::Name)]
        );

        // Restarted: same pid reused by a new process (another start time) is a new target.
        let live = BTreeMap::from([(100, target(&first, Why::Name))]);
        let restarted = ProcessEntry { start_time: 99_999, ..first };
        let changes = select(&selector, &live, &table(&[restarted]));
        assert_eq!(pids(&changes.exited), vec![(100, Why::Name)]);
        assert_eq!(pids(&changes.started), vec![(100, Why::Name)]);
    }

    #[test]
    fn kernel_threads_and_zombies_never_join() {
        let selector = Selector { pids: vec![], descendants: false, comms: vec!["x".into()] };
        let kthread = ProcessEntry { kernel_thread: true, ..entry(5, 2, "x") };
        let zombie = ProcessEntry { zombie: true, ..entry(6, 1, "x") };
        assert_eq!(
            select(&selector, &BTreeMap::new(), &table(&[kthread, zombie])),
            Changes::default()
        );
    }

    #[test]
    fn named_watching_finishes_when_all_are_gone_but_names_never_finish() {
        let mut by_pid = Targets {
            selector: Selector { pids: vec![1], descendants: true, comms: vec![] },
            live: BTreeMap::new(),
            table: ProcessTable::default(),
        };
        assert!(by_pid.finished());
        by_pid.selector.comms.push("srv".into());
        assert!(!by_pid.finished());
    }
}
