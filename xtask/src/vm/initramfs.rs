//! The guest: an initramfs with busybox, the agent, the scenario program and the test binaries
//! (plus the shared libraries `ldd` lists), and an /init that runs the tests and powers off.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use super::{BACKENDS, Kernel, kernel};
use crate::cpio::Cpio;

/// sock_diag for TCP is modular in Debian's kernels, and nothing in the guest runs modprobe.
const MODULES: [&str; 2] = ["net/ipv4/inet_diag", "net/ipv4/tcp_diag"];

/// A suite that runs longer than this is hung (the longest takes about a minute under
/// emulation): the guest dumps its blocked tasks, kills it and goes on with the next one.
pub const SUITE_LIMIT_SECS: u32 = 300;

/// Runs one suite under the watchdog: `run_suite BACKEND SUITE TEST...`. Every line it prints
/// goes to the console as `VMTEST-OUT <backend> <suite>: <line>` so the host can attribute
/// libtest's per-test lines; a hang prints `VMTEST-HUNG`, the processes and the kernel's blocked
/// tasks (sysrq w) between it and the suite's `VMTEST-RESULT`, then kills every process but
/// this one so the next suite starts clean.
const RUN_SUITE: &str = r#"run_suite() {
  backend=$1; suite=$2; shift 2
  rm -f /tmp/rc
  ( OBSERVER_PROBES=$backend /observer/deps/$suite --exact "$@" --test-threads=1 2>/tmp/stderr \
      | sed "s/^/VMTEST-OUT $backend $suite: /"; echo $? >/tmp/rc ) &
  waited=0
  # The runner writes /tmp/rc as its last act (a finished child can linger as a zombie).
  while [ ! -s /tmp/rc ] && [ $waited -lt $SUITE_LIMIT ]; do
    sleep 1; waited=$((waited + 1))
  done
  if [ ! -s /tmp/rc ]; then
    echo "VMTEST-HUNG $backend $suite after ${waited}s"
    ps -o pid,ppid,stat,args | grep -v ' \[.*\]$'
    echo 7 >/proc/sys/kernel/printk
    echo w >/proc/sysrq-trigger
    sleep 1
    echo 4 >/proc/sys/kernel/printk
    kill -9 -1
    wait
    echo 124 >/tmp/rc
  fi
  wait
  echo "VMTEST-RESULT $backend $suite $(cat /tmp/rc)"
  sed "s/^/[$backend $suite stderr] /" /tmp/stderr
}
"#;

/// The guest's /init: runs every suite under every backend `observer check` loads.
pub fn init_script(kernel: &Kernel) -> String {
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
"#,
    );
    for module in MODULES {
        let name = module.rsplit('/').next().unwrap_or(module);
        script.push_str(&format!("insmod /lib/modules/{name}.ko\n"));
    }
    script.push_str(
        r#"set -o pipefail
echo "VMTEST-KERNEL $(uname -r)"
CHECK=$(/observer/observer check 2>/dev/null)
echo "VMTEST-CHECK $CHECK"
export OBSERVER_BIN=/observer/observer
ONCE_DONE=
"#,
    );
    script.push_str(&format!("SUITE_LIMIT={SUITE_LIMIT_SECS}\n{RUN_SUITE}"));
    for backend in BACKENDS {
        // Only what `observer check` loaded is tested; the host checks that against the report.
        script.push_str(&format!(
            "if echo \"$CHECK\" | grep -q '\"{backend}\":{{\"ok\":true}}'; then\n"
        ));
        for suite in kernel.suites {
            let run = format!(
                "run_suite {backend} {suite} {tests}\n",
                suite = suite.name,
                tests = suite.tests.join(" "),
            );
            if suite.once {
                // Suites that do not depend on the probes run under the first backend only.
                script.push_str(&format!("if [ -z \"$ONCE_DONE\" ]; then\n{run}fi\n"));
            } else {
                script.push_str(&run);
            }
        }
        script.push_str(&format!("ONCE_DONE=1\nelse\necho \"VMTEST-SKIP {backend}\"\nfi\n"));
    }
    script.push_str("echo VMTEST-END\npoweroff -f\n");
    script
}

pub fn build(
    out: &Path,
    kernel: &Kernel,
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
    for applet in [
        "sh", "mount", "ip", "echo", "sed", "grep", "uname", "poweroff", "cat", "ls", "sleep",
        "insmod", "ps",
    ] {
        archive.symlink(&format!("/bin/{applet}"), "busybox")?;
    }
    archive.file("/init", init_script(kernel).as_bytes())?;
    archive.dir("/lib/modules")?;
    for module in MODULES {
        let name = module.rsplit('/').next().unwrap_or(module);
        archive.file(&format!("/lib/modules/{name}.ko"), &kernel::module(modules, module)?)?;
    }
    let mut binaries = vec![(observer.to_path_buf(), "/observer/observer".to_owned())];
    binaries.push((scenario.to_path_buf(), "/observer/scenario".to_owned()));
    for suite in kernel.suites {
        let exe = tests
            .get(suite.name)
            .with_context(|| format!("test binary {} was not built", suite.name))?;
        binaries.push((exe.clone(), format!("/observer/deps/{}", suite.name)));
    }
    let mut libraries = BTreeSet::new();
    for (path, inside) in &binaries {
        archive.file(
            inside,
            &fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        )?;
        libraries.extend(crate::image::shared_libraries(path)?);
    }
    let mut dirs = BTreeSet::new();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::KERNELS;

    #[test]
    fn every_backend_is_gated_on_check_and_every_line_is_attributed() {
        let script = init_script(&KERNELS[0]);
        for backend in BACKENDS {
            assert!(script.contains(&format!("grep -q '\"{backend}\":{{\"ok\":true}}'")));
            assert!(script.contains(&format!("VMTEST-SKIP {backend}")));
        }
        assert!(script.contains("run_suite fentry watch idle_client_is_alerted"));
        assert!(script.contains("VMTEST-OUT $backend $suite: "));
        assert!(script.contains(&format!("SUITE_LIMIT={SUITE_LIMIT_SECS}")));
        assert!(script.trim_end().ends_with("poweroff -f"));
    }
}
