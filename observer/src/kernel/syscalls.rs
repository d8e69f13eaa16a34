//! The socket calls a thread can be stuck in, by this architecture's syscall numbers. One table
//! serves /proc parsing, the probes' syscall filter, and naming what a thread is blocked in.
use observer_common::syscall_kind;

pub struct SocketSyscall {
    pub nr: i64,
    pub name: &'static str,
    /// Which argument holds the fd the call blocks on.
    pub fd_arg: usize,
    pub kind: u32,
}

const fn call(nr: i64, name: &'static str, fd_arg: usize, kind: u32) -> SocketSyscall {
    SocketSyscall { nr, name, fd_arg, kind }
}

const FD: u32 = syscall_kind::FD_CALL;

pub const SOCKET_SYSCALLS: &[SocketSyscall] = &[
    call(libc::SYS_read, "read", 0, FD),
    call(libc::SYS_write, "write", 0, FD),
    call(libc::SYS_readv, "readv", 0, FD),
    call(libc::SYS_writev, "writev", 0, FD),
    call(libc::SYS_recvfrom, "recvfrom", 0, FD),
    call(libc::SYS_sendto, "sendto", 0, FD),
    call(libc::SYS_recvmsg, "recvmsg", 0, FD),
    call(libc::SYS_sendmsg, "sendmsg", 0, FD),
    call(libc::SYS_recvmmsg, "recvmmsg", 0, FD),
    call(libc::SYS_sendmmsg, "sendmmsg", 0, FD),
    call(libc::SYS_sendfile, "sendfile", 0, FD),
    call(libc::SYS_connect, "connect", 0, FD),
    call(libc::SYS_accept, "accept", 0, syscall_kind::ACCEPT),
    call(libc::SYS_accept4, "accept4", 0, syscall_kind::ACCEPT),
    // splice blocks on either end; /proc shows the output end (the socket, when sending).
    call(libc::SYS_splice, "splice", 2, syscall_kind::NONE),
];

pub fn by_nr(nr: i64) -> Option<&'static SocketSyscall> {
    SOCKET_SYSCALLS.iter().find(|c| c.nr == nr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_distinct_and_named() {
        for (i, a) in SOCKET_SYSCALLS.iter().enumerate() {
            assert!(SOCKET_SYSCALLS[i + 1..].iter().all(|b| b.nr != a.nr), "{} twice", a.name);
            assert_eq!(by_nr(a.nr).unwrap().name, a.name);
        }
        assert!(by_nr(libc::SYS_nanosleep).is_none());
    }
}
