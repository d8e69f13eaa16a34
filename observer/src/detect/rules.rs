//! The rules: each looks at one socket (or process) with its history and the thresholds that
//! apply to it, and says whether it is stuck, why, and with which numbers.
use serde_json::{Map, Value, json};

use super::history::{ProcessHistory, SocketHistory};
use crate::{
    policy::Thresholds,
    reason::Reason,
    snapshot::{ProcessView, ResetView, SocketView},
};

const MS: u64 = 1_000_000;
/// Accept errors and listener drops count as "happening now" for this long after the last one.
pub const RECENT_MS: u64 = 10_000;

const ESTABLISHED: u8 = 1;
const FIN_WAIT1: u8 = 4;
const CLOSE_WAIT: u8 = 8;
const LAST_ACK: u8 = 9;
const LISTEN: u8 = 10;
const CLOSING: u8 = 11;
const TIMER_KEEPALIVE: u8 = 2;

/// Kernel settings the rules quote.
#[derive(Clone, Copy, Debug)]
pub struct KernelFacts {
    /// net.ipv4.tcp_retries2: how many retransmission timeouts before the kernel gives up.
    pub tcp_retries2: u32,
}

impl Default for KernelFacts {
    fn default() -> Self {
        KernelFacts { tcp_retries2: 15 }
    }
}

/// One rule's verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    pub reason: Reason,
    pub detail: String,
    pub metrics: Map<String, Value>,
}

fn hit(reason: Reason, detail: String, metrics: Value) -> Option<Hit> {
    Some(Hit { reason, detail, metrics: object(metrics) })
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

pub struct SocketCtx<'a> {
    pub now_ns: u64,
    pub socket: &'a SocketView,
    pub history: &'a SocketHistory,
    pub t: &'a Thresholds,
    pub facts: KernelFacts,
}

impl SocketCtx<'_> {
    fn ms(d: std::time::Duration) -> u64 {
        d.as_millis() as u64
    }
}

pub fn socket_rules(c: &SocketCtx) -> impl Iterator<Item = Hit> {
    [
        idle(c),
        slow_transfer(c),
        blocked_send(c),
        retransmitting(c),
        close_wait(c),
        accept_queue_overflow(c),
        keepalive_missing(c),
    ]
    .into_iter()
    .flatten()
}

fn secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

fn idle(c: &SocketCtx) -> Option<Hit> {
    let d = &c.socket.diag;
    // Data waiting to go out is a send-side stall (blocked_send, retransmitting), not silence.
    if d.state != ESTABLISHED || d.wqueue > 0 {
        return None;
    }
    let idle_ms = c.socket.idle_ms(c.now_ns)?;
    let timeout_ms = SocketCtx::ms(c.t.idle_timeout);
    if idle_ms < timeout_ms {
        return None;
    }
    let detail = if d.rqueue > 0 {
        format!(
            "No data moved for {} (idle timeout {}), and {} received bytes sit unread: the \
             application has stopped reading this connection.",
            secs(idle_ms),
            secs(timeout_ms),
            d.rqueue
        )
    } else {
        format!(
            "No data sent or received for {} (idle timeout {}): the peer has gone quiet and \
             whoever reads this connection waits for it; set a read timeout or end it.",
            secs(idle_ms),
            secs(timeout_ms)
        )
    };
    hit(Reason::Idle, detail, json!({ "unread_bytes": d.rqueue }))
}

fn slow_transfer(c: &SocketCtx) -> Option<Hit> {
    let d = &c.socket.diag;
    let tcp = d.tcp?;
    if d.state != ESTABLISHED {
        return None;
    }
    let window_ns = c.t.slow_after.as_nanos() as u64;
    let oldest = *c.history.checkpoints.front()?;
    let span_ns = c.now_ns.saturating_sub(oldest.at_ns);
    if span_ns < window_ns || span_ns == 0 {
        return None;
    }
    let middle = c
        .history
        .checkpoints
        .iter()
        .find(|cp| cp.at_ns >= oldest.at_ns + span_ns / 2)
        .copied()
        .unwrap_or(oldest);
    let received = tcp.bytes_received.saturating_sub(oldest.received);
    let acked = tcp.bytes_acked.saturating_sub(oldest.acked);
    let half_window_ms = window_ns / MS / 2;
    // A trickle one way while the other side answers nothing: the other side is waiting for
    // the transfer to complete. It must span the window: data in its first half and lately.
    let (direction, bytes, sustained) = if received > 0 && acked == 0 {
        let lately = u64::from(tcp.last_data_recv_ms) < half_window_ms;
        ("receiving", received, middle.received > oldest.received && lately)
    } else if acked > 0 && received == 0 && d.wqueue > 0 {
        let lately = c.history.stalled_ms(c.now_ns) < half_window_ms;
        ("sending", acked, middle.acked > oldest.acked && lately)
    } else {
        return None;
    };
    let rate = bytes as f64 / (span_ns as f64 / 1e9);
    if !sustained || rate >= c.t.slow_min_rate {
        return None;
    }
    let window_ms = span_ns / MS;
    let detail = if direction == "receiving" {
        format!(
            "Only {bytes} bytes arrived in the last {} ({rate:.1} B/s, below {} B/s) and nothing \
             was sent back: a slow-loris client is holding this connection and its thread while \
             the request never completes. Enforce a deadline for the whole request.",
            secs(window_ms),
            c.t.slow_min_rate
        )
    } else {
        format!(
            "The peer took only {bytes} bytes in the last {} ({rate:.1} B/s, below {} B/s) with \
             more waiting to be sent: a slow reader is holding this connection and the thread \
             writing to it. Enforce a deadline for the whole response.",
            secs(window_ms),
            c.t.slow_min_rate
        )
    };
    hit(
        Reason::SlowTransfer,
        detail,
        json!({
            "direction": direction,
            "rate_bytes_per_sec": (rate * 10.0).round() / 10.0,
            "window_bytes": bytes,
            "window_ms": window_ms,
            "min_rate_bytes_per_sec": c.t.slow_min_rate,
        }),
    )
}

fn blocked_send(c: &SocketCtx) -> Option<Hit> {
    let d = &c.socket.diag;
    let tcp = d.tcp?;
    // A peer that answers (no retransmission timeouts) but takes nothing: window closed.
    if !matches!(d.state, ESTABLISHED | CLOSE_WAIT) || d.wqueue == 0 || tcp.retransmits > 0 {
        return None;
    }
    let stalled_ms = c.history.stalled_ms(c.now_ns);
    let timeout_ms = SocketCtx::ms(c.t.blocked_timeout);
    if stalled_ms < timeout_ms {
        return None;
    }
    let detail = format!(
        "{} bytes wait to be sent and the peer has taken none for {} (its receive window is {} \
         bytes): it stopped reading, so a thread writing here is blocked. Use a write timeout \
         or end the connection.",
        d.wqueue,
        secs(stalled_ms),
        tcp.snd_wnd
    );
    hit(
        Reason::BlockedSend,
        detail,
        json!({
            "stalled_ms": stalled_ms,
            "send_queue_bytes": d.wqueue,
            "unsent_bytes": tcp.notsent_bytes,
            "peer_window": tcp.snd_wnd,
            "zero_window_probes": tcp.probes,
        }),
    )
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

fn retransmitting(c: &SocketCtx) -> Option<Hit> {
    let d = &c.socket.diag;
    let tcp = d.tcp?;
    if !matches!(d.state, ESTABLISHED | CLOSE_WAIT | FIN_WAIT1 | CLOSING | LAST_ACK)
        || tcp.unacked == 0
        || tcp.retransmits == 0
    {
        return None;
    }
    let stalled_ms = c.history.stalled_ms(c.now_ns);
    let timeout_ms = SocketCtx::ms(c.t.retrans_timeout);
    if stalled_ms < timeout_ms {
        return None;
    }
    let give_up_ms = retransmit_give_up_ms(c.facts.tcp_retries2);
    let gives_up_in_ms = give_up_ms.saturating_sub(stalled_ms);
    let detail = format!(
        "The peer has acknowledged nothing for {} and the kernel has retransmitted {} times in \
         a row: it vanished mid-transfer. The kernel keeps trying for about {} in all \
         (tcp_retries2={}), roughly {} more, while a writer stays blocked.",
        secs(stalled_ms),
        tcp.retransmits,
        secs(give_up_ms),
        c.facts.tcp_retries2,
        secs(gives_up_in_ms)
    );
    hit(
        Reason::Retransmitting,
        detail,
        json!({
            "stalled_ms": stalled_ms,
            "retransmits_in_a_row": tcp.retransmits,
            "unacked_segments": tcp.unacked,
            "rto_ms": tcp.rto_us / 1000,
            "gives_up_in_ms": gives_up_in_ms,
        }),
    )
}

fn close_wait(c: &SocketCtx) -> Option<Hit> {
    let d = &c.socket.diag;
    if d.state != CLOSE_WAIT {
        return None;
    }
    let in_state_ms = c.history.in_state_ms(c.now_ns);
    let timeout_ms = SocketCtx::ms(c.t.close_wait_timeout);
    if in_state_ms < timeout_ms {
        return None;
    }
    let detail = format!(
        "The peer closed this connection {} ago and the application never called close(): the \
         socket, its fd and whatever thread serves it are leaked. Look for a code path that \
         stops reading at EOF without closing.",
        secs(in_state_ms)
    );
    hit(
        Reason::CloseWait,
        detail,
        json!({ "close_wait_ms": in_state_ms, "unread_bytes": d.rqueue }),
    )
}

fn accept_queue_overflow(c: &SocketCtx) -> Option<Hit> {
    let d = &c.socket.diag;
    if d.state != LISTEN {
        return None;
    }
    // For a listener, rqueue is the accept queue's length and wqueue its limit.
    let full = d.rqueue > d.wqueue;
    let recent_drop =
        c.history.last_drop_ns.is_some_and(|t| c.now_ns.saturating_sub(t) / MS < RECENT_MS);
    if !full && !recent_drop {
        return None;
    }
    let detail = if full {
        format!(
            "The accept queue is full ({} waiting, limit {}): new connections are dropped and \
             clients see SYN retries or resets. The accept loop is stalled or the listen() \
             backlog is too small.",
            d.rqueue, d.wqueue
        )
    } else {
        format!(
            "The listener dropped connections in the last {} because its accept queue \
             overflowed ({} dropped since it opened; limit {}).",
            secs(RECENT_MS),
            c.history.drops(),
            d.wqueue
        )
    };
    hit(
        Reason::AcceptQueueOverflow,
        detail,
        json!({ "queue_length": d.rqueue, "queue_limit": d.wqueue, "dropped": c.history.drops() }),
    )
}

fn keepalive_missing(c: &SocketCtx) -> Option<Hit> {
    let d = &c.socket.diag;
    let tcp = d.tcp?;
    // No middlebox sits on a loopback path.
    let remote = match d.remote.ip() {
        std::net::IpAddr::V6(v6) => {
            v6.to_ipv4_mapped().map_or(std::net::IpAddr::V6(v6), Into::into)
        }
        v4 => v4,
    };
    if d.state != ESTABLISHED || d.wqueue > 0 || remote.is_loopback() {
        return None;
    }
    let limit_ms = SocketCtx::ms(c.t.middlebox_idle);
    let silent_ms = c.socket.idle_ms(c.now_ns)?.min(u64::from(tcp.last_ack_recv_ms));
    if silent_ms < limit_ms {
        return None;
    }
    let keepalive = d.timer == TIMER_KEEPALIVE;
    // Keepalive on and probing unanswered: the peer is gone, and keepalive will end it.
    if keepalive && tcp.probes > 0 {
        return None;
    }
    let detail = if keepalive {
        format!(
            "Nothing crossed this connection for {} and its keepalive probe is not due for \
             another {}: a load balancer or NAT that forgets idle flows after {} will drop it \
             silently. Lower TCP_KEEPIDLE below that.",
            secs(silent_ms),
            secs(u64::from(d.timer_expires_ms)),
            secs(limit_ms)
        )
    } else {
        format!(
            "Nothing crossed this connection for {} and TCP keepalive is off: a load balancer \
             or NAT that forgets idle flows after {} (AWS NLB 350 s, Azure 4 min) will drop it \
             silently and the next request on it will hang. Enable SO_KEEPALIVE with \
             TCP_KEEPIDLE below that.",
            secs(silent_ms),
            secs(limit_ms)
        )
    };
    hit(
        Reason::KeepaliveMissing,
        detail,
        json!({
            "silent_ms": silent_ms,
            "keepalive": keepalive,
            "keepalive_next_probe_ms": keepalive.then_some(d.timer_expires_ms),
            "middlebox_idle_ms": limit_ms,
        }),
    )
}

pub fn fd_pressure(
    p: &ProcessView,
    h: &ProcessHistory,
    now_ns: u64,
    t: &Thresholds,
) -> Option<Hit> {
    let limit = p.fd_limit;
    let near = limit.is_some_and(|l| f64::from(p.fds_used) >= (t.fd_threshold * l as f64).ceil());
    let failing =
        h.last_accept_error_ns.is_some_and(|at| now_ns.saturating_sub(at) / MS < RECENT_MS);
    if !near && !failing {
        return None;
    }
    let limit_text = limit.map_or("no limit".to_owned(), |l| l.to_string());
    let detail = if failing {
        format!(
            "accept() is failing with EMFILE/ENFILE ({} of {} fds in use): new connections wait \
             in the accept queue until they are dropped. Raise the limit (ulimit -n, \
             LimitNOFILE=) or find the fd leak.",
            p.fds_used, limit_text
        )
    } else {
        format!(
            "{} of {} file descriptors in use (threshold {:.0}%): accept() will soon fail with \
             EMFILE and new connections will be refused. Raise the limit or find the fd leak.",
            p.fds_used,
            limit_text,
            t.fd_threshold * 100.0
        )
    };
    hit(
        Reason::FdPressure,
        detail,
        json!({ "fds_used": p.fds_used, "fds_limit": limit, "accept_errors": p.accept_errors }),
    )
}

pub fn reset_unread(r: &ResetView) -> Hit {
    let detail = if r.sent && r.unread > 0 {
        format!(
            "The application closed this connection with {} received bytes unread, so the \
             kernel sent a reset instead of a FIN: the peer may lose the response it had not \
             read yet (lingering close). Read the request fully, or shutdown(SHUT_WR) and drain, \
             before close().",
            r.unread
        )
    } else if r.sent {
        format!(
            "This side reset the connection with {} bytes not yet acknowledged by the peer: \
             they are lost (an abortive close, e.g. SO_LINGER 0).",
            r.unsent
        )
    } else {
        format!(
            "The peer reset the connection with {} bytes unacknowledged and {} unread here: \
             that data is lost and the application will see ECONNRESET.",
            r.unsent, r.unread
        )
    };
    Hit {
        reason: Reason::ResetUnread,
        detail,
        metrics: object(json!({
            "direction": if r.sent { "sent" } else { "received" },
            "unread_bytes": r.unread,
            "unsent_bytes": r.unsent,
        })),
    }
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
