//! Which threads are stuck with a socket: those blocked in a call on its fd right now (with how
//! long, when the probes timed the call), or failing that, the one that last moved data on it.
use std::collections::HashMap;

use serde::Serialize;

use observer_common::{CALL_SEND, SockCall, ThreadCall};

use crate::{
    procfs::{Owner, ThreadState},
    snapshot::Activity,
    syscalls,
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ThreadInfo {
    pub tid: u32,
    pub name: String,
    /// The call the thread is blocked in on this socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_in: Option<&'static str>,
    /// How long it has been inside that call, as timed by the probes (needs --pid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_ms: Option<u64>,
    /// For a thread that is not blocked on the socket: how long ago it last moved data on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_io_ms: Option<u64>,
}

/// What the probes know that bears on who is stuck with a socket.
pub struct Probed<'a> {
    /// Per-thread socket syscalls (with --pid): which fd, since when.
    pub syscalls: &'a HashMap<u32, ThreadCall>,
    /// Per-thread TCP sends and receives in progress (fentry/kprobe backends): which socket.
    pub sock_calls: &'a HashMap<u32, SockCall>,
    /// The socket's own record: who last moved data on it.
    pub activity: Option<&'a Activity>,
}

pub fn attribute(
    owner: &Owner,
    cookie: u64,
    threads: &[ThreadState],
    probed: &Probed,
    now_ns: u64,
) -> Vec<ThreadInfo> {
    let since = |enter_ns: u64| now_ns.saturating_sub(enter_ns) / 1_000_000;
    let blocked: Vec<ThreadInfo> = threads
        .iter()
        .filter_map(|t| {
            // The probes' records are exact and timed; /proc covers what they do not see.
            let syscall =
                probed.syscalls.get(&t.tid).filter(|c| c.enter_ns != 0 && c.fd == owner.fd);
            let kernel = probed
                .sock_calls
                .get(&t.tid)
                .filter(|c| c.enter_ns != 0 && c.cookie == cookie && c.tgid == owner.pid);
            let seen = t.blocked.filter(|b| b.fd == owner.fd);
            let blocked_in = syscall
                .and_then(|c| syscalls::by_nr(i64::from(c.nr)).map(|s| s.name))
                .or(seen.map(|b| b.syscall))
                .or(kernel.map(|c| {
                    if c.direction == CALL_SEND { "tcp_sendmsg" } else { "tcp_recvmsg" }
                }))?;
            let blocked_ms =
                syscall.map(|c| since(c.enter_ns)).or(kernel.map(|c| since(c.enter_ns)));
            Some(ThreadInfo {
                tid: t.tid,
                name: t.name.clone(),
                blocked_in: Some(blocked_in),
                blocked_ms,
                last_io_ms: None,
            })
        })
        .collect();
    if !blocked.is_empty() {
        return blocked;
    }
    let Some(last) = probed.activity.filter(|a| a.last_tid != 0 && a.last_tgid == owner.pid) else {
        return vec![];
    };
    // A thread that has exited since is still worth naming by its id.
    let name = threads
        .iter()
        .find(|t| t.tid == last.last_tid)
        .map_or_else(|| "(exited)".to_owned(), |t| t.name.clone());
    let last_io_ns = last.last_send_ns.max(last.last_recv_ns);
    vec![ThreadInfo {
        tid: last.last_tid,
        name,
        blocked_in: None,
        blocked_ms: None,
        last_io_ms: Some(since(last_io_ns)),
    }]
}

pub fn comm_str(raw: &[u8; 16]) -> String {
    let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..len]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procfs::BlockedCall;
    use observer_common::CALL_RECV;

    fn probed<'a>(
        syscalls: &'a HashMap<u32, ThreadCall>,
        sock_calls: &'a HashMap<u32, SockCall>,
        activity: Option<&'a Activity>,
    ) -> Probed<'a> {
        Probed { syscalls, sock_calls, activity }
    }

    fn owner() -> Owner {
        Owner { pid: 100, fd: 7, comm: "srv".into() }
    }

    fn thread(tid: u32, name: &str, blocked: Option<(&'static str, i32)>) -> ThreadState {
        ThreadState {
            tid,
            name: name.into(),
            blocked: blocked.map(|(syscall, fd)| BlockedCall { syscall, fd }),
        }
    }

    #[test]
    fn threads_blocked_on_the_socket_fd_are_named() {
        let threads = [
            thread(100, "main", Some(("accept4", 3))),
            thread(101, "worker-1", Some(("read", 7))),
            thread(102, "worker-2", Some(("read", 8))),
        ];
        let got =
            attribute(&owner(), 1, &threads, &probed(&HashMap::new(), &HashMap::new(), None), 0);
        assert_eq!(
            got,
            vec![ThreadInfo {
                tid: 101,
                name: "worker-1".into(),
                blocked_in: Some("read"),
                blocked_ms: None,
                last_io_ms: None
            }]
        );
    }

    #[test]
    fn probe_timed_calls_give_blocked_ms() {
        let threads = [thread(101, "worker-1", Some(("read", 7))), thread(102, "worker-2", None)];
        let calls = HashMap::from([
            (101, ThreadCall { enter_ns: 1_000_000_000, nr: libc::SYS_recvfrom as u32, fd: 7 }),
            // Thread 102's last call on this fd has returned: not blocked.
            (102, ThreadCall { enter_ns: 0, nr: libc::SYS_recvfrom as u32, fd: 7 }),
        ]);
        let got = attribute(
            &owner(),
            1,
            &threads,
            &probed(&calls, &HashMap::new(), None),
            43_000_000_000,
        );
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].blocked_in, got[0].blocked_ms), (Some("recvfrom"), Some(42_000)));
    }

    #[test]
    fn without_a_blocked_thread_the_last_thread_to_do_io_is_named() {
        let activity = Activity {
            last_tgid: 100,
            last_tid: 105,
            last_recv_ns: 4_000_000_000,
            ..Default::default()
        };
        let (none, no_calls) = (HashMap::new(), HashMap::new());
        let probed = probed(&none, &no_calls, Some(&activity));
        let got = attribute(&owner(), 1, &[thread(100, "main", None)], &probed, 5_000_000_000);
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].tid, got[0].name.as_str(), got[0].last_io_ms),
            (105, "(exited)", Some(1000))
        );
    }

    #[test]
    fn io_by_another_process_is_not_attributed_to_the_owner() {
        let activity = Activity { last_tgid: 999, last_tid: 999, ..Default::default() };
        assert!(
            attribute(
                &owner(),
                1,
                &[],
                &probed(&HashMap::new(), &HashMap::new(), Some(&activity)),
                0
            )
            .is_empty()
        );
    }

    #[test]
    fn kernel_side_calls_name_and_time_threads_on_that_socket_only() {
        let threads =
            [thread(101, "worker-1", None), thread(102, "worker-2", None), thread(103, "w3", None)];
        let call = |cookie, tgid, direction| SockCall {
            enter_ns: 2_000_000_000,
            cookie,
            sk: 0,
            tgid,
            direction,
            peek: 0,
        };
        let sock_calls = HashMap::from([
            (101, call(1, 100, CALL_SEND)),
            (102, call(2, 100, CALL_RECV)), // another socket
            (103, call(1, 999, CALL_RECV)), // same cookie, another process: impossible, ignored
        ]);
        let got = attribute(
            &owner(),
            1,
            &threads,
            &probed(&HashMap::new(), &sock_calls, None),
            5_000_000_000,
        );
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].tid, got[0].blocked_in, got[0].blocked_ms),
            (101, Some("tcp_sendmsg"), Some(3000))
        );
    }

    #[test]
    fn proc_names_the_syscall_and_the_kernel_probe_times_it() {
        let threads = [thread(101, "worker-1", Some(("write", 7)))];
        let sock_calls = HashMap::from([(
            101,
            SockCall {
                enter_ns: 1_000_000_000,
                cookie: 1,
                sk: 0,
                tgid: 100,
                direction: CALL_SEND,
                peek: 0,
            },
        )]);
        let got = attribute(
            &owner(),
            1,
            &threads,
            &probed(&HashMap::new(), &sock_calls, None),
            4_000_000_000,
        );
        assert_eq!((got[0].blocked_in, got[0].blocked_ms), (Some("write"), Some(3000)));
    }
}
