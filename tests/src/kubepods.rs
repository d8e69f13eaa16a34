//! A Kubernetes node's traces without Kubernetes: real cgroups (v2) named as the kubelet and
//! containerd name a pod's container, `kubepods.slice/kubepods-besteffort.slice/
//! kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope`, processes moved into them,
//! and a pod log directory whose entries `<namespace>_<pod>_<uid>` name the pods, as
//! /var/log/pods does. Everything is removed, and the processes moved back, when dropped.
use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

/// One fake pod with one container.
#[derive(Clone, Debug)]
pub struct FakeContainer {
    pub container_id: String,
    pub pod_uid: String,
    pub namespace: String,
    pub pod: String,
    cgroup: PathBuf,
}

pub struct FakeNode {
    /// The cgroup v2 hierarchy's root.
    root: PathBuf,
    /// This node's own subtree of it (all fake pods live under it).
    top: PathBuf,
    /// The fake /var/log/pods.
    pub pod_logs: PathBuf,
    pub containers: Vec<FakeContainer>,
}

/// Where cgroup v2 is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts).
pub fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("read /proc/self/mounts");
    mounts
        .lines()
        .find_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
        })
        .expect("no cgroup2 hierarchy mounted")
}

/// 64 bits that differ for every call in every process (splitmix64 of a counter, pid and time).
fn random() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut z = nanos ^ (u64::from(std::process::id()) << 32) ^ N.fetch_add(1, Ordering::Relaxed);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl FakeNode {
    /// An empty node (not `Default`: it changes the machine's cgroups).
    pub fn create() -> FakeNode {
        let root = cgroup2_root();
        let name = format!("observer-test-{}-{:08x}", std::process::id(), random() as u32);
        let top = root.join(&name);
        std::fs::create_dir(&top).unwrap_or_else(|e| panic!("mkdir {}: {e}", top.display()));
        let pod_logs = std::env::temp_dir().join(format!("{name}-pods"));
        std::fs::create_dir_all(&pod_logs).unwrap();
        FakeNode { root, top, pod_logs, containers: Vec::new() }
    }

    /// A pod `namespace/pod` with one container, its cgroup and its log directory; no process
    /// in it yet.
    pub fn add_pod(&mut self, namespace: &str, pod: &str) -> FakeContainer {
        let (a, b) = (random(), random());
        let pod_uid = format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xffff,
            b >> 48,
            b & 0xffff_ffff_ffff
        );
        let container_id: String = (0..4).map(|_| format!("{:016x}", random())).collect();
        let cgroup = self
            .top
            .join("kubepods.slice/kubepods-besteffort.slice")
            .join(format!("kubepods-besteffort-pod{}.slice", pod_uid.replace('-', "_")))
            .join(format!("cri-containerd-{container_id}.scope"));
        std::fs::create_dir_all(&cgroup).unwrap();
        std::fs::create_dir_all(self.pod_logs.join(format!("{namespace}_{pod}_{pod_uid}")))
            .unwrap();
        let container = FakeContainer {
            container_id,
            pod_uid,
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            cgroup,
        };
        self.containers.push(container.clone());
        container
    }

    /// Moves process `pid` (all its threads) into `container`'s cgroup.
    pub fn adopt(&self, container: &FakeContainer, pid: u32) {
        write_pid(&container.cgroup, pid);
    }

    /// Moves every process of every fake container back to the root cgroup.
    pub fn release_all(&self) {
        for c in &self.containers {
            for pid in pids_in(&c.cgroup) {
                write_pid(&self.root, pid);
            }
        }
    }
}

fn write_pid(cgroup: &Path, pid: u32) {
    let procs = cgroup.join("cgroup.procs");
    if let Err(e) = std::fs::write(&procs, pid.to_string()) {
        // A process that exited meanwhile is no failure.
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "moving {pid} to {}: {e}",
            procs.display()
        );
    }
}

fn pids_in(cgroup: &Path) -> Vec<u32> {
    std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.release_all();
        // Deepest first: a cgroup is removed with rmdir once it has no children.
        let mut dirs = Vec::new();
        let mut stack = vec![self.top.clone()];
        while let Some(dir) = stack.pop() {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                stack.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
            }
            dirs.push(dir);
        }
        for dir in dirs.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
        let _ = std::fs::remove_dir_all(&self.pod_logs);
    }
}
