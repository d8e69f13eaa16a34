//! The `fentry` backend: fentry/fexit trampolines on the TCP send and receive functions see
//! every send and receive (io_uring and splice included) with the socket as a typed argument.
use core::ffi::c_void;

use aya_ebpf::{
    macros::{fentry, fexit},
    programs::{FEntryContext, FExitContext},
};
use observer_common::Direction;

use crate::{activity, store::InSocket, tcp_calls};

/// A thread enters a TCP send or receive; `flags_arg` is where the call has its flags.
#[inline(always)]
fn enter(ctx: &FEntryContext, direction: Direction, flags_arg: Option<usize>) -> u32 {
    let sk: *mut c_void = ctx.arg(0);
    let flags: i32 = flags_arg.map_or(0, |n| ctx.arg(n));
    tcp_calls::enter(sk.cast(), activity::cookie_of(sk), direction, flags as u32);
    0
}

// int tcp_sendmsg(struct sock *sk, struct msghdr *msg, size_t size)
#[fentry(function = "tcp_sendmsg")]
pub fn observer_fe_send(ctx: FEntryContext) -> u32 {
    enter(&ctx, Direction::Send, None)
}

#[fexit(function = "tcp_sendmsg")]
pub fn observer_fx_send(ctx: FExitContext) -> u32 {
    let _ = try_exit(&ctx);
    0
}

// int tcp_recvmsg(struct sock *sk, struct msghdr *msg, size_t len, int flags, int *addr_len)
// (Linux 5.19+; before, a `nonblock` argument came before `flags`.)
#[fentry(function = "tcp_recvmsg")]
pub fn observer_fe_recv(ctx: FEntryContext) -> u32 {
    enter(&ctx, Direction::Recv, Some(3))
}

#[fentry(function = "tcp_recvmsg")]
pub fn observer_fe_recv_old(ctx: FEntryContext) -> u32 {
    enter(&ctx, Direction::Recv, Some(4))
}

#[fexit(function = "tcp_recvmsg")]
pub fn observer_fx_recv(ctx: FExitContext) -> u32 {
    let _ = try_exit(&ctx);
    0
}

// int tcp_sendpage(struct sock *sk, struct page *page, int offset, size_t size, int flags):
// sendfile() and splice() took this path until Linux 6.5.
#[fentry(function = "tcp_sendpage")]
pub fn observer_fe_sendpage(ctx: FEntryContext) -> u32 {
    enter(&ctx, Direction::Send, None)
}

#[fexit(function = "tcp_sendpage")]
pub fn observer_fx_sendpage(ctx: FExitContext) -> u32 {
    let _ = try_exit(&ctx);
    0
}

fn try_exit(ctx: &FExitContext) -> Result<(), i32> {
    let ret: i64 = ctx.ret::<i32>()?.into();
    let call = tcp_calls::exit(ret).ok_or(0)?;
    let sk: *mut c_void = ctx.arg(0);
    tcp_calls::book::<InSocket>(sk, || activity::cookie_of(sk), call);
    Ok(())
}
