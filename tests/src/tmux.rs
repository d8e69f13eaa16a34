//! A real terminal for the tests of `observer top`: a tmux server of the test's own, one window
//! running a command, keys typed into it and its screen read back, waiting with deadlines.
use std::{
    process::{Command, Output},
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

/// A detached tmux session on a server (socket) of its own, killed when dropped.
pub struct Tmux {
    socket: String,
}

const SESSION: &str = "top";

impl Tmux {
    /// Runs `command` (a shell command line) in a `width` x `height` terminal.
    pub fn start(width: u16, height: u16, command: &str) -> Tmux {
        ensure_installed();
        static SESSIONS: AtomicU32 = AtomicU32::new(0);
        let n = SESSIONS.fetch_add(1, Ordering::Relaxed);
        let tmux = Tmux { socket: format!("observer-test-{}-{n}", std::process::id()) };
        let (w, h) = (width.to_string(), height.to_string());
        // No configuration file: the user's would change what the screen looks like.
        tmux.run(&["-f", "/dev/null", "new-session", "-d", "-s", SESSION, "-x", &w, "-y", &h])
            .map(|_| ())
            .unwrap_or_else(|e| panic!("cannot start tmux: {e}"));
        tmux.run(&["set-option", "-t", SESSION, "remain-on-exit", "on"]).unwrap();
        tmux.run(&["respawn-pane", "-k", "-t", SESSION, command]).unwrap();
        tmux
    }

    fn run(&self, args: &[&str]) -> Result<Output, String> {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .map_err(|e| format!("tmux: {e}"))?;
        if !out.status.success() {
            return Err(format!("tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(out)
    }

    /// Presses keys, in tmux's names: `"q"`, `"Down"`, `"Enter"`, `"Escape"`, `"C-c"`.
    pub fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", SESSION];
        args.extend_from_slice(keys);
        self.run(&args).unwrap();
    }

    /// Types `text` as it is.
    pub fn type_text(&self, text: &str) {
        self.run(&["send-keys", "-t", SESSION, "-l", text]).unwrap();
    }

    /// The screen now, one string per line.
    pub fn screen(&self) -> String {
        let out = self.run(&["capture-pane", "-p", "-t", SESSION]).unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A tmux format variable of the pane, e.g. `alternate_on`, `pane_dead_status`.
    pub fn pane(&self, variable: &str) -> String {
        let format = format!("#{{{variable}}}");
        let out = self.run(&["display-message", "-p", "-t", SESSION, &format]).unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The first screen (read every 50 ms) that `matches`, within `deadline`; panics with the
    /// last screen seen otherwise.
    pub fn wait_for(
        &self,
        what: &str,
        deadline: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> String {
        let end = Instant::now() + deadline;
        loop {
            let screen = self.screen();
            if matches(&screen) {
                return screen;
            }
            if Instant::now() >= end {
                panic!("no {what} on the screen within {deadline:?}; the screen:\n{screen}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// Installs tmux from the distribution if this machine has none (a fresh CI machine).
pub fn ensure_installed() {
    static CHECKED: Once = Once::new();
    CHECKED.call_once(|| {
        let present = || Command::new("tmux").arg("-V").output().is_ok_and(|o| o.status.success());
        if present() {
            return;
        }
        let install = || {
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", "tmux"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .is_ok_and(|s| s.success())
        };
        if !install() {
            let _ = Command::new("apt-get").arg("update").status();
            install();
        }
        assert!(present(), "the tests of `observer top` need tmux: apt-get install tmux");
    });
}
