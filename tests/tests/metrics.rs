//! `--metrics-addr` end to end: the real agent watching a real server serves its endpoints,
//! Debian's promtool accepts what it serves and the rules we ship, and a real Prometheus
//! server scrapes it and sees an idle alert stand and clear.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use observer_tests::{Agent, Server, is_event_for, remote_of, start_agent};
use serde_json::Value;

/// Generous bound for what should take a few polls or scrapes; only reached on failure.
const DEADLINE: Duration = Duration::from_secs(30);

/// A loopback address with a port nobody listens on now.
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// An HTTP answer: status code, headers and body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// One HTTP/1.1 request over a fresh connection, read to the server's close.
fn request(addr: SocketAddr, method: &str, target: &str) -> std::io::Result<Answer> {
    request_as("HTTP/1.1", addr, method, target)
}

/// A request in HTTP `version`. Prometheus is asked in HTTP/1.0, so that it answers its large
/// API responses whole rather than in chunks.
fn request_as(
    version: &str,
    addr: SocketAddr,
    method: &str,
    target: &str,
) -> std::io::Result<Answer> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(conn, "{method} {target} {version}\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = String::new();
    conn.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok(Answer { status, head: head.to_owned(), body: body.to_owned() })
}

fn get(addr: SocketAddr, target: &str) -> Answer {
    request(addr, "GET", target).unwrap_or_else(|e| panic!("GET {target} on {addr}: {e}"))
}

/// Asks `check` until it gives a value or `deadline` passes; the panic says what was last seen.
fn wait_until<T>(
    what: &str,
    deadline: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let end = Instant::now() + deadline;
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= end => panic!("no {what} within {deadline:?}: {last}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// A Prometheus tool from Debian's `prometheus` package, which `cargo xtask test` installs.
fn prometheus_tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!("{name} not found: install Debian's prometheus package (`cargo xtask test` does)")
    })
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Runs a promtool check, feeding `stdin`; returns its exit success and everything it printed.
fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new(prometheus_tool("promtool"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The agent watching `server`, serving metrics on a free loopback port.
fn agent_with_metrics(server: &Server) -> (Agent, SocketAddr) {
    let addr = free_addr();
    let addr_arg = addr.to_string();
    let agent = start_agent(
        &[server.pid],
        &["--idle-timeout", "1s", "--stats-interval", "0", "--metrics-addr", &addr_arg],
    );
    (agent, addr)
}

#[test]
fn endpoints_answer_and_promtool_accepts_the_metrics() {
    let mut server = Server::start(&[]);
    let (mut agent, addr) = agent_with_metrics(&server);
    // `started` means the probes are attached: ready once a first poll is done.
    let ready = wait_until("200 from /readyz", DEADLINE, || {
        let answer = get(addr, "/readyz");
        if answer.status == 200 { Ok(answer) } else { Err(answer.body) }
    });
    assert_eq!(ready.body, "ready\n");
    let healthy = wait_until("200 from /healthz", DEADLINE, || {
        let answer = get(addr, "/healthz");
        if answer.status == 200 { Ok(answer) } else { Err(answer.body) }
    });
    assert!(healthy.body.starts_with("ok"), "{}", healthy.body);
    assert!(healthy.head.contains("Connection: close"), "{}", healthy.head);

    for target in ["/", "/metrics/", "/nope", "/healthz/x"] {
        assert_eq!(get(addr, target).status, 404, "{target}");
    }
    let post = request(addr, "POST", "/metrics").unwrap();
    assert_eq!(post.status, 405, "{}", post.head);

    // An idle alert, so that the output has a non-zero series too.
    let (client, _) = server.connect();
    let remote = remote_of(&client);
    agent.wait_for("idle alert", DEADLINE, |v| is_event_for(v, "alert", "idle", &remote));
    let metrics = get(addr, "/metrics");
    assert_eq!(metrics.status, 200);
    assert!(metrics.head.contains("Content-Type: text/plain; version=0.0.4"), "{}", metrics.head);
    let text = metrics.body;
    assert!(text.contains("\nobserver_alerts_active{reason=\"idle\"} 1\n"), "{text}");
    assert!(text.contains("\nobserver_alerts_total{reason=\"idle\"} 1\n"), "{text}");
    assert!(text.contains("\nobserver_alerts_active{reason=\"close_wait\"} 0\n"), "{text}");
    let backend = agent.out.seen[0]["backend"].as_str().unwrap().to_owned();
    assert!(text.contains(&format!("backend=\"{backend}\"")), "{text}");
    assert!(!text.contains(&remote) && !text.contains("cookie"), "per-connection labels: {text}");
    let (ok, said) = promtool(&["check", "metrics"], &text);
    assert!(ok, "promtool check metrics refused the output: {said}\n{text}");
    assert_eq!(agent.stop().code(), Some(0));
}

#[test]
fn a_taken_metrics_port_is_one_line_naming_the_fix() {
    observer_tests::require_root();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, lines, stderr) =
        observer_tests::run_observer(&["watch", "--port", "1", "--metrics-addr", &addr]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(lines.is_empty(), "nothing on stdout: {lines:?}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(&addr) && stderr.contains("in use"), "{stderr}");
    assert!(stderr.contains("choose another port"), "{stderr}");
}

#[test]
fn promtool_accepts_the_shipped_alert_rules_and_their_tests_pass() {
    let rules = repo_file("deploy/prometheus/alerts.yaml");
    let (ok, said) = promtool(&["check", "rules", rules.to_str().unwrap()], "");
    assert!(ok, "promtool check rules: {said}");
    let tests = repo_file("tests/prometheus/alerts_test.yaml");
    let (ok, said) = promtool(&["test", "rules", tests.to_str().unwrap()], "");
    assert!(ok, "promtool test rules: {said}");
}

/// A Prometheus server from Debian's package on a loopback port, with its own data directory,
/// scraping one agent every second and loading the shipped rules. Killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    fn start(agent: SocketAddr) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("observer-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        let rules = repo_file("deploy/prometheus/alerts.yaml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files: ['{}']\n\
                 scrape_configs:\n  - job_name: observer\n    static_configs:\n      - targets: ['{agent}']\n",
                rules.display()
            ),
        )
        .unwrap();
        let addr = free_addr();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(prometheus_tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let mut prometheus = Prometheus { child, addr, dir };
        wait_until("Prometheus ready", DEADLINE, || {
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", prometheus.log());
            }
            match request_as("HTTP/1.0", prometheus.addr, "GET", "/-/ready") {
                Ok(a) if a.status == 200 => Ok(()),
                Ok(a) => Err(a.body),
                Err(e) => Err(e.to_string()),
            }
        });
        prometheus
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// GET on the HTTP API, `data` of a successful answer.
    fn api(&self, target: &str) -> Result<Value, String> {
        let answer = request_as("HTTP/1.0", self.addr, "GET", target).map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&answer.body)
            .map_err(|e| format!("{e}: {} {}", answer.status, answer.body))?;
        if v["status"] != "success" {
            return Err(format!("{target}: {v}"));
        }
        Ok(v["data"].clone())
    }

    /// The value of an instant query that returns one series.
    fn query_one(&self, promql: &str) -> Result<f64, String> {
        let data = self.api(&format!("/api/v1/query?query={}", percent_encode(promql)))?;
        match data["result"].as_array().map(Vec::as_slice) {
            Some([series]) => series["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("no value in {series}")),
            _ => Err(format!("not one series: {data}")),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_sees_an_idle_alert_stand_and_clear() {
    let mut server = Server::start(&[]);
    let (mut agent, addr) = agent_with_metrics(&server);
    let prometheus = Prometheus::start(addr);
    let idle = r#"observer_alerts_active{reason="idle"}"#;
    let wait_for_value = |want: f64, when: &str| {
        wait_until(&format!("{idle} = {want} {when}"), DEADLINE, || {
            match prometheus.query_one(idle) {
                Ok(v) if v == want => Ok(()),
                Ok(v) => Err(format!("{v}")),
                Err(e) => Err(e),
            }
        })
    };
    // Scraped, and 0 while no connection is stuck.
    wait_for_value(0.0, "before any alert");

    let (client, _) = server.connect();
    let remote = remote_of(&client);
    agent.wait_for("idle alert", DEADLINE, |v| is_event_for(v, "alert", "idle", &remote));
    wait_for_value(1.0, "while the alert stands");

    drop(client);
    agent
        .wait_for("alert_cleared", DEADLINE, |v| is_event_for(v, "alert_cleared", "idle", &remote));
    wait_for_value(0.0, "after the client closed");

    // The shipped rules load into a real server and evaluate without errors.
    let groups = wait_until("rules evaluated", DEADLINE, || {
        let data = prometheus.api("/api/v1/rules")?;
        let groups = data["groups"].as_array().cloned().unwrap_or_default();
        let rules: Vec<&Value> =
            groups.iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
        if !rules.is_empty() && rules.iter().all(|r| r["health"] == "ok") {
            Ok(groups)
        } else {
            Err(format!("{data}"))
        }
    });
    assert_eq!(groups.len(), 2, "{groups:?}");
    // Prometheus scraped the agent as healthy the whole time.
    assert_eq!(prometheus.query_one("up").unwrap(), 1.0, "{}", prometheus.log());
    assert_eq!(agent.stop().code(), Some(0));
}
