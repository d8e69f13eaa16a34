//! `observer check`: what this kernel and this process's privileges allow, proven by trying it
//! (loading and attaching the probes, destroying a socket of our own), printed as one JSON object.
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::SystemTime,
};

use serde_json::{Value, json};

use crate::{
    detect::Policy,
    kernel::{
        btf::{Btf, VMLINUX},
        probes::{Backend, LoadOptions, Probes},
        sock_diag::{DiagSocketHandle, SockId},
        system,
    },
    report::timestamp,
};

/// What `observer check` was asked to check besides the machine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// A policy file to validate.
    pub config: Option<std::path::PathBuf>,
}

/// Runs every check, prints the report, and returns whether `watch` can run.
pub fn run(args: &Options) -> anyhow::Result<bool> {
    let caps = system::effective_capabilities();
    let missing = system::missing_for_watch(caps);
    let mut problems: Vec<String> = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("missing {}: run observer as root", missing.join(", ")));
    }

    let config = args.config.as_ref().map(|path| match Policy::from_file(path) {
        Ok(policy) => json!({ "ok": true, "path": path, "rules": policy.rules().len() }),
        Err(e) => {
            problems.push(e.to_string());
            json!({ "ok": false, "path": path, "error": e.to_string() })
        }
    });

    let btf = Btf::from_kernel();
    let btf_report = match &btf {
        Ok(_) => json!({ "ok": true, "path": VMLINUX }),
        Err(e) => {
            problems
                .push(format!("{e}; observer needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"));
            json!({ "ok": false, "path": VMLINUX, "error": e.to_string() })
        }
    };

    let mut backend = None;
    let mut probes = serde_json::Map::new();
    let mut notes = serde_json::Map::new();
    for &candidate in Backend::ALL {
        let result = match &btf {
            Ok(btf) if missing.is_empty() => {
                system::raise_memlock_limit();
                let options = LoadOptions { only: None, max_sockets: 1024, syscall_timing: false };
                Probes::load(candidate, &options, btf)
                    .map(|p| {
                        if !p.notes().is_empty() {
                            notes.insert(candidate.name().into(), json!(p.notes()));
                        }
                    })
                    .map_err(|e| e.to_string())
            }
            Ok(_) => Err("not tried: missing privileges".to_owned()),
            Err(_) => Err("not tried: no kernel BTF".to_owned()),
        };
        let report = match result {
            Ok(()) => {
                backend.get_or_insert(candidate);
                json!({ "ok": true })
            }
            Err(e) => json!({ "ok": false, "error": e }),
        };
        probes.insert(candidate.name().into(), report);
    }
    if backend.is_none() {
        let reasons: Vec<String> = probes
            .iter()
            .map(|(name, report)| format!("{name}: {}", report["error"].as_str().unwrap_or("?")))
            .collect();
        problems.push(format!("no probe backend can run ({})", reasons.join("; ")));
    }

    let capabilities: serde_json::Map<String, Value> = system::CAPABILITIES
        .iter()
        .map(|(name, _, why)| {
            (name.to_string(), json!({ "ok": system::has_capability(caps, name), "for": why }))
        })
        .collect();
    let ready = problems.is_empty();
    let report = json!({
        "event": "check",
        "ts": timestamp(SystemTime::now()),
        "version": env!("CARGO_PKG_VERSION"),
        "kernel": system::kernel_release(),
        "root": nix::unistd::geteuid().is_root(),
        "capabilities": capabilities,
        "btf": btf_report,
        "tracefs": {
            "mounted": system::tracefs_mounted(),
            "path": system::TRACEFS,
            "needed": false,
            "note": "the tracepoint backend attaches through BTF and does not need tracefs",
        },
        "probes": probes,
        "sock_destroy": sock_destroy_report(),
        "config": config,
        "backend": backend.map(Backend::name),
        "backend_notes": notes,
        "ready": ready,
        "problems": problems,
    });
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, &report)?;
    writeln!(stdout)?;
    for problem in &problems {
        log::error!("{problem}");
    }
    Ok(ready)
}

/// Whether sock_diag SOCK_DESTROY works here, tried on a loopback connection of our own.
fn sock_destroy_report() -> Value {
    match try_sock_destroy() {
        Ok(()) => json!({ "ok": true }),
        Err(e) => json!({
            "ok": false,
            "error": e,
            "hint": "socket destroy needs CONFIG_INET_DIAG_DESTROY=y and CAP_NET_ADMIN; `kill --mode shutdown` works without it",
        }),
    }
}

fn try_sock_destroy() -> Result<(), String> {
    let text = |e: std::io::Error| e.to_string();
    let listener = TcpListener::bind("127.0.0.1:0").map_err(text)?;
    let mut client = TcpStream::connect(listener.local_addr().map_err(text)?).map_err(text)?;
    let (server, _) = listener.accept().map_err(text)?;
    let cookie = crate::kernel::socket_cookie(&server).map_err(text)?;
    let id = SockId {
        local: server.local_addr().map_err(text)?,
        remote: server.peer_addr().map_err(text)?,
        interface: 0,
        cookie,
    };
    let mut diag = DiagSocketHandle::open().map_err(|e| e.to_string())?;
    diag.destroy(&id).map_err(|e| e.to_string())?;
    // The peer of a destroyed socket gets a reset: prove the kernel really did it.
    let mut buf = [0u8; 1];
    match client.read(&mut buf) {
        Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => Ok(()),
        other => Err(format!(
            "destroy was accepted but the peer saw {other:?} instead of a reset (fd {})",
            server.as_raw_fd()
        )),
    }
}
