//! What detection remembers between polls about each socket and process: when a state was
//! entered, when sending last made progress, how many bytes moved over the recent window.
//! Kept small and inline: at 100k sockets this is most of the agent's memory.
use observer_common::TcpState;

use crate::snapshot::{ProcessView, SocketView};

const MS: u64 = 1_000_000;

/// Byte counters at one moment, for rates over a window. Times are milliseconds and counters
/// their low 32 bits, compared with wrapping arithmetic: a window spans seconds to minutes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Checkpoint {
    at_ms: u32,
    received: u32,
    acked: u32,
}

/// Room for a window's checkpoints: one every third of a window, so the oldest is always between
/// one and one and a third windows old.
const CHECKPOINTS: usize = 5;

/// Bytes moved over the recent window, as the slow-transfer rule needs them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Window {
    pub span_ms: u64,
    pub received: u64,
    pub acked: u64,
    /// Whether data moved that way in the first half of the window (a trickle, not a burst).
    pub received_early: bool,
    pub acked_early: bool,
}

/// Per-socket memory of past polls, about 100 bytes: times are milliseconds on a wrapping u32
/// clock and the acknowledged-bytes counter its low 32 bits (both compared with wrapping
/// arithmetic over spans of seconds to minutes).
#[derive(Clone, Debug)]
pub struct SocketHistory {
    pub state: TcpState,
    checkpoint_count: u8,
    has_dropped: bool,
    /// When the socket entered `state` (exact from the probes, else a lower bound).
    state_since_ms: u32,
    /// When the peer last acknowledged new data, or the send queue was last empty.
    last_progress_ms: u32,
    bytes_acked: u32,
    /// Listener drops, and when they last grew.
    drops: u32,
    last_drop_ms: u32,
    pub generation: u32,
    /// Oldest first; the oldest is kept at least one rate window old once there is one.
    checkpoints: [Checkpoint; CHECKPOINTS],
}

/// `ms` milliseconds before `now_ns`, on the wrapping millisecond clock.
fn ms_ago(now_ns: u64, ms: u32) -> u32 {
    ms_clock(now_ns).wrapping_sub(ms)
}

impl SocketHistory {
    pub fn new(socket: &SocketView, now_ns: u64, generation: u32) -> Self {
        let tcp = socket.diag.tcp.unwrap_or_default();
        let probe_since = socket
            .diag
            .activity
            .filter(|a| a.state == socket.diag.state as u32 && a.state_since_ns != 0)
            .map(|a| ms_clock(a.state_since_ns));
        let state_since_ms = probe_since.unwrap_or(if socket.diag.state == TcpState::CloseWait {
            // The peer's FIN was its last word: the time since the last ACK from it is a
            // lower bound on the time in CLOSE_WAIT for a socket older than the agent.
            ms_ago(now_ns, tcp.last_ack_recv_ms)
        } else {
            ms_clock(now_ns)
        });
        // Likewise for data waiting to be sent: nothing was acknowledged since the last ACK.
        let last_progress_ms = if socket.diag.wqueue > 0 {
            ms_ago(now_ns, tcp.last_ack_recv_ms)
        } else {
            ms_clock(now_ns)
        };
        SocketHistory {
            state: socket.diag.state,
            checkpoint_count: 1,
            has_dropped: false,
            state_since_ms,
            last_progress_ms,
            bytes_acked: tcp.bytes_acked as u32,
            drops: socket.diag.drops.unwrap_or(0),
            last_drop_ms: 0,
            generation,
            checkpoints: [checkpoint(socket, now_ns); CHECKPOINTS],
        }
    }

    /// Folds in this poll's view. `window_ns` is the rate window (the slow-transfer threshold).
    pub fn update(&mut self, socket: &SocketView, now_ns: u64, window_ns: u64, generation: u32) {
        self.generation = generation;
        let now_ms = ms_clock(now_ns);
        let tcp = socket.diag.tcp.unwrap_or_default();
        if socket.diag.state != self.state {
            self.state = socket.diag.state;
            self.state_since_ms = socket
                .diag
                .activity
                .filter(|a| a.state == socket.diag.state as u32 && a.state_since_ns != 0)
                .map_or(now_ms, |a| ms_clock(a.state_since_ns));
        }
        if tcp.bytes_acked as u32 != self.bytes_acked || socket.diag.wqueue == 0 {
            self.bytes_acked = tcp.bytes_acked as u32;
            self.last_progress_ms = now_ms;
        }
        let drops = socket.diag.drops.unwrap_or(0);
        if drops > self.drops {
            self.has_dropped = true;
            self.last_drop_ms = now_ms;
        }
        self.drops = drops;
        // Checkpoints every third of a window keep rates over [window, 4/3 window] cheaply.
        let (window_ms, step_ms) = ((window_ns / MS) as u32, ((window_ns / MS / 3) as u32).max(1));
        let count = self.checkpoint_count as usize;
        let age = |c: &Checkpoint| now_ms.wrapping_sub(c.at_ms);
        if age(&self.checkpoints[count - 1]) >= step_ms {
            if count == CHECKPOINTS {
                self.checkpoints.copy_within(1.., 0);
                self.checkpoints[CHECKPOINTS - 1] = checkpoint(socket, now_ns);
            } else {
                self.checkpoints[count] = checkpoint(socket, now_ns);
                self.checkpoint_count += 1;
            }
        }
        // Drop the oldest while the next one alone still covers the window.
        while self.checkpoint_count > 2 && age(&self.checkpoints[1]) >= window_ms {
            self.checkpoints.copy_within(1.., 0);
            self.checkpoint_count -= 1;
        }
    }

    /// Bytes moved since the oldest checkpoint, given the counters now.
    pub fn window(&self, now_ns: u64, received: u64, acked: u64) -> Window {
        let now_ms = ms_clock(now_ns);
        let points = &self.checkpoints[..self.checkpoint_count as usize];
        let oldest = points[0];
        let span_ms = now_ms.wrapping_sub(oldest.at_ms);
        let middle = points
            .iter()
            .find(|c| c.at_ms.wrapping_sub(oldest.at_ms) >= span_ms / 2)
            .copied()
            .unwrap_or(oldest);
        Window {
            span_ms: u64::from(span_ms),
            received: u64::from((received as u32).wrapping_sub(oldest.received)),
            acked: u64::from((acked as u32).wrapping_sub(oldest.acked)),
            received_early: middle.received != oldest.received,
            acked_early: middle.acked != oldest.acked,
        }
    }

    pub fn stalled_ms(&self, now_ns: u64) -> u64 {
        u64::from(ms_clock(now_ns).wrapping_sub(self.last_progress_ms))
    }

    pub fn in_state_ms(&self, now_ns: u64) -> u64 {
        u64::from(ms_clock(now_ns).wrapping_sub(self.state_since_ms))
    }

    /// Whether a listener dropped connections within the last `ms`.
    pub fn dropped_within(&self, now_ns: u64, ms: u64) -> bool {
        self.has_dropped && u64::from(ms_clock(now_ns).wrapping_sub(self.last_drop_ms)) < ms
    }

    pub fn drops(&self) -> u32 {
        self.drops
    }
}

/// Milliseconds on the monotonic clock, wrapping every 49 days (compared with wrapping_sub).
fn ms_clock(now_ns: u64) -> u32 {
    (now_ns / MS) as u32
}

fn checkpoint(socket: &SocketView, now_ns: u64) -> Checkpoint {
    let tcp = socket.diag.tcp.unwrap_or_default();
    Checkpoint {
        at_ms: ms_clock(now_ns),
        received: tcp.bytes_received as u32,
        acked: tcp.bytes_acked as u32,
    }
}

/// The shortest span a CPU share is measured over. The kernel counts CPU time in clock ticks
/// (10 ms): over 200 ms polls a share would jump by 0.05 CPUs a tick, and a process near the
/// threshold would flap; over a second it is good to 0.01.
const CPU_WINDOW_NS: u64 = 1_000_000_000;

#[derive(Clone, Debug)]
pub struct ProcessHistory {
    accept_errors: u64,
    pub last_accept_error_ns: Option<u64>,
    /// CPU time used and the snapshot time of the last poll that read it.
    cpu_sample: Option<(u64, u64)>,
    /// CPUs used over the last whole window of readings (1.0: one whole CPU).
    pub cpu: Option<f64>,
    pub generation: u32,
}

impl ProcessHistory {
    pub fn new(process: &ProcessView, now_ns: u64, generation: u32) -> Self {
        ProcessHistory {
            accept_errors: process.accept_errors.unwrap_or(0),
            last_accept_error_ns: None,
            cpu_sample: process.cpu_ns.map(|cpu| (cpu, now_ns)),
            cpu: None,
            generation,
        }
    }

    pub fn update(&mut self, process: &ProcessView, now_ns: u64, generation: u32) {
        self.generation = generation;
        let errors = process.accept_errors.unwrap_or(0);
        if errors > self.accept_errors {
            self.last_accept_error_ns = Some(now_ns);
        }
        self.accept_errors = errors;
        // A rate needs two readings at least CPU_WINDOW_NS apart; until then the last rate
        // stands. The CPU time is read only while the process is near its fd limit, so a gap
        // in readings starts over.
        match (self.cpu_sample, process.cpu_ns) {
            (Some((before, then)), Some(now_cpu)) => {
                if now_ns >= then.saturating_add(CPU_WINDOW_NS) {
                    self.cpu = Some(now_cpu.saturating_sub(before) as f64 / (now_ns - then) as f64);
                    self.cpu_sample = Some((now_cpu, now_ns));
                }
            }
            (_, reading) => {
                self.cpu = None;
                self.cpu_sample = reading.map(|cpu| (cpu, now_ns));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::fixtures::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn progress_is_acknowledged_bytes_or_an_empty_queue() {
        let mut s = socket(1, TcpState::Established, 0, 0);
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
        let mut s = socket(1, TcpState::CloseWait, 0, 0);
        s.diag.tcp.as_mut().unwrap().last_ack_recv_ms = 42_000;
        assert_eq!(SocketHistory::new(&s, NOW_NS, 1).in_state_ms(NOW_NS), 42_000);
    }

    #[test]
    fn state_time_comes_from_the_probes_when_they_saw_the_change() {
        let mut s = socket(1, TcpState::Established, 0, 0);
        let mut h = SocketHistory::new(&s, NOW_NS, 1);
        s.diag.state = TcpState::CloseWait;
        s.diag.activity = Some(crate::kernel::probes::Activity {
            state: TcpState::CloseWait as u32,
            state_since_ns: NOW_NS - 3 * S,
            ..Default::default()
        });
        h.update(&s, NOW_NS, 30 * S, 2);
        assert_eq!(h.in_state_ms(NOW_NS), 3_000);
    }

    #[test]
    fn checkpoints_cover_the_window_and_no_more() {
        let mut s = socket(1, TcpState::Established, 0, 0);
        let mut h = SocketHistory::new(&s, NOW_NS, 1);
        for i in 1..=100u64 {
            s.diag.tcp.as_mut().unwrap().bytes_received = i * 10;
            h.update(&s, NOW_NS + i * S, 8 * S, i as u32 + 1);
        }
        let w = h.window(NOW_NS + 100 * S, 1000, 0);
        assert!((8_000..=10_000).contains(&w.span_ms), "window span {}", w.span_ms);
        assert_eq!(w.received, w.span_ms / 100, "10 bytes a second over the span");
        assert!(w.received_early && !w.acked_early);
        assert!(h.checkpoint_count as usize <= CHECKPOINTS);
    }

    #[test]
    fn cpu_share_is_measured_between_two_readings() {
        let p = |cpu_ns| ProcessView { cpu_ns, ..ProcessView::default() };
        let mut h = ProcessHistory::new(&p(Some(10 * S)), NOW_NS, 1);
        assert_eq!(h.cpu, None, "one reading is no rate");
        h.update(&p(Some(10 * S + S / 2)), NOW_NS + S, 2);
        assert_eq!(h.cpu, Some(0.5));
        h.update(&p(None), NOW_NS + 2 * S, 3);
        assert_eq!(h.cpu, None, "not read this poll");
        h.update(&p(Some(20 * S)), NOW_NS + 3 * S, 4);
        assert_eq!(h.cpu, None, "a gap starts over");
        h.update(&p(Some(22 * S)), NOW_NS + 4 * S, 5);
        assert_eq!(h.cpu, Some(2.0), "two threads spinning");
    }

    #[test]
    fn cpu_share_over_short_polls_waits_for_a_whole_second_and_does_not_flap() {
        const TICK: u64 = 10_000_000;
        let p = |cpu_ns| ProcessView { cpu_ns: Some(cpu_ns), ..ProcessView::default() };
        // 0.5 CPUs, read every 200 ms in whole ticks: 100 ms, then 110 ms, then 90 ms...
        let mut h = ProcessHistory::new(&p(0), NOW_NS, 1);
        let mut cpu = 0;
        let mut shares = Vec::new();
        for poll in 1..=15u64 {
            cpu += if poll % 2 == 0 { 11 * TICK } else { 9 * TICK };
            h.update(&p(cpu), NOW_NS + poll * S / 5, poll as u32 + 1);
            shares.push(h.cpu);
        }
        assert_eq!(shares[..4], [None; 4], "no rate before a whole second");
        for share in shares[4..].iter().map(|s| s.expect("a rate once a second has passed")) {
            assert!((share - 0.5).abs() < 0.011, "within a tick per second: {share}");
        }
    }

    #[test]
    fn counters_and_clock_wrap_safely() {
        let mut s = socket(1, TcpState::Established, 0, 0);
        s.diag.tcp.as_mut().unwrap().bytes_received = u64::from(u32::MAX) - 5;
        let h = SocketHistory::new(&s, NOW_NS, 1);
        let w = h.window(NOW_NS + 2 * S, u64::from(u32::MAX) + 10, 0);
        assert_eq!((w.span_ms, w.received), (2_000, 15));
    }
}
