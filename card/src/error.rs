//! `CardError`: what can go wrong talking to a card above the transport
//! (GlobalPlatform and wallet protocol), for host code in this crate.

use crate::gp::scp03::Scp03Error;
use crate::sw::StatusWord;
use crate::transport::TransportError;

#[derive(Debug, thiserror::Error)]
pub enum CardError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("{command} answered {sw}")]
    Status { command: &'static str, sw: StatusWord },
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("secure channel: {0}")]
    Scp03(#[from] Scp03Error),
    #[error("{what} failed verification: {detail}")]
    Verification { what: &'static str, detail: String },
}

impl CardError {
    pub fn malformed(what: &'static str, detail: impl ToString) -> Self {
        Self::Malformed { what, detail: detail.to_string() }
    }

    pub fn verification(what: &'static str, detail: impl ToString) -> Self {
        Self::Verification { what, detail: detail.to_string() }
    }

    /// True when the same card may succeed on another try (removed, reset,
    /// timed out), as opposed to a card that answered and was wrong.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Transport(t) if t.is_retryable())
    }
}
