//! `/healthz` and `/readyz`: whether polls keep succeeding, and whether the agent has started.
//! The watch loop records what happens (a few timestamps, under a lock held for microseconds);
//! the verdicts are pure functions of that record, the poll interval and the time now.
use std::time::{Duration, Instant};

/// Polls may fall this many intervals behind before the agent counts as unhealthy.
pub const STALE_AFTER_INTERVALS: u32 = 3;
/// How long loading the probes may take before the agent counts as stuck in start-up.
pub const START_GRACE: Duration = Duration::from_secs(60);

/// What the watch loop has seen of start-up and polls.
#[derive(Clone, Debug)]
pub struct HealthRecord {
    /// When the agent started (before the probes load).
    pub started: Instant,
    /// When the probes were attached.
    pub attached: Option<Instant>,
    /// When the poll under way started, if one is.
    pub polling_since: Option<Instant>,
    /// When the last successful poll finished.
    pub last_ok: Option<Instant>,
    /// Polls failed since the last success, and the last one's error.
    pub failed_in_row: u32,
    pub last_error: Option<String>,
}

/// An answer for a probe endpoint: healthy or not, and a line saying why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    pub why: String,
}

impl HealthRecord {
    pub fn new(started: Instant) -> Self {
        HealthRecord {
            started,
            attached: None,
            polling_since: None,
            last_ok: None,
            failed_in_row: 0,
            last_error: None,
        }
    }

    pub fn poll_started(&mut self, at: Instant) {
        self.polling_since = Some(at);
    }

    /// A poll ended at `at`, with `error` if it failed.
    pub fn poll_finished(&mut self, at: Instant, error: Option<String>) {
        self.polling_since = None;
        match error {
            None => {
                self.last_ok = Some(at);
                self.failed_in_row = 0;
                self.last_error = None;
            }
            Some(error) => {
                self.failed_in_row += 1;
                self.last_error = Some(error);
            }
        }
    }
}

/// `/healthz`: healthy while a poll succeeded within the last [`STALE_AFTER_INTERVALS`] poll
/// intervals (counted from the probes' attachment until the first poll), and while start-up is
/// within [`START_GRACE`].
pub fn liveness(record: &HealthRecord, interval: Duration, now: Instant) -> Verdict {
    let Some(attached) = record.attached else {
        let loading = now.saturating_duration_since(record.started);
        return if loading <= START_GRACE {
            verdict(true, format!("starting: loading the probes ({})", secs(loading)))
        } else {
            verdict(false, format!("the probes have been loading for {}", secs(loading)))
        };
    };
    let limit = interval * STALE_AFTER_INTERVALS;
    let since = now.saturating_duration_since(record.last_ok.unwrap_or(attached));
    if since <= limit {
        return match record.last_ok {
            Some(_) => verdict(true, format!("ok: the last poll succeeded {} ago", secs(since))),
            None => verdict(true, "ok: probes attached, first poll under way".into()),
        };
    }
    let window = format!("{STALE_AFTER_INTERVALS} poll intervals: {}", secs(limit));
    let why = match (&record.last_error, record.polling_since) {
        (Some(error), _) => format!(
            "no poll has succeeded for {} ({window}); {} failed in a row, the last with: {error}",
            secs(since),
            record.failed_in_row
        ),
        (None, Some(polling)) => format!(
            "no poll has finished for {} ({window}); the one under way started {} ago",
            secs(since),
            secs(now.saturating_duration_since(polling))
        ),
        (None, None) => format!("no poll has finished for {} ({window})", secs(since)),
    };
    verdict(false, why)
}

/// `/readyz`: ready once the probes are attached and a first poll has succeeded.
pub fn readiness(record: &HealthRecord) -> Verdict {
    match (record.attached, record.last_ok) {
        (None, _) => verdict(false, "not ready: the probes are not attached yet".into()),
        (Some(_), None) => verdict(false, "not ready: the first poll has not succeeded yet".into()),
        (Some(_), Some(_)) => verdict(true, "ready".into()),
    }
}

fn verdict(ok: bool, why: String) -> Verdict {
    Verdict { ok, why }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A record of an agent started at `t0`, probes attached 500 ms later.
    fn attached(t0: Instant) -> HealthRecord {
        let mut record = HealthRecord::new(t0);
        record.attached = Some(t0 + ms(500));
        record
    }

    #[test]
    fn starting_up_is_healthy_within_the_grace_and_not_ready() {
        let t0 = Instant::now();
        let record = HealthRecord::new(t0);
        let live = liveness(&record, INTERVAL, t0 + ms(5_000));
        assert!(live.ok && live.why.starts_with("starting"), "{live:?}");
        let live = liveness(&record, INTERVAL, t0 + START_GRACE + ms(1));
        assert!(!live.ok && live.why.contains("loading"), "{live:?}");
        let ready = readiness(&record);
        assert!(!ready.ok && ready.why.contains("not attached"), "{ready:?}");
    }

    #[test]
    fn healthy_while_polls_succeed_within_three_intervals() {
        let t0 = Instant::now();
        let mut record = attached(t0);
        // Attached, no poll yet: three intervals from the attachment.
        assert!(liveness(&record, INTERVAL, t0 + ms(3_500)).ok);
        assert!(!readiness(&record).ok);
        record.poll_started(t0 + ms(600));
        record.poll_finished(t0 + ms(700), None);
        assert_eq!(readiness(&record), Verdict { ok: true, why: "ready".into() });
        for at in [ms(700), ms(2_000), ms(3_700)] {
            let live = liveness(&record, INTERVAL, t0 + at);
            assert!(live.ok, "{at:?}: {live:?}");
        }
        let live = liveness(&record, INTERVAL, t0 + ms(3_701));
        assert!(!live.ok && live.why.contains("3 poll intervals: 3.0s"), "{live:?}");
        // The poll interval sets the window.
        assert!(liveness(&record, INTERVAL * 2, t0 + ms(6_000)).ok);
    }

    #[test]
    fn failing_polls_make_it_unhealthy_with_the_error_but_stay_ready() {
        let t0 = Instant::now();
        let mut record = attached(t0);
        record.poll_finished(t0 + ms(1_000), None);
        for n in 1..=4u64 {
            record.poll_started(t0 + ms(1_000 + n * 1_000));
            record.poll_finished(t0 + ms(1_010 + n * 1_000), Some("sock_diag: EPERM".into()));
        }
        // One success 3 s ago still counts, despite the failures since.
        assert!(liveness(&record, INTERVAL, t0 + ms(4_000)).ok);
        let live = liveness(&record, INTERVAL, t0 + ms(5_010));
        assert!(!live.ok, "{live:?}");
        assert!(live.why.contains("4 failed in a row") && live.why.ends_with("EPERM"), "{live:?}");
        assert!(readiness(&record).ok, "once ready, stays ready");
        // A success heals it at once.
        record.poll_finished(t0 + ms(5_100), None);
        assert!(liveness(&record, INTERVAL, t0 + ms(5_100)).ok);
    }

    #[test]
    fn a_poll_that_never_finishes_is_unhealthy_and_says_so() {
        let t0 = Instant::now();
        let mut record = attached(t0);
        record.poll_finished(t0 + ms(1_000), None);
        record.poll_started(t0 + ms(2_000));
        let live = liveness(&record, INTERVAL, t0 + ms(9_000));
        assert!(!live.ok, "{live:?}");
        assert!(live.why.contains("the one under way started 7.0s ago"), "{live:?}");
        // Attached but the first poll never came back.
        let mut record = attached(t0);
        record.poll_started(t0 + ms(600));
        assert!(!liveness(&record, INTERVAL, t0 + ms(3_600)).ok);
    }
}
