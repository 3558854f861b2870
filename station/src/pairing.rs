//! Bundles: the coordinator that pairs ready cards into one primary plus N
//! backups holding the same wallet key, by card-to-card transfer that the
//! host only relays. Cards stay on their readers; each reader's worker
//! thread keeps owning its transport and runs the coordinator's card calls
//! for it (`Lane`), so cards of one bundle on different readers are paired
//! without re-taps. Nothing here sees a wallet secret: blobs are opaque
//! ciphertext signed by the primary, and every claim a card makes is checked
//! with k256 against keys from verified certificates.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use card::transport::{ReaderId, Transport};
use card::wallet::bundle::{self, Role};
use card::wallet::client::WalletClient;
use card::wallet::{self, Lifecycle, TransferBlob, WalletKeyProof};
use card::{CardError, CardId};
use crossbeam_channel::{Receiver, Sender};
use sha2::{Digest, Sha256};

use crate::ledger::{Ledger, StepEvent, StepLine};
use crate::profile::{Bundles, Unpaired};
use crate::recipe::{Failure, Passed, ReadyCard, Step};
use crate::worker::Event;

/// Work for a waiting card's worker: runs on its transport.
pub type Job = Box<dyn FnOnce(&mut dyn Transport) + Send>;

/// What the coordinator sends a waiting card's worker.
pub enum LaneMsg {
    Job(Job),
    /// Pairing is over for this card: its final result.
    Verdict(Result<Passed, Failure>),
}

/// The worker of a waiting card has gone (its thread ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the reader's worker has stopped")]
pub struct LaneGone;

/// The coordinator's handle on the reader of a waiting card.
pub struct Lane {
    pub reader: ReaderId,
    tx: Sender<LaneMsg>,
}

impl Lane {
    pub fn new(reader: ReaderId, tx: Sender<LaneMsg>) -> Self {
        Self { reader, tx }
    }

    /// Runs `f` on the card's transport, on its worker thread, and waits.
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Transport) -> R + Send + 'static,
    ) -> Result<R, LaneGone> {
        self.start(f)?.recv().map_err(|_| LaneGone)
    }

    /// Starts `f` on the card's worker thread and returns at once; the
    /// answer comes on the receiver. Calls on different lanes run at the
    /// same time, on their own readers.
    pub fn start<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Transport) -> R + Send + 'static,
    ) -> Result<Receiver<R>, LaneGone> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let job: Job = Box::new(move |t| {
            let _ = tx.send(f(t));
        });
        self.tx.send(LaneMsg::Job(job)).map_err(|_| LaneGone)?;
        Ok(rx)
    }

    fn finish(&self, verdict: Result<Passed, Failure>) {
        let _ = self.tx.send(LaneMsg::Verdict(verdict));
    }
}

/// A ready card waiting for partners.
pub struct Waiting {
    pub card: ReadyCard,
    pub lane: Lane,
    pub since: Instant,
}

enum Msg {
    Offer(Waiting),
    /// No more cards will come; `offers` cards were offered in all (some of
    /// those offers may still be on their way).
    NoMoreCards {
        offers: usize,
    },
    Stop,
    /// A bundle thread ended: the cards back to the pool, and a bundle held
    /// for a member that left while it sealed.
    Finished(Vec<Waiting>, Option<Held>),
}

/// The handle workers and the batch use to talk to the coordinator.
#[derive(Clone)]
pub struct Coordinator {
    tx: Sender<Msg>,
}

impl Coordinator {
    /// Hands a ready card to the coordinator; its worker then serves `rx`.
    pub fn offer(&self, w: Waiting) -> Result<(), LaneGone> {
        self.tx.send(Msg::Offer(w)).map_err(|_| LaneGone)
    }

    /// No more cards will come after the `offers` offered in all: release
    /// what cannot form a bundle once those have arrived.
    pub fn no_more_cards(&self, offers: usize) {
        let _ = self.tx.send(Msg::NoMoreCards { offers });
    }

    /// Release every waiting card and stop.
    pub fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
    }
}

/// What the coordinator needs, fixed for a batch.
pub struct Setup {
    pub bundles: Bundles,
    pub ledger: Ledger,
    pub batch_id: i64,
    pub events: Sender<Event>,
    /// Where printable bundle labels go (one file per sealed bundle).
    pub labels: Option<PathBuf>,
}

/// Starts the coordinator thread.
pub fn start(setup: Setup) -> std::io::Result<(Coordinator, JoinHandle<()>)> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let handle = Coordinator { tx: tx.clone() };
    let setup = Arc::new(setup);
    let join = std::thread::Builder::new().name("bundle-coordinator".into()).spawn(move || run(setup, rx, tx))?;
    Ok((handle, join))
}

/// How often the coordinator looks for cards that waited too long.
const TICK: Duration = Duration::from_millis(250);

fn run(setup: Arc<Setup>, rx: Receiver<Msg>, tx: Sender<Msg>) {
    let size = setup.bundles.size();
    let mut pool: VecDeque<Waiting> = VecDeque::new();
    let mut in_flight = 0usize;
    let mut received = 0usize;
    let mut no_more: Option<usize> = None;
    let mut stopping = false;
    let mut bundle_threads: Vec<JoinHandle<()>> = Vec::new();
    let mut held: Vec<Held> = Vec::new();
    loop {
        match rx.recv_timeout(TICK) {
            Ok(Msg::Offer(w)) => {
                received += 1;
                // The missing member of a held bundle is back.
                match held.iter().position(|h| h.missing_id == w.card.card_id) {
                    Some(pos) => {
                        let h = held.remove(pos);
                        in_flight += 1;
                        let (setup, tx) = (Arc::clone(&setup), tx.clone());
                        match std::thread::Builder::new().name("bundle".into()).spawn(move || {
                            resume(&setup, h, w);
                            let _ = tx.send(Msg::Finished(Vec::new(), None));
                        }) {
                            Ok(t) => bundle_threads.push(t),
                            Err(e) => {
                                tracing::error!(error = %e, "cannot start a bundle thread");
                                in_flight -= 1;
                            }
                        }
                    }
                    None => pool.push_back(w),
                }
            }
            Ok(Msg::NoMoreCards { offers }) => no_more = Some(offers),
            Ok(Msg::Stop) => stopping = true,
            Ok(Msg::Finished(returned, h)) => {
                in_flight -= 1;
                held.extend(h);
                // Cards reset after an aborted bundle go back to the front:
                // they have waited longest.
                for w in returned.into_iter().rev() {
                    pool.push_front(w);
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        }
        while !stopping && pool.len() >= size {
            let members: Vec<Waiting> = pool.drain(..size).collect();
            in_flight += 1;
            let (setup, tx) = (Arc::clone(&setup), tx.clone());
            match std::thread::Builder::new().name("bundle".into()).spawn(move || {
                let (returned, h) = form_bundle(&setup, members);
                let _ = tx.send(Msg::Finished(returned, h));
            }) {
                Ok(h) => bundle_threads.push(h),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start a bundle thread");
                    in_flight -= 1;
                    break;
                }
            }
        }
        // Finished bundle threads are joined as they end: an unjoined
        // thread keeps its stack, and a long batch forms thousands.
        let (ended, running): (Vec<_>, Vec<_>) = bundle_threads.into_iter().partition(|h| h.is_finished());
        for h in ended {
            let _ = h.join();
        }
        bundle_threads = running;
        // Cards that waited too long, or that can never find partners.
        let all_here = no_more.is_some_and(|n| received >= n);
        let hopeless = stopping || (all_here && in_flight == 0 && pool.len() < size);
        let mut keep = VecDeque::with_capacity(pool.len());
        for w in pool.drain(..) {
            if hopeless || w.since.elapsed() > setup.bundles.max_wait {
                release(&setup, w);
            } else {
                keep.push_back(w);
            }
        }
        pool = keep;
        let (expired, waiting): (Vec<Held>, Vec<Held>) =
            held.into_iter().partition(|h| stopping || h.since.elapsed() > setup.bundles.max_wait);
        held = waiting;
        for h in expired {
            let why = format!("card {} did not come back to finish the seal", h.missing_id);
            give_up(&setup, &h.id, h.members, &why);
        }
        if stopping && in_flight == 0 {
            break;
        }
    }
    for w in pool {
        release(&setup, w);
    }
    for h in held {
        let why = format!("card {} did not come back to finish the seal", h.missing_id);
        give_up(&setup, &h.id, h.members, &why);
    }
    for h in bundle_threads {
        let _ = h.join();
    }
}

/// A ready card found no partners: recorded per the profile. A card that
/// holds a wallet key (sealed in a bundle that aborted, presented again) is
/// not an unpaired card: it fails, not retryable.
fn release(setup: &Setup, w: Waiting) {
    let c = &w.card;
    let state = w.lane.call(|t| WalletClient::new(t).select());
    let keyed = match &state {
        Ok(Ok(info)) if info.lifecycle != Lifecycle::Installed || info.has_wallet_key => Some(format!("{info:?}")),
        _ => None,
    };
    let verdict = match (keyed, setup.bundles.unpaired) {
        (Some(info), _) => {
            let f = Failure {
                step: Step::Pairing,
                reason: "holds a wallet key outside any recorded bundle".into(),
                detail: format!("card reports {info}"),
                retryable: false,
            };
            let _ = setup.ledger.fail(c.card_id, c.attempt, Step::Pairing.name(), &f.reason, &f.detail, false);
            Err(f)
        }
        (None, Unpaired::Pass) => match setup.ledger.pass(c.card_id, c.attempt, "unpaired") {
            Ok(serial) => Ok(Passed { serial, stage: "unpaired".into(), bundle: None, role: None }),
            Err(e) => Err(Failure {
                step: Step::Pairing,
                reason: "ledger refused".into(),
                detail: e.to_string(),
                retryable: true,
            }),
        },
        (None, Unpaired::Fail) => {
            let f = Failure {
                step: Step::Pairing,
                reason: "no partners".into(),
                detail: "released without a bundle at the end of the batch or after waiting too long".into(),
                retryable: true,
            };
            let _ = setup.ledger.fail(c.card_id, c.attempt, Step::Pairing.name(), &f.reason, &f.detail, true);
            Err(f)
        }
    };
    w.lane.finish(verdict);
}

/// A failed pairing: which member is to blame (if any) and why.
struct PairError {
    culprit: Option<usize>,
    failure: Failure,
}

fn card_error(who: usize, what: &str, e: &CardError) -> PairError {
    let base = Failure::from_card_error(Step::Pairing, e);
    PairError { culprit: Some(who), failure: Failure { reason: format!("{what}: {}", base.reason), ..base } }
}

fn lying(who: usize, reason: &str, detail: String) -> PairError {
    PairError {
        culprit: Some(who),
        failure: Failure { step: Step::Pairing, reason: reason.to_string(), detail, retryable: false },
    }
}

/// Calls `f` on member `who` as the wallet client; maps every error to
/// that member.
fn on<R: Send + 'static>(
    members: &[Waiting],
    who: usize,
    what: &'static str,
    f: impl FnOnce(&mut WalletClient<'_>) -> Result<R, CardError> + Send + 'static,
) -> Result<R, PairError> {
    wait(who, what, members[who].lane.start(move |t| f(&mut WalletClient::new(t))))
}

/// Runs one call on each of several members at once (each on its own
/// reader) and waits for all of them; the answers in the order of `jobs`.
/// The first member (in that order) that failed is the culprit.
fn on_all<R, F>(members: &[Waiting], what: &'static str, jobs: Vec<(usize, F)>) -> Result<Vec<R>, PairError>
where
    R: Send + 'static,
    F: FnOnce(&mut WalletClient<'_>) -> Result<R, CardError> + Send + 'static,
{
    let started: Vec<_> = jobs
        .into_iter()
        .map(|(who, f)| (who, members[who].lane.start(move |t| f(&mut WalletClient::new(t)))))
        .collect();
    let mut out = Vec::with_capacity(started.len());
    let mut failed = None;
    // Every started call is waited for, so none still runs when the bundle
    // aborts and resets its cards.
    for (who, rx) in started {
        match rx.and_then(|rx| rx.recv().map_err(|_| LaneGone)) {
            Ok(Ok(r)) => out.push(r),
            Ok(Err(e)) => {
                failed.get_or_insert_with(|| card_error(who, what, &e));
            }
            Err(LaneGone) => {
                failed.get_or_insert_with(|| PairError {
                    culprit: Some(who),
                    failure: Failure {
                        step: Step::Pairing,
                        reason: format!("{what}: reader stopped"),
                        detail: "the reader's worker ended during pairing".into(),
                        retryable: true,
                    },
                });
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

fn role_name(i: usize) -> &'static str {
    if i == 0 { "primary" } else { "backup" }
}

thread_local! {
    /// This bundle thread's time in ledger commits (for the benchmarks).
    static LEDGER_TIME: std::cell::Cell<Duration> = const { std::cell::Cell::new(Duration::ZERO) };
}

/// Runs a ledger call, adding its time to the bundle's ledger time.
fn timed<R>(f: impl FnOnce() -> R) -> R {
    let started = Instant::now();
    let r = f();
    LEDGER_TIME.with(|t| t.set(t.get() + started.elapsed()));
    r
}

/// The journal lines of pairing phases (`(phase, event, detail)`, in
/// order) for every member.
fn lines(members: &[Waiting], phases: &[(&'static str, StepEvent, &str)]) -> Vec<StepLine> {
    phases
        .iter()
        .flat_map(|&(phase, event, detail)| {
            members.iter().map(move |w| StepLine {
                card: w.card.card_id,
                attempt: w.card.attempt,
                step: phase,
                event,
                detail: detail.to_string(),
                reader: w.lane.reader.to_string(),
            })
        })
        .collect()
}

/// Journals pairing phase lines for every member, all in one transaction:
/// one commit. A phase's `done` goes with the next phase's `intent`, so
/// both are durable before the next phase touches a card, at one commit
/// instead of two.
fn journal(setup: &Setup, members: &[Waiting], phases: &[(&'static str, StepEvent, &str)]) -> Result<(), PairError> {
    timed(|| setup.ledger.steps(lines(members, phases))).map_err(|e| PairError {
        culprit: None,
        failure: Failure {
            step: Step::Pairing,
            reason: "ledger refused".into(),
            detail: e.to_string(),
            retryable: true,
        },
    })
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the operating system's random number generator failed");
    b
}

/// Forms, verifies and records one bundle; returns the members that go
/// back to the pool (reset after an abort).
fn form_bundle(setup: &Setup, members: Vec<Waiting>) -> (Vec<Waiting>, Option<Held>) {
    let bundle_id: [u8; 16] = random();
    let id = hex::encode_upper(bundle_id);
    let roles: Vec<(CardId, &'static str)> =
        members.iter().enumerate().map(|(i, w)| (w.card.card_id, role_name(i))).collect();
    LEDGER_TIME.with(|t| t.set(Duration::ZERO));
    // The bundle and every member's first pairing intent in one commit.
    let link = lines(&members, &[("pair_link", StepEvent::Intent, &format!("bundle {id}"))]);
    if let Err(e) = timed(|| setup.ledger.bundle_start_then(&id, setup.batch_id, roles, link)) {
        // Nothing touched the cards yet; they go back to the pool.
        tracing::error!(bundle = %id, error = %e, "ledger refused a new bundle");
        let _ = setup.events.send(Event::Fatal { reader: members[0].lane.reader.clone(), error: e.to_string() });
        return (members, None);
    }
    let _ =
        setup.events.send(Event::Bundle { bundle: id.clone(), status: BundleStatus::Forming, members: ids(&members) });
    let mut sealing = None;
    let out = match pair(setup, &members, &bundle_id, &mut sealing) {
        Ok(wallet_key) => (seal_record(setup, &id, members, &wallet_key), None),
        // A member left the field while the bundle sealed: the others may
        // already be sealed and cannot be reset. Roll forward instead.
        Err(e) if sealing.is_some() && e.failure.retryable && e.culprit.is_some() => {
            let wallet_pub = sealing.unwrap_or([0; 33]);
            match roll_forward(setup, &id, bundle_id, wallet_pub, members, e) {
                Ok(held) => (Vec::new(), Some(held)),
                Err((members, e)) => (abort(setup, &id, members, e), None),
            }
        }
        Err(e) => (abort(setup, &id, members, e), None),
    };
    crate::worker::add_bundle_ledger_time(LEDGER_TIME.with(std::cell::Cell::get));
    out
}

/// A bundle whose seal was interrupted by a member that left the field:
/// the members still there are sealed (rolled forward) and held on their
/// readers until the missing card comes back (its recipe runs again and
/// offers it) and is sealed too, or until the profile's `max_wait`.
pub struct Held {
    id: String,
    bundle_id: [u8; 16],
    wallet_pub: [u8; 33],
    missing: usize,
    missing_id: CardId,
    /// The members by position, `None` at the missing one.
    members: Vec<Option<Waiting>>,
    since: Instant,
}

/// FINALIZE (if not sealed yet) and check member `i` sealed in the bundle.
fn seal_member(members: &[Waiting], i: usize, bid: [u8; 16], wallet_pub: &[u8; 33]) -> Result<(), PairError> {
    let info = on(members, i, "select", |w| w.select())?;
    if info.lifecycle == Lifecycle::Sealed && info.bundle_id == Some(bid) && info.has_wallet_key {
        return Ok(());
    }
    if info.lifecycle != Lifecycle::Linked || info.bundle_id != Some(bid) || !info.has_wallet_key {
        return Err(lying(i, "cannot resume the seal", format!("card reports {info:?}")));
    }
    let (sig, info) = on(members, i, "finalize", |w| {
        let sig = w.finalize()?;
        Ok((sig, w.select()?))
    })?;
    let c = &members[i].card;
    let role = if i == 0 { Role::Primary } else { Role::Backup };
    if !wallet::verify_digest(&c.card_key, &bundle::sealed_digest(&bid, &c.card_id, role, wallet_pub), &sig) {
        return Err(lying(i, "seal proof invalid", "signature does not verify with the card key".into()));
    }
    if info.lifecycle != Lifecycle::Sealed || info.bundle_id != Some(bid) || !info.has_wallet_key {
        return Err(lying(i, "not sealed after FINALIZE", format!("card reports {info:?}")));
    }
    Ok(())
}

/// Seals the members still there (backups, then the primary, whose
/// backups all confirmed before the seal began), fails the missing one
/// retryable, and holds the rest for it.
fn roll_forward(
    setup: &Setup,
    id: &str,
    bid: [u8; 16],
    wallet_pub: [u8; 33],
    members: Vec<Waiting>,
    e: PairError,
) -> Result<Held, (Vec<Waiting>, PairError)> {
    let missing = e.culprit.unwrap_or(0);
    let order = (1..members.len()).chain([0]).filter(|i| *i != missing);
    for i in order {
        if let Err(err) = seal_member(&members, i, bid, &wallet_pub) {
            return Err((members, err));
        }
    }
    let mut slots: Vec<Option<Waiting>> = members.into_iter().map(Some).collect();
    let Some(gone) = slots[missing].take() else { unreachable!("the missing member is in the bundle") };
    let c = &gone.card;
    let f = &e.failure;
    let _ = setup.ledger.fail(c.card_id, c.attempt, Step::Pairing.name(), &f.reason, &f.detail, f.retryable);
    gone.lane.finish(Err(f.clone()));
    let present: Vec<&Waiting> = slots.iter().flatten().collect();
    for w in &present {
        let _ = setup.ledger.step(
            w.card.card_id,
            w.card.attempt,
            "pair_seal",
            StepEvent::Intent,
            &format!("bundle {id}: sealed; waiting for card {} to come back and seal", c.card_id),
            w.lane.reader.as_str(),
        );
    }
    tracing::info!(bundle = %id, missing = %c.card_id, "seal interrupted; members sealed and held for the missing card");
    Ok(Held {
        id: id.to_string(),
        bundle_id: bid,
        wallet_pub,
        missing,
        missing_id: c.card_id,
        members: slots,
        since: Instant::now(),
    })
}

/// The missing card of a held bundle is back and ready: seal it, check it
/// holds the wallet key, record the bundle sealed.
fn resume(setup: &Setup, mut held: Held, w: Waiting) {
    held.members[held.missing] = Some(w);
    let members: Vec<Waiting> = held.members.into_iter().flatten().collect();
    let (id, bid, wallet_pub, i) = (held.id, held.bundle_id, held.wallet_pub, held.missing);
    // A sealed card no longer proves the wallet key by signing; it shows
    // it: GET WALLET KEY, signed with its card key.
    let checked = seal_member(&members, i, bid, &wallet_pub).and_then(|()| {
        let proof = on(&members, i, "wallet key", |w| w.wallet_key())?;
        let c = &members[i].card;
        let shown = proof.map(|p| p.verify(&c.card_id, &c.card_key).map(|k| wallet::public_key_bytes(&k)));
        match shown {
            Some(Ok(k)) if k == wallet_pub => Ok(()),
            other => Err(lying(i, "wallet key differs", format!("the card shows {other:?}, not the bundle's key"))),
        }
    });
    match checked.and_then(|()| journal(setup, &members, &[("pair_seal", StepEvent::Done, "resumed after a tear")])) {
        Ok(()) => {
            seal_record(setup, &id, members, &wallet_pub);
        }
        Err(e) => give_up(setup, &id, members.into_iter().map(Some).collect(), &e.failure.reason),
    }
}

/// A held bundle that cannot be completed: its members are sealed and
/// cannot be reworked; they fail, not retryable, and the bundle aborts.
fn give_up(setup: &Setup, id: &str, members: Vec<Option<Waiting>>, why: &str) {
    let _ = setup.ledger.bundle_aborted(id, why);
    let all: Vec<CardId> = members.iter().flatten().map(|w| w.card.card_id).collect();
    let _ = setup.events.send(Event::Bundle { bundle: id.to_string(), status: BundleStatus::Aborted, members: all });
    for w in members.into_iter().flatten() {
        let f = Failure {
            step: Step::Pairing,
            reason: format!("bundle aborted, {why}"),
            detail: format!("sealed in bundle {id}, which could not be completed"),
            retryable: false,
        };
        let c = &w.card;
        let _ = setup.ledger.fail(c.card_id, c.attempt, Step::Pairing.name(), &f.reason, &f.detail, false);
        w.lane.finish(Err(f));
    }
}

fn ids(members: &[Waiting]) -> Vec<CardId> {
    members.iter().map(|w| w.card.card_id).collect()
}

/// The status of a bundle, as events report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleStatus {
    Forming,
    Sealed,
    Aborted,
}

/// The card-to-card protocol, relayed: returns the bundle's wallet public
/// key once every member is sealed and verified.
/// `sealing` is set to the wallet key once the seal phase begins: from
/// then on some members may be sealed whatever happens.
fn pair(
    setup: &Setup,
    members: &[Waiting],
    bundle_id: &[u8; 16],
    sealing: &mut Option<[u8; 33]>,
) -> Result<[u8; 33], PairError> {
    let n = members.len();
    let backups = (n - 1) as u8;
    let label = hex::encode_upper(bundle_id);

    // Every member starts clean: a card left linked by an interrupted
    // bundle is reset for rework first. (The `pair_link` intent was
    // journaled with the bundle's start.)
    let infos = on_all(members, "select", (0..n).map(|i| (i, |w: &mut WalletClient<'_>| w.select())).collect())?;
    for (i, info) in infos.into_iter().enumerate() {
        if info.lifecycle == Lifecycle::Sealed {
            return Err(lying(i, "already sealed", "the card is sealed in a bundle the ledger does not hold".into()));
        }
        if info.lifecycle != Lifecycle::Installed || info.has_wallet_key || info.role.is_some() {
            on(members, i, "reset for rework", |w| w.abort_bundle())?;
            let again = on(members, i, "select", |w| w.select())?;
            if again.lifecycle != Lifecycle::Installed || again.has_wallet_key {
                return Err(lying(i, "reset for rework failed", format!("card reports {again:?} after ABORT")));
            }
        }
    }

    // The primary makes the wallet key and proves it was born there.
    let primary = &members[0].card;
    let proof: WalletKeyProof = on(members, 0, "generate wallet key", |w| w.generate_wallet_key())?;
    let wallet_key = proof
        .verify(&primary.card_id, &primary.card_key)
        .map_err(|e| lying(0, "wallet key proof invalid", e.to_string()))?;
    let wallet_pub = wallet::public_key_bytes(&wallet_key);

    // Linking: the primary announces the bundle, each backup verifies the
    // primary and attests itself over the primary's nonce, the primary
    // verifies each backup (a counterfeit is refused by the primary itself).
    let bid = *bundle_id;
    let nonce = on(members, 0, "link primary", move |w| w.link_primary(&bid, backups))?;
    // The backups attest at the same time, each on its own reader.
    let atts = on_all(
        members,
        "link backup",
        (1..n)
            .map(|i| {
                let primary_cert = primary.certificate.clone();
                (i, move |w: &mut WalletClient<'_>| w.link_backup(&bid, &primary_cert, &nonce))
            })
            .collect(),
    )?;
    for (i, att) in (1..n).zip(atts) {
        let b = &members[i].card;
        if att.card_id != b.card_id
            || !wallet::verify_digest(
                &b.card_key,
                &bundle::link_digest(
                    &bid,
                    &primary.card_id,
                    &nonce,
                    &b.card_id,
                    &att.firmware_hash,
                    Lifecycle::Linked as u8,
                ),
                &att.signature,
            )
        {
            return Err(lying(i, "link attestation invalid", "signature does not verify with the card key".into()));
        }
        let cert = b.certificate.clone();
        on(members, 0, "add backup", move |w| w.add_backup(&cert, &att))?;
    }
    journal(
        setup,
        members,
        &[
            ("pair_link", StepEvent::Done, &format!("bundle {label}, {backups} backup(s)")),
            ("pair_transfer", StepEvent::Intent, ""),
        ],
    )?;

    // Transfer: primary -> each backup, relayed; the backup confirms over
    // the wallet key with its card key, the primary checks the confirmation.
    transfer(members, &bid, &wallet_pub)?;
    // Host check before sealing: every member proves, by signing a fresh
    // challenge with the wallet key, that it holds the same key.
    journal(setup, members, &[("pair_transfer", StepEvent::Done, ""), ("pair_prove", StepEvent::Intent, "")])?;
    let challenges: Vec<[u8; 32]> = (0..n).map(|_| random()).collect();
    let proofs = on_all(
        members,
        "prove wallet",
        challenges.iter().enumerate().map(|(i, &c)| (i, move |w: &mut WalletClient<'_>| w.prove_wallet(&c))).collect(),
    )?;
    for (i, (p, challenge)) in proofs.into_iter().zip(&challenges).enumerate() {
        let card_id = members[i].card.card_id;
        if p.wallet_key != wallet_pub
            || !wallet::verify_digest(
                &wallet_key,
                &bundle::wallet_proof_digest(challenge, &card_id, Some(&bid)),
                &p.signature,
            )
        {
            return Err(lying(i, "wallet key differs", "the card does not prove the bundle's wallet key".into()));
        }
    }
    // Seal: backups first, the primary last (it checks all confirmed).
    // The wallet public key goes into every member's journal before the
    // first FINALIZE: a card torn while the bundle seals may end sealed in
    // a bundle the ledger records aborted, and the ledger must still know
    // which wallet key that card holds.
    let seal_line = format!("wallet key {}", hex::encode_upper(wallet_pub));
    journal(
        setup,
        members,
        &[
            ("pair_prove", StepEvent::Done, "all members hold the wallet key"),
            ("pair_seal", StepEvent::Intent, &seal_line),
        ],
    )?;
    *sealing = Some(wallet_pub);
    // The backups finalize at the same time, each on its own reader (FINALIZE
    // and the SELECT that checks it); then the primary.
    let finalize = |w: &mut WalletClient<'_>| -> Result<_, CardError> {
        let sig = w.finalize()?;
        Ok((sig, w.select()))
    };
    let mut sealed: Vec<(usize, _)> =
        (1..n).zip(on_all(members, "finalize", (1..n).map(|i| (i, finalize)).collect())?).collect();
    sealed.push((0, on(members, 0, "finalize", finalize)?));
    for (i, (sig, info)) in sealed {
        let c = &members[i].card;
        let role = if i == 0 { Role::Primary } else { Role::Backup };
        if !wallet::verify_digest(&c.card_key, &bundle::sealed_digest(&bid, &c.card_id, role, &wallet_pub), &sig) {
            return Err(lying(i, "seal proof invalid", "signature does not verify with the card key".into()));
        }
        let info = info.map_err(|e| card_error(i, "select", &e))?;
        if info.lifecycle != Lifecycle::Sealed || info.bundle_id != Some(bid) || !info.has_wallet_key {
            return Err(lying(i, "not sealed after FINALIZE", format!("card reports {info:?}")));
        }
    }
    // The `pair_seal` result is journaled with the sealed bundle's record.
    Ok(wallet_pub)
}

/// Waits for a call started on member `who`; maps every error to it.
fn wait<R>(
    who: usize,
    what: &'static str,
    rx: Result<Receiver<Result<R, CardError>>, LaneGone>,
) -> Result<R, PairError> {
    match rx.and_then(|rx| rx.recv().map_err(|_| LaneGone)) {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(card_error(who, what, &e)),
        Err(LaneGone) => Err(PairError {
            culprit: Some(who),
            failure: Failure {
                step: Step::Pairing,
                reason: format!("{what}: reader stopped"),
                detail: "the reader's worker ended during pairing".into(),
                retryable: true,
            },
        }),
    }
}

/// The transfer, pipelined: the primary exports to each backup in turn,
/// and each backup imports its checked blob on its own reader while the
/// primary exports the next; each confirmation is checked and given to the
/// primary as it comes, while later backups still import. Every check of
/// the sequential relay is kept; every started call is waited for before
/// an error is returned, so none still runs when the bundle aborts.
fn transfer(members: &[Waiting], bid: &[u8; 16], wallet_pub: &[u8; 33]) -> Result<(), PairError> {
    let n = members.len();
    let primary = &members[0].card;
    let bid = *bid;
    let wallet_pub = *wallet_pub;
    let mut imports = Vec::with_capacity(n - 1);
    let mut failed: Option<PairError> = None;
    for i in 1..n {
        let to = members[i].card.card_id;
        let blob = match on(members, 0, "export", move |w| w.export_to(&to)) {
            Ok(b) => b,
            Err(e) => {
                failed = Some(e);
                break;
            }
        };
        let checked = match TransferBlob::parse(&blob) {
            Err(e) => Err(lying(0, "transfer blob malformed", e.to_string())),
            Ok(p) if p.bundle_id != bid || p.from != primary.card_id || p.to != to || p.wallet_key != wallet_pub => {
                Err(lying(0, "transfer blob misaddressed", "bundle, sender, recipient or wallet key differ".into()))
            }
            Ok(_) => Ok(()),
        };
        if let Err(e) = checked {
            failed = Some(e);
            break;
        }
        imports.push((i, members[i].lane.start(move |t| WalletClient::new(t).import(&blob))));
    }
    for (i, rx) in imports {
        let confirmation = wait(i, "import", rx);
        if failed.is_some() {
            continue;
        }
        let b = &members[i].card;
        let checked = confirmation.and_then(|c| {
            if c.card_id != b.card_id
                || c.wallet_key != wallet_pub
                || !wallet::verify_digest(
                    &b.card_key,
                    &bundle::confirm_digest(&bid, &b.card_id, &primary.card_id, &wallet_pub),
                    &c.signature,
                )
            {
                return Err(lying(i, "import confirmation invalid", "wrong key or signature".into()));
            }
            on(members, 0, "confirm backup", move |w| w.confirm_backup(&c))
        });
        if let Err(e) = checked {
            failed = Some(e);
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn seal_record(setup: &Setup, id: &str, members: Vec<Waiting>, wallet_pub: &[u8; 33]) -> Vec<Waiting> {
    let pub_hex = hex::encode_upper(wallet_pub);
    let done = lines(&members, &[("pair_seal", StepEvent::Done, "")]);
    match timed(|| setup.ledger.bundle_sealed_after(done, id, &pub_hex)) {
        Ok(serials) => {
            if let Some(dir) = &setup.labels
                && let Err(e) = write_label(dir, id, &members, &serials, wallet_pub)
            {
                tracing::warn!(bundle = %id, error = %e, "cannot write the bundle label");
            }
            let _ = setup.events.send(Event::Bundle {
                bundle: id.to_string(),
                status: BundleStatus::Sealed,
                members: ids(&members),
            });
            for (i, w) in members.iter().enumerate() {
                let serial = serials.iter().find(|(c, _)| *c == w.card.card_id).map(|(_, s)| *s);
                w.lane.finish(Ok(Passed {
                    serial,
                    stage: "bundled".into(),
                    bundle: Some(id.to_string()),
                    role: Some(role_name(i).to_string()),
                }));
            }
        }
        Err(e) => {
            // Sealed on the cards, refused by the ledger: never claim a
            // bundle the ledger does not hold; the cards fail loudly.
            tracing::error!(bundle = %id, error = %e, "ledger refused a sealed bundle");
            let _ = setup.events.send(Event::Fatal { reader: members[0].lane.reader.clone(), error: e.to_string() });
            for w in &members {
                w.lane.finish(Err(Failure {
                    step: Step::Pairing,
                    reason: "ledger refused the sealed bundle".into(),
                    detail: e.to_string(),
                    retryable: false,
                }));
            }
        }
    }
    Vec::new()
}

fn abort(setup: &Setup, id: &str, members: Vec<Waiting>, e: PairError) -> Vec<Waiting> {
    tracing::info!(bundle = %id, reason = %e.failure.reason, "bundle aborted");
    let _ = setup.ledger.bundle_aborted(id, &e.failure.to_string());
    let _ = setup.events.send(Event::Bundle {
        bundle: id.to_string(),
        status: BundleStatus::Aborted,
        members: ids(&members),
    });
    let mut back = Vec::new();
    for (i, w) in members.into_iter().enumerate() {
        let c = &w.card;
        let failed = |f: &Failure| {
            let _ = setup.ledger.fail(c.card_id, c.attempt, Step::Pairing.name(), &f.reason, &f.detail, f.retryable);
        };
        if e.culprit == Some(i) {
            failed(&e.failure);
            w.lane.finish(Err(e.failure.clone()));
            continue;
        }
        // Reset for rework and verify it; a card that cannot be reset fails.
        let reset = w.lane.call(|t| {
            let mut c = WalletClient::new(t);
            c.abort_bundle()?;
            c.select()
        });
        match reset {
            Ok(Ok(info)) if info.lifecycle == Lifecycle::Installed && !info.has_wallet_key && info.role.is_none() => {
                let _ = setup.ledger.step(
                    c.card_id,
                    c.attempt,
                    "pair_abort",
                    StepEvent::Done,
                    &format!("bundle {id} aborted ({}); reset for rework", e.failure.reason),
                    w.lane.reader.as_str(),
                );
                back.push(Waiting { since: Instant::now(), ..w });
            }
            other => {
                let f = match other {
                    Ok(Err(err)) => Failure::from_card_error(Step::Pairing, &err),
                    Ok(Ok(info)) => Failure {
                        step: Step::Pairing,
                        reason: "reset for rework failed".into(),
                        detail: format!("card reports {info:?} after ABORT"),
                        retryable: false,
                    },
                    Err(LaneGone) => Failure {
                        step: Step::Pairing,
                        reason: "reader stopped".into(),
                        detail: "the reader's worker ended during an abort".into(),
                        retryable: true,
                    },
                };
                let f = Failure { reason: format!("bundle aborted, {}", f.reason), ..f };
                failed(&f);
                w.lane.finish(Err(f));
            }
        }
    }
    back
}

/// The wallet fingerprint printed on labels: SHA-256 of the compressed
/// public key, first 8 bytes in groups of 4 hex digits.
pub fn fingerprint(wallet_pub: &[u8; 33]) -> String {
    let h = Sha256::digest(wallet_pub);
    h[..8].chunks(2).map(hex::encode_upper).collect::<Vec<_>>().join("-")
}

/// A printable label for one sealed bundle, so the operator can sleeve and
/// label the cards together.
fn write_label(
    dir: &std::path::Path,
    id: &str,
    members: &[Waiting],
    serials: &[(CardId, i64)],
    wallet_pub: &[u8; 33],
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut s = String::new();
    s.push_str("TAPLINE WALLET BUNDLE\n");
    s.push_str(&format!("bundle     {id}\n"));
    s.push_str(&format!("wallet     {}\n", fingerprint(wallet_pub)));
    let backups = members.len() - 1;
    let plural = if backups == 1 { "" } else { "s" };
    s.push_str(&format!("cards      {} (1 primary + {backups} backup{plural})\n\n", members.len()));
    s.push_str("order  role     card id               serial  reader\n");
    for (i, w) in members.iter().enumerate() {
        let serial =
            serials.iter().find(|(c, _)| *c == w.card.card_id).map_or(String::from("-"), |(_, s)| s.to_string());
        s.push_str(&format!(
            "{:<6} {:<8} {:<21} {:<7} {}\n",
            i + 1,
            role_name(i),
            w.card.card_id.to_hex(),
            serial,
            w.lane.reader
        ));
    }
    std::fs::write(dir.join(format!("bundle-{id}.txt")), s)
}
