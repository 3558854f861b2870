//! Runs a plan: each scenario through the station's own batch engine
//! (`station::batch::run` with `station::recipe::Recipe`, a temporary
//! SQLite ledger per scenario), on emulated readers in this process (sim)
//! or on vpcd readers behind a real pcscd with the rig's feeder (pcsc);
//! then compares every card's outcome, its ledger record and (sim) its real
//! state with what the plan expects. Line faults (a reader unplugged, the
//! PC/SC service restarting, the fixture's power cut) fire when a card
//! starts a named step. The tearing sweep tears a genuine card at every
//! APDU of the recipe and re-inserts it.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use card::CardId;
use card::emu::{CardView, EmuCard, TearPoint};
use card::transport::emu::EmuBank;
use card::transport::pcsc::{PcscMonitor, ReaderFilter, Sharing};
use card::transport::{CardReader, ReaderId, ReaderMonitor, Transport, TransportError};
use station::batch;
use station::firmware::Firmware;
use station::handler::{Bin, CardHandler};
use station::ledger::export::{self, Export};
use station::ledger::{BatchInfo, Ledger};
use station::profile::{Bundles, Profile, Unpaired};
use station::recipe::{CardOutcome, Progress, Recipe, Step};
use station::worker::{Control, Event};

use super::trace::{TraceMonitor, Traces};
use super::{At, CardKind, CardSpec, Expect, LineFaultKind, Plan, Scenario, ScenarioExpect, Target, Verdict};
use crate::vpcd::feeder::{Feeder, FeederConfig, SlotView};

/// How long a ready card waits for bundle partners on the rig: scenarios
/// end with a short bundle when cards fail, and must not wait the
/// profile's minutes for partners that never come.
pub const BUNDLE_WAIT: Duration = Duration::from_secs(2);

/// A scenario that has not finished after this long is interrupted.
pub const SCENARIO_LIMIT: Duration = Duration::from_secs(180);

/// Where each step of the recipe starts, in APDUs of a genuine card.
#[derive(Debug, Clone)]
pub struct Calibration {
    /// APDUs of the card's own recipe (identify to record, no pairing).
    pub total: u64,
    /// The number of the first APDU sent in each step.
    pub steps: Vec<(Step, u64)>,
}

impl Calibration {
    /// The first APDU of `step`; pairing starts after the recipe's last.
    pub fn first_apdu(&self, step: Step) -> u64 {
        if step == Step::Pairing {
            return self.total + 1;
        }
        self.steps.iter().find(|(s, _)| *s == step).map_or(self.total, |(_, n)| *n)
    }
}

/// Runs one genuine card through the recipe (no bundles) and counts.
pub fn calibrate(profile: &Profile, firmware: &Arc<Firmware>) -> Result<Calibration, String> {
    let mut profile = profile.clone();
    profile.bundles = None;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (ledger, writer) = Ledger::open(&dir.path().join("calibration.db")).map_err(|e| e.to_string())?;
    let batch_id = ledger.start_batch(batch_info("calibration", &profile, firmware)).map_err(|e| e.to_string())?;
    let recipe = Recipe::new(Arc::new(profile), Arc::clone(firmware), ledger.clone(), batch_id);
    let bank = EmuBank::new(1, 0.0, Duration::from_millis(50));
    let card = card::emu::factory::ChipFactory::new(0xCA1)
        .make(card::emu::factory::ChipKind::Genuine, card::emu::CardFaults::default());
    bank.slots()[0].insert(card).map_err(|_| "calibration reader busy".to_string())?;
    let mut reader = bank.reader(0).ok_or("no calibration reader")?;
    let id = reader.id().clone();
    let mut t = reader.connect().map_err(|e| e.to_string())?;
    let count = Rc::new(Cell::new(0u64));
    let mut counted = Counting { inner: &mut *t, count: Rc::clone(&count) };
    let mut steps: Vec<(Step, u64)> = Vec::new();
    let seen = Rc::clone(&count);
    let outcome = recipe
        .run(&id, &mut counted, &mut |p| {
            if let Progress::Step(s) = p
                && !steps.iter().any(|(x, _)| *x == s)
            {
                steps.push((s, seen.get() + 1));
            }
        })
        .map_err(|e| e.to_string())?;
    drop(ledger);
    drop(recipe);
    writer.close();
    if let Err(f) = &outcome.result {
        return Err(format!("a genuine card does not pass the profile's recipe: {f}"));
    }
    Ok(Calibration { total: count.get(), steps })
}

struct Counting<'a> {
    inner: &'a mut dyn Transport,
    count: Rc<Cell<u64>>,
}

impl Transport for Counting<'_> {
    fn transmit_raw(&mut self, apdu: &[u8]) -> Result<Vec<u8>, TransportError> {
        self.count.set(self.count.get() + 1);
        self.inner.transmit_raw(apdu)
    }
    fn atr(&self) -> &card::transport::Atr {
        self.inner.atr()
    }
    fn reset(&mut self) -> Result<(), TransportError> {
        self.inner.reset()
    }
}

fn batch_info(name: &str, profile: &Profile, firmware: &Firmware) -> BatchInfo {
    BatchInfo {
        name: name.into(),
        profile: profile.path.display().to_string(),
        product: profile.product.clone(),
        firmware: firmware.manifest.name.clone(),
        firmware_sha256: hex::encode(firmware.load_file_sha256),
    }
}

// ---- results --------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Passed,
    Failed,
    Skipped(String),
}

/// What became of one card of a scenario.
#[derive(Debug, Clone)]
pub struct CardResult {
    pub field: String,
    pub kind: CardKind,
    pub card_id: String,
    /// One line per attempt the station reported.
    pub attempts: Vec<String>,
    pub ledger: String,
    pub problems: Vec<String>,
    /// The APDUs of the card's last attempt (redacted), kept for failures.
    pub trace: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ScenarioResult {
    pub name: String,
    pub target: Target,
    pub status: Status,
    pub elapsed: Duration,
    /// Scenario-level problems (bundles, time, line faults, invariants).
    pub problems: Vec<String>,
    pub cards: Vec<CardResult>,
    /// Figures worth printing (the sweep's coverage, faults fired).
    pub notes: Vec<String>,
    pub sealed: usize,
    pub aborted: usize,
}

impl ScenarioResult {
    fn skipped(name: &str, target: Target, why: impl Into<String>) -> Self {
        Self::new(name, target, Status::Skipped(why.into()))
    }

    fn new(name: &str, target: Target, status: Status) -> Self {
        Self {
            name: name.into(),
            target,
            status,
            elapsed: Duration::ZERO,
            problems: Vec::new(),
            cards: Vec::new(),
            notes: Vec::new(),
            sealed: 0,
            aborted: 0,
        }
    }

    pub fn failed_cards(&self) -> impl Iterator<Item = &CardResult> {
        self.cards.iter().filter(|c| !c.problems.is_empty())
    }
}

#[derive(Debug, Clone)]
pub struct PlanResult {
    pub plan: String,
    pub file: PathBuf,
    pub target: Target,
    pub elapsed: Duration,
    pub calibration: Calibration,
    pub scenarios: Vec<ScenarioResult>,
}

impl PlanResult {
    pub fn passed(&self) -> bool {
        self.scenarios.iter().all(|s| s.status != Status::Failed)
    }
}

/// How to reach the pcsc target.
#[derive(Debug, Clone)]
pub struct PcscSetup {
    /// The port base scripts/pcscd-vpcd.sh started pcscd with.
    pub port_base: u16,
}

impl Default for PcscSetup {
    fn default() -> Self {
        let port_base = std::env::var("TAPLINE_VPCD_PORT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(crate::vpcd::DEFAULT_PORT_BASE);
        Self { port_base }
    }
}

/// Runs every scenario (and the sweep) of `plan` on `target`; `progress`
/// sees one line per scenario.
pub fn run_plan(
    plan: &Plan,
    target: Target,
    pcsc: &PcscSetup,
    mut progress: impl FnMut(&str),
) -> Result<PlanResult, String> {
    let started = Instant::now();
    let firmware = Arc::new(
        Firmware::load(&plan.profile.firmware_dir, &plan.profile.release_keys)
            .map_err(|e| format!("firmware of {}: {e}", plan.profile.path.display()))?,
    );
    if target == Target::Pcsc {
        // No pcscd is a plan that cannot run, not a failed scenario.
        let mut probe = PcscMonitor::new(ReaderFilter::new(["*".to_string()], [""; 0]), Sharing::Shared)
            .map_err(|e| format!("no pcscd ({e}): start one with scripts/pcscd-vpcd.sh start N {}", pcsc.port_base))?;
        probe.readers().map_err(|e| format!("pcscd: {e}"))?;
    }
    let cal = calibrate(&plan.profile, &firmware)?;
    progress(&format!("calibration: {} APDUs a genuine card (no pairing)", cal.total));
    let mut scenarios = Vec::new();
    for (i, sc) in plan.scenarios.iter().enumerate() {
        let r = run_scenario(plan, sc, i as u64, target, pcsc, &firmware, &cal);
        progress(&line(&r));
        scenarios.push(r);
    }
    if let Some(sweep) = &plan.sweep {
        let r = if !sweep.targets.contains(&target) {
            ScenarioResult::skipped(SWEEP_NAME, target, format!("the plan runs the sweep on {:?} only", sweep.targets))
        } else {
            run_sweep(plan, sweep, target, pcsc, &firmware, &cal)
        };
        progress(&line(&r));
        scenarios.push(r);
    }
    Ok(PlanResult {
        plan: plan.name.clone(),
        file: plan.file.clone(),
        target,
        elapsed: started.elapsed(),
        calibration: cal,
        scenarios,
    })
}

fn line(r: &ScenarioResult) -> String {
    let status = match &r.status {
        Status::Passed => "PASS".to_string(),
        Status::Failed => "FAIL".to_string(),
        Status::Skipped(why) => format!("SKIP ({why})"),
    };
    let mut s = format!("{status:<6} {} [{:.1} s]", r.name, r.elapsed.as_secs_f64());
    for n in &r.notes {
        s.push_str(&format!("\n         {n}"));
    }
    for p in &r.problems {
        s.push_str(&format!("\n         - {p}"));
    }
    for c in r.failed_cards() {
        for p in &c.problems {
            s.push_str(&format!("\n         - {} ({} {}): {p}", c.field, c.kind.name(), c.card_id));
        }
    }
    s
}

pub const SWEEP_NAME: &str = "tearing sweep";

fn run_scenario(
    plan: &Plan,
    sc: &Scenario,
    index: u64,
    target: Target,
    pcsc: &PcscSetup,
    firmware: &Arc<Firmware>,
    cal: &Calibration,
) -> ScenarioResult {
    if !sc.targets.contains(&target) {
        let on: Vec<&str> = sc.targets.iter().map(|t| t.name()).collect();
        return ScenarioResult::skipped(&sc.name, target, format!("the plan runs it on {} only", on.join(", ")));
    }
    if target == Target::Pcsc {
        if sc.faults.iter().any(|f| matches!(f.kind, LineFaultKind::ReaderUnplug { .. })) {
            return ScenarioResult::skipped(
                &sc.name,
                target,
                "vpcd readers cannot be unplugged one by one (tests/tests/pcsc_faults.rs restarts pcscd with \
                 fewer readers instead; docs/rig-plans.md)",
            );
        }
        if sc.cards.iter().any(|c| c.kind == CardKind::Clone) {
            return ScenarioResult::skipped(
                &sc.name,
                target,
                "a clone shares its original's identity: on pcsc cards are told apart by id only",
            );
        }
    }
    let seed = plan.seed.wrapping_mul(1000).wrapping_add(index);
    let cards = match super::cards::make(&sc.cards, seed, firmware, cal) {
        Ok(c) => c,
        Err(e) => {
            return failed(ScenarioResult::new(&sc.name, target, Status::Failed), e);
        }
    };
    execute(plan, sc, target, pcsc, firmware, cards)
}

/// The scenario's profile: bundling as the scenario says, a short wait
/// for partners.
fn scenario_profile(plan: &Plan, sc: &Scenario) -> Profile {
    let mut profile = (*plan.profile).clone();
    let on = sc.bundles.unwrap_or(profile.bundles.is_some());
    profile.bundles = if on {
        let b =
            profile.bundles.clone().unwrap_or(Bundles { backups: 2, max_wait: BUNDLE_WAIT, unpaired: Unpaired::Pass });
        Some(Bundles { max_wait: BUNDLE_WAIT.min(b.max_wait), ..b })
    } else {
        None
    };
    profile
}

/// One binned card: which card it was and its trace.
#[derive(Debug, Clone)]
struct Ejection {
    reader: ReaderId,
    spec: usize,
    trace: Vec<String>,
}

/// What the line's card handler knows at the end.
struct LineEnd {
    ejections: Vec<Ejection>,
    /// Sim: every card with its real state at the end.
    views: Vec<(usize, CardView)>,
    /// pcsc: the feeder's PASS and FAIL bins.
    bins: Option<(Vec<CardId>, Vec<CardId>)>,
}

// ---- the sim line ---------------------------------------------------------

struct SimState {
    queue: VecDeque<(usize, EmuCard)>,
    on_slot: HashMap<ReaderId, (usize, u32)>,
    outstanding: usize,
    done: Vec<(usize, EmuCard)>,
    ejections: Vec<Ejection>,
}

/// The emulated feeder and sorter of a scenario: feeds the scenario's
/// cards in order, puts a card back after a failed attempt as often as its
/// `reinsert` says, and drains the batch once every card is binned.
struct SimLine {
    bank: EmuBank,
    traces: Arc<Traces>,
    control: Arc<Control>,
    state: Mutex<SimState>,
}

impl SimLine {
    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fill(&self, reinserts: &[u32]) {
        let mut st = self.lock();
        for slot in self.bank.slots() {
            if let Some((spec, card)) = st.queue.pop_front() {
                match slot.insert(card) {
                    Ok(()) => {
                        st.on_slot.insert(slot.id().clone(), (spec, reinserts[spec]));
                    }
                    Err(card) => st.queue.push_front((spec, *card)),
                }
            }
        }
    }
}

struct SimHandler {
    line: Arc<SimLine>,
    reinserts: Vec<u32>,
}

impl CardHandler for SimHandler {
    fn eject(&self, reader: &ReaderId, bin: Bin) {
        let line = &self.line;
        let Some(slot) = line.bank.slot(reader).cloned() else { return };
        let mut st = line.lock();
        let trace = line.traces.take(reader);
        let Some((spec, left)) = st.on_slot.remove(reader) else { return };
        st.ejections.push(Ejection { reader: reader.clone(), spec, trace });
        let card = slot.remove();
        match card {
            Some(card) if bin == Bin::Fail && left > 0 => {
                // Put back by hand: the same card, its state as it is.
                match slot.insert(card) {
                    Ok(()) => {
                        st.on_slot.insert(reader.clone(), (spec, left - 1));
                    }
                    Err(card) => {
                        st.done.push((spec, *card));
                        st.outstanding -= 1;
                    }
                }
                return;
            }
            Some(card) => st.done.push((spec, card)),
            None => {}
        }
        st.outstanding = st.outstanding.saturating_sub(1);
        if let Some((spec, card)) = st.queue.pop_front() {
            match slot.insert(card) {
                Ok(()) => {
                    st.on_slot.insert(reader.clone(), (spec, self.reinserts[spec]));
                }
                Err(card) => st.queue.push_front((spec, *card)),
            }
        }
        if st.outstanding == 0 {
            line.control.drain();
        }
    }
}

// ---- the pcsc line --------------------------------------------------------

struct PcscState {
    reinserts: Vec<u32>,
    outstanding: usize,
    ejections: Vec<Ejection>,
}

/// The rig's vpcd feeder as the scenario's card handler, in process: bins
/// through the feeder, puts a card back after a failed attempt as its
/// `reinsert` says, drains the batch once every card is binned.
struct PcscHandler {
    feeder: Feeder,
    /// While the fixture's power is cut: when it comes back.
    power_back: Arc<Mutex<Option<Instant>>>,
    ids: HashMap<CardId, usize>,
    traces: Arc<Traces>,
    control: Arc<Control>,
    state: Mutex<PcscState>,
}

impl CardHandler for PcscHandler {
    fn eject(&self, reader: &ReaderId, bin: Bin) {
        let Some(port) = card::transport::pcsc::port_of_reader(reader.as_str()) else { return };
        let view = self.feeder.status().slots.into_iter().find(|(p, _)| *p == port).map(|(_, v)| v);
        let (id, pulled) = match view {
            Some(SlotView::Present(id)) | Some(SlotView::Arriving(id)) => (Some(id), false),
            Some(SlotView::Pulled(id)) => (Some(id), true),
            _ => (None, false),
        };
        let trace = self.traces.take(reader);
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let spec = id.and_then(|id| self.ids.get(&id).copied()).unwrap_or(usize::MAX);
        st.ejections.push(Ejection { reader: reader.clone(), spec, trace });
        if bin == Bin::Fail && spec != usize::MAX && st.reinserts[spec] > 0 {
            st.reinserts[spec] -= 1;
            // The card goes back once the readers have power again.
            let back = *self.power_back.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(wait) = back.map(|b| b.saturating_duration_since(Instant::now())) {
                std::thread::sleep(wait);
            }
            if !pulled {
                let _ = self.feeder.remove(port);
            }
            match self.feeder.insert(port) {
                Ok(_) => return,
                Err(e) => tracing::warn!(port, error = %e, "could not put the card back"),
            }
        }
        let verdict =
            if bin == Bin::Pass { crate::vpcd::feeder::Verdict::Pass } else { crate::vpcd::feeder::Verdict::Fail };
        if let Err(e) = self.feeder.eject(port, verdict) {
            tracing::warn!(port, error = %e, "feeder refused EJECT");
        }
        st.outstanding = st.outstanding.saturating_sub(1);
        if st.outstanding == 0 {
            self.control.drain();
        }
    }
}

// ---- running one scenario ---------------------------------------------------

fn execute(
    plan: &Plan,
    sc: &Scenario,
    target: Target,
    pcsc: &PcscSetup,
    firmware: &Arc<Firmware>,
    cards: Vec<EmuCard>,
) -> ScenarioResult {
    let mut result = ScenarioResult::new(&sc.name, target, Status::Passed);
    let profile = Arc::new(scenario_profile(plan, sc));
    let ids: Vec<CardId> = cards.iter().map(EmuCard::id).collect();
    let kinds: Vec<CardKind> = sc.cards.iter().map(|c| c.kind).collect();
    let reinserts: Vec<u32> = sc.cards.iter().map(|c| c.reinsert).collect();
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => return failed(result, format!("temporary folder: {e}")),
    };
    let ledger_path = dir.path().join("ledger.db");
    let (ledger, writer) = match Ledger::open(&ledger_path) {
        Ok(x) => x,
        Err(e) => return failed(result, format!("ledger: {e}")),
    };
    let batch_id = match ledger.start_batch(batch_info(&sc.name, &profile, firmware)) {
        Ok(b) => b,
        Err(e) => return failed(result, format!("ledger: {e}")),
    };
    let recipe = Arc::new(Recipe::new(Arc::clone(&profile), Arc::clone(firmware), ledger.clone(), batch_id));
    let control = Control::new();
    let traces = Traces::new();
    let mut sim_line = None;
    let mut pcsc_feeder = None;
    let mut pcsc_handler: Option<Arc<PcscHandler>> = None;
    let power_back: Arc<Mutex<Option<Instant>>> = Arc::default();
    let (mut monitor, handler): (Box<dyn ReaderMonitor>, Arc<dyn CardHandler>) = match target {
        Target::Sim => {
            let bank = EmuBank::new(sc.readers, sc.card_speed.unwrap_or(plan.sim_speed), Duration::from_millis(200));
            let line = Arc::new(SimLine {
                bank: bank.clone(),
                traces: Arc::clone(&traces),
                control: Arc::clone(&control),
                state: Mutex::new(SimState {
                    queue: cards.into_iter().enumerate().collect(),
                    on_slot: HashMap::new(),
                    outstanding: ids.len(),
                    done: Vec::new(),
                    ejections: Vec::new(),
                }),
            });
            line.fill(&reinserts);
            sim_line = Some(Arc::clone(&line));
            (
                Box::new(TraceMonitor::new(Box::new(bank), Arc::clone(&traces))),
                Arc::new(SimHandler { line, reinserts: reinserts.clone() }),
            )
        }
        Target::Pcsc => {
            let Some((first, count)) = plan.pcsc_readers else {
                return failed(result, "the plan has no pcsc section naming its vpcd readers".into());
            };
            if sc.readers > count {
                return failed(
                    result,
                    format!("the scenario wants {} readers, the plan's pcsc section has {count}", sc.readers),
                );
            }
            let first_port = pcsc.port_base + first;
            let names: Vec<String> =
                (0..sc.readers).map(|i| crate::vpcd::reader_name(pcsc.port_base, first_port + i as u16)).collect();
            let monitor = match PcscMonitor::new(ReaderFilter::new(names.iter().cloned(), [""; 0]), Sharing::Exclusive)
            {
                Ok(m) => m,
                Err(e) => {
                    return failed(
                        result,
                        format!("no pcscd ({e}): start one with scripts/pcscd-vpcd.sh start N {}", pcsc.port_base),
                    );
                }
            };
            let mut m = TraceMonitor::new(Box::new(monitor), Arc::clone(&traces));
            // The readers must be there before any card is fed.
            match m.readers() {
                Ok(l) if l.len() == sc.readers => {}
                Ok(l) => {
                    return failed(
                        result,
                        format!(
                            "pcscd lists {l:?}, the scenario needs {names:?} (scripts/pcscd-vpcd.sh start N {})",
                            pcsc.port_base
                        ),
                    );
                }
                Err(e) => return failed(result, format!("pcscd: {e}")),
            }
            if let Err(e) = wait_empty(&names, Duration::from_secs(5)) {
                return failed(result, e);
            }
            let config = FeederConfig {
                speed: sc.card_speed.unwrap_or(plan.pcsc_speed),
                ..FeederConfig::instant(first_port, sc.readers)
            };
            let feeder = Feeder::start(config, cards, Arc::new(|_| {}));
            pcsc_feeder = Some(feeder.clone());
            let handler = PcscHandler {
                feeder,
                power_back: Arc::clone(&power_back),
                ids: ids.iter().enumerate().map(|(i, id)| (*id, i)).collect(),
                traces: Arc::clone(&traces),
                control: Arc::clone(&control),
                state: Mutex::new(PcscState {
                    reinserts: reinserts.clone(),
                    outstanding: ids.len(),
                    ejections: Vec::new(),
                }),
            };
            let handler = Arc::new(handler);
            pcsc_handler = Some(Arc::clone(&handler));
            (Box::new(m), handler as Arc<dyn CardHandler>)
        }
    };

    // Line faults fire when a card starts their step for the nth time.
    let mut fired: Vec<bool> = vec![false; sc.faults.len()];
    let mut step_counts: HashMap<Step, u32> = HashMap::new();
    let fault_log: Arc<Mutex<Vec<String>>> = Arc::default();
    let bank_for_faults = sim_line.as_ref().map(|l| l.bank.clone());
    let feeder_for_faults = pcsc_feeder.clone();
    let (pcscd_base, power) = (pcsc.port_base, Arc::clone(&power_back));
    let faults = sc.faults.clone();
    let started = Instant::now();
    let log = Arc::clone(&fault_log);
    let on_event = move |ev: &Event| {
        if let Event::Progress { progress: Progress::Step(step), .. } = ev {
            let n = step_counts.entry(*step).or_default();
            *n += 1;
            for (i, f) in faults.iter().enumerate() {
                if !fired[i] && f.step == *step && f.nth == *n {
                    fired[i] = true;
                    if let Some(bank) = &bank_for_faults {
                        fire_sim(bank, f.kind, f.duration);
                    }
                    if let Some(feeder) = &feeder_for_faults {
                        fire_pcsc(feeder, f.kind, f.duration, pcscd_base, &power, &log);
                    }
                    log.lock().unwrap_or_else(PoisonError::into_inner).push(format!(
                        "{} fired at {:.2} s ({} #{}) for {} ms",
                        f.kind.name(),
                        started.elapsed().as_secs_f64(),
                        f.step,
                        f.nth,
                        f.duration.as_millis()
                    ));
                }
            }
        }
    };
    let limit = sc.expect.max_seconds.map_or(SCENARIO_LIMIT, |s| Duration::from_secs_f64(s * 3.0 + 30.0));
    let watchdog = Watchdog::start(Arc::clone(&control), limit);
    let summary = batch::run(
        &mut *monitor,
        Arc::clone(&recipe),
        handler,
        None,
        batch::Output { labels: Some(dir.path().join("labels")), keep_outcomes: true },
        Arc::clone(&control),
        on_event,
    );
    let timed_out = watchdog.stop();
    result.elapsed = started.elapsed();
    let _ = ledger.finish_batch(batch_id, recipe.profile.audit_key.as_ref());
    drop(recipe);
    drop(ledger);
    writer.close();
    let end = match (&sim_line, &pcsc_feeder) {
        (Some(line), _) => {
            let mut st = line.lock();
            // Cards still in the slots (a batch cut short) are looked at too.
            for slot in line.bank.slots() {
                if let (Some(card), Some((spec, _))) = (slot.remove(), st.on_slot.remove(slot.id())) {
                    st.done.push((spec, card));
                }
            }
            LineEnd {
                ejections: std::mem::take(&mut st.ejections),
                views: st.done.iter().map(|(s, c)| (*s, c.view())).collect(),
                bins: None,
            }
        }
        (None, Some(feeder)) => {
            let s = feeder.shutdown();
            let ejections = pcsc_handler
                .as_ref()
                .map(|h| std::mem::take(&mut h.state.lock().unwrap_or_else(PoisonError::into_inner).ejections))
                .unwrap_or_default();
            LineEnd { ejections, views: Vec::new(), bins: Some((s.pass, s.fail)) }
        }
        _ => LineEnd { ejections: Vec::new(), views: Vec::new(), bins: None },
    };
    result.notes.extend(fault_log.lock().unwrap_or_else(PoisonError::into_inner).drain(..));
    if timed_out {
        result.problems.push(format!("the scenario did not finish within {limit:?}; interrupted"));
    }
    let summary = match summary {
        Ok(s) => s,
        Err(e) => return failed(result, format!("the batch stopped: {e}")),
    };
    let export = match export::export(&ledger_path) {
        Ok(e) => e,
        Err(e) => return failed(result, format!("ledger export: {e}")),
    };
    check(&mut result, sc, &ids, &kinds, &summary.outcomes, end, &export, &ledger_path, firmware, &profile);
    check_scenario(&mut result, &sc.expect, &export);
    if !result.problems.is_empty() || result.cards.iter().any(|c| !c.problems.is_empty()) {
        result.status = Status::Failed;
    }
    result
}

fn failed(mut r: ScenarioResult, problem: String) -> ScenarioResult {
    r.status = Status::Failed;
    r.problems.push(problem);
    r
}

fn fire_sim(bank: &EmuBank, kind: LineFaultKind, duration: Duration) {
    let slots: Vec<_> = match kind {
        LineFaultKind::ReaderUnplug { reader } => bank.slots().get(reader).cloned().into_iter().collect(),
        LineFaultKind::PcscdRestart | LineFaultKind::PowerCut => bank.slots().to_vec(),
    };
    for s in &slots {
        s.unplug();
    }
    std::thread::spawn(move || {
        std::thread::sleep(duration);
        for s in &slots {
            s.plug();
        }
    });
}

/// A line fault through pcscd: the fixture's power cut pulls every card
/// out of its vpcd reader and puts the ones still aside back when the power
/// returns; a pcscd restart runs scripts/pcscd-vpcd.sh with the readers it
/// runs now (the rig's cards re-seat themselves when vpcd comes back).
fn fire_pcsc(
    feeder: &Feeder,
    kind: LineFaultKind,
    duration: Duration,
    port_base: u16,
    power_back: &Arc<Mutex<Option<Instant>>>,
    log: &Arc<Mutex<Vec<String>>>,
) {
    let log = Arc::clone(log);
    let note = move |line: String| log.lock().unwrap_or_else(PoisonError::into_inner).push(line);
    match kind {
        LineFaultKind::PowerCut => {
            *power_back.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + duration);
            let ports: Vec<u16> = feeder.config().ports().collect();
            for p in &ports {
                let _ = feeder.remove(*p);
            }
            let feeder = feeder.clone();
            let power_back = Arc::clone(power_back);
            std::thread::spawn(move || {
                std::thread::sleep(duration);
                *power_back.lock().unwrap_or_else(PoisonError::into_inner) = None;
                for (p, v) in feeder.status().slots {
                    if matches!(v, SlotView::Pulled(_)) && ports.contains(&p) {
                        let _ = feeder.insert(p);
                    }
                }
            });
        }
        LineFaultKind::PcscdRestart => {
            let readers = std::env::var("TAPLINE_VPCD_READERS").unwrap_or_else(|_| "8".into());
            let Some(script) = pcscd_script() else {
                note("pcscd_restart: scripts/pcscd-vpcd.sh not found from the current folder".into());
                return;
            };
            std::thread::spawn(move || {
                // `start` with the setup that runs is a no-op: stop first.
                let out = std::process::Command::new("bash").arg(&script).arg("stop").output().and_then(|_| {
                    std::process::Command::new("bash")
                        .arg(&script)
                        .args(["start", &readers, &port_base.to_string()])
                        .output()
                });
                match out {
                    Ok(o) if o.status.success() => note(format!("pcscd restarted with {readers} readers")),
                    Ok(o) => note(format!("pcscd restart failed: {}", String::from_utf8_lossy(&o.stderr).trim())),
                    Err(e) => note(format!("pcscd restart failed: {e}")),
                }
            });
        }
        LineFaultKind::ReaderUnplug { .. } => {}
    }
}

/// scripts/pcscd-vpcd.sh from the current folder or one of its parents.
fn pcscd_script() -> Option<PathBuf> {
    let here = std::env::current_dir().ok()?;
    here.ancestors().map(|d| d.join("scripts/pcscd-vpcd.sh")).find(|p| p.is_file())
}

/// Interrupts the batch after `limit`.
struct Watchdog {
    tx: std::sync::mpsc::Sender<()>,
    join: std::thread::JoinHandle<bool>,
}

impl Watchdog {
    fn start(control: Arc<Control>, limit: Duration) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let join = std::thread::spawn(move || {
            if rx.recv_timeout(limit) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                control.interrupt();
                return true;
            }
            false
        });
        Self { tx, join }
    }

    fn stop(self) -> bool {
        let _ = self.tx.send(());
        self.join.join().unwrap_or(false)
    }
}

/// Waits until none of the named PC/SC readers holds a card (a card of an
/// earlier run can show for one pcscd poll after it left).
fn wait_empty(names: &[String], limit: Duration) -> Result<(), String> {
    use card::transport::SlotState;
    let mut monitor = PcscMonitor::new(ReaderFilter::new(names.iter().cloned(), [""; 0]), Sharing::Shared)
        .map_err(|e| format!("no pcscd: {e}"))?;
    let started = Instant::now();
    for id in monitor.readers().map_err(|e| e.to_string())? {
        let mut reader = monitor.open(&id).map_err(|e| e.to_string())?;
        let mut state = reader.wait_change(&SlotState::Empty, Duration::ZERO).map_err(|e| e.to_string())?;
        while state != SlotState::Empty {
            if started.elapsed() > limit {
                return Err(format!("reader {id} still holds a card after {limit:?}"));
            }
            state = reader.wait_change(&state, Duration::from_millis(250)).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

// ---- checks -------------------------------------------------------------------

fn describe(o: &CardOutcome) -> String {
    match &o.result {
        Ok(p) => format!("passed ({}{})", p.stage, p.serial.map(|s| format!(", serial {s}")).unwrap_or_default()),
        Err(f) => format!(
            "failed at {}: {} ({}){}",
            f.step,
            f.reason,
            if f.retryable { "retryable" } else { "not retryable" },
            if f.detail.is_empty() { String::new() } else { format!(": {}", f.detail) }
        ),
    }
}

#[allow(clippy::too_many_arguments)]
fn check(
    result: &mut ScenarioResult,
    sc: &Scenario,
    ids: &[CardId],
    kinds: &[CardKind],
    outcomes: &[CardOutcome],
    end: LineEnd,
    export: &Export,
    ledger: &std::path::Path,
    firmware: &Firmware,
    profile: &Profile,
) {
    // Outcomes and bins of one reader come in the same order: the worker
    // reports a card's outcome, then bins it.
    let mut by_reader: HashMap<&ReaderId, VecDeque<&Ejection>> = HashMap::new();
    for e in &end.ejections {
        by_reader.entry(&e.reader).or_default().push_back(e);
    }
    let mut per_spec: Vec<Vec<(&CardOutcome, Vec<String>)>> = vec![Vec::new(); sc.cards.len()];
    let pcsc = end.bins.is_some();
    for o in outcomes {
        let spec = if pcsc {
            o.card_id.and_then(|id| ids.iter().position(|x| *x == id))
        } else {
            by_reader.get_mut(&o.reader).and_then(VecDeque::pop_front).map(|e| e.spec)
        };
        let trace = end.ejections.iter().find(|e| Some(e.spec) == spec).map(|e| e.trace.clone()).unwrap_or_default();
        match spec {
            Some(s) if s < per_spec.len() => per_spec[s].push((o, trace)),
            _ => result.problems.push(format!(
                "an outcome no card of the plan explains: {} on {}",
                describe(o),
                o.reader
            )),
        }
    }
    let records: HashMap<&str, &export::CardExport> = export.cards.iter().map(|c| (c.card_id.as_str(), c)).collect();
    let views: HashMap<usize, &CardView> = end.views.iter().map(|(s, v)| (*s, v)).collect();
    for (i, spec) in sc.cards.iter().enumerate() {
        let id = ids[i].to_hex();
        let attempts = &per_spec[i];
        let record = records.get(id.as_str()).copied();
        let mut cr = CardResult {
            field: spec.field.clone(),
            kind: spec.kind,
            card_id: id.clone(),
            attempts: attempts.iter().map(|(o, _)| describe(o)).collect(),
            ledger: record.map_or("no record".into(), |r| {
                format!(
                    "{}{}, {} attempt(s){}",
                    r.status,
                    r.stage.as_ref().map(|s| format!(" ({s})")).unwrap_or_default(),
                    r.attempts,
                    r.failed_step.as_ref().map(|s| format!(", failed at {s}")).unwrap_or_default()
                )
            }),
            problems: Vec::new(),
            trace: attempts.last().map(|(_, t)| t.clone()).unwrap_or_default(),
        };
        match attempts.last() {
            None => cr.problems.push("the station reported no outcome for this card".into()),
            Some((o, _)) => expect_outcome(&mut cr.problems, &spec.expect, o),
        }
        let clone = kinds[i] == CardKind::Clone;
        if let (Some(n), Some(r)) = (spec.expect.attempts, record)
            && !clone
            && r.attempts != i64::from(n)
        {
            cr.problems.push(format!("the ledger counts {} attempts, the plan expects {n}", r.attempts));
        }
        if let Some(stage) = &spec.expect.stage {
            match record {
                Some(r) if r.stage.as_deref() == Some(stage.as_str()) => {}
                _ => cr.problems.push(format!("ledger stage is not {stage}: {}", cr.ledger)),
            }
        }
        // The ledger agrees with the station's verdict (a clone's refusal
        // leaves its original's record alone).
        if !clone
            && let (Some((o, _)), Some(r)) = (attempts.last(), record)
            && o.passed() != (r.status == "passed")
        {
            cr.problems.push(format!("the ledger says {} but the last outcome was {}", r.status, describe(o)));
        }
        // Nothing half-recorded: a passed record is a card that really is
        // provisioned (sim: read from the card itself).
        if let (Some(view), Some(r)) = (views.get(&i), record)
            && r.status == "passed"
            && !clone
        {
            for p in provisioned(view, r, firmware, profile) {
                cr.problems.push(format!("recorded passed but {p}"));
            }
        }
        if !clone
            && let Some(r) = record
            && let Ok(steps) = export::steps(ledger, &r.card_id)
        {
            // Every attempt but the last ended with a failure.
            for a in 1..r.attempts {
                if !steps.iter().any(|s| s.attempt == a && s.event == "failed") {
                    cr.problems.push(format!("attempt {a} of {} has no failure journaled", r.attempts));
                }
            }
        }
        result.cards.push(cr);
    }
    if let Some((pass, fail)) = &end.bins {
        for r in &export.cards {
            let binned_pass = pass.iter().any(|p| p.to_hex() == r.card_id);
            let binned_fail = fail.iter().any(|p| p.to_hex() == r.card_id);
            if binned_pass != (r.status == "passed") {
                result.problems.push(format!(
                    "card {} recorded {} but binned {}",
                    r.card_id,
                    r.status,
                    if binned_pass {
                        "PASS"
                    } else if binned_fail {
                        "FAIL"
                    } else {
                        "nowhere"
                    }
                ));
            }
        }
    }
    // Bundles: a sealed bundle's members are passed and bundled, the cards
    // hold its wallet key (sim).
    let by_id: HashMap<String, &CardView> = end.views.iter().map(|(_, v)| (v.id.to_hex(), v)).collect();
    for b in export.bundles.iter().filter(|b| b.status == "sealed") {
        for m in b.primary.iter().chain(b.backups.iter()) {
            match records.get(m.as_str()) {
                Some(r) if r.status == "passed" && r.stage.as_deref() == Some("bundled") => {}
                other => {
                    result.problems.push(format!("sealed bundle {} has member {m} recorded {other:?}", b.bundle_id))
                }
            }
            if let (Some(v), Some(key)) = (by_id.get(m), &b.wallet_pubkey)
                && v.wallet_public_key.map(hex::encode_upper).as_deref() != Some(key.as_str())
            {
                result
                    .problems
                    .push(format!("member {m} of sealed bundle {} does not hold its wallet key", b.bundle_id));
            }
        }
    }
}

fn expect_outcome(problems: &mut Vec<String>, e: &Expect, o: &CardOutcome) {
    match (&o.result, e.result) {
        (Ok(_), Verdict::Passed) => {}
        (Err(_), Verdict::Passed) => problems.push(format!("expected passed, got {}", describe(o))),
        (Ok(_), Verdict::Failed) => problems.push(format!("expected a failure, got {}", describe(o))),
        (Err(f), Verdict::Failed) => {
            if let Some(step) = e.step
                && f.step != step
            {
                problems.push(format!("expected a failure at {step}, got {}", describe(o)));
            }
            if let Some(reason) = &e.reason
                && !f.reason.to_lowercase().contains(&reason.to_lowercase())
            {
                problems.push(format!("expected a reason containing {reason:?}, got {}", describe(o)));
            }
            if let Some(r) = e.retryable
                && f.retryable != r
            {
                problems.push(format!(
                    "expected {}, got {}",
                    if r { "retryable" } else { "not retryable" },
                    describe(o)
                ));
            }
        }
    }
}

/// What a card recorded passed lacks, read from the card itself.
fn provisioned(v: &CardView, r: &export::CardExport, fw: &Firmware, profile: &Profile) -> Vec<String> {
    let mut missing = Vec::new();
    if !v.packages.iter().any(|p| p.aid == fw.package_aid && p.hash == fw.load_file_sha256) {
        missing.push("the card lacks the manifest's package".to_string());
    }
    for a in &fw.applets {
        if !v.instances.iter().any(|(aid, state)| *aid == a.instance_aid && *state == card::gp::app_state::SELECTABLE) {
            missing.push(format!("instance {} is not selectable on the card", hex::encode_upper(&a.instance_aid)));
        }
    }
    if let Some(rot) = &profile.rotation
        && v.key_versions != [rot.version]
    {
        missing
            .push(format!("the card's key versions are {:02X?}, not the rotated {:02X}", v.key_versions, rot.version));
    }
    if v.wallet_lifecycle.is_none() {
        missing.push("the wallet applet has no state".into());
    }
    if r.stage.as_deref() == Some("bundled") && v.wallet_public_key.map(hex::encode_upper) != r.wallet_pubkey {
        missing.push("the card does not hold the recorded wallet key".into());
    }
    missing
}

fn check_scenario(result: &mut ScenarioResult, e: &ScenarioExpect, export: &Export) {
    let sealed: Vec<_> = export.bundles.iter().filter(|b| b.status == "sealed").collect();
    let aborted = export.bundles.iter().filter(|b| b.status == "aborted").count();
    result.sealed = sealed.len();
    result.aborted = aborted;
    if let Some(n) = e.sealed
        && sealed.len() != n as usize
    {
        result.problems.push(format!("{} bundles sealed, the plan expects {n}", sealed.len()));
    }
    if let Some(n) = e.aborted
        && aborted != n as usize
    {
        result.problems.push(format!("{aborted} bundles aborted, the plan expects {n}"));
    }
    if let Some(size) = e.bundle_size {
        for b in &sealed {
            if b.size != i64::from(size) {
                result.problems.push(format!("bundle {} has {} cards, the plan expects {size}", b.bundle_id, b.size));
            }
        }
    }
    if let Some(max) = e.max_seconds
        && result.elapsed.as_secs_f64() > max
    {
        result.problems.push(format!("took {:.1} s, the plan allows {max} s", result.elapsed.as_secs_f64()));
    }
}

// ---- the tearing sweep ----------------------------------------------------------

fn run_sweep(
    plan: &Plan,
    sweep: &super::Sweep,
    target: Target,
    pcsc: &PcscSetup,
    firmware: &Arc<Firmware>,
    cal: &Calibration,
) -> ScenarioResult {
    let expect =
        Expect { result: Verdict::Passed, step: None, reason: None, retryable: None, attempts: None, stage: None };
    let mut cards = Vec::new();
    for n in 1..=cal.total {
        for point in &sweep.points {
            cards.push(CardSpec {
                kind: CardKind::Genuine,
                remove: Some((At::Apdu(n), *point)),
                reset: None,
                mute: None,
                reinsert: 1,
                expect: expect.clone(),
                field: format!("APDU {n} {}", if *point == TearPoint::Before { "before" } else { "after" }),
            });
        }
    }
    let sc = Scenario {
        name: SWEEP_NAME.into(),
        targets: vec![target],
        readers: sweep.readers,
        bundles: Some(false),
        card_speed: None,
        cards,
        faults: Vec::new(),
        expect: ScenarioExpect::default(),
    };
    let mut r = run_scenario(plan, &sc, 999, target, pcsc, firmware, cal);
    // Each card: a first attempt that failed retryably (or, if torn before
    // it had an identity, failed without one), then a pass.
    let mut covered = 0;
    for c in &mut r.cards {
        match c.attempts.as_slice() {
            [first, second] if first.contains("(retryable)") && second.starts_with("passed") => covered += 1,
            [first, ..] if first.starts_with("failed") && !first.contains("(retryable)") => {
                c.problems.push(format!("the torn attempt failed as not retryable: {first}"));
            }
            other if c.problems.is_empty() => {
                c.problems.push(format!("expected a torn attempt then a pass, got {other:?}"));
            }
            _ => {}
        }
    }
    if r.cards.iter().any(|c| !c.problems.is_empty()) {
        r.status = Status::Failed;
    }
    r.notes.push(format!(
        "recipe of {} APDUs; {} tearing points ({} x {}); {covered} torn, resumed and passed",
        cal.total,
        r.cards.len(),
        cal.total,
        sweep.points.len()
    ));
    r
}
