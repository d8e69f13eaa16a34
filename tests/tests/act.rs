//! Ending stuck connections for real: `observer kill` in each mode against threads blocked in
//! read and in write, the safety refusals, and `watch --action` with its rate limit and dry run.
use std::{
    io::{ErrorKind, Read, Write},
    net::TcpStream,
    time::Duration,
};

use observer_tests::{
    Agent, Server, as_u64, is_event_for,
    netns::{NetPair, SERVER_IP},
    remote_of, run_observer, stalls, start_agent,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(25);
const ECONNABORTED: u64 = libc::ECONNABORTED as u64;
const EPIPE: u64 = libc::EPIPE as u64;

/// Runs `observer kill`, expecting exactly one `action` line, and returns it with the exit code.
fn kill(args: &[&str]) -> (Option<i32>, Value) {
    let mut all = vec!["kill"];
    all.extend_from_slice(args);
    let (code, lines, stderr) = run_observer(&all);
    assert_eq!(lines.len(), 1, "one action line, got {lines:?}; stderr: {stderr}");
    assert_eq!(lines[0]["event"], "action", "{}", lines[0]);
    (code, lines[0].clone())
}

/// `observer kill` of the server's end of `client`'s connection, named by its addresses.
fn kill_by_addresses(
    server: &Server,
    accepted: &Value,
    client: &TcpStream,
) -> (Option<i32>, Value) {
    kill(&[
        "--pid",
        &server.pid.to_string(),
        "--local",
        accepted["local"].as_str().unwrap(),
        "--remote",
        &remote_of(client),
    ])
}

/// The cookie of the server side of `client`'s connection, from an idle alert.
fn server_cookie(agent: &mut Agent, client: &TcpStream) -> String {
    let remote = remote_of(client);
    let alert =
        agent.wait_for("idle alert", DEADLINE, |v| is_event_for(v, "alert", "idle", &remote));
    as_u64(&alert["cookie"]).to_string()
}

/// A server with one client gone quiet, and the agent that alerted it: the client, the
/// server's `accepted` report, and the connection's cookie from the alert.
struct IdleConnection {
    server: Server,
    /// Still watching: its alert was the source of `cookie`.
    agent: Agent,
    client: TcpStream,
    accepted: Value,
    cookie: String,
}

fn idle_connection() -> IdleConnection {
    let mut server = Server::start(&[]);
    let mut agent = start_agent(&[server.pid], &["--idle-timeout", "1s"]);
    let (client, accepted) = server.connect();
    let cookie = server_cookie(&mut agent, &client);
    IdleConnection { server, agent, client, accepted, cookie }
}

fn closed(server: &mut Server, accepted: &Value) -> Value {
    let fd = accepted["fd"].clone();
    server.scenario.wait_for("worker done", |v| v["event"] == "closed" && v["fd"] == fd)
}

/// The connection still works: an echo round trip succeeds.
fn still_echoes(client: &mut TcpStream) {
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
}

/// What the client reads next, once the server side has been ended.
fn client_sees(client: &mut TcpStream) -> std::io::Result<usize> {
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match client.read(&mut buf) {
            // Data already in flight (a writer's backlog) comes first.
            Ok(n) if n > 0 => continue,
            other => return other,
        }
    }
}

#[test]
fn destroy_unblocks_a_thread_blocked_in_read_and_resets_the_client() {
    let mut server = Server::start(&[]);
    let (mut client, accepted) = server.connect();
    let (code, action) = kill_by_addresses(&server, &accepted, &client);
    assert_eq!((code, action["result"].as_str()), (Some(0), Some("ok")), "{action}");
    assert_eq!(
        (action["action"].as_str(), action["dry_run"].as_bool()),
        (Some("destroy"), Some(false))
    );
    assert_eq!(action["fd"], accepted["fd"], "{action}");
    assert!(action["reason"].is_null(), "by hand: {action}");
    let done = closed(&mut server, &accepted);
    assert_eq!(
        (done["how"].as_str(), done["errno"].as_u64()),
        (Some("error"), Some(ECONNABORTED)),
        "{done}"
    );
    let seen = client_sees(&mut client);
    assert_eq!(seen.as_ref().map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset), "{seen:?}");
}

#[test]
fn shutdown_unblocks_a_thread_blocked_in_read_with_eof_and_fins_the_client() {
    let IdleConnection { mut server, mut agent, mut client, accepted, cookie } = idle_connection();
    let (code, action) =
        kill(&["--pid", &server.pid.to_string(), "--cookie", &cookie, "--mode", "shutdown"]);
    assert_eq!((code, action["result"].as_str()), (Some(0), Some("ok")), "{action}");
    assert_eq!(action["cookie"].to_string(), cookie);
    let done = closed(&mut server, &accepted);
    assert_eq!(done["how"], "eof", "the worker read EOF and closed normally: {done}");
    assert_eq!(client_sees(&mut client).unwrap(), 0, "the client got a FIN");
    // The application's own close ends the alert.
    let clear = agent.wait_for("cleared", DEADLINE, |v| {
        is_event_for(v, "alert_cleared", "idle", &remote_of(&client))
    });
    assert_eq!(clear["why"], "socket_closed");
}

#[test]
fn both_modes_unblock_a_thread_blocked_in_write_on_a_peer_that_does_not_read() {
    for mode in ["shutdown", "destroy"] {
        let mut server = Server::start(&["--mode", "stream"]);
        let mut agent = start_agent(&[server.pid], &["--blocked-timeout", "1s"]);
        let (mut client, accepted) = server.connect();
        let remote = remote_of(&client);
        let alert = agent.wait_for("blocked_send", DEADLINE, |v| {
            is_event_for(v, "alert", "blocked_send", &remote)
        });
        let cookie = as_u64(&alert["cookie"]).to_string();
        let (code, action) =
            kill(&["--pid", &server.pid.to_string(), "--cookie", &cookie, "--mode", mode]);
        assert_eq!((code, action["result"].as_str()), (Some(0), Some("ok")), "{mode}: {action}");
        let done = closed(&mut server, &accepted);
        assert_eq!(done["how"], "error", "{mode}: {done}");
        let errno = done["errno"].as_u64().unwrap();
        assert!([EPIPE, ECONNABORTED].contains(&errno), "{mode}: write failed with {errno}");
        let seen = client_sees(&mut client);
        match mode {
            "shutdown" => assert_eq!(seen.unwrap(), 0, "FIN after the backlog"),
            _ => assert_eq!(seen.map_err(|e| e.kind()).unwrap_err(), ErrorKind::ConnectionReset),
        }
    }
}

#[test]
fn a_wrong_cookie_is_refused_and_the_connection_survives() {
    let IdleConnection { server, mut client, accepted, cookie, .. } = idle_connection();
    let cookie: u64 = cookie.parse().unwrap();
    let pid = server.pid.to_string();
    for mode in ["destroy", "shutdown"] {
        let wrong = (cookie + 1_000_000).to_string();
        let (code, action) = kill(&["--pid", &pid, "--cookie", &wrong, "--mode", mode]);
        assert_eq!((code, action["result"].as_str()), (Some(1), Some("already_gone")), "{action}");
        assert!(action["error"].as_str().unwrap().contains("nothing was touched"), "{action}");
        // Right addresses, wrong cookie: still refused.
        let (code, action) = kill(&[
            "--pid",
            &pid,
            "--cookie",
            &wrong,
            "--local",
            accepted["local"].as_str().unwrap(),
            "--remote",
            &remote_of(&client),
            "--mode",
            mode,
        ]);
        assert_eq!((code, action["result"].as_str()), (Some(1), Some("already_gone")), "{action}");
    }
    // Another process does not hold it either.
    let other = Server::start(&[]);
    let (code, action) = kill(&["--pid", &other.pid.to_string(), "--cookie", &cookie.to_string()]);
    assert_eq!((code, action["result"].as_str()), (Some(1), Some("already_gone")), "{action}");
    still_echoes(&mut client);
}

#[test]
fn dry_run_checks_everything_and_changes_nothing() {
    let IdleConnection { server, mut client, cookie, .. } = idle_connection();
    for mode in ["destroy", "shutdown"] {
        let (code, action) = kill(&[
            "--pid",
            &server.pid.to_string(),
            "--cookie",
            &cookie,
            "--mode",
            mode,
            "--dry-run",
        ]);
        assert_eq!(
            (code, action["result"].as_str(), action["dry_run"].as_bool()),
            (Some(0), Some("ok"), Some(true))
        );
    }
    still_echoes(&mut client);
}

#[test]
fn listening_sockets_and_missing_processes_are_refused() {
    let mut server = Server::start(&[]);
    let listen = server.addr.to_string();
    let (code, action) =
        kill(&["--pid", &server.pid.to_string(), "--local", &listen, "--remote", "0.0.0.0:0"]);
    assert_eq!((code, action["result"].as_str()), (Some(1), Some("failed")), "{action}");
    assert!(action["error"].as_str().unwrap().contains("listening socket"), "{action}");
    let (mut client, _) = server.connect();
    still_echoes(&mut client);

    let (code, action) = kill(&["--pid", "999999", "--cookie", "1"]);
    assert_eq!((code, action["result"].as_str()), (Some(1), Some("already_gone")), "{action}");
}

#[test]
fn destroy_works_in_the_target_network_namespace() {
    let net = NetPair::create();
    let listen = format!("{SERVER_IP}:0");
    let mut server = Server::start_in(Some(&net.server), &["--listen", &listen]);
    let mut client = net.connect(server.addr);
    let accepted = server.accepted(&client);
    let (code, action) = kill_by_addresses(&server, &accepted, &client);
    assert_eq!((code, action["result"].as_str()), (Some(0), Some("ok")), "{action}");
    let netns = std::fs::metadata(format!("/proc/{}/ns/net", server.pid)).unwrap();
    assert_eq!(as_u64(&action["netns"]), std::os::unix::fs::MetadataExt::ino(&netns), "{action}");
    assert_eq!(closed(&mut server, &accepted)["errno"], ECONNABORTED);
    assert_eq!(
        client_sees(&mut client).map_err(|e| e.kind()).unwrap_err(),
        ErrorKind::ConnectionReset
    );
}

/// An agent that ends `server`'s connections once idle for a second, by `mode`, with `extra`.
fn acting_on_idle(server: &Server, mode: &str, extra: &[&str]) -> Agent {
    let mut args = vec!["--idle-timeout", "1s", "--action", mode, "--action-on", "idle"];
    args.extend_from_slice(&["--stats-interval", "200ms"]);
    args.extend_from_slice(extra);
    start_agent(&[server.pid], &args)
}

#[test]
fn policy_acts_once_per_connection_within_the_rate_limit() {
    let mut server = Server::start(&[]);
    let mut agent = acting_on_idle(&server, "shutdown", &["--max-actions-per-minute", "2"]);
    let mut clients: Vec<TcpStream> = (0..4).map(|_| server.connect().0).collect();
    let remotes: Vec<String> = clients.iter().map(remote_of).collect();
    for remote in &remotes {
        agent.wait_for("idle alert", DEADLINE, |v| is_event_for(v, "alert", "idle", remote));
    }
    let actions = |agent: &Agent| -> Vec<Value> {
        agent.out.seen.iter().filter(|v| v["event"] == "action").cloned().collect()
    };
    agent.out.wait_count("actions", DEADLINE, 2, |v| v["event"] == "action").unwrap();
    // Several more polls: the limit holds and nothing is acted on twice.
    agent.settle(DEADLINE);
    agent.settle(DEADLINE);
    let done = actions(&agent);
    assert_eq!(done.len(), 2, "rate limit of 2 per minute: {done:?}");
    for action in &done {
        assert_eq!(
            (action["result"].as_str(), action["reason"].as_str()),
            (Some("ok"), Some("idle")),
            "{action}"
        );
        assert_eq!(
            (action["action"].as_str(), action["dry_run"].as_bool()),
            (Some("shutdown"), Some(false))
        );
    }
    let ended: Vec<&str> = done.iter().map(|a| a["remote"].as_str().unwrap()).collect();
    for (client, remote) in clients.iter_mut().zip(&remotes) {
        if ended.contains(&remote.as_str()) {
            assert_eq!(client_sees(client).unwrap(), 0, "{remote} was shut down");
        } else {
            still_echoes(client);
        }
    }
}

#[test]
fn policy_dry_run_reports_each_connection_once_and_changes_nothing() {
    let mut server = Server::start(&[]);
    let mut agent = acting_on_idle(&server, "destroy", &["--dry-run"]);
    let (mut a, _) = server.connect();
    let (mut b, _) = server.connect();
    for client in [&a, &b] {
        let remote = remote_of(client);
        let action = agent.wait_for("dry-run action", DEADLINE, |v| {
            v["event"] == "action" && v["remote"] == remote
        });
        assert_eq!(
            (action["dry_run"].as_bool(), action["result"].as_str()),
            (Some(true), Some("ok")),
            "{action}"
        );
    }
    agent.settle(DEADLINE);
    agent.settle(DEADLINE);
    let count = agent.out.seen.iter().filter(|v| v["event"] == "action").count();
    assert_eq!(count, 2, "each connection reported once");
    still_echoes(&mut a);
    still_echoes(&mut b);
}

#[test]
fn both_modes_end_a_connect_that_gets_no_answer_and_the_caller_sees_it_fail() {
    // destroy aborts the attempt; shutdown, on the caller's own fd, disconnects it.
    for (mode, errno) in [("destroy", ECONNABORTED), ("shutdown", libc::ECONNRESET as u64)] {
        let go = stalls::go_file();
        let (users, _filler) = stalls::full_listener(600_000, &go);
        let flags = ["--action", mode, "--action-on", "connect_stalled", "--connect-timeout", "1s"];
        let (mut caller, pid, mut agent, connecting) =
            stalls::watched_client(None, &[users.addr], &flags, &go);
        let remote = users.addr.to_string();
        let action = agent.wait_for("action", DEADLINE, |v| v["event"] == "action");
        assert_eq!(
            (action["result"].as_str(), action["reason"].as_str(), action["state"].as_str()),
            (Some("ok"), Some("connect_stalled"), Some("SYN_SENT")),
            "{action}"
        );
        assert_eq!(as_u64(&action["pid"]), u64::from(pid), "{action}");
        assert_eq!(action["fd"], connecting[0]["fd"], "{action}");
        // The thread blocked in connect() is released.
        let failed = caller.wait_for("connect failed", |v| {
            v["event"] == "connect_failed" && v["remote"] == remote
        });
        assert_eq!(as_u64(&failed["errno"]), errno, "{mode}: {failed}");
    }
}

#[test]
fn an_orphan_that_cannot_close_is_destroyed_and_shutdown_says_it_has_no_fd() {
    let mut server = Server::start(&["--mode", "large-response"]);
    // Both agents watch from before the connection: one shuts down at once, one destroys later.
    let acting = |mode, after| {
        let flags = ["--action", mode, "--action-on", "closing_stalled", "--action-after", after];
        let mut flags = flags.to_vec();
        flags.extend(["--closing-timeout", "1s"]);
        start_agent(&[server.pid], &flags)
    };
    let mut shutting = acting("shutdown", "0s");
    let mut destroying = acting("destroy", "1s");
    let stuck = stalls::non_reader(server.addr);
    let accepted = server.accepted(&stuck);
    server.scenario.wait_for("closed", |v| v["event"] == "closed" && v["fd"] == accepted["fd"]);
    let remote = remote_of(&stuck);

    // shutdown needs the holder's fd, and the application closed it: it says so.
    let refused = shutting.wait_for("action", DEADLINE, |v| v["event"] == "action");
    assert_eq!(refused["result"], "unsupported", "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("orphan"), "{refused}");
    assert_eq!((refused["remote"].as_str(), refused["fd"].is_null()), (Some(&*remote), true));

    // destroy needs none: the socket is gone, with its buffers.
    let done = destroying.wait_for("action", DEADLINE, |v| v["event"] == "action");
    assert_eq!((done["result"].as_str(), done["remote"].as_str()), (Some("ok"), Some(&*remote)));
    assert_eq!(as_u64(&done["pid"]), u64::from(server.pid), "named by its former holder: {done}");
    for agent in [&mut destroying, &mut shutting] {
        let clear = agent.wait_for("cleared", DEADLINE, |v| {
            is_event_for(v, "alert_cleared", "closing_stalled", &remote)
        });
        assert_eq!(clear["why"], "socket_closed", "{clear}");
    }
}

#[test]
fn kill_ends_an_orphan_only_when_named_by_cookie_and_both_addresses() {
    let mut server = Server::start(&["--mode", "large-response"]);
    let mut agent =
        start_agent(&[server.pid], &["--closing-timeout", "1s", "--stats-interval", "200ms"]);
    let stuck = stalls::non_reader(server.addr);
    let accepted = server.accepted(&stuck);
    server.scenario.wait_for("closed", |v| v["event"] == "closed" && v["fd"] == accepted["fd"]);
    let remote = remote_of(&stuck);
    let alert = agent.wait_for("closing_stalled alert", DEADLINE, |v| {
        is_event_for(v, "alert", "closing_stalled", &remote)
    });
    assert!(alert["fd"].is_null(), "an orphan: {alert}");
    // What the alert gives is what a user passes on.
    let pid = as_u64(&alert["pid"]).to_string();
    let cookie = as_u64(&alert["cookie"]).to_string();
    let local = alert["local"].as_str().unwrap();
    let exact = ["--pid", &pid, "--cookie", &cookie, "--local", local, "--remote", &remote];

    // The cookie alone no longer ties an orphan to the process: refused, untouched.
    let (code, refused) = kill(&["--pid", &pid, "--cookie", &cookie]);
    assert_ne!(code, Some(0), "{refused}");
    assert_eq!(refused["result"], "failed", "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("--remote together"), "{refused}");
    // shutdown needs an fd the application no longer has; a dry run changes nothing either.
    let (code, unsupported) = kill(&[&exact[..], &["--mode", "shutdown"]].concat());
    assert_ne!(code, Some(0), "{unsupported}");
    assert_eq!(unsupported["result"], "unsupported", "{unsupported}");
    let (code, checked) = kill(&[&exact[..], &["--dry-run"]].concat());
    assert_eq!((code, checked["result"].as_str()), (Some(0), Some("ok")), "{checked}");
    assert!(checked["fd"].is_null() && checked["cookie"] == alert["cookie"], "{checked}");
    agent.settle(DEADLINE);
    assert!(
        !agent.out.seen.iter().any(|v| is_event_for(
            v,
            "alert_cleared",
            "closing_stalled",
            &remote
        )),
        "the orphan was touched before it was destroyed"
    );

    let (code, done) = kill(&exact);
    assert_eq!((code, done["result"].as_str()), (Some(0), Some("ok")), "{done}");
    let clear = agent.wait_for("cleared", DEADLINE, |v| {
        is_event_for(v, "alert_cleared", "closing_stalled", &remote)
    });
    assert_eq!(clear["why"], "socket_closed", "{clear}");
}
