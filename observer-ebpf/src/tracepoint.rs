//! The `tracepoint` backend: BTF tracepoints, which need no kprobes or function tracing. The socket
//! tracepoints sock_send_length / sock_recv_length (Linux 6.3+) run in the thread that sent or
//! received, which is what lets the agent name the thread.
use core::ffi::c_void;

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use observer_common::{Counter, Direction, MSG_PEEK, TcpState};

use crate::{
    activity::{self, Known},
    resets, syscall_timing, tcp_calls,
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
    let Some(ids) = activity::watched_current() else {
        return Ok(());
    };
    activity::count(match direction {
        Direction::Send => Counter::SendEvents,
        Direction::Recv => Counter::RecvEvents,
    });
    let sk: *mut c_void = ctx.arg(0);
    let entry = activity::entry(sk, activity::cookie_of(sk), Known::Unchecked).ok_or(())?;
    activity::record_data(entry, direction, ret as u64, ids);
    Ok(())
}

// tcp_retransmit_skb(const struct sock *sk, const struct sk_buff *skb[, int err])
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn observer_tp_retransmit(ctx: BtfTracePointContext) -> i32 {
    let _ = try_retransmit(&ctx);
    0
}

fn try_retransmit(ctx: &BtfTracePointContext) -> Result<(), ()> {
    activity::count(Counter::RetransmitEvents);
    let sk: *mut c_void = ctx.arg(0);
    let entry = activity::entry(sk, activity::cookie_of(sk), Known::Tcp).ok_or(())?;
    activity::record_retransmit(entry);
    Ok(())
}

// inet_sock_set_state(const struct sock *sk, const int oldstate, const int newstate)
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn observer_tp_state(ctx: BtfTracePointContext) -> i32 {
    let _ = try_state(&ctx);
    0
}

fn try_state(ctx: &BtfTracePointContext) -> Result<(), ()> {
    activity::count(Counter::StateEvents);
    let sk: *mut c_void = ctx.arg(0);
    let new_state: i32 = ctx.arg(2);
    let new_state = new_state as u32;
    let cookie = activity::cookie_of(sk);
    // A socket going to CLOSE is about to be destroyed (or already reset): update it, but do not
    // start tracking it now. When specific processes are watched, state changes (often in
    // softirq, with no owner in sight) only update sockets those processes already used, so the
    // map holds their sockets only; but connect() runs in the calling thread, so a watched
    // process's connection attempt is tracked from its SYN (an exact connect time). Otherwise
    // every transition is tracked, so CLOSE_WAIT and the like have an exact entry time. SCTP
    // and MPTCP use this tracepoint too: TCP is checked.
    let entry = if new_state == TcpState::Close as u32 {
        activity::existing(cookie)
    } else if activity::filtering_pids() {
        if new_state == TcpState::SynSent as u32 && activity::watched_current().is_some() {
            activity::entry(sk, cookie, Known::Unchecked)
        } else {
            activity::existing(cookie)
        }
    } else {
        activity::entry(sk, cookie, Known::Unchecked)
    };
    activity::record_state(entry.ok_or(())?, new_state);
    Ok(())
}

// tcp_destroy_sock(struct sock *sk)
#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn observer_tp_destroy(ctx: BtfTracePointContext) -> i32 {
    activity::count(Counter::DestroyEvents);
    let sk: *mut c_void = ctx.arg(0);
    activity::forget(activity::cookie_of(sk));
    0
}

// tcp_send_reset(const struct sock *sk, const struct sk_buff *skb[, enum sk_rst_reason reason])
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn observer_tp_reset_sent(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let _ = resets::record(sk, Direction::Send);
    0
}

// tcp_receive_reset(struct sock *sk)
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn observer_tp_reset_received(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let _ = resets::record(sk, Direction::Recv);
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
    syscall_timing::thread_exit();
    tcp_calls::thread_exit();
    0
}
