//! A whole batch on emulated readers with a mix of genuine and faulty
//! cards: every card ends in the right state with the right reason, the
//! ledger says exactly what the cards really are, and the faulty cards do
//! not hold up the other readers.

use std::collections::HashMap;

use card::emu::factory::{ChipFactory, ChipKind};
use card::emu::{CardFaults, EmuCard, TearPoint};
use station::handler::Bin;
use tapline_tests::{demo_profile, run_batch};

/// The cards of the batch and what each must end as: (card, expected
/// failed step or None for passed, reason fragment).
fn mixed_cards() -> Vec<(EmuCard, Option<&'static str>, &'static str)> {
    let mut f = ChipFactory::new(2026);
    let mut v = Vec::new();
    for i in 0..24 {
        let (card, step, reason) = match i % 8 {
            1 => (f.make(ChipKind::Counterfeit, CardFaults::default()), Some("identify"), "counterfeit"),
            3 => (
                // Pulled out in the middle of LOAD (APDU 40 of ~115).
                f.make(
                    ChipKind::Genuine,
                    CardFaults { remove_at: Some((40, TearPoint::Before)), ..CardFaults::default() },
                ),
                Some("firmware"),
                "card removed",
            ),
            5 => (
                f.make(ChipKind::Genuine, CardFaults { failing_kat: true, ..CardFaults::default() }),
                Some("self_tests"),
                "KAT failed",
            ),
            7 => (
                f.make(ChipKind::Genuine, CardFaults { mute_from: Some(20), ..CardFaults::default() }),
                Some("firmware"),
                "card mute",
            ),
            _ => (f.make(ChipKind::Genuine, CardFaults::default()), None, ""),
        };
        v.push((card, step, reason));
    }
    v
}

#[test]
fn mixed_batch_ends_every_card_in_the_right_state() {
    let cards = mixed_cards();
    let expected: HashMap<String, (Option<&str>, &str)> =
        cards.iter().map(|(c, s, r)| (c.id().to_hex(), (*s, *r))).collect();
    // Speed 0.02: latency still orders events realistically, run stays fast.
    let b = run_batch(demo_profile(), 4, cards.into_iter().map(|(c, _, _)| c).collect(), 0.02);

    assert_eq!(b.summary.outcomes.len(), 24);
    assert_eq!(b.export.cards.len(), 24, "every card recorded once");
    assert_eq!(b.summary.passed(), 12);
    for c in &b.export.cards {
        let (step, reason) = expected[&c.card_id];
        match step {
            None => {
                assert_eq!(c.status, "passed", "{c:?}");
                assert!(c.attested && c.self_tests, "{c:?}");
                assert_eq!(c.firmware_sha256.as_deref(), Some(hex::encode(b.firmware.load_file_sha256).as_str()));
                assert_eq!(c.gp_key_version, Some(1));
                assert!(c.serial.is_some());
            }
            Some(step) => {
                assert_eq!(c.status, "failed", "{c:?}");
                assert_eq!(c.failed_step.as_deref(), Some(step), "{c:?}");
                assert!(c.failure_reason.as_deref().unwrap_or("").contains(reason), "{c:?}");
                assert!(c.serial.is_none());
            }
        }
    }
    // Serials: unique and dense.
    let mut serials: Vec<i64> = b.export.cards.iter().filter_map(|c| c.serial).collect();
    serials.sort_unstable();
    assert_eq!(serials, (1..=12).collect::<Vec<_>>());
}

#[test]
fn the_ledger_matches_the_cards_real_state() {
    let cards = mixed_cards();
    let b = run_batch(demo_profile(), 3, cards.into_iter().map(|(c, _, _)| c).collect(), 0.0);
    assert_eq!(b.bins.len(), 24, "every card went to a bin");
    let ledger: HashMap<&str, &station::ledger::export::CardExport> =
        b.export.cards.iter().map(|c| (c.card_id.as_str(), c)).collect();
    for (bin, card) in &b.bins {
        let view = card.view();
        let rec = ledger[view.id.to_hex().as_str()];
        assert_eq!(*bin == Bin::Pass, rec.status == "passed", "{rec:?}");
        if rec.status == "passed" {
            // Recorded as done means done on the card.
            assert_eq!(view.packages.len(), 1);
            assert_eq!(view.packages[0].hash, b.firmware.load_file_sha256);
            assert_eq!(view.key_versions, vec![rec.gp_key_version.expect("key version") as u8]);
            assert_eq!(i64::from(view.attest_counter), rec.attest_counter.expect("counter"));
        }
        if let Some(v) = rec.gp_key_version {
            assert!(view.key_versions.contains(&(v as u8)), "ledger key version {v} not on card {view:?}");
        }
    }
}

#[test]
fn a_mute_card_does_not_stall_the_other_readers() {
    // One reader gets only mute cards; the other three keep provisioning.
    let mut f = ChipFactory::new(7);
    let cards: Vec<EmuCard> = (0..16)
        .map(|i| {
            let faults = if i % 4 == 0 {
                CardFaults { mute_from: Some(5), ..CardFaults::default() }
            } else {
                CardFaults::default()
            };
            f.make(ChipKind::Genuine, faults)
        })
        .collect();
    let b = run_batch(demo_profile(), 4, cards, 0.01);
    assert_eq!(b.summary.passed(), 12);
    assert_eq!(b.summary.failed(), 4);
    let readers: std::collections::HashSet<&str> =
        b.export.cards.iter().filter(|c| c.status == "passed").map(|c| c.reader.as_str()).collect();
    assert!(readers.len() >= 3, "passes came from several readers: {readers:?}");
}

#[test]
fn a_card_that_resets_mid_recipe_is_retried_on_its_reader_and_passes() {
    let mut f = ChipFactory::new(11);
    let glitchy = f.make(ChipKind::Genuine, CardFaults { reset_at: Some(35), ..CardFaults::default() });
    let id = glitchy.id().to_hex();
    let b = run_batch(demo_profile(), 1, vec![glitchy], 0.0);
    assert_eq!(b.summary.passed(), 1, "{:?}", b.summary.outcomes);
    let rec = b.export.cards.iter().find(|c| c.card_id == id).expect("recorded");
    assert_eq!((rec.status.as_str(), rec.attempts), ("passed", 2));
    assert_eq!(b.summary.first_pass_yield(), 0.0, "a retried card is not a first-pass card");
    let steps = station::ledger::export::steps(&b.ledger, &id).expect("journal");
    let failed: Vec<_> = steps.iter().filter(|s| s.event == "failed").collect();
    assert_eq!(failed.len(), 1, "{steps:#?}");
    assert!(failed[0].detail.as_deref().unwrap_or("").contains("reset"), "{failed:?}");
}

/// Seconds since the first timestamp's midnight, from the ledger's RFC 3339
/// UTC timestamps (`2026-11-25T01:02:03.456Z`).
fn ledger_secs(at: &str, day0: &str) -> f64 {
    let (date, time) = at.split_once('T').expect("ledger timestamp");
    let t: Vec<f64> = time.trim_end_matches('Z').split(':').map(|x| x.parse().expect("time field")).collect();
    let day = if date == day0 { 0.0 } else { 86_400.0 };
    day + t[0] * 3600.0 + t[1] * 60.0 + t[2]
}

fn utc_now() -> String {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock");
    station::ledger::format_utc(d.as_secs(), d.subsec_millis())
}

#[test]
fn a_reader_unplugged_mid_batch_leaves_the_others_at_their_rate_and_reconnects_within_5_s() {
    use std::sync::{Arc, Mutex, PoisonError};
    use std::time::{Duration, Instant};

    use card::transport::emu::EmuBank;
    use station::handler::EmuFeeder;
    use station::worker::{Event, LaneState};

    let mut profile = (*demo_profile()).clone();
    profile.bundles = None;
    let cards: Vec<EmuCard> = {
        let mut f = ChipFactory::new(4040);
        (0..64).map(|_| f.make(ChipKind::Genuine, CardFaults::default())).collect()
    };
    // Speed 0.05: about 0.27 s a card, 16 cards a reader.
    let bank = EmuBank::new(4, 0.05, Duration::from_millis(200));
    let feeder = Arc::new(EmuFeeder::new(bank.clone(), cards));
    feeder.fill();
    let unplugged = bank.slots()[0].id().clone();
    // (unplug, plug), each as ledger time and as Instant.
    type Moment = (String, Instant);
    let outage: Arc<Mutex<Option<(Moment, Moment)>>> = Arc::default();
    let log: Arc<Mutex<Vec<(Instant, Event)>>> = Arc::default();
    let (seen, when, slot) = (Arc::clone(&log), Arc::clone(&outage), Arc::clone(&bank.slots()[0]));
    let mut outcomes = 0;
    let b = tapline_tests::run_batch_watched(Arc::new(profile), Box::new(bank), feeder, 64, move |e| {
        seen.lock().unwrap_or_else(PoisonError::into_inner).push((Instant::now(), e.clone()));
        if matches!(e, Event::Outcome(_)) {
            outcomes += 1;
            // A quarter into the batch, reader 0 goes away for 1.5 s.
            if outcomes == 16 {
                let (when, slot) = (Arc::clone(&when), Arc::clone(&slot));
                std::thread::spawn(move || {
                    let from = (utc_now(), Instant::now());
                    slot.unplug();
                    std::thread::sleep(Duration::from_millis(1500));
                    let back = (utc_now(), Instant::now());
                    slot.plug();
                    *when.lock().unwrap_or_else(PoisonError::into_inner) = Some((from, back));
                });
            }
        }
    });
    let ((from_at, _), (back_at, back)) =
        outage.lock().unwrap_or_else(PoisonError::into_inner).take().expect("the reader was unplugged mid-batch");
    assert_eq!(b.summary.outcomes.len(), 64, "the batch finished");

    // Reconnect: from the reader's return to its next card started.
    let log = log.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let errors = log
        .iter()
        .filter(|(_, e)| matches!(e, Event::Lane { reader, state: LaneState::ReaderError(_) } if *reader == unplugged))
        .count();
    assert!(errors > 0, "the worker saw its reader gone");
    let reconnect = log
        .iter()
        .find(|(at, e)| {
            *at > back && matches!(e, Event::Lane { reader, state: LaneState::Working } if *reader == unplugged)
        })
        .map(|(at, _)| *at - back)
        .expect("the unplugged reader took a card again after it came back");

    // Per-reader pass rates from the ledger's timestamps: before the
    // unplug, during the outage, after it.
    let day0 = b
        .export
        .cards
        .iter()
        .map(|c| c.first_seen.as_str())
        .min()
        .expect("cards")
        .split_once('T')
        .expect("ts")
        .0
        .to_string();
    let start = b.export.cards.iter().map(|c| ledger_secs(&c.first_seen, &day0)).fold(f64::MAX, f64::min);
    let end = b.export.cards.iter().map(|c| ledger_secs(&c.updated_at, &day0)).fold(0.0, f64::max);
    let (t_from, t_back) = (ledger_secs(&from_at, &day0), ledger_secs(&back_at, &day0));
    let windows = [("before", start, t_from), ("outage", t_from, t_back), ("after", t_back, end)];
    let mut readers: Vec<&str> = b.export.cards.iter().map(|c| c.reader.as_str()).collect();
    readers.sort_unstable();
    readers.dedup();
    let mut others = [0.0f64; 3];
    println!(
        "reader unplugged: {unplugged} for 1.5 s; reconnected (next card started) {:.3} s after it came back",
        reconnect.as_secs_f64()
    );
    for r in &readers {
        let rates: Vec<f64> = windows
            .iter()
            .map(|(_, a, z)| {
                let n = b
                    .export
                    .cards
                    .iter()
                    .filter(|c| c.reader == *r && c.status == "passed")
                    .filter(|c| (*a..*z).contains(&ledger_secs(&c.updated_at, &day0)))
                    .count();
                n as f64 / (z - a).max(0.001)
            })
            .collect();
        println!(
            "  {r}: passed cards/s before {:.2}, during the outage {:.2}, after {:.2}",
            rates[0], rates[1], rates[2]
        );
        if *r != unplugged.as_str() {
            for (o, x) in others.iter_mut().zip(&rates) {
                *o += x;
            }
        }
    }
    println!(
        "  the other readers together: before {:.2}, during {:.2}, after {:.2} cards/s",
        others[0], others[1], others[2]
    );
    // The other readers do not wait for the missing one: their combined
    // rate during the outage stays within half of what it was before (the
    // margin absorbs scheduling noise on a loaded machine; a stall would
    // take it to 0).
    assert!(others[1] >= 0.5 * others[0], "the other readers slowed down during the outage: {others:?}");
    // The worker retries a reader that errs every second (worker::run), so
    // a reader back is serving again within about 1.2 s; 5 s is the goal,
    // and only a process stalled for seconds could miss it.
    assert!(reconnect < Duration::from_secs(5), "reconnect took {reconnect:?}");
    // The card in the reader when it went away is retryable or passed.
    for c in b.export.cards.iter().filter(|c| c.status != "passed") {
        assert_eq!(c.retryable, Some(true), "{c:?}");
        assert!(c.failure_reason.as_deref().unwrap_or("").contains("not available"), "{c:?}");
    }
}
