//! Integration tests that drive the real host side (GpSession, WalletClient,
//! the Transport seam) against the card emulator behind emulated readers
//! (EmuBank / EmuReader at speed 0), to show that the emulator is a faithful
//! model: SCP03 at every level, firmware load and install, key rotation,
//! atomicity under tearing, LOAD integrity, the wallet applet, chip identity,
//! hostile input and the latency model. Every check reads the card's real
//! state (EmuCard::view) as well as what the host was told.

use std::sync::Arc;
use std::time::{Duration, Instant};

use card::apdu::Command;
use card::cap::{CapBuilder, CapFile};
use card::emu::factory::{
    CERT_NOT_BEFORE, ChipFactory, ChipKind, DEFAULT_KEY_VERSION, counterfeit_ca, demo_vendor_ca_public,
};
use card::emu::latency::LatencyModel;
use card::emu::{AUTH_FAILURE_LIMIT, CardFaults, CardView, EmuCard, PackageView, TearPoint};
use card::gp::keys::{AesKey, Diversification, StaticKeys};
use card::gp::scp03::{ResponseAuth, Scp03Error, SecurityLevel};
use card::gp::session::{GpSession, KeyRing, KeySource, read_cplc, select_isd};
use card::gp::{ISD_AID, StatusScope, app_state, card_state, ins as gp_ins};
use card::transport::emu::{EmuBank, EmuReader, EmuSlot};
use card::transport::{Atr, CardReader, Transport, TransportError};
use card::wallet::cert::{CertError, Certificate};
use card::wallet::client::WalletClient;
use card::wallet::{APPLET_AID, Attestation, Lifecycle, PACKAGE_AID, self_test};
use card::{CardError, CardId, StatusWord};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------
// Fixtures

/// A time inside the validity of genuine certificates (one year after issue).
const NOW: u64 = CERT_NOT_BEFORE + 365 * 86_400;
/// The key version a station rotates to.
const NEW_KVN: u8 = 0x30;
/// The largest LOAD block that fits a short APDU with C-DECRYPTION padding
/// and C-MAC: 255 - 16 - 8.
const GPPRO_BLOCK: usize = 231;
/// The brief's 20 KB applet.
const CAP_20K: usize = 20 * 1024;
/// A small CAP for tests that load many cards.
const CAP_SMALL: usize = 2000;
const SMALL_BLOCK: usize = 150;
/// A second, unrelated package with an inert applet.
const OTHER_PACKAGE: [u8; 6] = [0xF0, 0x54, 0x45, 0x53, 0x54, 0x01];
const OTHER_APPLET: [u8; 7] = [0xF0, 0x54, 0x45, 0x53, 0x54, 0x01, 0x01];

/// A firmware image as the station holds it: the C4-wrapped load file data
/// block and the SHA-256 of the load file (INSTALL [for load] hash).
struct Firmware {
    data_block: Vec<u8>,
    hash: [u8; 32],
    version: (u8, u8),
}

fn build_firmware(package: &[u8], name: &str, applet: &[u8], code_size: usize) -> Firmware {
    let zip = CapBuilder::new(package, name)
        .package_version(1, 2)
        .applet(applet)
        .code_size(code_size)
        .build()
        .expect("CapBuilder makes a valid CAP");
    let cap = CapFile::from_bytes(&zip).expect("the built CAP parses");
    assert_eq!(cap.load_file_len(false), code_size, "CapBuilder hits the requested size");
    Firmware {
        data_block: cap.load_file_data_block(false),
        hash: cap.load_file_sha256(false),
        version: cap.package_version(),
    }
}

fn wallet_firmware(code_size: usize) -> Firmware {
    build_firmware(&PACKAGE_AID, "tapline/wallet", &APPLET_AID, code_size)
}

fn genuine(seed: u64) -> EmuCard {
    ChipFactory::new(seed).make(ChipKind::Genuine, CardFaults::default())
}

fn default_ring() -> KeyRing {
    KeyRing::new().with(DEFAULT_KEY_VERSION, KeySource::Static(StaticKeys::gp_default()))
}

/// The station's master key for rotated cards (DEMO ONLY test value).
fn master() -> StaticKeys {
    StaticKeys::new(AesKey::new([0x11; 16]), AesKey::new([0x22; 16]), AesKey::new([0x33; 16]))
}

fn rotated_source() -> KeySource {
    KeySource::Diversified { master: master(), scheme: Diversification::Kdf3 }
}

/// Both key sets a station knows: the vendor default and the rotated one.
fn station_ring() -> KeyRing {
    default_ring().with(NEW_KVN, rotated_source())
}

/// One emulated reader at speed 0 holding `card`.
fn rig(card: EmuCard) -> (EmuBank, Arc<EmuSlot>, EmuReader) {
    let bank = EmuBank::new(1, 0.0, Duration::from_millis(100));
    let slot = Arc::clone(&bank.slots()[0]);
    slot.insert(card).expect("a new bank has empty slots");
    let reader = bank.reader(0).expect("reader 0 exists");
    (bank, slot, reader)
}

/// Runs `f` on the card in the slot. Taking the card out and putting it back
/// is a power cycle: connected transports go stale, RAM is lost.
fn with_card<R>(slot: &EmuSlot, f: impl FnOnce(&EmuCard) -> R) -> R {
    let card = slot.remove().expect("a card in the slot");
    let r = f(&card);
    slot.insert(card).expect("the slot was just emptied");
    r
}

fn view(slot: &EmuSlot) -> CardView {
    with_card(slot, EmuCard::view)
}

fn power_cycle(slot: &EmuSlot) {
    with_card(slot, |_| ());
}

/// Records every raw command APDU that goes to the card.
struct Recorder<'a> {
    inner: Box<dyn Transport + Send + 'a>,
    sent: Vec<Vec<u8>>,
}

impl<'a> Recorder<'a> {
    fn new(inner: Box<dyn Transport + Send + 'a>) -> Self {
        Self { inner, sent: Vec::new() }
    }

    fn ins(&self) -> Vec<u8> {
        self.sent.iter().map(|a| a[1]).collect()
    }
}

impl Transport for Recorder<'_> {
    fn transmit_raw(&mut self, apdu: &[u8]) -> Result<Vec<u8>, TransportError> {
        self.sent.push(apdu.to_vec());
        self.inner.transmit_raw(apdu)
    }

    fn atr(&self) -> &Atr {
        self.inner.atr()
    }

    fn reset(&mut self) -> Result<(), TransportError> {
        self.inner.reset()
    }
}

fn status_of(e: &CardError) -> Option<StatusWord> {
    match e {
        CardError::Status { sw, .. } => Some(*sw),
        _ => None,
    }
}

/// Loads `fw` (as `package`) and installs `applet` with a default-key session.
fn provision_package(t: &mut dyn Transport, package: &[u8], applet: &[u8], fw: &Firmware) -> Result<(), CardError> {
    let mut gp = GpSession::open(t, &default_ring(), 0, SecurityLevel::CMac)?;
    gp.load(package, &fw.hash, &fw.data_block, SMALL_BLOCK, &mut |_, _| {})?;
    gp.install_for_install(package, applet, applet, 0x00, &[])
}

fn provision(t: &mut dyn Transport, fw: &Firmware) {
    provision_package(t, &PACKAGE_AID, &APPLET_AID, fw).expect("provisioning a genuine card works");
}

/// The card key from the card's identity certificate, checked against the
/// pinned demo CA, and the chip identity from its CPLC.
fn card_key_and_id(t: &mut dyn Transport) -> (k256::ecdsa::VerifyingKey, CardId) {
    select_isd(t).expect("SELECT card manager");
    let id = read_cplc(t).expect("CPLC").card_id();
    let mut w = WalletClient::new(t);
    w.select().expect("SELECT wallet");
    let cert = w.identity().expect("GET IDENTITY");
    let (key, index) = cert.verify(&[demo_vendor_ca_public()], NOW).expect("genuine certificate verifies");
    assert_eq!(index, 0);
    assert_eq!(cert.subject, id, "the certificate names the chip");
    (key, id)
}

/// A deterministic pseudo-random generator (SplitMix64) for hostile input.
struct Prng(u64);

impl Prng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }

    fn pick(&mut self, pool: &[u8]) -> u8 {
        if self.below(4) == 0 { self.byte() } else { pool[self.below(pool.len())] }
    }
}

// ---------------------------------------------------------------------------
// 1. GP session at every level, GET STATUS, load, install

#[test]
fn gp_session_load_and_install_at_every_security_level() {
    let fw = wallet_firmware(CAP_SMALL);
    for level in SecurityLevel::ALL {
        let (_bank, slot, mut reader) = rig(genuine(1));
        let mut rec = Recorder::new(reader.connect().expect("connect"));
        {
            let mut gp = GpSession::open(&mut rec, &default_ring(), 0, level).expect("default keys open a session");
            assert_eq!(gp.key_version(), DEFAULT_KEY_VERSION, "{level}");
            assert_eq!(gp.level(), level);

            let isd = gp.get_status(StatusScope::IssuerSecurityDomain).expect("GET STATUS ISD");
            assert_eq!(isd.len(), 1);
            assert_eq!(isd[0].aid, ISD_AID);
            assert_eq!(isd[0].lifecycle, card_state::SECURED);
            assert!(gp.get_status(StatusScope::LoadFiles).expect("GET STATUS load files").is_empty());
            assert!(gp.get_status(StatusScope::Applications).expect("GET STATUS apps").is_empty());

            // The response to GET STATUS is R-MAC-protected exactly at R-MAC levels.
            let checked =
                gp.exchange_checked(&card::gp::get_status(StatusScope::IssuerSecurityDomain, false)).expect("GS");
            let want = if level.has_rmac() { ResponseAuth::RMacVerified } else { ResponseAuth::NotProtected };
            assert_eq!(checked.auth, want, "{level}");

            let (mut calls, mut blocks) = (0, 0);
            gp.load(&PACKAGE_AID, &fw.hash, &fw.data_block, SMALL_BLOCK, &mut |sent, total| {
                calls += 1;
                assert_eq!(sent, calls, "progress counts blocks");
                blocks = total;
            })
            .expect("LOAD");
            assert_eq!(blocks, fw.data_block.len().div_ceil(SMALL_BLOCK));
            assert_eq!(calls, blocks);
            assert!(blocks > 1, "multi-block load");

            let files = gp.get_status(StatusScope::LoadFiles).expect("GET STATUS load files");
            assert_eq!(files.len(), 1);
            assert_eq!(files[0].aid, PACKAGE_AID);
            assert_eq!(files[0].lifecycle, app_state::LOADED);
            assert_eq!(files[0].version, Some(vec![fw.version.0, fw.version.1]));
            let modules = gp.get_status(StatusScope::LoadFilesAndModules).expect("GET STATUS modules");
            assert_eq!(modules[0].modules, vec![APPLET_AID.to_vec()]);
            assert!(gp.get_status(StatusScope::Applications).expect("apps").is_empty(), "loaded, not installed");

            gp.install_for_install(&PACKAGE_AID, &APPLET_AID, &APPLET_AID, 0x00, &[]).expect("INSTALL");
            let apps = gp.get_status(StatusScope::Applications).expect("GET STATUS apps");
            assert_eq!(apps.len(), 1);
            assert_eq!(apps[0].aid, APPLET_AID);
            assert_eq!(apps[0].lifecycle, app_state::SELECTABLE);
        }

        // C-DECRYPTION really encrypts: the first LOAD block's plaintext is on
        // the wire only at levels without it.
        let first_load = rec.sent.iter().find(|a| a[1] == gp_ins::LOAD).expect("a LOAD was sent");
        let first_load = Command::parse(first_load).expect("well-formed APDU");
        let plain = &fw.data_block[..SMALL_BLOCK];
        assert_eq!(first_load.data.starts_with(plain), !level.has_cdec(), "{level}");
        let want_len = if level.has_cdec() { (SMALL_BLOCK / 16 + 1) * 16 + 8 } else { SMALL_BLOCK + 8 };
        assert_eq!(first_load.data.len(), want_len, "{level}: padding and C-MAC");
        drop(rec);

        let v = view(&slot);
        assert_eq!(v.packages, vec![PackageView { aid: PACKAGE_AID.to_vec(), version: fw.version, hash: fw.hash }]);
        assert_eq!(v.instances, vec![(APPLET_AID.to_vec(), app_state::SELECTABLE)]);
        assert_eq!(v.wallet_lifecycle, Some(Lifecycle::Installed));
        assert_eq!(v.key_versions, vec![DEFAULT_KEY_VERSION]);
        assert_eq!(v.auth_failures, 0);
        assert_eq!(v.card_state, card_state::SECURED);

        // The installed applet answers.
        let mut t = reader.connect().expect("connect");
        let info = WalletClient::new(&mut *t).select().expect("SELECT wallet");
        assert_eq!(info.lifecycle, Lifecycle::Installed);
    }
}

// ---------------------------------------------------------------------------
// 2. Wrong keys, retry counter, lock

#[test]
fn wrong_keys_fail_on_the_card_cryptogram_without_external_authenticate() {
    let wrong =
        KeyRing::new().with(DEFAULT_KEY_VERSION, KeySource::Static(StaticKeys::from_single(AesKey::new([0x5A; 16]))));
    let (_bank, slot, mut reader) = rig(genuine(2));
    // Many more attempts than the card's retry limit.
    for _ in 0..2 * AUTH_FAILURE_LIMIT {
        let mut rec = Recorder::new(reader.connect().expect("connect"));
        let err = GpSession::open(&mut rec, &wrong, 0, SecurityLevel::CMac).expect_err("wrong keys");
        assert!(matches!(err, CardError::Scp03(Scp03Error::CardCryptogramMismatch)), "{err}");
        assert_eq!(rec.ins(), vec![gp_ins::SELECT, gp_ins::INITIALIZE_UPDATE], "no EXTERNAL AUTHENTICATE sent");
    }
    let v = view(&slot);
    assert_eq!(v.auth_failures, 0);
    assert_eq!(v.card_state, card_state::SECURED);
    let mut t = reader.connect().expect("connect");
    GpSession::open(&mut *t, &default_ring(), 0, SecurityLevel::CMac).expect("the card is not locked");
    drop(t);

    // A chip whose vendor shipped other default keys is refused the same way.
    let odd = ChipFactory::new(2).make(ChipKind::WrongDefaultKeys, CardFaults::default());
    let (_bank, slot, mut reader) = rig(odd);
    let mut rec = Recorder::new(reader.connect().expect("connect"));
    let err = GpSession::open(&mut rec, &default_ring(), 0, SecurityLevel::CMac).expect_err("other keys");
    assert!(matches!(err, CardError::Scp03(Scp03Error::CardCryptogramMismatch)), "{err}");
    assert!(!rec.ins().contains(&gp_ins::EXTERNAL_AUTHENTICATE));
    drop(rec);
    assert_eq!(view(&slot).auth_failures, 0);
}

/// SELECT ISD, INITIALIZE UPDATE, then an EXTERNAL AUTHENTICATE with a
/// made-up cryptogram and MAC.
fn bad_external_authenticate(t: &mut dyn Transport) -> StatusWord {
    select_isd(t).expect("SELECT card manager");
    let iu = t.transmit(&card::gp::scp03::initialize_update(0, &[0x42; 8])).expect("INITIALIZE UPDATE");
    assert_eq!(iu.sw, StatusWord::OK, "the card is not locked yet");
    let ea = Command::new(0x84, gp_ins::EXTERNAL_AUTHENTICATE, 0x01, 0x00).with_data(vec![0xA5; 16]);
    t.transmit(&ea).expect("EXTERNAL AUTHENTICATE").sw
}

#[test]
fn failed_external_authenticate_counts_resets_and_locks() {
    let (_bank, slot, mut reader) = rig(genuine(3));
    let limit = AUTH_FAILURE_LIMIT;
    {
        let mut t = reader.connect().expect("connect");
        for _ in 0..limit - 2 {
            assert_eq!(bad_external_authenticate(&mut *t), StatusWord::VERIFICATION_FAILED);
        }
    }
    // The counter is persistent: a power cycle does not clear it.
    assert_eq!(view(&slot).auth_failures, limit - 2);
    {
        let mut t = reader.connect().expect("connect");
        assert_eq!(bad_external_authenticate(&mut *t), StatusWord::VERIFICATION_FAILED);
    }
    assert_eq!(view(&slot).auth_failures, limit - 1);

    // A correct authentication before the limit resets it.
    {
        let mut t = reader.connect().expect("connect");
        GpSession::open(&mut *t, &default_ring(), 0, SecurityLevel::CMac).expect("right keys, one try left");
    }
    assert_eq!(view(&slot).auth_failures, 0);

    // Now `limit` failures in a row lock the card manager.
    {
        let mut t = reader.connect().expect("connect");
        for _ in 0..limit - 1 {
            assert_eq!(bad_external_authenticate(&mut *t), StatusWord::VERIFICATION_FAILED);
        }
        GpSession::open(&mut *t, &default_ring(), 0, SecurityLevel::CMac).expect("still one try left");
        for _ in 0..limit {
            assert_eq!(bad_external_authenticate(&mut *t), StatusWord::VERIFICATION_FAILED);
        }
        let iu = t.transmit(&card::gp::scp03::initialize_update(0, &[1; 8])).expect("INITIALIZE UPDATE");
        assert_eq!(iu.sw, StatusWord::AUTH_METHOD_BLOCKED);
    }
    let v = view(&slot);
    assert_eq!(v.card_state, card_state::CARD_LOCKED);
    assert_eq!(v.auth_failures, limit);
    // Even the right keys cannot open it any more, after a power cycle too.
    let mut t = reader.connect().expect("connect");
    let err = GpSession::open(&mut *t, &default_ring(), 0, SecurityLevel::CMac).expect_err("locked");
    assert_eq!(status_of(&err), Some(StatusWord::AUTH_METHOD_BLOCKED), "{err}");
}

// ---------------------------------------------------------------------------
// 3. Key rotation

#[test]
fn put_key_rotates_to_kdf3_diversified_keys() {
    let card = genuine(4);
    let id = card.id();
    let (_bank, slot, mut reader) = rig(card);
    let level = SecurityLevel::CMacCDecRMac;
    let new_keys;
    {
        let mut t = reader.connect().expect("connect");
        let mut gp = GpSession::open(&mut *t, &default_ring(), 0, level).expect("default keys");
        assert_eq!(gp.kdd(), id.as_bytes(), "the KDD is the chip identifier");
        new_keys = master().diversify(Diversification::Kdf3, gp.kdd());
        assert_ne!(new_keys, master(), "diversification changes the keys");
        assert_ne!(new_keys, StaticKeys::gp_default());
        gp.put_keys(NEW_KVN, &new_keys, true).expect("PUT KEY");

        // The new keys open a session, by the card's choice and by version.
        let t = gp.into_transport();
        let ring = KeyRing::new().with(NEW_KVN, rotated_source());
        let proof = GpSession::open(t, &ring, 0, level).expect("new keys open a session");
        assert_eq!(proof.key_version(), NEW_KVN);
        let t = proof.into_transport();
        let mut proof = GpSession::open(t, &ring, NEW_KVN, level).expect("new keys by version");
        assert_eq!(proof.key_version(), NEW_KVN);
        assert_eq!(proof.get_status(StatusScope::IssuerSecurityDomain).expect("GET STATUS").len(), 1);
    }
    let v = view(&slot);
    assert_eq!(v.key_versions, vec![NEW_KVN], "version FF was replaced, not kept");
    assert_eq!(with_card(&slot, |c| c.key_set(NEW_KVN)), Some(new_keys.clone()));
    assert_eq!(v.auth_failures, 0);

    let mut t = reader.connect().expect("connect");
    // The old keys no longer work: the card reports a version they are not for...
    let err = GpSession::open(&mut *t, &default_ring(), 0, level).expect_err("FF is gone");
    assert!(matches!(err, CardError::Verification { what: "card key version", .. }), "{err}");
    // ...asking for FF explicitly finds no such key set...
    let err = GpSession::open(&mut *t, &default_ring(), DEFAULT_KEY_VERSION, level).expect_err("FF is gone");
    assert_eq!(status_of(&err), Some(StatusWord::REFERENCED_DATA_NOT_FOUND), "{err}");
    // ...and neither the default keys nor the undiversified master pass as the new version.
    for keys in [StaticKeys::gp_default(), master()] {
        let ring = KeyRing::new().with(NEW_KVN, KeySource::Static(keys));
        let err = GpSession::open(&mut *t, &ring, 0, level).expect_err("not the card's keys");
        assert!(matches!(err, CardError::Scp03(Scp03Error::CardCryptogramMismatch)), "{err}");
    }
    drop(t);
    assert_eq!(view(&slot).auth_failures, 0, "wrong keys never reached EXTERNAL AUTHENTICATE");

    // Another chip gets other keys from the same master.
    let other = genuine(5).id();
    assert_ne!(other, id);
    assert_ne!(master().diversify(Diversification::Kdf3, other.as_bytes()), new_keys);
}

// ---------------------------------------------------------------------------
// 4. Tearing atomicity

const TEAR_LEVEL: SecurityLevel = SecurityLevel::CMacCDecRMac;
const TEAR_SEED: u64 = 44;

/// The per-card job, idempotent like the station's recipe: open a session
/// with whichever key set the card reports, load and install unless already
/// there, rotate unless already rotated (and prove it with a new session),
/// then select the wallet and attest.
fn run_job(t: &mut dyn Transport, fw: &Firmware, challenge: &[u8; 32]) -> Result<Attestation, CardError> {
    let ring = station_ring();
    let mut gp = GpSession::open(t, &ring, 0, TEAR_LEVEL)?;
    let files = gp.get_status(StatusScope::LoadFiles)?;
    let apps = gp.get_status(StatusScope::Applications)?;
    if !files.iter().any(|f| f.aid == PACKAGE_AID) {
        gp.load(&PACKAGE_AID, &fw.hash, &fw.data_block, SMALL_BLOCK, &mut |_, _| {})?;
    }
    if !apps.iter().any(|a| a.aid == APPLET_AID) {
        gp.install_for_install(&PACKAGE_AID, &APPLET_AID, &APPLET_AID, 0x00, &[])?;
    }
    let t = if gp.key_version() == NEW_KVN {
        gp.into_transport()
    } else {
        let keys = rotated_source().keys_for(gp.kdd());
        gp.put_keys(NEW_KVN, &keys, true)?;
        let proof = GpSession::open(gp.into_transport(), &ring, NEW_KVN, TEAR_LEVEL)?;
        if proof.key_version() != NEW_KVN {
            return Err(CardError::verification("key rotation", "old version still reported"));
        }
        proof.into_transport()
    };
    let mut wallet = WalletClient::new(t);
    let info = wallet.select()?;
    if info.lifecycle != Lifecycle::Installed {
        return Err(CardError::verification("wallet", "unexpected lifecycle"));
    }
    wallet.attest(challenge)
}

/// Which key set a card holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyState {
    Default,
    Rotated,
}

/// Checks the persistent state of a card taken out mid-job: nothing torn.
fn assert_consistent(card: &EmuCard, fw: &Firmware, what: &str) -> (KeyState, bool, bool) {
    let v = card.view();
    let has_package = match v.packages.as_slice() {
        [] => false,
        [p] => {
            assert_eq!(p, &PackageView { aid: PACKAGE_AID.to_vec(), version: fw.version, hash: fw.hash }, "{what}");
            true
        }
        more => panic!("{what}: {} packages", more.len()),
    };
    let has_instance = match v.instances.as_slice() {
        [] => false,
        [(aid, state)] => {
            assert_eq!(aid.as_slice(), APPLET_AID, "{what}");
            assert_eq!(*state, app_state::SELECTABLE, "{what}");
            true
        }
        more => panic!("{what}: {} instances", more.len()),
    };
    assert!(!has_instance || has_package, "{what}: an instance without its package");
    assert_eq!(v.wallet_lifecycle.is_some(), has_instance, "{what}: wallet state without instance or vice versa");
    let rotated = master().diversify(Diversification::Kdf3, card.id().as_bytes());
    let keys = match v.key_versions.as_slice() {
        [DEFAULT_KEY_VERSION] => {
            assert_eq!(card.key_set(DEFAULT_KEY_VERSION), Some(StaticKeys::gp_default()), "{what}");
            KeyState::Default
        }
        [NEW_KVN] => {
            assert_eq!(card.key_set(NEW_KVN), Some(rotated), "{what}");
            KeyState::Rotated
        }
        other => panic!("{what}: key versions {other:02X?}"),
    };
    assert_eq!(v.auth_failures, 0, "{what}");
    assert_eq!(v.card_state, card_state::SECURED, "{what}");
    (keys, has_package, has_instance)
}

#[test]
fn tearing_at_every_apdu_leaves_a_consistent_resumable_card() {
    let fw = wallet_firmware(CAP_SMALL);
    let challenge = [0xC7; 32];
    let blocks = fw.data_block.len().div_ceil(SMALL_BLOCK);
    assert!(blocks >= 10, "the sweep covers a multi-block load");

    // The whole job on an untouched card, to count its APDUs.
    let total = {
        let (_bank, slot, mut reader) = rig(ChipFactory::new(TEAR_SEED).make(ChipKind::Genuine, CardFaults::default()));
        let mut rec = Recorder::new(reader.connect().expect("connect"));
        run_job(&mut rec, &fw, &challenge).expect("the job completes on a clean card");
        let n = rec.sent.len() as u64;
        drop(rec);
        assert_eq!(view(&slot).apdus, n, "the card counts what the host sent");
        n
    };
    // 3 session + 2 GET STATUS + INSTALL [for load] + LOAD + INSTALL + PUT KEY + 3 session + SELECT + ATTEST.
    assert_eq!(total, 13 + blocks as u64);

    let mut seen = std::collections::BTreeSet::new();
    for point in [TearPoint::Before, TearPoint::After] {
        for n in 1..=total {
            let what = format!("torn at APDU {n} ({point:?})");
            let faults = CardFaults { remove_at: Some((n, point)), ..CardFaults::default() };
            let card = ChipFactory::new(TEAR_SEED).make(ChipKind::Genuine, faults);
            let id = card.id();
            let (_bank, slot, mut reader) = rig(card);
            {
                let mut t = reader.connect().expect("connect");
                let err = run_job(&mut *t, &fw, &challenge).expect_err("the card leaves mid-job");
                assert!(matches!(err, CardError::Transport(TransportError::CardRemoved)), "{what}: {err}");
                // The slot noticed: the transport is dead.
                assert!(matches!(t.transmit_raw(&[0x00, 0xA4, 0x04, 0x00]), Err(TransportError::CardRemoved)));
            }
            assert!(!slot.is_occupied(), "{what}: the card left the slot");
            let card = slot.remove().expect("the torn card can be collected");
            assert_eq!(card.view().apdus, n, "{what}");
            let (keys, has_package, has_instance) = assert_consistent(&card, &fw, &what);
            seen.insert((keys == KeyState::Rotated, has_package, has_instance));
            slot.insert(card).expect("slot is empty");

            // The host sees the same state: exactly one key set opens a
            // session, and the card reports that version; GET STATUS agrees.
            {
                let mut t = reader.connect().expect("connect");
                let (kvn, source) = match keys {
                    KeyState::Default => (DEFAULT_KEY_VERSION, KeySource::Static(StaticKeys::gp_default())),
                    KeyState::Rotated => (NEW_KVN, rotated_source()),
                };
                let (other_kvn, other_source) = match keys {
                    KeyState::Default => (NEW_KVN, rotated_source()),
                    KeyState::Rotated => (DEFAULT_KEY_VERSION, KeySource::Static(StaticKeys::gp_default())),
                };
                let wrong = KeyRing::new().with(kvn, other_source);
                assert!(GpSession::open(&mut *t, &wrong, 0, TEAR_LEVEL).is_err(), "{what}");
                let err = GpSession::open(&mut *t, &KeyRing::new(), other_kvn, TEAR_LEVEL).expect_err("absent");
                assert_eq!(status_of(&err), Some(StatusWord::REFERENCED_DATA_NOT_FOUND), "{what}: {err}");
                let mut gp = GpSession::open(&mut *t, &KeyRing::new().with(kvn, source), 0, TEAR_LEVEL)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(gp.key_version(), kvn, "{what}");
                let files = gp.get_status(StatusScope::LoadFiles).expect("GET STATUS");
                assert_eq!(files.iter().any(|f| f.aid == PACKAGE_AID), has_package, "{what}");
                let apps = gp.get_status(StatusScope::Applications).expect("GET STATUS");
                assert_eq!(apps.iter().any(|a| a.aid == APPLET_AID), has_instance, "{what}");
            }

            // Re-running the job from the start completes, skipping what is done.
            {
                let mut rec = Recorder::new(reader.connect().expect("connect"));
                let att = run_job(&mut rec, &fw, &challenge).unwrap_or_else(|e| panic!("{what}: rerun: {e}"));
                assert_eq!(att.card_id, id);
                assert_eq!(att.firmware_hash, fw.hash, "{what}");
                let sent = rec.ins();
                assert_eq!(sent.contains(&gp_ins::LOAD), !has_package, "{what}: LOAD only when absent");
                assert_eq!(sent.contains(&gp_ins::PUT_KEY), keys == KeyState::Default, "{what}");
                let (card_key, _) = {
                    let mut w = WalletClient::new(&mut rec);
                    let cert = w.identity().expect("GET IDENTITY");
                    cert.verify(&[demo_vendor_ca_public()], NOW).expect("genuine")
                };
                assert!(card::wallet::verify_digest(&card_key, &att.digest(&challenge), &att.signature), "{what}");
            }
            let card = slot.remove().expect("card");
            let (keys, has_package, has_instance) = assert_consistent(&card, &fw, &what);
            assert_eq!((keys, has_package, has_instance), (KeyState::Rotated, true, true), "{what}: job done");
        }
    }
    // The sweep saw every intermediate state a real job passes through.
    for state in [(false, false, false), (false, true, false), (false, true, true), (true, true, true)] {
        assert!(seen.contains(&state), "state {state:?} never observed: {seen:?}");
    }
}

// ---------------------------------------------------------------------------
// 5. LOAD integrity and DELETE

#[test]
fn load_with_wrong_hash_is_refused_on_the_final_block() {
    let fw = wallet_firmware(CAP_SMALL);
    let (_bank, slot, mut reader) = rig(genuine(6));
    {
        let mut t = reader.connect().expect("connect");
        let mut gp = GpSession::open(&mut *t, &default_ring(), 0, SecurityLevel::CMac).expect("session");
        let mut wrong = fw.hash;
        wrong[0] ^= 1;
        let mut accepted = 0;
        let mut total = 0;
        let err = gp
            .load(&PACKAGE_AID, &wrong, &fw.data_block, SMALL_BLOCK, &mut |sent, n| {
                accepted = sent;
                total = n;
            })
            .expect_err("hash mismatch");
        assert!(matches!(err, CardError::Status { command: "LOAD", sw: StatusWord::SECURITY_STATUS }), "{err}");
        assert_eq!(accepted + 1, fw.data_block.len().div_ceil(SMALL_BLOCK), "every block but the last accepted");
        assert!(gp.get_status(StatusScope::LoadFiles).expect("GET STATUS").is_empty());
        // The refused load left nothing behind: the right one goes through.
        gp.load(&PACKAGE_AID, &fw.hash, &fw.data_block, SMALL_BLOCK, &mut |_, _| {}).expect("correct load");
    }
    assert_eq!(view(&slot).packages.len(), 1);

    // Corrupted data with the right announced hash is refused too.
    let (_bank, slot, mut reader) = rig(genuine(6));
    {
        let mut t = reader.connect().expect("connect");
        let mut gp = GpSession::open(&mut *t, &default_ring(), 0, SecurityLevel::CMac).expect("session");
        let mut corrupt = fw.data_block.clone();
        let mid = corrupt.len() / 2;
        corrupt[mid] ^= 0x40;
        let err = gp.load(&PACKAGE_AID, &fw.hash, &corrupt, SMALL_BLOCK, &mut |_, _| {}).expect_err("corrupt");
        assert_eq!(status_of(&err), Some(StatusWord::SECURITY_STATUS), "{err}");
    }
    let v = view(&slot);
    assert!(v.packages.is_empty() && v.instances.is_empty());
}

#[test]
fn load_blocks_must_come_in_order() {
    let fw = wallet_firmware(CAP_SMALL);
    let blocks: Vec<&[u8]> = fw.data_block.chunks(SMALL_BLOCK).collect();
    let (_bank, slot, mut reader) = rig(genuine(7));
    {
        let mut t = reader.connect().expect("connect");
        let mut gp = GpSession::open(&mut *t, &default_ring(), 0, SecurityLevel::CMacCDec).expect("session");
        // LOAD without INSTALL [for load].
        let r = gp.exchange(&card::gp::load_block(0, false, blocks[0])).expect("LOAD");
        assert_eq!(r.sw, StatusWord::CONDITIONS_NOT_SATISFIED);

        // A skipped block.
        gp.send("INSTALL [for load]", &card::gp::install_for_load(&PACKAGE_AID, &ISD_AID, Some(&fw.hash)))
            .expect("INSTALL [for load]");
        gp.send("LOAD", &card::gp::load_block(0, false, blocks[0])).expect("block 0");
        let r = gp.exchange(&card::gp::load_block(2, false, blocks[2])).expect("LOAD");
        assert_eq!(r.sw, StatusWord::WRONG_DATA, "block 2 after block 0");
        // The load is aborted, not paused: the missing block does not revive it.
        let r = gp.exchange(&card::gp::load_block(1, false, blocks[1])).expect("LOAD");
        assert_eq!(r.sw, StatusWord::CONDITIONS_NOT_SATISFIED);

        // A repeated block.
        gp.send("INSTALL [for load]", &card::gp::install_for_load(&PACKAGE_AID, &ISD_AID, Some(&fw.hash)))
            .expect("INSTALL [for load]");
        gp.send("LOAD", &card::gp::load_block(0, false, blocks[0])).expect("block 0");
        let r = gp.exchange(&card::gp::load_block(0, false, blocks[0])).expect("LOAD");
        assert_eq!(r.sw, StatusWord::WRONG_DATA, "block 0 twice");

        // Blocks in order with the last one early: the load file is incomplete.
        gp.send("INSTALL [for load]", &card::gp::install_for_load(&PACKAGE_AID, &ISD_AID, Some(&fw.hash)))
            .expect("INSTALL [for load]");
        gp.send("LOAD", &card::gp::load_block(0, false, blocks[0])).expect("block 0");
        let r = gp.exchange(&card::gp::load_block(1, true, blocks[1])).expect("LOAD");
        assert!(!r.is_ok(), "a truncated load file is refused: {:?}", r.sw);
        assert!(gp.get_status(StatusScope::LoadFiles).expect("GET STATUS").is_empty());
    }
    assert!(view(&slot).packages.is_empty());
}

#[test]
fn a_load_interrupted_by_a_power_cycle_leaves_nothing() {
    let fw = wallet_firmware(CAP_SMALL);
    let blocks: Vec<&[u8]> = fw.data_block.chunks(SMALL_BLOCK).collect();
    let (_bank, slot, mut reader) = rig(genuine(8));
    {
        let mut t = reader.connect().expect("connect");
        let mut gp = GpSession::open(&mut *t, &default_ring(), 0, SecurityLevel::CMac).expect("session");
        gp.send("INSTALL [for load]", &card::gp::install_for_load(&PACKAGE_AID, &ISD_AID, Some(&fw.hash)))
            .expect("INSTALL [for load]");
        for (i, b) in blocks.iter().take(blocks.len() - 1).enumerate() {
            gp.send("LOAD", &card::gp::load_block(i as u8, false, b)).expect("block");
        }
    }
    power_cycle(&slot);
    {
        let mut t = reader.connect().expect("connect");
        let mut gp = GpSession::open(&mut *t, &default_ring(), 0, SecurityLevel::CMac).expect("session");
        // The last block alone after the power cycle goes nowhere.
        let last = blocks.len() - 1;
        let r = gp.exchange(&card::gp::load_block(last as u8, true, blocks[last])).expect("LOAD");
        assert_eq!(r.sw, StatusWord::CONDITIONS_NOT_SATISFIED);
        assert!(gp.get_status(StatusScope::LoadFiles).expect("GET STATUS").is_empty());
    }
    assert!(view(&slot).packages.is_empty());
}

#[test]
fn reset_and_power_loss_clear_selection_and_secure_channel() {
    use card::gp::scp03::{HostChannel, InitUpdateResponse, initialize_update};
    let fw = wallet_firmware(CAP_SMALL);
    let (_bank, slot, mut reader) = rig(genuine(18));
    let challenge = Command::new(0x00, card::wallet::ins::GET_CHALLENGE, 0, 0).with_le(8);
    {
        let mut t = reader.connect().expect("connect");
        provision(&mut *t, &fw);
        WalletClient::new(&mut *t).select().expect("SELECT");
        assert!(t.transmit(&challenge).expect("GET CHALLENGE").is_ok());
        t.reset().expect("warm reset");
        assert!(!t.transmit(&challenge).expect("GET CHALLENGE").is_ok(), "the applet is deselected by reset");
        WalletClient::new(&mut *t).select().expect("SELECT");
    }
    power_cycle(&slot);
    let mut t = reader.connect().expect("connect");
    assert!(!t.transmit(&challenge).expect("GET CHALLENGE").is_ok(), "the applet is deselected by power loss");

    // A secure channel, driven by hand so that it outlives the reset on the host side.
    select_isd(&mut *t).expect("SELECT card manager");
    let host_challenge = [0x3C; 8];
    let iu = t.transmit(&initialize_update(0, &host_challenge)).expect("INITIALIZE UPDATE");
    let iu = InitUpdateResponse::parse(&iu.data).expect("INITIALIZE UPDATE response");
    let (mut channel, ext) =
        HostChannel::open(&StaticKeys::gp_default(), &host_challenge, &iu, SecurityLevel::CMac).expect("cryptogram");
    assert!(t.transmit(&ext).expect("EXTERNAL AUTHENTICATE").is_ok());
    let status = card::gp::get_status(StatusScope::IssuerSecurityDomain, false);
    let wrapped = channel.wrap(&status).expect("wrap");
    let r = t.transmit(&wrapped).expect("GET STATUS");
    assert!(r.is_ok(), "{:?}", r.sw);
    channel.unwrap(r).expect("unwrap");
    t.reset().expect("warm reset");
    let r = t.transmit(&channel.wrap(&status).expect("wrap")).expect("GET STATUS");
    assert!(!r.is_ok(), "the secure channel did not survive the reset");
    drop(t);
    assert_eq!(view(&slot).auth_failures, 0);
}

#[test]
fn wallet_is_not_selectable_before_install() {
    let fw = wallet_firmware(CAP_SMALL);
    let (_bank, _slot, mut reader) = rig(genuine(9));
    let mut t = reader.connect().expect("connect");
    let err = WalletClient::new(&mut *t).select().expect_err("nothing loaded");
    assert_eq!(status_of(&err), Some(StatusWord::FILE_NOT_FOUND), "{err}");
    {
        let mut gp = GpSession::open(&mut *t, &default_ring(), 0, SecurityLevel::CMac).expect("session");
        gp.load(&PACKAGE_AID, &fw.hash, &fw.data_block, SMALL_BLOCK, &mut |_, _| {}).expect("LOAD");
    }
    let err = WalletClient::new(&mut *t).select().expect_err("loaded, not installed");
    assert_eq!(status_of(&err), Some(StatusWord::FILE_NOT_FOUND), "{err}");
    // Installing an applet class the package does not have is refused.
    let mut gp = GpSession::open(&mut *t, &default_ring(), 0, SecurityLevel::CMac).expect("session");
    let err = gp.install_for_install(&PACKAGE_AID, &OTHER_APPLET, &OTHER_APPLET, 0, &[]).expect_err("no such class");
    assert_eq!(status_of(&err), Some(StatusWord::REFERENCED_DATA_NOT_FOUND), "{err}");
    gp.install_for_install(&PACKAGE_AID, &APPLET_AID, &APPLET_AID, 0, &[]).expect("INSTALL");
    let err = gp.install_for_install(&PACKAGE_AID, &APPLET_AID, &APPLET_AID, 0, &[]).expect_err("twice");
    assert_eq!(status_of(&err), Some(StatusWord::CONDITIONS_NOT_SATISFIED), "{err}");
    let t = gp.into_transport();
    assert_eq!(WalletClient::new(t).select().expect("installed").lifecycle, Lifecycle::Installed);
}

#[test]
fn install_without_make_selectable_leaves_the_applet_installed() {
    let fw = wallet_firmware(CAP_SMALL);
    let (_bank, slot, mut reader) = rig(genuine(19));
    let mut t = reader.connect().expect("connect");
    {
        let mut gp = GpSession::open(&mut *t, &default_ring(), 0, SecurityLevel::CMac).expect("session");
        gp.load(&PACKAGE_AID, &fw.hash, &fw.data_block, SMALL_BLOCK, &mut |_, _| {}).expect("LOAD");
        let mut install = card::gp::install_for_install(&PACKAGE_AID, &APPLET_AID, &APPLET_AID, 0, &[]);
        install.p1 = card::gp::install::FOR_INSTALL;
        gp.send("INSTALL [for install]", &install).expect("INSTALL [for install]");
        let apps = gp.get_status(StatusScope::Applications).expect("GET STATUS");
        assert_eq!(apps.len(), 1);
        assert_eq!(apps[0].lifecycle, app_state::INSTALLED);
    }
    let err = WalletClient::new(&mut *t).select().expect_err("installed, not selectable");
    assert_eq!(status_of(&err), Some(StatusWord::FILE_NOT_FOUND), "{err}");
    {
        let mut gp = GpSession::open(&mut *t, &default_ring(), 0, SecurityLevel::CMac).expect("session");
        assert!(gp.delete(&APPLET_AID, false).expect("DELETE instance"));
        gp.install_for_install(&PACKAGE_AID, &APPLET_AID, &APPLET_AID, 0, &[]).expect("INSTALL and make selectable");
    }
    assert_eq!(WalletClient::new(&mut *t).select().expect("SELECT").lifecycle, Lifecycle::Installed);
    drop(t);
    assert_eq!(view(&slot).instances, vec![(APPLET_AID.to_vec(), app_state::SELECTABLE)]);
}

#[test]
fn delete_needs_the_related_flag_for_a_package_with_instances() {
    let fw = wallet_firmware(CAP_SMALL);
    let (_bank, slot, mut reader) = rig(genuine(10));
    {
        let mut t = reader.connect().expect("connect");
        provision(&mut *t, &fw);
        let mut w = WalletClient::new(&mut *t);
        w.select().expect("SELECT");
        w.generate_wallet_key().expect("GENERATE WALLET KEY");
        w.attest(&[1; 32]).expect("ATTEST");
    }
    let before = view(&slot);
    assert_eq!(before.attest_counter, 1);
    assert!(before.wallet_public_key.is_some());
    {
        let mut t = reader.connect().expect("connect");
        let mut gp = GpSession::open(&mut *t, &default_ring(), 0, SecurityLevel::CMacCDecRMac).expect("session");
        let err = gp.delete(&PACKAGE_AID, false).expect_err("instances depend on it");
        assert_eq!(status_of(&err), Some(StatusWord::CONDITIONS_NOT_SATISFIED), "{err}");
        assert_eq!(gp.get_status(StatusScope::Applications).expect("GET STATUS").len(), 1);
    }
    let after_refusal = view(&slot);
    assert_eq!(after_refusal.packages, before.packages);
    assert_eq!(after_refusal.instances, before.instances);
    assert_eq!(after_refusal.wallet_public_key, before.wallet_public_key);
    {
        let mut t = reader.connect().expect("connect");
        let mut gp = GpSession::open(&mut *t, &default_ring(), 0, SecurityLevel::CMacCDecRMac).expect("session");
        assert!(gp.delete(&PACKAGE_AID, true).expect("DELETE related"));
        assert!(!gp.delete(&PACKAGE_AID, true).expect("DELETE again"), "already gone");
        assert!(gp.get_status(StatusScope::LoadFiles).expect("GET STATUS").is_empty());
        assert!(gp.get_status(StatusScope::Applications).expect("GET STATUS").is_empty());
        let t = gp.into_transport();
        let err = WalletClient::new(t).select().expect_err("deleted");
        assert_eq!(status_of(&err), Some(StatusWord::FILE_NOT_FOUND), "{err}");
    }
    let v = view(&slot);
    assert!(v.packages.is_empty());
    assert!(v.instances.is_empty());
    assert_eq!(v.wallet_lifecycle, None);
    assert_eq!(v.wallet_public_key, None, "the wallet key went with the applet");

    // Reinstalling gives a fresh wallet without the old key; the attestation
    // counter is chip-level and survives.
    let mut t = reader.connect().expect("connect");
    provision(&mut *t, &fw);
    let mut w = WalletClient::new(&mut *t);
    assert_eq!(w.select().expect("SELECT").lifecycle, Lifecycle::Installed);
    assert!(w.wallet_key().expect("GET WALLET KEY").is_none());
    assert_eq!(w.attest(&[2; 32]).expect("ATTEST").counter, 2);
}

// ---------------------------------------------------------------------------
// 6. Wallet applet

#[test]
fn wallet_identity_attestation_keys_and_self_tests() {
    let fw = wallet_firmware(CAP_SMALL);
    let (_bank, slot, mut reader) = rig(genuine(11));
    let (card_key, id);
    {
        let mut t = reader.connect().expect("connect");
        provision(&mut *t, &fw);
        (card_key, id) = card_key_and_id(&mut *t);
    }
    assert_eq!(id, view(&slot).id);

    let mut last_counter = 0;
    let attest = |t: &mut dyn Transport, challenge: [u8; 32], wallet_key: Option<[u8; 33]>, last: &mut u32| {
        let mut w = WalletClient::new(t);
        let att = w.attest(&challenge).expect("ATTEST");
        assert_eq!(att.card_id, id);
        assert_eq!(att.firmware_hash, fw.hash, "the card attests the firmware it runs");
        assert_eq!(att.wallet_key, wallet_key);
        assert!(card::wallet::verify_digest(&card_key, &att.digest(&challenge), &att.signature));
        let mut other = challenge;
        other[0] ^= 1;
        assert!(!card::wallet::verify_digest(&card_key, &att.digest(&other), &att.signature), "bound to challenge");
        assert!(att.counter > *last, "counter {} after {last}", att.counter);
        *last = att.counter;
        att
    };

    {
        let mut t = reader.connect().expect("connect");
        let info = WalletClient::new(&mut *t).select().expect("SELECT");
        assert_eq!(info.lifecycle, Lifecycle::Installed);
        assert_eq!(info.protocol_version, card::wallet::PROTOCOL_VERSION);
        for i in 0..3u8 {
            let att = attest(&mut *t, [i; 32], None, &mut last_counter);
            assert_eq!(att.lifecycle, Lifecycle::Installed as u8);
        }
        // A warm reset keeps the counter.
        t.reset().expect("reset");
        WalletClient::new(&mut *t).select().expect("SELECT");
        attest(&mut *t, [9; 32], None, &mut last_counter);
    }
    // So does a power cycle.
    power_cycle(&slot);
    let counter_before = view(&slot).attest_counter;
    assert_eq!(counter_before, last_counter);
    let wallet_pub;
    {
        let mut t = reader.connect().expect("connect");
        let mut w = WalletClient::new(&mut *t);
        w.select().expect("SELECT");
        assert!(w.wallet_key().expect("GET WALLET KEY").is_none(), "no key yet");
        let proof = w.generate_wallet_key().expect("GENERATE WALLET KEY");
        let wallet = proof.verify(&id, &card_key).expect("born in this card");
        let err = w.generate_wallet_key().expect_err("only one wallet key");
        assert_eq!(status_of(&err), Some(StatusWord::CONDITIONS_NOT_SATISFIED), "{err}");
        let again = w.wallet_key().expect("GET WALLET KEY").expect("a key now");
        assert_eq!(again.public_key, proof.public_key);
        assert_eq!(again.verify(&id, &card_key).expect("proof verifies"), wallet);
        // A proof does not transfer to another chip identity.
        assert!(again.verify(&CardId([0; 10]), &card_key).is_err());
        assert_eq!(w.select().expect("SELECT").lifecycle, Lifecycle::Keyed);

        let digest = card::wallet::message_digest(b"test", &[b"pay 1 BTC"]);
        let sig = w.sign(&digest).expect("SIGN");
        assert!(card::wallet::verify_digest(&wallet, &digest, &sig), "signed with the wallet key");
        assert!(!card::wallet::verify_digest(&card_key, &digest, &sig), "not with the card key");
        let att = attest(&mut *t, [7; 32], Some(proof.public_key), &mut last_counter);
        assert_eq!(att.lifecycle, Lifecycle::Keyed as u8);
        wallet_pub = proof.public_key;

        let mut w = WalletClient::new(&mut *t);
        assert_eq!(w.self_test_kat().expect("KAT"), self_test::KAT_ALL);
        let vector = b"host test vector 1";
        let sig = w.self_test_sign(vector).expect("SELF TEST sign");
        assert!(card::wallet::verify_digest(&card_key, &card::wallet::self_test_digest(&id, vector), &sig));
        for (seed, len) in [([1, 2, 3, 4], 1000u16), ([9, 9, 9, 9], self_test::MEMORY_MAX as u16), ([0; 4], 1)] {
            let digest = w.self_test_memory(&seed, len).expect("memory test");
            let expected: [u8; 32] = Sha256::digest(card::wallet::memory_pattern(&seed, len as usize)).into();
            assert_eq!(digest, expected, "seed {seed:?} len {len}");
        }
        for len in [0u16, self_test::MEMORY_MAX as u16 + 1] {
            let err = w.self_test_memory(&[1; 4], len).expect_err("out of bounds");
            assert_eq!(status_of(&err), Some(StatusWord::WRONG_DATA), "{err}");
        }
        let c: Vec<Vec<u8>> = (0..4).map(|_| w.get_challenge(16).expect("GET CHALLENGE")).collect();
        for i in 0..c.len() {
            for j in i + 1..c.len() {
                assert_ne!(c[i], c[j], "GET CHALLENGE repeats");
            }
        }
        assert_eq!(w.get_challenge(8).expect("GET CHALLENGE").len(), 8);
    }
    let v = view(&slot);
    assert_eq!(v.wallet_lifecycle, Some(Lifecycle::Keyed));
    assert_eq!(v.wallet_public_key, Some(wallet_pub));
    assert_eq!(v.attest_counter, last_counter);
}

/// A provisioned card with `faults`; returns its verified card key and id.
fn faulty(seed: u64, faults: CardFaults) -> (EmuBank, Arc<EmuSlot>, EmuReader, k256::ecdsa::VerifyingKey, CardId) {
    let fw = wallet_firmware(CAP_SMALL);
    let (bank, slot, mut reader) = rig(ChipFactory::new(seed).make(ChipKind::Genuine, faults));
    let (key, id) = {
        let mut t = reader.connect().expect("connect");
        provision(&mut *t, &fw);
        card_key_and_id(&mut *t)
    };
    (bank, slot, reader, key, id)
}

#[test]
fn wallet_fault_injection_shows_in_the_host_checks() {
    // Failing known-answer test: the ECDSA bit is missing, the rest pass.
    let (_b, _s, mut reader, _, _) = faulty(12, CardFaults { failing_kat: true, ..CardFaults::default() });
    let mut t = reader.connect().expect("connect");
    let mut w = WalletClient::new(&mut *t);
    w.select().expect("SELECT");
    let kat = w.self_test_kat().expect("KAT");
    assert_eq!(kat & self_test::KAT_ECDSA, 0);
    assert_eq!(kat, self_test::KAT_ALL & !self_test::KAT_ECDSA);
    drop(t);

    // Stuck RNG: the same challenge every time, across a power cycle too.
    let (_b, slot, mut reader, _, _) = faulty(13, CardFaults { stuck_rng: true, ..CardFaults::default() });
    let first = {
        let mut t = reader.connect().expect("connect");
        let mut w = WalletClient::new(&mut *t);
        w.select().expect("SELECT");
        let a = w.get_challenge(16).expect("GET CHALLENGE");
        assert_eq!(w.get_challenge(16).expect("GET CHALLENGE"), a);
        a
    };
    power_cycle(&slot);
    let mut t = reader.connect().expect("connect");
    let mut w = WalletClient::new(&mut *t);
    w.select().expect("SELECT");
    assert_eq!(w.get_challenge(16).expect("GET CHALLENGE"), first);
    drop(t);

    // Bad signatures: well-formed answers that do not verify.
    let (_b, _s, mut reader, card_key, id) = faulty(14, CardFaults { bad_signature: true, ..CardFaults::default() });
    let mut t = reader.connect().expect("connect");
    let mut w = WalletClient::new(&mut *t);
    w.select().expect("SELECT");
    let challenge = [3; 32];
    let att = w.attest(&challenge).expect("ATTEST parses");
    assert_eq!(att.card_id, id);
    assert!(!card::wallet::verify_digest(&card_key, &att.digest(&challenge), &att.signature));
    let proof = w.generate_wallet_key().expect("GENERATE WALLET KEY");
    assert!(proof.verify(&id, &card_key).is_err());
    let sig = w.self_test_sign(b"vector").expect("SELF TEST sign");
    assert!(!card::wallet::verify_digest(&card_key, &card::wallet::self_test_digest(&id, b"vector"), &sig));
    drop(t);

    // A stuck memory cell: the read-back digest is not the pattern's.
    let (_b, _s, mut reader, _, _) = faulty(15, CardFaults { bad_memory: true, ..CardFaults::default() });
    let mut t = reader.connect().expect("connect");
    let mut w = WalletClient::new(&mut *t);
    w.select().expect("SELECT");
    let digest = w.self_test_memory(&[1, 2, 3, 4], 512).expect("memory test answers");
    let expected: [u8; 32] = Sha256::digest(card::wallet::memory_pattern(&[1, 2, 3, 4], 512)).into();
    assert_ne!(digest, expected);
}

#[test]
fn wrong_status_and_mute_faults_reach_the_host() {
    // Every ATTEST answered 6F00.
    let faults =
        CardFaults { wrong_sw: Some((card::wallet::ins::ATTEST, StatusWord::UNKNOWN)), ..CardFaults::default() };
    let (_b, _s, mut reader, _, _) = faulty(16, faults);
    let mut t = reader.connect().expect("connect");
    let mut w = WalletClient::new(&mut *t);
    w.select().expect("SELECT");
    let err = w.attest(&[0; 32]).expect_err("6F00");
    assert_eq!(status_of(&err), Some(StatusWord::UNKNOWN), "{err}");
    drop(t);

    // A card that goes mute: a timeout, which is retryable.
    let mut card = genuine(17);
    card.set_faults(CardFaults { mute_from: Some(3), ..CardFaults::default() });
    let (_b, _s, mut reader) = rig(card);
    let mut t = reader.connect().expect("connect");
    let err = GpSession::open(&mut *t, &default_ring(), 0, SecurityLevel::CMac).expect_err("mute at EA");
    assert!(matches!(err, CardError::Transport(TransportError::Timeout(_))), "{err}");
    assert!(err.is_retryable());
}

// ---------------------------------------------------------------------------
// 7. Counterfeit, expired and cloned chips

#[test]
fn counterfeit_expired_and_cloned_chips() {
    let fw = wallet_firmware(CAP_SMALL);
    let pinned = [demo_vendor_ca_public()];
    let mut factory = ChipFactory::new(20);
    let original = factory.make(ChipKind::Genuine, CardFaults::default());
    let original_id = original.id();
    let counterfeit = factory.make(ChipKind::Counterfeit, CardFaults::default());
    let expired = factory.make(ChipKind::Expired, CardFaults::default());
    let clone = factory.make(ChipKind::Clone(original_id), CardFaults::default());
    assert_eq!(clone.label(), "clone");

    // Identity (CPLC card id, certificate, attestation) of each chip.
    let inspect = |card: EmuCard| -> (CardId, Certificate, Vec<u8>, Attestation) {
        let (_bank, _slot, mut reader) = rig(card);
        let mut t = reader.connect().expect("connect");
        provision(&mut *t, &fw);
        select_isd(&mut *t).expect("SELECT ISD");
        let id = read_cplc(&mut *t).expect("CPLC").card_id();
        let mut w = WalletClient::new(&mut *t);
        w.select().expect("SELECT");
        let cert = w.identity().expect("GET IDENTITY");
        let raw = cert.encode();
        let att = w.attest(&[5; 32]).expect("ATTEST");
        (id, cert, raw, att)
    };

    let (g_id, g_cert, g_raw, g_att) = inspect(original);
    assert_eq!(g_id, original_id);
    let (g_key, _) = g_cert.verify(&pinned, NOW).expect("genuine verifies");
    assert!(card::wallet::verify_digest(&g_key, &g_att.digest(&[5; 32]), &g_att.signature));

    let (c_id, c_cert, _, c_att) = inspect(counterfeit);
    assert_eq!(c_cert.subject, c_id);
    assert!(matches!(c_cert.verify(&pinned, NOW), Err(CertError::UnknownIssuer(_))));
    // It is a well-formed certificate from the other CA: only the pin refuses it.
    let (c_key, _) = c_cert.verify(&[*counterfeit_ca().verifying_key()], NOW).expect("signed by the fake CA");
    assert!(card::wallet::verify_digest(&c_key, &c_att.digest(&[5; 32]), &c_att.signature));

    let (e_id, e_cert, _, _) = inspect(expired);
    assert_eq!(e_cert.subject, e_id);
    assert!(matches!(e_cert.verify(&pinned, NOW), Err(CertError::Expired { .. })));
    assert!(e_cert.verify(&pinned, CERT_NOT_BEFORE + 10).is_ok(), "valid before it expired");

    let (k_id, k_cert, k_raw, k_att) = inspect(clone);
    assert_eq!(k_id, original_id, "same CardId");
    assert_eq!(k_raw, g_raw, "same certificate bytes");
    assert_eq!(k_cert.verify(&pinned, NOW).expect("a clone passes the pin").0, g_key);
    // The clone signs with the original's card key, and its attestation
    // counter starts again from where the original's did: the card alone
    // cannot tell them apart; a ledger that remembers the counter can.
    assert!(card::wallet::verify_digest(&g_key, &k_att.digest(&[5; 32]), &k_att.signature));
    assert_eq!(k_att.counter, g_att.counter, "the clone's counter is not ahead of the original's");
}

// ---------------------------------------------------------------------------
// 8. Hostile input

const CLA_POOL: [u8; 8] = [0x00, 0x80, 0x84, 0x04, 0x0C, 0x8C, 0xE0, 0xFF];
const INS_POOL: [u8; 18] =
    [0xA4, 0xCA, 0x50, 0x82, 0xF2, 0xE4, 0xE6, 0xE8, 0xD8, 0xF0, 0xC0, 0x10, 0x12, 0x20, 0x22, 0x30, 0x40, 0x84];
const P_POOL: [u8; 14] = [0x00, 0x01, 0x02, 0x03, 0x04, 0x0C, 0x10, 0x20, 0x40, 0x80, 0x81, 0x9F, 0x7F, 0xFF];

/// Command data that sometimes looks like what handlers parse (LV fields,
/// TLVs with known tags), sometimes not at all.
fn random_data(r: &mut Prng) -> Vec<u8> {
    match r.below(4) {
        0 => {
            let n = r.below(8);
            let mut out = Vec::new();
            for _ in 0..n {
                let len = r.below(20);
                out.push(if r.below(8) == 0 { r.byte() } else { len as u8 });
                out.extend(r.bytes(len));
            }
            out
        }
        1 => {
            let tag = r.pick(&[0x4F, 0xC4, 0x5C, 0x88, 0xE3, 0x9F]);
            let len = r.below(40);
            let mut out = card::tlv::tlv(u32::from(tag), &r.bytes(len));
            if r.below(3) == 0 {
                out.truncate(r.below(out.len() + 1));
            }
            out
        }
        2 => {
            let n = if r.below(10) == 0 { r.below(2000) } else { r.below(300) };
            r.bytes(n)
        }
        _ => Vec::new(),
    }
}

/// Raw APDU bytes: well-formed short and extended cases, and malformed ones.
fn random_apdu(r: &mut Prng) -> Vec<u8> {
    let header = [r.pick(&CLA_POOL), r.pick(&INS_POOL), r.pick(&P_POOL), r.pick(&P_POOL)];
    match r.below(6) {
        0 => {
            let n = r.below(40);
            r.bytes(n)
        }
        1 => header.to_vec(),
        2 => [&header[..], &[r.byte()]].concat(),
        3 | 4 => {
            let mut cmd = Command::new(header[0], header[1], header[2], header[3]).with_data(random_data(r));
            if r.below(2) == 0 {
                let max = if r.below(8) == 0 { 65_536 } else { 256 };
                cmd = cmd.with_le(1 + r.below(max));
            }
            cmd.to_bytes().expect("under the extended limit")
        }
        _ => {
            let n = 1 + r.below(20);
            [&header[..], &r.bytes(n)].concat()
        }
    }
}

fn random_plain_command(r: &mut Prng) -> Command {
    let cla = if r.below(2) == 0 { 0x80 } else { 0x00 };
    let mut cmd = Command::new(cla, r.pick(&INS_POOL), r.pick(&P_POOL), r.pick(&P_POOL)).with_data(random_data(r));
    if r.below(2) == 0 {
        cmd = cmd.with_le(256);
    }
    cmd
}

fn assert_status_word(raw: &[u8], what: &str) {
    assert!(raw.len() >= 2, "{what}: no status word in {raw:02X?}");
    let sw1 = raw[raw.len() - 2];
    assert!(matches!(sw1 & 0xF0, 0x60 | 0x90), "{what}: SW1 {sw1:02X} is not an ISO 7816 status");
}

#[derive(Debug, Clone, Copy)]
enum Hostile {
    NothingSelected,
    CardManager,
    AuthPending,
    ChannelOpenRaw,
    ChannelOpenWrapped,
    Wallet,
    InertApplet,
}

/// Puts the card in `state`, then sends one piece of garbage. Setup errors
/// come back as `Err`; garbage must always get a status word.
fn hostile_round(t: &mut dyn Transport, state: Hostile, r: &mut Prng) -> Result<(), CardError> {
    let ring = default_ring();
    match state {
        Hostile::NothingSelected => {}
        Hostile::CardManager => {
            select_isd(t)?;
        }
        Hostile::AuthPending => {
            // A full session first keeps the retry counter at zero.
            GpSession::open(t, &ring, 0, SecurityLevel::CMac)?;
            select_isd(t)?;
            let iu = t.transmit(&card::gp::scp03::initialize_update(0, &[0x11; 8]))?;
            if !iu.is_ok() {
                return Err(CardError::Status { command: "INITIALIZE UPDATE", sw: iu.sw });
            }
        }
        Hostile::ChannelOpenRaw => {
            GpSession::open(t, &ring, 0, SecurityLevel::CMacCDecRMac)?;
        }
        Hostile::ChannelOpenWrapped => {
            let mut gp = GpSession::open(t, &ring, 0, SecurityLevel::CMac)?;
            let cmd = random_plain_command(r);
            let resp = gp.exchange(&cmd).unwrap_or_else(|e| panic!("{cmd:?} inside the channel: {e}"));
            assert_status_word(&resp.sw.to_bytes(), &format!("{state:?} {cmd:?}"));
            return Ok(());
        }
        Hostile::Wallet => {
            WalletClient::new(t).select()?;
        }
        Hostile::InertApplet => {
            let sel = t.transmit(&card::gp::select(&OTHER_APPLET))?;
            if !sel.is_ok() {
                return Err(CardError::Status { command: "SELECT", sw: sel.sw });
            }
        }
    }
    let apdu = random_apdu(r);
    let raw = t.transmit_raw(&apdu).unwrap_or_else(|e| panic!("{state:?} {apdu:02X?}: {e}"));
    assert_status_word(&raw, &format!("{state:?} {apdu:02X?}"));
    Ok(())
}

fn hostile_card(seed: u64, fw: &Firmware, other: &Firmware) -> EmuCard {
    let (_bank, slot, mut reader) = rig(genuine(seed));
    {
        let mut t = reader.connect().expect("connect");
        provision(&mut *t, fw);
        provision_package(&mut *t, &OTHER_PACKAGE, &OTHER_APPLET, other).expect("second package");
    }
    slot.remove().expect("card")
}

#[test]
fn garbage_apdus_in_every_state_always_get_a_status_word() {
    const ROUNDS: usize = 500;
    let fw = wallet_firmware(CAP_SMALL);
    let other = build_firmware(&OTHER_PACKAGE, "tapline/other", &OTHER_APPLET, 600);
    let mut r = Prng(0x7A91_1E5E_ED00_0001);
    let (_bank, slot, mut reader) = rig(hostile_card(30, &fw, &other));
    let mut replaced: u64 = 0;
    let states = [
        Hostile::NothingSelected,
        Hostile::CardManager,
        Hostile::AuthPending,
        Hostile::ChannelOpenRaw,
        Hostile::ChannelOpenWrapped,
        Hostile::Wallet,
        Hostile::InertApplet,
    ];
    for state in states {
        for round in 0..ROUNDS {
            let result = {
                let mut t = reader.connect().expect("connect");
                hostile_round(&mut *t, state, &mut r)
            };
            if let Err(e) = result {
                // Garbage may legitimately have locked the card or deleted
                // an application; anything else is an emulator defect.
                let v = view(&slot);
                let damaged = v.card_state != card_state::SECURED
                    || v.instances.len() != 2
                    || v.packages.len() != 2
                    || v.key_versions != [DEFAULT_KEY_VERSION];
                assert!(damaged, "{state:?} round {round}: setup failed on an intact card: {e}");
                slot.remove().expect("card");
                slot.insert(hostile_card(31 + replaced, &fw, &other)).expect("empty slot");
                replaced += 1;
            }
        }
    }
    assert!(replaced < 5, "garbage broke {replaced} cards");
    // The last card still works end to end.
    let mut t = reader.connect().expect("connect");
    GpSession::open(&mut *t, &default_ring(), 0, SecurityLevel::CMacCDecRMac).expect("session");
    let mut w = WalletClient::new(&mut *t);
    w.select().expect("SELECT");
    w.attest(&[1; 32]).expect("ATTEST");
}

// ---------------------------------------------------------------------------
// 9. Latency model

#[test]
fn modeled_load_time_matches_the_brief() {
    let m = LatencyModel::JCOP4;
    // The model's own figures are the brief's.
    assert!((9.0..=18.0).contains(&m.small_apdu_ms));
    assert!((40.0..=48.0).contains(&m.load_block_ms));
    assert!((450.0..=700.0).contains(&m.load_final_ms));

    let fw = wallet_firmware(CAP_20K);
    let (_bank, slot, mut reader) = rig(genuine(40));
    let mut t = reader.connect().expect("connect");
    let mut gp = GpSession::open(&mut *t, &default_ring(), 0, SecurityLevel::CMacCDec).expect("session");
    let session = slot.modeled_time();
    let expected_session = Duration::from_secs_f64((m.small_apdu_ms + 2.0 * m.secure_channel_ms) / 1000.0);
    assert!(session.abs_diff(expected_session) < Duration::from_millis(1), "{session:?}");

    let start_wall = Instant::now();
    let mut marks = vec![session];
    let s = Arc::clone(&slot);
    gp.load(&PACKAGE_AID, &fw.hash, &fw.data_block, GPPRO_BLOCK, &mut |_, _| marks.push(s.modeled_time()))
        .expect("LOAD");
    let wall = start_wall.elapsed();
    let blocks = fw.data_block.len().div_ceil(GPPRO_BLOCK);
    assert_eq!(marks.len(), blocks + 1);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let deltas: Vec<f64> = marks.windows(2).map(|w| ms(w[1] - w[0])).collect();

    // The first mark includes INSTALL [for load]; every other block but the
    // last costs one LOAD block; the last one links.
    assert!((deltas[0] - (m.small_apdu_ms + m.load_block_ms)).abs() < 0.01, "{}", deltas[0]);
    for (i, d) in deltas.iter().enumerate().take(blocks - 1).skip(1) {
        assert!((40.0..=48.0).contains(d), "block {i}: {d} ms");
    }
    let last = deltas[blocks - 1];
    assert!((450.0..=700.0).contains(&last), "final block {last} ms");

    // The whole load: in the band the brief's figures give for this many
    // blocks, and exactly what the model says.
    let total = ms(marks[blocks] - marks[0]);
    let n = (blocks - 1) as f64;
    let low = 9.0 + n * 40.0 + 450.0;
    let high = 18.0 + n * 48.0 + 700.0;
    assert!((low..=high).contains(&total), "{total} ms for {blocks} blocks not in {low}..{high}");
    let model = m.small_apdu_ms + n * m.load_block_ms + m.load_final_ms;
    assert!((total - model).abs() < 0.1, "{total} vs model {model}");
    // "LOAD is three quarters" of the brief's 5.5 s per card.
    assert!((3500.0..=5000.0).contains(&total), "{total} ms");
    // Speed 0: the modeled seconds were not slept.
    assert!(wall < Duration::from_secs(2), "{wall:?} of wall time at speed 0");

    // A slow card (fault script) scales every operation.
    drop(gp);
    drop(t);
    let slow = ChipFactory::new(41).make(ChipKind::Genuine, CardFaults { slow_factor: 2.8, ..CardFaults::default() });
    let (_bank, slot, mut reader) = rig(slow);
    let mut t = reader.connect().expect("connect");
    let mut gp = GpSession::open(&mut *t, &default_ring(), 0, SecurityLevel::CMac).expect("session");
    let before = slot.modeled_time();
    gp.load(&PACKAGE_AID, &fw.hash, &fw.data_block, GPPRO_BLOCK, &mut |_, _| {}).expect("LOAD");
    let slow_total = ms(slot.modeled_time() - before);
    assert!((slow_total - 2.8 * model).abs() < 1.0, "{slow_total} vs {}", 2.8 * model);
}
