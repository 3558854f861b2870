//! The terminal dashboard: `station run`'s screen and `station dash
//! --connect`. It owns the operator's view state (`UiState`: selection,
//! help, a pending confirmation, the last action's reply) and nothing else:
//! it reads `Snapshot`s (from `Live` or from `/api/status`), draws them with
//! the pure `render`, and turns keys into `Action`s for a `Controller`
//! (`handle_key`, pure too). It never touches hardware or the ledger.
//!
//! Keys: ↑/↓ or k/j select a lane, p pauses or resumes the selected reader,
//! d drains (asks y/n), s stops (asks y/n), PgUp/PgDn scroll the event log,
//! ? shows the help. q on `station run` asks to drain the batch; the
//! dashboard then closes when the cards in flight are done (quitting the
//! screen while the batch runs would leave the line without a view). On
//! `station dash --connect`, q detaches and the station runs on. With
//! several `--connect`s the screen is the line view (`line`): a summary tab
//! and one tab per station; Tab / Shift-Tab (or → / ←) and 0..9 switch tabs.

pub mod line;
mod remote;
mod render;
mod term;

pub use line::{LineUi, StationFeed, Tab, handle_line_key};
pub use remote::{HttpController, Poller, RemoteFeed};
pub use render::{render, render_line};
pub use term::{run_line, run_local, run_remote};

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use crate::control::{Action, Refused};
use crate::state::{Mode, Snapshot};

/// Which station the screen shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// `station run`'s own batch.
    Local,
    /// `station dash --connect ADDR`.
    Remote { addr: String, lost: Option<Lost> },
}

/// The remote station did not answer the last poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    pub error: String,
    /// Seconds since the last snapshot that arrived (none: never connected).
    pub stale_s: Option<u64>,
}

/// An action waiting for the operator's y/n.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirm {
    Drain,
    Stop,
    /// `station run`'s q: drain, then close when the batch ends.
    DrainAndQuit,
}

impl Confirm {
    pub fn question(&self) -> &'static str {
        match self {
            Self::Drain => "Drain the station: finish the cards in flight, take no new ones?",
            Self::Stop => "STOP now: interrupt the cards in flight (recorded failed, retryable)?",
            Self::DrainAndQuit => "Quit: drain the batch (finish the cards in flight) and close when done?",
        }
    }
}

/// The operator's view state, apart from the station's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UiState {
    pub link: Link,
    /// The selected lane (an index into `Snapshot::lanes`).
    pub selected: usize,
    pub help: bool,
    pub confirm: Option<Confirm>,
    /// The reply to the last action: text, and whether it was refused.
    pub message: Option<(String, bool)>,
    /// Events scrolled back from the newest.
    pub events_back: usize,
    /// The local batch is over: the final state shows until a key (or the
    /// countdown, in seconds, runs out).
    pub ended: Option<u64>,
    /// The operator asked to close the screen once the batch is over.
    pub quit_when_ended: bool,
    /// Leave the screen now.
    pub quit: bool,
    /// This screen is one tab of the line view (`line::LineUi`): the footer
    /// and the help show the tab keys too.
    pub line: bool,
}

impl UiState {
    pub fn new(link: Link) -> Self {
        Self {
            link,
            selected: 0,
            help: false,
            confirm: None,
            message: None,
            events_back: 0,
            ended: None,
            quit_when_ended: false,
            quit: false,
            line: false,
        }
    }

    fn remote(&self) -> bool {
        matches!(self.link, Link::Remote { .. })
    }

    /// Takes the controller's reply to an action.
    pub fn acted(&mut self, reply: Result<String, Refused>) {
        self.message = Some(match reply {
            Ok(text) => (text, false),
            Err(Refused(text)) => (text, true),
        });
    }

    /// Keeps the selection on a lane that exists.
    pub fn clamp(&mut self, snap: &Snapshot) {
        self.selected = self.selected.min(snap.lanes.len().saturating_sub(1));
        self.events_back = self.events_back.min(snap.events.len().saturating_sub(1));
    }
}

/// Turns one key into an action for the controller (or only a change of
/// view). Pure: the caller hands the action to the controller and its
/// reply to `UiState::acted`.
pub fn handle_key(key: KeyEvent, ui: &mut UiState, snap: &Snapshot) -> Option<Action> {
    if key.kind == KeyEventKind::Release {
        return None;
    }
    let ctrl_c = key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c');
    if ui.ended.is_some() {
        // The batch is over: any key leaves.
        ui.quit = true;
        return None;
    }
    if let Some(confirm) = ui.confirm.take() {
        return match key.code {
            KeyCode::Char('y') | KeyCode::Char('Y') if !ctrl_c => match confirm {
                Confirm::Drain => Some(Action::Drain),
                Confirm::Stop => Some(Action::Stop),
                Confirm::DrainAndQuit => {
                    ui.quit_when_ended = true;
                    Some(Action::Drain)
                }
            },
            _ => {
                ui.message = Some(("cancelled".into(), false));
                None
            }
        };
    }
    if ui.help {
        // Any key closes the help; q and Ctrl-C also do their job.
        ui.help = false;
        if !matches!(key.code, KeyCode::Char('q')) && !ctrl_c {
            return None;
        }
    }
    let lanes = snap.lanes.len();
    match key.code {
        _ if ctrl_c => quit(ui, snap),
        KeyCode::Char('q') | KeyCode::Char('Q') => quit(ui, snap),
        KeyCode::Up | KeyCode::Char('k') => {
            ui.selected = ui.selected.saturating_sub(1);
            None
        }
        KeyCode::Down | KeyCode::Char('j') => {
            ui.selected = (ui.selected + 1).min(lanes.saturating_sub(1));
            None
        }
        KeyCode::Home | KeyCode::Char('g') => {
            ui.selected = 0;
            None
        }
        KeyCode::End | KeyCode::Char('G') => {
            ui.selected = lanes.saturating_sub(1);
            None
        }
        KeyCode::PageUp => {
            ui.events_back = (ui.events_back + 5).min(snap.events.len().saturating_sub(1));
            None
        }
        KeyCode::PageDown => {
            ui.events_back = ui.events_back.saturating_sub(5);
            None
        }
        KeyCode::Char('?') | KeyCode::Char('h') | KeyCode::F(1) => {
            ui.help = true;
            None
        }
        KeyCode::Char('p') | KeyCode::Char(' ') => {
            let Some(lane) = snap.lanes.get(ui.selected) else {
                ui.message = Some(("no reader to pause".into(), true));
                return None;
            };
            let reader = lane.reader.clone();
            Some(if lane.paused { Action::ResumeReader { reader } } else { Action::PauseReader { reader } })
        }
        KeyCode::Char('P') => {
            // Every reader: pause all when any runs, else resume all.
            let all_paused = !snap.lanes.is_empty() && snap.lanes.iter().all(|l| l.paused);
            Some(if all_paused { Action::Resume } else { Action::Pause })
        }
        KeyCode::Char('d') => {
            ui.confirm = Some(Confirm::Drain);
            None
        }
        KeyCode::Char('s') => {
            ui.confirm = Some(Confirm::Stop);
            None
        }
        KeyCode::Esc => {
            ui.message = None;
            None
        }
        _ => None,
    }
}

fn quit(ui: &mut UiState, snap: &Snapshot) -> Option<Action> {
    if ui.remote() {
        ui.quit = true;
    } else if matches!(snap.mode, Mode::Draining | Mode::Stopping) {
        ui.quit_when_ended = true;
        ui.message =
            Some(("draining: the dashboard closes when the cards in flight are done (s stops them now)".into(), false));
    } else if snap.mode == Mode::Idle {
        ui.quit = true;
    } else {
        ui.confirm = Some(Confirm::DrainAndQuit);
    }
    None
}

#[cfg(test)]
mod tests;
