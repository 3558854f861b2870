//! A batch: one worker per reader, run until the target number of cards
//! reached a final state (or a fatal error), then a summary.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use card::transport::{CardReader, ReaderId, ReaderMonitor, TransportError};

use crate::handler::CardHandler;
use crate::pairing::{self, BundleStatus};
use crate::recipe::{CardOutcome, Recipe};
use crate::worker::{self, Control, Event, LaneState};

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("station stopped: {0}")]
    Fatal(String),
    #[error("no readers")]
    NoReaders,
}

/// The figures of a finished batch.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Every card's outcome, when the batch was asked to keep them
    /// ([`Output::keep_outcomes`]); the figures below never need them.
    pub outcomes: Vec<CardOutcome>,
    pub counts: Counts,
    pub elapsed: Duration,
    pub readers: usize,
    /// Bundles sealed and aborted (by bundle id).
    pub bundles_sealed: Vec<String>,
    pub bundles_aborted: Vec<String>,
}

/// Running totals of a batch's outcomes: what the summary shows, in
/// constant memory however long the batch.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    pub cards: usize,
    pub passed: usize,
    /// Passed on their first attempt.
    pub first_pass: usize,
    /// Passed without a bundle (released unpaired).
    pub unpaired: usize,
    /// Failures by (step, reason).
    pub failures: BTreeMap<(String, String), usize>,
}

impl Counts {
    pub fn add(&mut self, o: &CardOutcome) {
        self.cards += 1;
        match &o.result {
            Ok(p) => {
                self.passed += 1;
                if o.attempt <= 1 {
                    self.first_pass += 1;
                }
                if p.stage == "unpaired" {
                    self.unpaired += 1;
                }
            }
            Err(f) => *self.failures.entry((f.step.name().to_string(), f.reason.clone())).or_default() += 1,
        }
    }
}

impl Summary {
    /// Cards that reached a final state.
    pub fn cards(&self) -> usize {
        self.counts.cards
    }

    pub fn passed(&self) -> usize {
        self.counts.passed
    }

    pub fn failed(&self) -> usize {
        self.counts.cards - self.counts.passed
    }

    /// Cards that passed on their first attempt, over all cards.
    pub fn first_pass_yield(&self) -> f64 {
        if self.counts.cards == 0 {
            return 0.0;
        }
        self.counts.first_pass as f64 / self.counts.cards as f64
    }

    pub fn cards_per_hour(&self) -> f64 {
        let h = self.elapsed.as_secs_f64() / 3600.0;
        if h > 0.0 { self.counts.cards as f64 / h } else { 0.0 }
    }

    /// The summary an operator reads at the end of a batch (printed and
    /// written to the batch's report folder).
    pub fn render(&self, bundles: bool) -> String {
        use std::fmt::Write;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "summary: {} cards in {:.1}s on {} readers",
            self.counts.cards,
            self.elapsed.as_secs_f64(),
            self.readers
        );
        let _ = writeln!(t, "  passed:           {}", self.passed());
        let _ = writeln!(t, "  failed:           {}", self.failed());
        let _ = writeln!(t, "  first-pass yield: {:.1}%", self.first_pass_yield() * 100.0);
        let _ = writeln!(t, "  throughput:       {:.0} cards/hour", self.cards_per_hour());
        if bundles {
            let _ = writeln!(t, "  bundles sealed:   {}", self.bundles_sealed.len());
            let _ = writeln!(t, "  bundles aborted:  {}", self.bundles_aborted.len());
            let _ = writeln!(t, "  passed unpaired:  {}", self.counts.unpaired);
        }
        let failures = self.failures();
        if !failures.is_empty() {
            let _ = writeln!(t, "  failures by step and reason:");
            for ((step, reason), n) in failures {
                let _ = writeln!(t, "    {n:>4}  {step:<13} {reason}");
            }
        }
        t
    }

    /// Failures grouped by (step, reason), most frequent first.
    pub fn failures(&self) -> Vec<((String, String), usize)> {
        let mut v: Vec<_> = self.counts.failures.iter().map(|(k, n)| (k.clone(), *n)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }
}

/// A batch name derived from the time, e.g. `batch-2026-11-24T211800`.
pub fn default_name() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("batch-{}", crate::ledger::format_utc(now.as_secs(), 0).trim_end_matches(".000Z").replace(':', ""))
}

/// Opens every reader the monitor lists.
pub fn open_all(monitor: &mut dyn ReaderMonitor) -> Result<Vec<Box<dyn CardReader>>, TransportError> {
    monitor.readers()?.iter().map(|id| monitor.open(id)).collect()
}

/// Where a batch writes its files (bundle labels).
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub labels: Option<std::path::PathBuf>,
    /// Keep every card's outcome in the summary (tests read them); without
    /// it the summary holds counts only and a batch of any length runs in
    /// flat memory.
    pub keep_outcomes: bool,
}

/// How often the batch looks for readers that appeared.
const RELIST: Duration = Duration::from_secs(1);

/// How often the batch looks at its control flags while no event comes.
const TICK: Duration = Duration::from_millis(100);

/// Runs one worker per reader the monitor lists (and for readers that
/// appear later) until `target` cards reached a final state, or, with no
/// target, until the batch is drained through `control`; with bundling on,
/// a bundle coordinator pairs the ready cards. `on_event` sees every event
/// (progress lines, the live state model and metrics).
pub fn run(
    monitor: &mut dyn ReaderMonitor,
    recipe: Arc<Recipe>,
    handler: Arc<dyn CardHandler>,
    target: Option<usize>,
    output: Output,
    control: Arc<Control>,
    mut on_event: impl FnMut(&Event),
) -> Result<Summary, BatchError> {
    let readers = open_all(monitor).map_err(|e| BatchError::Fatal(format!("cannot list readers: {e}")))?;
    if readers.is_empty() {
        return Err(BatchError::NoReaders);
    }
    // Before any worker starts: each card a worker starts claims one unit.
    if let Some(t) = target {
        control.set_budget(t);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = crossbeam_channel::unbounded();
    let started = Instant::now();
    let coordinator = match &recipe.profile.bundles {
        Some(b) => Some(
            pairing::start(pairing::Setup {
                bundles: b.clone(),
                ledger: recipe.ledger.clone(),
                batch_id: recipe.batch_id,
                events: tx.clone(),
                labels: output.labels.clone(),
            })
            .map_err(|e| BatchError::Fatal(format!("cannot start the bundle coordinator: {e}")))?,
        ),
        None => None,
    };
    let ctx = worker::Context {
        recipe: Arc::clone(&recipe),
        handler,
        coordinator: coordinator.as_ref().map(|(c, _)| c.clone()),
        events: tx.clone(),
        stop: Arc::clone(&stop),
        control: Arc::clone(&control),
    };
    let spawn = |reader: Box<dyn CardReader>| {
        let ctx = ctx.clone();
        std::thread::Builder::new()
            .name(format!("reader-{}", reader.id()))
            .spawn(move || worker::run(reader, ctx))
            .map_err(|e| BatchError::Fatal(format!("cannot start a worker thread: {e}")))
    };
    let mut known: HashSet<ReaderId> = readers.iter().map(|r| r.id().clone()).collect();
    let mut handles = Vec::with_capacity(readers.len());
    for reader in readers {
        handles.push(spawn(reader)?);
    }
    drop(tx);
    let mut last_list = Instant::now();
    let mut outcomes = Vec::new();
    let mut counts = Counts::default();
    // The batch's own end condition counts outcomes, kept or not.
    let mut done = 0usize;
    let keep = output.keep_outcomes;
    let mut record = |o: CardOutcome, outcomes: &mut Vec<CardOutcome>| {
        counts.add(&o);
        if keep {
            outcomes.push(o);
        }
    };
    // Readers with a card waiting for pairing.
    let mut waiting = HashSet::new();
    let mut offered = 0usize;
    let (mut sealed, mut aborted) = (Vec::new(), Vec::new());
    let mut told_no_more = false;
    let mut interrupted = false;
    let mut fatal = None;
    loop {
        // Draining (asked to, or the target's last card started): the batch
        // ends once every card started has its outcome, so no card is left
        // half-way.
        if control.draining() && done >= control.claimed() {
            break;
        }
        if !interrupted && control.interrupted() {
            interrupted = true;
            recipe.interrupt();
            if let Some((c, _)) = &coordinator {
                c.stop();
            }
        }
        // The batch drains and every card started is done or waiting: no
        // more will come to pair with the ones waiting, so the coordinator
        // must not hold them.
        if !told_no_more && control.draining() && done + waiting.len() >= control.claimed() {
            if let Some((c, _)) = &coordinator {
                c.no_more_cards(offered);
            }
            told_no_more = true;
        }
        // Readers plugged in while the batch runs get their own worker; a
        // reader that goes away leaves its worker reporting the error until
        // it comes back.
        if last_list.elapsed() >= RELIST {
            last_list = Instant::now();
            if let Ok(ids) = monitor.readers() {
                let new: Vec<ReaderId> = ids.into_iter().filter(|id| !known.contains(id)).collect();
                for id in new {
                    match monitor.open(&id) {
                        Ok(reader) => {
                            tracing::info!(reader = %id, "reader appeared");
                            known.insert(id);
                            handles.push(spawn(reader)?);
                        }
                        Err(e) => tracing::warn!(reader = %id, error = %e, "cannot open a new reader"),
                    }
                }
            }
        }
        let ev = match rx.recv_timeout(TICK) {
            Ok(ev) => ev,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        };
        on_event(&ev);
        match ev {
            Event::Outcome(o) => {
                waiting.remove(&o.reader);
                done += 1;
                record(o, &mut outcomes);
            }
            Event::Lane { reader, state: LaneState::WaitingForPairing } => {
                offered += 1;
                waiting.insert(reader);
            }
            Event::Bundle { bundle, status: BundleStatus::Sealed, .. } => sealed.push(bundle),
            Event::Bundle { bundle, status: BundleStatus::Aborted, .. } => aborted.push(bundle),
            Event::Fatal { reader, error } => {
                fatal = Some(format!("{reader}: {error}"));
                break;
            }
            _ => {}
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    // Workers blocked in a reader wait return at once (PC/SC:
    // Context::cancel) instead of at their next poll.
    monitor.cancel_waits();
    if let Some((c, join)) = coordinator {
        // Releases the cards it still holds; their workers then finish.
        c.stop();
        let _ = join.join();
    }
    for h in handles {
        let _ = h.join();
    }
    // Events after the loop: a card released by the coordinator at the
    // stop, a lane going idle. The caller sees them too.
    while let Ok(ev) = rx.try_recv() {
        on_event(&ev);
        match ev {
            Event::Outcome(o) => record(o, &mut outcomes),
            Event::Bundle { bundle, status: BundleStatus::Sealed, .. } => sealed.push(bundle),
            Event::Bundle { bundle, status: BundleStatus::Aborted, .. } => aborted.push(bundle),
            _ => {}
        }
    }
    if let Some(e) = fatal {
        return Err(BatchError::Fatal(e));
    }
    Ok(Summary { outcomes, counts, elapsed, readers: known.len(), bundles_sealed: sealed, bundles_aborted: aborted })
}
