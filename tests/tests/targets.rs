//! Which processes are watched as they come and go: by name across a restart, and by pid
//! together with the children a server forks per connection.
use std::{net::TcpStream, time::Duration};

use observer_tests::{Agent, Server, as_u64, is_event_for, remote_of, start_agent};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(25);

fn idle_alert(agent: &mut Agent, client: &TcpStream) -> Value {
    let remote = remote_of(client);
    agent.wait_for("idle alert", DEADLINE, |v| is_event_for(v, "alert", "idle", &remote))
}

#[test]
fn comm_follows_a_server_through_a_restart() {
    let name = "srv-restart";
    let mut first = Server::start(&["--name", name]);
    let mut agent = start_agent(&[], &["--comm", name, "--idle-timeout", "1s"]);
    let (client, _) = first.connect();
    let alert = idle_alert(&mut agent, &client);
    assert_eq!((as_u64(&alert["pid"]), alert["comm"].as_str()), (u64::from(first.pid), Some(name)));

    let old = first.pid;
    first.scenario.kill();
    agent.wait_for("target_exited", DEADLINE, |v| v["event"] == "target_exited" && v["pid"] == old);
    // Nothing of that name runs now; the agent keeps watching for one.
    let mut second = Server::start(&["--name", name]);
    let new = second.pid;
    agent.wait_for("target_started", DEADLINE, |v| {
        v["event"] == "target_started" && v["pid"] == new && v["comm"] == name
    });
    let (client, accepted) = second.connect();
    let alert = idle_alert(&mut agent, &client);
    assert_eq!(as_u64(&alert["pid"]), u64::from(new), "{alert}");
    assert_eq!(alert["fd"], accepted["fd"], "{alert}");
    assert!(agent.out.seen.iter().all(|v| v["event"] != "stopped"), "the agent kept running");
}

#[test]
fn pid_watches_the_children_a_server_forks_per_connection() {
    let mut server = Server::start(&["--fork", "--name", "srv-fork"]);
    let mut agent = start_agent(&[server.pid], &["--idle-timeout", "1s", "--syscall-timing"]);
    let (client, accepted) = server.connect();
    let child = as_u64(&accepted["pid"]);
    assert_ne!(child, u64::from(server.pid), "served by a child process");
    let alert = idle_alert(&mut agent, &client);
    assert_eq!(as_u64(&alert["pid"]), child, "the child holds it: {alert}");
    assert_eq!(alert["fd"], accepted["fd"], "{alert}");
    let threads = alert["threads"].as_array().unwrap();
    assert!(threads.iter().any(|t| t["tid"] == accepted["tid"]), "the child's thread: {alert}");
    // The child ends with its connection: that is no reason to stop watching the server.
    drop(client);
    agent.wait_for("alert cleared", DEADLINE, |v| {
        v["event"] == "alert_cleared" && v["cookie"] == alert["cookie"]
    });
    assert!(agent.out.seen.iter().all(|v| v["event"] != "target_exited"), "{}", agent.out.dump());
}

#[test]
fn pid_only_leaves_what_the_server_forks_alone() {
    let mut server = Server::start(&["--fork", "--name", "srv-pidonly"]);
    let mut agent = start_agent(
        &[server.pid],
        &["--pid-only", "--idle-timeout", "1s", "--stats-interval", "200ms"],
    );
    let (client, _) = server.connect();
    // Three idle timeouts' worth of polls, then not one alert for the child's connection.
    for _ in 0..15 {
        agent.settle(DEADLINE);
    }
    let remote = remote_of(&client);
    let hits: Vec<&Value> =
        agent.out.seen.iter().filter(|v| is_event_for(v, "alert", "idle", &remote)).collect();
    assert!(hits.is_empty(), "--pid-only alerted a child's connection: {hits:?}");
}

#[test]
fn pid_of_a_pre_forking_server_from_debian_alerts_on_the_worker_holding_the_connection() {
    // nginx: the master listens and forks its workers at start; a worker accepts and holds
    // each connection. Watching the master's pid must cover them.
    let dir = std::env::temp_dir().join(format!("observer-test-nginx-{}", std::process::id()));
    let nginx = observer_tests::nginx::Nginx::start(&dir, 2).unwrap();
    let workers = nginx.workers();
    let mut agent = start_agent(&[nginx.pid()], &["--idle-timeout", "1s"]);
    agent.wait_for("started", DEADLINE, |v| v["event"] == "started");
    // A client that connects and never sends its request.
    let client = TcpStream::connect(("127.0.0.1", nginx.port)).unwrap();
    let alert = idle_alert(&mut agent, &client);
    let holder = as_u64(&alert["pid"]) as u32;
    assert!(workers.contains(&holder), "a worker {workers:?} holds it: {alert}");
    assert_eq!(alert["comm"], "nginx", "{alert}");
    assert!(alert["fd"].as_u64().is_some(), "{alert}");
    drop(nginx);
    let _ = std::fs::remove_dir_all(&dir);
}
