//! Load for `cargo xtask bench`: many idle connections to hold, request/response traffic with
//! latency percentiles, and connection churn. Prints one JSON line per result on stdout.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept N connections on one listening port and hold them, idle. Prints `listening`,
    /// then `ready` once all are accepted. Held connections are reset when closed.
    HoldServer {
        #[arg(long)]
        connections: usize,
        /// Read one byte from each connection (sent by `hold-clients --touch`), so the agent's
        /// probes have recorded every one of them.
        #[arg(long)]
        touch: bool,
    },
    /// Open N idle connections to ADDR and hold them. Source addresses rotate over
    /// 127.0.0.2.. so ephemeral ports never run out. Held connections are reset when closed.
    HoldClients {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        connections: usize,
        /// Send one byte on each connection once connected.
        #[arg(long)]
        touch: bool,
    },
    /// Request/response on C keep-alive connections as fast as the server answers, for a
    /// duration: prints requests per second and latency percentiles.
    Ping {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 8)]
        connections: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long)]
        duration_ms: u64,
    },
    /// Open, exchange one message on, and close RATE connections per second for a duration.
    Churn {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        rate: u64,
        #[arg(long)]
        duration_ms: u64,
    },
    /// Fork N processes that each open one connection to ADDR and send one byte on it; print
    /// `ready` with their pids once all are connected, then hold. The processes die with this
    /// one.
    ForkClients {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        processes: usize,
    },
    /// Open N connections to ADDR, one every INTERVAL ms, print when each was opened (unix ms),
    /// then hold them idle.
    Stagger {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        connections: usize,
        #[arg(long)]
        interval_ms: u64,
    },
}

fn print(value: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{value}").unwrap();
    out.flush().unwrap();
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: get/setrlimit with a valid struct; the soft limit goes up to the hard one.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

/// Makes closing `conn` (at exit, too) reset it rather than leave it in TIME_WAIT, so held
/// connections leave nothing in the socket table once their holder is gone: the next
/// measurement walks only its own connections.
fn reset_on_close(conn: TcpStream) -> TcpStream {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    observer_tests::set_socket_option(&conn, libc::SO_LINGER, &linger);
    conn
}

/// Connects from 127.0.0.`(2 + n % 8)` so that 8 source addresses share the load.
fn connect_from(n: usize, to: SocketAddr) -> std::io::Result<TcpStream> {
    let source = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2 + (n % 8) as u8), 0);
    // SAFETY: a plain socket/bind/connect sequence on a socket we own from the start.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd);
        // Choose the port at connect(), by the whole 4-tuple: with thousands of connections
        // a second in TIME_WAIT, choosing it at bind() runs out.
        let one = 1i32;
        const IP_BIND_ADDRESS_NO_PORT: i32 = 24;
        libc::setsockopt(fd, libc::IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, (&raw const one).cast(), 4);
        let bind_to = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(source.ip().octets()) },
            sin_zero: [0; 8],
        };
        if libc::bind(fd, (&raw const bind_to).cast(), size_of::<libc::sockaddr_in>() as u32) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let SocketAddr::V4(to) = to else { panic!("IPv4 only") };
        let dest = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: to.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(to.ip().octets()) },
            sin_zero: [0; 8],
        };
        if libc::connect(
            stream.as_raw_fd(),
            (&raw const dest).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

fn main() {
    match Cli::parse().command {
        Cmd::HoldServer { connections, touch } => {
            raise_fd_limit();
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            // SAFETY: listen(2) on our socket: a deep backlog so connecting clients never wait.
            unsafe { libc::listen(listener.as_raw_fd(), 65_535) };
            print(
                json!({"event": "listening", "pid": std::process::id(), "local": listener.local_addr().unwrap().to_string()}),
            );
            let mut held: Vec<TcpStream> =
                (0..connections).map(|_| reset_on_close(listener.accept().unwrap().0)).collect();
            if touch {
                let mut byte = [0u8; 1];
                for conn in &mut held {
                    conn.read_exact(&mut byte).unwrap();
                }
            }
            print(json!({"event": "ready", "held": held.len()}));
            loop {
                thread::park();
            }
        }
        Cmd::HoldClients { connect, connections, touch } => {
            raise_fd_limit();
            let mut held: Vec<TcpStream> = (0..connections)
                .map(|n| reset_on_close(connect_from(n, connect).unwrap()))
                .collect();
            if touch {
                for conn in &mut held {
                    conn.write_all(b"t").unwrap();
                }
            }
            print(json!({"event": "ready", "held": held.len()}));
            loop {
                thread::park();
            }
        }
        Cmd::Ping { connect, connections, size, duration_ms } => {
            ping(connect, connections, size, duration_ms)
        }
        Cmd::Churn { connect, rate, duration_ms } => churn(connect, rate, duration_ms),
        Cmd::ForkClients { connect, processes } => fork_clients(connect, processes),
        Cmd::Stagger { connect, connections, interval_ms } => {
            let mut held = Vec::new();
            for n in 0..connections {
                let conn = connect_from(n, connect).unwrap();
                print(
                    json!({"event": "opened", "local": conn.local_addr().unwrap().to_string(), "at_unix_ms": unix_ms()}),
                );
                held.push(conn);
                thread::sleep(Duration::from_millis(interval_ms));
            }
            loop {
                thread::park();
            }
        }
    }
}

fn ping(connect: SocketAddr, connections: usize, size: usize, duration_ms: u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..connections)
        .map(|n| {
            let stop = stop.clone();
            let mut conn = connect_from(n, connect).unwrap();
            conn.set_nodelay(true).unwrap();
            thread::spawn(move || {
                let message = vec![b'p'; size];
                let mut reply = vec![0u8; size];
                // Latencies in microseconds.
                let mut latencies = Vec::with_capacity(1 << 20);
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    conn.write_all(&message).unwrap();
                    conn.read_exact(&mut reply).unwrap();
                    latencies.push(start.elapsed().as_micros() as u32);
                }
                latencies
            })
        })
        .collect();
    let started = Instant::now();
    thread::sleep(Duration::from_millis(duration_ms));
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<u32> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    print(json!({
        "event": "ping",
        "requests": all.len(),
        "rps": all.len() as f64 / elapsed,
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
    }));
}

fn churn(connect: SocketAddr, rate: u64, duration_ms: u64) {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let last_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let start = Instant::now();
    let total = rate * duration_ms / 1000;
    // Four pacing threads, each opening its share on schedule.
    let threads = 4;
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (done, failed, last_error) = (done.clone(), failed.clone(), last_error.clone());
            thread::spawn(move || {
                let mut n = t;
                while n < total as usize {
                    let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    let ok = connect_from(n, connect).and_then(|mut c| {
                        c.write_all(b"x")?;
                        let mut b = [0u8; 1];
                        c.read_exact(&mut b)
                    });
                    match ok {
                        Ok(()) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            *last_error.lock().unwrap() = Some(e.to_string());
                        }
                    }
                    n += threads;
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    print(json!({
        "event": "churn",
        "connections": done.load(Ordering::Relaxed),
        "failed": failed.load(Ordering::Relaxed),
        "last_error": *last_error.lock().unwrap(),
        "seconds": start.elapsed().as_secs_f64(),
    }));
}

fn fork_clients(connect: SocketAddr, processes: usize) {
    let mut ready = [0i32; 2];
    // SAFETY: pipe(2) into a valid array.
    assert_eq!(unsafe { libc::pipe(ready.as_mut_ptr()) }, 0, "pipe");
    let parent = std::process::id() as i32;
    let mut pids = Vec::with_capacity(processes);
    for n in 0..processes {
        // SAFETY: this process has no other threads yet, so the child may run anything.
        match unsafe { libc::fork() } {
            0 => {
                // SAFETY: plain syscalls in the child; it never returns from here.
                unsafe {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    if libc::getppid() != parent {
                        libc::_exit(0);
                    }
                    let Ok(mut conn) = connect_from(n, connect) else { libc::_exit(1) };
                    if conn.write_all(b"t").is_err() {
                        libc::_exit(1);
                    }
                    libc::write(ready[1], b"r".as_ptr().cast(), 1);
                    loop {
                        libc::pause();
                    }
                }
            }
            -1 => panic!("fork: {}", std::io::Error::last_os_error()),
            pid => pids.push(pid as u32),
        }
    }
    let mut byte = [0u8; 1];
    for _ in 0..processes {
        // SAFETY: read(2) into a valid one-byte buffer.
        let got = unsafe { libc::read(ready[0], byte.as_mut_ptr().cast(), 1) };
        assert_eq!(got, 1, "a client process failed to connect");
    }
    print(json!({"event": "ready", "pids": pids}));
    loop {
        thread::park();
    }
}
