//! Scenario programs that reproduce, for real, the server failures observer exists for. Each
//! prints JSON lines on stdout describing what it did (ports, fds, thread ids) so the tests can
//! check the agent's alerts against the truth.
use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::Mutex,
    time::Duration,
};

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// A thread-per-connection server, the kind that leaks a thread per stuck client. Prints
    /// `listening`, then `accepted` (with the worker's fd and tid) and `closed` per connection,
    /// and `accept_failed` when accept() fails.
    ThreadPerConnection(ServerArgs),
}

#[derive(clap::Args)]
struct ServerArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// listen() backlog.
    #[arg(long, default_value_t = 128)]
    backlog: i32,
    /// Wait this long before accepting anything (a stalled accept loop).
    #[arg(long, default_value_t = 0)]
    accept_delay_ms: u64,
    /// Lower RLIMIT_NOFILE to this (fd exhaustion).
    #[arg(long)]
    nofile: Option<u64>,
    #[arg(long, value_enum, default_value_t = Mode::Echo)]
    mode: Mode,
    /// What a worker does when its client closes (echo mode).
    #[arg(long, value_enum, default_value_t = OnEof::Close)]
    on_eof: OnEof,
    /// Turn TCP keepalive on for accepted connections, first probe after this many seconds.
    #[arg(long)]
    keepalive_idle: Option<i32>,
    /// Serve each connection in a child process of its own (fork per connection, as inetd,
    /// PostgreSQL or Apache's prefork workers do) instead of a thread.
    #[arg(long)]
    fork: bool,
    /// Name the process this (its /proc/PID/comm), so that `--comm` can single it out.
    #[arg(long)]
    name: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// Echo what the client sends until it closes.
    Echo,
    /// Write data as fast as the client takes it, forever.
    Stream,
    /// Keep-alive HTTP-ish: read a request up to its blank line, answer, repeat. A client that
    /// never finishes its request (slow-loris) never gets an answer.
    Http,
    /// Read a 4-byte request, answer, close at once: unread request bytes make the kernel
    /// send a reset (the lingering-close failure).
    LingeringClose,
    /// Read a 4-byte request, answer, shut down writing, drain the rest, then close.
    GracefulClose,
}

#[derive(Clone, Copy, ValueEnum)]
enum OnEof {
    Close,
    /// Never close: the socket stays in CLOSE_WAIT and its fd leaks.
    Leak,
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
        Scenario::ThreadPerConnection(args) => thread_per_connection(&args),
    }
}

fn thread_per_connection(args: &ServerArgs) {
    if let Some(name) = &args.name {
        let name = std::ffi::CString::new(name.as_str()).expect("a name without NUL bytes");
        // SAFETY: PR_SET_NAME copies at most 16 bytes from a valid C string.
        assert_eq!(unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) }, 0, "PR_SET_NAME");
    }
    if args.fork {
        // Children are reaped by the kernel: no zombies pile up.
        // SAFETY: setting a signal's disposition to SIG_IGN.
        unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    }
    if let Some(n) = args.nofile {
        let limit = libc::rlimit { rlim_cur: n, rlim_max: n };
        // SAFETY: a plain setrlimit with a valid struct.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0, "setrlimit");
    }
    let listener = TcpListener::bind(&args.listen).expect("bind");
    // listen() again on a listening socket just changes its backlog.
    // SAFETY: listen(2) on our own socket.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), args.backlog) }, 0, "listen");
    report(json!({
        "event": "listening",
        "pid": std::process::id(),
        "local": listener.local_addr().unwrap().to_string(),
        "fd": listener.as_raw_fd(),
    }));
    std::thread::sleep(Duration::from_millis(args.accept_delay_ms));
    let mut n = 0;
    loop {
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) => {
                report(json!({ "event": "accept_failed", "errno": e.raw_os_error() }));
                // Out of fds: back off instead of spinning, as a real server would.
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        if let Some(idle) = args.keepalive_idle {
            set_keepalive(&conn, idle);
        }
        let (mode, on_eof) = (args.mode, args.on_eof);
        if args.fork {
            // SAFETY: this process has one thread here (no workers in fork mode), so the child
            // may do anything after fork.
            match unsafe { libc::fork() } {
                0 => {
                    drop(listener);
                    serve(conn, mode, on_eof);
                    std::process::exit(0);
                }
                -1 => panic!("fork: {}", std::io::Error::last_os_error()),
                _ => continue, // the child has it; our copy closes here
            }
        }
        std::thread::Builder::new()
            .name(format!("worker-{n}"))
            .spawn(move || serve(conn, mode, on_eof))
            .expect("spawn worker");
        n += 1;
    }
}

fn set_keepalive(conn: &TcpStream, idle_secs: i32) {
    let set = |level, name, value: i32| {
        // SAFETY: setsockopt with an int option on our own socket.
        let rc = unsafe {
            libc::setsockopt(conn.as_raw_fd(), level, name, (&raw const value).cast(), 4)
        };
        assert_eq!(rc, 0, "setsockopt");
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle_secs);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, idle_secs);
}

fn serve(mut conn: TcpStream, mode: Mode, on_eof: OnEof) {
    let fd = conn.as_raw_fd();
    report(json!({
        "event": "accepted",
        "fd": fd,
        "pid": std::process::id(),
        "tid": gettid(),
        "local": conn.local_addr().unwrap().to_string(),
        "remote": conn.peer_addr().unwrap().to_string(),
    }));
    // How the worker's last call ended: the tests check what ending a connection does to it.
    let ended: std::io::Result<()> = match mode {
        Mode::Echo => {
            let mut buf = [0u8; 4096];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) if matches!(on_eof, OnEof::Leak) => {
                        report(json!({ "event": "eof_ignored", "fd": fd }));
                        loop {
                            std::thread::park();
                        }
                    }
                    Ok(0) => break Ok(()),
                    Err(e) => break Err(e),
                    Ok(n) => {
                        if let Err(e) = conn.write_all(&buf[..n]) {
                            break Err(e);
                        }
                    }
                }
            }
        }
        Mode::Stream => {
            let chunk = vec![b'x'; 64 * 1024];
            loop {
                if let Err(e) = conn.write_all(&chunk) {
                    break Err(e);
                }
            }
        }
        Mode::Http => {
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            loop {
                match conn.read(&mut byte) {
                    Ok(0) => break Ok(()),
                    Err(e) => break Err(e),
                    Ok(_) => {}
                }
                request.push(byte[0]);
                if request.ends_with(b"\r\n\r\n") {
                    request.clear();
                    if let Err(e) =
                        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    {
                        break Err(e);
                    }
                }
            }
        }
        Mode::LingeringClose | Mode::GracefulClose => {
            let mut request = [0u8; 4];
            conn.read_exact(&mut request).and_then(|()| {
                conn.write_all(b"HTTP/1.0 200 OK\r\n\r\nhello\n")?;
                if matches!(mode, Mode::GracefulClose) {
                    conn.shutdown(Shutdown::Write)?;
                    let mut rest = Vec::new();
                    conn.read_to_end(&mut rest)?;
                }
                Ok(())
            })
        }
    };
    let (how, errno) = match &ended {
        Ok(()) => ("eof", None),
        Err(e) => ("error", e.raw_os_error()),
    };
    report(json!({ "event": "closed", "fd": fd, "how": how, "errno": errno }));
    drop(conn);
}
