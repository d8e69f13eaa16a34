//! Scenario programs that reproduce, for real, the server failures observer exists for. Each
//! prints JSON lines on stdout describing what it did (ports, fds, thread ids) so the tests can
//! check the agent's alerts against the truth.
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::Mutex,
};

use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// A thread-per-connection echo server, the kind that leaks a thread per stuck client.
    /// Prints `listening`, then `accepted` (with the worker's fd and tid) and `closed` per
    /// connection.
    ThreadPerConnection {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
}

static STDOUT: Mutex<()> = Mutex::new(());

fn report(value: serde_json::Value) {
    let _guard = STDOUT.lock().unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(out, "{value}").unwrap();
    out.flush().unwrap();
}

fn gettid() -> i64 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

fn main() {
    match Cli::parse().scenario {
        Scenario::ThreadPerConnection { listen } => thread_per_connection(&listen),
    }
}

fn thread_per_connection(listen: &str) {
    let listener = TcpListener::bind(listen).expect("bind");
    report(json!({
        "event": "listening",
        "pid": std::process::id(),
        "local": listener.local_addr().unwrap().to_string(),
        "fd": listener.as_raw_fd(),
    }));
    for (n, conn) in listener.incoming().enumerate() {
        let Ok(conn) = conn else { continue };
        std::thread::Builder::new()
            .name(format!("worker-{n}"))
            .spawn(move || echo(conn))
            .expect("spawn worker");
    }
}

/// Echoes until the client closes, reporting its fd and thread id first.
fn echo(mut conn: TcpStream) {
    let fd = conn.as_raw_fd();
    report(json!({
        "event": "accepted",
        "fd": fd,
        "tid": gettid(),
        "local": conn.local_addr().unwrap().to_string(),
        "remote": conn.peer_addr().unwrap().to_string(),
    }));
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    report(json!({ "event": "closed", "fd": fd }));
}
