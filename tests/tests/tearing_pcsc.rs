//! Tearing through the REAL pcscd: emulated cards behind vpcd readers of
//! `scripts/pcscd-vpcd.sh` (scripts/test.sh starts 8; TAPLINE_VPCD_PORT is
//! the port base P), fed by the rig's vpcd feeder in this process. A torn
//! card is one whose vpcd connection the rig closes (before the card
//! processes the APDU, or after it committed, without an answer); pcscd
//! reports it gone, the station fails it retryable, and the test puts it
//! back through the feeder (after pcscd's 1.1 s gap). At the end every card
//! is read back THROUGH PC/SC (CPLC, a GP session with the profile's keys,
//! GET STATUS, the wallet applet) and compared with the ledger by the same
//! rules as `tests/tearing.rs`.
//!
//! CI form (about a minute): the pairing APDUs of one member of a bundle
//! (card 2, fed slowest so it is most likely backup 2), each before and
//! after, on vpcd ports P..P+2; and key rotation torn after PUT KEY
//! committed, on P+3. Long form (`TAPLINE_LONG=1`, about 4 minutes): the
//! pairing APDUs of all three members (52 points). Every APDU of the whole
//! recipe through pcscd would take about 750 x 5 s: the emulator sweep
//! (`tests/tearing.rs`) covers it.

#[path = "tearing/line.rs"]
mod line;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use card::CardId;
use card::emu::factory::{ChipFactory, ChipKind};
use card::emu::{CardFaults, EmuCard, TearPoint};
use card::gp::StatusScope;
use card::gp::session::{self, GpSession};
use card::transport::pcsc::{PcscMonitor, ReaderFilter, Sharing, port_of_reader, reader_name};
use card::transport::{ReaderId, ReaderMonitor, SlotState, Transport};
use line::{CardEnd, Ended};
use rig::vpcd::feeder::{Feeder, FeederConfig, SlotView};
use station::firmware::Firmware;
use station::handler::{Bin, CardHandler};
use station::profile::{Bundles, Profile, Unpaired};
use station::worker::Control;
use tapline_tests::{demo_profile, wait_readers_empty};

fn port_base() -> u16 {
    std::env::var("TAPLINE_VPCD_PORT").ok().and_then(|v| v.parse().ok()).unwrap_or(35963)
}

fn firmware(profile: &Profile) -> Arc<Firmware> {
    Arc::new(Firmware::load(&profile.firmware_dir, &profile.release_keys).expect("firmware"))
}

struct LineState {
    reinserts: HashMap<u16, u32>,
    binned: HashMap<u16, Bin>,
    put_back: HashSet<u16>,
    outstanding: usize,
}

/// The feeder as the batch's card handler: a card that failed goes back
/// once; a card's last verdict leaves it in the field, to be read back.
struct VpcdLine {
    feeder: Feeder,
    control: Arc<Control>,
    st: Mutex<LineState>,
}

impl VpcdLine {
    fn new(feeder: Feeder, control: Arc<Control>, ports: &[u16]) -> Arc<Self> {
        Arc::new(Self {
            feeder,
            control,
            st: Mutex::new(LineState {
                reinserts: ports.iter().map(|p| (*p, 1)).collect(),
                binned: HashMap::new(),
                put_back: HashSet::new(),
                outstanding: ports.len(),
            }),
        })
    }
}

impl CardHandler for VpcdLine {
    fn eject(&self, reader: &ReaderId, bin: Bin) {
        let Some(port) = port_of_reader(reader.as_str()) else { return };
        let mut st = self.st.lock().unwrap_or_else(PoisonError::into_inner);
        if bin == Bin::Fail && st.reinserts.get(&port).is_some_and(|n| *n > 0) {
            st.reinserts.insert(port, 0);
            st.put_back.insert(port);
            let present = self
                .feeder
                .status()
                .slots
                .into_iter()
                .any(|(p, v)| p == port && matches!(v, SlotView::Present(_) | SlotView::Arriving(_)));
            if present {
                self.feeder.remove(port).expect("pull the card");
            }
            self.feeder.insert(port).expect("put the card back");
            return;
        }
        st.binned.insert(port, bin);
        st.outstanding = st.outstanding.saturating_sub(1);
        if st.outstanding == 0 {
            self.control.drain();
        }
    }
}

/// The firmware of the release on the card, by GET STATUS: the package at
/// the manifest's version and every instance selectable.
fn firmware_on_card(t: &mut dyn Transport, profile: &Profile, fw: &Firmware) -> Result<(), String> {
    let mut gp = GpSession::open(t, &profile.key_ring(), 0, profile.security_level).map_err(|e| e.to_string())?;
    let packages = gp.get_status(StatusScope::LoadFiles).map_err(|e| e.to_string())?;
    let instances = gp.get_status(StatusScope::Applications).map_err(|e| e.to_string())?;
    let version = vec![fw.package_version.0, fw.package_version.1];
    let ours: Vec<_> = packages.iter().filter(|p| p.aid == fw.package_aid).collect();
    if ours.len() != 1 || ours[0].version.as_ref() != Some(&version) {
        return Err(format!("packages {packages:?}"));
    }
    for a in &fw.applets {
        if !instances.iter().any(|i| i.aid == a.instance_aid && i.lifecycle == card::gp::app_state::SELECTABLE) {
            return Err(format!("instance {} not selectable", hex::encode_upper(&a.instance_aid)));
        }
    }
    Ok(())
}

/// Each card still in `ports`' readers, read back through pcscd.
fn read_back_all(line: &VpcdLine, ports: &[u16], profile: &Profile, fw: &Firmware) -> Vec<CardEnd> {
    let names: Vec<String> = ports.iter().map(|p| reader_name(port_base(), *p)).collect();
    let mut monitor = PcscMonitor::new(ReaderFilter::new(names.iter().cloned(), [""; 0]), Sharing::Exclusive)
        .expect("no pcscd: start one with `scripts/pcscd-vpcd.sh start 8` (scripts/test.sh does)");
    let st = line.st.lock().unwrap_or_else(PoisonError::into_inner);
    let mut ends = Vec::new();
    for (port, name) in ports.iter().zip(&names) {
        let mut reader = monitor.open(&ReaderId(name.clone())).expect("open reader");
        // The card is in the field (put back ones after pcscd's gap).
        let mut state = SlotState::Empty;
        for _ in 0..20 {
            state = reader.wait_change(&state, Duration::from_millis(250)).expect("reader state");
            if matches!(state, SlotState::Present { .. }) {
                break;
            }
        }
        let mut t = reader.connect().unwrap_or_else(|e| panic!("{name}: no card to read back: {e}"));
        session::select_isd(&mut *t).expect("select the card manager");
        let id: CardId = session::read_cplc(&mut *t).expect("CPLC").card_id();
        let firmware = firmware_on_card(&mut *t, profile, fw);
        let rb = line::read_back(&mut *t, profile);
        // A locked card manager or an exhausted retry counter refuses the
        // session: read_back's key version says so.
        let locked = rb.key_version.as_ref().err().filter(|e| e.contains("6983")).cloned();
        ends.push(CardEnd {
            bin: *st.binned.get(port).unwrap_or_else(|| panic!("{name}: never binned")),
            id: id.to_hex(),
            rb,
            put_back: st.put_back.contains(port),
            firmware,
            locked,
        });
    }
    ends
}

/// Runs `cards` on vpcd `ports` (card i on port i), each card put back once
/// after a failure; the cards' ends read back through pcscd.
fn run(profile: Arc<Profile>, fw: &Arc<Firmware>, ports: &[u16], cards: Vec<EmuCard>) -> (Ended, Vec<CardEnd>) {
    let names: Vec<String> = ports.iter().map(|p| reader_name(port_base(), *p)).collect();
    wait_readers_empty(&names, Duration::from_secs(5));
    let monitor = PcscMonitor::new(ReaderFilter::new(names.iter().cloned(), [""; 0]), Sharing::Exclusive)
        .expect("no pcscd: start one with `scripts/pcscd-vpcd.sh start 8` (scripts/test.sh does)");
    let config = FeederConfig { speed: 0.02, ..FeederConfig::instant(ports[0], ports.len()) };
    let feeder = Feeder::start(config, cards, Arc::new(|_| {}));
    let control = Control::new();
    let line = VpcdLine::new(feeder.clone(), Arc::clone(&control), ports);
    let ended = line::run_batch(
        &format!("vpcd {ports:?}"),
        (Arc::clone(&profile), Arc::clone(fw)),
        Box::new(monitor),
        line.clone(),
        control,
        Duration::from_secs(90),
        |_| {},
    );
    let ends = read_back_all(&line, ports, &profile, fw);
    feeder.shutdown();
    (ended, ends)
}

fn long_form() -> bool {
    std::env::var("TAPLINE_LONG").is_ok_and(|v| v == "1")
}

#[test]
fn the_pairing_apdus_of_one_member_torn_through_pcscd_end_provisioned_or_recorded() {
    let mut profile = (*demo_profile()).clone();
    profile.bundles = Some(Bundles { backups: 2, max_wait: Duration::from_secs(2), unpaired: Unpaired::Pass });
    let profile = Arc::new(profile);
    let fw = firmware(&profile);
    let recipe = rig::plan::run::calibrate(&profile, &fw).expect("calibration").total;
    let base = port_base();
    let ports = [base, base + 1, base + 2];
    // Fed at once, card i slower than card i-1, so card 0 is ready first
    // (the primary) and card 2 last (backup 2). A backup's pairing:
    // SELECT, LINK, IMPORT, PROVE, FINALIZE, SELECT; the primary's 14.
    // Short form: backup 2's; long form (TAPLINE_LONG=1): every member's.
    let members: Vec<(usize, u64)> = if long_form() { vec![(0, 14), (1, 6), (2, 6)] } else { vec![(2, 6)] };
    let mut failures = Vec::new();
    let mut roles = Vec::new();
    let mut points = 0;
    let started = std::time::Instant::now();
    for &(member, apdus) in &members {
        for k in 1..=apdus {
            for point in [TearPoint::Before, TearPoint::After] {
                let mut f = ChipFactory::new(5150 + k);
                let cards: Vec<EmuCard> = (0..3)
                    .map(|i| {
                        let remove_at = (i == member).then_some((recipe + k, point));
                        let slow_factor = [1.0, 3.0, 5.0][i];
                        f.make(ChipKind::Genuine, CardFaults { remove_at, slow_factor, ..CardFaults::default() })
                    })
                    .collect();
                let torn = cards[member].id().to_hex();
                let (ended, ends) = run(Arc::clone(&profile), &fw, &ports, cards);
                points += 1;
                let p = line::problems(&profile, &fw, &ended, &ends);
                let role = ended
                    .export
                    .bundles
                    .iter()
                    .find_map(|b| {
                        if b.primary.as_deref() == Some(torn.as_str()) {
                            Some("primary")
                        } else {
                            b.backups.contains(&torn).then_some("backup")
                        }
                    })
                    .unwrap_or("none");
                roles.push(format!("card {member} +{k} {point:?}: {role}"));
                if !ends[member].put_back {
                    failures.push(format!("card {member} +{k} {point:?}: not torn"));
                }
                if !p.is_empty() {
                    failures.push(format!("card {member} +{k} {point:?}: {}", p.join("; ")));
                }
            }
        }
    }
    println!(
        "vpcd: {points} tearing points (pairing APDUs of cards {:?} from APDU {}, before and after) in {:.1} s; role in the first bundle: {roles:?}",
        members.iter().map(|m| m.0).collect::<Vec<_>>(),
        recipe + 1,
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn key_rotation_torn_after_put_key_through_pcscd_resumes_with_the_new_key_set() {
    let mut profile = (*demo_profile()).clone();
    profile.bundles = None;
    let profile = Arc::new(profile);
    let fw = firmware(&profile);
    let rotated = profile.rotation.as_ref().expect("rotation").version;
    let cal = rig::plan::run::calibrate(&profile, &fw).expect("calibration");
    let put_key = cal.first_apdu(station::recipe::Step::KeyRotation);
    let card = ChipFactory::new(7331)
        .make(ChipKind::Genuine, CardFaults { remove_at: Some((put_key, TearPoint::After)), ..CardFaults::default() });
    let ports = [port_base() + 3];
    let (ended, ends) = run(Arc::clone(&profile), &fw, &ports, vec![card]);
    assert_eq!(line::problems(&profile, &fw, &ended, &ends), Vec::<String>::new());
    let rec = &ended.export.cards[0];
    assert_eq!((rec.status.as_str(), rec.attempts, rec.gp_key_version), ("passed", 2, Some(i64::from(rotated))));
    assert_eq!(ends[0].rb.key_version, Ok(rotated), "read back through pcscd");
    let steps = &line::journals(&ended)[&rec.card_id];
    let session: Vec<_> = steps.iter().filter(|s| s.step == "gp_session" && s.event == "done").collect();
    // Attempt 1 authenticated with the factory keys, attempt 2 with the
    // rotated ones PUT KEY had committed before the card left; no second
    // rotation.
    let want = [(1, format!("key version {:02X}", profile.factory_version)), (2, format!("key version {rotated:02X}"))];
    assert_eq!(session.len(), 2, "{steps:#?}");
    for (s, (attempt, prefix)) in session.iter().zip(&want) {
        assert_eq!(s.attempt, *attempt, "{steps:#?}");
        assert!(s.detail.as_deref().unwrap_or("").starts_with(prefix.as_str()), "{s:?}");
    }
    assert!(
        !steps.iter().any(|s| s.attempt == 2 && s.step == "key_rotation"),
        "attempt 2 found the new key version and did not rotate again: {steps:#?}"
    );
}
