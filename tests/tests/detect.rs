//! Every failure observer names, reproduced for real against a thread-per-connection server: the
//! alert fires with the right identity and numbers, a healthy connection of the same shape is
//! not flagged, and the alert clears when the condition ends.
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use observer_tests::{
    Agent, Server, as_u64, is_event_for,
    netns::{NetPair, SERVER_IP},
    reappear, remote_of, start_agent, vanish,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(25);

/// The alert for `reason` on the connection whose remote end is `remote`.
fn alert(agent: &mut Agent, reason: &str, remote: &str) -> Value {
    agent.wait_for(&format!("{reason} alert for {remote}"), DEADLINE, |v| {
        is_event_for(v, "alert", reason, remote)
    })
}

fn cleared(agent: &mut Agent, reason: &str, remote: &str) -> Value {
    agent.wait_for(&format!("{reason} cleared for {remote}"), DEADLINE, |v| {
        is_event_for(v, "alert_cleared", reason, remote)
    })
}

/// The entry for thread `tid` in an alert's `threads`.
fn thread_in<'a>(alert: &'a Value, tid: &Value) -> &'a Value {
    let threads = alert["threads"].as_array();
    threads
        .and_then(|threads| threads.iter().find(|t| t["tid"] == *tid))
        .unwrap_or_else(|| panic!("thread {tid} not named: {alert}"))
}

fn never_alerted(agent: &Agent, reason: &str, remote: &str) {
    let hits: Vec<&Value> =
        agent.out.seen.iter().filter(|v| is_event_for(v, "alert", reason, remote)).collect();
    assert!(hits.is_empty(), "healthy connection {remote} flagged {reason}: {hits:?}");
}

fn assert_owner(alert: &Value, server: &Server, accepted: &Value) {
    assert_eq!(as_u64(&alert["pid"]), u64::from(server.pid), "{alert}");
    assert_eq!(alert["fd"], accepted["fd"], "{alert}");
    assert_eq!(alert["local"], accepted["local"], "{alert}");
}

/// Reads whatever arrives, a little at a time, until told to stop: a slow but live reader.
/// `total` counts the bytes read so far.
fn steady_reader(
    mut conn: TcpStream,
    stop: Arc<AtomicBool>,
    total: Arc<AtomicU64>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        conn.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        while !stop.load(Ordering::Relaxed) {
            if let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total.fetch_add(n as u64, Ordering::Relaxed);
            }
            thread::sleep(Duration::from_millis(20));
        }
    })
}

/// Waits until `cond` holds, checking every 20 ms, for at most `deadline`.
fn wait_until(what: &str, deadline: Duration, cond: impl Fn() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "{what} did not happen within {deadline:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn slow_loris_client_is_a_slow_transfer() {
    let mut server = Server::start(&["--mode", "http"]);
    let mut agent = start_agent(
        &[server.pid],
        &["--slow-after", "3s", "--slow-min-rate", "64", "--stats-interval", "200ms"],
    );
    let (mut loris, accepted) = server.connect();
    let (mut polite, _) = server.connect();
    let (loris_addr, polite_addr) = (remote_of(&loris), remote_of(&polite));
    let stop = Arc::new(AtomicBool::new(false));

    // The slow-loris sends a header byte every 300 ms and never finishes its request...
    let trickle = thread::spawn({
        let stop = stop.clone();
        move || {
            let header = b"GET / HTTP/1.1\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
            for byte in header.iter().cycle().take(80) {
                if stop.load(Ordering::Relaxed) || loris.write_all(&[*byte]).is_err() {
                    break;
                }
                thread::sleep(Duration::from_millis(300));
            }
            loris
        }
    });
    // ...while a polite client of the same low rate sends whole requests and reads the answers.
    let conversation = thread::spawn({
        let stop = stop.clone();
        move || {
            let mut answers = 0;
            let mut answer = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                polite.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
                let n = polite.read(&mut answer).unwrap();
                assert!(answer[..n].starts_with(b"HTTP/1.1 200 OK"));
                answers += 1;
                thread::sleep(Duration::from_millis(300));
            }
            answers
        }
    });

    let alert = alert(&mut agent, "slow_transfer", &loris_addr);
    assert_owner(&alert, &server, &accepted);
    assert_eq!(alert["direction"], "receiving", "{alert}");
    let rate = alert["rate_bytes_per_sec"].as_f64().unwrap();
    assert!(rate > 0.0 && rate < 64.0, "{alert}");
    assert!(as_u64(&alert["window_ms"]) >= 3000, "{alert}");
    agent.settle(DEADLINE);
    never_alerted(&agent, "slow_transfer", &polite_addr);
    never_alerted(&agent, "idle", &loris_addr);

    // The slow-loris gives up: its alert ends with the connection.
    stop.store(true, Ordering::Relaxed);
    assert!(conversation.join().unwrap() > 5);
    drop(trickle.join().unwrap());
    let clear = cleared(&mut agent, "slow_transfer", &loris_addr);
    assert_eq!(clear["why"], "socket_closed", "{clear}");
}

#[test]
fn peer_that_stops_reading_blocks_the_server_in_write() {
    let mut server = Server::start(&["--mode", "stream"]);
    let mut agent = start_agent(
        &[server.pid],
        &["--blocked-timeout", "2s", "--stats-interval", "200ms", "--syscall-timing"],
    );
    let (stuck, accepted) = server.connect();
    let (reader, _) = server.connect();
    let (stuck_addr, reader_addr) = (remote_of(&stuck), remote_of(&reader));
    let stop = Arc::new(AtomicBool::new(false));
    let (read, drained) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reading = steady_reader(reader, stop.clone(), read.clone());

    let alert = alert(&mut agent, "blocked_send", &stuck_addr);
    assert_owner(&alert, &server, &accepted);
    assert!(as_u64(&alert["send_queue_bytes"]) > 0, "{alert}");
    assert!(as_u64(&alert["stalled_ms"]) >= 2000, "{alert}");
    assert_eq!(alert["peer_window"], 0, "{alert}");
    // The worker is blocked writing to this very socket, and the probes timed it.
    let worker = thread_in(&alert, &accepted["tid"]);
    let call = worker["blocked_in"].as_str().unwrap();
    assert!(["write", "sendto", "sendmsg", "writev"].contains(&call), "{alert}");
    assert!(as_u64(&worker["blocked_ms"]) >= 1000, "{alert}");

    agent.settle(DEADLINE);
    never_alerted(&agent, "blocked_send", &reader_addr);
    never_alerted(&agent, "retransmitting", &reader_addr);
    never_alerted(&agent, "idle", &stuck_addr);

    // The peer starts reading again: the sender makes progress and the alert clears.
    let draining = steady_reader(stuck, stop.clone(), drained.clone());
    let clear = cleared(&mut agent, "blocked_send", &stuck_addr);
    assert_eq!(clear["why"], "activity_resumed", "{clear}");
    stop.store(true, Ordering::Relaxed);
    reading.join().unwrap();
    draining.join().unwrap();
    assert!(read.load(Ordering::Relaxed) > 0 && drained.load(Ordering::Relaxed) > 0);
}

#[test]
fn blocked_writer_watched_by_pid_is_timed_on_every_backend() {
    // Default flags: no syscall hooks. fentry and kprobe time the call itself; the tracepoint
    // backend times the thread's sleep, and says so.
    let mut server = Server::start(&["--mode", "stream"]);
    let mut agent = observer_tests::start_agent(&[server.pid], &["--blocked-timeout", "1s"]);
    let backend =
        agent.wait_for("started", DEADLINE, |v| v["event"] == "started")["backend"].clone();
    let (stuck, accepted) = server.connect();
    let alert = alert(&mut agent, "blocked_send", &remote_of(&stuck));
    let worker = thread_in(&alert, &accepted["tid"]);
    assert!(as_u64(&worker["blocked_ms"]) >= 1000, "{backend}: {alert}");
    let from = if backend == "tracepoint" { "sleep" } else { "call" };
    assert_eq!(worker["blocked_ms_from"], from, "{backend}: {alert}");
}

#[test]
fn blocked_writer_is_timed_by_the_probes_the_backend_has() {
    // Watched by port, not pid: no thread to follow. fentry and kprobe time the thread inside
    // tcp_sendmsg themselves; the tracepoint backend cannot, and must not guess.
    let mut server = Server::start(&["--mode", "stream"]);
    let port = server.addr.port().to_string();
    let mut agent = observer_tests::Agent::start(
        &observer_tests::watch_args(&[], &["--port", &port, "--blocked-timeout", "1s"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let backend =
        agent.wait_for("started", DEADLINE, |v| v["event"] == "started")["backend"].clone();
    let (stuck, accepted) = server.connect();
    let alert = alert(&mut agent, "blocked_send", &remote_of(&stuck));
    let worker = thread_in(&alert, &accepted["tid"]);
    assert!(worker["blocked_in"].is_string(), "{alert}");
    if backend == "tracepoint" {
        assert!(worker.get("blocked_ms").is_none(), "guessed a time: {alert}");
    } else {
        assert!(as_u64(&worker["blocked_ms"]) >= 1000, "{backend}: {alert}");
    }
}

/// Reads `server`'s stream through `reader` until data flows, makes the peer vanish with
/// `vanish`, expects a `retransmitting` alert (not `blocked_send`), brings the peer back with
/// `reappear`, and expects the alert to clear. Returns the alert.
fn vanishing_peer_is_retransmitting(
    agent: &mut Agent,
    (server, accepted): (&Server, &Value),
    reader: TcpStream,
    vanish: impl FnOnce(),
    reappear: impl FnOnce(),
) -> Value {
    let client_addr = remote_of(&reader);
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let reading = steady_reader(reader, stop.clone(), total.clone());
    wait_until("data flowing", DEADLINE, || total.load(Ordering::Relaxed) > 256 * 1024);
    vanish();

    let alert = alert(agent, "retransmitting", &client_addr);
    assert_owner(&alert, server, accepted);
    assert!(as_u64(&alert["retransmits_in_a_row"]) >= 1, "{alert}");
    assert!(as_u64(&alert["unacked_segments"]) >= 1, "{alert}");
    never_alerted(agent, "blocked_send", &client_addr);

    // The peer comes back: the next retransmission is acknowledged and the alert clears.
    reappear();
    let clear = cleared(agent, "retransmitting", &client_addr);
    assert_eq!(clear["why"], "activity_resumed", "{clear}");
    stop.store(true, Ordering::Relaxed);
    reading.join().unwrap();
    alert
}

#[test]
fn peer_that_vanishes_mid_transfer_is_retransmitting() {
    let net = NetPair::create();
    let listen = format!("{SERVER_IP}:0");
    let mut server =
        Server::start_in(Some(&net.server), &["--listen", &listen, "--mode", "stream"]);
    let mut agent = start_agent(&[server.pid], &["--retrans-timeout", "2s"]);
    let client = net.connect(server.addr);
    let accepted = server.accepted(&client);
    let client_addr = remote_of(&client);
    assert!(!client_addr.starts_with("127."), "the peer is a real remote host: {client_addr}");
    // The peer vanishes: packets to it are silently dropped.
    let alert = vanishing_peer_is_retransmitting(
        &mut agent,
        (&server, &accepted),
        client,
        || net.drop_client_traffic(),
        || net.restore_client_traffic(),
    );
    assert!(as_u64(&alert["stalled_ms"]) >= 2000, "{alert}");
    assert!(as_u64(&alert["gives_up_in_ms"]) > 0, "{alert}");
}

#[test]
fn peer_that_vanishes_on_loopback_is_retransmitting() {
    let mut server = Server::start(&["--mode", "stream"]);
    let mut agent = start_agent(&[server.pid], &["--retrans-timeout", "2s"]);
    let (client, accepted) = server.connect();
    let reader = client.try_clone().unwrap();
    vanishing_peer_is_retransmitting(
        &mut agent,
        (&server, &accepted),
        reader,
        || vanish(&client),
        || reappear(&client),
    );
}

#[test]
fn application_that_never_closes_leaks_close_wait() {
    let mut leaky = Server::start(&["--on-eof", "leak"]);
    let mut tidy = Server::start(&[]);
    let mut agent = start_agent(
        &[leaky.pid, tidy.pid],
        &["--close-wait-timeout", "2s", "--stats-interval", "200ms"],
    );
    let (leaked, accepted) = leaky.connect();
    let (closed, _) = tidy.connect();
    let (leaked_addr, closed_addr) = (remote_of(&leaked), remote_of(&closed));
    leaked.shutdown(Shutdown::Both).unwrap();
    closed.shutdown(Shutdown::Both).unwrap();
    leaky.scenario.wait_for("eof ignored", |v| v["event"] == "eof_ignored");
    tidy.scenario.wait_for("closed", |v| v["event"] == "closed");

    let alert = agent.wait_for("close_wait alert", DEADLINE, |v| {
        is_event_for(v, "alert", "close_wait", &leaked_addr)
    });
    assert_owner(&alert, &leaky, &accepted);
    assert_eq!(alert["state"], "CLOSE_WAIT", "{alert}");
    assert!(as_u64(&alert["close_wait_ms"]) >= 2000, "{alert}");
    agent.settle(DEADLINE);
    never_alerted(&agent, "close_wait", &closed_addr);

    // The leak ends when the process does.
    leaky.scenario.kill();
    let clear = cleared(&mut agent, "close_wait", &leaked_addr);
    assert_eq!(clear["why"], "socket_closed", "{clear}");
}

fn connect_in_background(addr: SocketAddr) -> thread::JoinHandle<Option<TcpStream>> {
    thread::spawn(move || TcpStream::connect_timeout(&addr, Duration::from_secs(15)).ok())
}

#[test]
fn listener_whose_accept_loop_stalls_overflows_its_queue() {
    let stalled = Server::start(&["--backlog", "1", "--accept-delay-ms", "5000"]);
    let prompt = Server::start(&["--backlog", "16"]);
    let mut agent = start_agent(&[stalled.pid, prompt.pid], &["--stats-interval", "200ms"]);
    let clients: Vec<_> = (0..3)
        .flat_map(|_| [connect_in_background(stalled.addr), connect_in_background(prompt.addr)])
        .collect();

    let stalled_local = stalled.addr.to_string();
    let alert = agent.wait_for("accept_queue_overflow alert", DEADLINE, |v| {
        v["event"] == "alert"
            && v["reason"] == "accept_queue_overflow"
            && v["local"] == stalled_local
    });
    assert_eq!(as_u64(&alert["pid"]), u64::from(stalled.pid), "{alert}");
    assert_eq!(as_u64(&alert["fd"]), stalled.listen_fd, "{alert}");
    assert_eq!(alert["state"], "LISTEN", "{alert}");
    assert_eq!(alert["queue_limit"], 1, "{alert}");
    assert!(as_u64(&alert["queue_length"]) >= 2, "{alert}");

    // Once the accept loop runs, the queue drains and (after the drops stop) the alert clears.
    let clear = agent.wait_for("overflow cleared", Duration::from_secs(40), |v| {
        v["event"] == "alert_cleared"
            && v["reason"] == "accept_queue_overflow"
            && v["local"] == stalled_local
    });
    assert_eq!(clear["why"], "activity_resumed", "{clear}");
    let prompt_local = prompt.addr.to_string();
    assert!(
        !agent
            .out
            .seen
            .iter()
            .any(|v| v["reason"] == "accept_queue_overflow" && v["local"] == prompt_local),
        "a listener that keeps accepting was flagged"
    );
    for c in clients {
        c.join().unwrap();
    }
}

#[test]
fn closing_with_unread_request_bytes_resets_the_response() {
    let mut lingering = Server::start(&["--mode", "lingering-close"]);
    let mut graceful = Server::start(&["--mode", "graceful-close"]);
    let mut agent = start_agent(&[lingering.pid, graceful.pid], &["--stats-interval", "200ms"]);
    let request = b"GET\nthe rest of a request body the server never reads\n";

    let (mut reset_client, accepted) = lingering.connect();
    reset_client.write_all(request).unwrap();
    lingering.scenario.wait_for("closed", |v| v["event"] == "closed" && v["fd"] == accepted["fd"]);
    let (mut clean_client, _) = graceful.connect();
    clean_client.write_all(request).unwrap();
    clean_client.shutdown(Shutdown::Write).unwrap();
    let mut response = Vec::new();
    clean_client.read_to_end(&mut response).unwrap();
    assert!(response.starts_with(b"HTTP/1.0 200 OK"));

    let alert = alert(&mut agent, "reset_unread", &remote_of(&reset_client));
    assert_eq!(as_u64(&alert["pid"]), u64::from(lingering.pid), "{alert}");
    assert_eq!(alert["local"], accepted["local"], "{alert}");
    assert_eq!(alert["direction"], "sent", "{alert}");
    assert_eq!(as_u64(&alert["unread_bytes"]), request.len() as u64 - 4, "{alert}");
    let clear = cleared(&mut agent, "reset_unread", &remote_of(&reset_client));
    assert_eq!(clear["why"], "socket_closed", "{clear}");
    agent.settle(DEADLINE);
    never_alerted(&agent, "reset_unread", &remote_of(&clean_client));
}

#[test]
fn silent_remote_connection_without_keepalive_will_be_dropped_by_a_middlebox() {
    let net = NetPair::create();
    let listen = format!("{SERVER_IP}:0");
    let mut bare = Server::start_in(Some(&net.server), &["--listen", &listen]);
    let mut kept =
        Server::start_in(Some(&net.server), &["--listen", &listen, "--keepalive-idle", "1"]);
    let mut agent = start_agent(
        &[bare.pid, kept.pid],
        &["--middlebox-idle", "3s", "--stats-interval", "200ms"],
    );
    let mut silent = net.connect(bare.addr);
    let accepted = bare.accepted(&silent);
    let probed = net.connect(kept.addr);
    kept.accepted(&probed);

    let alert = alert(&mut agent, "keepalive_missing", &remote_of(&silent));
    assert_owner(&alert, &bare, &accepted);
    assert_eq!(alert["keepalive"], false, "{alert}");
    assert!(as_u64(&alert["silent_ms"]) >= 3000, "{alert}");
    assert_eq!(alert["middlebox_idle_ms"], 3000, "{alert}");
    agent.settle(DEADLINE);
    never_alerted(&agent, "keepalive_missing", &remote_of(&probed));

    // Traffic again: the flow is alive and the alert clears.
    silent.write_all(b"ping").unwrap();
    let clear = cleared(&mut agent, "keepalive_missing", &remote_of(&silent));
    assert_eq!(clear["why"], "activity_resumed", "{clear}");
}

#[test]
fn process_running_out_of_fds_is_fd_pressure() {
    let mut starved = Server::start(&["--nofile", "32"]);
    let roomy = Server::start(&[]);
    // accept() failures are counted by the syscall probes.
    let mut agent =
        start_agent(&[starved.pid, roomy.pid], &["--stats-interval", "200ms", "--syscall-timing"]);
    let mut clients: Vec<TcpStream> =
        (0..40).map(|_| TcpStream::connect(starved.addr).unwrap()).collect();
    let roomy_clients: Vec<TcpStream> =
        (0..5).map(|_| TcpStream::connect(roomy.addr).unwrap()).collect();
    starved
        .scenario
        .wait_for("accept failing", |v| v["event"] == "accept_failed" && v["errno"] == 24);

    let alert = agent.wait_for("fd_pressure alert", DEADLINE, |v| {
        v["event"] == "alert" && v["reason"] == "fd_pressure" && v["pid"] == starved.pid
    });
    assert_eq!(alert["fds_limit"], 32, "{alert}");
    assert!(as_u64(&alert["fds_used"]) >= 29, "{alert}");
    assert!(alert["cookie"].is_null() && alert["local"].is_null(), "a process alert: {alert}");
    assert!(alert["accept_errors"].is_u64(), "{alert}");
    // accept() failing for lack of fds is measured by the probes, not guessed.
    agent.wait_for("accept errors counted", DEADLINE, |v| {
        v["event"] == "stats" && v["probe_counters"]["accept_errors"].as_u64() > Some(0)
    });
    agent.settle(DEADLINE);
    assert!(
        !agent.out.seen.iter().any(|v| v["reason"] == "fd_pressure" && v["pid"] == roomy.pid),
        "a process with room to spare was flagged"
    );

    // The clients leave, the server closes their sockets, and the pressure ends.
    clients.clear();
    let clear = agent.wait_for("fd_pressure cleared", Duration::from_secs(40), |v| {
        v["event"] == "alert_cleared" && v["reason"] == "fd_pressure" && v["pid"] == starved.pid
    });
    assert_eq!(clear["why"], "activity_resumed", "{clear}");
    drop(roomy_clients);
}

#[test]
fn policy_rule_sets_thresholds_per_port_and_is_named_in_the_alert() {
    let mut fast = Server::start(&[]);
    let mut quiet = Server::start(&[]);
    let dir = std::env::temp_dir().join(format!("observer-policy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("observer.toml");
    std::fs::write(
        &config,
        format!(
            "[defaults]\nidle_timeout = \"1h\"\n\n[[rule]]\nname = \"impatient\"\nlocal_port = {}\n\
             idle_timeout = \"1s\"\n\n[[rule]]\nname = \"hush\"\nlocal_port = {}\nidle_timeout = \"1s\"\n\
             ignore = [\"idle\"]\n",
            fast.addr.port(),
            quiet.addr.port()
        ),
    )
    .unwrap();
    let config_arg = config.display().to_string();
    let mut agent = start_agent(
        &[fast.pid, quiet.pid],
        &["--config", &config_arg, "--stats-interval", "200ms"],
    );
    let (client, _) = fast.connect();
    let (hushed, _) = quiet.connect();
    let alert = alert(&mut agent, "idle", &remote_of(&client));
    assert_eq!(alert["policy_rule"], "impatient", "{alert}");
    agent.settle(DEADLINE);
    never_alerted(&agent, "idle", &remote_of(&hushed));

    // A bad policy file is refused, by `check` and by `watch`, naming the line.
    std::fs::write(&config, "[[rule]]\nlocal_port = 80\nignore = [\"idel\"]\n").unwrap();
    for command in [&["check", "--config", &config_arg][..], &["watch", "--config", &config_arg]] {
        let out = std::process::Command::new(observer_tests::observer_bin())
            .args(command)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{command:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("observer.toml:3:") && stderr.contains("unknown reason 'idel'"),
            "{stderr}"
        );
    }
}
