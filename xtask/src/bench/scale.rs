//! Poll cost and memory at scale: 10k to 100k held connections, against `ss -tinp`.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{Figure, Options, Proc, agent, median, release, stop, ts_ms, unix_ms};

/// A server process holding its share of the idle connections.
struct Holder {
    server: Proc,
    addr: String,
    pid: u32,
    connections: usize,
}

/// Servers for `connections` idle connections: several processes, since one may not hold more
/// fds than the machine's hard RLIMIT_NOFILE.
fn hold_servers(connections: usize) -> Result<Vec<Holder>> {
    let per_process = nix_hard_nofile().min(1 << 20).saturating_sub(200).clamp(1000, 16_667);
    let mut holders = Vec::new();
    for i in 0..connections.div_ceil(per_process) {
        let n = (connections - i * per_process).min(per_process);
        let mut server = Proc::spawn(
            release("loadgen"),
            &["hold-server", "--connections", &n.to_string(), "--touch"],
        )?;
        let listening =
            server.wait_for("listening", Duration::from_secs(10), |v| v["event"] == "listening")?;
        holders.push(Holder {
            addr: listening["local"].as_str().unwrap().to_owned(),
            pid: listening["pid"].as_u64().unwrap() as u32,
            server,
            connections: n,
        });
    }
    Ok(holders)
}

/// Connects each server's share of clients, each sending one byte (so the probes see every
/// connection move data), and waits until all are held.
fn hold_clients(holders: &mut [Holder]) -> Result<Vec<Proc>> {
    let mut clients = Vec::new();
    for h in holders.iter() {
        let n = h.connections.to_string();
        clients.push(Proc::spawn(
            release("loadgen"),
            &["hold-clients", "--connect", &h.addr, "--connections", &n, "--touch"],
        )?);
    }
    for h in holders.iter_mut() {
        h.server
            .wait_for("connections held", Duration::from_secs(300), |v| v["event"] == "ready")?;
    }
    Ok(clients)
}

fn nix_hard_nofile() -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit with a valid struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    limit.rlim_max as usize
}

/// One full poll cycle at scale, against `ss -tinp` over the same sockets; and the agent's
/// memory with the largest table.
pub(super) fn scale(figures: &mut Vec<Figure>, opts: Options) -> Result<()> {
    let sizes: &[usize] = if opts.smoke { &[1000] } else { &[10_000, 50_000, 100_000] };
    for &n in sizes {
        eprintln!("bench: holding {n} connections");
        let mut holders = hold_servers(n)?;
        let pids: Vec<u32> = holders.iter().map(|h| h.pid).collect();
        let ports: Vec<String> =
            holders.iter().map(|h| h.addr.rsplit(':').next().unwrap().to_owned()).collect();
        // Watching before the connections open, so the probes see (track) every one of them.
        let mut watching = agent(&pids, &["--stats-interval", "1s", "--idle-timeout", "1h"]);
        let clients = hold_clients(&mut holders)?;
        let held = unix_ms();
        let settled = |v: &Value| v["event"] == "stats" && ts_ms(v) > held;
        watching
            .out
            .wait_count("stats", Duration::from_secs(120), 8, settled)
            .map_err(anyhow::Error::msg)?;
        stop(&mut watching)?;
        // The first polls after the connections opened read every fd link and size the buffers;
        // the rest are the steady state.
        let stats: Vec<&Value> = watching.out.seen.iter().filter(|v| settled(v)).skip(2).collect();
        let mut steady: Vec<f64> =
            stats.iter().filter_map(|s| s["last_poll_ms"].as_f64()).collect();
        let poll_ms = median(&mut steady);
        let last = stats.last().context("no stats")?;
        let sockets = last["sockets"].as_u64().unwrap_or(0);
        let tracked = last["map_entries"].as_u64().unwrap_or(0);
        // A poll that missed sockets would look fast for the wrong reason.
        if sockets < n as u64 || tracked < n as u64 {
            bail!("the agent saw {sockets} sockets and tracked {tracked}, of {n} held");
        }
        let peak_kib = stats.iter().filter_map(|s| s["peak_rss_kib"].as_u64()).max().unwrap_or(0);
        let mut after_poll: Vec<f64> = stats.iter().filter_map(|s| s["rss_kib"].as_f64()).collect();
        let rss_kib = median(&mut after_poll);
        let filter = format!(
            "( {} )",
            ports.iter().map(|p| format!("sport = :{p}")).collect::<Vec<_>>().join(" or ")
        );
        // The fastest of a few runs, so the baseline has warm caches as the agent's polls do.
        let mut ss_ms = f64::MAX;
        for _ in 0..if n > 10_000 { 2 } else { 3 } {
            let start = Instant::now();
            let ss = Command::new("ss").args(["-tinp", &filter]).stdout(Stdio::null()).status()?;
            ss_ms = ss_ms.min(start.elapsed().as_secs_f64() * 1e3);
            if !ss.success() {
                bail!("ss -tinp failed");
            }
        }
        drop(clients);
        drop(holders);
        eprintln!(
            "bench: {n} connections: poll {poll_ms:.1} ms, ss -tinp {ss_ms:.0} ms, {sockets} sockets, {tracked} tracked, peak {peak_kib} KiB"
        );
        let big = n >= 100_000;
        figures.push(Figure {
            name: format!("poll cycle at {n} connections ({sockets} sockets watched)"),
            value: poll_ms,
            unit: "ms",
            baseline: Some((ss_ms, "ss -tinp")),
            ratio: Some(poll_ms / ss_ms),
            goal: if big { "<= 0.5x ss, <= 250 ms" } else { "<= 0.5x ss" },
            met: Some(poll_ms / ss_ms <= 0.5 && (!big || poll_ms <= 250.0)),
            must_hold: false,
        });
        if big || opts.smoke {
            let mib = peak_kib as f64 / 1024.0;
            figures.push(Figure {
                name: format!(
                    "agent memory: peak RSS while {tracked} tracked connections opened and were polled"
                ),
                value: mib,
                unit: "MiB",
                baseline: None,
                ratio: None,
                goal: if big { "<= 64 MiB" } else { "report" },
                met: big.then_some(mib <= 64.0),
                must_hold: false,
            });
            let mut f = Figure::plain(
                format!("agent memory: RSS right after a poll, {tracked} tracked (median)"),
                rss_kib / 1024.0,
                "MiB",
            );
            f.goal = "report";
            figures.push(f);
        }
    }
    Ok(())
}
