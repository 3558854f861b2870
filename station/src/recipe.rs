//! The per-card recipe: identify, GP session, firmware, key rotation,
//! attestation, self-tests, record. Plain synchronous code over a
//! `Transport`, the same in the daemon, the tests and the rig. Every step
//! writes its intent to the ledger before it touches the card and its result
//! before the next step starts; every step is idempotent, so an interrupted
//! card resumes by simply running the recipe again.

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use card::gp::StatusScope;
use card::gp::session::{self, GpSession, KeyRing};
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

/// The stage a card reaches when it passes this recipe.
pub const STAGE_READY: &str = "ready_for_pairing";

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
        Self { profile, firmware, ledger, batch_id, ring, interrupt: AtomicBool::new(false) }
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
            // record untouched.
            Err(crate::ledger::LedgerError::Held { card, station }) => {
                let reason = format!("in progress at station {station}");
                let detail = crate::ledger::LedgerError::Held { card, station }.to_string();
                outcome.result = Err(Failure::new(Step::Identify, reason, detail, false));
                outcome.elapsed = started.elapsed();
                return Ok(outcome);
            }
            r => r?,
        };
        if prior.as_ref().is_some_and(|p| p.status == CardStatus::Passed) {
            let f = Failure::new(
                Step::Identify,
                "already provisioned",
                format!("card {card_id} is already recorded as passed; a second card with its identity is a clone"),
                false,
            );
            self.ledger.step(card_id, 0, Step::Identify.name(), StepEvent::Refused, &f.detail, reader.as_str())?;
            outcome.result = Err(f);
            outcome.elapsed = started.elapsed();
            return Ok(outcome);
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
            Ok((passed, ready)) => {
                outcome.result = Ok(passed);
                outcome.ready = ready;
            }
            Err(f) => outcome.result = Err(f),
        }
        outcome.elapsed = started.elapsed();
        Ok(outcome)
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
            let card = ReadyCard { card_id: a.card, attempt: a.attempt, certificate, card_key };
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
        let packages = gp.get_status(StatusScope::LoadFiles)?;
        let instances = gp.get_status(StatusScope::Applications)?;
        let version = vec![fw.package_version.0, fw.package_version.1];
        let package = packages.iter().find(|p| p.aid == fw.package_aid);
        let installed = |aid: &[u8]| {
            instances.iter().any(|i| {
                i.aid == aid && i.lifecycle & card::gp::app_state::SELECTABLE == card::gp::app_state::SELECTABLE
            })
        };
        if package.is_some_and(|p| p.version.as_ref() == Some(&version))
            && fw.applets.iter().all(|a| installed(&a.instance_aid))
        {
            return Ok(format!("{} {} already present", fw.manifest.name, fw.manifest.version));
        }
        let mut removed = Vec::new();
        for a in &fw.applets {
            if instances.iter().any(|i| i.aid == a.instance_aid) && gp.delete(&a.instance_aid, false)? {
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
        // Verify: the package at the right version, every instance selectable.
        let packages = gp.get_status(StatusScope::LoadFiles)?;
        let instances = gp.get_status(StatusScope::Applications)?;
        if !packages.iter().any(|p| p.aid == fw.package_aid && p.version.as_ref() == Some(&version)) {
            return Err(CardError::verification("firmware load", "package absent after LOAD"));
        }
        for a in &fw.applets {
            if !instances.iter().any(|i| i.aid == a.instance_aid && i.lifecycle == card::gp::app_state::SELECTABLE) {
                return Err(CardError::verification(
                    "firmware install",
                    format!("instance {} not selectable after INSTALL", hex::encode_upper(&a.instance_aid)),
                ));
            }
        }
        let mut detail = format!("loaded {} {} in {blocks} blocks", fw.manifest.name, fw.manifest.version);
        if !removed.is_empty() {
            detail.push_str(&format!(" after deleting {}", removed.join(", ")));
        }
        Ok(detail)
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
        let (card_key, _) = cert.verify(&self.profile.vendor_cas, unix_now()).map_err(|e| {
            let reason = match &e {
                CertError::UnknownIssuer(_) => "counterfeit: certificate from an unpinned CA",
                CertError::BadSignature => "counterfeit: certificate signature invalid",
                CertError::Expired { .. } | CertError::NotYetValid { .. } => "certificate outside its validity",
                CertError::BadPublicKey | CertError::Version(_) => "malformed certificate",
            };
            refuse(reason, e.to_string())
        })?;
        if cert.subject != card_id {
            return Err(refuse(
                "identity mismatch",
                format!("certificate names {} but the chip reports {card_id}", cert.subject),
            ));
        }
        if let Some(known) = prior.and_then(|p| p.card_public_key.as_deref())
            && known != hex::encode_upper(cert.public_key)
        {
            return Err(refuse(
                "identity changed",
                format!("card {card_id} presents another card key than recorded before (clone?)"),
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
        let cert = Certificate::parse(&bytes).map_err(|e| Failure::from_card_error(S, &e))?;
        self.check_identity(S, card_id, &cert, prior)?;
        let update = CardUpdate {
            card_public_key: Some(hex::encode_upper(cert.public_key)),
            ca_key_id: Some(hex::encode_upper(cert.issuer)),
            ..CardUpdate::default()
        };
        Ok(((), format!("ATR {atr}; certificate from CA {}", hex::encode_upper(cert.issuer)), update))
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
        let cert = w.identity().map_err(|e| Failure::from_card_error(S, &e))?;
        let card_key = self.check_identity(S, card_id, &cert, prior)?;
        let challenge: [u8; 32] = random();
        let att = w.attest(&challenge).map_err(|e| Failure::from_card_error(S, &e))?;
        if att.card_id != card_id {
            return Err(cert_failure("identity mismatch", format!("attestation names {}", att.card_id)));
        }
        if !wallet::verify_digest(&card_key, &att.digest(&challenge), &att.signature) {
            return Err(cert_failure(
                "attestation signature invalid",
                "the card's signature over the fresh challenge does not verify (replay or forgery)".into(),
            ));
        }
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
        if let Some(last) = prior.and_then(|p| p.attest_counter)
            && att.counter <= last
        {
            return Err(cert_failure(
                "attestation counter went backwards",
                format!("counter {} after {last} was recorded (clone or rollback)", att.counter),
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
