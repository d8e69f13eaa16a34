//! Turns each poll's findings into alert transitions: an alert is raised once per target and
//! reason, stays quiet while the condition holds, and is cleared once when it ends.
pub mod attribution;

use observer_common::TcpState;
use serde::Serialize;

use crate::{
    detect::{Finding, Reason, Target},
    fastmap::FastMap,
    snapshot::{Identity, Snapshot},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClearWhy {
    /// The condition ended while the socket (or process) lives on: data moves again, the queue
    /// drained, fds were released.
    ActivityResumed,
    /// The socket is gone, or left the state the alert was about (e.g. the peer closed it).
    SocketClosed,
    /// The process the alert was about has exited.
    ProcessExited,
}

#[derive(Default)]
pub struct AlertBook {
    /// Raised and not yet cleared. Updated in place: with a storm of 100k standing alerts, a
    /// poll touches each once and allocates nothing for them.
    active: FastMap<(Target, Reason), Active>,
    generation: u64,
}

struct Active {
    /// The identity when raised (what the clear repeats).
    identity: Identity,
    /// The snapshot time (`taken_ns`) of the poll that raised it.
    since_ns: u64,
    generation: u64,
}

#[derive(Debug, PartialEq)]
pub struct Cleared {
    pub identity: Identity,
    pub reason: Reason,
    pub why: ClearWhy,
}

impl AlertBook {
    /// Records this poll's findings; returns those that are new (to raise, with their identity)
    /// and the alerts whose condition ended (to clear), both in a stable order. The snapshot's
    /// time is the alerts' clock.
    pub fn update<'f>(
        &mut self,
        snapshot: &Snapshot,
        findings: &'f [Finding],
    ) -> (Vec<(&'f Finding, Identity)>, Vec<Cleared>) {
        self.generation += 1;
        let generation = self.generation;
        let now = snapshot.taken_ns;
        let mut raised = Vec::new();
        for finding in findings {
            match self.active.entry((finding.target, finding.reason())) {
                std::collections::hash_map::Entry::Occupied(mut a) => {
                    a.get_mut().generation = generation
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    let identity = finding.identity(snapshot);
                    slot.insert(Active { identity: identity.clone(), since_ns: now, generation });
                    raised.push((finding, identity));
                }
            }
        }
        let mut ended: Vec<((Target, Reason), Active)> =
            self.active.extract_if(|_, a| a.generation != generation).collect();
        ended.sort_by_key(|(key, _)| *key);
        let cleared = ended
            .into_iter()
            .map(|((target, reason), a)| {
                let why = why_cleared(snapshot, target, reason, &a.identity);
                Cleared { identity: a.identity, reason, why }
            })
            .collect();
        (raised, cleared)
    }

    /// Clears every alert, as when the watched processes are gone.
    pub fn clear_all(&mut self, why: ClearWhy) -> Vec<Cleared> {
        let mut all: Vec<_> = self.active.drain().collect();
        all.sort_by_key(|(key, _)| *key);
        all.into_iter()
            .map(|((_, reason), a)| Cleared { identity: a.identity, reason, why })
            .collect()
    }

    pub fn active_count(&self) -> usize {
        self.active.len()
    }

    /// Every standing alert with when it was raised (a snapshot's `taken_ns`).
    pub fn standing(&self) -> impl Iterator<Item = (Target, Reason, u64)> + '_ {
        self.active.iter().map(|(&(target, reason), a)| (target, reason, a.since_ns))
    }
}

fn why_cleared(
    snapshot: &Snapshot,
    target: Target,
    reason: Reason,
    raised_as: &Identity,
) -> ClearWhy {
    match target {
        Target::Socket(cookie) => match snapshot.find(cookie) {
            Some(now) if Identity::of_socket(now).state == raised_as.state => {
                ClearWhy::ActivityResumed
            }
            // A stalled connect that completed: the condition ended, the connection lives on.
            Some(now)
                if reason == Reason::ConnectStalled && now.diag.state == TcpState::Established =>
            {
                ClearWhy::ActivityResumed
            }
            _ => ClearWhy::SocketClosed,
        },
        Target::Process(pid) => match snapshot.process(pid) {
            Some(_) => ClearWhy::ActivityResumed,
            None => ClearWhy::ProcessExited,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::{
        detect::{Detector, KernelSettings, policy::idle_after},
        snapshot::fixtures::*,
    };

    fn poll(
        book: &mut AlertBook,
        det: &mut Detector,
        s: &Snapshot,
    ) -> (Vec<Target>, Vec<(Option<u64>, ClearWhy)>) {
        let findings = det.observe(s);
        let (raised, cleared) = book.update(s, &findings);
        (
            raised.iter().map(|(f, _)| f.target).collect(),
            cleared.iter().map(|c| (c.identity.cookie, c.why)).collect(),
        )
    }

    fn detector() -> Detector {
        Detector::new(idle_after(std::time::Duration::from_secs(10)), KernelSettings::default())
    }

    #[test]
    fn raised_once_while_condition_holds_then_cleared_once() {
        let (mut book, mut det) = (AlertBook::default(), detector());
        let idle = |ms| snapshot(vec![socket(1, TcpState::Established, ms, ms)]);
        assert_eq!(poll(&mut book, &mut det, &idle(11_000)), (vec![Target::Socket(1)], vec![]));
        assert_eq!(poll(&mut book, &mut det, &idle(12_000)), (vec![], vec![]));
        assert_eq!(poll(&mut book, &mut det, &idle(13_000)), (vec![], vec![]));
        assert_eq!(
            poll(&mut book, &mut det, &idle(5)),
            (vec![], vec![(Some(1), ClearWhy::ActivityResumed)])
        );
        assert_eq!(poll(&mut book, &mut det, &idle(5)), (vec![], vec![]));
        assert_eq!(book.active_count(), 0);
    }

    #[test]
    fn vanished_or_closing_socket_clears_as_closed() {
        let (mut book, mut det) = (AlertBook::default(), detector());
        let two = snapshot(vec![
            socket(1, TcpState::Established, 20_000, 20_000),
            socket(2, TcpState::Established, 20_000, 20_000),
        ]);
        assert_eq!(poll(&mut book, &mut det, &two).0, vec![Target::Socket(1), Target::Socket(2)]);
        // Socket 1 is gone; socket 2 went to CLOSE_WAIT.
        let after = snapshot(vec![socket(2, TcpState::CloseWait, 20_000, 20_000)]);
        let (_, cleared) = poll(&mut book, &mut det, &after);
        assert_eq!(
            cleared,
            vec![(Some(1), ClearWhy::SocketClosed), (Some(2), ClearWhy::SocketClosed)]
        );
    }

    #[test]
    fn a_stalled_connect_that_completes_clears_as_resumed() {
        let (mut book, mut det) = (AlertBook::default(), detector());
        let s: u64 = 1_000_000_000;
        let at =
            |t, state| Snapshot::new(NOW_NS + t * s, vec![socket(1, state, 0, 0)], vec![], vec![]);
        assert!(poll(&mut book, &mut det, &at(0, TcpState::SynSent)).0.is_empty());
        assert_eq!(poll(&mut book, &mut det, &at(6, TcpState::SynSent)).0, vec![Target::Socket(1)]);
        let (_, cleared) = poll(&mut book, &mut det, &at(7, TcpState::Established));
        assert_eq!(cleared, vec![(Some(1), ClearWhy::ActivityResumed)]);
    }

    #[test]
    fn clear_all_empties_the_book() {
        let (mut book, mut det) = (AlertBook::default(), detector());
        poll(
            &mut book,
            &mut det,
            &snapshot(vec![socket(1, TcpState::Established, 20_000, 20_000)]),
        );
        let standing: Vec<_> = book.standing().map(|(t, r, _)| (t, r)).collect();
        assert_eq!(standing, vec![(Target::Socket(1), Reason::Idle)]);
        assert_eq!(book.clear_all(ClearWhy::ProcessExited).len(), 1);
        assert_eq!(book.active_count(), 0);
    }
}
