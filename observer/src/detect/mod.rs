//! Detection: from each poll's snapshot to findings ("this socket is stuck, and why"). Pure
//! logic over snapshots; the only state is what the rules need to remember between polls.
mod history;
pub mod rules;

use std::collections::HashMap;

use serde_json::{Map, Value};

pub use self::rules::KernelFacts;
use self::{
    history::{ProcessHistory, SocketHistory},
    rules::{Hit, SocketCtx},
};
use crate::{
    policy::{Policy, Subject},
    reason::Reason,
    snapshot::{Identity, ResetView, Snapshot},
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
    pub reason: Reason,
    pub identity: Identity,
    /// One sentence for the operator.
    pub detail: String,
    /// Numbers specific to the reason, merged into the alert.
    pub metrics: Map<String, Value>,
    /// The policy rule that set this socket's thresholds, if one did.
    pub rule: Option<String>,
}

impl Finding {
    fn new(target: Target, identity: Identity, hit: Hit, rule: Option<&str>) -> Finding {
        Finding {
            target,
            reason: hit.reason,
            identity,
            detail: hit.detail,
            metrics: hit.metrics,
            rule: rule.map(str::to_owned),
        }
    }
}

pub struct Detector {
    policy: Policy,
    facts: KernelFacts,
    generation: u64,
    sockets: HashMap<u64, SocketHistory>,
    processes: HashMap<u32, ProcessHistory>,
    /// Data-losing resets, remembered while their socket still exists.
    resets: HashMap<u64, ResetView>,
}

impl Detector {
    pub fn new(policy: Policy, facts: KernelFacts) -> Self {
        Detector {
            policy,
            facts,
            generation: 0,
            sockets: HashMap::new(),
            processes: HashMap::new(),
            resets: HashMap::new(),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Everything stuck in this snapshot, in a stable order.
    pub fn observe(&mut self, snapshot: &Snapshot) -> Vec<Finding> {
        self.generation += 1;
        let generation = self.generation;
        let now = snapshot.taken_ns;
        let mut findings = Vec::new();

        for socket in &snapshot.sockets {
            let applied = self.policy.apply(&socket.subject());
            let window_ns = applied.thresholds.slow_after.as_nanos() as u64;
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
                facts: self.facts,
            };
            for hit in rules::socket_rules(&ctx).filter(|h| !applied.ignored.contains(h.reason)) {
                let target = Target::Socket(socket.cookie());
                findings.push(Finding::new(target, Identity::of_socket(socket), hit, applied.rule));
            }
        }
        self.sockets.retain(|_, h| h.generation == generation);

        for process in &snapshot.processes {
            let history = self
                .processes
                .entry(process.pid)
                .and_modify(|h| h.update(process, now, generation))
                .or_insert_with(|| ProcessHistory::new(process, generation));
            let subject =
                Subject { pid: Some(process.pid), comm: Some(&process.comm), ..Default::default() };
            let applied = self.policy.apply(&subject);
            if let Some(hit) = rules::fd_pressure(process, history, now, &applied.thresholds)
                .filter(|h| !applied.ignored.contains(h.reason))
            {
                let target = Target::Process(process.pid);
                findings.push(Finding::new(
                    target,
                    Identity::of_process(process),
                    hit,
                    applied.rule,
                ));
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
            let subject = Subject {
                local_port: Some(reset.local.port()),
                remote_ip: Some(reset.remote.ip()),
                pid: Some(reset.pid),
                comm: Some(&reset.comm),
            };
            let applied = policy.apply(&subject);
            if !applied.ignored.contains(Reason::ResetUnread) {
                let identity =
                    present.map_or_else(|| Identity::of_reset(reset), Identity::of_socket);
                let hit = rules::reset_unread(reset);
                findings.push(Finding::new(Target::Socket(cookie), identity, hit, applied.rule));
            }
            present.is_some()
        });

        findings.sort_by_key(|f| (f.target, f.reason));
        findings
    }
}

#[cfg(test)]
mod tests;
