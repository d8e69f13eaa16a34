//! `observer top` end to end, in a real terminal (tmux): the real agent binary watching a real
//! thread-per-connection server, driven by keys, checked by what the screen shows, what the
//! server's workers see and what `--log` records.
use std::{
    io::{Read, Write},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use observer_tests::{
    Server, as_u64, engine_args, observer_bin, remote_of, require_root, tmux::Tmux,
};
use serde_json::Value;

const POLL_MS: u64 = 500;
const IDLE_TIMEOUT_MS: u64 = 2000;
/// Generous bound for what should come within a few polls; only reached on failure.
const DEADLINE: Duration = Duration::from_secs(20);

/// `observer top` in a 100x30 terminal, watching one server, logging to a file of its own.
struct Top {
    tmux: Tmux,
    log: PathBuf,
}

impl Top {
    fn start(server: &Server) -> Top {
        require_root();
        let log = std::env::temp_dir().join(format!(
            "observer-top-test-{}-{}.jsonl",
            std::process::id(),
            server.pid
        ));
        let _ = std::fs::remove_file(&log);
        let timeout = format!("{IDLE_TIMEOUT_MS}ms");
        let poll = format!("{POLL_MS}ms");
        let extra =
            ["--idle-timeout", &timeout, "--syscall-timing", "--log", log.to_str().unwrap()];
        let args = engine_args("top", &poll, &[server.pid], &extra);
        // After top: its exit code, then whether the terminal is back in cooked mode.
        let command = format!(
            "{} {}; echo \"top exited $?\"; stty -a | grep -o -- '-*icanon'",
            observer_bin().display(),
            args.join(" ")
        );
        let top = Top { tmux: Tmux::start(100, 30, &command), log };
        // The listener shows once the first poll is on the screen.
        top.tmux.wait_for("first poll", DEADLINE, |s| s.contains("LISTEN"));
        top
    }

    fn wait_for(&self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        self.tmux.wait_for(what, DEADLINE, matches)
    }

    /// The `--log` lines so far.
    fn logged(&self) -> Vec<Value> {
        observer_tests::read_json_lines(&self.log)
    }

    fn wait_logged(&self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(v) = self.logged().into_iter().find(|v| matches(v)) {
                return v;
            }
            assert!(
                Instant::now() < end,
                "no {what} in --log within {DEADLINE:?}: {:?}",
                self.logged()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types `text` after `/` and Enter: only matching rows stay.
    fn filter(&self, text: &str) {
        self.tmux.keys(&["/"]);
        self.tmux.type_text(text);
        self.tmux.keys(&["Enter"]);
        self.wait_for("the filter applied", |s| s.contains(&format!("filter: {text}")));
    }
}

impl Drop for Top {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The table's rows on the screen: below the column titles, above the details.
fn table_rows(screen: &str) -> impl Iterator<Item = &str> {
    screen
        .lines()
        .skip_while(|l| !l.starts_with("LOCAL "))
        .skip(1)
        .take_while(|l| !l.starts_with(" selected "))
}

/// The row of the connection whose remote end is `remote`.
fn row<'s>(screen: &'s str, remote: &str) -> Option<&'s str> {
    table_rows(screen).find(|l| l.split_whitespace().nth(1) == Some(remote))
}

/// Whether the row with the word `first` (an address, a state) is above the one with `second`.
fn above(screen: &str, first: &str, second: &str) -> bool {
    let find =
        |word: &str| table_rows(screen).position(|l| l.split_whitespace().any(|c| c == word));
    matches!((find(first), find(second)), (Some(a), Some(b)) if a < b)
}

/// A duration as the screen writes it (850ms, 2.3s, 1m05s), in milliseconds.
fn screen_ms(cell: &str) -> Option<u64> {
    if let Some(ms) = cell.strip_suffix("ms") {
        return ms.parse().ok();
    }
    if let Some(s) = cell.strip_suffix('s') {
        if let Some((m, s)) = s.split_once('m') {
            return Some(m.parse::<u64>().ok()? * 60_000 + s.parse::<u64>().ok()? * 1000);
        }
        return s.parse::<f64>().ok().map(|s| (s * 1000.0).round() as u64);
    }
    None
}

#[test]
fn the_idle_connection_appears_with_its_thread_and_reason_within_two_polls() {
    let mut server = Server::start(&[]);
    let top = Top::start(&server);
    let (client, accepted) = server.connect();
    let remote = remote_of(&client);
    let worker = format!(":{}", accepted["tid"]);
    let screen =
        top.wait_for("the idle alert", |s| row(s, &remote).is_some_and(|r| r.contains(" idle")));
    let line = row(&screen, &remote).unwrap();
    // Columns: LOCAL REMOTE STATE IDLE ...; the idle time is the poll's that raised the alert.
    let cells: Vec<&str> = line.split_whitespace().collect();
    // The local address, or only its port on a narrow screen.
    assert!(accepted["local"].as_str().unwrap().ends_with(cells[0]), "{screen}");
    assert_eq!(cells[1..3], [remote.as_str(), "ESTAB"], "{screen}");
    let idle = screen_ms(cells[3]).unwrap_or_else(|| panic!("no idle time in {line}"));
    assert!(
        (IDLE_TIMEOUT_MS..=IDLE_TIMEOUT_MS + 2 * POLL_MS).contains(&idle),
        "idle {idle} ms is not within two polls of the timeout:\n{screen}"
    );
    // The worker thread blocked reading it, by name and tid, and for how long.
    let thread = cells
        .iter()
        .position(|c| c.starts_with("worker-") && c.ends_with(&worker))
        .unwrap_or_else(|| panic!("worker {worker} not in the row:\n{screen}"));
    assert!(["read", "recvfrom", "recvmsg", "readv"].contains(&cells[thread + 1]), "{line}");
    assert!(screen_ms(cells[thread + 2]).is_some(), "blocked time in {line}");
    assert!(screen.contains("alerts: idle 1"), "the header counts it:\n{screen}");
    // Selected (the longest idle is on top), its details give the alert's sentence.
    assert!(screen.contains("No data sent or received for"), "{screen}");
    let alert =
        top.wait_logged("the idle alert", |v| v["event"] == "alert" && v["remote"] == remote);
    assert_eq!(alert["threads"][0]["tid"], accepted["tid"], "{alert}");
}

#[test]
fn rows_sort_by_idle_bytes_and_state_and_the_filter_keeps_the_matching_ones() {
    let mut server = Server::start(&[]);
    let top = Top::start(&server);
    let (quiet, _) = server.connect();
    let (mut chatty, _) = server.connect();
    let block = vec![7u8; 64 * 1024];
    chatty.write_all(&block).unwrap();
    let mut echoed = vec![0u8; block.len()];
    chatty.read_exact(&mut echoed).unwrap();
    let (quiet, chatty) = (remote_of(&quiet), remote_of(&chatty));
    // A frame drawn before the last poll may still be up: wait for each order, not one frame.
    top.wait_for("by idle: the quiet one, idle longer, first", |s| above(s, &quiet, &chatty));
    top.tmux.keys(&["b"]);
    top.wait_for("sort by bytes", |s| s.contains("sort: bytes descending"));
    top.wait_for("by bytes: the chatty one first", |s| above(s, &chatty, &quiet));
    top.tmux.keys(&["t"]);
    top.wait_for("sort by state", |s| s.contains("sort: state ascending"));
    top.wait_for("by state: ESTAB before LISTEN", |s| above(s, &quiet, "LISTEN"));
    top.tmux.keys(&["t"]);
    top.wait_for("sort by state reversed", |s| s.contains("sort: state descending"));
    top.wait_for("reversed: LISTEN first", |s| above(s, "LISTEN", &quiet));

    top.filter(&chatty);
    let screen = top.wait_for("one row", |s| s.contains("showing 1 of 3"));
    assert!(row(&screen, &chatty).is_some() && row(&screen, &quiet).is_none(), "{screen}");
    top.tmux.keys(&["Escape"]);
    top.wait_for("every row again", |s| {
        row(s, &quiet).is_some() && row(s, &chatty).is_some() && s.contains("showing 3 of 3")
    });
}

#[test]
fn shutdown_from_the_screen_ends_the_connection_and_its_worker_sees_eof() {
    let mut server = Server::start(&[]);
    let top = Top::start(&server);
    let (mut client, accepted) = server.connect();
    let (bystander, _) = server.connect();
    let remote = remote_of(&client);
    top.wait_for("the idle alert", |s| row(s, &remote).is_some_and(|r| r.contains(" idle")));
    // Select it by filtering down to it, ask, and say yes.
    top.filter(&remote);
    top.tmux.keys(&["s"]);
    let prompt = format!(
        "shut down {} -> {remote} (pid {} fd {})",
        accepted["local"].as_str().unwrap(),
        server.pid,
        accepted["fd"]
    );
    top.wait_for("the confirmation", |s| s.contains(&format!("{prompt}? y: yes")));
    top.tmux.keys(&["y"]);
    top.wait_for("the result", |s| s.contains(&format!("{prompt}: done")));

    let fd = accepted["fd"].clone();
    let closed =
        server.scenario.wait_for("worker done", |v| v["event"] == "closed" && v["fd"] == fd);
    assert_eq!(closed["how"], "eof", "shutdown: the worker reads EOF: {closed}");
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(client.read(&mut [0u8; 16]).unwrap(), 0, "the client got a FIN");
    let action = top.wait_logged("the action line", |v| v["event"] == "action");
    assert_eq!(
        (action["action"].as_str(), action["result"].as_str()),
        (Some("shutdown"), Some("ok"))
    );
    assert_eq!(
        (action["remote"].as_str(), action["reason"].as_str()),
        (Some(remote.as_str()), Some("idle"))
    );
    assert_eq!(as_u64(&action["pid"]), u64::from(server.pid));
    // Nothing else was touched.
    let others = server.scenario.out.seen.iter().filter(|v| v["event"] == "closed").count();
    assert_eq!(others, 1, "only that connection ended: {}", server.scenario.out.dump());
    drop(bystander);
}

#[test]
fn destroy_needs_y_and_resets_the_connection() {
    let mut server = Server::start(&[]);
    let top = Top::start(&server);
    let (client, accepted) = server.connect();
    let remote = remote_of(&client);
    top.filter(&remote);
    top.wait_for("the connection", |s| row(s, &remote).is_some());
    top.tmux.keys(&["d"]);
    top.wait_for("the confirmation", |s| s.contains("? y: yes"));
    top.tmux.keys(&["n"]);
    top.wait_for("cancelled", |s| s.contains("cancelled: nothing was done"));
    assert!(row(&top.tmux.screen(), &remote).is_some(), "still there after n");

    top.tmux.keys(&["d"]);
    top.wait_for("the confirmation", |s| s.contains("? y: yes"));
    top.tmux.keys(&["y"]);
    top.wait_for("the result", |s| s.contains(": done"));
    let fd = accepted["fd"].clone();
    let closed =
        server.scenario.wait_for("worker done", |v| v["event"] == "closed" && v["fd"] == fd);
    assert_eq!(
        (closed["how"].as_str(), closed["errno"].as_i64()),
        (Some("error"), Some(i64::from(libc::ECONNABORTED))),
        "{closed}"
    );
}

#[test]
fn q_exits_zero_and_gives_the_terminal_back() {
    let server = Server::start(&[]);
    let top = Top::start(&server);
    assert_eq!(top.tmux.pane("alternate_on"), "1", "top draws on the alternate screen");
    top.tmux.keys(&["q"]);
    let screen = top.wait_for("the shell's lines", |s| s.contains("top exited"));
    assert!(screen.contains("top exited 0"), "{screen}");
    // Cooked mode is back (raw mode shows as -icanon), and the table is gone with the
    // alternate screen.
    let mode = top.wait_for("stty", |s| s.lines().any(|l| l.trim().ends_with("icanon")));
    assert!(mode.lines().any(|l| l.trim() == "icanon"), "{mode}");
    assert!(!mode.contains("LISTEN"), "{mode}");
    assert_eq!(top.tmux.pane("alternate_on"), "0");
    let last = top.logged().pop().unwrap();
    assert_eq!((last["event"].as_str(), last["reason"].as_str()), (Some("stopped"), Some("quit")));
}

#[test]
fn ctrl_c_quits_too() {
    let server = Server::start(&[]);
    let top = Top::start(&server);
    top.tmux.keys(&["C-c"]);
    let screen = top.wait_for("the shell's lines", |s| s.contains("top exited"));
    assert!(screen.contains("top exited 0"), "{screen}");
}

#[test]
fn without_a_terminal_it_says_so_in_one_line_and_points_to_watch() {
    let output = std::process::Command::new(observer_bin()).args(["top"]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("needs a terminal") && stderr.contains("observer watch"), "{stderr}");
}
