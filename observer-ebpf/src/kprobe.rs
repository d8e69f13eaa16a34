//! The `kprobe` backend: kprobes and kretprobes on the TCP send and receive functions, for
//! kernels where fentry is unavailable. kprobes cannot call bpf_get_socket_cookie, so they read
//! the socket's cookie field; the state-change probe and the agent's sock_diag dumps make sure
//! every socket has one by then.
use core::ffi::c_void;

use aya_ebpf::{
    macros::{kprobe, kretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use observer_common::Direction;

use crate::{
    activity::{offset, read_at},
    store::ByCookie,
    tcp_calls,
};

#[inline(always)]
fn cookie_field(sk: *const u8) -> u64 {
    read_at(sk, offset!(skc_cookie))
}

#[inline(always)]
fn enter(ctx: &ProbeContext, direction: Direction, flags_arg: Option<usize>) -> Option<()> {
    let sk: *const u8 = ctx.arg(0)?;
    let flags: i32 = match flags_arg {
        Some(n) => ctx.arg(n)?,
        None => 0,
    };
    tcp_calls::enter(sk, cookie_field(sk), direction, flags as u32);
    Some(())
}

#[inline(always)]
fn exit(ctx: &RetProbeContext) {
    let ret: i32 = ctx.ret();
    if let Some((call, ids)) = tcp_calls::exit(ret.into()) {
        let sk = call.sk as *const u8;
        // A cookie missing at entry may have been assigned since.
        let cookie = if call.cookie != 0 { call.cookie } else { cookie_field(sk) };
        if cookie != 0 {
            tcp_calls::book::<ByCookie>(sk as *mut c_void, || cookie, (call, ids));
        }
    }
}

#[kprobe(function = "tcp_sendmsg")]
pub fn observer_kp_send(ctx: ProbeContext) -> u32 {
    let _ = enter(&ctx, Direction::Send, None);
    0
}

#[kretprobe(function = "tcp_sendmsg")]
pub fn observer_kr_send(ctx: RetProbeContext) -> u32 {
    exit(&ctx);
    0
}

#[kprobe(function = "tcp_recvmsg")]
pub fn observer_kp_recv(ctx: ProbeContext) -> u32 {
    let _ = enter(&ctx, Direction::Recv, Some(3));
    0
}

// Before Linux 5.19 tcp_recvmsg had a `nonblock` argument before `flags`.
#[kprobe(function = "tcp_recvmsg")]
pub fn observer_kp_recv_old(ctx: ProbeContext) -> u32 {
    let _ = enter(&ctx, Direction::Recv, Some(4));
    0
}

#[kretprobe(function = "tcp_recvmsg")]
pub fn observer_kr_recv(ctx: RetProbeContext) -> u32 {
    exit(&ctx);
    0
}

#[kprobe(function = "tcp_sendpage")]
pub fn observer_kp_sendpage(ctx: ProbeContext) -> u32 {
    let _ = enter(&ctx, Direction::Send, None);
    0
}

#[kretprobe(function = "tcp_sendpage")]
pub fn observer_kr_sendpage(ctx: RetProbeContext) -> u32 {
    exit(&ctx);
    0
}
