//! A real event-loop server beside the project's own: Debian's nginx (one worker, a tiny
//! response, no access log) loaded by wrk over 64 keep-alive connections on loopback.
use std::{
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{Throughput, Workload};
use crate::workspace_root;

const NGINX: &str = "/usr/sbin/nginx";
const WRK: &str = "/usr/bin/wrk";

/// The nginx master; its workers go with it.
pub struct Nginx {
    master: Child,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: nginx's fast shutdown, which takes the workers down too (a killed master
        // would leave them serving).
        // SAFETY: kill with a pid we spawned.
        unsafe { libc::kill(self.master.id() as i32, libc::SIGTERM) };
        let _ = self.master.wait();
    }
}

pub fn workload() -> Result<(Nginx, Workload)> {
    for tool in [NGINX, WRK] {
        if !Path::new(tool).exists() {
            bail!("{tool} is missing: `cargo xtask bench` installs nginx and wrk; run it again");
        }
    }
    let dir = workspace_root().join("target/bench/nginx");
    std::fs::create_dir_all(dir.join("logs"))?;
    let port = free_port()?;
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, config(&dir, port))?;
    let master = Command::new(NGINX)
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .spawn()
        .context("starting nginx")?;
    let nginx = Nginx { master };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nginx did not listen on 127.0.0.1:{port} within 10 s (see {})", dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = nginx.master.id();
    let url = format!("http://127.0.0.1:{port}/");
    let workload = Workload {
        name: "nginx",
        pid,
        load: Box::new(move |seconds| wrk(&url, seconds)),
        processes: Box::new(move || {
            let mut pids = vec![pid];
            pids.extend(children(pid));
            pids
        }),
    };
    Ok((nginx, workload))
}

fn config(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        "daemon off;\n\
         master_process on;\n\
         worker_processes 1;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/logs/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n\
         \x20 access_log off;\n\
         \x20 client_body_temp_path {d}/body;\n\
         \x20 proxy_temp_path {d}/proxy;\n\
         \x20 fastcgi_temp_path {d}/fastcgi;\n\
         \x20 uwsgi_temp_path {d}/uwsgi;\n\
         \x20 scgi_temp_path {d}/scgi;\n\
         \x20 keepalive_requests 1000000;\n\
         \x20 server {{\n\
         \x20   listen 127.0.0.1:{port};\n\
         \x20   location / {{ return 200 \"ok\\n\"; }}\n\
         \x20 }}\n\
         }}\n"
    )
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The processes `pid` forked (nginx's workers).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// wrk over 64 keep-alive connections: requests per second and the 99th percentile latency.
fn wrk(url: &str, seconds: u64) -> Result<Throughput> {
    let out = Command::new(WRK)
        .args(["-t", "1", "-c", "64", "-d", &format!("{seconds}s"), "--latency", url])
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&text).with_context(|| format!("unexpected wrk output: {text}"))
}

fn parse_wrk(text: &str) -> Option<Throughput> {
    let rps =
        text.lines().find_map(|l| l.trim().strip_prefix("Requests/sec:"))?.trim().parse().ok()?;
    let p99 =
        text.lines().find_map(|l| l.trim().strip_prefix("99%")).and_then(|v| duration_us(v.trim()));
    Some(Throughput { rps, p99_us: p99 })
}

/// wrk's durations: `812.00us`, `1.23ms`, `2.00s`.
fn duration_us(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = v.split_at(split);
    let n: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_gives_throughput_and_p99() {
        let text = "Running 3s test @ http://127.0.0.1:8080/\n  1 threads and 64 connections\n\
                    \x20 Latency Distribution\n     50%  500.00us\n     99%    1.23ms\n\
                    \x20 100000 requests in 3.00s, 15.00MB read\n\
                    Requests/sec:  33333.33\nTransfer/sec:      5.00MB\n";
        let t = parse_wrk(text).unwrap();
        assert!((t.rps - 33333.33).abs() < 1e-6);
        assert_eq!(t.p99_us, Some(1230.0));
        assert_eq!(duration_us("812.00us"), Some(812.0));
        assert_eq!(duration_us("2.00s"), Some(2e6));
        assert!(parse_wrk("garbage").is_none());
    }
}
