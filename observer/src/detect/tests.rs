//! Each rule on synthetic snapshots: it fires on the failure it names, and not on a healthy
//! connection of the same shape.
use std::time::Duration;

use observer_common::{Direction, TcpState};

use super::*;
use crate::{
    detect::thresholds::Overrides,
    snapshot::{ProcessView, SocketView, fixtures::*},
};

const S: u64 = 1_000_000_000;

fn detector() -> Detector {
    Detector::new(Policy::default(), KernelSettings::default())
}

fn detector_with(overrides: Overrides) -> Detector {
    Detector::new(Policy::default().with_command_line(overrides), KernelSettings::default())
}

fn at(t_ns: u64, sockets: Vec<SocketView>) -> Snapshot {
    Snapshot::new(t_ns, sockets, vec![], vec![])
}

fn reasons(findings: &[Finding]) -> Vec<Reason> {
    findings.iter().map(|f| f.reason()).collect()
}

/// Runs `steps` polls one `step` apart; `shape(i)` gives the socket at poll i. Returns the
/// findings of the last poll.
fn run(
    det: &mut Detector,
    steps: u64,
    step: u64,
    shape: impl Fn(u64) -> SocketView,
) -> Vec<Finding> {
    let mut last = vec![];
    for i in 0..=steps {
        last = det.observe(&at(NOW_NS + i * step, vec![shape(i)]));
    }
    last
}

// --- idle ------------------------------------------------------------------------------------

#[test]
fn idle_established_socket_is_found_with_its_idle_time() {
    let found =
        detector().observe(&snapshot(vec![socket(1, TcpState::Established, 61_000, 65_000)]));
    assert_eq!(reasons(&found), vec![Reason::Idle]);
    assert!(found[0].facts.detail().contains("61.0s"), "{}", found[0].facts.detail());
    assert_eq!(found[0].target, Target::Socket(1));
}

#[test]
fn recent_traffic_in_either_direction_is_not_idle() {
    let s = snapshot(vec![
        socket(1, TcpState::Established, 61_000, 59_999),
        socket(2, TcpState::Established, 100, 90_000),
    ]);
    assert!(detector().observe(&s).is_empty());
}

#[test]
fn only_established_sockets_with_nothing_to_send_are_idle() {
    let mut queued = socket(3, TcpState::Established, 99_000, 99_000);
    queued.diag.wqueue = 10;
    let s = snapshot(vec![socket(1, TcpState::Listen, 99_000, 99_000), queued]);
    assert!(!reasons(&detector().observe(&s)).contains(&Reason::Idle));
}

#[test]
fn recent_application_read_seen_by_probes_keeps_socket_active() {
    let mut s = socket(1, TcpState::Established, 120_000, 120_000);
    s.diag.activity =
        Some(crate::kernel::probes::Activity { last_recv_ns: NOW_NS - S, ..Default::default() });
    assert!(detector().observe(&snapshot(vec![s])).is_empty());
}

// --- slow_transfer ---------------------------------------------------------------------------

fn trickle(i: u64, bytes_per_step: u64, answers: bool) -> SocketView {
    let mut s = socket(1, TcpState::Established, 100, 100);
    let tcp = s.diag.tcp.as_mut().unwrap();
    tcp.bytes_received = 1000 + i * bytes_per_step;
    tcp.bytes_acked = if answers { 500 + i * 40 } else { 500 };
    s
}

#[test]
fn slow_loris_trickle_is_a_slow_transfer() {
    let mut det =
        detector_with(Overrides { slow_after: Some(Duration::from_secs(3)), ..Default::default() });
    // One byte every half second for four seconds: 2 B/s.
    let found = run(&mut det, 8, S / 2, |i| trickle(i, 1, false));
    assert_eq!(reasons(&found), vec![Reason::SlowTransfer]);
    let m = &found[0].facts.metrics();
    assert_eq!(m["direction"], "receiving");
    let rate = m["rate_bytes_per_sec"].as_f64().unwrap();
    assert!((1.5..=2.5).contains(&rate), "{m:?}");
}

#[test]
fn slow_loris_needs_a_full_window_first() {
    let mut det =
        detector_with(Overrides { slow_after: Some(Duration::from_secs(3)), ..Default::default() });
    assert!(run(&mut det, 5, S / 2, |i| trickle(i, 1, false)).is_empty(), "only 2.5 s observed");
}

#[test]
fn request_response_at_a_low_rate_is_not_slow_loris() {
    let mut det =
        detector_with(Overrides { slow_after: Some(Duration::from_secs(3)), ..Default::default() });
    assert!(run(&mut det, 12, S / 2, |i| trickle(i, 1, true)).is_empty());
}

#[test]
fn a_fast_one_way_transfer_is_not_slow() {
    let mut det =
        detector_with(Overrides { slow_after: Some(Duration::from_secs(3)), ..Default::default() });
    assert!(run(&mut det, 12, S / 2, |i| trickle(i, 10_000, false)).is_empty());
}

#[test]
fn one_burst_then_silence_is_not_a_trickle() {
    let mut det =
        detector_with(Overrides { slow_after: Some(Duration::from_secs(3)), ..Default::default() });
    let found = run(&mut det, 12, S / 2, |i| {
        let mut s = trickle(if i == 0 { 0 } else { 1 }, 10, false);
        s.diag.tcp.as_mut().unwrap().last_data_recv_ms = (i * 500) as u32;
        s
    });
    assert!(!reasons(&found).contains(&Reason::SlowTransfer), "{found:?}");
}

// --- blocked_send / retransmitting -----------------------------------------------------------

fn stuck_sender(acked: u64, retransmits: u8) -> SocketView {
    let mut s = socket(1, TcpState::Established, 40_000, 40_000);
    s.diag.wqueue = 2_000_000;
    let tcp = s.diag.tcp.as_mut().unwrap();
    tcp.bytes_acked = acked;
    tcp.retransmits = retransmits;
    tcp.unacked = if retransmits > 0 { 10 } else { 0 };
    tcp.notsent_bytes = 1_500_000;
    tcp.last_ack_recv_ms = 200;
    s
}

#[test]
fn peer_that_stopped_reading_blocks_the_sender() {
    let found = run(&mut detector(), 31, S, |_| stuck_sender(5_000, 0));
    assert_eq!(reasons(&found), vec![Reason::BlockedSend]);
    assert_eq!(found[0].facts.metrics()["send_queue_bytes"], 2_000_000);
    assert!(found[0].facts.metrics()["stalled_ms"].as_u64().unwrap() >= 30_000);
}

#[test]
fn vanished_peer_is_retransmitting_not_blocked() {
    let found = run(&mut detector(), 31, S, |_| stuck_sender(5_000, 4));
    assert_eq!(reasons(&found), vec![Reason::Retransmitting]);
    let m = &found[0].facts.metrics();
    assert_eq!(m["retransmits_in_a_row"], 4);
    assert!(m["gives_up_in_ms"].as_u64().unwrap() < 924_600 - 30_000);
}

#[test]
fn senders_whose_peer_keeps_acknowledging_are_neither_blocked_nor_retransmitting() {
    // Slow but moving; and recovering after a retransmission.
    for (acked_per_second, retransmits) in [(100, 0), (1000, 1)] {
        let found = run(&mut detector(), 40, S, |i| {
            stuck_sender(5_000 + i * acked_per_second, retransmits)
        });
        assert!(found.is_empty(), "{acked_per_second} B/s, {retransmits} retransmits: {found:?}");
    }
}

// --- close_wait ------------------------------------------------------------------------------

#[test]
fn close_wait_after_its_timeout() {
    let found = run(&mut detector(), 61, S, |_| socket(1, TcpState::CloseWait, 100, 100));
    assert_eq!(reasons(&found), vec![Reason::CloseWait]);
    assert!(found[0].facts.metrics()["close_wait_ms"].as_u64().unwrap() >= 60_000);
    assert!(run(&mut detector(), 59, S, |_| socket(1, TcpState::CloseWait, 100, 100)).is_empty());
}

// --- accept_queue_overflow -------------------------------------------------------------------

fn listener(queued: u32, limit: u32, drops: u32) -> SocketView {
    let mut s = socket(1, TcpState::Listen, 0, 0);
    s.diag.rqueue = queued;
    s.diag.wqueue = limit;
    s.diag.drops = Some(drops);
    s
}

#[test]
fn full_accept_queue_is_an_overflow() {
    let found = detector().observe(&snapshot(vec![listener(2, 1, 0)]));
    assert_eq!(reasons(&found), vec![Reason::AcceptQueueOverflow]);
    assert_eq!(
        (
            found[0].facts.metrics()["queue_length"].as_u64(),
            found[0].facts.metrics()["queue_limit"].as_u64()
        ),
        (Some(2), Some(1))
    );
    assert!(
        detector().observe(&snapshot(vec![listener(1, 1, 0)])).is_empty(),
        "at the limit, not over"
    );
}

#[test]
fn drops_between_polls_are_an_overflow_for_a_while() {
    let mut det = detector();
    assert!(det.observe(&at(NOW_NS, vec![listener(0, 128, 5)])).is_empty(), "old drops");
    assert_eq!(
        reasons(&det.observe(&at(NOW_NS + S, vec![listener(0, 128, 9)]))),
        vec![Reason::AcceptQueueOverflow]
    );
    assert_eq!(det.observe(&at(NOW_NS + 5 * S, vec![listener(0, 128, 9)])).len(), 1);
    assert!(det.observe(&at(NOW_NS + 12 * S, vec![listener(0, 128, 9)])).is_empty());
}

// --- keepalive_missing -----------------------------------------------------------------------

fn remote_idle(ms: u32, timer: u8, expires_ms: u32) -> SocketView {
    let mut s = socket(1, TcpState::Established, ms, ms);
    s.diag.remote = "10.0.0.2:51000".parse().unwrap();
    s.diag.timer = timer;
    s.diag.timer_expires_ms = expires_ms;
    s
}

#[test]
fn silent_connection_without_keepalive_will_be_dropped_by_a_middlebox() {
    let found = detector().observe(&snapshot(vec![remote_idle(301_000, 0, 0)]));
    assert!(reasons(&found).contains(&Reason::KeepaliveMissing));
    let f = found.iter().find(|f| f.reason() == Reason::KeepaliveMissing).unwrap();
    assert_eq!(f.facts.metrics()["keepalive"], false);
}

#[test]
fn keepalive_too_late_is_reported_too() {
    let found = detector().observe(&snapshot(vec![remote_idle(301_000, 2, 6_899_000)]));
    let f = found.iter().find(|f| f.reason() == Reason::KeepaliveMissing).unwrap();
    assert_eq!(
        (
            f.facts.metrics()["keepalive"].as_bool(),
            f.facts.metrics()["keepalive_next_probe_ms"].as_u64()
        ),
        (Some(true), Some(6_899_000))
    );
}

#[test]
fn working_keepalive_or_loopback_is_fine() {
    let mut kept = remote_idle(400_000, 2, 30_000);
    kept.diag.tcp.as_mut().unwrap().last_ack_recv_ms = 50_000; // the peer answered a probe
    let lo = socket(2, TcpState::Established, 400_000, 400_000);
    let found = detector().observe(&snapshot(vec![kept, lo]));
    assert!(!reasons(&found).contains(&Reason::KeepaliveMissing), "{found:?}");
}

// --- fd_pressure -----------------------------------------------------------------------------

fn process(fds: u32, limit: Option<u64>, accept_errors: u64) -> ProcessView {
    ProcessView {
        pid: 42,
        comm: "server".into(),
        fds_used: fds,
        fd_limit: limit,
        accept_errors: Some(accept_errors),
        ..ProcessView::default()
    }
}

fn poll_processes(det: &mut Detector, t: u64, p: ProcessView) -> Vec<Finding> {
    det.observe(&Snapshot::new(NOW_NS + t, vec![], vec![p], vec![]))
}

#[test]
fn nearly_exhausted_fds_are_fd_pressure() {
    let found = poll_processes(&mut detector(), 0, process(95, Some(100), 0));
    assert_eq!(reasons(&found), vec![Reason::FdPressure]);
    assert_eq!(found[0].target, Target::Process(42));
    assert_eq!(
        (
            found[0].facts.metrics()["fds_used"].as_u64(),
            found[0].facts.metrics()["fds_limit"].as_u64()
        ),
        (Some(95), Some(100))
    );
    assert!(poll_processes(&mut detector(), 0, process(50, Some(100), 0)).is_empty());
    assert!(poll_processes(&mut detector(), 0, process(5000, None, 0)).is_empty(), "unlimited");
}

#[test]
fn failing_accepts_are_fd_pressure_while_recent() {
    let mut det = detector();
    assert!(
        poll_processes(&mut det, 0, process(10, Some(1000), 3)).is_empty(),
        "errors from before"
    );
    assert_eq!(poll_processes(&mut det, S, process(10, Some(1000), 7)).len(), 1);
    assert!(poll_processes(&mut det, 20 * S, process(10, Some(1000), 7)).is_empty());
}

// --- reset_unread ----------------------------------------------------------------------------

fn reset(cookie: u64) -> ResetView {
    ResetView {
        cookie,
        pid: 42,
        tid: 43,
        comm: "server".into(),
        thread_name: "worker".into(),
        fd: None,
        local: "127.0.0.1:8080".parse().unwrap(),
        remote: "127.0.0.1:40001".parse().unwrap(),
        state: Some(TcpState::Close),
        direction: Direction::Send,
        unread: 17,
        unsent: 0,
        netns: None,
        workload: None,
    }
}

#[test]
fn reset_with_unread_data_is_reported_once_then_gone_with_the_socket() {
    let mut det = detector();
    let snap = Snapshot::new(NOW_NS, vec![], vec![], vec![reset(9)]);
    let first = det.observe(&snap);
    assert_eq!(reasons(&first), vec![Reason::ResetUnread]);
    assert_eq!(first[0].facts.metrics()["unread_bytes"], 17);
    let identity = first[0].identity(&snap);
    assert_eq!(
        identity.local,
        Some("127.0.0.1:8080".parse().unwrap()),
        "from the probes: the socket is gone"
    );
    assert!(det.observe(&at(NOW_NS + S, vec![])).is_empty());
}

#[test]
fn reset_socket_that_lingers_keeps_its_finding() {
    let mut det = detector();
    let lingering = socket(9, TcpState::Close, 0, 0);
    let snap = Snapshot::new(NOW_NS, vec![lingering.clone()], vec![], vec![reset(9)]);
    assert_eq!(det.observe(&snap).len(), 1);
    assert_eq!(reasons(&det.observe(&at(NOW_NS + S, vec![lingering]))), vec![Reason::ResetUnread]);
    assert!(det.observe(&at(NOW_NS + 2 * S, vec![])).is_empty());
}

// --- connect_stalled -------------------------------------------------------------------------

fn connecting(retransmits: u32) -> SocketView {
    let mut s = socket(1, TcpState::SynSent, 0, 0);
    s.diag.remote = "10.0.0.9:5432".parse().unwrap();
    s.diag.tcp.as_mut().unwrap().total_retrans = retransmits;
    s
}

#[test]
fn connect_without_an_answer_stalls_after_the_connect_timeout() {
    let found = run(&mut detector(), 6, S, |i| connecting(i as u32));
    assert_eq!(reasons(&found), vec![Reason::ConnectStalled]);
    let m = found[0].facts.metrics();
    assert_eq!((m["connect_ms"].as_u64(), m["syn_retransmits"].as_u64()), (Some(6_000), Some(6)));
    assert!(run(&mut detector(), 4, S, |_| connecting(0)).is_empty(), "4 s of 5");
}

#[test]
fn connect_that_completes_within_its_timeout_is_not_stalled() {
    // Answered after 2 s: ESTABLISHED from then on, and a connection is not a connect.
    let found = run(&mut detector(), 10, S, |i| {
        if i < 2 { connecting(1) } else { socket(1, TcpState::Established, 100, 100) }
    });
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn the_probes_time_a_connect_begun_before_the_first_poll() {
    let mut s = connecting(3);
    s.diag.activity = Some(crate::kernel::probes::Activity {
        state: TcpState::SynSent as u32,
        state_since_ns: NOW_NS - 7 * S,
        ..Default::default()
    });
    let found = detector().observe(&snapshot(vec![s]));
    assert_eq!(found[0].facts.metrics()["connect_ms"], 7_000);
}

// --- closing_stalled -------------------------------------------------------------------------

/// A response the application wrote and closed on, to a peer that reads `read` bytes a second.
fn orphan(read: u64, i: u64) -> SocketView {
    let mut s = socket(1, TcpState::FinWait1, 70_000, 70_000);
    (s.owner, s.diag.inode) = (None, 0);
    s.diag.wqueue = 2_000_001;
    let tcp = s.diag.tcp.as_mut().unwrap();
    (tcp.notsent_bytes, tcp.snd_wnd, tcp.bytes_acked) = (2_000_001, 0, 4096 + read * i);
    s
}

fn closing_poll(det: &mut Detector, i: u64, s: SocketView) -> (Vec<Finding>, Snapshot) {
    let mut snap = at(NOW_NS + i * S, vec![s]);
    let former = crate::snapshot::FormerOwner { pid: 42, comm: Some("server".into()) };
    snap.former_owners.insert(1, former);
    (det.observe(&snap), snap)
}

#[test]
fn orphan_whose_peer_stopped_reading_is_closing_stalled_and_names_its_former_owner() {
    let mut det = detector();
    for i in 0..60 {
        assert!(closing_poll(&mut det, i, orphan(0, i)).0.is_empty(), "{i} s of 60");
    }
    let (found, snap) = closing_poll(&mut det, 61, orphan(0, 61));
    assert_eq!(reasons(&found), vec![Reason::ClosingStalled]);
    let m = found[0].facts.metrics();
    assert_eq!(
        (m["orphaned"].as_bool(), m["unsent_bytes"].as_u64()),
        (Some(true), Some(2_000_001))
    );
    assert_eq!((m["peer_window"].as_u64(), m["closing_ms"].as_u64()), (Some(0), Some(61_000)));
    let identity = found[0].identity(&snap);
    assert_eq!(
        (identity.pid, identity.comm.as_deref(), identity.fd),
        (Some(42), Some("server"), None)
    );
    assert_eq!(identity.state, Some("FIN_WAIT1"));
    assert!(found[0].facts.detail().contains("still unsent"), "{}", found[0].facts.detail());
}

#[test]
fn an_orphan_still_draining_to_a_reading_peer_is_not_stalled() {
    let mut det = detector();
    for i in 0..=90 {
        let (found, _) = closing_poll(&mut det, i, orphan(50_000, i));
        assert!(found.is_empty(), "at {i} s: {found:?}");
    }
}

#[test]
fn fin_wait2_stalls_only_while_the_peer_is_silent() {
    // After shutdown(SHUT_WR): the peer never sends its FIN; a twin's peer still sends data.
    let silent = |_| socket(1, TcpState::FinWait2, 70_000, 70_000);
    let found = run(&mut detector(), 61, S, silent);
    assert_eq!(reasons(&found), vec![Reason::ClosingStalled]);
    assert_eq!(found[0].facts.metrics()["orphaned"], false, "its fd is still open");
    let talking = |_| socket(1, TcpState::FinWait2, 70_000, 300);
    assert!(run(&mut detector(), 90, S, talking).is_empty());
    // Closed after everything was acknowledged: the kernel ends it after tcp_fin_timeout.
    let closed = |_| {
        let mut s = silent(0);
        (s.owner, s.diag.inode, s.diag.tcp) = (None, 0, None);
        s
    };
    assert!(run(&mut detector(), 61, S, closed).is_empty());
}

// --- accept_spinning -------------------------------------------------------------------------

/// A process at its fd limit with 5 connections queued, using `cpu` CPUs.
fn at_fd_limit(t: u64, cpu: f64, queued: u32) -> ProcessView {
    ProcessView {
        listen_queue: queued,
        cpu_ns: Some(10 * S + (t as f64 * cpu) as u64),
        ..process(32, Some(32), 0)
    }
}

#[test]
fn accept_loop_retrying_emfile_at_once_is_spinning() {
    let mut det = detector();
    assert_eq!(
        reasons(&poll_processes(&mut det, 0, at_fd_limit(0, 0.97, 5))),
        [Reason::FdPressure]
    );
    let found = poll_processes(&mut det, S, at_fd_limit(S, 0.97, 5));
    assert_eq!(reasons(&found), vec![Reason::FdPressure, Reason::AcceptSpinning]);
    let m = found[1].facts.metrics();
    assert_eq!((m["cpu"].as_f64(), m["queue_length"].as_u64()), (Some(0.97), Some(5)));
    assert_eq!((m["fds_used"].as_u64(), m["fds_limit"].as_u64()), (Some(32), Some(32)));
}

#[test]
fn accept_loop_that_backs_off_gets_fd_pressure_only() {
    for (cpu, queued, fds) in [(0.01, 5, 32), (0.97, 0, 32), (0.97, 5, 31)] {
        let mut det = detector();
        let p = |t| ProcessView { fds_used: fds, ..at_fd_limit(t, cpu, queued) };
        poll_processes(&mut det, 0, p(0));
        let found = poll_processes(&mut det, S, p(S));
        assert!(!reasons(&found).contains(&Reason::AcceptSpinning), "{cpu} {queued} {fds}");
    }
}

// --- policy ----------------------------------------------------------------------------------

#[test]
fn policy_ignores_and_rules_apply_per_socket() {
    let policy = Policy::parse(
        "[[rule]]\nname = \"long-poll\"\nlocal_port = 8080\nignore = [\"keepalive_missing\"]\n\
         [[rule]]\nname = \"quiet\"\nlocal_port = 9090\nignore = [\"idle\"]\n",
    )
    .unwrap();
    let mut det = Detector::new(policy, KernelSettings::default());
    let mut other = socket(2, TcpState::Established, 61_000, 61_000);
    other.diag.local = "127.0.0.1:7070".parse().unwrap();
    let mut quiet = socket(3, TcpState::Established, 61_000, 61_000);
    quiet.diag.local = "127.0.0.1:9090".parse().unwrap();
    let long_poll = socket(1, TcpState::Established, 61_000, 61_000);
    let found = det.observe(&snapshot(vec![long_poll, other, quiet]));
    let alerted: Vec<(Target, Option<&str>)> =
        found.iter().map(|f| (f.target, f.rule.as_deref())).collect();
    assert_eq!(alerted, vec![(Target::Socket(1), Some("long-poll")), (Target::Socket(2), None)]);
}
