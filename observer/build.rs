//! Builds the eBPF programs (crate `observer-ebpf`) for the BPF target and leaves the object in
//! OUT_DIR, where `probes` embeds it.
//!
//! That needs a nightly toolchain with rust-src and bpf-linker. Editors, clippy and plain
//! `cargo build`/`cargo test` must work without them, so when they are missing (or
//! OBSERVER_EBPF=stub) an empty stub is embedded instead and the agent refuses to start with a
//! message naming `cargo xtask build`. `cargo xtask` sets OBSERVER_EBPF=require, which turns a
//! missing toolchain into a build error rather than a stub.
use std::{env, fs, path::PathBuf, process::Command};

const OBJECT: &str = "observer-probes";

fn main() -> anyhow::Result<()> {
    // `cargo fuzz` builds with --cfg fuzzing, which exposes the parsers to the fuzz targets.
    println!("cargo::rustc-check-cfg=cfg(fuzzing)");
    println!("cargo:rerun-if-env-changed=OBSERVER_EBPF");
    println!("cargo:rerun-if-env-changed=PATH");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let mode = env::var("OBSERVER_EBPF").unwrap_or_default();

    let missing =
        if mode == "stub" { Some("OBSERVER_EBPF=stub".to_owned()) } else { missing_toolchain() };
    if let Some(why) = missing {
        if mode == "require" {
            anyhow::bail!("cannot build the eBPF programs: {why}. Run `cargo xtask setup`.");
        }
        println!(
            "cargo:warning=eBPF programs not built ({why}); this observer binary cannot attach \
             probes. Use `cargo xtask build` for a working binary."
        );
        fs::write(out_dir.join(OBJECT), [])?;
        return Ok(());
    }

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let ebpf_dir = manifest_dir.join("../observer-ebpf");
    let common_dir = manifest_dir.join("../observer-common");
    // aya-build watches the eBPF crate; the shared types change the object too.
    println!("cargo:rerun-if-changed={}", common_dir.display());
    let ebpf_dir = ebpf_dir.to_str().expect("workspace path is UTF-8");
    aya_build::build_ebpf(
        [aya_build::Package { name: "observer-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}

/// Why the eBPF toolchain is unusable, if it is.
fn missing_toolchain() -> Option<String> {
    let found = |cmd: &mut Command| cmd.output().map(|o| o.status.success()).unwrap_or(false);
    if !found(Command::new("bpf-linker").arg("--version")) {
        return Some("bpf-linker is not installed".into());
    }
    if !found(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        return Some("no nightly Rust toolchain".into());
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        return Some("the nightly toolchain lacks rust-src".into());
    }
    None
}
