//! Which programs each backend attaches, on this kernel.
use crate::kernel::btf::Btf;

/// A set of programs that fill the same maps with the same meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// fentry/fexit on tcp_sendmsg/tcp_recvmsg: every send and receive, and how long a thread
    /// has been inside one. Needs BPF trampolines (most distribution kernels).
    Fentry,
    /// kprobes/kretprobes on the same functions, for kernels without fentry.
    Kprobe,
    /// BTF tracepoints only: works where function tracing is locked down. Application-level
    /// send/receive times need Linux 6.3+ (sock_send_length); older kernels use tcp_info.
    Tracepoint,
}

/// `--probes`: a backend, or the best one that loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeChoice {
    Auto,
    Fentry,
    Kprobe,
    Tracepoint,
}

impl ProbeChoice {
    pub const ALL: [ProbeChoice; 4] =
        [ProbeChoice::Auto, ProbeChoice::Fentry, ProbeChoice::Kprobe, ProbeChoice::Tracepoint];

    pub fn name(self) -> &'static str {
        match self {
            ProbeChoice::Auto => "auto",
            ProbeChoice::Fentry => Backend::Fentry.name(),
            ProbeChoice::Kprobe => Backend::Kprobe.name(),
            ProbeChoice::Tracepoint => Backend::Tracepoint.name(),
        }
    }

    /// The backends to try, best first.
    pub fn candidates(self) -> &'static [Backend] {
        match self {
            ProbeChoice::Auto => Backend::ALL,
            ProbeChoice::Fentry => &[Backend::Fentry],
            ProbeChoice::Kprobe => &[Backend::Kprobe],
            ProbeChoice::Tracepoint => &[Backend::Tracepoint],
        }
    }
}

/// Where a backend's probes keep each socket's record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    /// Socket-local storage, read back in the sock_diag walk.
    InSocket,
    /// A hash map by socket cookie, read in batches (kprobes cannot use socket storage).
    ByCookie,
}

impl Backend {
    pub fn store(self) -> Store {
        match self {
            Backend::Fentry | Backend::Tracepoint => Store::InSocket,
            Backend::Kprobe => Store::ByCookie,
        }
    }

    /// Every backend, best first: the order `auto` tries them in.
    pub const ALL: &'static [Backend] = &[Backend::Fentry, Backend::Kprobe, Backend::Tracepoint];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Fentry => "fentry",
            Backend::Kprobe => "kprobe",
            Backend::Tracepoint => "tracepoint",
        }
    }
}

impl std::str::FromStr for ProbeChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        ProbeChoice::ALL.into_iter().find(|c| c.name() == s).ok_or_else(|| {
            let names: Vec<&str> = ProbeChoice::ALL.iter().map(|c| c.name()).collect();
            format!("unknown probe backend '{s}' (known: {})", names.join(", "))
        })
    }
}

/// How a program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Tracepoint(&'static str),
    FEntry(&'static str),
    FExit(&'static str),
    KProbe(&'static str),
    KRetProbe(&'static str),
}

impl Hook {
    pub fn target(self) -> &'static str {
        match self {
            Hook::Tracepoint(t)
            | Hook::FEntry(t)
            | Hook::FExit(t)
            | Hook::KProbe(t)
            | Hook::KRetProbe(t) => t,
        }
    }
}

/// Tracepoints every backend uses, in the flavour for records in socket storage (fentry and
/// tracepoint backends): such a record goes with its socket, no destroy hook needed.
const SHARED_IN_SOCKET: &[(&str, Hook)] = &[
    ("observer_tp_state_sk", Hook::Tracepoint("inet_sock_set_state")),
    ("observer_tp_reset_sent_sk", Hook::Tracepoint("tcp_send_reset")),
    ("observer_tp_reset_received_sk", Hook::Tracepoint("tcp_receive_reset")),
    ("observer_tp_thread_exit", Hook::Tracepoint("sched_process_exit")),
];

/// The same for records by socket cookie (kprobes cannot use socket storage).
const SHARED_BY_COOKIE: &[(&str, Hook)] = &[
    ("observer_tp_state_hashed", Hook::Tracepoint("inet_sock_set_state")),
    ("observer_tp_destroy_hashed", Hook::Tracepoint("tcp_destroy_sock")),
    ("observer_tp_reset_sent_hashed", Hook::Tracepoint("tcp_send_reset")),
    ("observer_tp_reset_received_hashed", Hook::Tracepoint("tcp_receive_reset")),
    ("observer_tp_thread_exit", Hook::Tracepoint("sched_process_exit")),
];

/// Times how long watched threads have been waiting (tracepoint backend, specific processes):
/// the scheduler's context switches, filtered to the watched processes before any map work.
const SLEEP_TIMING: (&str, Hook) = ("observer_tp_sched_switch", Hook::Tracepoint("sched_switch"));

/// An empty program, for --probe-stats: what any program costs per event on this machine.
const FLOOR: (&str, Hook) = ("observer_tp_floor", Hook::Tracepoint("sock_send_length"));

/// Programs that time the watched processes' socket syscalls per thread. They run on every
/// syscall of the machine (and put every syscall on the kernel's tracing path): attached only
/// with --syscall-timing, for specific processes.
const THREAD_PROGRAMS: &[(&str, Hook)] = &[
    ("observer_tp_sys_enter", Hook::Tracepoint("sys_enter")),
    ("observer_tp_sys_exit", Hook::Tracepoint("sys_exit")),
];

/// Whether a plan's `programs` time the watched threads' syscalls.
pub fn times_syscalls(programs: &[(&'static str, Hook)]) -> bool {
    programs.contains(&THREAD_PROGRAMS[0])
}

/// Whether a plan's `programs` time the watched threads' sleeps.
pub fn times_sleeps(programs: &[(&'static str, Hook)]) -> bool {
    programs.contains(&SLEEP_TIMING)
}

/// What the agent asks of the probes beyond the backend's basics.
#[derive(Clone, Copy, Debug, Default)]
pub struct Extras {
    /// Specific processes are watched (not every socket).
    pub filtering: bool,
    /// Time the watched threads' socket syscalls (--syscall-timing; needs `filtering`).
    pub syscall_timing: bool,
    /// Follow the watched threads' context switches (tracepoint backend; needs `filtering`).
    pub sleep_timing: bool,
    /// Attach [`FLOOR`] (--probe-stats).
    pub floor: bool,
}

/// The programs of a backend that probes the TCP send and receive functions themselves: an
/// (entry, exit) pair on each.
struct FunctionProbes {
    entry: fn(&'static str) -> Hook,
    exit: fn(&'static str) -> Hook,
    send: (&'static str, &'static str),
    recv: (&'static str, &'static str),
    /// tcp_recvmsg's entry before Linux 5.19, which reads its flags one argument later.
    recv_old: &'static str,
    /// sendfile() and splice() took tcp_sendpage until Linux 6.5.
    sendpage: (&'static str, &'static str),
}

const FENTRY: FunctionProbes = FunctionProbes {
    entry: Hook::FEntry,
    exit: Hook::FExit,
    send: ("observer_fe_send", "observer_fx_send"),
    recv: ("observer_fe_recv", "observer_fx_recv"),
    recv_old: "observer_fe_recv_old",
    sendpage: ("observer_fe_sendpage", "observer_fx_sendpage"),
};

const KPROBE: FunctionProbes = FunctionProbes {
    entry: Hook::KProbe,
    exit: Hook::KRetProbe,
    send: ("observer_kp_send", "observer_kr_send"),
    recv: ("observer_kp_recv", "observer_kr_recv"),
    recv_old: "observer_kp_recv_old",
    sendpage: ("observer_kp_sendpage", "observer_kr_sendpage"),
};

/// tcp_recvmsg lost its `nonblock` argument in Linux 5.19: 5 parameters now, 6 before.
const RECVMSG_OLD_ARITY: usize = 6;

/// The programs a backend attaches on this kernel, and what it has to do without.
pub fn plan(
    backend: Backend,
    btf: &Btf,
    extras: Extras,
) -> (Vec<(&'static str, Hook)>, Vec<String>) {
    let mut programs: Vec<(&'static str, Hook)> = match backend.store() {
        Store::InSocket => SHARED_IN_SOCKET.to_vec(),
        Store::ByCookie => SHARED_BY_COOKIE.to_vec(),
    };
    let mut notes = Vec::new();
    let old_recv = btf.function_arity("tcp_recvmsg") == Some(RECVMSG_OLD_ARITY);
    let has_sendpage = btf.function_arity("tcp_sendpage").is_some();
    match backend {
        Backend::Fentry | Backend::Kprobe => {
            let p = if backend == Backend::Fentry { &FENTRY } else { &KPROBE };
            let recv_entry = if old_recv { p.recv_old } else { p.recv.0 };
            programs.extend([
                (p.send.0, (p.entry)("tcp_sendmsg")),
                (p.send.1, (p.exit)("tcp_sendmsg")),
                (recv_entry, (p.entry)("tcp_recvmsg")),
                (p.recv.1, (p.exit)("tcp_recvmsg")),
            ]);
            if has_sendpage {
                programs.extend([
                    (p.sendpage.0, (p.entry)("tcp_sendpage")),
                    (p.sendpage.1, (p.exit)("tcp_sendpage")),
                ]);
            }
        }
        Backend::Tracepoint => {
            if btf.has_tracepoint("sock_send_length") && btf.has_tracepoint("sock_recv_length") {
                programs.extend([
                    ("observer_tp_send", Hook::Tracepoint("sock_send_length")),
                    ("observer_tp_recv", Hook::Tracepoint("sock_recv_length")),
                ]);
            } else {
                notes.push(
                    "no sock_send_length/sock_recv_length tracepoints (Linux < 6.3): send and \
                     receive times come from tcp_info, and the last thread to do I/O is unknown"
                        .to_owned(),
                );
            }
            // Every context switch of the machine passes here: only for named processes.
            if extras.filtering && extras.sleep_timing {
                programs.push(SLEEP_TIMING);
            }
        }
    }
    if extras.filtering && extras.syscall_timing {
        programs.extend_from_slice(THREAD_PROGRAMS);
    }
    if extras.floor && btf.has_tracepoint(FLOOR.1.target()) {
        programs.push(FLOOR);
    }
    (programs, notes)
}
