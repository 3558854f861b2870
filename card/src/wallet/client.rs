//! Host side of the wallet applet protocol: typed commands over a
//! `Transport`. It parses what the card says; deciding whether to trust it
//! (certificate chains, challenges, counters) is the caller's job, with the
//! verification functions of `wallet`, `wallet::cert` and `wallet::bundle`.
//! The backup-linking commands relay what one card produced to another;
//! none of them carries a secret the host could read.

use super::bundle::{ImportConfirmation, LinkAttestation, Role, TransferBlob, WalletProof};
use super::cert::Certificate;
use super::{
    ACCESS_CODE_REFERENCE, APPLET_AID, Attestation, CLA, CLA_CHAINING, Lifecycle, WalletKeyProof, ins, self_test, tag,
};
use crate::CardError;
use crate::apdu::{Command, Response, SHORT_MAX_DATA};
use crate::cardid::CardId;
use crate::sw::StatusWord;
use crate::tlv;
use crate::transport::Transport;

/// What SELECT of the wallet applet reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelectInfo {
    pub protocol_version: u8,
    pub lifecycle: Lifecycle,
    /// The card's role, when it is in a bundle (linked or sealed).
    pub role: Option<Role>,
    /// The card's bundle, when it is in one.
    pub bundle_id: Option<[u8; 16]>,
    /// The card holds a wallet key (generated or imported).
    pub has_wallet_key: bool,
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

    /// Sends `data` as one command, or as an ISO 7816-4 chain of short
    /// APDUs (CLA 90 for every part but the last) when it does not fit one.
    fn call_chained(
        &mut self,
        name: &'static str,
        ins: u8,
        data: &[u8],
        le: Option<usize>,
    ) -> Result<Vec<u8>, CardError> {
        let mut parts = data.chunks(SHORT_MAX_DATA).collect::<Vec<_>>();
        let last = parts.pop().unwrap_or_default();
        for part in parts {
            self.call(name, Command::new(CLA_CHAINING, ins, 0, 0).with_data(part.to_vec()))?;
        }
        let mut cmd = Command::new(CLA, ins, 0, 0);
        if !last.is_empty() {
            cmd = cmd.with_data(last.to_vec());
        }
        if let Some(le) = le {
            cmd = cmd.with_le(le);
        }
        self.call(name, cmd)
    }

    /// SELECT the wallet applet by AID; answers protocol version, lifecycle,
    /// whether the card holds a wallet key and, in a bundle, role and bundle.
    pub fn select(&mut self) -> Result<SelectInfo, CardError> {
        let data =
            self.call("SELECT wallet", Command::new(0x00, 0xA4, 0x04, 0x00).with_data(APPLET_AID).with_le(256))?;
        let bad = |e: tlv::TlvError| CardError::malformed("SELECT response", e);
        let objs = tlv::parse_all(&data).map_err(bad)?;
        let version = tlv::require_array::<1>(&objs, tag::VERSION).map_err(bad)?[0];
        let lc = tlv::require_array::<1>(&objs, tag::LIFECYCLE).map_err(bad)?[0];
        let lifecycle = Lifecycle::from_byte(lc)
            .ok_or_else(|| CardError::malformed("SELECT response", format!("unknown lifecycle {lc:02X}")))?;
        let has_wallet_key = match tlv::require_array::<1>(&objs, tag::HAS_WALLET_KEY).map_err(bad)?[0] {
            0x00 => false,
            0x01 => true,
            b => return Err(CardError::malformed("SELECT response", format!("wallet key flag {b:02X}"))),
        };
        let role = match tlv::find(&objs, tag::ROLE) {
            None => None,
            Some(&[b]) => Some(
                Role::from_byte(b)
                    .ok_or_else(|| CardError::malformed("SELECT response", format!("unknown role {b:02X}")))?,
            ),
            Some(v) => return Err(CardError::malformed("SELECT response", format!("role of {} bytes", v.len()))),
        };
        let bundle_id = match tlv::find(&objs, tag::BUNDLE_ID) {
            None => None,
            Some(_) => Some(tlv::require_array::<16>(&objs, tag::BUNDLE_ID).map_err(bad)?),
        };
        if role.is_some() != bundle_id.is_some() {
            return Err(CardError::malformed("SELECT response", "role and bundle id come together"));
        }
        Ok(SelectInfo { protocol_version: version, lifecycle, role, bundle_id, has_wallet_key })
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

    // -- Backup linking (docs/card-protocol.md, section 16).

    /// LINK PRIMARY: a Keyed card becomes the primary of `bundle_id` with
    /// `backups` (1..=4) backups to come; answers its fresh link nonce.
    pub fn link_primary(&mut self, bundle_id: &[u8; 16], backups: u8) -> Result<[u8; 32], CardError> {
        let mut body = bundle_id.to_vec();
        body.push(backups);
        let data =
            self.call("LINK PRIMARY", Command::new(CLA, ins::LINK_PRIMARY, 0, 0).with_data(body).with_le(256))?;
        let bad = |e: tlv::TlvError| CardError::malformed("LINK PRIMARY response", e);
        let nonce = tlv::require_array(&tlv::parse_all(&data).map_err(bad)?, tag::LINK_NONCE).map_err(bad)?;
        if tlv::tlv(tag::LINK_NONCE, &nonce) != data {
            return Err(CardError::malformed("LINK PRIMARY response", "not in canonical encoding"));
        }
        Ok(nonce)
    }

    /// LINK BACKUP: an Installed card checks the primary's certificate (as
    /// GET IDENTITY returned it) and links to the primary's nonce; answers
    /// its link attestation.
    pub fn link_backup(
        &mut self,
        bundle_id: &[u8; 16],
        primary_cert: &[u8],
        nonce: &[u8; 32],
    ) -> Result<LinkAttestation, CardError> {
        let body = [&bundle_id[..], nonce, primary_cert].concat();
        let data = self.call_chained("LINK BACKUP", ins::LINK_BACKUP, &body, Some(256))?;
        LinkAttestation::parse(&data)
    }

    /// ADD BACKUP: the primary checks a backup's certificate and link
    /// attestation and records the backup. Sent as a chain of two APDUs.
    pub fn add_backup(&mut self, backup_cert: &[u8], attestation: &LinkAttestation) -> Result<(), CardError> {
        let body = [backup_cert, &attestation.encode()].concat();
        self.call_chained("ADD BACKUP", ins::ADD_BACKUP, &body, None).map(drop)
    }

    /// EXPORT: the primary encrypts the wallet secret to a recorded backup;
    /// answers the transfer blob to relay (checked to parse as one).
    pub fn export_to(&mut self, backup: &CardId) -> Result<Vec<u8>, CardError> {
        let data = self
            .call("EXPORT", Command::new(CLA, ins::EXPORT, 0, 0).with_data(backup.as_bytes().to_vec()).with_le(256))?;
        TransferBlob::parse(&data)?;
        Ok(data)
    }

    /// IMPORT: a linked backup opens the primary's transfer blob; answers
    /// its import confirmation.
    pub fn import(&mut self, blob: &[u8]) -> Result<ImportConfirmation, CardError> {
        let data = self.call_chained("IMPORT", ins::IMPORT, blob, Some(256))?;
        ImportConfirmation::parse(&data)
    }

    /// CONFIRM BACKUP: the primary checks a backup's import confirmation.
    pub fn confirm_backup(&mut self, confirmation: &ImportConfirmation) -> Result<(), CardError> {
        self.call_chained("CONFIRM BACKUP", ins::CONFIRM_BACKUP, &confirmation.encode(), None).map(drop)
    }

    /// PROVE WALLET: the wallet key signs the host's challenge.
    pub fn prove_wallet(&mut self, challenge: &[u8; 32]) -> Result<WalletProof, CardError> {
        let data = self.call(
            "PROVE WALLET",
            Command::new(CLA, ins::PROVE_WALLET, 0, 0).with_data(challenge.to_vec()).with_le(256),
        )?;
        WalletProof::parse(&data)
    }

    /// FINALIZE: seals the card; answers the card-key signature over the
    /// sealed message (`bundle::sealed_digest`).
    pub fn finalize(&mut self) -> Result<[u8; 64], CardError> {
        let data = self.call("FINALIZE", Command::new(CLA, ins::FINALIZE, 0, 0).with_le(256))?;
        let bad = |e: tlv::TlvError| CardError::malformed("FINALIZE response", e);
        let sig = tlv::require_array(&tlv::parse_all(&data).map_err(bad)?, tag::SIGNATURE).map_err(bad)?;
        if tlv::tlv(tag::SIGNATURE, &sig) != data {
            return Err(CardError::malformed("FINALIZE response", "not in canonical encoding"));
        }
        Ok(sig)
    }

    /// ABORT BUNDLE: an unsealed card drops its bundle and its wallet key
    /// and is Installed again (rework).
    pub fn abort_bundle(&mut self) -> Result<(), CardError> {
        self.call("ABORT BUNDLE", Command::new(CLA, ins::ABORT_BUNDLE, 0, 0)).map(drop)
    }

    /// SET ACCESS CODE: the owner's code (6..=16 bytes), once, on a sealed
    /// card. The station never calls this.
    pub fn set_access_code(&mut self, code: &[u8]) -> Result<(), CardError> {
        self.call("SET ACCESS CODE", Command::new(CLA, ins::SET_ACCESS_CODE, 0, 0).with_data(code.to_vec())).map(drop)
    }

    /// ISO VERIFY of the owner's access code: unlocks SIGN on a sealed card
    /// until power-off. A wrong code answers `63Cx` (x tries left), a
    /// blocked one `6983`.
    pub fn verify_access_code(&mut self, code: &[u8]) -> Result<(), CardError> {
        self.call("VERIFY", Command::new(0x00, ins::VERIFY, 0x00, ACCESS_CODE_REFERENCE).with_data(code.to_vec()))
            .map(drop)
    }
}
