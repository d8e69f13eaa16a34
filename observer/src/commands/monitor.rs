//! The agent's engine, shared by `watch` and `top`: probes loaded, targets followed, and one poll
//! at a time from the kernel's view to events: collect -> snapshot -> detect -> alerts -> actions.
use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};
use observer_common::Counter;

use super::watch::Options;
use crate::{
    act::respond::Responder,
    alerts::{AlertBook, ClearWhy, attribution},
    detect::{Detector, Finding, KernelSettings, Policy, Target},
    kernel::{
        btf::Btf,
        privileges::{Cap, Caps, names},
        probes::{LoadOptions, Probes},
        procfs, system,
    },
    report::{
        ActionEvent, AlertEvent, ClearedEvent, Event, ProbeCost, StartedEvent, StatsEvent,
        metrics::PollSample, timestamp,
    },
    snapshot::{
        Collector, Scope, Snapshot,
        targets::{Changes, Targets, Why},
    },
};

pub struct Monitor {
    probes: Probes,
    collector: Collector,
    targets: Targets,
    detector: Detector,
    book: AlertBook,
    responder: Option<Responder>,
    stats: PollStats,
    probe_stats: bool,
    /// The last poll's snapshot, until the next poll takes its buffer back.
    last: Option<Snapshot>,
    /// The last poll's findings: every standing alert's current numbers.
    findings: Vec<Finding>,
    /// Kernel BPF run-time statistics stay on while this fd is open (`--probe-stats`).
    _stats_enabled: Option<std::os::fd::OwnedFd>,
    /// Sockets the probes could not track, as of the last warning about it, and when that was.
    untracked_warned: (u64, Option<Instant>),
}

/// How often the "socket map is full" warning may repeat while it stays full.
const FULL_MAP_WARNING_EVERY: Duration = Duration::from_secs(600);

/// The agent's own health, as `stats` reports it.
#[derive(Clone, Debug, Default)]
pub struct PollStats {
    pub polls: u64,
    pub sockets: usize,
    pub namespaces: usize,
    pub tracked: usize,
    pub map_entries: usize,
    pub last_poll: Duration,
    pub max_poll: Duration,
    /// The agent's peak memory through loading and the first poll (which reads every fd link
    /// once), kept before the peak is reset to follow steady operation.
    pub startup_peak_kib: Option<u64>,
}

impl Monitor {
    /// Checks privileges and targets, loads the probes; returns the monitor and its `started`
    /// event. Nothing is printed here.
    pub fn start(args: &Options) -> anyhow::Result<(Monitor, StartedEvent)> {
        let caps = Caps::effective();
        let missing = caps.missing_to_load();
        if !missing.is_empty() {
            bail!(
                "observer needs {} to load its probes (missing {}): run it as root or grant them",
                names(&[Cap::Bpf, Cap::Perfmon]),
                names(&missing)
            );
        }
        if args.all_namespaces {
            if !caps.has(Cap::SysAdmin) {
                bail!(
                    "--all-namespaces needs {} to enter other network namespaces (setns): run \
                     observer as root or grant it",
                    Cap::SysAdmin
                );
            }
            let missing = caps.missing_to_inspect_others();
            if !missing.is_empty() {
                log::warn!(
                    "without {}, sockets of other users' processes are alerted without their \
                     owner",
                    names(&missing)
                );
            }
        }
        let policy = match &args.config {
            Some(path) => Policy::from_file(path)?,
            None => Policy::default(),
        }
        .with_command_line(args.thresholds.clone());
        let targets = Targets::new(args.selector.clone())?;
        system::raise_memlock_limit();
        let btf = Btf::from_kernel()?;
        let everything = args.selector.is_everything();
        let pids = targets.pids();
        let options = LoadOptions {
            only: (!everything).then(|| pids.clone()),
            max_sockets: args.max_sockets,
            syscall_timing: args.syscall_timing,
            sleep_timing: args.sleep_timing,
            floor: args.probe_stats,
        };
        let (probes, skipped) = match Probes::load_best(args.probes, &options, &btf) {
            Ok(loaded) => loaded,
            // On a kernel older than any observer supports, that is the news, not the verifier.
            Err(e) => match system::too_old(&system::kernel_release()) {
                Some(too_old) => bail!("{too_old} ({e})"),
                None => return Err(e.into()),
            },
        };
        // Only loading needs the kernel's type information: several megabytes, freed now.
        drop(btf);
        system::release_free_memory();
        for skip in &skipped {
            log::info!("not using the {} backend: {}", skip.backend.name(), skip.error);
        }
        for note in probes.notes() {
            log::warn!("{} backend: {note}", probes.backend().name());
        }
        let scope = match (everything, args.all_namespaces) {
            (false, _) => Scope::Processes(&pids),
            (true, false) => Scope::OwnNamespace,
            (true, true) => Scope::AllNamespaces,
        };
        let collector = Collector::new(scope, &args.ports, &args.workloads)?;
        let stats_enabled = if args.probe_stats {
            let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
                .context("enabling BPF statistics (--probe-stats needs CAP_SYS_ADMIN)")?;
            Some(fd)
        } else {
            None
        };
        let kernel = KernelSettings { tcp_retries2: system::tcp_retries2() };
        let responder = args.action.as_ref().map(|a| {
            Responder::new(a.mode, a.reasons.clone(), a.after, a.max_per_minute, a.dry_run)
        });
        let detector = Detector::new(policy, kernel);
        let started = StartedEvent {
            ts: timestamp(SystemTime::now()),
            version: env!("CARGO_PKG_VERSION"),
            backend: probes.backend().name(),
            backend_notes: probes.notes().to_vec(),
            pids: pids.clone(),
            comms: args.selector.comms.clone(),
            ports: args.ports.clone(),
            all_namespaces: args.all_namespaces,
            kernel: system::kernel_release(),
            poll_interval_ms: args.poll_interval.as_millis() as u64,
            call_timing: probes.times_calls(),
            syscall_timing: probes.tracks_threads(),
            sleep_timing: probes.times_sleeps(),
            config: args.config.as_ref().map(|p| p.display().to_string()),
            node: args.workloads.placement.node.clone(),
            pod: args.workloads.placement.pod.clone(),
            namespace: args.workloads.placement.namespace.clone(),
            thresholds: detector.policy().base(),
        };
        log::info!(
            "watching {} with the {} backend",
            describe(&args.selector.comms, &pids, everything, args.all_namespaces),
            probes.backend().name()
        );
        let monitor = Monitor {
            probes,
            collector,
            targets,
            detector,
            book: AlertBook::default(),
            responder,
            stats: PollStats::default(),
            probe_stats: args.probe_stats,
            last: None,
            findings: Vec::new(),
            _stats_enabled: stats_enabled,
            untracked_warned: (0, None),
        };
        Ok((monitor, started))
    }

    /// One poll: follows the targets, reads the kernel's view, and hands every event it makes to
    /// `emit`, as it is made (an alert storm is never built up in memory).
    pub fn poll(&mut self, emit: &mut dyn FnMut(Event)) -> anyhow::Result<()> {
        let changes = self.targets.refresh();
        self.follow(&changes)?;
        for started in changes.started.iter().filter(|t| t.why == Why::Name) {
            let (pid, comm) = (started.pid, started.comm.to_string());
            emit(Event::TargetStarted { ts: timestamp(SystemTime::now()), pid, comm });
        }
        let polled = self.poll_sockets(emit);
        for gone in changes.exited.iter().filter(|t| t.why != Why::Descendant) {
            emit(Event::TargetExited { ts: timestamp(SystemTime::now()), pid: gone.pid });
        }
        if self.targets.finished() {
            for cleared in self.book.clear_all(ClearWhy::ProcessExited) {
                emit(Event::AlertCleared(ClearedEvent::new(SystemTime::now(), cleared)));
            }
        }
        polled
    }

    /// Points the probes and the collector at the processes watched now.
    fn follow(&mut self, changes: &Changes) -> anyhow::Result<()> {
        for (targets, on) in [(&changes.exited, false), (&changes.started, true)] {
            for t in targets {
                self.probes.watch(t.pid, on).context("updating the probes' watched processes")?;
            }
        }
        for joined in &changes.started {
            if let Err(e) = procfs::check_access(joined.pid) {
                log::warn!("{e}; its connections are alerted without their owner");
            }
        }
        if !changes.exited.is_empty() || !changes.started.is_empty() {
            self.collector.set_pids(&self.targets.pids());
        }
        Ok(())
    }

    fn poll_sockets(&mut self, emit: &mut dyn FnMut(Event)) -> anyhow::Result<()> {
        if let Some(last) = self.last.take() {
            self.collector.recycle(last);
        }
        let started = Instant::now();
        let snapshot = self.collector.collect(&mut self.probes)?;
        let detecting = Instant::now();
        let findings = self.detector.observe(&snapshot);
        let (raised, cleared) = self.book.update(&snapshot, &findings);
        let elapsed = started.elapsed();
        log::debug!("detect: {:.1}ms", detecting.elapsed().as_secs_f64() * 1e3);
        self.stats.polls += 1;
        self.stats.sockets = snapshot.sockets.len();
        self.stats.namespaces = self.collector.namespace_count();
        self.stats.tracked = snapshot.sockets.iter().filter(|s| s.diag.activity.is_some()).count();
        self.stats.map_entries = snapshot.map_entries;
        self.stats.last_poll = elapsed;
        self.stats.max_poll = self.stats.max_poll.max(elapsed);

        for c in cleared {
            emit(Event::AlertCleared(ClearedEvent::new(SystemTime::now(), c)));
        }
        let now = SystemTime::now();
        let mut thread_cache = HashMap::new();
        for (finding, identity) in raised {
            let socket = match finding.target {
                Target::Socket(cookie) => snapshot.find(cookie),
                Target::Process(_) => None,
            };
            let threads = attribution::for_finding(&snapshot, finding, &mut thread_cache);
            let alert = AlertEvent::new(now, snapshot.taken_ns, finding, identity, socket, threads);
            emit(Event::Alert(alert));
        }
        if let Some(responder) = &mut self.responder {
            for due in responder.due(&self.book, &snapshot) {
                let result = responder.perform(&due, self.collector.diag_for(due.netns));
                let (mode, dry_run, reason) = (responder.mode(), responder.dry_run(), due.reason);
                let action = ActionEvent::new(
                    SystemTime::now(),
                    mode,
                    dry_run,
                    result,
                    due.identity,
                    Some(reason),
                );
                emit(Event::Action(action));
            }
        }
        self.last = Some(snapshot);
        if self.stats.polls == 1 {
            self.stats.startup_peak_kib = procfs::own_memory_kib("VmHWM");
        }
        self.warn_if_map_full();
        self.findings = findings;
        Ok(())
    }

    /// Says on stderr, once and then every ten minutes while it lasts, that sockets go
    /// untracked for want of room in the probes' map: their alerts rely on tcp_info alone.
    fn warn_if_map_full(&mut self) {
        let counters = self.probes.counters();
        let untracked = counters.get(Counter::TrackFailed.name()).copied().unwrap_or(0);
        let (warned_at_count, warned_at) = self.untracked_warned;
        let due = warned_at.is_none_or(|t| t.elapsed() >= FULL_MAP_WARNING_EVERY);
        if untracked > warned_at_count && due {
            match self.probes.socket_capacity() {
                Some(capacity) => log::warn!(
                    "the probes' socket map is full ({} entries, --max-sockets {capacity}): \
                     {untracked} sockets could not be tracked so far, and their alerts rely on \
                     the kernel's counters alone; raise --max-sockets",
                    self.stats.map_entries,
                ),
                None => log::warn!(
                    "the kernel had no memory for {untracked} sockets' records so far: their \
                     alerts rely on the kernel's counters alone"
                ),
            }
            self.untracked_warned = (untracked, Some(Instant::now()));
        }
    }

    /// Whether every selected process is gone (and no name can match again).
    pub fn finished(&self) -> bool {
        self.targets.finished()
    }

    pub fn poll_stats(&self) -> &PollStats {
        &self.stats
    }

    /// What a poll that took `duration` leaves for the metrics.
    pub fn metrics_sample(&self, duration: Duration, ok: bool, events_dropped: u64) -> PollSample {
        PollSample {
            duration,
            ok,
            sockets: self.stats.sockets,
            namespaces: self.stats.namespaces,
            map_entries: self.stats.map_entries,
            map_capacity: self.probes.socket_capacity(),
            probe_counters: self.probes.counters(),
            events_dropped,
        }
    }

    /// The last successful poll's view of the sockets (`None` before the first).
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.last.as_ref()
    }

    /// The alerts standing after the last poll.
    pub fn alerts(&self) -> &AlertBook {
        &self.book
    }

    /// The last poll's findings, in a stable order: the current numbers of each standing alert.
    pub fn findings(&self) -> &[Finding] {
        &self.findings
    }

    /// Per-probe event counts and failures (`track_failed`, `events_lost`, ...), summed over CPUs.
    pub fn probe_counters(&self) -> HashMap<&'static str, u64> {
        self.probes.counters()
    }

    /// The `stats` event, with `events_dropped` as the output counted them.
    pub fn stats_event(&self, events_dropped: u64) -> StatsEvent {
        let probe_counters: BTreeMap<_, _> = self.probes.counters().into_iter().collect();
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        StatsEvent {
            ts: timestamp(SystemTime::now()),
            polls: self.stats.polls,
            sockets: self.stats.sockets,
            namespaces: self.stats.namespaces,
            tracked: self.stats.tracked,
            alerts_active: self.book.active_count(),
            last_poll_ms: ms(self.stats.last_poll),
            max_poll_ms: ms(self.stats.max_poll),
            map_entries: self.stats.map_entries,
            map_capacity: self.probes.socket_capacity(),
            probe_counters,
            probe_cost: self.probe_stats.then(|| {
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
            events_dropped,
            rss_kib: procfs::own_memory_kib("VmRSS"),
            peak_rss_kib: procfs::own_memory_kib("VmHWM"),
            startup_peak_rss_kib: self.stats.startup_peak_kib,
        }
    }
}

/// Consecutive failed polls after which the agent gives up instead of silently seeing nothing.
const MAX_FAILED_POLLS: u32 = 10;

/// Failed polls in a row: a few are logged and ridden out, a run of them stops the agent.
#[derive(Default)]
pub struct PollFailures {
    in_a_row: u32,
}

impl PollFailures {
    /// Records a poll's result; an error once too many polls in a row have failed.
    pub fn record(&mut self, result: anyhow::Result<()>) -> anyhow::Result<()> {
        match result {
            Ok(()) => self.in_a_row = 0,
            Err(err) => {
                self.in_a_row += 1;
                log::warn!("poll failed ({} in a row): {err:#}", self.in_a_row);
                if self.in_a_row >= MAX_FAILED_POLLS {
                    return Err(err.context(format!("{MAX_FAILED_POLLS} polls in a row failed")));
                }
            }
        }
        Ok(())
    }
}

/// Memory housekeeping after a poll, whoever runs the polls.
pub fn after_poll(stats: &PollStats) {
    // A poll of a big table allocates tens of MB for a moment (and the first one reads every fd
    // link): give it back rather than carry the peak between polls.
    if stats.polls == 1 || stats.sockets >= 20_000 {
        system::release_free_memory();
    }
    if stats.polls == 1 {
        // From here on, the reported peak is that of steady operation, not of start-up.
        system::reset_peak_memory();
    }
}

fn describe(comms: &[String], pids: &[u32], everything: bool, all_namespaces: bool) -> String {
    if everything && all_namespaces {
        return "every TCP socket in every network namespace".to_owned();
    }
    if everything {
        return "every TCP socket".to_owned();
    }
    let mut parts = Vec::new();
    if !pids.is_empty() {
        parts.push(format!("pids {pids:?}"));
    }
    if !comms.is_empty() {
        parts.push(format!("processes named {comms:?}"));
    }
    parts.join(" and ")
}
