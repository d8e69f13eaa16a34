//! observer: finds the TCP connections a server is stuck on, says why, and names the thread stuck
//! with them.
//!
//! The modules are layers, and each imports only from the layers before it:
//!
//! 1. `kernel`: what the kernel says: the BPF probes, sock_diag, /proc, BTF.
//! 2. `snapshot`: one poll's joined view of the watched sockets and processes, and where each
//!    lives (network namespace, container, pod).
//! 3. `detect`: pure rules from snapshots to findings, with their thresholds and policy.
//! 4. `alerts`: findings become alerts raised and cleared once, with the threads stuck on them.
//! 5. `act` and `report`: ending connections; the JSON-lines events on stdout, and the Prometheus
//!    metrics and health endpoints (`--metrics-addr`) counted from those events and each poll.
//! 6. `commands`: `watch`, `top`, `check` and `kill`, each a function of plain options.
//! 7. `cli`: the command line (the only module that knows clap).
//!
//! `units` and `fastmap` are small foundations any layer may use.
//!
//! Words used throughout:
//! - *cookie*: the kernel's 64-bit socket id, unique since boot; sock_diag and the probes both
//!   know a socket by it, so it is the join key and what acting on a socket is checked against.
//! - *owner*: the process and fd that hold a socket (from /proc/PID/fd).
//! - *orphan*: a connection its application closed that the kernel is still closing (unsent data,
//!   an unacknowledged FIN): no fd, no owner. Its *former owner* is the process the agent saw
//!   holding it or moving data through it, never a guess.
//! - *finding*: one rule's verdict on one socket or process in one poll; an *alert* is a finding
//!   that began, reported once, and *cleared* once when it ends.
//! - *thread syscall* / *thread TCP call*: what the probes record of a thread inside a socket
//!   syscall (`--syscall-timing`) or inside the kernel's TCP send or receive (fentry, kprobe).
//! - *attribution*: naming the threads stuck with a socket, from those records and /proc.
// What users and the kernel feed the agent never panics it: errors come back as values. (The
// parsers of outside input are fuzzed too; see fuzz/.)
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub(crate) mod act;
pub(crate) mod alerts;
pub mod cli;
pub(crate) mod commands;
pub(crate) mod detect;
pub(crate) mod fastmap;
pub(crate) mod kernel;
pub(crate) mod report;
pub(crate) mod snapshot;
pub(crate) mod units;

/// Entry points for the fuzzers (fuzz/), which feed the parsers of outside input anything.
#[cfg(fuzzing)]
pub mod fuzzing {
    use crate::{
        detect::Policy,
        kernel::{btf::Btf, procfs, sock_diag, tcp_info::TcpInfo},
    };

    /// A policy file's text.
    pub fn policy(text: &str) {
        let _ = Policy::parse(text);
    }

    /// A netlink datagram as sock_diag answers a dump, each message parsed as a socket.
    pub fn sock_diag(datagram: &[u8]) {
        for message in sock_diag::netlink_messages(datagram).flatten() {
            let _ = sock_diag::parse_diag_msg(message.payload);
        }
        let _ = TcpInfo::parse(datagram);
    }

    /// /proc/PID/stat, /proc/PID/task/TID/syscall and /proc/PID/cgroup text.
    pub fn procfs(text: &str) {
        let _ = procfs::ProcessEntry::parse(1, text);
        let _ = procfs::parse_syscall_line(text);
        let _ = procfs::cgroup::parse(text);
    }

    /// Kernel BTF, and the look-ups the agent makes in it.
    pub fn btf(data: &[u8]) {
        if let Ok(btf) = Btf::parse(data) {
            let _ = btf.member_offset("sock", &["__sk_common", "skc_state"]);
            let _ = btf.function_arity("tcp_recvmsg");
            let _ = btf.has_tracepoint("sock_send_length");
        }
    }
}
