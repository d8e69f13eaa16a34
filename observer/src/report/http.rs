//! The `--metrics-addr` endpoint: a minimal HTTP/1.1 server for `GET /metrics`, `/healthz` and
//! `/readyz`, one request per connection, on the watch loop's runtime. It reads only the
//! metrics' atomics and the health record (a lock held for microseconds), never the poll's
//! state, so a scrape neither waits for a poll nor delays one.
use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::{
    health::{self, HealthRecord},
    metrics::{self, Metrics},
};

/// Longest request head read: a scraper's is a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;
/// A client gets this long to send its request and take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed at once, so a flood cannot pile up tasks.
const MAX_CONNECTIONS: usize = 32;

/// What the endpoint serves from.
pub struct Endpoints {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Mutex<HealthRecord>>,
    pub poll_interval: Duration,
}

/// An answer: status line, content type and body.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

const PLAIN: &str = "text/plain; charset=utf-8";

/// Binds the listening socket; a failure is one line that says what to do.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        let fix = match e.kind() {
            io::ErrorKind::AddrInUse => {
                "another program listens there: stop it or choose another port"
            }
            io::ErrorKind::AddrNotAvailable => {
                "that address is not on this machine: use one of its addresses, or 0.0.0.0"
            }
            io::ErrorKind::PermissionDenied => {
                "ports below 1024 need CAP_NET_BIND_SERVICE: choose a higher port"
            }
            _ => "check the address",
        };
        anyhow::anyhow!("cannot serve metrics on {addr} (--metrics-addr): {e}; {fix}")
    })
}

/// Serves `listener` on the current runtime until the process exits.
pub fn serve(listener: TcpListener, endpoints: Endpoints) {
    let endpoints = Arc::new(endpoints);
    let open = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of fds and the like: back off instead of spinning on the error.
                    log::warn!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if open.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
                open.fetch_sub(1, Ordering::Relaxed);
                continue; // dropped: closed without an answer
            }
            let (endpoints, open) = (endpoints.clone(), open.clone());
            tokio::spawn(async move {
                let _ = tokio::time::timeout(CLIENT_TIMEOUT, exchange(stream, &endpoints)).await;
                open.fetch_sub(1, Ordering::Relaxed);
            });
        }
    });
}

/// Reads one request head, answers it and closes the connection.
async fn exchange(mut stream: TcpStream, endpoints: &Endpoints) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let response = loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(()); // closed before a whole request: nothing to answer
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = find(&head, b"\r\n\r\n").or_else(|| find(&head, b"\n\n")) {
            break respond(&head[..end], endpoints, Instant::now());
        }
        if head.len() > MAX_REQUEST {
            break text(431, "request head too large\n".into());
        }
    };
    stream.write_all(&encode(&response)).await?;
    stream.shutdown().await
}

/// The answer to a request head (request line and headers, without the blank line).
pub fn respond(head: &[u8], endpoints: &Endpoints, now: Instant) -> Response {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_ascii_whitespace();
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return text(400, "malformed request line\n".into());
    };
    if !version.starts_with("HTTP/1.") {
        return text(505, "only HTTP/1.x is served\n".into());
    }
    if method != "GET" {
        return text(405, format!("{method} is not served: only GET\n"));
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    match path {
        "/metrics" => Response {
            status: 200,
            content_type: metrics::CONTENT_TYPE,
            body: endpoints.metrics.encode(),
        },
        "/healthz" | "/readyz" => {
            // A copy, so the lock is held only for the clone.
            let record = endpoints.health.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let verdict = if path == "/healthz" {
                health::liveness(&record, endpoints.poll_interval, now)
            } else {
                health::readiness(&record)
            };
            text(if verdict.ok { 200 } else { 503 }, format!("{}\n", verdict.why))
        }
        _ => text(404, format!("no such endpoint: {path} (try /metrics, /healthz, /readyz)\n")),
    }
}

fn text(status: u16, body: String) -> Response {
    Response { status, content_type: PLAIN, body }
}

/// The response bytes: status line, headers, body; the connection closes after it.
fn encode(response: &Response) -> Vec<u8> {
    let reason = match response.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    };
    let allow = if response.status == 405 { "Allow: GET\r\n" } else { "" };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        response.status,
        response.content_type,
        response.body.len()
    )
    .into_bytes();
    out.extend_from_slice(response.body.as_bytes());
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints() -> Endpoints {
        Endpoints {
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Mutex::new(HealthRecord::new(Instant::now()))),
            poll_interval: Duration::from_secs(1),
        }
    }

    fn get(endpoints: &Endpoints, head: &str) -> Response {
        respond(head.as_bytes(), endpoints, Instant::now())
    }

    #[test]
    fn routes_and_methods() {
        let e = endpoints();
        let metrics = get(&e, "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*");
        assert_eq!((metrics.status, metrics.content_type), (200, metrics::CONTENT_TYPE));
        assert!(metrics.body.contains("observer_alerts_active{reason=\"idle\"} 0\n"));
        assert_eq!(get(&e, "GET /metrics?x=1 HTTP/1.0").status, 200);
        // Starting: alive, not ready.
        assert_eq!(get(&e, "GET /healthz HTTP/1.1").status, 200);
        let ready = get(&e, "GET /readyz HTTP/1.1");
        assert_eq!(ready.status, 503);
        assert!(ready.body.contains("not attached"), "{ready:?}");
        assert_eq!(get(&e, "GET / HTTP/1.1").status, 404);
        assert_eq!(get(&e, "GET /metricsx HTTP/1.1").status, 404);
        assert_eq!(get(&e, "POST /metrics HTTP/1.1").status, 405);
        assert_eq!(get(&e, "HEAD /metrics HTTP/1.1").status, 405);
        assert_eq!(get(&e, "GET /metrics").status, 400);
        assert_eq!(get(&e, "\u{1}garbage").status, 400);
        assert_eq!(get(&e, "GET /metrics HTTP/2.0").status, 505);
    }

    #[test]
    fn response_bytes_close_the_connection_and_have_the_length() {
        let bytes = encode(&text(503, "down\n".into()));
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{text}");
        assert!(text.contains("\r\nContent-Length: 5\r\n") && text.contains("Connection: close"));
        assert!(text.ends_with("\r\n\r\ndown\n"), "{text}");
        let text = String::from_utf8(encode(&get(&endpoints(), "PUT / HTTP/1.1"))).unwrap();
        assert!(text.contains("\r\nAllow: GET\r\n"), "{text}");
    }

    #[tokio::test]
    async fn serves_over_tcp_and_a_taken_port_is_one_clear_line() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        serve(listener, endpoints());
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");

        let err = bind(addr).await.unwrap_err().to_string();
        assert!(err.contains("in use") && err.contains("choose another port"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}
