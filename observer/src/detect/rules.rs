//! The rules: each looks at one socket (or process) with its history and the thresholds that
//! apply to it, and says whether it is stuck, why, and with which numbers.
//!
//! Rules run for every socket every poll, so a verdict is a small value ([`Facts`]); the words
//! and the JSON numbers are rendered only when an alert is actually raised.
use serde_json::{Map, Value, json};

use observer_common::{Direction, TcpState};

use super::{
    history::{ProcessHistory, SocketHistory},
    reason::Reason,
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

/// One rule's verdict, with the numbers that back it.
#[derive(Clone, Debug, PartialEq)]
pub enum Facts {
    Idle {
        idle_ms: u64,
        timeout_ms: u64,
        unread: u32,
    },
    SlowTransfer {
        receiving: bool,
        bytes: u64,
        window_ms: u64,
        rate: f64,
        min_rate: f64,
    },
    BlockedSend {
        stalled_ms: u64,
        queued: u32,
        unsent: u32,
        peer_window: u32,
        probes: u8,
    },
    Retransmitting {
        stalled_ms: u64,
        in_a_row: u8,
        unacked: u32,
        rto_ms: u32,
        give_up_ms: u64,
        retries2: u32,
    },
    CloseWait {
        close_wait_ms: u64,
        unread: u32,
    },
    AcceptQueueOverflow {
        full: bool,
        queued: u32,
        limit: u32,
        dropped: u32,
    },
    KeepaliveMissing {
        silent_ms: u64,
        keepalive: bool,
        next_probe_ms: u32,
        limit_ms: u64,
    },
    FdPressure {
        failing: bool,
        used: u32,
        limit: Option<u64>,
        accept_errors: Option<u64>,
        threshold: f64,
    },
    ResetUnread(Box<ResetView>),
}

fn secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

impl Facts {
    pub fn reason(&self) -> Reason {
        match self {
            Facts::Idle { .. } => Reason::Idle,
            Facts::SlowTransfer { .. } => Reason::SlowTransfer,
            Facts::BlockedSend { .. } => Reason::BlockedSend,
            Facts::Retransmitting { .. } => Reason::Retransmitting,
            Facts::CloseWait { .. } => Reason::CloseWait,
            Facts::AcceptQueueOverflow { .. } => Reason::AcceptQueueOverflow,
            Facts::KeepaliveMissing { .. } => Reason::KeepaliveMissing,
            Facts::FdPressure { .. } => Reason::FdPressure,
            Facts::ResetUnread(_) => Reason::ResetUnread,
        }
    }

    /// The reason-specific numbers of the alert.
    pub fn metrics(&self) -> Map<String, Value> {
        object(match self {
            Facts::Idle { unread, .. } => json!({ "unread_bytes": unread }),
            Facts::SlowTransfer { receiving, bytes, window_ms, rate, min_rate } => json!({
                "direction": if *receiving { "receiving" } else { "sending" },
                "rate_bytes_per_sec": (rate * 10.0).round() / 10.0,
                "window_bytes": bytes,
                "window_ms": window_ms,
                "min_rate_bytes_per_sec": min_rate,
            }),
            Facts::BlockedSend { stalled_ms, queued, unsent, peer_window, probes } => json!({
                "stalled_ms": stalled_ms,
                "send_queue_bytes": queued,
                "unsent_bytes": unsent,
                "peer_window": peer_window,
                "zero_window_probes": probes,
            }),
            Facts::Retransmitting { stalled_ms, in_a_row, unacked, rto_ms, give_up_ms, .. } => {
                json!({
                    "stalled_ms": stalled_ms,
                    "retransmits_in_a_row": in_a_row,
                    "unacked_segments": unacked,
                    "rto_ms": rto_ms,
                    "gives_up_in_ms": give_up_ms.saturating_sub(*stalled_ms),
                })
            }
            Facts::CloseWait { close_wait_ms, unread } => {
                json!({ "close_wait_ms": close_wait_ms, "unread_bytes": unread })
            }
            Facts::AcceptQueueOverflow { queued, limit, dropped, .. } => {
                json!({ "queue_length": queued, "queue_limit": limit, "dropped": dropped })
            }
            Facts::KeepaliveMissing { silent_ms, keepalive, next_probe_ms, limit_ms } => json!({
                "silent_ms": silent_ms,
                "keepalive": keepalive,
                "keepalive_next_probe_ms": keepalive.then_some(next_probe_ms),
                "middlebox_idle_ms": limit_ms,
            }),
            Facts::FdPressure { used, limit, accept_errors, .. } => {
                json!({ "fds_used": used, "fds_limit": limit, "accept_errors": accept_errors })
            }
            Facts::ResetUnread(r) => json!({
                "direction": match r.direction { Direction::Send => "sent", Direction::Recv => "received" },
                "unread_bytes": r.unread,
                "unsent_bytes": r.unsent,
            }),
        })
    }

    /// One sentence for the operator: what is happening and what to do.
    pub fn detail(&self) -> String {
        match self {
            Facts::Idle { idle_ms, timeout_ms, unread } if *unread > 0 => format!(
                "No data moved for {} (idle timeout {}), and {unread} received bytes sit unread: the \
                 application has stopped reading this connection.",
                secs(*idle_ms),
                secs(*timeout_ms)
            ),
            Facts::Idle { idle_ms, timeout_ms, .. } => format!(
                "No data sent or received for {} (idle timeout {}): the peer has gone quiet and \
                 whoever reads this connection waits for it; set a read timeout or end it.",
                secs(*idle_ms),
                secs(*timeout_ms)
            ),
            Facts::SlowTransfer { receiving: true, bytes, window_ms, rate, min_rate } => format!(
                "Only {bytes} bytes arrived in the last {} ({rate:.1} B/s, below {min_rate} B/s) and \
                 nothing was sent back: a slow-loris client is holding this connection and its \
                 thread while the request never completes. Enforce a deadline for the whole request.",
                secs(*window_ms)
            ),
            Facts::SlowTransfer { bytes, window_ms, rate, min_rate, .. } => format!(
                "The peer took only {bytes} bytes in the last {} ({rate:.1} B/s, below {min_rate} \
                 B/s) with more waiting to be sent: a slow reader is holding this connection and \
                 the thread writing to it. Enforce a deadline for the whole response.",
                secs(*window_ms)
            ),
            Facts::BlockedSend { stalled_ms, queued, peer_window, .. } => format!(
                "{queued} bytes wait to be sent and the peer has taken none for {} (its receive \
                 window is {peer_window} bytes): it stopped reading, so a thread writing here is \
                 blocked. Use a write timeout or end the connection.",
                secs(*stalled_ms)
            ),
            Facts::Retransmitting { stalled_ms, in_a_row, give_up_ms, retries2, .. } => format!(
                "The peer has acknowledged nothing for {} and the kernel has retransmitted \
                 {in_a_row} times in a row: it vanished mid-transfer. The kernel keeps trying for \
                 about {} in all (tcp_retries2={retries2}), roughly {} more, while a writer stays \
                 blocked.",
                secs(*stalled_ms),
                secs(*give_up_ms),
                secs(give_up_ms.saturating_sub(*stalled_ms))
            ),
            Facts::CloseWait { close_wait_ms, .. } => format!(
                "The peer closed this connection {} ago and the application never called close(): \
                 the socket, its fd and whatever thread serves it are leaked. Look for a code path \
                 that stops reading at EOF without closing.",
                secs(*close_wait_ms)
            ),
            Facts::AcceptQueueOverflow { full: true, queued, limit, .. } => format!(
                "The accept queue is full ({queued} waiting, limit {limit}): new connections are \
                 dropped and clients see SYN retries or resets. The accept loop is stalled or the \
                 listen() backlog is too small."
            ),
            Facts::AcceptQueueOverflow { limit, dropped, .. } => format!(
                "The listener dropped connections in the last {} because its accept queue \
                 overflowed ({dropped} dropped since it opened; limit {limit}).",
                secs(RECENT_MS)
            ),
            Facts::KeepaliveMissing { silent_ms, keepalive: true, next_probe_ms, limit_ms } => {
                format!(
                    "Nothing crossed this connection for {} and its keepalive probe is not due for \
                 another {}: a load balancer or NAT that forgets idle flows after {} will drop it \
                 silently. Lower TCP_KEEPIDLE below that.",
                    secs(*silent_ms),
                    secs(u64::from(*next_probe_ms)),
                    secs(*limit_ms)
                )
            }
            Facts::KeepaliveMissing { silent_ms, limit_ms, .. } => format!(
                "Nothing crossed this connection for {} and TCP keepalive is off: a load balancer \
                 or NAT that forgets idle flows after {} (AWS NLB 350 s, Azure 4 min) will drop it \
                 silently and the next request on it will hang. Enable SO_KEEPALIVE with \
                 TCP_KEEPIDLE below that.",
                secs(*silent_ms),
                secs(*limit_ms)
            ),
            Facts::FdPressure { failing, used, limit, threshold, .. } => {
                let limit = limit.map_or("no limit".to_owned(), |l| l.to_string());
                if *failing {
                    format!(
                        "accept() is failing with EMFILE/ENFILE ({used} of {limit} fds in use): \
                         new connections wait in the accept queue until they are dropped. Raise \
                         the limit (ulimit -n, LimitNOFILE=) or find the fd leak."
                    )
                } else {
                    format!(
                        "{used} of {limit} file descriptors in use (threshold {:.0}%): accept() \
                         will soon fail with EMFILE and new connections will be refused. Raise \
                         the limit or find the fd leak.",
                        threshold * 100.0
                    )
                }
            }
            Facts::ResetUnread(r) if r.direction == Direction::Send && r.unread > 0 => format!(
                "The application closed this connection with {} received bytes unread, so the \
                 kernel sent a reset instead of a FIN: the peer may lose the response it had not \
                 read yet (lingering close). Read the request fully, or shutdown(SHUT_WR) and \
                 drain, before close().",
                r.unread
            ),
            Facts::ResetUnread(r) if r.direction == Direction::Send => format!(
                "This side reset the connection with {} bytes not yet acknowledged by the peer: \
                 they are lost (an abortive close, e.g. SO_LINGER 0).",
                r.unsent
            ),
            Facts::ResetUnread(r) => format!(
                "The peer reset the connection with {} bytes unacknowledged and {} unread here: \
                 that data is lost and the application will see ECONNRESET.",
                r.unsent, r.unread
            ),
        }
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

    #[test]
    fn every_verdict_renders_words_and_numbers() {
        let cases = [
            Facts::Idle { idle_ms: 61_000, timeout_ms: 60_000, unread: 0 },
            Facts::Idle { idle_ms: 61_000, timeout_ms: 60_000, unread: 3 },
            Facts::SlowTransfer {
                receiving: true,
                bytes: 9,
                window_ms: 30_000,
                rate: 0.3,
                min_rate: 64.0,
            },
            Facts::BlockedSend {
                stalled_ms: 31_000,
                queued: 9,
                unsent: 5,
                peer_window: 0,
                probes: 2,
            },
            Facts::Retransmitting {
                stalled_ms: 31_000,
                in_a_row: 4,
                unacked: 3,
                rto_ms: 3200,
                give_up_ms: 924_600,
                retries2: 15,
            },
            Facts::CloseWait { close_wait_ms: 61_000, unread: 0 },
            Facts::AcceptQueueOverflow { full: true, queued: 2, limit: 1, dropped: 0 },
            Facts::KeepaliveMissing {
                silent_ms: 301_000,
                keepalive: false,
                next_probe_ms: 0,
                limit_ms: 300_000,
            },
            Facts::FdPressure {
                failing: true,
                used: 32,
                limit: Some(32),
                accept_errors: Some(4),
                threshold: 0.9,
            },
        ];
        for f in cases {
            assert!(f.detail().ends_with('.'), "{:?}: {}", f.reason(), f.detail());
            assert!(!f.metrics().is_empty(), "{:?}", f.reason());
        }
    }
}
