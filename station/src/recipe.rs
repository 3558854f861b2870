//! The per-card recipe: identify, GP session, firmware, key rotation,
//! attestation, self-tests, record. Plain synchronous code over a
//! `Transport`, the same in the daemon, the tests and the rig. Every step
//! writes its intent to the ledger before it touches the card and its result
//! before the next step starts; every step is idempotent, so an interrupted
//! card resumes by simply running the recipe again.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use card::gp::session::{self, GpSession, KeyRing};
use card::gp::{StatusScope, app_state};
use card::transport::{ReaderId, Transport, TransportError};
use card::wallet::cert::{Certificate, ca_key_id};
use card::wallet::client::WalletClient;
use card::wallet::{self, Lifecycle};
use card::{CardError, CardId};
use k256::ecdsa::VerifyingKey;

use crate::firmware::Firmware;
use crate::ledger::{CardStatus, CardUpdate, Done, Ledger, PriorRecord, StepEvent};
use crate::profile::Profile;

/// The recipe's steps, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Step {
    Identify,
    Session,
    Firmware,
    KeyRotation,
    Attestation,
    SelfTests,
    Record,
    /// Bundle forming (after the card's own recipe).
    Pairing,
}

impl Step {
    /// The card's own recipe, in order (pairing follows when bundling).
    pub const ALL: [Step; 7] = [
        Step::Identify,
        Step::Session,
        Step::Firmware,
        Step::KeyRotation,
        Step::Attestation,
        Step::SelfTests,
        Step::Record,
    ];

    /// The name used in the ledger, reports and on screen.
    pub fn name(self) -> &'static str {
        match self {
            Self::Identify => "identify",
            Self::Session => "gp_session",
            Self::Firmware => "firmware",
            Self::KeyRotation => "key_rotation",
            Self::Attestation => "attestation",
            Self::SelfTests => "self_tests",
            Self::Record => "record",
            Self::Pairing => "pairing",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the firmware step calls an instance GET STATUS did not list but the
/// card refused to install.
const UNLISTED_INSTANCE: &str = "unlisted instance";

/// The stage a card reaches when it passes this recipe.
pub const STAGE_READY: &str = "ready_for_pairing";

/// The reasons of identity, attestation and secure-channel refusals. They
/// are shown to operators, written to the ledger and counted in metrics by
/// reason, so they are stable texts: the specifics go to the detail.
/// Every one of them fails the card not retryable (quarantine: FAIL bin).
pub mod reason {
    /// The certificate's issuer is no pinned CA.
    pub const UNPINNED_CA: &str = "counterfeit: certificate from an unpinned CA";
    /// A pinned CA's key id, but its signature does not verify.
    pub const CA_SIGNATURE: &str = "counterfeit: certificate signature invalid";
    pub const VALIDITY: &str = "certificate outside its validity";
    /// Not a canonical version 1 certificate, or no valid key in it.
    pub const MALFORMED_CERTIFICATE: &str = "malformed certificate";
    /// The certificate's CA is on the profile's revocation list.
    pub const REVOKED_CA: &str = "revoked vendor CA";
    /// The card id or the card key is on the profile's revocation list.
    pub const REVOKED_CARD: &str = "revoked card";
    /// Certificate or attestation name another chip than the CPLC.
    pub const IDENTITY_MISMATCH: &str = "identity mismatch";
    /// The certificate carries another card key than the ledger recorded
    /// for this card id.
    pub const CLONE_KEY_CHANGED: &str = "clone: card key differs from the recorded one";
    /// Another reader of this station holds a card with this card id.
    pub const CLONE_ON_ANOTHER_READER: &str = "clone: identity already on another reader";
    /// The card cannot sign a fresh challenge with the card key the ledger
    /// recorded for its card id.
    pub const CLONE_NO_PROOF: &str = "clone: cannot prove the recorded card key";
    /// The attestation counter is not above the one the ledger recorded
    /// (a clone attested fewer times, or a card whose memory was rolled
    /// back).
    pub const COUNTER_BACKWARDS: &str = "attestation counter went backwards";
    /// A signature that answers an earlier challenge of this station, not
    /// the fresh one: an old response played back.
    pub const REPLAYED: &str = "attestation replayed";
    /// The attestation signature does not verify under the certificate's
    /// key (first sight of this card id).
    pub const SIGNATURE_INVALID: &str = "attestation signature invalid";
    /// A card recorded passed came back and proved the recorded card key:
    /// the same card; its record is kept as it was.
    pub const ALREADY_PROVISIONED: &str = "already provisioned, verified";
    /// A response's R-MAC did not verify: the response was altered between
    /// card and host (ISO 14443 and T=1 frames carry a CRC, so this is no
    /// line noise). The channel is closed; nothing was decided on it.
    pub const RMAC_MISMATCH: &str = "secure channel: R-MAC mismatch (response altered)";
    /// A success response without the R-MAC the security level requires.
    pub const RMAC_MISSING: &str = "secure channel: R-MAC missing";
    /// The card contradicted an answer no R-MAC vouched for (an error
    /// status word, which a relay can forge): GET STATUS said "no such
    /// instance" but the card refused to INSTALL it. Nothing was deleted.
    pub const UNAUTHENTICATED_ANSWER: &str = "secure channel: unauthenticated answer contradicted";
}

/// Why a card failed: the step, a short reason (grouped in reports), the
/// full detail, and whether trying the same card again may succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub step: Step,
    pub reason: String,
    pub detail: String,
    pub retryable: bool,
}

impl Failure {
    pub fn new(step: Step, reason: impl Into<String>, detail: impl Into<String>, retryable: bool) -> Self {
        Self { step, reason: reason.into(), detail: detail.into(), retryable }
    }

    /// A card-layer error, classified for operators.
    pub fn from_card_error(step: Step, e: &CardError) -> Self {
        use card::gp::scp03::Scp03Error;
        let (reason, retryable) = match e {
            CardError::Transport(TransportError::CardRemoved) => ("card removed".to_string(), true),
            CardError::Transport(TransportError::Timeout(_)) => ("card mute".to_string(), true),
            // The reader or pcscd went away under the card: nothing is
            // wrong with the card, it is retried once it is back.
            CardError::Transport(
                t @ (TransportError::ServiceUnavailable(_) | TransportError::ReaderUnavailable(_)),
            ) => (t.to_string(), true),
            CardError::Transport(t) => (t.to_string(), t.is_retryable()),
            CardError::Status { command, sw } => (format!("{command} answered {:04X}", sw.0), false),
            CardError::Malformed { what, .. } => (format!("malformed {what}"), false),
            CardError::Scp03(Scp03Error::CardCryptogramMismatch) => {
                ("card cryptogram mismatch (wrong GP keys)".to_string(), false)
            }
            CardError::Scp03(Scp03Error::RMacMismatch) => (reason::RMAC_MISMATCH.to_string(), false),
            CardError::Scp03(Scp03Error::RMacMissing { .. }) => (reason::RMAC_MISSING.to_string(), false),
            CardError::Verification { what: UNLISTED_INSTANCE, .. } => {
                (reason::UNAUTHENTICATED_ANSWER.to_string(), false)
            }
            CardError::Scp03(s) => (format!("secure channel: {s}"), false),
            CardError::Verification { what, .. } => (format!("{what} failed verification"), false),
        };
        Self::new(step, reason, e.to_string(), retryable)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ({})", self.step, self.reason, self.detail)
    }
}

/// A card that passed: its serial once recorded passed, how far it got
/// ("ready_for_pairing", "bundled", "unpaired"), and its bundle and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passed {
    pub serial: Option<i64>,
    pub stage: String,
    pub bundle: Option<String>,
    pub role: Option<String>,
}

/// A card that passed its own recipe and waits, on its reader, for pairing:
/// what the bundle coordinator needs to know of it.
#[derive(Debug, Clone)]
pub struct ReadyCard {
    pub card_id: CardId,
    pub attempt: u32,
    /// The identity certificate as the card returned it (7F21).
    pub certificate: Vec<u8>,
    /// The card key, verified against a pinned CA.
    pub card_key: VerifyingKey,
    /// Keeps the card id claimed for this reader while the card waits for
    /// pairing (released when the coordinator lets go of the card).
    claim: Option<Arc<Claim>>,
}

/// The card ids the readers of one station are working on, so that two
/// chips with one identity on two readers at once are told apart: one card
/// cannot sit on two readers.
#[derive(Debug, Default)]
struct InFlight {
    cards: Mutex<HashMap<CardId, (String, u64)>>,
    next: AtomicU64,
}

/// One reader's claim on a card id; dropping it releases the card id.
#[derive(Debug)]
struct Claim {
    in_flight: Arc<InFlight>,
    card: CardId,
    token: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut cards = self.in_flight.cards.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if cards.get(&self.card).is_some_and(|(_, t)| *t == self.token) {
            cards.remove(&self.card);
        }
    }
}

impl InFlight {
    /// Claims `card` for `reader`; the reader holding it otherwise. The
    /// same reader may claim again (its earlier card left it, or it retries
    /// the card).
    fn claim(self: &Arc<Self>, card: CardId, reader: &str) -> Result<Claim, String> {
        let mut cards = self.cards.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((other, _)) = cards.get(&card)
            && other != reader
        {
            return Err(other.clone());
        }
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        cards.insert(card, (reader.to_string(), token));
        Ok(Claim { in_flight: Arc::clone(self), card, token })
    }
}

/// What happened to one card.
#[derive(Debug, Clone)]
pub struct CardOutcome {
    pub reader: ReaderId,
    pub card_id: Option<CardId>,
    pub result: Result<Passed, Failure>,
    pub elapsed: Duration,
    pub attempt: u32,
    /// Set when the card passed its recipe and now waits for pairing.
    pub ready: Option<Box<ReadyCard>>,
}

impl CardOutcome {
    pub fn passed(&self) -> bool {
        self.result.is_ok()
    }
}

/// Progress a worker reports while a card is on its reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Card(CardId),
    Step(Step),
    Load {
        sent: usize,
        total: usize,
    },
    /// A step ended (for the step duration metrics).
    StepDone {
        step: Step,
        elapsed: Duration,
        ok: bool,
    },
}

/// The ledger could not record: the station must stop taking cards.
#[derive(Debug, thiserror::Error)]
#[error("ledger unavailable: {0}")]
pub struct LedgerDown(#[from] pub crate::ledger::LedgerError);

/// Everything the recipe needs, fixed for a batch.
pub struct Recipe {
    pub profile: Arc<Profile>,
    pub firmware: Arc<Firmware>,
    pub ledger: Ledger,
    pub batch_id: i64,
    ring: KeyRing,
    /// Set when the station stops: cards in flight end at their next step,
    /// recorded failed-and-retryable.
    interrupt: AtomicBool,
    in_flight: Arc<InFlight>,
}

/// The last attestation challenges this station process sent to each card
/// (across batches: a daemon runs many), to recognise an old response
/// played back: its signature verifies over one of them. Bounded: the
/// cards seen longest ago are forgotten first (a replay to a forgotten
/// card is still refused, as a clone or a bad signature), so a station's
/// memory stays flat however many cards it provisions.
static CHALLENGES: std::sync::LazyLock<Mutex<Challenges>> = std::sync::LazyLock::new(Mutex::default);

/// Challenges kept per card, and cards kept.
const CHALLENGES_PER_CARD: usize = 4;
const CHALLENGE_CARDS: usize = 1024;

#[derive(Default)]
struct Challenges {
    by_card: HashMap<CardId, Vec<[u8; 32]>>,
    /// Cards in the order first seen, oldest first.
    order: std::collections::VecDeque<CardId>,
}

impl Challenges {
    fn remember(&mut self, card: CardId, challenge: [u8; 32]) {
        if !self.by_card.contains_key(&card) {
            while self.order.len() >= CHALLENGE_CARDS {
                if let Some(old) = self.order.pop_front() {
                    self.by_card.remove(&old);
                }
            }
            self.order.push_back(card);
        }
        let mine = self.by_card.entry(card).or_default();
        if mine.len() >= CHALLENGES_PER_CARD {
            mine.remove(0);
        }
        mine.push(challenge);
    }
}

impl fmt::Debug for Recipe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Recipe({}, {:?})", self.profile.product, self.firmware)
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // The OS RNG failing is not a card problem; an all-zero challenge would
    // be caught by the replay checks anyway, so fail loudly instead.
    getrandom::fill(&mut b).expect("the operating system's random number generator failed");
    b
}

/// The verified card key and the certificate it came in.
type Identity = (VerifyingKey, Vec<u8>);

/// A card through its own recipe: passed, and ready for pairing when
/// bundling is on.
type Finished = (Passed, Option<Box<ReadyCard>>);

/// One card's attempt: the ids the journal needs.
struct Attempt<'a> {
    ledger: &'a Ledger,
    card: CardId,
    attempt: u32,
    reader: &'a str,
    interrupt: &'a AtomicBool,
    /// The last step's success, written with the card's next change (the
    /// next intent, a failure, the result) in one transaction, so it is
    /// durable before the next step touches the card at one commit for two.
    done: RefCell<Option<Done>>,
}

impl Attempt<'_> {
    fn take_done(&self) -> Option<Done> {
        self.done.borrow_mut().take()
    }

    /// Writes a step success still pending (nothing else followed it).
    fn flush(&self) -> Result<(), LedgerDown> {
        if let Some(d) = self.take_done() {
            self.ledger.step_done(d.card, d.attempt, d.step, &d.detail, d.update)?;
        }
        Ok(())
    }

    /// Runs one step: intent, work, result, all journaled.
    fn step<T>(
        &self,
        step: Step,
        progress: &mut dyn FnMut(Progress),
        work: impl FnOnce(&mut dyn FnMut(Progress)) -> Result<(T, String, CardUpdate), Failure>,
    ) -> Result<Result<T, Failure>, LedgerDown> {
        if self.interrupt.load(Ordering::Relaxed) {
            let f =
                Failure::new(step, "interrupted", "the station stopped before this step; insert the card again", true);
            self.ledger.fail_after(
                self.take_done(),
                self.card,
                self.attempt,
                step.name(),
                &f.reason,
                &f.detail,
                f.retryable,
            )?;
            return Ok(Err(f));
        }
        progress(Progress::Step(step));
        let started = Instant::now();
        self.ledger.step_after(
            self.take_done(),
            self.card,
            self.attempt,
            step.name(),
            StepEvent::Intent,
            "",
            self.reader,
        )?;
        let result = work(progress);
        progress(Progress::StepDone { step, elapsed: started.elapsed(), ok: result.is_ok() });
        match result {
            Ok((value, detail, update)) => {
                *self.done.borrow_mut() =
                    Some(Done { card: self.card, attempt: self.attempt, step: step.name(), detail, update });
                Ok(Ok(value))
            }
            Err(f) => {
                self.ledger.fail(self.card, self.attempt, step.name(), &f.reason, &f.detail, f.retryable)?;
                Ok(Err(f))
            }
        }
    }
}

/// Early return on a failed step (ledger already written).
macro_rules! step {
    ($e:expr) => {
        match $e? {
            Ok(v) => v,
            Err(f) => return Ok(Err(f)),
        }
    };
}

impl Recipe {
    pub fn new(profile: Arc<Profile>, firmware: Arc<Firmware>, ledger: Ledger, batch_id: i64) -> Self {
        let ring = profile.key_ring();
        Self { profile, firmware, ledger, batch_id, ring, interrupt: AtomicBool::new(false), in_flight: Arc::default() }
    }

    /// Stops every card in flight at its next step (station stopping).
    pub fn interrupt(&self) {
        self.interrupt.store(true, Ordering::Relaxed);
    }

    /// Runs the recipe on the card behind `t`. Card failures are outcomes;
    /// only a ledger that cannot record is an error.
    pub fn run(
        &self,
        reader: &ReaderId,
        t: &mut dyn Transport,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<CardOutcome, LedgerDown> {
        let started = Instant::now();
        let mut outcome = CardOutcome {
            reader: reader.clone(),
            card_id: None,
            result: Err(Failure::new(Step::Identify, "not started", "", true)),
            elapsed: Duration::ZERO,
            attempt: 0,
            ready: None,
        };
        progress(Progress::Step(Step::Identify));
        let identity = session::select_isd(t).and_then(|_| session::read_cplc(t));
        let cplc = match identity {
            Ok(c) => c,
            Err(e) => {
                // No card id yet: nothing to journal under. The outcome still
                // reaches the batch and the operator. A card that answers but
                // has no GlobalPlatform card manager or no CPLC is not one of
                // ours: unsupported, not a retry candidate.
                let mut f = Failure::from_card_error(Step::Identify, &e);
                if let CardError::Status { command, sw } = &e {
                    f.reason = format!("unsupported card: {command} answered {:04X}", sw.0);
                    f.retryable = false;
                }
                outcome.result = Err(f);
                outcome.elapsed = started.elapsed();
                return Ok(outcome);
            }
        };
        let card_id = cplc.card_id();
        outcome.card_id = Some(card_id);
        let _span = tracing::info_span!("card", card = %card_id).entered();
        progress(Progress::Card(card_id));
        // One card cannot sit on two readers: a second chip with this card
        // id while another reader works on the first is a clone. Refused
        // before the ledger is touched, so the first card's record stays
        // its own; the refusal is journaled.
        let claim = match self.in_flight.claim(card_id, reader.as_str()) {
            Ok(c) => c,
            Err(other) => {
                let f = Failure::new(
                    Step::Identify,
                    reason::CLONE_ON_ANOTHER_READER,
                    format!("card {card_id} is being provisioned on {other}: two chips with one identity"),
                    false,
                );
                return self.refused(outcome, card_id, reader, f, started);
            }
        };
        let atr = hex::encode_upper(&t.atr().0);
        let prior = match self.ledger.begin_card(
            card_id,
            reader.as_str(),
            self.batch_id,
            &atr,
            &hex::encode_upper(cplc.encode()),
        ) {
            // Another station of the line has this card in progress (the
            // same identity on two readers at once): refused here, its
            // record untouched and nothing journaled against it.
            Err(crate::ledger::LedgerError::Held { card, station }) => {
                let reason = format!("in progress at station {station}");
                let detail = crate::ledger::LedgerError::Held { card, station }.to_string();
                tracing::warn!(reason = %reason, detail = %detail, "card refused at identify");
                outcome.result = Err(Failure::new(Step::Identify, reason, detail, false));
                outcome.elapsed = started.elapsed();
                return Ok(outcome);
            }
            r => r?,
        };
        if let Some(p) = prior.as_ref().filter(|p| p.status == CardStatus::Passed) {
            // The record of a passed card is never changed. The card must
            // prove it is the card recorded: same card, or a clone.
            let f = self.re_presented(card_id, t, p);
            return self.refused(outcome, card_id, reader, f, started);
        }
        let attempt = prior.as_ref().map_or(1, |p| p.attempts + 1);
        outcome.attempt = attempt;
        let a = Attempt {
            ledger: &self.ledger,
            card: card_id,
            attempt,
            reader: reader.as_str(),
            interrupt: &self.interrupt,
            done: RefCell::new(None),
        };
        let steps = self.steps(&a, t, prior.as_ref(), started, progress)?;
        a.flush()?;
        match steps {
            Ok((passed, mut ready)) => {
                outcome.result = Ok(passed);
                if let Some(r) = ready.as_mut() {
                    r.claim = Some(Arc::new(claim));
                }
                outcome.ready = ready;
            }
            Err(f) => outcome.result = Err(f),
        }
        outcome.elapsed = started.elapsed();
        Ok(outcome)
    }

    /// Ends a card refused at identify without an attempt of its own: the
    /// refusal is journaled (reason and detail); the card row, if any, is
    /// left as it was.
    fn refused(
        &self,
        mut outcome: CardOutcome,
        card_id: CardId,
        reader: &ReaderId,
        f: Failure,
        started: Instant,
    ) -> Result<CardOutcome, LedgerDown> {
        tracing::warn!(reason = %f.reason, detail = %f.detail, "card refused at identify");
        let line = format!("{}: {}", f.reason, f.detail);
        self.ledger.step(card_id, 0, Step::Identify.name(), StepEvent::Refused, &line, reader.as_str())?;
        outcome.result = Err(f);
        outcome.elapsed = started.elapsed();
        Ok(outcome)
    }

    /// A fresh attestation challenge for `card`, remembered before it is
    /// sent.
    fn challenge(&self, card: CardId) -> [u8; 32] {
        let challenge: [u8; 32] = random();
        CHALLENGES.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remember(card, challenge);
        challenge
    }

    /// Whether `att` is a genuine answer to an earlier challenge of ours.
    fn answers_an_earlier_challenge(&self, card: CardId, key: &VerifyingKey, att: &wallet::Attestation) -> bool {
        let all = CHALLENGES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        all.by_card
            .get(&card)
            .is_some_and(|old| old.iter().any(|c| wallet::verify_digest(key, &att.digest(c), &att.signature)))
    }

    /// A card whose id is recorded passed: it must sign a fresh challenge
    /// with the card key recorded for that id, with a counter above the
    /// recorded one. Then it is the same card ("already provisioned,
    /// verified"); else a clone. Either way it is refused: a passed card is
    /// never provisioned twice.
    fn re_presented(&self, card_id: CardId, t: &mut dyn Transport, prior: &PriorRecord) -> Failure {
        const S: Step = Step::Identify;
        if let Some(f) = self.revoked_card(S, card_id, prior.card_public_key.as_deref()) {
            return f;
        }
        let Some(key) = recorded_key(prior) else {
            return Failure::new(
                S,
                reason::CLONE_NO_PROOF,
                format!("card {card_id} is recorded passed without a card key to check"),
                false,
            );
        };
        match self.prove_recorded_key(S, card_id, t, &key, prior, true) {
            Ok(None) => Failure::new(S, reason::CLONE_NO_PROOF, format!("card {card_id} gave no proof"), false),
            Ok(Some(counter)) => Failure::new(
                S,
                reason::ALREADY_PROVISIONED,
                format!(
                    "card {card_id} is recorded passed and proved its recorded card key (counter {counter}); \
                     its record is kept"
                ),
                false,
            ),
            Err(f) => f,
        }
    }

    /// Challenges the card to sign with the card key the ledger recorded
    /// for its id (ATTEST over a fresh challenge); the new counter on
    /// success. Without the wallet applet there is nothing to sign with:
    /// no proof (`None`) unless `applet_required`, then a clone.
    fn prove_recorded_key(
        &self,
        step: Step,
        card_id: CardId,
        t: &mut dyn Transport,
        key: &VerifyingKey,
        prior: &PriorRecord,
        applet_required: bool,
    ) -> Result<Option<u32>, Failure> {
        let no_proof = |detail: String| Failure::new(step, reason::CLONE_NO_PROOF, detail, false);
        let mut w = WalletClient::new(t);
        match w.select() {
            Ok(_) => {}
            Err(CardError::Status { .. }) if !applet_required => return Ok(None),
            Err(CardError::Status { sw, .. }) => {
                return Err(no_proof(format!(
                    "card {card_id} has no wallet applet to sign with (SELECT {:04X})",
                    sw.0
                )));
            }
            Err(CardError::Transport(e)) => return Err(Failure::from_card_error(step, &CardError::Transport(e))),
            Err(e) => return Err(no_proof(format!("SELECT: {e}"))),
        }
        let challenge = self.challenge(card_id);
        let att = match w.attest(&challenge) {
            Ok(a) => a,
            Err(CardError::Transport(e)) => return Err(Failure::from_card_error(step, &CardError::Transport(e))),
            Err(e) => return Err(no_proof(format!("ATTEST: {e}"))),
        };
        self.check_attestation_proof(step, card_id, key, Some(prior), &challenge, &att)?;
        Ok(Some(att.counter))
    }

    /// The checks of an attestation's proof of the card key, in the order
    /// that gives the truest reason: identity, signature over this
    /// challenge, then the counter against the recorded one.
    fn check_attestation_proof(
        &self,
        step: Step,
        card_id: CardId,
        key: &VerifyingKey,
        prior: Option<&PriorRecord>,
        challenge: &[u8; 32],
        att: &wallet::Attestation,
    ) -> Result<(), Failure> {
        let refuse = |reason: &str, detail: String| Failure::new(step, reason, detail, false);
        if att.card_id != card_id {
            return Err(refuse(reason::IDENTITY_MISMATCH, format!("attestation names {}", att.card_id)));
        }
        let recorded = prior.and_then(|p| p.attest_counter);
        if !wallet::verify_digest(key, &att.digest(challenge), &att.signature) {
            if self.answers_an_earlier_challenge(card_id, key, att) {
                return Err(refuse(
                    reason::REPLAYED,
                    format!(
                        "the signature (counter {}) answers an earlier challenge of this station, not the fresh one",
                        att.counter
                    ),
                ));
            }
            if prior.and_then(recorded_key).is_some() {
                return Err(refuse(
                    reason::CLONE_NO_PROOF,
                    format!("card {card_id} cannot sign a fresh challenge with the card key recorded for it"),
                ));
            }
            return Err(refuse(
                reason::SIGNATURE_INVALID,
                "the card's signature over the fresh challenge does not verify with its certificate's key".into(),
            ));
        }
        if let Some(last) = recorded
            && att.counter <= last
        {
            return Err(refuse(
                reason::COUNTER_BACKWARDS,
                format!("counter {} after {last} was recorded (clone or rollback)", att.counter),
            ));
        }
        Ok(())
    }

    /// The profile's revocation list against a card id and card key.
    fn revoked_card(&self, step: Step, card_id: CardId, card_key_hex: Option<&str>) -> Option<Failure> {
        let revoked = &self.profile.revoked;
        if revoked.card_id(&card_id) {
            return Some(Failure::new(step, reason::REVOKED_CARD, format!("card id {card_id} is revoked"), false));
        }
        let key = card_key_hex.and_then(|h| hex::decode(h).ok()).and_then(|b| <[u8; 33]>::try_from(b).ok());
        if key.is_some_and(|k| revoked.card_key(&k)) {
            return Some(Failure::new(
                step,
                reason::REVOKED_CARD,
                format!("the card key of {card_id} is revoked"),
                false,
            ));
        }
        None
    }

    fn check_budget(&self, started: Instant, step: Step) -> Result<(), Failure> {
        if started.elapsed() > self.profile.timeouts.card {
            return Err(Failure::new(
                step,
                "card took too long",
                format!("over the profile's {:?} per card", self.profile.timeouts.card),
                true,
            ));
        }
        Ok(())
    }

    fn steps(
        &self,
        a: &Attempt<'_>,
        t: &mut dyn Transport,
        prior: Option<&PriorRecord>,
        started: Instant,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Result<Finished, Failure>, LedgerDown> {
        let profile = &self.profile;

        step!(a.step(Step::Identify, progress, |_| self.identify(a.card, t, prior)));

        // GP session with whichever key set the card reports.
        let gp = step!(a.step(Step::Session, progress, move |_| {
            let s = GpSession::open(t, &self.ring, 0, profile.security_level)
                .map_err(|e| Failure::from_card_error(Step::Session, &e))?;
            let detail = format!("key version {:02X}, {:?}", s.key_version(), s.level());
            let update = CardUpdate { gp_key_version: Some(s.key_version()), ..CardUpdate::default() };
            Ok((s, detail, update))
        }));

        let gp = step!(a.step(Step::Firmware, progress, move |p| {
            let mut gp = gp;
            self.check_budget(started, Step::Firmware)?;
            let detail = self.firmware(&mut gp, p).map_err(|e| Failure::from_card_error(Step::Firmware, &e))?;
            Ok((gp, detail, CardUpdate::default()))
        }));

        let t = match &profile.rotation {
            Some(rot) if gp.key_version() != rot.version => step!(a.step(Step::KeyRotation, progress, move |_| {
                let mut gp = gp;
                let from = gp.key_version();
                self.check_budget(started, Step::KeyRotation)?;
                let keys = card::gp::session::KeySource::Diversified {
                    master: rot.master.clone(),
                    scheme: rot.diversification,
                }
                .keys_for(gp.kdd());
                gp.put_keys(rot.version, &keys, true).map_err(|e| Failure::from_card_error(Step::KeyRotation, &e))?;
                // Prove the rotation: a new session must open with the new
                // keys, and the card must report the new version.
                let proof = GpSession::open(gp.into_transport(), &self.ring, rot.version, profile.security_level)
                    .map_err(|e| Failure::from_card_error(Step::KeyRotation, &e))?;
                if proof.key_version() != rot.version {
                    return Err(Failure::new(
                        Step::KeyRotation,
                        "key rotation not effective",
                        format!("card still reports key version {:02X}", proof.key_version()),
                        true,
                    ));
                }
                let update = CardUpdate { gp_key_version: Some(rot.version), ..CardUpdate::default() };
                let detail = format!("rotated {from:02X} -> {:02X}, proven by a new session", rot.version);
                Ok((proof.into_transport(), detail, update))
            })),
            _ => gp.into_transport(),
        };

        let (card_key, certificate) = step!(a.step(Step::Attestation, progress, |_| {
            self.check_budget(started, Step::Attestation)?;
            self.attest(a.card, t, prior)
        }));

        step!(a.step(Step::SelfTests, progress, |_| {
            self.check_budget(started, Step::SelfTests)?;
            let detail = self.self_tests(a.card, t, &card_key)?;
            Ok(((), detail, CardUpdate { self_tests: Some(true), ..CardUpdate::default() }))
        }));

        progress(Progress::Step(Step::Record));
        let ready = Passed { serial: None, stage: STAGE_READY.to_string(), bundle: None, role: None };
        if profile.bundles.is_some() {
            // Passed its own recipe; recorded passed only when bundled or
            // released by the coordinator.
            a.ledger.ready_after(a.take_done(), a.card, a.attempt)?;
            let card = ReadyCard { card_id: a.card, attempt: a.attempt, certificate, card_key, claim: None };
            return Ok(Ok((ready, Some(Box::new(card)))));
        }
        let serial = a.ledger.pass_after(a.take_done(), a.card, a.attempt, STAGE_READY)?;
        Ok(Ok((Passed { serial, ..ready }, None)))
    }

    /// Makes sure exactly the manifest's package and instances are on the
    /// card: skip when present, else delete what is there, load, install,
    /// and verify with GET STATUS.
    fn firmware(&self, gp: &mut GpSession<'_>, progress: &mut dyn FnMut(Progress)) -> Result<String, CardError> {
        let fw = &self.firmware;
        // What the card lists comes in 9000/6310 responses, which carry an
        // R-MAC at the profile's level; "nothing of this kind" is 6A88, an
        // error status word, which never does (Amendment D §6.2.5). So a
        // DELETE is only ever decided on something the card listed, never
        // on an absence a relay could have forged.
        let packages = gp.get_status(StatusScope::LoadFiles)?;
        let instances = gp.get_status(StatusScope::Applications)?;
        let version = vec![fw.package_version.0, fw.package_version.1];
        let package = packages.iter().find(|p| p.aid == fw.package_aid);
        let listed = |aid: &[u8]| instances.iter().find(|i| i.aid == aid);
        let selectable = |lifecycle: u8| lifecycle & app_state::SELECTABLE == app_state::SELECTABLE;
        if package.is_some_and(|p| p.version.as_ref() == Some(&version)) {
            if fw.applets.iter().all(|a| listed(&a.instance_aid).is_some_and(|i| selectable(i.lifecycle))) {
                return Ok(format!("{} {} already present", fw.manifest.name, fw.manifest.version));
            }
            // The right package is there (listed): only instances are
            // missing. A listed instance that is not selectable is deleted
            // and installed again; an unlisted one is installed, not
            // deleted: a card that does have it refuses the INSTALL.
            let mut done = Vec::new();
            for a in &fw.applets {
                match listed(&a.instance_aid) {
                    Some(i) if selectable(i.lifecycle) => continue,
                    Some(_) => {
                        gp.delete(&a.instance_aid, false)?;
                    }
                    None => {}
                }
                gp.install_for_install(&fw.package_aid, &a.class_aid, &a.instance_aid, a.privileges, &a.params)
                    .map_err(|e| match e {
                        CardError::Status { sw, .. } if listed(&a.instance_aid).is_none() => CardError::verification(
                            UNLISTED_INSTANCE,
                            format!(
                                "GET STATUS did not list instance {} (that answer carries no R-MAC) but INSTALL \
                                 answered {:04X}; nothing deleted",
                                hex::encode_upper(&a.instance_aid),
                                sw.0
                            ),
                        ),
                        e => e,
                    })?;
                done.push(hex::encode_upper(&a.instance_aid));
            }
            self.verify_firmware(gp, &version)?;
            return Ok(format!(
                "{} {} already loaded; installed {}",
                fw.manifest.name,
                fw.manifest.version,
                done.join(", ")
            ));
        }
        let mut removed = Vec::new();
        for a in &fw.applets {
            if listed(&a.instance_aid).is_some() && gp.delete(&a.instance_aid, false)? {
                removed.push(hex::encode_upper(&a.instance_aid));
            }
        }
        if package.is_some() && gp.delete(&fw.package_aid, true)? {
            removed.push(hex::encode_upper(&fw.package_aid));
        }
        let mut blocks = 0;
        gp.load(
            &fw.package_aid,
            &fw.load_file_sha256,
            &fw.load_file_data_block,
            self.profile.load_block_size,
            &mut |sent, total| {
                blocks = total;
                progress(Progress::Load { sent, total });
            },
        )?;
        for a in &fw.applets {
            gp.install_for_install(&fw.package_aid, &a.class_aid, &a.instance_aid, a.privileges, &a.params)?;
        }
        self.verify_firmware(gp, &version)?;
        let mut detail = format!("loaded {} {} in {blocks} blocks", fw.manifest.name, fw.manifest.version);
        if !removed.is_empty() {
            detail.push_str(&format!(" after deleting {}", removed.join(", ")));
        }
        Ok(detail)
    }

    /// After LOAD or INSTALL: the package at the right version, every
    /// instance selectable (GET STATUS).
    fn verify_firmware(&self, gp: &mut GpSession<'_>, version: &[u8]) -> Result<(), CardError> {
        let fw = &self.firmware;
        let packages = gp.get_status(StatusScope::LoadFiles)?;
        let instances = gp.get_status(StatusScope::Applications)?;
        if !packages.iter().any(|p| p.aid == fw.package_aid && p.version.as_deref() == Some(version)) {
            return Err(CardError::verification("firmware load", "package absent after LOAD"));
        }
        for a in &fw.applets {
            if !instances.iter().any(|i| i.aid == a.instance_aid && i.lifecycle == app_state::SELECTABLE) {
                return Err(CardError::verification(
                    "firmware install",
                    format!("instance {} not selectable after INSTALL", hex::encode_upper(&a.instance_aid)),
                ));
            }
        }
        Ok(())
    }

    /// The identity certificate chains to a pinned CA, is valid now, names
    /// this chip, and carries the card key recorded before (if any).
    fn check_identity(
        &self,
        step: Step,
        card_id: CardId,
        cert: &Certificate,
        prior: Option<&PriorRecord>,
    ) -> Result<VerifyingKey, Failure> {
        use card::wallet::cert::CertError;
        let refuse = |reason: &str, detail: String| Failure::new(step, reason, detail, false);
        // Revocation first: a revoked CA is usually no longer pinned too,
        // and "revoked" is the truer reason.
        if self.profile.revoked.ca(&cert.issuer) {
            return Err(refuse(
                reason::REVOKED_CA,
                format!("certificate from CA {}, which the profile revokes", hex::encode_upper(cert.issuer)),
            ));
        }
        if let Some(f) = self.revoked_card(step, card_id, Some(&hex::encode_upper(cert.public_key))) {
            return Err(f);
        }
        let (card_key, _) = cert.verify(&self.profile.vendor_cas, unix_now()).map_err(|e| {
            let reason = match &e {
                CertError::UnknownIssuer(_) => reason::UNPINNED_CA,
                CertError::BadSignature => reason::CA_SIGNATURE,
                CertError::Expired { .. } | CertError::NotYetValid { .. } => reason::VALIDITY,
                CertError::BadPublicKey | CertError::Version(_) => reason::MALFORMED_CERTIFICATE,
            };
            refuse(reason, e.to_string())
        })?;
        if cert.subject != card_id {
            return Err(refuse(
                reason::IDENTITY_MISMATCH,
                format!("certificate names {} but the chip reports {card_id}", cert.subject),
            ));
        }
        if let Some(known) = prior.and_then(|p| p.card_public_key.as_deref())
            && known != hex::encode_upper(cert.public_key)
        {
            return Err(refuse(
                reason::CLONE_KEY_CHANGED,
                format!("card {card_id} presents another card key than the one recorded for it"),
            ));
        }
        Ok(card_key)
    }

    /// Identify: the chip's certificate, read from the card manager before
    /// anything is loaded, so counterfeit chips are refused before the
    /// seconds of LOAD. Cards that do not offer it are checked at
    /// attestation only.
    fn identify(
        &self,
        card_id: CardId,
        t: &mut dyn Transport,
        prior: Option<&PriorRecord>,
    ) -> Result<((), String, CardUpdate), Failure> {
        const S: Step = Step::Identify;
        let atr = hex::encode_upper(&t.atr().0);
        let Some(bytes) = session::read_identity(t).map_err(|e| Failure::from_card_error(S, &e))? else {
            return Ok(((), format!("ATR {atr}; no identity certificate before attestation"), CardUpdate::default()));
        };
        let cert = Certificate::parse(&bytes)
            .map_err(|e| Failure::new(S, reason::MALFORMED_CERTIFICATE, e.to_string(), false))?;
        self.check_identity(S, card_id, &cert, prior)?;
        let mut update = CardUpdate {
            card_public_key: Some(hex::encode_upper(cert.public_key)),
            ca_key_id: Some(hex::encode_upper(cert.issuer)),
            ..CardUpdate::default()
        };
        let mut detail = format!("ATR {atr}; certificate from CA {}", hex::encode_upper(cert.issuer));
        // Seen before with a card key: the card must prove it holds that
        // key before anything is done to it. Without its applet yet, the
        // attestation step makes the same proof.
        if let Some((p, key)) = prior.and_then(|p| recorded_key(p).map(|k| (p, k))) {
            match self.prove_recorded_key(S, card_id, t, &key, p, false)? {
                Some(counter) => {
                    update.attest_counter = Some(counter);
                    detail.push_str(&format!("; proved the recorded card key (counter {counter})"));
                }
                None => detail.push_str("; no applet yet: the recorded card key is proven at attestation"),
            }
        }
        Ok(((), detail, update))
    }

    /// Identity and attestation: certificate chains to a pinned CA, names
    /// this chip, the card signs our fresh challenge over its identity,
    /// firmware hash, lifecycle and a counter that only goes up.
    fn attest(
        &self,
        card_id: CardId,
        t: &mut dyn Transport,
        prior: Option<&PriorRecord>,
    ) -> Result<(Identity, String, CardUpdate), Failure> {
        const S: Step = Step::Attestation;
        let mut w = WalletClient::new(t);
        let info = w.select().map_err(|e| Failure::from_card_error(S, &e))?;
        let cert_failure = |reason: &str, detail: String| Failure::new(S, reason, detail, false);
        let cert = w.identity().map_err(|e| match e {
            CardError::Malformed { .. } => Failure::new(S, reason::MALFORMED_CERTIFICATE, e.to_string(), false),
            e => Failure::from_card_error(S, &e),
        })?;
        let card_key = self.check_identity(S, card_id, &cert, prior)?;
        let challenge = self.challenge(card_id);
        let att = w.attest(&challenge).map_err(|e| Failure::from_card_error(S, &e))?;
        self.check_attestation_proof(S, card_id, &card_key, prior, &challenge, &att)?;
        if att.firmware_hash != self.firmware.load_file_sha256 {
            return Err(cert_failure(
                "firmware hash mismatch",
                format!(
                    "card runs {} but the manifest says {}",
                    hex::encode(att.firmware_hash),
                    hex::encode(self.firmware.load_file_sha256)
                ),
            ));
        }
        if att.lifecycle != info.lifecycle as u8 || Lifecycle::from_byte(att.lifecycle).is_none() {
            return Err(cert_failure(
                "lifecycle mismatch",
                format!("attested {:02X}, selected {:?}", att.lifecycle, info.lifecycle),
            ));
        }
        let detail = format!(
            "CA {}, counter {}, lifecycle {}",
            hex::encode_upper(cert.issuer),
            att.counter,
            Lifecycle::from_byte(att.lifecycle).map_or("?", Lifecycle::name)
        );
        let issuer = self.profile.vendor_cas.iter().find(|k| ca_key_id(k) == cert.issuer).map(ca_key_id);
        let update = CardUpdate {
            firmware_sha256: Some(hex::encode(att.firmware_hash)),
            card_public_key: Some(hex::encode_upper(cert.public_key)),
            ca_key_id: issuer.map(hex::encode_upper),
            attest_counter: Some(att.counter),
            attested: Some(true),
            ..CardUpdate::default()
        };
        Ok(((card_key, cert.encode()), detail, update))
    }

    /// On-card KATs, signatures over host vectors verified here with k256,
    /// RNG health on card output, memory write/read.
    fn self_tests(&self, card_id: CardId, t: &mut dyn Transport, card_key: &VerifyingKey) -> Result<String, Failure> {
        const S: Step = Step::SelfTests;
        let st = &self.profile.self_tests;
        let mut w = WalletClient::new(t);
        let mut done = Vec::new();
        if st.kat {
            let bits = w.self_test_kat().map_err(|e| Failure::from_card_error(S, &e))?;
            if bits != wallet::self_test::KAT_ALL {
                let names = [(0x01, "SHA-256"), (0x02, "AES"), (0x04, "ECDSA"), (0x08, "ECDH"), (0x10, "RNG")];
                let failed: Vec<&str> = names.iter().filter(|(b, _)| bits & b == 0).map(|(_, n)| *n).collect();
                return Err(Failure::new(
                    S,
                    format!("KAT failed: {}", failed.join(", ")),
                    format!("KAT result {bits:02X}"),
                    false,
                ));
            }
            done.push("KAT".to_string());
        }
        for i in 0..st.signatures {
            let vector: [u8; 32] = random();
            let sig = w.self_test_sign(&vector).map_err(|e| Failure::from_card_error(S, &e))?;
            if !wallet::verify_digest(card_key, &wallet::self_test_digest(&card_id, &vector), &sig) {
                return Err(Failure::new(
                    S,
                    "signature self-test failed",
                    format!("signature {} of {} does not verify", i + 1, st.signatures),
                    false,
                ));
            }
        }
        if st.signatures > 0 {
            done.push(format!("{} signatures", st.signatures));
        }
        let mut samples = Vec::with_capacity(st.rng_bytes);
        let mut chunks = Vec::new();
        while samples.len() < st.rng_bytes {
            let n = (st.rng_bytes - samples.len()).min(128);
            let chunk = w.get_challenge(n).map_err(|e| Failure::from_card_error(S, &e))?;
            samples.extend_from_slice(&chunk);
            chunks.push(chunk);
        }
        rng_health(&samples, &chunks).map_err(|why| Failure::new(S, "RNG health check failed", why, false))?;
        done.push(format!("RNG {} bytes", st.rng_bytes));
        let seed: [u8; 4] = random();
        let expected: [u8; 32] = {
            use sha2::Digest;
            sha2::Sha256::digest(wallet::memory_pattern(&seed, st.memory_bytes as usize)).into()
        };
        let got = w.self_test_memory(&seed, st.memory_bytes).map_err(|e| Failure::from_card_error(S, &e))?;
        if got != expected {
            return Err(Failure::new(
                S,
                "memory self-test failed",
                "read-back differs from the pattern written",
                false,
            ));
        }
        done.push(format!("memory {} bytes", st.memory_bytes));
        Ok(done.join(", "))
    }
}

/// The card key the ledger recorded for a card, if any.
fn recorded_key(prior: &PriorRecord) -> Option<VerifyingKey> {
    let bytes = hex::decode(prior.card_public_key.as_deref()?).ok()?;
    VerifyingKey::from_sec1_bytes(&bytes).ok()
}

/// Health checks on card RNG output, after NIST SP 800-90B §4.4 in spirit:
/// a repetition count test, an adaptive proportion test per 256-byte
/// window, a monobit balance check, and no repeated response.
pub fn rng_health(samples: &[u8], chunks: &[Vec<u8>]) -> Result<(), String> {
    // Repetition count: 5 equal bytes in a row has probability ~2^-32 per
    // position for a good source.
    let mut run = 1;
    for w in samples.windows(2) {
        run = if w[0] == w[1] { run + 1 } else { 1 };
        if run >= 5 {
            return Err(format!("byte {:02X} repeated {run} times in a row", w[0]));
        }
    }
    for (i, window) in samples.chunks(256).enumerate() {
        let mut counts = [0u32; 256];
        for b in window {
            counts[*b as usize] += 1;
        }
        let (value, max) = counts.iter().enumerate().max_by_key(|(_, c)| **c).map(|(v, c)| (v, *c)).unwrap_or((0, 0));
        let limit = (window.len() as u32 / 256).max(1) * 10;
        if max > limit {
            return Err(format!("byte {value:02X} appears {max} times in window {i}"));
        }
    }
    let bits = samples.len() as f64 * 8.0;
    let ones: u32 = samples.iter().map(|b| b.count_ones()).sum();
    let sigma = (bits / 4.0).sqrt();
    if (f64::from(ones) - bits / 2.0).abs() > 5.0 * sigma {
        return Err(format!("{ones} one bits of {bits}: biased"));
    }
    for (i, c) in chunks.iter().enumerate() {
        if chunks[..i].contains(c) {
            return Err("two GET CHALLENGE responses were identical".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_challenge_memory_is_bounded_and_forgets_the_oldest_cards_first() {
        let id = |n: usize| {
            let mut b = [0u8; 10];
            b[..8].copy_from_slice(&(n as u64).to_be_bytes());
            CardId(b)
        };
        let mut m = Challenges::default();
        for n in 0..CHALLENGE_CARDS + 10 {
            m.remember(id(n), [n as u8; 32]);
        }
        assert_eq!(m.by_card.len(), CHALLENGE_CARDS);
        assert_eq!(m.order.len(), CHALLENGE_CARDS);
        assert!(!m.by_card.contains_key(&id(9)), "the oldest cards are forgotten");
        assert!(m.by_card.contains_key(&id(10)) && m.by_card.contains_key(&id(CHALLENGE_CARDS + 9)));
        // A card seen again keeps its place and its last challenges only.
        for k in 0..6u8 {
            m.remember(id(10), [k; 32]);
        }
        assert_eq!(m.by_card.len(), CHALLENGE_CARDS);
        assert_eq!(m.by_card[&id(10)], vec![[2; 32], [3; 32], [4; 32], [5; 32]]);
    }

    #[test]
    fn rng_health_accepts_good_and_rejects_stuck_output() {
        let mut good = vec![0u8; 512];
        getrandom::fill(&mut good).expect("os rng");
        let chunks: Vec<Vec<u8>> = good.chunks(128).map(<[u8]>::to_vec).collect();
        assert_eq!(rng_health(&good, &chunks), Ok(()));
        let stuck = vec![0u8; 256];
        assert!(rng_health(&stuck, std::slice::from_ref(&stuck)).is_err());
        let counter: Vec<u8> = (0..=255).collect();
        let mut twice = counter.clone();
        twice.extend(&counter);
        assert!(rng_health(&twice, &[counter.clone(), counter]).is_err(), "repeated chunk");
        let biased: Vec<u8> = good.iter().map(|b| b | 0x81).collect();
        assert!(rng_health(&biased, std::slice::from_ref(&biased)).is_err());
    }

    #[test]
    fn a_lost_reader_or_pcscd_fails_the_card_retryably() {
        // (ServiceUnavailable carries a pcsc::Error, which only
        // card::transport can make; it takes the same arm.)
        let gone = CardError::Transport(TransportError::ReaderUnavailable("emu-3".into()));
        assert!(Failure::from_card_error(Step::Firmware, &gone).retryable);
        let malformed = CardError::Transport(TransportError::ResponseTooLong(10));
        assert!(!Failure::from_card_error(Step::Firmware, &malformed).retryable);
    }
}
