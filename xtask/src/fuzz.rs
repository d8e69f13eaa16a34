//! `cargo xtask fuzz`: the parsers of outside input (the policy file, sock_diag's netlink
//! messages and tcp_info, /proc's stat and syscall lines, kernel BTF), each fed by libFuzzer
//! through cargo-fuzz for a while, from the committed corpus in fuzz/corpus.
use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context, Result};

use crate::{status, workspace_root};

pub const TARGETS: [&str; 4] = ["policy", "sock_diag", "procfs", "btf"];
const CARGO_FUZZ: &str = "0.13.2";

/// Runs every target for `each`. What it finds new goes to target/fuzz-corpus (the committed
/// corpus is only read: a run never rewrites tracked files); a crash fails the run, with the
/// input saved under fuzz/artifacts. Callers check the lock file first ([`check_lock`]).
pub fn run(each: Duration) -> Result<()> {
    ensure_cargo_fuzz()?;
    let fuzz = workspace_root().join("fuzz");
    for target in TARGETS {
        let found = workspace_root().join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&found)?;
        eprintln!("xtask: fuzzing {target} for {each:?}");
        status(
            Command::new("cargo")
                .args(["+nightly", "fuzz", "run", "--sanitizer", "none", "--debug-assertions"])
                .arg(target)
                .arg(&found)
                .arg(Path::new("corpus").join(target))
                .arg("--")
                .arg(format!("-max_total_time={}", each.as_secs().max(1)))
                .current_dir(&fuzz)
                // The fuzz targets need the parsers, not the BPF programs.
                .env("OBSERVER_EBPF", "stub"),
        )
        .with_context(|| {
            format!("fuzzing {target} found a failure (see fuzz/artifacts/{target})")
        })?;
    }
    Ok(())
}

/// The fuzz crate is a workspace of its own, whose lock file cargo would quietly rewrite when the
/// agent's dependencies move on: checked first, so that a test run fails naming the fix instead
/// of changing a tracked file.
pub fn check_lock() -> Result<()> {
    let fresh = Command::new("cargo")
        .args(["metadata", "--locked", "--format-version", "1", "--manifest-path"])
        .arg(workspace_root().join("fuzz/Cargo.toml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .context("running cargo metadata")?
        .success();
    if !fresh {
        anyhow::bail!(
            "fuzz/Cargo.lock no longer matches the agent's dependencies: run `cargo update \
             --manifest-path fuzz/Cargo.toml --workspace` and commit it"
        );
    }
    Ok(())
}

fn ensure_cargo_fuzz() -> Result<()> {
    let installed = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ));
    if installed {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ} (about a minute)");
    status(Command::new("cargo").args([
        "install",
        &format!("cargo-fuzz@{CARGO_FUZZ}"),
        "--locked",
        "--force",
    ]))
    .context("cannot install cargo-fuzz")
}
