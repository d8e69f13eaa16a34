//! `observer watch`: the poll loop. Each tick: collect -> snapshot -> detect -> alerts -> report.
use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    time::MissedTickBehavior,
};

use crate::{
    act::{Mode, respond::Responder},
    alerts::{AlertBook, ClearWhy, Cleared, attribution},
    detect::{Detector, KernelSettings, Policy, Reason, Target, thresholds::Overrides},
    kernel::{
        btf::Btf,
        probes::{LoadOptions, ProbeChoice, Probes},
        procfs::{self, ProcessIdentity},
        system,
    },
    report::{
        ActionEvent, AlertEvent, ClearedEvent, Event, Output, ProbeCost, StartedEvent, StatsEvent,
        timestamp,
    },
    snapshot::Collector,
};

/// What `observer watch` was asked to do.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// Watched processes; empty watches every TCP socket in the agent's network namespace.
    pub pids: Vec<u32>,
    /// Only connections with one of these ports at either end (all when empty).
    pub ports: Vec<u16>,
    pub poll_interval: Duration,
    pub probes: ProbeChoice,
    /// The policy file, if any.
    pub config: Option<PathBuf>,
    /// Thresholds given on the command line: they win over the policy file.
    pub thresholds: Overrides,
    /// How often to print `stats`; zero for never.
    pub stats_interval: Duration,
    pub action: Option<ActionOptions>,
    pub syscall_timing: bool,
    pub probe_stats: bool,
    pub max_sockets: u32,
}

/// `--action` and its companions.
#[derive(Clone, Debug, PartialEq)]
pub struct ActionOptions {
    pub mode: Mode,
    pub reasons: Vec<Reason>,
    pub after: Duration,
    pub max_per_minute: usize,
    pub dry_run: bool,
}

/// Consecutive failed polls after which the agent gives up instead of silently seeing nothing.
const MAX_FAILED_POLLS: u32 = 10;

pub async fn run(args: Options) -> anyhow::Result<()> {
    let missing = system::missing_for_watch(system::effective_capabilities());
    if !missing.is_empty() {
        bail!(
            "observer needs root to watch sockets (missing {}): run it with sudo",
            missing.join(", ")
        );
    }
    // Installed before anything is loaded, so a stop request that arrives while the probes load
    // still ends in a clean `stopped` instead of the default action killing the agent.
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let policy = match &args.config {
        Some(path) => Policy::from_file(path)?,
        None => Policy::default(),
    }
    .with_command_line(args.thresholds.clone());
    let mut targets = Vec::new();
    for &pid in &args.pids {
        targets.push(ProcessIdentity::of(pid)?);
    }
    system::raise_memlock_limit();
    let btf = Btf::from_kernel()?;
    let pids: Vec<u32> = targets.iter().map(|t| t.pid).collect();
    let options = LoadOptions {
        pids: pids.clone(),
        max_sockets: args.max_sockets,
        syscall_timing: args.syscall_timing,
    };
    let (probes, skipped) = Probes::load_best(args.probes, &options, &btf)?;
    // Only loading needs the kernel's type information: several megabytes, freed now.
    drop(btf);
    system::release_free_memory();
    for skip in &skipped {
        log::info!("not using the {} backend: {}", skip.backend.name(), skip.error);
    }
    for note in probes.notes() {
        log::warn!("{} backend: {note}", probes.backend().name());
    }
    let mut collector = Collector::new(&pids, &args.ports)?;
    // Kernel BPF run-time statistics stay on while this fd is open.
    let _stats_enabled = if args.probe_stats {
        Some(aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF statistics")?)
    } else {
        None
    };
    let kernel = KernelSettings { tcp_retries2: system::tcp_retries2() };
    let responder = args
        .action
        .as_ref()
        .map(|a| Responder::new(a.mode, a.reasons.clone(), a.after, a.max_per_minute, a.dry_run));
    let mut watch = Watch {
        responder,
        detector: Detector::new(policy, kernel),
        book: AlertBook::default(),
        out: Output::new(std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock())),
        probes,
        stats: Stats { probe_stats: args.probe_stats, ..Stats::default() },
    };

    watch.emit(Event::Started(StartedEvent {
        ts: timestamp(SystemTime::now()),
        version: env!("CARGO_PKG_VERSION"),
        backend: watch.probes.backend().name(),
        backend_notes: watch.probes.notes().to_vec(),
        pids: pids.clone(),
        ports: args.ports.clone(),
        kernel: system::kernel_release(),
        poll_interval_ms: args.poll_interval.as_millis() as u64,
        call_timing: watch.probes.times_calls(),
        syscall_timing: watch.probes.tracks_threads(),
        config: args.config.as_ref().map(|p| p.display().to_string()),
        thresholds: watch.detector.policy().base(),
    }))?;
    watch.flush()?;
    log::info!(
        "watching {} with the {} backend",
        if pids.is_empty() { "every TCP socket".to_owned() } else { format!("pids {pids:?}") },
        watch.probes.backend().name()
    );

    let mut ticks = tokio::time::interval(args.poll_interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_stats = Instant::now();
    let mut failed_polls = 0;

    let stop_reason = loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = interrupt.recv() => break "signal",
            _ = terminate.recv() => break "signal",
        }
        let exited: Vec<u32> = targets.iter().filter(|t| !t.is_alive()).map(|t| t.pid).collect();
        targets.retain(|t| !exited.contains(&t.pid));
        collector.retain_pids(&targets.iter().map(|t| t.pid).collect::<Vec<_>>());

        match watch.poll(&mut collector) {
            Ok(()) => failed_polls = 0,
            Err(err) => {
                failed_polls += 1;
                log::warn!("poll failed ({failed_polls} in a row): {err:#}");
                if failed_polls >= MAX_FAILED_POLLS {
                    return Err(err.context(format!("{MAX_FAILED_POLLS} polls in a row failed")));
                }
            }
        }
        for pid in exited {
            watch.emit(Event::TargetExited { ts: timestamp(SystemTime::now()), pid })?;
        }
        if !pids.is_empty() && targets.is_empty() {
            let leftovers = watch.book.clear_all(ClearWhy::ProcessExited);
            watch.emit_cleared(leftovers)?;
            break "targets_exited";
        }
        if !args.stats_interval.is_zero() && last_stats.elapsed() >= args.stats_interval {
            last_stats = Instant::now();
            watch.emit_stats()?;
        }
        // Everything this tick printed reaches the reader now.
        watch.flush()?;
        // A poll of a big table allocates tens of MB for a moment (and the first one reads every
        // fd link): give it back rather than carry the peak between polls.
        if watch.stats.polls == 1 || watch.stats.sockets >= 20_000 {
            system::release_free_memory();
        }
        if watch.stats.polls == 1 {
            // From here on, the reported peak is that of steady operation, not of start-up.
            system::reset_peak_memory();
        }
    };
    watch.emit(Event::Stopped { ts: timestamp(SystemTime::now()), reason: stop_reason })?;
    watch.flush()?;
    // Dropping `watch` detaches and unloads every program.
    Ok(())
}

struct Watch<W: Write> {
    responder: Option<Responder>,
    detector: Detector,
    book: AlertBook,
    out: Output<W>,
    probes: Probes,
    stats: Stats,
}

#[derive(Default)]
struct Stats {
    polls: u64,
    sockets: usize,
    tracked: usize,
    map_entries: usize,
    probe_stats: bool,
    last_poll: Duration,
    max_poll: Duration,
}

impl<W: Write> Watch<W> {
    fn emit(&mut self, event: Event) -> anyhow::Result<()> {
        self.out.emit(&event).context("stdout was closed; stopping")
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        self.out.flush().context("stdout was closed; stopping")
    }

    fn emit_cleared(&mut self, cleared: Vec<Cleared>) -> anyhow::Result<()> {
        for c in cleared {
            self.emit(Event::AlertCleared(ClearedEvent::new(SystemTime::now(), c)))?;
        }
        Ok(())
    }

    fn poll(&mut self, collector: &mut Collector) -> anyhow::Result<()> {
        let started = Instant::now();
        let snapshot = collector.collect(&mut self.probes)?;
        let detecting = Instant::now();
        let findings = self.detector.observe(&snapshot);
        let (raised, cleared) = self.book.update(&snapshot, &findings);
        let elapsed = started.elapsed();
        log::debug!("detect: {:.1}ms", detecting.elapsed().as_secs_f64() * 1e3);
        self.stats.polls += 1;
        self.stats.sockets = snapshot.sockets.len();
        self.stats.tracked = snapshot.sockets.iter().filter(|s| s.activity.is_some()).count();
        self.stats.map_entries = snapshot.map_entries;
        self.stats.last_poll = elapsed;
        self.stats.max_poll = self.stats.max_poll.max(elapsed);

        self.emit_cleared(cleared)?;
        let now = SystemTime::now();
        let mut thread_cache = HashMap::new();
        // One at a time: a storm of 100k alerts must not be built in memory before printing.
        for (finding, identity) in raised {
            let socket = match finding.target {
                Target::Socket(cookie) => snapshot.find(cookie),
                Target::Process(_) => None,
            };
            let threads = attribution::for_finding(&snapshot, finding, &mut thread_cache);
            let alert = AlertEvent::new(now, snapshot.taken_ns, finding, identity, socket, threads);
            self.emit(Event::Alert(alert))?;
        }
        let actions: Vec<ActionEvent> = match &mut self.responder {
            Some(responder) => responder
                .due(&self.book, &snapshot)
                .into_iter()
                .map(|due| {
                    let result = responder.perform(&due, collector.diag_for(due.netns));
                    let (mode, dry_run) = (responder.mode(), responder.dry_run());
                    ActionEvent::new(
                        SystemTime::now(),
                        mode,
                        dry_run,
                        result,
                        due.identity,
                        Some(due.reason),
                    )
                })
                .collect(),
            None => Vec::new(),
        };
        for action in actions {
            self.emit(Event::Action(action))?;
        }
        collector.recycle(snapshot);
        Ok(())
    }

    fn emit_stats(&mut self) -> anyhow::Result<()> {
        let probe_counters: BTreeMap<_, _> = self.probes.counters().into_iter().collect();
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let event = StatsEvent {
            ts: timestamp(SystemTime::now()),
            polls: self.stats.polls,
            sockets: self.stats.sockets,
            tracked: self.stats.tracked,
            alerts_active: self.book.active_count(),
            last_poll_ms: ms(self.stats.last_poll),
            max_poll_ms: ms(self.stats.max_poll),
            map_entries: self.stats.map_entries,
            map_capacity: self.probes.socket_capacity(),
            probe_counters,
            probe_cost: self.stats.probe_stats.then(|| {
                self.probes
                    .program_costs()
                    .into_iter()
                    .map(|(name, runs, ns)| {
                        let ns_per_run = if runs == 0 {
                            0.0
                        } else {
                            (ns as f64 / runs as f64 * 10.0).round() / 10.0
                        };
                        (name, ProbeCost { runs, ns_per_run })
                    })
                    .collect()
            }),
            rss_kib: procfs::own_memory_kib("VmRSS"),
            peak_rss_kib: procfs::own_memory_kib("VmHWM"),
        };
        self.emit(Event::Stats(event))
    }
}
