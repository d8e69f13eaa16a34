//! observer: finds the TCP connections a server is stuck on, says why, and names the thread stuck
//! with them.
//!
//! The modules are layers, and each imports only from the layers before it:
//!
//! 1. `kernel`: what the kernel says: the BPF probes, sock_diag, /proc, BTF.
//! 2. `snapshot`: one poll's joined view of the watched sockets and processes.
//! 3. `detect`: pure rules from snapshots to findings, with their thresholds and policy.
//! 4. `alerts`: findings become alerts raised and cleared once, with the threads stuck on them.
//! 5. `act` and `report`: ending connections, and the JSON-lines events on stdout.
//! 6. `commands`: `watch`, `top`, `check` and `kill`, each a function of plain options.
//! 7. `cli`: the command line (the only module that knows clap).
//!
//! `units` and `fastmap` are small foundations any layer may use.
//!
//! Words used throughout:
//! - *cookie*: the kernel's 64-bit socket id, unique since boot; sock_diag and the probes both
//!   know a socket by it, so it is the join key and what acting on a socket is checked against.
//! - *owner*: the process and fd that hold a socket (from /proc/PID/fd).
//! - *finding*: one rule's verdict on one socket or process in one poll; an *alert* is a finding
//!   that began, reported once, and *cleared* once when it ends.
//! - *thread syscall* / *thread TCP call*: what the probes record of a thread inside a socket
//!   syscall (`--syscall-timing`) or inside the kernel's TCP send or receive (fentry, kprobe).
//! - *attribution*: naming the threads stuck with a socket, from those records and /proc.
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
