//! The `tracepoint` backend: BTF tracepoints, which need no kprobes or function tracing. The socket
//! tracepoints sock_send_length / sock_recv_length (Linux 6.3+) run in the thread that sent or
//! received, which is what lets the agent name the thread; the scheduler's context switches
//! tell how long a watched thread has been waiting.
//!
//! The tracepoints every backend shares come in two flavours, one per store: `_sk` (socket
//! storage: fentry and tracepoint backends) and `_hashed` (by cookie: the kprobe backend).
use core::ffi::c_void;

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use observer_common::{Counter, Direction, MSG_PEEK, TcpState};

use crate::{
    activity, filter, resets, sleeps,
    store::{ByCookie, InSocket, Known, Store, record_data, record_state, record_user},
    syscall_timing, tcp_calls,
};

// sock_send_length(struct sock *sk, int ret, int flags)
#[btf_tracepoint(function = "sock_send_length")]
pub fn observer_tp_send(ctx: BtfTracePointContext) -> i32 {
    let _ = try_data(&ctx, Direction::Send);
    0
}

// sock_recv_length(struct sock *sk, int ret, int flags)
#[btf_tracepoint(function = "sock_recv_length")]
pub fn observer_tp_recv(ctx: BtfTracePointContext) -> i32 {
    let _ = try_data(&ctx, Direction::Recv);
    0
}

fn try_data(ctx: &BtfTracePointContext, direction: Direction) -> Result<(), ()> {
    let ret: i32 = ctx.arg(1);
    let flags: i32 = ctx.arg(2);
    // Errors (EAGAIN above all), EOF and peeks move no data: leave before any map work.
    if ret <= 0 || (direction == Direction::Recv && flags as u32 & MSG_PEEK != 0) {
        return Ok(());
    }
    let Some(ids) = filter::watched_current() else {
        return Ok(());
    };
    let sk: *mut c_void = ctx.arg(0);
    let entry = InSocket::entry(sk, || activity::cookie_of(sk), Known::Unchecked).ok_or(())?;
    record_data(entry, direction, ids);
    Ok(())
}

// inet_sock_set_state(const struct sock *sk, const int oldstate, const int newstate)
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn observer_tp_state_sk(ctx: BtfTracePointContext) -> i32 {
    let _ = try_state::<InSocket>(&ctx);
    0
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn observer_tp_state_hashed(ctx: BtfTracePointContext) -> i32 {
    let _ = try_state::<ByCookie>(&ctx);
    0
}

fn try_state<S: Store>(ctx: &BtfTracePointContext) -> Result<(), ()> {
    activity::count(Counter::StateEvents);
    let sk: *mut c_void = ctx.arg(0);
    let new_state: i32 = ctx.arg(2);
    let new_state = new_state as u32;
    let cookie = || activity::cookie_of(sk);
    // connect(), close() and shutdown() change the state in the thread that called them, so
    // SYN_SENT, FIN_WAIT1 and LAST_ACK name the socket's user: even a connection closed before
    // any poll saw its fd (an orphan) is known to be the watched process's, on kernels without
    // the send/receive tracepoints too.
    let by_caller = [TcpState::SynSent, TcpState::FinWait1, TcpState::LastAck]
        .iter()
        .any(|&s| new_state == s as u32);
    let caller =
        if by_caller { filter::watched_current().filter(|ids| ids.tgid != 0) } else { None };
    // A socket going to CLOSE is about to be destroyed (or already reset): update it, but do not
    // start tracking it now. When specific processes are watched, other state changes (often in
    // softirq, with no owner in sight) only update sockets those processes already used, so the
    // records are their sockets'. Otherwise every transition is tracked, so CLOSE_WAIT and the
    // like have an exact entry time. SCTP and MPTCP use this tracepoint too: TCP is checked.
    let entry = if new_state == TcpState::Close as u32 {
        S::existing(sk, cookie)
    } else if caller.is_some() || !filter::filtering_pids() {
        S::entry(sk, cookie, Known::Unchecked)
    } else {
        S::existing(sk, cookie)
    };
    let entry = entry.ok_or(())?;
    record_state(entry, new_state);
    if let Some(ids) = caller {
        record_user(entry, ids);
    }
    Ok(())
}

// tcp_destroy_sock(struct sock *sk): socket storage goes with the socket by itself; a record
// by cookie has to be forgotten.
#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn observer_tp_destroy_hashed(ctx: BtfTracePointContext) -> i32 {
    activity::count(Counter::DestroyEvents);
    let sk: *mut c_void = ctx.arg(0);
    ByCookie::forget(activity::cookie_of(sk));
    0
}

// tcp_send_reset(const struct sock *sk, const struct sk_buff *skb[, enum sk_rst_reason reason])
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn observer_tp_reset_sent_sk(ctx: BtfTracePointContext) -> i32 {
    let _ = resets::record::<InSocket>(ctx.arg(0), Direction::Send);
    0
}

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn observer_tp_reset_sent_hashed(ctx: BtfTracePointContext) -> i32 {
    let _ = resets::record::<ByCookie>(ctx.arg(0), Direction::Send);
    0
}

// tcp_receive_reset(struct sock *sk)
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn observer_tp_reset_received_sk(ctx: BtfTracePointContext) -> i32 {
    let _ = resets::record::<InSocket>(ctx.arg(0), Direction::Recv);
    0
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn observer_tp_reset_received_hashed(ctx: BtfTracePointContext) -> i32 {
    let _ = resets::record::<ByCookie>(ctx.arg(0), Direction::Recv);
    0
}

// sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next, ...): runs as
// prev. Attached when specific processes are watched.
#[btf_tracepoint(function = "sched_switch")]
pub fn observer_tp_sched_switch(ctx: BtfTracePointContext) -> i32 {
    let preempt: u8 = ctx.arg(0);
    sleeps::switched_out(preempt != 0);
    0
}

// Does nothing: attached only with --probe-stats, so that the cost any program pays on this
// machine (the tracepoint's dispatch, the statistics' own clock reads) shows beside ours.
#[btf_tracepoint(function = "sock_send_length")]
pub fn observer_tp_floor(_ctx: BtfTracePointContext) -> i32 {
    0
}

// sys_enter(struct pt_regs *regs, long id): attached only when watching given processes.
#[btf_tracepoint(function = "sys_enter")]
pub fn observer_tp_sys_enter(ctx: BtfTracePointContext) -> i32 {
    let regs: *const u8 = ctx.arg(0);
    let nr: i64 = ctx.arg(1);
    syscall_timing::enter(regs, nr);
    0
}

// sys_exit(struct pt_regs *regs, long ret)
#[btf_tracepoint(function = "sys_exit")]
pub fn observer_tp_sys_exit(ctx: BtfTracePointContext) -> i32 {
    let ret: i64 = ctx.arg(1);
    syscall_timing::exit(ret);
    0
}

// sched_process_exit(struct task_struct *p[, bool group_dead]): runs as the exiting thread.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn observer_tp_thread_exit(_ctx: BtfTracePointContext) -> i32 {
    let tid = filter::current_ids().tid;
    if tid != 0 {
        syscall_timing::thread_exit(tid);
        tcp_calls::thread_exit(tid);
        sleeps::thread_exit(tid);
    }
    0
}
