//! Loading the BPF programs into the kernel and reading what they record.
//!
//! A backend is a set of programs that fill the same maps with the same meaning; which one runs
//! depends on what the kernel allows (see `observer check`).
use std::collections::HashMap as StdHashMap;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::BtfTracePoint,
};
use observer_common::{
    Counter, KernelOffsets, MAX_SYSCALL_NR, ResetEvent, SockActivity, ThreadCall, syscall_kind,
};
use thiserror::Error;

use crate::btf::{Btf, BtfError};

/// The BPF object built from `observer-ebpf` (empty when built without the BPF toolchain).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer-probes"));

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// BTF tracepoints on socket send/receive, retransmit, state change and destroy (Linux 6.3+).
    Tracepoint,
}

impl Backend {
    /// Every backend, best first: the order `auto` tries them in.
    pub const ALL: &'static [Backend] = &[Backend::Tracepoint];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Tracepoint => "tracepoint",
        }
    }

    /// (program, tracepoint) pairs this backend attaches.
    fn programs(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Backend::Tracepoint => &[
                ("observer_tp_send", "sock_send_length"),
                ("observer_tp_recv", "sock_recv_length"),
                ("observer_tp_retransmit", "tcp_retransmit_skb"),
                ("observer_tp_state", "inet_sock_set_state"),
                ("observer_tp_destroy", "tcp_destroy_sock"),
                ("observer_tp_reset_sent", "tcp_send_reset"),
                ("observer_tp_reset_received", "tcp_receive_reset"),
            ],
        }
    }
}

/// Programs that time the watched processes' socket calls per thread. They run on every syscall
/// of the machine, so they are attached only when specific processes are watched (--pid).
const THREAD_PROGRAMS: &[(&str, &str)] = &[
    ("observer_tp_sys_enter", "sys_enter"),
    ("observer_tp_sys_exit", "sys_exit"),
    ("observer_tp_thread_exit", "sched_process_exit"),
];

/// Struct offsets the programs need, from the running kernel's BTF.
fn kernel_offsets(btf: &Btf) -> Result<KernelOffsets, BtfError> {
    let sock = |path: &[&str]| btf.member_offset("sock", path);
    let common = |field: &str| btf.member_offset("sock", &["__sk_common", field]);
    let tcp = |field: &str| btf.member_offset("tcp_sock", &[field]);
    // x86_64 passes the first syscall argument in di; arm64 and others in regs[0].
    let regs_arg0 = btf
        .member_offset("pt_regs", &["di"])
        .or_else(|_| btf.member_offset("pt_regs", &["regs"]))?;
    Ok(KernelOffsets {
        sk_protocol: sock(&["sk_protocol"])?,
        sk_type: sock(&["sk_type"])?,
        skc_family: common("skc_family")?,
        skc_state: common("skc_state")?,
        inet_sport: btf.member_offset("inet_sock", &["inet_sport"])?,
        skc_dport: common("skc_dport")?,
        skc_daddr: common("skc_daddr")?,
        skc_rcv_saddr: common("skc_rcv_saddr")?,
        skc_v6_daddr: common("skc_v6_daddr")?,
        skc_v6_rcv_saddr: common("skc_v6_rcv_saddr")?,
        tcp_rcv_nxt: tcp("rcv_nxt")?,
        tcp_copied_seq: tcp("copied_seq")?,
        tcp_write_seq: tcp("write_seq")?,
        tcp_snd_una: tcp("snd_una")?,
        regs_arg0,
        _pad: 0,
    })
}

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(
        "this observer binary was built without its BPF programs (bpf-linker or the nightly \
         toolchain was missing); build it with `cargo xtask build`"
    )]
    NoObject,
    #[error("{0}; the kernel must be built with CONFIG_DEBUG_INFO_BTF=y")]
    Btf(#[from] BtfError),
    #[error(
        "kernel has no tracepoint {tracepoint} (the {backend} backend needs Linux 6.3 or later)"
    )]
    MissingTracepoint { backend: &'static str, tracepoint: &'static str },
    #[error(
        "permission denied loading BPF programs: run as root (or with CAP_BPF and CAP_PERFMON)"
    )]
    NotPermitted,
    #[error("loading the BPF object failed: {0}")]
    Object(#[source] aya::EbpfError),
    #[error("kernel rejected program {program} ({tracepoint}): {detail}")]
    Program { program: &'static str, tracepoint: &'static str, detail: String },
}

fn is_eperm(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.raw_os_error() == Some(libc::EPERM)
        {
            return true;
        }
        cur = e.source();
    }
    false
}

pub struct LoadOptions {
    /// Record sends and receives only for these processes (all processes when empty).
    pub pids: Vec<u32>,
    pub max_sockets: u32,
}

/// Loaded and attached programs plus handles on their maps. Dropping it detaches everything.
pub struct Probes {
    backend: Backend,
    tracks_threads: bool,
    sockets: HashMap<MapData, u64, SockActivity>,
    counters: PerCpuArray<MapData, u64>,
    thread_calls: HashMap<MapData, u32, ThreadCall>,
    accept_errors: HashMap<MapData, u32, u64>,
    resets: RingBuf<MapData>,
    // Keeps the programs loaded and attached.
    _ebpf: Ebpf,
}

impl Probes {
    pub fn load(backend: Backend, options: &LoadOptions, btf: &Btf) -> Result<Self, ProbeError> {
        if OBJECT.is_empty() {
            return Err(ProbeError::NoObject);
        }
        let tracks_threads = !options.pids.is_empty();
        let mut programs = backend.programs().to_vec();
        if tracks_threads {
            programs.extend_from_slice(THREAD_PROGRAMS);
        }
        for &(_, tracepoint) in &programs {
            if !btf.has_tracepoint(tracepoint) {
                return Err(ProbeError::MissingTracepoint { backend: backend.name(), tracepoint });
            }
        }
        let offsets = kernel_offsets(btf)?;
        let filter_pids = u32::from(tracks_threads);
        let aya_btf = aya::Btf::from_sys_fs().map_err(|e| ProbeError::Object(e.into()))?;

        let mut ebpf =
            EbpfLoader::new()
                .btf(Some(&aya_btf))
                .override_global("OFFSETS", &offsets, true)
                .override_global("FILTER_PIDS", &filter_pids, true)
                .map_max_entries("SOCKETS", options.max_sockets)
                .load(OBJECT)
                .map_err(|e| {
                    if is_eperm(&e) { ProbeError::NotPermitted } else { ProbeError::Object(e) }
                })?;

        let mut watched: HashMap<_, u32, u8> = take_map(&mut ebpf, "WATCHED_PIDS")?;
        for pid in &options.pids {
            watched.insert(pid, 1, 0).map_err(|e| ProbeError::Object(e.into()))?;
        }
        let mut syscalls: Array<_, u32> = take_map(&mut ebpf, "TRACKED_SYSCALLS")?;
        let tracked = crate::syscalls::SOCKET_CALLS.iter().filter(|c| {
            // The probes read the fd from the first argument only.
            c.kind != syscall_kind::NONE
                && c.fd_arg == 0
                && (0..i64::from(MAX_SYSCALL_NR)).contains(&c.nr)
        });
        for call in tracked {
            syscalls.set(call.nr as u32, call.kind, 0).map_err(|e| ProbeError::Object(e.into()))?;
        }
        for &(program, tracepoint) in &programs {
            attach_btf_tracepoint(&mut ebpf, program, tracepoint, &aya_btf)?;
        }
        Ok(Probes {
            backend,
            tracks_threads,
            sockets: take_map(&mut ebpf, "SOCKETS")?,
            counters: take_map(&mut ebpf, "COUNTERS")?,
            thread_calls: take_map(&mut ebpf, "THREAD_CALLS")?,
            accept_errors: take_map(&mut ebpf, "ACCEPT_ERRORS")?,
            resets: take_map(&mut ebpf, "RESETS")?,
            _ebpf: ebpf,
        })
    }

    /// Whether per-thread call timing (blocked_ms, accept errors) is being recorded.
    pub fn tracks_threads(&self) -> bool {
        self.tracks_threads
    }

    /// Each tracked thread's current or last socket call, by thread id.
    pub fn thread_calls(&self) -> StdHashMap<u32, ThreadCall> {
        self.thread_calls.iter().filter_map(Result::ok).collect()
    }

    /// accept() failures for lack of fds, by process id, since the agent started.
    pub fn accept_errors(&self) -> StdHashMap<u32, u64> {
        self.accept_errors.iter().filter_map(Result::ok).collect()
    }

    /// Data-losing resets reported since the last call.
    pub fn drain_resets(&mut self) -> Vec<ResetEvent> {
        let mut events = Vec::new();
        while let Some(item) = self.resets.next() {
            if item.len() >= size_of::<ResetEvent>() {
                // SAFETY: the programs write whole ResetEvents; read_unaligned copes with any
                // alignment of the ring buffer slot.
                events
                    .push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<ResetEvent>()) });
            }
        }
        events
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Every tracked socket's activity, by cookie.
    pub fn activity(&self) -> StdHashMap<u64, SockActivity> {
        // Entries can vanish between listing a key and reading it (the socket was destroyed);
        // those are skipped, not errors.
        self.sockets.iter().filter_map(Result::ok).collect()
    }

    /// Sum over CPUs of each counter.
    pub fn counters(&self) -> StdHashMap<&'static str, u64> {
        Counter::ALL
            .iter()
            .map(|&c| {
                let total = self.counters.get(&(c as u32), 0).map(|v| v.iter().sum()).unwrap_or(0);
                (c.name(), total)
            })
            .collect()
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, ProbeError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| {
        ProbeError::Object(aya::EbpfError::MapError(aya::maps::MapError::InvalidName {
            name: name.into(),
        }))
    })?;
    T::try_from(map).map_err(|e| ProbeError::Object(e.into()))
}

fn attach_btf_tracepoint(
    ebpf: &mut Ebpf,
    program: &'static str,
    tracepoint: &'static str,
    btf: &aya::Btf,
) -> Result<(), ProbeError> {
    let failed = |e: &dyn std::fmt::Display| ProbeError::Program {
        program,
        tracepoint,
        detail: e.to_string(),
    };
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| failed(&"missing from the BPF object"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| failed(&e))?;
    prog.load(tracepoint, btf).map_err(|e| {
        if is_eperm(&e) { ProbeError::NotPermitted } else { failed(&verifier_detail(&e)) }
    })?;
    prog.attach().map_err(|e| failed(&e))?;
    Ok(())
}

/// The verifier log is the only useful part of a load failure; keep its last lines.
fn verifier_detail(err: &aya::programs::ProgramError) -> String {
    match err {
        aya::programs::ProgramError::LoadError { io_error, verifier_log } => {
            let log = verifier_log.to_string();
            let tail: Vec<&str> =
                log.lines().rev().take(6).collect::<Vec<_>>().into_iter().rev().collect();
            format!("{io_error}: {}", tail.join(" | "))
        }
        other => other.to_string(),
    }
}
