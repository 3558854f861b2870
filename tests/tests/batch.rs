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
