//! `watch --action`: ends connections whose alert has stood long enough, for the chosen reasons,
//! once per connection, within a rate limit, and never a listening socket.
//!
//! Deciding ([`Responder::due`]) is pure and takes its time from the snapshot; acting
//! ([`Responder::perform`]) is handed the sock_diag socket of the connection's namespace.
use observer_common::TcpState;

use super::{ActResult, Holder, Mode, Outcome, RateLimit, SocketRef};
use crate::{
    alerts::AlertBook,
    detect::{Reason, Target},
    fastmap::FastSet,
    kernel::sock_diag::DiagSocketHandle,
    snapshot::{Identity, Snapshot},
};

/// How often a "rate limit reached" warning may be logged.
const DEFERRAL_LOG_EVERY_NS: u64 = 60_000_000_000;

pub struct Responder {
    mode: Mode,
    reasons: Vec<Reason>,
    after_ns: u64,
    dry_run: bool,
    limit: RateLimit,
    /// Sockets already acted on (or, in a dry run, reported): never twice.
    acted: FastSet<u64>,
    last_deferral_log_ns: Option<u64>,
}

/// A connection to end now, as the poll that found it due saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct Due {
    pub socket: SocketRef,
    /// The network namespace to act in.
    pub netns: u64,
    pub identity: Identity,
    /// The alert that made it due.
    pub reason: Reason,
}

impl Responder {
    pub fn new(
        mode: Mode,
        reasons: Vec<Reason>,
        after: std::time::Duration,
        max_per_minute: usize,
        dry_run: bool,
    ) -> Self {
        Responder {
            mode,
            reasons,
            after_ns: after.as_nanos().try_into().unwrap_or(u64::MAX),
            dry_run,
            limit: RateLimit::per_minute(max_per_minute),
            acted: FastSet::default(),
            last_deferral_log_ns: None,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    /// The connections this poll's standing alerts call for, at the snapshot's time. Each is
    /// counted against the rate limit and never offered again; those over the limit wait for
    /// a later poll.
    pub fn due(&mut self, book: &AlertBook, snapshot: &Snapshot) -> Vec<Due> {
        let now = snapshot.taken_ns;
        let mut due = Vec::new();
        let mut deferred = 0;
        let mut standing: Vec<(Target, Reason, u64)> = book
            .standing()
            .filter(|&(_, reason, since)| {
                self.reasons.contains(&reason) && now.saturating_sub(since) >= self.after_ns
            })
            .collect();
        // Oldest first, so that a rate limit serves connections in the order they got stuck.
        standing.sort_by_key(|&(target, reason, since)| (since, target, reason));
        for (target, reason, _) in standing {
            let Target::Socket(cookie) = target else { continue };
            if self.acted.contains(&cookie) {
                continue;
            }
            // Act only on what this poll saw: the socket, its addresses and its holder, fresh.
            let Some(socket) = snapshot.find(cookie) else { continue };
            // A socket nobody holds is acted on only as an orphan that cannot finish closing
            // (SOCK_DESTROY needs no fd); one not yet accepted belongs to no one yet.
            let holder = socket.owner.as_ref().map(|o| Holder { pid: o.pid, fd: o.fd });
            if (holder.is_none() && !socket.is_orphan()) || socket.diag.state == TcpState::Listen {
                continue;
            }
            if !self.limit.try_take(now) {
                deferred += 1;
                continue;
            }
            self.acted.insert(cookie);
            due.push(Due {
                socket: SocketRef {
                    holder,
                    cookie,
                    local: socket.local(),
                    remote: socket.remote(),
                    interface: socket.diag.interface,
                },
                netns: socket.netns,
                identity: snapshot.identity_of(socket),
                reason,
            });
        }
        if deferred > 0
            && self
                .last_deferral_log_ns
                .is_none_or(|t| now.saturating_sub(t) >= DEFERRAL_LOG_EVERY_NS)
        {
            self.last_deferral_log_ns = Some(now);
            log::warn!(
                "action rate limit reached: {deferred} connection(s) wait their turn \
                 (--max-actions-per-minute)"
            );
        }
        // Forget sockets that are gone, so the set does not grow forever.
        self.acted.retain(|cookie| snapshot.find(*cookie).is_some());
        due
    }

    /// Ends (or, in a dry run, checks) one due connection through `diag`, the sock_diag socket
    /// of its namespace.
    pub fn perform(&self, due: &Due, diag: Option<&mut DiagSocketHandle>) -> ActResult {
        match diag {
            Some(diag) => super::perform(self.mode, &due.socket, diag, self.dry_run),
            None => ActResult::fail(Outcome::Failed, "no sock_diag socket for its namespace"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        detect::{Detector, KernelSettings, policy::idle_after},
        snapshot::{SocketView, fixtures::*},
    };

    const S: u64 = 1_000_000_000;

    /// Alerts raised at NOW_NS (idle after 10 s) for `cookies`, then polls at `now`.
    struct Clocked {
        detector: Detector,
        book: AlertBook,
    }

    impl Clocked {
        fn new() -> Self {
            Clocked {
                detector: Detector::new(
                    idle_after(Duration::from_secs(10)),
                    KernelSettings::default(),
                ),
                book: AlertBook::default(),
            }
        }

        fn poll(&mut self, at_ns: u64, sockets: Vec<SocketView>) -> Snapshot {
            let snapshot = Snapshot::new(at_ns, sockets, vec![], vec![]);
            let findings = self.detector.observe(&snapshot);
            self.book.update(&snapshot, &findings);
            snapshot
        }
    }

    fn idle(cookie: u64) -> SocketView {
        socket(cookie, TcpState::Established, 20_000, 20_000)
    }

    fn cookies(due: &[Due]) -> Vec<u64> {
        due.iter().map(|d| d.socket.cookie).collect()
    }

    #[test]
    fn acts_once_the_alert_has_stood_for_action_after_and_never_twice() {
        let mut clocked = Clocked::new();
        let mut responder =
            Responder::new(Mode::Shutdown, vec![Reason::Idle], Duration::from_secs(5), 10, false);
        let raised = clocked.poll(NOW_NS, vec![idle(1)]);
        assert!(responder.due(&clocked.book, &raised).is_empty(), "raised just now");
        let early = clocked.poll(NOW_NS + 4 * S, vec![idle(1)]);
        assert!(responder.due(&clocked.book, &early).is_empty(), "stood 4 s of 5");
        let ripe = clocked.poll(NOW_NS + 5 * S, vec![idle(1)]);
        let due = responder.due(&clocked.book, &ripe);
        assert_eq!(cookies(&due), vec![1]);
        assert_eq!(
            (due[0].socket.holder, due[0].reason),
            (Some(Holder { pid: 42, fd: 4 }), Reason::Idle)
        );
        let later = clocked.poll(NOW_NS + 6 * S, vec![idle(1)]);
        assert!(responder.due(&clocked.book, &later).is_empty(), "once per connection");
    }

    #[test]
    fn the_rate_limit_defers_the_rest_to_a_later_minute() {
        let mut clocked = Clocked::new();
        let mut responder =
            Responder::new(Mode::Destroy, vec![Reason::Idle], Duration::ZERO, 2, true);
        let all = || vec![idle(1), idle(2), idle(3)];
        let first = clocked.poll(NOW_NS, all());
        assert_eq!(cookies(&responder.due(&clocked.book, &first)), vec![1, 2]);
        let same_minute = clocked.poll(NOW_NS + 59 * S, all());
        assert!(responder.due(&clocked.book, &same_minute).is_empty());
        let next_minute = clocked.poll(NOW_NS + 60 * S, all());
        assert_eq!(cookies(&responder.due(&clocked.book, &next_minute)), vec![3]);
    }

    #[test]
    fn other_reasons_listeners_and_vanished_sockets_are_left_alone() {
        let mut clocked = Clocked::new();
        let mut responder =
            Responder::new(Mode::Destroy, vec![Reason::CloseWait], Duration::ZERO, 10, false);
        let snapshot = clocked.poll(NOW_NS, vec![idle(1)]);
        assert!(responder.due(&clocked.book, &snapshot).is_empty(), "idle is not asked for");

        let mut responder = Responder::new(
            Mode::Destroy,
            vec![Reason::AcceptQueueOverflow],
            Duration::ZERO,
            10,
            false,
        );
        let mut listener = socket(2, TcpState::Listen, 0, 0);
        (listener.diag.rqueue, listener.diag.wqueue) = (5, 1);
        let snapshot = clocked.poll(NOW_NS + S, vec![listener]);
        assert!(responder.due(&clocked.book, &snapshot).is_empty(), "never a listener");
    }

    #[test]
    fn an_orphan_that_cannot_close_is_due_without_a_holder_and_named_by_its_former_owner() {
        let mut detector = Detector::new(Default::default(), KernelSettings::default());
        let mut book = AlertBook::default();
        let mut responder =
            Responder::new(Mode::Destroy, vec![Reason::ClosingStalled], Duration::ZERO, 10, false);
        let orphan = |unheld: bool| {
            let mut s = socket(1, TcpState::FinWait1, 0, 0);
            s.diag.wqueue = 1;
            if unheld {
                (s.owner, s.diag.inode) = (None, 0);
            }
            s
        };
        let mut due = vec![];
        for t in [0, 61] {
            let mut snapshot = Snapshot::new(NOW_NS + t * S, vec![orphan(t > 0)], vec![], vec![]);
            let former = crate::snapshot::FormerOwner { pid: 42, comm: Some("server".into()) };
            snapshot.former_owners.insert(1, former);
            book.update(&snapshot, &detector.observe(&snapshot));
            due = responder.due(&book, &snapshot);
        }
        assert_eq!(cookies(&due), vec![1]);
        assert_eq!(due[0].socket.holder, None, "no fd is left");
        assert_eq!((due[0].identity.pid, due[0].identity.fd), (Some(42), None));
    }
}
