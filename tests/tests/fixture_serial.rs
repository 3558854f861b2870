//! The serial fixture over real pty pairs (socat): the station's
//! `serialport` driver on one end, the rig's emulated fixture on the other.
//! Round trips, the faults a real line has (dropped replies, garbage, a
//! silent fixture, a pulled cable) and a whole batch binned and fed by the
//! fixture, with a reader that only a power cycle brings back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use card::emu::CardFaults;
use card::emu::factory::{ChipFactory, ChipKind};
use card::transport::emu::EmuBank;
use card::transport::{CardReader, ReaderId, ReaderMonitor, SlotState, Transport, TransportError};
use rig::fixture::backend::BankBackend;
use rig::fixture::{EmulatedFixture, Ended, Fault, FaultScript, open_port};
use station::fixture::serial::{LinkSettings, SerialFeeder, SerialFixture, SerialPower};
use station::fixture::{Command, FixtureError, PowerAction, ReaderMap, codes};
use station::handler::{Bin, CardHandler};
use tapline_tests::pty::PtyPair;

fn quick() -> LinkSettings {
    LinkSettings { timeout: Duration::from_millis(300), retries: 2, ..LinkSettings::default() }
}

/// Serves `fixture` on `path` on a thread of its own until the port closes.
fn serve(fixture: &EmulatedFixture, path: &std::path::Path) -> std::thread::JoinHandle<Ended> {
    let port = open_port(path).expect("open the fixture end");
    let f = fixture.clone();
    std::thread::spawn(move || f.serve(port))
}

fn bank_backend(readers: usize, cards: usize) -> (EmuBank, BankBackend) {
    let bank = EmuBank::new(readers, 0.0, Duration::from_millis(100));
    let mut factory = ChipFactory::new(6);
    let cards = (0..cards).map(|_| factory.make(ChipKind::Genuine, CardFaults::default())).collect();
    (bank.clone(), BankBackend::new(bank, cards))
}

#[test]
fn driver_and_emulated_fixture_round_trip_over_a_pty_pair() {
    let pair = PtyPair::new();
    let (bank, backend) = bank_backend(2, 4);
    let fixture = EmulatedFixture::new(Box::new(backend.clone()), FaultScript::default());
    let _server = serve(&fixture, &pair.b);
    let link = SerialFixture::new(pair.a.display().to_string(), quick());
    let info = link.connect().expect("hello");
    assert_eq!((info.readers, info.power), (Some(2), true), "{info:?}");
    link.command(Command::Feed(0)).expect("feed 0");
    assert!(bank.slots()[0].is_occupied());
    let occupied = link.command(Command::Feed(0)).expect_err("reader 0 is full");
    assert_eq!(occupied.code(), Some(codes::OCCUPIED), "{occupied}");
    link.command(Command::Eject(0, Bin::Pass)).expect("eject");
    assert!(!bank.slots()[0].is_occupied());
    let status = link.command(Command::Status).expect("status");
    assert!(status.contains("hopper=3 pass=1 fail=0 0=empty 1=empty"), "{status}");
    link.command(Command::Power(1, PowerAction::Cycle(20))).expect("power cycle");
    assert_eq!(backend.cycles(), [0, 1]);
    let range = link.command(Command::Feed(5)).expect_err("no reader 5");
    assert_eq!(range.code(), Some(codes::RANGE), "{range}");

    // The feeder and the relay board as the station sees them.
    let map = ReaderMap::new(bank.slots().iter().map(|s| s.id().clone()).collect());
    let link = Arc::new(link);
    let feeder =
        SerialFeeder::new(Arc::clone(&link), map.clone()).with_power(SerialPower::new(Arc::clone(&link), map, 10));
    assert_eq!(feeder.fill().expect("fill"), 2);
    feeder.try_eject(&ReaderId("emu-01".into()), Bin::Fail).expect("bin and feed");
    assert_eq!(backend.counts(), (1, 1));
    assert!(bank.slots()[1].is_occupied(), "the last hopper card went onto reader 1");
    feeder.try_eject(&ReaderId("emu-01".into()), Bin::Pass).expect("bin; the hopper is empty, which is fine");
    assert_eq!(backend.counts(), (2, 1));
    feeder.power().expect("relays").cycle(&ReaderId("emu-00".into())).expect("cycle");
    assert_eq!(backend.cycles(), [1, 1]);
    let unwired = feeder.try_eject(&ReaderId("elsewhere".into()), Bin::Pass).expect_err("not wired");
    assert!(matches!(unwired, FixtureError::NotWired(_)), "{unwired}");
}

#[test]
fn dropped_replies_and_garbage_are_retried_without_acting_twice() {
    let pair = PtyPair::new();
    let (bank, backend) = bank_backend(2, 4);
    let fixture = EmulatedFixture::new(Box::new(backend.clone()), FaultScript::default());
    let _server = serve(&fixture, &pair.b);
    let link = SerialFixture::new(pair.a.display().to_string(), quick());
    link.connect().expect("hello");

    fixture.inject(1, Fault::Drop);
    link.command(Command::Feed(0)).expect("the retransmission gets the cached reply");
    assert_eq!(backend.hopper(), 3, "fed once, not twice");
    assert!(bank.slots()[0].is_occupied());

    fixture.inject(1, Fault::Garbage);
    link.command(Command::Eject(0, Bin::Pass)).expect("garbage, then the cached reply");
    assert_eq!(backend.counts(), (1, 0), "binned once");

    // Only garbage, every try: a clear error naming it.
    for n in 1..=3 {
        fixture.inject(n, Fault::Garbage);
    }
    let started = Instant::now();
    let e = link.command(Command::Status).expect_err("garbage only");
    assert!(matches!(e, FixtureError::Garbage { tries: 3, .. }), "{e}");
    assert!(e.to_string().contains("garbage"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // Back to normal: a new HELLO, then the command.
    link.command(Command::Status).expect("answers again");
}

#[test]
fn a_silent_fixture_times_out_and_is_greeted_again_when_it_wakes() {
    let pair = PtyPair::new();
    let (_bank, backend) = bank_backend(1, 1);
    let fixture = EmulatedFixture::new(Box::new(backend), FaultScript::default());
    let _server = serve(&fixture, &pair.b);
    let link = SerialFixture::new(pair.a.display().to_string(), quick());
    link.connect().expect("hello");
    fixture.inject(1, Fault::Silent);
    let started = Instant::now();
    let e = link.command(Command::Feed(0)).expect_err("silent");
    let took = started.elapsed();
    assert!(matches!(e, FixtureError::Timeout { tries: 3, timeout_ms: 300, .. }), "{e}");
    assert!(took >= Duration::from_millis(850) && took < Duration::from_secs(2), "took {took:?}");
    fixture.wake();
    link.command(Command::Feed(0)).expect("awake again");
}

#[test]
fn a_pulled_cable_is_a_clear_error_and_the_link_comes_back_with_the_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (station_end, fixture_end) = (dir.path().join("station"), dir.path().join("fixture"));
    let mut pair = PtyPair::with_links(&station_end, &fixture_end);
    let (bank, backend) = bank_backend(1, 3);
    let fixture = EmulatedFixture::new(Box::new(backend.clone()), FaultScript::default());
    let server = serve(&fixture, &pair.b);
    let map = ReaderMap::new(vec![bank.slots()[0].id().clone()]);
    let feeder = SerialFeeder::new(Arc::new(SerialFixture::new(station_end.display().to_string(), quick())), map);
    assert_eq!(feeder.fill().expect("fill"), 1);

    pair.kill();
    assert_eq!(server.join().expect("fixture thread"), Ended::PortClosed);
    let started = Instant::now();
    let e = feeder.try_eject(bank.slots()[0].id(), Bin::Pass).expect_err("cable pulled");
    assert!(matches!(e, FixtureError::Disconnected { .. } | FixtureError::Open { .. }), "{e}");
    assert!(e.to_string().contains(&station_end.display().to_string()), "names the port: {e}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // Still gone: the next try fails opening the port, quickly.
    let e = feeder.try_eject(bank.slots()[0].id(), Bin::Pass).expect_err("still gone");
    assert!(matches!(e, FixtureError::Open { .. }), "{e}");

    // The cable is back (same names): the link reopens and greets again.
    let pair = PtyPair::with_links(&station_end, &fixture_end);
    let _server = serve(&fixture, &pair.b);
    feeder.try_eject(bank.slots()[0].id(), Bin::Pass).expect("back");
    assert_eq!(backend.counts(), (1, 0));
    assert!(bank.slots()[0].is_occupied(), "the next card was fed");

    // The fixture itself hangs up mid-conversation.
    fixture.inject(1, Fault::Disconnect);
    let e = feeder.try_eject(bank.slots()[0].id(), Bin::Fail).expect_err("fixture hung up");
    assert!(
        matches!(e, FixtureError::Disconnected { .. } | FixtureError::Timeout { .. }),
        "a hang-up is a disconnect (or silence while socat lingers): {e}"
    );
}

/// Emulated readers where some reader stops answering until its power is
/// cycled (the relay hook clears it).
struct Hangable {
    bank: EmuBank,
    hung: Vec<Arc<AtomicBool>>,
}

struct HangReader {
    inner: Box<dyn CardReader>,
    hung: Arc<AtomicBool>,
}

impl ReaderMonitor for Hangable {
    fn readers(&mut self) -> Result<Vec<ReaderId>, TransportError> {
        self.bank.readers()
    }

    fn open(&mut self, id: &ReaderId) -> Result<Box<dyn CardReader>, TransportError> {
        let i = self.bank.slots().iter().position(|s| s.id() == id).expect("known reader");
        Ok(Box::new(HangReader { inner: self.bank.open(id)?, hung: Arc::clone(&self.hung[i]) }))
    }
}

impl CardReader for HangReader {
    fn id(&self) -> &ReaderId {
        self.inner.id()
    }

    fn wait_change(&mut self, known: &SlotState, timeout: Duration) -> Result<SlotState, TransportError> {
        if self.hung.load(Ordering::SeqCst) {
            std::thread::sleep(timeout.min(Duration::from_millis(50)));
            return Err(TransportError::ReaderUnavailable("reader not answering".into()));
        }
        self.inner.wait_change(known, timeout)
    }

    fn connect(&mut self) -> Result<Box<dyn Transport + Send + '_>, TransportError> {
        if self.hung.load(Ordering::SeqCst) {
            return Err(TransportError::ReaderUnavailable("reader not answering".into()));
        }
        self.inner.connect()
    }
}

#[test]
fn a_batch_is_binned_and_fed_by_the_serial_fixture_and_a_hung_reader_is_power_cycled() {
    let pair = PtyPair::new();
    let bank = EmuBank::new(2, 0.0, Duration::from_millis(100));
    let mut factory = ChipFactory::new(66);
    // Six cards, two of them counterfeit: 4 PASS, 2 FAIL.
    let cards: Vec<_> = (0..6)
        .map(|i| {
            let kind = if i % 3 == 1 { ChipKind::Counterfeit } else { ChipKind::Genuine };
            factory.make(kind, CardFaults::default())
        })
        .collect();
    let hung: Vec<Arc<AtomicBool>> = vec![Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(true))];
    let relay = Arc::clone(&hung[1]);
    let backend = BankBackend::new(bank.clone(), cards).on_power(move |k, action| {
        if k == 1 && matches!(action, PowerAction::Cycle(_)) {
            relay.store(false, Ordering::SeqCst);
        }
    });
    let fixture = EmulatedFixture::new(Box::new(backend.clone()), FaultScript::default());
    let _server = serve(&fixture, &pair.b);
    let spec: station::fixture::FixtureSpec = format!("serial:{},cycle-ms=50", pair.a.display()).parse().expect("spec");
    let readers: Vec<ReaderId> = bank.slots().iter().map(|s| s.id().clone()).collect();
    let feeder = Arc::new(SerialFeeder::from_spec(&spec, readers, LinkSettings::default()));
    assert_eq!(feeder.fill().expect("the first cards"), 2);
    // A dropped reply mid-batch costs one retransmission, nothing more.
    fixture.inject(4, Fault::Drop);

    let mut profile = (*tapline_tests::demo_profile()).clone();
    profile.bundles = None;
    let monitor = Hangable { bank: bank.clone(), hung: hung.clone() };
    let batch = tapline_tests::run_batch_on(Arc::new(profile), Box::new(monitor), feeder, 6);

    assert_eq!(batch.summary.outcomes.len(), 6);
    assert_eq!((batch.summary.passed(), batch.summary.failed()), (4, 2));
    assert_eq!(backend.counts(), (4, 2), "the bins match the outcomes");
    for (bin, card) in backend.take_bins() {
        let outcome = batch.summary.outcomes.iter().find(|o| o.card_id == Some(card.id())).expect("card recorded");
        assert_eq!(bin == Bin::Pass, outcome.passed(), "card {} binned {bin:?}", card.id());
    }
    assert_eq!(backend.hopper(), 0);
    assert!(backend.cycles()[1] >= 1, "the hung reader was power-cycled: {:?}", backend.cycles());
    assert_eq!(backend.cycles()[0], 0);
    assert!(!hung[1].load(Ordering::SeqCst));
}
