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

mod detection;
mod hot_path;
mod identity;
mod scale;
mod top;

#[derive(Clone, Copy)]
pub struct Options {
    pub smoke: bool,
    /// Run only this part (for working on one figure); the report is then not written.
    pub only: Option<&'static str>,
}

const PARTS: [&str; 7] = ["hot-path", "per-event", "latency", "scale", "top", "identity", "churn"];

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

fn ts_ms(v: &Value) -> u64 {
    v["ts"]
        .as_str()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64)
        .unwrap_or(0)
}

pub fn run(opts: Options) -> Result<()> {
    let started = Instant::now();
    let mut figures = Vec::new();
    type Part = fn(&mut Vec<Figure>, Options) -> Result<()>;
    let parts: [(&str, Part); 7] = [
        ("hot-path", hot_path::hot_path),
        ("per-event", hot_path::per_event),
        ("latency", detection::latency),
        // Before churn, whose 120k closed connections linger in TIME_WAIT for a minute and
        // lengthen every walk of the socket table.
        ("scale", scale::scale),
        ("top", top::top),
        ("identity", identity::identity),
        ("churn", detection::churn),
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
