//! The failures of a connection's first and last moments, and of an accept loop, reproduced for
//! real: a connect() that gets no answer, a close that never finishes, an accept loop that spins
//! at its fd limit. Each has a healthy twin that must stay quiet.
use std::{io::Read, net::TcpStream, time::Duration};

use observer_tests::{
    Agent, Scenario, Server, as_u64,
    netns::{CLIENT_IP, NetPair, SERVER_IP},
    stalls::{full_listener, go_file, non_reader, watched_client},
    start_agent,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(25);

fn event_for(v: &Value, event: &str, reason: &str, key: &str, value: &str) -> bool {
    v["event"] == event && v["reason"] == reason && v[key] == value
}

/// The `event` ("alert" or "alert_cleared") for `reason` whose `key` field is `value`.
fn wait_event(agent: &mut Agent, event: &str, reason: &str, key: &str, value: &str) -> Value {
    agent.wait_for(&format!("{event} {reason} for {key} {value}"), DEADLINE, |v| {
        event_for(v, event, reason, key, value)
    })
}

fn never_alerted(agent: &Agent, reason: &str, key: &str, value: &str) {
    let hits: Vec<&Value> =
        agent.out.seen.iter().filter(|v| event_for(v, "alert", reason, key, value)).collect();
    assert!(hits.is_empty(), "healthy {key} {value} flagged {reason}: {hits:?}");
}

/// The entry for thread `tid` in an alert's `threads`.
fn thread_in<'a>(alert: &'a Value, tid: &Value) -> &'a Value {
    let threads = alert["threads"].as_array();
    threads
        .and_then(|threads| threads.iter().find(|t| t["tid"] == *tid))
        .unwrap_or_else(|| panic!("thread {tid} not named: {alert}"))
}

/// Checks a `connect_stalled` alert against the caller that is stuck in it.
fn assert_stalled_connect(alert: &Value, pid: u32, connecting: &Value) {
    assert_eq!(as_u64(&alert["pid"]), u64::from(pid), "{alert}");
    assert_eq!(alert["fd"], connecting["fd"], "{alert}");
    assert_eq!(alert["state"], "SYN_SENT", "{alert}");
    assert!(as_u64(&alert["connect_ms"]) >= 5000, "{alert}");
    assert!(as_u64(&alert["syn_retransmits"]) >= 1, "{alert}");
    assert!(alert["idle_ms"].is_null(), "nothing ever moved: no idle time: {alert}");
    // The calling thread, blocked in connect() since its SYN, timed by the probes.
    let caller = thread_in(alert, &connecting["tid"]);
    assert_eq!(caller["blocked_in"], "connect", "{alert}");
    assert!(as_u64(&caller["blocked_ms"]) >= 4000, "{alert}");
}

#[test]
fn connect_to_a_listener_whose_queue_is_full_stalls_and_one_answered_in_time_does_not() {
    // The called service cannot accept (002: "Orders blocks and waits forever"); its twin
    // accepts after 2 s, and the connect completes well within the connect timeout.
    let go = go_file();
    let (stuck, _filler) = full_listener(600_000, &go);
    let (slow, _slow_filler) = full_listener(2000, &go);
    let targets = [stuck.addr, slow.addr];
    let (mut caller, pid, mut agent, connecting) =
        watched_client(None, &targets, &["--stats-interval", "200ms"], &go);

    let remote = stuck.addr.to_string();
    let alert = wait_event(&mut agent, "alert", "connect_stalled", "remote", &remote);
    assert_stalled_connect(&alert, pid, &connecting[0]);
    let slow_remote = slow.addr.to_string();
    let answered =
        caller.wait_for("connected", |v| v["event"] == "connected" && v["remote"] == slow_remote);
    assert!(as_u64(&answered["after_ms"]) >= 1500, "the twin waited: {answered}");
    agent.settle(DEADLINE);
    never_alerted(&agent, "connect_stalled", "remote", &slow_remote);

    // The service accepts at last (its queue drains): the connect completes, the alert clears.
    drop(stuck);
    let clear = wait_event(&mut agent, "alert_cleared", "connect_stalled", "remote", &remote);
    assert!(["activity_resumed", "socket_closed"].contains(&clear["why"].as_str().unwrap()));
}

#[test]
fn connect_to_a_host_that_drops_syns_stalls_until_they_get_through() {
    let net = NetPair::create();
    let listen = format!("{SERVER_IP}:0");
    let dropping = Server::start_in(Some(&net.server), &["--listen", &listen]);
    let flaky = Server::start_in(Some(&net.server), &["--listen", &listen]);
    net.drop_syns_to(dropping.addr.port());
    net.drop_syns_to(flaky.addr.port());
    let targets = [dropping.addr, flaky.addr];
    let (mut caller, pid, mut agent, connecting) =
        watched_client(Some(&net.client), &targets, &["--stats-interval", "200ms"], &go_file());
    // Two seconds of dropped SYNs is the healthy twin's whole scenario.
    std::thread::sleep(Duration::from_secs(2));
    net.allow_syns_to(flaky.addr.port());
    let flaky_remote = flaky.addr.to_string();
    caller.wait_for("connected", |v| v["event"] == "connected" && v["remote"] == flaky_remote);

    let remote = dropping.addr.to_string();
    let alert = wait_event(&mut agent, "alert", "connect_stalled", "remote", &remote);
    assert_stalled_connect(&alert, pid, &connecting[0]);
    assert!(alert["detail"].as_str().unwrap().contains("connect timeout"), "{alert}");
    agent.settle(DEADLINE);
    never_alerted(&agent, "connect_stalled", "remote", &flaky_remote);

    // The SYNs get through again: the next retransmission connects and the alert clears.
    net.allow_syns_to(dropping.addr.port());
    caller.wait_for("connected", |v| v["event"] == "connected" && v["remote"] == remote);
    let clear = wait_event(&mut agent, "alert_cleared", "connect_stalled", "remote", &remote);
    assert_eq!(clear["why"], "activity_resumed", "{clear}");
}

#[test]
fn a_call_to_another_hosts_service_on_the_callers_own_port_is_watched() {
    // Services often all listen on one port (8080) and call each other on it. The agent skips
    // a watched server's clients on loopback (they are other processes'), but a call the
    // server itself makes to that port on another host is its own, and must be seen.
    let net = NetPair::create();
    let own = Server::start_in(Some(&net.client), &["--listen", &format!("{CLIENT_IP}:0")]);
    let port = own.addr.port();
    net.drop_syns_to(port);
    let upstream = format!("{SERVER_IP}:{port}");
    let go = go_file();
    let go_path = go.display().to_string();
    let args = ["client", "--go-file", &go_path, "--connect", &upstream];
    let mut caller = Scenario::start_in(Some(&net.client), &args);
    let pid = as_u64(&caller.wait_for("started", |v| v["event"] == "started")["pid"]) as u32;
    let mut agent = start_agent(&[own.pid, pid], &["--stats-interval", "200ms"]);
    // The listener is known (its port is in the dump filter) before the call goes out.
    agent.settle(DEADLINE);
    std::fs::write(&*go, b"go").unwrap();
    let connecting =
        caller.wait_for("connecting", |v| v["event"] == "connecting" && v["remote"] == upstream);

    let alert = wait_event(&mut agent, "alert", "connect_stalled", "remote", &upstream);
    assert_stalled_connect(&alert, pid, &connecting);
}

/// Checks a `closing_stalled` alert on an orphan of `server`.
fn assert_orphan(alert: &Value, server: &Server) {
    assert_eq!(alert["state"], "FIN_WAIT1", "{alert}");
    assert_eq!(alert["orphaned"], true, "{alert}");
    assert!(alert["fd"].is_null(), "an orphan has no fd: {alert}");
    // Named by who held it before it was closed.
    assert_eq!(as_u64(&alert["pid"]), u64::from(server.pid), "{alert}");
    assert_eq!(alert["comm"], "scenario", "{alert}");
    assert_eq!(alert["local"], server.addr.to_string(), "{alert}");
    assert!(as_u64(&alert["unsent_bytes"]) > 0, "{alert}");
    assert_eq!(alert["peer_window"], 0, "{alert}");
    assert!(as_u64(&alert["closing_ms"]) >= 2000, "{alert}");
}

#[test]
fn response_closed_on_a_peer_that_does_not_read_never_finishes_closing() {
    // One server closes at once (only the probes saw who held the socket), the other a second
    // after writing (the agent saw it held).
    let mut at_once = Server::start(&["--mode", "large-response"]);
    let mut later = Server::start(&["--mode", "large-response", "--close-delay-ms", "1000"]);
    let mut agent = start_agent(
        &[at_once.pid, later.pid],
        &["--closing-timeout", "2s", "--stats-interval", "200ms"],
    );
    let stuck = non_reader(at_once.addr);
    let stuck_later = non_reader(later.addr);
    let mut reader = TcpStream::connect(at_once.addr).unwrap();
    let mut response = Vec::new();
    reader.read_to_end(&mut response).unwrap();
    assert!(response.len() > 64 * 1024, "the ordinary client read the whole response");
    for (server, conn) in [(&mut at_once, &stuck), (&mut later, &stuck_later)] {
        let accepted = server.accepted(conn);
        server.scenario.wait_for("closed", |v| v["event"] == "closed" && v["fd"] == accepted["fd"]);
    }

    let stuck_addr = stuck.local_addr().unwrap().to_string();
    let alert = wait_event(&mut agent, "alert", "closing_stalled", "remote", &stuck_addr);
    assert_orphan(&alert, &at_once);
    assert!(alert["detail"].as_str().unwrap().contains("stopped reading"), "{alert}");
    let later_addr = stuck_later.local_addr().unwrap().to_string();
    let alert = wait_event(&mut agent, "alert", "closing_stalled", "remote", &later_addr);
    assert_orphan(&alert, &later);
    agent.settle(DEADLINE);
    never_alerted(&agent, "closing_stalled", "remote", &reader.local_addr().unwrap().to_string());

    // The peer goes away (its close resets the orphan): the alert clears with the socket.
    drop(stuck);
    let clear = wait_event(&mut agent, "alert_cleared", "closing_stalled", "remote", &stuck_addr);
    assert_eq!(clear["why"], "socket_closed", "{clear}");
}

#[test]
fn accept_loop_that_retries_emfile_at_once_spins_and_one_that_backs_off_does_not() {
    let mut spinning = Server::start(&["--nofile", "32", "--on-accept-error", "spin"]);
    let mut patient = Server::start(&["--nofile", "32"]);
    // Default flags: no syscall probes, so accept() failures are not counted, only seen.
    let mut agent = start_agent(
        &[spinning.pid, patient.pid],
        &["--spin-cpu", "0.3", "--stats-interval", "200ms"],
    );
    let clients: Vec<TcpStream> = (0..40)
        .flat_map(|_| [TcpStream::connect(spinning.addr), TcpStream::connect(patient.addr)])
        .map(Result::unwrap)
        .collect();
    for server in [&mut spinning, &mut patient] {
        server.scenario.wait_for("accept failing", |v| v["event"] == "accept_failed");
    }

    let alert = agent.wait_for("accept_spinning alert", DEADLINE, |v| {
        v["event"] == "alert" && v["reason"] == "accept_spinning" && v["pid"] == spinning.pid
    });
    assert!(alert["cpu"].as_f64().unwrap() >= 0.3, "{alert}");
    assert!(as_u64(&alert["queue_length"]) >= 1, "{alert}");
    assert_eq!(as_u64(&alert["fds_limit"]), 32, "{alert}");
    assert!(as_u64(&alert["fds_used"]) >= 32, "at its limit: {alert}");
    assert!(alert["accept_errors"].is_null(), "not counted without --syscall-timing: {alert}");
    assert!(alert["cookie"].is_null(), "a process alert: {alert}");
    assert!(alert["detail"].as_str().unwrap().contains("Back off"), "{alert}");
    // The patient twin is short of fds too, and said so, but does not spin.
    agent.wait_for("fd_pressure of the patient twin", DEADLINE, |v| {
        v["event"] == "alert" && v["reason"] == "fd_pressure" && v["pid"] == patient.pid
    });
    agent.settle(DEADLINE);
    assert!(
        !agent.out.seen.iter().any(|v| v["reason"] == "accept_spinning" && v["pid"] == patient.pid),
        "a loop that backs off was flagged as spinning"
    );

    // The clients leave, fds are freed, accept() works again: the spinning stops.
    drop(clients);
    let clear = agent.wait_for("accept_spinning cleared", Duration::from_secs(40), |v| {
        v["event"] == "alert_cleared"
            && v["reason"] == "accept_spinning"
            && v["pid"] == spinning.pid
    });
    assert_eq!(clear["why"], "activity_resumed", "{clear}");
}
