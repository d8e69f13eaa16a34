//! `cargo xtask setup`: the BPF toolchain (a nightly with rust-src, and the bpf-linker release
//! built for that nightly's LLVM) and tracefs. Idempotent; it only installs what is missing.
use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::status;

/// bpf-linker releases by the LLVM major version they load from the nightly toolchain.
const BPF_LINKER_FOR_LLVM: &[(u32, &str)] = &[(22, "0.10.0")];

pub fn run() -> Result<()> {
    let llvm = nightly_llvm_major()?;
    ensure_rust_src()?;
    ensure_bpf_linker(llvm)?;
    mount_tracefs();
    Ok(())
}

/// Host tools the integration tests drive, installed if missing: iproute2 (`ip netns`),
/// nftables (`nft`, to make a peer vanish), util-linux (`unshare`, `nsenter`, `setpriv`),
/// podman with runc and busybox-static (containers), Prometheus's server and promtool (the
/// metrics tests), tmux (a terminal for `observer top`), nginx (a real pre-forking server), and
/// PyPI's kubernetes-validate (the Kubernetes API schemas, offline).
pub fn test_tools() -> Result<()> {
    let tools = [
        ("ip", "-V", "iproute2"),
        ("nft", "-V", "nftables"),
        ("setpriv", "--version", "util-linux"),
        ("podman", "--version", "podman"),
        ("runc", "--version", "runc"),
        ("busybox", "--help", "busybox-static"),
        ("promtool", "--version", "prometheus"),
        ("prometheus", "--version", "prometheus"),
        ("tmux", "-V", "tmux"),
        ("nginx", "-v", "nginx"),
    ];
    let mut missing: Vec<&str> = tools
        .into_iter()
        .filter(|(tool, flag, _)| output(Command::new(tool).arg(flag)).is_none())
        .map(|(_, _, package)| package)
        .collect();
    missing.dedup();
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    for service in ["prometheus", "nginx"] {
        if missing.contains(&service) {
            stop_packaged_service(service);
        }
    }
    let has_validator = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_validator {
        eprintln!("xtask: installing kubernetes-validate from PyPI");
        status(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "kubernetes-validate",
        ]))
        .context("cannot install kubernetes-validate with pip")?;
    }
    Ok(())
}

/// Debian's prometheus and nginx packages start their own servers (ports 9090, 80) where
/// services run; the tests and the benchmark run their own on free loopback ports, so the
/// packaged ones are only in the way. Stopped both under systemd and where there is none (CI
/// containers, whose policy-rc.d usually kept them from starting at all).
fn stop_packaged_service(name: &str) {
    let systemd = PathBuf::from("/run/systemd/system").is_dir();
    let stopped = if systemd {
        Command::new("systemctl").args(["stop", name]).status()
    } else {
        Command::new("service").args([name, "stop"]).status()
    };
    if !stopped.is_ok_and(|s| s.success()) {
        eprintln!("xtask: note: could not stop the {name} service (it may not be running)");
    }
}

/// What the benchmark's real-server row drives: Debian's nginx, loaded by wrk.
pub fn bench_tools() -> Result<()> {
    let missing: Vec<&str> = [("/usr/sbin/nginx", "nginx"), ("/usr/bin/wrk", "wrk")]
        .into_iter()
        .filter(|(path, _)| !PathBuf::from(path).exists())
        .map(|(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing)?;
    if missing.contains(&"nginx") {
        stop_packaged_service("nginx");
    }
    Ok(())
}

/// Installs Debian packages, refreshing the package lists once if needed.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    eprintln!("xtask: installing {}", packages.join(" "));
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    // A fresh machine may have no package lists yet.
    if !install() {
        let _ = Command::new("apt-get").arg("update").status();
        if !install() {
            bail!("cannot install {} with apt-get: install them and retry", packages.join(" "));
        }
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly_llvm_major() -> Result<u32> {
    let version = || output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]));
    let text = match version() {
        Some(text) => text,
        None => {
            eprintln!("xtask: no nightly toolchain; installing one (the BPF programs need it)");
            status(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))
            .context(
                "cannot install a nightly toolchain: install one with rustup (with rust-src)",
            )?;
            version().context("the nightly toolchain does not run")?
        }
    };
    text.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next()?.parse().ok())
        .context("cannot read the nightly's LLVM version from `rustc +nightly -vV`")
}

fn ensure_rust_src() -> Result<()> {
    let sysroot =
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
            .context("cannot find the nightly sysroot")?;
    if PathBuf::from(sysroot.trim()).join("lib/rustlib/src/rust/library/core").exists() {
        return Ok(());
    }
    eprintln!("xtask: adding rust-src to the nightly toolchain");
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn ensure_bpf_linker(llvm: u32) -> Result<()> {
    let Some(&(_, wanted)) = BPF_LINKER_FOR_LLVM.iter().find(|(major, _)| *major == llvm) else {
        bail!(
            "the nightly toolchain uses LLVM {llvm}, and xtask knows no bpf-linker release for it; \
             find the bpf-linker release built for LLVM {llvm} and add it to BPF_LINKER_FOR_LLVM \
             in xtask/src/setup.rs"
        );
    };
    let installed = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if installed.split_whitespace().any(|word| word == wanted) {
        return Ok(());
    }
    eprintln!("xtask: installing bpf-linker {wanted} (for LLVM {llvm}; takes about 2 minutes)");
    status(Command::new("cargo").args([
        "install",
        &format!("bpf-linker@{wanted}"),
        "--locked",
        "--force",
    ]))
    .context("cannot install bpf-linker")
}

/// The tracepoint backend does not need tracefs, but people inspecting tracepoint formats do,
/// and this machine kind does not mount it at boot.
fn mount_tracefs() {
    if PathBuf::from("/sys/kernel/tracing/events").is_dir() {
        return;
    }
    let mounted = Command::new("mount")
        .args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("xtask: note: could not mount tracefs at /sys/kernel/tracing (not root?)");
    }
}
