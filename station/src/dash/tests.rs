//! Render snapshots (insta, into `TestBackend`) and key handling.

use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::*;
use crate::state::{BatchView, EventLine, FailureCount, LaneShow, LaneView, Level};

/// 2024-05-01 08:30:00 UTC.
const T0: u64 = 1_714_552_200_000;

fn lane(n: usize, state: LaneShow) -> LaneView {
    LaneView {
        reader: format!("emu-{n}"),
        state,
        card: None,
        step: None,
        progress: None,
        elapsed_s: None,
        paused: false,
        last: None,
        error: None,
    }
}

fn working(n: usize, step: &str, progress: Option<(usize, usize)>, elapsed: f64) -> LaneView {
    LaneView {
        card: Some(format!("04a1b2c3d4e5f60718{n:02}")),
        step: Some(step.into()),
        progress,
        elapsed_s: Some(elapsed),
        last: Some(format!("PASS 04a1b2c3d4e5f6071799 serial {}", 10 + n)),
        ..lane(n, LaneShow::Working)
    }
}

fn batch() -> BatchView {
    BatchView {
        name: "b-0501-0830".into(),
        id: 3,
        profile: "demo".into(),
        target: Some(48),
        passed: 17,
        failed: 3,
        first_pass_yield: 0.8,
        cards_per_hour_minute: 540.0,
        cards_per_hour_batch: 498.0,
        bundles_sealed: 5,
        bundles_aborted: 0,
        cards_waiting_for_pairing: 2,
        elapsed_s: 144.6,
        eta_s: Some(202.4),
        finished: false,
    }
}

fn events() -> Vec<EventLine> {
    let e = |s: u64, level, reader: Option<&str>, text: &str| EventLine {
        at_ms: T0 + s * 1000,
        level,
        reader: reader.map(str::to_string),
        text: text.into(),
    };
    vec![
        e(0, Level::Info, None, "batch b-0501-0830 started (profile demo, 48 cards)"),
        e(31, Level::Info, Some("emu-0"), "PASS 04a1b2c3d4e5f6071800 serial 11"),
        e(40, Level::Warn, Some("emu-2"), "FAIL 04a1b2c3d4e5f6071802 attestation: counterfeit"),
        e(52, Level::Info, None, "bundle 8f3e21aa sealed: 3 cards"),
        e(77, Level::Warn, Some("emu-1"), "FAIL 04a1b2c3d4e5f6071801 self_tests: kat failed"),
        e(90, Level::Info, Some("emu-3"), "PASS 04a1b2c3d4e5f6071803 serial 14"),
    ]
}

fn running() -> Snapshot {
    Snapshot {
        station: "line-2".into(),
        at_ms: T0 + 144_600,
        mode: Mode::Running,
        batch: Some(batch()),
        lanes: vec![
            working(0, "firmware", Some((40, 89)), 3.2),
            LaneView { step: Some("pairing".into()), ..working(1, "pairing", None, 9.8) }
                .with_state(LaneShow::WaitingForPairing),
            LaneView { last: Some("PASS 04a1b2c3d4e5f6071802 serial 15".into()), ..lane(2, LaneShow::Pass) },
            LaneView {
                last: Some("FAIL 04a1b2c3d4e5f6071803 attestation: counterfeit".into()),
                ..lane(3, LaneShow::Fail)
            },
        ],
        failures: vec![
            FailureCount { step: "attestation".into(), reason: "counterfeit".into(), count: 2 },
            FailureCount { step: "self_tests".into(), reason: "kat failed".into(), count: 1 },
        ],
        events: events(),
        profiles: vec!["demo".into()],
        config_error: None,
        ledger: None,
    }
}

impl LaneView {
    fn with_state(mut self, state: LaneShow) -> Self {
        self.state = state;
        self
    }
}

fn screen(snap: &Snapshot, ui: &UiState, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).expect("terminal");
    t.draw(|f| render(f, snap, ui)).expect("draw");
    t.backend().to_string()
}

fn local() -> UiState {
    UiState::new(Link::Local)
}

#[test]
fn running_batch_80x24() {
    insta::assert_snapshot!(screen(&running(), &local(), 80, 24));
}

#[test]
fn running_batch_160x48() {
    insta::assert_snapshot!(screen(&running(), &local(), 160, 48));
}

fn troubled() -> Snapshot {
    let mut s = running();
    s.mode = Mode::Draining;
    s.lanes[1] = LaneView { paused: true, ..lane(1, LaneShow::Paused) };
    s.lanes[2] = LaneView { error: Some("reader removed".into()), ..lane(2, LaneShow::ReaderError) };
    s.lanes[3] = LaneView { paused: true, ..working(3, "key_rotation", None, 1.5) };
    s.lanes.push(lane(4, LaneShow::InsertCard));
    s.lanes.push(LaneView { card: Some("04a1b2c3d4e5f6071805".into()), ..lane(5, LaneShow::RemoveCard) });
    s
}

#[test]
fn paused_reader_error_and_draining_80x24() {
    insta::assert_snapshot!(screen(&troubled(), &UiState { selected: 1, ..local() }, 80, 24));
}

#[test]
fn paused_reader_error_and_draining_160x48() {
    insta::assert_snapshot!(screen(&troubled(), &UiState { selected: 1, ..local() }, 160, 48));
}

#[test]
fn help_overlay_80x24() {
    insta::assert_snapshot!(screen(&running(), &UiState { help: true, ..local() }, 80, 24));
}

#[test]
fn config_error_and_confirmation_80x24() {
    let mut s = running();
    s.config_error = Some(
        "configuration /etc/tapline/station.yaml has 1 problem(s):\n  station.yaml:7:3: profiles.demo: no such file"
            .into(),
    );
    let ui = UiState { confirm: Some(Confirm::Drain), ..local() };
    insta::assert_snapshot!(screen(&s, &ui, 80, 24));
}

fn many(n: usize) -> Snapshot {
    let mut s = running();
    let states = [LaneShow::Working, LaneShow::InsertCard, LaneShow::Pass, LaneShow::WaitingForPairing, LaneShow::Fail];
    s.lanes = (0..n)
        .map(|i| match states[i % states.len()] {
            LaneShow::Working => working(i, "attestation", None, 2.0 + i as f64),
            st => lane(i, st),
        })
        .collect();
    s
}

#[test]
fn sixteen_readers_80x24_scroll_to_the_selection() {
    let s = many(16);
    insta::assert_snapshot!("sixteen_readers_80x24_top", screen(&s, &local(), 80, 24));
    let ui = UiState { selected: 12, ..local() };
    let text = screen(&s, &ui, 80, 24);
    assert!(text.contains("▶ emu-12"), "{text}");
    assert!(!text.contains("  emu-0  "), "{text}");
}

#[test]
fn sixty_four_readers_on_a_large_screen_use_two_columns() {
    let text = screen(&many(64), &local(), 200, 50);
    assert!(text.contains("Lanes (64)") && text.contains("emu-63"), "{text}");
    // Both columns show lanes side by side.
    assert!(text.lines().any(|l| l.matches("emu-").count() >= 2), "{text}");
}

#[test]
fn connection_lost_and_connecting_show() {
    let ui = UiState::new(Link::Remote {
        addr: "10.0.0.7:9464".into(),
        lost: Some(Lost { error: "connection refused".into(), stale_s: Some(12) }),
    });
    insta::assert_snapshot!(screen(&running(), &ui, 80, 24));
    let ui = UiState::new(Link::Remote {
        addr: "10.0.0.7:9464".into(),
        lost: Some(Lost { error: "connecting".into(), stale_s: None }),
    });
    let text = screen(&super::remote::placeholder("10.0.0.7:9464"), &ui, 80, 24);
    assert!(text.contains("connecting…") && text.contains("CONNECTION LOST"), "{text}");
}

#[test]
fn every_size_from_tiny_to_huge_renders_without_panicking() {
    for (w, h) in [(1, 1), (20, 5), (40, 12), (80, 24), (100, 30), (132, 43), (300, 90)] {
        for n in [0, 1, 4, 9, 33, 64] {
            let _ = screen(&many(n), &UiState { help: true, ..local() }, w, h);
            let _ = screen(&many(n), &local(), w, h);
        }
    }
}

fn key(c: char) -> KeyEvent {
    KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE)
}

#[test]
fn keys_select_lanes_and_pause_or_resume_the_selected_reader() {
    let mut s = running();
    let mut ui = local();
    assert_eq!(handle_key(KeyEvent::new(KeyCode::Down, KeyModifiers::NONE), &mut ui, &s), None);
    assert_eq!(handle_key(key('j'), &mut ui, &s), None);
    assert_eq!(ui.selected, 2);
    for _ in 0..10 {
        handle_key(key('j'), &mut ui, &s);
    }
    assert_eq!(ui.selected, 3, "stops at the last lane");
    handle_key(key('k'), &mut ui, &s);
    assert_eq!(handle_key(key('p'), &mut ui, &s), Some(Action::PauseReader { reader: "emu-2".into() }));
    s.lanes[2].paused = true;
    assert_eq!(handle_key(key('p'), &mut ui, &s), Some(Action::ResumeReader { reader: "emu-2".into() }));
    // P pauses every reader, and resumes them once all are paused.
    assert_eq!(handle_key(key('P'), &mut ui, &s), Some(Action::Pause));
    let mut all = s.clone();
    for l in &mut all.lanes {
        l.paused = true;
    }
    assert_eq!(handle_key(key('P'), &mut ui, &all), Some(Action::Resume));
    ui.acted(Err(Refused("no reader named \"emu-2\"".into())));
    assert_eq!(ui.message, Some(("no reader named \"emu-2\"".into(), true)));
}

#[test]
fn drain_and_stop_ask_first() {
    let s = running();
    let mut ui = local();
    assert_eq!(handle_key(key('d'), &mut ui, &s), None);
    assert_eq!(ui.confirm, Some(Confirm::Drain));
    assert_eq!(handle_key(key('y'), &mut ui, &s), Some(Action::Drain));
    assert_eq!(ui.confirm, None);
    assert_eq!(handle_key(key('s'), &mut ui, &s), None);
    assert_eq!(handle_key(key('n'), &mut ui, &s), None, "n cancels");
    assert_eq!(handle_key(key('s'), &mut ui, &s), None);
    assert_eq!(handle_key(KeyEvent::new(KeyCode::Esc, KeyModifiers::NONE), &mut ui, &s), None, "Esc cancels");
    assert_eq!(handle_key(key('s'), &mut ui, &s), None);
    assert_eq!(handle_key(key('y'), &mut ui, &s), Some(Action::Stop));
}

#[test]
fn q_drains_a_local_batch_and_detaches_a_remote_screen() {
    let mut s = running();
    let mut ui = local();
    assert_eq!(handle_key(key('q'), &mut ui, &s), None);
    assert_eq!(ui.confirm, Some(Confirm::DrainAndQuit));
    assert_eq!(handle_key(key('y'), &mut ui, &s), Some(Action::Drain));
    assert!(ui.quit_when_ended && !ui.quit, "the screen stays until the batch is over");
    // Already draining: q only arranges to close at the end.
    s.mode = Mode::Draining;
    let mut ui = local();
    assert_eq!(handle_key(key('q'), &mut ui, &s), None);
    assert!(ui.quit_when_ended && ui.confirm.is_none());
    // Ctrl-C is q.
    let mut ui = local();
    s.mode = Mode::Running;
    handle_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL), &mut ui, &s);
    assert_eq!(ui.confirm, Some(Confirm::DrainAndQuit));
    // Once the batch is over any key leaves.
    let mut ui = UiState { ended: Some(3), ..local() };
    assert_eq!(handle_key(key('x'), &mut ui, &s), None);
    assert!(ui.quit);
    let mut ui = UiState::new(Link::Remote { addr: "h:1".into(), lost: None });
    assert_eq!(handle_key(key('q'), &mut ui, &s), None);
    assert!(ui.quit);
}

#[test]
fn help_opens_and_any_key_closes_it() {
    let s = running();
    let mut ui = local();
    handle_key(key('?'), &mut ui, &s);
    assert!(ui.help);
    assert_eq!(handle_key(key('p'), &mut ui, &s), None, "the key that closes the help does nothing else");
    assert!(!ui.help);
}

#[test]
fn the_event_log_scrolls_back_and_forth() {
    let s = running();
    let mut ui = local();
    handle_key(KeyEvent::new(KeyCode::PageUp, KeyModifiers::NONE), &mut ui, &s);
    assert_eq!(ui.events_back, 5);
    handle_key(KeyEvent::new(KeyCode::PageUp, KeyModifiers::NONE), &mut ui, &s);
    assert_eq!(ui.events_back, 5, "never past the oldest event");
    handle_key(KeyEvent::new(KeyCode::PageDown, KeyModifiers::NONE), &mut ui, &s);
    assert_eq!(ui.events_back, 0);
}

// ---- the line view ---------------------------------------------------------

use super::line::{LineTotals, LineUi, StationFeed, Tab, handle_line_key};

/// Three stations: two answering (one of them idle after its batch), one
/// that stopped answering 12 s ago.
fn line_feeds() -> Vec<StationFeed> {
    let a = running();
    let mut b = running();
    b.station = "line-3".into();
    b.mode = Mode::Idle;
    b.batch = Some(BatchView {
        name: "b-0501-0700".into(),
        passed: 30,
        failed: 2,
        first_pass_yield: 0.875,
        cards_per_hour_minute: 0.0,
        finished: true,
        eta_s: None,
        ..batch()
    });
    b.lanes = (0..4).map(|i| lane(i, LaneShow::Idle)).collect();
    b.failures = vec![FailureCount { step: "attestation".into(), reason: "counterfeit".into(), count: 2 }];
    b.events = vec![EventLine {
        at_ms: T0 + 100_000,
        level: Level::Info,
        reader: None,
        text: "batch b-0501-0700 finished: 30 passed, 2 failed".into(),
    }];
    let mut c = running();
    c.station = "line-4".into();
    c.lanes[3] = LaneView { error: Some("reader removed".into()), ..lane(3, LaneShow::ReaderError) };
    vec![
        StationFeed { addr: "10.0.0.2:9464".into(), snapshot: std::sync::Arc::new(a), lost: None },
        StationFeed { addr: "10.0.0.3:9464".into(), snapshot: std::sync::Arc::new(b), lost: None },
        StationFeed {
            addr: "10.0.0.4:9464".into(),
            snapshot: std::sync::Arc::new(c),
            lost: Some(Lost { error: "connection refused".into(), stale_s: Some(12) }),
        },
    ]
}

fn never_reached() -> StationFeed {
    StationFeed {
        addr: "10.0.0.9:9464".into(),
        snapshot: std::sync::Arc::new(super::remote::placeholder("10.0.0.9:9464")),
        lost: Some(Lost { error: "connection refused".into(), stale_s: None }),
    }
}

fn line_ui(feeds: &[StationFeed]) -> LineUi {
    let addrs: Vec<String> = feeds.iter().map(|f| f.addr.clone()).collect();
    let mut ui = LineUi::new(&addrs);
    ui.update(feeds);
    ui
}

fn line_screen(feeds: &[StationFeed], ui: &LineUi, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).expect("terminal");
    t.draw(|f| render_line(f, feeds, ui)).expect("draw");
    t.backend().to_string()
}

#[test]
fn line_summary_80x24() {
    let mut feeds = line_feeds();
    feeds.push(never_reached());
    let ui = line_ui(&feeds);
    let text = line_screen(&feeds, &ui, 80, 24);
    insta::assert_snapshot!(text);
    // Every station has its row, the line its total, the lost ones say so.
    for w in ["1 line-2", "2 line-3", "3 line-4", "4 10.0.0.9:9464", "LINE", "LOST 12.0s", "UNREACHABLE", "2/4 up"] {
        assert!(text.contains(w), "{w} missing:\n{text}");
    }
}

#[test]
fn line_summary_160x48() {
    let feeds = line_feeds();
    let ui = LineUi { selected: 1, ..line_ui(&feeds) };
    insta::assert_snapshot!(line_screen(&feeds, &ui, 160, 48));
}

#[test]
fn line_station_tab_80x24_is_that_stations_dashboard() {
    let feeds = line_feeds();
    let ui = LineUi { tab: Tab::Station(2), ..line_ui(&feeds) };
    let text = line_screen(&feeds, &ui, 80, 24);
    insta::assert_snapshot!(text);
    assert!(text.contains("station line-4") && text.contains("CONNECTION LOST"), "{text}");
    assert!(text.contains("READER ERROR"), "{text}");
}

#[test]
fn line_help_80x24() {
    let feeds = line_feeds();
    let ui = LineUi { help: true, ..line_ui(&feeds) };
    insta::assert_snapshot!(line_screen(&feeds, &ui, 80, 24));
    // A station tab's help lists the tab keys too.
    let mut ui = LineUi { tab: Tab::Station(0), ..line_ui(&feeds) };
    ui.stations[0].help = true;
    let text = line_screen(&feeds, &ui, 80, 24);
    assert!(text.contains("Tab ⇧Tab") && text.contains("pause / resume"), "{text}");
}

#[test]
fn line_view_renders_at_every_size() {
    let mut feeds = line_feeds();
    feeds.push(never_reached());
    for (w, h) in [(1, 1), (20, 5), (40, 12), (80, 24), (100, 30), (300, 90)] {
        for tab in [Tab::Line, Tab::Station(0), Tab::Station(3)] {
            let _ = line_screen(&feeds, &LineUi { tab, help: true, ..line_ui(&feeds) }, w, h);
            let _ = line_screen(&feeds, &LineUi { tab, ..line_ui(&feeds) }, w, h);
        }
    }
}

#[test]
fn line_totals_sum_the_stations() {
    let mut feeds = line_feeds();
    feeds.push(never_reached());
    let t = LineTotals::new(&feeds);
    assert_eq!((t.stations, t.reachable), (4, 2));
    // 17+30+17 passed, 3+2+3 failed: the lost station keeps its last figures.
    assert_eq!((t.passed, t.failed), (64, 8));
    assert!((t.yield_.expect("yield") - 64.0 / 72.0).abs() < 1e-9);
    // First-pass yield weighted by cards: (0.8*20 + 0.875*32 + 0.8*20) / 72.
    assert!((t.first_pass_yield.expect("fpy") - 60.0 / 72.0).abs() < 1e-9, "{:?}", t.first_pass_yield);
    // The current rate counts only the running station that answers.
    assert!((t.cards_per_hour - 540.0).abs() < 1e-9, "{}", t.cards_per_hour);
    // 4 readers each: working+pairing busy on line-2 and line-4, one error.
    assert_eq!((t.readers.busy, t.readers.idle, t.readers.error), (4, 7, 1));
    assert_eq!(t.failures[0], ("attestation".to_string(), "counterfeit".to_string(), 6));
    assert_eq!(t.failures[1], ("self_tests".to_string(), "kat failed".to_string(), 2));
}

fn code(c: KeyCode) -> KeyEvent {
    KeyEvent::new(c, KeyModifiers::NONE)
}

#[test]
fn line_keys_switch_tabs_and_reach_the_shown_station() {
    let feeds = line_feeds();
    let mut ui = line_ui(&feeds);
    assert_eq!(ui.tab, Tab::Line);
    assert_eq!(handle_line_key(code(KeyCode::Tab), &mut ui, &feeds), None);
    assert_eq!(ui.tab, Tab::Station(0));
    handle_line_key(code(KeyCode::Right), &mut ui, &feeds);
    assert_eq!(ui.tab, Tab::Station(1));
    handle_line_key(code(KeyCode::BackTab), &mut ui, &feeds);
    handle_line_key(code(KeyCode::Left), &mut ui, &feeds);
    assert_eq!(ui.tab, Tab::Line, "back past the first station is the summary");
    handle_line_key(code(KeyCode::BackTab), &mut ui, &feeds);
    assert_eq!(ui.tab, Tab::Station(2), "and round to the last");
    handle_line_key(key('0'), &mut ui, &feeds);
    assert_eq!(ui.tab, Tab::Line);
    handle_line_key(key('9'), &mut ui, &feeds);
    assert_eq!(ui.tab, Tab::Line, "no station 9");
    handle_line_key(key('2'), &mut ui, &feeds);
    assert_eq!(ui.tab, Tab::Station(1));
    // On a station tab the keys are that station's: p pauses its selected reader.
    handle_line_key(key('j'), &mut ui, &feeds);
    assert_eq!(handle_line_key(key('p'), &mut ui, &feeds), Some((1, Action::PauseReader { reader: "emu-1".into() })));
    // A pending y/n keeps the key: Tab cancels it instead of switching.
    assert_eq!(handle_line_key(key('d'), &mut ui, &feeds), None);
    assert_eq!(handle_line_key(code(KeyCode::Tab), &mut ui, &feeds), None);
    assert_eq!(ui.tab, Tab::Station(1));
    assert_eq!(ui.stations[1].confirm, None);
    handle_line_key(key('d'), &mut ui, &feeds);
    assert_eq!(handle_line_key(key('y'), &mut ui, &feeds), Some((1, Action::Drain)));
    // The other stations' view state is their own.
    assert_eq!(ui.stations[0].selected, 0);
    // On the summary: select a station, Enter opens it.
    handle_line_key(key('0'), &mut ui, &feeds);
    handle_line_key(code(KeyCode::Down), &mut ui, &feeds);
    handle_line_key(code(KeyCode::Down), &mut ui, &feeds);
    handle_line_key(code(KeyCode::Down), &mut ui, &feeds);
    assert_eq!(ui.selected, 2, "stops at the last station");
    assert_eq!(handle_line_key(key('p'), &mut ui, &feeds), None, "the summary sends no action");
    handle_line_key(code(KeyCode::Enter), &mut ui, &feeds);
    assert_eq!(ui.tab, Tab::Station(2));
}

#[test]
fn line_q_detaches_from_every_tab() {
    let feeds = line_feeds();
    let mut ui = line_ui(&feeds);
    handle_line_key(key('?'), &mut ui, &feeds);
    assert!(ui.help);
    handle_line_key(key('x'), &mut ui, &feeds);
    assert!(!ui.help && !ui.quit, "any key closes the help");
    handle_line_key(key('q'), &mut ui, &feeds);
    assert!(ui.quit);
    let mut ui = LineUi { tab: Tab::Station(1), ..line_ui(&feeds) };
    handle_line_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL), &mut ui, &feeds);
    assert!(ui.quit, "Ctrl-C on a station tab detaches too");
}
