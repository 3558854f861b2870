//! The APDU trace of each reader while a plan runs: a `ReaderMonitor`
//! wrapper whose readers hand out transports that log every exchange
//! through `card::apdu::trace_command` / `trace_response` (headers and
//! lengths; data only of public commands, so no key or secret reaches a
//! report). Each reader keeps the last [`KEEP`] lines; the card handler
//! takes them when it bins a card.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use card::transport::{Atr, CardReader, ReaderId, ReaderMonitor, SlotState, Transport, TransportError};

/// Lines kept per reader: about the last 50 APDUs with their answers.
pub const KEEP: usize = 100;

/// Every reader's recent exchanges.
#[derive(Debug, Default)]
pub struct Traces {
    lines: Mutex<HashMap<ReaderId, VecDeque<String>>>,
    started: Mutex<Option<Instant>>,
}

impl Traces {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { lines: Mutex::default(), started: Mutex::new(Some(Instant::now())) })
    }

    fn push(&self, reader: &ReaderId, line: String) {
        let at = self.started.lock().unwrap_or_else(PoisonError::into_inner).map_or(Duration::ZERO, |s| s.elapsed());
        let mut m = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        let q = m.entry(reader.clone()).or_default();
        if q.len() >= KEEP {
            q.pop_front();
        }
        q.push_back(format!("{:>8.3}s {line}", at.as_secs_f64()));
    }

    /// Takes the reader's lines (the card on it is done).
    pub fn take(&self, reader: &ReaderId) -> Vec<String> {
        self.lines.lock().unwrap_or_else(PoisonError::into_inner).remove(reader).map(Vec::from).unwrap_or_default()
    }
}

/// A monitor whose readers trace.
pub struct TraceMonitor {
    inner: Box<dyn ReaderMonitor>,
    traces: Arc<Traces>,
}

impl TraceMonitor {
    pub fn new(inner: Box<dyn ReaderMonitor>, traces: Arc<Traces>) -> Self {
        Self { inner, traces }
    }
}

impl ReaderMonitor for TraceMonitor {
    fn readers(&mut self) -> Result<Vec<ReaderId>, TransportError> {
        self.inner.readers()
    }

    fn open(&mut self, id: &ReaderId) -> Result<Box<dyn CardReader>, TransportError> {
        Ok(Box::new(TraceReader { inner: self.inner.open(id)?, traces: Arc::clone(&self.traces) }))
    }

    fn cancel_waits(&self) {
        self.inner.cancel_waits();
    }
}

struct TraceReader {
    inner: Box<dyn CardReader>,
    traces: Arc<Traces>,
}

impl CardReader for TraceReader {
    fn id(&self) -> &ReaderId {
        self.inner.id()
    }

    fn wait_change(&mut self, known: &SlotState, timeout: Duration) -> Result<SlotState, TransportError> {
        self.inner.wait_change(known, timeout)
    }

    fn connect(&mut self) -> Result<Box<dyn Transport + Send + '_>, TransportError> {
        let id = self.inner.id().clone();
        let traces = Arc::clone(&self.traces);
        match self.inner.connect() {
            Ok(t) => {
                traces.push(&id, format!("-- connected, ATR {}", hex::encode_upper(&t.atr().0)));
                Ok(Box::new(TraceTransport { inner: t, id, traces }))
            }
            Err(e) => {
                traces.push(&id, format!("-- connect failed: {e}"));
                Err(e)
            }
        }
    }
}

struct TraceTransport<'a> {
    inner: Box<dyn Transport + Send + 'a>,
    id: ReaderId,
    traces: Arc<Traces>,
}

impl Transport for TraceTransport<'_> {
    fn transmit_raw(&mut self, apdu: &[u8]) -> Result<Vec<u8>, TransportError> {
        self.traces.push(&self.id, format!(">> {}", card::apdu::trace_command(apdu)));
        let r = self.inner.transmit_raw(apdu);
        match &r {
            Ok(resp) => self.traces.push(&self.id, format!("<< {}", card::apdu::trace_response(resp))),
            Err(e) => self.traces.push(&self.id, format!("!! {e}")),
        }
        r
    }

    fn atr(&self) -> &Atr {
        self.inner.atr()
    }

    fn reset(&mut self) -> Result<(), TransportError> {
        self.traces.push(&self.id, "-- reset".into());
        self.inner.reset()
    }
}
