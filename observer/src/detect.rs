//! Detection rules: pure functions from a snapshot to findings ("this socket is stuck, and why").
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::snapshot::{Snapshot, SocketView};

const TCP_ESTABLISHED: u8 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// An established connection that moved no data either way for the idle timeout.
    Idle,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::Idle => "idle",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Rules {
    pub idle_timeout: Duration,
}

/// One socket that one rule considers stuck right now.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub cookie: u64,
    pub reason: Reason,
    /// One sentence for the operator.
    pub detail: String,
    /// Numbers specific to the reason, merged into the alert.
    pub metrics: Map<String, Value>,
}

pub fn detect(snapshot: &Snapshot, rules: &Rules) -> Vec<Finding> {
    let mut findings: Vec<Finding> = snapshot
        .sockets
        .iter()
        .filter_map(|s| idle(s, snapshot.taken_ns, rules))
        .collect();
    findings.sort_by_key(|f| (f.cookie, f.reason));
    findings
}

fn idle(socket: &SocketView, now_ns: u64, rules: &Rules) -> Option<Finding> {
    if socket.diag.state != TCP_ESTABLISHED {
        return None;
    }
    let idle_ms = socket.idle_ms(now_ns)?;
    let timeout_ms = rules.idle_timeout.as_millis() as u64;
    if idle_ms < timeout_ms {
        return None;
    }
    Some(Finding {
        cookie: socket.cookie(),
        reason: Reason::Idle,
        detail: format!(
            "No data sent or received for {} (idle timeout {}); whoever reads this connection \
             is waiting on a peer that has gone quiet.",
            seconds(idle_ms),
            seconds(timeout_ms)
        ),
        // idle_ms is part of every alert already.
        metrics: Map::new(),
    })
}

fn seconds(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::fixtures::*;

    fn rules() -> Rules {
        Rules {
            idle_timeout: Duration::from_secs(60),
        }
    }

    fn snapshot(sockets: Vec<SocketView>) -> Snapshot {
        Snapshot {
            taken_ns: NOW_NS,
            sockets,
        }
    }

    #[test]
    fn idle_established_socket_is_found_with_its_idle_time() {
        let found = detect(&snapshot(vec![socket(1, 1, 61_000, 65_000)]), &rules());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].reason, Reason::Idle);
        assert!(found[0].detail.contains("61.0s"), "{}", found[0].detail);
    }

    #[test]
    fn recent_traffic_in_either_direction_is_not_idle() {
        let s = snapshot(vec![
            socket(1, 1, 61_000, 59_999),
            socket(2, 1, 100, 90_000),
        ]);
        assert!(detect(&s, &rules()).is_empty());
    }

    #[test]
    fn exactly_at_the_timeout_is_idle() {
        assert_eq!(
            detect(&snapshot(vec![socket(1, 1, 60_000, 60_000)]), &rules()).len(),
            1
        );
    }

    #[test]
    fn only_established_sockets_can_be_idle() {
        let s = snapshot(vec![
            socket(1, 10, 999_000, 999_000),
            socket(2, 8, 999_000, 999_000),
        ]);
        assert!(detect(&s, &rules()).is_empty());
    }

    #[test]
    fn recent_application_read_seen_by_probes_keeps_socket_active() {
        let mut s = socket(1, 1, 120_000, 120_000);
        s.activity = Some(observer_common::SockActivity {
            last_recv_ns: NOW_NS - 1_000_000_000,
            ..Default::default()
        });
        assert!(detect(&snapshot(vec![s]), &rules()).is_empty());
    }
}
