//! `station daemon`: the station that runs all shift. It owns the readers
//! and the ledger for its whole life and runs batches one after another on
//! one batch thread; batches are started, drained and stopped through a
//! `Controller` (the HTTP API and the dashboard). Profiles are loaded at
//! start and on `reload` (SIGHUP); a reload that fails keeps the last good
//! profiles and shows the error. `shutdown` (SIGTERM) drains the running
//! batch, interrupts what is still in flight after a grace period, and
//! closes the ledger after its last commit.

pub mod config;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use card::transport::ReaderMonitor;
use card::transport::emu::EmuBank;
use card::transport::pcsc::{PcscMonitor, ReaderFilter};
use crossbeam_channel::{Receiver, Sender};

use crate::batch;
use crate::control::{Action, Controller, Refused};
use crate::firmware::Firmware;
use crate::handler::{CardHandler, EmuFeeder, ManualHandler, RigFeeder};
use crate::ledger::{BatchInfo, Ledger, LedgerWriter};
use crate::live::Live;
use crate::profile::Profile;
use crate::recipe::Recipe;
use crate::sim::CardSupply;
use crate::state::{BatchStart, Level, Mode};
use crate::worker::Control;
use config::{DaemonConfig, ReaderSource};

/// A profile ready to run: validated, its firmware verified.
#[derive(Clone)]
pub struct Loaded {
    pub path: PathBuf,
    pub profile: Arc<Profile>,
    pub firmware: Arc<Firmware>,
}

/// Loads and verifies every profile of the configuration; all or nothing.
pub fn load_profiles(config: &DaemonConfig) -> Result<BTreeMap<String, Loaded>, String> {
    let mut out = BTreeMap::new();
    let mut errors = Vec::new();
    for (name, path) in &config.profiles {
        match Profile::load(path) {
            Ok(p) => match Firmware::load(&p.firmware_dir, &p.release_keys) {
                Ok(f) => {
                    out.insert(
                        name.clone(),
                        Loaded { path: path.clone(), profile: Arc::new(p), firmware: Arc::new(f) },
                    );
                }
                Err(e) => errors.push(format!("profile {name}: firmware: {e}")),
            },
            Err(e) => errors.push(format!("profile {name}: {e}")),
        }
    }
    if errors.is_empty() { Ok(out) } else { Err(errors.join("\n")) }
}

/// A batch request, as the API gives it.
struct Request {
    profile: String,
    name: String,
    cards: Option<usize>,
    control: Arc<Control>,
}

enum RunnerMsg {
    Start(Request),
    Quit,
}

/// The daemon's readers, who handles their cards, and the emulated feeder
/// (to fill the readers at each batch start) when the readers are emulated.
type Readers = (Box<dyn ReaderMonitor>, Arc<dyn CardHandler>, Option<Arc<EmuFeeder>>);

/// The daemon's shared core: what the API, the dashboard and the signal
/// handlers act on.
pub struct Daemon {
    config: Mutex<DaemonConfig>,
    profiles: Mutex<BTreeMap<String, Loaded>>,
    live: Arc<Live>,
    runner: Sender<RunnerMsg>,
    /// The running batch's control, while one runs.
    current: Mutex<Option<Arc<Control>>>,
    /// Paused readers, kept across batches.
    paused: Mutex<HashSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The running daemon: its core and the batch thread.
pub struct Running {
    pub daemon: Arc<Daemon>,
    runner: JoinHandle<()>,
    writer: LedgerWriter,
}

impl Daemon {
    /// Opens the readers and the ledger, loads the profiles and starts the
    /// batch thread. Fails with a clear message when any of them is wrong.
    pub fn start(config: DaemonConfig, live: Arc<Live>) -> anyhow::Result<Running> {
        let profiles = load_profiles(&config).map_err(|e| anyhow::anyhow!(e))?;
        // The heads of the batches a recovery closes are signed with the
        // first audit key among the profiles.
        let key = profiles.values().find_map(|l| l.profile.audit_key.clone());
        let (ledger, writer, _recovered) = Ledger::open_for_provisioning(
            &crate::ledger::OpenOptions {
                target: config.ledger.clone(),
                station_id: config.station_id.clone(),
                outbox: Some(config.outbox.clone()),
            },
            key.as_ref(),
        )?;
        {
            let live = Arc::clone(&live);
            ledger.observe_writes(Arc::new(move |d| live.metrics().observe_ledger_write(d)));
        }
        if matches!(config.ledger, crate::ledger::LedgerTarget::Postgres(_)) {
            let live = Arc::clone(&live);
            ledger.observe_status(Arc::new(move |s| live.set_ledger_link(s.online, s.outbox_ops)));
        }
        let (mut monitor, handler, feeder): Readers = match &config.readers {
            ReaderSource::Sim { readers, card_speed, faults, seed } => {
                let timeout = profiles.values().next().map_or(Duration::from_secs(5), |l| l.profile.timeouts.apdu);
                let bank = EmuBank::new(*readers, *card_speed, timeout);
                let seed = seed.unwrap_or_else(|| {
                    let mut b = [0u8; 8];
                    let _ = getrandom::fill(&mut b);
                    u64::from_be_bytes(b) >> 16
                });
                let feeder =
                    Arc::new(EmuFeeder::endless(bank.clone(), Box::new(CardSupply::new(seed, faults.clone()))));
                (Box::new(bank), Arc::clone(&feeder) as Arc<dyn CardHandler>, Some(feeder))
            }
            ReaderSource::Pcsc { include, exclude, feeder, fixture } => {
                let sharing = profiles.values().next().map(|l| l.profile.sharing).unwrap_or_default();
                let mut monitor = PcscMonitor::new(
                    ReaderFilter::new(include.iter().cloned(), exclude.iter().cloned()),
                    sharing,
                )
                .context(
                    "cannot reach pcscd (is it running? scripts/pcscd-vpcd.sh starts one with emulated readers)",
                )?;
                let handler: Arc<dyn CardHandler> = match (feeder, fixture) {
                    (_, Some(spec)) => {
                        let readers = monitor.readers().unwrap_or_default();
                        Arc::new(crate::fixture::serial::SerialFeeder::start(spec, readers))
                    }
                    (Some(addr), None) => Arc::new(RigFeeder::new(*addr)),
                    (None, None) => Arc::new(ManualHandler),
                };
                (Box::new(monitor), handler, None)
            }
        };
        {
            let mut m = live.model();
            m.set_profiles(profiles.keys().cloned().collect());
            if let Ok(ids) = monitor.readers() {
                m.set_readers(ids);
            }
            m.log(SystemTime::now(), Level::Info, None, format!("station {} ready", config.station_id));
        }
        live.publish();
        let (tx, rx) = crossbeam_channel::unbounded();
        let daemon = Arc::new(Daemon {
            config: Mutex::new(config),
            profiles: Mutex::new(profiles),
            live,
            runner: tx,
            current: Mutex::new(None),
            paused: Mutex::new(HashSet::new()),
        });
        let d = Arc::clone(&daemon);
        let runner = std::thread::Builder::new()
            .name("batches".into())
            .spawn(move || d.run_batches(rx, &mut *monitor, handler, feeder, ledger))?;
        Ok(Running { daemon, runner, writer })
    }

    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }

    pub fn config(&self) -> DaemonConfig {
        lock(&self.config).clone()
    }

    /// Re-reads the configuration file and its profiles (SIGHUP). On any
    /// problem the last good ones stay in use and the error is shown.
    pub fn reload(&self) -> Result<(), String> {
        let file = lock(&self.config).file.clone();
        let result =
            DaemonConfig::load(&file).map_err(|e| e.to_string()).and_then(|c| load_profiles(&c).map(|p| (c, p)));
        let at = SystemTime::now();
        match result {
            Ok((config, profiles)) => {
                let names: Vec<String> = profiles.keys().cloned().collect();
                *lock(&self.profiles) = profiles;
                // The readers, ledger and listen address stay as started.
                lock(&self.config).profiles = config.profiles;
                let mut m = self.live.model();
                m.set_profiles(names.clone());
                m.set_config_error(None, at);
                m.log(at, Level::Info, None, format!("profiles reloaded: {}", names.join(", ")));
                drop(m);
                tracing::info!(profiles = ?names, "profiles reloaded");
                self.live.publish();
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "reload failed; keeping the last good profiles");
                self.live.model().set_config_error(Some(format!("reload failed, last good profiles kept: {e}")), at);
                self.live.publish();
                Err(e)
            }
        }
    }

    /// Whether a batch is running.
    pub fn busy(&self) -> bool {
        lock(&self.current).is_some()
    }

    /// SIGTERM: drain the running batch; after `grace`, interrupt the cards
    /// still in flight; then stop the batch thread and close the ledger.
    pub fn shutdown(running: Running, grace: Duration) {
        let d = &running.daemon;
        d.live.model().set_mode(Mode::Stopping);
        d.live.model().log(SystemTime::now(), Level::Warn, None, "shutting down: draining");
        d.live.publish();
        if let Some(c) = lock(&d.current).clone() {
            c.drain();
        }
        let deadline = Instant::now() + grace;
        while d.busy() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(c) = lock(&d.current).clone() {
            tracing::warn!("grace period over: interrupting the cards in flight");
            c.interrupt();
        }
        let _ = d.runner.send(RunnerMsg::Quit);
        let Running { daemon, runner, writer } = running;
        let _ = runner.join();
        drop(daemon);
        writer.close();
    }

    fn run_batches(
        &self,
        rx: Receiver<RunnerMsg>,
        monitor: &mut dyn ReaderMonitor,
        handler: Arc<dyn CardHandler>,
        feeder: Option<Arc<EmuFeeder>>,
        ledger: Ledger,
    ) {
        while let Ok(RunnerMsg::Start(req)) = rx.recv() {
            if let Err(e) = self.run_one(&req, monitor, &handler, feeder.as_deref(), &ledger) {
                tracing::error!(batch = %req.name, error = %e, "batch failed");
                self.live.model().log(SystemTime::now(), Level::Error, None, format!("batch {}: {e:#}", req.name));
            }
            *lock(&self.current) = None;
            let mut m = self.live.model();
            m.batch_finished(Instant::now(), SystemTime::now());
            drop(m);
            self.live.publish();
        }
        if let Some(f) = feeder {
            f.stop_feeding();
        }
    }

    fn run_one(
        &self,
        req: &Request,
        monitor: &mut dyn ReaderMonitor,
        handler: &Arc<dyn CardHandler>,
        feeder: Option<&EmuFeeder>,
        ledger: &Ledger,
    ) -> anyhow::Result<()> {
        let loaded = lock(&self.profiles)
            .get(&req.profile)
            .cloned()
            .with_context(|| format!("no profile named {:?}", req.profile))?;
        let (profile, fw) = (loaded.profile, loaded.firmware);
        let batch_id = ledger.start_batch(BatchInfo {
            name: req.name.clone(),
            profile: loaded.path.display().to_string(),
            product: profile.product.clone(),
            firmware: format!("{} {}", fw.manifest.name, fw.manifest.version),
            firmware_sha256: hex::encode(fw.load_file_sha256),
        })?;
        let control = Arc::clone(&req.control);
        self.live.set_profile(&req.profile);
        self.live.model().batch_started(
            BatchStart { name: req.name.clone(), id: batch_id, profile: req.profile.clone(), target: req.cards },
            Instant::now(),
            SystemTime::now(),
        );
        self.live.publish();
        if let Some(f) = feeder {
            f.fill();
        }
        let report_dir = lock(&self.config).reports.join(&req.name);
        let recipe = Arc::new(Recipe::new(Arc::clone(&profile), fw, ledger.clone(), batch_id));
        let output =
            batch::Output { labels: profile.bundles.as_ref().map(|_| report_dir.join("labels")), keep_outcomes: false };
        tracing::info!(batch = %req.name, profile = %req.profile, cards = ?req.cards, "batch started");
        let live = Arc::clone(&self.live);
        let summary =
            batch::run(monitor, recipe, Arc::clone(handler), req.cards, output, control, |ev| live.on_event(ev))?;
        ledger.finish_batch(batch_id, profile.audit_key.as_ref())?;
        tracing::info!(
            batch = %req.name,
            passed = summary.passed(),
            failed = summary.failed(),
            elapsed_s = summary.elapsed.as_secs_f64(),
            "batch finished"
        );
        let text = summary.render(profile.bundles.is_some());
        if let Err(e) =
            std::fs::create_dir_all(&report_dir).and_then(|()| std::fs::write(report_dir.join("summary.txt"), text))
        {
            tracing::error!(dir = %report_dir.display(), error = %e, "cannot write the batch summary");
        }
        let written = ledger
            .target()
            .readable()
            .map_err(crate::report::ReportError::from)
            .and_then(|copy| crate::report::write_batch_report(copy.path(), &req.name, &report_dir));
        match written {
            Ok(files) => {
                tracing::info!(report = %files.html.display(), "batch report written");
                self.live.model().log(
                    SystemTime::now(),
                    Level::Info,
                    None,
                    format!("batch report: {}", files.html.display()),
                );
            }
            Err(e) => {
                tracing::error!(batch = %req.name, error = %e, "cannot write the batch report");
                self.live.model().log(SystemTime::now(), Level::Error, None, format!("batch report failed: {e}"));
            }
        }
        Ok(())
    }
}

impl Controller for Daemon {
    fn act(&self, action: Action) -> Result<String, Refused> {
        let refuse = |s: String| Err(Refused(s));
        match action {
            Action::StartBatch { profile, name, cards } => {
                if self.live.model().mode() == Mode::Stopping {
                    return refuse("the station is shutting down".into());
                }
                if cards == Some(0) {
                    return refuse("cards must be at least 1".into());
                }
                if !lock(&self.profiles).contains_key(&profile) {
                    let names: Vec<String> = lock(&self.profiles).keys().cloned().collect();
                    return refuse(format!("no profile named {profile:?}; known: {}", names.join(", ")));
                }
                let name = name.unwrap_or_else(crate::batch::default_name);
                if name.is_empty() || name.len() > 100 || name.contains(['/', '\\']) || name.starts_with('.') {
                    return refuse(format!("batch name {name:?}: use up to 100 characters without / or \\"));
                }
                // One batch at a time: the current slot is taken here, so
                // two quick requests cannot both start.
                let mut current = lock(&self.current);
                if current.is_some() {
                    return refuse("a batch is running: drain or stop it first".into());
                }
                let control = Control::new();
                for r in lock(&self.paused).iter() {
                    control.set_paused(r, true);
                }
                *current = Some(Arc::clone(&control));
                drop(current);
                let msg = format!("batch {name} starting with profile {profile}");
                if self.runner.send(RunnerMsg::Start(Request { profile, name, cards, control })).is_err() {
                    *lock(&self.current) = None;
                    return refuse("the batch thread has stopped".into());
                }
                Ok(msg)
            }
            Action::Drain | Action::Stop => {
                let Some(c) = lock(&self.current).clone() else {
                    return refuse("no batch is running".into());
                };
                let drain = action == Action::Drain;
                if drain {
                    c.drain();
                } else {
                    c.interrupt();
                }
                let mut m = self.live.model();
                m.set_mode(Mode::Draining);
                let text = if drain {
                    "draining: finishing the cards in flight"
                } else {
                    "stopping: interrupting the cards in flight"
                };
                m.log(SystemTime::now(), Level::Warn, None, text);
                drop(m);
                self.live.publish();
                Ok(text.into())
            }
            pause => {
                let request = crate::control::PauseRequest::of(&pause, &self.live.snapshot().lanes)
                    .unwrap_or_else(|| Err(Refused("not a pause action".into())))?;
                self.pause(&request)
            }
        }
    }
}

impl Daemon {
    fn pause(&self, request: &crate::control::PauseRequest) -> Result<String, Refused> {
        let current = lock(&self.current).clone();
        let mut m = self.live.model();
        for reader in &request.readers {
            // Kept for later batches; the running batch's workers see it at
            // their next card.
            if request.paused {
                lock(&self.paused).insert(reader.clone());
            } else {
                lock(&self.paused).remove(reader);
            }
            if let Some(c) = &current {
                c.set_paused(reader, request.paused);
            }
            m.set_paused(reader, request.paused);
        }
        let text = request.describe();
        m.log(SystemTime::now(), Level::Info, None, text.clone());
        drop(m);
        self.live.publish();
        Ok(text)
    }
}
