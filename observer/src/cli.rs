//! Command line: the only module that knows clap. It turns arguments into each command's
//! options and runs it. `--help` is the first manual most users read, so every flag explains
//! itself with an example.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{
    Args, Parser, Subcommand,
    builder::{PossibleValue, PossibleValuesParser, TypedValueParser},
};
use observer_common::DEFAULT_MAX_TRACKED_SOCKETS;

/// A BPF hash map rounds its size up to a power of two buckets, at most 2^27 of them (the
/// kernel refuses more with E2BIG).
const MAX_TRACKED_SOCKETS: i64 = 1 << 27;
/// PID_MAX_LIMIT: no process id is higher.
const MAX_PID: i64 = 1 << 22;

use crate::{
    act::{Mode, manual::Request},
    commands::{check, kill, top, watch},
    detect::{
        Reason,
        thresholds::{Overrides, ThresholdValue, with_thresholds},
    },
    kernel::probes::ProbeChoice,
    snapshot::{Placement, WorkloadOptions, targets::Selector, workload::DEFAULT_POD_LOGS},
    units,
};

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
  observer check --config /etc/observer.toml             # validate a policy file
  observer kill --pid 4242 --cookie 8817 --mode shutdown # end one connection (cookie from an alert)
  observer watch --pid 4242 --action shutdown --action-on idle,slow_transfer --dry-run";

const KILL_EXAMPLES: &str = "\
Examples:
  observer kill --pid 4242 --cookie 8817                      # destroy, as `ss -K` does
  observer kill --pid 4242 --cookie 8817 --mode shutdown      # FIN; blocked threads see EOF
  observer kill --pid 4242 --local 10.0.0.5:8080 --remote 10.0.0.9:51234 --dry-run
  observer kill --pid 4242 --cookie 9120 --local 10.0.0.5:8080 --remote 10.0.0.9:51240
                                       # an orphan (its alert has no fd): all three keys

Prints one `action` line: result ok, already_gone, not_permitted, unsupported or failed.
Exits 0 only when the result is ok.";

const TOP_KEYS: &str = "\
Keys:
  Up/Down, PgUp/PgDn, Home/End   select a connection (its alert and numbers show below)
  i / b / t                      sort by idle time, bytes or state (again: reverse)
  /                              filter by text (addresses, state, process, thread, reason);
                                 Enter keeps it, Esc clears it
  s / d                          shut down / destroy the selected connection, after `y`
                                 (the same checks as `observer kill`)
  q, Ctrl-C                      quit

Example:
  observer top --pid $(pgrep -o nginx) --idle-timeout 30s --log /var/log/observer-top.jsonl";

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
    /// End one connection of a process: destroy it (as `ss -K`) or shut it down.
    ///
    /// The socket must be held by --pid and match the cookie and/or both addresses given; a
    /// socket that no longer matches is reported as already_gone and never touched. Listening
    /// sockets are refused. An orphan (a connection its application closed that still waits
    /// for its peer, alerted with "fd": null) is held by no process: it is ended (destroy only)
    /// when --cookie, --local and --remote all match it, in --pid's network namespace.
    #[command(after_help = KILL_EXAMPLES)]
    Kill(KillArgs),
    /// A live full-screen view of the watched connections: state, idle time, traffic, the
    /// thread stuck on each, its alert; end one from the screen.
    ///
    /// Same flags, engine and alerts as `watch`, refreshed every poll. Needs a terminal; for
    /// JSON lines use `watch`.
    #[command(after_help = TOP_KEYS)]
    Top(TopArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).multiple(true).args(["cookie", "local"])))]
pub struct KillArgs {
    /// The process holding the socket (for an orphan, the one that held it, as its alert says).
    #[arg(long, value_name = "PID", value_parser = clap::value_parser!(u32).range(1..=MAX_PID))]
    pub pid: u32,

    /// The socket's cookie, as an alert's `cookie` field (or `ss -e`) gives it.
    #[arg(long, value_name = "COOKIE")]
    pub cookie: Option<u64>,

    /// The connection's local address, as an alert's `local` (e.g. 10.0.0.5:8080, [::1]:8080).
    #[arg(long, value_name = "ADDR", requires = "remote")]
    pub local: Option<SocketAddr>,

    /// The connection's remote address, as an alert's `remote`.
    #[arg(long, value_name = "ADDR", requires = "local")]
    pub remote: Option<SocketAddr>,

    /// destroy: SOCK_DESTROY (peer gets a reset, blocked threads ECONNABORTED; needs
    /// CAP_NET_ADMIN). shutdown: shutdown(SHUT_RDWR) on a copy of the fd (peer gets a FIN,
    /// blocked threads EOF/EPIPE and the application closes normally; needs ptrace access).
    #[arg(long, value_name = "MODE", default_value = "destroy", value_parser = mode())]
    pub mode: Mode,

    /// Find and check the socket, change nothing.
    #[arg(long)]
    pub dry_run: bool,

    #[command(flatten)]
    pub placement: PlacementArgs,
}

/// Where the agent runs and where the node keeps pod logs: what names each socket's pod.
#[derive(Debug, Args)]
pub struct PlacementArgs {
    /// The node's name, put on every alert, clear and action as `node` (Kubernetes: NODE_NAME
    /// from the Downward API, spec.nodeName).
    #[arg(long, value_name = "NAME", env = "NODE_NAME", help_heading = "Kubernetes")]
    pub node_name: Option<String>,

    /// The agent's own pod (POD_NAME from the Downward API, metadata.name). Without
    /// --all-namespaces, sockets of processes in the agent's network namespace (a sidecar's
    /// neighbours) carry it as `pod`, when no pod log names their pod.
    #[arg(long, value_name = "NAME", env = "POD_NAME", help_heading = "Kubernetes")]
    pub pod_name: Option<String>,

    /// The agent's own pod's namespace (POD_NAMESPACE, metadata.namespace), as `namespace`
    /// beside --pod-name.
    #[arg(long, value_name = "NAME", env = "POD_NAMESPACE", help_heading = "Kubernetes")]
    pub pod_namespace: Option<String>,

    /// The kubelet's pod log directory, whose entries <namespace>_<pod>_<uid> name the pod of
    /// each pod uid a process's cgroup shows (mount it read-only into the agent's container).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_POD_LOGS, env = "OBSERVER_POD_LOGS",
          help_heading = "Kubernetes")]
    pub pod_logs: PathBuf,
}

impl PlacementArgs {
    fn options(&self, all_namespaces: bool) -> WorkloadOptions {
        WorkloadOptions {
            placement: Placement {
                node: self.node_name.clone(),
                pod: self.pod_name.clone(),
                namespace: self.pod_namespace.clone(),
            },
            pod_logs: self.pod_logs.clone(),
            all_namespaces,
        }
    }
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Also validate this policy file; a bad file fails the check with its line and reason.
    #[arg(long, value_name = "FILE", env = "OBSERVER_CONFIG")]
    pub config: Option<PathBuf>,

    /// Check that `watch --pid PID` could inspect this process (repeat for several). Without
    /// --pid or --comm, every process `watch` would look at is checked.
    #[arg(long = "pid", value_name = "PID", env = "OBSERVER_PID", value_delimiter = ',',
          value_parser = clap::value_parser!(u32).range(1..=MAX_PID))]
    pub pids: Vec<u32>,

    /// Check the processes `watch --comm NAME` would watch now (repeat for several).
    #[arg(long = "comm", value_name = "NAME", env = "OBSERVER_COMM", value_delimiter = ',')]
    pub comms: Vec<String>,
}

/// What to watch and how: the selectors, thresholds, policy file and probe settings `watch` and
/// `top` share, so both run the same engine on the same command line.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("selector").multiple(true).args(["pids", "comms"])))]
pub struct EngineArgs {
    /// Watch the TCP sockets of this process and of every process it forks, now or later
    /// (repeat for several; comma-separated in OBSERVER_PID). Without --pid or --comm, every
    /// TCP socket in observer's network namespace is watched.
    ///
    /// The pid is the one `ps` shows next to observer: in a container sharing the server's
    /// processes, the container's own numbering. Once every watched process is gone, `watch`
    /// exits (after a `target_exited` event per pid) and `top` says so. Example: --pid 4242
    #[arg(long = "pid", value_name = "PID", env = "OBSERVER_PID", value_delimiter = ',',
          value_parser = clap::value_parser!(u32).range(1..=MAX_PID))]
    pub pids: Vec<u32>,

    /// Node mode: watch every TCP socket in every network namespace of the machine (each
    /// container's and pod's), found through /proc/*/ns/net at every poll, so that namespaces
    /// created later are watched from the next poll on. Needs the host's processes in view
    /// (Kubernetes: hostPID) and CAP_SYS_ADMIN to enter the namespaces. Combines with --port,
    /// --comm and --config.
    #[arg(long, env = "OBSERVER_ALL_NAMESPACES", conflicts_with = "pids")]
    pub all_namespaces: bool,

    /// With --pid: watch only the named processes, not what they fork.
    #[arg(long, env = "OBSERVER_PID_ONLY", requires = "pids")]
    pub pid_only: bool,

    /// Watch every process named NAME (exactly /proc/PID/comm, as `ps -o comm` shows it; repeat
    /// for several), including ones that start later, such as a restarted server. Keeps running
    /// while none runs. Example: --comm nginx
    #[arg(long = "comm", value_name = "NAME", env = "OBSERVER_COMM", value_delimiter = ',')]
    pub comms: Vec<String>,

    /// Only watch connections whose local or remote port is PORT (repeat for several).
    ///
    /// Example: --port 8080 --port 8443
    #[arg(long = "port", value_name = "PORT", env = "OBSERVER_PORT", value_delimiter = ',',
          value_parser = clap::value_parser!(u16).range(1..))]
    pub ports: Vec<u16>,

    /// How often to look at the sockets. Alerts come at most one interval after a connection
    /// crosses its threshold. Examples: 500ms, 1s, 5s
    #[arg(long, value_name = "DURATION", default_value = "1s", env = "OBSERVER_POLL_INTERVAL",
          value_parser = units::poll_interval)]
    pub poll_interval: Duration,

    /// Which probes to use. auto: the best this kernel allows, trying fentry, then kprobe, then
    /// tracepoint (`observer check` shows what works here and why).
    #[arg(long, value_name = "BACKEND", default_value = "auto", env = "OBSERVER_PROBES",
          value_parser = probe_choice())]
    pub probes: ProbeChoice,

    /// Policy file: thresholds and ignored reasons per local port, remote CIDR, pid or
    /// program (see README). Threshold flags given here override it.
    #[arg(long, value_name = "FILE", env = "OBSERVER_CONFIG")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub thresholds: ThresholdFlags,

    /// Print a `stats` event with the agent's own health (sockets seen, poll time, probe
    /// counters, sockets the probes failed to track) this often (`top`: into its --log file);
    /// 0 turns it off.
    #[arg(long, value_name = "DURATION", default_value = "60s", env = "OBSERVER_STATS_INTERVAL",
          value_parser = units::duration)]
    pub stats_interval: Duration,

    /// Also time each watched thread's socket syscalls (needs --pid or --comm): gives
    /// `blocked_ms` on kernels where only the tracepoint backend works, and counts accept()
    /// failures for lack of fds. It hooks every syscall of the machine: see docs/benchmarks.md
    /// for what it costs.
    #[arg(long, requires = "selector", env = "OBSERVER_SYSCALL_TIMING")]
    pub syscall_timing: bool,

    /// Do not follow the watched threads' context switches. On the tracepoint backend that is
    /// how `blocked_ms` is timed without syscall hooks (from the thread's last sleep); it
    /// costs each context switch of the machine a check, and each of a watched thread a clock
    /// read and a map update (see docs/benchmarks.md). Without it, and without
    /// --syscall-timing, tracepoint alerts name blocked threads but not for how long.
    #[arg(long, env = "OBSERVER_NO_SLEEP_TIMING")]
    pub no_sleep_timing: bool,

    /// Measure each probe's kernel run time (enables kernel BPF statistics while running,
    /// which adds a few ns per event) and report it per program in `stats` as `probe_cost`.
    #[arg(long, env = "OBSERVER_PROBE_STATS")]
    pub probe_stats: bool,

    /// Capacity of the kprobe backend's socket table, 64 to 134217728 (the most a BPF hash
    /// map takes). Sockets beyond it are not tracked by the probes (their alerts then rely on
    /// the kernel's own counters) and are counted as `track_failed` in `stats`. The fentry and
    /// tracepoint backends keep activity on the socket itself and have no such limit.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_TRACKED_SOCKETS,
          env = "OBSERVER_MAX_SOCKETS",
          value_parser = clap::value_parser!(u32).range(64..=MAX_TRACKED_SOCKETS))]
    pub max_sockets: u32,

    #[command(flatten)]
    pub placement: PlacementArgs,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub engine: EngineArgs,

    /// End connections whose alert stands for one of the --action-on reasons, by this mode
    /// (see `observer kill --help`). Listening sockets are never acted on.
    #[arg(long, value_name = "MODE", requires = "action_on", env = "OBSERVER_ACTION",
          value_parser = mode())]
    pub action: Option<Mode>,

    /// Reasons to act on, comma-separated: idle, slow_transfer, blocked_send, retransmitting,
    /// close_wait, keepalive_missing, connect_stalled, closing_stalled (an orphan, closed by its
    /// application, has no fd left: only destroy ends it). Example: --action-on idle,slow_transfer
    #[arg(long, value_name = "REASONS", value_delimiter = ',', value_parser = actionable_reason,
          requires = "action", env = "OBSERVER_ACTION_ON")]
    pub action_on: Vec<Reason>,

    /// Act only once an alert has stood this long. Example: 5m
    #[arg(long, value_name = "DURATION", default_value = "0s", env = "OBSERVER_ACTION_AFTER",
          value_parser = units::duration)]
    pub action_after: Duration,

    /// Never end more than this many connections in any minute (1 to 10000); the rest wait
    /// their turn.
    #[arg(long, value_name = "N", default_value_t = 10, env = "OBSERVER_MAX_ACTIONS_PER_MINUTE",
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_actions_per_minute: u32,

    /// Print the `action` lines --action would produce, change nothing.
    #[arg(long, requires = "action", env = "OBSERVER_DRY_RUN")]
    pub dry_run: bool,

    /// Serve Prometheus metrics on http://ADDR:PORT/metrics, with /healthz (200 while polls
    /// succeed, 503 and why when none has in 3 poll intervals) and /readyz (200 once the probes
    /// are attached and the first poll is done). Off unless given; see README for the metrics.
    /// Example: --metrics-addr 127.0.0.1:9464 (0.0.0.0:9464 for every interface)
    #[arg(long, value_name = "ADDR:PORT", env = "OBSERVER_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub engine: EngineArgs,

    /// Also append what `watch` would print (started, alerts, clears, stats) and an `action`
    /// line per connection ended from the screen to FILE, as JSON lines.
    #[arg(long, value_name = "FILE", env = "OBSERVER_TOP_LOG")]
    pub log: Option<PathBuf>,
}

/// One optional flag per threshold (see `detect::thresholds`); unset ones leave the policy
/// file's value, or the default, in force.
macro_rules! threshold_flags {
    ({} $( $name:ident : $ty:ty = $default:expr, $help:literal; )*) => {
        #[derive(Debug, Default, Args, PartialEq)]
        pub struct ThresholdFlags {
            $(
                #[arg(
                    long,
                    env = env_name(stringify!($name)),
                    value_name = <$ty as ThresholdValue>::VALUE_NAME,
                    value_parser = <$ty as ThresholdValue>::parse,
                    help = format!(
                        "[default: {}] {}",
                        ThresholdValue::show(crate::detect::thresholds::DEFAULT_THRESHOLDS.$name),
                        $help
                    ),
                )]
                pub $name: Option<$ty>,
            )*
        }

        impl ThresholdFlags {
            /// The thresholds given on the command line; they win over the policy file.
            pub fn overrides(&self) -> Overrides {
                Overrides { $( $name: self.$name, )* }
            }
        }
    };
}
with_thresholds!(threshold_flags {});

/// The program: parses the command line (usage errors exit 2 with clap's message and a pointer
/// to --help), runs the command, and prints any error as one line with its whole cause chain.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::kernel::system::map_large_allocations();
    // `top` owns the terminal while it draws: logs wait in memory meanwhile (see top::Logs).
    let logs = top::Logs::default();
    let target = match cli.command {
        Command::Top(_) => env_logger::Target::Pipe(Box::new(logs.clone())),
        _ => env_logger::Target::Stderr,
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(target)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("observer: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, logs)) {
        Ok(code) => code,
        Err(err) => {
            // One line, whole cause chain, no backtrace.
            eprintln!("observer: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the command the command line names; errors come back for `main` to print as one line.
async fn run(cli: Cli, logs: top::Logs) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Watch(args) => watch::run(args.options()).await.map(|()| ExitCode::SUCCESS),
        Command::Kill(args) => kill::run(&args.options()),
        Command::Top(args) => top::run(args.options(), logs).await.map(|()| ExitCode::SUCCESS),
        Command::Check(args) => {
            let selector = Selector { pids: args.pids, descendants: false, comms: args.comms };
            let ready = check::run(&check::Options { config: args.config, selector })?;
            Ok(if ready { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}

/// `OBSERVER_` and the flag's name in capitals: how containers pass flags.
fn env_name(flag: &str) -> &'static str {
    // Called once per threshold flag when the command line is built.
    Box::leak(format!("OBSERVER_{}", flag.to_uppercase()).into_boxed_str())
}

impl EngineArgs {
    /// The engine's options; `action` is `watch --action`'s part.
    pub fn options(&self, action: Option<watch::ActionOptions>) -> watch::Options {
        watch::Options {
            selector: Selector {
                pids: self.pids.clone(),
                descendants: !self.pid_only,
                comms: self.comms.clone(),
            },
            all_namespaces: self.all_namespaces,
            workloads: self.placement.options(self.all_namespaces),
            ports: self.ports.clone(),
            poll_interval: self.poll_interval,
            probes: self.probes,
            config: self.config.clone(),
            thresholds: self.thresholds.overrides(),
            stats_interval: self.stats_interval,
            action,
            syscall_timing: self.syscall_timing,
            sleep_timing: !self.no_sleep_timing,
            probe_stats: self.probe_stats,
            max_sockets: self.max_sockets,
            metrics_addr: None,
        }
    }
}

impl WatchArgs {
    pub fn options(&self) -> watch::Options {
        let action = self.action.map(|mode| watch::ActionOptions {
            mode,
            reasons: self.action_on.clone(),
            after: self.action_after,
            max_per_minute: self.max_actions_per_minute as usize,
            dry_run: self.dry_run,
        });
        watch::Options { metrics_addr: self.metrics_addr, ..self.engine.options(action) }
    }
}

impl TopArgs {
    pub fn options(&self) -> top::Options {
        top::Options { watch: self.engine.options(None), log: self.log.clone() }
    }
}

impl KillArgs {
    pub fn options(&self) -> kill::Options {
        kill::Options {
            request: Request {
                pid: self.pid,
                cookie: self.cookie,
                local: self.local,
                remote: self.remote,
                mode: self.mode,
                dry_run: self.dry_run,
            },
            workloads: self.placement.options(false),
        }
    }
}

/// `--mode` and `--action` values, each with what it does.
fn mode() -> impl TypedValueParser<Value = Mode> {
    let values = Mode::ALL.map(|m| PossibleValue::new(m.name()).help(m.description()));
    PossibleValuesParser::new(values).try_map(|name| name.parse::<Mode>())
}

/// `--probes` values.
fn probe_choice() -> impl TypedValueParser<Value = ProbeChoice> {
    let values = ProbeChoice::ALL.map(|c| PossibleValue::new(c.name()));
    PossibleValuesParser::new(values).try_map(|name| name.parse::<ProbeChoice>())
}

/// Reasons that name one connection, which can be ended. Listener overflows, resets (already
/// ended) and fd exhaustion (a process) cannot.
fn actionable_reason(text: &str) -> Result<Reason, String> {
    let reason: Reason = text.trim().parse()?;
    match reason {
        Reason::AcceptQueueOverflow
        | Reason::ResetUnread
        | Reason::FdPressure
        | Reason::AcceptSpinning => Err(format!(
            "{reason} cannot be acted on: it is not a live connection observer may end"
        )),
        _ => Ok(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn watch_defaults() {
        let cli = Cli::try_parse_from(["observer", "watch"]).unwrap();
        let Command::Watch(watch) = cli.command else { panic!("not watch") };
        assert_eq!(watch.metrics_addr, None, "metrics are off unless asked for");
        let w = watch.engine;
        assert!(w.pids.is_empty() && w.ports.is_empty());
        assert_eq!(w.poll_interval, Duration::from_secs(1));
        assert_eq!(
            w.thresholds.overrides(),
            Overrides::default(),
            "unset flags leave the policy alone"
        );
        assert_eq!(w.probes, ProbeChoice::Auto);
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
            "--retrans-timeout",
            "2s",
            "--metrics-addr",
            "[::1]:9464",
        ])
        .unwrap();
        let Command::Watch(watch) = cli.command else { panic!("not watch") };
        assert_eq!(watch.options().metrics_addr, Some("[::1]:9464".parse().unwrap()));
        let w = watch.engine;
        assert_eq!(w.pids, vec![10, 11]);
        assert_eq!(w.ports, vec![8080]);
        assert_eq!(w.poll_interval, Duration::from_millis(250));
        let given =
            Overrides { retrans_timeout: Some(Duration::from_secs(2)), ..Overrides::default() };
        assert_eq!(w.thresholds.overrides(), given);
    }

    #[test]
    fn usage_errors_are_exit_code_2() {
        for args in [
            vec!["observer", "watch", "--pid", "abc"],
            vec!["observer", "watch", "--pid", "0"],
            vec!["observer", "watch", "--idle-timeout", "5"],
            vec!["observer", "watch", "--bogus"],
            vec!["observer", "watch", "--fd-threshold", "1.5"],
            vec!["observer", "watch", "--action", "destroy"],
            vec!["observer", "watch", "--action-on", "idle"],
            vec![
                "observer",
                "watch",
                "--action",
                "destroy",
                "--action-on",
                "accept_queue_overflow",
            ],
            vec!["observer", "watch", "--action", "destroy", "--action-on", "accept_spinning"],
            vec!["observer", "watch", "--action", "destroy", "--action-on", "idel"],
            vec!["observer", "watch", "--spin-cpu", "0"],
            vec!["observer", "watch", "--connect-timeout", "0s"],
            vec!["observer", "kill", "--pid", "1"],
            vec!["observer", "kill", "--pid", "1", "--local", "127.0.0.1:1"],
            vec!["observer", "kill", "--pid", "1", "--cookie", "5", "--mode", "nuke"],
            vec!["observer", "watch", "--probes", "ebpf"],
            vec!["observer", "watch", "--slow-min-rate", "-3"],
            vec!["observer", "watch", "--metrics-addr", "9464"],
            vec!["observer", "watch", "--metrics-addr", "localhost:9464"],
            vec!["observer"],
        ] {
            let err = Cli::try_parse_from(&args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn node_mode_and_placement_flags() {
        let cli = Cli::try_parse_from([
            "observer",
            "watch",
            "--all-namespaces",
            "--port",
            "8080",
            "--node-name",
            "node-1",
            "--pod-logs",
            "/srv/pods",
        ])
        .unwrap();
        let Command::Watch(w) = cli.command else { panic!("not watch") };
        let options = w.options();
        assert!(options.all_namespaces && options.workloads.all_namespaces);
        assert_eq!(options.workloads.placement.node.as_deref(), Some("node-1"));
        assert_eq!(options.workloads.pod_logs, PathBuf::from("/srv/pods"));
        let err = Cli::try_parse_from(["observer", "watch", "--all-namespaces", "--pid", "1"])
            .unwrap_err();
        assert_eq!(err.exit_code(), 2, "--pid already follows its process's namespace");
    }

    #[test]
    fn kill_and_action_flags() {
        let cli = Cli::try_parse_from([
            "observer",
            "kill",
            "--pid",
            "7",
            "--local",
            "[::1]:80",
            "--remote",
            "[::1]:5000",
        ])
        .unwrap();
        let Command::Kill(k) = cli.command else { panic!("not kill") };
        assert_eq!((k.pid, k.cookie, k.mode, k.dry_run), (7, None, Mode::Destroy, false));
        assert_eq!(k.local.unwrap().to_string(), "[::1]:80");
        let cli = Cli::try_parse_from([
            "observer",
            "watch",
            "--action",
            "shutdown",
            "--action-on",
            "idle,close_wait,connect_stalled,closing_stalled",
            "--dry-run",
        ])
        .unwrap();
        let Command::Watch(w) = cli.command else { panic!("not watch") };
        assert_eq!(w.action, Some(Mode::Shutdown));
        assert_eq!(
            w.action_on,
            vec![Reason::Idle, Reason::CloseWait, Reason::ConnectStalled, Reason::ClosingStalled]
        );
        assert!(w.dry_run);
        assert_eq!(w.max_actions_per_minute, 10);
    }

    #[test]
    fn top_takes_the_engine_flags_of_watch_and_builds_the_same_options() {
        let flags = [
            "--pid",
            "10",
            "--port",
            "8080",
            "--poll-interval",
            "250ms",
            "--idle-timeout",
            "5s",
            "--config",
            "policy.toml",
            "--syscall-timing",
            "--probes",
            "tracepoint",
        ];
        let parse = |command: &str, extra: &[&str]| {
            let head = ["observer", command];
            let args = head.iter().chain(&flags).chain(extra);
            Cli::try_parse_from(args).unwrap().command
        };
        let Command::Watch(watch) = parse("watch", &[]) else { panic!("not watch") };
        let Command::Top(top) = parse("top", &["--log", "top.jsonl"]) else { panic!("not top") };
        let top = top.options();
        assert_eq!(top.watch, watch.options(), "the same engine on the same flags");
        assert_eq!(top.log, Some(PathBuf::from("top.jsonl")));
        // Ending connections by policy is watch's; top ends them by hand.
        let err = Cli::try_parse_from(["observer", "top", "--action", "destroy"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn help_explains_every_flag() {
        Cli::command().debug_assert();
        let mut cmd = Cli::command();
        for sub in ["watch", "kill", "check", "top"] {
            let sub = cmd.find_subcommand_mut(sub).unwrap();
            for arg in sub.get_arguments() {
                assert!(arg.get_help().is_some(), "--{} has no help", arg.get_id());
            }
        }
    }
}
