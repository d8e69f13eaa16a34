//! What this process may do: its capabilities, what each job needs, and whether a seccomp filter
//! (a container runtime's default profile) refuses the system calls the probes need.
//!
//! | job | capabilities |
//! |---|---|
//! | load and attach the probes | CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN) |
//! | see the fds and threads of another user's process | CAP_SYS_PTRACE + CAP_DAC_READ_SEARCH |
//! | read sockets in another network namespace | CAP_SYS_ADMIN (setns) |
//! | destroy a socket (`--mode destroy`) | CAP_NET_ADMIN |
//! | shut a socket down (`--mode shutdown`) | CAP_SYS_PTRACE (pidfd_getfd) |
//! | `--probe-stats` | CAP_SYS_ADMIN (BPF_ENABLE_STATS) |
use std::{fmt, io};

/// A capability observer may need, with its number in the kernel's bit set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cap {
    DacReadSearch = 2,
    NetAdmin = 12,
    SysPtrace = 19,
    SysAdmin = 21,
    Perfmon = 38,
    Bpf = 39,
}

impl Cap {
    pub const ALL: [Cap; 6] =
        [Cap::Bpf, Cap::Perfmon, Cap::SysPtrace, Cap::DacReadSearch, Cap::NetAdmin, Cap::SysAdmin];

    pub fn name(self) -> &'static str {
        match self {
            Cap::DacReadSearch => "CAP_DAC_READ_SEARCH",
            Cap::NetAdmin => "CAP_NET_ADMIN",
            Cap::SysPtrace => "CAP_SYS_PTRACE",
            Cap::SysAdmin => "CAP_SYS_ADMIN",
            Cap::Perfmon => "CAP_PERFMON",
            Cap::Bpf => "CAP_BPF",
        }
    }

    /// What observer uses it for.
    pub fn purpose(self) -> &'static str {
        match self {
            Cap::Bpf => "load the BPF probes and read their maps",
            Cap::Perfmon => "attach the probes to tracepoints and kernel functions",
            Cap::SysPtrace => "read another user's process fds and threads; shutdown mode",
            Cap::DacReadSearch => "list another user's /proc/PID/fd",
            Cap::NetAdmin => "destroy sockets through sock_diag (destroy mode)",
            Cap::SysAdmin => "enter another network namespace; --probe-stats",
        }
    }
}

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of capabilities, as /proc/PID/status shows them (CapEff).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps(pub u64);

impl Caps {
    /// This process's effective capabilities.
    pub fn effective() -> Caps {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        Caps(
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
                .unwrap_or(0),
        )
    }

    pub fn has(self, cap: Cap) -> bool {
        self.0 & (1 << cap as u32) != 0
    }

    /// Which of `needed` are missing.
    pub fn missing(self, needed: &[Cap]) -> Vec<Cap> {
        needed.iter().copied().filter(|&c| !self.has(c)).collect()
    }

    /// What loading and attaching the probes lacks. CAP_SYS_ADMIN stands in for both (and
    /// was the only way before Linux 5.8).
    pub fn missing_to_load(self) -> Vec<Cap> {
        if self.has(Cap::SysAdmin) { Vec::new() } else { self.missing(&[Cap::Bpf, Cap::Perfmon]) }
    }

    /// What seeing the fds and threads of another user's process lacks.
    pub fn missing_to_inspect_others(self) -> Vec<Cap> {
        self.missing(&[Cap::SysPtrace, Cap::DacReadSearch])
    }
}

/// "CAP_A and CAP_B".
pub fn names(caps: &[Cap]) -> String {
    let names: Vec<&str> = caps.iter().map(|c| c.name()).collect();
    match names.as_slice() {
        [] => String::new(),
        [one] => (*one).to_owned(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// The seccomp mode of this process: 0 none, 1 strict, 2 filter (what containers use).
pub fn seccomp_mode() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The system calls the probes need that a seccomp filter refuses here.
///
/// Each is tried with arguments the kernel itself rejects as invalid (EINVAL) before any
/// permission check: an EPERM instead can only come from the filter, which sees the call
/// before the kernel does. Nothing is created either way.
pub fn seccomp_blocked() -> Vec<&'static str> {
    if seccomp_mode() != 2 {
        return Vec::new();
    }
    let refused =
        |rc: libc::c_long| rc < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    let mut blocked = Vec::new();
    // bpf(2) with a command number no kernel defines.
    let attr = [0u8; 16];
    // SAFETY: the kernel reads at most attr's size from a valid buffer.
    if refused(unsafe { libc::syscall(libc::SYS_bpf, 0xffff, attr.as_ptr(), attr.len()) }) {
        blocked.push("bpf");
    }
    // perf_event_open(2) with flags no kernel defines.
    const PERF_ATTR_SIZE: u32 = 128;
    let mut attr = [0u8; PERF_ATTR_SIZE as usize];
    attr[4..8].copy_from_slice(&PERF_ATTR_SIZE.to_ne_bytes());
    // SAFETY: as above; the call fails before creating anything.
    let rc =
        unsafe { libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), -1, -1, -1, u64::MAX) };
    if refused(rc) {
        blocked.push("perf_event_open");
    }
    blocked
}

/// Why loading the probes was refused, in words that name the fix.
pub fn load_refused() -> String {
    let missing = Caps::effective().missing_to_load();
    if !missing.is_empty() {
        return format!(
            "permission denied loading BPF programs: missing {} (run as root, or grant {})",
            names(&missing),
            names(&[Cap::Bpf, Cap::Perfmon])
        );
    }
    let blocked = seccomp_blocked();
    if !blocked.is_empty() {
        return format!(
            "permission denied loading BPF programs: a seccomp filter refuses {} although the \
             capabilities are there; run the container with observer's profile \
             (deploy/seccomp.json: podman/docker --security-opt seccomp=deploy/seccomp.json, \
             Kubernetes seccompProfile type Localhost)",
            blocked.join(" and ")
        );
    }
    "permission denied loading BPF programs although CAP_BPF and CAP_PERFMON are there: a \
     security module (SELinux, AppArmor, lockdown) refuses it; check the kernel log"
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sys_admin_stands_in_for_bpf_and_perfmon() {
        assert_eq!(Caps(u64::MAX).missing_to_load(), vec![]);
        assert_eq!(Caps(0).missing_to_load(), vec![Cap::Bpf, Cap::Perfmon]);
        assert_eq!(Caps(1 << Cap::SysAdmin as u32).missing_to_load(), vec![]);
        let bpf_only = Caps(1 << Cap::Bpf as u32);
        assert_eq!(bpf_only.missing_to_load(), vec![Cap::Perfmon]);
        assert_eq!(bpf_only.missing_to_inspect_others(), vec![Cap::SysPtrace, Cap::DacReadSearch]);
    }

    #[test]
    fn names_read_as_a_list() {
        assert_eq!(names(&[Cap::Bpf]), "CAP_BPF");
        assert_eq!(
            names(&[Cap::Bpf, Cap::Perfmon, Cap::NetAdmin]),
            "CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN"
        );
    }
}
