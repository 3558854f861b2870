//! The dashboard's terminal: raw mode and the alternate screen (restored on
//! exit and when the dashboard's own thread panics), the redraw loop at
//! about 4 Hz and on every key or resize, and the two ways in: `run_local`
//! (`station run`: the batch on a worker thread, the screen on this one),
//! `run_remote` (`station dash --connect`) and `run_line` (several
//! `--connect`s: one poller and one controller per station, so a station
//! that does not answer holds up none of the others).

use std::io::{self, Stdout};
use std::sync::{Arc, Mutex, Once, PoisonError};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event};
use ratatui::crossterm::terminal::{EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode};
use ratatui::crossterm::{cursor, execute};
use zeroize::Zeroizing;

use super::line::{LineUi, StationFeed, handle_line_key};
use super::remote::{HttpController, Poller};
use super::{Link, UiState, handle_key, render, render_line};
use crate::control::Controller;
use crate::live::Live;
use crate::state::Snapshot;

/// The longest wait between two frames.
const FRAME: Duration = Duration::from_millis(250);
/// How long the final state of a local batch stays without a key.
const LINGER_S: u64 = 5;

/// The thread that owns the screen while the dashboard shows.
static SCREEN_THREAD: Mutex<Option<ThreadId>> = Mutex::new(None);

fn screen_thread() -> Option<ThreadId> {
    *SCREEN_THREAD.lock().unwrap_or_else(PoisonError::into_inner)
}

fn leave_screen() {
    let _ = disable_raw_mode();
    let _ = execute!(io::stdout(), LeaveAlternateScreen, cursor::Show);
}

/// While the dashboard shows, a panic on its thread restores the terminal
/// before the message prints; a panic elsewhere (a card's worker, which
/// fails that card alone) goes to the log instead of over the screen.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| match screen_thread() {
            None => previous(info),
            Some(id) if id == std::thread::current().id() => {
                leave_screen();
                previous(info);
            }
            Some(_) => {
                let thread = std::thread::current();
                tracing::error!(thread = thread.name().unwrap_or("?"), "panic: {info}");
            }
        }));
    });
}

/// The terminal in raw mode on the alternate screen; restored when dropped.
struct Screen {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl Screen {
    fn enter() -> io::Result<Screen> {
        install_panic_hook();
        enable_raw_mode()?;
        *SCREEN_THREAD.lock().unwrap_or_else(PoisonError::into_inner) = Some(std::thread::current().id());
        let screen = Screen { terminal: Terminal::new(CrosstermBackend::new(io::stdout()))? };
        execute!(io::stdout(), EnterAlternateScreen, cursor::Hide)?;
        Ok(screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        leave_screen();
        *SCREEN_THREAD.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// Draws and reads keys until `ui.quit`. `next` gives the snapshot to show
/// and may update the view state (connection, end of batch).
fn ui_loop(
    screen: &mut Screen,
    ui: &mut UiState,
    controller: &dyn Controller,
    mut next: impl FnMut(&mut UiState) -> Arc<Snapshot>,
) -> io::Result<()> {
    loop {
        let snap = next(ui);
        ui.clamp(&snap);
        if ui.quit {
            return Ok(());
        }
        screen.terminal.draw(|f| render(f, &snap, ui))?;
        if event::poll(FRAME)? {
            match event::read()? {
                Event::Key(key) => {
                    if let Some(action) = handle_key(key, ui, &snap) {
                        let reply = controller.act(action);
                        ui.acted(reply);
                    }
                }
                // The next draw takes the new size.
                Event::Resize(..) => screen.terminal.autoresize()?,
                _ => {}
            }
        }
    }
}

/// `station run` with the dashboard: runs `work` (the batch) on a worker
/// thread and the screen on this one, and returns the batch's result. The
/// final state shows until a key or for a few seconds. When the terminal
/// cannot be taken over the batch runs without a screen.
pub fn run_local<T: Send>(live: &Arc<Live>, controller: Arc<dyn Controller>, work: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let batch = std::thread::Builder::new()
            .name("batch".into())
            .spawn_scoped(s, work)
            .expect("cannot start the batch thread");
        match Screen::enter() {
            Ok(mut screen) => {
                let mut ui = UiState::new(Link::Local);
                let mut ended_at: Option<Instant> = None;
                let shown = ui_loop(&mut screen, &mut ui, controller.as_ref(), |ui| {
                    if batch.is_finished() {
                        let at = *ended_at.get_or_insert_with(Instant::now);
                        let left = LINGER_S.saturating_sub(at.elapsed().as_secs());
                        ui.ended = Some(left);
                        ui.confirm = None;
                        if ui.quit_when_ended || left == 0 {
                            ui.quit = true;
                        }
                    }
                    live.snapshot()
                });
                drop(screen);
                if let Err(e) = shown {
                    eprintln!("station: the dashboard failed ({e}); the batch runs on without it");
                }
            }
            Err(e) => eprintln!("station: cannot show the dashboard ({e}); the batch runs without it"),
        }
        match batch.join() {
            Ok(t) => t,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// `station dash --connect ADDR`: shows a running station until q.
pub fn run_remote(addr: &str, token: Option<Zeroizing<String>>) -> io::Result<()> {
    let token = token.map(Arc::new);
    let poller = Poller::start(addr, token.clone());
    let controller = HttpController::new(addr, token);
    let mut screen = Screen::enter()?;
    let mut ui = UiState::new(Link::Remote { addr: addr.to_string(), lost: None });
    ui_loop(&mut screen, &mut ui, &controller, |ui| {
        let feed = poller.feed();
        ui.link = Link::Remote { addr: addr.to_string(), lost: feed.lost(Instant::now()) };
        feed.snapshot
    })
}

/// `station dash --connect A --connect B ...`: the line view until q.
pub fn run_line(addrs: &[String], token: Option<Zeroizing<String>>) -> io::Result<()> {
    let token = token.map(Arc::new);
    let pollers: Vec<Poller> = addrs.iter().map(|a| Poller::start(a, token.clone())).collect();
    let controllers: Vec<HttpController> = addrs.iter().map(|a| HttpController::new(a, token.clone())).collect();
    let mut screen = Screen::enter()?;
    let mut ui = LineUi::new(addrs);
    loop {
        let now = Instant::now();
        let feeds: Vec<StationFeed> = addrs
            .iter()
            .zip(&pollers)
            .map(|(addr, p)| {
                let feed = p.feed();
                StationFeed { addr: addr.clone(), lost: feed.lost(now), snapshot: feed.snapshot }
            })
            .collect();
        ui.update(&feeds);
        if ui.quit {
            return Ok(());
        }
        screen.terminal.draw(|f| render_line(f, &feeds, &ui))?;
        if event::poll(FRAME)? {
            match event::read()? {
                Event::Key(key) => {
                    if let Some((i, action)) = handle_line_key(key, &mut ui, &feeds) {
                        let reply = controllers[i].act(action);
                        ui.stations[i].acted(reply);
                    }
                }
                Event::Resize(..) => screen.terminal.autoresize()?,
                _ => {}
            }
        }
    }
}
