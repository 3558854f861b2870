//! Card handling around a reader: who takes a finished card off and puts
//! the next one on. `CardHandler` is the seam; with no fixture an operator
//! does it by hand (`ManualHandler`); on emulated readers `EmuFeeder` plays
//! the card feeder and sorter: it bins each finished card and feeds the next
//! one from the emulated chip factory.

use std::collections::VecDeque;
use std::sync::Mutex;

use card::emu::EmuCard;
use card::transport::ReaderId;
use card::transport::emu::EmuBank;

/// Where a finished card goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bin {
    Pass,
    Fail,
}

/// Takes finished cards off readers and feeds new ones.
pub trait CardHandler: Send + Sync {
    /// The card on `reader` is finished: sort it into `bin`, and feed the
    /// next card if there is one.
    fn eject(&self, reader: &ReaderId, bin: Bin);
}

/// No fixture: the operator removes and inserts cards; the station waits.
#[derive(Debug, Default)]
pub struct ManualHandler;

impl CardHandler for ManualHandler {
    fn eject(&self, _reader: &ReaderId, _bin: Bin) {}
}

struct FeederState {
    queue: VecDeque<EmuCard>,
    bins: Vec<(Bin, EmuCard)>,
}

/// The emulated feeder/sorter over a bank of emulated readers.
pub struct EmuFeeder {
    bank: EmuBank,
    state: Mutex<FeederState>,
}

impl EmuFeeder {
    /// A feeder with `cards` waiting in its input hopper.
    pub fn new(bank: EmuBank, cards: Vec<EmuCard>) -> Self {
        Self { bank, state: Mutex::new(FeederState { queue: cards.into(), bins: Vec::new() }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FeederState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Puts a card on every empty reader.
    pub fn fill(&self) {
        let mut st = self.lock();
        for slot in self.bank.slots() {
            if !slot.is_occupied()
                && let Some(card) = st.queue.pop_front()
                && let Err(card) = slot.insert(card)
            {
                st.queue.push_front(*card);
            }
        }
    }

    /// Cards still in the hopper.
    pub fn remaining(&self) -> usize {
        self.lock().queue.len()
    }

    /// Everything sorted so far, in order.
    pub fn take_bins(&self) -> Vec<(Bin, EmuCard)> {
        std::mem::take(&mut self.lock().bins)
    }
}

impl CardHandler for EmuFeeder {
    fn eject(&self, reader: &ReaderId, bin: Bin) {
        let Some(slot) = self.bank.slot(reader) else {
            return;
        };
        let mut st = self.lock();
        if let Some(card) = slot.remove() {
            st.bins.push((bin, card));
        }
        if let Some(next) = st.queue.pop_front()
            && let Err(card) = slot.insert(next)
        {
            st.queue.push_front(*card);
        }
    }
}
