//! Drawing the dashboard: a pure function of a `Snapshot` and the
//! `UiState`, so every screen is a snapshot test. No clocks, no I/O.
//!
//! Layout, top to bottom: a header (station, mode, batch), banners that
//! must not be missed (configuration error, connection lost), the lanes,
//! the batch / failures / events panels, and a footer (keys, the last
//! reply, a pending y/n). Lanes are one compact row each (scrolled by
//! pages around the selection, in two columns on wide screens) or, when
//! there is room, tiles with the state word as a tall coloured band.

use ratatui::Frame;
use ratatui::layout::{Alignment, Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph};

use super::line::{LineTotals, LineUi, StationFeed, Tab, line_events};
use super::{Link, UiState};
use crate::state::{BatchView, LaneShow, LaneView, Level, Mode, Snapshot};

/// Width of the state cell of a compact lane row ("WAITING FOR PAIRING").
const STATE_W: usize = 21;
/// Rows of a lane tile (borders included): at least, and at most (a taller
/// state band, read from further away); its narrowest width.
const TILE_H: u16 = 7;
const TILE_H_MAX: u16 = 12;
const TILE_W: u16 = 34;
/// Rows the batch / failures / events panels get at least.
const BOTTOM_MIN: u16 = 10;

pub fn render(frame: &mut Frame, snap: &Snapshot, ui: &UiState) {
    render_in(frame, frame.area(), snap, ui);
}

/// One station's dashboard in `area` (the whole screen, or below the line
/// view's tab bar).
fn render_in(frame: &mut Frame, area: Rect, snap: &Snapshot, ui: &UiState) {
    let banners = banners(snap, ui);
    let [header, banner, body, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(banners.len() as u16),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(area);
    frame.render_widget(Paragraph::new(header_line(snap, ui)).style(Style::new().bg(Color::DarkGray)), header);
    frame.render_widget(Paragraph::new(banners).style(Style::new().fg(Color::White).bg(Color::Red)), banner);

    let bottom_min = BOTTOM_MIN.min(body.height / 2);
    let plan = plan_lanes(snap.lanes.len(), body.width, body.height.saturating_sub(bottom_min));
    let [lanes_area, bottom] = Layout::vertical([Constraint::Length(plan.height), Constraint::Min(0)]).areas(body);
    match plan.kind {
        Kind::Tiles { cols, tile_h } => render_tiles(frame, lanes_area, snap, ui, cols, tile_h),
        Kind::Rows { cols } => render_rows(frame, lanes_area, snap, ui, cols),
    }
    render_bottom(frame, bottom, snap, ui);
    frame.render_widget(Paragraph::new(footer_line(snap, ui)), footer);
    if ui.help {
        render_help(frame, area, ui);
    }
}

fn mode_style(mode: Mode) -> Style {
    let s = Style::new().add_modifier(Modifier::BOLD);
    match mode {
        Mode::Running => s.fg(Color::Black).bg(Color::Green),
        Mode::Draining => s.fg(Color::Black).bg(Color::Yellow),
        Mode::Stopping => s.fg(Color::White).bg(Color::Red),
        Mode::Idle => s.fg(Color::Black).bg(Color::Gray),
    }
}

/// The colours of the big state word.
pub fn state_style(show: LaneShow) -> Style {
    let s = Style::new().add_modifier(Modifier::BOLD);
    match show {
        LaneShow::Pass => s.fg(Color::Black).bg(Color::Green),
        LaneShow::Fail => s.fg(Color::White).bg(Color::Red),
        LaneShow::ReaderError => s.fg(Color::Yellow).bg(Color::Red),
        LaneShow::Working => s.fg(Color::White).bg(Color::Blue),
        LaneShow::WaitingForPairing => s.fg(Color::Black).bg(Color::Magenta),
        LaneShow::InsertCard => s.fg(Color::Black).bg(Color::Cyan),
        LaneShow::RemoveCard => s.fg(Color::Black).bg(Color::Yellow),
        LaneShow::Paused => s.fg(Color::Black).bg(Color::Gray),
        LaneShow::Idle => s.fg(Color::Gray).bg(Color::Black),
    }
}

fn header_line<'a>(snap: &'a Snapshot, ui: &UiState) -> Line<'a> {
    let plain = Style::new().fg(Color::White).bg(Color::DarkGray);
    let mut spans = vec![
        Span::styled(" TAPLINE ", Style::new().fg(Color::Black).bg(Color::White).add_modifier(Modifier::BOLD)),
        Span::styled(format!(" station {} ", snap.station), plain.add_modifier(Modifier::BOLD)),
        Span::styled(format!(" {} ", snap.mode.label().to_uppercase()), mode_style(snap.mode)),
    ];
    if let Link::Remote { addr, .. } = &ui.link {
        spans.push(Span::styled(format!(" remote {addr} "), plain.fg(Color::Cyan)));
    }
    if let Some(b) = &snap.batch {
        let state = if b.finished { ", finished" } else { "" };
        spans.push(Span::styled(format!(" batch {} ({}{state}) ", b.name, b.profile), plain));
    }
    if let Some(l) = snap.ledger.filter(|l| !l.online || l.outbox_ops > 0) {
        let (text, bg) = if l.online {
            (format!(" ledger draining {} ", l.outbox_ops), Color::Yellow)
        } else {
            (format!(" LEDGER OFFLINE: {} ops in outbox ", l.outbox_ops), Color::Red)
        };
        spans.push(Span::styled(text, Style::new().fg(Color::Black).bg(bg).add_modifier(Modifier::BOLD)));
    }
    spans.push(Span::styled(" ? help", plain.fg(Color::Gray)));
    Line::from(spans)
}

fn banners(snap: &Snapshot, ui: &UiState) -> Vec<Line<'static>> {
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let mut lines = Vec::new();
    if let Link::Remote { addr, lost: Some(lost) } = &ui.link {
        let since = match lost.stale_s {
            Some(s) => format!("; showing the state of {s} s ago"),
            None => "; no state yet".to_string(),
        };
        lines.push(Line::from(vec![
            Span::styled(" CONNECTION LOST ", bold),
            Span::raw(format!("to {addr}: {}{since}; retrying", lost.error)),
        ]));
    }
    if let Some(e) = &snap.config_error {
        for (i, l) in e.lines().take(3).enumerate() {
            let head = if i == 0 { " CONFIG ERROR " } else { "              " };
            lines.push(Line::from(vec![Span::styled(head, bold), Span::raw(l.to_string())]));
        }
    }
    lines
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tiles { cols: u16, tile_h: u16 },
    Rows { cols: u16 },
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    kind: Kind,
    height: u16,
}

/// Tiles when every lane fits as one; else compact rows, in two columns on
/// wide screens when one column would scroll.
fn plan_lanes(n: usize, width: u16, avail: u16) -> Plan {
    let n16 = n.max(1) as u16;
    if width >= 100 && n > 0 {
        let cols = (width / TILE_W).clamp(1, n16);
        let rows = n16.div_ceil(cols);
        if rows * TILE_H <= avail {
            let tile_h = (avail / rows).clamp(TILE_H, TILE_H_MAX);
            return Plan { kind: Kind::Tiles { cols, tile_h }, height: rows * tile_h };
        }
    }
    // Borders and the column header take 3 rows.
    let one = n16 + 3;
    if one > avail && width >= 160 {
        return Plan { kind: Kind::Rows { cols: 2 }, height: (n16.div_ceil(2) + 3).min(avail) };
    }
    Plan { kind: Kind::Rows { cols: 1 }, height: one.min(avail) }
}

fn fit(s: &str, w: usize) -> String {
    let mut out: String = s.chars().take(w).collect();
    if s.chars().count() > w && w > 0 {
        out.pop();
        out.push('…');
    }
    let len = out.chars().count();
    out.extend(std::iter::repeat_n(' ', w.saturating_sub(len)));
    out
}

fn center(s: &str, w: usize) -> String {
    let s: String = s.chars().take(w).collect();
    let len = s.chars().count();
    let left = (w - len) / 2;
    format!("{}{s}{}", " ".repeat(left), " ".repeat(w - len - left))
}

/// A card id cut to `w` from the left: ids of one vendor share their
/// first bytes, the last ones tell cards apart.
fn card_tail(id: &str, w: usize) -> String {
    let n = id.chars().count();
    if n <= w || w == 0 { id.to_string() } else { format!("…{}", id.chars().skip(n - (w - 1)).collect::<String>()) }
}

fn bar(sent: usize, total: usize, w: usize) -> String {
    let filled = if total == 0 { 0 } else { (sent.min(total) * w).div_ceil(total).min(w) };
    format!("{}{}", "█".repeat(filled), "░".repeat(w - filled))
}

fn secs(s: f64) -> String {
    let s = s.max(0.0);
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s as u64) % 60)
    } else {
        format!("{}h{:02}m", (s / 3600.0) as u64, ((s as u64) / 60) % 60)
    }
}

/// What the lane is doing, in words, when it is not the big state.
fn lane_detail(l: &LaneView) -> Option<(String, Style)> {
    if let Some(e) = &l.error {
        return Some((format!("error: {e}"), Style::new().fg(Color::Red)));
    }
    if l.paused && l.state != LaneShow::Paused {
        return Some(("pausing after this card".into(), Style::new().fg(Color::Yellow)));
    }
    None
}

fn render_rows(frame: &mut Frame, area: Rect, snap: &Snapshot, ui: &UiState, cols: u16) {
    let n = snap.lanes.len();
    let inner_h = area.height.saturating_sub(3) as usize;
    let per_page = inner_h.max(1) * cols as usize;
    let offset = (ui.selected / per_page) * per_page;
    let shown_end = (offset + per_page).min(n);
    let title = if n > per_page {
        format!(" Lanes {}-{} of {n} (↑↓) ", offset + 1, shown_end)
    } else {
        format!(" Lanes ({n}) ")
    };
    let block = Block::bordered().title(title).border_style(Style::new().fg(Color::DarkGray));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    if n == 0 {
        let text = match &ui.link {
            Link::Remote { .. } if snap.at_ms == 0 => "connecting…",
            _ => "no readers",
        };
        frame.render_widget(Paragraph::new(text).alignment(Alignment::Center), inner);
        return;
    }
    let columns = Layout::horizontal(vec![Constraint::Ratio(1, cols as u32); cols as usize]).split(inner);
    let rows_per_col = inner_h.max(1);
    for (c, col) in columns.iter().enumerate() {
        let start = offset + c * rows_per_col;
        let end = (start + rows_per_col).min(n);
        let mut lines = vec![row_header(col.width as usize)];
        for i in start..end.max(start) {
            lines.push(lane_row(&snap.lanes[i], i == ui.selected, col.width as usize));
        }
        frame.render_widget(Paragraph::new(lines), *col);
    }
}

/// Column widths of a compact lane row of `w` cells: reader, card, step,
/// progress bar (0: none), time, and whether the last result shows.
struct RowCols {
    reader: usize,
    card: usize,
    step: usize,
    bar: usize,
    time: usize,
    last: bool,
}

fn row_cols(w: usize) -> RowCols {
    if w >= 120 {
        RowCols { reader: 12, card: 20, step: 12, bar: 20, time: 7, last: true }
    } else if w >= 90 {
        RowCols { reader: 10, card: 8, step: 12, bar: 12, time: 7, last: true }
    } else {
        RowCols { reader: 8, card: 8, step: 12, bar: 7, time: 6, last: false }
    }
}

fn row_header(w: usize) -> Line<'static> {
    let c = row_cols(w);
    let mut s = format!(
        "  {} {} {} {} {} {}",
        fit("READER", c.reader),
        fit("STATE", STATE_W),
        fit("CARD", c.card),
        fit("STEP", c.step),
        fit("PROGRESS", c.bar + 8),
        fit("TIME", c.time)
    );
    if c.last {
        s.push_str(" LAST");
    }
    Line::styled(s, Style::new().fg(Color::DarkGray).add_modifier(Modifier::BOLD))
}

fn lane_row(l: &LaneView, selected: bool, w: usize) -> Line<'static> {
    let c = row_cols(w);
    let sel = if selected { Style::new().add_modifier(Modifier::REVERSED) } else { Style::new() };
    let mut spans = vec![
        Span::styled(if selected { "▶" } else { " " }, Style::new().fg(Color::Yellow)),
        Span::raw(" "),
        Span::styled(fit(&l.reader, c.reader), sel.add_modifier(Modifier::BOLD)),
        Span::raw(" "),
        Span::styled(center(l.state.label(), STATE_W), state_style(l.state)),
        Span::raw(" "),
        Span::raw(fit(&card_tail(l.card.as_deref().unwrap_or(""), c.card), c.card)),
        Span::raw(" "),
    ];
    match lane_detail(l) {
        Some((text, style)) => spans.push(Span::styled(fit(&text, c.step + c.bar + 9), style)),
        None => {
            spans.push(Span::styled(fit(l.step.as_deref().unwrap_or(""), c.step), Style::new().fg(Color::Cyan)));
            spans.push(Span::raw(" "));
            match l.progress {
                Some((sent, total)) => {
                    spans.push(Span::styled(bar(sent, total, c.bar), Style::new().fg(Color::Blue)));
                    spans.push(Span::raw(format!(" {:>7}", format!("{sent}/{total}"))));
                }
                None => spans.push(Span::raw(" ".repeat(c.bar + 8))),
            }
        }
    }
    spans.push(Span::raw(format!(" {:>width$}", l.elapsed_s.map(secs).unwrap_or_default(), width = c.time)));
    if c.last
        && let Some(last) = &l.last
    {
        spans.push(Span::raw(" "));
        spans.push(Span::styled(last.clone(), last_style(last)));
    }
    Line::from(spans)
}

fn last_style(last: &str) -> Style {
    if last.starts_with("FAIL") { Style::new().fg(Color::Red) } else { Style::new().fg(Color::Green) }
}

fn render_tiles(frame: &mut Frame, area: Rect, snap: &Snapshot, ui: &UiState, cols: u16, tile_h: u16) {
    let rows = (snap.lanes.len() as u16).div_ceil(cols);
    let row_areas = Layout::vertical(vec![Constraint::Length(tile_h); rows as usize]).split(area);
    for (r, row) in row_areas.iter().enumerate() {
        let cells = Layout::horizontal(vec![Constraint::Ratio(1, cols as u32); cols as usize]).split(*row);
        for (c, cell) in cells.iter().enumerate() {
            let i = r * cols as usize + c;
            if let Some(l) = snap.lanes.get(i) {
                render_tile(frame, *cell, l, i == ui.selected);
            }
        }
    }
}

fn render_tile(frame: &mut Frame, area: Rect, l: &LaneView, selected: bool) {
    let border = if selected {
        Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD)
    } else {
        Style::new().fg(Color::DarkGray)
    };
    let mut title = vec![Span::styled(format!(" {} ", l.reader), Style::new().add_modifier(Modifier::BOLD))];
    if selected {
        title.insert(0, Span::styled("▶", Style::new().fg(Color::Yellow)));
    }
    let block = Block::bordered()
        .title(Line::from(title))
        .title_bottom(Line::from(l.elapsed_s.map(|s| format!(" {} ", secs(s))).unwrap_or_default()).right_aligned())
        .border_style(border);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let w = inner.width as usize;
    let [band, card, step, last] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(1), Constraint::Length(1), Constraint::Length(1)])
            .areas(inner);
    let style = state_style(l.state);
    let word: String = l.state.label().chars().flat_map(|c| [c, ' ']).collect();
    let word = if word.trim_end().chars().count() <= w { word.trim_end().to_string() } else { l.state.label().into() };
    let mut band_lines = vec![Line::raw(""); (band.height / 2) as usize];
    band_lines.push(Line::raw(center(&word, w)));
    frame.render_widget(Paragraph::new(band_lines).style(style), band);
    frame.render_widget(
        Paragraph::new(Line::from(vec![Span::styled("card ", Style::new().fg(Color::DarkGray)), {
            Span::raw(l.card.clone().unwrap_or_else(|| "-".into()))
        }])),
        card,
    );
    let step_line = match lane_detail(l) {
        Some((text, style)) => Line::styled(text, style),
        None => {
            let name = l.step.clone().unwrap_or_default();
            let mut spans = vec![Span::styled(fit(&name, 13), Style::new().fg(Color::Cyan))];
            if let Some((sent, total)) = l.progress {
                let label = format!(" {sent}/{total}");
                let bw = w.saturating_sub(13 + label.len());
                spans.push(Span::styled(bar(sent, total, bw), Style::new().fg(Color::Blue)));
                spans.push(Span::raw(label));
            }
            Line::from(spans)
        }
    };
    frame.render_widget(Paragraph::new(step_line), step);
    if let Some(t) = &l.last {
        frame.render_widget(Paragraph::new(Line::styled(fit(t, w), last_style(t))), last);
    }
}

fn render_bottom(frame: &mut Frame, area: Rect, snap: &Snapshot, ui: &UiState) {
    if area.height < 3 {
        return;
    }
    if area.width >= 150 {
        let [b, f, e] =
            Layout::horizontal([Constraint::Length(44), Constraint::Percentage(40), Constraint::Min(0)]).areas(area);
        render_batch(frame, b, snap.batch.as_ref());
        render_failures(frame, f, snap);
        render_events(frame, e, snap, ui);
    } else {
        let [b, right] = Layout::horizontal([Constraint::Length(36), Constraint::Min(0)]).areas(area);
        render_batch(frame, b, snap.batch.as_ref());
        let fail_h = (snap.failures.len().clamp(1, 4) as u16 + 2).min(right.height / 2);
        let [f, e] = Layout::vertical([Constraint::Length(fail_h), Constraint::Min(0)]).areas(right);
        render_failures(frame, f, snap);
        render_events(frame, e, snap, ui);
    }
}

fn panel(title: &str) -> Block<'_> {
    Block::bordered().title(format!(" {title} ")).border_style(Style::new().fg(Color::DarkGray))
}

fn render_batch(frame: &mut Frame, area: Rect, batch: Option<&BatchView>) {
    let block = panel("Batch");
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let Some(b) = batch else {
        frame.render_widget(Paragraph::new("no batch yet"), inner);
        return;
    };
    let key = Style::new().fg(Color::DarkGray);
    let kv = |k: &str, v: Vec<Span<'static>>| {
        let mut spans = vec![Span::styled(format!("{k:<10}"), key)];
        spans.extend(v);
        Line::from(spans)
    };
    let done = b.passed + b.failed;
    let mut lines = vec![
        kv(
            "cards",
            vec![
                Span::styled(
                    format!("{} passed", b.passed),
                    Style::new().fg(Color::Green).add_modifier(Modifier::BOLD),
                ),
                Span::raw("  "),
                Span::styled(
                    format!("{} failed", b.failed),
                    if b.failed > 0 { Style::new().fg(Color::Red).add_modifier(Modifier::BOLD) } else { Style::new() },
                ),
            ],
        ),
        kv("1st pass", vec![Span::raw(format!("{:.1}% yield", b.first_pass_yield * 100.0))]),
        kv(
            "cards/h",
            vec![Span::raw(format!("{:.0} last min, {:.0} all", b.cards_per_hour_minute, b.cards_per_hour_batch))],
        ),
        kv(
            "bundles",
            vec![Span::raw(format!(
                "{} sealed{}",
                b.bundles_sealed,
                if b.bundles_aborted > 0 { format!(", {} aborted", b.bundles_aborted) } else { String::new() }
            ))],
        ),
        kv("pending", vec![Span::raw(format!("{} cards waiting to pair", b.cards_waiting_for_pairing))]),
        kv(
            "time",
            vec![Span::raw(format!(
                "{}, {}",
                secs(b.elapsed_s),
                match b.eta_s {
                    Some(eta) => format!("{} to go", secs(eta)),
                    None if b.finished => "finished".to_string(),
                    None => "ETA -".to_string(),
                }
            ))],
        ),
    ];
    match b.target.filter(|t| *t > 0) {
        Some(t) => {
            let label = format!(" {done}/{t} {:>3}%", done * 100 / t);
            let w = (inner.width as usize).saturating_sub(label.len());
            lines
                .push(Line::from(vec![Span::styled(bar(done, t, w), Style::new().fg(Color::Green)), Span::raw(label)]));
        }
        None => lines.push(kv("done", vec![Span::raw(format!("{done} (until drained)"))])),
    }
    frame.render_widget(Paragraph::new(lines), inner);
}

fn render_failures(frame: &mut Frame, area: Rect, snap: &Snapshot) {
    let block = panel("Failures by step");
    let inner = block.inner(area);
    frame.render_widget(block, area);
    if snap.failures.is_empty() {
        frame.render_widget(Paragraph::new(Line::styled("none", Style::new().fg(Color::DarkGray))), inner);
        return;
    }
    let lines: Vec<Line> = snap
        .failures
        .iter()
        .take(inner.height as usize)
        .map(|f| {
            Line::from(vec![
                Span::styled(format!("{:>4} ", f.count), Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)),
                Span::styled(format!("{:<12} ", f.step), Style::new().fg(Color::Cyan)),
                Span::raw(f.reason.clone()),
            ])
        })
        .collect();
    frame.render_widget(Paragraph::new(lines), inner);
}

/// Clock time (UTC) of a snapshot's millisecond timestamp.
fn clock(at_ms: u64) -> String {
    let s = (at_ms / 1000) % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

fn render_events(frame: &mut Frame, area: Rect, snap: &Snapshot, ui: &UiState) {
    let title =
        if ui.events_back > 0 { format!("Events (UTC, {} back, PgDn)", ui.events_back) } else { "Events (UTC)".into() };
    let block = panel(&title);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let h = inner.height as usize;
    let end = snap.events.len().saturating_sub(ui.events_back);
    let start = end.saturating_sub(h);
    let lines: Vec<Line> = snap.events[start..end]
        .iter()
        .map(|e| {
            let style = match e.level {
                Level::Info => Style::new(),
                Level::Warn => Style::new().fg(Color::Yellow),
                Level::Error => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
            };
            let mut spans = vec![Span::styled(format!("{} ", clock(e.at_ms)), Style::new().fg(Color::DarkGray))];
            if let Some(r) = &e.reader {
                spans.push(Span::styled(format!("{r} "), Style::new().add_modifier(Modifier::BOLD)));
            }
            spans.push(Span::styled(e.text.clone(), style));
            Line::from(spans)
        })
        .collect();
    frame.render_widget(Paragraph::new(lines), inner);
}

fn footer_line(snap: &Snapshot, ui: &UiState) -> Line<'static> {
    if let Some(c) = &ui.confirm {
        return Line::from(vec![
            Span::styled(
                format!(" {} ", c.question()),
                Style::new().fg(Color::Black).bg(Color::Yellow).add_modifier(Modifier::BOLD),
            ),
            Span::styled(" y", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(" yes  "),
            Span::styled("n", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(" no"),
        ]);
    }
    if let Some(left) = ui.ended {
        let text = format!(" Batch over: press any key for the summary (closing in {left} s) ");
        return Line::styled(text, Style::new().fg(Color::Black).bg(Color::Green).add_modifier(Modifier::BOLD));
    }
    let mut spans = Vec::new();
    if let Some((text, refused)) = &ui.message {
        let style = if *refused { Style::new().fg(Color::White).bg(Color::Red) } else { Style::new().fg(Color::Green) };
        spans.push(Span::styled(format!(" {text} "), style.add_modifier(Modifier::BOLD)));
        spans.push(Span::raw(" "));
    }
    let key = Style::new().fg(Color::Black).bg(Color::Gray);
    let pause = match snap.lanes.get(ui.selected) {
        Some(l) if l.paused => "resume",
        _ => "pause",
    };
    let quit = if matches!(ui.link, Link::Remote { .. }) { "detach" } else { "quit" };
    let mut keys = vec![("↑↓", "lane"), ("p", pause), ("d", "drain"), ("s", "stop"), ("?", "help"), ("q", quit)];
    if ui.line {
        keys.insert(0, ("Tab", "tabs"));
    }
    for (k, what) in keys {
        spans.push(Span::styled(format!(" {k} "), key));
        spans.push(Span::raw(format!(" {what} ")));
    }
    Line::from(spans)
}

fn render_help(frame: &mut Frame, area: Rect, ui: &UiState) {
    let quit = match ui.link {
        Link::Local => "drain the batch, then close (asks y/n)",
        Link::Remote { .. } => "detach (the station runs on)",
    };
    let mut rows: Vec<(&str, &str)> = vec![
        ("↑ ↓  k j", "select a lane (Home/End: first, last)"),
        ("p", "pause / resume the selected reader"),
        ("P", "pause / resume every reader"),
        ("d", "drain: finish cards in flight, take no new"),
        ("s", "stop: interrupt cards in flight"),
        ("y / n", "confirm / cancel"),
        ("PgUp PgDn", "scroll the event log"),
        ("Esc", "clear the message"),
        ("?", "this help (any key closes it)"),
        ("q", quit),
    ];
    if ui.line {
        rows.splice(0..0, LINE_TAB_KEYS);
    }
    let mut lines = vec![Line::raw("")];
    for (k, what) in rows {
        lines.push(Line::from(vec![
            Span::styled(format!("  {k:<10}"), Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD)),
            Span::raw(what),
        ]));
    }
    lines.push(Line::raw(""));
    lines.push(Line::styled("  States: INSERT CARD, WORKING, WAITING FOR PAIRING,", Style::new().fg(Color::DarkGray)));
    lines.push(Line::styled("  PASS, FAIL, REMOVE CARD, PAUSED, READER ERROR", Style::new().fg(Color::DarkGray)));
    popup(frame, area, lines);
}

/// A bordered box of `lines` in the middle of `area`, over what is there.
fn popup(frame: &mut Frame, area: Rect, lines: Vec<Line<'_>>) {
    let w = 60.min(area.width);
    let h = (lines.len() as u16 + 2).min(area.height);
    let popup = Rect { x: area.x + (area.width - w) / 2, y: area.y + (area.height - h) / 2, width: w, height: h };
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(lines)
            .block(Block::bordered().title(" Keys ").border_style(Style::new().fg(Color::Yellow)).style(Style::new())),
        popup,
    );
}

// ---- the line view: several stations ----------------------------------------

/// The tab keys, in the help of every tab of the line view.
const LINE_TAB_KEYS: [(&str, &str); 2] =
    [("Tab ⇧Tab", "next / previous tab (also → ←)"), ("0  1-9", "the line summary / station 1 to 9")];

/// The line view (`station dash` with several `--connect`s): a tab bar, then
/// the line summary or one station's dashboard.
pub fn render_line(frame: &mut Frame, feeds: &[StationFeed], ui: &LineUi) {
    let area = frame.area();
    let [tabs, body] = Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(area);
    frame.render_widget(Paragraph::new(tab_bar(feeds, ui)).style(Style::new().bg(Color::DarkGray)), tabs);
    match ui.tab {
        Tab::Station(i) if i < feeds.len() && i < ui.stations.len() => {
            render_in(frame, body, &feeds[i].snapshot, &ui.stations[i])
        }
        _ => render_summary(frame, body, feeds, ui),
    }
}

fn tab_bar(feeds: &[StationFeed], ui: &LineUi) -> Line<'static> {
    let plain = Style::new().fg(Color::White).bg(Color::DarkGray);
    let current = Style::new().fg(Color::Black).bg(Color::White).add_modifier(Modifier::BOLD);
    let mut spans =
        vec![Span::styled(" TAPLINE ", Style::new().fg(Color::Black).bg(Color::Cyan).add_modifier(Modifier::BOLD))];
    spans.push(Span::styled(" 0 LINE ", if ui.tab == Tab::Line { current } else { plain }));
    for (i, f) in feeds.iter().enumerate() {
        let lost = f.lost.is_some();
        let label = format!(" {} {}{} ", i + 1, f.name(), if lost { " ✗" } else { "" });
        let style = match (ui.tab == Tab::Station(i), lost) {
            (true, _) => current,
            (false, true) => Style::new().fg(Color::White).bg(Color::Red).add_modifier(Modifier::BOLD),
            (false, false) => plain,
        };
        spans.push(Span::raw(" "));
        spans.push(Span::styled(label, style));
    }
    Line::from(spans)
}

/// How a station's connection reads in the summary.
fn link_text(f: &StationFeed) -> (String, Style) {
    match &f.lost {
        None if f.seen() => ("ok".into(), Style::new().fg(Color::Green)),
        None => ("connecting".into(), Style::new().fg(Color::Yellow)),
        Some(l) if l.error == "connecting" => ("connecting".into(), Style::new().fg(Color::Yellow)),
        Some(l) => {
            let text = match l.stale_s {
                Some(s) => format!("LOST {}", secs(s as f64)),
                None => "UNREACHABLE".into(),
            };
            (text, Style::new().fg(Color::White).bg(Color::Red).add_modifier(Modifier::BOLD))
        }
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{:.1}%", v * 100.0))
}

/// Column widths of the summary table that change with the screen: the
/// station, the link state, first-pass yield and batch name (0: not shown).
struct SummaryCols {
    station: usize,
    link: usize,
    first: usize,
    batch: usize,
}

fn summary_cols(w: usize) -> SummaryCols {
    if w >= 120 {
        SummaryCols { station: 16, link: 12, first: 6, batch: 20 }
    } else if w >= 96 {
        SummaryCols { station: 14, link: 11, first: 6, batch: 0 }
    } else {
        SummaryCols { station: 12, link: 11, first: 0, batch: 0 }
    }
}

type Cell = (String, Style);

/// One row of the summary table, cell by cell.
struct SummaryRow {
    station: Cell,
    link: Cell,
    mode: Cell,
    passed: Cell,
    failed: Cell,
    yield_: Cell,
    first: Cell,
    cards_per_hour: Cell,
    readers: Cell,
    batch: Cell,
}

fn summary_line(c: &SummaryCols, mark: &str, r: SummaryRow) -> Line<'static> {
    let left = |(t, s): Cell, w: usize| Span::styled(fit(&t, w), s);
    let right = |(t, s): Cell, w: usize| Span::styled(format!("{:>w$}", t.chars().take(w).collect::<String>()), s);
    let gap = || Span::raw(" ");
    let mut spans = vec![
        Span::styled(format!("{mark:<2}"), Style::new().fg(Color::Yellow)),
        left(r.station, c.station),
        gap(),
        left(r.link, c.link),
        gap(),
        left(r.mode, 8),
        gap(),
        right(r.passed, 6),
        gap(),
        right(r.failed, 6),
        gap(),
        right(r.yield_, 6),
        gap(),
    ];
    if c.first > 0 {
        spans.extend([right(r.first, c.first), gap()]);
    }
    spans.extend([right(r.cards_per_hour, 7), gap(), left(r.readers, 9)]);
    if c.batch > 0 {
        spans.extend([gap(), left(r.batch, c.batch)]);
    }
    Line::from(spans)
}

fn readers_text(busy: usize, idle: usize, error: usize) -> String {
    if error > 0 { format!("{busy}/{idle} !{error}") } else { format!("{busy}/{idle}") }
}

fn render_summary(frame: &mut Frame, area: Rect, feeds: &[StationFeed], ui: &LineUi) {
    let totals = LineTotals::new(feeds);
    let n = feeds.len() as u16;
    let [table, bottom, footer] =
        Layout::vertical([Constraint::Length(n + 5), Constraint::Min(0), Constraint::Length(1)]).areas(area);
    let block = Block::bordered()
        .title(Line::from(vec![
            Span::styled(" Line ", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(format!("{} stations, {} answering ", totals.stations, totals.reachable)),
        ]))
        .border_style(Style::new().fg(Color::DarkGray));
    let inner = block.inner(table);
    frame.render_widget(block, table);
    let c = summary_cols(inner.width as usize);
    let head = Style::new().fg(Color::DarkGray).add_modifier(Modifier::BOLD);
    let h = |t: &str| (t.to_string(), head);
    let mut lines = vec![summary_line(
        &c,
        "",
        SummaryRow {
            station: h("STATION"),
            link: h("LINK"),
            mode: h("MODE"),
            passed: h("PASS"),
            failed: h("FAIL"),
            yield_: h("YIELD"),
            first: h("1ST"),
            cards_per_hour: h("CARDS/H"),
            readers: h("BUSY/IDLE"),
            batch: h("BATCH"),
        },
    )];
    for (i, f) in feeds.iter().enumerate() {
        let selected = i == ui.selected;
        let bold = Style::new().add_modifier(Modifier::BOLD);
        let name_style = if selected { bold.add_modifier(Modifier::REVERSED) } else { bold };
        let s = &f.snapshot;
        let up = f.lost.is_none();
        // A station that does not answer keeps its last figures, dimmed.
        let fig = if up { Style::new() } else { Style::new().fg(Color::DarkGray) };
        let mode = match (f.seen(), up) {
            (true, true) => (s.mode.label().to_uppercase(), mode_style(s.mode)),
            (true, false) => (s.mode.label().to_uppercase(), fig),
            (false, _) => ("-".into(), fig),
        };
        let r = f.readers();
        let readers =
            (readers_text(r.busy, r.idle, r.error), if r.error > 0 { Style::new().fg(Color::Red) } else { fig });
        let row = match &s.batch {
            Some(b) => {
                let done = b.passed + b.failed;
                let cph = if up && !b.finished { format!("{:.0}", b.cards_per_hour_minute) } else { "-".to_string() };
                SummaryRow {
                    station: (format!("{} {}", i + 1, f.name()), name_style),
                    link: link_text(f),
                    mode,
                    passed: (b.passed.to_string(), if up { Style::new().fg(Color::Green) } else { fig }),
                    failed: (b.failed.to_string(), if up && b.failed > 0 { Style::new().fg(Color::Red) } else { fig }),
                    yield_: (pct((done > 0).then(|| b.passed as f64 / done as f64)), fig),
                    first: (pct((done > 0).then_some(b.first_pass_yield)), fig),
                    cards_per_hour: (cph, fig),
                    readers,
                    batch: (if b.finished { format!("{} (done)", b.name) } else { b.name.clone() }, fig),
                }
            }
            None => SummaryRow {
                station: (format!("{} {}", i + 1, f.name()), name_style),
                link: link_text(f),
                mode,
                passed: ("-".into(), fig),
                failed: ("-".into(), fig),
                yield_: ("-".into(), fig),
                first: ("-".into(), fig),
                cards_per_hour: ("-".into(), fig),
                readers,
                batch: ("no batch".into(), fig),
            },
        };
        lines.push(summary_line(&c, if selected { "▶" } else { "" }, row));
    }
    lines.push(Line::styled("─".repeat(inner.width as usize), Style::new().fg(Color::DarkGray)));
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let t = &totals;
    let all_up = t.reachable == t.stations;
    lines.push(summary_line(
        &c,
        "",
        SummaryRow {
            station: ("LINE".into(), bold),
            link: (format!("{}/{} up", t.reachable, t.stations), if all_up { bold } else { bold.fg(Color::Red) }),
            mode: (String::new(), bold),
            passed: (t.passed.to_string(), bold.fg(Color::Green)),
            failed: (t.failed.to_string(), if t.failed > 0 { bold.fg(Color::Red) } else { bold }),
            yield_: (pct(t.yield_), bold),
            first: (pct(t.first_pass_yield), bold),
            cards_per_hour: (format!("{:.0}", t.cards_per_hour), bold),
            readers: (readers_text(t.readers.busy, t.readers.idle, t.readers.error), bold),
            batch: (String::new(), bold),
        },
    ));
    frame.render_widget(Paragraph::new(lines), inner);

    if bottom.height >= 3 {
        let (f_area, e_area) = if bottom.width >= 120 {
            let [f, e] = Layout::horizontal([Constraint::Percentage(45), Constraint::Min(0)]).areas(bottom);
            (f, e)
        } else {
            let fail_h = (totals.failures.len().clamp(1, 4) as u16 + 2).min(bottom.height / 2);
            let [f, e] = Layout::vertical([Constraint::Length(fail_h), Constraint::Min(0)]).areas(bottom);
            (f, e)
        };
        render_line_failures(frame, f_area, &totals);
        render_line_events(frame, e_area, feeds);
    }
    frame.render_widget(Paragraph::new(line_footer()), footer);
    if ui.help {
        render_line_help(frame, area);
    }
}

fn render_line_failures(frame: &mut Frame, area: Rect, totals: &LineTotals) {
    let block = panel("Failures across the line");
    let inner = block.inner(area);
    frame.render_widget(block, area);
    if totals.failures.is_empty() {
        frame.render_widget(Paragraph::new(Line::styled("none", Style::new().fg(Color::DarkGray))), inner);
        return;
    }
    let lines: Vec<Line> = totals
        .failures
        .iter()
        .take(inner.height as usize)
        .map(|(step, reason, count)| {
            Line::from(vec![
                Span::styled(format!("{count:>4} "), Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)),
                Span::styled(format!("{step:<12} "), Style::new().fg(Color::Cyan)),
                Span::raw(reason.clone()),
            ])
        })
        .collect();
    frame.render_widget(Paragraph::new(lines), inner);
}

fn render_line_events(frame: &mut Frame, area: Rect, feeds: &[StationFeed]) {
    let block = panel("Events of every station (UTC)");
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let events = line_events(feeds);
    let start = events.len().saturating_sub(inner.height as usize);
    let lines: Vec<Line> = events[start..]
        .iter()
        .map(|(station, e)| {
            let style = match e.level {
                Level::Info => Style::new(),
                Level::Warn => Style::new().fg(Color::Yellow),
                Level::Error => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
            };
            let mut spans = vec![
                Span::styled(format!("{} ", clock(e.at_ms)), Style::new().fg(Color::DarkGray)),
                Span::styled(format!("{station} "), Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD)),
            ];
            if let Some(r) = &e.reader {
                spans.push(Span::styled(format!("{r} "), Style::new().add_modifier(Modifier::BOLD)));
            }
            spans.push(Span::styled(e.text.clone(), style));
            Line::from(spans)
        })
        .collect();
    frame.render_widget(Paragraph::new(lines), inner);
}

fn line_footer() -> Line<'static> {
    let key = Style::new().fg(Color::Black).bg(Color::Gray);
    let mut spans = Vec::new();
    for (k, what) in
        [("Tab", "tabs"), ("1-9", "station"), ("↑↓", "select"), ("Enter", "open"), ("?", "help"), ("q", "detach")]
    {
        spans.push(Span::styled(format!(" {k} "), key));
        spans.push(Span::raw(format!(" {what} ")));
    }
    Line::from(spans)
}

fn render_line_help(frame: &mut Frame, area: Rect) {
    let mut rows: Vec<(&str, &str)> = LINE_TAB_KEYS.to_vec();
    rows.extend([
        ("↑ ↓  k j", "select a station"),
        ("Enter", "open the selected station's tab"),
        ("?", "this help (any key closes it)"),
        ("q", "detach (the stations run on)"),
    ]);
    let mut lines = vec![Line::raw("")];
    for (k, what) in rows {
        lines.push(Line::from(vec![
            Span::styled(format!("  {k:<10}"), Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD)),
            Span::raw(what),
        ]));
    }
    lines.push(Line::raw(""));
    let note = Style::new().fg(Color::DarkGray);
    lines.push(Line::styled("  A station's tab has its own keys (p, P, d, s, ?).", note));
    lines.push(Line::styled("  YIELD: passed of done; 1ST: passed at the first try;", note));
    lines.push(Line::styled("  CARDS/H: last minute; BUSY/IDLE: readers (! error).", note));
    popup(frame, area, lines);
}
