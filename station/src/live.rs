//! The station core's published state: one `Live` per station process. It
//! takes every batch event into the state model and the metrics, and
//! publishes `Snapshot`s on a `tokio::sync::watch` channel that the
//! dashboard, the HTTP API and `station dash --connect` read. Nothing here
//! touches hardware or the ledger.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::state::{Snapshot, StateModel};
use crate::worker::Event;

/// How often a snapshot is published while nothing else happens (elapsed
/// times and rates move on).
pub const TICK: Duration = Duration::from_millis(250);

pub struct Live {
    model: Mutex<StateModel>,
    metrics: Metrics,
    /// Shared, not copied, with every event's metrics.
    profile: Mutex<Arc<str>>,
    tx: watch::Sender<Arc<Snapshot>>,
}

impl Live {
    pub fn new(station: &str) -> Arc<Self> {
        let model = StateModel::new(station);
        let first = Arc::new(model.snapshot(Instant::now(), SystemTime::now()));
        let (tx, _) = watch::channel(first);
        Arc::new(Self {
            model: Mutex::new(model),
            metrics: Metrics::new(station),
            profile: Mutex::new(Arc::from("")),
            tx,
        })
    }

    pub fn model(&self) -> MutexGuard<'_, StateModel> {
        self.model.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The profile name the metrics of the running batch are labelled with.
    pub fn set_profile(&self, name: &str) {
        *self.profile.lock().unwrap_or_else(PoisonError::into_inner) = Arc::from(name);
    }

    /// The shared ledger's link changed (PostgreSQL): metrics, the model's
    /// header line and an event.
    pub fn set_ledger_link(&self, online: bool, outbox_ops: u64) {
        self.metrics.set_ledger_status(online, outbox_ops);
        self.model().set_ledger(crate::state::LedgerLink { online, outbox_ops }, SystemTime::now());
        self.publish();
    }

    /// Takes one event into the model and the metrics.
    pub fn on_event(&self, ev: &Event) {
        let profile = Arc::clone(&self.profile.lock().unwrap_or_else(PoisonError::into_inner));
        self.metrics.observe(ev, &profile);
        self.model().apply(ev, Instant::now(), SystemTime::now());
    }

    /// Builds and publishes a snapshot now.
    pub fn publish(&self) -> Arc<Snapshot> {
        let now = Instant::now();
        let snap = {
            let mut m = self.model();
            m.trim(now);
            Arc::new(m.snapshot(now, SystemTime::now()))
        };
        self.metrics.set_readers(&snap);
        self.tx.send_replace(Arc::clone(&snap));
        snap
    }

    /// The latest published snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// Publishes every `TICK` until `stop` is set, on its own thread.
    pub fn start_ticker(self: &Arc<Self>, stop: Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<()> {
        let live = Arc::clone(self);
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                live.publish();
                std::thread::sleep(TICK);
            }
        })
    }
}
