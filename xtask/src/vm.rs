//! `cargo xtask vm-test`: the probe backends this machine's kernel refuses (fentry, kprobe) are
//! tested on an ordinary distribution kernel instead: Debian's 6.1 cloud kernel, booted under
//! qemu (software emulation) with an initramfs holding the agent, the scenario program and the
//! integration tests. The scenarios run under every backend; the results are parsed from the
//! serial console and written into README.md's kernel support table.
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

use crate::{cpio::Cpio, status, workspace_root};

const KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";
const BACKENDS: [&str; 3] = ["fentry", "kprobe", "tracepoint"];
const VM_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The scenarios each backend must pass in the VM, by test binary. (Tests that build network
/// namespaces with nftables run on the host only.)
const SUITES: &[(&str, &[&str])] = &[
    (
        "watch",
        &[
            "idle_client_is_alerted_with_pid_fd_addresses_and_thread",
            "connection_that_keeps_exchanging_data_is_never_alerted",
            "killing_the_target_reports_target_exited_and_exits_zero",
        ],
    ),
    (
        "detect",
        &[
            "peer_that_stops_reading_blocks_the_server_in_write",
            "blocked_writer_is_timed_by_the_probes_the_backend_has",
            "peer_that_vanishes_on_loopback_is_retransmitting",
            "slow_loris_client_is_a_slow_transfer",
            "application_that_never_closes_leaks_close_wait",
            "closing_with_unread_request_bytes_resets_the_response",
            "listener_whose_accept_loop_stalls_overflows_its_queue",
            "process_running_out_of_fds_is_fd_pressure",
        ],
    ),
    (
        "act",
        &[
            "destroy_unblocks_a_thread_blocked_in_read_and_resets_the_client",
            "shutdown_unblocks_a_thread_blocked_in_read_with_eof_and_fins_the_client",
        ],
    ),
];

/// What the VM run found.
pub struct VmResults {
    pub kernel: String,
    /// `observer check` in the guest.
    pub check: Value,
    /// Backend -> suite -> passed.
    pub suites: BTreeMap<String, BTreeMap<String, bool>>,
}

pub fn run(observer: &Path) -> Result<VmResults> {
    ensure_tools()?;
    let dir = workspace_root().join("target/vm");
    fs::create_dir_all(&dir)?;
    let kernel = ensure_kernel(&dir)?;
    let tests = build_tests()?;
    let scenario = workspace_root().join("target/release/scenario");
    let initramfs = dir.join("initramfs.cpio");
    let modules = fs::read_dir(dir.join("kernel/lib/modules"))?
        .flatten()
        .map(|e| e.path())
        .next()
        .context("the kernel package has no modules")?;
    build_initramfs(&initramfs, &modules, observer, &scenario, &tests)?;
    let console = dir.join("console.log");
    boot(&kernel, &initramfs, &console)?;
    let results = parse(&fs::read_to_string(&console)?)?;
    report(&results, &console)?;
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
    if missing.is_empty() {
        return Ok(());
    }
    crate::setup::apt_install(&missing)
}

/// Debian's cloud kernel, extracted from its package (no install scripts run, nothing touches
/// the host's /boot).
fn ensure_kernel(dir: &Path) -> Result<PathBuf> {
    let unpacked = dir.join("kernel");
    if let Some(found) = find_vmlinuz(&unpacked) {
        return Ok(found);
    }
    // The meta-package names the current versioned kernel package.
    let depends = Command::new("apt-cache").args(["depends", KERNEL_PACKAGE]).output()?;
    let text = String::from_utf8_lossy(&depends.stdout);
    let package = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("linux-image-"))
        .map(str::to_owned)
        .with_context(|| format!("apt-cache knows no {KERNEL_PACKAGE}: run apt-get update"))?;
    eprintln!("xtask: downloading {package}");
    let download = || {
        Command::new("apt-get")
            .args(["download", &package])
            .current_dir(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !download() {
        let _ = Command::new("apt-get").arg("update").status();
        if !download() {
            bail!("cannot download {package} with apt-get");
        }
    }
    let deb = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&package)))
        .context("the downloaded kernel package is missing")?;
    status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    find_vmlinuz(&unpacked).context("no vmlinuz in the kernel package")
}

fn find_vmlinuz(unpacked: &Path) -> Option<PathBuf> {
    fs::read_dir(unpacked.join("boot"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
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

/// The shared libraries `ldd` says a binary needs.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output().context("running ldd")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn init_script() -> String {
    let mut script = String::from(
        r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
ip link set lo up
# sock_diag for TCP is a module in Debian's kernel; nothing here runs modprobe for us.
insmod /lib/modules/inet_diag.ko
insmod /lib/modules/tcp_diag.ko
set -o pipefail
echo "VMTEST-KERNEL $(uname -r)"
echo "VMTEST-CHECK $(/observer/observer check 2>/dev/null)"
export OBSERVER_BIN=/observer/observer
"#,
    );
    for backend in BACKENDS {
        for (suite, tests) in SUITES {
            // Ending connections does not depend on the probes: once is enough.
            if *suite == "act" && backend != BACKENDS[0] {
                continue;
            }
            script.push_str(&format!(
                "OBSERVER_PROBES={backend} /observer/deps/{suite} --test-threads=1 --exact {} 2>&1 \
                 | sed 's/^/[{backend}] /'\necho \"VMTEST-RESULT {backend} {suite} $?\"\n",
                tests.join(" ")
            ));
        }
    }
    script.push_str("echo VMTEST-END\npoweroff -f\n");
    script
}

fn build_initramfs(
    out: &Path,
    modules: &Path,
    observer: &Path,
    scenario: &Path,
    tests: &BTreeMap<String, PathBuf>,
) -> Result<()> {
    let mut archive = Cpio::new(std::io::BufWriter::new(fs::File::create(out)?));
    for dir in
        ["/bin", "/proc", "/sys", "/dev", "/tmp", "/observer", "/observer/deps", "/lib", "/lib64"]
    {
        archive.dir(dir)?;
    }
    archive.file("/bin/busybox", &fs::read("/bin/busybox")?)?;
    for applet in
        ["sh", "mount", "ip", "echo", "sed", "uname", "poweroff", "cat", "ls", "sleep", "insmod"]
    {
        archive.symlink(&format!("/bin/{applet}"), "busybox")?;
    }
    archive.file("/init", init_script().as_bytes())?;
    archive.dir("/lib/modules")?;
    for module in ["inet_diag", "tcp_diag"] {
        let path = modules.join(format!("kernel/net/ipv4/{module}.ko"));
        archive.file(
            &format!("/lib/modules/{module}.ko"),
            &fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )?;
    }
    let mut binaries = vec![(observer.to_path_buf(), "/observer/observer".to_owned())];
    binaries.push((scenario.to_path_buf(), "/observer/scenario".to_owned()));
    for (suite, _) in SUITES {
        let exe =
            tests.get(*suite).with_context(|| format!("test binary {suite} was not built"))?;
        binaries.push((exe.clone(), format!("/observer/deps/{suite}")));
    }
    let mut libraries = std::collections::BTreeSet::new();
    for (path, inside) in &binaries {
        archive.file(
            inside,
            &fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        )?;
        libraries.extend(shared_libraries(path)?);
    }
    let mut dirs = std::collections::BTreeSet::new();
    for lib in &libraries {
        let mut parent = lib.parent();
        while let Some(p) = parent.filter(|p| p != &Path::new("/")) {
            dirs.insert(p.to_path_buf());
            parent = p.parent();
        }
    }
    for dir in dirs
        .iter()
        .filter(|d| !["/lib", "/lib64", "/lib/modules"].contains(&d.to_str().unwrap_or("")))
    {
        archive.dir(&dir.to_string_lossy())?;
    }
    for lib in &libraries {
        // Follow symlinks: the archive holds the library itself under the name ldd printed.
        archive.file(&lib.to_string_lossy(), &fs::read(lib)?)?;
    }
    archive.finish()?;
    Ok(())
}

fn boot(kernel: &Path, initramfs: &Path, console: &Path) -> Result<()> {
    eprintln!("xtask: booting {} under qemu (software emulation)", kernel.display());
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "2", "-kernel"])
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
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            use std::io::Write;
            writeln!(log, "{line}")?;
            if line.starts_with("VMTEST-RESULT")
                || line.contains("test result:")
                || line.contains("FAILED")
            {
                eprintln!("vm: {line}");
            }
        }
        Ok(())
    });
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > VM_TIMEOUT {
            let _ = child.kill();
            bail!("the VM did not finish within {VM_TIMEOUT:?}; see {}", console.display());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    reader.join().expect("console reader").context("reading the VM console")?;
    eprintln!("xtask: VM finished in {:.0?}", started.elapsed());
    Ok(())
}

fn parse(console: &str) -> Result<VmResults> {
    let mut results =
        VmResults { kernel: String::new(), check: Value::Null, suites: BTreeMap::new() };
    let mut ended = false;
    for line in console.lines() {
        // Console lines can carry terminal escapes before the marker.
        if let Some(at) = line.find("VMTEST-") {
            let line = &line[at..];
            if let Some(k) = line.strip_prefix("VMTEST-KERNEL ") {
                results.kernel = k.trim().to_owned();
            } else if let Some(json) = line.strip_prefix("VMTEST-CHECK ") {
                results.check = serde_json::from_str(json.trim()).unwrap_or(Value::Null);
            } else if let Some(rest) = line.strip_prefix("VMTEST-RESULT ") {
                let parts: Vec<&str> = rest.split_whitespace().collect();
                if let [backend, suite, code] = parts[..] {
                    results
                        .suites
                        .entry(backend.to_owned())
                        .or_default()
                        .insert(suite.to_owned(), code == "0");
                }
            } else if line.starts_with("VMTEST-END") {
                ended = true;
            }
        }
    }
    if !ended {
        bail!(
            "the VM stopped before finishing its tests (no VMTEST-END); see target/vm/console.log"
        );
    }
    Ok(results)
}

fn report(results: &VmResults, console: &Path) -> Result<()> {
    let mut failed = Vec::new();
    for backend in BACKENDS {
        let suites = results.suites.get(backend);
        for (suite, _) in SUITES {
            if *suite == "act" && backend != BACKENDS[0] {
                continue;
            }
            match suites.and_then(|s| s.get(*suite)) {
                Some(true) => {}
                _ => failed.push(format!("{suite} under {backend}")),
            }
        }
    }
    let auto = results.check["backend"].as_str().unwrap_or("none");
    if auto != "fentry" {
        failed.push(format!("auto picked {auto}, not fentry"));
    }
    if !failed.is_empty() {
        bail!(
            "VM test failed on Linux {}: {}; see {}",
            results.kernel,
            failed.join(", "),
            console.display()
        );
    }
    eprintln!("xtask: VM test passed on Linux {} under {}", results.kernel, BACKENDS.join(", "));
    Ok(())
}

const TABLE_BEGIN: &str = "<!-- kernel-support:begin -->";
const TABLE_END: &str = "<!-- kernel-support:end -->";

/// What each backend needs, for the table.
fn needs(backend: &str) -> &'static str {
    match backend {
        "fentry" => "BTF, BPF trampolines (fentry/fexit, `bpf_get_func_ret`): Linux 5.17+",
        "kprobe" => "BTF, CONFIG_KPROBES (kprobe PMU): Linux 5.12+",
        _ => {
            "BTF tracepoints: Linux 5.12+; application send/receive times need 6.3+ (`sock_send_length`)"
        }
    }
}

fn host_cell(check: &Value, backend: &str, host_tests_passed: bool) -> String {
    let probe = &check["probes"][backend];
    if probe["ok"] == true {
        let chosen = check["backend"] == backend;
        match (chosen, host_tests_passed) {
            (true, true) => "loads; every integration test passes".into(),
            _ => "loads".into(),
        }
    } else {
        // "<backend> is unavailable on this kernel: <program> on <function>: <why>"
        let error = probe["error"].as_str().unwrap_or("unavailable");
        let why = error.splitn(3, ": ").nth(2).unwrap_or(error);
        format!("refused: {why}")
    }
}

fn vm_cell(results: &VmResults, backend: &str) -> String {
    let probe = &results.check["probes"][backend];
    let Some(suites) = results.suites.get(backend) else { return "not run".into() };
    let scenarios =
        |suite: &str| SUITES.iter().find(|(s, _)| *s == suite).map_or(0, |(_, t)| t.len());
    let run: usize = suites.keys().map(|s| scenarios(s)).sum();
    let passed: usize = suites.iter().filter(|(_, ok)| **ok).map(|(s, _)| scenarios(s)).sum();
    let mut cell = if probe["ok"] == true { "loads".to_owned() } else { "refused".to_owned() };
    cell.push_str(&format!("; {passed} of {run} scenarios pass"));
    if let Some(notes) = results.check["backend_notes"][backend].as_array()
        && !notes.is_empty()
    {
        cell.push_str(" (no send/receive tracepoints: times from tcp_info)");
    }
    cell
}

/// Rewrites README.md's kernel support table from what the host check and the VM run found.
pub fn write_support_table(
    host_check: &Value,
    host_tests_passed: bool,
    vm: &VmResults,
) -> Result<()> {
    let host_kernel = host_check["kernel"].as_str().unwrap_or("?");
    let mut table = format!(
        "| backend | needs | Linux {host_kernel} (the project's machines, CI) | Linux {} (Debian cloud kernel, qemu) |\n|---|---|---|---|\n",
        vm.kernel
    );
    for backend in BACKENDS {
        table.push_str(&format!(
            "| `{backend}` | {} | {} | {} |\n",
            needs(backend),
            host_cell(host_check, backend, host_tests_passed),
            vm_cell(vm, backend)
        ));
    }
    table.push_str(&format!(
        "| `auto` picks | | `{}` | `{}` |\n",
        host_check["backend"].as_str().unwrap_or("none"),
        vm.check["backend"].as_str().unwrap_or("none")
    ));
    let readme_path = workspace_root().join("README.md");
    let readme = fs::read_to_string(&readme_path)?;
    let (Some(begin), Some(end)) = (readme.find(TABLE_BEGIN), readme.find(TABLE_END)) else {
        bail!("README.md has no {TABLE_BEGIN} ... {TABLE_END} section");
    };
    let updated = format!("{}{TABLE_BEGIN}\n{table}{}", &readme[..begin], &readme[end..]);
    if updated != readme {
        fs::write(&readme_path, updated)?;
        eprintln!("xtask: updated the kernel support table in README.md");
    }
    Ok(())
}
