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
    /// `listening`, then `accepted` (with the worker's fd and tid) and `closed` per connection
    /// (`response_written` before it in large-response mode), and `accept_failed` when accept()
    /// fails.
    ThreadPerConnection(ServerArgs),
    /// A client that calls other services the way a careless server does: a blocking connect()
    /// with no timeout, one thread per address. Prints `connecting` (fd, tid) before the call,
    /// then `connected` or `connect_failed` (errno), each with how long the call took.
    Client(ClientArgs),
}

#[derive(clap::Args)]
struct ClientArgs {
    /// Address to connect to (repeat for several, each on a thread of its own).
    #[arg(long, required = true)]
    connect: Vec<std::net::SocketAddr>,
    /// Connect only once this file exists (so that a watcher started after this process can be
    /// in place first).
    #[arg(long)]
    go_file: Option<std::path::PathBuf>,
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
    /// Start that wait only once this file exists (listening already), to time it against a
    /// client started by the same file.
    #[arg(long)]
    go_file: Option<std::path::PathBuf>,
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
    /// What the accept loop does when accept() fails (out of fds, say).
    #[arg(long, value_enum, default_value_t = OnAcceptError::Sleep)]
    on_accept_error: OnAcceptError,
    /// large-response mode: how many bytes to write before closing.
    #[arg(long, default_value_t = 8 << 20)]
    response_bytes: usize,
    /// large-response mode: hold the connection this long after writing, before closing.
    #[arg(long, default_value_t = 0)]
    close_delay_ms: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnAcceptError {
    /// Back off 200 ms, as a careful server does.
    Sleep,
    /// Retry at once: a loop that burns a CPU while accept() keeps failing (reported once).
    Spin,
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
    /// Write a large response at once (as much of --response-bytes as the socket takes without
    /// blocking), then close: to a peer that does not read, the close never finishes.
    LargeResponse,
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
        Scenario::Client(args) => client(&args),
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
    wait_for_file(args.go_file.as_deref());
    std::thread::sleep(Duration::from_millis(args.accept_delay_ms));
    let mut n = 0;
    let mut failures = 0u64;
    loop {
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) => {
                failures += 1;
                match args.on_accept_error {
                    // Out of fds: back off instead of spinning, as a real server would.
                    OnAcceptError::Sleep => {
                        report(json!({ "event": "accept_failed", "errno": e.raw_os_error() }));
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    // Or do not (the first failure is reported, not the million after it).
                    OnAcceptError::Spin if failures == 1 => {
                        report(json!({ "event": "accept_failed", "errno": e.raw_os_error() }));
                    }
                    OnAcceptError::Spin => {}
                }
                continue;
            }
        };
        failures = 0;
        if let Some(idle) = args.keepalive_idle {
            set_keepalive(&conn, idle);
        }
        let (mode, on_eof) = (args.mode, args.on_eof);
        let response = Response { bytes: args.response_bytes, close_delay_ms: args.close_delay_ms };
        if args.fork {
            // SAFETY: this process has one thread here (no workers in fork mode), so the child
            // may do anything after fork.
            match unsafe { libc::fork() } {
                0 => {
                    drop(listener);
                    serve(conn, mode, on_eof, response);
                    std::process::exit(0);
                }
                -1 => panic!("fork: {}", std::io::Error::last_os_error()),
                _ => continue, // the child has it; our copy closes here
            }
        }
        std::thread::Builder::new()
            .name(format!("worker-{n}"))
            .spawn(move || serve(conn, mode, on_eof, response))
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

/// What large-response mode writes, and how long it holds the connection before closing.
#[derive(Clone, Copy)]
struct Response {
    bytes: usize,
    close_delay_ms: u64,
}

fn serve(mut conn: TcpStream, mode: Mode, on_eof: OnEof, response: Response) {
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
        Mode::LargeResponse => write_what_fits(&mut conn, response.bytes).map(|written| {
            report(json!({ "event": "response_written", "fd": fd, "bytes": written }));
            std::thread::sleep(Duration::from_millis(response.close_delay_ms));
        }),
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
    // Reported once the socket is closed: the tests then look for what the kernel does next.
    drop(conn);
    report(json!({ "event": "closed", "fd": fd, "how": how, "errno": errno }));
}

/// Writes up to `bytes` without blocking: what the socket buffer takes. Returns how much.
fn write_what_fits(conn: &mut TcpStream, bytes: usize) -> std::io::Result<usize> {
    conn.set_nonblocking(true)?;
    let chunk = vec![b'r'; 64 * 1024];
    let mut written = 0;
    while written < bytes {
        match conn.write(&chunk[..chunk.len().min(bytes - written)]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    conn.set_nonblocking(false)?;
    Ok(written)
}

fn wait_for_file(path: Option<&std::path::Path>) {
    while path.is_some_and(|p| !p.exists()) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn client(args: &ClientArgs) {
    report(json!({ "event": "started", "pid": std::process::id() }));
    wait_for_file(args.go_file.as_deref());
    let callers: Vec<_> = args
        .connect
        .iter()
        .enumerate()
        .map(|(i, &addr)| {
            std::thread::Builder::new()
                .name(format!("caller-{i}"))
                .spawn(move || connect_without_timeout(addr))
                .expect("spawn caller")
        })
        .collect();
    // The connections that were made stay open: the process lives on with them.
    let _made: Vec<Option<TcpStream>> =
        callers.into_iter().map(|c| c.join().ok().flatten()).collect();
    loop {
        std::thread::park();
    }
}

/// One blocking connect() with no timeout, as a caller that never set one makes it: the fd is
/// reported before the call, so the tests know which thread and fd to expect in an alert.
fn connect_without_timeout(addr: std::net::SocketAddr) -> Option<TcpStream> {
    use std::os::fd::FromRawFd;
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2); the fd is owned by the TcpStream made from it below.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh socket nothing else owns.
    let conn = unsafe { TcpStream::from_raw_fd(fd) };
    let remote = addr.to_string();
    report(json!({ "event": "connecting", "fd": fd, "tid": gettid(), "remote": remote }));
    let (storage, len) = sockaddr(addr);
    let start = std::time::Instant::now();
    // SAFETY: storage holds a sockaddr of length len for this family.
    let rc = unsafe { libc::connect(fd, (&raw const storage).cast(), len) };
    let after_ms = start.elapsed().as_millis() as u64;
    if rc != 0 {
        let errno = std::io::Error::last_os_error().raw_os_error();
        report(json!({ "event": "connect_failed", "fd": fd, "remote": remote, "errno": errno,
                       "after_ms": after_ms }));
        return None;
    }
    let local = conn.local_addr().map(|a| a.to_string()).unwrap_or_default();
    report(json!({ "event": "connected", "fd": fd, "remote": remote, "local": local,
                   "after_ms": after_ms }));
    Some(conn)
}

/// `addr` as the C socket API takes it.
fn sockaddr(addr: std::net::SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid; the family's fields are set below.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        std::net::SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in.
            let sin = unsafe { &mut *(&raw mut storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
            size_of::<libc::sockaddr_in>()
        }
        std::net::SocketAddr::V6(v6) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in6.
            let sin6 = unsafe { &mut *(&raw mut storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            sin6.sin6_scope_id = v6.scope_id();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}
