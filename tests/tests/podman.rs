//! observer as users deploy it beside a server: the `observer` image `cargo xtask image` builds,
//! run by podman as a sidecar in a pod (a holder container owns the pid and network
//! namespaces, as Kubernetes' pause container does), with every capability dropped but the four
//! it needs and its own seccomp profile.
use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use observer_tests::{
    Agent, Scenario, Server, as_u64, is_event_for,
    podman::{Pod, observer_image, podman, testbed_image},
    remote_of,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(30);
const PORT: u16 = 8080;
/// The server's name in the pod, as its /proc/PID/comm shows it.
const SERVER: &str = "web";

fn seccomp_profile() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/seccomp.json")
}

/// What the README tells users to grant a sidecar.
fn least_privilege() -> Vec<String> {
    let profile = format!("seccomp={}", seccomp_profile().display());
    ["--cap-drop", "ALL", "--cap-add", "BPF,PERFMON,SYS_PTRACE,NET_ADMIN", "--security-opt"]
        .into_iter()
        .map(str::to_owned)
        .chain([profile])
        .collect()
}

/// The scenario server in the pod, listening on the pod's loopback.
fn start_server(pod: &mut Pod) -> Server {
    let listen = format!("127.0.0.1:{PORT}");
    let mut command = podman();
    command.args(pod.join("server")).args([testbed_image(), "/bin/scenario"]).args([
        "thread-per-connection",
        "--listen",
        &listen,
        "--name",
        SERVER,
        "--mode",
        "http",
    ]);
    Server::of(Scenario::start_command(command))
}

/// The observer image as a sidecar in the pod, with `privileges` and `watch <args>`.
fn start_sidecar(pod: &mut Pod, privileges: &[String], args: &[&str]) -> Agent {
    let mut command = podman();
    command
        .args(pod.join("observer"))
        .args(["--env", "RUST_LOG=info"])
        .args(privileges)
        .arg(observer_image())
        .arg("watch")
        .args(args);
    Agent::start_command(command, None)
}

fn connect(pod: &Pod, server: &mut Server) -> (TcpStream, Value) {
    let addr: SocketAddr = format!("127.0.0.1:{PORT}").parse().unwrap();
    let client = pod.connect(addr);
    let accepted = server.accepted(&client);
    (client, accepted)
}

fn alert(agent: &mut Agent, reason: &str, client: &TcpStream) -> Value {
    let remote = remote_of(client);
    agent.wait_for(&format!("{reason} alert"), DEADLINE, |v| {
        is_event_for(v, "alert", reason, &remote)
    })
}

fn assert_held_by(alert: &Value, server: &Server, accepted: &Value) {
    assert_eq!(as_u64(&alert["pid"]), u64::from(server.pid), "the pod's own pid: {alert}");
    assert_eq!(alert["comm"], SERVER, "{alert}");
    assert_eq!(alert["fd"], accepted["fd"], "{alert}");
}

/// Sends a request header a byte at a time, never finishing it, until stopped.
fn slow_loris(mut conn: TcpStream, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let header = b"GET / HTTP/1.1\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        for byte in header.iter().cycle() {
            if stop.load(Ordering::Relaxed) || conn.write_all(&[*byte]).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(300));
        }
    })
}

#[test]
fn a_least_privilege_sidecar_alerts_and_ends_the_servers_stuck_connections_across_a_restart() {
    let mut pod = Pod::create();
    let mut server = start_server(&mut pod);
    let mut agent = start_sidecar(
        &mut pod,
        &least_privilege(),
        &[
            "--comm",
            SERVER,
            "--poll-interval",
            "250ms",
            "--idle-timeout",
            "2s",
            "--slow-after",
            "3s",
            "--action",
            "shutdown",
            "--action-on",
            "idle",
        ],
    );

    // A client that connected and went silent: alerted, then shut down, freeing its worker.
    let (idle, accepted) = connect(&pod, &mut server);
    let raised = alert(&mut agent, "idle", &idle);
    assert_held_by(&raised, &server, &accepted);
    let action = agent.wait_for("action", DEADLINE, |v| {
        v["event"] == "action" && v["cookie"] == raised["cookie"]
    });
    assert_eq!(
        (action["action"].as_str(), action["result"].as_str()),
        (Some("shutdown"), Some("ok"))
    );
    let fd = accepted["fd"].clone();
    let closed =
        server.scenario.wait_for("worker freed", |v| v["event"] == "closed" && v["fd"] == fd);
    assert_eq!(closed["how"], "eof", "{closed}");

    // A slow-loris client: never idle, never done.
    let (loris, accepted) = connect(&pod, &mut server);
    let stop = Arc::new(AtomicBool::new(false));
    let trickle = slow_loris(loris.try_clone().unwrap(), stop.clone());
    let slow = alert(&mut agent, "slow_transfer", &loris);
    assert_held_by(&slow, &server, &accepted);
    stop.store(true, Ordering::Relaxed);
    trickle.join().unwrap();
    drop(loris);

    // The server container is replaced: the sidecar, still running, follows the new server.
    let old = server.pid;
    pod.remove("server");
    agent.wait_for("target_exited", DEADLINE, |v| v["event"] == "target_exited" && v["pid"] == old);
    let mut server = start_server(&mut pod);
    agent.wait_for("target_started", DEADLINE, |v| {
        v["event"] == "target_started" && v["pid"] == server.pid && v["comm"] == SERVER
    });
    let (idle, accepted) = connect(&pod, &mut server);
    let raised = alert(&mut agent, "idle", &idle);
    assert_held_by(&raised, &server, &accepted);
}

#[test]
fn a_privileged_sidecar_works_too() {
    let mut pod = Pod::create();
    let mut server = start_server(&mut pod);
    let privileged = ["--privileged".to_owned()];
    let mut agent =
        start_sidecar(&mut pod, &privileged, &["--comm", SERVER, "--idle-timeout", "2s"]);
    let (idle, accepted) = connect(&pod, &mut server);
    let raised = alert(&mut agent, "idle", &idle);
    assert_held_by(&raised, &server, &accepted);
}

#[test]
fn the_runtimes_default_seccomp_profile_is_named_as_what_to_change() {
    let mut pod = Pod::create();
    let caps = ["--cap-drop", "ALL", "--cap-add", "BPF,PERFMON,SYS_PTRACE,NET_ADMIN"];
    for command in ["check", "watch"] {
        let out = podman()
            .args(pod.join(command))
            .args(caps)
            .arg(observer_image())
            .arg(command)
            .output()
            .expect("run podman");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command}: {stderr}");
        if command == "check" {
            let report: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(report["ready"], false, "{report}");
            assert_eq!(report["seccomp"]["refuses"][0], "bpf", "{report}");
            assert!(report["problems"][0].as_str().unwrap().contains("deploy/seccomp.json"));
        } else {
            assert!(out.stdout.is_empty());
            let error = stderr.lines().find(|l| l.contains("error")).unwrap_or_default();
            assert!(error.contains("seccomp") && error.contains("deploy/seccomp.json"), "{stderr}");
        }
    }
}
