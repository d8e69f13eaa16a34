//! Detection under load: how soon an idle connection is alerted, and whether churning
//! connections at a high rate leaves anything behind, loses anything or alerts falsely.
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;

use super::{Figure, Options, Proc, agent, echo_server, median, release, stop, ts_ms, unix_ms};

/// Time from a connection crossing its idle threshold to its alert line.
pub fn latency(figures: &mut Vec<Figure>, opts: Options) -> Result<()> {
    let connections = if opts.smoke { 3 } else { 20 };
    let (_server, addr, pid) = echo_server()?;
    let mut watching =
        agent(&[pid], &["--poll-interval", "1s", "--idle-timeout", "3s", "--stats-interval", "0"]);
    // Opened 137 ms apart, so crossings fall at every phase of the poll cycle.
    let n = connections.to_string();
    let mut opener = Proc::spawn(
        release("loadgen"),
        &["stagger", "--connect", &addr, "--connections", &n, "--interval-ms", "137"],
    )?;
    let opened =
        opener.wait_count("connections opened", Duration::from_secs(60), connections, |v| {
            v["event"] == "opened"
        })?;
    let mut lateness = Vec::new();
    for opened in opened {
        let local = opened["local"].as_str().unwrap().to_owned();
        let crossing = opened["at_unix_ms"].as_u64().unwrap() + 3000;
        let alert = watching.wait_for("idle alert", Duration::from_secs(30), |v| {
            v["event"] == "alert" && v["reason"] == "idle" && v["remote"] == local
        });
        lateness.push(ts_ms(&alert) as f64 - crossing as f64);
    }
    stop(&mut watching)?;
    let worst = lateness.iter().copied().fold(f64::MIN, f64::max);
    let typical = median(&mut lateness.clone());
    figures.push(Figure {
        name: format!("detection latency, worst of {connections} (median {typical:.0} ms)"),
        value: worst,
        unit: "ms",
        baseline: Some((1000.0, "poll interval")),
        ratio: Some(worst / 1000.0),
        goal: "<= 1 poll interval",
        met: Some(worst <= 1000.0),
        must_hold: false,
    });
    Ok(())
}

/// Connections opened and closed at a high rate: the socket map must shrink back, nothing may be
/// lost, and only the truly idle connections may be alerted.
pub fn churn(figures: &mut Vec<Figure>, opts: Options) -> Result<()> {
    let (rate, seconds) = if opts.smoke { (200, 3) } else { (2000, 60) };
    let (_server, addr, pid) = echo_server()?;
    let mut watching = agent(&[pid], &["--idle-timeout", "3s", "--stats-interval", "1s"]);
    let mut idle = Proc::spawn(
        release("loadgen"),
        &["stagger", "--connect", &addr, "--connections", "3", "--interval-ms", "1"],
    )?;
    let idle_remotes: Vec<String> = idle
        .wait_count("idle connections", Duration::from_secs(10), 3, |v| v["event"] == "opened")?
        .iter()
        .map(|v| v["local"].as_str().unwrap().to_owned())
        .collect();
    // The baseline includes whatever the idle connections hold.
    let opened = unix_ms();
    let before = watching.wait_for("stats before churn", Duration::from_secs(10), |v| {
        v["event"] == "stats" && ts_ms(v) > opened
    });
    let ms = (seconds * 1000).to_string();
    let result = Proc::spawn(
        release("loadgen"),
        &["churn", "--connect", &addr, "--rate", &rate.to_string(), "--duration-ms", &ms],
    )?
    .finish(Duration::from_secs(seconds + 60))?;
    let churned = result["connections"].as_u64().unwrap_or(0);
    let churn_failed = result["failed"].as_u64().unwrap_or(0);
    // The map drains back to what it held before once the churned sockets are destroyed.
    let baseline_entries = before["map_entries"].as_u64().unwrap_or(0);
    let done = unix_ms();
    let settled = watching.wait_for("map back to its size", Duration::from_secs(60), |v| {
        v["event"] == "stats"
            && ts_ms(v) > done
            && v["map_entries"].as_u64().unwrap_or(u64::MAX) <= baseline_entries
    });
    stop(&mut watching)?;
    let peak_entries = watching
        .out
        .seen
        .iter()
        .filter(|v| v["event"] == "stats")
        .filter_map(|v| v["map_entries"].as_u64())
        .max()
        .unwrap_or(0);
    let counter = |v: &Value, name: &str| v["probe_counters"][name].as_u64().unwrap_or(0);
    let lost: u64 = ["events_lost", "track_failed", "thread_track_failed"]
        .iter()
        .map(|c| counter(&settled, c) - counter(&before, c))
        .sum();
    // Each churned connection's server side received its byte, so the probes must have
    // tracked it (and the map drained again): otherwise "no growth" proves nothing.
    let tracked = counter(&settled, "sockets_tracked") - counter(&before, "sockets_tracked");
    let alerts: Vec<&Value> = watching.out.seen.iter().filter(|v| v["event"] == "alert").collect();
    let false_alerts =
        alerts.iter().filter(|a| !idle_remotes.iter().any(|r| a["remote"] == r.as_str())).count();
    let missed = idle_remotes
        .iter()
        .filter(|r| !alerts.iter().any(|a| a["reason"] == "idle" && a["remote"] == r.as_str()))
        .count();
    let duplicate = alerts.len() - false_alerts > idle_remotes.len();
    eprintln!(
        "bench: churn: {churned} connections ({churn_failed} failed), map peak {peak_entries}, after {}",
        settled["map_entries"]
    );
    let ok = lost == 0
        && false_alerts == 0
        && missed == 0
        && !duplicate
        && churn_failed == 0
        && tracked >= churned;
    figures.push(Figure {
        name: format!(
            "churn {rate}/s for {seconds}s: {churned} connections ({tracked} tracked receives), \
             map at 1 s samples peak {peak_entries} -> {} after; \
             {lost} lost events, {false_alerts} false and {missed} missed alerts",
            settled["map_entries"]
        ),
        value: settled["map_entries"].as_f64().unwrap_or(f64::NAN),
        unit: "map entries after",
        baseline: Some((baseline_entries as f64, "before churn")),
        ratio: None,
        goal: "no growth, nothing lost or wrong",
        met: Some(ok),
        must_hold: true,
    });
    Ok(())
}
