//! Types shared by the eBPF programs (`observer-ebpf`) and the agent (`observer`).
//!
//! Everything here is `#[repr(C)]` plain old data with explicit padding, because the same bytes
//! are written by the kernel side and read back by user space through BPF maps.
#![no_std]

/// A TCP state, numbered as the kernel numbers them (include/net/tcp_states.h). Shared records
/// carry the raw number (an integer field); this type names it and builds state masks.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TcpState {
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait1 = 4,
    FinWait2 = 5,
    TimeWait = 6,
    Close = 7,
    CloseWait = 8,
    LastAck = 9,
    Listen = 10,
    Closing = 11,
    NewSynRecv = 12,
}

impl TcpState {
    pub const ALL: [TcpState; 12] = [
        TcpState::Established,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Listen,
        TcpState::Closing,
        TcpState::NewSynRecv,
    ];

    /// The state the kernel numbers `raw`, if it is one of the above.
    pub const fn from_raw(raw: u32) -> Option<TcpState> {
        if raw == 0 || raw as usize > Self::ALL.len() {
            return None;
        }
        Some(Self::ALL[raw as usize - 1])
    }

    /// The name `ss` and the kernel's headers use, e.g. `CLOSE_WAIT`.
    pub const fn name(self) -> &'static str {
        match self {
            TcpState::Established => "ESTABLISHED",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::FinWait1 => "FIN_WAIT1",
            TcpState::FinWait2 => "FIN_WAIT2",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::Listen => "LISTEN",
            TcpState::Closing => "CLOSING",
            TcpState::NewSynRecv => "NEW_SYN_RECV",
        }
    }
}

/// A set of TCP states, as sock_diag's request mask has it: bit n for state n.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpStates(u32);

impl TcpStates {
    /// Every state a socket held by an fd can be in: all but TIME_WAIT and NEW_SYN_RECV, which
    /// are not full sockets (no owner, no fd, no thread).
    pub const HELD: TcpStates =
        TcpStates::all().without(TcpState::TimeWait).without(TcpState::NewSynRecv);
    /// Connections: what an fd can hold, listeners aside.
    pub const CONNECTIONS: TcpStates = TcpStates::HELD.without(TcpState::Listen);
    pub const LISTENING: TcpStates = TcpStates::EMPTY.with(TcpState::Listen);
    pub const EMPTY: TcpStates = TcpStates(0);

    pub const fn all() -> TcpStates {
        let mut all = TcpStates::EMPTY;
        let mut i = 0;
        while i < TcpState::ALL.len() {
            all = all.with(TcpState::ALL[i]);
            i += 1;
        }
        all
    }

    pub const fn with(self, state: TcpState) -> TcpStates {
        TcpStates(self.0 | 1 << state as u32)
    }

    pub const fn without(self, state: TcpState) -> TcpStates {
        TcpStates(self.0 & !(1 << state as u32))
    }

    pub const fn contains(self, state: TcpState) -> bool {
        self.0 & 1 << state as u32 != 0
    }

    /// The mask as sock_diag requests carry it.
    pub const fn bits(self) -> u32 {
        self.0
    }
}

/// Which way data (or a reset) went, as shared records carry it (`Direction as u8`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Out of this socket: the application sent, or this side sent the reset.
    Send = 0,
    /// Into this socket: the application received, or the peer sent the reset.
    Recv = 1,
}

impl Direction {
    pub const fn from_raw(raw: u8) -> Direction {
        if raw == Direction::Recv as u8 { Direction::Recv } else { Direction::Send }
    }
}

/// Default capacity of the per-socket activity map. Entries are allocated on demand, so an idle
/// machine pays for what it tracks, not for this bound.
pub const DEFAULT_MAX_TRACKED_SOCKETS: u32 = 262_144;

/// What the probes know about one TCP socket, kept in the socket's own storage (fentry and
/// tracepoint backends) or by its socket cookie (kprobe backend). Times are
/// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) nanoseconds; 0 means "not seen since the agent
/// started". Kept small: the agent holds one per watched socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockActivity {
    /// When the application last handed data to the socket (a send returned > 0).
    pub last_send_ns: u64,
    /// When the application last took data from the socket (a receive returned > 0).
    pub last_recv_ns: u64,
    /// When the socket entered `state`.
    pub state_since_ns: u64,
    /// Current TCP state (a [`TcpState`] number); 0 until a state change is seen.
    pub state: u32,
    /// The thread that last sent or received application data.
    pub last_tgid: u32,
    pub last_tid: u32,
    pub _pad: u32,
}

/// Words of the probes' watched-process bitmap when the agent does not size it: one bit per
/// process id up to the kernel's PID_MAX_LIMIT (2^22).
pub const WATCHED_WORDS: u32 = (1 << 22) / 64;

/// The socket syscall a thread of a watched process is in (or was last in), keyed by thread id
/// (`--syscall-timing`). Lets the agent say how long a thread has been blocked on a socket,
/// measured, not guessed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadSyscall {
    /// When the thread entered the call; 0 once it has returned.
    pub enter_ns: u64,
    /// Syscall number (the running architecture's numbering).
    pub nr: u32,
    /// The fd the call operates on (its first argument).
    pub fd: i32,
}

/// The TCP send or receive a thread is in right now, as the fentry/kprobe backends see it: which
/// socket, since when. Keyed by thread id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadTcpCall {
    /// When the thread entered tcp_sendmsg/tcp_recvmsg; 0 once it has returned.
    pub enter_ns: u64,
    pub cookie: u64,
    /// The socket (kprobes need it at return, where arguments are gone).
    pub sk: u64,
    pub tgid: u32,
    /// A [`Direction`]: tcp_sendmsg or tcp_recvmsg.
    pub direction: u8,
    /// Whether the receive only peeks (MSG_PEEK): no data is consumed.
    pub peek: u8,
    pub _pad: [u8; 2],
}

/// recv(2)'s MSG_PEEK: data is looked at, not consumed.
pub const MSG_PEEK: u32 = 2;
/// BPF_F_NO_PREALLOC: hash map entries are allocated as they are inserted.
pub const BPF_F_NO_PREALLOC: u32 = 1;

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
    /// A [`Direction`]: `Send` when this side sent the reset.
    pub direction: u8,
    /// TCP state when the reset happened (a [`TcpState`] number).
    pub state: u8,
    pub family: u16,
    pub local_port: u16,
    pub remote_port: u16,
    /// IPv4 addresses use the first 4 bytes.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}

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

/// Indexes of the per-CPU `COUNTERS` array, in declaration order: the agent's view of what the
/// probes did and, above all, of what they could not do (a socket that could not be tracked is
/// counted, never silent).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Sockets given a record (the data paths count nothing else: a counter per send or receive
    /// cost more than the agent learns from it, which is what changed in the records).
    SocketsTracked,
    StateEvents,
    DestroyEvents,
    /// Sockets that could not be given a record (a full map, no memory), each counted once.
    TrackFailed,
    /// Resets that lost data, reported to the agent.
    ResetEvents,
    /// Events dropped because the ring buffer to the agent was full.
    EventsLost,
    /// A thread's socket call could not be recorded (thread map full).
    ThreadTrackFailed,
    /// accept()/accept4() calls of watched processes that failed with EMFILE or ENFILE.
    AcceptErrors,
}

impl Counter {
    pub const COUNT: u32 = 8;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::SocketsTracked,
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
            Counter::SocketsTracked => "sockets_tracked",
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

/// Slots of the table of when watched threads last went to sleep: a thread's slot is its id
/// modulo this. A slot is an array element the verifier turns into an address (no hashing on
/// the scheduler's path); two watched threads sharing a slot overwrite each other, and the
/// stored id tells the agent whose time it is.
pub const THREAD_SLEEP_SLOTS: u32 = 65_536;

/// When thread `tid` last went to sleep (CLOCK_MONOTONIC ns).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadSleep {
    pub tid: u32,
    pub _pad: u32,
    pub since_ns: u64,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C), only integer fields, no implicit padding (checked by the tests below).
    unsafe impl aya::Pod for super::SockActivity {}
    unsafe impl aya::Pod for super::ThreadSyscall {}
    unsafe impl aya::Pod for super::ThreadTcpCall {}
    unsafe impl aya::Pod for super::ThreadSleep {}
    unsafe impl aya::Pod for super::ResetEvent {}
    unsafe impl aya::Pod for super::KernelOffsets {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sock_activity_has_no_implicit_padding() {
        let fields = 3 * 8 + 4 * 4;
        assert_eq!(core::mem::size_of::<SockActivity>(), fields);
        assert_eq!(core::mem::align_of::<SockActivity>(), 8);
    }

    #[test]
    fn shared_types_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<ThreadSyscall>(), 16);
        assert_eq!(core::mem::size_of::<ThreadTcpCall>(), 32);
        assert_eq!(core::mem::size_of::<ResetEvent>(), 8 + 8 + 4 * 4 + 16 + 1 + 1 + 2 * 3 + 32);
        assert_eq!(core::mem::size_of::<KernelOffsets>(), 16 * 4);
    }

    #[test]
    fn tcp_states_match_the_kernel_numbers_and_masks() {
        for (i, state) in TcpState::ALL.iter().enumerate() {
            assert_eq!(*state as usize, i + 1);
            assert_eq!(TcpState::from_raw(i as u32 + 1), Some(*state));
        }
        assert_eq!(TcpState::from_raw(0), None);
        assert_eq!(
            TcpState::from_raw(13),
            None,
            "TCP_BOUND_INACTIVE (6.6+) is not a socket we watch"
        );
        // What the collector and `kill` asked for before these types existed.
        assert_eq!(TcpStates::HELD.bits(), ((1 << 12) - 2) & !(1 << 6));
        assert_eq!(TcpStates::CONNECTIONS.bits(), ((1 << 12) - 2) & !(1 << 6) & !(1 << 10));
        assert!(TcpStates::LISTENING.contains(TcpState::Listen));
        assert!(!TcpStates::CONNECTIONS.contains(TcpState::Listen));
        assert_eq!(TcpState::CloseWait.name(), "CLOSE_WAIT");
    }

    #[test]
    fn counter_table_is_complete() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
