//! The line view of `station dash --connect A --connect B ...`: several
//! stations on one screen, one tab each plus a line summary tab. This
//! module owns the view state across tabs (`LineUi`), what one watched
//! station looks like to the screen (`StationFeed`), the figures summed over
//! the line (`LineTotals`) and the tab keys (`handle_line_key`, pure). A
//! station tab is the single-station dashboard with its own `UiState`, so
//! its keys, selection and y/n questions are those of `station dash
//! --connect` to that one station. Nothing here does I/O: `term::run_line`
//! polls the stations and posts the actions.

use std::collections::BTreeMap;
use std::sync::Arc;

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::{Link, Lost, UiState, handle_key};
use crate::control::Action;
use crate::state::{EventLine, LaneShow, Snapshot};

/// One watched station as the screen sees it: where it is, its latest
/// snapshot (a placeholder before the first answer) and whether the last
/// poll reached it.
#[derive(Debug, Clone)]
pub struct StationFeed {
    pub addr: String,
    pub snapshot: Arc<Snapshot>,
    pub lost: Option<Lost>,
}

impl StationFeed {
    /// Whether a snapshot ever arrived.
    pub fn seen(&self) -> bool {
        self.snapshot.at_ms > 0
    }

    /// The station's id once known, else its address.
    pub fn name(&self) -> &str {
        if self.seen() { &self.snapshot.station } else { &self.addr }
    }

    /// Readers by what they do: working on a card (or holding one for
    /// pairing), free (waiting for a card, showing a result, paused, idle),
    /// and in error.
    pub fn readers(&self) -> Readers {
        let mut r = Readers::default();
        for l in &self.snapshot.lanes {
            match l.state {
                LaneShow::Working | LaneShow::WaitingForPairing => r.busy += 1,
                LaneShow::ReaderError => r.error += 1,
                _ => r.idle += 1,
            }
        }
        r
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Readers {
    pub busy: usize,
    pub idle: usize,
    pub error: usize,
}

/// Which tab shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Line,
    /// A station, by its index in the `--connect` order.
    Station(usize),
}

/// The view state of the line view: the tab, the station selected in the
/// summary, the summary's help, and each station tab's own `UiState`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineUi {
    pub tab: Tab,
    pub selected: usize,
    pub help: bool,
    pub stations: Vec<UiState>,
    pub quit: bool,
}

impl LineUi {
    pub fn new(addrs: &[String]) -> Self {
        let stations = addrs
            .iter()
            .map(|a| UiState { line: true, ..UiState::new(Link::Remote { addr: a.clone(), lost: None }) })
            .collect();
        Self { tab: Tab::Line, selected: 0, help: false, stations, quit: false }
    }

    /// Takes the connection state of each station into its tab's view.
    pub fn update(&mut self, feeds: &[StationFeed]) {
        for (ui, f) in self.stations.iter_mut().zip(feeds) {
            ui.link = Link::Remote { addr: f.addr.clone(), lost: f.lost.clone() };
            ui.clamp(&f.snapshot);
        }
        self.selected = self.selected.min(feeds.len().saturating_sub(1));
    }

    fn tabs(&self) -> usize {
        self.stations.len() + 1
    }

    fn index(&self) -> usize {
        match self.tab {
            Tab::Line => 0,
            Tab::Station(i) => i + 1,
        }
    }

    fn go(&mut self, index: usize) {
        self.tab =
            if index == 0 { Tab::Line } else { Tab::Station((index - 1).min(self.stations.len().saturating_sub(1))) };
    }
}

/// The keys that switch tabs, on every tab: Tab / → next, Shift-Tab / ←
/// previous, 0 the line summary, 1..9 a station.
fn tab_key(key: &KeyEvent, ui: &mut LineUi) -> bool {
    let n = ui.tabs();
    match key.code {
        KeyCode::Tab | KeyCode::Right => ui.go((ui.index() + 1) % n),
        KeyCode::BackTab | KeyCode::Left => ui.go((ui.index() + n - 1) % n),
        KeyCode::Char('0') => ui.go(0),
        KeyCode::Char(c @ '1'..='9') if (c as usize - '0' as usize) < n => ui.go(c as usize - '0' as usize),
        _ => return false,
    }
    true
}

/// Turns one key into a tab change or, on a station tab, into that
/// station's action: `(station index, action)` for the caller to post.
/// Pure, like `handle_key`.
pub fn handle_line_key(key: KeyEvent, ui: &mut LineUi, feeds: &[StationFeed]) -> Option<(usize, Action)> {
    if key.kind == KeyEventKind::Release {
        return None;
    }
    let ctrl_c = key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c');
    match ui.tab {
        Tab::Station(i) => {
            let (Some(st), Some(feed)) = (ui.stations.get_mut(i), feeds.get(i)) else {
                ui.tab = Tab::Line;
                return None;
            };
            // A pending y/n or the open help takes the key first.
            let busy = st.confirm.is_some() || st.help;
            if !busy && !ctrl_c && tab_key(&key, ui) {
                return None;
            }
            let st = &mut ui.stations[i];
            let action = handle_key(key, st, &feed.snapshot);
            if st.quit {
                ui.quit = true;
            }
            action.map(|a| (i, a))
        }
        Tab::Line => {
            if ui.help {
                ui.help = false;
                if !matches!(key.code, KeyCode::Char('q')) && !ctrl_c {
                    return None;
                }
            }
            if ctrl_c || matches!(key.code, KeyCode::Char('q') | KeyCode::Char('Q')) {
                ui.quit = true;
                return None;
            }
            if tab_key(&key, ui) {
                return None;
            }
            let n = feeds.len();
            match key.code {
                KeyCode::Up | KeyCode::Char('k') => ui.selected = ui.selected.saturating_sub(1),
                KeyCode::Down | KeyCode::Char('j') => ui.selected = (ui.selected + 1).min(n.saturating_sub(1)),
                KeyCode::Enter if n > 0 => ui.tab = Tab::Station(ui.selected.min(n - 1)),
                KeyCode::Char('?') | KeyCode::Char('h') | KeyCode::F(1) => ui.help = true,
                _ => {}
            }
            None
        }
    }
}

/// The whole line's figures: sums over the stations' current batches.
#[derive(Debug, Clone, PartialEq)]
pub struct LineTotals {
    pub stations: usize,
    pub reachable: usize,
    pub passed: usize,
    pub failed: usize,
    /// Passed over passed + failed (0..1; none before the first card).
    pub yield_: Option<f64>,
    /// Cards that passed at their first attempt over all cards.
    pub first_pass_yield: Option<f64>,
    /// Cards per hour over the last minute, of the stations that answer.
    pub cards_per_hour: f64,
    pub readers: Readers,
    /// Failures by step and reason summed over the line, most frequent first.
    pub failures: Vec<(String, String, usize)>,
}

impl LineTotals {
    pub fn new(feeds: &[StationFeed]) -> Self {
        let mut t = LineTotals {
            stations: feeds.len(),
            reachable: 0,
            passed: 0,
            failed: 0,
            yield_: None,
            first_pass_yield: None,
            cards_per_hour: 0.0,
            readers: Readers::default(),
            failures: Vec::new(),
        };
        let mut first_pass = 0.0;
        let mut failures: BTreeMap<(String, String), usize> = BTreeMap::new();
        for f in feeds {
            let up = f.lost.is_none() && f.seen();
            if up {
                t.reachable += 1;
            }
            if let Some(b) = &f.snapshot.batch {
                t.passed += b.passed;
                t.failed += b.failed;
                first_pass += b.first_pass_yield * (b.passed + b.failed) as f64;
                // A station that does not answer adds no current rate.
                if up && !b.finished {
                    t.cards_per_hour += b.cards_per_hour_minute;
                }
            }
            let r = f.readers();
            t.readers.busy += r.busy;
            t.readers.idle += r.idle;
            t.readers.error += r.error;
            for fc in &f.snapshot.failures {
                *failures.entry((fc.step.clone(), fc.reason.clone())).or_default() += fc.count;
            }
        }
        let done = t.passed + t.failed;
        if done > 0 {
            t.yield_ = Some(t.passed as f64 / done as f64);
            t.first_pass_yield = Some((first_pass / done as f64).clamp(0.0, 1.0));
        }
        let mut failures: Vec<_> = failures.into_iter().map(|((s, r), n)| (s, r, n)).collect();
        failures.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| (&a.0, &a.1).cmp(&(&b.0, &b.1))));
        t.failures = failures;
        t
    }
}

/// The recent events of every station, oldest first, each with the name of
/// its station.
pub fn line_events(feeds: &[StationFeed]) -> Vec<(String, EventLine)> {
    let mut all: Vec<(String, EventLine)> =
        feeds.iter().flat_map(|f| f.snapshot.events.iter().map(|e| (f.name().to_string(), e.clone()))).collect();
    all.sort_by_key(|(_, e)| e.at_ms);
    all
}
