//! The PC/SC backend against a REAL pcscd with vpcd virtual readers: card
//! emulators (the real `card::emu` model) are put into vpcd's readers over
//! TCP by a small vpcd card client in this file, and the host side talks
//! to them only through `card::transport::pcsc`, as it would to real
//! readers.
//!
//! Needs: a running pcscd whose reader configuration has a vpcd entry
//! `FRIENDLYNAME "Tapline vpcd <P>"` on channel P, so that readers
//! `Tapline vpcd <P> 00 00` (port P) and `Tapline vpcd <P> 00 01` (port
//! P+1) exist: `scripts/pcscd-vpcd.sh start 2 <P>` starts one
//! (scripts/test.sh does so before the tests). P is read from
//! `TAPLINE_VPCD_PORT` (default 35963); a pcscd in the script's private
//! mode is reached with the same `PCSCLITE_CSOCK_NAME` (pcsc-lite reads
//! it). Without such a pcscd every test here fails and says so.
//!
//! The tests share the two readers, so they run one at a time (a lock),
//! and leave pcscd's presence poll (400 ms) time to notice every removal
//! before the next insertion on the same port.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use card::emu::factory::{ChipFactory, ChipKind, DEFAULT_KEY_VERSION};
use card::emu::{CardFaults, EmuCard, Exchange, TearPoint};
use card::gp::keys::StaticKeys;
use card::gp::scp03::SecurityLevel;
use card::gp::session::{GpSession, KeyRing, KeySource, read_cplc, select_isd};
use card::gp::{ISD_AID, StatusScope};
use card::transport::pcsc::{PcscMonitor, PcscReader, ReaderFilter, Sharing};
use card::transport::{CardReader, ReaderId, ReaderMonitor, SlotState, TransportError};

/// How long pcscd may take to see an insertion or removal (400 ms poll,
/// power-up, generous margin for a loaded CI machine).
const SEEN_WITHIN: Duration = Duration::from_secs(5);
/// Between a removal and the next insertion on one port (see the brief:
/// pcscd can miss a card re-inserted before its next poll).
const REINSERT_GAP: Duration = Duration::from_millis(1200);

// ---------------------------------------------------------------------------
// The rig: one test at a time, the vpcd ports, the readers

struct Shared {
    /// When a card last left a vpcd port (any port of the two; one
    /// timestamp is enough when the tests run one at a time). `None` until
    /// the first removal here: an earlier test program may just have
    /// removed one, so the first insertion waits the whole gap.
    last_removal: Option<Instant>,
}

static LOCK: Mutex<Shared> = Mutex::new(Shared { last_removal: None });

fn port_base() -> u16 {
    match std::env::var("TAPLINE_VPCD_PORT") {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| panic!("TAPLINE_VPCD_PORT={v:?} is not a port number")),
        Err(_) => 35963,
    }
}

fn reader_name(port: u16) -> ReaderId {
    let base = port_base();
    ReaderId(format!("Tapline vpcd {base} 00 {:02}", port - base))
}

struct Rig {
    guard: MutexGuard<'static, Shared>,
    monitor: PcscMonitor,
    port: u16,
}

impl Rig {
    /// Takes the lock, finds pcscd and the vpcd readers (or fails saying
    /// what to start), and waits until the first reader is empty.
    fn new() -> Self {
        let guard = LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let base = port_base();
        let mut monitor = PcscMonitor::new(ReaderFilter::all(), Sharing::Shared).unwrap_or_else(|e| {
            let e = std::error::Error::source(&e).map_or(e.to_string(), |why| format!("{e}: {why}"));
            panic!(
                "no pcscd to talk to ({e}): these tests need a pcscd with vpcd readers on ports {base} and {}; \
                 start one with `scripts/pcscd-vpcd.sh start 2 {base}` (scripts/test.sh does this), set \
                 TAPLINE_VPCD_PORT to its port base, and in the script's private mode export the same \
                 PCSCLITE_CSOCK_NAME",
                base + 1
            )
        });
        let readers = monitor.readers().expect("list readers");
        for port in [base, base + 1] {
            assert!(
                readers.contains(&reader_name(port)),
                "pcscd runs but has no reader {:?} (vpcd port {port}); readers: {readers:?}. Start one with \
                 `scripts/pcscd-vpcd.sh start 2 {base}`, or set TAPLINE_VPCD_PORT to the port base of the \
                 running one",
                reader_name(port).as_str()
            );
        }
        let mut rig = Self { guard, monitor, port: base };
        let mut reader = rig.reader(Sharing::Shared);
        let state = wait_for(&mut reader, SlotState::Empty, |s| *s == SlotState::Empty);
        assert_eq!(state, SlotState::Empty, "reader {} still holds a card from someone else", reader.id());
        rig
    }

    fn reader(&mut self, sharing: Sharing) -> PcscReader {
        let id = reader_name(self.port);
        if sharing == Sharing::Shared {
            return self.monitor.open_reader(&id).expect("open reader");
        }
        PcscMonitor::new(ReaderFilter::all(), sharing).expect("monitor").open_reader(&id).expect("open reader")
    }

    /// Puts `card` into the reader on `port`, leaving pcscd time to have
    /// seen the last removal.
    fn insert(&mut self, port: u16, card: EmuCard) -> VpcdCard {
        let since = self.guard.last_removal.map_or(Duration::ZERO, |t| t.elapsed());
        std::thread::sleep(REINSERT_GAP.saturating_sub(since));
        VpcdCard::insert(port, card)
    }

    fn remove(&mut self, card: VpcdCard) -> EmuCard {
        let card = card.remove();
        self.guard.last_removal = Some(Instant::now());
        card
    }

    /// Records a removal the card made itself (a scripted tear).
    fn removed_by_card(&mut self) {
        self.guard.last_removal = Some(Instant::now());
    }
}

fn new_card(faults: CardFaults) -> EmuCard {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    ChipFactory::new(seed).make(ChipKind::Genuine, faults)
}

/// Waits (in short steps) until `done` holds or [`SEEN_WITHIN`] passes;
/// returns the last state.
fn wait_for(reader: &mut dyn CardReader, from: SlotState, done: impl Fn(&SlotState) -> bool) -> SlotState {
    let deadline = Instant::now() + SEEN_WITHIN;
    let mut state = from;
    loop {
        state = reader.wait_change(&state, Duration::from_millis(500)).expect("wait_change");
        if done(&state) || Instant::now() >= deadline {
            return state;
        }
    }
}

fn insertion(s: &SlotState) -> u64 {
    match s {
        SlotState::Present { insertion, .. } => *insertion,
        SlotState::Empty => panic!("no card in the reader"),
    }
}

fn gp_default_ring() -> KeyRing {
    KeyRing::new().with(DEFAULT_KEY_VERSION, KeySource::Static(StaticKeys::gp_default()))
}

// ---------------------------------------------------------------------------
// A vpcd card client (vsmartcard's protocol: 2-byte big-endian length, then
// the payload; a 1-byte payload is a control code; closing is removal)

struct VpcdCard {
    stream: TcpStream,
    serving: JoinHandle<EmuCard>,
    apdus: Arc<Mutex<Vec<Vec<u8>>>>,
}

const VPCD_POWER_OFF: u8 = 0x00;
const VPCD_POWER_ON: u8 = 0x01;
const VPCD_RESET: u8 = 0x02;
const VPCD_GET_ATR: u8 = 0x04;

impl VpcdCard {
    fn insert(port: u16, card: EmuCard) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("vpcd does not listen on 127.0.0.1:{port} ({e}); is pcscd running with vpcd?"));
        stream.set_nodelay(true).expect("nodelay");
        let apdus = Arc::new(Mutex::new(Vec::new()));
        let serving = {
            let stream = stream.try_clone().expect("clone socket");
            let apdus = Arc::clone(&apdus);
            std::thread::spawn(move || serve(stream, card, &apdus))
        };
        Self { stream, serving, apdus }
    }

    /// Takes the card out (closes the connection) and gives it back.
    fn remove(self) -> EmuCard {
        let _ = self.stream.shutdown(Shutdown::Both);
        self.serving.join().expect("vpcd card thread")
    }

    fn apdus(&self) -> Vec<Vec<u8>> {
        self.apdus.lock().expect("apdu log").clone()
    }
}

fn read_message(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).ok()?;
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut msg).ok()?;
    Some(msg)
}

fn write_message(stream: &mut TcpStream, payload: &[u8]) -> bool {
    let len = u16::try_from(payload.len()).expect("vpcd messages are at most 64 KiB");
    stream.write_all(&[len.to_be_bytes().as_slice(), payload].concat()).is_ok()
}

/// Answers vpcd until it closes the connection, the test removes the
/// card, or the card's fault script pulls it out of the field.
fn serve(mut stream: TcpStream, mut card: EmuCard, apdus: &Mutex<Vec<Vec<u8>>>) -> EmuCard {
    while let Some(msg) = read_message(&mut stream) {
        match msg.as_slice() {
            [VPCD_POWER_ON] | [VPCD_RESET] => card.power_on(),
            [VPCD_POWER_OFF] => {}
            [VPCD_GET_ATR] => {
                if !write_message(&mut stream, card.atr()) {
                    break;
                }
            }
            [_] => {}
            apdu => {
                apdus.lock().expect("apdu log").push(apdu.to_vec());
                match card.process(apdu) {
                    Exchange::Answer { response, .. } => {
                        if !write_message(&mut stream, &response) {
                            break;
                        }
                    }
                    // The card left the field (or lost power) mid-APDU:
                    // the connection closes, which is removal to vpcd.
                    Exchange::Removed { .. } | Exchange::Reset => break,
                    Exchange::Mute => {}
                }
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    card
}

// ---------------------------------------------------------------------------
// The tests

#[test]
fn readers_are_listed_by_their_pcsc_names_and_filtered() {
    let mut rig = Rig::new();
    let base = port_base();
    let all = rig.monitor.readers().expect("readers");
    assert!(all.contains(&reader_name(base)) && all.contains(&reader_name(base + 1)), "{all:?}");
    // Ids are the PC/SC names and stay the same from one listing to the next.
    assert_eq!(rig.monitor.readers().expect("readers"), all);

    let mut only_first =
        PcscMonitor::new(ReaderFilter::new([format!("tapline VPCD {base} *")], ["* 00 01"]), Sharing::Shared)
            .expect("monitor");
    assert_eq!(only_first.readers().expect("readers"), [reader_name(base)]);
    let mut nothing =
        PcscMonitor::new(ReaderFilter::new(["no such reader*"], Vec::<String>::new()), Sharing::Shared).expect("m");
    assert_eq!(nothing.readers().expect("readers"), Vec::<ReaderId>::new());
    match only_first.open(&reader_name(base + 1)) {
        Err(TransportError::ReaderUnavailable(name)) => assert_eq!(name, reader_name(base + 1).as_str()),
        other => panic!("opening a filtered-out reader: {:?}", other.map(|r| r.id().clone())),
    }

    // Nothing changes: the wait runs out and returns the same list.
    let started = Instant::now();
    let again = rig.monitor.wait_readers_change(Duration::from_millis(1500)).expect("wait readers");
    assert_eq!(again, all);
    assert!(started.elapsed() >= Duration::from_millis(1400), "returned early: {:?}", started.elapsed());
}

#[test]
fn insertion_and_removal_are_seen_with_the_emulators_atr() {
    let mut rig = Rig::new();
    let mut reader = rig.reader(Sharing::Shared);
    assert_eq!(reader.id(), &reader_name(rig.port));
    let card = new_card(CardFaults::default());
    let atr = card.atr().to_vec();

    // The second slot stays empty while the first one gets the card.
    let mut other = rig.monitor.open_reader(&reader_name(rig.port + 1)).expect("second reader");
    let inserted = rig.insert(rig.port, card);
    let state = wait_for(&mut reader, SlotState::Empty, |s| *s != SlotState::Empty);
    match &state {
        SlotState::Present { atr: seen, insertion } => {
            assert_eq!(seen.0, atr, "the ATR pcscd reports is the emulator's");
            assert!(*insertion >= 1);
        }
        SlotState::Empty => panic!("pcscd did not see the card within {SEEN_WITHIN:?}"),
    }
    assert_eq!(other.wait_change(&SlotState::Empty, Duration::ZERO).expect("other"), SlotState::Empty);

    // Nothing happens: the wait times out with the same state.
    let started = Instant::now();
    assert_eq!(reader.wait_change(&state, Duration::from_millis(700)).expect("wait"), state);
    assert!(started.elapsed() >= Duration::from_millis(650));

    let card = rig.remove(inserted);
    assert_eq!(wait_for(&mut reader, state, |s| *s == SlotState::Empty), SlotState::Empty);
    drop(card);
}

#[test]
fn gp_session_and_get_status_through_pcsc() {
    let mut rig = Rig::new();
    let mut reader = rig.reader(Sharing::Shared);
    let card = new_card(CardFaults::default());
    let card_id = card.id();
    let atr = card.atr().to_vec();
    let inserted = rig.insert(rig.port, card);
    let state = wait_for(&mut reader, SlotState::Empty, |s| *s != SlotState::Empty);
    assert!(matches!(state, SlotState::Present { .. }));
    {
        let mut t = reader.connect().expect("connect");
        assert_eq!(t.atr().0, atr);
        select_isd(&mut *t).expect("select ISD");
        assert_eq!(read_cplc(&mut *t).expect("CPLC").card_id(), card_id);

        let mut session = GpSession::open(&mut *t, &gp_default_ring(), 0, SecurityLevel::CMacCDecRMac)
            .expect("SCP03 session with the default keys");
        assert_eq!(session.key_version(), DEFAULT_KEY_VERSION);
        let isd = session.get_status(StatusScope::IssuerSecurityDomain).expect("GET STATUS");
        assert_eq!(isd.len(), 1);
        assert_eq!(isd[0].aid, ISD_AID);
        assert!(session.get_status(StatusScope::Applications).is_ok());

        // A warm reset ends the session on the card and keeps the card.
        t.reset().expect("reset");
        assert_eq!(t.atr().0, atr);
        let mut session =
            GpSession::open(&mut *t, &gp_default_ring(), 0, SecurityLevel::CMac).expect("a new session after reset");
        assert_eq!(session.get_status(StatusScope::IssuerSecurityDomain).expect("GET STATUS").len(), 1);
    }
    let log = inserted.apdus();
    assert!(log.iter().any(|a| a.starts_with(&[0x80, 0x50])), "INITIALIZE UPDATE went through vpcd");
    assert!(log.iter().any(|a| a[1] == 0xF2), "GET STATUS went through vpcd");
    let card = rig.remove(inserted);
    assert_eq!(card.view().auth_failures, 0);
}

#[test]
fn vpcd_reports_no_apdu_size_and_asking_leaves_the_card_alone() {
    use card::transport::pcsc::ExtendedApdu;
    let mut rig = Rig::new();
    let mut reader = rig.reader(Sharing::Shared);
    // Without a card: vpcd's driver answers neither SCARD_ATTR_MAXINPUT nor
    // the PC/SC part 10 feature request (pcsc-lite 1.9.9, vsmartcard 3.3).
    let empty = reader.extended_apdu().expect("a direct connection needs no card");
    let ExtendedApdu::Unknown { reason } = &empty else { panic!("vpcd reports nothing, yet: {empty:?}") };
    assert!(reason.contains("SCARD_ATTR_MAXINPUT: not supported by the reader's driver"), "{reason}");
    assert!(reason.contains("dwMaxAPDUDataSize: feature list not supported"), "{reason}");

    // With a card in a secure channel: asking neither resets nor powers
    // the card, so the session goes on.
    let inserted = rig.insert(rig.port, new_card(CardFaults::default()));
    wait_for(&mut reader, SlotState::Empty, |s| *s != SlotState::Empty);
    let mut other = rig.reader(Sharing::Shared);
    {
        let mut t = reader.connect().expect("connect");
        let mut session =
            GpSession::open(&mut *t, &gp_default_ring(), 0, SecurityLevel::CMacCDecRMac).expect("SCP03 session");
        assert_eq!(other.extended_apdu().expect("asked beside an open session"), empty);
        assert_eq!(
            session.get_status(StatusScope::IssuerSecurityDomain).expect("the session survives the question").len(),
            1
        );
    }
    rig.remove(inserted);
}

#[test]
fn card_removed_mid_transmit_is_card_removed() {
    let mut rig = Rig::new();
    let mut reader = rig.reader(Sharing::Shared);
    // The card leaves the field when it gets its third APDU.
    let card = new_card(CardFaults { remove_at: Some((3, TearPoint::Before)), ..CardFaults::default() });
    let inserted = rig.insert(rig.port, card);
    let state = wait_for(&mut reader, SlotState::Empty, |s| *s != SlotState::Empty);
    {
        let mut t = reader.connect().expect("connect");
        select_isd(&mut *t).expect("first APDU");
        read_cplc(&mut *t).expect("second APDU");
        let started = Instant::now();
        match read_cplc(&mut *t) {
            Err(card::CardError::Transport(TransportError::CardRemoved)) => {}
            other => panic!("third APDU, card gone: {other:?}"),
        }
        assert!(started.elapsed() < SEEN_WITHIN, "removal took {:?} to report", started.elapsed());
        // And it stays removed for this connection.
        assert!(matches!(t.transmit_raw(&[0x00, 0xA4, 0x04, 0x00, 0x00]), Err(TransportError::CardRemoved)));
    }
    rig.removed_by_card();
    assert_eq!(wait_for(&mut reader, state, |s| *s == SlotState::Empty), SlotState::Empty);
    let card = inserted.remove();
    assert_eq!(card.faults().remove_at, None, "the scripted removal fired");
    // Connecting to an empty reader says there is no card.
    assert!(matches!(reader.connect().map(|_| ()), Err(TransportError::NoCard)));
}

#[test]
fn insertion_counter_changes_on_every_reinsertion() {
    let mut rig = Rig::new();
    let mut reader = rig.reader(Sharing::Shared);
    let mut card = new_card(CardFaults::default());

    // Seen in, out, in: the same card (same ATR) is a new insertion.
    let inserted = rig.insert(rig.port, card);
    let first = wait_for(&mut reader, SlotState::Empty, |s| *s != SlotState::Empty);
    card = rig.remove(inserted);
    assert_eq!(wait_for(&mut reader, first.clone(), |s| *s == SlotState::Empty), SlotState::Empty);
    let inserted = rig.insert(rig.port, card);
    let second = wait_for(&mut reader, SlotState::Empty, |s| *s != SlotState::Empty);
    assert_ne!(insertion(&second), insertion(&first));

    // Swapped while nobody was waiting: the reader only learns of it from
    // pcscd's event counter at the next wait.
    card = rig.remove(inserted);
    std::thread::sleep(REINSERT_GAP);
    let inserted = rig.insert(rig.port, card);
    std::thread::sleep(REINSERT_GAP);
    let third = reader.wait_change(&second, Duration::from_secs(2)).expect("wait");
    assert!(matches!(third, SlotState::Present { .. }), "{third:?}");
    assert_ne!(insertion(&third), insertion(&second), "a swap between two waits is a new insertion");
    // Unchanged after that.
    assert_eq!(reader.wait_change(&third, Duration::from_millis(300)).expect("wait"), third);
    rig.remove(inserted);
}

#[test]
fn a_blocked_wait_is_cancelled_from_another_thread() {
    let mut rig = Rig::new();
    let reader = rig.reader(Sharing::Shared);
    let canceller = reader.canceller();
    let waiting = std::thread::spawn(move || {
        let mut reader = reader;
        let started = Instant::now();
        // The first call reports the state; the second one blocks.
        let state = reader.wait_change(&SlotState::Present { atr: Default::default(), insertion: 0 }, SEEN_WITHIN);
        assert_eq!(state.expect("first wait"), SlotState::Empty);
        let blocked = reader.wait_change(&SlotState::Empty, Duration::from_secs(30));
        (blocked.map_err(|e| e.to_string()), started.elapsed(), reader)
    });
    std::thread::sleep(Duration::from_millis(1500));
    let cancelled_at = Instant::now();
    canceller.cancel();
    let (result, _, mut reader) = waiting.join().expect("waiting thread");
    assert_eq!(result, Err(TransportError::Cancelled.to_string()));
    assert!(cancelled_at.elapsed() < Duration::from_millis(1200), "cancel took {:?}", cancelled_at.elapsed());
    // Sticky: a later wait returns at once.
    let started = Instant::now();
    assert!(matches!(reader.wait_change(&SlotState::Empty, Duration::from_secs(10)), Err(TransportError::Cancelled)));
    assert!(started.elapsed() < Duration::from_millis(100));

    // The monitor's canceller reaches the monitor and every reader it opened.
    let group = rig.monitor.canceller();
    let mut other = rig.monitor.open_reader(&reader_name(rig.port + 1)).expect("second reader");
    let waiting = std::thread::spawn(move || {
        let _ = other.wait_change(&SlotState::Present { atr: Default::default(), insertion: 0 }, SEEN_WITHIN);
        other.wait_change(&SlotState::Empty, Duration::from_secs(30)).map_err(|e| e.to_string())
    });
    std::thread::sleep(Duration::from_millis(1000));
    group.cancel();
    assert_eq!(waiting.join().expect("thread"), Err(TransportError::Cancelled.to_string()));
    assert!(matches!(rig.monitor.wait_readers_change(Duration::from_secs(10)), Err(TransportError::Cancelled)));
}

#[test]
fn exclusive_sharing_keeps_other_connections_out() {
    let mut rig = Rig::new();
    let mut exclusive = rig.reader(Sharing::Exclusive);
    let mut shared = rig.reader(Sharing::Shared);
    let inserted = rig.insert(rig.port, new_card(CardFaults::default()));
    wait_for(&mut exclusive, SlotState::Empty, |s| *s != SlotState::Empty);
    {
        let mut t = exclusive.connect().expect("exclusive connect");
        select_isd(&mut *t).expect("select");
        match shared.connect().map(|_| ()) {
            Err(e @ TransportError::Pcsc { .. }) => {
                assert!(e.to_string().contains("SCardConnect"), "{e}");
                assert!(!e.is_retryable());
            }
            other => panic!("a second connection to an exclusively held card: {other:?}"),
        }
    }
    // Once the exclusive transport is dropped, others may connect.
    let mut t = shared.connect().expect("shared connect after release");
    select_isd(&mut *t).expect("select");
    drop(t);
    rig.remove(inserted);
}
