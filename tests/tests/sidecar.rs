//! Running observer the way a sidecar does: inside the server's pid namespace, which numbers
//! processes its own way, and with only the capabilities it needs, as another user.
use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::Duration,
};

use observer_tests::{
    Agent, Server, as_u64, is_event_for, observer_bin, public_copy, remote_of, require_root,
    watch_args,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(25);

/// Runs `observer <args>` through `setpriv` as uid/gid 65534 with exactly `caps` (ambient, as a
/// container runtime grants them), from a copy any user may run.
fn as_nobody_with(caps: &[&str]) -> Vec<String> {
    let list = caps.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(",");
    let set = format!("-all,{list}");
    ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
        .into_iter()
        .map(str::to_owned)
        .chain(["--inh-caps".into(), set.clone(), "--ambient-caps".into(), set])
        .collect()
}

/// The capabilities README states for watching another user's server and ending its connections.
const STATED: [&str; 5] = ["bpf", "perfmon", "sys_ptrace", "dac_read_search", "net_admin"];

fn run_as(wrapper: &[String], args: &[&str]) -> (Option<i32>, Vec<Value>, String) {
    require_root();
    let out = Command::new(&wrapper[0])
        .args(&wrapper[1..])
        .arg(public_copy(&observer_bin()))
        .args(args)
        .output()
        .expect("run setpriv");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    (out.status.code(), lines, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn idle_alert(agent: &mut Agent, client: &TcpStream) -> Value {
    let remote = remote_of(client);
    agent.wait_for("idle alert", DEADLINE, |v| is_event_for(v, "alert", "idle", &remote))
}

/// A thread-per-connection server alone in a new pid namespace, where it is pid 1.
fn server_in_own_pid_namespace(name: &str) -> Server {
    let wrapper = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"];
    Server::start_with(&wrapper, &["--name", name])
}

/// `observer <args>` entered into the pid (and mount, for its /proc) namespace of `host_pid`.
fn agent_beside(host_pid: u32, args: &[String]) -> Agent {
    let target = host_pid.to_string();
    let wrapper = ["nsenter", "--target", target.as_str(), "--pid", "--mount"];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::start_with(&wrapper, &observer_bin(), &args)
}

fn assert_sees_the_neighbour(agent: &mut Agent, server: &mut Server, name: &str) {
    let (mut client, accepted) = server.connect();
    // Data moves once, so the probes have something of this connection to record.
    client.write_all(b"hello\n").unwrap();
    let mut echo = [0u8; 6];
    client.read_exact(&mut echo).unwrap();
    let alert = idle_alert(agent, &client);
    // The namespace's own numbering, as `ps` beside the agent shows it.
    assert_eq!(as_u64(&alert["pid"]), u64::from(server.pid), "{alert}");
    assert_eq!(alert["comm"], name, "{alert}");
    assert_eq!(alert["fd"], accepted["fd"], "{alert}");
    let worker = alert["threads"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["tid"] == accepted["tid"]))
        .unwrap_or_else(|| panic!("worker {} not named: {alert}", accepted["tid"]));
    assert!(worker["blocked_in"].is_string(), "{alert}");
    // Timed by the probes: the ids they recorded are the namespace's.
    assert!(as_u64(&worker["blocked_ms"]) >= 1000, "{alert}");
    let stats = agent.wait_for("stats with a tracked socket", DEADLINE, |v| {
        v["event"] == "stats" && v["tracked"].as_u64().is_some_and(|n| n >= 1)
    });
    assert!(as_u64(&stats["probe_counters"]["sockets_tracked"]) >= 1, "{stats}");
}

#[test]
fn inside_a_pid_namespace_pid_selects_the_neighbour_with_its_own_numbering() {
    let mut server = server_in_own_pid_namespace("srv-pidns");
    assert_eq!(server.pid, 1, "the server is the namespace's first process");
    let host_pid = server.scenario.host_pid();
    assert_ne!(host_pid, 1);
    let args = watch_args(
        &[server.pid],
        &["--idle-timeout", "2s", "--syscall-timing", "--stats-interval", "300ms"],
    );
    let mut agent = agent_beside(host_pid, &args);
    assert_sees_the_neighbour(&mut agent, &mut server, "srv-pidns");
}

#[test]
fn inside_a_pid_namespace_comm_selects_the_neighbour_by_name() {
    let mut server = server_in_own_pid_namespace("srv-comm");
    let host_pid = server.scenario.host_pid();
    let args = watch_args(
        &[],
        &[
            "--comm",
            "srv-comm",
            "--idle-timeout",
            "2s",
            "--syscall-timing",
            "--stats-interval",
            "300ms",
        ],
    );
    let mut agent = agent_beside(host_pid, &args);
    agent.wait_for("target_started", DEADLINE, |v| {
        v["event"] == "target_started" && v["pid"] == 1 && v["comm"] == "srv-comm"
    });
    assert_sees_the_neighbour(&mut agent, &mut server, "srv-comm");
}

#[test]
fn as_another_user_the_stated_capabilities_are_enough_to_watch_and_end_connections() {
    let mut server = Server::start(&[]);
    let pid = server.pid.to_string();
    let nobody = as_nobody_with(&STATED);
    let (code, lines, stderr) = run_as(&nobody, &["check", "--pid", &pid]);
    assert_eq!(
        (code, lines[0]["ready"].as_bool()),
        (Some(0), Some(true)),
        "{stderr}\n{}",
        lines[0]
    );

    let args = watch_args(&[server.pid], &["--idle-timeout", "1s"]);
    let wrapper: Vec<&str> = nobody.iter().map(String::as_str).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Agent::start_with(&wrapper, &public_copy(&observer_bin()), &args);
    let (a, _) = server.connect();
    let (b, _) = server.connect();
    let cookie_a = as_u64(&idle_alert(&mut agent, &a)["cookie"]).to_string();
    let cookie_b = as_u64(&idle_alert(&mut agent, &b)["cookie"]).to_string();
    for (cookie, mode) in [(cookie_a, "shutdown"), (cookie_b, "destroy")] {
        let (code, lines, stderr) =
            run_as(&nobody, &["kill", "--pid", &pid, "--cookie", &cookie, "--mode", mode]);
        assert_eq!((code, lines[0]["result"].as_str()), (Some(0), Some("ok")), "{mode}: {stderr}");
    }
    server.scenario.wait_for("both workers freed", |v| v["event"] == "closed" && v["how"] == "eof");
    server
        .scenario
        .wait_for("both workers freed", |v| v["event"] == "closed" && v["how"] == "error");
}

#[test]
fn as_another_user_each_missing_capability_is_named_by_check_and_watch() {
    let server = Server::start(&[]);
    let pid = server.pid.to_string();
    for missing in STATED.iter().filter(|c| !["net_admin"].contains(c)) {
        let caps: Vec<&str> = STATED.iter().copied().filter(|c| c != missing).collect();
        let nobody = as_nobody_with(&caps);
        let name = format!("CAP_{}", missing.to_uppercase());
        let (code, lines, stderr) = run_as(&nobody, &["check", "--pid", &pid]);
        assert_eq!(code, Some(1), "check without {name}: {stderr}");
        assert_eq!(lines[0]["ready"], false);
        let problems = lines[0]["problems"].to_string();
        assert!(problems.contains(&name), "check without {name} does not name it: {problems}");

        let (code, lines, stderr) = run_as(&nobody, &["watch", "--pid", &pid]);
        assert_eq!(code, Some(1), "watch without {name}: {stderr}");
        assert!(lines.is_empty(), "nothing on stdout: {lines:?}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(&name), "watch without {name} does not name it: {stderr}");
    }
    // Ending a connection by destroying it is the one job that needs CAP_NET_ADMIN.
    let nobody = as_nobody_with(&STATED[..4]);
    let (code, lines, _) = run_as(&nobody, &["kill", "--pid", &pid, "--cookie", "1"]);
    assert_eq!((code, lines[0]["result"].as_str()), (Some(1), Some("not_permitted")));
    assert!(lines[0]["error"].as_str().unwrap().contains("CAP_NET_ADMIN"), "{}", lines[0]);
}
