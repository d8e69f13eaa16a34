//! A reader of stdout that pauses (a log shipper under load, a full container log pipe) must not
//! freeze the agent: it keeps polling and detecting, delivers what it found once the reader is
//! back, and still stops at once on SIGTERM.
use std::{
    fs::File,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use observer_tests::{JsonLines, Server, observer_bin, remote_of, require_root, watch_args};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(30);

/// A pipe whose buffer is one page: a reader that stops reading fills it at once.
fn small_pipe() -> (File, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills both fds; each is owned right away.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let (read, write) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on our own pipe.
    assert!(unsafe { libc::fcntl(read.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) } >= 4096);
    (read, write)
}

/// Whether the pipe is as full as it gets: a line (under 1 KiB) would not fit, so the next write
/// blocks (pipe writes this small are all or nothing).
fn full(read: &File) -> bool {
    queued(read) > 4096 - 1024
}

/// Bytes waiting in the pipe.
fn queued(read: &File) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    unsafe { libc::ioctl(read.as_raw_fd(), libc::FIONREAD, &mut n) };
    n as usize
}

fn spawn_agent(args: &[String], stdout: OwnedFd) -> Child {
    require_root();
    Command::new(observer_bin())
        .args(args)
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn observer")
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < end, "{what} not within {DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn sigterm(child: &Child) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

#[test]
fn a_paused_reader_loses_nothing_and_stops_nothing() {
    let mut server = Server::start(&[]);
    let (read, write) = small_pipe();
    let args = watch_args(&[server.pid], &["--idle-timeout", "1s", "--stats-interval", "100ms"]);
    let mut agent = spawn_agent(&args, write);
    // Nobody reads: stats alone fill the pipe, and the writer blocks.
    wait_until("a full pipe", || full(&read));
    let paused_at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();

    // Meanwhile five clients connect, go silent past the idle timeout, and leave.
    let mut remotes = Vec::new();
    let clients: Vec<_> = (0..5).map(|_| server.connect().0).collect();
    for client in &clients {
        remotes.push(remote_of(client));
    }
    // The clients' silence itself: past the idle timeout, with several polls to find it.
    std::thread::sleep(Duration::from_millis(2500));
    drop(clients);
    for _ in 0..5 {
        server.scenario.wait_for("worker done", |v| v["event"] == "closed");
    }

    // The reader is back: everything found meanwhile arrives, or is counted as dropped.
    let resumed = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let mut out = JsonLines::new(read, "observer");
    out.wait_for("a stats line from after the pause", DEADLINE, |v| {
        v["event"] == "stats" && v["ts"].as_str().is_some_and(|ts| ts > resumed.as_str())
    })
    .unwrap();
    sigterm(&agent);
    let status = agent.wait().unwrap();
    out.read_to_end(DEADLINE).unwrap();
    let seen = &out.seen;
    assert_eq!(status.code(), Some(0));
    let dropped = seen
        .iter()
        .rev()
        .find(|v| v["event"] == "stats")
        .map_or(0, |s| s["events_dropped"].as_u64().unwrap());
    let mut missing = 0;
    for remote in &remotes {
        let alert = seen.iter().find(|v| v["event"] == "alert" && v["remote"] == *remote);
        match alert {
            // Found while nobody read: the poll loop kept going.
            Some(alert) => assert!(alert["ts"].as_str().unwrap() > paused_at.as_str(), "{alert}"),
            None => missing += 1,
        }
        if !seen.iter().any(|v| v["event"] == "alert_cleared" && v["remote"] == *remote) {
            missing += 1;
        }
    }
    assert!(missing as u64 <= dropped, "{missing} alert lines neither delivered nor counted");
    // Polls went on throughout the pause (~3 s of 200 ms polls), their stats queued meanwhile.
    let during = |v: &&Value| {
        v["event"] == "stats"
            && v["ts"].as_str().is_some_and(|ts| ts > paused_at.as_str() && ts < resumed.as_str())
    };
    let stats = seen.iter().filter(during).count() as u64;
    assert!(stats + dropped >= 5, "{stats} stats lines and {dropped} dropped during the pause");
}

#[test]
fn sigterm_ends_the_agent_within_a_second_whatever_stdout_does() {
    let server = Server::start(&[]);
    let (read, write) = small_pipe();
    let args = watch_args(&[server.pid], &["--stats-interval", "50ms"]);
    let mut agent = spawn_agent(&args, write);
    wait_until("a full pipe", || full(&read));
    let asked = Instant::now();
    sigterm(&agent);
    let end = asked + Duration::from_secs(1);
    let status = loop {
        if let Some(status) = agent.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < end, "still running 1 s after SIGTERM with nobody reading");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(status.code(), Some(0), "a clean stop");
    drop(read);
}
