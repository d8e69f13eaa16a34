//! `observer watch` end to end: the real agent binary with the real BPF programs, watching a real
//! thread-per-connection server whose clients really go silent.
use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant, SystemTime},
};

use observer_tests::{Agent, Server, as_u64, bpf_prog_exists, bpf_prog_ids_of};
use serde_json::Value;

const POLL_MS: u64 = 200;
const IDLE_TIMEOUT_MS: u64 = 2000;
/// Generous bound for events that should come within a few polls; only reached on failure.
const DEADLINE: Duration = Duration::from_secs(20);

fn start_agent(pid: u32, extra: &[&str]) -> Agent {
    let timeout = format!("{IDLE_TIMEOUT_MS}ms");
    // The idle alerts here check blocked_ms, which the tracepoint backend measures per syscall.
    let mut args = vec!["--idle-timeout", timeout.as_str(), "--syscall-timing"];
    args.extend_from_slice(extra);
    observer_tests::start_agent(&[pid], &args)
}

fn is_alert_for(v: &Value, reason: &str, client: &TcpStream) -> bool {
    v["event"] == "alert"
        && v["reason"] == reason
        && v["remote"] == client.local_addr().unwrap().to_string()
}

/// Checks an idle alert against what the server reported about the connection.
/// `timed`: the worker entered its read after the agent started, so the probes timed it.
fn assert_idle_alert(alert: &Value, server: &Server, accepted: &Value, timed: bool) {
    assert_eq!(as_u64(&alert["pid"]), u64::from(server.pid), "{alert}");
    assert_eq!(alert["comm"], "scenario", "{alert}");
    assert_eq!(alert["fd"], accepted["fd"], "{alert}");
    assert_eq!(alert["local"], accepted["local"], "{alert}");
    assert_eq!(alert["remote"], accepted["remote"], "{alert}");
    assert_eq!(alert["state"], "ESTABLISHED", "{alert}");
    assert!(as_u64(&alert["cookie"]) > 0, "{alert}");
    let idle = as_u64(&alert["idle_ms"]);
    // Raised at the first poll after crossing the timeout: within two polls of it.
    assert!(
        (IDLE_TIMEOUT_MS..=IDLE_TIMEOUT_MS + 2 * POLL_MS).contains(&idle),
        "idle_ms {idle} not within timeout + 2 polls: {alert}"
    );
    assert!(as_u64(&alert["last_send_ms"]) >= idle && as_u64(&alert["last_recv_ms"]) >= idle);
    // The worker thread is blocked reading this very connection: the alert must name it.
    let threads = alert["threads"].as_array().unwrap();
    let worker = threads
        .iter()
        .find(|t| t["tid"] == accepted["tid"])
        .unwrap_or_else(|| panic!("worker tid {} not in threads: {alert}", accepted["tid"]));
    assert!(worker["name"].as_str().unwrap().starts_with("worker-"), "{alert}");
    let call = worker["blocked_in"].as_str().unwrap_or_default();
    assert!(["read", "recvfrom", "recvmsg", "readv"].contains(&call), "blocked_in {call}: {alert}");
    if timed {
        // With --pid the probes time the call: the worker has been in it since it accepted.
        let blocked = as_u64(&worker["blocked_ms"]);
        assert!(blocked.abs_diff(idle) < 1000, "blocked_ms {blocked} vs idle_ms {idle}: {alert}");
    } else {
        // A call that began before the probes were attached cannot be timed: say nothing.
        assert!(worker.get("blocked_ms").is_none(), "{alert}");
    }
    assert!(alert["detail"].as_str().is_some_and(|d| !d.is_empty()));
}

#[test]
fn idle_client_is_alerted_with_pid_fd_addresses_and_thread() {
    let mut server = Server::start(&[]);
    let mut agent = start_agent(server.pid, &[]);
    let (client, accepted) = server.connect();
    let alert = agent.wait_for("idle alert", DEADLINE, |v| is_alert_for(v, "idle", &client));
    assert_idle_alert(&alert, &server, &accepted, true);

    // Closing the idle connection ends the alert, once, as socket_closed.
    let cookie = alert["cookie"].clone();
    drop(client);
    let cleared = agent.wait_for("alert_cleared", DEADLINE, |v| {
        v["event"] == "alert_cleared" && v["cookie"] == cookie
    });
    assert_eq!(cleared["why"], "socket_closed", "{cleared}");
    assert_eq!(cleared["reason"], "idle");
    assert_eq!(cleared["fd"], accepted["fd"]);
    assert_eq!(agent.stop().code(), Some(0));
    let raised = agent.out.seen.iter().filter(|v| v["event"] == "alert" && v["cookie"] == cookie);
    assert_eq!(raised.count(), 1, "alerted more than once:\n{}", agent.out.dump());
}

#[test]
fn connection_opened_before_the_agent_started_is_alerted() {
    let mut server = Server::start(&[]);
    let (mut client, accepted) = server.connect();
    // Some traffic the probes will never see: only the kernel's counters know of it.
    client.write_all(b"hello").unwrap();
    let mut echo = [0u8; 5];
    client.read_exact(&mut echo).unwrap();

    let mut agent = start_agent(server.pid, &[]);
    let alert = agent.wait_for("idle alert", DEADLINE, |v| is_alert_for(v, "idle", &client));
    assert_idle_alert(&alert, &server, &accepted, false);
    assert_eq!((as_u64(&alert["bytes_sent"]), as_u64(&alert["bytes_received"])), (5, 5), "{alert}");
}

#[test]
fn ipv6_connection_is_reported_with_bracketed_addresses() {
    let mut server = Server::start(&["--listen", "[::1]:0"]);
    let mut agent = start_agent(server.pid, &[]);
    let (client, accepted) = server.connect();
    let alert = agent.wait_for("idle alert", DEADLINE, |v| is_alert_for(v, "idle", &client));
    assert!(alert["local"].as_str().unwrap().starts_with("[::1]:"), "{alert}");
    assert_idle_alert(&alert, &server, &accepted, true);
}

#[test]
fn connection_that_keeps_exchanging_data_is_never_alerted() {
    let mut server = Server::start(&[]);
    let mut agent = start_agent(server.pid, &["--stats-interval", "100ms"]);
    let (mut chatty, _) = server.connect();
    let (quiet, _) = server.connect();

    // Exchange a message every 100 ms for three idle timeouts.
    let until = Instant::now() + Duration::from_millis(3 * IDLE_TIMEOUT_MS);
    let mut buf = [0u8; 4];
    while Instant::now() < until {
        chatty.write_all(b"ping").unwrap();
        chatty.read_exact(&mut buf).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let exchange_ended = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    // The quiet connection proves the agent was detecting meanwhile.
    agent
        .wait_for("idle alert for the quiet client", DEADLINE, |v| is_alert_for(v, "idle", &quiet));
    // Stats are printed after a poll: one stamped after the exchange ended means every poll of
    // the exchange has been judged. (Same RFC 3339 UTC format: string order is time order.)
    agent.wait_for("stats after the exchange", DEADLINE, |v| {
        v["event"] == "stats" && v["ts"].as_str().is_some_and(|ts| ts > exchange_ended.as_str())
    });
    let chatty_addr = chatty.local_addr().unwrap().to_string();
    let false_alarms: Vec<&Value> = agent
        .out
        .seen
        .iter()
        .filter(|v| v["event"] == "alert" && v["remote"] == chatty_addr)
        .collect();
    assert!(false_alarms.is_empty(), "busy connection alerted: {false_alarms:?}");
}

#[test]
fn killing_the_target_reports_target_exited_and_exits_zero() {
    let mut server = Server::start(&[]);
    let (client, _) = server.connect();
    let mut agent = start_agent(server.pid, &[]);
    let alert = agent.wait_for("idle alert", DEADLINE, |v| is_alert_for(v, "idle", &client));
    let pid = server.pid;
    server.scenario.kill();

    let exited = agent.wait_for("target_exited", DEADLINE, |v| v["event"] == "target_exited");
    assert_eq!(as_u64(&exited["pid"]), u64::from(pid));
    let status = agent.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "output:\n{}", agent.out.dump());
    let events: Vec<&str> = agent.out.seen.iter().map(|v| v["event"].as_str().unwrap()).collect();
    assert_eq!(events.last(), Some(&"stopped"), "{events:?}");
    // The dead server's alert was cleared, not left dangling.
    assert!(
        agent
            .out
            .seen
            .iter()
            .any(|v| v["event"] == "alert_cleared" && v["cookie"] == alert["cookie"]),
        "{events:?}"
    );
}

#[test]
fn sigterm_stops_cleanly_and_unloads_every_program() {
    let server = Server::start(&[]);
    let mut agent = start_agent(server.pid, &[]);
    let programs = bpf_prog_ids_of(agent.pid());
    assert!(programs.len() >= 5, "expected the agent to hold its programs, found {programs:?}");
    assert!(programs.iter().all(|&id| bpf_prog_exists(id)));

    assert_eq!(agent.stop().code(), Some(0));
    assert_eq!(agent.out.seen.last().unwrap()["event"], "stopped");
    // The kernel frees programs after an RCU grace period, so give it a moment, not forever.
    let deadline = Instant::now() + DEADLINE;
    let mut left = programs.clone();
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        left.retain(|&id| bpf_prog_exists(id));
    }
    assert!(left.is_empty(), "programs still loaded {DEADLINE:?} after stop: {left:?}");
}

#[test]
fn nonexistent_pid_fails_with_a_clear_one_line_message() {
    observer_tests::require_root();
    let output = std::process::Command::new(observer_tests::observer_bin())
        .args(["watch", "--pid", "999999"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty(), "nothing on stdout for a failed start");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("no process with pid 999999"), "{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
}

#[test]
fn bad_flags_are_usage_errors() {
    for args in
        [&["watch", "--poll-interval", "fast"][..], &["watch", "--pid", "x"], &["frobnicate"]]
    {
        let output =
            std::process::Command::new(observer_tests::observer_bin()).args(args).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn a_full_socket_map_counts_each_untracked_socket_once_and_says_so() {
    let mut server = Server::start(&[]);
    // Room for 64 sockets; 100 connections are 200 sockets, each with several events.
    let mut agent =
        observer_tests::start_agent(&[], &["--max-sockets", "64", "--stats-interval", "200ms"]);
    let backend =
        agent.wait_for("started", DEADLINE, |v| v["event"] == "started")["backend"].clone();
    let mut clients: Vec<TcpStream> = (0..100).map(|_| server.connect().0).collect();
    let mut buf = [0u8; 4];
    for _ in 0..3 {
        for client in &mut clients {
            client.write_all(b"ping").unwrap();
            client.read_exact(&mut buf).unwrap();
        }
    }
    let is_stats = |v: &Value| v["event"] == "stats";
    if backend == "kprobe" {
        // At least the sockets beyond the 64; at most every socket once (12 events each:
        // counting events would give more than 1,600). Other sockets of the machine may take
        // room too.
        let stats = agent.wait_for("the untracked sockets counted", DEADLINE, |v| {
            is_stats(v) && as_u64(&v["probe_counters"]["track_failed"]) >= 136
        });
        let failed = as_u64(&stats["probe_counters"]["track_failed"]);
        assert!(failed <= 400, "track_failed {failed}: {stats}");
        assert_eq!(agent.stop().code(), Some(0));
        let stderr = agent.stderr_text();
        assert!(
            stderr.contains("socket map is full") && stderr.contains("--max-sockets"),
            "{stderr}"
        );
    } else {
        // Socket storage lives on the socket: nothing to fill, every socket tracked.
        let stats = agent.wait_for("a poll with every socket's record", DEADLINE, |v| {
            is_stats(v) && as_u64(&v["map_entries"]) >= 200
        });
        assert_eq!(as_u64(&stats["probe_counters"]["track_failed"]), 0, "{backend}: {stats}");
        assert!(stats["map_capacity"].is_null(), "{backend}: {stats}");
        assert_eq!(agent.stop().code(), Some(0));
        assert!(!agent.stderr_text().contains("socket map is full"));
    }
}
