//! Card handling around a reader: who takes a finished card off and puts
//! the next one on. `CardHandler` is the seam; with no fixture an operator
//! does it by hand (`ManualHandler`); on emulated readers `EmuFeeder` plays
//! the card feeder and sorter: it bins each finished card and feeds the next
//! one from the emulated chip factory. A serial fixture's feeder
//! (`fixture::serial::SerialFeeder`) is a `CardHandler` too, and brings its
//! power relays along (`CardHandler::power`).

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

    /// Like `eject`, but says when the fixture could not do it; the worker
    /// then parks the reader and tries again until it can. Handlers that
    /// cannot tell (the operator, the rig's socket) keep the default.
    fn try_eject(&self, reader: &ReaderId, bin: Bin) -> Result<(), crate::fixture::FixtureError> {
        self.eject(reader, bin);
        Ok(())
    }

    /// The power relays of the readers, if the fixture has them: the worker
    /// power-cycles a reader that stopped answering.
    fn power(&self) -> Option<&dyn crate::fixture::PowerSwitch> {
        None
    }
}

/// No fixture: the operator removes and inserts cards; the station waits.
#[derive(Debug, Default)]
pub struct ManualHandler;

impl CardHandler for ManualHandler {
    fn eject(&self, _reader: &ReaderId, _bin: Bin) {}
}

struct FeederState {
    queue: VecDeque<EmuCard>,
    /// Where cards come from when the queue is empty (an endless hopper).
    supply: Option<Box<dyn Iterator<Item = EmuCard> + Send>>,
    /// Sorted cards are kept for tests; a long-running daemon drops them.
    keep_bins: bool,
    bins: Vec<(Bin, EmuCard)>,
}

impl FeederState {
    fn next(&mut self) -> Option<EmuCard> {
        self.queue.pop_front().or_else(|| self.supply.as_mut().and_then(Iterator::next))
    }
}

/// The emulated feeder/sorter over a bank of emulated readers.
pub struct EmuFeeder {
    bank: EmuBank,
    state: Mutex<FeederState>,
}

impl EmuFeeder {
    /// A feeder with `cards` waiting in its input hopper.
    pub fn new(bank: EmuBank, cards: Vec<EmuCard>) -> Self {
        Self {
            bank,
            state: Mutex::new(FeederState { queue: cards.into(), supply: None, keep_bins: true, bins: Vec::new() }),
        }
    }

    /// A feeder with an endless hopper; sorted cards are dropped.
    pub fn endless(bank: EmuBank, supply: Box<dyn Iterator<Item = EmuCard> + Send>) -> Self {
        Self {
            bank,
            state: Mutex::new(FeederState {
                queue: VecDeque::new(),
                supply: Some(supply),
                keep_bins: false,
                bins: Vec::new(),
            }),
        }
    }

    /// Stops feeding: the hopper is emptied (cards on readers stay).
    pub fn stop_feeding(&self) {
        let mut st = self.lock();
        st.queue.clear();
        st.supply = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FeederState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Puts a card on every empty reader.
    pub fn fill(&self) {
        let mut st = self.lock();
        for slot in self.bank.slots() {
            if !slot.is_occupied()
                && let Some(card) = st.next()
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
        if let Some(card) = slot.remove()
            && st.keep_bins
        {
            st.bins.push((bin, card));
        }
        if let Some(next) = st.next()
            && let Err(card) = slot.insert(next)
        {
            st.queue.push_front(*card);
        }
    }
}

/// The rig's emulated feeder for cards behind a real pcscd (`rig vpcd`,
/// docs/real-readers.md): the station ejects a finished card over the rig's
/// loopback control socket, and the rig inserts the next one. A feeder that
/// does not answer is logged and the station keeps running; the card then
/// simply stays on its reader until someone removes it.
pub struct RigFeeder {
    addr: std::net::SocketAddr,
    conn: Mutex<Option<std::io::BufReader<std::net::TcpStream>>>,
}

/// How long the station waits for the rig to answer one command.
const RIG_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl RigFeeder {
    pub fn new(addr: std::net::SocketAddr) -> Self {
        Self { addr, conn: Mutex::new(None) }
    }

    /// Sends one command line and reads the one-line reply.
    fn command(&self, line: &str) -> std::io::Result<String> {
        use std::io::{BufRead, Write};
        let mut guard = self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for attempt in 0..2 {
            if guard.is_none() {
                let s = std::net::TcpStream::connect_timeout(&self.addr, RIG_TIMEOUT)?;
                s.set_read_timeout(Some(RIG_TIMEOUT))?;
                *guard = Some(std::io::BufReader::new(s));
            }
            let Some(conn) = guard.as_mut() else { continue };
            let sent = conn.get_mut().write_all(format!("{line}\n").as_bytes());
            let mut reply = String::new();
            match sent.and_then(|()| conn.read_line(&mut reply)) {
                Ok(n) if n > 0 => return Ok(reply.trim_end().to_string()),
                // A closed or broken connection: reconnect once.
                _ if attempt == 0 => *guard = None,
                Ok(_) => {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "rig closed the connection"));
                }
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other("rig did not answer"))
    }
}

impl CardHandler for RigFeeder {
    fn eject(&self, reader: &ReaderId, bin: Bin) {
        let Some(port) = card::transport::pcsc::port_of_reader(reader.as_str()) else {
            tracing::warn!(reader = %reader, "not a rig vpcd reader; leaving the card for the operator");
            return;
        };
        let bin = match bin {
            Bin::Pass => "PASS",
            Bin::Fail => "FAIL",
        };
        match self.command(&format!("EJECT {port} {bin}")) {
            Ok(r) if r.starts_with("OK") => {}
            Ok(r) => tracing::warn!(reader = %reader, reply = %r, "rig refused EJECT"),
            Err(e) => tracing::warn!(reader = %reader, error = %e, "rig feeder unreachable"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rig_feeder_sends_eject_lines_and_survives_a_dead_rig() {
        use std::io::{BufRead, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().expect("accept");
            let mut r = std::io::BufReader::new(s.try_clone().expect("clone"));
            let mut lines = Vec::new();
            for _ in 0..2 {
                let mut l = String::new();
                r.read_line(&mut l).expect("line");
                lines.push(l.trim_end().to_string());
                (&s).write_all(b"OK\n").expect("reply");
            }
            lines
        });
        let feeder = RigFeeder::new(addr);
        feeder.eject(&ReaderId("Tapline vpcd 35963 00 01".into()), Bin::Pass);
        feeder.eject(&ReaderId("Tapline vpcd 35963 00 00".into()), Bin::Fail);
        assert_eq!(server.join().expect("server"), ["EJECT 35964 PASS", "EJECT 35963 FAIL"]);
        // The rig is gone now: eject logs and returns.
        feeder.eject(&ReaderId("Tapline vpcd 35963 00 00".into()), Bin::Fail);
    }
}
