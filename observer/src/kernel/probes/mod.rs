//! Loading the BPF programs into the kernel and reading what they record.
//!
//! A backend is a set of programs that fill the same maps with the same meaning, so detection
//! and output do not care which one runs: `fentry` (fentry/fexit on the TCP send and receive
//! functions), `kprobe` (kprobes/kretprobes on the same), `tracepoint` (BTF tracepoints only).
//! All three share BTF tracepoints for retransmits, state changes, destruction and resets.
use std::{
    collections::HashMap as StdHashMap,
    os::fd::{AsFd, BorrowedFd},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, FEntry, FExit, KProbe, ProgramError},
};
use observer_common::{
    Counter, KernelOffsets, MAX_SYSCALL_NR, ResetEvent, THREAD_SLEEP_SLOTS, ThreadSleep,
    ThreadSyscall, ThreadTcpCall, syscall_kind,
};
use thiserror::Error;

pub use self::plan::{Backend, ProbeChoice, Store};
use self::plan::{Extras, Hook, plan, times_sleeps, times_syscalls};
use super::btf::{Btf, BtfError};

mod batch;
mod plan;

/// What the probes recorded about a socket that detection and attribution use.
pub use observer_common::SockActivity as Activity;

/// The BPF object built from `observer-ebpf` (empty when built without the BPF toolchain).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer-probes"));

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(
        "this observer binary was built without its BPF programs (bpf-linker or the nightly \
         toolchain was missing); build it with `cargo xtask build`"
    )]
    NoObject,
    #[error("{0}; the kernel must be built with CONFIG_DEBUG_INFO_BTF=y")]
    Btf(#[from] BtfError),
    #[error("kernel has no tracepoint {0}")]
    MissingTracepoint(&'static str),
    #[error("no probe backend was tried")]
    NoBackend,
    /// Why, in words that name the fix (missing capabilities, a seccomp filter, an LSM).
    #[error("{0}")]
    NotPermitted(String),
    #[error("loading the BPF object failed: {0}")]
    Object(Condensed),
    #[error("{backend} is unavailable on this kernel: {program} on {target}: {detail}")]
    Unavailable {
        backend: &'static str,
        program: &'static str,
        target: &'static str,
        detail: String,
    },
}

/// An aya error as one line: its whole cause chain, with a verifier or BTF log cut to its last
/// lines (which say what failed). The log can be thousands of lines.
#[derive(Debug)]
pub struct Condensed(String);

impl From<aya::EbpfError> for Condensed {
    fn from(e: aya::EbpfError) -> Self {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        Condensed::text(&text)
    }
}

impl Condensed {
    /// The first line, and the last three when there are more than four.
    fn text(text: &str) -> Condensed {
        let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        let joined = |lines: &[&str]| lines.join(" | ");
        Condensed(if lines.len() <= 4 {
            joined(&lines)
        } else {
            format!("{} | ... | {}", lines[0], joined(&lines[lines.len() - 3..]))
        })
    }
}

impl std::fmt::Display for Condensed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn errno_of(err: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.raw_os_error().is_some()
        {
            return io.raw_os_error();
        }
        cur = e.source();
    }
    None
}

/// The probes' table of when each watched thread last went to sleep: a slot per thread id
/// modulo its size, holding the id it speaks for.
pub struct SleepTable(aya::maps::Array<MapData, ThreadSleep>);

impl SleepTable {
    /// When thread `tid` last went to sleep, if the table holds that for it.
    pub fn since(&self, tid: u32) -> Option<u64> {
        let slot = self.0.get(&(tid % THREAD_SLEEP_SLOTS), 0).ok()?;
        (slot.tid == tid && slot.since_ns != 0).then_some(slot.since_ns)
    }
}

impl std::fmt::Debug for SleepTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SleepTable")
    }
}

pub struct LoadOptions {
    /// Record calls only for these processes (ids in the agent's pid namespace; the set can
    /// change later with [`Probes::watch`]), or, when `None`, for every process.
    pub only: Option<Vec<u32>>,
    pub max_sockets: u32,
    /// Time the watched processes' socket syscalls per thread (needs `only`). This hooks every
    /// syscall of the machine, so it is asked for, not default.
    pub syscall_timing: bool,
    /// Follow the watched threads' context switches to time blocked threads (tracepoint
    /// backend; needs `only`).
    pub sleep_timing: bool,
    /// Also attach an empty program, whose measured cost is the floor of every probe's.
    pub floor: bool,
}

/// Loaded and attached programs plus handles on their maps. Dropping it detaches everything.
pub struct Probes {
    backend: Backend,
    tracks_threads: bool,
    times_sleeps: bool,
    notes: Vec<String>,
    /// Where the probes keep each socket's record: socket storage (read back in the sock_diag
    /// walk) or a map by cookie (read in batches).
    records: Records,
    socket_capacity: u32,
    /// The attached programs, for their run-time statistics.
    program_names: Vec<&'static str>,
    counters: PerCpuArray<MapData, u64>,
    thread_syscalls: HashMap<MapData, u32, ThreadSyscall>,
    thread_tcp_calls: HashMap<MapData, u32, ThreadTcpCall>,
    /// Thread id -> when it last went to sleep (tracepoint backend, named processes).
    thread_sleeps: Arc<SleepTable>,
    accept_errors: HashMap<MapData, u32, u64>,
    resets: RingBuf<MapData>,
    /// The watched-process bitmap (see `WATCHED` in the probes).
    watched: Array<MapData, u64>,
    watched_words: u32,
    // Keeps the programs loaded and attached.
    _ebpf: Ebpf,
}

/// Where the records are, and the map that holds them.
enum Records {
    InSocket(MapData),
    ByCookie(MapData),
}

/// A backend that could not be used, and why.
#[derive(Debug)]
pub struct Skipped {
    pub backend: Backend,
    pub error: ProbeError,
}

impl Probes {
    /// Loads the first of `choice`'s candidates that loads and attaches. Returns it with the
    /// reasons the better ones were skipped; fails with the last reason if none works.
    pub fn load_best(
        choice: ProbeChoice,
        options: &LoadOptions,
        btf: &Btf,
    ) -> Result<(Probes, Vec<Skipped>), ProbeError> {
        let mut skipped = Vec::new();
        // Parsed once for every attempt: megabytes of type information.
        let aya_btf = aya::Btf::from_sys_fs()
            .map_err(|e| ProbeError::Object(aya::EbpfError::from(e).into()))?;
        for &backend in choice.candidates() {
            match Probes::load_with(backend, options, btf, &aya_btf) {
                Ok(probes) => return Ok((probes, skipped)),
                // Privileges or a missing object do not depend on the backend: stop here.
                Err(
                    e @ (ProbeError::NotPermitted(_) | ProbeError::NoObject | ProbeError::Btf(_)),
                ) => {
                    return Err(e);
                }
                Err(error) => skipped.push(Skipped { backend, error }),
            }
        }
        match skipped.pop() {
            Some(last) => Err(last.error),
            // Every choice names at least one backend.
            None => Err(ProbeError::NoBackend),
        }
    }

    pub fn load(backend: Backend, options: &LoadOptions, btf: &Btf) -> Result<Self, ProbeError> {
        let aya_btf = aya::Btf::from_sys_fs()
            .map_err(|e| ProbeError::Object(aya::EbpfError::from(e).into()))?;
        Probes::load_with(backend, options, btf, &aya_btf)
    }

    fn load_with(
        backend: Backend,
        options: &LoadOptions,
        btf: &Btf,
        aya_btf: &aya::Btf,
    ) -> Result<Self, ProbeError> {
        if OBJECT.is_empty() {
            return Err(ProbeError::NoObject);
        }
        let extras = Extras {
            filtering: options.only.is_some(),
            syscall_timing: options.syscall_timing,
            sleep_timing: options.sleep_timing,
            floor: options.floor,
        };
        let (programs, notes) = plan(backend, btf, extras);
        for (_, hook) in &programs {
            if let Hook::Tracepoint(name) = hook
                && !btf.has_tracepoint(name)
            {
                return Err(ProbeError::MissingTracepoint(name));
            }
        }
        let offsets = kernel_offsets(btf)?;
        let filtering = u32::from(options.only.is_some());
        // Ids are translated into the agent's pid namespace only when it is not the initial one.
        let (pidns_dev, pidns_ino) = super::system::own_pid_namespace()
            .filter(|ns| !ns.is_initial())
            .map_or((0, 0), |ns| (ns.dev, ns.ino));
        let watched_words = watched_words(super::system::pid_max());

        let mut ebpf = EbpfLoader::new()
            .btf(Some(aya_btf))
            .override_global("OFFSETS", &offsets, true)
            .override_global("FILTERING", &filtering, true)
            .override_global("PIDNS_DEV", &pidns_dev, true)
            .override_global("PIDNS_INO", &pidns_ino, true)
            .map_max_entries("SOCKETS", options.max_sockets)
            .map_max_entries("WATCHED", watched_words)
            .load(OBJECT)
            .map_err(|e| {
                if errno_of(&e) == Some(libc::EPERM) {
                    ProbeError::NotPermitted(super::privileges::load_refused())
                } else {
                    ProbeError::Object(e.into())
                }
            })?;

        let watched: Array<_, u64> = take_map(&mut ebpf, "WATCHED")?;
        let mut syscalls: Array<_, u32> = take_map(&mut ebpf, "TRACKED_SYSCALLS")?;
        let tracked = super::syscalls::SOCKET_SYSCALLS.iter().filter(|c| {
            // The probes read the fd from the first argument only.
            c.kind != syscall_kind::NONE
                && c.fd_arg == 0
                && (0..i64::from(MAX_SYSCALL_NR)).contains(&c.nr)
        });
        for call in tracked {
            syscalls
                .set(call.nr as u32, call.kind, 0)
                .map_err(|e| ProbeError::Object(aya::EbpfError::from(e).into()))?;
        }
        for &(program, hook) in &programs {
            attach(&mut ebpf, backend, program, hook, aya_btf)?;
        }
        let records =
            match (backend.store(), ebpf.take_map("SK_ACTIVITY"), ebpf.take_map("SOCKETS")) {
                (Store::InSocket, Some(aya::maps::Map::SkStorage(data)), _) => {
                    Records::InSocket(data)
                }
                (Store::ByCookie, _, Some(aya::maps::Map::HashMap(data))) => {
                    Records::ByCookie(data)
                }
                _ => {
                    return Err(ProbeError::Object(
                        aya::EbpfError::MapError(aya::maps::MapError::InvalidName {
                            name: "SK_ACTIVITY or SOCKETS".into(),
                        })
                        .into(),
                    ));
                }
            };
        let mut probes = Probes {
            backend,
            tracks_threads: times_syscalls(&programs),
            times_sleeps: times_sleeps(&programs),
            notes,
            records,
            socket_capacity: options.max_sockets,
            program_names: programs.iter().map(|(name, _)| *name).collect(),
            counters: take_map(&mut ebpf, "COUNTERS")?,
            thread_syscalls: take_map(&mut ebpf, "THREAD_SYSCALLS")?,
            thread_tcp_calls: take_map(&mut ebpf, "THREAD_TCP_CALLS")?,
            thread_sleeps: Arc::new(SleepTable(take_map(&mut ebpf, "THREAD_SLEEPS")?)),
            accept_errors: take_map(&mut ebpf, "ACCEPT_ERRORS")?,
            resets: take_map(&mut ebpf, "RESETS")?,
            watched,
            watched_words,
            _ebpf: ebpf,
        };
        for &pid in options.only.iter().flatten() {
            probes
                .watch(pid, true)
                .map_err(|e| ProbeError::Object(aya::EbpfError::from(e).into()))?;
        }
        Ok(probes)
    }

    /// Starts (`true`) or stops recording the calls of process `pid`, while the probes run.
    pub fn watch(&mut self, pid: u32, on: bool) -> Result<(), aya::maps::MapError> {
        let (word, bit) = (pid / 64, 1u64 << (pid % 64));
        if word >= self.watched_words {
            // Above pid_max as it was at load: such a process cannot exist yet.
            return Ok(());
        }
        let old = self.watched.get(&word, 0)?;
        let new = if on { old | bit } else { old & !bit };
        if new != old {
            self.watched.set(word, new, 0)?;
        }
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// What this backend cannot do on this kernel.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Whether this backend times threads inside TCP sends and receives itself.
    pub fn times_calls(&self) -> bool {
        self.backend != Backend::Tracepoint
    }

    /// Whether threads' sleeps are timed (tracepoint backend, named processes): how long a
    /// thread blocked now has been waiting.
    pub fn times_sleeps(&self) -> bool {
        self.times_sleeps
    }

    /// Whether per-thread syscall timing (blocked_ms in read/write, accept errors) is recorded.
    pub fn tracks_threads(&self) -> bool {
        self.tracks_threads
    }

    /// The socket storage map to name in sock_diag dumps, which then carry each socket's
    /// record; `None` when records are kept by cookie instead (see [`Self::for_each_activity`]).
    pub fn activity_in_dump(&self) -> Option<BorrowedFd<'_>> {
        match &self.records {
            Records::InSocket(map) => Some(map.fd().as_fd()),
            Records::ByCookie(_) => None,
        }
    }

    /// Calls `each` with every socket's cookie and record kept by cookie, a batch at a time;
    /// returns how many entries the map holds (none are kept so with socket storage). A failed
    /// read fails the poll: half the activity would make tracked sockets look idle.
    pub fn for_each_activity(&self, mut each: impl FnMut(u64, Activity)) -> std::io::Result<usize> {
        let Records::ByCookie(map) = &self.records else { return Ok(0) };
        let mut entries = 0;
        batch::for_each::<u64, Activity>(map.fd().as_fd(), |cookie, a| {
            entries += 1;
            each(cookie, a);
        })?;
        Ok(entries)
    }

    /// The socket map's capacity (`--max-sockets`); `None` for socket storage, which has none.
    pub fn socket_capacity(&self) -> Option<u32> {
        matches!(self.records, Records::ByCookie(_)).then_some(self.socket_capacity)
    }

    /// Kernel time spent in each attached program: (name, runs, total ns). Only counted while
    /// BPF statistics are enabled (`--probe-stats`).
    pub fn program_costs(&self) -> Vec<(&'static str, u64, u64)> {
        self.program_names
            .iter()
            .filter_map(|&name| {
                let info = self._ebpf.program(name)?.info().ok()?;
                Some((name, info.run_count(), info.run_time().as_nanos() as u64))
            })
            .collect()
    }

    /// Each tracked thread's current or last socket syscall, by thread id.
    pub fn thread_syscalls(&self) -> StdHashMap<u32, ThreadSyscall> {
        self.thread_syscalls.iter().filter_map(Result::ok).collect()
    }

    /// When watched threads last went to sleep (tracepoint backend), looked up one thread at a
    /// time: only the few threads found blocked on a watched socket are ever asked about.
    pub fn sleep_table(&self) -> Arc<SleepTable> {
        self.thread_sleeps.clone()
    }

    /// Threads inside a TCP send or receive (fentry and kprobe backends), by thread id.
    pub fn thread_tcp_calls(&self) -> StdHashMap<u32, ThreadTcpCall> {
        self.thread_tcp_calls
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, c)| c.enter_ns != 0)
            .collect()
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

/// Words of the watched-process bitmap for process ids below `pid_max`.
fn watched_words(pid_max: u32) -> u32 {
    pid_max.clamp(64, 1 << 22).div_ceil(64)
}

/// A task name as the probes copy it (`bpf_get_current_comm`): NUL-padded bytes.
pub fn comm_str(raw: &[u8; 16]) -> String {
    let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..len]).into_owned()
}

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
        skc_cookie: common("skc_cookie")?,
    })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, ProbeError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| {
        ProbeError::Object(
            aya::EbpfError::MapError(aya::maps::MapError::InvalidName { name: name.into() }).into(),
        )
    })?;
    T::try_from(map).map_err(|e| ProbeError::Object(aya::EbpfError::from(e).into()))
}

fn attach(
    ebpf: &mut Ebpf,
    backend: Backend,
    program: &'static str,
    hook: Hook,
    btf: &aya::Btf,
) -> Result<(), ProbeError> {
    let unavailable = |detail: String| ProbeError::Unavailable {
        backend: backend.name(),
        program,
        target: hook.target(),
        detail,
    };
    let prog = ebpf
        .program_mut(program)
        .ok_or_else(|| unavailable("missing from the BPF object".into()))?;
    let result: Result<(), ProgramError> = (|| {
        match hook {
            Hook::Tracepoint(name) => {
                let p: &mut BtfTracePoint = prog.try_into()?;
                p.load(name, btf)?;
                p.attach()?;
            }
            Hook::FEntry(name) => {
                let p: &mut FEntry = prog.try_into()?;
                p.load(name, btf)?;
                p.attach()?;
            }
            Hook::FExit(name) => {
                let p: &mut FExit = prog.try_into()?;
                p.load(name, btf)?;
                p.attach()?;
            }
            Hook::KProbe(name) | Hook::KRetProbe(name) => {
                let p: &mut KProbe = prog.try_into()?;
                p.load()?;
                p.attach(name, 0)?;
            }
        }
        Ok(())
    })();
    result.map_err(|e| unavailable(explain(&e)))
}

/// A load or attach failure in words an operator can act on.
fn explain(err: &ProgramError) -> String {
    let errno = errno_of(err);
    let root = nix::unistd::geteuid().is_root();
    match err {
        ProgramError::LoadError { verifier_log, .. } if errno == Some(libc::EPERM) => {
            let log = verifier_log.to_string();
            if log.trim().is_empty() && root {
                "the kernel refused to load it (EPERM for root, empty verifier log: function \
                 tracing is locked down here)"
                    .into()
            } else if log.trim().is_empty() {
                "the kernel refused to load it (EPERM, empty verifier log: function tracing is \
                 locked down here, or it needs privileges this process lacks)"
                    .into()
            } else {
                format!("the kernel refused to load it: {}", last_lines(&log))
            }
        }
        ProgramError::LoadError { io_error, verifier_log } => {
            format!("{io_error}: {}", last_lines(&verifier_log.to_string()))
        }
        other if other.to_string().contains("event_source/devices/kprobe") => {
            "this kernel has no kprobe support (no kprobe PMU in /sys/bus/event_source; \
             CONFIG_KPROBES is off)"
                .into()
        }
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        }
    }
}

/// The verifier log is long; its last lines say what failed.
fn last_lines(log: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(4)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_loader_errors_become_one_line() {
        let log: String = (0..100).map(|i| format!("[{i}] TYPE\n")).collect();
        let text =
            format!("BTF_LOAD: Invalid argument. Verifier output: magic\n{log}Invalid name\n");
        assert_eq!(
            Condensed::text(&text).to_string(),
            "BTF_LOAD: Invalid argument. Verifier output: magic | ... | [98] TYPE | [99] TYPE | \
             Invalid name"
        );
        assert_eq!(Condensed::text("one\n\ntwo").to_string(), "one | two");
    }

    #[test]
    fn verifier_log_tail() {
        assert_eq!(last_lines("a\nb\n\nc\nd\ne\n"), "b | c | d | e");
        assert_eq!(last_lines(""), "");
    }
}
