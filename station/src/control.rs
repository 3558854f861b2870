//! What operators can ask of a station, whichever screen they use: the
//! dashboard's keys, the HTTP API and `station dash --connect` all turn into
//! an `Action` handed to a `Controller`. `station run` and `station daemon`
//! each implement `Controller` over their own batch core.

use serde::{Deserialize, Serialize};

/// One operator request. Serialized as the body of `POST /api/actions`
/// (`docs/api.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Start a batch (daemon only): a profile by name, an optional batch
    /// name and card count (without one the batch runs until drained).
    StartBatch {
        profile: String,
        name: Option<String>,
        cards: Option<usize>,
    },
    /// Finish the cards in flight, take no new ones, then end the batch.
    Drain,
    /// Stop now: cards in flight end at their next step, recorded
    /// failed-and-retryable; waiting cards are released.
    Stop,
    /// Take no new card on this reader until resumed.
    PauseReader {
        reader: String,
    },
    ResumeReader {
        reader: String,
    },
    /// Pause (resume) every reader: the batch takes no new card until
    /// resumed; cards in flight finish.
    Pause,
    Resume,
}

/// A pause or resume: the readers it applies to (one, or every lane),
/// checked against the lanes the station has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PauseRequest {
    pub readers: Vec<String>,
    pub paused: bool,
}

impl PauseRequest {
    /// None when `action` is not a pause or resume; refused when it names a
    /// reader the station does not have.
    pub fn of(action: &Action, lanes: &[crate::state::LaneView]) -> Option<Result<Self, Refused>> {
        let all = || lanes.iter().map(|l| l.reader.clone()).collect();
        let (readers, paused) = match action {
            Action::PauseReader { reader } => (vec![reader.clone()], true),
            Action::ResumeReader { reader } => (vec![reader.clone()], false),
            Action::Pause => (all(), true),
            Action::Resume => (all(), false),
            _ => return None,
        };
        if let Some(r) = readers.iter().find(|r| !lanes.iter().any(|l| &l.reader == *r)) {
            return Some(Err(Refused(format!("no reader named {r:?}"))));
        }
        Some(Ok(Self { readers, paused }))
    }

    /// What the operator reads, e.g. "emu-03 paused" or "8 readers resumed".
    pub fn describe(&self) -> String {
        let what = match self.readers.as_slice() {
            [one] => one.clone(),
            all => format!("{} readers", all.len()),
        };
        format!("{what} {}", if self.paused { "paused" } else { "resumed" })
    }
}

/// Why an action was refused, in words for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{0}")]
pub struct Refused(pub String);

/// Carries out operator actions. Implementations never block on card I/O.
pub trait Controller: Send + Sync {
    /// Does `action`, returning what the operator should read.
    fn act(&self, action: Action) -> Result<String, Refused>;
}

/// The controller of `station run`: one batch, no new batches; drain,
/// stop and pause act on that batch.
pub struct OneBatch {
    pub control: std::sync::Arc<crate::worker::Control>,
    pub live: std::sync::Arc<crate::live::Live>,
}

impl Controller for OneBatch {
    fn act(&self, action: Action) -> Result<String, Refused> {
        use crate::state::{Level, Mode};
        let at = std::time::SystemTime::now();
        let text = match action {
            Action::StartBatch { .. } => {
                return Err(Refused("`station run` runs one batch; start batches with `station daemon`".into()));
            }
            Action::Drain => {
                self.control.drain();
                self.live.model().set_mode(Mode::Draining);
                "draining: finishing the cards in flight".to_string()
            }
            Action::Stop => {
                self.control.interrupt();
                self.live.model().set_mode(Mode::Draining);
                "stopping: interrupting the cards in flight".to_string()
            }
            pause => {
                let request = PauseRequest::of(&pause, &self.live.snapshot().lanes)
                    .unwrap_or_else(|| Err(Refused("not a pause action".into())))?;
                let mut m = self.live.model();
                for r in &request.readers {
                    self.control.set_paused(r, request.paused);
                    m.set_paused(r, request.paused);
                }
                request.describe()
            }
        };
        self.live.model().log(at, Level::Warn, None, text.clone());
        self.live.publish();
        Ok(text)
    }
}
