//! Does drawing `observer top` slow its polls? The same number of held connections is polled by
//! `watch` and then by `top` drawing in a real terminal (tmux) while its selection moves 20
//! times a second, as an operator scrolling makes it redraw. Each agent starts before its
//! connections open, so the probes track every one of them in both runs.
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use observer_tests::{observer_bin, tmux::Tmux};
use serde_json::Value;

use super::{
    Figure, Options, agent, median,
    scale::{hold_clients, hold_servers},
    stop, ts_ms, unix_ms,
};

/// Polls judged per run, after the first two once the connections are held.
const STEADY_POLLS: usize = 8;

pub fn top(figures: &mut Vec<Figure>, opts: Options) -> Result<()> {
    let n = if opts.smoke { 500 } else { 10_000 };
    // This VM's poll times drift by ±30% from minute to minute: alternate the two, a few
    // rounds, and compare the medians of all their polls.
    let rounds = if opts.smoke { 1 } else { 3 };
    let (mut watch_ms, mut top_ms, mut table_ms, mut draw_ms) = (vec![], vec![], vec![], vec![]);
    for round in 1..=rounds {
        eprintln!("bench: round {round} of {rounds}: {n} connections polled by watch, then top");
        watch_ms.extend(watch_polls(n)?);
        let drawn = top_polls(n)?;
        top_ms.extend(drawn.polls);
        table_ms.extend(drawn.table);
        draw_ms.extend(drawn.draw);
    }
    let (watch_ms, top_ms) = (median(&mut watch_ms), median(&mut top_ms));
    let (table_ms, draw_ms) = (median(&mut table_ms), median(&mut draw_ms));
    eprintln!(
        "bench: poll at {n}: watch {watch_ms:.1} ms, top {top_ms:.1} ms (table {table_ms:.1} ms, \
         draw {draw_ms:.1} ms)"
    );
    let ratio = top_ms / watch_ms;
    figures.push(Figure {
        baseline: Some((watch_ms, "watch")),
        ratio: Some(ratio),
        goal: "<= 1.1x watch",
        met: Some(ratio <= 1.1),
        ..Figure::plain(
            format!("poll at {n} connections while top draws (selection moving 20/s)"),
            top_ms,
            "ms",
        )
    });
    let mut table = Figure::plain(
        format!("top: building its table of {n} rows after a poll (on the poll thread)"),
        table_ms,
        "ms",
    );
    table.goal = "report";
    figures.push(table);
    let mut draw = Figure::plain("top: drawing one 200x60 frame (main loop)", draw_ms, "ms");
    draw.goal = "report";
    figures.push(draw);
    Ok(())
}

/// `watch`'s steady poll times over `n` fresh connections.
fn watch_polls(n: usize) -> Result<Vec<f64>> {
    let mut holders = hold_servers(n)?;
    let pids: Vec<u32> = holders.iter().map(|h| h.pid).collect();
    let mut watching = agent(&pids, &["--stats-interval", "1s", "--idle-timeout", "1h"]);
    let _clients = hold_clients(&mut holders)?;
    let held = unix_ms();
    let settled = |v: &Value| v["event"] == "stats" && ts_ms(v) > held;
    watching
        .out
        .wait_count("stats", Duration::from_secs(120), STEADY_POLLS + 2, settled)
        .map_err(anyhow::Error::msg)?;
    stop(&mut watching)?;
    steady_polls(&watching.out.seen, held, n)
}

/// What one run of `top` measured.
struct Drawn {
    polls: Vec<f64>,
    /// From its header: building the table, drawing a frame.
    table: Vec<f64>,
    draw: Vec<f64>,
}

/// `top`'s steady poll times over `n` fresh connections, drawing in tmux while the selection
/// moves, and what its header says building and drawing took.
fn top_polls(n: usize) -> Result<Drawn> {
    let mut holders = hold_servers(n)?;
    let log = std::env::temp_dir().join(format!("observer-bench-top-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let mut args = vec!["top".to_owned()];
    for h in &holders {
        args.extend(["--pid".to_owned(), h.pid.to_string()]);
    }
    args.extend(["--stats-interval", "1s", "--idle-timeout", "1h", "--log"].map(str::to_owned));
    args.push(log.display().to_string());
    let tmux = Tmux::start(200, 60, &format!("{} {}", observer_bin().display(), args.join(" ")));
    wait_screen(&tmux, "top's first poll", |s| s.contains("LISTEN"))?;
    let _clients = hold_clients(&mut holders)?;
    let held = unix_ms();
    let mut drawn = Drawn { polls: vec![], table: vec![], draw: vec![] };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut presses = 0u64;
    loop {
        let stats = observer_tests::read_json_lines(&log);
        if stats.iter().filter(|v| v["event"] == "stats" && ts_ms(v) > held).count()
            >= STEADY_POLLS + 2
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("top logged too few stats within 120 s: {:?}", stats.last());
        }
        // Down for a while, then back up: the table scrolls and redraws on every press.
        let key = if (presses / 40).is_multiple_of(2) { "Down" } else { "Up" };
        tmux.keys(&[key]);
        presses += 1;
        if presses.is_multiple_of(20) {
            let screen = tmux.screen();
            drawn.table.extend(header_ms(&screen, "table"));
            drawn.draw.extend(header_ms(&screen, "draw"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    tmux.keys(&["q"]);
    let end = Instant::now() + Duration::from_secs(10);
    while !observer_tests::read_json_lines(&log).iter().any(|v| v["event"] == "stopped") {
        if Instant::now() > end {
            bail!("top did not stop on q: {}", tmux.screen());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drawn.polls = steady_polls(&observer_tests::read_json_lines(&log), held, n)?;
    let _ = std::fs::remove_file(&log);
    Ok(drawn)
}

/// The `last_poll_ms` of the steady polls: after the connections were held, skipping the first
/// two (they read every fd link and size the buffers). Fails when a poll missed connections,
/// which would look fast for the wrong reason.
fn steady_polls(lines: &[Value], held: u64, n: usize) -> Result<Vec<f64>> {
    let stats: Vec<&Value> =
        lines.iter().filter(|v| v["event"] == "stats" && ts_ms(v) > held).skip(2).collect();
    let last = stats.last().context("no stats")?;
    let (sockets, tracked) = (last["sockets"].as_u64(), last["map_entries"].as_u64());
    if sockets.unwrap_or(0) < n as u64 || tracked.unwrap_or(0) < n as u64 {
        bail!("the agent saw {sockets:?} sockets and tracked {tracked:?}, of {n} held");
    }
    Ok(stats.iter().filter_map(|s| s["last_poll_ms"].as_f64()).collect())
}

fn wait_screen(tmux: &Tmux, what: &str, matches: impl Fn(&str) -> bool) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let screen = tmux.screen();
        if matches(&screen) {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("no {what} within 60 s; the screen:\n{screen}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A time top's header gives, e.g. `table 4.1ms`.
fn header_ms(screen: &str, label: &str) -> Option<f64> {
    let header = screen.lines().next()?;
    let after = header.split(&format!("  {label} ")).nth(1)?;
    after.split("ms").next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_times_are_read_back() {
        let header = "observer top  pid 9  tracepoint  poll 31.2ms/1s  table 4.1ms  draw 0.9ms";
        assert_eq!(header_ms(header, "table"), Some(4.1));
        assert_eq!(header_ms(header, "draw"), Some(0.9));
        assert_eq!(header_ms(header, "nothing"), None);
    }
}
