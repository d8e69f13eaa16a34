//! What `top` shows, as plain data: one row per watched socket, built from a poll's snapshot and
//! standing alerts, and the rows' filter and sort orders. Nothing here knows the terminal.
use std::{collections::BTreeMap, fmt::Write, net::SocketAddr, sync::Arc};

use observer_common::TcpState;

use crate::{
    alerts::attribution::ThreadInfo,
    detect::{Facts, Finding, Reason, Target},
    fastmap::FastMap,
    snapshot::{Snapshot, SocketView},
};

/// One socket as a row of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub cookie: u64,
    pub pid: Option<u32>,
    pub comm: Option<Arc<str>>,
    pub fd: Option<i32>,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: TcpState,
    /// Time since data last moved (either way / out / in); `None` for listeners.
    pub idle_ms: Option<u64>,
    pub last_send_ms: Option<u64>,
    pub last_recv_ms: Option<u64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Unread and unsent bytes; for a listener, its accept queue's length and limit.
    pub rqueue: u32,
    pub wqueue: u32,
    pub retransmits: u64,
    /// As alerts name them (see `alerts::attribution`).
    pub threads: Vec<ThreadInfo>,
    /// Standing alerts on this socket, in reason order.
    pub alerts: Vec<RowAlert>,
    /// Lower-case text the filter looks in.
    search: String,
}

/// A standing alert with its current numbers.
#[derive(Clone, Debug, PartialEq)]
pub struct RowAlert {
    pub reason: Reason,
    /// How long the alert has stood.
    pub stood_ms: u64,
    pub facts: Facts,
    pub rule: Option<Arc<str>>,
}

/// One poll's table.
#[derive(Debug, Default)]
pub struct Table {
    pub rows: Vec<Row>,
    /// Standing alerts by reason, including those about processes or sockets already gone.
    pub alert_counts: BTreeMap<Reason, usize>,
}

impl Table {
    /// The rows of `snapshot` with the alerts `findings` back (`standing`: the alert book's
    /// `(target, reason, since_ns)`); `threads_of` names each socket's threads.
    pub fn build(
        snapshot: &Snapshot,
        findings: &[Finding],
        standing: impl Iterator<Item = (Target, Reason, u64)>,
        mut threads_of: impl FnMut(&SocketView) -> Vec<ThreadInfo>,
    ) -> Table {
        let now = snapshot.taken_ns;
        let mut alert_counts = BTreeMap::new();
        let mut since: FastMap<(Target, Reason), u64> = FastMap::default();
        for (target, reason, since_ns) in standing {
            *alert_counts.entry(reason).or_insert(0) += 1;
            since.insert((target, reason), since_ns);
        }
        let mut alerts: FastMap<u64, Vec<RowAlert>> = FastMap::default();
        for finding in findings {
            let Target::Socket(cookie) = finding.target else { continue };
            let reason = finding.reason();
            let Some(&since_ns) = since.get(&(finding.target, reason)) else { continue };
            alerts.entry(cookie).or_default().push(RowAlert {
                reason,
                stood_ms: now.saturating_sub(since_ns) / 1_000_000,
                facts: finding.facts.clone(),
                rule: finding.rule.clone(),
            });
        }
        let rows = snapshot
            .sockets
            .iter()
            .map(|socket| {
                let row_alerts = alerts.remove(&socket.cookie()).unwrap_or_default();
                Row::of(socket, now, threads_of(socket), row_alerts)
            })
            .collect();
        Table { rows, alert_counts }
    }
}

impl Row {
    fn of(socket: &SocketView, now: u64, threads: Vec<ThreadInfo>, alerts: Vec<RowAlert>) -> Row {
        let listening = socket.diag.state == TcpState::Listen;
        let timed = |ms: Option<u64>| ms.filter(|_| !listening);
        let owner = socket.owner.as_ref();
        let mut row = Row {
            cookie: socket.cookie(),
            pid: owner.map(|o| o.pid),
            comm: owner.map(|o| o.comm.clone()),
            fd: owner.map(|o| o.fd),
            local: socket.local(),
            remote: socket.remote(),
            state: socket.diag.state,
            idle_ms: timed(socket.idle_ms(now)),
            last_send_ms: timed(socket.last_send_ms(now)),
            last_recv_ms: timed(socket.last_recv_ms(now)),
            bytes_sent: socket.bytes_sent(),
            bytes_received: socket.bytes_received(),
            rqueue: socket.diag.rqueue,
            wqueue: socket.diag.wqueue,
            retransmits: socket.retransmits(),
            threads,
            alerts,
            search: String::new(),
        };
        row.search = row.search_text();
        row
    }

    fn search_text(&self) -> String {
        let mut text = format!("{} {} {}", self.local, self.remote, self.state.name());
        if let (Some(pid), Some(comm)) = (self.pid, &self.comm) {
            let _ = write!(text, " {pid} {comm}");
        }
        for t in &self.threads {
            let _ = write!(text, " {} {}", t.name, t.tid);
        }
        for a in &self.alerts {
            let _ = write!(text, " {}", a.reason);
        }
        text.to_lowercase()
    }

    pub fn listening(&self) -> bool {
        self.state == TcpState::Listen
    }

    /// Whether every word of `filter` (already lower-case) occurs in the row.
    pub fn matches(&self, filter: &str) -> bool {
        filter.split_whitespace().all(|word| self.search.contains(word))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    /// Longest idle first.
    Idle,
    /// Most bytes (both ways) first.
    Bytes,
    /// By state name, then longest idle first.
    State,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sort {
    pub key: SortKey,
    pub reversed: bool,
}

impl Sort {
    /// The order after pressing `key`'s key: that key, or the same one reversed.
    pub fn toggle(self, key: SortKey) -> Sort {
        if key == self.key {
            Sort { key, reversed: !self.reversed }
        } else {
            Sort { key, reversed: false }
        }
    }

    pub fn name(self) -> &'static str {
        match self.key {
            SortKey::Idle => "idle",
            SortKey::Bytes => "bytes",
            SortKey::State => "state",
        }
    }
}

/// The rows to show, as indices into `rows`: those matching `filter`, in `sort`'s order. Ties
/// go by cookie, so rows do not jump between polls.
pub fn visible(rows: &[Row], filter: &str, sort: Sort) -> Vec<usize> {
    let filter = filter.to_lowercase();
    let mut order: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].matches(&filter)).collect();
    // Descending idle with unknown idle (listeners) last.
    let idle = |r: &Row| std::cmp::Reverse(r.idle_ms.map_or(0, |ms| ms + 1));
    match sort.key {
        SortKey::Idle => order.sort_by_key(|&i| (idle(&rows[i]), rows[i].cookie)),
        SortKey::Bytes => order.sort_by_key(|&i| {
            let r = &rows[i];
            (std::cmp::Reverse(r.bytes_sent + r.bytes_received), r.cookie)
        }),
        SortKey::State => {
            order.sort_by_key(|&i| (rows[i].state.name(), idle(&rows[i]), rows[i].cookie))
        }
    }
    if sort.reversed {
        order.reverse();
    }
    order
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::commands::top::columns::Column;
    use crate::{
        detect::{Detector, KernelSettings, policy::idle_after},
        kernel::procfs::Owner,
        snapshot::fixtures::*,
    };

    pub(crate) fn worker(tid: u32) -> ThreadInfo {
        ThreadInfo {
            tid,
            name: format!("worker-{tid}"),
            blocked_in: Some("recvfrom"),
            blocked_ms: Some(5_600),
            blocked_ms_from: Some("call"),
            last_io_ms: None,
        }
    }

    /// A poll of `sockets` (idle after 10 s) through the real detector, alerts and all.
    fn table_of(sockets: Vec<SocketView>) -> Table {
        let snapshot = snapshot(sockets);
        let mut detector = Detector::new(
            idle_after(std::time::Duration::from_secs(10)),
            KernelSettings::default(),
        );
        let findings = detector.observe(&snapshot);
        let raised_at = NOW_NS - 3_000_000_000;
        let standing = findings.iter().map(|f| (f.target, f.reason(), raised_at));
        Table::build(&snapshot, &findings, standing, |s| {
            if s.cookie() == 1 { vec![worker(1401)] } else { vec![] }
        })
    }

    /// Socket 1 quiet for 20 s (alerted), socket 2 busy with many bytes, socket 3 a listener.
    pub(crate) fn three() -> Table {
        let quiet = socket(1, TcpState::Established, 20_000, 20_000);
        let mut busy = socket(2, TcpState::Established, 50, 80);
        busy.diag.tcp.as_mut().unwrap().bytes_sent = 5 << 20;
        let mut listener = socket(3, TcpState::Listen, 0, 0);
        (listener.diag.rqueue, listener.diag.wqueue) = (2, 128);
        listener.diag.remote = "0.0.0.0:0".parse().unwrap();
        table_of(vec![busy, listener, quiet])
    }

    fn cookies(table: &Table, order: &[usize]) -> Vec<u64> {
        order.iter().map(|&i| table.rows[i].cookie).collect()
    }

    #[test]
    fn rows_carry_the_numbers_threads_and_standing_alert_of_each_socket() {
        let table = three();
        let quiet = table.rows.iter().find(|r| r.cookie == 1).unwrap();
        assert_eq!((quiet.idle_ms, quiet.pid, quiet.fd), (Some(20_000), Some(42), Some(4)));
        assert_eq!(quiet.threads, vec![worker(1401)]);
        assert_eq!(quiet.alerts.len(), 1);
        assert_eq!((quiet.alerts[0].reason, quiet.alerts[0].stood_ms), (Reason::Idle, 3000));
        assert_eq!(table.alert_counts, BTreeMap::from([(Reason::Idle, 1)]));
        let listener = table.rows.iter().find(|r| r.cookie == 3).unwrap();
        assert_eq!(listener.idle_ms, None, "idle means nothing for a listener");
        assert_eq!(Column::Queue.cell(listener), "2/128", "the accept queue and its limit");
        assert_eq!(Column::Remote.cell(listener), "*");
    }

    #[test]
    fn sorts_by_idle_bytes_and_state_and_reverses_on_the_same_key() {
        let table = three();
        let by = |sort| cookies(&table, &visible(&table.rows, "", sort));
        let idle = Sort { key: SortKey::Idle, reversed: false };
        assert_eq!(by(idle), vec![1, 2, 3], "longest idle first, listeners last");
        let bytes = idle.toggle(SortKey::Bytes);
        assert_eq!(by(bytes), vec![2, 1, 3]);
        let state = bytes.toggle(SortKey::State);
        assert_eq!(by(state), vec![1, 2, 3], "ESTABLISHED before LISTEN, idle within");
        assert_eq!(by(state.toggle(SortKey::State)), vec![3, 2, 1]);
    }

    #[test]
    fn the_filter_matches_every_word_anywhere_in_the_row() {
        let table = three();
        let idle = Sort { key: SortKey::Idle, reversed: false };
        let only = |filter| cookies(&table, &visible(&table.rows, filter, idle));
        assert_eq!(only("40001"), vec![1], "the remote port");
        assert_eq!(only("IDLE"), vec![1], "the alert's reason, any case");
        assert_eq!(only("worker-1401"), vec![1], "the thread");
        assert_eq!(only("listen"), vec![3]);
        assert_eq!(only("server estab"), vec![1, 2], "every word");
        assert!(only("nothing-like-this").is_empty());
        assert_eq!(only(""), vec![1, 2, 3]);
    }

    #[test]
    fn unowned_sockets_still_make_rows() {
        let mut s = socket(9, TcpState::Established, 0, 0);
        s.owner = None::<Owner>;
        let table = table_of(vec![s]);
        assert_eq!(table.rows[0].pid, None);
        assert_eq!(Column::Process.cell(&table.rows[0]), "-");
    }
}
