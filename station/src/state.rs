//! The station's live state: a model fed by the workers' and the bundle
//! coordinator's events, and the `Snapshot` it publishes. The dashboard, the
//! HTTP API and the metrics' reader gauges read snapshots; none of them
//! touches hardware or the ledger. The model is plain data updated by
//! `apply`, with time passed in, so it is tested without clocks or threads.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use card::transport::ReaderId;
use serde::{Deserialize, Serialize};

use crate::pairing::BundleStatus;
use crate::recipe::Progress;
use crate::worker::{Event, LaneState};

/// How many recent events a snapshot carries.
pub const RECENT_EVENTS: usize = 200;

/// The window of the "last minute" throughput figure.
const MINUTE: Duration = Duration::from_secs(60);

/// Everything the operator's screens show, at one instant. Serialized as
/// the `/api/status` document (`docs/api.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The station's id (profile or `--station-id`).
    pub station: String,
    /// Milliseconds since the Unix epoch when the snapshot was taken.
    pub at_ms: u64,
    /// Idle (between batches), running, draining or stopping.
    pub mode: Mode,
    /// The running batch, or the last one when idle.
    pub batch: Option<BatchView>,
    /// One lane per reader, in reader order.
    pub lanes: Vec<LaneView>,
    /// Failures of the current batch by step and reason, most frequent first.
    pub failures: Vec<FailureCount>,
    /// Recent events, oldest first.
    pub events: Vec<EventLine>,
    /// The profile names a batch can be started with (daemon).
    pub profiles: Vec<String>,
    /// A configuration problem the operator must see (a profile reload that
    /// failed: the last good configuration stays in use).
    pub config_error: Option<String>,
    /// The ledger's database (PostgreSQL): reachable or not, and ops waiting
    /// in the outbox. None on a SQLite ledger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger: Option<LedgerLink>,
}

/// Whether the shared ledger database is reachable (`docs/ledger.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerLink {
    pub online: bool,
    /// Ops kept in the local outbox until the database takes them.
    pub outbox_ops: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Idle,
    Running,
    Draining,
    Stopping,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Running => "running",
            Self::Draining => "draining",
            Self::Stopping => "stopping",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchView {
    pub name: String,
    pub id: i64,
    pub profile: String,
    /// Cards to take to a final state; none when the batch runs until drained.
    pub target: Option<usize>,
    pub passed: usize,
    pub failed: usize,
    /// Cards that passed on their first attempt, over all cards (0..1).
    pub first_pass_yield: f64,
    /// Throughput over the last minute and over the whole batch.
    pub cards_per_hour_minute: f64,
    pub cards_per_hour_batch: f64,
    pub bundles_sealed: usize,
    pub bundles_aborted: usize,
    /// Cards waiting on their readers for partners.
    pub cards_waiting_for_pairing: usize,
    pub elapsed_s: f64,
    /// Estimated seconds to the target at the batch's rate so far.
    pub eta_s: Option<f64>,
    pub finished: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaneView {
    pub reader: String,
    pub state: LaneShow,
    pub card: Option<String>,
    pub step: Option<String>,
    /// Progress within the step (LOAD blocks sent of total).
    pub progress: Option<(usize, usize)>,
    /// Seconds the current card has been on the lane.
    pub elapsed_s: Option<f64>,
    pub paused: bool,
    /// The last card's result, e.g. "PASS serial 12" or "FAIL attestation: ...".
    pub last: Option<String>,
    /// The reader's error, when it has one.
    pub error: Option<String>,
}

/// The big word an operator reads from two metres away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LaneShow {
    InsertCard,
    Working,
    WaitingForPairing,
    Pass,
    Fail,
    RemoveCard,
    Paused,
    ReaderError,
    Idle,
}

impl LaneShow {
    pub fn label(self) -> &'static str {
        match self {
            Self::InsertCard => "INSERT CARD",
            Self::Working => "WORKING",
            Self::WaitingForPairing => "WAITING FOR PAIRING",
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
            Self::RemoveCard => "REMOVE CARD",
            Self::Paused => "PAUSED",
            Self::ReaderError => "READER ERROR",
            Self::Idle => "IDLE",
        }
    }

    /// The metrics label (`tapline_readers{state=...}`).
    pub fn metric(self) -> &'static str {
        match self {
            Self::InsertCard => "insert_card",
            Self::Working => "working",
            Self::WaitingForPairing => "waiting_for_pairing",
            Self::Pass => "pass",
            Self::Fail => "fail",
            Self::RemoveCard => "remove_card",
            Self::Paused => "paused",
            Self::ReaderError => "reader_error",
            Self::Idle => "idle",
        }
    }

    pub const ALL: [LaneShow; 9] = [
        Self::InsertCard,
        Self::Working,
        Self::WaitingForPairing,
        Self::Pass,
        Self::Fail,
        Self::RemoveCard,
        Self::Paused,
        Self::ReaderError,
        Self::Idle,
    ];
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureCount {
    pub step: String,
    pub reason: String,
    pub count: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventLine {
    pub at_ms: u64,
    pub level: Level,
    pub reader: Option<String>,
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Info,
    Warn,
    Error,
}

/// What a batch is, when it starts.
#[derive(Debug, Clone)]
pub struct BatchStart {
    pub name: String,
    pub id: i64,
    pub profile: String,
    pub target: Option<usize>,
}

#[derive(Debug)]
struct Lane {
    show: LaneShow,
    card: Option<String>,
    step: Option<String>,
    progress: Option<(usize, usize)>,
    since: Option<Instant>,
    paused: bool,
    last: Option<String>,
    error: Option<String>,
}

impl Lane {
    fn new() -> Self {
        Self {
            show: LaneShow::Idle,
            card: None,
            step: None,
            progress: None,
            since: None,
            paused: false,
            last: None,
            error: None,
        }
    }
}

#[derive(Debug)]
struct Batch {
    start: BatchStart,
    started: Instant,
    finished: Option<Instant>,
    passed: usize,
    failed: usize,
    first_pass: usize,
    /// When each card reached its final state (for the last-minute rate).
    done_at: VecDeque<Instant>,
    sealed: usize,
    aborted: usize,
    failures: BTreeMap<(String, String), usize>,
}

/// The live model. Not thread-safe by itself: the station core owns it
/// behind a lock and publishes snapshots.
#[derive(Debug)]
pub struct StateModel {
    station: String,
    mode: Mode,
    lanes: BTreeMap<String, Lane>,
    batch: Option<Batch>,
    events: VecDeque<EventLine>,
    profiles: Vec<String>,
    config_error: Option<String>,
    ledger: Option<LedgerLink>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn short(id: &str) -> String {
    id.chars().take(8).collect()
}

impl StateModel {
    pub fn new(station: impl Into<String>) -> Self {
        Self {
            station: station.into(),
            mode: Mode::Idle,
            lanes: BTreeMap::new(),
            batch: None,
            events: VecDeque::new(),
            profiles: Vec::new(),
            config_error: None,
            ledger: None,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
    }

    pub fn set_profiles(&mut self, names: Vec<String>) {
        self.profiles = names;
    }

    /// Shows (or clears) a configuration problem.
    pub fn set_config_error(&mut self, error: Option<String>, at: SystemTime) {
        if let Some(e) = &error {
            self.log(at, Level::Error, None, format!("configuration: {e}"));
        }
        self.config_error = error;
    }

    /// The shared ledger's link (PostgreSQL backends only).
    pub fn set_ledger(&mut self, link: LedgerLink, at: SystemTime) {
        let was_online = self.ledger.is_none_or(|l| l.online);
        if was_online && !link.online {
            self.log(at, Level::Warn, None, "ledger offline: provisioning into the local outbox");
        } else if !was_online && link.online {
            self.log(at, Level::Info, None, format!("ledger online again: draining {} queued ops", link.outbox_ops));
        }
        self.ledger = Some(link);
    }

    /// Readers known before any event (so idle lanes show).
    pub fn set_readers(&mut self, readers: impl IntoIterator<Item = ReaderId>) {
        for r in readers {
            self.lanes.entry(r.as_str().to_string()).or_insert_with(Lane::new);
        }
    }

    pub fn set_paused(&mut self, reader: &str, paused: bool) {
        if let Some(l) = self.lanes.get_mut(reader) {
            l.paused = paused;
            if l.show == LaneShow::Paused && !paused {
                l.show = LaneShow::InsertCard;
            }
        }
    }

    pub fn log(&mut self, at: SystemTime, level: Level, reader: Option<&str>, text: impl Into<String>) {
        if self.events.len() == RECENT_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(EventLine {
            at_ms: unix_ms(at),
            level,
            reader: reader.map(str::to_string),
            text: text.into(),
        });
    }

    pub fn batch_started(&mut self, start: BatchStart, now: Instant, at: SystemTime) {
        let text = format!(
            "batch {} started (profile {}{})",
            start.name,
            start.profile,
            start.target.map_or(String::new(), |n| format!(", {n} cards"))
        );
        self.batch = Some(Batch {
            start,
            started: now,
            finished: None,
            passed: 0,
            failed: 0,
            first_pass: 0,
            done_at: VecDeque::new(),
            sealed: 0,
            aborted: 0,
            failures: BTreeMap::new(),
        });
        for l in self.lanes.values_mut() {
            l.last = None;
        }
        self.mode = Mode::Running;
        self.log(at, Level::Info, None, text);
    }

    pub fn batch_finished(&mut self, now: Instant, at: SystemTime) {
        let mut text = None;
        if let Some(b) = &mut self.batch {
            b.finished = Some(now);
            text = Some(format!("batch {} finished: {} passed, {} failed", b.start.name, b.passed, b.failed));
        }
        for l in self.lanes.values_mut() {
            l.show = LaneShow::Idle;
            l.card = None;
            l.step = None;
            l.progress = None;
            l.since = None;
        }
        self.mode = Mode::Idle;
        if let Some(t) = text {
            self.log(at, Level::Info, None, t);
        }
    }

    /// Takes one worker or coordinator event into the model.
    pub fn apply(&mut self, ev: &Event, now: Instant, at: SystemTime) {
        match ev {
            Event::Lane { reader, state } => {
                let key = reader.as_str().to_string();
                let lane = self.lanes.entry(key.clone()).or_insert_with(Lane::new);
                let show = match state {
                    LaneState::InsertCard => LaneShow::InsertCard,
                    LaneState::Working => LaneShow::Working,
                    LaneState::WaitingForPairing => LaneShow::WaitingForPairing,
                    LaneState::Pass => LaneShow::Pass,
                    LaneState::Fail => LaneShow::Fail,
                    LaneState::RemoveCard => LaneShow::RemoveCard,
                    LaneState::Paused => LaneShow::Paused,
                    LaneState::Idle => LaneShow::Idle,
                    LaneState::ReaderError(_) => LaneShow::ReaderError,
                };
                let was_error = lane.show == LaneShow::ReaderError;
                lane.show = show;
                match state {
                    LaneState::Working => {
                        lane.since = Some(now);
                        lane.card = None;
                        lane.step = None;
                        lane.progress = None;
                        lane.error = None;
                    }
                    LaneState::InsertCard | LaneState::Idle => {
                        lane.since = None;
                        lane.card = None;
                        lane.step = None;
                        lane.progress = None;
                        lane.error = None;
                    }
                    LaneState::WaitingForPairing => {
                        lane.step = Some("pairing".into());
                        lane.progress = None;
                    }
                    LaneState::ReaderError(e) => {
                        let first = lane.error.as_deref() != Some(e.as_str());
                        lane.error = Some(e.clone());
                        if first {
                            self.log(at, Level::Warn, Some(&key), format!("reader error: {e}"));
                        }
                    }
                    _ => {}
                }
                if was_error && show != LaneShow::ReaderError {
                    self.log(at, Level::Info, Some(&key), "reader back");
                }
            }
            Event::Progress { reader, progress } => {
                let lane = self.lanes.entry(reader.as_str().to_string()).or_insert_with(Lane::new);
                match progress {
                    Progress::Card(id) => lane.card = Some(id.to_hex()),
                    Progress::Step(step) => {
                        lane.step = Some(step.name().to_string());
                        lane.progress = None;
                    }
                    Progress::Load { sent, total } => lane.progress = Some((*sent, *total)),
                    Progress::StepDone { .. } => {}
                }
            }
            Event::Outcome(o) => {
                let key = o.reader.as_str().to_string();
                let card = o.card_id.map_or_else(|| "(unidentified)".to_string(), |c| c.to_hex());
                let (text, level) = match &o.result {
                    Ok(p) => (
                        format!(
                            "PASS {card}{}{}",
                            p.serial.map_or(String::new(), |s| format!(" serial {s}")),
                            match (&p.role, &p.bundle) {
                                (Some(r), Some(b)) => format!(" {r} of {}", short(b)),
                                _ => String::new(),
                            }
                        ),
                        Level::Info,
                    ),
                    Err(f) => (format!("FAIL {card} {}: {}", f.step, f.reason), Level::Warn),
                };
                let lane = self.lanes.entry(key.clone()).or_insert_with(Lane::new);
                lane.last = Some(text.clone());
                if let Some(b) = &mut self.batch {
                    b.done_at.push_back(now);
                    match &o.result {
                        Ok(_) => {
                            b.passed += 1;
                            if o.attempt <= 1 {
                                b.first_pass += 1;
                            }
                        }
                        Err(f) => {
                            b.failed += 1;
                            *b.failures.entry((f.step.name().to_string(), f.reason.clone())).or_default() += 1;
                        }
                    }
                }
                self.log(at, level, Some(&key), text);
            }
            Event::Bundle { bundle, status, members } => {
                let text = match status {
                    BundleStatus::Sealed => format!("bundle {} sealed: {} cards", short(bundle), members.len()),
                    BundleStatus::Aborted => format!("bundle {} aborted", short(bundle)),
                    BundleStatus::Forming => format!("bundle {} forming: {} cards", short(bundle), members.len()),
                };
                if let Some(b) = &mut self.batch {
                    match status {
                        BundleStatus::Sealed => b.sealed += 1,
                        BundleStatus::Aborted => b.aborted += 1,
                        BundleStatus::Forming => {}
                    }
                }
                let level = if *status == BundleStatus::Aborted { Level::Warn } else { Level::Info };
                self.log(at, level, None, text);
            }
            Event::Apdus { .. } => {}
            Event::Fatal { reader, error } => {
                self.log(at, Level::Error, Some(reader.as_str()), format!("FATAL {error}"));
            }
        }
    }

    /// The state at `now` (`at` is the same instant on the wall clock).
    pub fn snapshot(&self, now: Instant, at: SystemTime) -> Snapshot {
        let lanes = self
            .lanes
            .iter()
            .map(|(reader, l)| LaneView {
                reader: reader.clone(),
                state: l.show,
                card: l.card.clone(),
                step: l.step.clone(),
                progress: l.progress,
                elapsed_s: l.since.map(|s| now.saturating_duration_since(s).as_secs_f64()),
                paused: l.paused,
                last: l.last.clone(),
                error: l.error.clone(),
            })
            .collect::<Vec<_>>();
        let waiting = lanes.iter().filter(|l| l.state == LaneShow::WaitingForPairing).count();
        let (batch, failures) = match &self.batch {
            None => (None, Vec::new()),
            Some(b) => {
                let end = b.finished.unwrap_or(now);
                let elapsed = end.saturating_duration_since(b.started).as_secs_f64();
                let done = b.passed + b.failed;
                let per_hour = |n: usize, secs: f64| if secs > 0.0 { n as f64 * 3600.0 / secs } else { 0.0 };
                let minute_start = end.checked_sub(MINUTE).unwrap_or(b.started).max(b.started);
                let in_minute = b.done_at.iter().filter(|t| **t > minute_start).count();
                let window = end.saturating_duration_since(minute_start).as_secs_f64();
                let eta = match b.start.target {
                    Some(target) if done > 0 && done < target && b.finished.is_none() => {
                        Some(elapsed / done as f64 * (target - done) as f64)
                    }
                    _ => None,
                };
                let mut failures: Vec<FailureCount> = b
                    .failures
                    .iter()
                    .map(|((step, reason), n)| FailureCount { step: step.clone(), reason: reason.clone(), count: *n })
                    .collect();
                failures.sort_by(|a, b| {
                    b.count.cmp(&a.count).then_with(|| (&a.step, &a.reason).cmp(&(&b.step, &b.reason)))
                });
                (
                    Some(BatchView {
                        name: b.start.name.clone(),
                        id: b.start.id,
                        profile: b.start.profile.clone(),
                        target: b.start.target,
                        passed: b.passed,
                        failed: b.failed,
                        first_pass_yield: if done > 0 { b.first_pass as f64 / done as f64 } else { 0.0 },
                        cards_per_hour_minute: per_hour(in_minute, window),
                        cards_per_hour_batch: per_hour(done, elapsed),
                        bundles_sealed: b.sealed,
                        bundles_aborted: b.aborted,
                        cards_waiting_for_pairing: if b.finished.is_some() { 0 } else { waiting },
                        elapsed_s: elapsed,
                        eta_s: eta,
                        finished: b.finished.is_some(),
                    }),
                    failures,
                )
            }
        };
        Snapshot {
            station: self.station.clone(),
            at_ms: unix_ms(at),
            mode: self.mode,
            batch,
            lanes,
            failures,
            events: self.events.iter().cloned().collect(),
            profiles: self.profiles.clone(),
            config_error: self.config_error.clone(),
            ledger: self.ledger,
        }
    }

    /// Drops "last minute" samples that no snapshot needs any more.
    pub fn trim(&mut self, now: Instant) {
        if let Some(b) = &mut self.batch {
            while b.done_at.front().is_some_and(|t| now.saturating_duration_since(*t) > MINUTE) {
                b.done_at.pop_front();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::{CardOutcome, Failure, Passed, Step};
    use card::CardId;

    fn reader(n: u8) -> ReaderId {
        ReaderId(format!("emu-{n}"))
    }

    fn outcome(r: u8, card: u8, result: Result<Passed, Failure>, attempt: u32) -> Event {
        Event::Outcome(CardOutcome {
            reader: reader(r),
            card_id: Some(CardId([card; 10])),
            result,
            elapsed: Duration::from_secs(5),
            attempt,
            ready: None,
        })
    }

    fn pass(serial: i64) -> Result<Passed, Failure> {
        Ok(Passed { serial: Some(serial), stage: "bundled".into(), bundle: None, role: None })
    }

    fn fail(step: Step, reason: &str) -> Result<Passed, Failure> {
        Err(Failure::new(step, reason, "detail", false))
    }

    #[test]
    fn counts_yield_rates_and_failures_of_a_batch() {
        let t0 = Instant::now();
        let w0 = SystemTime::now();
        let mut m = StateModel::new("st-1");
        m.set_readers([reader(0), reader(1)]);
        m.batch_started(BatchStart { name: "b1".into(), id: 7, profile: "demo".into(), target: Some(10) }, t0, w0);
        let at = |s: u64| (t0 + Duration::from_secs(s), w0 + Duration::from_secs(s));
        let (n, w) = at(30);
        m.apply(&outcome(0, 1, pass(1), 1), n, w);
        m.apply(&outcome(1, 2, pass(2), 2), n, w);
        let (n, w) = at(90);
        m.apply(&outcome(0, 3, fail(Step::Attestation, "counterfeit"), 1), n, w);
        m.apply(&outcome(1, 4, fail(Step::Attestation, "counterfeit"), 1), n, w);
        m.apply(&outcome(0, 5, fail(Step::SelfTests, "kat failed"), 1), n, w);
        let (n, w) = at(120);
        let s = m.snapshot(n, w);
        let b = s.batch.expect("batch");
        assert_eq!((b.passed, b.failed), (2, 3));
        assert!((b.first_pass_yield - 0.2).abs() < 1e-9, "{}", b.first_pass_yield);
        // 5 cards in 120 s = 150/h; the last minute (60..120 s) saw 3.
        assert!((b.cards_per_hour_batch - 150.0).abs() < 1e-6);
        assert!((b.cards_per_hour_minute - 180.0).abs() < 1e-6);
        // 5 more cards at 24 s a card.
        assert!((b.eta_s.expect("eta") - 120.0).abs() < 1e-6);
        assert_eq!(s.failures[0], FailureCount { step: "attestation".into(), reason: "counterfeit".into(), count: 2 });
        assert_eq!(s.failures[1].count, 1);
        assert_eq!(s.lanes.len(), 2);
        assert!(s.lanes[0].last.as_deref().is_some_and(|l| l.starts_with("FAIL")));
        assert_eq!(s.events.iter().filter(|e| e.text.starts_with("PASS")).count(), 2);
    }

    #[test]
    fn lanes_follow_the_worker_and_its_progress() {
        let (t0, w0) = (Instant::now(), SystemTime::now());
        let mut m = StateModel::new("st");
        let r = reader(3);
        m.apply(&Event::Lane { reader: r.clone(), state: LaneState::Working }, t0, w0);
        m.apply(&Event::Progress { reader: r.clone(), progress: Progress::Card(CardId([9; 10])) }, t0, w0);
        m.apply(&Event::Progress { reader: r.clone(), progress: Progress::Step(Step::Firmware) }, t0, w0);
        m.apply(&Event::Progress { reader: r.clone(), progress: Progress::Load { sent: 40, total: 89 } }, t0, w0);
        let s = m.snapshot(t0 + Duration::from_secs(2), w0);
        let l = &s.lanes[0];
        assert_eq!(l.state, LaneShow::Working);
        assert_eq!(l.card.as_deref(), Some("09090909090909090909"));
        assert_eq!((l.step.as_deref(), l.progress), (Some("firmware"), Some((40, 89))));
        assert_eq!(l.elapsed_s, Some(2.0));
        m.apply(&Event::Lane { reader: r.clone(), state: LaneState::WaitingForPairing }, t0, w0);
        assert_eq!(m.snapshot(t0, w0).lanes[0].state, LaneShow::WaitingForPairing);
        m.apply(&Event::Lane { reader: r.clone(), state: LaneState::ReaderError("gone".into()) }, t0, w0);
        m.apply(&Event::Lane { reader: r.clone(), state: LaneState::ReaderError("gone".into()) }, t0, w0);
        let s = m.snapshot(t0, w0);
        assert_eq!(s.lanes[0].error.as_deref(), Some("gone"));
        // A repeated reader error is logged once.
        assert_eq!(s.events.iter().filter(|e| e.text.contains("reader error")).count(), 1);
        m.apply(&Event::Lane { reader: r, state: LaneState::InsertCard }, t0, w0);
        let s = m.snapshot(t0, w0);
        assert_eq!(
            (s.lanes[0].state, s.lanes[0].card.as_ref(), s.lanes[0].error.as_ref()),
            (LaneShow::InsertCard, None, None)
        );
        assert!(s.events.last().is_some_and(|e| e.text == "reader back"));
    }

    #[test]
    fn the_event_log_keeps_the_most_recent() {
        let (t0, w0) = (Instant::now(), SystemTime::now());
        let mut m = StateModel::new("st");
        for i in 0..(RECENT_EVENTS + 50) {
            m.log(w0, Level::Info, None, format!("e{i}"));
        }
        let s = m.snapshot(t0, w0);
        assert_eq!(s.events.len(), RECENT_EVENTS);
        assert_eq!(s.events[0].text, "e50");
    }

    #[test]
    fn snapshots_round_trip_through_json() {
        let (t0, w0) = (Instant::now(), SystemTime::now());
        let mut m = StateModel::new("st");
        m.set_readers([reader(0)]);
        m.batch_started(BatchStart { name: "b".into(), id: 1, profile: "demo".into(), target: None }, t0, w0);
        m.apply(&outcome(0, 1, pass(1), 1), t0, w0);
        let s = m.snapshot(t0, w0);
        let json = serde_json::to_string(&s).expect("json");
        let back: Snapshot = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, s);
        assert!(json.contains("\"state\":\"pass\"") || json.contains("\"state\":\"idle\""), "{json}");
    }
}
