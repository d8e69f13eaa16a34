//! The terminal while `top` draws on it: raw mode and the alternate screen, given back on every
//! way out (return, error, panic), and the agent's log lines held meanwhile so they do not
//! scribble over the screen.
use std::{
    collections::VecDeque,
    io::{self, Stdout, Write},
    panic,
    sync::{
        Arc, Mutex, Once,
        atomic::{AtomicBool, Ordering},
    },
};

use crossterm::{
    cursor, execute,
    terminal::{EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode},
};
use ratatui::{Terminal, backend::CrosstermBackend};

use super::{app::App, view};

/// Whether the terminal is ours now (raw mode, alternate screen).
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The terminal, taken over: dropping it gives it back.
pub struct Screen {
    terminal: Terminal<CrosstermBackend<Stdout>>,
    logs: Logs,
}

impl Screen {
    pub fn enter(logs: &Logs) -> io::Result<Screen> {
        static PANIC_HOOK: Once = Once::new();
        PANIC_HOOK.call_once(|| {
            // The panic message must land on the normal screen, after the terminal is back.
            let previous = panic::take_hook();
            panic::set_hook(Box::new(move |info| {
                give_back();
                previous(info);
            }));
        });
        TAKEN.store(true, Ordering::SeqCst);
        logs.hold(true);
        let screen = enable_raw_mode()
            .and_then(|()| execute!(io::stdout(), EnterAlternateScreen, cursor::Hide))
            .and_then(|()| Terminal::new(CrosstermBackend::new(io::stdout())));
        match screen {
            Ok(terminal) => Ok(Screen { terminal, logs: logs.clone() }),
            Err(e) => {
                give_back();
                logs.hold(false);
                Err(e)
            }
        }
    }

    /// Draws a frame; the terminal's size is read each time, so resizes are followed.
    pub fn draw(&mut self, app: &mut App) -> io::Result<()> {
        self.terminal.draw(|frame| view::draw(frame, app))?;
        Ok(())
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        give_back();
        self.logs.hold(false);
    }
}

/// Leaves the alternate screen and raw mode and shows the cursor, once.
fn give_back() {
    if TAKEN.swap(false, Ordering::SeqCst) {
        let _ = disable_raw_mode();
        let _ = execute!(io::stdout(), LeaveAlternateScreen, cursor::Show);
    }
}

/// Lines held at most; older ones are dropped (and counted).
const HELD_LINES: usize = 1000;

/// The log's destination for `top`: stderr, except while the screen is taken, when lines are
/// kept (the newest shown on the status line) and written to stderr once it is given back.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Held>>);

#[derive(Default)]
struct Held {
    holding: bool,
    /// The start of a line not yet ended.
    partial: Vec<u8>,
    lines: VecDeque<String>,
    dropped: usize,
    /// The newest line the status line has not shown yet.
    unseen: Option<String>,
}

impl Logs {
    fn hold(&self, on: bool) {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        held.holding = on;
        if on {
            return;
        }
        let mut err = io::stderr().lock();
        if held.dropped > 0 {
            let _ = writeln!(err, "observer: {} earlier log lines were dropped", held.dropped);
        }
        for line in held.lines.drain(..) {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.write_all(&std::mem::take(&mut held.partial));
        held.dropped = 0;
        held.unseen = None;
    }

    /// The newest log line since the last call, if any.
    pub fn take_unseen(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).unseen.take()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !held.holding {
            io::stderr().write_all(buf)?;
            return Ok(buf.len());
        }
        held.partial.extend_from_slice(buf);
        while let Some(end) = held.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = held.partial.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line).trim_end().to_owned();
            if held.lines.len() == HELD_LINES {
                held.lines.pop_front();
                held.dropped += 1;
            }
            held.unseen = Some(line.clone());
            held.lines.push_back(line);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_held_while_the_screen_is_taken_and_the_newest_is_offered_once() {
        let logs = Logs::default();
        logs.hold(true);
        let mut writer = logs.clone();
        writer.write_all(b"[WARN] first\n[WARN] sec").unwrap();
        assert_eq!(logs.take_unseen().as_deref(), Some("[WARN] first"));
        writer.write_all(b"ond\n").unwrap();
        assert_eq!(logs.take_unseen().as_deref(), Some("[WARN] second"));
        assert_eq!(logs.take_unseen(), None, "offered once");
        assert_eq!(logs.0.lock().unwrap().lines.len(), 2);
        logs.hold(false);
        assert!(logs.0.lock().unwrap().lines.is_empty(), "written out when the screen is back");
    }
}
