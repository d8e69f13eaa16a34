//! `cargo xtask bench`: every performance figure of the agent, each next to its baseline measured
//! in the same run, printed as a table and as one JSON line per figure, and saved (full runs) in
//! docs/benchmarks.md. `--smoke` runs the same harness at toy sizes, for CI.
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use observer_tests::{Agent, JsonLines};
use serde_json::{Value, json};

use crate::workspace_root;

mod identity;
mod scale;

#[derive(Clone, Copy)]
pub struct Options {
    pub smoke: bool,
    /// Run only this part (for working on one figure); the report is then not written.
    pub only: Option<&'static str>,
}

const PARTS: [&str; 6] = ["hot-path", "per-event", "latency", "scale", "identity", "churn"];

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut opts = Options { smoke: false, only: None };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--smoke" => opts.smoke = true,
                "--only" => {
                    let part = args.next().map(String::as_str).unwrap_or_default();
                    let known = PARTS.iter().find(|&&p| p == part);
                    opts.only = Some(known.with_context(|| {
                        format!("--only takes one of {}, not {part:?}", PARTS.join(", "))
                    })?);
                }
                other => bail!("unknown bench option {other:?}: try --smoke or --only PART"),
            }
        }
        Ok(opts)
    }

    fn runs(&self, part: &str) -> bool {
        self.only.is_none_or(|only| only == part)
    }
}

/// One line of the results table.
struct Figure {
    name: String,
    value: f64,
    unit: &'static str,
    baseline: Option<(f64, &'static str)>,
    ratio: Option<f64>,
    goal: &'static str,
    met: Option<bool>,
    /// A correctness check rather than a speed goal: the run fails when it does not hold.
    must_hold: bool,
}

impl Figure {
    fn plain(name: impl Into<String>, value: f64, unit: &'static str) -> Figure {
        Figure {
            name: name.into(),
            value,
            unit,
            baseline: None,
            ratio: None,
            goal: "",
            met: None,
            must_hold: false,
        }
    }

    fn json(&self) -> Value {
        json!({
            "figure": self.name,
            "value": round(self.value),
            "unit": self.unit,
            "baseline": self.baseline.map(|(v, what)| json!({"value": round(v), "of": what})),
            "ratio": self.ratio.map(round),
            "goal": self.goal,
            "met": self.met,
        })
    }
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn release(name: &str) -> PathBuf {
    workspace_root().join("target/release").join(name)
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A helper process printing JSON lines (loadgen, the scenario server).
struct Proc {
    child: Child,
    out: JsonLines,
}

impl Proc {
    fn spawn(program: PathBuf, args: &[&str]) -> Result<Proc> {
        let mut child = Command::new(&program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        Ok(Proc { child, out: JsonLines::new(stdout, "a load generator") })
    }

    /// Waits until at least `n` lines (seen or to come) match; returns them in order.
    fn wait_count(
        &mut self,
        what: &str,
        deadline: Duration,
        n: usize,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Vec<Value>> {
        self.out.wait_count(what, deadline, n, &matches).map_err(anyhow::Error::msg)?;
        Ok(self.out.seen.iter().filter(|v| matches(v)).cloned().collect())
    }

    fn wait_for(
        &mut self,
        what: &str,
        deadline: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        self.out.wait_for(what, deadline, matches).map_err(anyhow::Error::msg)
    }

    /// Runs to completion and returns its last JSON line.
    fn finish(mut self, deadline: Duration) -> Result<Value> {
        let end = Instant::now() + deadline;
        while self.child.try_wait()?.is_none() {
            if Instant::now() > end {
                bail!("a load generator ran past {deadline:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.out.read_to_end(Duration::from_secs(2)).map_err(anyhow::Error::msg)?;
        self.out.seen.pop().context("the load generator printed nothing")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A thread-per-connection echo server (the scenario program): (process, address, pid).
fn echo_server() -> Result<(Proc, String, u32)> {
    let mut server = Proc::spawn(
        release("scenario"),
        &["thread-per-connection", "--listen", "127.0.0.1:0", "--backlog", "4096"],
    )?;
    let listening =
        server.wait_for("listening", Duration::from_secs(10), |v| v["event"] == "listening")?;
    let addr = listening["local"].as_str().unwrap().to_owned();
    let pid = listening["pid"].as_u64().unwrap() as u32;
    Ok((server, addr, pid))
}

fn agent(pid: &[u32], extra: &[&str]) -> Agent {
    let mut args = vec!["watch".to_owned()];
    for p in pid {
        args.extend(["--pid".to_owned(), p.to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Stops the agent; a run in which it failed measured nothing worth reporting.
fn stop(agent: &mut Agent) -> Result<()> {
    let status = agent.stop();
    if !status.success() {
        bail!("the agent exited with {status} while measured: {}", agent.stderr_text().trim());
    }
    Ok(())
}

fn ping(addr: &str, seconds: u64) -> Result<Value> {
    let ms = (seconds * 1000).to_string();
    Proc::spawn(
        release("loadgen"),
        &["ping", "--connect", addr, "--connections", "8", "--duration-ms", &ms],
    )?
    .finish(Duration::from_secs(seconds + 30))
}

/// The agent configurations the hot path is measured under, against no agent at all.
const ARMS: [(&str, &[&str]); 2] =
    [("watched", &[]), ("watched with --syscall-timing", &["--syscall-timing"])];

/// Request/response throughput and p99 latency with and without the agent watching the server.
/// Each round runs every arm back to back in a rotating order and yields one ratio per arm
/// against that round's own baseline; the median over rounds cancels most of the machine's drift.
fn hot_path(figures: &mut Vec<Figure>, opts: Options) -> Result<()> {
    let (rounds, seconds) = if opts.smoke { (1, 1) } else { (9, 3) };
    let (_server, addr, pid) = echo_server()?;
    let arms = ARMS.len() + 1; // arm 0 is the baseline
    let mut rps = vec![vec![]; arms];
    let mut p99 = vec![vec![]; arms];
    for round in 0..rounds {
        for i in 0..arms {
            let arm = (round + i) % arms;
            let mut watching = (arm > 0).then(|| {
                let mut args = vec!["--stats-interval", "0"];
                args.extend_from_slice(ARMS[arm - 1].1);
                agent(&[pid], &args)
            });
            let result = ping(&addr, seconds)?;
            if let Some(a) = &mut watching {
                stop(a)?;
            }
            let (r, p) = (result["rps"].as_f64().unwrap(), result["p99_us"].as_f64().unwrap());
            let name = if arm == 0 { "unwatched" } else { ARMS[arm - 1].0 };
            eprintln!("bench: hot path round {round} {name}: {r:.0} req/s, p99 {p} us");
            rps[arm].push(r);
            p99[arm].push(p);
        }
    }
    let paired = |values: &[Vec<f64>], arm: usize| {
        let mut ratios: Vec<f64> = values[arm].iter().zip(&values[0]).map(|(w, b)| w / b).collect();
        median(&mut ratios)
    };
    for (i, (name, _)) in ARMS.iter().enumerate() {
        let arm = i + 1;
        // Only the default configuration carries the goal; the opt-in one is reported.
        let default = arm == 1;
        let ratio = paired(&rps, arm);
        figures.push(Figure {
            name: format!(
                "hot path: throughput, {name} ({rounds} rounds, median of paired ratios)"
            ),
            value: median(&mut rps[arm].clone()),
            unit: "req/s",
            baseline: Some((median(&mut rps[0].clone()), "unwatched")),
            ratio: Some(ratio),
            goal: if default { ">= 0.98" } else { "report" },
            met: default.then_some(ratio >= 0.98),
            must_hold: false,
        });
        let ratio = paired(&p99, arm);
        figures.push(Figure {
            name: format!("hot path: p99 latency, {name}"),
            value: median(&mut p99[arm].clone()),
            unit: "us",
            baseline: Some((median(&mut p99[0].clone()), "unwatched")),
            ratio: Some(ratio),
            goal: if default { "<= 1.05" } else { "report" },
            met: default.then_some(ratio <= 1.05),
            must_hold: false,
        });
    }
    Ok(())
}

/// Kernel time per probe run under the same load, from BPF run-time statistics: the default
/// programs, then the syscall hooks `--syscall-timing` adds.
fn per_event(figures: &mut Vec<Figure>, opts: Options) -> Result<()> {
    let seconds = if opts.smoke { 1 } else { 5 };
    let (_server, addr, pid) = echo_server()?;
    let mut reported = Vec::new();
    for extra in [&[][..], &["--syscall-timing"][..]] {
        let mut args = vec!["--probe-stats", "--stats-interval", "1s"];
        args.extend_from_slice(extra);
        let mut watching = agent(&[pid], &args);
        ping(&addr, seconds)?;
        let after = unix_ms();
        let stats = watching.wait_for("stats after the load", Duration::from_secs(10), |v| {
            v["event"] == "stats" && ts_ms(v) > after
        });
        stop(&mut watching)?;
        let costs = stats["probe_cost"].as_object().context("no probe_cost in stats")?;
        for (program, cost) in costs {
            let runs = cost["runs"].as_u64().unwrap_or(0);
            if runs == 0 || reported.contains(program) {
                continue;
            }
            reported.push(program.clone());
            let with = if extra.is_empty() { String::new() } else { format!(", {}", extra[0]) };
            let mut f = Figure::plain(
                format!("per-event cost: {program} ({runs} runs{with})"),
                cost["ns_per_run"].as_f64().unwrap(),
                "ns",
            );
            f.goal = "report";
            figures.push(f);
        }
    }
    Ok(())
}

fn ts_ms(v: &Value) -> u64 {
    v["ts"]
        .as_str()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64)
        .unwrap_or(0)
}

/// Time from a connection crossing its idle threshold to its alert line.
fn latency(figures: &mut Vec<Figure>, opts: Options) -> Result<()> {
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
fn churn(figures: &mut Vec<Figure>, opts: Options) -> Result<()> {
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
    let tracked = counter(&settled, "recv_events") - counter(&before, "recv_events");
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

pub fn run(opts: Options) -> Result<()> {
    let started = Instant::now();
    let mut figures = Vec::new();
    type Part = fn(&mut Vec<Figure>, Options) -> Result<()>;
    let parts: [(&str, Part); 6] = [
        ("hot-path", hot_path),
        ("per-event", per_event),
        ("latency", latency),
        // Before churn, whose 120k closed connections linger in TIME_WAIT for a minute and
        // lengthen every walk of the socket table.
        ("scale", scale::scale),
        ("identity", identity::identity),
        ("churn", churn),
    ];
    for (name, part) in parts {
        if opts.runs(name) {
            part(&mut figures, opts).with_context(|| format!("bench part {name}"))?;
        }
    }
    if opts.smoke {
        // Toy sizes and one-second rounds say nothing about speed goals: only check the harness
        // and the correctness checks.
        for f in figures.iter_mut().filter(|f| !f.must_hold) {
            f.met = None;
        }
        eprintln!("bench: smoke run: speed goals are not judged at toy sizes");
    }
    let table = table(&figures);
    println!("{table}");
    for f in &figures {
        println!("{}", f.json());
    }
    eprintln!("bench: done in {:.0?}", started.elapsed());
    if !opts.smoke && opts.only.is_none() {
        write_report(&table)?;
    }
    // Speed goals missed are reported; wrong results fail the run.
    let broken: Vec<&str> =
        figures.iter().filter(|f| f.must_hold && f.met != Some(true)).map(|f| &*f.name).collect();
    if !broken.is_empty() {
        bail!("correctness checks failed: {}", broken.join("; "));
    }
    Ok(())
}

fn table(figures: &[Figure]) -> String {
    let mut out = String::from(
        "| figure | value | baseline | ratio | goal | met |\n|---|---|---|---|---|---|\n",
    );
    for f in figures {
        let baseline = f.baseline.map_or(String::new(), |(v, what)| format!("{v:.1} ({what})"));
        let ratio = f.ratio.map_or(String::new(), |r| format!("{r:.3}"));
        let met = match f.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        out.push_str(&format!(
            "| {} | {:.1} {} | {baseline} | {ratio} | {} | {met} |\n",
            f.name, f.value, f.unit, f.goal
        ));
    }
    out
}

fn write_report(table: &str) -> Result<()> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_owned();
    let report = format!(
        "# Benchmarks\n\nGenerated by `cargo xtask bench` on {}: {cpu}, {cores} cores, {mem_gib:.0} GiB RAM, Linux {kernel}.\n\
         Every figure is measured next to its baseline in the same run.\n\n{table}\n",
        humantime::format_rfc3339_seconds(SystemTime::now())
    );
    let path = workspace_root().join("docs/benchmarks.md");
    std::fs::create_dir_all(path.parent().unwrap())?;
    // Keep the hand-written notes that follow the generated part.
    let notes = read(path.to_str().unwrap())
        .split_once("<!-- notes -->")
        .map(|(_, n)| format!("<!-- notes -->{n}"))
        .unwrap_or_default();
    std::fs::write(&path, format!("{report}{notes}"))?;
    eprintln!("bench: wrote {}", path.display());
    Ok(())
}
