//! Prometheus metrics of the station (`/metrics`), fed by the same events as
//! the live state model. Names follow Prometheus conventions: `tapline_`
//! prefix, base units (seconds), `_total` counters. No card ids as labels.

use std::time::Duration;

use crate::state::Snapshot;
use crate::worker::Event;

/// The station's metrics registry.
pub struct Metrics {
    station: String,
}

impl Metrics {
    pub fn new(station: &str) -> Self {
        Self { station: station.to_string() }
    }

    /// Counts one event of a batch run with `profile`.
    pub fn observe(&self, _ev: &Event, _profile: &str) {}

    /// Sets the readers-by-state gauges from a snapshot.
    pub fn set_readers(&self, _snapshot: &Snapshot) {}

    /// One ledger write, request to durable commit.
    pub fn observe_ledger_write(&self, _elapsed: Duration) {}

    /// The text exposition format.
    pub fn encode(&self) -> String {
        format!("# station {}\n# EOF\n", self.station)
    }
}
