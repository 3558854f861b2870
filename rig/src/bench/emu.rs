//! One emulated batch the way `station run --sim N --headless` runs it:
//! the station's batch engine, recipe, bundle coordinator, durable SQLite
//! ledger (WAL, synchronous=FULL) and the `Live` hub with its metrics and
//! 250 ms snapshot ticker, on `EmuBank` readers fed by an endless
//! `EmuFeeder` hopper. The emulator runs in this process: its time is
//! measured (APDU processing and card manufacture) so a profile can tell it
//! from the station's own.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use card::emu::EmuCard;
use card::emu::latency::LatencyModel;
use card::transport::emu::EmuBank;
use card::transport::{Atr, CardReader, ReaderId, ReaderMonitor, SlotState, Transport, TransportError};
use station::batch;
use station::firmware::Firmware;
use station::handler::EmuFeeder;
use station::ledger::{BatchInfo, Ledger};
use station::live::Live;
use station::profile::Profile;
use station::recipe::Recipe;
use station::sim::{CardSupply, SimFaults};
use station::state::BatchStart;
use station::worker::{Control, Event};

use super::procfs;

/// The demo profile of the repository this binary was built from.
pub fn demo_profile_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles/demo.yaml")
}

/// The demo profile with bundles that fit `readers`: a bundle needs its
/// cards on different readers at once, so 1 reader runs without bundling
/// and 2 readers pair 1 + 1; from 3 readers on, the demo's 1 + 2.
pub fn profile_for(readers: usize, bundles: bool) -> anyhow::Result<Arc<Profile>> {
    let mut p = Profile::load(&demo_profile_path())?;
    if readers <= 1 || !bundles {
        p.bundles = None;
    } else if let Some(b) = p.bundles.as_mut() {
        b.backups = b.backups.min(readers - 1);
    }
    Ok(Arc::new(p))
}

/// What one emulated batch measured.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub readers: usize,
    pub speed: f64,
    pub cards: usize,
    pub passed: usize,
    pub bundles: usize,
    pub wall: Duration,
    /// Modeled card time of every card (speed 1.0), summed.
    pub modeled: Duration,
    pub cpu: f64,
    /// CPU seconds by thread category (live threads at the end).
    pub threads: Vec<(&'static str, f64)>,
    /// CPU time inside the emulator's APDU processing (sampled: one APDU
    /// in 16 measured with the thread's own CPU clock, scaled up).
    pub emulator_apdu: Duration,
    /// CPU time making new emulated cards (the chip factory).
    pub emulator_factory: Duration,
    pub apdus: u64,
    pub ledger_writes: u64,
    pub ledger_wait: Duration,
    pub events: u64,
    /// Steady-state cards per hour: the outcome rate over the middle of the
    /// batch (from the outcome at 20% to the one at 80% of the cards), the
    /// rate a line holds for hours, without the batch's start (every reader
    /// begins at once) and its end (the last cards wait for partners).
    pub steady_cards_per_hour: f64,
    /// Where bundled cards' reader time went around pairing (the process's
    /// sums; each scaling point runs in its own process).
    pub pairing: station::worker::PairingTimes,
}

impl Run {
    pub fn cards_per_hour(&self) -> f64 {
        self.cards as f64 * 3600.0 / self.wall.as_secs_f64().max(1e-9)
    }

    /// Modeled card seconds per card at speed 1.0.
    pub fn modeled_per_card(&self) -> f64 {
        self.modeled.as_secs_f64() / self.cards.max(1) as f64
    }

    /// Reader wall seconds per card: every reader busy the whole batch.
    pub fn wall_per_card(&self) -> f64 {
        self.wall.as_secs_f64() * self.readers as f64 / self.cards.max(1) as f64
    }

    /// Reader wall time per card over the card's modeled time at this
    /// speed (1.0 = the station adds nothing).
    pub fn overhead_ratio(&self) -> f64 {
        let m = self.modeled_per_card() * self.speed;
        if m > 0.0 { self.wall_per_card() / m } else { f64::NAN }
    }
}

/// Thread categories for the host cost split.
pub fn category(thread: &str) -> &'static str {
    if thread.starts_with("reader-") {
        "workers"
    } else if thread == "ledger-writer" {
        "ledger"
    } else if thread.starts_with("bundle") {
        "pairing"
    } else if thread == "live-ticker" {
        "live"
    } else {
        "batch"
    }
}

#[derive(Clone, Default)]
struct Clock(Arc<AtomicU64>);

impl Clock {
    fn add(&self, d: Duration) {
        self.0.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    fn get(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

struct TimedBank {
    bank: EmuBank,
    apdu: Clock,
}

impl ReaderMonitor for TimedBank {
    fn readers(&mut self) -> Result<Vec<ReaderId>, TransportError> {
        self.bank.readers()
    }

    fn open(&mut self, id: &ReaderId) -> Result<Box<dyn CardReader>, TransportError> {
        Ok(Box::new(TimedReader { inner: self.bank.open(id)?, apdu: self.apdu.clone() }))
    }
}

struct TimedReader {
    inner: Box<dyn CardReader>,
    apdu: Clock,
}

impl CardReader for TimedReader {
    fn id(&self) -> &ReaderId {
        self.inner.id()
    }

    fn wait_change(&mut self, known: &SlotState, timeout: Duration) -> Result<SlotState, TransportError> {
        self.inner.wait_change(known, timeout)
    }

    fn connect(&mut self) -> Result<Box<dyn Transport + Send + '_>, TransportError> {
        let apdu = self.apdu.clone();
        Ok(Box::new(TimedTransport { inner: self.inner.connect()?, apdu, n: 0 }))
    }
}

/// CPU time of the calling thread (/proc/thread-self/schedstat, in ns).
fn thread_cpu() -> Duration {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    Duration::from_nanos(s.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// One APDU in `SAMPLE` has its emulator CPU time measured (two reads of
/// /proc per sample); the sum is scaled up.
const SAMPLE: u64 = 16;

struct TimedTransport<'a> {
    inner: Box<dyn Transport + Send + 'a>,
    apdu: Clock,
    n: u64,
}

impl Transport for TimedTransport<'_> {
    fn transmit_raw(&mut self, apdu: &[u8]) -> Result<Vec<u8>, TransportError> {
        self.n += 1;
        if self.n % SAMPLE != 1 {
            return self.inner.transmit_raw(apdu);
        }
        let t = thread_cpu();
        let r = self.inner.transmit_raw(apdu);
        self.apdu.add(thread_cpu().saturating_sub(t) * SAMPLE as u32);
        r
    }

    fn atr(&self) -> &Atr {
        self.inner.atr()
    }

    fn reset(&mut self) -> Result<(), TransportError> {
        self.inner.reset()
    }
}

struct TimedSupply {
    inner: CardSupply,
    clock: Clock,
    /// A small generator for the cards' spread (deterministic).
    lcg: u64,
    /// Spread the cards' timing (else every card is exactly JCOP4).
    spread: bool,
}

/// The JCOP4 model with every figure scaled by `k`.
fn jcop4_scaled(k: f64) -> LatencyModel {
    let m = LatencyModel::JCOP4;
    LatencyModel {
        small_apdu_ms: m.small_apdu_ms * k,
        secure_channel_ms: m.secure_channel_ms * k,
        load_block_ms: m.load_block_ms * k,
        load_final_ms: m.load_final_ms * k,
        install_ms: m.install_ms * k,
        delete_ms: m.delete_ms * k,
        put_key_ms: m.put_key_ms * k,
        keygen_ms: m.keygen_ms * k,
        sign_ms: m.sign_ms * k,
        ecdh_ms: m.ecdh_ms * k,
        self_test_kat_ms: m.self_test_kat_ms * k,
        memory_test_ms: m.memory_test_ms * k,
    }
}

/// How much one card's timing differs from the JCOP4 figures: uniform in
/// +-SPREAD. Real cards of one type differ (the final LOAD block alone
/// takes 0.45-0.7 s); identical emulated cards would run every reader in
/// lockstep, which no line does.
const SPREAD: f64 = 0.10;

impl Iterator for TimedSupply {
    type Item = EmuCard;

    fn next(&mut self) -> Option<EmuCard> {
        let t = thread_cpu();
        let mut c = self.inner.next();
        self.clock.add(thread_cpu().saturating_sub(t));
        self.lcg = self.lcg.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let u = (self.lcg >> 11) as f64 / (1u64 << 53) as f64;
        if let Some(card) = c.as_mut().filter(|_| self.spread) {
            card.set_latency(jcop4_scaled(1.0 + SPREAD * (2.0 * u - 1.0)));
        }
        c
    }
}

/// Runs `cards` genuine emulated cards on `readers` readers at `speed`,
/// with the demo profile's bundles (as far as the readers allow) or none,
/// every card exactly JCOP4 or spread by +-10% (`spread`).
/// `progress` sees the number of outcomes after each one (on the batch's
/// thread).
pub fn run(
    readers: usize,
    speed: f64,
    cards: usize,
    bundles: bool,
    spread: bool,
    ledger_dir: &Path,
    mut progress: impl FnMut(usize),
) -> anyhow::Result<Run> {
    let profile = profile_for(readers, bundles)?;
    let firmware = Arc::new(Firmware::load(&profile.firmware_dir, &profile.release_keys)?);
    let (ledger, writer) = Ledger::open(&ledger_dir.join("ledger.db"))?;
    let live = Live::new("bench");
    let writes = Clock::default();
    let nwrites = Arc::new(AtomicU64::new(0));
    {
        let (live, writes, nwrites) = (Arc::clone(&live), writes.clone(), Arc::clone(&nwrites));
        ledger.observe_writes(Arc::new(move |d| {
            live.metrics().observe_ledger_write(d);
            writes.add(d);
            nwrites.fetch_add(1, Ordering::Relaxed);
        }));
    }
    let batch_id = ledger.start_batch(BatchInfo {
        name: format!("bench-{readers}"),
        profile: "demo".into(),
        product: profile.product.clone(),
        firmware: firmware.manifest.name.clone(),
        firmware_sha256: hex::encode(firmware.load_file_sha256),
    })?;
    let bank = EmuBank::new(readers, speed, profile.timeouts.apdu);
    let factory = Clock::default();
    let supply =
        TimedSupply { inner: CardSupply::new(7, SimFaults::default()), clock: factory.clone(), lcg: 7, spread };
    let feeder = Arc::new(EmuFeeder::endless(bank.clone(), Box::new(supply)));
    feeder.fill();
    let apdu = Clock::default();
    let mut monitor = TimedBank { bank: bank.clone(), apdu: apdu.clone() };
    live.set_profile("demo");
    {
        let mut m = live.model();
        m.set_profiles(vec!["demo".into()]);
        m.set_readers(bank.slots().iter().map(|s| s.id().clone()));
        m.batch_started(
            BatchStart { name: format!("bench-{readers}"), id: batch_id, profile: "demo".into(), target: Some(cards) },
            Instant::now(),
            SystemTime::now(),
        );
    }
    live.publish();
    let ticker_stop = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (live, stop) = (Arc::clone(&live), Arc::clone(&ticker_stop));
        std::thread::Builder::new().name("live-ticker".into()).spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                live.publish();
                std::thread::sleep(station::live::TICK);
            }
        })?
    };
    let recipe = Arc::new(Recipe::new(Arc::clone(&profile), firmware, ledger.clone(), batch_id));
    let cpu0 = procfs::cpu_seconds();
    let threads0 = procfs::thread_cpu(category);
    let mut done = 0usize;
    let mut events = 0u64;
    let mut apdus = 0u64;
    // Taken at the last outcome, while the worker threads still run (they
    // end, and leave /proc/self/task, when the batch returns).
    let mut threads1 = None;
    let mut outcome_at: Vec<f64> = Vec::with_capacity(cards.min(100_000));
    // TAPLINE_BENCH_TRACE=1: every event with its time, on stderr.
    let trace = std::env::var_os("TAPLINE_BENCH_TRACE").is_some();
    let started = Instant::now();
    let summary =
        batch::run(&mut monitor, recipe, feeder.clone(), Some(cards), batch::Output::default(), Control::new(), |ev| {
            events += 1;
            if trace {
                eprintln!("{:8.3} {ev:?}", started.elapsed().as_secs_f64());
            }
            live.on_event(ev);
            match ev {
                Event::Outcome(_) => {
                    done += 1;
                    outcome_at.push(started.elapsed().as_secs_f64());
                    if done == cards {
                        threads1 = Some(procfs::thread_cpu(category));
                    }
                    progress(done);
                }
                Event::Apdus { count, .. } => apdus += count,
                _ => {}
            }
        })
        .map_err(|e| anyhow::anyhow!("batch: {e}"))?;
    // The batch's own clock: until the last outcome (the workers' wind-down
    // after it, up to one 200 ms poll, is not line time).
    let wall = summary.elapsed;
    let cpu = procfs::cpu_seconds() - cpu0;
    let threads1 = threads1.unwrap_or_else(|| procfs::thread_cpu(category));
    ticker_stop.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    live.model().batch_finished(Instant::now(), SystemTime::now());
    ledger.finish_batch(batch_id, profile.audit_key.as_ref())?;
    drop(ledger);
    writer.close();
    let mut threads: Vec<(&'static str, f64)> =
        threads1.iter().map(|(k, v)| (*k, v - threads0.get(k).copied().unwrap_or(0.0))).collect();
    // Threads that ended before the last outcome (bundle threads) and the
    // batch's wind-down are only in the process total.
    let live_sum: f64 = threads.iter().map(|(_, v)| v).sum();
    threads.push(("ended threads", (cpu - live_sum).max(0.0)));
    let modeled = bank.slots().iter().map(|s| s.modeled_time()).sum();
    Ok(Run {
        readers,
        speed,
        cards: summary.cards(),
        passed: summary.passed(),
        bundles: summary.bundles_sealed.len(),
        wall,
        modeled,
        cpu,
        threads,
        emulator_apdu: apdu.get(),
        emulator_factory: factory.get(),
        apdus,
        ledger_writes: nwrites.load(Ordering::Relaxed),
        ledger_wait: writes.get(),
        events,
        steady_cards_per_hour: steady_rate(&outcome_at) * 3600.0,
        pairing: station::worker::pairing_times(),
    })
}

/// Outcomes per second between the outcome at 20% and the one at 80% of
/// the batch (the whole batch when it is too short for a middle).
fn steady_rate(at: &[f64]) -> f64 {
    let n = at.len();
    let (a, b) = (n / 5, n - 1 - n / 5);
    if b > a && at[b] > at[a] {
        (b - a) as f64 / (at[b] - at[a])
    } else {
        n as f64 / at.last().copied().unwrap_or(f64::NAN)
    }
}
