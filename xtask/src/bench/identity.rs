//! Node mode's look-ups of where each socket lives: polls that resolve many processes, each in
//! a container of its own, against polls of as many processes in none.
//!
//! The containers are real cgroups (v2), named as the kubelet and containerd name a pod's
//! container, with a pod log directory naming their pods, as /var/log/pods does: the agent
//! reads exactly what it reads on a Kubernetes node. Two agents run side by side, one watching
//! the port of the processes in containers and one the port of the others: a node-mode poll
//! walks every process of the machine whatever the port, so both see the same machine at the
//! same moments, and what else runs on it (this project's machines are shared) sways both.
use std::time::Duration;

use anyhow::{Context, Result, bail};
use observer_tests::{Agent, kubepods::FakeNode};
use serde_json::Value;

use super::{Figure, Options, Proc, agent, median, release, stop, ts_ms, unix_ms};

/// The one pod the policy alerts, so that every poll proves the look-ups happen.
const ALERTED: &str = "client-0";

/// A server holding one connection from each of many client processes.
struct Clients {
    port: String,
    pids: Vec<u32>,
    _server: Proc,
    _clients: Proc,
}

fn clients(processes: usize) -> Result<Clients> {
    let n = processes.to_string();
    let mut server =
        Proc::spawn(release("loadgen"), &["hold-server", "--connections", &n, "--touch"])?;
    let listening =
        server.wait_for("listening", Duration::from_secs(10), |v| v["event"] == "listening")?;
    let addr = listening["local"].as_str().context("no address")?.to_owned();
    let mut clients =
        Proc::spawn(release("loadgen"), &["fork-clients", "--connect", &addr, "--processes", &n])?;
    let ready = clients.wait_for("clients", Duration::from_secs(120), |v| v["event"] == "ready")?;
    server.wait_for("held", Duration::from_secs(60), |v| v["event"] == "ready")?;
    let pids = ready["pids"].as_array().context("no pids")?;
    Ok(Clients {
        port: addr.rsplit(':').next().unwrap_or_default().to_owned(),
        pids: pids.iter().filter_map(|p| p.as_u64().map(|p| p as u32)).collect(),
        _server: server,
        _clients: clients,
    })
}

/// What one agent measured.
struct Run {
    /// Median poll time after the first two polls.
    steady_ms: f64,
    /// The agent's CPU time per poll after the first two.
    cpu_ms: f64,
    /// The slowest poll of the first second: the first one, which resolves every process.
    first_ms: f64,
    /// Alerts, as the named pod's container id or, for any other, what was wrong.
    alerted: Vec<String>,
}

pub(super) fn identity(figures: &mut Vec<Figure>, opts: Options) -> Result<()> {
    let (processes, rounds, seconds) = if opts.smoke { (20, 1, 4) } else { (500, 6, 10) };
    let contained = clients(processes)?;
    let bare = clients(processes)?;
    let mut node = FakeNode::create();
    for (i, &pid) in contained.pids.iter().enumerate() {
        let container = node.add_pod("bench", &format!("client-{i}"));
        node.adopt(&container, pid);
    }
    let policy = node.pod_logs.with_extension("toml");
    std::fs::write(
        &policy,
        format!(
            "[defaults]\nidle_timeout = \"1h\"\n\n[[rule]]\nnamespace = \"bench\"\n\
             pod = \"{ALERTED}\"\nidle_timeout = \"1s\"\n"
        ),
    )?;
    let logs = node.pod_logs.to_str().context("pod log path")?.to_owned();
    let config = policy.to_str().context("policy path")?.to_owned();
    let args = |port: &str| -> Vec<String> {
        ["--all-namespaces", "--port", port, "--pod-logs", &logs, "--config", &config]
            .into_iter()
            .chain(["--stats-interval", "1s"])
            .map(str::to_owned)
            .collect()
    };
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let start = |port: &str| {
            let args = args(port);
            agent(&[], &args.iter().map(String::as_str).collect::<Vec<_>>())
        };
        // Started in turn, the first one first every other round.
        let (mut a, mut b) = if round % 2 == 0 {
            let a = start(&contained.port);
            (a, start(&bare.port))
        } else {
            let b = start(&bare.port);
            (start(&contained.port), b)
        };
        let (w, o) = measure(&mut a, &mut b, seconds)?;
        eprintln!(
            "bench: identity round {round}, {processes} processes: in containers poll {:.2} ms \
             ({:.2} ms CPU, first {:.1}), in none {:.2} ms ({:.2} ms CPU, first {:.1})",
            w.steady_ms, w.cpu_ms, w.first_ms, o.steady_ms, o.cpu_ms, o.first_ms
        );
        with.push(w);
        without.push(o);
    }
    let _ = std::fs::remove_file(&policy);

    let paired = |value: fn(&Run) -> f64| {
        let mut ratios: Vec<f64> =
            with.iter().zip(&without).map(|(w, o)| value(w) / value(o)).collect();
        let of = |runs: &[Run]| median(&mut runs.iter().map(value).collect::<Vec<_>>());
        (of(&with), of(&without), median(&mut ratios))
    };
    let (value, baseline, ratio) = paired(|r| r.steady_ms);
    figures.push(Figure {
        name: format!(
            "node mode: poll resolving {processes} processes each in a container cgroup of its \
             own (pods named from a pod log directory), {rounds} rounds, median of paired ratios"
        ),
        value,
        unit: "ms",
        baseline: Some((baseline, "as many processes in none, polled alongside")),
        ratio: Some(ratio),
        goal: "<= 1.10",
        met: Some(ratio <= 1.10),
        must_hold: false,
    });
    let (value, baseline, ratio) = paired(|r| r.cpu_ms);
    figures.push(Figure {
        name: format!("node mode: agent CPU per poll, {processes} processes in containers"),
        value,
        unit: "ms",
        baseline: Some((baseline, "as many processes in none")),
        ratio: Some(ratio),
        goal: "<= 1.10",
        met: Some(ratio <= 1.10),
        must_hold: false,
    });
    let (value, baseline, ratio) = paired(|r| r.first_ms);
    figures.push(Figure {
        name: format!("node mode: first poll, reading all {processes} cgroups once"),
        value,
        unit: "ms",
        baseline: Some((baseline, "as many processes in none")),
        ratio: Some(ratio),
        goal: "report",
        met: None,
        must_hold: false,
    });
    // Every run in containers alerted the named pod's connection with its container's id, and
    // nothing else; no run without containers alerted anything.
    let expected = &node.containers[0].container_id;
    let named =
        with.iter().all(|r| !r.alerted.is_empty() && r.alerted.iter().all(|id| id == expected));
    let unnamed = without.iter().all(|r| r.alerted.is_empty());
    figures.push(Figure {
        name: format!(
            "node mode: the policy's pod ({ALERTED}) alerted with its container id in every run, \
             nothing else"
        ),
        value: with.iter().map(|r| r.alerted.len()).sum::<usize>() as f64,
        unit: "alerts",
        baseline: None,
        ratio: None,
        goal: "right pod, right container, nothing else",
        met: Some(named && unnamed),
        must_hold: true,
    });
    Ok(())
}

/// Both agents for `seconds` of polls each.
fn measure(a: &mut Agent, b: &mut Agent, seconds: usize) -> Result<(Run, Run)> {
    let started = unix_ms();
    let after = move |v: &Value| v["event"] == "stats" && ts_ms(v) > started;
    let deadline = Duration::from_secs(seconds as u64 + 60);
    // CPU from the third stats line on: past the first polls, which read everything once.
    let sample = |agent: &mut Agent, n: usize| -> Result<(u64, u64)> {
        agent.out.wait_count("stats", deadline, n, after).map_err(anyhow::Error::msg)?;
        let cpu = cpu_ns(agent.program_pid());
        let stats = agent.out.seen.iter().filter(|v| after(v)).nth(n - 1);
        Ok((cpu, stats.and_then(|v| v["polls"].as_u64()).unwrap_or(0)))
    };
    let (a0, b0) = (sample(a, 3)?, sample(b, 3)?);
    let (a1, b1) = (sample(a, seconds)?, sample(b, seconds)?);
    stop(a)?;
    stop(b)?;
    Ok((run(a, a0, a1, after)?, run(b, b0, b1, after)?))
}

fn run(
    agent: &Agent,
    from: (u64, u64),
    to: (u64, u64),
    after: impl Fn(&Value) -> bool,
) -> Result<Run> {
    let stats: Vec<&Value> = agent.out.seen.iter().filter(|v| after(v)).collect();
    let first_ms = stats.first().and_then(|s| s["max_poll_ms"].as_f64()).context("no stats")?;
    let mut steady: Vec<f64> =
        stats.iter().skip(2).filter_map(|s| s["last_poll_ms"].as_f64()).collect();
    if steady.is_empty() {
        bail!("too few polls to measure");
    }
    let polls = to.1.saturating_sub(from.1).max(1);
    let cpu_ms = to.0.saturating_sub(from.0) as f64 / 1e6 / polls as f64;
    let alerted = agent
        .out
        .seen
        .iter()
        .filter(|v| v["event"] == "alert")
        .map(|v| {
            let pod = v["pod"].as_str().unwrap_or("(none)");
            let id = v["container_id"].as_str().unwrap_or("(none)");
            if v["reason"] == "idle" && pod == ALERTED { id.to_owned() } else { format!("{pod}?") }
        })
        .collect();
    Ok(Run { steady_ms: median(&mut steady), cpu_ms, first_ms, alerted })
}

/// CPU time process `pid` has used so far, over its live threads (schedstat: nanoseconds; the
/// polls run on one long-lived thread).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    threads
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}
