//! What detection remembers between polls about each socket and process: when a state was
//! entered, when sending last made progress, how many bytes moved over the recent window.
use std::collections::VecDeque;

use crate::snapshot::{ProcessView, SocketView};

const MS: u64 = 1_000_000;
const CLOSE_WAIT: u8 = 8;

/// Byte counters at one moment, for rates over a window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Checkpoint {
    pub at_ns: u64,
    pub received: u64,
    pub acked: u64,
}

#[derive(Clone, Debug)]
pub struct SocketHistory {
    pub state: u8,
    /// When the socket entered `state` (exact from the probes, else a lower bound).
    pub state_since_ns: u64,
    bytes_acked: u64,
    /// When the peer last acknowledged new data, or the send queue was last empty.
    pub last_progress_ns: u64,
    /// Oldest first; the oldest is kept at least one rate window old once there is one.
    pub checkpoints: VecDeque<Checkpoint>,
    /// Listener drops, and when they last grew.
    drops: u32,
    pub last_drop_ns: Option<u64>,
    pub generation: u64,
}

fn ago(now_ns: u64, ms: u32) -> u64 {
    now_ns.saturating_sub(u64::from(ms) * MS)
}

impl SocketHistory {
    pub fn new(socket: &SocketView, now_ns: u64, generation: u64) -> Self {
        let tcp = socket.diag.tcp.unwrap_or_default();
        let probe_since = socket
            .activity
            .filter(|a| a.state == u32::from(socket.diag.state) && a.state_since_ns != 0)
            .map(|a| a.state_since_ns);
        let state_since_ns = probe_since.unwrap_or(if socket.diag.state == CLOSE_WAIT {
            // The peer's FIN was its last word: the time since the last ACK from it is a
            // lower bound on the time in CLOSE_WAIT for a socket older than the agent.
            ago(now_ns, tcp.last_ack_recv_ms)
        } else {
            now_ns
        });
        // Likewise for data waiting to be sent: nothing was acknowledged since the last ACK.
        let last_progress_ns =
            if socket.diag.wqueue > 0 { ago(now_ns, tcp.last_ack_recv_ms) } else { now_ns };
        SocketHistory {
            state: socket.diag.state,
            state_since_ns,
            bytes_acked: tcp.bytes_acked,
            last_progress_ns,
            checkpoints: VecDeque::from([checkpoint(socket, now_ns)]),
            drops: socket.diag.drops.unwrap_or(0),
            last_drop_ns: None,
            generation,
        }
    }

    /// Folds in this poll's view. `window_ns` is the rate window (the slow-transfer threshold).
    pub fn update(&mut self, socket: &SocketView, now_ns: u64, window_ns: u64, generation: u64) {
        self.generation = generation;
        let tcp = socket.diag.tcp.unwrap_or_default();
        if socket.diag.state != self.state {
            self.state = socket.diag.state;
            self.state_since_ns = socket
                .activity
                .filter(|a| a.state == u32::from(socket.diag.state) && a.state_since_ns != 0)
                .map_or(now_ns, |a| a.state_since_ns);
        }
        if tcp.bytes_acked != self.bytes_acked || socket.diag.wqueue == 0 {
            self.bytes_acked = tcp.bytes_acked;
            self.last_progress_ns = now_ns;
        }
        let drops = socket.diag.drops.unwrap_or(0);
        if drops > self.drops {
            self.last_drop_ns = Some(now_ns);
        }
        self.drops = drops;
        // Checkpoints every quarter window keep rates over [window, 1.25 window] cheaply.
        let step = (window_ns / 4).max(1);
        if self.checkpoints.back().is_none_or(|c| now_ns.saturating_sub(c.at_ns) >= step) {
            self.checkpoints.push_back(checkpoint(socket, now_ns));
        }
        while self.checkpoints.len() > 2
            && now_ns.saturating_sub(self.checkpoints[1].at_ns) >= window_ns
        {
            self.checkpoints.pop_front();
        }
    }

    pub fn stalled_ms(&self, now_ns: u64) -> u64 {
        now_ns.saturating_sub(self.last_progress_ns) / MS
    }

    pub fn in_state_ms(&self, now_ns: u64) -> u64 {
        now_ns.saturating_sub(self.state_since_ns) / MS
    }

    pub fn drops(&self) -> u32 {
        self.drops
    }
}

fn checkpoint(socket: &SocketView, now_ns: u64) -> Checkpoint {
    let tcp = socket.diag.tcp.unwrap_or_default();
    Checkpoint { at_ns: now_ns, received: tcp.bytes_received, acked: tcp.bytes_acked }
}

#[derive(Clone, Debug)]
pub struct ProcessHistory {
    accept_errors: u64,
    pub last_accept_error_ns: Option<u64>,
    pub generation: u64,
}

impl ProcessHistory {
    pub fn new(process: &ProcessView, generation: u64) -> Self {
        ProcessHistory {
            accept_errors: process.accept_errors.unwrap_or(0),
            last_accept_error_ns: None,
            generation,
        }
    }

    pub fn update(&mut self, process: &ProcessView, now_ns: u64, generation: u64) {
        self.generation = generation;
        let errors = process.accept_errors.unwrap_or(0);
        if errors > self.accept_errors {
            self.last_accept_error_ns = Some(now_ns);
        }
        self.accept_errors = errors;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::fixtures::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn progress_is_acknowledged_bytes_or_an_empty_queue() {
        let mut s = socket(1, 1, 0, 0);
        s.diag.wqueue = 100;
        s.diag.tcp.as_mut().unwrap().last_ack_recv_ms = 5_000;
        let mut h = SocketHistory::new(&s, NOW_NS, 1);
        assert_eq!(h.stalled_ms(NOW_NS), 5_000, "pre-existing stall counts from the last ACK");
        h.update(&s, NOW_NS + S, 30 * S, 2);
        assert_eq!(h.stalled_ms(NOW_NS + S), 6_000);
        s.diag.tcp.as_mut().unwrap().bytes_acked = 10;
        h.update(&s, NOW_NS + 2 * S, 30 * S, 3);
        assert_eq!(h.stalled_ms(NOW_NS + 2 * S), 0);
    }

    #[test]
    fn close_wait_age_of_a_pre_existing_socket_is_bounded_by_the_last_ack() {
        let mut s = socket(1, CLOSE_WAIT, 0, 0);
        s.diag.tcp.as_mut().unwrap().last_ack_recv_ms = 42_000;
        assert_eq!(SocketHistory::new(&s, NOW_NS, 1).in_state_ms(NOW_NS), 42_000);
    }

    #[test]
    fn state_time_comes_from_the_probes_when_they_saw_the_change() {
        let mut s = socket(1, 1, 0, 0);
        let mut h = SocketHistory::new(&s, NOW_NS, 1);
        s.diag.state = CLOSE_WAIT;
        s.activity = Some(observer_common::SockActivity {
            state: u32::from(CLOSE_WAIT),
            state_since_ns: NOW_NS - 3 * S,
            ..Default::default()
        });
        h.update(&s, NOW_NS, 30 * S, 2);
        assert_eq!(h.in_state_ms(NOW_NS), 3_000);
    }

    #[test]
    fn checkpoints_cover_the_window_and_no_more() {
        let s = socket(1, 1, 0, 0);
        let mut h = SocketHistory::new(&s, NOW_NS, 1);
        for i in 1..=100 {
            h.update(&s, NOW_NS + i * S, 8 * S, i + 1);
        }
        let oldest = h.checkpoints.front().unwrap().at_ns;
        let span = NOW_NS + 100 * S - oldest;
        assert!((8 * S..=10 * S).contains(&span), "window span {span}");
        assert!(h.checkpoints.len() <= 6, "{}", h.checkpoints.len());
    }
}
