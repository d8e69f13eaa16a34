//! The failures observer names. The snake_case names are part of the JSON contract and of the
//! policy file format.
use std::{fmt, str::FromStr};

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// No data either way for the idle timeout: a client that went silent.
    Idle,
    /// Data trickles in one direction far below a useful rate while the other side waits:
    /// slow-loris (or a slow reader).
    SlowTransfer,
    /// Data waits to be sent, the peer is alive but not reading: the writer blocks.
    BlockedSend,
    /// Unacknowledged data is being retransmitted to a peer that does not answer.
    Retransmitting,
    /// The peer closed, the application never did: the socket and its fd leak.
    CloseWait,
    /// A listener's accept queue is full or dropped connections.
    AcceptQueueOverflow,
    /// A reset was sent or received while data was unread or unsent: that data is lost.
    ResetUnread,
    /// Silent longer than a middlebox keeps idle flows, with no keepalive to keep it alive.
    KeepaliveMissing,
    /// The process is running out of file descriptors.
    FdPressure,
    /// A watched process's connect() gets no answer: its thread waits through SYN retries.
    ConnectStalled,
    /// A closed or shut-down connection cannot finish closing (FIN_WAIT1/2, LAST_ACK, CLOSING).
    ClosingStalled,
    /// At its fd limit with connections waiting, the accept loop retries EMFILE at full speed.
    AcceptSpinning,
}

impl Reason {
    pub const ALL: [Reason; 12] = [
        Reason::Idle,
        Reason::SlowTransfer,
        Reason::BlockedSend,
        Reason::Retransmitting,
        Reason::CloseWait,
        Reason::AcceptQueueOverflow,
        Reason::ResetUnread,
        Reason::KeepaliveMissing,
        Reason::FdPressure,
        Reason::ConnectStalled,
        Reason::ClosingStalled,
        Reason::AcceptSpinning,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Reason::Idle => "idle",
            Reason::SlowTransfer => "slow_transfer",
            Reason::BlockedSend => "blocked_send",
            Reason::Retransmitting => "retransmitting",
            Reason::CloseWait => "close_wait",
            Reason::AcceptQueueOverflow => "accept_queue_overflow",
            Reason::ResetUnread => "reset_unread",
            Reason::KeepaliveMissing => "keepalive_missing",
            Reason::FdPressure => "fd_pressure",
            Reason::ConnectStalled => "connect_stalled",
            Reason::ClosingStalled => "closing_stalled",
            Reason::AcceptSpinning => "accept_spinning",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Reason {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Reason::ALL.into_iter().find(|r| r.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Reason::ALL.iter().map(|r| r.name()).collect();
            format!("unknown reason '{s}' (known: {})", names.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_serde() {
        for r in Reason::ALL {
            assert_eq!(r.name().parse::<Reason>(), Ok(r));
            assert_eq!(serde_json::to_value(r).unwrap(), r.name());
        }
        assert!("idel".parse::<Reason>().unwrap_err().contains("known: idle"));
    }
}
