//! Containers for the tests, with podman as Debian packages it: a pod built the way Kubernetes
//! builds one (a holder container that owns the pid and network namespaces, as the pause
//! container does, and containers that join them), a test image with the scenario server, and
//! the observer image `cargo xtask image` builds.
use std::{
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
};

use crate::scenario_bin;

/// The image under test: `observer:<version>` unless $OBSERVER_IMAGE names another.
pub fn observer_image() -> String {
    std::env::var("OBSERVER_IMAGE")
        .unwrap_or_else(|_| format!("observer:{}", env!("CARGO_PKG_VERSION")))
}

/// `podman` with the settings these machines need: their hybrid cgroups defeat podman's
/// defaults (see ../shared/docs/platform.md).
pub fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    c
}

/// The capabilities deploy/kubernetes/daemonset.yaml grants the node agent: what the node tests
/// run it with in a container, and prove enough.
pub const DAEMONSET_CAPABILITIES: [&str; 6] =
    ["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH", "SYS_ADMIN", "NET_ADMIN"];

/// Resource limits no higher than the test session's own (no CAP_SYS_RESOURCE here).
pub const LIMITS: [&str; 4] = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"];

fn run(cmd: &mut Command) -> String {
    let out = cmd.stderr(Stdio::piped()).output().expect("run podman");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The test image: busybox (for the holder's `sleep`) and the scenario program, on nothing.
pub fn testbed_image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    const NAME: &str = "observer-testbed:latest";
    BUILT.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("observer-testbed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("rootfs/bin")).unwrap();
        std::fs::copy("/bin/busybox", dir.join("rootfs/bin/busybox"))
            .expect("/bin/busybox (Debian's busybox-static)");
        let scenario = scenario_bin();
        std::fs::copy(&scenario, dir.join("rootfs/bin/scenario")).unwrap();
        for lib in shared_libraries(&scenario) {
            let inside = dir.join("rootfs").join(lib.strip_prefix("/").unwrap());
            std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
            std::fs::copy(&lib, inside).unwrap();
        }
        std::fs::write(dir.join("Containerfile"), "FROM scratch\nCOPY rootfs/ /\n").unwrap();
        run(Command::new("podman").args(["build", "--quiet", "--tag", NAME]).arg(&dir));
    });
    NAME
}

fn shared_libraries(binary: &Path) -> Vec<std::path::PathBuf> {
    let out = Command::new("ldd").arg(binary).output().expect("ldd");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| path.into())
        })
        .collect()
}

/// A pod: the holder of its pid and network namespaces (no network beyond loopback), and the
/// containers started in it. Removed, containers and all, when dropped.
pub struct Pod {
    pub name: String,
    containers: Vec<String>,
}

impl Pod {
    /// Starts the holder (not `Default`: it starts a container).
    pub fn create() -> Pod {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("obs{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let holder = format!("{name}-holder");
        run(podman()
            .args(["run", "--detach", "--name", &holder, "--network", "none"])
            .args(LIMITS)
            .args([testbed_image(), "/bin/busybox", "sleep", "3600"]));
        Pod { name, containers: vec![holder] }
    }

    /// `podman run` arguments that put a container named `<pod>-<role>` in this pod.
    pub fn join(&mut self, role: &str) -> Vec<String> {
        let name = format!("{}-{role}", self.name);
        let holder = format!("container:{}-holder", self.name);
        self.containers.push(name.clone());
        let mut args: Vec<String> = ["run", "--rm", "--name", &name, "--pid", &holder]
            .into_iter()
            .map(str::to_owned)
            .collect();
        args.extend(["--network".into(), holder]);
        args.extend(LIMITS.map(str::to_owned));
        args
    }

    /// Removes one container now (e.g. to replace the server).
    pub fn remove(&self, role: &str) {
        run(podman().args(["rm", "--force", "--time", "0", &format!("{}-{role}", self.name)]));
    }

    /// The holder's pid in the initial pid namespace: the door into the pod's namespaces.
    pub fn holder_pid(&self) -> u32 {
        let holder = format!("{}-holder", self.name);
        run(podman().args(["inspect", "--format", "{{.State.Pid}}", &holder])).parse().unwrap()
    }

    /// Connects to `addr` from inside the pod's network namespace.
    pub fn connect(&self, addr: SocketAddr) -> TcpStream {
        let ns = std::fs::File::open(format!("/proc/{}/ns/net", self.holder_pid())).unwrap();
        // setns moves only the calling thread; the socket stays in the namespace it was
        // created in.
        std::thread::spawn(move || {
            nix_setns(&ns);
            TcpStream::connect(addr).expect("connect inside the pod")
        })
        .join()
        .unwrap()
    }
}

fn nix_setns(ns: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: setns(2) on an open namespace file, for this thread only.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

impl Drop for Pod {
    fn drop(&mut self) {
        for c in self.containers.iter().rev() {
            let _ = podman()
                .args(["rm", "--force", "--time", "0", c])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
