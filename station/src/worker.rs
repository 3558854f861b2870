//! One worker thread per reader: it owns its `CardReader`, waits for a
//! card, runs the recipe, hands the card to the `CardHandler`, and reports
//! everything as events. A failing, hostile or panicking card only ever
//! affects its own reader.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use card::transport::{CardReader, ReaderId, SlotState};
use crossbeam_channel::Sender;

use crate::handler::{Bin, CardHandler};
use crate::recipe::{CardOutcome, Failure, Progress, Recipe, Step};

/// What a lane (reader) shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaneState {
    InsertCard,
    Working,
    Pass,
    Fail,
    RemoveCard,
    ReaderError(String),
}

/// Everything workers report.
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
    Outcome(CardOutcome),
    /// The station cannot go on (the ledger stopped recording).
    Fatal {
        reader: ReaderId,
        error: String,
    },
}

/// How often a worker looks at its stop flag while waiting.
const POLL: Duration = Duration::from_millis(200);

pub fn run(
    mut reader: Box<dyn CardReader>,
    recipe: Arc<Recipe>,
    handler: Arc<dyn CardHandler>,
    events: Sender<Event>,
    stop: Arc<AtomicBool>,
) {
    let id = reader.id().clone();
    let lane = |state| {
        let _ = events.send(Event::Lane { reader: id.clone(), state });
    };
    let mut known = SlotState::Empty;
    lane(LaneState::InsertCard);
    while !stop.load(Ordering::Relaxed) {
        let state = match reader.wait_change(&known, POLL) {
            Ok(s) => s,
            Err(e) => {
                lane(LaneState::ReaderError(e.to_string()));
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        if state == known {
            continue;
        }
        known = state.clone();
        if state == SlotState::Empty {
            lane(LaneState::InsertCard);
            continue;
        }
        lane(LaneState::Working);
        let mut tries = 0;
        let outcome = loop {
            let outcome = match process(&mut *reader, &recipe, &events) {
                Ok(o) => o,
                Err(e) => {
                    let _ = events.send(Event::Fatal { reader: id.clone(), error: e });
                    return;
                }
            };
            // Retry a retryable failure while the same card stays on the
            // reader (connect powers it up afresh); a card that left cannot
            // be retried here.
            let retry = matches!(&outcome.result, Err(f) if f.retryable)
                && tries < recipe.profile.card_retries
                && !stop.load(Ordering::Relaxed)
                && reader.wait_change(&known, Duration::ZERO).is_ok_and(|s| s == known);
            if !retry {
                break outcome;
            }
            tries += 1;
            tracing::info!(reader = %id, try = tries + 1, "retrying card after a retryable failure");
        };
        let bin = if outcome.passed() { Bin::Pass } else { Bin::Fail };
        lane(if outcome.passed() { LaneState::Pass } else { LaneState::Fail });
        let _ = events.send(Event::Outcome(outcome));
        handler.eject(&id, bin);
        lane(LaneState::RemoveCard);
    }
}

/// Connects and runs the recipe, turning a panic into a failed card.
fn process(reader: &mut dyn CardReader, recipe: &Recipe, events: &Sender<Event>) -> Result<CardOutcome, String> {
    let id = reader.id().clone();
    let started = std::time::Instant::now();
    let failed = |f: Failure| CardOutcome {
        reader: id.clone(),
        card_id: None,
        result: Err(f),
        elapsed: started.elapsed(),
        attempt: 0,
    };
    let mut transport = match reader.connect() {
        Ok(t) => t,
        Err(e) => {
            let retryable = e.is_retryable();
            return Ok(failed(Failure {
                step: Step::Identify,
                reason: "cannot connect to card".into(),
                detail: e.to_string(),
                retryable,
            }));
        }
    };
    let mut progress = |p: Progress| {
        let _ = events.send(Event::Progress { reader: id.clone(), progress: p });
    };
    let run = std::panic::catch_unwind(AssertUnwindSafe(|| recipe.run(&id, &mut *transport, &mut progress)));
    match run {
        Ok(Ok(outcome)) => Ok(outcome),
        Ok(Err(ledger_down)) => Err(ledger_down.to_string()),
        Err(_) => {
            tracing::error!(reader = %id, "recipe panicked; card failed, reader continues");
            Ok(failed(Failure {
                step: Step::Identify,
                reason: "internal error".into(),
                detail: "the recipe panicked on this card (see the station log)".into(),
                retryable: true,
            }))
        }
    }
}
