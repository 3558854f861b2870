//! Card Production Life Cycle data (GET DATA tag 9F7F): 42 bytes of fixed
//! fields written by the chip vendor and card manufacturer. The chip
//! identifier Tapline keys everything by comes from here.

use crate::CardError;
use crate::cardid::CardId;

pub const CPLC_LEN: usize = 42;

/// The CPLC fields, in the order of the 42-byte record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cplc {
    pub ic_fabricator: [u8; 2],
    pub ic_type: [u8; 2],
    pub os_id: [u8; 2],
    pub os_release_date: [u8; 2],
    pub os_release_level: [u8; 2],
    pub ic_fabrication_date: [u8; 2],
    pub ic_serial: [u8; 4],
    pub ic_batch: [u8; 2],
    pub ic_module_fabricator: [u8; 2],
    /// Module packaging date onwards (bytes 20..42), kept as read.
    pub rest: [u8; 22],
}

impl Cplc {
    /// Parses the GET DATA 9F7F response, with or without its `9F7F 2A` header.
    pub fn parse(data: &[u8]) -> Result<Self, CardError> {
        let body = match data {
            [0x9F, 0x7F, len, rest @ ..] if *len as usize == rest.len() => rest,
            _ => data,
        };
        if body.len() != CPLC_LEN {
            return Err(CardError::malformed("CPLC", format!("{} bytes, expected {CPLC_LEN}", body.len())));
        }
        let f = |a: usize, b: usize| &body[a..b];
        let two = |a: usize| -> [u8; 2] { [body[a], body[a + 1]] };
        let mut rest = [0u8; 22];
        rest.copy_from_slice(f(20, 42));
        Ok(Self {
            ic_fabricator: two(0),
            ic_type: two(2),
            os_id: two(4),
            os_release_date: two(6),
            os_release_level: two(8),
            ic_fabrication_date: two(10),
            ic_serial: [body[12], body[13], body[14], body[15]],
            ic_batch: two(16),
            ic_module_fabricator: two(18),
            rest,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(CPLC_LEN + 3);
        out.extend_from_slice(&[0x9F, 0x7F, CPLC_LEN as u8]);
        for part in [
            &self.ic_fabricator[..],
            &self.ic_type,
            &self.os_id,
            &self.os_release_date,
            &self.os_release_level,
            &self.ic_fabrication_date,
            &self.ic_serial,
            &self.ic_batch,
            &self.ic_module_fabricator,
            &self.rest,
        ] {
            out.extend_from_slice(part);
        }
        out
    }

    /// The chip identifier: fabricator, type, batch, serial.
    pub fn card_id(&self) -> CardId {
        let mut id = [0u8; 10];
        id[..2].copy_from_slice(&self.ic_fabricator);
        id[2..4].copy_from_slice(&self.ic_type);
        id[4..6].copy_from_slice(&self.ic_batch);
        id[6..].copy_from_slice(&self.ic_serial);
        CardId(id)
    }

    /// The CPLC a chip with this identifier carries (used by the emulator's
    /// chip factory).
    pub fn for_card(id: &CardId, os_id: [u8; 2]) -> Self {
        let b = id.as_bytes();
        Self {
            ic_fabricator: [b[0], b[1]],
            ic_type: [b[2], b[3]],
            os_id,
            os_release_date: [0x62, 0x10],
            os_release_level: [0x01, 0x00],
            ic_fabrication_date: [0x62, 0x20],
            ic_serial: [b[6], b[7], b[8], b[9]],
            ic_batch: [b[4], b[5]],
            ic_module_fabricator: [0, 0],
            rest: [0; 22],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_card_id() {
        let id = CardId([0x47, 0x90, 0x50, 0x40, 0x12, 0x34, 0xDE, 0xAD, 0xBE, 0xEF]);
        let cplc = Cplc::for_card(&id, [0x47, 0x00]);
        let enc = cplc.encode();
        assert_eq!(enc.len(), 45);
        let parsed = Cplc::parse(&enc).expect("parses");
        assert_eq!(parsed.card_id(), id);
        assert_eq!(Cplc::parse(&enc[3..]).expect("bare").card_id(), id);
        assert!(Cplc::parse(&enc[..20]).is_err());
    }
}
