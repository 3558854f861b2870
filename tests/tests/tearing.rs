//! Tearing the whole recipe, pairing included, on emulated readers.
//!
//! A bundle is three genuine cards (primary and two backups, fed one after
//! another so the roles are known). Each member's card is cut at every
//! APDU of its whole recipe in turn, pairing included, before the card
//! processes the APDU (`TearPoint::Before`: no effect) and after it
//! committed but before the answer reached the station (`After`); the torn
//! card is put back once. Whatever happened, at the end:
//! - every card is provisioned and verified (recorded passed, in a sealed
//!   bundle or released unpaired), or recorded failed-and-retryable; a card
//!   put back after a retryable failure finished;
//! - the ledger equals the cards' real state read back from the cards with
//!   APDUs (lifecycle, bundle id, wallet key present and which, GP key
//!   version); no card holds a wallet key the ledger does not know;
//! - no bundle is recorded sealed with a member that is not sealed in it,
//!   and no card is locked (no failed authentication counted).
//!
//! CI runs every pairing APDU of every member and a deterministic stride of
//! the card's own recipe (every 20th APDU, offset by member); the long form
//! runs every point: `TAPLINE_LONG=1 cargo test -p tapline-tests --test
//! tearing -- --nocapture` (README, Reliability long forms). Key rotation
//! torn before, during and after PUT KEY is its own test below.

#[path = "tearing/line.rs"]
mod line;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use card::emu::factory::{ChipFactory, ChipKind};
use card::emu::{CardFaults, CardView, EmuCard, TearPoint};
use card::transport::emu::EmuBank;
use card::wallet::Lifecycle;
use line::{Ended, Line, ReadBack, read_back_emu};
use station::firmware::Firmware;
use station::handler::Bin;
use station::profile::{Bundles, Profile, Unpaired};
use station::worker::Control;
use tapline_tests::demo_profile;

/// The stride over the card's own recipe in the short form.
const STRIDE: u64 = 20;

fn long_form() -> bool {
    std::env::var("TAPLINE_LONG").is_ok_and(|v| v == "1")
}

/// The demo profile (1 primary + 2 backups, key rotation to version 1), a
/// lone ready card released unpaired after 2 s instead of 10 minutes.
fn bundle_profile() -> Arc<Profile> {
    let mut p = (*demo_profile()).clone();
    p.bundles = Some(Bundles { backups: 2, max_wait: Duration::from_secs(2), unpaired: Unpaired::Pass });
    Arc::new(p)
}

struct Setup {
    profile: Arc<Profile>,
    firmware: Arc<Firmware>,
}

impl Setup {
    fn new(profile: Arc<Profile>) -> Self {
        let firmware = Arc::new(Firmware::load(&profile.firmware_dir, &profile.release_keys).expect("firmware"));
        Self { profile, firmware }
    }
}

/// A tear: which card (feeding order), at which of its APDUs, which point.
#[derive(Debug, Clone, Copy)]
struct Tear {
    member: usize,
    apdu: u64,
    point: TearPoint,
}

/// One run's end: the batch, and each card (by feeding order) with its
/// last verdict, its state read back and its emulator view.
struct Run {
    ended: Ended,
    cards: Vec<(Bin, ReadBack, CardView)>,
    put_back: Vec<(usize, CardView)>,
}

fn cards(n: usize, seed: u64) -> Vec<EmuCard> {
    let mut f = ChipFactory::new(seed);
    (0..n).map(|_| f.make(ChipKind::Genuine, CardFaults::default())).collect()
}

fn run(setup: &Setup, n: usize, tear: Option<Tear>, chained: bool) -> Run {
    run_with(setup, n, tear, chained, &vec![1; n])
}

fn run_with(setup: &Setup, n: usize, tear: Option<Tear>, chained: bool, put_back: &[u32]) -> Run {
    let mut cards = cards(n, 4242);
    if let Some(t) = tear {
        cards[t.member].set_faults(CardFaults { remove_at: Some((t.apdu, t.point)), ..CardFaults::default() });
    }
    let bank = EmuBank::new(n, 0.0, Duration::from_millis(200));
    let control = Control::new();
    let line = Line::new(bank.clone(), Arc::clone(&control), cards, chained, put_back);
    let watcher = Arc::clone(&line);
    let ended = line::run_batch(
        &format!("{tear:?}"),
        (Arc::clone(&setup.profile), Arc::clone(&setup.firmware)),
        Box::new(bank),
        line.clone(),
        control,
        Duration::from_secs(60),
        move |e| watcher.on_event(e),
    );
    let cards = line
        .take_binned()
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            let (bin, card) = b.unwrap_or_else(|| panic!("{tear:?}: card {i} never binned"));
            // The view before the read-back adds its own APDUs.
            let view = card.view();
            let (rb, _) = read_back_emu(card, &setup.profile);
            (bin, rb, view)
        })
        .collect();
    Run { ended, cards, put_back: line.put_back() }
}

/// The pass criteria (`line::problems`) on an emulated run: the firmware
/// and the authentication counter from the card's own view.
fn problems(setup: &Setup, r: &Run) -> Vec<String> {
    let ends: Vec<line::CardEnd> = r
        .cards
        .iter()
        .enumerate()
        .map(|(i, (bin, rb, view))| line::CardEnd {
            bin: *bin,
            id: view.id.to_hex(),
            rb: rb.clone(),
            put_back: r.put_back.iter().any(|(j, _)| *j == i),
            firmware: if view.packages.len() == 1 && view.packages[0].hash == setup.firmware.load_file_sha256 {
                Ok(())
            } else {
                Err(format!("packages {:?}", view.packages))
            },
            locked: (view.auth_failures != 0 || view.card_state == card::gp::card_state::CARD_LOCKED)
                .then(|| format!("{} failed authentications, card state {:02X}", view.auth_failures, view.card_state)),
        })
        .collect();
    line::problems(&setup.profile, &setup.firmware, &r.ended, &ends)
}

/// How a run ended, for the printed tally.
fn class(r: &Run) -> String {
    let mut parts: Vec<String> = r
        .ended
        .export
        .cards
        .iter()
        .map(|c| match c.status.as_str() {
            "passed" => c.stage.clone().unwrap_or_default(),
            _ => format!("failed:{}", c.failure_reason.clone().unwrap_or_default()),
        })
        .collect();
    parts.sort();
    parts.join(" + ")
}

#[test]
fn every_apdu_of_a_bundle_torn_before_and_after_ends_provisioned_or_retryable() {
    let setup = Setup::new(bundle_profile());
    let started = Instant::now();

    // Calibration: a clean bundle, card 0 the primary; each member's APDUs.
    let clean = run(&setup, 3, None, true);
    assert_eq!(problems(&setup, &clean), Vec::<String>::new());
    let sealed: Vec<_> = clean.ended.export.bundles.iter().filter(|b| b.status == "sealed").collect();
    assert_eq!(sealed.len(), 1, "{:#?}", clean.ended.export.bundles);
    let primary = clean.cards[0].2.id.to_hex();
    assert_eq!(sealed[0].primary.as_deref(), Some(primary.as_str()), "the first card fed is the primary");
    let counts: Vec<u64> = clean.cards.iter().map(|(_, _, v)| v.apdus).collect();
    let recipe = rig::plan::run::calibrate(&setup.profile, &setup.firmware).expect("calibration").total;
    println!(
        "recipe of {recipe} APDUs; whole recipe with pairing: primary {}, backups {} and {}",
        counts[0], counts[1], counts[2]
    );

    let long = long_form();
    let mut points = Vec::new();
    for (member, &count) in counts.iter().enumerate() {
        for apdu in 1..=count {
            // Read back adds its own APDUs: a tear past the card's last
            // pairing APDU would land there.
            if long || apdu > recipe || apdu % STRIDE == member as u64 % STRIDE {
                for point in [TearPoint::Before, TearPoint::After] {
                    points.push(Tear { member, apdu, point });
                }
            }
        }
    }
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut pairing_points = 0;
    for t in &points {
        let r = run(&setup, 3, Some(*t), true);
        let p = problems(&setup, &r);
        if t.apdu > recipe {
            pairing_points += 1;
        }
        // The torn card really was torn (and put back).
        if !r.put_back.iter().any(|(i, _)| *i == t.member) {
            failures.push(format!("{t:?}: the card was not torn (never put back): {}", class(&r)));
        }
        *tally.entry(class(&r)).or_default() += 1;
        if !p.is_empty() {
            failures.push(format!("{t:?}: {}", p.join("; ")));
        }
    }
    let total: u64 = counts.iter().sum::<u64>() * 2;
    println!(
        "{} tearing points of {total} ({}), {pairing_points} of them in pairing, in {:.1} s",
        points.len(),
        if long {
            "every APDU of each member, before and after"
        } else {
            "short form: stride 20 over the recipe, every pairing APDU"
        },
        started.elapsed().as_secs_f64()
    );
    for (c, n) in &tally {
        println!("  {n:4} x {c}");
    }
    assert!(
        failures.is_empty(),
        "{} of {} points broke the rules:\n{}",
        failures.len(),
        points.len(),
        failures.join("\n")
    );
}

/// The demo profile without bundles: key rotation is about one card.
fn single_profile() -> Arc<Profile> {
    let mut p = (*demo_profile()).clone();
    p.bundles = None;
    Arc::new(p)
}

#[test]
fn key_rotation_torn_before_during_and_after_put_key_resumes_with_the_cards_real_key_set() {
    let setup = Setup::new(single_profile());
    let rotated = setup.profile.rotation.as_ref().expect("the demo profile rotates keys").version;
    let factory = setup.profile.factory_version;
    let cal = rig::plan::run::calibrate(&setup.profile, &setup.firmware).expect("calibration");
    let first = cal.first_apdu(station::recipe::Step::KeyRotation);
    let next = cal.first_apdu(station::recipe::Step::Attestation);
    // PUT KEY is the step's first APDU; the step then proves the rotation
    // with a new session (SELECT, INITIALIZE UPDATE, EXTERNAL
    // AUTHENTICATE). From the firmware step's last APDU to attestation's
    // first: before, during (the emulator commits PUT KEY atomically: torn
    // Before it never happened, torn After it did) and after PUT KEY.
    let mut seen: BTreeMap<(u64, String), u8> = BTreeMap::new();
    let mut failures = Vec::new();
    for apdu in first - 1..=next {
        for point in [TearPoint::Before, TearPoint::After] {
            let t = Tear { member: 0, apdu, point };
            let r = run(&setup, 1, Some(t), false);
            let mut p = problems(&setup, &r);
            let Some((_, torn)) = r.put_back.first() else {
                failures.push(format!("{t:?}: not torn"));
                continue;
            };
            // Atomic: the card holds exactly the old or exactly the new set.
            let had = match torn.key_versions.as_slice() {
                [v] if *v == factory || *v == rotated => *v,
                other => {
                    failures.push(format!("{t:?}: the torn card holds key versions {other:02X?}"));
                    continue;
                }
            };
            seen.insert((apdu, format!("{point:?}")), had);
            // The second attempt opened its session with exactly the key
            // set of the version the card had, and rotated only if needed.
            let rec = &r.ended.export.cards[0];
            let steps = &line::journals(&r.ended)[&rec.card_id];
            let session: Vec<&str> = steps
                .iter()
                .filter(|s| s.attempt == 2 && s.step == "gp_session" && s.event == "done")
                .filter_map(|s| s.detail.as_deref())
                .collect();
            let want = format!("key version {had:02X}");
            if session.len() != 1 || !session[0].starts_with(&want) {
                p.push(format!("attempt 2 authenticated with {session:?}, the card had {want}"));
            }
            let rotation = steps.iter().any(|s| s.attempt == 2 && s.step == "key_rotation" && s.event == "done");
            if rotation != (had != rotated) {
                p.push(format!("attempt 2 rotated: {rotation}, the card had key version {had:02X}"));
            }
            if rec.attempts != 2 || rec.status != "passed" {
                p.push(format!("recorded {} after {} attempts", rec.status, rec.attempts));
            }
            if !p.is_empty() {
                failures.push(format!("{t:?}: {}", p.join("; ")));
            }
        }
    }
    println!("key rotation torn at APDUs {}..={next} (PUT KEY is {first}), key version the card had:", first - 1);
    for ((apdu, point), v) in &seen {
        println!("  APDU {apdu} {point}: {v:02X}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Both sides of PUT KEY's commit were met.
    assert_eq!(seen.get(&(first, "Before".into())), Some(&factory), "{seen:?}");
    assert_eq!(seen.get(&(first, "After".into())), Some(&rotated), "{seen:?}");
}

#[test]
fn a_member_torn_at_finalize_is_sealed_when_put_back_and_the_bundle_recorded_whole() {
    let setup = Setup::new(bundle_profile());
    let clean = run(&setup, 3, None, true);
    let counts: Vec<u64> = clean.cards.iter().map(|c| c.2.apdus).collect();
    // FINALIZE and the SELECT after it, of the primary and of a backup,
    // before (not sealed) and after (sealed, answer lost): the members
    // still there are sealed and held; the torn card, put back, runs its
    // recipe again, is sealed (or found sealed) and the bundle recorded.
    for (member, apdu) in [(0, counts[0] - 1), (0, counts[0]), (2, counts[2] - 1), (2, counts[2])] {
        for point in [TearPoint::Before, TearPoint::After] {
            let t = Tear { member, apdu, point };
            let r = run(&setup, 3, Some(t), true);
            assert_eq!(problems(&setup, &r), Vec::<String>::new(), "{t:?}");
            let sealed: Vec<_> = r.ended.export.bundles.iter().filter(|b| b.status == "sealed").collect();
            assert_eq!(sealed.len(), 1, "{t:?}: {:#?}", r.ended.export.bundles);
            assert_eq!(r.ended.export.bundles.len(), 1, "one bundle, never aborted: {t:?}");
            let torn = r.cards[member].2.id.to_hex();
            let rec = r.ended.export.cards.iter().find(|c| c.card_id == torn).expect("recorded");
            assert_eq!((rec.status.as_str(), rec.attempts), ("passed", 2), "{t:?}: {rec:?}");
        }
    }
}

#[test]
fn a_member_torn_at_finalize_and_not_put_back_leaves_the_sealed_members_failed_with_their_key_known() {
    let setup = Setup::new(bundle_profile());
    let clean = run(&setup, 3, None, true);
    let finalize = clean.cards[2].2.apdus - 1;
    // Backup 2 seals and leaves; it never comes back. The others are
    // sealed (rolled forward) and held for the profile's max_wait (2 s
    // here), then fail, not retryable: sealed cards cannot be reworked.
    // The operator puts them back anyway: they pass their recipe again,
    // find no partners, and are not released as unpaired (they hold a
    // wallet key): they fail again.
    let started = Instant::now();
    let r = run_with(&setup, 3, Some(Tear { member: 2, apdu: finalize, point: TearPoint::After }), true, &[1, 1, 0]);
    assert!(started.elapsed() >= Duration::from_secs(2), "the bundle waited for the torn card");
    assert!(r.ended.export.bundles.iter().all(|b| b.status == "aborted"), "{:#?}", r.ended.export.bundles);
    let journals = line::journals(&r.ended);
    for (i, (_, rb, view)) in r.cards.iter().enumerate() {
        let id = view.id.to_hex();
        let rec = r.ended.export.cards.iter().find(|c| c.card_id == id).expect("recorded");
        assert_eq!(rb.lifecycle, Some(Lifecycle::Sealed), "card {i}: {rb:?}");
        let want = format!("wallet key {}", rb.wallet_key.as_deref().expect("sealed with a key"));
        assert!(
            journals[&id]
                .iter()
                .any(|s| s.step == "pair_seal" && s.event == "intent" && s.detail.as_deref() == Some(want.as_str())),
            "card {i} holds a key its journal does not name: {:#?}",
            journals[&id]
        );
        // The torn card: failed retryable (it would be sealed when put
        // back); the held ones: failed for good.
        let want = if i == 2 { Some(true) } else { Some(false) };
        assert_eq!((rec.status.as_str(), rec.retryable), ("failed", want), "card {i}: {rec:?}");
        if i < 2 {
            assert_eq!(rec.attempts, 2, "card {i} was put back: {rec:?}");
            assert_eq!(
                rec.failure_reason.as_deref(),
                Some("holds a wallet key outside any recorded bundle"),
                "card {i}: {rec:?}"
            );
        }
    }
}

#[test]
fn a_card_torn_after_put_key_and_not_put_back_shows_the_rotation_in_flight_in_the_ledger() {
    // The ledger cannot know whether PUT KEY committed on a card that left
    // without answering: its row keeps the key version the session opened
    // with, and its journal shows the rotation's intent with no result, so
    // an operator (and the next attempt, which reads the card's version)
    // knows the card holds either key set.
    let setup = Setup::new(single_profile());
    let rotated = setup.profile.rotation.as_ref().expect("rotation").version;
    let cal = rig::plan::run::calibrate(&setup.profile, &setup.firmware).expect("calibration");
    let put_key = cal.first_apdu(station::recipe::Step::KeyRotation);
    let r = run_with(&setup, 1, Some(Tear { member: 0, apdu: put_key, point: TearPoint::After }), false, &[0]);
    let rec = &r.ended.export.cards[0];
    assert_eq!(
        (rec.status.as_str(), rec.failed_step.as_deref(), rec.retryable),
        ("failed", Some("key_rotation"), Some(true)),
        "{rec:?}"
    );
    assert_eq!(r.cards[0].2.key_versions, vec![rotated], "PUT KEY committed on the card");
    assert_eq!(rec.gp_key_version, Some(i64::from(setup.profile.factory_version)), "{rec:?}");
    let steps = &line::journals(&r.ended)[&rec.card_id];
    let rotation: Vec<&str> = steps.iter().filter(|s| s.step == "key_rotation").map(|s| s.event.as_str()).collect();
    assert_eq!(rotation, ["intent", "failed"], "{steps:#?}");
    assert_eq!(r.cards[0].1.key_version, Ok(rotated), "read back: the card opens a session with the new keys");
}
