//! Project automation: `cargo xtask <command>`. Each command first sets up what it needs, so a
//! fresh machine goes from clone to running agent or passing tests with one command.
mod bench;
mod cpio;
mod fuzz;
mod image;
mod setup;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};

const USAGE: &str = "\
usage: cargo xtask <command>

  setup            install what building needs: nightly rust-src, bpf-linker; mount tracefs
  build            setup, then build target/release/observer (BPF programs embedded)
  run -- ARGS      build, then run target/release/observer ARGS (as root)
  image            build, then the OCI image observer:<version> and observer:latest (FROM
                   scratch, offline) into the local podman store, and docker's if it runs
  test             setup, lint, unit tests, build, the privileged integration tests, then vm-test
  bench [--smoke] [--only PART]
                   measure every performance figure against its baseline measured in the same
                   run (hot-path overhead on the echo server and nginx, per-event cost,
                   detection latency, churn, poll cost and memory at 10k-100k connections and a
                   late attach, top's drawing, node mode with 500 containers) and write
                   docs/benchmarks.md (~15 min). --smoke: toy sizes, seconds (CI).
                   --only hot-path|per-event|latency|scale|top|identity|churn: one part, report
                   not written
  fuzz [--seconds N]
                   feed each parser of outside input (policy file, sock_diag, /proc, BTF) to
                   libFuzzer for N seconds (default 300) from fuzz/corpus
  vm-test [--kernel 6.1|6.12]
                   boot Debian's 6.1 and 6.12 cloud kernels under qemu (or the one named) and run
                   the scenarios under every probe backend that loads there (fentry and kprobe do
                   not work on this machine's kernel); a run of every kernel rewrites README.md's
                   kernel support table";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup::run(),
        Some("build") => build().map(drop),
        Some("run") => run(&args[1..]),
        Some("image") => build().and_then(|binary| image::build(&binary)).map(drop),
        Some("test") => test(),
        Some("vm-test") => {
            vm::parse_args(&args[1..]).and_then(|k| vm_test(false, &k, SupportTable::Readme))
        }
        Some("fuzz") => fuzz::check_lock().and(fuzz_seconds(&args[1..])).and_then(fuzz::run),
        Some("bench") => bench::Options::parse(&args[1..]).and_then(bench),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A cargo command in the workspace that must build real BPF programs, never stubs.
pub fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args).current_dir(workspace_root()).env("OBSERVER_EBPF", "require");
    cmd
}

pub fn status(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

fn build() -> Result<PathBuf> {
    setup::run()?;
    status(&mut cargo(&["build", "--release", "--package", "observer"]))?;
    let binary = workspace_root().join("target/release/observer");
    eprintln!("xtask: built {}", binary.display());
    Ok(binary)
}

fn run(args: &[String]) -> Result<()> {
    let args = match args.first().map(String::as_str) {
        Some("--") => &args[1..],
        _ => args,
    };
    let binary = build()?;
    if !nix_is_root() {
        bail!("observer needs root: run `sudo -E cargo xtask run -- {}`", args.join(" "));
    }
    // Hand the terminal over: signals (Ctrl-C) reach the agent, and its exit code is ours.
    let status = Command::new(&binary).args(args).status().context("cannot start observer")?;
    std::process::exit(status.code().unwrap_or(1));
}

fn test() -> Result<()> {
    setup::run()?;
    status(&mut cargo(&["fmt", "--all", "--check"]))
        .context("code is not rustfmt-formatted: run `cargo fmt --all`")?;
    status(&mut cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    fuzz::check_lock()?;
    // Unit tests of the pure parts: no root needed.
    status(&mut cargo(&["test", "--workspace", "--exclude", "observer-tests"]))?;
    if !nix_is_root() {
        bail!(
            "the integration tests load BPF programs and need root: run `sudo -E cargo xtask test`"
        );
    }
    setup::test_tools()?;
    let binary = build()?;
    // The container tests run the image users would: built from this very binary.
    let [image, _] = image::build(&binary)?;
    status(
        cargo(&["test", "--release", "--package", "observer-tests"])
            .env("OBSERVER_BIN", &binary)
            .env("OBSERVER_IMAGE", &image),
    )?;
    vm_test(true, &vm::KERNELS.iter().collect::<Vec<_>>(), SupportTable::Report)?;
    // A short run for CI: the committed corpus replayed, and a little exploring.
    fuzz::run(std::time::Duration::from_secs(10))?;
    // The long benchmark is not for CI; its harness is, at toy sizes.
    setup::bench_tools()?;
    bench::run(bench::Options { smoke: true, only: None })?;
    eprintln!("xtask: all tests passed");
    Ok(())
}

/// Where a run of every kernel puts the kernel support table.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SupportTable {
    /// README.md (`cargo xtask vm-test`: asked for).
    Readme,
    /// target/vm/kernel-support.md only: a test run never rewrites tracked files.
    Report,
}

/// Runs the VM test on `kernels` and, when that is every kernel, writes what the host's kernel
/// and each of them support to `table`.
fn vm_test(
    host_tests_passed: bool,
    kernels: &[&'static vm::Kernel],
    table: SupportTable,
) -> Result<()> {
    if !nix_is_root() {
        bail!(
            "the VM test needs root (apt-get, and the host check loads BPF): run `sudo -E cargo xtask vm-test`"
        );
    }
    let binary = build()?;
    let check = Command::new(&binary).arg("check").output().context("running observer check")?;
    let host_check: serde_json::Value =
        serde_json::from_slice(&check.stdout).context("observer check printed no JSON")?;
    let results = vm::run(&binary, kernels)?;
    if results.len() < vm::KERNELS.len() {
        // The table has a column per kernel; one kernel's run cannot fill it.
        eprintln!(
            "xtask: README.md's kernel support table is only rewritten by a run of every kernel"
        );
        return Ok(());
    }
    match table {
        SupportTable::Readme => vm::write_support_table(&host_check, host_tests_passed, &results),
        SupportTable::Report => vm::report_support_table(&host_check, host_tests_passed, &results),
    }
}

fn fuzz_seconds(args: &[String]) -> Result<std::time::Duration> {
    let seconds = match args {
        [] => 300,
        [flag, n] if flag == "--seconds" => {
            n.parse().with_context(|| format!("--seconds takes a whole number, not '{n}'"))?
        }
        _ => bail!("usage: cargo xtask fuzz [--seconds N]"),
    };
    Ok(std::time::Duration::from_secs(seconds))
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn bench(opts: bench::Options) -> Result<()> {
    if !nix_is_root() {
        bail!("the benchmark loads BPF programs and needs root: run `sudo -E cargo xtask bench`");
    }
    setup::bench_tools()?;
    build()?;
    status(&mut cargo(&["build", "--release", "--package", "observer-tests", "--bins"]))?;
    bench::run(opts)
}
