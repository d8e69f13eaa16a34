//! Command line. `--help` is the first manual most users read, so every flag explains itself
//! with an example.
use std::time::Duration;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use observer_common::DEFAULT_MAX_TRACKED_SOCKETS;

use crate::policy::Overrides;

const ABOUT: &str = "Finds the TCP connections a server is stuck on, says why, and names the thread stuck with them.";

const LONG_ABOUT: &str = "\
Finds the TCP connections a server is stuck on, says why, and names the thread stuck with them.

observer loads eBPF probes that record, per TCP socket, when the application last sent and
received data and which thread did it. Every poll it joins that with the kernel's socket table
(sock_diag, as `ss` reads it) and /proc, and prints one JSON object per line on stdout:
`started`, then an `alert` when a connection gets stuck and an `alert_cleared` when it recovers
or closes. Logs go to stderr. Needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE).";

const EXAMPLES: &str = "\
Examples:
  observer check                          # can this machine run observer? (JSON report)
  observer watch --pid $(pgrep -o nginx)  # watch one server process
  observer watch --port 8080              # every connection on port 8080, any process
  observer watch --pid 4242 --idle-timeout 5m --poll-interval 2s
  observer watch --pid 4242 --config /etc/observer.toml  # per-port/CIDR/process thresholds
  observer check --config /etc/observer.toml             # validate a policy file";

#[derive(Debug, Parser)]
#[command(name = "observer", version, about = ABOUT, long_about = LONG_ABOUT, after_help = EXAMPLES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once at start-up; boxing buys nothing")]
pub enum Command {
    /// Watch TCP connections and print alerts for stuck ones as JSON lines on stdout.
    #[command(after_help = EXAMPLES)]
    Watch(WatchArgs),
    /// Report, as JSON, what this kernel offers observer and whether `watch` can run here.
    ///
    /// Checks privileges, kernel BTF, tracefs, each probe backend (by really loading and
    /// attaching it) and sock_diag SOCK_DESTROY. Exits 0 if `watch` can run, 1 if not.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Also validate this policy file; a bad file fails the check with its line and reason.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Watch the TCP sockets of this process (repeat for several). Without --pid, every TCP
    /// socket in observer's network namespace is watched.
    ///
    /// The agent exits (after a `target_exited` event per pid) once every watched process is
    /// gone. Example: --pid 4242 --pid 4243
    #[arg(long = "pid", value_name = "PID", value_parser = clap::value_parser!(u32).range(1..))]
    pub pids: Vec<u32>,

    /// Only watch connections whose local or remote port is PORT (repeat for several).
    ///
    /// Example: --port 8080 --port 8443
    #[arg(long = "port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub ports: Vec<u16>,

    /// How often to look at the sockets. Alerts come at most one interval after a connection
    /// crosses its threshold. Examples: 500ms, 1s, 5s
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = positive_duration)]
    pub poll_interval: Duration,

    /// Policy file: thresholds and ignored reasons per local port, remote CIDR, pid or
    /// program (see README). Threshold flags given here override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// [default: 60s] Alert `idle`: an established connection that sent and received no data
    /// for this long (a client went silent; a server thread waits in read()). Example: 5m
    #[arg(long, value_name = "DURATION", value_parser = positive_duration)]
    pub idle_timeout: Option<Duration>,

    /// [default: 30s] Alert `slow_transfer` (slow-loris): data trickled one way below
    /// --slow-min-rate for this long while the other side sent nothing back. Example: 1m
    #[arg(long, value_name = "DURATION", value_parser = positive_duration)]
    pub slow_after: Option<Duration>,

    /// [default: 64] The rate, in bytes per second, below which a sustained one-way transfer
    /// counts as slow. Example: 256
    #[arg(long, value_name = "BYTES_PER_SEC", value_parser = positive_rate)]
    pub slow_min_rate: Option<f64>,

    /// [default: 30s] Alert `blocked_send`: data waited to be sent this long while the peer,
    /// alive, took none (it stopped reading; the writer blocks). Example: 2m
    #[arg(long, value_name = "DURATION", value_parser = positive_duration)]
    pub blocked_timeout: Option<Duration>,

    /// [default: 30s] Alert `retransmitting`: the kernel retransmitted unacknowledged data for
    /// this long to a peer that does not answer (it vanished; TCP retries ~15 min). Example: 1m
    #[arg(long, value_name = "DURATION", value_parser = positive_duration)]
    pub retrans_timeout: Option<Duration>,

    /// [default: 60s] Alert `close_wait`: the peer closed this long ago and the application
    /// never called close() (a leaked socket and fd). Example: 5m
    #[arg(long, value_name = "DURATION", value_parser = positive_duration)]
    pub close_wait_timeout: Option<Duration>,

    /// [default: 300s] Alert `keepalive_missing`: a non-loopback connection silent this long
    /// without a keepalive due sooner; a load balancer or NAT will drop it. Example: 240s
    #[arg(long, value_name = "DURATION", value_parser = positive_duration)]
    pub middlebox_idle: Option<Duration>,

    /// [default: 0.9] Alert `fd_pressure` when a process uses this fraction of its fd limit
    /// (RLIMIT_NOFILE), or whenever its accept() fails with EMFILE/ENFILE. Example: 0.8
    #[arg(long, value_name = "FRACTION", value_parser = fraction)]
    pub fd_threshold: Option<f64>,

    /// Print a `stats` event with the agent's own health (sockets seen, poll time, probe
    /// counters, sockets the probes failed to track) this often; 0 turns it off.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration)]
    pub stats_interval: Duration,

    /// Capacity of the in-kernel socket table. Sockets beyond it are not tracked by the probes
    /// (their alerts then rely on the kernel's own counters) and are counted as `track_failed`
    /// in `stats`.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_TRACKED_SOCKETS,
          value_parser = clap::value_parser!(u32).range(1024..))]
    pub max_sockets: u32,
}

impl WatchArgs {
    /// The thresholds given on the command line; they win over the policy file.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            idle_timeout: self.idle_timeout,
            slow_after: self.slow_after,
            slow_min_rate: self.slow_min_rate,
            blocked_timeout: self.blocked_timeout,
            retrans_timeout: self.retrans_timeout,
            close_wait_timeout: self.close_wait_timeout,
            middlebox_idle: self.middlebox_idle,
            fd_threshold: self.fd_threshold,
        }
    }
}

fn positive_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("'{text}' is not a rate: give bytes per second, like 64")),
    }
}

fn fraction(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err(format!(
            "'{text}' is not a fraction of the fd limit: give one above 0, at most 1, like 0.9"
        )),
    }
}

/// Parses `500ms`, `2s`, `5m`, `1h30m`.
pub fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|_| {
        format!("'{text}' is not a duration: give a number with a unit, like 500ms, 2s or 5m")
    })
}

fn positive_duration(text: &str) -> Result<Duration, String> {
    match duration(text)? {
        d if d.is_zero() => Err("must be greater than zero, like 500ms, 2s or 5m".into()),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn durations_with_units() {
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(duration("1h30m"), Ok(Duration::from_secs(5400)));
    }

    #[test]
    fn durations_without_units_or_garbage_are_refused_with_a_hint() {
        for bad in ["5", "", "fast", "-1s", "2 parsecs"] {
            let err = duration(bad).unwrap_err();
            assert!(err.contains("like 500ms, 2s or 5m"), "{bad}: {err}");
        }
        assert!(positive_duration("0s").is_err());
    }

    #[test]
    fn watch_defaults() {
        let cli = Cli::try_parse_from(["observer", "watch"]).unwrap();
        let Command::Watch(w) = cli.command else { panic!("not watch") };
        assert!(w.pids.is_empty() && w.ports.is_empty());
        assert_eq!(w.poll_interval, Duration::from_secs(1));
        assert_eq!(w.overrides(), Overrides::default(), "unset flags leave the policy alone");
    }

    #[test]
    fn repeated_flags_and_values() {
        let cli = Cli::try_parse_from([
            "observer",
            "watch",
            "--pid",
            "10",
            "--pid",
            "11",
            "--port",
            "8080",
            "--poll-interval",
            "250ms",
            "--idle-timeout",
            "2s",
        ])
        .unwrap();
        let Command::Watch(w) = cli.command else { panic!("not watch") };
        assert_eq!(w.pids, vec![10, 11]);
        assert_eq!(w.ports, vec![8080]);
        assert_eq!(w.poll_interval, Duration::from_millis(250));
        assert_eq!(w.overrides().idle_timeout, Some(Duration::from_secs(2)));
    }

    #[test]
    fn usage_errors_are_exit_code_2() {
        for args in [
            vec!["observer", "watch", "--pid", "abc"],
            vec!["observer", "watch", "--pid", "0"],
            vec!["observer", "watch", "--idle-timeout", "5"],
            vec!["observer", "watch", "--bogus"],
            vec!["observer", "watch", "--fd-threshold", "1.5"],
            vec!["observer", "watch", "--slow-min-rate", "-3"],
            vec!["observer"],
        ] {
            let err = Cli::try_parse_from(&args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn help_explains_every_flag() {
        Cli::command().debug_assert();
        let mut cmd = Cli::command();
        let watch = cmd.find_subcommand_mut("watch").unwrap();
        for arg in watch.get_arguments() {
            assert!(arg.get_help().is_some(), "--{} has no help", arg.get_id());
        }
    }
}
