//! A batch: one worker per reader, run until the target number of cards
//! reached a final state (or a fatal error), then a summary.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use card::transport::{CardReader, ReaderMonitor, TransportError};

use crate::handler::CardHandler;
use crate::recipe::{CardOutcome, Recipe};
use crate::worker::{self, Event};

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("station stopped: {0}")]
    Fatal(String),
    #[error("no readers")]
    NoReaders,
}

/// The figures of a finished batch.
#[derive(Debug, Clone)]
pub struct Summary {
    pub outcomes: Vec<CardOutcome>,
    pub elapsed: Duration,
    pub readers: usize,
}

impl Summary {
    pub fn passed(&self) -> usize {
        self.outcomes.iter().filter(|o| o.passed()).count()
    }

    pub fn failed(&self) -> usize {
        self.outcomes.len() - self.passed()
    }

    /// Cards that passed on their first attempt, over all cards.
    pub fn first_pass_yield(&self) -> f64 {
        if self.outcomes.is_empty() {
            return 0.0;
        }
        let first = self.outcomes.iter().filter(|o| o.passed() && o.attempt <= 1).count();
        first as f64 / self.outcomes.len() as f64
    }

    pub fn cards_per_hour(&self) -> f64 {
        let h = self.elapsed.as_secs_f64() / 3600.0;
        if h > 0.0 { self.outcomes.len() as f64 / h } else { 0.0 }
    }

    /// Failures grouped by (step, reason), most frequent first.
    pub fn failures(&self) -> Vec<((String, String), usize)> {
        let mut m: BTreeMap<(String, String), usize> = BTreeMap::new();
        for o in &self.outcomes {
            if let Err(f) = &o.result {
                *m.entry((f.step.name().to_string(), f.reason.clone())).or_default() += 1;
            }
        }
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }
}

/// Opens every reader the monitor lists.
pub fn open_all(monitor: &mut dyn ReaderMonitor) -> Result<Vec<Box<dyn CardReader>>, TransportError> {
    monitor.readers()?.iter().map(|id| monitor.open(id)).collect()
}

/// Runs workers on `readers` until `target` outcomes arrived; `on_event`
/// sees every event (progress printing, later the dashboard).
pub fn run(
    readers: Vec<Box<dyn CardReader>>,
    recipe: Arc<Recipe>,
    handler: Arc<dyn CardHandler>,
    target: usize,
    mut on_event: impl FnMut(&Event),
) -> Result<Summary, BatchError> {
    if readers.is_empty() {
        return Err(BatchError::NoReaders);
    }
    let n = readers.len();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = crossbeam_channel::unbounded();
    let started = Instant::now();
    let mut handles = Vec::with_capacity(n);
    for reader in readers {
        let (recipe, handler, tx, stop) = (Arc::clone(&recipe), Arc::clone(&handler), tx.clone(), Arc::clone(&stop));
        let name = format!("reader-{}", reader.id());
        let h = std::thread::Builder::new()
            .name(name)
            .spawn(move || worker::run(reader, recipe, handler, tx, stop))
            .map_err(|e| BatchError::Fatal(format!("cannot start a worker thread: {e}")))?;
        handles.push(h);
    }
    drop(tx);
    let mut outcomes = Vec::with_capacity(target);
    let mut fatal = None;
    while outcomes.len() < target {
        let Ok(ev) = rx.recv() else { break };
        on_event(&ev);
        match ev {
            Event::Outcome(o) => outcomes.push(o),
            Event::Fatal { reader, error } => {
                fatal = Some(format!("{reader}: {error}"));
                break;
            }
            _ => {}
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    // Events sent while stopping (lane changes) are not needed any more.
    if let Some(e) = fatal {
        return Err(BatchError::Fatal(e));
    }
    Ok(Summary { outcomes, elapsed, readers: n })
}
