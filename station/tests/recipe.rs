//! The recipe against emulated cards, one card at a time: what passes, what
//! is refused and why, and that an interrupted card resumes. Uses the repo's
//! demo profile and firmware.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use card::emu::factory::{ChipFactory, ChipKind};
use card::emu::{CardFaults, EmuCard, TearPoint};
use card::transport::CardReader;
use card::transport::emu::EmuBank;
use station::firmware::Firmware;
use station::ledger::export::{self, CardExport};
use station::ledger::{BatchInfo, Ledger, LedgerWriter};
use station::profile::Profile;
use station::recipe::{CardOutcome, Recipe, Step, reason};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Rig {
    recipe: Recipe,
    bank: EmuBank,
    ledger_path: PathBuf,
    writer: Option<LedgerWriter>,
    _dir: tempfile::TempDir,
}

impl Rig {
    fn new() -> Self {
        Self::with(|_| {})
    }

    /// A rig whose demo profile `edit` changed first.
    fn with(edit: impl FnOnce(&mut Profile)) -> Self {
        // The card's own recipe: without bundling a card that passes it is
        // recorded passed at once (pairing is tested in tests/).
        let mut profile = Profile::load(&repo().join("profiles/demo.yaml")).expect("demo profile");
        profile.bundles = None;
        edit(&mut profile);
        let profile = Arc::new(profile);
        let fw = Arc::new(Firmware::load(&profile.firmware_dir, &profile.release_keys).expect("demo firmware"));
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger_path = dir.path().join("ledger.db");
        let (ledger, writer) = Ledger::open(&ledger_path).expect("ledger");
        let batch = ledger
            .start_batch(BatchInfo {
                name: "test".into(),
                profile: "demo".into(),
                product: profile.product.clone(),
                firmware: "demo".into(),
                firmware_sha256: hex::encode(fw.load_file_sha256),
            })
            .expect("batch");
        let recipe = Recipe::new(profile, fw, ledger, batch);
        Self {
            recipe,
            bank: EmuBank::new(1, 0.0, std::time::Duration::from_millis(50)),
            ledger_path,
            writer: Some(writer),
            _dir: dir,
        }
    }

    /// Inserts the card, runs the recipe once, takes the card out again.
    fn run(&self, card: EmuCard) -> (CardOutcome, EmuCard) {
        let slot = &self.bank.slots()[0];
        assert!(slot.insert(card).is_ok(), "slot free");
        let mut reader = self.bank.reader(0).expect("reader");
        let id = reader.id().clone();
        let outcome = {
            let mut t = reader.connect().expect("connect");
            self.recipe.run(&id, &mut *t, &mut |_| {}).expect("ledger up")
        };
        let card = slot.remove().expect("card back");
        (outcome, card)
    }

    fn export(&self) -> Vec<CardExport> {
        export::export(&self.ledger_path).expect("export").cards
    }

    fn card(&self, id: &card::CardId) -> CardExport {
        self.export().into_iter().find(|c| c.card_id == id.to_hex()).expect("card in ledger")
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(w) = self.writer.take() {
            // The recipe holds a Ledger handle; the writer ends when the
            // last handle is gone, so don't join here.
            drop(w);
        }
    }
}

fn failure(o: &CardOutcome) -> &station::recipe::Failure {
    o.result.as_ref().expect_err("card should have failed")
}

#[test]
fn genuine_card_passes_with_everything_recorded() {
    let rig = Rig::new();
    let mut factory = ChipFactory::new(1);
    let (outcome, card) = rig.run(factory.make(ChipKind::Genuine, CardFaults::default()));
    let serial = outcome.result.as_ref().expect("passes").serial.expect("a serial");
    let id = card.id();
    let rec = rig.card(&id);
    assert_eq!(rec.status, "passed");
    assert_eq!(rec.stage.as_deref(), Some("ready_for_pairing"));
    assert_eq!(rec.serial, Some(serial));
    assert!(rec.attested && rec.self_tests);
    assert_eq!(rec.gp_key_version, Some(1), "rotated to the profile's version");
    assert_eq!(rec.firmware_sha256.as_deref(), Some(hex::encode(rig.recipe.firmware.load_file_sha256).as_str()));
    // The ledger agrees with the card itself.
    let view = card.view();
    assert_eq!(view.key_versions, vec![1]);
    assert_eq!(view.packages.len(), 1);
    assert_eq!(view.packages[0].hash, rig.recipe.firmware.load_file_sha256);
    assert_eq!(rec.attest_counter, Some(i64::from(view.attest_counter)));
    // Every step journaled intent then done, in recipe order.
    let steps = export::steps(&rig.ledger_path, &id.to_hex()).expect("steps");
    let done: Vec<&str> = steps.iter().filter(|s| s.event == "done").map(|s| s.step.as_str()).collect();
    assert_eq!(
        done,
        ["identify", "gp_session", "firmware", "key_rotation", "attestation", "self_tests", "record"],
        "{steps:#?}"
    );
    for s in Step::ALL.iter().filter(|s| **s != Step::Record) {
        let i = steps.iter().position(|x| x.step == s.name() && x.event == "intent").expect("intent");
        let d = steps.iter().position(|x| x.step == s.name() && x.event == "done").expect("done");
        assert!(i < d, "{s}: intent before done");
    }
}

#[test]
fn counterfeit_is_refused_at_identify_before_any_load() {
    let rig = Rig::new();
    let mut factory = ChipFactory::new(2);
    let (outcome, card) = rig.run(factory.make(ChipKind::Counterfeit, CardFaults::default()));
    let f = failure(&outcome);
    assert_eq!(f.step, Step::Identify);
    assert!(f.reason.contains("counterfeit"), "{f:?}");
    assert!(!f.retryable);
    assert!(card.view().packages.is_empty(), "nothing loaded onto a counterfeit");
    let rec = rig.card(&card.id());
    assert_eq!((rec.status.as_str(), rec.failed_step.as_deref()), ("failed", Some("identify")));
    assert!(!rec.attested);
}

#[test]
fn expired_certificate_and_wrong_default_keys_are_refused() {
    let rig = Rig::new();
    let mut factory = ChipFactory::new(3);
    let (o, _) = rig.run(factory.make(ChipKind::Expired, CardFaults::default()));
    assert_eq!(failure(&o).reason, "certificate outside its validity");
    let (o, card) = rig.run(factory.make(ChipKind::WrongDefaultKeys, CardFaults::default()));
    let f = failure(&o);
    assert_eq!(f.step, Step::Session);
    assert!(f.reason.contains("card cryptogram mismatch"), "{f:?}");
    assert_eq!(card.view().auth_failures, 0, "EXTERNAL AUTHENTICATE was never sent with wrong keys");
}

#[test]
fn self_test_faults_fail_the_card_with_the_reason() {
    let rig = Rig::new();
    let mut factory = ChipFactory::new(4);
    let cases: [(CardFaults, Step, &str); 4] = [
        (CardFaults { failing_kat: true, ..CardFaults::default() }, Step::SelfTests, "KAT failed: ECDSA"),
        (CardFaults { stuck_rng: true, ..CardFaults::default() }, Step::SelfTests, "KAT failed: RNG"),
        (CardFaults { bad_memory: true, ..CardFaults::default() }, Step::SelfTests, "memory self-test failed"),
        (
            CardFaults { bad_signature: true, ..CardFaults::default() },
            Step::Attestation,
            "attestation signature invalid",
        ),
    ];
    for (faults, step, reason) in cases {
        let (o, card) = rig.run(factory.make(ChipKind::Genuine, faults));
        let f = failure(&o);
        assert_eq!((f.step, f.reason.as_str()), (step, reason));
        let rec = rig.card(&card.id());
        assert_eq!(rec.status, "failed");
        assert_eq!(rec.failed_step.as_deref(), Some(step.name()));
        assert!(!rec.self_tests);
    }
}

#[test]
fn card_removed_mid_load_fails_retryable_and_finishes_when_reinserted() {
    let rig = Rig::new();
    let mut factory = ChipFactory::new(5);
    // APDU 30 is well inside LOAD (identify and session take about 8).
    let faults = CardFaults { remove_at: Some((30, TearPoint::After)), ..CardFaults::default() };
    let (o, card) = rig.run(factory.make(ChipKind::Genuine, faults));
    let f = failure(&o);
    assert_eq!((f.step, f.reason.as_str(), f.retryable), (Step::Firmware, "card removed", true));
    assert!(card.view().packages.is_empty(), "a torn load leaves no package");
    let rec = rig.card(&card.id());
    assert_eq!((rec.status.as_str(), rec.retryable), ("failed", Some(true)));

    let (o, card) = rig.run(card);
    assert!(o.passed(), "{:?}", o.result);
    assert_eq!(o.attempt, 2);
    let rec = rig.card(&card.id());
    assert_eq!((rec.status.as_str(), rec.attempts), ("passed", 2));
}

#[test]
fn tearing_after_every_apdu_resumes_to_a_fully_provisioned_card() {
    let rig = Rig::new();
    let mut factory = ChipFactory::new(6);
    // Find the PUT KEY: run a clean card and count APDUs up to rotation.
    let (clean, clean_card) = rig.run(factory.make(ChipKind::Genuine, CardFaults::default()));
    assert!(clean.passed());
    let total = clean_card.view().apdus;
    let mut resumed = 0;
    for n in 1..=total {
        for point in [TearPoint::Before, TearPoint::After] {
            let faults = CardFaults { remove_at: Some((n, point)), ..CardFaults::default() };
            let (o, card) = rig.run(factory.make(ChipKind::Genuine, faults));
            if o.passed() {
                continue;
            }
            assert!(failure(&o).retryable, "APDU {n} {point:?}: {:?}", o.result);
            let (again, card) = rig.run(card);
            assert!(again.passed(), "APDU {n} {point:?}: resume failed: {:?}", again.result);
            let rec = rig.card(&card.id());
            assert_eq!(rec.gp_key_version, Some(1));
            assert_eq!(card.view().key_versions, vec![1], "the ledger's key version is the card's");
            resumed += 1;
        }
    }
    assert!(resumed as u64 >= total, "every APDU of the recipe was torn at least once ({resumed})");
}

#[test]
fn wrong_firmware_already_on_the_card_is_replaced() {
    let rig = Rig::new();
    let mut factory = ChipFactory::new(7);
    let mut card = factory.make(ChipKind::Genuine, CardFaults::default());
    let old = rig::demo_wallet_cap((0, 9), 4000).expect("old cap");
    let cap = card::cap::CapFile::from_bytes(&old).expect("parses");
    card.preload_package(
        &card::wallet::PACKAGE_AID,
        (0, 9),
        &cap.load_file(false),
        vec![card::wallet::APPLET_AID.to_vec()],
    );
    let (o, card) = rig.run(card);
    assert!(o.passed(), "{:?}", o.result);
    assert_eq!(card.view().packages[0].hash, rig.recipe.firmware.load_file_sha256);
    let steps = export::steps(&rig.ledger_path, &card.id().to_hex()).expect("steps");
    let fw = steps.iter().find(|s| s.step == "firmware" && s.event == "done").expect("firmware done");
    assert!(fw.detail.as_deref().unwrap_or("").contains("after deleting"), "{fw:?}");
}

/// Loads and installs the demo firmware with the factory keys, as an
/// earlier line would have (a clone that went through a line of its own).
fn with_firmware(rig: &Rig, card: EmuCard) -> EmuCard {
    use card::gp::session::{GpSession, KeyRing, KeySource};
    let slot = &rig.bank.slots()[0];
    assert!(slot.insert(card).is_ok(), "slot free");
    {
        let mut reader = rig.bank.reader(0).expect("reader");
        let mut t = reader.connect().expect("connect");
        let ring = KeyRing::new().with(0xFF, KeySource::Static(card::gp::keys::StaticKeys::gp_default()));
        let mut gp =
            GpSession::open(&mut *t, &ring, 0, card::gp::scp03::SecurityLevel::CMacRMac).expect("factory session");
        let fw = &rig.recipe.firmware;
        gp.load(&fw.package_aid, &fw.load_file_sha256, &fw.load_file_data_block, 231, &mut |_, _| {}).expect("load");
        for a in &fw.applets {
            gp.install_for_install(&fw.package_aid, &a.class_aid, &a.instance_aid, a.privileges, &a.params)
                .expect("install");
        }
    }
    slot.remove().expect("card back")
}

/// The journal lines of a card's refusals at identify.
fn refusals(rig: &Rig, id: &card::CardId) -> Vec<String> {
    let steps = export::steps(&rig.ledger_path, &id.to_hex()).expect("steps");
    steps.into_iter().filter(|s| s.event == "refused").map(|s| s.detail.unwrap_or_default()).collect()
}

#[test]
fn a_passed_card_presented_again_proves_its_key_and_clones_cannot() {
    let rig = Rig::new();
    let mut factory = ChipFactory::new(8);
    let (o, card) = rig.run(factory.make(ChipKind::Genuine, CardFaults::default()));
    assert!(o.passed());
    let id = card.id();
    let before = rig.card(&id);
    assert_eq!(before.attest_counter, Some(1));

    // The same card again: it signs a fresh challenge with the recorded key.
    let (o, card) = rig.run(card);
    let f = failure(&o);
    assert_eq!((f.step, f.reason.as_str(), f.retryable), (Step::Identify, reason::ALREADY_PROVISIONED, false));
    assert_eq!(card.view().attest_counter, 2, "it was challenged");

    // Clones: a perfect one (card key copied) fresh from the factory has no
    // applet to sign with; one that went through a line of its own has a
    // counter behind the recorded one; an identity copy (certificate and
    // CPLC, but not the key) cannot sign for the recorded key.
    let bare = factory.make(ChipKind::Clone(id), CardFaults::default());
    let loaded = with_firmware(&rig, factory.make(ChipKind::Clone(id), CardFaults::default()));
    let copy = with_firmware(&rig, factory.make(ChipKind::CopiedIdentity(id), CardFaults::default()));
    for (clone, expected) in
        [(bare, reason::CLONE_NO_PROOF), (loaded, reason::COUNTER_BACKWARDS), (copy, reason::CLONE_NO_PROOF)]
    {
        let label = clone.label().to_string();
        let (o, clone) = rig.run(clone);
        let f = failure(&o);
        assert_eq!((f.step, f.reason.as_str(), f.retryable), (Step::Identify, expected, false), "{label}");
        assert!(clone.view().key_versions == vec![0xFF], "{label}: nothing done to the clone's card manager");
    }
    assert_eq!(rig.card(&id), before, "the passed record is untouched");
    let lines = refusals(&rig, &id);
    assert_eq!(lines.len(), 4, "{lines:#?}");
    assert!(lines[0].starts_with(reason::ALREADY_PROVISIONED), "{lines:?}");
    assert!(lines[1].starts_with(reason::CLONE_NO_PROOF), "{lines:?}");
    assert!(lines[2].starts_with(reason::COUNTER_BACKWARDS), "{lines:?}");
    assert!(lines[3].starts_with(reason::CLONE_NO_PROOF), "{lines:?}");
}

/// The APDU number (from 1) of the first command with this INS in a clean
/// run of a genuine card.
fn first_apdu(rig: &Rig, ins: u8) -> u64 {
    let (o, card) = rig.run(ChipFactory::new(99).make(ChipKind::Genuine, CardFaults::default()));
    assert!(o.passed(), "{:?}", o.result);
    card.headers().iter().position(|h| h[1] == ins).expect("command sent") as u64 + 1
}

#[test]
fn a_resumed_card_must_prove_its_recorded_key_and_counter() {
    let rig = Rig::new();
    let self_test = first_apdu(&rig, card::wallet::ins::SELF_TEST);
    let mut factory = ChipFactory::new(10);
    // Torn right after attestation: recorded with its key and counter 1.
    let torn = CardFaults { remove_at: Some((self_test, TearPoint::Before)), ..CardFaults::default() };
    let (o, original) = rig.run(factory.make(ChipKind::Genuine, torn));
    assert!(failure(&o).retryable);
    let id = original.id();
    assert_eq!(rig.card(&id).attest_counter, Some(1));

    // A perfect clone with its own firmware attests counter 1 again.
    let clone = with_firmware(&rig, factory.make(ChipKind::Clone(id), CardFaults::default()));
    let (o, _) = rig.run(clone);
    let f = failure(&o);
    assert_eq!((f.step, f.reason.as_str(), f.retryable), (Step::Identify, reason::COUNTER_BACKWARDS, false));
    let rec = rig.card(&id);
    assert_eq!((rec.status.as_str(), rec.retryable), ("failed", Some(false)));
    assert_eq!(rec.failure_reason.as_deref(), Some(reason::COUNTER_BACKWARDS));

    // An identity copy cannot sign for the recorded key.
    let copy = with_firmware(&rig, factory.make(ChipKind::CopiedIdentity(id), CardFaults::default()));
    let (o, _) = rig.run(copy);
    assert_eq!(failure(&o).reason, reason::CLONE_NO_PROOF);

    // The original proves its key (counter 2 now) and finishes.
    let (o, original) = rig.run(original);
    assert!(o.passed(), "{:?}", o.result);
    let rec = rig.card(&id);
    assert_eq!(rec.attest_counter, Some(i64::from(original.view().attest_counter)));
    let steps = export::steps(&rig.ledger_path, &id.to_hex()).expect("steps");
    let identify = steps.iter().rev().find(|s| s.step == "identify" && s.event == "done").expect("identify done");
    assert!(identify.detail.as_deref().unwrap_or("").contains("proved the recorded card key"), "{identify:?}");
}

#[test]
fn a_replayed_attestation_is_refused() {
    let rig = Rig::new();
    let self_test = first_apdu(&rig, card::wallet::ins::SELF_TEST);
    let mut factory = ChipFactory::new(11);
    let torn = CardFaults { remove_at: Some((self_test, TearPoint::Before)), ..CardFaults::default() };
    let (o, mut card) = rig.run(factory.make(ChipKind::Genuine, torn));
    assert!(failure(&o).retryable);
    // From now on a relay answers every ATTEST with the one it recorded.
    card.set_faults(CardFaults { replay_attestation: true, ..CardFaults::default() });
    let (o, card) = rig.run(card);
    let f = failure(&o);
    assert_eq!((f.step, f.reason.as_str(), f.retryable), (Step::Identify, reason::REPLAYED, false), "{f:?}");
    let rec = rig.card(&card.id());
    assert_eq!((rec.status.as_str(), rec.failure_reason.as_deref()), ("failed", Some(reason::REPLAYED)));
    assert_eq!(card.view().packages.len(), 1, "nothing deleted or loaded after the replay");
}

#[test]
fn revoked_malformed_and_unpinned_certificates_are_refused_before_any_load() {
    let mut factory = ChipFactory::new(12);
    let revoked_id = factory.make(ChipKind::Genuine, CardFaults::default());
    let revoked_key = factory.make(ChipKind::Genuine, CardFaults::default());
    let revoked_key_bytes: [u8; 33] = {
        let cert = card::wallet::cert::Certificate::parse(&{
            // The certificate as the card gives it out (GET DATA 7F21).
            let bank = card::transport::emu::EmuBank::new(1, 0.0, std::time::Duration::from_millis(50));
            let slot = &bank.slots()[0];
            let c = factory.make(ChipKind::Clone(revoked_key.id()), CardFaults::default());
            assert!(slot.insert(c).is_ok());
            let mut reader = bank.reader(0).expect("reader");
            let mut t = reader.connect().expect("connect");
            card::gp::session::read_identity(&mut *t).expect("read").expect("certificate")
        })
        .expect("parses");
        cert.public_key
    };
    let second_ca = *card::emu::factory::second_vendor_ca().verifying_key();
    let rig = Rig::with(|p| {
        p.vendor_cas.push(second_ca);
        p.revoked.cas.push(card::wallet::cert::ca_key_id(&second_ca));
        p.revoked.card_ids.push(revoked_id.id());
        p.revoked.card_keys.push(revoked_key_bytes);
    });
    let cases = [
        (factory.make(ChipKind::SecondVendor, CardFaults::default()), reason::REVOKED_CA),
        (revoked_id, reason::REVOKED_CARD),
        (revoked_key, reason::REVOKED_CARD),
        (factory.make(ChipKind::MalformedCertificate, CardFaults::default()), reason::MALFORMED_CERTIFICATE),
        (factory.make(ChipKind::Counterfeit, CardFaults::default()), reason::UNPINNED_CA),
        (factory.make(ChipKind::Expired, CardFaults::default()), reason::VALIDITY),
    ];
    for (card, expected) in cases {
        let label = card.label().to_string();
        let (o, card) = rig.run(card);
        let f = failure(&o);
        assert_eq!((f.step, f.reason.as_str(), f.retryable), (Step::Identify, expected, false), "{label}: {f:?}");
        assert!(card.view().packages.is_empty(), "{label}: nothing loaded");
        let rec = rig.card(&card.id());
        assert_eq!(rec.status, "failed", "{label}");
        assert_eq!(rec.failure_reason.as_deref(), Some(expected), "{label}");
        assert_eq!(rec.retryable, Some(false), "{label}");
    }
    // A genuine card of the first vendor still passes.
    let (o, _) = rig.run(factory.make(ChipKind::Genuine, CardFaults::default()));
    assert!(o.passed(), "{:?}", o.result);
}

#[test]
fn a_card_without_a_card_manager_is_unsupported_and_not_recorded() {
    let rig = Rig::new();
    let mut factory = ChipFactory::new(9);
    // A card that answers every command with "instruction not supported"
    // (SELECT included) stands for a foreign card.
    let foreign = factory.make(
        ChipKind::Genuine,
        CardFaults { wrong_sw: Some((0xA4, card::sw::StatusWord::FILE_NOT_FOUND)), ..CardFaults::default() },
    );
    let (o, _) = rig.run(foreign);
    let f = failure(&o);
    assert_eq!(f.step, Step::Identify);
    assert!(f.reason.starts_with("unsupported card:"), "{f:?}");
    assert!(!f.retryable);
    assert!(rig.export().is_empty(), "nothing recorded for a card that is not ours");
}
