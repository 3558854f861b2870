//! Host side of the wallet applet protocol: typed commands over a
//! `Transport`. It parses what the card says; deciding whether to trust it
//! (certificate chains, challenges, counters) is the caller's job, with the
//! verification functions of `wallet` and `wallet::cert`.

use super::cert::Certificate;
use super::{APPLET_AID, Attestation, CLA, Lifecycle, WalletKeyProof, ins, self_test, tag};
use crate::CardError;
use crate::apdu::{Command, Response};
use crate::sw::StatusWord;
use crate::tlv;
use crate::transport::Transport;

/// What SELECT of the wallet applet reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelectInfo {
    pub protocol_version: u8,
    pub lifecycle: Lifecycle,
}

/// The host's handle on the wallet applet of one connected card.
pub struct WalletClient<'t> {
    t: &'t mut dyn Transport,
}

fn expect_ok(command: &'static str, resp: Response) -> Result<Vec<u8>, CardError> {
    if resp.sw == StatusWord::OK { Ok(resp.data) } else { Err(CardError::Status { command, sw: resp.sw }) }
}

impl<'t> WalletClient<'t> {
    pub fn new(t: &'t mut dyn Transport) -> Self {
        Self { t }
    }

    fn call(&mut self, name: &'static str, cmd: Command) -> Result<Vec<u8>, CardError> {
        let resp = self.t.transmit(&cmd)?;
        expect_ok(name, resp)
    }

    /// SELECT the wallet applet by AID; answers protocol version and lifecycle.
    pub fn select(&mut self) -> Result<SelectInfo, CardError> {
        let data =
            self.call("SELECT wallet", Command::new(0x00, 0xA4, 0x04, 0x00).with_data(APPLET_AID).with_le(256))?;
        let bad = |e: tlv::TlvError| CardError::malformed("SELECT response", e);
        let objs = tlv::parse_all(&data).map_err(bad)?;
        let version = tlv::require_array::<1>(&objs, tag::VERSION).map_err(bad)?[0];
        let lc = tlv::require_array::<1>(&objs, tag::LIFECYCLE).map_err(bad)?[0];
        let lifecycle = Lifecycle::from_byte(lc)
            .ok_or_else(|| CardError::malformed("SELECT response", format!("unknown lifecycle {lc:02X}")))?;
        Ok(SelectInfo { protocol_version: version, lifecycle })
    }

    pub fn identity(&mut self) -> Result<Certificate, CardError> {
        let data = self.call("GET IDENTITY", Command::new(CLA, ins::GET_IDENTITY, 0, 0).with_le(256))?;
        Certificate::parse(&data)
    }

    pub fn attest(&mut self, challenge: &[u8; 32]) -> Result<Attestation, CardError> {
        let data =
            self.call("ATTEST", Command::new(CLA, ins::ATTEST, 0, 0).with_data(challenge.to_vec()).with_le(256))?;
        Attestation::parse(&data)
    }

    pub fn generate_wallet_key(&mut self) -> Result<WalletKeyProof, CardError> {
        let data = self.call("GENERATE WALLET KEY", Command::new(CLA, ins::GENERATE_WALLET_KEY, 0, 0).with_le(256))?;
        WalletKeyProof::parse(&data)
    }

    /// The wallet key proof, or `None` when the card has no wallet key yet.
    pub fn wallet_key(&mut self) -> Result<Option<WalletKeyProof>, CardError> {
        let resp = self.t.transmit(&Command::new(CLA, ins::GET_WALLET_KEY, 0, 0).with_le(256))?;
        if resp.sw == StatusWord::REFERENCED_DATA_NOT_FOUND {
            return Ok(None);
        }
        WalletKeyProof::parse(&expect_ok("GET WALLET KEY", resp)?).map(Some)
    }

    /// Signs a 32-byte digest with the wallet key.
    pub fn sign(&mut self, digest: &[u8; 32]) -> Result<[u8; 64], CardError> {
        let data = self.call("SIGN", Command::new(CLA, ins::SIGN, 0, 0).with_data(digest.to_vec()).with_le(256))?;
        let bad = |e: tlv::TlvError| CardError::malformed("SIGN response", e);
        let objs = tlv::parse_all(&data).map_err(bad)?;
        tlv::require_array(&objs, tag::SIGNATURE).map_err(bad)
    }

    /// Runs the on-card known-answer tests; returns the bitmap of passed tests.
    pub fn self_test_kat(&mut self) -> Result<u8, CardError> {
        let data = self.call("SELF TEST (KAT)", Command::new(CLA, ins::SELF_TEST, self_test::KAT, 0).with_le(256))?;
        let bad = |e: tlv::TlvError| CardError::malformed("SELF TEST (KAT) response", e);
        let objs = tlv::parse_all(&data).map_err(bad)?;
        Ok(tlv::require_array::<1>(&objs, tag::KAT_RESULT).map_err(bad)?[0])
    }

    /// Has the card key sign a host test vector (domain-separated).
    pub fn self_test_sign(&mut self, vector: &[u8]) -> Result<[u8; 64], CardError> {
        let data = self.call(
            "SELF TEST (sign)",
            Command::new(CLA, ins::SELF_TEST, self_test::SIGN_VECTOR, 0).with_data(vector.to_vec()).with_le(256),
        )?;
        let bad = |e: tlv::TlvError| CardError::malformed("SELF TEST (sign) response", e);
        let objs = tlv::parse_all(&data).map_err(bad)?;
        tlv::require_array(&objs, tag::SIGNATURE).map_err(bad)
    }

    /// Has the card write a pattern to its test region, read it back, and
    /// return the SHA-256 of what it read.
    pub fn self_test_memory(&mut self, seed: &[u8; 4], len: u16) -> Result<[u8; 32], CardError> {
        let mut body = seed.to_vec();
        body.extend_from_slice(&len.to_be_bytes());
        let data = self.call(
            "SELF TEST (memory)",
            Command::new(CLA, ins::SELF_TEST, self_test::MEMORY, 0).with_data(body).with_le(256),
        )?;
        let bad = |e: tlv::TlvError| CardError::malformed("SELF TEST (memory) response", e);
        let objs = tlv::parse_all(&data).map_err(bad)?;
        tlv::require_array(&objs, tag::DIGEST).map_err(bad)
    }

    /// ISO GET CHALLENGE: `n` bytes from the card's random number generator.
    pub fn get_challenge(&mut self, n: usize) -> Result<Vec<u8>, CardError> {
        let data = self.call("GET CHALLENGE", Command::new(0x00, ins::GET_CHALLENGE, 0, 0).with_le(n))?;
        if data.len() != n {
            return Err(CardError::malformed("GET CHALLENGE response", format!("{} bytes, asked {n}", data.len())));
        }
        Ok(data)
    }
}
