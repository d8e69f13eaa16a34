//! The rules' verdicts ([`Facts`]) and how an alert renders them: the reason-specific numbers
//! and one sentence for the operator. Rendered only when an alert is raised.
use serde_json::{Map, Value, json};

use observer_common::{Direction, TcpState};

use super::{reason::Reason, rules::RECENT_MS};
use crate::snapshot::ResetView;

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
    ConnectStalled {
        connect_ms: u64,
        timeout_ms: u64,
        syn_retransmits: u32,
    },
    ClosingStalled(Box<Closing>),
    AcceptSpinning {
        cpu: f64,
        queued: u32,
        used: u32,
        limit: Option<u64>,
        accept_errors: Option<u64>,
    },
}

/// A connection stuck on its way out, as `closing_stalled` reports it (boxed: the rarest and
/// largest verdict).
#[derive(Clone, Debug, PartialEq)]
pub struct Closing {
    pub state: TcpState,
    pub closing_ms: u64,
    pub timeout_ms: u64,
    /// No fd holds it any more: the application closed it and the kernel finishes alone.
    pub orphaned: bool,
    /// Bytes the application wrote that were never sent, and everything not yet acknowledged
    /// (the FIN included).
    pub unsent: u32,
    pub queued: u32,
    pub peer_window: u32,
    /// Unanswered retransmission timeouts in a row (of data or of our FIN).
    pub retransmits: u8,
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
            Facts::ConnectStalled { .. } => Reason::ConnectStalled,
            Facts::ClosingStalled(_) => Reason::ClosingStalled,
            Facts::AcceptSpinning { .. } => Reason::AcceptSpinning,
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
            Facts::ConnectStalled { connect_ms, syn_retransmits, .. } => {
                json!({ "connect_ms": connect_ms, "syn_retransmits": syn_retransmits })
            }
            Facts::ClosingStalled(c) => json!({
                "closing_ms": c.closing_ms,
                "orphaned": c.orphaned,
                "unsent_bytes": c.unsent,
                "send_queue_bytes": c.queued,
                "peer_window": c.peer_window,
            }),
            Facts::AcceptSpinning { cpu, queued, used, limit, accept_errors } => json!({
                "cpu": (cpu * 100.0).round() / 100.0,
                "queue_length": queued,
                "fds_used": used,
                "fds_limit": limit,
                "accept_errors": accept_errors,
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
            Facts::ConnectStalled { connect_ms, timeout_ms, syn_retransmits } => format!(
                "connect() has had no answer for {} (connect timeout {}, {syn_retransmits} SYN \
                 retransmissions): the peer drops SYNs or its listen queue is full, and a caller \
                 without a connect timeout waits through minutes of retries. Set a connect \
                 timeout, or end this attempt.",
                secs(*connect_ms),
                secs(*timeout_ms)
            ),
            Facts::ClosingStalled(c) => closing_detail(c),
            Facts::AcceptSpinning { cpu, queued, used, limit, .. } => {
                let limit = limit.map_or("no limit".to_owned(), |l| l.to_string());
                format!(
                    "accept() fails for lack of fds ({used} of {limit} in use) and is retried at \
                     once: the accept loop burns {cpu:.2} CPUs while {queued} connections wait in \
                     the accept queue, and the server neither serves nor recovers. Back off on \
                     EMFILE/ENFILE (or stop accepting until an fd is freed), then raise the limit \
                     or find the fd leak."
                )
            }
        }
    }
}

/// What stops a closing connection, in a sentence, from its state and numbers.
fn closing_detail(c: &Closing) -> String {
    let whose = if c.orphaned {
        "The application closed this connection and no fd holds it any more (an orphan, \
         counted against net.ipv4.tcp_max_orphans)"
    } else {
        "The application shut this connection down and still holds its fd"
    };
    let what = match c.state {
        TcpState::FinWait2 => "our FIN was acknowledged but the peer never sent its own, so \
             whoever waits to read the rest waits with it. Bound that wait with a timeout after \
             shutdown()"
            .to_owned(),
        // A closed window is the live peer's own word: it is there, and not reading.
        _ if c.unsent > 1 && c.peer_window == 0 => format!(
            "{} bytes are still unsent and the peer stopped reading (window 0), so the kernel \
             keeps the socket and its buffers while it probes. End it, and bound how long a \
             response may take to drain",
            c.unsent
        ),
        _ if c.retransmits > 0 => format!(
            "the peer acknowledges nothing ({} retransmissions in a row): it vanished, and the \
             kernel retries until tcp_retries2 or tcp_orphan_retries gives up. End it now",
            c.retransmits
        ),
        _ => "the peer has not acknowledged our FIN. End it".to_owned(),
    };
    format!("{whose}; it has been in {} for {}: {what}.", c.state.name(), secs(c.closing_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

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
            Facts::ConnectStalled { connect_ms: 6_000, timeout_ms: 5_000, syn_retransmits: 3 },
            Facts::AcceptSpinning {
                cpu: 0.97,
                queued: 12,
                used: 32,
                limit: Some(32),
                accept_errors: None,
            },
        ];
        let closing = |state, retransmits, unsent, orphaned| {
            Facts::ClosingStalled(Box::new(Closing {
                state,
                closing_ms: 61_000,
                timeout_ms: 60_000,
                orphaned,
                unsent,
                queued: unsent,
                peer_window: 0,
                retransmits,
            }))
        };
        let cases = cases.into_iter().chain([
            closing(TcpState::FinWait1, 0, 2_000_000, true),
            closing(TcpState::FinWait1, 3, 1, true),
            closing(TcpState::FinWait2, 0, 0, false),
            closing(TcpState::LastAck, 0, 1, true),
        ]);
        for f in cases {
            assert!(f.detail().ends_with('.'), "{:?}: {}", f.reason(), f.detail());
            assert!(!f.metrics().is_empty(), "{:?}", f.reason());
        }
    }
}
