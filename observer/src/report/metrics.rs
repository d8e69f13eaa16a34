//! The agent's Prometheus metrics (`--metrics-addr`). Alerts and actions are counted from the
//! events as they pass on their way to stdout; the rest comes from each poll's figures. Every
//! metric is an atomic (or a lock held for an update's microseconds), so a scrape reads what the
//! last poll left without ever waiting for the next one, and a poll never waits for a scrape.
use std::{collections::HashMap, time::Duration};

use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use super::Event;
use crate::{act::Mode, act::Outcome, detect::Reason};

/// The `Content-Type` of [`Metrics::encode`]'s output: Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

type Label = (&'static str, &'static str);

/// Poll durations, in seconds: from a few hundred sockets (about a millisecond) to the
/// hundreds of thousands (about a second), and past the default interval.
const POLL_BUCKETS: [f64; 12] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// `result` of a dry run that found the connection and would have ended it.
const DRY_RUN: &str = "dry_run";

pub struct Metrics {
    registry: Registry,
    alerts_active: Family<[Label; 1], Gauge>,
    alerts: Family<[Label; 1], Counter>,
    actions: Family<[Label; 2], Counter>,
    poll_duration: Histogram,
    poll_errors: Counter,
    sockets_watched: Gauge,
    namespaces_watched: Gauge,
    map_entries: Gauge,
    map_capacity: Gauge,
    probe_events: Family<[Label; 1], Counter>,
    sockets_tracked: Counter,
    track_failed: Counter,
    thread_track_failed: Counter,
    events_lost: Counter,
    accept_errors: Counter,
    events_dropped: Counter,
    build_info: Family<[(&'static str, String); 3], Gauge>,
}

/// What one poll leaves for the metrics.
#[derive(Clone, Debug, Default)]
pub struct PollSample {
    /// The whole poll, events and actions included.
    pub duration: Duration,
    pub ok: bool,
    /// Sockets the poll looked at, and the probes' map fill and size.
    pub sockets: usize,
    /// Network namespaces the poll read.
    pub namespaces: usize,
    pub map_entries: usize,
    /// `None` for socket storage, which has no capacity (exported as 0).
    pub map_capacity: Option<u32>,
    /// The probes' counters by name, totals since start (as `stats` has them).
    pub probe_counters: HashMap<&'static str, u64>,
    /// Events stdout's reader did not take, total since start.
    pub events_dropped: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let metrics = Metrics {
            registry: Registry::default(),
            alerts_active: Family::default(),
            alerts: Family::default(),
            actions: Family::default(),
            poll_duration: Histogram::new(POLL_BUCKETS),
            poll_errors: Counter::default(),
            sockets_watched: Gauge::default(),
            namespaces_watched: Gauge::default(),
            map_entries: Gauge::default(),
            map_capacity: Gauge::default(),
            probe_events: Family::default(),
            sockets_tracked: Counter::default(),
            track_failed: Counter::default(),
            thread_track_failed: Counter::default(),
            events_lost: Counter::default(),
            accept_errors: Counter::default(),
            events_dropped: Counter::default(),
            build_info: Family::default(),
        };
        // Every reason and action outcome is there from the start, at zero: queries and alert
        // rules then see 0 rather than no data, and rate() sees the first increase.
        for reason in Reason::ALL {
            drop(metrics.alerts_active.get_or_create(&[("reason", reason.name())]));
            drop(metrics.alerts.get_or_create(&[("reason", reason.name())]));
        }
        for mode in Mode::ALL {
            for result in Outcome::ALL.map(Outcome::name).into_iter().chain([DRY_RUN]) {
                drop(metrics.actions.get_or_create(&[("action", mode.name()), ("result", result)]));
            }
        }
        metrics.register()
    }

    fn register(mut self) -> Self {
        let r = &mut self.registry;
        r.register(
            "observer_alerts_active",
            "Alerts standing now, by reason",
            self.alerts_active.clone(),
        );
        r.register("observer_alerts", "Alerts raised since start, by reason", self.alerts.clone());
        r.register(
            "observer_actions",
            "Connections ended (or checked, result dry_run) by --action, by mode and result",
            self.actions.clone(),
        );
        r.register_with_unit(
            "observer_poll_duration",
            "Time one poll took, from reading the kernel's view to the last event it made",
            Unit::Seconds,
            self.poll_duration.clone(),
        );
        r.register(
            "observer_poll_errors",
            "Polls that failed (the agent exits after 10 in a row)",
            self.poll_errors.clone(),
        );
        r.register(
            "observer_sockets_watched",
            "TCP sockets the last poll looked at",
            self.sockets_watched.clone(),
        );
        r.register(
            "observer_namespaces_watched",
            "Network namespaces the last poll read (with --all-namespaces, every one of the node)",
            self.namespaces_watched.clone(),
        );
        r.register(
            "observer_probe_map_entries",
            "Sockets in the probes' map after the last poll",
            self.map_entries.clone(),
        );
        r.register(
            "observer_probe_map_capacity",
            "Size of the probes' socket map (--max-sockets; 0 for socket storage, which has no \
             capacity)",
            self.map_capacity.clone(),
        );
        r.register(
            "observer_probe_events",
            "Rare kernel events the probes saw, by probe (state changes, destroyed sockets, resets)",
            self.probe_events.clone(),
        );
        r.register(
            "observer_probe_sockets_tracked",
            "Sockets the probes gave a record to",
            self.sockets_tracked.clone(),
        );
        r.register(
            "observer_probe_track_failed",
            "Sockets the probes could not track because their map was full",
            self.track_failed.clone(),
        );
        r.register(
            "observer_probe_thread_track_failed",
            "Thread socket calls the probes could not record because their map was full",
            self.thread_track_failed.clone(),
        );
        r.register(
            "observer_probe_events_lost",
            "Probe reports lost because the ring buffer to the agent was full",
            self.events_lost.clone(),
        );
        r.register(
            "observer_accept_errors",
            "accept() calls of watched processes that failed for lack of fds (--syscall-timing)",
            self.accept_errors.clone(),
        );
        r.register(
            "observer_events_dropped",
            "Events dropped because nobody read stdout",
            self.events_dropped.clone(),
        );
        r.register(
            "observer_build_info",
            "The agent's version, probe backend and kernel; always 1",
            self.build_info.clone(),
        );
        self
    }

    /// Counts an event on its way to stdout.
    pub fn observe(&self, event: &Event) {
        match event {
            Event::Started(started) => {
                let labels = [
                    ("version", started.version.to_owned()),
                    ("backend", started.backend.to_owned()),
                    ("kernel", started.kernel.clone()),
                ];
                self.build_info.get_or_create(&labels).set(1);
            }
            Event::Alert(alert) => {
                let reason = [("reason", alert.reason.name())];
                self.alerts.get_or_create(&reason).inc();
                self.alerts_active.get_or_create(&reason).inc();
            }
            Event::AlertCleared(cleared) => {
                self.alerts_active.get_or_create(&[("reason", cleared.reason.name())]).dec();
            }
            Event::Action(action) => {
                let result = match action.result {
                    Outcome::Ok if action.dry_run => DRY_RUN,
                    outcome => outcome.name(),
                };
                self.actions
                    .get_or_create(&[("action", action.action.name()), ("result", result)])
                    .inc();
            }
            Event::TargetStarted { .. }
            | Event::TargetExited { .. }
            | Event::Stats(_)
            | Event::Stopped { .. } => {}
        }
    }

    /// Takes in one finished poll.
    pub fn record_poll(&self, sample: &PollSample) {
        self.poll_duration.observe(sample.duration.as_secs_f64());
        if !sample.ok {
            self.poll_errors.inc();
            // A failed poll saw no sockets: keep the last good figures rather than zeros.
            return;
        }
        self.sockets_watched.set(sample.sockets as i64);
        self.namespaces_watched.set(sample.namespaces as i64);
        self.map_entries.set(sample.map_entries as i64);
        self.map_capacity.set(i64::from(sample.map_capacity.unwrap_or(0)));
        for (&name, &total) in &sample.probe_counters {
            let counter = match name {
                "sockets_tracked" => &self.sockets_tracked,
                "track_failed" => &self.track_failed,
                "thread_track_failed" => &self.thread_track_failed,
                "events_lost" => &self.events_lost,
                "accept_errors" => &self.accept_errors,
                _ => {
                    let probe = name.strip_suffix("_events").unwrap_or(name);
                    advance(&self.probe_events.get_or_create(&[("probe", probe)]), total);
                    continue;
                }
            };
            advance(counter, total);
        }
        advance(&self.events_dropped, sample.events_dropped);
    }

    /// Everything, in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(8 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut text, &self.registry);
        text
    }
}

/// Moves a counter up to `total`, a count kept elsewhere since start. Only the poll side
/// writes these counters, so reading then adding does not race.
fn advance(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use observer_common::TcpState;

    use super::*;
    use crate::{
        act::ActResult,
        alerts::{ClearWhy, Cleared},
        detect::{Facts, Finding, Target, thresholds::DEFAULT_THRESHOLDS},
        report::{ActionEvent, AlertEvent, ClearedEvent, StartedEvent},
        snapshot::{Identity, fixtures::*},
    };

    fn started() -> Event {
        Event::Started(StartedEvent {
            ts: "t".into(),
            version: "0.1.0",
            backend: "tracepoint",
            backend_notes: vec![],
            pids: vec![42],
            comms: vec![],
            ports: vec![],
            all_namespaces: false,
            kernel: "6.18.44".into(),
            poll_interval_ms: 1000,
            call_timing: false,
            syscall_timing: false,
            sleep_timing: true,
            config: None,
            node: None,
            pod: None,
            namespace: None,
            thresholds: DEFAULT_THRESHOLDS,
        })
    }

    fn idle_alert(cookie: u64) -> Event {
        let socket = socket(cookie, TcpState::Established, 61_000, 61_000);
        let finding = Finding {
            target: Target::Socket(cookie),
            facts: Facts::Idle { idle_ms: 61_000, timeout_ms: 60_000, unread: 0 },
            rule: None,
        };
        let identity = Identity::of_socket(&socket);
        let at = SystemTime::UNIX_EPOCH;
        Event::Alert(AlertEvent::new(at, NOW_NS, &finding, identity, Some(&socket), vec![]))
    }

    fn idle_cleared(cookie: u64) -> Event {
        let identity = Identity::of_socket(&socket(cookie, TcpState::Established, 0, 0));
        let cleared = Cleared { identity, reason: Reason::Idle, why: ClearWhy::SocketClosed };
        Event::AlertCleared(ClearedEvent::new(SystemTime::UNIX_EPOCH, cleared))
    }

    fn action(dry_run: bool, result: ActResult) -> Event {
        let identity = Identity::of_socket(&socket(4, TcpState::Established, 0, 0));
        let at = SystemTime::UNIX_EPOCH;
        Event::Action(ActionEvent::new(at, Mode::Destroy, dry_run, result, identity, None))
    }

    /// The value of the sample line `series` (name and labels exactly as printed).
    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
            .parse()
            .unwrap()
    }

    fn sample(counters: &[(&'static str, u64)], dropped: u64) -> PollSample {
        PollSample {
            duration: Duration::from_millis(3),
            ok: true,
            sockets: 7,
            namespaces: 2,
            map_entries: 5,
            map_capacity: Some(65_536),
            probe_counters: counters.iter().copied().collect(),
            events_dropped: dropped,
        }
    }

    #[test]
    fn every_family_has_help_type_and_the_documented_name() {
        let metrics = Metrics::new();
        metrics.observe(&started());
        metrics.record_poll(&sample(&[("state_events", 1), ("track_failed", 0)], 0));
        let text = metrics.encode();
        for (name, kind) in [
            ("observer_alerts_active", "gauge"),
            ("observer_alerts_total", "counter"),
            ("observer_actions_total", "counter"),
            ("observer_poll_duration_seconds", "histogram"),
            ("observer_poll_errors_total", "counter"),
            ("observer_sockets_watched", "gauge"),
            ("observer_namespaces_watched", "gauge"),
            ("observer_probe_map_entries", "gauge"),
            ("observer_probe_map_capacity", "gauge"),
            ("observer_probe_events_total", "counter"),
            ("observer_probe_sockets_tracked_total", "counter"),
            ("observer_probe_track_failed_total", "counter"),
            ("observer_probe_thread_track_failed_total", "counter"),
            ("observer_probe_events_lost_total", "counter"),
            ("observer_accept_errors_total", "counter"),
            ("observer_events_dropped_total", "counter"),
            ("observer_build_info", "gauge"),
        ] {
            assert!(text.contains(&format!("\n# TYPE {name} {kind}\n")), "{name} {kind}:\n{text}");
            assert!(text.contains(&format!("# HELP {name} ")), "{name}:\n{text}");
        }
        // Sample lines: a name, labels from a short fixed list (nothing per connection), a value.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, number) = line.rsplit_once(' ').unwrap();
            assert!(number == "+Inf" || number.parse::<f64>().is_ok(), "{line}");
            let labels = series.split_once('{').map_or("", |(_, l)| l.trim_end_matches('}'));
            for label in labels.split(',').filter(|l| !l.is_empty()) {
                let key = label.split_once('=').unwrap().0;
                let allowed = ["reason", "action", "result", "probe", "le", "version", "backend"];
                assert!(allowed.contains(&key) || key == "kernel", "{key} in {line}");
            }
        }
        let build = r#"observer_build_info{version="0.1.0",backend="tracepoint",kernel="6.18.44"}"#;
        assert_eq!(value(&text, build), 1.0);
    }

    #[test]
    fn alerts_are_counted_and_each_reason_reads_zero_until_it_has_one() {
        let metrics = Metrics::new();
        let text = metrics.encode();
        for reason in Reason::ALL.map(Reason::name) {
            assert_eq!(
                value(&text, &format!("observer_alerts_active{{reason=\"{reason}\"}}")),
                0.0
            );
            assert_eq!(value(&text, &format!("observer_alerts_total{{reason=\"{reason}\"}}")), 0.0);
        }
        metrics.observe(&idle_alert(1));
        metrics.observe(&idle_alert(2));
        let text = metrics.encode();
        assert_eq!(value(&text, r#"observer_alerts_active{reason="idle"}"#), 2.0);
        assert_eq!(value(&text, r#"observer_alerts_active{reason="close_wait"}"#), 0.0);
        metrics.observe(&idle_cleared(1));
        metrics.observe(&idle_cleared(2));
        let text = metrics.encode();
        assert_eq!(value(&text, r#"observer_alerts_active{reason="idle"}"#), 0.0);
        assert_eq!(value(&text, r#"observer_alerts_total{reason="idle"}"#), 2.0);
    }

    #[test]
    fn actions_by_mode_and_result_with_dry_runs_apart() {
        let metrics = Metrics::new();
        metrics.observe(&action(false, ActResult::ok()));
        metrics.observe(&action(true, ActResult::ok()));
        metrics.observe(&action(true, ActResult::fail(Outcome::AlreadyGone, "gone")));
        let text = metrics.encode();
        let series = |result: &str| {
            format!("observer_actions_total{{action=\"destroy\",result=\"{result}\"}}")
        };
        assert_eq!(value(&text, &series("ok")), 1.0);
        assert_eq!(value(&text, &series("dry_run")), 1.0);
        assert_eq!(value(&text, &series("already_gone")), 1.0);
        assert_eq!(
            value(&text, r#"observer_actions_total{action="shutdown",result="failed"}"#),
            0.0
        );
    }

    #[test]
    fn polls_set_gauges_advance_counters_and_fill_the_histogram() {
        let metrics = Metrics::new();
        let counters =
            [("state_events", 10), ("reset_events", 1), ("track_failed", 2), ("accept_errors", 0)];
        metrics.record_poll(&sample(&counters, 3));
        let counters =
            [("state_events", 25), ("reset_events", 1), ("track_failed", 2), ("accept_errors", 4)];
        metrics.record_poll(&sample(&counters, 3));
        let failed =
            PollSample { ok: false, duration: Duration::from_secs(2), ..PollSample::default() };
        metrics.record_poll(&failed);
        let text = metrics.encode();
        assert_eq!(value(&text, r#"observer_probe_events_total{probe="state"}"#), 25.0);
        assert_eq!(value(&text, r#"observer_probe_events_total{probe="reset"}"#), 1.0);
        assert_eq!(value(&text, "observer_probe_track_failed_total"), 2.0);
        assert_eq!(value(&text, "observer_accept_errors_total"), 4.0);
        assert_eq!(value(&text, "observer_events_dropped_total"), 3.0);
        // The failed poll left the last good figures.
        assert_eq!(value(&text, "observer_sockets_watched"), 7.0);
        assert_eq!(value(&text, "observer_namespaces_watched"), 2.0);
        assert_eq!(value(&text, "observer_probe_map_entries"), 5.0);
        assert_eq!(value(&text, "observer_probe_map_capacity"), 65_536.0);
        assert_eq!(value(&text, "observer_poll_errors_total"), 1.0);
        assert_eq!(value(&text, r#"observer_poll_duration_seconds_bucket{le="0.0025"}"#), 0.0);
        assert_eq!(value(&text, r#"observer_poll_duration_seconds_bucket{le="0.005"}"#), 2.0);
        assert_eq!(value(&text, r#"observer_poll_duration_seconds_bucket{le="+Inf"}"#), 3.0);
        assert_eq!(value(&text, "observer_poll_duration_seconds_count"), 3.0);
        assert!((value(&text, "observer_poll_duration_seconds_sum") - 2.006).abs() < 1e-9);
    }
}
