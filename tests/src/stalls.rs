//! Set-ups for the stalls at either end of a connection: a connect() that gets no answer and a
//! close that cannot finish.
use std::net::{SocketAddr, TcpStream};

use serde_json::Value;

use crate::{Agent, Scenario, Server, as_u64, start_agent};

/// A server whose accept queue (backlog 0: one connection) is already full when the test
/// connects: further SYNs are dropped until it accepts, after `accept_delay_ms`.
pub fn full_listener(accept_delay_ms: u64) -> (Server, TcpStream) {
    let delay = accept_delay_ms.to_string();
    let server = Server::start(&["--backlog", "0", "--accept-delay-ms", &delay]);
    let filler = TcpStream::connect(server.addr).unwrap();
    (server, filler)
}

/// A watched `scenario client` connecting to each of `targets`: the agent (with `flags`) is
/// in place before the first SYN. Returns them with the client's `connecting` reports.
pub fn watched_client(
    netns: Option<&str>,
    targets: &[SocketAddr],
    flags: &[&str],
) -> (Scenario, u32, Agent, Vec<Value>) {
    let go =
        std::env::temp_dir().join(format!("observer-go-{}-{}", std::process::id(), targets[0]));
    let _ = std::fs::remove_file(&go);
    let mut args = vec!["client".to_owned(), "--go-file".into(), go.display().to_string()];
    for t in targets {
        args.extend(["--connect".to_owned(), t.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut scenario = Scenario::start_in(netns, &args);
    let pid = as_u64(&scenario.wait_for("started", |v| v["event"] == "started")["pid"]) as u32;
    let agent = start_agent(&[pid], flags);
    std::fs::write(&go, b"go").unwrap();
    let connecting = targets
        .iter()
        .map(|t| {
            let remote = t.to_string();
            scenario.wait_for("connecting", |v| v["event"] == "connecting" && v["remote"] == remote)
        })
        .collect();
    let _ = std::fs::remove_file(&go);
    (scenario, pid, agent, connecting)
}

/// A client that will not read: its receive buffer fills and its window closes.
pub fn non_reader(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).unwrap()
}
