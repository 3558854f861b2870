//! Hostile cards through the station's batch engine: counterfeit, revoked,
//! expired and malformed identities, replayed attestations, clones (one at
//! a time and two on two readers at once), altered R-MAC'd responses and
//! forged error status words. Every one is refused and quarantined (failed,
//! not retryable, FAIL bin, its reason in the ledger), none is recorded
//! passed, and nothing irreversible is done to a card on an answer that no
//! R-MAC vouched for: checked against the ledger and against the emulated
//! cards' real state.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use card::emu::factory::{ChipFactory, ChipKind};
use card::emu::{CardFaults, EmuCard, ResponseFlip, TearPoint};
use card::gp::ins;
use card::sw::StatusWord;
use card::transport::CardReader;
use card::transport::emu::EmuBank;
use station::batch::{self, Summary};
use station::firmware::Firmware;
use station::handler::{Bin, EmuFeeder};
use station::ledger::export::{self, CardExport, StepExport};
use station::ledger::{BatchInfo, Ledger, LedgerWriter};
use station::profile::Profile;
use station::recipe::{Recipe, reason};
use station::worker::Control;
use tapline_tests::demo_profile;

/// One station with one ledger, running batch after batch (cards come back
/// to the line in a later batch).
struct Line {
    profile: Arc<Profile>,
    firmware: Arc<Firmware>,
    ledger: Ledger,
    ledger_path: PathBuf,
    writer: Option<LedgerWriter>,
    _dir: tempfile::TempDir,
}

impl Line {
    fn new(profile: Profile) -> Self {
        let profile = Arc::new(profile);
        let firmware = Arc::new(Firmware::load(&profile.firmware_dir, &profile.release_keys).expect("firmware"));
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger_path = dir.path().join("ledger.db");
        let (ledger, writer) = Ledger::open(&ledger_path).expect("ledger");
        Self { profile, firmware, ledger, ledger_path, writer: Some(writer), _dir: dir }
    }

    /// Runs `cards` through the batch engine on `readers` emulated readers;
    /// the summary and every card with the bin it went to.
    fn batch(&self, readers: usize, cards: Vec<EmuCard>, speed: f64) -> (Summary, Vec<(Bin, EmuCard)>) {
        let target = cards.len();
        let batch_id = self
            .ledger
            .start_batch(BatchInfo {
                name: "hostile".into(),
                profile: "demo".into(),
                product: self.profile.product.clone(),
                firmware: self.firmware.manifest.name.clone(),
                firmware_sha256: hex::encode(self.firmware.load_file_sha256),
            })
            .expect("batch");
        let recipe =
            Arc::new(Recipe::new(Arc::clone(&self.profile), Arc::clone(&self.firmware), self.ledger.clone(), batch_id));
        let bank = EmuBank::new(readers, speed, Duration::from_millis(200));
        let feeder = Arc::new(EmuFeeder::new(bank.clone(), cards));
        feeder.fill();
        let mut monitor = bank;
        let output = batch::Output { labels: Some(self._dir.path().join("labels")), keep_outcomes: true };
        let summary =
            batch::run(&mut monitor, recipe, Arc::clone(&feeder) as _, Some(target), output, Control::new(), |_| {})
                .expect("batch runs");
        self.ledger.finish_batch(batch_id, None).expect("finish");
        (summary, feeder.take_bins())
    }

    fn cards(&self) -> HashMap<String, CardExport> {
        export::export(&self.ledger_path).expect("export").cards.into_iter().map(|c| (c.card_id.clone(), c)).collect()
    }

    fn steps(&self, id: &card::CardId) -> Vec<StepExport> {
        export::steps(&self.ledger_path, &id.to_hex()).expect("journal")
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if let Some(w) = self.writer.take() {
            drop(w);
        }
    }
}

fn no_bundles() -> Profile {
    let mut p = (*demo_profile()).clone();
    p.bundles = None;
    p
}

/// The APDU headers a fresh genuine card receives from the station on its
/// way to passing, to aim APDU-numbered faults at a command.
fn reference_headers(line: &Line) -> Vec<[u8; 4]> {
    let (_, bins) = line.batch(1, vec![ChipFactory::new(4242).make(ChipKind::Genuine, CardFaults::default())], 0.0);
    assert_eq!(bins[0].0, Bin::Pass, "the reference card passes");
    bins[0].1.headers().to_vec()
}

/// The APDU number (from 1) of the first command with this INS.
fn first_apdu(headers: &[[u8; 4]], ins: u8) -> u64 {
    headers.iter().position(|h| h[1] == ins).expect("command sent") as u64 + 1
}

/// Commands that change a card for good.
const IRREVERSIBLE: [u8; 5] = [ins::DELETE, ins::LOAD, ins::INSTALL, ins::PUT_KEY, ins::SET_STATUS];

/// The irreversible commands a card received from APDU `from` on.
fn irreversible_after(card: &EmuCard, from: u64) -> Vec<[u8; 4]> {
    card.headers().iter().skip(from as usize - 1).filter(|h| IRREVERSIBLE.contains(&h[1])).copied().collect()
}

/// A quarantined card: FAIL bin, failed not retryable at `step` with
/// `reason`, never passed, no serial.
fn assert_quarantined(rec: &CardExport, bin: Bin, step: &str, reason: &str) {
    assert_eq!(bin, Bin::Fail, "{rec:?}");
    assert_eq!(rec.status, "failed", "{rec:?}");
    assert_eq!(rec.failed_step.as_deref(), Some(step), "{rec:?}");
    assert_eq!(rec.failure_reason.as_deref(), Some(reason), "{rec:?}");
    assert_eq!(rec.retryable, Some(false), "{rec:?}");
    assert!(rec.serial.is_none(), "{rec:?}");
}

#[test]
fn hostile_identities_are_quarantined_with_their_reason() {
    let mut f = ChipFactory::new(808);
    let revoked_id = f.make(ChipKind::Genuine, CardFaults::default());
    let second_ca = *card::emu::factory::second_vendor_ca().verifying_key();
    let mut profile = no_bundles();
    profile.vendor_cas.push(second_ca);
    profile.revoked.cas.push(card::wallet::cert::ca_key_id(&second_ca));
    profile.revoked.card_ids.push(revoked_id.id());
    let line = Line::new(profile);

    let mut cards: Vec<(EmuCard, Option<(&str, &str)>)> = vec![
        (f.make(ChipKind::Counterfeit, CardFaults::default()), Some(("identify", reason::UNPINNED_CA))),
        (f.make(ChipKind::SecondVendor, CardFaults::default()), Some(("identify", reason::REVOKED_CA))),
        (revoked_id, Some(("identify", reason::REVOKED_CARD))),
        (f.make(ChipKind::Expired, CardFaults::default()), Some(("identify", reason::VALIDITY))),
        (
            f.make(ChipKind::MalformedCertificate, CardFaults::default()),
            Some(("identify", reason::MALFORMED_CERTIFICATE)),
        ),
        (
            f.make(ChipKind::Genuine, CardFaults { bad_signature: true, ..CardFaults::default() }),
            Some(("attestation", reason::SIGNATURE_INVALID)),
        ),
        (
            f.make(ChipKind::WrongDefaultKeys, CardFaults::default()),
            Some(("gp_session", "card cryptogram mismatch (wrong GP keys)")),
        ),
    ];
    for _ in 0..3 {
        cards.push((f.make(ChipKind::Genuine, CardFaults::default()), None));
    }
    let expected: HashMap<String, Option<(&str, &str)>> = cards.iter().map(|(c, e)| (c.id().to_hex(), *e)).collect();
    let (summary, bins) = line.batch(3, cards.into_iter().map(|(c, _)| c).collect(), 0.0);
    assert_eq!(summary.passed(), 3);

    let ledger = line.cards();
    assert_eq!(ledger.len(), 10, "every card recorded once");
    for (bin, card) in &bins {
        let rec = &ledger[&card.id().to_hex()];
        match expected[&card.id().to_hex()] {
            None => assert_eq!((*bin, rec.status.as_str()), (Bin::Pass, "passed"), "{rec:?}"),
            Some((step, why)) => {
                assert_quarantined(rec, *bin, step, why);
                if step == "identify" {
                    assert!(card.view().packages.is_empty(), "{}: nothing loaded", card.label());
                }
            }
        }
    }
    // Wrong GP keys: the card cryptogram was refused before EXTERNAL
    // AUTHENTICATE, which never reached the card.
    let (_, wrong_keys) = bins.iter().find(|(_, c)| c.label() == "wrong-default-keys").expect("card");
    assert_eq!(wrong_keys.view().auth_failures, 0);
    assert!(wrong_keys.headers().iter().all(|h| h[1] != ins::EXTERNAL_AUTHENTICATE), "{:02X?}", wrong_keys.headers());
    // The outcomes carry the same reasons (metrics count them by reason).
    for o in &summary.outcomes {
        let id = o.card_id.expect("identified").to_hex();
        if let (Some((_, why)), Err(f)) = (expected[&id], &o.result) {
            assert_eq!((f.reason.as_str(), f.retryable), (why, false));
        }
    }
}

#[test]
fn replays_clones_and_rollbacks_are_quarantined_and_the_same_card_is_recognised() {
    let line = Line::new(no_bundles());
    let self_test = first_apdu(&reference_headers(&line), card::wallet::ins::SELF_TEST);
    let mut f = ChipFactory::new(909);

    // Batch 1: a card passes; another is torn right after its attestation
    // (recorded with card key and counter 1); a third too, and comes back
    // with a relay replaying its attestation.
    let passed = f.make(ChipKind::Genuine, CardFaults::default());
    let torn = CardFaults { remove_at: Some((self_test, TearPoint::Before)), ..CardFaults::default() };
    let resumed = f.make(ChipKind::Genuine, torn.clone());
    let replayed = f.make(ChipKind::Genuine, torn);
    let (passed_id, resumed_id, replayed_id) = (passed.id(), resumed.id(), replayed.id());
    let (_, bins) = line.batch(3, vec![passed, resumed, replayed], 0.0);
    let mut back: HashMap<card::CardId, EmuCard> = bins.into_iter().map(|(_, c)| (c.id(), c)).collect();
    let before = line.cards()[&passed_id.to_hex()].clone();
    assert_eq!(before.status, "passed");
    assert_eq!(line.cards()[&resumed_id.to_hex()].attest_counter, Some(1));

    // Batch 2: the same cards, and clones of them.
    let mut replay = back.remove(&replayed_id).expect("card");
    replay.set_faults(CardFaults { replay_attestation: true, ..CardFaults::default() });
    let passed_again = back.remove(&passed_id).expect("card");
    let resumed_again = back.remove(&resumed_id).expect("card");
    let perfect_clone = f.make(ChipKind::Clone(passed_id), CardFaults::default());
    let batch2 = vec![replay, passed_again, perfect_clone];
    let (summary, bins) = line.batch(1, batch2, 0.0);
    assert_eq!(summary.passed(), 0);
    let reasons: Vec<(String, String)> = bins
        .iter()
        .zip(&summary.outcomes)
        .map(|((_, c), o)| (c.label().to_string(), o.result.as_ref().expect_err("refused").reason.clone()))
        .collect();
    assert_eq!(
        reasons,
        [
            ("genuine".to_string(), reason::REPLAYED.to_string()),
            ("genuine".to_string(), reason::ALREADY_PROVISIONED.to_string()),
            ("clone".to_string(), reason::CLONE_NO_PROOF.to_string()),
        ]
    );
    assert!(bins.iter().all(|(b, _)| *b == Bin::Fail));
    let ledger = line.cards();
    assert_quarantined(&ledger[&replayed_id.to_hex()], Bin::Fail, "identify", reason::REPLAYED);
    assert_eq!(ledger[&passed_id.to_hex()], before, "a passed record is never changed");
    let refused: Vec<String> = line
        .steps(&passed_id)
        .into_iter()
        .filter(|s| s.event == "refused")
        .map(|s| s.detail.unwrap_or_default())
        .collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused[0].starts_with(reason::ALREADY_PROVISIONED), "{refused:?}");
    assert!(refused[1].starts_with(reason::CLONE_NO_PROOF), "{refused:?}");

    // Batch 3: a perfect clone of the torn card, with firmware of its own,
    // attests a counter the ledger has already seen; then the torn card
    // itself comes back, proves its key and finishes.
    let mut rollback = f.make(ChipKind::Clone(resumed_id), CardFaults::default());
    install_firmware(&mut rollback, &line.firmware);
    let (summary, bins) = line.batch(1, vec![rollback, resumed_again], 0.0);
    assert_eq!(summary.passed(), 1);
    let first = summary.outcomes[0].result.as_ref().expect_err("clone refused");
    assert_eq!((first.reason.as_str(), first.retryable), (reason::COUNTER_BACKWARDS, false));
    assert_eq!(bins[0].0, Bin::Fail);
    let rec = &line.cards()[&resumed_id.to_hex()];
    assert_eq!((bins[1].0, rec.status.as_str()), (Bin::Pass, "passed"));
    assert_eq!(rec.attest_counter, Some(i64::from(bins[1].1.view().attest_counter)));
    let journal = line.steps(&resumed_id);
    assert!(
        journal
            .iter()
            .any(|s| s.event == "failed" && s.detail.as_deref().unwrap_or("").starts_with(reason::COUNTER_BACKWARDS)),
        "the clone's refusal is journaled: {journal:#?}"
    );
}

/// Loads and installs the demo firmware with the factory keys, as another
/// line would have.
fn install_firmware(card: &mut EmuCard, fw: &Firmware) {
    use card::gp::session::{GpSession, KeyRing, KeySource};
    let bank = EmuBank::new(1, 0.0, Duration::from_millis(50));
    let slot = &bank.slots()[0];
    let taken = std::mem::replace(card, ChipFactory::new(0).make(ChipKind::Genuine, CardFaults::default()));
    assert!(slot.insert(taken).is_ok());
    {
        let mut reader = bank.reader(0).expect("reader");
        let mut t = reader.connect().expect("connect");
        let ring = KeyRing::new().with(0xFF, KeySource::Static(card::gp::keys::StaticKeys::gp_default()));
        let mut gp =
            GpSession::open(&mut *t, &ring, 0, card::gp::scp03::SecurityLevel::CMacRMac).expect("factory session");
        gp.load(&fw.package_aid, &fw.load_file_sha256, &fw.load_file_data_block, 231, &mut |_, _| {}).expect("load");
        for a in &fw.applets {
            gp.install_for_install(&fw.package_aid, &a.class_aid, &a.instance_aid, a.privileges, &a.params)
                .expect("install");
        }
    }
    *card = slot.remove().expect("card back");
}

#[test]
fn two_cards_with_one_identity_on_two_readers_at_once_at_most_one_passes() {
    // With bundling on: the card that passes its recipe keeps its reader
    // (and its identity) while it waits for pairing.
    let mut profile = (*demo_profile()).clone();
    if let Some(b) = profile.bundles.as_mut() {
        // A bundle that cannot form ends the test in seconds, not minutes.
        b.max_wait = Duration::from_secs(20);
    }
    let line = Line::new(profile);
    let mut f = ChipFactory::new(1010);
    let original = f.make(ChipKind::Genuine, CardFaults::default());
    let id = original.id();
    let clone = f.make(ChipKind::Clone(id), CardFaults::default());
    let mut cards = vec![original, clone];
    cards.extend((0..2).map(|_| f.make(ChipKind::Genuine, CardFaults::default())));
    // Four readers, all cards at once; latency keeps them on their readers
    // together.
    let (summary, bins) = line.batch(4, cards, 0.05);
    let same: Vec<&(Bin, EmuCard)> = bins.iter().filter(|(_, c)| c.id() == id).collect();
    assert_eq!(same.len(), 2);
    let passes = same.iter().filter(|(b, _)| *b == Bin::Pass).count();
    assert_eq!(passes, 1, "exactly one chip of the identity passes (a perfect clone is indistinguishable)");
    for o in summary.outcomes.iter().filter(|o| o.card_id == Some(id) && !o.passed()) {
        let f = o.result.as_ref().expect_err("refused");
        assert_eq!((f.reason.as_str(), f.retryable), (reason::CLONE_ON_ANOTHER_READER, false), "{f:?}");
    }
    let rec = &line.cards()[&id.to_hex()];
    assert_eq!(rec.status, "passed");
    assert_eq!(rec.stage.as_deref(), Some("bundled"), "{rec:?}");
    assert_eq!(summary.bundles_sealed.len(), 1, "{:?}", summary.outcomes);
    let refusals = line.steps(&id).into_iter().filter(|s| s.event == "refused").count();
    assert_eq!(refusals, 1, "the refusal is journaled");
}

#[test]
fn an_altered_rmac_response_fails_the_card_and_nothing_is_decided_on_it() {
    let line = Line::new(no_bundles());
    let headers = reference_headers(&line);
    let (get_status, put_key) = (first_apdu(&headers, ins::GET_STATUS), first_apdu(&headers, ins::PUT_KEY));
    let mut f = ChipFactory::new(1111);
    // An older firmware on the card: GET STATUS lists it (data and R-MAC).
    let mut old = f.make(
        ChipKind::Genuine,
        CardFaults { flip_response: Some((get_status, ResponseFlip::Data)), ..CardFaults::default() },
    );
    let cap = rig::demo_wallet_cap((0, 9), 4000).expect("old cap");
    let cap = card::cap::CapFile::from_bytes(&cap).expect("parses");
    old.preload_package(
        &card::wallet::PACKAGE_AID,
        (0, 9),
        &cap.load_file(false),
        vec![card::wallet::APPLET_AID.to_vec()],
    );
    // PUT KEY's answer (key check values) reaches the host with its R-MAC
    // altered: the card did rotate.
    let rotated = f.make(
        ChipKind::Genuine,
        CardFaults { flip_response: Some((put_key, ResponseFlip::RMac)), ..CardFaults::default() },
    );
    let (old_id, rotated_id) = (old.id(), rotated.id());
    let (summary, bins) = line.batch(2, vec![old, rotated], 0.0);
    assert_eq!(summary.passed(), 0);
    let ledger = line.cards();
    let by_id: HashMap<card::CardId, &(Bin, EmuCard)> = bins.iter().map(|b| (b.1.id(), b)).collect();

    let (bin, card) = by_id[&old_id];
    assert_quarantined(&ledger[&old_id.to_hex()], *bin, "firmware", reason::RMAC_MISMATCH);
    assert_eq!(card.view().packages.len(), 1);
    assert_eq!(card.view().packages[0].version, (0, 9), "the old package is still there");
    assert_eq!(irreversible_after(card, get_status), Vec::<[u8; 4]>::new(), "nothing done after the altered answer");
    assert!(line.steps(&old_id).iter().all(|s| !(s.step == "firmware" && s.event == "done")));

    let (bin, card) = by_id[&rotated_id];
    let rec = &ledger[&rotated_id.to_hex()];
    assert_quarantined(rec, *bin, "key_rotation", reason::RMAC_MISMATCH);
    assert!(line.steps(&rotated_id).iter().all(|s| !(s.step == "key_rotation" && s.event == "done")));
    assert_eq!(rec.gp_key_version, Some(0xFF), "the rotation is not recorded as done");
    assert_eq!(card.view().key_versions, vec![1], "though the card did it");
    assert_eq!(irreversible_after(card, put_key + 1), Vec::<[u8; 4]>::new());

    // Back on the line, the station finds the key version the card really
    // has, authenticates with it, and finishes the card.
    let card = bins.into_iter().find(|(_, c)| c.id() == rotated_id).expect("card").1;
    let (summary, bins) = line.batch(1, vec![card], 0.0);
    assert_eq!(summary.passed(), 1, "{:?}", summary.outcomes);
    let rec = &line.cards()[&rotated_id.to_hex()];
    assert_eq!((rec.status.as_str(), rec.attempts, rec.gp_key_version), ("passed", 2, Some(1)));
    assert_eq!(bins[0].1.view().key_versions, vec![1]);
}

#[test]
fn a_forged_error_status_word_leads_to_no_irreversible_action() {
    let line = Line::new(no_bundles());
    let self_test = first_apdu(&reference_headers(&line), card::wallet::ins::SELF_TEST);
    let mut f = ChipFactory::new(1212);
    // A card torn after attestation: firmware installed, identity recorded.
    let torn = CardFaults { remove_at: Some((self_test, TearPoint::Before)), ..CardFaults::default() };
    let (_, bins) = line.batch(1, vec![f.make(ChipKind::Genuine, torn)], 0.0);
    let mut card = bins.into_iter().next().expect("card").1;
    let id = card.id();
    // Its wallet key exists (as after a pairing that was cut short): what a
    // DELETE of the package would destroy.
    {
        let bank = EmuBank::new(1, 0.0, Duration::from_millis(50));
        let slot = &bank.slots()[0];
        assert!(slot.insert(card).is_ok());
        {
            let mut reader = bank.reader(0).expect("reader");
            let mut t = reader.connect().expect("connect");
            let mut w = card::wallet::client::WalletClient::new(&mut *t);
            w.select().expect("select");
            w.generate_wallet_key().expect("keygen");
        }
        card = slot.remove().expect("card back");
    }
    let before = card.view();
    assert!(before.wallet_public_key.is_some());
    // The resumed run: SELECT ISD, GET DATA CPLC, GET DATA 7F21, SELECT
    // wallet, ATTEST (the proof of the recorded key), SELECT ISD,
    // INITIALIZE UPDATE, EXTERNAL AUTHENTICATE, GET STATUS packages, GET
    // STATUS applications: the card lists its instance, a relay swaps the
    // answer for 6A88 ("none"), which carries no R-MAC either way.
    let at = before.apdus + 10;
    card.set_faults(CardFaults {
        forged_error: Some((at, StatusWord::REFERENCED_DATA_NOT_FOUND)),
        ..CardFaults::default()
    });
    let (summary, bins) = line.batch(1, vec![card], 0.0);
    let (bin, card) = &bins[0];
    let header = card.headers()[at as usize - 1];
    assert_eq!((header[1], header[2]), (ins::GET_STATUS, 0x40), "the forged answer hit GET STATUS (applications)");
    let o = &summary.outcomes[0];
    let failure = o.result.as_ref().expect_err("the card is not passed");
    assert_eq!((failure.reason.as_str(), failure.retryable), (reason::UNAUTHENTICATED_ANSWER, false), "{failure:?}");
    let rec = &line.cards()[&id.to_hex()];
    assert_quarantined(rec, *bin, "firmware", reason::UNAUTHENTICATED_ANSWER);
    // Read back from the card: nothing was deleted, the wallet key is there.
    let after = card.view();
    assert_eq!(after.packages, before.packages);
    assert_eq!(after.instances, before.instances);
    assert_eq!(after.wallet_public_key, before.wallet_public_key);
    assert_eq!(after.wallet_lifecycle, before.wallet_lifecycle);
    assert_eq!(after.key_versions, before.key_versions);
    let irreversible = irreversible_after(card, at);
    assert!(
        irreversible.iter().all(|h| h[1] != ins::DELETE),
        "no DELETE on an unauthenticated answer: {irreversible:02X?}"
    );
}
