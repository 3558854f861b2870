//! The emulated line of the tearing tests: three readers, a bundle's cards
//! fed one after another (the next card enters when the one before is ready
//! for pairing, so the first card is the primary and the others backups 1
//! and 2, whatever the machine's speed), a card that failed put back on
//! its reader once, and each card's real state read back from the card
//! itself with APDUs after the batch. Shared by `tests/tearing.rs` and
//! `tests/tearing_pcsc.rs` (the read-back, the batch and the pass criteria).

// Each test binary includes this module and uses a part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use card::emu::{CardView, EmuCard};
use card::gp::session::GpSession;
use card::transport::emu::EmuBank;
use card::transport::{CardReader, ReaderId, ReaderMonitor, Transport};
use card::wallet::Lifecycle;
use card::wallet::client::WalletClient;
use station::batch;
use station::firmware::Firmware;
use station::handler::{Bin, CardHandler};
use station::ledger::export::{self, Export};
use station::ledger::{BatchInfo, Ledger};
use station::profile::Profile;
use station::recipe::{Progress, Recipe, Step};
use station::worker::{Control, Event};

/// What a card says about itself, read with APDUs (GP session with the
/// profile's key ring, then the wallet applet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadBack {
    /// The key version the card reported and a session opened with.
    pub key_version: Result<u8, String>,
    pub lifecycle: Option<Lifecycle>,
    pub bundle_id: Option<String>,
    pub role: Option<String>,
    /// The wallet public key, upper-case hex, as the card reports it.
    pub wallet_key: Option<String>,
}

/// Reads a card's state back over `t`.
pub fn read_back(t: &mut dyn Transport, profile: &Profile) -> ReadBack {
    let key_version = GpSession::open(t, &profile.key_ring(), 0, profile.security_level)
        .map(|s| s.key_version())
        .map_err(|e| e.to_string());
    let mut w = WalletClient::new(t);
    match w.select() {
        Ok(info) => {
            let wallet_key = match w.wallet_key() {
                Ok(k) => k.map(|p| hex::encode_upper(p.public_key)),
                Err(e) => Some(format!("unreadable: {e}")),
            };
            ReadBack {
                key_version,
                lifecycle: Some(info.lifecycle),
                bundle_id: info.bundle_id.map(hex::encode_upper),
                role: info.role.map(|r| format!("{r:?}").to_lowercase()),
                wallet_key,
            }
        }
        Err(_) => ReadBack { key_version, lifecycle: None, bundle_id: None, role: None, wallet_key: None },
    }
}

/// Reads an emulated card back through an emulated reader of its own.
pub fn read_back_emu(card: EmuCard, profile: &Profile) -> (ReadBack, EmuCard) {
    let bank = EmuBank::new(1, 0.0, Duration::from_millis(200));
    let slot = Arc::clone(&bank.slots()[0]);
    if slot.insert(card).is_err() {
        unreachable!("a new reader is empty");
    }
    let mut reader = bank.reader(0).expect("the read-back reader");
    let rb = match reader.connect() {
        Ok(mut t) => read_back(&mut *t, profile),
        Err(e) => ReadBack {
            key_version: Err(format!("connect: {e}")),
            lifecycle: None,
            bundle_id: None,
            role: None,
            wallet_key: None,
        },
    };
    drop(reader);
    let card = slot.remove().expect("the card is still in the read-back reader");
    (rb, card)
}

struct LineState {
    /// Card i waits here for reader i until card i-1 is ready for pairing.
    waiting: Vec<Option<EmuCard>>,
    reinserts: Vec<u32>,
    /// Card i's last verdict and the card.
    binned: Vec<Option<(Bin, EmuCard)>>,
    /// Every card as it left its reader after a failed attempt that was
    /// put back: (reader index, state then).
    put_back: Vec<(usize, CardView)>,
    outstanding: usize,
}

/// The line: feeds, chains, re-inserts, bins, drains when every card is
/// binned.
pub struct Line {
    bank: EmuBank,
    control: Arc<Control>,
    st: Mutex<LineState>,
}

impl Line {
    /// Card i goes to reader i; card 0 enters at once, card i+1 when card i
    /// is ready for pairing (or at once with `chained: false`). Every card
    /// i goes back `put_back[i]` times after a failed attempt.
    pub fn new(
        bank: EmuBank,
        control: Arc<Control>,
        cards: Vec<EmuCard>,
        chained: bool,
        put_back: &[u32],
    ) -> Arc<Self> {
        let n = cards.len();
        assert_eq!(bank.slots().len(), n, "one reader per card");
        let line = Arc::new(Self {
            bank,
            control,
            st: Mutex::new(LineState {
                waiting: cards.into_iter().map(Some).collect(),
                reinserts: put_back.to_vec(),
                binned: (0..n).map(|_| None).collect(),
                put_back: Vec::new(),
                outstanding: n,
            }),
        });
        line.feed(0);
        if !chained {
            (1..n).for_each(|i| line.feed(i));
        }
        line
    }

    fn lock(&self) -> MutexGuard<'_, LineState> {
        self.st.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn index(&self, reader: &ReaderId) -> Option<usize> {
        self.bank.slots().iter().position(|s| s.id() == reader)
    }

    fn feed(&self, i: usize) {
        let mut st = self.lock();
        if let Some(card) = st.waiting.get_mut(i).and_then(Option::take)
            && let Err(card) = self.bank.slots()[i].insert(card)
        {
            st.waiting[i] = Some(*card);
        }
    }

    /// Sees the batch's events: a card ready for pairing lets the next in.
    pub fn on_event(&self, e: &Event) {
        if let Event::Progress { reader, progress: Progress::Step(Step::Record) } = e
            && let Some(i) = self.index(reader)
        {
            self.feed(i + 1);
        }
    }

    /// The cards at the end, by reader: (last verdict, card).
    pub fn take_binned(&self) -> Vec<Option<(Bin, EmuCard)>> {
        std::mem::take(&mut self.lock().binned)
    }

    pub fn put_back(&self) -> Vec<(usize, CardView)> {
        self.lock().put_back.clone()
    }
}

impl CardHandler for Line {
    fn eject(&self, reader: &ReaderId, bin: Bin) {
        let Some(i) = self.index(reader) else { return };
        let slot = &self.bank.slots()[i];
        let mut st = self.lock();
        let Some(card) = slot.remove() else { return };
        if bin == Bin::Fail && st.reinserts[i] > 0 {
            st.reinserts[i] -= 1;
            st.put_back.push((i, card.view()));
            if let Err(card) = slot.insert(card) {
                st.binned[i] = Some((bin, *card));
            } else {
                return;
            }
        } else {
            st.binned[i] = Some((bin, card));
        }
        st.outstanding = st.outstanding.saturating_sub(1);
        if st.outstanding == 0 {
            self.control.drain();
        }
    }
}

/// A batch that ended, with its ledger.
pub struct Ended {
    pub export: Export,
    pub ledger: PathBuf,
    pub _dir: tempfile::TempDir,
}

/// Runs a batch on `monitor` with `handler` until the control drains it,
/// on its own thread; panics naming `what` if it has not ended in `limit`.
pub fn run_batch(
    what: &str,
    (profile, firmware): (Arc<Profile>, Arc<Firmware>),
    mut monitor: Box<dyn ReaderMonitor + Send>,
    handler: Arc<dyn CardHandler>,
    control: Arc<Control>,
    limit: Duration,
    mut on_event: impl FnMut(&Event) + Send + 'static,
) -> Ended {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger_path = dir.path().join("ledger.db");
    let (ledger, writer) = Ledger::open(&ledger_path).expect("ledger");
    let batch_id = ledger
        .start_batch(BatchInfo {
            name: "tearing".into(),
            profile: "demo".into(),
            product: profile.product.clone(),
            firmware: firmware.manifest.name.clone(),
            firmware_sha256: hex::encode(firmware.load_file_sha256),
        })
        .expect("batch");
    let recipe = Arc::new(Recipe::new(profile, firmware, ledger.clone(), batch_id));
    let output = batch::Output { labels: None, keep_outcomes: true };
    let (tx, rx) = std::sync::mpsc::channel();
    let c = Arc::clone(&control);
    std::thread::spawn(move || {
        let s = batch::run(&mut *monitor, recipe, handler, None, output, c, |e| on_event(e));
        let _ = tx.send(s);
    });
    match rx.recv_timeout(limit) {
        Ok(s) => drop(s.expect("the batch runs")),
        Err(_) => {
            control.interrupt();
            panic!("{what}: the batch did not end within {limit:?}");
        }
    }
    ledger.finish_batch(batch_id, None).expect("finish");
    drop(ledger);
    writer.close();
    let export = export::export(&ledger_path).expect("export");
    Ended { export, ledger: ledger_path, _dir: dir }
}

/// Journal lines of each card, by card id.
pub fn journals(e: &Ended) -> HashMap<String, Vec<export::StepExport>> {
    e.export.cards.iter().map(|c| (c.card_id.clone(), export::steps(&e.ledger, &c.card_id).expect("journal"))).collect()
}

/// One card at the end of a run, as the pass criteria need it.
pub struct CardEnd {
    /// The last verdict the station gave it.
    pub bin: Bin,
    pub id: String,
    pub rb: ReadBack,
    /// It failed once and was put back on its reader.
    pub put_back: bool,
    /// The firmware on the card is exactly the release's (else what is there).
    pub firmware: Result<(), String>,
    /// Set when the card manager is locked or counted failed authentications.
    pub locked: Option<String>,
}

/// The pass criteria of a tearing run; every problem found.
pub fn problems(profile: &Profile, firmware: &Firmware, e: &Ended, cards: &[CardEnd]) -> Vec<String> {
    let mut p = Vec::new();
    let rotated = profile.rotation.as_ref().map_or(profile.factory_version, |x| x.version);
    let recs: HashMap<&str, &export::CardExport> = e.export.cards.iter().map(|c| (c.card_id.as_str(), c)).collect();
    let journals = journals(e);
    for (i, c) in cards.iter().enumerate() {
        let (id, rb) = (&c.id, &c.rb);
        let Some(rec) = recs.get(id.as_str()) else {
            p.push(format!("card {i} ({id}) is not in the ledger"));
            continue;
        };
        let who = format!("card {i} ({} {:?}, attempts {})", rec.status, rec.stage, rec.attempts);
        if (c.bin == Bin::Pass) != (rec.status == "passed") {
            p.push(format!("{who}: binned {:?} but recorded {}", c.bin, rec.status));
        }
        // Ends provisioned and verified, or failed-and-retryable; a card
        // put back after a retryable failure must have finished.
        match rec.status.as_str() {
            "passed" => {
                if !(rec.attested && rec.self_tests && rec.serial.is_some()) {
                    p.push(format!("{who}: passed without attestation, self-tests or serial"));
                }
                if rec.firmware_sha256.as_deref() != Some(hex::encode(firmware.load_file_sha256).as_str()) {
                    p.push(format!("{who}: passed with firmware {:?}", rec.firmware_sha256));
                }
                if let Err(f) = &c.firmware {
                    p.push(format!("{who}: passed, but the card holds {f}"));
                }
                if rb.key_version != Ok(rotated) {
                    p.push(format!("{who}: passed, but the card reports key version {:?}", rb.key_version));
                }
                if rb.lifecycle.is_none() {
                    p.push(format!("{who}: passed, but the wallet applet does not answer"));
                }
            }
            "failed" if rec.retryable == Some(true) && !c.put_back => {}
            "failed" => p.push(format!(
                "{who}: ended failed ({:?} at {:?}, retryable {:?}){}",
                rec.failure_reason,
                rec.failed_step,
                rec.retryable,
                if c.put_back { " after it was put back" } else { "" }
            )),
            other => p.push(format!("{who}: ended {other}")),
        }
        // The ledger's key version is the card's.
        match (&rb.key_version, rec.gp_key_version) {
            (Ok(v), Some(l)) if i64::from(*v) == l => {}
            (real, ledger) => p.push(format!("{who}: key version on the card {real:?}, in the ledger {ledger:?}")),
        }
        if let Some(l) = &c.locked {
            p.push(format!("{who}: {l}"));
        }
        // Lifecycle, bundle, wallet key: the ledger says what the card is.
        if rec.status == "passed" && rec.stage.as_deref() == Some("bundled") {
            let role = rec.role.as_deref().map(|r| if r == "primary" { r } else { "backup" });
            if rb.lifecycle != Some(Lifecycle::Sealed)
                || rb.bundle_id != rec.bundle_id
                || rb.wallet_key != rec.wallet_pubkey
                || rb.role.as_deref() != role
            {
                p.push(format!(
                    "{who}: ledger {:?} {:?} {:?}, card {rb:?}",
                    rec.bundle_id, rec.role, rec.wallet_pubkey
                ));
            }
        } else if rb.lifecycle == Some(Lifecycle::Sealed) {
            p.push(format!("{who}: sealed on the card ({rb:?}) but not recorded bundled"));
        }
        if let Some(key) = &rb.wallet_key {
            let journaled = journals
                .get(id)
                .is_some_and(|j| j.iter().any(|s| s.detail.as_deref().is_some_and(|d| d.contains(key.as_str()))));
            if rec.wallet_pubkey.as_deref() != Some(key.as_str()) && !journaled {
                p.push(format!("{who}: holds wallet key {key} the ledger does not know ({rb:?})"));
            }
        }
    }
    // No half bundle recorded complete.
    let real: HashMap<&str, &ReadBack> = cards.iter().map(|c| (c.id.as_str(), &c.rb)).collect();
    for b in e.export.bundles.iter().filter(|b| b.status == "sealed") {
        let members: Vec<&String> = b.primary.iter().chain(&b.backups).collect();
        if members.len() as i64 != b.size {
            p.push(format!("sealed bundle {} has {} members of {}", b.bundle_id, members.len(), b.size));
        }
        for m in members {
            let sealed_in_it = real.get(m.as_str()).is_some_and(|rb| {
                rb.lifecycle == Some(Lifecycle::Sealed)
                    && rb.bundle_id.as_deref() == Some(b.bundle_id.as_str())
                    && rb.wallet_key == b.wallet_pubkey
            });
            if !sealed_in_it || recs.get(m.as_str()).is_none_or(|c| c.status != "passed") {
                p.push(format!(
                    "sealed bundle {}: member {m} is not sealed in it ({:?})",
                    b.bundle_id,
                    real.get(m.as_str())
                ));
            }
        }
    }
    p
}
