//! `observer watch`: polls on a timer and prints what each poll finds, until a signal or the
//! last watched process ends it.
use std::{
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
    report::{Event, timestamp, writer},
    snapshot::targets::Selector,
};

/// What `observer watch` was asked to do.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// Which processes to watch; none in particular watches every TCP socket in the agent's
    /// network namespace.
    pub selector: Selector,
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

/// How long a stop waits for queued events to reach stdout: a stop request is obeyed within a
/// second whatever the reader of stdout does.
const DRAIN_ON_STOP: Duration = Duration::from_millis(700);

pub async fn run(args: Options) -> anyhow::Result<()> {
    // Installed before anything is loaded, so a stop request that arrives while the probes load
    // still ends in a clean `stopped` instead of the default action killing the agent.
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let (monitor, started) = Monitor::start(&args)?;
    let (sink, writer) = writer::spawn(std::io::stdout()).context("starting the output thread")?;
    sink.send(Event::Started(started));

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
        let (poll_monitor, poll_sink, stop) = (monitor.clone(), sink.clone(), stopping.clone());
        let mut poll = tokio::task::spawn_blocking(move || {
            let mut monitor = poll_monitor.lock().unwrap_or_else(|e| e.into_inner());
            let result = monitor.poll(&mut |event| {
                if !stop.load(Ordering::Relaxed) {
                    poll_sink.send(event);
                }
            });
            (result, monitor.finished(), monitor.poll_stats().clone())
        });
        let (result, finished, stats) = tokio::select! {
            done = &mut poll => done.context("the poll thread failed")?,
            _ = interrupt.recv() => { stopping.store(true, Ordering::Relaxed); break "signal" }
            _ = terminate.recv() => { stopping.store(true, Ordering::Relaxed); break "signal" }
        };
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
