//! The card emulator: a model of a JavaCard with a GlobalPlatform card
//! manager and the Tapline wallet applet, with persistent memory and
//! JavaCard-like atomicity (`memory`), a latency model (`latency`), a fault
//! script (`CardFaults`) and a chip factory (`factory`). It is a model with
//! state, not canned bytes: every answer is computed from what the card holds.
//! Emulated cards are for tests and demos only: their keys come from a
//! deterministic generator.

mod applet;
mod card_manager;
pub mod factory;
pub mod latency;
mod linking;
pub mod memory;

use std::sync::Arc;
use std::time::Duration;

use k256::ecdsa::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use self::latency::{Cost, LatencyModel};
use self::memory::{Link, Persistent, Selected, Transient};
use crate::apdu::{Command, Response};
use crate::cardid::CardId;
use crate::gp::cplc::Cplc;
use crate::sw::StatusWord;

/// Consecutive failed EXTERNAL AUTHENTICATE after which the card manager
/// locks itself (real cards use 3 to 10; the exact number is vendor-set).
pub const AUTH_FAILURE_LIMIT: u8 = 10;

/// When a scripted removal happens relative to the card processing the APDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TearPoint {
    /// The card loses power before it processes the APDU: no state change.
    Before,
    /// The card processes and commits, then loses power before answering.
    After,
}

/// The fault script of one card. APDU numbers count from 1 over the card's
/// whole life (all sessions), and each scripted event fires once.
#[derive(Debug, Clone, PartialEq)]
pub struct CardFaults {
    /// Pull the card out of the field at APDU n.
    pub remove_at: Option<(u64, TearPoint)>,
    /// From APDU n on, the card never answers.
    pub mute_from: Option<u64>,
    /// At APDU n the card browns out and resets (weak field): it stays on
    /// the reader but loses its session; the APDU is not processed.
    pub reset_at: Option<u64>,
    /// Answer every command with this INS with this status word.
    pub wrong_sw: Option<(u8, StatusWord)>,
    /// Corrupt every signature the card makes with its card key.
    pub bad_signature: bool,
    /// The RNG is stuck: GET CHALLENGE returns a constant.
    pub stuck_rng: bool,
    /// A crypto engine fails its known-answer test.
    pub failing_kat: bool,
    /// A memory cell is stuck: the memory test reads back wrong data.
    pub bad_memory: bool,
    /// Latency multiplier on top of the card's latency model (a degraded
    /// card or reader; a slow card *type* is `LatencyModel::SLOW`).
    pub slow_factor: f64,
    /// At APDU n one bit of the response changes on its way to the host
    /// (a tampering relay or reader): the card processed and committed the
    /// command as usual; only the answer is altered.
    pub flip_response: Option<(u64, ResponseFlip)>,
    /// At APDU n the host gets this status word, with no data and no
    /// R-MAC, instead of the card's answer: the card processed the command
    /// as usual (so the secure channel's MAC chain stays in step), a relay
    /// swapped the answer. Error status words carry no R-MAC (GP Amendment
    /// D §6.2.5), so this cannot be told from the card's own: the host must
    /// not act irreversibly on one.
    pub forged_error: Option<(u64, StatusWord)>,
    /// ATTEST answers with the previous ATTEST response this card gave (as
    /// a relay that recorded it would), once there is one. The card still
    /// counts the attestation it was asked for.
    pub replay_attestation: bool,
}

/// Which bit of a response a [`CardFaults::flip_response`] fault flips.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFlip {
    /// The lowest bit of the first data byte (response data proper when
    /// the response carries more than its R-MAC).
    Data,
    /// The lowest bit of the last data byte: the R-MAC's last byte in a
    /// secure channel with R-MAC.
    RMac,
}

impl Default for CardFaults {
    fn default() -> Self {
        Self {
            remove_at: None,
            mute_from: None,
            reset_at: None,
            wrong_sw: None,
            bad_signature: false,
            stuck_rng: false,
            failing_kat: false,
            bad_memory: false,
            slow_factor: 1.0,
            flip_response: None,
            forged_error: None,
            replay_attestation: false,
        }
    }
}

impl CardFaults {
    pub fn is_clean(&self) -> bool {
        *self == Self::default()
    }
}

/// What happened to one APDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exchange {
    /// The card answered after `latency` (modeled, at speed 1.0).
    Answer { response: Vec<u8>, latency: Duration },
    /// The card left the field (scripted removal) after `latency`.
    Removed { latency: Duration },
    /// The card does not answer.
    Mute,
    /// The card reset itself; it is still in the field.
    Reset,
}

/// The immutable identity burned into the chip at manufacture.
pub struct Chip {
    pub id: CardId,
    pub cplc: Cplc,
    pub card_key: SigningKey,
    pub certificate: Vec<u8>,
    pub atr: Vec<u8>,
    /// The vendor CA public key the card checks its peers' certificates
    /// against during backup linking (the vendor writes it with the
    /// certificate; a counterfeit chip carries the genuine one to look
    /// genuine, but its own certificate does not chain to it).
    pub vendor_ca: VerifyingKey,
}

/// A deterministic random bit generator standing in for the chip's TRNG:
/// SHA-256 in counter mode over a per-chip seed. Its state is physical,
/// not memory: it does not rewind at power-up.
pub struct Drbg {
    seed: [u8; 32],
    counter: u64,
}

impl Drbg {
    pub fn new(seed: [u8; 32]) -> Self {
        Self { seed, counter: 0 }
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(32) {
            let mut h = Sha256::new();
            h.update(self.seed);
            h.update(self.counter.to_be_bytes());
            self.counter += 1;
            let block = h.finalize();
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
    }

    pub fn scalar(&mut self) -> SigningKey {
        loop {
            let mut b = [0u8; 32];
            self.fill(&mut b);
            if let Ok(k) = SigningKey::from_slice(&b) {
                return k;
            }
        }
    }
}

/// A package as the card holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageView {
    pub aid: Vec<u8>,
    pub version: (u8, u8),
    /// SHA-256 of the load file the card received.
    pub hash: [u8; 32],
}

/// A read-only view of a card's real state, for tests and for comparing
/// the ledger with the cards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardView {
    pub id: CardId,
    pub card_state: u8,
    pub key_versions: Vec<u8>,
    pub auth_failures: u8,
    pub packages: Vec<PackageView>,
    pub instances: Vec<(Vec<u8>, u8)>,
    pub wallet_lifecycle: Option<crate::wallet::Lifecycle>,
    pub wallet_public_key: Option<[u8; 33]>,
    /// The wallet's bundle membership (backup linking).
    pub wallet_bundle: Option<BundleView>,
    /// Tries left of the owner access code, once one is set.
    pub access_code_tries: Option<u8>,
    pub attest_counter: u32,
    pub apdus: u64,
}

/// A read-only view of a wallet's bundle membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleView {
    pub role: crate::wallet::Role,
    pub bundle_id: [u8; 16],
    /// A primary's link nonce.
    pub nonce: Option<[u8; 32]>,
    /// A backup's primary.
    pub primary: Option<CardId>,
    /// A primary's announced number of backups.
    pub announced: u8,
    /// A primary's recorded backups and whether each confirmed.
    pub backups: Vec<(CardId, bool)>,
}

/// One emulated card.
pub struct EmuCard {
    chip: Arc<Chip>,
    mem: Persistent,
    ram: Transient,
    rng: Drbg,
    faults: CardFaults,
    latency: LatencyModel,
    apdus: u64,
    label: String,
    /// CLA INS P1 P2 of every APDU the card received (the first
    /// `HEADER_LOG_LIMIT`), for tests that aim a fault at a command.
    headers: Vec<[u8; 4]>,
    /// The last genuine ATTEST response (what a recording relay holds),
    /// kept outside the card's memory: the replay fault's source.
    last_attestation: Option<Vec<u8>>,
}

/// How many APDU headers an emulated card keeps (about 50 recipes).
const HEADER_LOG_LIMIT: usize = 8192;

/// What a command handler sees: the chip, a working copy of persistent
/// memory (committed by the caller on success), RAM, RNG and faults.
pub(crate) struct Ctx<'a> {
    pub chip: &'a Chip,
    pub mem: &'a mut Persistent,
    pub ram: &'a mut Transient,
    pub rng: &'a mut Drbg,
    pub faults: &'a CardFaults,
}

pub(crate) type Handled = (Response, Cost);

pub(crate) fn status(sw: StatusWord) -> Handled {
    (Response::status(sw), Cost::Small)
}

impl EmuCard {
    pub(crate) fn new(chip: Chip, mem: Persistent, rng_seed: [u8; 32], faults: CardFaults, label: String) -> Self {
        Self {
            chip: Arc::new(chip),
            mem,
            ram: Transient::power_on(),
            rng: Drbg::new(rng_seed),
            faults,
            latency: LatencyModel::JCOP4,
            apdus: 0,
            label,
            headers: Vec::new(),
            last_attestation: None,
        }
    }

    pub fn id(&self) -> CardId {
        self.chip.id
    }

    /// What the factory made this card as ("genuine", "counterfeit", ...).
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn atr(&self) -> &[u8] {
        &self.chip.atr
    }

    pub fn faults(&self) -> &CardFaults {
        &self.faults
    }

    pub fn set_faults(&mut self, faults: CardFaults) {
        self.faults = faults;
    }

    pub fn set_latency(&mut self, latency: LatencyModel) {
        self.latency = latency;
    }

    /// Power-up (insertion, reconnect or reset): RAM is cleared and an
    /// incomplete load is discarded, as a card manager does at reset.
    pub fn power_on(&mut self) {
        self.ram = Transient::power_on();
    }

    /// Processes one raw command APDU.
    pub fn process(&mut self, raw: &[u8]) -> Exchange {
        self.apdus += 1;
        let n = self.apdus;
        if self.headers.len() < HEADER_LOG_LIMIT {
            let mut h = [0u8; 4];
            for (d, s) in h.iter_mut().zip(raw) {
                *d = *s;
            }
            self.headers.push(h);
        }
        if self.faults.mute_from.is_some_and(|m| n >= m) {
            return Exchange::Mute;
        }
        if self.faults.reset_at == Some(n) {
            self.faults.reset_at = None;
            self.ram = Transient::power_on();
            return Exchange::Reset;
        }
        let tear = match self.faults.remove_at {
            Some((at, point)) if at == n => {
                self.faults.remove_at = None;
                Some(point)
            }
            _ => None,
        };
        if tear == Some(TearPoint::Before) {
            self.ram = Transient::power_on();
            return Exchange::Removed { latency: self.latency.duration(Cost::Small) / 2 };
        }
        let (mut resp, cost) = self.execute(raw);
        let latency = self.latency.duration(cost).mul_f64(self.faults.slow_factor.max(0.0));
        if tear == Some(TearPoint::After) {
            self.ram = Transient::power_on();
            return Exchange::Removed { latency };
        }
        if raw.len() > 1 && raw[0] == 0x80 && raw[1] == crate::wallet::ins::ATTEST && resp.sw == StatusWord::OK {
            match (&self.last_attestation, self.faults.replay_attestation) {
                (Some(old), true) => resp.data = old.clone(),
                _ => self.last_attestation = Some(resp.data.clone()),
            }
        }
        if let Some((at, sw)) = self.faults.forged_error
            && at == n
        {
            self.faults.forged_error = None;
            return Exchange::Answer { response: sw.to_bytes().to_vec(), latency };
        }
        if let Some((at, which)) = self.faults.flip_response
            && at == n
        {
            self.faults.flip_response = None;
            let i = match which {
                ResponseFlip::Data => Some(0),
                ResponseFlip::RMac => resp.data.len().checked_sub(1),
            };
            if let Some(b) = i.and_then(|i| resp.data.get_mut(i)) {
                *b ^= 0x01;
            }
        }
        Exchange::Answer { response: resp.to_bytes(), latency }
    }

    /// CLA INS P1 P2 of the APDUs this card received, in order (APDU n is
    /// at index n - 1), so a test can aim an APDU-numbered fault at a
    /// command.
    pub fn headers(&self) -> &[[u8; 4]] {
        &self.headers
    }

    fn execute(&mut self, raw: &[u8]) -> Handled {
        let cmd = match Command::parse(raw) {
            Ok(c) => c,
            Err(_) => return status(StatusWord::WRONG_LENGTH),
        };
        if let Some((ins, sw)) = self.faults.wrong_sw
            && ins == cmd.ins
        {
            return status(sw);
        }
        if cmd.cla & 0x80 == 0 && cmd.ins == crate::gp::ins::SELECT && cmd.p1 == 0x04 {
            return self.select(&cmd);
        }
        // Work on a copy of persistent memory; commit only on success.
        let mut work = self.mem.clone();
        let mut ctx =
            Ctx { chip: &self.chip, mem: &mut work, ram: &mut self.ram, rng: &mut self.rng, faults: &self.faults };
        let (resp, cost) = match ctx.ram.selected.clone() {
            Selected::CardManager => card_manager::handle(&mut ctx, &cmd),
            Selected::Instance(aid) => applet::handle(&mut ctx, &aid, &cmd),
            Selected::Nothing => status(StatusWord::CONDITIONS_NOT_SATISFIED),
        };
        let sw1 = resp.sw.sw1();
        // A refused EXTERNAL AUTHENTICATE still counts against the card:
        // the failure counter write is the one persistent effect of an error.
        // (A wrong access code answers 63Cx, a warning, not an error: its
        // try counter commits with the answer.)
        let keep = matches!(sw1, 0x90 | 0x61 | 0x62 | 0x63);
        if keep || work.auth_failures != self.mem.auth_failures {
            self.mem = work;
        }
        (resp, cost)
    }

    fn select(&mut self, cmd: &Command) -> Handled {
        // Selecting any application ends the card manager's secure channel
        // session (GP §10.2: the session is bound to the selected SD), and
        // any chained command in progress.
        self.ram.close_channel();
        self.ram.chain = None;
        if cmd.data.is_empty() || cmd.data.as_slice() == crate::gp::ISD_AID {
            self.ram.selected = Selected::CardManager;
            return card_manager::select_response(&self.chip, &self.mem);
        }
        if self.mem.card_state == crate::gp::card_state::CARD_LOCKED {
            self.ram.selected = Selected::Nothing;
            return status(StatusWord::FILE_NOT_FOUND);
        }
        match self.mem.instances.iter().find(|i| i.aid == cmd.data) {
            Some(inst)
                if inst.state & crate::gp::app_state::SELECTABLE == crate::gp::app_state::SELECTABLE
                    && inst.state != crate::gp::app_state::LOCKED =>
            {
                self.ram.selected = Selected::Instance(inst.aid.clone());
                let ctx = Ctx {
                    chip: &self.chip,
                    mem: &mut self.mem,
                    ram: &mut self.ram,
                    rng: &mut self.rng,
                    faults: &self.faults,
                };
                applet::select_response(&ctx, &cmd.data)
            }
            _ => {
                self.ram.selected = Selected::Nothing;
                status(StatusWord::FILE_NOT_FOUND)
            }
        }
    }

    /// The card's real state, read directly (no APDUs).
    pub fn view(&self) -> CardView {
        CardView {
            id: self.chip.id,
            card_state: self.mem.card_state,
            key_versions: self.mem.key_sets.iter().map(|k| k.version).collect(),
            auth_failures: self.mem.auth_failures,
            packages: self
                .mem
                .packages
                .iter()
                .map(|p| PackageView { aid: p.aid.clone(), version: p.version, hash: p.hash })
                .collect(),
            instances: self.mem.instances.iter().map(|i| (i.aid.clone(), i.state)).collect(),
            wallet_lifecycle: self.mem.wallet.as_ref().map(|w| w.lifecycle),
            wallet_public_key: self.mem.wallet.as_ref().and_then(|w| {
                w.wallet_key
                    .as_ref()
                    .and_then(|k| SigningKey::from_slice(&k[..]).ok())
                    .map(|k| crate::wallet::public_key_bytes(k.verifying_key()))
            }),
            wallet_bundle: self.mem.wallet.as_ref().and_then(|w| w.bundle.as_ref()).map(|b| match &b.link {
                Link::Primary { nonce, announced, backups } => BundleView {
                    role: crate::wallet::Role::Primary,
                    bundle_id: b.id,
                    nonce: Some(*nonce),
                    primary: None,
                    announced: *announced,
                    backups: backups.iter().map(|l| (l.card_id, l.confirmed)).collect(),
                },
                Link::Backup { primary, .. } => BundleView {
                    role: crate::wallet::Role::Backup,
                    bundle_id: b.id,
                    nonce: None,
                    primary: Some(*primary),
                    announced: 0,
                    backups: Vec::new(),
                },
            }),
            access_code_tries: self.mem.wallet.as_ref().and_then(|w| w.access_code.as_ref()).map(|a| a.tries_left),
            attest_counter: self.mem.attest_counter,
            apdus: self.apdus,
        }
    }

    /// The wallet secret, read straight from the emulated chip's memory:
    /// a probe on the model for the secrets canary test (the wallet
    /// protocol never lets it out of a card, and the host never sees it).
    pub fn wallet_secret_for_tests(&self) -> Option<zeroize::Zeroizing<[u8; 32]>> {
        self.mem.wallet.as_ref().and_then(|w| w.wallet_key.clone())
    }

    /// The key set of a version, for tests that need to authenticate as the
    /// factory or check a rotation.
    pub fn key_set(&self, version: u8) -> Option<crate::gp::keys::StaticKeys> {
        self.mem.key_sets.iter().find(|k| k.version == version).map(|k| k.keys.clone())
    }
}

impl std::fmt::Debug for EmuCard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EmuCard({} {})", self.chip.id, self.label)
    }
}

#[cfg(test)]
mod tests {
    use super::factory::{ChipFactory, ChipKind};
    use super::*;

    const GET_CPLC: [u8; 5] = [0x80, 0xCA, 0x9F, 0x7F, 0x00];

    fn answer(card: &mut EmuCard, apdu: &[u8]) -> Vec<u8> {
        match card.process(apdu) {
            Exchange::Answer { response, .. } => response,
            other => panic!("no answer: {other:?}"),
        }
    }

    /// Two cards made alike: the same chip, one with `faults`.
    fn twins(faults: CardFaults) -> (EmuCard, EmuCard) {
        let plain = ChipFactory::new(3).make(ChipKind::Genuine, CardFaults::default());
        let faulty = ChipFactory::new(3).make(ChipKind::Genuine, faults);
        (plain, faulty)
    }

    #[test]
    fn a_flipped_response_differs_in_one_bit_where_asked_and_only_once() {
        for which in [ResponseFlip::Data, ResponseFlip::RMac] {
            let (mut plain, mut faulty) =
                twins(CardFaults { flip_response: Some((2, which)), ..CardFaults::default() });
            for n in 1..=3 {
                let (a, b) = (answer(&mut plain, &GET_CPLC), answer(&mut faulty, &GET_CPLC));
                // The last data byte sits before SW1 SW2.
                let index = if which == ResponseFlip::Data { 0 } else { a.len() - 3 };
                let diff: Vec<(usize, u8)> =
                    a.iter().zip(&b).enumerate().filter(|(_, (x, y))| x != y).map(|(i, (x, y))| (i, x ^ y)).collect();
                let expected = if n == 2 { vec![(index, 1)] } else { vec![] };
                assert_eq!(diff, expected, "{which:?}, APDU {n}");
            }
            assert_eq!(plain.view(), faulty.view(), "the card itself is the same");
        }
    }

    #[test]
    fn a_forged_error_replaces_the_answer_of_a_command_the_card_did_process() {
        let sw = StatusWord::REFERENCED_DATA_NOT_FOUND;
        let (mut plain, mut card) = twins(CardFaults { forged_error: Some((1, sw)), ..CardFaults::default() });
        // SELECT of an unknown AID deselects everything (then GET DATA
        // answers 6985): the forged 6A88 hides that the card did it.
        let select = [0x00, 0xA4, 0x04, 0x00, 0x05, 0xA0, 0x00, 0x00, 0x00, 0x99, 0x00];
        assert_eq!(answer(&mut plain, &select), [0x6A, 0x82]);
        assert_eq!(answer(&mut card, &select), sw.to_bytes());
        for c in [&mut plain, &mut card] {
            assert_eq!(answer(c, &GET_CPLC), [0x69, 0x85], "nothing selected any more");
        }
        assert_eq!(card.headers(), [[0x00, 0xA4, 0x04, 0x00], [0x80, 0xCA, 0x9F, 0x7F]]);
        assert_eq!(plain.view(), card.view());
    }
}
