//! End-to-end test support: runs a whole batch through the station's own
//! batch engine (workers, recipe, ledger, emulated feeder) on emulated
//! readers, and hands back the summary, the ledger export and every card as
//! it really is, so tests can compare all three.

pub mod pty;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use card::emu::EmuCard;
use card::transport::ReaderMonitor;
use card::transport::emu::EmuBank;
use station::batch::{self, Summary};
use station::firmware::Firmware;
use station::handler::{Bin, CardHandler, EmuFeeder};
use station::ledger::export::{self, Export};
use station::ledger::{BatchInfo, Ledger};
use station::profile::Profile;
use station::recipe::Recipe;
use station::worker::{Control, Event};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn demo_profile() -> Arc<Profile> {
    Arc::new(Profile::load(&repo().join("profiles/demo.yaml")).expect("demo profile"))
}

/// A finished emulated batch.
pub struct Batch {
    pub summary: Summary,
    pub export: Export,
    pub bins: Vec<(Bin, EmuCard)>,
    pub firmware: Arc<Firmware>,
    pub ledger: PathBuf,
    _dir: tempfile::TempDir,
}

impl Batch {
    /// The folder the batch wrote its bundle labels to.
    pub fn labels(&self) -> PathBuf {
        self._dir.path().join("labels")
    }
}

/// Runs `cards` through the station on `readers` emulated readers at
/// `speed`, with a SQLite ledger in a temporary directory.
pub fn run_batch(profile: Arc<Profile>, readers: usize, cards: Vec<EmuCard>, speed: f64) -> Batch {
    let target = cards.len();
    let bank = EmuBank::new(readers, speed, Duration::from_millis(200));
    let feeder = Arc::new(EmuFeeder::new(bank.clone(), cards));
    feeder.fill();
    let mut b = run_batch_on(profile, Box::new(bank), Arc::clone(&feeder) as _, target);
    b.bins = feeder.take_bins();
    b
}

/// Runs a batch of `target` cards on whatever readers `monitor` lists, with
/// `handler` feeding and binning (no bins are collected: the cards are not
/// in this process).
pub fn run_batch_on(
    profile: Arc<Profile>,
    monitor: Box<dyn ReaderMonitor>,
    handler: Arc<dyn CardHandler>,
    target: usize,
) -> Batch {
    run_batch_watched(profile, monitor, handler, target, |_| {})
}

/// [`run_batch_on`] with `on_event` seeing every worker event as the batch
/// runs (on the batch's own thread), for tests that act on the line while
/// it works: pull a card mid-LOAD, take a reader away.
pub fn run_batch_watched(
    profile: Arc<Profile>,
    mut monitor: Box<dyn ReaderMonitor>,
    handler: Arc<dyn CardHandler>,
    target: usize,
    on_event: impl FnMut(&Event),
) -> Batch {
    let firmware = Arc::new(Firmware::load(&profile.firmware_dir, &profile.release_keys).expect("firmware"));
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger_path = dir.path().join("ledger.db");
    let (ledger, writer) = Ledger::open(&ledger_path).expect("ledger");
    let batch_id = ledger
        .start_batch(BatchInfo {
            name: "e2e".into(),
            profile: "demo".into(),
            product: profile.product.clone(),
            firmware: firmware.manifest.name.clone(),
            firmware_sha256: hex::encode(firmware.load_file_sha256),
        })
        .expect("batch");
    let profile_key = profile.audit_key.clone();
    let recipe = Arc::new(Recipe::new(profile, Arc::clone(&firmware), ledger.clone(), batch_id));
    let output = batch::Output { labels: Some(dir.path().join("labels")), keep_outcomes: true };
    let summary =
        batch::run(&mut *monitor, recipe, handler, Some(target), output, Control::new(), on_event).expect("batch runs");
    ledger.finish_batch(batch_id, profile_key.as_ref()).expect("finish");
    drop(ledger);
    writer.close();
    let export = export::export(&ledger_path).expect("export");
    Batch { summary, export, bins: Vec::new(), firmware, ledger: ledger_path, _dir: dir }
}

/// Waits until none of the PC/SC readers matching `patterns` holds a card:
/// a card of the previous test binary may still show for one pcscd poll
/// (about 0.4 s) after its process left. Panics with a clear message after
/// `limit`.
pub fn wait_readers_empty(patterns: &[String], limit: Duration) {
    use card::transport::SlotState;
    use card::transport::pcsc::{PcscMonitor, ReaderFilter, Sharing};
    let mut monitor = PcscMonitor::new(ReaderFilter::new(patterns.iter().cloned(), [""; 0]), Sharing::Shared)
        .expect("no pcscd: start one with `scripts/pcscd-vpcd.sh start 6` (scripts/test.sh does)");
    let started = std::time::Instant::now();
    for id in monitor.readers().expect("readers") {
        let mut reader = monitor.open(&id).expect("open reader");
        let mut state = reader.wait_change(&SlotState::Empty, Duration::ZERO).expect("reader state");
        while state != SlotState::Empty {
            assert!(started.elapsed() < limit, "reader {id} still holds a card after {limit:?}");
            state = reader.wait_change(&state, Duration::from_millis(250)).expect("reader state");
        }
    }
}
