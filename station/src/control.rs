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

/// The readers a pause or resume applies to (one, or every lane), and
/// whether it pauses.
pub fn pause_targets(action: &Action, lanes: &[crate::state::LaneView]) -> Option<(Vec<String>, bool)> {
    match action {
        Action::PauseReader { reader } => Some((vec![reader.clone()], true)),
        Action::ResumeReader { reader } => Some((vec![reader.clone()], false)),
        Action::Pause => Some((lanes.iter().map(|l| l.reader.clone()).collect(), true)),
        Action::Resume => Some((lanes.iter().map(|l| l.reader.clone()).collect(), false)),
        _ => None,
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
                let lanes = self.live.snapshot().lanes.clone();
                let Some((readers, paused)) = pause_targets(&pause, &lanes) else {
                    return Err(Refused("not a pause action".into()));
                };
                if let Some(r) = readers.iter().find(|r| !lanes.iter().any(|l| &l.reader == *r)) {
                    return Err(Refused(format!("no reader named {r:?}")));
                }
                let mut m = self.live.model();
                for r in &readers {
                    self.control.set_paused(r, paused);
                    m.set_paused(r, paused);
                }
                drop(m);
                let what = if readers.len() == 1 { readers[0].clone() } else { format!("{} readers", readers.len()) };
                format!("{what} {}", if paused { "paused" } else { "resumed" })
            }
        };
        self.live.model().log(at, Level::Warn, None, text.clone());
        self.live.publish();
        Ok(text)
    }
}
