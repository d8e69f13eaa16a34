//! Where a socket's process runs: its container and Kubernetes pod (from its cgroup and the
//! node's pod log directory) and the node. Looked up once per process (pid and start time),
//! not once per poll: a node with hundreds of containers must not make polls slow.
use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    fastmap::FastMap,
    kernel::{
        netns,
        procfs::{
            HeldFds,
            cgroup::{self, CgroupIdentity},
        },
    },
};

/// A socket's place, as alerts, clears and actions show it. What is not known is left out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// The container's full id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The Kubernetes pod's uid, its name and its namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<Arc<str>>,
    /// The node the agent runs on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<Arc<str>>,
}

/// Where the agent itself runs, as Kubernetes' Downward API tells it (NODE_NAME, POD_NAME,
/// POD_NAMESPACE).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    pub node: Option<String>,
    pub pod: Option<String>,
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadOptions {
    pub placement: Placement,
    /// The kubelet's pod log directory, whose entries `<namespace>_<pod>_<uid>` name the pods.
    pub pod_logs: PathBuf,
    /// Node mode (every namespace): the agent's own pod is then no socket's pod but its own.
    pub all_namespaces: bool,
}

impl Default for WorkloadOptions {
    fn default() -> Self {
        WorkloadOptions {
            placement: Placement::default(),
            pod_logs: PathBuf::from(DEFAULT_POD_LOGS),
            all_namespaces: false,
        }
    }
}

pub const DEFAULT_POD_LOGS: &str = "/var/log/pods";

/// A pod log directory is listed again, for a pod uid it does not name, at most this often.
const RELIST_EVERY: Duration = Duration::from_secs(1);

pub struct Resolver {
    node: Option<Arc<str>>,
    /// The agent's pod (name, and namespace if given), for processes in its network namespace:
    /// a sidecar's neighbours. `None` in node mode.
    own_pod: Option<(Arc<str>, Option<Arc<str>>)>,
    own_netns: Option<u64>,
    pods: PodDirectory,
    processes: FastMap<u32, Cached>,
    /// For sockets no visible process holds: only the node is known.
    unowned: Arc<Workload>,
    generation: u64,
}

struct Cached {
    start_time: u64,
    comm: Arc<str>,
    cgroup: CgroupIdentity,
    netns: Option<u64>,
    workload: Arc<Workload>,
    /// The pod directory listing the names were looked up in, while the pod is unnamed.
    unnamed_in: Option<u64>,
    generation: u64,
}

impl Resolver {
    pub fn new(options: &WorkloadOptions) -> Resolver {
        let node: Option<Arc<str>> = options.placement.node.as_deref().map(Arc::from);
        let own_pod = match &options.placement.pod {
            Some(pod) if !options.all_namespaces => {
                let namespace = options.placement.namespace.as_deref().map(Arc::from);
                Some((Arc::from(pod.as_str()), namespace))
            }
            _ => None,
        };
        Resolver {
            unowned: Arc::new(Workload { node: node.clone(), ..Workload::default() }),
            node,
            own_pod,
            own_netns: netns::own().ok(),
            pods: PodDirectory::new(options.pod_logs.clone()),
            processes: FastMap::default(),
            generation: 0,
        }
    }

    /// Starts a poll: processes not looked up until [`Self::end_poll`] are forgotten then.
    pub fn begin_poll(&mut self) {
        self.generation += 1;
    }

    pub fn end_poll(&mut self) {
        let generation = self.generation;
        self.processes.retain(|_, c| c.generation == generation);
    }

    /// What is known of a socket no visible process holds.
    pub fn unowned(&self) -> Arc<Workload> {
        self.unowned.clone()
    }

    /// The workload of process `pid` and its network namespace; reads /proc only for a process
    /// not seen before (or one that exec'd, or whose pod was not named yet).
    pub fn process(&mut self, pid: u32, held: &HeldFds) -> (Arc<Workload>, Option<u64>) {
        let generation = self.generation;
        if let Some(cached) = self.processes.get_mut(&pid)
            && cached.start_time == held.start_time
            && cached.comm == held.comm
        {
            cached.generation = generation;
            // A pod not named yet is looked up again once the directory may have changed.
            let settled = match cached.unnamed_in {
                None => true,
                Some(listing) => listing == self.pods.listing && !self.pods.may_relist(),
            };
            if settled {
                return (cached.workload.clone(), cached.netns);
            }
        }
        // A new process, or a pid reused, or an exec (a runtime's init becoming the container's
        // program): read its cgroup afresh. Only a pod still unnamed keeps its cgroup reading.
        let (cgroup, netns) = match self.processes.remove(&pid) {
            Some(c) if c.start_time == held.start_time && c.comm == held.comm => {
                (c.cgroup, c.netns)
            }
            _ => (
                cgroup::read(pid).map(|text| cgroup::parse(&text)).unwrap_or_default(),
                netns::of_pid(pid).ok(),
            ),
        };
        let (workload, unnamed_in) = self.workload_of(&cgroup, netns);
        let workload = Arc::new(workload);
        let entry = Cached {
            start_time: held.start_time,
            comm: held.comm.clone(),
            cgroup,
            netns,
            workload: workload.clone(),
            unnamed_in,
            generation,
        };
        self.processes.insert(pid, entry);
        (workload, netns)
    }

    /// The workload of a process that need not hold a socket (one a reset names), without
    /// caching it.
    pub fn process_once(&mut self, pid: u32) -> Arc<Workload> {
        let cgroup = cgroup::read(pid).map(|text| cgroup::parse(&text)).unwrap_or_default();
        Arc::new(self.workload_of(&cgroup, netns::of_pid(pid).ok()).0)
    }

    /// The workload a cgroup names, and, when its pod is not named yet, the pod listing it was
    /// looked up in.
    fn workload_of(
        &mut self,
        cgroup: &CgroupIdentity,
        netns: Option<u64>,
    ) -> (Workload, Option<u64>) {
        let mut workload = Workload {
            container_id: cgroup.container_id.clone(),
            pod_uid: cgroup.pod_uid.clone(),
            node: self.node.clone(),
            ..Workload::default()
        };
        if let Some(uid) = &cgroup.pod_uid
            && let Some((namespace, pod)) = self.pods.lookup(uid)
        {
            (workload.namespace, workload.pod) = (Some(namespace), Some(pod));
            return (workload, None);
        }
        // A sidecar shares its pod's network namespace: what lives there is the agent's pod.
        if let Some((pod, namespace)) = &self.own_pod
            && netns.is_some()
            && netns == self.own_netns
        {
            (workload.pod, workload.namespace) = (Some(pod.clone()), namespace.clone());
            return (workload, None);
        }
        let unnamed = cgroup.pod_uid.is_some().then_some(self.pods.listing);
        (workload, unnamed)
    }
}

/// The pods the kubelet keeps logs for, by uid: `/var/log/pods/<namespace>_<pod>_<uid>`
/// (neither a namespace nor a pod name may hold `_`). Listed when a uid is not in the last
/// listing, at most every [`RELIST_EVERY`].
struct PodDirectory {
    dir: PathBuf,
    by_uid: HashMap<String, (Arc<str>, Arc<str>)>,
    /// How many listings were made: a pod unnamed in one may be named in the next.
    listing: u64,
    listed_at: Option<Instant>,
}

impl PodDirectory {
    fn new(dir: PathBuf) -> Self {
        PodDirectory { dir, by_uid: HashMap::new(), listing: 0, listed_at: None }
    }

    /// (namespace, pod) of the pod `uid`.
    fn lookup(&mut self, uid: &str) -> Option<(Arc<str>, Arc<str>)> {
        if let Some(found) = self.by_uid.get(uid) {
            return Some(found.clone());
        }
        if !self.may_relist() {
            return None;
        }
        self.relist();
        self.by_uid.get(uid).cloned()
    }

    fn may_relist(&self) -> bool {
        self.listed_at.is_none_or(|at| at.elapsed() >= RELIST_EVERY)
    }

    fn relist(&mut self) {
        self.listing += 1;
        self.listed_at = Some(Instant::now());
        // Only pods on the node now: deleted pods' directories go, and with them their names.
        self.by_uid.clear();
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            if let Some((namespace, pod, uid)) = entry.file_name().to_str().and_then(parse_entry) {
                self.by_uid.insert(uid.to_owned(), (Arc::from(namespace), Arc::from(pod)));
            }
        }
    }
}

/// `<namespace>_<pod>_<uid>` as (namespace, pod, uid).
fn parse_entry(name: &str) -> Option<(&str, &str, &str)> {
    let mut parts = name.split('_');
    let (namespace, pod, uid) = (parts.next()?, parts.next()?, parts.next()?);
    let named = !namespace.is_empty() && !pod.is_empty() && !uid.is_empty();
    (named && parts.next().is_none()).then_some((namespace, pod, uid))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0d2e6f14-5c7b-4c1a-9b8e-3f2a1d0c9b8a";

    #[test]
    fn pod_log_entries_are_split_at_underscores() {
        assert_eq!(
            parse_entry(&format!("kube-system_coredns-5d78c9869d-7xk2p_{UID}")),
            Some(("kube-system", "coredns-5d78c9869d-7xk2p", UID))
        );
        assert_eq!(parse_entry("lost+found"), None);
        assert_eq!(parse_entry("a_b"), None);
        assert_eq!(parse_entry("a_b_c_d"), None);
        assert_eq!(parse_entry("_b_c"), None);
    }

    fn options(dir: PathBuf) -> WorkloadOptions {
        WorkloadOptions {
            placement: Placement { node: Some("node-1".into()), ..Placement::default() },
            pod_logs: dir,
            all_namespaces: true,
        }
    }

    #[test]
    fn pods_are_named_from_the_log_directory_even_when_it_appears_late() {
        let dir = std::env::temp_dir().join(format!("observer-pods-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut resolver = Resolver::new(&options(dir.clone()));
        let cgroup = CgroupIdentity { container_id: None, pod_uid: Some(UID.into()) };
        let (unnamed, listing) = resolver.workload_of(&cgroup, None);
        assert_eq!((unnamed.pod, unnamed.pod_uid.as_deref()), (None, Some(UID)));
        assert_eq!(unnamed.node.as_deref(), Some("node-1"));
        assert_eq!(listing, Some(1));
        std::fs::create_dir_all(dir.join(format!("shop_web-0_{UID}"))).unwrap();
        // Within a second of the last listing, the directory is not read again.
        assert_eq!(resolver.workload_of(&cgroup, None).0.pod, None);
        resolver.pods.listed_at = None;
        let (named, listing) = resolver.workload_of(&cgroup, None);
        assert_eq!(
            (named.pod.as_deref(), named.namespace.as_deref()),
            (Some("web-0"), Some("shop"))
        );
        assert_eq!(listing, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn processes_are_read_once_per_start() {
        let me = std::process::id();
        let mut resolver = Resolver::new(&options(PathBuf::from("/nonexistent")));
        let held = HeldFds { comm: "me".into(), start_time: 7, count: 3 };
        resolver.begin_poll();
        let (first, netns) = resolver.process(me, &held);
        assert_eq!(netns, netns::own().ok());
        let (again, _) = resolver.process(me, &held);
        assert!(Arc::ptr_eq(&first, &again), "cached");
        resolver.end_poll();
        // A pid reused by another process (another start time) is looked up afresh.
        let reused = HeldFds { start_time: 8, ..held };
        resolver.begin_poll();
        assert!(!Arc::ptr_eq(&first, &resolver.process(me, &reused).0));
        resolver.end_poll();
        // A process not seen in a poll is forgotten.
        resolver.begin_poll();
        resolver.end_poll();
        assert!(resolver.processes.is_empty());
    }

    #[test]
    fn a_sidecar_names_its_own_pod_for_its_namespace_only() {
        let placement = Placement {
            node: Some("n".into()),
            pod: Some("web-0".into()),
            namespace: Some("shop".into()),
        };
        let sidecar = WorkloadOptions {
            placement: placement.clone(),
            pod_logs: PathBuf::from("/nonexistent"),
            all_namespaces: false,
        };
        let mut resolver = Resolver::new(&sidecar);
        let own = netns::own().ok();
        let none = CgroupIdentity::default();
        let here = resolver.workload_of(&none, own).0;
        assert_eq!((here.pod.as_deref(), here.namespace.as_deref()), (Some("web-0"), Some("shop")));
        assert_eq!(resolver.workload_of(&none, Some(1)).0.pod, None, "another namespace");
        assert_eq!(resolver.unowned().pod, None, "no process: no pod");
        // In node mode the agent's own pod is nobody else's.
        let mut node = Resolver::new(&WorkloadOptions { all_namespaces: true, ..sidecar });
        assert_eq!(node.workload_of(&none, own).0.pod, None);
    }
}
