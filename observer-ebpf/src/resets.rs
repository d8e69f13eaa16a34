//! Resets that lose data: a reset sent or received while the socket still held unread or unsent
//! bytes. The classic case is the lingering-close failure: a server closes with part of the
//! request unread, the kernel answers with a reset instead of a FIN, and the client loses the
//! response it had not read yet.
use aya_ebpf::{helpers::bpf_get_current_comm, macros::map, maps::RingBuf};
use observer_common::{Counter, Direction, ResetEvent, TcpState};

use crate::{
    activity::{self, read_at},
    filter,
    store::Store,
};

const AF_INET: u16 = 2;

/// Reset events for the agent, drained every poll.
#[map]
static RESETS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[inline(always)]
pub fn record<S: Store>(sk: *const u8, direction: Direction) -> Result<(), ()> {
    if sk.is_null() {
        return Err(());
    }
    // Time-wait and request sockets are smaller than a tcp_sock: their fields below are not there.
    let offsets = activity::OFFSETS.load();
    let at = |offset: u32| offset as usize;
    let state: u8 = read_at(sk, at(offsets.skc_state));
    let not_full = [TcpState::TimeWait, TcpState::NewSynRecv, TcpState::Listen];
    if not_full.iter().any(|s| *s as u8 == state) {
        return Err(());
    }
    let unread = read_at::<u32>(sk, at(offsets.tcp_rcv_nxt))
        .wrapping_sub(read_at(sk, at(offsets.tcp_copied_seq)));
    let unsent = read_at::<u32>(sk, at(offsets.tcp_write_seq))
        .wrapping_sub(read_at(sk, at(offsets.tcp_snd_una)));
    // Sequence arithmetic on a socket in a strange state can wrap; such numbers are not data.
    let sane = |n: u32| if n > (1 << 30) { 0 } else { n };
    let (unread, unsent) = (sane(unread), sane(unsent));
    if unread == 0 && unsent == 0 {
        return Ok(()); // nothing was lost
    }
    activity::count(Counter::ResetEvents);
    let cookie = activity::cookie_of(sk as *mut _);
    // In softirq context the current task is unrelated: prefer the socket's last user.
    let last_user = S::existing(sk.cast_mut().cast(), || cookie)
        // SAFETY: a valid record pointer from the store.
        .map(|a| unsafe { ((*a).last_tgid, (*a).last_tid) })
        .filter(|&(_, tid)| tid != 0);
    let (tgid, tid, comm) = match last_user {
        // The agent names the thread from /proc.
        Some((tgid, tid)) => (tgid, tid, [0; 16]),
        None => {
            let ids = filter::current_ids();
            (ids.tgid, ids.tid, bpf_get_current_comm().unwrap_or([0; 16]))
        }
    };
    let family: u16 = read_at(sk, at(offsets.skc_family));
    let mut event = ResetEvent {
        cookie,
        at_ns: activity::now_ns(),
        unread,
        unsent,
        tgid,
        tid,
        comm,
        direction: direction as u8,
        state,
        family,
        local_port: u16::from_be(read_at(sk, at(offsets.inet_sport))),
        remote_port: u16::from_be(read_at(sk, at(offsets.skc_dport))),
        ..ResetEvent::default()
    };
    if family == AF_INET {
        event.local_addr[..4].copy_from_slice(&read_at::<[u8; 4]>(sk, at(offsets.skc_rcv_saddr)));
        event.remote_addr[..4].copy_from_slice(&read_at::<[u8; 4]>(sk, at(offsets.skc_daddr)));
    } else {
        event.local_addr = read_at(sk, at(offsets.skc_v6_rcv_saddr));
        event.remote_addr = read_at(sk, at(offsets.skc_v6_daddr));
    }
    if RESETS.output::<ResetEvent>(&event, 0).is_err() {
        activity::count(Counter::EventsLost);
    }
    Ok(())
}
