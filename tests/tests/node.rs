//! Node mode (`watch --all-namespaces`), as a DaemonSet runs observer on every node: every
//! network namespace of the machine, those created after the start too; each alert saying where
//! its socket lives (netns, container, pod); actions taken in the socket's own namespace; and
//! the agent in a container with the DaemonSet's capabilities, seccomp profile and mounts.
use std::{
    net::{SocketAddr, TcpStream},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use observer_tests::{
    Agent, Scenario, Server, as_u64, is_event_for,
    kubepods::FakeNode,
    netns::{NetPair, SERVER_IP},
    podman::{DAEMONSET_CAPABILITIES, LIMITS, Pod, observer_image, podman, testbed_image},
    public_copy, remote_of, scenario_bin, start_agent,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(30);

/// Each test's servers listen on a port of its own, inside namespaces of the test's own: the
/// node agents of tests running side by side (each watching every namespace) then never see,
/// let alone act on, each other's connections.
mod port {
    pub const NEW_NAMESPACES: u16 = 47121;
    pub const ACTION: u16 = 47122;
    pub const PODS: u16 = 47123;
    pub const PODMAN: u16 = 47124;
    pub const CONTAINER: u16 = 47125;
}

/// The inode of the network namespace of `pid`, as `ls -L -i /proc/PID/ns/net` shows it.
fn netns_of(pid: u32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino()
}

/// A server in the server side of a namespace pair, and a client connected from the other side.
struct IdlePair {
    server: Server,
    client: TcpStream,
    accepted: Value,
    // Dropped last: the namespaces outlive the processes in them.
    _net: NetPair,
}

impl IdlePair {
    fn create(port: u16) -> IdlePair {
        IdlePair::create_with(port, &[])
    }

    /// With `wrapper` between `ip netns exec` and the scenario (e.g. `setpriv ...`).
    fn create_with(port: u16, wrapper: &[&str]) -> IdlePair {
        let net = NetPair::create();
        let listen = format!("{SERVER_IP}:{port}");
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &net.server]).args(wrapper);
        let binary = if wrapper.is_empty() { scenario_bin() } else { public_copy(&scenario_bin()) };
        command.arg(binary).args(["thread-per-connection", "--listen", &listen]);
        let mut server = Server::of(Scenario::start_command(command));
        let client = net.connect(server.addr);
        let accepted = server.accepted(&client);
        IdlePair { server, client, accepted, _net: net }
    }

    fn connect(&mut self) -> (TcpStream, Value) {
        let client = self._net.connect(self.server.addr);
        let accepted = self.server.accepted(&client);
        (client, accepted)
    }
}

/// `watch --all-namespaces` on the host, for connections on `port`, idle after a second.
fn node_agent(port: u16, extra: &[&str]) -> Agent {
    let port = port.to_string();
    let mut args = vec!["--all-namespaces", "--port", &port, "--stats-interval", "500ms"];
    args.extend_from_slice(extra);
    if !extra.contains(&"--config") {
        args.extend_from_slice(&["--idle-timeout", "1s"]);
    }
    start_agent(&[], &args)
}

fn idle_alert(agent: &mut Agent, client: &TcpStream) -> Value {
    let remote = remote_of(client);
    agent.wait_for("idle alert", DEADLINE, |v| is_event_for(v, "alert", "idle", &remote))
}

/// The alert names the server process (by the agent's pid numbering) and its namespace.
fn assert_held_by(alert: &Value, pid: u32, accepted: &Value) {
    assert_eq!(as_u64(&alert["pid"]), u64::from(pid), "{alert}");
    assert_eq!(alert["fd"], accepted["fd"], "{alert}");
    assert_eq!(as_u64(&alert["netns"]), netns_of(pid), "{alert}");
}

fn assert_stopped_cleanly(agent: &mut Agent) {
    assert!(agent.stop().success(), "{}", agent.out.dump());
    let stderr = agent.stderr_text();
    assert!(!stderr.contains("poll failed"), "{stderr}");
}

#[test]
fn every_namespace_is_watched_those_created_later_too_and_vanished_ones_are_dropped() {
    let first = IdlePair::create(port::NEW_NAMESPACES);
    let mut agent = node_agent(port::NEW_NAMESPACES, &[]);
    let alert = idle_alert(&mut agent, &first.client);
    assert_held_by(&alert, first.server.pid, &first.accepted);

    // Namespaces created after the agent started are read from its next poll on.
    let mut second = IdlePair::create(port::NEW_NAMESPACES);
    let alert = idle_alert(&mut agent, &second.client);
    assert_held_by(&alert, second.server.pid, &second.accepted);
    assert_ne!(netns_of(first.server.pid), netns_of(second.server.pid));

    // The first pair's namespaces vanish with their processes: no error, the rest still works.
    let gone = first.server.pid;
    drop(first);
    agent.settle(DEADLINE);
    agent.settle(DEADLINE);
    let (client, accepted) = second.connect();
    let alert = idle_alert(&mut agent, &client);
    assert_held_by(&alert, second.server.pid, &accepted);
    let cleared = agent.out.seen.iter().any(|v| v["event"] == "alert_cleared" && v["pid"] == gone);
    assert!(cleared, "the vanished server's alert was cleared: {}", agent.out.dump());
    assert_stopped_cleanly(&mut agent);
}

#[test]
fn actions_end_connections_in_their_own_namespace() {
    let mut pair = IdlePair::create(port::ACTION);
    let mut agent = node_agent(port::ACTION, &["--action", "destroy", "--action-on", "idle"]);
    let alert = idle_alert(&mut agent, &pair.client);
    let action = agent
        .wait_for("action", DEADLINE, |v| v["event"] == "action" && v["cookie"] == alert["cookie"]);
    assert_eq!(
        (action["result"].as_str(), action["action"].as_str()),
        (Some("ok"), Some("destroy"))
    );
    assert_eq!(action["netns"], alert["netns"], "{action}");
    let fd = pair.accepted["fd"].clone();
    let closed =
        pair.server.scenario.wait_for("worker done", |v| v["event"] == "closed" && v["fd"] == fd);
    assert_eq!(closed["errno"], libc::ECONNABORTED, "{closed}");
}

/// A policy that alerts only the pods it names, within a second.
fn pods_policy(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("observer.toml");
    let text = "[defaults]\nidle_timeout = \"1h\"\n\n[[rule]]\nname = \"shop web\"\n\
                namespace = \"shop\"\npod = \"web-*\"\nidle_timeout = \"1s\"\n";
    std::fs::write(&path, text).unwrap();
    path
}

fn assert_in_pod(alert: &Value, container: &observer_tests::kubepods::FakeContainer) {
    assert_eq!(alert["container_id"], container.container_id.as_str(), "{alert}");
    assert_eq!(alert["pod_uid"], container.pod_uid.as_str(), "{alert}");
    assert_eq!(alert["pod"], container.pod.as_str(), "{alert}");
    assert_eq!(alert["namespace"], container.namespace.as_str(), "{alert}");
    assert_eq!(alert["node"], "node-1", "{alert}");
    assert_eq!(alert["policy_rule"], "shop web", "the policy matched the pod: {alert}");
}

#[test]
fn pods_are_named_from_their_cgroup_and_the_pod_log_directory() {
    let mut node = FakeNode::create();
    let web = node.add_pod("shop", "web-7d9f8c6b5-x2x9q");
    let mut pair = IdlePair::create(port::PODS);
    node.adopt(&web, pair.server.pid);
    let policy = pods_policy(&node.pod_logs);
    let logs = node.pod_logs.display().to_string();
    let config = policy.display().to_string();
    let mut agent = node_agent(
        port::PODS,
        &["--pod-logs", &logs, "--node-name", "node-1", "--config", &config],
    );
    let (client, accepted) = pair.connect();
    let alert = idle_alert(&mut agent, &client);
    assert_held_by(&alert, pair.server.pid, &accepted);
    assert_in_pod(&alert, &web);
    // Every socket of the process is in its pod, the one connected before it joined too.
    let first = idle_alert(&mut agent, &pair.client);
    assert_eq!(first["pod"], alert["pod"], "{first}");
}

#[test]
fn a_sidecar_names_its_own_pod_from_the_downward_api() {
    let mut server = Server::start(&[]);
    let args = observer_tests::watch_args(&[server.pid], &["--idle-timeout", "1s"]);
    let mut command = Command::new(observer_tests::observer_bin());
    command.args(&args);
    for (name, value) in [("POD_NAME", "web-0"), ("POD_NAMESPACE", "shop"), ("NODE_NAME", "node-1")]
    {
        command.env(name, value);
    }
    let mut agent = Agent::start_command(command, Some(&observer_tests::observer_bin()));
    let started = agent.out.seen[0].clone();
    assert_eq!(
        (started["pod"].as_str(), started["node"].as_str()),
        (Some("web-0"), Some("node-1"))
    );
    let (client, accepted) = server.connect();
    let alert = idle_alert(&mut agent, &client);
    assert_held_by(&alert, server.pid, &accepted);
    assert_eq!((alert["pod"].as_str(), alert["namespace"].as_str()), (Some("web-0"), Some("shop")));
    assert_eq!(alert["node"], "node-1");
    assert!(alert.get("pod_uid").is_none(), "no cgroup names a pod here: {alert}");
}

/// `podman inspect --format FORMAT NAME`.
fn inspect(name: &str, format: &str) -> String {
    let out = podman().args(["inspect", "--format", format, name]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn a_containers_connection_carries_the_id_podman_reports() {
    let mut pod = Pod::create();
    let listen = format!("127.0.0.1:{}", port::PODMAN);
    let mut command = podman();
    command.args(pod.join("server")).args([
        testbed_image(),
        "/bin/scenario",
        "thread-per-connection",
        "--listen",
        &listen,
    ]);
    let mut server = Server::of(Scenario::start_command(command));
    let name = format!("{}-server", pod.name);
    let host_pid: u32 = inspect(&name, "{{.State.Pid}}").parse().unwrap();
    let mut agent = node_agent(port::PODMAN, &[]);
    let addr: SocketAddr = listen.parse().unwrap();
    let client = pod.connect(addr);
    let accepted = server.accepted(&client);
    let alert = idle_alert(&mut agent, &client);
    // Host numbering: the agent runs outside the pod's pid namespace.
    assert_held_by(&alert, host_pid, &accepted);
    assert_eq!(alert["container_id"], inspect(&name, "{{.Id}}"), "{alert}");
    assert!(alert.get("pod_uid").is_none(), "podman pods are no Kubernetes pods: {alert}");
}

/// A container removed (by name) when dropped: killing `podman run` leaves it running.
struct Removed(String);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "--force", "--time", "0", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn the_daemonsets_privileges_and_mounts_are_enough() {
    // A pod's server of another user (pods rarely run as root), in a namespace of its own and
    // a pod's cgroup; the agent in a container as the DaemonSet runs it: the host's pids, its
    // own network, read-only root, every capability dropped but six, observer's seccomp
    // profile, and the pod logs mounted read-only: nothing else of the host.
    let mut node = FakeNode::create();
    let web = node.add_pod("shop", "web-0");
    let nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"];
    let mut pair = IdlePair::create_with(port::CONTAINER, &nobody);
    node.adopt(&web, pair.server.pid);
    let policy = pods_policy(&node.pod_logs);
    let seccomp = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/seccomp.json");
    let name = format!("obs{}-node-agent", std::process::id());
    let _removed = Removed(name.clone());
    let mut command = podman();
    command
        .args(["run", "--rm", "--name", &name, "--pid", "host", "--network", "none", "--read-only"])
        .args(LIMITS)
        .args([
            "--cap-drop",
            "ALL",
            "--cap-add",
            &DAEMONSET_CAPABILITIES.join(","),
            "--security-opt",
        ])
        .arg(format!("seccomp={}", seccomp.display()))
        .arg("--volume")
        .arg(format!("{}:/var/log/pods:ro", node.pod_logs.display()))
        .arg("--volume")
        .arg(format!("{}:/etc/observer/observer.toml:ro", policy.display()))
        .args(["--env", "RUST_LOG=info", "--env", "NODE_NAME=node-1"])
        .arg(observer_image())
        .args(["watch", "--all-namespaces", "--port", &port::CONTAINER.to_string()])
        .args(["--config", "/etc/observer/observer.toml", "--poll-interval", "250ms"])
        .args(["--action", "destroy", "--action-on", "idle"]);
    let mut agent = Agent::start_command(command, None);
    let (client, accepted) = pair.connect();
    let alert = idle_alert(&mut agent, &client);
    assert_held_by(&alert, pair.server.pid, &accepted);
    assert_eq!(alert["comm"], "scenario", "{alert}");
    assert_in_pod(&alert, &web);
    let action = agent
        .wait_for("action", DEADLINE, |v| v["event"] == "action" && v["cookie"] == alert["cookie"]);
    assert_eq!(action["result"], "ok", "destroyed in the pod's namespace: {action}");
    let fd = accepted["fd"].clone();
    let closed =
        pair.server.scenario.wait_for("worker done", |v| v["event"] == "closed" && v["fd"] == fd);
    assert_eq!(closed["errno"], libc::ECONNABORTED, "{closed}");
}
