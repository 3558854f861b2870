//! Emulated readers: a bank of slots that hold `EmuCard`s, with the
//! `CardReader`, `ReaderMonitor` and `Transport` seams implemented over them.
//! The card computes its answer and its modeled latency; the transport
//! sleeps that latency scaled by the bank's speed factor, outside any lock,
//! so readers run truly in parallel.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Atr, CardReader, ReaderId, ReaderMonitor, SlotState, Transport, TransportError};
use crate::emu::latency::scaled;
use crate::emu::{EmuCard, Exchange};

#[derive(Default)]
struct SlotInner {
    card: Option<EmuCard>,
    /// A card that left the field on its own (scripted removal), waiting
    /// for whoever handles the slot to collect it.
    pulled: Option<EmuCard>,
    /// Bumped on every insertion and removal, so a transport notices that
    /// its card went away even if another arrived since.
    generation: u64,
    /// The reader itself is gone (unplugged, its service restarting, its
    /// power cut): every call on it fails as `ReaderUnavailable`.
    unplugged: bool,
}

/// One emulated reader slot.
pub struct EmuSlot {
    id: ReaderId,
    inner: Mutex<SlotInner>,
    changed: Condvar,
    speed: f64,
    /// How long a mute card keeps the reader waiting (the reader's timeout).
    mute_timeout: Duration,
    modeled: Mutex<Duration>,
}

impl EmuSlot {
    fn lock(&self) -> MutexGuard<'_, SlotInner> {
        // A poisoned lock only means a panicking test thread held it; the
        // slot's data is still consistent (every update is a single move).
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn id(&self) -> &ReaderId {
        &self.id
    }

    /// Puts a card in the slot; gives it back if the slot is occupied.
    pub fn insert(&self, mut card: EmuCard) -> Result<(), Box<EmuCard>> {
        let mut g = self.lock();
        if g.card.is_some() {
            return Err(Box::new(card));
        }
        card.power_on();
        g.card = Some(card);
        g.generation += 1;
        self.changed.notify_all();
        Ok(())
    }

    /// Takes the card out of the slot (or the one that left on its own).
    pub fn remove(&self) -> Option<EmuCard> {
        let mut g = self.lock();
        let card = g.card.take().or_else(|| g.pulled.take());
        g.generation += 1;
        self.changed.notify_all();
        card
    }

    /// Reads the card in the slot (or the one that left on its own)
    /// without taking it out: no power cycle, connected transports stay
    /// valid. For tests that watch a card's state between APDUs.
    pub fn inspect<R>(&self, f: impl FnOnce(&EmuCard) -> R) -> Option<R> {
        let g = self.lock();
        g.card.as_ref().or(g.pulled.as_ref()).map(f)
    }

    pub fn is_occupied(&self) -> bool {
        self.lock().card.is_some()
    }

    /// The reader goes away (USB unplug, reader power lost) with whatever
    /// card is in it: the card loses its field (RAM cleared, session gone),
    /// connected transports are dead, and every call fails as
    /// `ReaderUnavailable` until [`EmuSlot::plug`].
    pub fn unplug(&self) {
        let mut g = self.lock();
        g.unplugged = true;
        g.generation += 1;
        if let Some(card) = g.card.as_mut() {
            card.power_on();
        }
        self.changed.notify_all();
    }

    /// The reader is back; a card still in it shows as newly inserted, as a
    /// re-enumerated reader reports it.
    pub fn plug(&self) {
        let mut g = self.lock();
        g.unplugged = false;
        g.generation += 1;
        self.changed.notify_all();
    }

    pub fn is_unplugged(&self) -> bool {
        self.lock().unplugged
    }

    /// Modeled card time spent in this slot so far (at speed 1.0).
    pub fn modeled_time(&self) -> Duration {
        *self.modeled.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A set of emulated readers.
#[derive(Clone)]
pub struct EmuBank {
    slots: Arc<Vec<Arc<EmuSlot>>>,
}

impl EmuBank {
    /// `n` readers named `emu-00`, `emu-01`, ...; `speed` scales the cards'
    /// modeled latency (1.0 realistic, 0 instant).
    pub fn new(n: usize, speed: f64, mute_timeout: Duration) -> Self {
        let slots = (0..n)
            .map(|i| {
                Arc::new(EmuSlot {
                    id: ReaderId(format!("emu-{i:02}")),
                    inner: Mutex::new(SlotInner::default()),
                    changed: Condvar::new(),
                    speed,
                    mute_timeout,
                    modeled: Mutex::new(Duration::ZERO),
                })
            })
            .collect();
        Self { slots: Arc::new(slots) }
    }

    pub fn slots(&self) -> &[Arc<EmuSlot>] {
        &self.slots
    }

    pub fn slot(&self, id: &ReaderId) -> Option<&Arc<EmuSlot>> {
        self.slots.iter().find(|s| &s.id == id)
    }

    pub fn reader(&self, index: usize) -> Option<EmuReader> {
        self.slots.get(index).map(|s| EmuReader { slot: Arc::clone(s) })
    }
}

impl ReaderMonitor for EmuBank {
    fn readers(&mut self) -> Result<Vec<ReaderId>, TransportError> {
        Ok(self.slots.iter().map(|s| s.id.clone()).collect())
    }

    fn open(&mut self, id: &ReaderId) -> Result<Box<dyn CardReader>, TransportError> {
        let slot = self.slot(id).ok_or_else(|| TransportError::ReaderUnavailable(id.to_string()))?;
        Ok(Box::new(EmuReader { slot: Arc::clone(slot) }))
    }
}

/// A worker's handle on one emulated slot.
pub struct EmuReader {
    slot: Arc<EmuSlot>,
}

impl CardReader for EmuReader {
    fn id(&self) -> &ReaderId {
        &self.slot.id
    }

    fn wait_change(&mut self, known: &SlotState, timeout: Duration) -> Result<SlotState, TransportError> {
        let deadline = Instant::now() + timeout;
        let mut g = self.slot.lock();
        loop {
            if g.unplugged {
                return Err(TransportError::ReaderUnavailable(self.slot.id.to_string()));
            }
            let now = match &g.card {
                Some(c) => SlotState::Present { atr: Atr(c.atr().to_vec()), insertion: g.generation },
                None => SlotState::Empty,
            };
            if &now != known {
                return Ok(now);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(now);
            }
            g = self.slot.changed.wait_timeout(g, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
    }

    fn connect(&mut self) -> Result<Box<dyn Transport + Send + '_>, TransportError> {
        let mut g = self.slot.lock();
        if g.unplugged {
            return Err(TransportError::ReaderUnavailable(self.slot.id.to_string()));
        }
        let generation = g.generation;
        let card = g.card.as_mut().ok_or(TransportError::NoCard)?;
        card.power_on();
        let atr = Atr(card.atr().to_vec());
        drop(g);
        Ok(Box::new(EmuTransport { slot: Arc::clone(&self.slot), generation, atr }))
    }
}

/// A connection to the card in an emulated slot.
pub struct EmuTransport {
    slot: Arc<EmuSlot>,
    generation: u64,
    atr: Atr,
}

impl EmuTransport {
    fn sleep_modeled(&self, modeled: Duration) {
        *self.slot.modeled.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += modeled;
        let d = scaled(modeled, self.slot.speed);
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }
}

impl Transport for EmuTransport {
    fn transmit_raw(&mut self, apdu: &[u8]) -> Result<Vec<u8>, TransportError> {
        let exchange = {
            let mut g = self.slot.lock();
            if g.unplugged {
                return Err(TransportError::ReaderUnavailable(self.slot.id.to_string()));
            }
            if g.generation != self.generation {
                return Err(TransportError::CardRemoved);
            }
            let card = g.card.as_mut().ok_or(TransportError::CardRemoved)?;
            let ex = card.process(apdu);
            if matches!(ex, Exchange::Removed { .. }) {
                g.pulled = g.card.take();
                g.generation += 1;
                self.slot.changed.notify_all();
            }
            ex
        };
        match exchange {
            Exchange::Answer { response, latency } => {
                self.sleep_modeled(latency);
                Ok(response)
            }
            Exchange::Removed { latency } => {
                self.sleep_modeled(latency);
                Err(TransportError::CardRemoved)
            }
            Exchange::Reset => {
                self.sleep_modeled(crate::emu::latency::LatencyModel::JCOP4.duration(crate::emu::latency::Cost::Small));
                Err(TransportError::CardReset)
            }
            Exchange::Mute => {
                self.sleep_modeled(self.slot.mute_timeout);
                Err(TransportError::Timeout(self.slot.mute_timeout))
            }
        }
    }

    fn atr(&self) -> &Atr {
        &self.atr
    }

    fn reset(&mut self) -> Result<(), TransportError> {
        let mut g = self.slot.lock();
        if g.unplugged {
            return Err(TransportError::ReaderUnavailable(self.slot.id.to_string()));
        }
        if g.generation != self.generation {
            return Err(TransportError::CardRemoved);
        }
        let card = g.card.as_mut().ok_or(TransportError::CardRemoved)?;
        card.power_on();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emu::CardFaults;
    use crate::emu::factory::{ChipFactory, ChipKind};

    #[test]
    fn an_unplugged_reader_fails_every_call_and_shows_its_card_anew_when_back() {
        let bank = EmuBank::new(1, 0.0, Duration::from_millis(10));
        let slot = Arc::clone(&bank.slots()[0]);
        slot.insert(ChipFactory::new(1).make(ChipKind::Genuine, CardFaults::default())).expect("empty slot");
        let mut reader = bank.reader(0).expect("reader");
        let before = reader.wait_change(&SlotState::Empty, Duration::ZERO).expect("state");
        {
            let mut t = reader.connect().expect("connect");
            slot.unplug();
            assert!(matches!(t.transmit_raw(&[0, 0xA4, 4, 0]), Err(TransportError::ReaderUnavailable(_))));
        }
        assert!(matches!(reader.wait_change(&before, Duration::ZERO), Err(TransportError::ReaderUnavailable(_))));
        assert!(matches!(reader.connect().err(), Some(TransportError::ReaderUnavailable(_))));
        slot.plug();
        let after = reader.wait_change(&before, Duration::ZERO).expect("back");
        assert!(matches!(after, SlotState::Present { .. }) && after != before, "{after:?}");
        let mut t = reader.connect().expect("connect again");
        assert!(t.transmit_raw(&[0, 0xA4, 4, 0]).is_ok());
    }
}
