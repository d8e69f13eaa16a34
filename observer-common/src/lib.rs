//! Types shared by the eBPF programs (`observer-ebpf`) and the agent (`observer`).
//!
//! Everything here is `#[repr(C)]` plain old data with explicit padding, because the same bytes
//! are written by the kernel side and read back by user space through BPF maps.
#![no_std]

/// TCP states as the kernel numbers them (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: u32 = 1;
    pub const SYN_SENT: u32 = 2;
    pub const SYN_RECV: u32 = 3;
    pub const FIN_WAIT1: u32 = 4;
    pub const FIN_WAIT2: u32 = 5;
    pub const TIME_WAIT: u32 = 6;
    pub const CLOSE: u32 = 7;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const LISTEN: u32 = 10;
    pub const CLOSING: u32 = 11;
    pub const NEW_SYN_RECV: u32 = 12;
}

/// Default capacity of the per-socket activity map. Entries are allocated on demand, so an idle
/// machine pays for what it tracks, not for this bound.
pub const DEFAULT_MAX_TRACKED_SOCKETS: u32 = 262_144;

/// What the probes know about one TCP socket, keyed by its socket cookie (the number sock_diag
/// reports as `idiag_cookie`). Times are `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) nanoseconds; 0 means
/// "not seen since the agent started".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockActivity {
    /// When the application last handed data to the socket (a send returned > 0).
    pub last_send_ns: u64,
    /// When the application last took data from the socket (a receive returned > 0).
    pub last_recv_ns: u64,
    /// Application bytes sent / received since the probes first saw the socket.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// When the kernel last retransmitted a segment of this socket.
    pub last_retransmit_ns: u64,
    /// When the socket entered `state`.
    pub state_since_ns: u64,
    /// When the probes first saw the socket.
    pub first_seen_ns: u64,
    /// Retransmitted segments since the probes first saw the socket.
    pub retransmits: u32,
    /// Current TCP state (see [`tcp_state`]); 0 until a state change is seen.
    pub state: u32,
    /// The thread that last sent or received application data.
    pub last_tgid: u32,
    pub last_tid: u32,
    pub last_comm: [u8; 16],
}

/// Indexes of the per-CPU `COUNTERS` array: the agent's view of what the probes did and, above
/// all, of what they could not do (a socket that could not be tracked is counted, never silent).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    SendEvents = 0,
    RecvEvents = 1,
    RetransmitEvents = 2,
    StateEvents = 3,
    DestroyEvents = 4,
    /// A socket could not be added to the activity map (map full or out of memory).
    TrackFailed = 5,
}

impl Counter {
    pub const COUNT: u32 = 6;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::SendEvents,
        Counter::RecvEvents,
        Counter::RetransmitEvents,
        Counter::StateEvents,
        Counter::DestroyEvents,
        Counter::TrackFailed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::SendEvents => "send_events",
            Counter::RecvEvents => "recv_events",
            Counter::RetransmitEvents => "retransmit_events",
            Counter::StateEvents => "state_events",
            Counter::DestroyEvents => "destroy_events",
            Counter::TrackFailed => "track_failed",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C), only integer fields, no implicit padding (checked by the test below).
    unsafe impl aya::Pod for super::SockActivity {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sock_activity_has_no_implicit_padding() {
        let fields = 7 * 8 + 4 * 4 + 16;
        assert_eq!(core::mem::size_of::<SockActivity>(), fields);
        assert_eq!(core::mem::align_of::<SockActivity>(), 8);
    }

    #[test]
    fn counter_table_is_complete() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
