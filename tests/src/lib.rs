//! Harness for observer's integration tests: runs the real agent binary and the scenario
//! programs, and waits (with deadlines, never fixed sleeps) for the JSON lines they print.
pub mod kubepods;
pub mod netns;
pub mod nginx;
pub mod podman;
pub mod stalls;
pub mod tmux;

use std::{
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError, channel},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// The agent binary under test: $OBSERVER_BIN, or the release build `cargo xtask test` makes.
pub fn observer_bin() -> PathBuf {
    let path = std::env::var_os("OBSERVER_BIN").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/observer")
    });
    assert!(
        path.exists(),
        "{} not found: run the integration tests with `cargo xtask test`",
        path.display()
    );
    path
}

/// The scenario program, built next to the test executables (target/<profile>/scenario).
pub fn scenario_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/scenario
    let path = exe.parent().and_then(|deps| deps.parent()).expect("target dir").join("scenario");
    assert!(
        path.exists(),
        "{} not found: build it with `cargo build -p observer-tests`",
        path.display()
    );
    path
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the integration tests load BPF programs and need root: run `sudo cargo xtask test`"
    );
}

/// Lines of JSON from a child's stdout, read on a thread so waits can have deadlines.
pub struct JsonLines {
    rx: Receiver<Value>,
    pub seen: Vec<Value>,
}

impl JsonLines {
    /// Reads `stdout` of the program `who` (named in failures) on a thread of its own.
    pub fn new(stdout: impl Read + Send + 'static, who: &'static str) -> Self {
        let (tx, rx) = channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                    panic!("{who} printed a line that is not JSON ({e}): {line}")
                });
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        JsonLines { rx, seen: Vec::new() }
    }

    /// The first line (already seen or still to come) that matches, waiting up to `deadline`.
    pub fn wait_for(
        &mut self,
        what: &str,
        deadline: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Value, String> {
        if let Some(v) = self.seen.iter().find(|v| matches(v)) {
            return Ok(v.clone());
        }
        let end = Instant::now() + deadline;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if matches(&v) {
                        return Ok(v);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("no {what} within {deadline:?}; saw:\n{}", self.dump()));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!("output ended before {what}; saw:\n{}", self.dump()));
                }
            }
        }
    }

    /// Waits until at least `n` lines (seen or to come) match, for at most `deadline`.
    pub fn wait_count(
        &mut self,
        what: &str,
        deadline: Duration,
        n: usize,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<(), String> {
        let end = Instant::now() + deadline;
        while self.seen.iter().filter(|v| matches(v)).count() < n {
            match self.rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
                Ok(v) => self.seen.push(v),
                Err(_) => {
                    return Err(format!(
                        "fewer than {n} {what} within {deadline:?}; saw:\n{}",
                        self.dump()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Takes in whatever has arrived so far without waiting.
    pub fn drain(&mut self) {
        while let Ok(v) = self.rx.try_recv() {
            self.seen.push(v);
        }
    }

    /// Waits for the stream to end (the process closed stdout).
    pub fn read_to_end(&mut self, deadline: Duration) -> Result<(), String> {
        let end = Instant::now() + deadline;
        loop {
            match self.rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
                Ok(v) => self.seen.push(v),
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("output did not end within {deadline:?}"));
                }
            }
        }
    }

    pub fn dump(&self) -> String {
        self.seen.iter().map(|v| format!("  {v}\n")).collect()
    }
}

/// A running `observer` process.
pub struct Agent {
    child: Child,
    binary: Option<PathBuf>,
    pub out: JsonLines,
    stderr: Receiver<String>,
}

impl Agent {
    /// Starts `observer <args>` and waits for its `started` event.
    pub fn start(args: &[&str]) -> Agent {
        Agent::start_with(&[], &observer_bin(), args)
    }

    /// Starts `<wrapper...> <binary> <args>` (a wrapper such as `nsenter ...` or `setpriv ...`
    /// runs the agent, by exec or as its child) and waits for its `started` event.
    pub fn start_with(wrapper: &[&str], binary: &Path, args: &[&str]) -> Agent {
        let mut command = wrapped(wrapper, binary);
        command.args(args);
        Agent::start_command(command, Some(binary))
    }

    /// Starts the agent `command` runs (in a container, say) and waits for its `started`
    /// event. `binary`, when the agent runs on this host, lets signals reach it past wrappers.
    pub fn start_command(mut command: Command, binary: Option<&Path>) -> Agent {
        require_root();
        let mut child = command
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn observer");
        let out = JsonLines::new(child.stdout.take().unwrap(), "observer");
        let mut err_pipe = child.stderr.take().unwrap();
        let (tx, stderr) = channel();
        thread::spawn(move || {
            let mut text = String::new();
            let _ = err_pipe.read_to_string(&mut text);
            let _ = tx.send(text);
        });
        let binary = binary.map(Path::to_path_buf);
        let mut agent = Agent { child, binary, out, stderr };
        if let Err(e) = agent
            .out
            .wait_for("started event", Duration::from_secs(60), |v| v["event"] == "started")
        {
            let _ = agent.child.kill();
            panic!("observer did not start: {e}\nstderr:\n{}", agent.stderr_text());
        }
        agent
    }

    pub fn wait_for(
        &mut self,
        what: &str,
        deadline: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Value {
        match self.out.wait_for(what, deadline, matches) {
            Ok(v) => v,
            Err(e) => {
                let _ = self.child.kill();
                panic!("{e}\nobserver stderr:\n{}", self.stderr_text());
            }
        }
    }

    /// Waits for the agent to exit by itself.
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for observer") {
                self.out.read_to_end(Duration::from_secs(5)).unwrap();
                return status;
            }
            if Instant::now() >= end {
                let _ = self.child.kill();
                panic!("observer did not exit within {deadline:?}; output:\n{}", self.out.dump());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status once it has stopped.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(Duration::from_secs(10))
    }

    /// Sends `signal` to the agent itself (not to a wrapper that runs it).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child or its child.
        unsafe { libc::kill(self.program_pid() as i32, signal) };
    }

    /// The agent's own pid: the child's, or, under a wrapper that forks, its descendant's.
    /// (A container's agent is reached through its `podman run`, which passes signals on.)
    pub fn program_pid(&self) -> u32 {
        match &self.binary {
            Some(binary) => program_under(self.child.id(), binary),
            None => self.child.id(),
        }
    }

    pub fn stderr_text(&mut self) -> String {
        self.stderr.recv_timeout(Duration::from_secs(5)).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a `stats` line stamped after now: every poll before it has been judged. Needs
    /// a short `--stats-interval`.
    pub fn settle(&mut self, deadline: Duration) {
        let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        self.wait_for("stats after now", deadline, |v| {
            v["event"] == "stats" && v["ts"].as_str().is_some_and(|ts| ts > now.as_str())
        });
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // A forking wrapper's child outlives the wrapper: end it first.
        self.signal(libc::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `<wrapper...> <program>`, or just the program.
fn wrapped(wrapper: &[&str], program: &Path) -> Command {
    match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// `root`, if it runs `program`, or else its first descendant that does (a wrapper that forks
/// runs the program as its child); `root` itself when none is found yet.
pub fn program_under(root: u32, program: &Path) -> u32 {
    let program = program.canonicalize().unwrap_or_else(|_| program.to_path_buf());
    let runs =
        |pid: u32| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == program);
    if runs(root) {
        return root;
    }
    let mut parents = vec![root];
    while let Some(parent) = parents.pop() {
        let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        for child in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
            if runs(child) {
                return child;
            }
            parents.push(child);
        }
    }
    root
}

/// A copy of `binary` that any user may run (the build tree may sit under a home directory
/// only root can enter), for tests that run the agent as another user.
pub fn public_copy(binary: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    static COPYING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = COPYING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("observer-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create a public directory");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let copy = dir.join(binary.file_name().expect("a file name"));
    if !copy.exists() {
        std::fs::copy(binary, &copy).expect("copy the binary");
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    copy
}

/// A running scenario program (see src/bin/scenario.rs).
pub struct Scenario {
    child: Child,
    pub out: JsonLines,
}

impl Scenario {
    pub fn start(args: &[&str]) -> Scenario {
        Scenario::start_in(None, args)
    }

    /// Starts the scenario inside network namespace `netns` (via `ip netns exec`).
    pub fn start_in(netns: Option<&str>, args: &[&str]) -> Scenario {
        match netns {
            Some(ns) => Scenario::start_with(&["ip", "netns", "exec", ns], args),
            None => Scenario::start_with(&[], args),
        }
    }

    /// Starts `<wrapper...> scenario <args>`.
    pub fn start_with(wrapper: &[&str], args: &[&str]) -> Scenario {
        let mut command = wrapped(wrapper, &scenario_bin());
        command.args(args);
        Scenario::start_command(command)
    }

    /// Starts the scenario `command` runs (in a container, say).
    pub fn start_command(mut command: Command) -> Scenario {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn scenario");
        let out = JsonLines::new(child.stdout.take().unwrap(), "scenario");
        Scenario { child, out }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The scenario's own pid as this (the initial) pid namespace numbers it, under any wrapper.
    pub fn host_pid(&self) -> u32 {
        program_under(self.child.id(), &scenario_bin())
    }

    pub fn wait_for(&mut self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        self.out.wait_for(what, Duration::from_secs(10), matches).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The JSON lines of a file another process writes (a `top --log`), as far as written.
pub fn read_json_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

pub fn as_u64(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not an unsigned integer: {v}"))
}

/// BPF program ids the process `pid` holds open (from /proc/PID/fdinfo: program and link fds
/// carry a `prog_id` line).
pub fn bpf_prog_ids_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return vec![];
    };
    let mut ids: Vec<u32> = dir
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .flat_map(|info| {
            info.lines()
                .filter_map(|l| l.strip_prefix("prog_id:").and_then(|v| v.trim().parse().ok()))
                .collect::<Vec<u32>>()
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Whether the kernel still has BPF program `id` loaded.
pub fn bpf_prog_exists(id: u32) -> bool {
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    // union bpf_attr for this command starts with the u32 prog_id; the rest must be zero.
    let mut attr = [0u8; 128];
    attr[..4].copy_from_slice(&id.to_ne_bytes());
    // SAFETY: attr is a valid, zeroed bpf_attr of the size passed.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_GET_FD_BY_ID, attr.as_mut_ptr(), attr.len())
    };
    if fd >= 0 {
        // SAFETY: we own this fd.
        unsafe { libc::close(fd as i32) };
        return true;
    }
    std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT)
}

/// A running thread-per-connection scenario server.
pub struct Server {
    pub scenario: Scenario,
    pub pid: u32,
    pub addr: std::net::SocketAddr,
    /// The listening socket's fd in the server.
    pub listen_fd: u64,
}

impl Server {
    /// `scenario thread-per-connection <args>`, optionally inside a network namespace.
    pub fn start_in(netns: Option<&str>, args: &[&str]) -> Server {
        match netns {
            Some(ns) => Server::start_with(&["ip", "netns", "exec", ns], args),
            None => Server::start_with(&[], args),
        }
    }

    /// `<wrapper...> scenario thread-per-connection <args>`.
    pub fn start_with(wrapper: &[&str], args: &[&str]) -> Server {
        let mut all = vec!["thread-per-connection"];
        all.extend_from_slice(args);
        Server::of(Scenario::start_with(wrapper, &all))
    }

    /// A `thread-per-connection` scenario already started, once it listens.
    pub fn of(mut scenario: Scenario) -> Server {
        let listening = scenario.wait_for("listening", |v| v["event"] == "listening");
        Server {
            pid: as_u64(&listening["pid"]) as u32,
            addr: listening["local"].as_str().unwrap().parse().unwrap(),
            listen_fd: as_u64(&listening["fd"]),
            scenario,
        }
    }

    pub fn start(args: &[&str]) -> Server {
        Server::start_in(None, args)
    }

    /// The server's `accepted` report for the client whose local address is `client`.
    pub fn accepted(&mut self, client: &std::net::TcpStream) -> Value {
        let me = client.local_addr().unwrap().to_string();
        self.scenario.wait_for("accepted", |v| v["event"] == "accepted" && v["remote"] == me)
    }

    /// Connects a loopback client and returns it with the server's `accepted` report for it.
    pub fn connect(&mut self) -> (std::net::TcpStream, Value) {
        let client = std::net::TcpStream::connect(self.addr).unwrap();
        let accepted = self.accepted(&client);
        (client, accepted)
    }
}

/// `observer watch` arguments for tests: fast polls, the given pids, then `extra`. The probe
/// backend is $OBSERVER_PROBES when set (the VM test runs every test under each backend).
pub fn watch_args(pids: &[u32], extra: &[&str]) -> Vec<String> {
    engine_args("watch", "200ms", pids, extra)
}

/// Arguments for `command` (`watch` or `top`, which take the same engine flags): polls every
/// `poll_interval`, the given pids, the probe backend of $OBSERVER_PROBES, then `extra`.
pub fn engine_args(
    command: &str,
    poll_interval: &str,
    pids: &[u32],
    extra: &[&str],
) -> Vec<String> {
    let mut args = vec![command.to_owned(), "--poll-interval".into(), poll_interval.into()];
    if let Ok(backend) = std::env::var("OBSERVER_PROBES") {
        args.extend(["--probes".to_owned(), backend]);
    }
    for pid in pids {
        args.extend(["--pid".to_owned(), pid.to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

pub fn start_agent(pids: &[u32], extra: &[&str]) -> Agent {
    let args = watch_args(pids, extra);
    Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// How the server names `client`'s connection's remote end: the client's own address.
pub fn remote_of(client: &std::net::TcpStream) -> String {
    client.local_addr().map(|a| a.to_string()).unwrap_or_default()
}

/// Whether `v` is an alert (or, with `event` = "alert_cleared", a clear) for `reason` on the
/// connection whose remote end is `remote`.
pub fn is_event_for(v: &Value, event: &str, reason: &str, remote: &str) -> bool {
    v["event"] == event && v["reason"] == reason && v["remote"] == remote
}

/// Runs `observer <args>` to completion: exit code, the JSON lines it printed, its stderr.
pub fn run_observer(args: &[&str]) -> (Option<i32>, Vec<Value>, String) {
    require_root();
    let out = Command::new(observer_bin()).args(args).output().expect("run observer");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    (out.status.code(), lines, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// setsockopt(2) at SOL_SOCKET on `conn`, panicking with the error if the kernel refuses.
pub fn set_socket_option<T>(conn: &impl std::os::fd::AsRawFd, name: i32, value: &T) {
    // SAFETY: setsockopt on a live socket, with a value of the size passed that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (value as *const T).cast(),
            size_of::<T>() as u32,
        )
    };
    assert_eq!(rc, 0, "setsockopt {name}: {}", std::io::Error::last_os_error());
}

/// Makes the peer on the other end of `conn` see this side vanish: every packet arriving at
/// `conn` is dropped by a socket filter, so nothing is acknowledged any more. Works on loopback
/// and needs no firewall.
pub fn vanish(conn: &std::net::TcpStream) {
    // One classic BPF instruction: BPF_RET | BPF_K with 0, "keep no bytes".
    let drop_all = [libc::sock_filter { code: 0x06, jt: 0, jf: 0, k: 0 }];
    let program = libc::sock_fprog { len: 1, filter: drop_all.as_ptr().cast_mut() };
    set_socket_option(conn, libc::SO_ATTACH_FILTER, &program);
}

/// Undoes [`vanish`].
pub fn reappear(conn: &std::net::TcpStream) {
    set_socket_option(conn, libc::SO_DETACH_FILTER, &0i32);
}
