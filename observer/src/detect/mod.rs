//! Detection: from each poll's snapshot to findings ("this socket is stuck, and why"). Pure
//! logic over snapshots; the only state is what the rules need to remember between polls, and
//! the only clock is the snapshot's.
mod facts;
mod history;
mod matchers;
pub mod policy;
pub mod reason;
pub mod rules;
pub mod thresholds;

use std::{collections::HashMap, sync::Arc};

use self::{
    history::{ProcessHistory, SocketHistory},
    policy::Subject,
    rules::SocketCtx,
};
pub use self::{
    policy::Policy,
    reason::Reason,
    rules::{Facts, KernelSettings},
};
use crate::{
    fastmap::FastMap,
    snapshot::{Identity, ResetView, Snapshot, SocketView},
};

/// What an alert is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Socket(u64),
    Process(u32),
}

/// One socket or process that one rule considers stuck right now.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub target: Target,
    /// The verdict and its numbers; words and JSON are rendered only if an alert is raised.
    pub facts: Facts,
    /// The policy rule that set this socket's thresholds, if one did.
    pub rule: Option<Arc<str>>,
}

impl Finding {
    pub fn reason(&self) -> Reason {
        self.facts.reason()
    }

    /// Who and what the finding is about, as of `snapshot`.
    pub fn identity(&self, snapshot: &Snapshot) -> Identity {
        match (self.target, &self.facts) {
            (Target::Socket(cookie), facts) => match snapshot.find(cookie) {
                Some(socket) => snapshot.identity_of(socket),
                // A reset's socket may already be gone: the probes said what it was.
                None => match facts {
                    Facts::ResetUnread(reset) => Identity::of_reset(reset),
                    _ => Identity { cookie: Some(cookie), ..Identity::of_none() },
                },
            },
            (Target::Process(pid), _) => match snapshot.process(pid) {
                Some(p) => Identity::of_process(p),
                None => Identity { pid: Some(pid), ..Identity::of_none() },
            },
        }
    }
}

pub struct Detector {
    policy: Policy,
    kernel: KernelSettings,
    generation: u32,
    sockets: FastMap<u64, SocketHistory>,
    processes: FastMap<u32, ProcessHistory>,
    /// Data-losing resets, remembered while their socket still exists.
    resets: HashMap<u64, ResetView>,
}

impl Detector {
    pub fn new(policy: Policy, kernel: KernelSettings) -> Self {
        Detector {
            policy,
            kernel,
            generation: 0,
            sockets: FastMap::default(),
            processes: FastMap::default(),
            resets: HashMap::new(),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Everything stuck in this snapshot, in a stable order.
    pub fn observe(&mut self, snapshot: &Snapshot) -> Vec<Finding> {
        self.generation = self.generation.wrapping_add(1);
        let generation = self.generation;
        let now = snapshot.taken_ns;
        let mut findings = Vec::new();

        for socket in &snapshot.sockets {
            let applied = self.policy.apply(&subject_of(snapshot, socket));
            let window_ns = rules::rate_window_ns(&applied.thresholds);
            let history = self
                .sockets
                .entry(socket.cookie())
                .and_modify(|h| h.update(socket, now, window_ns, generation))
                .or_insert_with(|| SocketHistory::new(socket, now, generation));
            let ctx = SocketCtx {
                now_ns: now,
                socket,
                history,
                t: &applied.thresholds,
                kernel: self.kernel,
            };
            rules::socket_rules(&ctx, |facts| {
                if !applied.ignored.contains(facts.reason()) {
                    let rule = applied.rule.cloned();
                    findings.push(Finding { target: Target::Socket(socket.cookie()), facts, rule });
                }
            });
        }
        self.sockets.retain(|_, h| h.generation == generation);

        for process in &snapshot.processes {
            let history = self
                .processes
                .entry(process.pid)
                .and_modify(|h| h.update(process, now, generation))
                .or_insert_with(|| ProcessHistory::new(process, now, generation));
            let workload = process.workload.as_deref();
            let subject = Subject {
                pid: Some(process.pid),
                comm: Some(&process.comm),
                container_id: workload.and_then(|w| w.container_id.as_deref()),
                pod: workload.and_then(|w| w.pod.as_deref()),
                namespace: workload.and_then(|w| w.namespace.as_deref()),
                ..Default::default()
            };
            let applied = self.policy.apply(&subject);
            let t = &applied.thresholds;
            let verdicts = [
                rules::fd_pressure(process, history, now, t),
                rules::accept_spinning(process, history, t),
            ];
            for facts in verdicts.into_iter().flatten() {
                if !applied.ignored.contains(facts.reason()) {
                    let rule = applied.rule.cloned();
                    findings.push(Finding { target: Target::Process(process.pid), facts, rule });
                }
            }
        }
        self.processes.retain(|_, h| h.generation == generation);

        // A reset is reported in the poll it arrives and for as long as its socket lingers.
        let fresh: Vec<u64> = snapshot.resets.iter().map(|r| r.cookie).collect();
        for reset in &snapshot.resets {
            self.resets.insert(reset.cookie, reset.clone());
        }
        let policy = &self.policy;
        self.resets.retain(|&cookie, reset| {
            let present = snapshot.find(cookie);
            if present.is_none() && !fresh.contains(&cookie) {
                return false;
            }
            let workload = reset.workload.as_deref();
            let subject = Subject {
                local_port: Some(reset.local.port()),
                remote_ip: Some(reset.remote.ip()),
                pid: Some(reset.pid),
                comm: Some(&reset.comm),
                container_id: workload.and_then(|w| w.container_id.as_deref()),
                pod: workload.and_then(|w| w.pod.as_deref()),
                namespace: workload.and_then(|w| w.namespace.as_deref()),
            };
            let applied = policy.apply(&subject);
            if !applied.ignored.contains(Reason::ResetUnread) {
                let facts = rules::reset_unread(reset);
                let rule = applied.rule.cloned();
                findings.push(Finding { target: Target::Socket(cookie), facts, rule });
            }
            present.is_some()
        });

        findings.sort_by_key(|f| (f.target, f.reason()));
        findings
    }
}

/// What policy rules match a socket against: its holder, or for an orphan the process that
/// held it.
fn subject_of<'a>(snapshot: &'a Snapshot, socket: &'a SocketView) -> Subject<'a> {
    let (pid, comm) = match &socket.owner {
        Some(o) => (Some(o.pid), Some(&*o.comm)),
        None => match snapshot.former_owners.get(&socket.cookie()) {
            Some(f) => (Some(f.pid), f.comm.as_deref()),
            None => (None, None),
        },
    };
    let workload = socket.workload.as_deref();
    Subject {
        local_port: Some(socket.local().port()),
        remote_ip: Some(socket.remote().ip()),
        pid,
        comm,
        container_id: workload.and_then(|w| w.container_id.as_deref()),
        pod: workload.and_then(|w| w.pod.as_deref()),
        namespace: workload.and_then(|w| w.namespace.as_deref()),
    }
}

#[cfg(test)]
mod tests;
