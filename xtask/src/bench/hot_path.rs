//! What watching costs a saturated server: throughput and p99 latency with and without the
//! agent (paired rounds), the probes' kernel time against the server's own CPU, and each
//! probe's time per event against an empty program's. Measured on the project's own
//! thread-per-connection echo server and on Debian's nginx loaded by wrk.
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use super::{Figure, Options, Proc, agent, echo_server, median, ping, stop, ts_ms, unix_ms};

mod nginx;

/// One server under load: how to drive it and whose CPU it burns.
struct Workload {
    name: &'static str,
    /// The process the agent is told to watch (`--pid`; forked workers are followed).
    pid: u32,
    /// Saturates the server for that many seconds.
    load: Box<dyn Fn(u64) -> Result<Throughput>>,
    /// The server's processes, whose CPU time is the denominator of the probes' share.
    processes: Box<dyn Fn() -> Vec<u32>>,
}

struct Throughput {
    rps: f64,
    p99_us: Option<f64>,
}

/// An agent configuration measured against no agent at all; the first is the default one,
/// which carries the goals.
struct Arm {
    name: &'static str,
    flags: &'static [&'static str],
}

const WATCHED: Arm = Arm { name: "watched", flags: &[] };
const NO_SLEEP_TIMING: Arm =
    Arm { name: "watched with --no-sleep-timing", flags: &["--no-sleep-timing"] };
const SYSCALL_TIMING: Arm =
    Arm { name: "watched with --syscall-timing", flags: &["--syscall-timing"] };

fn echo_workload() -> Result<(Proc, Workload)> {
    let (server, addr, pid) = echo_server()?;
    let workload = Workload {
        name: "echo server",
        pid,
        load: Box::new(move |seconds| {
            let result = ping(&addr, seconds)?;
            Ok(Throughput {
                rps: result["rps"].as_f64().context("no rps")?,
                p99_us: result["p99_us"].as_f64(),
            })
        }),
        processes: Box::new(move || vec![pid]),
    };
    Ok((server, workload))
}

pub fn hot_path(figures: &mut Vec<Figure>, opts: Options) -> Result<()> {
    let (_server, echo) = echo_workload()?;
    paired(figures, opts, &echo, &[WATCHED, NO_SLEEP_TIMING, SYSCALL_TIMING])?;
    cpu_share(figures, opts, &echo)?;
    let (_nginx, nginx) = nginx::workload()?;
    paired(figures, opts, &nginx, &[WATCHED, NO_SLEEP_TIMING])?;
    cpu_share(figures, opts, &nginx)
}

/// Each round runs the baseline and every arm back to back in a rotating order and yields one
/// ratio per arm against that round's own baseline; the median over rounds cancels most of the
/// machine's drift.
fn paired(figures: &mut Vec<Figure>, opts: Options, w: &Workload, arms: &[Arm]) -> Result<()> {
    let (rounds, seconds) = if opts.smoke { (1, 1) } else { (9, 3) };
    let columns = arms.len() + 1; // column 0 is the baseline
    let mut runs: Vec<Vec<Throughput>> = (0..columns).map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for i in 0..columns {
            let column = (round + i) % columns;
            let mut watching = (column > 0).then(|| {
                let mut args = vec!["--stats-interval", "0"];
                args.extend_from_slice(arms[column - 1].flags);
                agent(&[w.pid], &args)
            });
            let result = (w.load)(seconds)?;
            if let Some(a) = &mut watching {
                stop(a)?;
            }
            let name = if column == 0 { "unwatched" } else { arms[column - 1].name };
            eprintln!("bench: {} round {round} {name}: {:.0} req/s", w.name, result.rps);
            runs[column].push(result);
        }
    }
    let rps = |c: usize| runs[c].iter().map(|t| t.rps).collect::<Vec<f64>>();
    let p99 = |c: usize| runs[c].iter().filter_map(|t| t.p99_us).collect::<Vec<f64>>();
    let ratio = |a: &[f64], b: &[f64]| {
        let mut r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
        median(&mut r)
    };
    let unwatched = rps(0);
    for (i, arm) in arms.iter().enumerate() {
        let column = i + 1;
        let default = i == 0;
        let watched = rps(column);
        let r = ratio(&watched, &unwatched);
        figures.push(Figure {
            name: format!(
                "{}: throughput, {} ({rounds} rounds, median of paired ratios)",
                w.name, arm.name
            ),
            value: median(&mut watched.clone()),
            unit: "req/s",
            baseline: Some((median(&mut unwatched.clone()), "unwatched")),
            ratio: Some(r),
            goal: if default { ">= 0.99" } else { "report" },
            met: default.then_some(r >= 0.99),
            must_hold: false,
        });
        let (with, without) = (p99(column), p99(0));
        if !with.is_empty() && with.len() == without.len() {
            let r = ratio(&with, &without);
            figures.push(Figure {
                name: format!("{}: p99 latency, {}", w.name, arm.name),
                value: median(&mut with.clone()),
                unit: "us",
                baseline: Some((median(&mut without.clone()), "unwatched")),
                ratio: Some(r),
                goal: if default { "<= 1.05" } else { "report" },
                met: default.then_some(r <= 1.05),
                must_hold: false,
            });
        }
    }
    // What timing blocked threads from their sleeps costs: the default against the same agent
    // without it, in the same rounds.
    if let Some(i) = arms.iter().position(|a| a.flags == NO_SLEEP_TIMING.flags) {
        let (with, without) = (rps(1), rps(i + 1));
        let r = ratio(&with, &without);
        figures.push(Figure {
            name: format!(
                "{}: throughput with sleep timing (the default), against without",
                w.name
            ),
            value: median(&mut with.clone()),
            unit: "req/s",
            baseline: Some((median(&mut without.clone()), "--no-sleep-timing")),
            ratio: Some(r),
            goal: ">= 0.995",
            met: Some(r >= 0.995),
            must_hold: false,
        });
    }
    Ok(())
}

/// Kernel time of every program run (from BPF run-time statistics) over a loaded interval.
#[derive(Default)]
struct ProbeTime {
    /// Program name -> (runs, total ns).
    programs: Vec<(String, u64, f64)>,
}

impl ProbeTime {
    fn of(stats: &Value) -> Result<ProbeTime> {
        let costs = stats["probe_cost"].as_object().context("no probe_cost in stats")?;
        let programs = costs
            .iter()
            .map(|(name, c)| {
                let runs = c["runs"].as_u64().unwrap_or(0);
                (name.clone(), runs, runs as f64 * c["ns_per_run"].as_f64().unwrap_or(0.0))
            })
            .collect();
        Ok(ProbeTime { programs })
    }

    /// Runs and ns per run of each program between `earlier` and `self`.
    fn since(&self, earlier: &ProbeTime) -> Vec<(String, u64, f64)> {
        self.programs
            .iter()
            .map(|(name, runs, ns)| {
                let (r0, ns0) =
                    earlier.programs.iter().find(|p| &p.0 == name).map_or((0, 0.0), |p| (p.1, p.2));
                let runs = runs - r0.min(*runs);
                (name.clone(), runs, if runs == 0 { 0.0 } else { (ns - ns0) / runs as f64 })
            })
            .collect()
    }
}

/// CPU time (user + system, all threads) of `pids`, in ns.
fn cpu_ns(pids: &[u32]) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name, which may hold spaces: utime and stime are the
            // 12th and 13th of them.
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum::<u64>()
        * 1_000_000_000
        / ticks
}

/// The probes' kernel time as a share of the server's CPU, at saturation, and (for the echo
/// server) each program's time per event against the empty program's.
fn cpu_share(figures: &mut Vec<Figure>, opts: Options, w: &Workload) -> Result<()> {
    let seconds = if opts.smoke { 1 } else { 10 };
    let mut watching = agent(&[w.pid], &["--probe-stats", "--stats-interval", "1s"]);
    let attached = unix_ms();
    let before = watching.wait_for("stats before the load", Duration::from_secs(10), |v| {
        v["event"] == "stats" && ts_ms(v) > attached
    });
    let cpu_before = cpu_ns(&(w.processes)());
    (w.load)(seconds)?;
    let cpu = cpu_ns(&(w.processes)()) - cpu_before;
    let loaded = unix_ms();
    let after = watching.wait_for("stats after the load", Duration::from_secs(10), |v| {
        v["event"] == "stats" && ts_ms(v) > loaded
    });
    stop(&mut watching)?;
    let programs = ProbeTime::of(&after)?.since(&ProbeTime::of(&before)?);
    let floor = programs.iter().find(|p| p.0 == "observer_tp_floor").map(|p| p.2);
    let ours = programs.iter().filter(|p| p.0 != "observer_tp_floor");
    let total: f64 = ours.clone().map(|p| p.1 as f64 * p.2).sum();
    let share = total / cpu.max(1) as f64;
    figures.push(Figure {
        name: format!(
            "{}: probes' kernel time / the server's CPU at saturation (BPF statistics' own clock \
             reads included)",
            w.name
        ),
        value: share * 100.0,
        unit: "%",
        baseline: Some((cpu as f64 / 1e6, "server CPU ms")),
        ratio: None,
        goal: "<= 2%",
        met: Some(share <= 0.02),
        must_hold: false,
    });
    if let Some(floor) = floor {
        let above: f64 = ours.clone().map(|p| p.1 as f64 * (p.2 - floor).max(0.0)).sum();
        let mut f = Figure::plain(
            format!(
                "{}: the same, above an empty program's cost per run (the probes' own work)",
                w.name
            ),
            above / cpu.max(1) as f64 * 100.0,
            "%",
        );
        f.goal = "report";
        figures.push(f);
    }
    if w.name != "echo server" {
        return Ok(());
    }
    if let Some(floor) = floor {
        let mut f = Figure::plain(
            "per-event cost: an empty program on the same tracepoint (the floor)",
            floor,
            "ns",
        );
        f.goal = "report";
        figures.push(f);
    }
    for &(ref program, runs, ns) in ours.filter(|p| p.1 > 0) {
        let data_path = program == "observer_tp_send" || program == "observer_tp_recv";
        figures.push(match (data_path, floor) {
            (true, Some(floor)) => Figure {
                name: format!("per-event cost: {program} above the floor ({runs} runs)"),
                value: ns - floor,
                unit: "ns",
                baseline: Some((floor, "empty program")),
                ratio: Some(ns / floor),
                goal: "<= 40 ns",
                met: Some(ns - floor <= 40.0),
                must_hold: false,
            },
            _ => {
                let mut f =
                    Figure::plain(format!("per-event cost: {program} ({runs} runs)"), ns, "ns");
                f.goal = "report";
                f
            }
        });
    }
    Ok(())
}

/// `--syscall-timing`'s programs per event, reported (it is opt-in).
pub fn per_event(figures: &mut Vec<Figure>, opts: Options) -> Result<()> {
    let seconds = if opts.smoke { 1 } else { 5 };
    let (_server, addr, pid) = echo_server()?;
    let mut watching =
        agent(&[pid], &["--probe-stats", "--stats-interval", "1s", "--syscall-timing"]);
    ping(&addr, seconds)?;
    let after = unix_ms();
    let stats = watching.wait_for("stats after the load", Duration::from_secs(10), |v| {
        v["event"] == "stats" && ts_ms(v) > after
    });
    stop(&mut watching)?;
    for (program, runs, ns) in ProbeTime::of(&stats)?.programs {
        if !program.contains("_sys_") || runs == 0 {
            continue;
        }
        let mut f = Figure::plain(
            format!("per-event cost: {program} ({runs} runs, --syscall-timing)"),
            ns / runs as f64,
            "ns",
        );
        f.goal = "report";
        figures.push(f);
    }
    Ok(())
}
