//! `top`'s state between frames and what each key does to it: keys in, state and requests out.
//! No terminal and no kernel here.
use std::time::Duration;

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::model::{Row, Sort, SortKey, Table, visible};
use crate::{
    act::{Mode, manual::Request},
    detect::Reason,
};

/// The engine's health as the header shows it, from the last poll.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Health {
    /// What is watched, in words (`pid 4242`, `every socket`, ...).
    pub targets: String,
    pub backend: &'static str,
    pub poll_interval: Duration,
    pub polls: u64,
    pub last_poll: Duration,
    /// The screen's own cost: building the table after a poll, and drawing a frame.
    pub table_build: Duration,
    pub draw: Duration,
    pub sockets: usize,
    pub listening: usize,
    /// Sockets the probes could not track (their map was full), threads likewise, and events
    /// the kernel dropped.
    pub track_failed: u64,
    pub thread_track_failed: u64,
    pub events_lost: u64,
    /// Every watched process is gone.
    pub finished: bool,
}

/// A connection to end once the operator says `y`.
#[derive(Clone, Debug, PartialEq)]
pub struct Pending {
    pub request: Request,
    /// The alert the connection stood under, for the `action` line.
    pub reason: Option<Reason>,
    /// The connection in words, for the prompt and the result.
    pub what: String,
}

/// What a key asks of the loop beyond a redraw.
#[derive(Debug, PartialEq)]
pub enum Command {
    Nothing,
    Quit,
    End(Pending),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Status {
    pub text: String,
    pub error: bool,
}

pub struct App {
    pub table: Table,
    pub health: Health,
    /// Rows shown, in order: indices into `table.rows`.
    pub order: Vec<usize>,
    pub sort: Sort,
    pub filter: String,
    /// Keys go to the filter text (after `/`, until Enter or Esc).
    pub editing_filter: bool,
    /// The selected row's cookie. Once the operator has moved the selection, it follows its
    /// connection across polls and sorts; until then it stays on the top row.
    pub selected: Option<u64>,
    chosen: bool,
    /// The selected position in `order`.
    pub cursor: usize,
    /// The first row on screen, and how many fit (kept by the view).
    pub offset: usize,
    pub page: usize,
    pub confirm: Option<Pending>,
    pub status: Option<Status>,
}

impl App {
    pub fn new(health: Health) -> App {
        App {
            table: Table::default(),
            health,
            order: Vec::new(),
            sort: Sort { key: SortKey::Idle, reversed: false },
            filter: String::new(),
            editing_filter: false,
            selected: None,
            chosen: false,
            cursor: 0,
            offset: 0,
            page: 10,
            confirm: None,
            status: None,
        }
    }

    /// A new poll's table.
    pub fn set_table(&mut self, table: Table, health: Health) {
        self.table = table;
        self.health = health;
        self.reorder();
    }

    pub fn selected_row(&self) -> Option<&Row> {
        self.order.get(self.cursor).map(|&i| &self.table.rows[i])
    }

    pub fn say(&mut self, text: impl Into<String>, error: bool) {
        self.status = Some(Status { text: text.into(), error });
    }

    /// Recomputes the rows shown and keeps a chosen selection on its connection if it is still
    /// shown, else at the same position.
    fn reorder(&mut self) {
        self.order = visible(&self.table.rows, &self.filter, self.sort);
        if let Some(at) = self
            .selected
            .filter(|_| self.chosen)
            .and_then(|cookie| self.order.iter().position(|&i| self.table.rows[i].cookie == cookie))
        {
            self.cursor = at;
        }
        self.move_to(self.cursor);
    }

    fn move_to(&mut self, position: usize) {
        self.cursor = position.min(self.order.len().saturating_sub(1));
        self.selected = self.selected_row().map(|r| r.cookie);
    }

    fn move_by(&mut self, delta: isize) {
        self.choose(self.cursor.saturating_add_signed(delta));
    }

    /// Moves the selection by the operator's hand: from now on it follows its connection.
    fn choose(&mut self, position: usize) {
        self.chosen = true;
        self.move_to(position);
    }

    pub fn key(&mut self, key: KeyEvent) -> Command {
        if key.kind == KeyEventKind::Release {
            return Command::Nothing;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Command::Quit;
        }
        if let Some(pending) = self.confirm.take() {
            if key.code == KeyCode::Char('y') {
                self.say(format!("{}: under way", pending.what), false);
                return Command::End(pending);
            }
            self.say("cancelled: nothing was done", false);
            return Command::Nothing;
        }
        if self.editing_filter && self.edit_filter(key.code) {
            return Command::Nothing;
        }
        let page = self.page.max(1) as isize;
        match key.code {
            KeyCode::Char('q') => return Command::Quit,
            KeyCode::Up => self.move_by(-1),
            KeyCode::Down => self.move_by(1),
            KeyCode::PageUp => self.move_by(-page),
            KeyCode::PageDown => self.move_by(page),
            KeyCode::Home => self.choose(0),
            KeyCode::End => self.choose(usize::MAX),
            KeyCode::Char('/') => self.editing_filter = true,
            KeyCode::Esc => self.set_filter(String::new()),
            KeyCode::Char('i') => self.sort_by(SortKey::Idle),
            KeyCode::Char('b') => self.sort_by(SortKey::Bytes),
            KeyCode::Char('t') => self.sort_by(SortKey::State),
            KeyCode::Char('s') => self.ask(Mode::Shutdown),
            KeyCode::Char('d') => self.ask(Mode::Destroy),
            _ => {}
        }
        Command::Nothing
    }

    /// A key while the filter is being typed; false for keys that keep their usual meaning
    /// (moving the selection).
    fn edit_filter(&mut self, code: KeyCode) -> bool {
        let mut filter = self.filter.clone();
        match code {
            KeyCode::Char(c) => filter.push(c),
            KeyCode::Backspace => {
                filter.pop();
            }
            KeyCode::Enter => {
                self.editing_filter = false;
                return true;
            }
            KeyCode::Esc => {
                self.editing_filter = false;
                filter.clear();
            }
            _ => return false,
        }
        self.set_filter(filter);
        true
    }

    fn set_filter(&mut self, filter: String) {
        self.filter = filter;
        self.reorder();
    }

    fn sort_by(&mut self, key: SortKey) {
        self.sort = self.sort.toggle(key);
        self.reorder();
    }

    /// Puts the confirmation for ending the selected connection on the status line.
    fn ask(&mut self, mode: Mode) {
        let Some(row) = self.selected_row() else {
            return self.say("no connection selected", true);
        };
        if row.listening() {
            return self.say(
                "a listening socket is not ended: that stops the service; end its connections",
                true,
            );
        }
        let Some(pid) = row.pid else {
            return self.say("no watched process holds this socket: nothing to end it by", true);
        };
        let what = format!(
            "{} {} -> {} (pid {pid}{})",
            verb(mode),
            row.local,
            row.remote,
            row.fd.map(|fd| format!(" fd {fd}")).unwrap_or_default()
        );
        let request = Request {
            pid,
            cookie: Some(row.cookie),
            local: Some(row.local),
            remote: Some(row.remote),
            mode,
            dry_run: false,
        };
        let reason = row.alerts.first().map(|a| a.reason);
        self.confirm = Some(Pending { request, reason, what });
    }
}

pub fn verb(mode: Mode) -> &'static str {
    match mode {
        Mode::Shutdown => "shut down",
        Mode::Destroy => "destroy",
    }
}

#[cfg(test)]
mod tests {
    use observer_common::TcpState;

    use super::*;
    use crate::snapshot::fixtures::*;

    fn press(app: &mut App, code: KeyCode) -> Command {
        app.key(KeyEvent::new(code, KeyModifiers::NONE))
    }

    fn typed(app: &mut App, text: &str) {
        for c in text.chars() {
            press(app, KeyCode::Char(c));
        }
    }

    /// Rows 1 (idle 30 s), 2 (idle 20 s, most bytes), 3 (idle 10 s) and a listener, 4.
    fn four_rows() -> App {
        let mut app = App::new(Health::default());
        let mut busy = socket(2, TcpState::Established, 20_000, 20_000);
        busy.diag.tcp.as_mut().unwrap().bytes_received = 1 << 20;
        let sockets = vec![
            socket(3, TcpState::Established, 10_000, 10_000),
            busy,
            socket(1, TcpState::Established, 30_000, 30_000),
            socket(4, TcpState::Listen, 0, 0),
        ];
        let table = Table::build(&snapshot(sockets), &[], std::iter::empty(), |_| vec![]);
        app.set_table(table, Health::default());
        app
    }

    fn shown(app: &App) -> Vec<u64> {
        app.order.iter().map(|&i| app.table.rows[i].cookie).collect()
    }

    #[test]
    fn until_moved_the_selection_stays_on_the_top_row() {
        let mut app = four_rows();
        assert_eq!(app.selected, Some(1));
        press(&mut app, KeyCode::Char('b'));
        assert_eq!((app.cursor, app.selected), (0, Some(2)), "the new top row");
    }

    #[test]
    fn arrows_move_and_the_selection_follows_its_connection_across_sorts_and_polls() {
        let mut app = four_rows();
        assert_eq!((shown(&app), app.selected), (vec![1, 2, 3, 4], Some(1)));
        press(&mut app, KeyCode::Down);
        assert_eq!(app.selected, Some(2));
        press(&mut app, KeyCode::Char('b'));
        assert_eq!(shown(&app)[0], 2, "most bytes first");
        assert_eq!((app.cursor, app.selected), (0, Some(2)), "still on the same connection");
        press(&mut app, KeyCode::End);
        press(&mut app, KeyCode::Down);
        assert_eq!(app.cursor, 3, "stops at the last row");
        press(&mut app, KeyCode::Home);
        press(&mut app, KeyCode::Up);
        assert_eq!(app.cursor, 0);
        let again = four_rows();
        let selected = app.selected;
        app.set_table(again.table, Health::default());
        assert_eq!(app.selected, selected, "a new poll keeps the selection");
    }

    #[test]
    fn slash_filters_as_you_type_enter_keeps_it_and_esc_clears_it() {
        let mut app = four_rows();
        press(&mut app, KeyCode::Char('/'));
        typed(&mut app, "4000");
        assert_eq!(shown(&app), vec![1, 2, 3, 4], "every remote port starts 4000");
        typed(&mut app, "3");
        assert_eq!(shown(&app), vec![3]);
        assert_eq!(app.selected, Some(3), "the one row left is selected");
        press(&mut app, KeyCode::Enter);
        assert!(!app.editing_filter);
        press(&mut app, KeyCode::Char('/'));
        press(&mut app, KeyCode::Backspace);
        assert_eq!(app.filter, "4000");
        press(&mut app, KeyCode::Esc);
        assert_eq!((app.filter.as_str(), shown(&app).len()), ("", 4));
    }

    #[test]
    fn ending_asks_first_and_only_y_goes_ahead() {
        let mut app = four_rows();
        assert_eq!(press(&mut app, KeyCode::Char('s')), Command::Nothing);
        let pending = app.confirm.clone().expect("a confirmation");
        assert_eq!(pending.what, "shut down 127.0.0.1:8080 -> 127.0.0.1:40001 (pid 42 fd 4)");
        let request = &pending.request;
        assert_eq!((request.pid, request.cookie, request.mode), (42, Some(1), Mode::Shutdown));
        assert_eq!(request.remote, Some("127.0.0.1:40001".parse().unwrap()));
        assert_eq!(press(&mut app, KeyCode::Char('n')), Command::Nothing);
        assert!(app.confirm.is_none() && app.status.as_ref().unwrap().text.contains("cancelled"));
        press(&mut app, KeyCode::Char('d'));
        let Command::End(pending) = press(&mut app, KeyCode::Char('y')) else {
            panic!("y ends it")
        };
        assert_eq!(pending.request.mode, Mode::Destroy);
    }

    #[test]
    fn listeners_and_unowned_sockets_are_not_offered_for_ending() {
        let mut app = four_rows();
        press(&mut app, KeyCode::End);
        assert_eq!(app.selected, Some(4));
        press(&mut app, KeyCode::Char('d'));
        assert!(app.confirm.is_none());
        assert!(app.status.as_ref().unwrap().text.contains("listening"));
    }

    #[test]
    fn q_and_ctrl_c_quit_even_while_typing_a_filter() {
        let mut app = four_rows();
        assert_eq!(press(&mut app, KeyCode::Char('q')), Command::Quit);
        press(&mut app, KeyCode::Char('/'));
        assert_eq!(press(&mut app, KeyCode::Char('q')), Command::Nothing, "q is filter text now");
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(app.key(ctrl_c), Command::Quit);
    }
}
