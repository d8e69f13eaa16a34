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
        netns,
        privileges::{self, Cap, Caps, names},
        probes::{Backend, LoadOptions, Probes},
        procfs::{self, ProcError, ProcessTable},
        sock_diag::{DiagSocketHandle, SockId},
        system,
    },
    report::timestamp,
    snapshot::targets::{Selector, Targets},
};

/// What `observer check` was asked to check besides the machine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// A policy file to validate.
    pub config: Option<std::path::PathBuf>,
    /// The processes `watch` would be given; none: every process `watch` would look at.
    pub selector: Selector,
}

/// Runs every check, prints the report, and returns whether `watch` can run.
pub fn run(args: &Options) -> anyhow::Result<bool> {
    let caps = Caps::effective();
    let missing = caps.missing_to_load();
    let mut problems: Vec<String> = Vec::new();
    if !missing.is_empty() {
        problems.push(format!(
            "missing {} to load the probes: run observer as root or grant it {}",
            names(&missing),
            names(&[Cap::Bpf, Cap::Perfmon])
        ));
    }
    let blocked = privileges::seccomp_blocked();
    // Without perf_event_open only the kprobe backend is lost: the probe attempts below say so.
    let bpf_blocked = blocked.contains(&"bpf");
    if bpf_blocked {
        problems.push(format!(
            "a seccomp filter refuses {}: run the container with observer's profile \
             (deploy/seccomp.json; podman/docker --security-opt seccomp=deploy/seccomp.json)",
            blocked.join(" and ")
        ));
    }

    let config = args.config.as_ref().map(|path| match Policy::from_file(path) {
        // Shown, not serialized: a path need not be UTF-8.
        Ok(policy) => {
            json!({ "ok": true, "path": path.display().to_string(), "rules": policy.rules().len() })
        }
        Err(e) => {
            problems.push(e.to_string());
            json!({ "ok": false, "path": path.display().to_string(), "error": e.to_string() })
        }
    });
    let targets = targets_report(&args.selector, caps, &mut problems);
    if let Some(too_old) = system::too_old(&system::kernel_release()) {
        problems.push(too_old);
    }

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
            Ok(btf) if missing.is_empty() && !bpf_blocked => {
                system::raise_memlock_limit();
                let options = LoadOptions {
                    only: None,
                    max_sockets: 1024,
                    syscall_timing: false,
                    sleep_timing: false,
                    floor: false,
                };
                Probes::load(candidate, &options, btf)
                    .map(|p| {
                        if !p.notes().is_empty() {
                            notes.insert(candidate.name().into(), json!(p.notes()));
                        }
                    })
                    .map_err(|e| e.to_string())
            }
            Ok(_) if !bpf_blocked => Err("not tried: missing privileges".to_owned()),
            Ok(_) => Err("not tried: a seccomp filter refuses bpf".to_owned()),
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
    if backend.is_none() && missing.is_empty() && !bpf_blocked {
        let reasons: Vec<String> = probes
            .iter()
            .map(|(name, report)| format!("{name}: {}", report["error"].as_str().unwrap_or("?")))
            .collect();
        problems.push(format!("no probe backend can run ({})", reasons.join("; ")));
    }

    let capabilities: serde_json::Map<String, Value> = Cap::ALL
        .iter()
        .map(|&cap| (cap.name().to_owned(), json!({ "ok": caps.has(cap), "for": cap.purpose() })))
        .collect();
    let ready = problems.is_empty();
    let report = json!({
        "event": "check",
        "ts": timestamp(SystemTime::now()),
        "version": env!("CARGO_PKG_VERSION"),
        "kernel": system::kernel_release(),
        "root": nix::unistd::geteuid().is_root(),
        "uid": nix::unistd::geteuid().as_raw(),
        "capabilities": capabilities,
        "seccomp": { "mode": privileges::seccomp_mode(), "refuses": blocked },
        "btf": btf_report,
        "tracefs": {
            "mounted": system::tracefs_mounted(),
            "path": system::TRACEFS,
            "needed": false,
            "note": "the tracepoint backend attaches through BTF and does not need tracefs",
        },
        "probes": probes,
        "targets": targets,
        "actions": {
            "destroy": { "ok": caps.has(Cap::NetAdmin), "needs": [Cap::NetAdmin.name()] },
            "shutdown": {
                "ok": caps.has(Cap::SysPtrace),
                "needs": [Cap::SysPtrace.name()],
                "note": "a process of observer's own user can be shut down without it",
            },
        },
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

/// Whether `watch` could see the processes it would be given: their fds (another user's
/// process needs CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH) and their network namespaces
/// (another one needs CAP_SYS_ADMIN). Without a selector, every process of this pid namespace.
fn targets_report(selector: &Selector, caps: Caps, problems: &mut Vec<String>) -> Value {
    let pids: Vec<u32> = if selector.is_everything() {
        let mut table = ProcessTable::default();
        table.refresh().values().filter(|p| !p.kernel_thread && !p.zombie).map(|p| p.pid).collect()
    } else {
        match Targets::new(selector.clone()) {
            Ok(mut targets) => {
                targets.refresh();
                targets.pids()
            }
            Err(e) => {
                problems.push(e.to_string());
                return json!({ "ok": false, "error": e.to_string() });
            }
        }
    };
    let own_netns = netns::own().ok();
    let mut refused = Vec::new();
    let mut other_netns = Vec::new();
    for &pid in &pids {
        match procfs::check_access(pid) {
            Err(e @ ProcError::NotPermitted { .. }) => refused.push((pid, e.to_string())),
            // Gone meanwhile, or otherwise unreadable: watch copes with both.
            Err(_) => {}
            Ok(()) => {
                if !selector.is_everything() && netns::of_pid(pid).ok() != own_netns {
                    other_netns.push(pid);
                }
            }
        }
    }
    if let Some((_, first)) = refused.first() {
        let more = match refused.len() {
            1 => String::new(),
            n => format!(" (and {} more processes)", n - 1),
        };
        problems.push(format!("{first}{more}"));
    }
    if !other_netns.is_empty() && !caps.has(Cap::SysAdmin) {
        problems.push(format!(
            "pid {} lives in another network namespace: reading its sockets needs CAP_SYS_ADMIN \
             (run observer as root, or in the same network namespace as a sidecar is)",
            other_netns[0]
        ));
    }
    json!({
        "pids": pids.len(),
        "not_inspectable": refused.iter().map(|(pid, _)| pid).collect::<Vec<_>>(),
        "other_network_namespace": other_netns,
        "ok": refused.is_empty() && (other_netns.is_empty() || caps.has(Cap::SysAdmin)),
    })
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
