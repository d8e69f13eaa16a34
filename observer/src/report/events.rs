//! The JSON-lines contract on stdout: one event object per line. Logs go to stderr. Field names
//! here are relied on by users' pipelines and by the integration tests.
use std::{collections::BTreeMap, time::SystemTime};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::{
    act::{ActResult, Mode, Outcome},
    alerts::{ClearWhy, Cleared, attribution::ThreadInfo},
    detect::{Finding, Reason, thresholds::Thresholds},
    snapshot::{Identity, SocketView},
};

/// RFC 3339 UTC with milliseconds, e.g. 2026-11-22T19:22:23.123Z.
pub fn timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

#[derive(Debug, Serialize)]
pub struct AlertEvent {
    pub ts: String,
    pub reason: Reason,
    #[serde(flatten)]
    pub identity: Identity,
    /// Connection-wide numbers; null for process-level alerts and sockets already gone.
    pub idle_ms: Option<u64>,
    pub last_send_ms: Option<u64>,
    pub last_recv_ms: Option<u64>,
    pub bytes_sent: Option<u64>,
    pub bytes_received: Option<u64>,
    pub retransmits: Option<u64>,
    /// Reason-specific numbers (queue sizes, rates, ...).
    #[serde(flatten)]
    pub metrics: Map<String, Value>,
    pub threads: Vec<ThreadInfo>,
    /// The policy rule that set the thresholds for this socket, when one matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_rule: Option<String>,
    pub detail: String,
}

impl AlertEvent {
    pub fn new(
        at: SystemTime,
        now_ns: u64,
        finding: &Finding,
        identity: Identity,
        socket: Option<&SocketView>,
        threads: Vec<ThreadInfo>,
    ) -> Self {
        AlertEvent {
            ts: timestamp(at),
            reason: finding.reason(),
            identity,
            idle_ms: socket.and_then(|s| s.idle_ms(now_ns)),
            last_send_ms: socket.and_then(|s| s.last_send_ms(now_ns)),
            last_recv_ms: socket.and_then(|s| s.last_recv_ms(now_ns)),
            bytes_sent: socket.map(SocketView::bytes_sent),
            bytes_received: socket.map(SocketView::bytes_received),
            retransmits: socket.map(SocketView::retransmits),
            metrics: finding.facts.metrics(),
            threads,
            policy_rule: finding.rule.as_deref().map(str::to_owned),
            detail: finding.facts.detail(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ClearedEvent {
    pub ts: String,
    pub reason: Reason,
    #[serde(flatten)]
    pub identity: Identity,
    pub why: ClearWhy,
}

impl ClearedEvent {
    pub fn new(at: SystemTime, cleared: Cleared) -> Self {
        ClearedEvent {
            ts: timestamp(at),
            reason: cleared.reason,
            identity: cleared.identity,
            why: cleared.why,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct StartedEvent {
    pub ts: String,
    pub version: &'static str,
    pub backend: &'static str,
    /// What the backend cannot do on this kernel (empty when nothing is missing).
    pub backend_notes: Vec<String>,
    pub pids: Vec<u32>,
    /// `--comm` names: every process so named is watched, as it comes and goes.
    pub comms: Vec<String>,
    pub ports: Vec<u16>,
    /// Node mode: every network namespace of the machine is watched.
    pub all_namespaces: bool,
    pub kernel: String,
    pub poll_interval_ms: u64,
    /// Whether the backend times threads inside TCP sends and receives (blocked_ms).
    pub call_timing: bool,
    /// Whether socket syscalls are timed per thread (--syscall-timing: blocked_ms on any
    /// backend, accept errors).
    pub syscall_timing: bool,
    /// Blocked threads are timed from their last sleep (tracepoint backend, see
    /// `--no-sleep-timing`).
    pub sleep_timing: bool,
    /// The policy file in effect, if any.
    pub config: Option<String>,
    /// Where the agent itself runs, as the Downward API says (NODE_NAME, POD_NAME,
    /// POD_NAMESPACE); left out when not given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Thresholds for connections no policy rule matches, each under its name and unit
    /// (`*_ms` for durations, ...).
    #[serde(flatten)]
    pub thresholds: Thresholds,
}

/// The agent's own health, every `--stats-interval`.
#[derive(Debug, Serialize)]
pub struct StatsEvent {
    pub ts: String,
    pub polls: u64,
    pub sockets: usize,
    /// Network namespaces read (with --all-namespaces, every one of the node).
    pub namespaces: usize,
    pub tracked: usize,
    pub alerts_active: usize,
    pub last_poll_ms: f64,
    pub max_poll_ms: f64,
    /// Entries in the probes' socket map, and its capacity (`--max-sockets`).
    pub map_entries: usize,
    /// `null` when the probes keep records in socket storage, which has no capacity.
    pub map_capacity: Option<u32>,
    /// Per-probe event counts and failures, summed over CPUs since start.
    pub probe_counters: BTreeMap<&'static str, u64>,
    /// With --probe-stats: each program's runs and average kernel time per run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_cost: Option<BTreeMap<&'static str, ProbeCost>>,
    /// Events that stdout could not take (its reader stopped reading) and were dropped.
    pub events_dropped: u64,
    /// The agent's resident memory now, and its peak since the first poll.
    pub rss_kib: Option<u64>,
    pub peak_rss_kib: Option<u64>,
    /// Its peak through start-up and the first poll: what a memory limit must allow.
    pub startup_peak_rss_kib: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct ProbeCost {
    pub runs: u64,
    pub ns_per_run: f64,
}

/// A connection ended (or, in a dry run, checked and left alone), by hand or by policy.
#[derive(Debug, Serialize)]
pub struct ActionEvent {
    pub ts: String,
    pub action: Mode,
    pub dry_run: bool,
    pub result: Outcome,
    pub error: Option<String>,
    #[serde(flatten)]
    pub identity: Identity,
    /// The alert that triggered a policy action; null for `observer kill`.
    pub reason: Option<Reason>,
}

impl ActionEvent {
    pub fn new(
        at: SystemTime,
        action: Mode,
        dry_run: bool,
        result: ActResult,
        identity: Identity,
        reason: Option<Reason>,
    ) -> Self {
        ActionEvent {
            ts: timestamp(at),
            action,
            dry_run,
            result: result.outcome,
            error: result.error,
            identity,
            reason,
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Started(StartedEvent),
    Alert(AlertEvent),
    AlertCleared(ClearedEvent),
    /// A process that matched `--comm` after the start (e.g. a restarted server).
    TargetStarted {
        ts: String,
        pid: u32,
        comm: String,
    },
    TargetExited {
        ts: String,
        pid: u32,
    },
    Stats(StatsEvent),
    Action(ActionEvent),
    Stopped {
        ts: String,
        reason: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use observer_common::TcpState;

    use crate::snapshot::fixtures::*;

    fn emit(event: &Event) -> Value {
        let mut out = super::super::Output::new(Vec::new());
        out.emit(event).unwrap();
        let text = String::from_utf8(out.into_inner()).unwrap();
        assert!(text.ends_with('\n') && text.matches('\n').count() == 1, "one line: {text}");
        serde_json::from_str(&text).unwrap()
    }

    fn finding(socket: &SocketView) -> Finding {
        Finding {
            target: crate::detect::Target::Socket(socket.cookie()),
            facts: crate::detect::Facts::Idle { idle_ms: 61_000, timeout_ms: 60_000, unread: 0 },
            rule: None,
        }
    }

    #[test]
    fn alert_has_every_contract_field() {
        let socket = socket(7, TcpState::Established, 61_000, 62_000);
        let threads = vec![ThreadInfo {
            tid: 9,
            name: "worker".into(),
            blocked_in: Some("read"),
            blocked_ms: Some(61_000),
            blocked_ms_from: Some("call"),
            last_io_ms: None,
        }];
        let v = emit(&Event::Alert(AlertEvent::new(
            SystemTime::UNIX_EPOCH,
            NOW_NS,
            &finding(&socket),
            Identity::of_socket(&socket),
            Some(&socket),
            threads,
        )));
        assert_eq!(v["event"], "alert");
        assert_eq!(v["ts"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["reason"], "idle");
        assert_eq!((v["pid"].as_u64(), v["fd"].as_u64()), (Some(42), Some(10)));
        assert_eq!(v["comm"], "server");
        assert_eq!(v["cookie"], 7);
        assert_eq!(v["local"], "127.0.0.1:8080");
        assert_eq!(v["remote"], "127.0.0.1:40007");
        assert_eq!(v["state"], "ESTABLISHED");
        assert_eq!(
            (v["idle_ms"].as_u64(), v["last_send_ms"].as_u64()),
            (Some(61_000), Some(61_000))
        );
        assert_eq!(v["last_recv_ms"], 62_000);
        assert_eq!((v["bytes_sent"].as_u64(), v["bytes_received"].as_u64()), (Some(10), Some(20)));
        assert_eq!(v["retransmits"], 0);
        assert_eq!(v["threads"][0]["tid"], 9);
        assert_eq!(v["threads"][0]["name"], "worker");
        assert_eq!(v["threads"][0]["blocked_in"], "read");
        assert_eq!(v["threads"][0]["blocked_ms"], 61_000);
        assert!(v["threads"][0].get("last_io_ms").is_none());
        assert!(v.get("policy_rule").is_none());
        assert_eq!(v["unread_bytes"], 0);
        assert!(v["detail"].as_str().unwrap().contains("61.0s"));
    }

    #[test]
    fn where_a_socket_lives_follows_its_state_and_unknowns_are_left_out() {
        let mut socket = socket(7, TcpState::Established, 0, 0);
        socket.netns = 4026532312;
        socket.workload = Some(std::sync::Arc::new(crate::snapshot::Workload {
            container_id: Some("ab".repeat(32)),
            pod_uid: Some("0d2e6f14-5c7b-4c1a-9b8e-3f2a1d0c9b8a".into()),
            pod: Some("web-0".into()),
            namespace: Some("shop".into()),
            node: Some("node-1".into()),
        }));
        let text = serde_json::to_string(&Identity::of_socket(&socket)).unwrap();
        let expected = format!(
            r#""state":"ESTABLISHED","netns":4026532312,"container_id":"{}","pod_uid":"0d2e6f14-5c7b-4c1a-9b8e-3f2a1d0c9b8a","pod":"web-0","namespace":"shop","node":"node-1"}}"#,
            "ab".repeat(32)
        );
        assert!(text.ends_with(&expected), "{text}");
        // Only the node known: the rest is left out, not null.
        socket.workload = Some(std::sync::Arc::new(crate::snapshot::Workload {
            node: Some("node-1".into()),
            ..Default::default()
        }));
        let v = serde_json::to_value(Identity::of_socket(&socket)).unwrap();
        for absent in ["container_id", "pod_uid", "pod", "namespace"] {
            assert!(v.get(absent).is_none(), "{absent}: {v}");
        }
        assert_eq!(v["node"], "node-1");
        let v = serde_json::to_value(Identity::of_none()).unwrap();
        assert!(v.get("netns").is_none() && v.get("node").is_none(), "{v}");
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        let mut socket = socket(1, TcpState::Established, 0, 0);
        socket.diag.local = "[::1]:8080".parse().unwrap();
        let v = serde_json::to_value(Identity::of_socket(&socket)).unwrap();
        assert_eq!(v["local"], "[::1]:8080");
    }

    #[test]
    fn cleared_and_lifecycle_events() {
        let cleared = Cleared {
            identity: Identity::of_socket(&socket(3, TcpState::Established, 0, 0)),
            reason: Reason::Idle,
            why: ClearWhy::SocketClosed,
        };
        let v = emit(&Event::AlertCleared(ClearedEvent::new(SystemTime::UNIX_EPOCH, cleared)));
        assert_eq!(
            (v["event"].as_str(), v["why"].as_str()),
            (Some("alert_cleared"), Some("socket_closed"))
        );
        assert_eq!((v["reason"].as_str(), v["cookie"].as_u64()), (Some("idle"), Some(3)));
        let v = emit(&Event::TargetExited { ts: "t".into(), pid: 5 });
        assert_eq!((v["event"].as_str(), v["pid"].as_u64()), (Some("target_exited"), Some(5)));
        let v = emit(&Event::Stopped { ts: "t".into(), reason: "signal" });
        assert_eq!(v["event"], "stopped");
    }

    #[test]
    fn action_event_shape() {
        let identity = Identity::of_socket(&socket(4, TcpState::Established, 0, 0));
        let failed = ActResult::fail(Outcome::AlreadyGone, "gone");
        let v = emit(&Event::Action(ActionEvent::new(
            SystemTime::UNIX_EPOCH,
            Mode::Shutdown,
            true,
            failed,
            identity,
            Some(Reason::Idle),
        )));
        assert_eq!((v["event"].as_str(), v["action"].as_str()), (Some("action"), Some("shutdown")));
        assert_eq!(
            (v["dry_run"].as_bool(), v["result"].as_str()),
            (Some(true), Some("already_gone"))
        );
        assert_eq!((v["error"].as_str(), v["reason"].as_str()), (Some("gone"), Some("idle")));
        assert_eq!((v["cookie"].as_u64(), v["fd"].as_u64()), (Some(4), Some(7)));
    }

    #[test]
    fn process_alert_has_null_socket_fields() {
        let process = crate::snapshot::ProcessView {
            pid: 5,
            comm: "srv".into(),
            fds_used: 10,
            fd_limit: Some(11),
            accept_errors: None,
            netns: Some(4026531840),
            ..Default::default()
        };
        let finding = Finding {
            target: crate::detect::Target::Process(5),
            facts: crate::detect::Facts::FdPressure {
                failing: false,
                used: 10,
                limit: Some(11),
                accept_errors: None,
                threshold: 0.9,
            },
            rule: Some("r".into()),
        };
        let identity = Identity::of_process(&process);
        let v = emit(&Event::Alert(AlertEvent::new(
            SystemTime::UNIX_EPOCH,
            NOW_NS,
            &finding,
            identity,
            None,
            vec![],
        )));
        assert_eq!((v["pid"].as_u64(), v["reason"].as_str()), (Some(5), Some("fd_pressure")));
        for field in ["fd", "cookie", "local", "remote", "state", "idle_ms", "bytes_sent"] {
            assert!(v[field].is_null(), "{field} should be null: {v}");
        }
        assert_eq!(v["policy_rule"], "r");
    }
}
