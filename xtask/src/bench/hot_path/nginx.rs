//! A real event-loop server beside the project's own: Debian's nginx (one worker, a tiny
//! response, no access log) loaded by wrk over 64 keep-alive connections on loopback.
use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};
use observer_tests::nginx::{self, Nginx};

use super::{Throughput, Workload};
use crate::workspace_root;

const WRK: &str = "/usr/bin/wrk";

pub fn workload() -> Result<(Nginx, Workload)> {
    if !Path::new(WRK).exists() {
        bail!("{WRK} is missing: `cargo xtask bench` installs wrk; run it again");
    }
    // One worker: the load generator gets the other core.
    let nginx = Nginx::start(&workspace_root().join("target/bench/nginx"), 1)
        .map_err(anyhow::Error::msg)?;
    let (pid, port) = (nginx.pid(), nginx.port);
    let url = format!("http://127.0.0.1:{port}/");
    let workload = Workload {
        name: "nginx",
        pid,
        load: Box::new(move |seconds| wrk(&url, seconds)),
        processes: Box::new(move || {
            let mut pids = vec![pid];
            pids.extend(nginx::children(pid));
            pids
        }),
    };
    Ok((nginx, workload))
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
