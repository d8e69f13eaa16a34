//! `observer top`: a live full-screen view of the watched connections for the person on call.
//!
//! It runs `watch`'s engine ([`Monitor`]) on `watch`'s options: polls on a blocking thread of
//! their own, as `watch` does, so that drawing and keys never delay a poll; after each poll that
//! thread also turns the snapshot and the standing alerts into the table ([`model`]), and the
//! main loop draws it ([`view`]) and answers keys ([`app`]). Ending a connection goes through
//! the same lookup and checks as `observer kill` (`act::manual`).
mod app;
mod columns;
mod model;
mod terminal;
mod view;

use std::{
    fs::OpenOptions,
    io::IsTerminal,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use anyhow::{Context, bail};
use crossterm::event::{Event as TermEvent, EventStream};
use tokio::{
    signal::unix::{SignalKind, signal},
    task::JoinHandle,
    time::MissedTickBehavior,
};

pub use self::terminal::Logs;
use self::{
    app::{App, Command, Health, Pending},
    model::Table,
    terminal::Screen,
};
use super::{
    monitor::{self, Monitor, PollFailures, PollStats},
    watch,
};
use crate::{
    act::{ActResult, Outcome, manual},
    alerts::attribution::ThreadIndex,
    report::{
        ActionEvent, Event, timestamp,
        writer::{self, EventSink},
    },
    snapshot::Identity,
};

/// What `observer top` was asked to do.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// The engine's options, exactly as `watch` takes them (never with `--action`).
    pub watch: watch::Options,
    /// Where to append the JSON lines `watch` would print, and an `action` line per connection
    /// ended from the screen.
    pub log: Option<PathBuf>,
}

/// How long a quit waits for the log file to take its last lines.
const DRAIN_ON_STOP: std::time::Duration = std::time::Duration::from_millis(700);

/// One poll's outcome, handed from the poll thread to the screen.
struct Polled {
    result: anyhow::Result<()>,
    table: Option<Table>,
    health: Health,
    stats: PollStats,
    /// Processes that came or went, in words.
    notes: Vec<String>,
}

/// A connection being ended, off the main loop (it reads the socket table and /proc).
type Ending = JoinHandle<(Pending, Identity, ActResult)>;

pub async fn run(args: Options, logs: Logs) -> anyhow::Result<()> {
    if !std::io::stdout().is_terminal() {
        bail!(
            "observer top draws a live table and needs a terminal, but stdout is not one: for \
             JSON lines, run `observer watch` with the same flags"
        );
    }
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let log = match &args.log {
        Some(path) => {
            let file =
                OpenOptions::new().create(true).append(true).open(path).with_context(|| {
                    format!("cannot open --log {}: give a writable file path", path.display())
                })?;
            Some(writer::spawn(file).context("starting the log file's writer")?)
        }
        None => None,
    };
    let sink = log.as_ref().map(|(sink, _)| sink.clone());
    let (monitor, started) = Monitor::start(&args.watch)?;
    let health = Health {
        targets: describe_targets(&args.watch),
        backend: started.backend,
        poll_interval: args.watch.poll_interval,
        ..Health::default()
    };
    if let Some(sink) = &sink {
        sink.send(Event::Started(started));
    }
    let monitor = Arc::new(Mutex::new(monitor));
    let mut app = App::new(health);
    let stop_reason = {
        let mut screen = Screen::enter(&logs).context("cannot take over the terminal")?;
        let mut keys = EventStream::new();
        let mut ticks = tokio::time::interval(args.watch.poll_interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut polling: Option<JoinHandle<Polled>> = None;
        let mut ending: Option<Ending> = None;
        let mut failures = PollFailures::default();
        let mut last_stats = Instant::now();
        let stats_interval = args.watch.stats_interval;
        loop {
            let drawing = Instant::now();
            screen.draw(&mut app).context("drawing on the terminal")?;
            app.health.draw = drawing.elapsed();
            tokio::select! {
                _ = ticks.tick(), if polling.is_none() => {
                    polling = Some(spawn_poll(&monitor, sink.clone(), app.health.clone()));
                }
                polled = finish(&mut polling) => {
                    let polled = polled.context("the poll thread failed")?;
                    failures.record(polled.result)?;
                    for note in polled.notes {
                        app.say(note, false);
                    }
                    if let Some(table) = polled.table {
                        app.set_table(table, polled.health);
                    }
                    monitor::after_poll(&polled.stats);
                    if let Some(sink) = &sink
                        && !stats_interval.is_zero()
                        && last_stats.elapsed() >= stats_interval
                    {
                        last_stats = Instant::now();
                        let monitor = monitor.lock().unwrap_or_else(|e| e.into_inner());
                        sink.send(Event::Stats(monitor.stats_event(sink.dropped())));
                    }
                }
                ended = finish(&mut ending) => {
                    let (pending, identity, result) = ended.context("ending the connection failed")?;
                    report_end(&mut app, sink.as_ref(), pending, identity, result);
                }
                key = next_key(&mut keys) => match key {
                    Some(Ok(TermEvent::Key(key))) => match app.key(key) {
                        Command::Quit => break "quit",
                        Command::End(_) if ending.is_some() => {
                            app.say("another connection is being ended: try again in a moment", true);
                        }
                        Command::End(pending) => {
                            let workloads = args.watch.workloads.clone();
                            ending = Some(tokio::task::spawn_blocking(move || {
                                let (identity, result) = manual::end(&pending.request, &workloads);
                                (pending, identity, result)
                            }));
                        }
                        Command::Nothing => {}
                    },
                    // A resize (or anything else) only needs the redraw at the top of the loop.
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e).context("reading the keyboard"),
                    // The terminal is gone, as after a hangup.
                    None => break "signal",
                },
                _ = interrupt.recv() => break "signal",
                _ = terminate.recv() => break "signal",
            }
            if let Some(line) = logs.take_unseen() {
                app.say(line, true);
            }
        }
        // The screen is given back here, before anything else is printed.
    };
    if let Some((sink, writer)) = log {
        sink.send(Event::Stopped { ts: timestamp(SystemTime::now()), reason: stop_reason });
        if !writer.finish(sink, DRAIN_ON_STOP) {
            log::warn!("the --log file did not take the last events");
        }
    }
    // As with `watch`, a poll still under way on its thread ends with the process.
    Ok(())
}

/// Polls on a blocking thread, as `watch` does, then builds the table there too: the main loop
/// only draws.
fn spawn_poll(
    monitor: &Arc<Mutex<Monitor>>,
    sink: Option<EventSink>,
    mut health: Health,
) -> JoinHandle<Polled> {
    let monitor = monitor.clone();
    tokio::task::spawn_blocking(move || {
        let mut monitor = monitor.lock().unwrap_or_else(|e| e.into_inner());
        let mut notes = Vec::new();
        let result = monitor.poll(&mut |event| {
            match &event {
                Event::TargetExited { pid, .. } => notes.push(format!("pid {pid} exited")),
                Event::TargetStarted { pid, comm, .. } => {
                    notes.push(format!("now watching pid {pid} ({comm})"))
                }
                _ => {}
            }
            if let Some(sink) = &sink {
                sink.send(event);
            }
        });
        let building = Instant::now();
        let table = result.is_ok().then(|| build_table(&monitor));
        let stats = monitor.poll_stats().clone();
        let counters = monitor.probe_counters();
        let counter = |name| counters.get(name).copied().unwrap_or(0);
        health.polls = stats.polls;
        health.last_poll = stats.last_poll;
        health.table_build = building.elapsed();
        health.sockets = stats.sockets;
        health.listening =
            table.as_ref().map_or(0, |t| t.rows.iter().filter(|r| r.listening()).count());
        health.track_failed = counter("track_failed");
        health.thread_track_failed = counter("thread_track_failed");
        health.events_lost = counter("events_lost");
        health.finished = monitor.finished();
        Polled { result, table, health, stats, notes }
    })
}

fn build_table(monitor: &Monitor) -> Table {
    let Some(snapshot) = monitor.snapshot() else { return Table::default() };
    let mut threads = ThreadIndex::new(snapshot);
    let standing = monitor.alerts().standing();
    Table::build(snapshot, monitor.findings(), standing, |socket| threads.threads_of(socket))
}

/// The result on the status line, and as an `action` line in the log.
fn report_end(
    app: &mut App,
    sink: Option<&EventSink>,
    pending: Pending,
    identity: Identity,
    result: ActResult,
) {
    let words = match (&result.outcome, &result.error) {
        (Outcome::Ok, _) => "done".to_owned(),
        (outcome, Some(error)) => format!("{}: {error}", outcome_name(*outcome)),
        (outcome, None) => outcome_name(*outcome).to_owned(),
    };
    app.say(format!("{}: {words}", pending.what), result.outcome != Outcome::Ok);
    if let Some(sink) = sink {
        let mode = pending.request.mode;
        let event =
            ActionEvent::new(SystemTime::now(), mode, false, result, identity, pending.reason);
        sink.send(Event::Action(event));
    }
}

/// The contract's name for an outcome (`already_gone`, ...).
fn outcome_name(outcome: Outcome) -> String {
    serde_json::to_value(outcome)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Waits for a task held in `slot`, and empties the slot; never ready when there is none.
async fn finish<T>(slot: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match slot {
        Some(task) => {
            let done = task.await;
            *slot = None;
            done
        }
        None => std::future::pending().await,
    }
}

async fn next_key(keys: &mut EventStream) -> Option<std::io::Result<TermEvent>> {
    use futures_core::Stream;
    std::future::poll_fn(|cx| std::pin::Pin::new(&mut *keys).poll_next(cx)).await
}

/// What is watched, for the header: `pid 4242`, `processes named nginx`, `every socket`, with
/// the ports if only some are.
fn describe_targets(args: &watch::Options) -> String {
    let selector = &args.selector;
    let mut parts = Vec::new();
    match selector.pids.as_slice() {
        [] => {}
        [one] => parts.push(format!("pid {one}")),
        many => parts.push(format!(
            "pids {}",
            many.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
        )),
    }
    if !selector.comms.is_empty() {
        parts.push(format!("processes named {}", selector.comms.join(",")));
    }
    if parts.is_empty() {
        parts.push("every socket".to_owned());
    }
    if !args.ports.is_empty() {
        let ports: Vec<String> = args.ports.iter().map(u16::to_string).collect();
        parts.push(format!("port {}", ports.join(",")));
    }
    parts.join(" ")
}
