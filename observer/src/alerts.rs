//! Turns each poll's findings into alert transitions: an alert is raised once per socket and
//! reason, stays quiet while the condition holds, and is cleared once when it ends.
use std::collections::BTreeMap;

use crate::{
    detect::{Finding, Reason},
    output::{ClearWhy, Identity},
    snapshot::Snapshot,
};

#[derive(Default)]
pub struct AlertBook {
    /// Raised and not yet cleared, with the socket's identity when raised.
    active: BTreeMap<(u64, Reason), Identity>,
}

#[derive(Debug, PartialEq)]
pub struct Cleared {
    pub identity: Identity,
    pub reason: Reason,
    pub why: ClearWhy,
}

impl AlertBook {
    /// Records this poll's findings; returns those that are new (to raise) and the alerts whose
    /// condition ended (to clear).
    pub fn update<'f>(
        &mut self,
        snapshot: &Snapshot,
        findings: &'f [Finding],
    ) -> (Vec<&'f Finding>, Vec<Cleared>) {
        let mut still_active = BTreeMap::new();
        let mut raised = Vec::new();
        for finding in findings {
            let key = (finding.cookie, finding.reason);
            match self.active.remove(&key) {
                Some(identity) => {
                    still_active.insert(key, identity);
                }
                None => {
                    if let Some(socket) = snapshot.find(finding.cookie) {
                        still_active.insert(key, Identity::of(socket));
                        raised.push(finding);
                    }
                }
            }
        }
        let cleared = std::mem::replace(&mut self.active, still_active)
            .into_iter()
            .map(|((cookie, reason), identity)| {
                let why = match snapshot.find(cookie) {
                    Some(now) if Identity::of(now).state == identity.state => {
                        ClearWhy::ActivityResumed
                    }
                    _ => ClearWhy::SocketClosed,
                };
                Cleared {
                    identity,
                    reason,
                    why,
                }
            })
            .collect();
        (raised, cleared)
    }

    /// Clears every alert, as when the watched processes are gone.
    pub fn clear_all(&mut self, why: ClearWhy) -> Vec<Cleared> {
        std::mem::take(&mut self.active)
            .into_iter()
            .map(|((_, reason), identity)| Cleared {
                identity,
                reason,
                why,
            })
            .collect()
    }

    pub fn active_count(&self) -> usize {
        self.active.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        detect::{Rules, detect},
        snapshot::{Snapshot, fixtures::*},
    };

    fn rules() -> Rules {
        Rules {
            idle_timeout: std::time::Duration::from_secs(10),
        }
    }

    fn poll(book: &mut AlertBook, snapshot: &Snapshot) -> (Vec<u64>, Vec<(u64, ClearWhy)>) {
        let findings = detect(snapshot, &rules());
        let (raised, cleared) = book.update(snapshot, &findings);
        (
            raised.iter().map(|f| f.cookie).collect(),
            cleared.iter().map(|c| (c.identity.cookie, c.why)).collect(),
        )
    }

    #[test]
    fn raised_once_while_condition_holds_then_cleared_once() {
        let mut book = AlertBook::default();
        let idle = |ms| Snapshot {
            taken_ns: NOW_NS,
            sockets: vec![socket(1, 1, ms, ms)],
        };
        assert_eq!(poll(&mut book, &idle(11_000)), (vec![1], vec![]));
        assert_eq!(poll(&mut book, &idle(12_000)), (vec![], vec![]));
        assert_eq!(poll(&mut book, &idle(13_000)), (vec![], vec![]));
        assert_eq!(
            poll(&mut book, &idle(5)),
            (vec![], vec![(1, ClearWhy::ActivityResumed)])
        );
        assert_eq!(poll(&mut book, &idle(5)), (vec![], vec![]));
        assert_eq!(book.active_count(), 0);
    }

    #[test]
    fn vanished_or_closing_socket_clears_as_closed() {
        let mut book = AlertBook::default();
        let two = Snapshot {
            taken_ns: NOW_NS,
            sockets: vec![socket(1, 1, 20_000, 20_000), socket(2, 1, 20_000, 20_000)],
        };
        assert_eq!(poll(&mut book, &two).0, vec![1, 2]);
        // Socket 1 is gone; socket 2 went to CLOSE_WAIT.
        let after = Snapshot {
            taken_ns: NOW_NS,
            sockets: vec![socket(2, 8, 20_000, 20_000)],
        };
        let (_, cleared) = poll(&mut book, &after);
        assert_eq!(
            cleared,
            vec![(1, ClearWhy::SocketClosed), (2, ClearWhy::SocketClosed)]
        );
    }

    #[test]
    fn clear_all_empties_the_book() {
        let mut book = AlertBook::default();
        poll(
            &mut book,
            &Snapshot {
                taken_ns: NOW_NS,
                sockets: vec![socket(1, 1, 20_000, 0)],
            },
        );
        let s = Snapshot {
            taken_ns: NOW_NS,
            sockets: vec![socket(1, 1, 20_000, 20_000)],
        };
        poll(&mut book, &s);
        assert_eq!(book.clear_all(ClearWhy::SocketClosed).len(), 1);
        assert_eq!(book.active_count(), 0);
    }
}
