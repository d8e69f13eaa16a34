//! Bad input never crashes the agent: every out-of-range value, odd file and odd target gets a
//! one-line error that names the limit or the fix (exit 2 for usage, 1 otherwise), and
//! nothing hangs.
use std::{
    ffi::OsStr,
    os::unix::ffi::OsStrExt,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use observer_tests::{observer_bin, require_root};

/// Runs `observer <args>` with a deadline: (exit code, stdout, stderr).
fn observer(args: &[&OsStr]) -> (Option<i32>, String, String) {
    require_root();
    let mut child = Command::new(observer_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("observer {args:?} did not return within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn os(args: &[&str]) -> Vec<&'static OsStr> {
    args.iter().map(|a| OsStr::new(Box::leak(a.to_string().into_boxed_str()))).collect()
}

/// The one error line (clap's usage errors add a usage block; the first line is the error).
fn error_line(stderr: &str) -> &str {
    stderr.lines().find(|l| l.starts_with("error") || l.contains("error:")).unwrap_or(stderr)
}

#[test]
fn out_of_range_values_are_usage_errors_that_name_the_limit() {
    let cases: [(&[&str], &str); 7] = [
        (&["watch", "--poll-interval", "1ns"], "10ms"),
        (&["watch", "--idle-timeout", "18446744073709552s"], "30 days"),
        (&["watch", "--stats-interval", "100000h"], "30 days"),
        (&["watch", "--max-sockets", "4294967295"], "134217728"),
        (
            &[
                "watch",
                "--max-actions-per-minute",
                "0",
                "--action",
                "destroy",
                "--action-on",
                "idle",
            ],
            "1..=10000",
        ),
        (&["watch", "--pid", "99999999"], "4194304"),
        (&["watch", "--slow-min-rate", "NaN"], "rate"),
    ];
    for (args, names) in cases {
        let (code, stdout, stderr) = observer(&os(args));
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stdout.is_empty());
        assert!(error_line(&stderr).contains(names), "{args:?} does not say {names}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn odd_targets_get_their_own_one_line_errors() {
    // A zombie: a child of this test that exited and was not reaped.
    let mut zombie = Command::new("true").spawn().unwrap();
    let zpid = zombie.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(format!("/proc/{zpid}/stat")).unwrap().contains(") Z ") {
        assert!(Instant::now() < deadline, "pid {zpid} never became a zombie");
        std::thread::sleep(Duration::from_millis(10));
    }
    let kthreadd_exists =
        std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd");
    let mut cases: Vec<(Vec<String>, &str)> =
        vec![(vec!["watch".into(), "--pid".into(), zpid.to_string()], "zombie")];
    if kthreadd_exists {
        cases.push((vec!["watch".into(), "--pid".into(), "2".into()], "kernel thread kthreadd"));
    }
    for (args, says) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stdout, stderr) = observer(&os(&args));
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(stdout.is_empty());
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    let _ = zombie.wait();
}

#[test]
fn odd_policy_files_are_refused_without_hanging_or_panicking() {
    let dir = std::env::temp_dir().join(format!("observer-inputs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("policy.fifo");
    let _ = std::fs::remove_file(&fifo);
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let huge = dir.join("huge.toml");
    std::fs::write(&huge, "[defaults]\nidle_timeout = \"18446744073709552s\"\n").unwrap();
    // Not UTF-8: a path is bytes, and must be shown, not parsed.
    let odd = dir.join(OsStr::from_bytes(b"policy-\xff.toml"));
    std::fs::write(&odd, "[defaults]\nidle_timeout = \"5\"\n").unwrap();
    let cases = [
        (fifo.as_os_str(), "not a regular file"),
        (huge.as_os_str(), "30 days"),
        (odd.as_os_str(), "like 500ms"),
    ];
    for (path, says) in cases {
        let (code, stdout, stderr) = observer(&[OsStr::new("check"), OsStr::new("--config"), path]);
        assert_eq!(code, Some(1), "{path:?}: {stderr}");
        let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(report["config"]["ok"], false, "{report}");
        assert!(report["config"]["error"].as_str().unwrap().contains(says), "{report}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn the_same_pid_many_times_is_watched_once() {
    let server = observer_tests::Server::start(&[]);
    let pid = server.pid.to_string();
    let mut args = vec!["watch"];
    for _ in 0..5000 {
        args.extend(["--pid", pid.as_str()]);
    }
    let mut agent = observer_tests::Agent::start(&args);
    let started = agent.wait_for("started", Duration::from_secs(20), |v| v["event"] == "started");
    assert_eq!(started["pids"], serde_json::json!([server.pid]), "{started}");
    assert_eq!(agent.stop().code(), Some(0));
}
