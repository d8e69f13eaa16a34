//! Set-ups for the stalls at either end of a connection: a connect() that gets no answer and a
//! close that cannot finish.
use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use serde_json::Value;

use crate::{Agent, Scenario, Server, as_u64, start_agent};

/// A server whose accept queue (backlog 0: one connection) is already full when the test
/// connects: further SYNs are dropped until it accepts, `accept_delay_ms` after `go` exists.
pub fn full_listener(accept_delay_ms: u64, go: &Path) -> (Server, TcpStream) {
    let (delay, go) = (accept_delay_ms.to_string(), go.display().to_string());
    let server = Server::start(&["--backlog", "0", "--accept-delay-ms", &delay, "--go-file", &go]);
    let filler = TcpStream::connect(server.addr).unwrap();
    (server, filler)
}

/// A go-file (see [`watched_client`]): a fresh path, not yet created, removed when dropped.
pub struct GoFile(PathBuf);

impl std::ops::Deref for GoFile {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for GoFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn go_file() -> GoFile {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let go = std::env::temp_dir().join(format!("observer-go-{}-{n}", std::process::id()));
    let _ = std::fs::remove_file(&go);
    GoFile(go)
}

/// A watched `scenario client` connecting to each of `targets`: the agent (with `flags`) is
/// in place before the first SYN, which goes out (as listeners started with the same `go`
/// start their clocks) once `go` is created here. Returns them with the client's `connecting`
/// reports.
pub fn watched_client(
    netns: Option<&str>,
    targets: &[SocketAddr],
    flags: &[&str],
    go: &Path,
) -> (Scenario, u32, Agent, Vec<Value>) {
    let mut args = vec!["client".to_owned(), "--go-file".into(), go.display().to_string()];
    for t in targets {
        args.extend(["--connect".to_owned(), t.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut scenario = Scenario::start_in(netns, &args);
    let pid = as_u64(&scenario.wait_for("started", |v| v["event"] == "started")["pid"]) as u32;
    let agent = start_agent(&[pid], flags);
    std::fs::write(go, b"go").unwrap();
    let connecting = targets
        .iter()
        .map(|t| {
            let remote = t.to_string();
            scenario.wait_for("connecting", |v| v["event"] == "connecting" && v["remote"] == remote)
        })
        .collect();
    (scenario, pid, agent, connecting)
}

/// A client that will not read: its receive buffer fills and its window closes.
pub fn non_reader(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).unwrap()
}
