//! Draws `top`'s screen from its state: header, table, details of the selected connection, status
//! and keys. Only the rows on screen are laid out, however big the table.
use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Cell, Paragraph, Row as TableRow, Table as TableWidget, Wrap},
};

use super::{
    app::{App, Health},
    columns::{self, Column},
    model::{self, Row},
};

/// Lines for the selected connection's details, its top border included.
const DETAILS_HEIGHT: u16 = 8;
const KEYS: &str = "q quit  arrows select  i/b/t sort  / filter  s shutdown  d destroy";

pub fn draw(frame: &mut Frame, app: &mut App) {
    let [header, table, details, status, keys] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Min(3),
        Constraint::Length(DETAILS_HEIGHT),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(header_lines(app)), header);
    draw_table(frame, table, app);
    draw_details(frame, details, app);
    frame.render_widget(Paragraph::new(status_line(app)), status);
    frame.render_widget(Paragraph::new(KEYS).style(Style::new().fg(Color::DarkGray)), keys);
}

fn ms(d: std::time::Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1e3)
}

fn header_lines(app: &App) -> Vec<Line<'static>> {
    let h: &Health = &app.health;
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let first = Line::from(vec![
        Span::styled("observer top", bold),
        Span::raw(format!(
            "  {}  {}  poll {}/{}  table {}  draw {}",
            h.targets,
            h.backend,
            ms(h.last_poll),
            humantime::format_duration(h.poll_interval),
            ms(h.table_build),
            ms(h.draw),
        )),
    ]);
    let alerts = if app.table.alert_counts.is_empty() {
        Span::raw("alerts: none")
    } else {
        let counts: Vec<String> =
            app.table.alert_counts.iter().map(|(reason, n)| format!("{reason} {n}")).collect();
        Span::styled(format!("alerts: {}", counts.join(", ")), bold.fg(Color::Red))
    };
    let failures = [
        (h.track_failed, "sockets untracked"),
        (h.thread_track_failed, "threads untracked"),
        (h.events_lost, "events lost"),
    ];
    let problems: Vec<String> =
        failures.iter().filter(|(n, _)| *n > 0).map(|(n, what)| format!("{n} {what}")).collect();
    let probes = if problems.is_empty() {
        Span::raw("probes: ok")
    } else {
        Span::styled(format!("probes: {}", problems.join(", ")), Style::new().fg(Color::Yellow))
    };
    let second = Line::from(vec![
        Span::raw(format!("{} sockets ({} listening)  ", h.sockets, h.listening)),
        alerts,
        Span::raw("  "),
        probes,
    ]);
    // Idle and bytes go largest first, states alphabetically.
    let descending = (app.sort.key != model::SortKey::State) != app.sort.reversed;
    let direction = if descending { "descending" } else { "ascending" };
    let mut third = format!("sort: {} {direction}", app.sort.name());
    if !app.filter.is_empty() {
        third.push_str(&format!("  filter: {}", app.filter));
    }
    third.push_str(&format!("  showing {} of {}", app.order.len(), app.table.rows.len()));
    if h.finished {
        third.push_str("  (every watched process has exited)");
    }
    vec![first, second, Line::raw(third)]
}

fn draw_table(frame: &mut Frame, area: Rect, app: &mut App) {
    let height = usize::from(area.height.saturating_sub(1)).max(1);
    app.page = height;
    if app.cursor < app.offset {
        app.offset = app.cursor;
    } else if app.cursor >= app.offset + height {
        app.offset = app.cursor + 1 - height;
    }
    app.offset = app.offset.min(app.order.len().saturating_sub(height));
    let end = (app.offset + height).min(app.order.len());
    let shown: Vec<&Row> = app.order[app.offset..end].iter().map(|&i| &app.table.rows[i]).collect();
    let columns = columns::layout(area.width, &shown);
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let titles = TableRow::new(columns.iter().map(|&(c, _)| Cell::from(c.title()))).style(bold);
    let rows = shown.iter().enumerate().map(|(k, row)| {
        let cells = columns.iter().map(|&(column, _)| {
            let cell = Cell::from(column.cell(row));
            if column == Column::Alert { cell.style(bold.fg(Color::Red)) } else { cell }
        });
        let line = TableRow::new(cells);
        if app.offset + k == app.cursor {
            line.style(Style::new().add_modifier(Modifier::REVERSED))
        } else {
            line
        }
    });
    let widths = columns.iter().map(|&(_, w)| Constraint::Length(w));
    frame.render_widget(TableWidget::new(rows, widths).header(titles).column_spacing(1), area);
    if app.order.is_empty() && area.height > 1 {
        let why = if app.health.polls == 0 {
            "waiting for the first poll..."
        } else if app.table.rows.is_empty() {
            "no watched sockets"
        } else {
            "no connection matches the filter (Esc clears it)"
        };
        let below = Rect { y: area.y + 1, height: 1, ..area };
        frame.render_widget(Paragraph::new(why), below);
    }
}

fn draw_details(frame: &mut Frame, area: Rect, app: &App) {
    let block = Block::new().borders(Borders::TOP).title(" selected ");
    let lines: Vec<Line> = match app.selected_row() {
        None => vec![Line::raw("no connection selected")],
        Some(row) => columns::details(row)
            .into_iter()
            .enumerate()
            .map(|(i, text)| {
                let alert = row.alerts.iter().any(|a| text.starts_with(a.reason.name()));
                let style = match (i, alert) {
                    (0, _) => Style::new().add_modifier(Modifier::BOLD),
                    (_, true) => Style::new().fg(Color::Red),
                    _ => Style::new(),
                };
                Line::styled(text, style)
            })
            .collect(),
    };
    frame.render_widget(Paragraph::new(lines).block(block).wrap(Wrap { trim: false }), area);
}

fn status_line(app: &App) -> Line<'static> {
    if app.editing_filter {
        return Line::from(vec![Span::raw("/"), Span::raw(app.filter.clone()), Span::raw("_")]);
    }
    if let Some(pending) = &app.confirm {
        let ask = format!("{}? y: yes, any other key: no", pending.what);
        return Line::styled(ask, Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD));
    }
    match &app.status {
        Some(s) if s.error => Line::styled(s.text.clone(), Style::new().fg(Color::Red)),
        Some(s) => Line::raw(s.text.clone()),
        None => Line::raw(""),
    }
}

#[cfg(test)]
mod tests {
    use observer_common::TcpState;
    use ratatui::{Terminal, backend::TestBackend};

    use super::*;
    use crate::{
        alerts::attribution::ThreadInfo,
        detect::{Detector, KernelSettings, policy::idle_after},
        snapshot::fixtures::*,
    };

    fn screen(app: &mut App, width: u16, height: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|frame| draw(frame, app)).unwrap();
        let buffer = terminal.backend().buffer();
        (0..height)
            .map(|y| (0..width).map(|x| buffer[(x, y)].symbol()).collect::<String>())
            .collect()
    }

    /// 30 connections, the first one quiet long enough to be alerted.
    fn busy_app() -> App {
        let mut sockets: Vec<_> =
            (2..=30).map(|c| socket(c, TcpState::Established, 100, 100)).collect();
        sockets.push(socket(1, TcpState::Established, 20_000, 20_000));
        let snapshot = snapshot(sockets);
        let mut detector = Detector::new(
            idle_after(std::time::Duration::from_secs(10)),
            KernelSettings::default(),
        );
        let findings = detector.observe(&snapshot);
        let standing = findings.iter().map(|f| (f.target, f.reason(), NOW_NS));
        let worker = ThreadInfo {
            tid: 1401,
            name: "worker-0".into(),
            blocked_in: Some("recvfrom"),
            blocked_ms: Some(20_000),
            blocked_ms_from: Some("call"),
            last_io_ms: None,
        };
        let table = model::Table::build(&snapshot, &findings, standing, |s| {
            if s.cookie() == 1 { vec![worker.clone()] } else { vec![] }
        });
        let health = Health {
            targets: "pid 42".into(),
            backend: "tracepoint",
            polls: 1,
            sockets: 31,
            ..Health::default()
        };
        let mut app = App::new(health.clone());
        app.set_table(table, health);
        app
    }

    #[test]
    fn fits_80_by_24_with_the_stuck_connection_its_thread_and_reason_on_top() {
        let mut app = busy_app();
        let lines = screen(&mut app, 80, 24);
        assert!(lines[0].starts_with("observer top  pid 42  tracepoint  poll"), "{lines:#?}");
        assert!(lines[0].trim_end().ends_with("ms"), "the whole header fits: {}", lines[0]);
        assert!(lines[1].contains("31 sockets") && lines[1].contains("alerts: idle 1"));
        let titles = &lines[3];
        for title in ["REMOTE", "STATE", "IDLE", "THREAD", "ALERT"] {
            assert!(titles.contains(title), "{title} missing: {titles}");
        }
        let first = &lines[4];
        for text in ["127.0.0.1:40001", "ESTAB", "20.0s", "worker-0:1401 recvfrom 20.0s", "idle"] {
            assert!(first.contains(text), "{text} missing from the first row: {first}");
        }
        let details = lines[12..22].join("\n");
        assert!(details.contains("thread worker-0 (tid 1401) blocked in recvfrom"), "{details}");
        assert!(details.contains("idle (for 0ms): No data sent or received"), "{details}");
        assert!(details.contains("unread_bytes 0"), "the alert's numbers: {details}");
        assert!(lines[23].trim_end().ends_with("d destroy"), "{}", lines[23]);
    }

    #[test]
    fn the_selection_stays_on_screen_when_moving_past_the_bottom() {
        let mut app = busy_app();
        screen(&mut app, 80, 24);
        let page = app.page;
        for _ in 0..page + 3 {
            app.key(crossterm::event::KeyEvent::from(crossterm::event::KeyCode::Down));
        }
        let lines = screen(&mut app, 80, 24);
        let selected = app.selected_row().unwrap().remote.to_string();
        assert!(lines[4..4 + page].iter().any(|l| l.contains(&selected)), "{lines:#?}");
        assert!(app.offset > 0);
    }

    #[test]
    fn tiny_and_wide_screens_draw_without_panicking() {
        let mut app = busy_app();
        for (w, h) in [(20, 5), (1, 1), (250, 80)] {
            screen(&mut app, w, h);
        }
    }
}
