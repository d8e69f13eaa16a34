//! Facts about the machine the agent runs on: privileges, clocks, kernel release, tracefs.
use std::path::Path;

use nix::time::{ClockId, clock_gettime};

pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// The oldest kernel observer can run on: every backend's BTF tracepoint programs call
/// `bpf_get_socket_cookie`, which tracing programs may call from Linux 5.12 (socket storage,
/// `bpf_sk_storage_get` from tracing programs, came in 5.11).
pub const MINIMUM_KERNEL: (u32, u32) = (5, 12);

/// The major and minor version of a release string such as `6.1.0-48-cloud-amd64`.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Why `release` is too old for observer, if it is.
pub fn too_old(release: &str) -> Option<String> {
    let version = kernel_version(release)?;
    (version < MINIMUM_KERNEL).then(|| {
        format!(
            "Linux {release} is older than {}.{}, the oldest observer runs on (its BTF tracepoint \
             programs call bpf_get_socket_cookie, which tracing programs may call from 5.12): \
             run it on a newer kernel",
            MINIMUM_KERNEL.0, MINIMUM_KERNEL.1
        )
    })
}

/// CLOCK_MONOTONIC in nanoseconds: the clock bpf_ktime_get_ns() reads.
pub fn monotonic_ns() -> u64 {
    // CLOCK_MONOTONIC always exists; were it refused, 0 makes every time "unknown".
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map_or(0, |ts| ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64)
}

/// A pid namespace, as its nsfs file identifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PidNamespace {
    pub dev: u64,
    pub ino: u64,
}

impl PidNamespace {
    /// The kernel's initial pid namespace has a fixed inode (PROC_PID_INIT_INO).
    const INITIAL_INO: u64 = 0xEFFF_FFFC;

    /// Whether this is the namespace whose ids the kernel's plain helpers return.
    pub fn is_initial(self) -> bool {
        self.ino == Self::INITIAL_INO
    }
}

/// The agent's own pid namespace.
pub fn own_pid_namespace() -> Option<PidNamespace> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata("/proc/self/ns/pid").ok()?;
    Some(PidNamespace { dev: meta.dev(), ino: meta.ino() })
}

/// kernel.pid_max: process ids are below it (the kernel's default when unreadable).
pub fn pid_max() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1 << 22)
}

/// net.ipv4.tcp_retries2 (how long TCP retransmits to a silent peer), 15 if unreadable.
pub fn tcp_retries2() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_retries2")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(15)
}

pub const TRACEFS: &str = "/sys/kernel/tracing";

pub fn tracefs_mounted() -> bool {
    Path::new(TRACEFS).join("events").is_dir()
}

/// Serves every allocation of 1 MiB or more with its own mapping. The poll's big tables then grow
/// by mremap (no copy, so never held twice) and go back to the system when freed; glibc's
/// default would move ever larger ones onto the heap, where growth copies and frees linger.
pub fn map_large_allocations() {
    // SAFETY: mallopt only changes a setting of the allocator; called before any threads start.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Returns freed heap memory to the operating system (glibc keeps it mapped otherwise).
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resets this process's peak resident set size (VmHWM), as `echo 5 > /proc/PID/clear_refs`.
pub fn reset_peak_memory() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones ignore it. Raising it is
/// best effort (it needs CAP_SYS_RESOURCE).
pub fn raise_memlock_limit() {
    use nix::sys::resource::{Resource, setrlimit};
    let _ = setrlimit(Resource::RLIMIT_MEMLOCK, libc::RLIM_INFINITY, libc::RLIM_INFINITY);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_before_5_12_are_too_old() {
        assert_eq!(kernel_version("6.1.0-48-cloud-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("6.12.95+deb12-cloud-amd64"), Some((6, 12)));
        assert!(too_old("5.10.0-30-amd64").is_some_and(|m| m.contains("5.12")));
        assert!(too_old("5.15.0-100-generic").is_none());
        assert!(too_old("6.18.44-fc").is_none());
        assert!(too_old("weird").is_none(), "an unreadable release is not judged");
    }
}
