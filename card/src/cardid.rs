//! `CardId`: the chip identity every record is keyed by. It is the CPLC chip
//! identifier (IC fabricator, IC type, IC batch, IC serial: 10 bytes), which
//! the card also returns as SCP03 key diversification data and which its
//! identity certificate names as subject.

use std::fmt;
use std::str::FromStr;

pub const CARD_ID_LEN: usize = 10;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CardId(pub [u8; CARD_ID_LEN]);

impl CardId {
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    pub fn to_hex(&self) -> String {
        hex::encode_upper(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; CARD_ID_LEN] {
        &self.0
    }
}

impl fmt::Display for CardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for CardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CardId({})", self.to_hex())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("card id must be {CARD_ID_LEN} bytes of hex, got {0:?}")]
pub struct BadCardId(String);

impl FromStr for CardId {
    type Err = BadCardId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        hex::decode(s).ok().and_then(|b| Self::from_slice(&b)).ok_or_else(|| BadCardId(s.to_string()))
    }
}
