//! `cargo xtask vm-test`: the probe backends this machine's kernel refuses (fentry, kprobe) are
//! tested on ordinary distribution kernels instead: Debian's 6.1 cloud kernel and its 6.12 LTS
//! cloud kernel (bookworm-backports), each booted under qemu (software emulation) with an
//! initramfs holding the agent, the scenario program and the integration tests. The tests run
//! under every backend `observer check` finds to load there; per-test results are parsed from
//! the serial console into a kernel support table (README.md's, when `vm-test` is asked for).
mod initramfs;
mod kernel;
mod report;

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

pub use report::VmResults;

use crate::workspace_root;

pub const BACKENDS: [&str; 3] = ["fentry", "kprobe", "tracepoint"];
/// A kernel's run takes about 4½ minutes and the guest ends a hung suite itself
/// (`initramfs::SUITE_LIMIT_SECS`); this only bounds a guest that stops altogether.
const VM_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// One integration-test binary and the tests of it the guest runs.
pub struct Suite {
    pub name: &'static str,
    pub tests: &'static [&'static str],
    /// Does not depend on the probes: run under the first backend that loads only.
    pub once: bool,
}

/// Where a kernel's package comes from.
pub enum Apt {
    /// The host's own apt sources.
    System,
    /// One suite the host's sources may lack, through a private apt configuration.
    Suite { uri: &'static str, suite: &'static str },
}

pub struct Kernel {
    /// What `--kernel` takes, and the version its package name must start with.
    pub name: &'static str,
    /// For the README table's header.
    pub what: &'static str,
    pub apt: Apt,
    pub suites: &'static [Suite],
}

/// The scenarios, by test binary. (Tests that build network namespaces with nftables run on
/// the host only.)
const SCENARIOS: &[Suite] = &[
    Suite {
        name: "watch",
        tests: &[
            "idle_client_is_alerted_with_pid_fd_addresses_and_thread",
            "connection_that_keeps_exchanging_data_is_never_alerted",
            "killing_the_target_reports_target_exited_and_exits_zero",
            "a_full_socket_map_counts_each_untracked_socket_once_and_says_so",
        ],
        once: false,
    },
    Suite {
        name: "detect",
        tests: &[
            "peer_that_stops_reading_blocks_the_server_in_write",
            "blocked_writer_is_timed_by_the_probes_the_backend_has",
            "blocked_writer_watched_by_pid_is_timed_on_every_backend",
            "peer_that_vanishes_on_loopback_is_retransmitting",
            "slow_loris_client_is_a_slow_transfer",
            "application_that_never_closes_leaks_close_wait",
            "closing_with_unread_request_bytes_resets_the_response",
            "listener_whose_accept_loop_stalls_overflows_its_queue",
            "process_running_out_of_fds_is_fd_pressure",
        ],
        once: false,
    },
    Suite {
        name: "detect_more",
        tests: &[
            "connect_to_a_listener_whose_queue_is_full_stalls_and_one_answered_in_time_does_not",
            "response_closed_on_a_peer_that_does_not_read_never_finishes_closing",
            "accept_loop_that_retries_emfile_at_once_spins_and_one_that_backs_off_does_not",
        ],
        once: false,
    },
    Suite {
        name: "act",
        tests: &[
            "destroy_unblocks_a_thread_blocked_in_read_and_resets_the_client",
            "shutdown_unblocks_a_thread_blocked_in_read_with_eof_and_fins_the_client",
            "both_modes_end_a_connect_that_gets_no_answer_and_the_caller_sees_it_fail",
            "an_orphan_that_cannot_close_is_destroyed_and_shutdown_says_it_has_no_fd",
            "kill_ends_an_orphan_only_when_named_by_cookie_and_both_addresses",
        ],
        once: true,
    },
];

/// Both kernels run every scenario: each takes 250-300 s on a 2-core machine, so the whole VM
/// stage stays near 10 minutes, inside CI's budget; a detection subset for 6.1 is not needed.
pub const KERNELS: [Kernel; 2] = [
    Kernel { name: "6.1", what: "Debian 12 cloud kernel", apt: Apt::System, suites: SCENARIOS },
    Kernel {
        name: "6.12",
        what: "Debian 12 backports cloud kernel",
        apt: Apt::Suite { uri: "http://deb.debian.org/debian", suite: "bookworm-backports" },
        suites: SCENARIOS,
    },
];

/// `vm-test [--kernel 6.1|6.12]`: the kernels to boot.
pub fn parse_args(args: &[String]) -> Result<Vec<&'static Kernel>> {
    match args {
        [] => Ok(KERNELS.iter().collect()),
        [flag, name] if flag == "--kernel" => match KERNELS.iter().find(|k| k.name == name) {
            Some(k) => Ok(vec![k]),
            None => bail!(
                "unknown kernel {name}: choose one of {}",
                KERNELS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
            ),
        },
        _ => bail!("usage: cargo xtask vm-test [--kernel 6.1|6.12]"),
    }
}

/// Boots each kernel in turn and checks its results; fails after all of them ran if any failed.
pub fn run(
    observer: &Path,
    kernels: &[&'static Kernel],
) -> Result<Vec<(&'static Kernel, VmResults)>> {
    ensure_tools()?;
    let tests = build_tests()?;
    let scenario = workspace_root().join("target/release/scenario");
    let mut passed = Vec::new();
    let mut failures = Vec::new();
    for &kernel in kernels {
        match run_one(kernel, observer, &scenario, &tests) {
            Ok(results) => passed.push((kernel, results)),
            Err(e) => {
                eprintln!("xtask: {e:#}");
                failures.push(format!("{e:#}"));
            }
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    Ok(passed)
}

fn run_one(
    kernel: &Kernel,
    observer: &Path,
    scenario: &Path,
    tests: &BTreeMap<String, PathBuf>,
) -> Result<VmResults> {
    let dir = workspace_root().join("target/vm").join(kernel.name);
    fs::create_dir_all(&dir)?;
    let unpacked = kernel::ensure(kernel, &dir)?;
    let image = dir.join("initramfs.cpio");
    initramfs::build(&image, kernel, &unpacked.modules, observer, scenario, tests)?;
    let console = dir.join("console.log");
    boot(&unpacked.vmlinuz, &image, &console)?;
    let results = report::parse(&fs::read_to_string(&console)?);
    report::verify(kernel, &results, &console)?;
    Ok(results)
}

fn ensure_tools() -> Result<()> {
    let have =
        |cmd: &str| Command::new(cmd).arg("--version").output().is_ok_and(|o| o.status.success());
    let mut missing = Vec::new();
    if !have("qemu-system-x86_64") {
        missing.push("qemu-system-x86");
    }
    if !Path::new("/bin/busybox").exists() {
        missing.push("busybox-static");
    }
    if !have("xz") {
        missing.push("xz-utils");
    }
    if missing.is_empty() {
        return Ok(());
    }
    crate::setup::apt_install(&missing)
}

/// Builds the integration test binaries; returns them by suite name.
fn build_tests() -> Result<BTreeMap<String, PathBuf>> {
    let out = crate::cargo(&[
        "test",
        "--release",
        "--package",
        "observer-tests",
        "--no-run",
        "--message-format=json",
    ])
    .stderr(Stdio::inherit())
    .output()
    .context("building the test binaries")?;
    if !out.status.success() {
        bail!("building the test binaries failed");
    }
    let mut tests = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else { continue };
        let (Some(exe), Some(name)) = (msg["executable"].as_str(), msg["target"]["name"].as_str())
        else {
            continue;
        };
        if msg["target"]["kind"][0] == "test" {
            tests.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    Ok(tests)
}

fn boot(kernel: &Path, initramfs: &Path, console: &Path) -> Result<()> {
    eprintln!("xtask: booting {} under qemu (software emulation)", kernel.display());
    let mut child = Command::new("qemu-system-x86_64")
        // Without cx16: qemu 7.2's emulated cmpxchg16b sometimes leaves EFLAGS corrupt, and the
        // 6.12 kernel's SLUB, which uses it on every allocation, then crashed in about one boot
        // in four (double faults, #DB at kmem_cache_alloc); without it SLUB takes its locked
        // path and 100 of 100 boots came up.
        .args(["-accel", "tcg", "-cpu", "max,-cx16", "-m", "2048", "-smp", "2", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 quiet panic=-1", "-nographic", "-no-reboot"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().unwrap();
    let started = Instant::now();
    let log_path = console.to_path_buf();
    // Copy the console to the log (and progress lines to the terminal) as it comes.
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        let mut log = fs::File::create(log_path)?;
        let mut echo = ConsoleEcho::default();
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            use std::io::Write;
            writeln!(log, "{line}")?;
            if echo.shows(&line) {
                eprintln!("vm: {line}");
            }
        }
        Ok(())
    });
    let mut timed_out = false;
    while child.try_wait()?.is_none() {
        if started.elapsed() > VM_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    reader.join().expect("console reader").context("reading the VM console")?;
    if timed_out {
        // CI keeps only the terminal: the console's end says where the guest stopped.
        let text = fs::read_to_string(console).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for line in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("vm console: {line}");
        }
        eprintln!("xtask: the VM did not finish within {VM_TIMEOUT:?}; see {}", console.display());
    } else {
        eprintln!("xtask: VM finished in {:.0?}", started.elapsed());
    }
    Ok(())
}

/// Which console lines reach the terminal (CI keeps nothing else): suite results, libtest's
/// failure reports, and everything the guest prints about a hung suite.
#[derive(Default)]
struct ConsoleEcho {
    /// Inside a failure report or a hang dump: everything until the suite's result.
    reporting: bool,
}

impl ConsoleEcho {
    fn shows(&mut self, line: &str) -> bool {
        if line.contains("VMTEST-HUNG") || line.ends_with(": failures:") {
            self.reporting = true;
        }
        let shown = self.reporting
            || line.contains("VMTEST-RESULT")
            || line.contains("VMTEST-SKIP")
            || line.contains("test result:")
            || line.contains("FAILED")
            || line.contains("Kernel panic");
        if line.contains("VMTEST-RESULT") || line.contains("test result:") {
            self.reporting = false;
        }
        shown
    }
}

/// Writes the kernel support table from the host check and every kernel's run to
/// target/vm/kernel-support.md, and says whether README.md's differs.
pub fn report_support_table(
    host_check: &Value,
    host_tests_passed: bool,
    vms: &[(&Kernel, VmResults)],
) -> Result<()> {
    let table = report::support_table(host_check, host_tests_passed, vms);
    let path = workspace_root().join("target/vm/kernel-support.md");
    fs::create_dir_all(path.parent().context("no parent")?)?;
    fs::write(&path, &table)?;
    let readme = fs::read_to_string(workspace_root().join("README.md")).unwrap_or_default();
    if readme.contains(&table) {
        eprintln!("xtask: README.md's kernel support table matches this run");
    } else {
        eprintln!(
            "xtask: this run's kernel support table ({}) differs from README.md's: \
             `cargo xtask vm-test` rewrites it",
            path.display()
        );
    }
    Ok(())
}

/// Rewrites README.md's kernel support table from the host check and every kernel's run.
pub fn write_support_table(
    host_check: &Value,
    host_tests_passed: bool,
    vms: &[(&Kernel, VmResults)],
) -> Result<()> {
    report::write_support_table(&report::support_table(host_check, host_tests_passed, vms))
}

#[cfg(test)]
mod tests {
    use super::ConsoleEcho;

    #[test]
    fn the_terminal_gets_results_failure_reports_and_hang_dumps_only() {
        let console = [
            ("VMTEST-OUT fentry watch: test alpha ... ok", false),
            ("VMTEST-OUT fentry watch: failures:", true),
            ("VMTEST-OUT fentry watch: thread 'beta' panicked at tests/watch.rs:9:5", true),
            ("VMTEST-OUT fentry watch: test result: FAILED. 1 passed; 1 failed", true),
            ("VMTEST-RESULT fentry watch 101", true),
            ("[fentry watch stderr] noise", false),
            ("VMTEST-HUNG fentry detect after 300s", true),
            ("  PID  PPID STAT COMMAND", true),
            ("[  300.1] task:detect state:D", true),
            ("VMTEST-RESULT fentry detect 124", true),
            ("[  301.0] random kernel line", false),
        ];
        let mut echo = ConsoleEcho::default();
        for (line, shown) in console {
            assert_eq!(echo.shows(line), shown, "{line}");
        }
    }
}
