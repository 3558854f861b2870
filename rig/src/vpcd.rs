//! The vpcd bridge: emulated cards behind a real pcscd. This module owns
//! vpcd's wire protocol on the card's side (`VpcdCard`: one `EmuCard` on one
//! TCP connection to one vpcd slot); `feeder` owns the slots, the hopper and
//! the bins, `control` the operator's line protocol. Nothing here touches
//! PC/SC: pcscd and its clients only ever see a reader with a card in it.
//!
//! vpcd's protocol (vsmartcard `virtualsmartcard/src/vpcd/vpcd.c`): TCP, the
//! card connects to vpcd (which listens on all interfaces; we connect to
//! 127.0.0.1 only). Every message either way is a 2-byte big-endian length
//! and the payload. A 1-byte payload from vpcd is a control code: 0x00 power
//! off, 0x01 power on, 0x02 reset, 0x04 get ATR; only get ATR is answered
//! (with the ATR). A longer payload is a command APDU, answered with the
//! response APDU including SW1 SW2. Closing the socket is card removal.
//! vpcd serializes its traffic: it sends nothing while it waits for an
//! answer, and it never times out (a silent card blocks the reader, and the
//! PC/SC client's SCardTransmit, until the connection closes).

pub mod control;
pub mod feeder;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use card::emu::latency::{Cost, LatencyModel, scaled};
use card::emu::{EmuCard, Exchange};

/// vpcd's default port: the first slot of its stock reader.conf entry.
pub const DEFAULT_PORT_BASE: u16 = 35963;

/// pcsc-lite 1.9.9 runs at most 16 readers in one pcscd (PCSCLITE_MAX_READERS_CONTEXTS).
pub const MAX_READERS: usize = 16;

/// vpcd's control codes (`vpcd.h`).
pub const CTRL_OFF: u8 = 0x00;
pub const CTRL_ON: u8 = 0x01;
pub const CTRL_RESET: u8 = 0x02;
pub const CTRL_ATR: u8 = 0x04;

// Reader naming lives beside the PC/SC backend, where the station reads it.
pub use card::transport::pcsc::{port_of_reader, reader_name};

/// One message from vpcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    PowerOff,
    PowerOn,
    Reset,
    GetAtr,
    /// A control code vpcd does not define.
    UnknownControl(u8),
    Apdu(Vec<u8>),
}

impl Request {
    fn from_payload(payload: Vec<u8>) -> Self {
        match payload.as_slice() {
            [CTRL_OFF] => Self::PowerOff,
            [CTRL_ON] => Self::PowerOn,
            [CTRL_RESET] => Self::Reset,
            [CTRL_ATR] => Self::GetAtr,
            [other] => Self::UnknownControl(*other),
            _ => Self::Apdu(payload),
        }
    }
}

/// Reads one length-prefixed message; `None` when the peer closed the
/// connection between messages.
pub fn read_message(r: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut payload = vec![0u8; usize::from(u16::from_be_bytes(len))];
    r.read_exact(&mut payload)?;
    Ok(Some(payload))
}

/// Writes one length-prefixed message in a single write (vpcd reads the
/// length and the payload with two receives; one segment saves a round of
/// Nagle/delayed-ACK waiting).
pub fn write_message(w: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    let len = u16::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "vpcd message longer than 65535 bytes"))?;
    let mut buf = Vec::with_capacity(payload.len() + 2);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf)?;
    w.flush()
}

/// What serving one message from vpcd came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Served {
    /// A control message (answered when it was get ATR); the card stays.
    Control(Request),
    /// A command APDU, answered.
    Answered,
    /// vpcd closed the connection, or the connection broke (pcscd stopped,
    /// or the bridge shut the socket down to take the card out).
    Closed,
    /// The card left the field (its fault script pulled it) before
    /// answering: the connection is closed.
    Removed,
    /// The card did not answer the APDU. vpcd will wait for ever: the
    /// caller decides how long the card stays silent (`hold_silent`).
    Mute,
    /// The card browned out and reset itself before processing the APDU: it
    /// lost its session and did not answer; the connection is closed (vpcd
    /// has no way to report a reset other than the card leaving the field).
    Reset,
}

/// How a silent spell ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Silence {
    /// The whole timeout passed.
    TimedOut,
    /// The connection closed meanwhile.
    Closed,
}

/// One emulated card on one vpcd connection.
pub struct VpcdCard {
    stream: TcpStream,
    card: EmuCard,
    speed: f64,
    apdus: u64,
    modeled: Duration,
}

impl VpcdCard {
    /// Puts `card` on the vpcd connection `stream` (the card enters the
    /// field: it powers up). `speed` scales the card's modeled latency like
    /// the emulated transport does: 1.0 realistic, 0 instant.
    pub fn new(stream: TcpStream, mut card: EmuCard, speed: f64) -> Self {
        // Messages are small and strictly request/answer: without NODELAY
        // Nagle and delayed ACKs add up to 40 ms to an exchange. (Failing
        // to set it costs only time, so the card goes in regardless.)
        let _ = stream.set_nodelay(true);
        card.power_on();
        Self { stream, card, speed, apdus: 0, modeled: Duration::ZERO }
    }

    pub fn card(&self) -> &EmuCard {
        &self.card
    }

    /// Command APDUs answered or attempted on this connection.
    pub fn apdus(&self) -> u64 {
        self.apdus
    }

    /// Modeled card time on this connection, at speed 1.0.
    pub fn modeled_time(&self) -> Duration {
        self.modeled
    }

    /// A second handle on the connection, for shutting it down from another
    /// thread (the bridge takes a card out that way).
    pub fn stream_handle(&self) -> io::Result<TcpStream> {
        self.stream.try_clone()
    }

    /// Serves one message from vpcd. An I/O error on the connection is
    /// `Closed`: to vpcd and to the card, a broken connection is a removal.
    pub fn serve_one(&mut self) -> Served {
        // vpcd sends a message's length and its payload with two send()s,
        // and its socket has Nagle on: the payload waits for our ACK of the
        // length, which a delayed ACK holds up to 40 ms. Quick ACKs (reset
        // by the kernel now and then, so set before every read) take that
        // stall out of every exchange.
        let _ = socket2::SockRef::from(&self.stream).set_tcp_quickack(true);
        let payload = match read_message(&mut self.stream) {
            Ok(Some(p)) => p,
            Ok(None) | Err(_) => return Served::Closed,
        };
        match Request::from_payload(payload) {
            Request::GetAtr => match write_message(&mut self.stream, self.card.atr()) {
                Ok(()) => Served::Control(Request::GetAtr),
                Err(_) => Served::Closed,
            },
            Request::PowerOn => {
                self.card.power_on();
                Served::Control(Request::PowerOn)
            }
            Request::Reset => {
                self.card.power_on();
                Served::Control(Request::Reset)
            }
            Request::Apdu(apdu) => self.exchange(&apdu),
            other => Served::Control(other),
        }
    }

    fn exchange(&mut self, apdu: &[u8]) -> Served {
        self.apdus += 1;
        match self.card.process(apdu) {
            Exchange::Answer { response, latency } => {
                self.sleep_modeled(latency);
                match write_message(&mut self.stream, &response) {
                    Ok(()) => Served::Answered,
                    Err(_) => Served::Closed,
                }
            }
            Exchange::Removed { latency } => {
                self.sleep_modeled(latency);
                self.close();
                Served::Removed
            }
            Exchange::Reset => {
                // What the emulated transport charges for a brown-out.
                self.sleep_modeled(LatencyModel::JCOP4.duration(Cost::Small));
                self.card.power_on();
                self.close();
                Served::Reset
            }
            Exchange::Mute => Served::Mute,
        }
    }

    fn sleep_modeled(&mut self, modeled: Duration) {
        self.modeled += modeled;
        let d = scaled(modeled, self.speed);
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }

    /// Stays silent (vpcd is waiting for an answer) until `timeout` passes
    /// or the connection closes. vpcd itself never times out, so this is the
    /// reader's timeout: the caller closes the connection afterwards.
    pub fn hold_silent(&mut self, timeout: Duration) -> Silence {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 64];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Silence::TimedOut;
            }
            if self.stream.set_read_timeout(Some(left)).is_err() {
                return Silence::Closed;
            }
            match self.stream.read(&mut buf) {
                Ok(0) => return Silence::Closed,
                // vpcd sends nothing while it waits; drop whatever comes.
                Ok(_) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Silence::TimedOut;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Silence::Closed,
            }
        }
    }

    /// Closes the connection: to vpcd, the card left the field.
    pub fn close(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Takes the card back (the connection closes when dropped).
    pub fn into_card(self) -> EmuCard {
        self.card
    }
}

impl std::fmt::Debug for VpcdCard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VpcdCard({:?} via {:?})", self.card, self.stream.peer_addr().ok())
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use card::emu::factory::{ChipFactory, ChipKind};
    use card::emu::{CardFaults, TearPoint};

    use super::*;

    const SELECT_ISD: [u8; 13] = [0x00, 0xA4, 0x04, 0x00, 0x08, 0xA0, 0x00, 0x00, 0x01, 0x51, 0x00, 0x00, 0x00];
    const GET_CPLC: [u8; 5] = [0x80, 0xCA, 0x9F, 0x7F, 0x00];

    fn card(faults: CardFaults) -> EmuCard {
        ChipFactory::new(7).make(ChipKind::Genuine, faults)
    }

    /// An in-test vpcd: a listener the card connects to, and the accepted
    /// connection vpcd would hold.
    fn pair(card: EmuCard, speed: f64) -> (VpcdCard, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stream = TcpStream::connect(addr).expect("connect");
        let (vpcd, _) = listener.accept().expect("accept");
        vpcd.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        (VpcdCard::new(stream, card, speed), vpcd)
    }

    fn ask(vc: &mut VpcdCard, vpcd: &mut TcpStream, payload: &[u8]) -> (Served, Option<Vec<u8>>) {
        write_message(vpcd, payload).expect("send");
        let served = vc.serve_one();
        let answer = match &served {
            Served::Answered | Served::Control(Request::GetAtr) => read_message(vpcd).expect("read"),
            _ => None,
        };
        (served, answer)
    }

    #[test]
    fn answers_atr_power_and_apdus() {
        let c = card(CardFaults::default());
        let atr = c.atr().to_vec();
        let (mut vc, mut vpcd) = pair(c, 0.0);
        let (s, a) = ask(&mut vc, &mut vpcd, &[CTRL_ATR]);
        assert_eq!((s, a), (Served::Control(Request::GetAtr), Some(atr)));
        assert_eq!(ask(&mut vc, &mut vpcd, &[CTRL_ON]), (Served::Control(Request::PowerOn), None));
        assert_eq!(ask(&mut vc, &mut vpcd, &[CTRL_RESET]), (Served::Control(Request::Reset), None));
        assert_eq!(ask(&mut vc, &mut vpcd, &[CTRL_OFF]), (Served::Control(Request::PowerOff), None));
        assert_eq!(ask(&mut vc, &mut vpcd, &[0x09]), (Served::Control(Request::UnknownControl(9)), None));

        let (s, a) = ask(&mut vc, &mut vpcd, &SELECT_ISD);
        assert_eq!(s, Served::Answered);
        assert!(a.expect("answer").ends_with(&[0x90, 0x00]));
        let (_, a) = ask(&mut vc, &mut vpcd, &GET_CPLC);
        let a = a.expect("answer");
        assert_eq!(a.len(), 45 + 2, "CPLC: 9F7F 2A + 42 bytes, then SW");
        assert_eq!(&a[..3], &[0x9F, 0x7F, 0x2A]);
        assert_eq!(&a[45..], &[0x90, 0x00]);
        // Control messages are not APDUs; two APDUs at two small round trips.
        assert_eq!(vc.apdus(), 2);
        assert_eq!(vc.modeled_time(), LatencyModel::JCOP4.duration(Cost::Small) * 2);
    }

    #[test]
    fn sleeps_the_modeled_latency_scaled() {
        let (mut vc, mut vpcd) = pair(card(CardFaults::default()), 2.0);
        let t = Instant::now();
        let (s, _) = ask(&mut vc, &mut vpcd, &SELECT_ISD);
        assert_eq!(s, Served::Answered);
        let small = LatencyModel::JCOP4.duration(Cost::Small);
        assert!(t.elapsed() >= small * 2, "{:?} < 2 x {small:?}", t.elapsed());
        assert_eq!(vc.modeled_time(), small);
    }

    #[test]
    fn a_scripted_removal_closes_the_socket_and_keeps_the_card() {
        let faults = CardFaults { remove_at: Some((2, TearPoint::After)), ..CardFaults::default() };
        let (mut vc, mut vpcd) = pair(card(faults), 0.0);
        assert_eq!(ask(&mut vc, &mut vpcd, &SELECT_ISD).0, Served::Answered);
        assert_eq!(ask(&mut vc, &mut vpcd, &GET_CPLC).0, Served::Removed);
        assert_eq!(read_message(&mut vpcd).expect("clean close"), None, "vpcd sees the socket close");
        let card = vc.into_card();
        assert_eq!(card.view().apdus, 2);
    }

    #[test]
    fn a_brown_out_closes_the_socket_without_an_answer() {
        let faults = CardFaults { reset_at: Some(1), ..CardFaults::default() };
        let (mut vc, mut vpcd) = pair(card(faults), 0.0);
        assert_eq!(ask(&mut vc, &mut vpcd, &SELECT_ISD).0, Served::Reset);
        assert_eq!(read_message(&mut vpcd).expect("clean close"), None);
    }

    #[test]
    fn a_mute_card_stays_silent_until_the_timeout_or_the_close() {
        let faults = CardFaults { mute_from: Some(1), ..CardFaults::default() };
        let (mut vc, mut vpcd) = pair(card(faults), 0.0);
        assert_eq!(ask(&mut vc, &mut vpcd, &SELECT_ISD).0, Served::Mute);
        let t = Instant::now();
        assert_eq!(vc.hold_silent(Duration::from_millis(150)), Silence::TimedOut);
        assert!(t.elapsed() >= Duration::from_millis(150));
        vpcd.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
        assert!(read_message(&mut vpcd).is_err(), "nothing was sent");
        // Another thread shuts the connection down: the silence ends at once.
        let handle = vc.stream_handle().expect("clone");
        let t = Instant::now();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            handle.shutdown(Shutdown::Both).expect("shutdown");
        });
        assert_eq!(vc.hold_silent(Duration::from_secs(10)), Silence::Closed);
        assert!(t.elapsed() < Duration::from_secs(5));
        closer.join().expect("closer");
    }

    #[test]
    fn vpcd_closing_is_closed() {
        let (mut vc, vpcd) = pair(card(CardFaults::default()), 0.0);
        drop(vpcd);
        assert_eq!(vc.serve_one(), Served::Closed);
    }

    #[test]
    fn framing_round_trips_and_rejects_oversize() {
        let mut buf = Vec::new();
        write_message(&mut buf, &[1, 2, 3]).expect("write");
        assert_eq!(buf, [0, 3, 1, 2, 3]);
        assert_eq!(read_message(&mut buf.as_slice()).expect("read"), Some(vec![1, 2, 3]));
        assert_eq!(read_message(&mut [0u8; 0].as_slice()).expect("eof"), None);
        assert!(read_message(&mut [0u8, 5, 1].as_slice()).is_err(), "short payload");
        assert!(write_message(&mut Vec::new(), &vec![0; 70_000]).is_err());
    }

    #[test]
    fn reader_names_map_to_ports_and_back() {
        assert_eq!(reader_name(35963, 35963), "Tapline vpcd 35963 00 00");
        assert_eq!(reader_name(35963, 35964), "Tapline vpcd 35963 00 01");
        assert_eq!(reader_name(35963, 35966), "Tapline vpcd 35965 00 01");
        assert_eq!(reader_name(35963, 35967), "Tapline vpcd 35967 00 00");
        for port in 35963..35963 + 16 {
            assert_eq!(port_of_reader(&reader_name(35963, port)), Some(port));
        }
        assert_eq!(port_of_reader("Tapline vpcd 46100 00 01"), Some(46101));
        assert_eq!(port_of_reader("Virtual PCD 00 00"), None);
        assert_eq!(port_of_reader("Tapline vpcd 46100 00 02"), None);
        assert_eq!(port_of_reader("Tapline vpcd 46100 00"), None);
    }
}
