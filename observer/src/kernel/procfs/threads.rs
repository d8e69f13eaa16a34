//! A process's threads, and which of them are blocked in a socket call on which fd.
use std::fs;

/// A thread of a watched process and, if it is blocked in a call on one fd, which call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadState {
    pub tid: u32,
    pub name: String,
    pub blocked: Option<BlockedCall>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockedCall {
    pub syscall: &'static str,
    pub fd: i32,
}

/// The threads of `pid` with what each is blocked in. Reading a thread's syscall file needs
/// ptrace access; without it the thread is listed as not blocked.
pub fn thread_states(pid: u32) -> Vec<ThreadState> {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    let mut threads: Vec<ThreadState> = entries
        .flatten()
        .filter_map(|entry| {
            let tid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let dir = entry.path();
            let name = fs::read_to_string(dir.join("comm")).ok()?.trim_end().to_owned();
            let blocked =
                fs::read_to_string(dir.join("syscall")).ok().and_then(|s| parse_syscall_line(&s));
            Some(ThreadState { tid, name, blocked })
        })
        .collect();
    threads.sort_by_key(|t| t.tid);
    threads
}

/// Parses /proc/PID/task/TID/syscall ("nr arg0 .. arg5 sp pc" for a thread inside a syscall,
/// "running" or "-1 sp pc" otherwise) into the socket call and fd it is blocked on, if any.
pub fn parse_syscall_line(line: &str) -> Option<BlockedCall> {
    let mut fields = line.split_whitespace();
    let nr: i64 = fields.next()?.parse().ok()?;
    let args: Vec<i64> = fields
        .take(6)
        .map(|a| i64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
        .collect::<Option<_>>()?;
    let call = crate::kernel::syscalls::by_nr(nr)?;
    let fd = *args.get(call.fd_arg)?;
    Some(BlockedCall { syscall: call.name, fd: i32::try_from(fd).ok()? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_read_names_call_and_fd() {
        let line = format!("{} 0x5 0x7ffd1c 0x400 0x0 0x0 0x0 0x7ffd00 0x7f12ab\n", libc::SYS_read);
        assert_eq!(parse_syscall_line(&line), Some(BlockedCall { syscall: "read", fd: 5 }));
    }

    #[test]
    fn blocked_sendto_on_large_fd() {
        let line = format!("{} 0x3e8 0x1 0x2 0x0 0x0 0x0 0x1 0x2", libc::SYS_sendto);
        assert_eq!(parse_syscall_line(&line), Some(BlockedCall { syscall: "sendto", fd: 1000 }));
    }

    #[test]
    fn running_or_not_in_syscall_or_other_call_is_not_blocked() {
        assert_eq!(parse_syscall_line("running\n"), None);
        assert_eq!(parse_syscall_line("-1 0x7ffd00 0x7f12ab"), None);
        let nanosleep = format!("{} 0x7ffd 0x0 0x0 0x0 0x0 0x0 0x1 0x2", libc::SYS_nanosleep);
        assert_eq!(parse_syscall_line(&nanosleep), None);
        assert_eq!(parse_syscall_line(""), None);
        assert_eq!(parse_syscall_line("0 zz"), None);
    }
}
