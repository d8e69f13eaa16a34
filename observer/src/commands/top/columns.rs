//! What the table's columns and the details pane say about a row, and which columns fit a
//! screen's width.
use std::fmt::Write;

use observer_common::TcpState;

use super::model::{Row, RowAlert};
use crate::alerts::attribution::ThreadInfo;

/// A table column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Column {
    Local,
    /// The local port only, when the full address does not fit.
    LocalPort,
    Remote,
    State,
    Idle,
    LastSend,
    LastRecv,
    Sent,
    Received,
    Queue,
    Retransmits,
    Process,
    Thread,
    Alert,
}

/// Which columns a narrow screen keeps first.
const PRIORITY: [Column; 14] = [
    Column::Remote,
    Column::State,
    Column::Idle,
    Column::Alert,
    Column::Thread,
    Column::Queue,
    Column::Local,
    Column::LocalPort,
    Column::Sent,
    Column::Received,
    Column::LastSend,
    Column::LastRecv,
    Column::Retransmits,
    Column::Process,
];

/// Left to right.
const ORDER: [Column; 14] = [
    Column::Local,
    Column::LocalPort,
    Column::Remote,
    Column::State,
    Column::Idle,
    Column::LastSend,
    Column::LastRecv,
    Column::Sent,
    Column::Received,
    Column::Queue,
    Column::Retransmits,
    Column::Process,
    Column::Thread,
    Column::Alert,
];

/// The thread column is cut to what is left, but not below this.
const MIN_THREAD_WIDTH: usize = 14;
/// Nor does it grow past this (several threads on one socket).
const MAX_THREAD_WIDTH: usize = 40;

impl Column {
    pub fn title(self) -> &'static str {
        match self {
            Column::Local | Column::LocalPort => "LOCAL",
            Column::Remote => "REMOTE",
            Column::State => "STATE",
            Column::Idle => "IDLE",
            Column::LastSend => "LAST-TX",
            Column::LastRecv => "LAST-RX",
            Column::Sent => "TX",
            Column::Received => "RX",
            Column::Queue => "QUEUE",
            Column::Retransmits => "RETR",
            Column::Process => "PID",
            Column::Thread => "THREAD",
            Column::Alert => "ALERT",
        }
    }

    pub fn cell(self, row: &Row) -> String {
        let ms = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), duration_ms);
        match self {
            Column::Local => row.local.to_string(),
            Column::LocalPort => format!(":{}", row.local.port()),
            Column::Remote if row.listening() => "*".to_owned(),
            Column::Remote => row.remote.to_string(),
            Column::State => state_label(row.state).to_owned(),
            Column::Idle => ms(row.idle_ms),
            Column::LastSend => ms(row.last_send_ms),
            Column::LastRecv => ms(row.last_recv_ms),
            Column::Sent => bytes(row.bytes_sent),
            Column::Received => bytes(row.bytes_received),
            // ss's Recv-Q/Send-Q: for a listener, the accept queue and its limit.
            Column::Queue => format!("{}/{}", row.rqueue, row.wqueue),
            Column::Retransmits => row.retransmits.to_string(),
            Column::Process => row.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
            Column::Thread => threads_cell(&row.threads),
            Column::Alert => alerts_cell(&row.alerts),
        }
    }
}

/// The columns that fit `width` for these rows, left to right, each with its width. The most
/// useful ones are kept first (see [`PRIORITY`]); a gap of one separates columns.
pub fn layout(width: u16, rows: &[&Row]) -> Vec<(Column, u16)> {
    let natural = |c: Column| {
        let widest = rows.iter().map(|r| c.cell(r).chars().count()).max().unwrap_or(0);
        let w = widest.max(c.title().len());
        if c == Column::Thread { w.min(MAX_THREAD_WIDTH) } else { w }
    };
    let mut left = usize::from(width);
    let mut chosen: Vec<(Column, usize)> = Vec::new();
    for column in PRIORITY {
        if column == Column::LocalPort && chosen.iter().any(|&(c, _)| c == Column::Local) {
            continue;
        }
        let gap = usize::from(!chosen.is_empty());
        let want = natural(column);
        if want + gap <= left {
            chosen.push((column, want));
            left -= want + gap;
        } else if column == Column::Thread && MIN_THREAD_WIDTH + gap <= left {
            chosen.push((column, left - gap));
            left = 0;
        }
    }
    ORDER
        .iter()
        .filter_map(|&c| chosen.iter().find(|&&(k, _)| k == c))
        .map(|&(c, w)| (c, w as u16))
        .collect()
}

/// `ss`'s short name for the common state, the kernel's for the rest.
pub fn state_label(state: TcpState) -> &'static str {
    match state {
        TcpState::Established => "ESTAB",
        other => other.name(),
    }
}

/// 850ms, 5.6s, 3m20s, 2h05m.
pub fn duration_ms(ms: u64) -> String {
    match ms {
        0..1000 => format!("{ms}ms"),
        1000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// 512, 1.5K, 12.0M, 3.1G (powers of 1024).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["K", "M", "G", "T"];
    if n < 1024 {
        return n.to_string();
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// One thread in a few words: `worker-0:1401 recvfrom 5.6s`, or for one that is not blocked on
/// the socket, `worker-0:1401 last I/O 2.0s ago`.
pub fn thread_label(t: &ThreadInfo) -> String {
    let mut text = format!("{}:{}", t.name, t.tid);
    if let Some(call) = t.blocked_in {
        let _ = write!(text, " {call}");
        if let Some(ms) = t.blocked_ms {
            let _ = write!(text, " {}", duration_ms(ms));
        }
    } else if let Some(ms) = t.last_io_ms {
        let _ = write!(text, " last I/O {} ago", duration_ms(ms));
    }
    text
}

fn threads_cell(threads: &[ThreadInfo]) -> String {
    match threads {
        [] => String::new(),
        [one] => thread_label(one),
        [first, rest @ ..] => format!("{} +{}", thread_label(first), rest.len()),
    }
}

fn alerts_cell(alerts: &[RowAlert]) -> String {
    match alerts {
        [] => String::new(),
        [one] => one.reason.name().to_owned(),
        [first, rest @ ..] => format!("{} +{}", first.reason, rest.len()),
    }
}

/// The selected row's details, a line each: the connection, its threads, per standing alert its
/// sentence and numbers, and its counters.
pub fn details(row: &Row) -> Vec<String> {
    let mut lines = Vec::new();
    let owner = match (row.pid, &row.comm, row.fd) {
        (Some(pid), Some(comm), Some(fd)) => format!("pid {pid} {comm} fd {fd}"),
        _ => "no process holds it".to_owned(),
    };
    let remote = if row.listening() { "*".to_owned() } else { row.remote.to_string() };
    lines.push(format!(
        "{} -> {remote}  {}  {owner}  cookie {}",
        row.local,
        row.state.name(),
        row.cookie
    ));
    if row.threads.is_empty() && !row.listening() {
        lines.push("threads: none of the owner's threads is on it now".to_owned());
    }
    for t in &row.threads {
        lines.push(match (t.blocked_in, t.blocked_ms, t.last_io_ms) {
            (Some(call), Some(ms), _) => format!(
                "thread {} (tid {}) blocked in {call} for {}",
                t.name,
                t.tid,
                duration_ms(ms)
            ),
            (Some(call), None, _) => format!("thread {} (tid {}) blocked in {call}", t.name, t.tid),
            (None, _, Some(ms)) => {
                format!("thread {} (tid {}) last moved data {} ago", t.name, t.tid, duration_ms(ms))
            }
            (None, _, None) => format!("thread {} (tid {})", t.name, t.tid),
        });
    }
    for a in &row.alerts {
        let rule = a.rule.as_ref().map(|r| format!(", rule {r}")).unwrap_or_default();
        lines.push(format!(
            "{} (for {}{rule}): {}",
            a.reason,
            duration_ms(a.stood_ms),
            a.facts.detail()
        ));
        let numbers: Vec<String> =
            a.facts.metrics().iter().map(|(name, value)| format!("{name} {value}")).collect();
        if !numbers.is_empty() {
            lines.push(format!("  {}", numbers.join("  ")));
        }
    }
    // Last: the table has most of these already, when the screen is wide enough.
    if row.listening() {
        lines.push(format!("accept queue {} of {}", row.rqueue, row.wqueue));
    } else {
        let ms = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), duration_ms);
        lines.push(format!(
            "idle {}  last send {} / receive {}  bytes sent {} / received {}  unread {}  \
             unsent {}  retransmits {}",
            ms(row.idle_ms),
            ms(row.last_send_ms),
            ms(row.last_recv_ms),
            bytes(row.bytes_sent),
            bytes(row.bytes_received),
            row.rqueue,
            row.wqueue,
            row.retransmits
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::top::model::tests::{three, worker};

    #[test]
    fn narrow_screens_keep_remote_state_idle_thread_and_alert() {
        let table = three();
        let rows: Vec<&Row> = table.rows.iter().collect();
        let columns = |width| layout(width, &rows).into_iter().map(|(c, _)| c).collect::<Vec<_>>();
        let at_80 = columns(80);
        for needed in [Column::Remote, Column::State, Column::Idle, Column::Thread, Column::Alert] {
            assert!(at_80.contains(&needed), "{needed:?} missing at 80 columns: {at_80:?}");
        }
        let total = |width| {
            let l = layout(width, &rows);
            l.iter().map(|&(_, w)| usize::from(w)).sum::<usize>() + l.len() - 1
        };
        for width in [60, 80, 100, 200] {
            assert!(total(width) <= usize::from(width), "overflows {width}");
        }
        let wide = columns(200);
        assert!(wide.contains(&Column::Local) && !wide.contains(&Column::LocalPort));
        assert_eq!(wide.len(), ORDER.len() - 1, "everything fits at 200: {wide:?}");
        assert_eq!(wide.first(), Some(&Column::Local), "left to right order");
    }

    #[test]
    fn words_for_times_sizes_and_threads() {
        assert_eq!(duration_ms(850), "850ms");
        assert_eq!(duration_ms(5_640), "5.6s");
        assert_eq!(duration_ms(200_000), "3m20s");
        assert_eq!(duration_ms(7_500_000), "2h05m");
        assert_eq!(bytes(512), "512");
        assert_eq!(bytes(1536), "1.5K");
        assert_eq!(bytes(5 << 20), "5.0M");
        assert_eq!(thread_label(&worker(7)), "worker-7:7 recvfrom 5.6s");
        let last =
            ThreadInfo { blocked_in: None, blocked_ms: None, last_io_ms: Some(2000), ..worker(8) };
        assert_eq!(thread_label(&last), "worker-8:8 last I/O 2.0s ago");
        assert_eq!(threads_cell(&[worker(1), worker(2)]), "worker-1:1 recvfrom 5.6s +1");
    }

    #[test]
    fn details_give_the_alert_sentence_and_its_numbers() {
        let table = three();
        let quiet = table.rows.iter().find(|r| r.cookie == 1).unwrap();
        let text = details(quiet).join("\n");
        assert!(text.contains("127.0.0.1:8080 -> 127.0.0.1:40001  ESTABLISHED"), "{text}");
        assert!(text.contains("pid 42 server fd 4  cookie 1"), "{text}");
        assert!(text.contains("thread worker-1401 (tid 1401) blocked in recvfrom for 5.6s"));
        assert!(text.contains("idle (for 3.0s): No data sent or received for 20.0s"), "{text}");
        assert!(text.contains("unread_bytes 0"), "{text}");
        let mut unowned = quiet.clone();
        (unowned.pid, unowned.comm, unowned.fd) = (None, None, None);
        assert!(details(&unowned)[0].contains("no process holds it"));
    }
}
