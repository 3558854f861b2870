//! The hardware seams every card conversation goes through: `Transport` (one
//! connected card), `CardReader` (one slot: presence and connect) and
//! `ReaderMonitor` (which readers exist). Raw APDU bytes live only below
//! `Transport::transmit_raw`; GET RESPONSE / wrong-Le handling lives here,
//! in one place, for every backend.

pub mod emu;
pub mod pcsc;

use std::fmt;
use std::time::Duration;

use crate::apdu::{ApduError, Command, Response};

/// A stable reader identifier, shown everywhere (ledger, logs, dashboard).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReaderId(pub String);

impl ReaderId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ReaderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ReaderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReaderId({})", self.0)
    }
}

/// Answer To Reset as the reader reported it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Atr(pub Vec<u8>);

impl fmt::Debug for Atr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Atr({})", hex::encode_upper(&self.0))
    }
}

/// Failures below the APDU layer. Card removed, reset and timeouts are their
/// own variants because the recipe treats them as retryable.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("card removed from the reader")]
    CardRemoved,
    #[error("card was reset")]
    CardReset,
    #[error("no card in the reader")]
    NoCard,
    #[error("card did not answer within {0:?}")]
    Timeout(Duration),
    #[error("reader {0} is not available")]
    ReaderUnavailable(String),
    #[error("malformed APDU: {0}")]
    Malformed(#[from] ApduError),
    #[error("GET RESPONSE chain exceeded {0} bytes")]
    ResponseTooLong(usize),
    #[error("operation cancelled")]
    Cancelled,
    /// The PC/SC service (pcscd) stopped, restarted or cannot be reached.
    /// Not retryable on its own: the context must be established again
    /// (`transport::pcsc` readers do that themselves in `wait_change`).
    #[error("PC/SC service unavailable")]
    ServiceUnavailable(#[source] ::pcsc::Error),
    /// Any other PC/SC failure, with the call that failed (e.g. a sharing
    /// violation when another application holds the reader exclusively).
    #[error("PC/SC {operation} failed: {source}")]
    Pcsc {
        operation: &'static str,
        #[source]
        source: ::pcsc::Error,
    },
}

impl TransportError {
    /// True when trying the same card again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::CardRemoved | Self::CardReset | Self::NoCard | Self::Timeout(_))
    }
}

/// The limit on a response assembled from GET RESPONSE chaining; a hostile
/// card answering 61xx forever must not grow memory without bound.
const MAX_CHAINED_RESPONSE: usize = 65_536 + 256;

/// One connected card. Implementations move raw bytes; [`Transport::transmit`]
/// adds ISO 7816-4 response chaining on top for all of them.
pub trait Transport {
    /// Sends one command APDU and returns the raw response (data + SW1 SW2).
    fn transmit_raw(&mut self, apdu: &[u8]) -> Result<Vec<u8>, TransportError>;

    /// The ATR of the connected card.
    fn atr(&self) -> &Atr;

    /// Warm reset: the card keeps its persistent state and loses its
    /// session (selected applet, secure channel).
    fn reset(&mut self) -> Result<(), TransportError>;

    /// Sends a typed command; follows 61xx with GET RESPONSE and repeats a
    /// command answered 6Cxx with the length the card asked for.
    fn transmit(&mut self, cmd: &Command) -> Result<Response, TransportError> {
        let raw = self.transmit_raw(&cmd.to_bytes()?)?;
        let mut resp = Response::parse(&raw)?;
        if let Some(le) = resp.sw.correct_le() {
            let mut again = cmd.clone();
            again.le = Some(le);
            resp = Response::parse(&self.transmit_raw(&again.to_bytes()?)?)?;
        }
        let mut data = std::mem::take(&mut resp.data);
        while let Some(n) = resp.sw.bytes_available() {
            let get = Command::new(cmd.cla & 0x03, 0xC0, 0x00, 0x00).with_le(n);
            resp = Response::parse(&self.transmit_raw(&get.to_bytes()?)?)?;
            data.extend_from_slice(&resp.data);
            if data.len() > MAX_CHAINED_RESPONSE {
                return Err(TransportError::ResponseTooLong(MAX_CHAINED_RESPONSE));
            }
        }
        resp.data = data;
        Ok(resp)
    }
}

/// What a reader slot holds. `insertion` changes with every card inserted,
/// so a worker can tell a new card from the one it just finished even when
/// both have the same ATR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    Empty,
    Present { atr: Atr, insertion: u64 },
}

/// One reader slot: card presence and connecting to the card in it.
/// Each worker thread owns exactly one `CardReader`.
pub trait CardReader: Send {
    fn id(&self) -> &ReaderId;

    /// Waits up to `timeout` for the slot to differ from `known` and returns
    /// the current state (unchanged on timeout).
    fn wait_change(&mut self, known: &SlotState, timeout: Duration) -> Result<SlotState, TransportError>;

    /// Connects to the card in the slot.
    fn connect(&mut self) -> Result<Box<dyn Transport + Send + '_>, TransportError>;
}

/// Which readers exist; opens a slot for a worker.
pub trait ReaderMonitor: Send {
    fn readers(&mut self) -> Result<Vec<ReaderId>, TransportError>;
    fn open(&mut self, id: &ReaderId) -> Result<Box<dyn CardReader>, TransportError>;

    /// Wakes every blocked wait of this monitor and of the readers it
    /// opened (shutdown); they return `TransportError::Cancelled`.
    fn cancel_waits(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sw::StatusWord;

    /// A scripted transport: answers are queued raw responses.
    struct Scripted {
        atr: Atr,
        sent: Vec<Vec<u8>>,
        answers: Vec<Vec<u8>>,
    }

    impl Transport for Scripted {
        fn transmit_raw(&mut self, apdu: &[u8]) -> Result<Vec<u8>, TransportError> {
            self.sent.push(apdu.to_vec());
            if self.answers.is_empty() {
                return Err(TransportError::CardRemoved);
            }
            Ok(self.answers.remove(0))
        }
        fn atr(&self) -> &Atr {
            &self.atr
        }
        fn reset(&mut self) -> Result<(), TransportError> {
            Ok(())
        }
    }

    #[test]
    fn get_response_chaining_is_followed() {
        let mut t = Scripted {
            atr: Atr::default(),
            sent: vec![],
            answers: vec![vec![1, 2, 0x61, 0x02], vec![3, 4, 0x61, 0x01], vec![5, 0x90, 0x00]],
        };
        let r = t.transmit(&Command::new(0x80, 0xCA, 0x9F, 0x7F).with_le(256)).expect("ok");
        assert_eq!(r.data, [1, 2, 3, 4, 5]);
        assert_eq!(r.sw, StatusWord::OK);
        assert_eq!(t.sent[1], [0x00, 0xC0, 0x00, 0x00, 0x02]);
    }

    #[test]
    fn wrong_le_is_repeated_with_the_cards_length() {
        let mut t =
            Scripted { atr: Atr::default(), sent: vec![], answers: vec![vec![0x6C, 0x03], vec![7, 8, 9, 0x90, 0x00]] };
        let r = t.transmit(&Command::new(0x00, 0x84, 0x00, 0x00).with_le(8)).expect("ok");
        assert_eq!(r.data, [7, 8, 9]);
        assert_eq!(t.sent[1], [0x00, 0x84, 0x00, 0x00, 0x03]);
    }

    #[test]
    fn endless_chaining_is_bounded() {
        let mut t = Scripted { atr: Atr::default(), sent: vec![], answers: vec![] };
        t.answers = std::iter::repeat_n(
            {
                let mut v = vec![0u8; 256];
                v.extend([0x61, 0x00]);
                v
            },
            400,
        )
        .collect();
        let err = t.transmit(&Command::new(0x80, 0xCA, 0, 0).with_le(256)).expect_err("bounded");
        assert!(matches!(err, TransportError::ResponseTooLong(_)));
    }
}
