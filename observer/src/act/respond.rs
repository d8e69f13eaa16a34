//! `watch --action`: ends connections whose alert has stood long enough, for the chosen reasons,
//! once per connection, within a rate limit, and never a listening socket.
use std::{
    collections::HashSet,
    time::{Duration, Instant, SystemTime},
};

use crate::{
    act::{self, Mode, RateLimit},
    alerts::AlertBook,
    collect::Collector,
    detect::Target,
    output::ActionEvent,
    reason::Reason,
    snapshot::{Identity, Snapshot},
};

const LISTEN: u8 = 10;
/// How often a "rate limit reached" warning may be logged.
const DEFERRAL_LOG_EVERY: Duration = Duration::from_secs(60);

pub struct Responder {
    mode: Mode,
    reasons: Vec<Reason>,
    after: Duration,
    dry_run: bool,
    limit: RateLimit,
    /// Sockets already acted on (or, in a dry run, reported): never twice.
    acted: HashSet<u64>,
    last_deferral_log: Option<Instant>,
}

impl Responder {
    pub fn new(
        mode: Mode,
        reasons: Vec<Reason>,
        after: Duration,
        max_per_minute: usize,
        dry_run: bool,
    ) -> Self {
        Responder {
            mode,
            reasons,
            after,
            dry_run,
            limit: RateLimit::per_minute(max_per_minute),
            acted: HashSet::new(),
            last_deferral_log: None,
        }
    }

    /// Acts on what this poll's alerts call for; returns the `action` events to print.
    pub fn respond(
        &mut self,
        book: &AlertBook,
        snapshot: &Snapshot,
        collector: &mut Collector,
    ) -> Vec<ActionEvent> {
        let now = Instant::now();
        let mut events = Vec::new();
        let mut deferred = 0;
        let due = book.standing().filter(|&(_, reason, since)| {
            self.reasons.contains(&reason) && now.duration_since(since) >= self.after
        });
        for (target, reason, _) in due.collect::<Vec<_>>() {
            let Target::Socket(cookie) = target else { continue };
            if self.acted.contains(&cookie) {
                continue;
            }
            // Act only on what this poll saw: the socket, its addresses and its holder, fresh.
            let Some(socket) = snapshot.find(cookie) else { continue };
            let Some(owner) = &socket.owner else { continue };
            if socket.diag.state == LISTEN {
                continue;
            }
            if !self.limit.try_take(now) {
                deferred += 1;
                continue;
            }
            self.acted.insert(cookie);
            let target = act::Target {
                pid: owner.pid,
                fd: owner.fd,
                cookie,
                local: socket.diag.local.addr(),
                remote: socket.diag.remote.addr(),
                interface: socket.diag.interface,
            };
            let result = match collector.diag_for(socket.netns) {
                Some(diag) => act::perform(self.mode, &target, diag, self.dry_run),
                None => act::ActResult::fail(
                    act::Outcome::Failed,
                    "no sock_diag socket for its namespace",
                ),
            };
            events.push(ActionEvent::new(
                SystemTime::now(),
                self.mode,
                self.dry_run,
                result,
                Identity::of_socket(socket),
                Some(reason),
            ));
        }
        if deferred > 0
            && self.last_deferral_log.is_none_or(|t| now.duration_since(t) >= DEFERRAL_LOG_EVERY)
        {
            self.last_deferral_log = Some(now);
            log::warn!(
                "action rate limit reached: {deferred} connection(s) wait their turn \
                 (--max-actions-per-minute)"
            );
        }
        // Forget sockets that are gone, so the set does not grow forever.
        self.acted.retain(|cookie| snapshot.find(*cookie).is_some());
        events
    }
}
