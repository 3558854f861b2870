//! One worker thread per reader: it owns its `CardReader`, waits for a
//! card, runs the recipe, serves the bundle coordinator while the card waits
//! for pairing (the card stays connected on this thread), hands the card to
//! the `CardHandler`, and reports everything as events. A failing, hostile
//! or panicking card only ever affects its own reader.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use card::CardId;
use card::transport::{CardReader, ReaderId, SlotState, Transport};
use crossbeam_channel::Sender;

use crate::handler::{Bin, CardHandler};
use crate::pairing::{BundleStatus, Coordinator, Lane, LaneMsg, Waiting};
use crate::recipe::{CardOutcome, Failure, Progress, Recipe, Step};

/// What a lane (reader) shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaneState {
    InsertCard,
    Working,
    WaitingForPairing,
    Pass,
    Fail,
    RemoveCard,
    /// The operator paused the reader: a card on it waits untouched.
    Paused,
    /// The station is draining or the batch is over: no new card is taken.
    Idle,
    ReaderError(String),
}

/// Everything workers and the coordinator report.
#[derive(Debug, Clone)]
pub enum Event {
    Lane {
        reader: ReaderId,
        state: LaneState,
    },
    Progress {
        reader: ReaderId,
        progress: Progress,
    },
    /// A card's final outcome (after pairing, when bundling).
    Outcome(CardOutcome),
    Bundle {
        bundle: String,
        status: BundleStatus,
        members: Vec<CardId>,
    },
    /// APDUs exchanged with one card (its recipe and pairing).
    Apdus {
        reader: ReaderId,
        count: u64,
    },
    /// The station cannot go on (the ledger stopped recording).
    Fatal {
        reader: ReaderId,
        error: String,
    },
}

/// Where the readers' wall time around pairing went, summed over the
/// process: read by the benchmarks (`rig bench scaling`) to split a
/// bundled card's time into its own work and the waiting that bundling
/// adds. Updated once a card, by its worker.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PairingTimes {
    /// Cards that waited for pairing.
    pub cards: u64,
    /// From the offer to the coordinator to the first pairing call on the
    /// card: waiting for partners (and the bundle's start in the ledger).
    pub partner_wait: Duration,
    /// Running the coordinator's calls on this card (the card's own work).
    pub card_calls: Duration,
    /// From the first call to the verdict, minus the card's own calls: the
    /// card waited while other members' calls, the host's checks and the
    /// ledger's commits ran.
    pub held: Duration,
    /// Bundles formed (sealed or aborted).
    pub bundles: u64,
    /// The coordinator's ledger commits during those bundles' protocol
    /// (every member waits through each: part of `held`).
    pub bundle_ledger: Duration,
}

static PAIRING_TIMES: Mutex<PairingTimes> = Mutex::new(PairingTimes {
    cards: 0,
    partner_wait: Duration::ZERO,
    card_calls: Duration::ZERO,
    held: Duration::ZERO,
    bundles: 0,
    bundle_ledger: Duration::ZERO,
});

/// Adds one bundle's ledger time (by the coordinator).
pub(crate) fn add_bundle_ledger_time(ledger: Duration) {
    let mut times = PAIRING_TIMES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    times.bundles += 1;
    times.bundle_ledger += ledger;
}

/// The pairing times summed so far in this process.
pub fn pairing_times() -> PairingTimes {
    *PAIRING_TIMES.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How often a worker looks at its stop flag while waiting.
const POLL: Duration = Duration::from_millis(200);

/// Reader errors in a row before the worker power-cycles the reader (when
/// the fixture has power relays).
const ERRORS_BEFORE_CYCLE: u32 = 2;
/// Power cycles that did not bring the reader back before it is parked.
const MAX_CYCLES: u32 = 3;
/// How often a parked reader is looked at again.
const PARKED_RETRY: Duration = Duration::from_secs(2);

/// Sleeps `d` unless the worker is told to stop; true when it is.
fn sleep_or_stop(d: Duration, stop: &AtomicBool) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        std::thread::sleep(POLL.min(until.saturating_duration_since(Instant::now())));
    }
    stop.load(Ordering::Relaxed)
}

/// How the operator steers the workers of a batch: pause a reader, drain
/// (finish the cards in flight, take no new ones), interrupt (cards in
/// flight stop at their next step and are recorded failed-and-retryable).
/// Shared by the batch, the dashboard and the API.
#[derive(Debug)]
pub struct Control {
    drain: AtomicBool,
    interrupt: AtomicBool,
    paused: Mutex<HashSet<String>>,
    /// Cards the batch may still start (`UNLIMITED` without a target).
    budget: AtomicUsize,
    /// Cards started so far: each becomes exactly one outcome.
    claimed: AtomicUsize,
}

const UNLIMITED: usize = usize::MAX;

impl Default for Control {
    fn default() -> Self {
        Self {
            drain: AtomicBool::new(false),
            interrupt: AtomicBool::new(false),
            paused: Mutex::new(HashSet::new()),
            budget: AtomicUsize::new(UNLIMITED),
            claimed: AtomicUsize::new(0),
        }
    }
}

impl Control {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// At most `n` more cards are started; the batch drains after the last.
    pub fn set_budget(&self, n: usize) {
        self.budget.store(n, Ordering::SeqCst);
        if n == 0 {
            self.drain();
        }
    }

    /// A worker asks to start a new card. The last card of the budget
    /// drains the batch, so no reader starts a card the target does not
    /// need (an endless hopper keeps feeding).
    pub fn claim(&self) -> bool {
        if self.draining() {
            return false;
        }
        let took = self.budget.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| match b {
            UNLIMITED => Some(b),
            0 => None,
            n => Some(n - 1),
        });
        match took {
            Ok(before) => {
                // Counted before the drain shows, so whoever sees the
                // drain also sees this card.
                self.claimed.fetch_add(1, Ordering::SeqCst);
                if before == 1 {
                    self.drain();
                }
                true
            }
            Err(_) => {
                self.drain();
                false
            }
        }
    }

    /// Cards started so far.
    pub fn claimed(&self) -> usize {
        self.claimed.load(Ordering::SeqCst)
    }

    pub fn drain(&self) {
        self.drain.store(true, Ordering::SeqCst);
    }

    pub fn draining(&self) -> bool {
        self.drain.load(Ordering::SeqCst)
    }

    /// Drains and stops the cards in flight at their next step.
    pub fn interrupt(&self) {
        self.drain();
        self.interrupt.store(true, Ordering::Relaxed);
    }

    pub fn interrupted(&self) -> bool {
        self.interrupt.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.paused.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn set_paused(&self, reader: &str, paused: bool) {
        if paused {
            self.lock().insert(reader.to_string());
        } else {
            self.lock().remove(reader);
        }
    }

    pub fn is_paused(&self, reader: &str) -> bool {
        self.lock().contains(reader)
    }
}

/// What a worker needs besides its reader.
#[derive(Clone)]
pub struct Context {
    pub recipe: Arc<Recipe>,
    pub handler: Arc<dyn CardHandler>,
    pub coordinator: Option<Coordinator>,
    pub events: Sender<Event>,
    pub stop: Arc<AtomicBool>,
    pub control: Arc<Control>,
}

/// Counts the APDUs a card exchanges (GET RESPONSE included: each is a
/// round trip on the reader).
struct Counted<'a> {
    inner: &'a mut dyn Transport,
    apdus: u64,
}

impl Transport for Counted<'_> {
    fn transmit_raw(&mut self, apdu: &[u8]) -> Result<Vec<u8>, card::transport::TransportError> {
        self.apdus += 1;
        if tracing::enabled!(tracing::Level::TRACE) {
            tracing::trace!(command = %card::apdu::trace_command(apdu), "apdu >>");
            let r = self.inner.transmit_raw(apdu);
            match &r {
                Ok(resp) => tracing::trace!(response = %card::apdu::trace_response(resp), "apdu <<"),
                Err(e) => tracing::trace!(error = %e, "apdu failed"),
            }
            return r;
        }
        self.inner.transmit_raw(apdu)
    }

    fn atr(&self) -> &card::transport::Atr {
        self.inner.atr()
    }

    fn reset(&mut self) -> Result<(), card::transport::TransportError> {
        self.inner.reset()
    }
}

pub fn run(mut reader: Box<dyn CardReader>, ctx: Context) {
    let id = reader.id().clone();
    let _span = tracing::info_span!("reader", reader = %id).entered();
    let lane = |state| {
        let _ = ctx.events.send(Event::Lane { reader: id.clone(), state });
    };
    let mut known = SlotState::Empty;
    // Reader errors in a row, and power cycles since the reader last answered.
    let (mut errors, mut cycles) = (0u32, 0u32);
    lane(LaneState::InsertCard);
    while !ctx.stop.load(Ordering::Relaxed) {
        let state = match reader.wait_change(&known, POLL) {
            Ok(s) => {
                if errors > 0 {
                    tracing::info!(reader = %id, "reader answers again");
                    lane(LaneState::InsertCard);
                }
                (errors, cycles) = (0, 0);
                s
            }
            Err(card::transport::TransportError::Cancelled) => break,
            Err(e) => {
                errors += 1;
                let pause = match ctx.handler.power() {
                    Some(power) if errors >= ERRORS_BEFORE_CYCLE && cycles < MAX_CYCLES => {
                        cycles += 1;
                        errors = 0;
                        tracing::warn!(reader = %id, error = %e, cycle = cycles, "reader stopped answering; power-cycling it");
                        lane(LaneState::ReaderError(format!("{e}; power cycle {cycles} of {MAX_CYCLES}")));
                        if let Err(pe) = power.cycle(&id) {
                            tracing::error!(reader = %id, error = %pe, "power cycle failed");
                        }
                        Duration::from_millis(200)
                    }
                    Some(_) if cycles >= MAX_CYCLES => {
                        if errors == 1 {
                            tracing::error!(reader = %id, error = %e, "reader still not answering after {MAX_CYCLES} power cycles; parked");
                        }
                        lane(LaneState::ReaderError(format!(
                            "parked: {e} (still not answering after {MAX_CYCLES} power cycles)"
                        )));
                        PARKED_RETRY
                    }
                    _ => {
                        lane(LaneState::ReaderError(e.to_string()));
                        Duration::from_secs(1)
                    }
                };
                sleep_or_stop(pause, &ctx.stop);
                continue;
            }
        };
        if state == known {
            continue;
        }
        known = state.clone();
        if state == SlotState::Empty {
            lane(if ctx.control.draining() { LaneState::Idle } else { LaneState::InsertCard });
            continue;
        }
        // A new card: not taken while draining or while the reader is
        // paused (it waits on the reader until resumed).
        if ctx.control.draining() {
            lane(LaneState::Idle);
            continue;
        }
        if ctx.control.is_paused(id.as_str()) {
            lane(LaneState::Paused);
            while ctx.control.is_paused(id.as_str()) && !ctx.stop.load(Ordering::Relaxed) && !ctx.control.draining() {
                std::thread::sleep(POLL);
            }
            let now = reader.wait_change(&known, Duration::ZERO);
            if ctx.stop.load(Ordering::Relaxed) || ctx.control.draining() || !now.is_ok_and(|s| s == known) {
                // Gone meanwhile, or no longer wanted: look again.
                known = SlotState::Empty;
                lane(LaneState::InsertCard);
                continue;
            }
        }
        if !ctx.control.claim() {
            lane(LaneState::Idle);
            continue;
        }
        lane(LaneState::Working);
        let mut tries = 0;
        let outcome = loop {
            let outcome = match process(&mut *reader, &ctx) {
                Ok(o) => o,
                Err(e) => {
                    let _ = ctx.events.send(Event::Fatal { reader: id.clone(), error: e });
                    return;
                }
            };
            // Retry a retryable failure while the same card stays on the
            // reader (connect powers it up afresh); a card that left cannot
            // be retried here.
            let retry = matches!(&outcome.result, Err(f) if f.retryable)
                && tries < ctx.recipe.profile.card_retries
                && !ctx.stop.load(Ordering::Relaxed)
                && reader.wait_change(&known, Duration::ZERO).is_ok_and(|s| s == known);
            if !retry {
                break outcome;
            }
            tries += 1;
            tracing::info!(reader = %id, try = tries + 1, "retrying card after a retryable failure");
        };
        let bin = if outcome.passed() { Bin::Pass } else { Bin::Fail };
        lane(if outcome.passed() { LaneState::Pass } else { LaneState::Fail });
        let _ = ctx.events.send(Event::Outcome(outcome));
        // A fixture that cannot bin the card parks the reader (the card
        // stays on it) until the fixture answers again.
        let mut parked = false;
        while let Err(e) = ctx.handler.try_eject(&id, bin) {
            if !parked {
                tracing::error!(reader = %id, error = %e, "fixture failed; reader parked until it answers again");
                parked = true;
            }
            lane(LaneState::ReaderError(format!("parked: {e}")));
            if sleep_or_stop(PARKED_RETRY, &ctx.stop) {
                break;
            }
        }
        if parked {
            tracing::info!(reader = %id, "fixture answers again; reader back in service");
        }
        lane(LaneState::RemoveCard);
    }
}

/// Connects, runs the recipe and, for a card ready for pairing, serves the
/// coordinator until it gives its verdict. A panic fails the card only.
fn process(reader: &mut dyn CardReader, ctx: &Context) -> Result<CardOutcome, String> {
    let id = reader.id().clone();
    let started = Instant::now();
    let failed = |f: Failure| CardOutcome {
        reader: id.clone(),
        card_id: None,
        result: Err(f),
        elapsed: started.elapsed(),
        attempt: 0,
        ready: None,
    };
    let mut connected = match reader.connect() {
        Ok(t) => t,
        Err(e) => {
            // A reader or pcscd that went away is no fault of the card.
            let retryable = e.is_retryable()
                || matches!(
                    e,
                    card::transport::TransportError::ServiceUnavailable(_)
                        | card::transport::TransportError::ReaderUnavailable(_)
                );
            return Ok(failed(Failure {
                step: Step::Identify,
                reason: "cannot connect to card".into(),
                detail: e.to_string(),
                retryable,
            }));
        }
    };
    let mut transport = Counted { inner: &mut *connected, apdus: 0 };
    let outcome = run_card(&id, &mut transport, ctx, started);
    let _ = ctx.events.send(Event::Apdus { reader: id.clone(), count: transport.apdus });
    outcome
}

fn run_card(
    id: &ReaderId,
    transport: &mut Counted<'_>,
    ctx: &Context,
    started: Instant,
) -> Result<CardOutcome, String> {
    let failed = |f: Failure| CardOutcome {
        reader: id.clone(),
        card_id: None,
        result: Err(f),
        elapsed: started.elapsed(),
        attempt: 0,
        ready: None,
    };
    let mut progress = |p: Progress| {
        let _ = ctx.events.send(Event::Progress { reader: id.clone(), progress: p });
    };
    let run = std::panic::catch_unwind(AssertUnwindSafe(|| ctx.recipe.run(id, &mut *transport, &mut progress)));
    let mut outcome = match run {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(ledger_down)) => return Err(ledger_down.to_string()),
        Err(_) => {
            tracing::error!(reader = %id, "recipe panicked; card failed, reader continues");
            return Ok(failed(Failure {
                step: Step::Identify,
                reason: "internal error".into(),
                detail: "the recipe panicked on this card (see the station log)".into(),
                retryable: true,
            }));
        }
    };
    if let (Some(ready), Some(coordinator)) = (outcome.ready.take(), &ctx.coordinator) {
        let _ = ctx.events.send(Event::Lane { reader: id.clone(), state: LaneState::WaitingForPairing });
        let paired = Instant::now();
        outcome.result = serve_pairing(id, &mut *transport, coordinator, *ready);
        let _ = ctx.events.send(Event::Progress {
            reader: id.clone(),
            progress: Progress::StepDone { step: Step::Pairing, elapsed: paired.elapsed(), ok: outcome.passed() },
        });
        outcome.elapsed = started.elapsed();
    }
    Ok(outcome)
}

/// Hands the ready card to the coordinator and runs its calls on this
/// reader's transport until the verdict arrives.
fn serve_pairing(
    id: &ReaderId,
    t: &mut dyn Transport,
    coordinator: &Coordinator,
    ready: crate::recipe::ReadyCard,
) -> Result<crate::recipe::Passed, Failure> {
    let gone = || Failure {
        step: Step::Pairing,
        reason: "pairing interrupted".into(),
        detail: "the bundle coordinator stopped before this card was paired".into(),
        retryable: true,
    };
    let (tx, rx) = crossbeam_channel::unbounded();
    let waiting = Waiting { card: ready, lane: Lane::new(id.clone(), tx), since: Instant::now() };
    let offered = Instant::now();
    if coordinator.offer(waiting).is_err() {
        return Err(gone());
    }
    let (mut first_call, mut busy) = (None, Duration::ZERO);
    let verdict = loop {
        match rx.recv() {
            Ok(LaneMsg::Job(job)) => {
                let started = Instant::now();
                first_call.get_or_insert(started);
                // A panicking job must not take the reader down; the
                // coordinator sees its reply channel close and aborts.
                if std::panic::catch_unwind(AssertUnwindSafe(|| job(t))).is_err() {
                    tracing::error!(reader = %id, "pairing call panicked");
                }
                busy += started.elapsed();
            }
            Ok(LaneMsg::Verdict(v)) => break v,
            Err(_) => break Err(gone()),
        }
    };
    let end = Instant::now();
    let mut times = PAIRING_TIMES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    times.cards += 1;
    times.partner_wait += first_call.unwrap_or(end) - offered;
    times.card_calls += busy;
    times.held += first_call.map_or(Duration::ZERO, |f| (end - f).saturating_sub(busy));
    verdict
}
