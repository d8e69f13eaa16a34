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
}

/// Watched process ids the probes compare inline (more go to a hash map).
pub const INLINE_PIDS: usize = 16;

/// The current (or last) socket call of a thread of a watched process, keyed by thread id.
/// Lets the agent say how long a thread has been blocked on a socket, measured, not guessed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadCall {
    /// When the thread entered the call; 0 once it has returned.
    pub enter_ns: u64,
    /// Syscall number (the running architecture's numbering).
    pub nr: u32,
    /// The fd the call operates on (its first argument).
    pub fd: i32,
}

/// A thread inside a TCP send or receive right now, as fentry/kprobe backends see it: which
/// socket, since when. Keyed by thread id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockCall {
    /// When the thread entered tcp_sendmsg/tcp_recvmsg; 0 once it has returned.
    pub enter_ns: u64,
    pub cookie: u64,
    /// The socket (kprobes need it at return, where arguments are gone).
    pub sk: u64,
    pub tgid: u32,
    /// [`CALL_SEND`] or [`CALL_RECV`].
    pub direction: u16,
    /// Whether the receive only peeks (MSG_PEEK): no data is consumed.
    pub peek: u16,
}

pub const CALL_SEND: u16 = 0;
pub const CALL_RECV: u16 = 1;

/// What `TRACKED_SYSCALLS[nr]` says about a syscall.
pub mod syscall_kind {
    /// Not tracked.
    pub const NONE: u32 = 0;
    /// Blocks on the fd in its first argument (read, recvfrom, sendmsg, ...).
    pub const FD_CALL: u32 = 1;
    /// accept/accept4: also counted when they fail for lack of file descriptors.
    pub const ACCEPT: u32 = 2;
}

/// Highest syscall number + 1 the syscall table covers.
pub const MAX_SYSCALL_NR: u32 = 512;

/// A TCP reset sent or received while data was still unread or unsent: the data is lost.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetEvent {
    pub cookie: u64,
    pub at_ns: u64,
    /// Bytes received but not yet read by the application.
    pub unread: u32,
    /// Bytes written by the application but not yet acknowledged by the peer.
    pub unsent: u32,
    /// The thread in whose context it happened, or the socket's last user when that was
    /// softirq context.
    pub tgid: u32,
    pub tid: u32,
    pub comm: [u8; 16],
    /// [`RESET_SENT`] or [`RESET_RECEIVED`].
    pub direction: u8,
    /// TCP state when the reset happened.
    pub state: u8,
    pub family: u16,
    pub local_port: u16,
    pub remote_port: u16,
    /// IPv4 addresses use the first 4 bytes.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}

pub const RESET_SENT: u8 = 0;
pub const RESET_RECEIVED: u8 = 1;

/// Offsets in the running kernel's structs, read from its BTF by the agent and handed to the
/// programs at load time (Rust BPF has no CO-RE relocations). 0 means unknown.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub sk_protocol: u32,
    pub sk_type: u32,
    pub skc_family: u32,
    pub skc_state: u32,
    /// inet_sock.inet_sport: the local port (network order); unlike skc_num it survives the
    /// socket's move to CLOSE, when the port binding is released.
    pub inet_sport: u32,
    pub skc_dport: u32,
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub tcp_rcv_nxt: u32,
    pub tcp_copied_seq: u32,
    pub tcp_write_seq: u32,
    pub tcp_snd_una: u32,
    /// Offset in `struct pt_regs` of a syscall's first argument.
    pub regs_arg0: u32,
    /// sock_common.skc_cookie: kprobes cannot call bpf_get_socket_cookie, so they read it.
    pub skc_cookie: u32,
}

impl KernelOffsets {
    pub const ZERO: KernelOffsets = KernelOffsets {
        sk_protocol: 0,
        sk_type: 0,
        skc_family: 0,
        skc_state: 0,
        inet_sport: 0,
        skc_dport: 0,
        skc_daddr: 0,
        skc_rcv_saddr: 0,
        skc_v6_daddr: 0,
        skc_v6_rcv_saddr: 0,
        tcp_rcv_nxt: 0,
        tcp_copied_seq: 0,
        tcp_write_seq: 0,
        tcp_snd_una: 0,
        regs_arg0: 0,
        skc_cookie: 0,
    };
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
    /// Resets that lost data, reported to the agent.
    ResetEvents = 6,
    /// Events dropped because the ring buffer to the agent was full.
    EventsLost = 7,
    /// A thread's socket call could not be recorded (thread map full).
    ThreadTrackFailed = 8,
    /// accept()/accept4() calls of watched processes that failed with EMFILE or ENFILE.
    AcceptErrors = 9,
}

impl Counter {
    pub const COUNT: u32 = 10;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::SendEvents,
        Counter::RecvEvents,
        Counter::RetransmitEvents,
        Counter::StateEvents,
        Counter::DestroyEvents,
        Counter::TrackFailed,
        Counter::ResetEvents,
        Counter::EventsLost,
        Counter::ThreadTrackFailed,
        Counter::AcceptErrors,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::SendEvents => "send_events",
            Counter::RecvEvents => "recv_events",
            Counter::RetransmitEvents => "retransmit_events",
            Counter::StateEvents => "state_events",
            Counter::DestroyEvents => "destroy_events",
            Counter::TrackFailed => "track_failed",
            Counter::ResetEvents => "reset_events",
            Counter::EventsLost => "events_lost",
            Counter::ThreadTrackFailed => "thread_track_failed",
            Counter::AcceptErrors => "accept_errors",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C), only integer fields, no implicit padding (checked by the tests below).
    unsafe impl aya::Pod for super::SockActivity {}
    unsafe impl aya::Pod for super::ThreadCall {}
    unsafe impl aya::Pod for super::SockCall {}
    unsafe impl aya::Pod for super::ResetEvent {}
    unsafe impl aya::Pod for super::KernelOffsets {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sock_activity_has_no_implicit_padding() {
        let fields = 7 * 8 + 4 * 4;
        assert_eq!(core::mem::size_of::<SockActivity>(), fields);
        assert_eq!(core::mem::align_of::<SockActivity>(), 8);
    }

    #[test]
    fn shared_types_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<ThreadCall>(), 16);
        assert_eq!(core::mem::size_of::<SockCall>(), 32);
        assert_eq!(core::mem::size_of::<ResetEvent>(), 8 + 8 + 4 * 4 + 16 + 1 + 1 + 2 * 3 + 32);
        assert_eq!(core::mem::size_of::<KernelOffsets>(), 16 * 4);
    }

    #[test]
    fn counter_table_is_complete() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
