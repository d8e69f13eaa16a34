//! Which container, and which Kubernetes pod, a process runs in, as its cgroup says: container
//! runtimes name each container's cgroup after the container's id, and the kubelet names each
//! pod's after the pod's uid. Only what a path states is taken; nothing is guessed.
//!
//! The shapes recognised (innermost component first, `.scope` and `.slice` aside):
//! - containerd (CRI) `cri-containerd-<id>`, CRI-O `crio-<id>`, docker `docker-<id>`, podman
//!   `libpod-<id>` (systemd drivers), and a bare `<id>` (cgroupfs drivers: `/docker/<id>`,
//!   `/kubepods/besteffort/pod<uid>/<id>`); `<id>` is the full 64-hex-digit id.
//! - `libpod-conmon-<id>` and `crio-conmon-<id>` hold the runtime's monitor, not the container.
//! - kubepods: `kubepods-<qos>-pod<uid>.slice` (systemd driver, `_` for `-` in the uid) or
//!   `pod<uid>` under `kubepods` (cgroupfs driver).
use std::fs;

/// What a process's cgroup names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupIdentity {
    /// The container's full id (64 hex digits).
    pub container_id: Option<String>,
    /// The Kubernetes pod's uid, dashed as the API shows it.
    pub pod_uid: Option<String>,
}

/// The text of /proc/PID/cgroup, if the process still exists.
pub fn read(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()
}

/// Parses /proc/PID/cgroup: `hierarchy:controllers:path` lines, the unified (cgroup v2) line
/// `0::path` first, then the v1 hierarchies in order. The first path that names a container
/// gives the answer; a path that names only a pod gives the pod.
pub fn parse(text: &str) -> CgroupIdentity {
    let paths = text.lines().filter_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (hierarchy, _controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        Some((hierarchy != "0", path))
    });
    let mut ordered: Vec<(bool, &str)> = paths.collect();
    // Stable: the unified line first, the v1 lines in the file's order.
    ordered.sort_by_key(|&(v1, _)| v1);
    let mut pod_only = None;
    for (_, path) in ordered {
        let found = parse_path(path);
        if found.container_id.is_some() {
            return found;
        }
        if pod_only.is_none() && found.pod_uid.is_some() {
            pod_only = Some(found);
        }
    }
    pod_only.unwrap_or_default()
}

/// What one cgroup path names.
fn parse_path(path: &str) -> CgroupIdentity {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty() && *c != "..").collect();
    let mut container_id = None;
    for component in components.iter().rev() {
        match container_of(component) {
            Some(Some(id)) => {
                container_id = Some(id.to_owned());
                break;
            }
            // A runtime's monitor process: in no container.
            Some(None) => break,
            None => {}
        }
    }
    let under_kubepods = components.iter().any(|c| c.starts_with("kubepods"));
    let pod_uid =
        if under_kubepods { components.iter().rev().find_map(|c| pod_uid_of(c)) } else { None };
    CgroupIdentity { container_id, pod_uid }
}

/// `Some(Some(id))` for a container's cgroup, `Some(None)` for a runtime monitor's (conmon),
/// `None` for anything else.
fn container_of(component: &str) -> Option<Option<&str>> {
    let name = component.strip_suffix(".scope").unwrap_or(component);
    if name.starts_with("libpod-conmon-") || name.starts_with("crio-conmon-") {
        return Some(None);
    }
    let id = ["cri-containerd-", "crio-", "docker-", "libpod-"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .unwrap_or(name);
    is_full_id(id).then_some(Some(id))
}

fn is_full_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The pod uid in `pod<uid>` or `kubepods[-<qos>]-pod<uid>.slice`.
fn pod_uid_of(component: &str) -> Option<String> {
    let name = component.strip_suffix(".slice").unwrap_or(component);
    let uid = match name.strip_prefix("pod") {
        Some(uid) => uid,
        None if name.starts_with("kubepods") => name.rsplit_once("-pod")?.1,
        None => return None,
    };
    let uid = uid.replace('_', "-");
    is_pod_uid(&uid).then_some(uid)
}

/// A UUID (8-4-4-4-12 lowercase hex), or the 32 hex digits of a static pod's config hash.
fn is_pod_uid(uid: &str) -> bool {
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let groups: Vec<&str> = uid.split('-').collect();
    match groups.as_slice() {
        [one] => one.len() == 32 && hex(one),
        [a, b, c, d, e] => {
            [a.len(), b.len(), c.len(), d.len(), e.len()] == [8, 4, 4, 4, 12]
                && groups.iter().all(|g| hex(g))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1c8a3b9d2e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a";
    const UID: &str = "0d2e6f14-5c7b-4c1a-9b8e-3f2a1d0c9b8a";

    fn uid_underscored() -> String {
        UID.replace('-', "_")
    }

    fn both(id: &str, uid: &str) -> CgroupIdentity {
        CgroupIdentity { container_id: Some(id.into()), pod_uid: Some(uid.into()) }
    }

    fn container(id: &str) -> CgroupIdentity {
        CgroupIdentity { container_id: Some(id.into()), pod_uid: None }
    }

    #[test]
    fn containerd_under_the_systemd_driver_cgroup_v2() {
        let text = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/\
             cri-containerd-{ID}.scope\n",
            uid_underscored()
        );
        assert_eq!(parse(&text), both(ID, UID));
    }

    #[test]
    fn guaranteed_pods_have_no_qos_slice() {
        let text = format!(
            "0::/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{ID}.scope\n",
            uid_underscored()
        );
        assert_eq!(parse(&text), both(ID, UID));
    }

    #[test]
    fn crio_and_its_monitor() {
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/\
             crio-{ID}.scope\n",
            uid_underscored()
        );
        assert_eq!(parse(&text), both(ID, UID));
        let conmon = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/\
             crio-conmon-{ID}.scope\n",
            uid_underscored()
        );
        let found = parse(&conmon);
        assert_eq!(found.container_id, None, "conmon is not in the container");
        assert_eq!(found.pod_uid.as_deref(), Some(UID), "but it is in the pod");
    }

    #[test]
    fn docker_with_either_driver() {
        assert_eq!(parse(&format!("0::/system.slice/docker-{ID}.scope\n")), container(ID));
        let v1 = format!(
            "12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n1:name=systemd:/docker/{ID}\n0::/\n"
        );
        assert_eq!(parse(&v1), container(ID));
    }

    #[test]
    fn podman_with_either_cgroup_manager_and_its_monitor() {
        // cgroupfs (as on this project's machines), every v1 hierarchy and the unified one.
        let cgroupfs = format!(
            "9:name=systemd:/libpod_parent/libpod-{ID}\n4:memory:/libpod_parent/libpod-{ID}\n\
             0::/libpod_parent/libpod-{ID}\n"
        );
        assert_eq!(parse(&cgroupfs), container(ID));
        let systemd = format!("0::/machine.slice/libpod-{ID}.scope/container\n");
        assert_eq!(parse(&systemd), container(ID));
        let conmon = format!("0::/machine.slice/libpod-conmon-{ID}.scope\n");
        assert_eq!(parse(&conmon), CgroupIdentity::default());
    }

    #[test]
    fn cgroup_v1_kubepods_under_the_cgroupfs_driver() {
        let text = format!(
            "12:memory:/kubepods/burstable/pod{UID}/{ID}\n\
             11:cpu,cpuacct:/kubepods/burstable/pod{UID}/{ID}\n\
             1:name=systemd:/kubepods/burstable/pod{UID}/{ID}\n"
        );
        assert_eq!(parse(&text), both(ID, UID));
    }

    #[test]
    fn hybrid_hosts_fall_back_from_an_empty_unified_line() {
        let text = format!("4:memory:/kubepods/besteffort/pod{UID}/{ID}\n0::/\n");
        assert_eq!(parse(&text), both(ID, UID));
    }

    #[test]
    fn a_cgroup_namespace_shows_paths_relative_to_its_root() {
        // A sidecar in its own cgroup namespace sees its neighbour one level up.
        assert_eq!(parse(&format!("0::/../cri-containerd-{ID}.scope\n")), container(ID));
        assert_eq!(parse("0::/\n"), CgroupIdentity::default());
    }

    #[test]
    fn static_pods_have_a_config_hash_for_uid() {
        let hash = "5d1a5d5e2a2b1e3c4f6a7b8c9d0e1f2a";
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(parse(&text), both(ID, hash));
    }

    #[test]
    fn nothing_is_guessed() {
        for text in [
            "0::/user.slice/user-1000.slice/session-3.scope\n",
            "0::/system.slice/sshd.service\n",
            // Short ids, a 64-character non-hex name, upper case.
            "0::/docker/4f1c8a3b9d2e\n",
            &format!("0::/docker/{}\n", "z".repeat(64)),
            &format!("0::/docker/{}\n", ID.to_uppercase()),
            // A pod-looking name outside kubepods.
            &format!("0::/system.slice/pod{UID}\n"),
            // A uid of the wrong shape.
            "0::/kubepods/besteffort/pod1234/\n",
            "garbage",
            "",
        ] {
            assert_eq!(parse(text), CgroupIdentity::default(), "{text}");
        }
    }

    #[test]
    fn the_innermost_container_wins() {
        let inner = "a".repeat(64);
        let text = format!("0::/docker/{ID}/docker/{inner}\n");
        assert_eq!(parse(&text), container(&inner));
    }
}
