//! `observer watch`: polls on a timer and prints what each poll finds, until a signal or the
//! last watched process ends it.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    time::MissedTickBehavior,
};

use super::monitor::{self, Monitor, PollFailures};
use crate::{
    act::Mode,
    detect::{Reason, thresholds::Overrides},
    kernel::probes::ProbeChoice,
    report::{
        Event,
        health::HealthRecord,
        http::{self, Endpoints},
        metrics::Metrics,
        timestamp, writer,
    },
    snapshot::{WorkloadOptions, targets::Selector},
};

/// What `observer watch` was asked to do.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// Which processes to watch; none in particular watches every TCP socket in the agent's
    /// network namespace (with `all_namespaces`, in every one).
    pub selector: Selector,
    /// Node mode: every network namespace of the machine, not only the agent's.
    pub all_namespaces: bool,
    /// Where the node keeps pod logs, and where the agent runs (for each socket's place).
    pub workloads: WorkloadOptions,
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
    /// Follow watched threads' context switches (tracepoint backend).
    pub sleep_timing: bool,
    pub probe_stats: bool,
    pub max_sockets: u32,
    /// Where to serve Prometheus metrics and the health endpoints, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
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

/// How long a stop waits for queued events to reach stdout: a stop request is obeyed within a
/// second whatever the reader of stdout does.
const DRAIN_ON_STOP: Duration = Duration::from_millis(500);

pub async fn run(args: Options) -> anyhow::Result<()> {
    // Installed before anything is loaded, so a stop request that arrives while the probes load
    // still ends in a clean `stopped` instead of the default action killing the agent.
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    // Bound before the probes load: a taken port fails at once, and the health endpoints
    // answer (alive, not ready) while they load.
    let telemetry = match args.metrics_addr {
        Some(addr) => Some(Telemetry::serve(addr, args.poll_interval).await?),
        None => None,
    };
    // Loaded off the runtime thread so that the endpoints answer meanwhile.
    let options = args.clone();
    let (monitor, started) = tokio::task::spawn_blocking(move || Monitor::start(&options))
        .await
        .context("the start-up thread failed")??;
    let (sink, writer) = writer::spawn(std::io::stdout()).context("starting the output thread")?;
    let started = Event::Started(started);
    if let Some(t) = &telemetry {
        t.metrics.observe(&started);
        t.update(|h| h.attached = Some(Instant::now()));
    }
    sink.send(started);
    let metrics = telemetry.as_ref().map(|t| t.metrics.clone());

    // Polls run on a thread of their own: signals are answered while one is under way, and a
    // stop request cuts short its wait for room in the output queue.
    let monitor = Arc::new(Mutex::new(monitor));
    let stopping = Arc::new(AtomicBool::new(false));
    let mut ticks = tokio::time::interval(args.poll_interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_stats = Instant::now();
    let mut failures = PollFailures::default();
    let stop_reason = loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = interrupt.recv() => break "signal",
            _ = terminate.recv() => break "signal",
        }
        if let Some(t) = &telemetry {
            t.update(|h| h.poll_started(Instant::now()));
        }
        let (poll_monitor, poll_sink, stop) = (monitor.clone(), sink.clone(), stopping.clone());
        let poll_metrics = metrics.clone();
        let mut poll = tokio::task::spawn_blocking(move || {
            let mut monitor = poll_monitor.lock().unwrap_or_else(|e| e.into_inner());
            let began = Instant::now();
            let result = monitor.poll(&mut |event| {
                // Counted where every event passes, whether or not stdout takes it.
                if let Some(metrics) = &poll_metrics {
                    metrics.observe(&event);
                }
                if !stop.load(Ordering::Relaxed) {
                    poll_sink.send(event);
                }
            });
            if let Some(metrics) = &poll_metrics {
                let dropped = poll_sink.dropped();
                metrics.record_poll(&monitor.metrics_sample(
                    began.elapsed(),
                    result.is_ok(),
                    dropped,
                ));
            }
            (result, monitor.finished(), monitor.poll_stats().clone())
        });
        let (result, finished, stats) = tokio::select! {
            done = &mut poll => done.context("the poll thread failed")?,
            _ = interrupt.recv() => { stopping.store(true, Ordering::Relaxed); break "signal" }
            _ = terminate.recv() => { stopping.store(true, Ordering::Relaxed); break "signal" }
        };
        if let Some(t) = &telemetry {
            let error = result.as_ref().err().map(|e| format!("{e:#}"));
            t.update(|h| h.poll_finished(Instant::now(), error));
        }
        failures.record(result)?;
        if sink.closed() {
            bail!("stdout was closed; stopping");
        }
        if finished {
            break "targets_exited";
        }
        if !args.stats_interval.is_zero() && last_stats.elapsed() >= args.stats_interval {
            last_stats = Instant::now();
            let monitor = monitor.lock().unwrap_or_else(|e| e.into_inner());
            sink.send(Event::Stats(monitor.stats_event(sink.dropped())));
        }
        monitor::after_poll(&stats);
    };
    sink.send(Event::Stopped { ts: timestamp(SystemTime::now()), reason: stop_reason });
    if !writer.finish(sink, DRAIN_ON_STOP) {
        log::warn!("stdout is not being read: stopping without the last events");
    }
    // The process exits now: the probes are detached and unloaded with it, and a poll still
    // under way on its thread ends with it.
    Ok(())
}

/// The `--metrics-addr` side: metrics counted as events pass and polls end, and the record of
/// start-up and polls that the health endpoints judge.
struct Telemetry {
    metrics: Arc<Metrics>,
    health: Arc<Mutex<HealthRecord>>,
}

impl Telemetry {
    async fn serve(addr: SocketAddr, poll_interval: Duration) -> anyhow::Result<Telemetry> {
        let listener = http::bind(addr).await?;
        let bound = listener.local_addr().unwrap_or(addr);
        log::info!("serving /metrics, /healthz and /readyz on http://{bound}");
        let telemetry = Telemetry {
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Mutex::new(HealthRecord::new(Instant::now()))),
        };
        let endpoints = Endpoints {
            metrics: telemetry.metrics.clone(),
            health: telemetry.health.clone(),
            poll_interval,
        };
        http::serve(listener, endpoints);
        Ok(telemetry)
    }

    /// Updates the health record; the endpoints hold its lock only to copy it.
    fn update(&self, change: impl FnOnce(&mut HealthRecord)) {
        change(&mut self.health.lock().unwrap_or_else(|e| e.into_inner()));
    }
}
