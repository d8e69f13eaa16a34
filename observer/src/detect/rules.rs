//! The rules: each looks at one socket (or process) with its history and the thresholds that
//! apply to it, and says whether it is stuck, why, and with which numbers.
//!
//! Rules run for every socket every poll, so a verdict is a small value ([`Facts`]); the words
//! and the JSON numbers are rendered only when an alert is actually raised.
use observer_common::TcpState;

pub use super::facts::{Closing, Facts};
use super::{
    history::{ProcessHistory, SocketHistory},
    thresholds::Thresholds,
};
use crate::snapshot::{ProcessView, ResetView, SocketView};

const MS: u64 = 1_000_000;
/// Accept errors and listener drops count as "happening now" for this long after the last one.
pub const RECENT_MS: u64 = 10_000;

const TIMER_KEEPALIVE: u8 = 2;

/// Kernel settings the rules quote.
#[derive(Clone, Copy, Debug)]
pub struct KernelSettings {
    /// net.ipv4.tcp_retries2: how many retransmission timeouts before the kernel gives up.
    pub tcp_retries2: u32,
}

impl Default for KernelSettings {
    fn default() -> Self {
        KernelSettings { tcp_retries2: 15 }
    }
}

pub struct SocketCtx<'a> {
    pub now_ns: u64,
    pub socket: &'a SocketView,
    pub history: &'a SocketHistory,
    pub t: &'a Thresholds,
    pub kernel: KernelSettings,
}

fn ms(d: std::time::Duration) -> u64 {
    d.as_millis() as u64
}

/// The span byte rates are measured over (what `SocketHistory` keeps checkpoints for).
pub fn rate_window_ns(t: &Thresholds) -> u64 {
    t.slow_after.as_nanos() as u64
}

/// Every rule's verdict on one socket, at most one per reason.
pub fn socket_rules(c: &SocketCtx, mut found: impl FnMut(Facts)) {
    let verdicts = [
        idle(c),
        slow_transfer(c),
        blocked_send(c),
        retransmitting(c),
        close_wait(c),
        accept_queue_overflow(c),
        keepalive_missing(c),
        connect_stalled(c),
        closing_stalled(c),
    ];
    verdicts.into_iter().flatten().for_each(&mut found);
}

fn idle(c: &SocketCtx) -> Option<Facts> {
    let d = &c.socket.diag;
    // Data waiting to go out is a send-side stall (blocked_send, retransmitting), not silence.
    if d.state != TcpState::Established || d.wqueue > 0 {
        return None;
    }
    let idle_ms = c.socket.idle_ms(c.now_ns)?;
    let timeout_ms = ms(c.t.idle_timeout);
    (idle_ms >= timeout_ms).then_some(Facts::Idle { idle_ms, timeout_ms, unread: d.rqueue })
}

fn slow_transfer(c: &SocketCtx) -> Option<Facts> {
    let d = &c.socket.diag;
    let tcp = d.tcp?;
    if d.state != TcpState::Established {
        return None;
    }
    let window_ms = ms(c.t.slow_after);
    let w = c.history.window(c.now_ns, tcp.bytes_received, tcp.bytes_acked);
    if w.span_ms < window_ms || w.span_ms == 0 {
        return None;
    }
    // A trickle one way while the other side answers nothing: the other side is waiting for
    // the transfer to complete. It must span the window: data in its first half and lately.
    let half = window_ms / 2;
    let (receiving, bytes, sustained) = if w.received > 0 && w.acked == 0 {
        (true, w.received, w.received_early && u64::from(tcp.last_data_recv_ms) < half)
    } else if w.acked > 0 && w.received == 0 && d.wqueue > 0 {
        (false, w.acked, w.acked_early && c.history.stalled_ms(c.now_ns) < half)
    } else {
        return None;
    };
    let rate = bytes as f64 / (w.span_ms as f64 / 1000.0);
    (sustained && rate < c.t.slow_min_rate.0).then_some(Facts::SlowTransfer {
        receiving,
        bytes,
        window_ms: w.span_ms,
        rate,
        min_rate: c.t.slow_min_rate.0,
    })
}

/// How long the peer has acknowledged nothing new, if that is at least `timeout`.
fn stalled_longer_than(c: &SocketCtx, timeout: std::time::Duration) -> Option<u64> {
    let stalled_ms = c.history.stalled_ms(c.now_ns);
    (stalled_ms >= ms(timeout)).then_some(stalled_ms)
}

fn blocked_send(c: &SocketCtx) -> Option<Facts> {
    let d = &c.socket.diag;
    let tcp = d.tcp?;
    // A peer that answers (no retransmission timeouts) but takes nothing: window closed.
    if !matches!(d.state, TcpState::Established | TcpState::CloseWait)
        || d.wqueue == 0
        || tcp.retransmits > 0
    {
        return None;
    }
    let stalled_ms = stalled_longer_than(c, c.t.blocked_timeout)?;
    Some(Facts::BlockedSend {
        stalled_ms,
        queued: d.wqueue,
        unsent: tcp.notsent_bytes,
        peer_window: tcp.snd_wnd,
        probes: tcp.probes,
    })
}

/// How long the kernel retransmits before giving up, after net.ipv4.tcp_retries2 timeouts
/// (the kernel's own model: doubling from 200 ms, capped at 120 s).
pub fn retransmit_give_up_ms(retries2: u32) -> u64 {
    const RTO_MIN_MS: u64 = 200;
    const RTO_MAX_MS: u64 = 120_000;
    const LINEAR_AFTER: u32 = 9; // ilog2(RTO_MAX / RTO_MIN)
    if retries2 <= LINEAR_AFTER {
        ((2u64 << retries2) - 1) * RTO_MIN_MS
    } else {
        ((2u64 << LINEAR_AFTER) - 1) * RTO_MIN_MS + u64::from(retries2 - LINEAR_AFTER) * RTO_MAX_MS
    }
}

fn retransmitting(c: &SocketCtx) -> Option<Facts> {
    let d = &c.socket.diag;
    let tcp = d.tcp?;
    if !matches!(
        d.state,
        TcpState::Established
            | TcpState::CloseWait
            | TcpState::FinWait1
            | TcpState::Closing
            | TcpState::LastAck
    ) || tcp.unacked == 0
        || tcp.retransmits == 0
    {
        return None;
    }
    let stalled_ms = stalled_longer_than(c, c.t.retrans_timeout)?;
    Some(Facts::Retransmitting {
        stalled_ms,
        in_a_row: tcp.retransmits,
        unacked: tcp.unacked,
        rto_ms: tcp.rto_us / 1000,
        give_up_ms: retransmit_give_up_ms(c.kernel.tcp_retries2),
        retries2: c.kernel.tcp_retries2,
    })
}

fn close_wait(c: &SocketCtx) -> Option<Facts> {
    let d = &c.socket.diag;
    if d.state != TcpState::CloseWait {
        return None;
    }
    let close_wait_ms = c.history.in_state_ms(c.now_ns);
    (close_wait_ms >= ms(c.t.close_wait_timeout))
        .then_some(Facts::CloseWait { close_wait_ms, unread: d.rqueue })
}

fn accept_queue_overflow(c: &SocketCtx) -> Option<Facts> {
    let d = &c.socket.diag;
    if d.state != TcpState::Listen {
        return None;
    }
    // For a listener, rqueue is the accept queue's length and wqueue its limit.
    let full = d.rqueue > d.wqueue;
    let recent_drop = c.history.dropped_within(c.now_ns, RECENT_MS);
    (full || recent_drop).then_some(Facts::AcceptQueueOverflow {
        full,
        queued: d.rqueue,
        limit: d.wqueue,
        dropped: c.history.drops(),
    })
}

fn keepalive_missing(c: &SocketCtx) -> Option<Facts> {
    let d = &c.socket.diag;
    let tcp = d.tcp?;
    // No middlebox sits on a loopback path.
    let remote = match d.remote.ip() {
        std::net::IpAddr::V6(v6) => {
            v6.to_ipv4_mapped().map_or(std::net::IpAddr::V6(v6), Into::into)
        }
        v4 => v4,
    };
    if d.state != TcpState::Established || d.wqueue > 0 || remote.is_loopback() {
        return None;
    }
    let limit_ms = ms(c.t.middlebox_idle);
    let silent_ms = c.socket.idle_ms(c.now_ns)?.min(u64::from(tcp.last_ack_recv_ms));
    if silent_ms < limit_ms {
        return None;
    }
    let keepalive = d.timer == TIMER_KEEPALIVE;
    // Keepalive on and probing unanswered: the peer is gone, and keepalive will end it.
    if keepalive && tcp.probes > 0 {
        return None;
    }
    Some(Facts::KeepaliveMissing {
        silent_ms,
        keepalive,
        next_probe_ms: d.timer_expires_ms,
        limit_ms,
    })
}

pub fn fd_pressure(
    p: &ProcessView,
    h: &ProcessHistory,
    now_ns: u64,
    t: &Thresholds,
) -> Option<Facts> {
    let near =
        p.fd_limit.is_some_and(|l| f64::from(p.fds_used) >= (t.fd_threshold.0 * l as f64).ceil());
    let failing =
        h.last_accept_error_ns.is_some_and(|at| now_ns.saturating_sub(at) / MS < RECENT_MS);
    (near || failing).then_some(Facts::FdPressure {
        failing,
        used: p.fds_used,
        limit: p.fd_limit,
        accept_errors: p.accept_errors,
        threshold: t.fd_threshold.0,
    })
}

fn connect_stalled(c: &SocketCtx) -> Option<Facts> {
    if c.socket.diag.state != TcpState::SynSent {
        return None;
    }
    let connect_ms = c.history.in_state_ms(c.now_ns);
    let timeout_ms = ms(c.t.connect_timeout);
    // Every retransmission of a socket still in SYN_SENT is a SYN's.
    let syn_retransmits = c.socket.diag.tcp.map_or(0, |t| t.total_retrans);
    (connect_ms >= timeout_ms).then_some(Facts::ConnectStalled {
        connect_ms,
        timeout_ms,
        syn_retransmits,
    })
}

fn closing_stalled(c: &SocketCtx) -> Option<Facts> {
    let d = &c.socket.diag;
    let tcp = d.tcp.unwrap_or_default();
    let timeout_ms = ms(c.t.closing_timeout);
    let orphaned = d.inode == 0 && c.socket.owner.is_none();
    // Still making progress is not stuck: a FIN_WAIT2 peer still sending (a half-close it
    // uses), or an orphan still draining its response to a slow but reading peer. A closed
    // socket in FIN_WAIT2 has nothing left to send and the kernel ends it after
    // tcp_fin_timeout: only one the application still holds (after shutdown) is stuck.
    let silent = match d.state {
        TcpState::FinWait2 if orphaned => return None,
        TcpState::FinWait2 => c.socket.last_recv_ms(c.now_ns).is_none_or(|ms| ms >= timeout_ms),
        TcpState::FinWait1 | TcpState::LastAck | TcpState::Closing => {
            c.history.stalled_ms(c.now_ns) >= timeout_ms
        }
        _ => return None,
    };
    let closing_ms = c.history.in_state_ms(c.now_ns);
    (silent && closing_ms >= timeout_ms).then(|| {
        Facts::ClosingStalled(Box::new(Closing {
            state: d.state,
            closing_ms,
            timeout_ms,
            orphaned,
            unsent: tcp.notsent_bytes,
            queued: d.wqueue,
            peer_window: tcp.snd_wnd,
            retransmits: tcp.retransmits,
        }))
    })
}

/// A process at its fd limit, with connections waiting to be accepted, using CPU: accept()
/// fails with EMFILE and the loop around it retries at once.
pub fn accept_spinning(p: &ProcessView, h: &ProcessHistory, t: &Thresholds) -> Option<Facts> {
    let at_limit = p.fd_limit.is_some_and(|l| u64::from(p.fds_used) >= l);
    let cpu = h.cpu?;
    (at_limit && p.listen_queue > 0 && cpu >= t.spin_cpu.0).then_some(Facts::AcceptSpinning {
        cpu,
        queued: p.listen_queue,
        used: p.fds_used,
        limit: p.fd_limit,
        accept_errors: p.accept_errors,
    })
}

pub fn reset_unread(r: &ResetView) -> Facts {
    Facts::ResetUnread(Box::new(r.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_give_up_time_for_default_retries() {
        // The well-known ~924.6 s for tcp_retries2=15.
        assert_eq!(retransmit_give_up_ms(15), 924_600);
        assert_eq!(retransmit_give_up_ms(3), 3_000);
    }
}
