//! Backup linking (docs/card-protocol.md, section 16), host code against
//! emulated cards: the real `WalletClient` over `EmuBank` readers at speed 0,
//! cards provisioned with GlobalPlatform LOAD and INSTALL like a station
//! does. Every signature a card makes is checked here with k256 against
//! keys from certificates verified to the demo CA; every refusal is checked
//! by its status word and by the card's real state (`EmuCard::view`)
//! staying unchanged.

use std::sync::Arc;
use std::time::Duration;

use card::cap::{CapBuilder, CapFile};
use card::emu::factory::{CERT_NOT_BEFORE, ChipFactory, ChipKind, demo_vendor_ca_public};
use card::emu::{CardFaults, CardView, EmuCard, TearPoint};
use card::gp::keys::StaticKeys;
use card::gp::scp03::SecurityLevel;
use card::gp::session::{GpSession, KeyRing, KeySource};
use card::transport::emu::{EmuBank, EmuReader, EmuSlot};
use card::transport::{Atr, CardReader, Transport, TransportError};
use card::wallet::bundle::{self, LinkAttestation, Role, TransferBlob};
use card::wallet::client::WalletClient;
use card::wallet::{APPLET_AID, Lifecycle, PACKAGE_AID, public_key_bytes, verify_digest};
use card::{CardError, CardId, StatusWord};
use k256::ecdsa::signature::hazmat::PrehashVerifier;
use k256::ecdsa::{Signature, VerifyingKey};

// ---------------------------------------------------------------------------
// Fixtures

/// A time inside the validity of genuine certificates (the host has a clock).
const NOW: u64 = CERT_NOT_BEFORE + 365 * 86_400;
const BUNDLE: [u8; 16] = *b"bundle-0000001\0\0";
const OTHER_BUNDLE: [u8; 16] = *b"bundle-0000002\0\0";
const CODE: &[u8] = b"246810";
const LOAD_BLOCK: usize = 200;

const SW_ALREADY_RECORDED: StatusWord = StatusWord(0x6A89);

/// A firmware image: the C4 load file data block and its load file hash.
struct Firmware {
    block: Vec<u8>,
    hash: [u8; 32],
}

fn firmware(code_size: usize) -> Firmware {
    let zip = CapBuilder::new(&PACKAGE_AID, "tapline/wallet")
        .applet(&APPLET_AID)
        .code_size(code_size)
        .build()
        .expect("CapBuilder makes a valid CAP");
    let cap = CapFile::from_bytes(&zip).expect("the built CAP parses");
    Firmware { block: cap.load_file_data_block(false), hash: cap.load_file_sha256(false) }
}

fn provision(t: &mut dyn Transport, fw: &Firmware) {
    let ring = KeyRing::new().with(0xFF, KeySource::Static(StaticKeys::gp_default()));
    let mut gp = GpSession::open(t, &ring, 0, SecurityLevel::CMac).expect("GP session with the default keys");
    gp.load(&PACKAGE_AID, &fw.hash, &fw.block, LOAD_BLOCK, &mut |_, _| {}).expect("LOAD");
    gp.install_for_install(&PACKAGE_AID, &APPLET_AID, &APPLET_AID, 0x00, &[]).expect("INSTALL");
}

#[derive(Debug, Clone, Copy)]
enum Make {
    Genuine,
    Counterfeit,
    /// A clone of the card made at this index.
    CloneOf(usize),
    /// Genuine, but loaded with other firmware than the rest.
    OtherFirmware,
}

/// Emulated readers, one card each, provisioned with the wallet. The
/// readers (for connections) and the slots (for looking at the cards) are
/// apart so that a test can hold both.
struct Bench {
    cards: Cards,
    readers: Vec<EmuReader>,
}

/// The slots of a bench, to read the cards' real state.
struct Cards(Vec<Arc<EmuSlot>>);

fn bench(seed: u64, makes: &[Make]) -> Bench {
    let fw = firmware(1500);
    let other = firmware(1600);
    let bank = EmuBank::new(makes.len(), 0.0, Duration::from_millis(50));
    let mut factory = ChipFactory::new(seed);
    let mut ids: Vec<CardId> = Vec::new();
    for (i, make) in makes.iter().enumerate() {
        let kind = match make {
            Make::Genuine | Make::OtherFirmware => ChipKind::Genuine,
            Make::Counterfeit => ChipKind::Counterfeit,
            Make::CloneOf(j) => ChipKind::Clone(ids[*j]),
        };
        let card = factory.make(kind, CardFaults::default());
        ids.push(card.id());
        bank.slots()[i].insert(card).expect("a new bank has empty slots");
    }
    let mut readers: Vec<EmuReader> = (0..makes.len()).map(|i| bank.reader(i).expect("reader")).collect();
    for (reader, make) in readers.iter_mut().zip(makes) {
        let mut t = reader.connect().expect("card present");
        provision(&mut *t, if matches!(make, Make::OtherFirmware) { &other } else { &fw });
    }
    Bench { cards: Cards(bank.slots().to_vec()), readers }
}

fn connect(readers: &mut [EmuReader]) -> Vec<Box<dyn Transport + Send + '_>> {
    readers.iter_mut().map(|r| r.connect().expect("card present")).collect()
}

/// Connects (a power-up: the card manager is selected) and SELECTs the
/// wallet on every card.
fn connect_selected(readers: &mut [EmuReader]) -> Vec<Box<dyn Transport + Send + '_>> {
    let mut ts = connect(readers);
    for t in ts.iter_mut() {
        wc(t).select().expect("SELECT wallet");
    }
    ts
}

impl Cards {
    fn slot(&self, i: usize) -> &Arc<EmuSlot> {
        &self.0[i]
    }

    /// The card's real state, read without a power cycle.
    fn view(&self, i: usize) -> CardView {
        self.slot(i).inspect(EmuCard::view).expect("a card in the slot")
    }

    fn set_faults(&self, i: usize, faults: CardFaults) {
        let mut card = self.slot(i).remove().expect("a card in the slot");
        card.set_faults(faults);
        self.slot(i).insert(card).expect("the slot was just emptied");
    }
}

fn wc<'a>(t: &'a mut Box<dyn Transport + Send + '_>) -> WalletClient<'a> {
    WalletClient::new(&mut **t)
}

/// What the host knows of a card: its identity certificate as the card
/// returned it and, when it verifies to the pinned demo CA, its card key.
#[derive(Clone)]
struct Member {
    id: CardId,
    cert: Vec<u8>,
    key: Option<VerifyingKey>,
}

impl Member {
    fn key(&self) -> Result<&VerifyingKey, CardError> {
        self.key.as_ref().ok_or_else(|| CardError::verification("certificate", "does not chain to the pinned CA"))
    }
}

fn member(t: &mut dyn Transport) -> Result<Member, CardError> {
    let mut w = WalletClient::new(t);
    w.select()?;
    let cert = w.identity()?;
    let key = cert.verify(&[demo_vendor_ca_public()], NOW).ok().map(|(k, _)| k);
    Ok(Member { id: cert.subject, cert: cert.encode(), key })
}

fn members(ts: &mut [Box<dyn Transport + Send + '_>]) -> Vec<Member> {
    ts.iter_mut().map(|t| member(&mut **t).expect("SELECT and GET IDENTITY")).collect()
}

fn status_of<T: std::fmt::Debug>(r: Result<T, CardError>) -> StatusWord {
    match r {
        Err(CardError::Status { sw, .. }) => sw,
        other => panic!("expected a status word refusal, got {other:?}"),
    }
}

fn challenge(i: usize) -> [u8; 32] {
    let mut c = [0xC4; 32];
    c[0] = i as u8;
    c
}

fn bad(what: &'static str) -> CardError {
    CardError::verification(what, "host check failed")
}

/// One whole bundle, the way a coordinator relays it: primary `ts[0]`,
/// backups after it. Every card claim is checked on the host. Returns the
/// bundle's wallet public key.
fn run_bundle(ts: &mut [Box<dyn Transport + Send + '_>], bundle_id: &[u8; 16]) -> Result<[u8; 33], CardError> {
    let n = ts.len();
    let mut ms = Vec::with_capacity(n);
    for t in ts.iter_mut() {
        ms.push(member(&mut **t)?);
    }
    let primary = ms[0].clone();
    let proof = wc(&mut ts[0]).generate_wallet_key()?;
    let wallet = proof.verify(&primary.id, primary.key()?)?;
    let wallet_pub = public_key_bytes(&wallet);

    let nonce = wc(&mut ts[0]).link_primary(bundle_id, (n - 1) as u8)?;
    for i in 1..n {
        let att = wc(&mut ts[i]).link_backup(bundle_id, &primary.cert, &nonce)?;
        if att.card_id != ms[i].id {
            return Err(bad("link attestation card id"));
        }
        att.verify(ms[i].key()?, bundle_id, &primary.id, &nonce)?;
        wc(&mut ts[0]).add_backup(&ms[i].cert, &att)?;
    }
    for i in 1..n {
        let blob = wc(&mut ts[0]).export_to(&ms[i].id)?;
        let parsed = TransferBlob::parse(&blob)?;
        if parsed.bundle_id != *bundle_id
            || parsed.from != primary.id
            || parsed.to != ms[i].id
            || parsed.wallet_key != wallet_pub
        {
            return Err(bad("transfer blob route"));
        }
        parsed.verify(primary.key()?)?;
        let conf = wc(&mut ts[i]).import(&blob)?;
        if conf.card_id != ms[i].id || conf.wallet_key != wallet_pub {
            return Err(bad("import confirmation"));
        }
        conf.verify(ms[i].key()?, bundle_id, &primary.id)?;
        wc(&mut ts[0]).confirm_backup(&conf)?;
    }
    for (i, m) in ms.iter().enumerate() {
        let c = challenge(i);
        let p = wc(&mut ts[i]).prove_wallet(&c)?;
        let key = p.verify(&c, &m.id, Some(bundle_id))?;
        if p.wallet_key != wallet_pub || key != wallet {
            return Err(bad("wallet proof key"));
        }
    }
    for i in (1..n).chain([0]) {
        let sig = wc(&mut ts[i]).finalize()?;
        let role = if i == 0 { Role::Primary } else { Role::Backup };
        if !verify_digest(ms[i].key()?, &bundle::sealed_digest(bundle_id, &ms[i].id, role, &wallet_pub), &sig) {
            return Err(bad("seal signature"));
        }
    }
    Ok(wallet_pub)
}

// ---------------------------------------------------------------------------
// The happy path

#[test]
fn a_primary_and_two_backups_seal_with_the_same_wallet_key() {
    let mut b = bench(1, &[Make::Genuine, Make::Genuine, Make::Genuine]);
    let wallet_pub = {
        let mut ts = connect(&mut b.readers);
        run_bundle(&mut ts, &BUNDLE).expect("the bundle seals")
    };
    let ids: Vec<CardId> = (0..3).map(|i| b.cards.view(i).id).collect();
    for i in 0..3 {
        let v = b.cards.view(i);
        assert_eq!(v.wallet_lifecycle, Some(Lifecycle::Sealed), "card {i}");
        assert_eq!(v.wallet_public_key, Some(wallet_pub), "card {i} holds the bundle's key");
        let bv = v.wallet_bundle.expect("in a bundle");
        assert_eq!(bv.bundle_id, BUNDLE);
        if i == 0 {
            assert_eq!(bv.role, Role::Primary);
            assert_eq!(bv.announced, 2);
            assert_eq!(bv.backups, vec![(ids[1], true), (ids[2], true)]);
        } else {
            assert_eq!((bv.role, bv.primary), (Role::Backup, Some(ids[0])));
        }
    }
    // SELECT tells the host the same.
    let mut ts = connect(&mut b.readers);
    for (i, t) in ts.iter_mut().enumerate() {
        let info = wc(t).select().expect("SELECT");
        let role = if i == 0 { Role::Primary } else { Role::Backup };
        assert_eq!(
            (info.lifecycle, info.role, info.bundle_id, info.has_wallet_key),
            (Lifecycle::Sealed, Some(role), Some(BUNDLE), true)
        );
        // Sealed: GET WALLET KEY still answers, with the proof of the card key.
        let proof = wc(t).wallet_key().expect("GET WALLET KEY").expect("a key");
        assert_eq!(proof.public_key, wallet_pub);
    }
}

#[test]
fn every_card_claim_verifies_with_k256_and_backups_sign_with_the_imported_key() {
    let mut b = bench(2, &[Make::Genuine, Make::Genuine, Make::Genuine]);
    let mut ts = connect(&mut b.readers);
    let ms = members(&mut ts);
    let key = |i: usize| *ms[i].key.as_ref().expect("genuine");
    // Plain k256: prehash verification of a 64-byte r||s, low S.
    let k256_ok = |key: &VerifyingKey, digest: &[u8; 32], sig: &[u8; 64]| {
        let sig = Signature::from_slice(sig).expect("r||s");
        sig.normalize_s() == sig && key.verify_prehash(digest, &sig).is_ok()
    };
    let proof = wc(&mut ts[0]).generate_wallet_key().expect("GENERATE");
    let wallet = VerifyingKey::from_sec1_bytes(&proof.public_key).expect("a point");
    let nonce = wc(&mut ts[0]).link_primary(&BUNDLE, 2).expect("LINK PRIMARY");
    assert_eq!(b.cards.view(0).wallet_bundle.and_then(|v| v.nonce), Some(nonce), "the nonce is the card's");
    for i in 1..3 {
        let att = wc(&mut ts[i]).link_backup(&BUNDLE, &ms[0].cert, &nonce).expect("LINK BACKUP");
        assert_eq!(att.card_id, ms[i].id);
        assert_eq!(att.firmware_hash, firmware(1500).hash, "the backup's load file hash");
        let digest =
            bundle::link_digest(&BUNDLE, &ms[0].id, &nonce, &ms[i].id, &att.firmware_hash, Lifecycle::Linked as u8);
        assert!(k256_ok(&key(i), &digest, &att.signature), "link attestation");
        wc(&mut ts[0]).add_backup(&ms[i].cert, &att).expect("ADD BACKUP");
    }
    for i in 1..3 {
        let blob = TransferBlob::parse(&wc(&mut ts[0]).export_to(&ms[i].id).expect("EXPORT")).expect("blob");
        assert!(k256_ok(&key(0), &blob.digest(), &blob.signature), "transfer blob");
        let conf = wc(&mut ts[i]).import(&blob.encode()).expect("IMPORT");
        let digest = bundle::confirm_digest(&BUNDLE, &ms[i].id, &ms[0].id, &proof.public_key);
        assert!(k256_ok(&key(i), &digest, &conf.signature), "import confirmation");
        wc(&mut ts[0]).confirm_backup(&conf).expect("CONFIRM BACKUP");
    }
    for (i, m) in ms.iter().enumerate() {
        let c = challenge(i);
        let p = wc(&mut ts[i]).prove_wallet(&c).expect("PROVE WALLET");
        assert_eq!(p.wallet_key, proof.public_key, "card {i}");
        let digest = bundle::wallet_proof_digest(&c, &m.id, Some(&BUNDLE));
        assert!(k256_ok(&wallet, &digest, &p.signature), "card {i} signs with the wallet key");
        // Before sealing, SIGN works too, with the same key on every card.
        let d = [0x5A; 32];
        let sig = wc(&mut ts[i]).sign(&d).expect("SIGN before sealing");
        assert!(k256_ok(&wallet, &d, &sig), "card {i} SIGN");
    }
    for i in [1, 2, 0] {
        let sig = wc(&mut ts[i]).finalize().expect("FINALIZE");
        let role = if i == 0 { Role::Primary } else { Role::Backup };
        let digest = bundle::sealed_digest(&BUNDLE, &ms[i].id, role, &proof.public_key);
        assert!(k256_ok(&key(i), &digest, &sig), "seal {i}");
    }
}

// ---------------------------------------------------------------------------
// Linking refusals

#[test]
fn a_counterfeit_backup_is_refused_by_the_primary_itself() {
    let mut b = bench(3, &[Make::Genuine, Make::Counterfeit]);
    let mut ts = connect(&mut b.readers);
    let ms = members(&mut ts);
    assert!(ms[1].key.is_none(), "the host would refuse it too; here the host relays it anyway");
    wc(&mut ts[0]).generate_wallet_key().expect("GENERATE");
    let nonce = wc(&mut ts[0]).link_primary(&BUNDLE, 1).expect("LINK PRIMARY");
    // The counterfeit carries the genuine CA key, so it accepts the primary...
    let att = wc(&mut ts[1]).link_backup(&BUNDLE, &ms[0].cert, &nonce).expect("a counterfeit links");
    let before = b.cards.view(0);
    // ...but the primary refuses its certificate.
    assert_eq!(status_of(wc(&mut ts[0]).add_backup(&ms[1].cert, &att)), StatusWord::SECURITY_STATUS);
    assert_eq!(b.cards.view(0), CardView { apdus: before.apdus + 2, ..before }, "nothing recorded");
    assert_eq!(status_of(wc(&mut ts[0]).export_to(&ms[1].id)), StatusWord::REFERENCED_DATA_NOT_FOUND);
    assert_eq!(status_of(wc(&mut ts[0]).finalize()), StatusWord::CONDITIONS_NOT_SATISFIED);
}

#[test]
fn a_genuine_backup_refuses_a_counterfeit_primary() {
    let mut b = bench(4, &[Make::Counterfeit, Make::Genuine]);
    let mut ts = connect(&mut b.readers);
    let ms = members(&mut ts);
    wc(&mut ts[0]).generate_wallet_key().expect("GENERATE");
    let nonce = wc(&mut ts[0]).link_primary(&BUNDLE, 1).expect("LINK PRIMARY");
    let before = b.cards.view(1);
    assert_eq!(status_of(wc(&mut ts[1]).link_backup(&BUNDLE, &ms[0].cert, &nonce)), StatusWord::SECURITY_STATUS);
    assert_eq!(b.cards.view(1), CardView { apdus: before.apdus + 1, ..before }, "still Installed, no bundle");
    // Malformed certificates are incorrect data.
    let mut cert = ms[0].cert.clone();
    cert.push(0);
    assert_eq!(status_of(wc(&mut ts[1]).link_backup(&BUNDLE, &cert, &nonce)), StatusWord::WRONG_DATA);
    // Its own certificate as the primary's: refused.
    assert_eq!(status_of(wc(&mut ts[1]).link_backup(&BUNDLE, &ms[1].cert, &nonce)), StatusWord::WRONG_DATA);
}

#[test]
fn link_attestations_are_bound_to_bundle_primary_and_nonce() {
    // 0, 1: primaries; 2: a backup; 3: a clone of it (same id, key, certificate).
    let mut b = bench(5, &[Make::Genuine, Make::Genuine, Make::Genuine, Make::CloneOf(2)]);
    let mut ts = connect(&mut b.readers);
    let ms = members(&mut ts);
    assert_eq!((ms[3].id, &ms[3].cert), (ms[2].id, &ms[2].cert), "a perfect clone");
    for t in &mut ts[..2] {
        wc(t).generate_wallet_key().expect("GENERATE");
    }
    let n1 = wc(&mut ts[0]).link_primary(&BUNDLE, 2).expect("primary 1");
    let n2 = wc(&mut ts[1]).link_primary(&OTHER_BUNDLE, 2).expect("primary 2");
    assert_ne!(n1, n2);

    // The clone links into bundle 1; its attestation replayed into bundle 2
    // (another primary, another nonce) is refused there.
    let att_clone = wc(&mut ts[3]).link_backup(&BUNDLE, &ms[0].cert, &n1).expect("the clone links");
    let p2_before = b.cards.view(1);
    assert_eq!(status_of(wc(&mut ts[1]).add_backup(&ms[3].cert, &att_clone)), StatusWord::SECURITY_STATUS);
    assert_eq!(b.cards.view(1), CardView { apdus: p2_before.apdus + 2, ..p2_before });

    // The backup links to primary 2; that attestation is refused by primary 1.
    let att_p2 = wc(&mut ts[2]).link_backup(&OTHER_BUNDLE, &ms[1].cert, &n2).expect("links to primary 2");
    assert_eq!(status_of(wc(&mut ts[0]).add_backup(&ms[2].cert, &att_p2)), StatusWord::SECURITY_STATUS);
    // Primary 1's own nonce under the other bundle id: refused (the bundle
    // id is signed).
    wc(&mut ts[2]).abort_bundle().expect("rework the backup");
    let att_wrong_bundle = wc(&mut ts[2]).link_backup(&OTHER_BUNDLE, &ms[0].cert, &n1).expect("links");
    assert_eq!(status_of(wc(&mut ts[0]).add_backup(&ms[2].cert, &att_wrong_bundle)), StatusWord::SECURITY_STATUS);
    // The attestation names another card than the certificate: incorrect data.
    let swapped = LinkAttestation { card_id: ms[1].id, ..att_clone.clone() };
    assert_eq!(status_of(wc(&mut ts[0]).add_backup(&ms[2].cert, &swapped)), StatusWord::WRONG_DATA);
    // A flipped signature bit: refused.
    let mut forged = att_clone.clone();
    forged.signature[5] ^= 1;
    assert_eq!(status_of(wc(&mut ts[0]).add_backup(&ms[2].cert, &forged)), StatusWord::SECURITY_STATUS);
    // The primary's own certificate as a backup: incorrect data.
    let own = LinkAttestation { card_id: ms[0].id, ..att_clone.clone() };
    assert_eq!(status_of(wc(&mut ts[0]).add_backup(&ms[0].cert, &own)), StatusWord::WRONG_DATA);
    assert!(b.cards.view(0).wallet_bundle.expect("linked").backups.is_empty(), "nothing recorded so far");

    // The right attestation is accepted once; a clone of a recorded backup
    // (same id, same deterministic signature) is a duplicate.
    wc(&mut ts[0]).add_backup(&ms[3].cert, &att_clone).expect("the clone's own attestation is genuine");
    wc(&mut ts[2]).abort_bundle().expect("rework the backup");
    let att_original = wc(&mut ts[2]).link_backup(&BUNDLE, &ms[0].cert, &n1).expect("links");
    assert_eq!(att_original, att_clone, "indistinguishable from its clone");
    assert_eq!(status_of(wc(&mut ts[0]).add_backup(&ms[2].cert, &att_original)), SW_ALREADY_RECORDED);
    assert_eq!(b.cards.view(0).wallet_bundle.expect("linked").backups, vec![(ms[2].id, false)]);
}

#[test]
fn a_backup_with_other_firmware_is_refused() {
    let mut b = bench(6, &[Make::Genuine, Make::OtherFirmware]);
    let mut ts = connect(&mut b.readers);
    let ms = members(&mut ts);
    wc(&mut ts[0]).generate_wallet_key().expect("GENERATE");
    let nonce = wc(&mut ts[0]).link_primary(&BUNDLE, 1).expect("LINK PRIMARY");
    let att = wc(&mut ts[1]).link_backup(&BUNDLE, &ms[0].cert, &nonce).expect("links");
    assert_eq!(att.firmware_hash, firmware(1600).hash);
    assert_eq!(status_of(wc(&mut ts[0]).add_backup(&ms[1].cert, &att)), StatusWord::SECURITY_STATUS);
}

#[test]
fn link_primary_bounds_and_announced_count() {
    let mut b = bench(7, &[Make::Genuine, Make::Genuine, Make::Genuine]);
    let mut ts = connect(&mut b.readers);
    let ms = members(&mut ts);
    // Not Keyed yet.
    assert_eq!(status_of(wc(&mut ts[0]).link_primary(&BUNDLE, 1)), StatusWord::CONDITIONS_NOT_SATISFIED);
    wc(&mut ts[0]).generate_wallet_key().expect("GENERATE");
    assert_eq!(
        status_of(wc(&mut ts[0]).generate_wallet_key()),
        StatusWord::CONDITIONS_NOT_SATISFIED,
        "a second GENERATE"
    );
    for n in [0, 5, 0xFF] {
        assert_eq!(status_of(wc(&mut ts[0]).link_primary(&BUNDLE, n)), StatusWord::WRONG_DATA, "{n} backups");
    }
    let nonce = wc(&mut ts[0]).link_primary(&BUNDLE, 1).expect("one backup");
    assert_eq!(status_of(wc(&mut ts[0]).link_primary(&BUNDLE, 1)), StatusWord::CONDITIONS_NOT_SATISFIED, "twice");
    // A Keyed card cannot become a backup; a linked one cannot link again.
    assert_eq!(
        status_of(wc(&mut ts[0]).link_backup(&BUNDLE, &ms[1].cert, &nonce)),
        StatusWord::CONDITIONS_NOT_SATISFIED
    );
    let a1 = wc(&mut ts[1]).link_backup(&BUNDLE, &ms[0].cert, &nonce).expect("backup 1");
    assert_eq!(
        status_of(wc(&mut ts[1]).link_backup(&BUNDLE, &ms[0].cert, &nonce)),
        StatusWord::CONDITIONS_NOT_SATISFIED
    );
    let a2 = wc(&mut ts[2]).link_backup(&BUNDLE, &ms[0].cert, &nonce).expect("backup 2");
    wc(&mut ts[0]).add_backup(&ms[1].cert, &a1).expect("the announced one");
    assert_eq!(status_of(wc(&mut ts[0]).add_backup(&ms[2].cert, &a2)), StatusWord::CONDITIONS_NOT_SATISFIED);
    // A backup cannot act as a primary.
    assert_eq!(status_of(wc(&mut ts[1]).add_backup(&ms[2].cert, &a2)), StatusWord::CONDITIONS_NOT_SATISFIED);
    assert_eq!(status_of(wc(&mut ts[1]).export_to(&ms[2].id)), StatusWord::CONDITIONS_NOT_SATISFIED);
}

// ---------------------------------------------------------------------------
// Transfer refusals

/// Cards 0 (primary) and 1..n (backups) linked and recorded, the key
/// exported to nobody yet.
fn linked(b: &mut Bench, n: usize) -> Vec<Member> {
    let mut ts = connect(&mut b.readers);
    let ms = members(&mut ts[..n]);
    wc(&mut ts[0]).generate_wallet_key().expect("GENERATE");
    let nonce = wc(&mut ts[0]).link_primary(&BUNDLE, (n - 1) as u8).expect("LINK PRIMARY");
    for i in 1..n {
        let att = wc(&mut ts[i]).link_backup(&BUNDLE, &ms[0].cert, &nonce).expect("LINK BACKUP");
        wc(&mut ts[0]).add_backup(&ms[i].cert, &att).expect("ADD BACKUP");
    }
    ms
}

#[test]
fn export_only_to_a_recorded_backup_and_generate_only_once() {
    let mut b = bench(8, &[Make::Genuine, Make::Genuine, Make::Genuine, Make::Genuine]);
    // Card 3 stays out of the bundle.
    let ms = linked(&mut b, 3);
    let mut ts = connect_selected(&mut b.readers);
    let outsider = member(&mut *ts[3]).expect("identity");
    let before = b.cards.view(0);
    assert_eq!(status_of(wc(&mut ts[0]).export_to(&outsider.id)), StatusWord::REFERENCED_DATA_NOT_FOUND);
    assert_eq!(status_of(wc(&mut ts[0]).export_to(&ms[0].id)), StatusWord::REFERENCED_DATA_NOT_FOUND, "to itself");
    let raw = |t: &mut Box<dyn Transport + Send + '_>, data: &[u8]| {
        t.transmit(&card::Command::new(0x80, 0x27, 0, 0).with_data(data.to_vec()).with_le(256)).expect("answer").sw
    };
    assert_eq!(raw(&mut ts[0], &ms[1].id.as_bytes()[..9]), StatusWord::WRONG_LENGTH);
    assert_eq!(b.cards.view(0), CardView { apdus: before.apdus + 3, ..before });
    // GENERATE: never while Linked.
    assert_eq!(status_of(wc(&mut ts[0]).generate_wallet_key()), StatusWord::CONDITIONS_NOT_SATISFIED);
    // Nor on a linked backup (it must import, not make, its key).
    assert_eq!(status_of(wc(&mut ts[1]).generate_wallet_key()), StatusWord::CONDITIONS_NOT_SATISFIED);
    // Before IMPORT a backup has nothing to prove, sign or export.
    assert_eq!(status_of(wc(&mut ts[1]).prove_wallet(&[1; 32])), StatusWord::CONDITIONS_NOT_SATISFIED);
    assert_eq!(status_of(wc(&mut ts[1]).sign(&[1; 32])), StatusWord::CONDITIONS_NOT_SATISFIED);
    assert_eq!(wc(&mut ts[1]).wallet_key().expect("GET WALLET KEY"), None);
    assert_eq!(status_of(wc(&mut ts[1]).finalize()), StatusWord::CONDITIONS_NOT_SATISFIED);
    // The primary cannot seal before its backups confirm.
    assert_eq!(status_of(wc(&mut ts[0]).finalize()), StatusWord::CONDITIONS_NOT_SATISFIED);
}

#[test]
fn import_refuses_misaddressed_tampered_and_replayed_blobs() {
    let mut b = bench(9, &[Make::Genuine, Make::Genuine, Make::Genuine]);
    let ms = linked(&mut b, 3);
    let mut ts = connect_selected(&mut b.readers);
    let blob1 = wc(&mut ts[0]).export_to(&ms[1].id).expect("EXPORT to backup 1");
    let blob2 = wc(&mut ts[0]).export_to(&ms[2].id).expect("EXPORT to backup 2");

    // A blob for backup 2 offered to backup 1.
    let before = b.cards.view(1);
    assert_eq!(status_of(wc(&mut ts[1]).import(&blob2)), StatusWord::WRONG_DATA);
    assert_eq!(b.cards.view(1), CardView { apdus: before.apdus + 1, ..before }, "backup 1 unchanged");

    // Each field flipped in turn.
    let good = TransferBlob::parse(&blob1).expect("blob");
    let flips: Vec<(&str, TransferBlob, StatusWord)> = vec![
        ("bundle id", TransferBlob { bundle_id: OTHER_BUNDLE, ..good.clone() }, StatusWord::WRONG_DATA),
        ("from", TransferBlob { from: ms[2].id, ..good.clone() }, StatusWord::WRONG_DATA),
        ("to", TransferBlob { to: ms[2].id, ..good.clone() }, StatusWord::WRONG_DATA),
        ("wallet key", flip(&good, |b| b.wallet_key[20] ^= 1), StatusWord::SECURITY_STATUS),
        ("ephemeral key", flip(&good, |b| b.ephemeral_key[20] ^= 1), StatusWord::SECURITY_STATUS),
        ("GCM nonce", flip(&good, |b| b.gcm_nonce[3] ^= 1), StatusWord::SECURITY_STATUS),
        ("ciphertext", flip(&good, |b| b.ciphertext[5] ^= 1), StatusWord::SECURITY_STATUS),
        ("GCM tag", flip(&good, |b| b.ciphertext[40] ^= 1), StatusWord::SECURITY_STATUS),
        ("signature", flip(&good, |b| b.signature[10] ^= 1), StatusWord::SECURITY_STATUS),
    ];
    for (what, tampered, want) in flips {
        let before = b.cards.view(1);
        assert_eq!(status_of(wc(&mut ts[1]).import(&tampered.encode())), want, "{what}");
        assert_eq!(b.cards.view(1), CardView { apdus: before.apdus + 1, ..before }, "{what}: backup 1 unchanged");
    }
    // Not canonical, truncated, or padded: incorrect data.
    for (what, bytes) in [
        ("truncated", blob1[..blob1.len() - 1].to_vec()),
        ("padded", [blob1.clone(), vec![0x85, 0x01, 0x01]].concat()),
        ("empty", Vec::new()),
    ] {
        assert_eq!(status_of(wc(&mut ts[1]).import(&bytes)), StatusWord::WRONG_DATA, "{what}");
    }
    assert_eq!(b.cards.view(1).wallet_public_key, None, "no key after all the refusals");

    // The right blob imports; a replay of it afterwards is refused.
    let conf = wc(&mut ts[1]).import(&blob1).expect("IMPORT");
    assert_eq!(Some(conf.wallet_key), b.cards.view(0).wallet_public_key);
    let after = b.cards.view(1);
    assert_eq!(status_of(wc(&mut ts[1]).import(&blob1)), StatusWord::CONDITIONS_NOT_SATISFIED, "replay");
    assert_eq!(b.cards.view(1), CardView { apdus: after.apdus + 1, ..after });
    // CONFIRM BACKUP: a confirmation from another card, or for another key.
    let mut wrong_key = conf.clone();
    wrong_key.wallet_key[10] ^= 1;
    assert_eq!(status_of(wc(&mut ts[0]).confirm_backup(&wrong_key)), StatusWord::WRONG_DATA);
    let mut forged = conf.clone();
    forged.card_id = ms[2].id;
    assert_eq!(status_of(wc(&mut ts[0]).confirm_backup(&forged)), StatusWord::SECURITY_STATUS);
    let mut outsider = conf.clone();
    outsider.card_id = CardId([0x11; 10]);
    assert_eq!(status_of(wc(&mut ts[0]).confirm_backup(&outsider)), StatusWord::REFERENCED_DATA_NOT_FOUND);
    wc(&mut ts[0]).confirm_backup(&conf).expect("CONFIRM BACKUP");
    assert_eq!(b.cards.view(0).wallet_bundle.expect("linked").backups, vec![(ms[1].id, true), (ms[2].id, false)]);
    // Backup 2 still imports its own blob.
    wc(&mut ts[2]).import(&blob2).expect("backup 2 imports its blob");
}

fn flip(blob: &TransferBlob, f: impl FnOnce(&mut TransferBlob)) -> TransferBlob {
    let mut b = blob.clone();
    f(&mut b);
    b
}

#[test]
fn a_primary_with_a_bad_signature_fault_cannot_transfer() {
    let mut b = bench(10, &[Make::Genuine, Make::Genuine]);
    let ms = linked(&mut b, 2);
    b.cards.set_faults(0, CardFaults { bad_signature: true, ..CardFaults::default() });
    let mut ts = connect(&mut b.readers);
    for t in ts.iter_mut() {
        wc(t).select().expect("SELECT after the power cycle");
    }
    let blob = wc(&mut ts[0]).export_to(&ms[1].id).expect("EXPORT");
    let parsed = TransferBlob::parse(&blob).expect("blob");
    assert!(parsed.verify(ms[0].key.as_ref().expect("genuine")).is_err(), "the host sees it too");
    assert_eq!(status_of(wc(&mut ts[1]).import(&blob)), StatusWord::SECURITY_STATUS);
}

// ---------------------------------------------------------------------------
// Sealing, abort and the access code

#[test]
fn nothing_links_exports_or_aborts_after_sealing() {
    let mut b = bench(11, &[Make::Genuine, Make::Genuine, Make::Genuine]);
    let wallet_pub = {
        let mut ts = connect(&mut b.readers);
        run_bundle(&mut ts, &BUNDLE).expect("seals")
    };
    let mut ts = connect(&mut b.readers);
    let ms = members(&mut ts);
    let before: Vec<CardView> = (0..3).map(|i| b.cards.view(i)).collect();
    let nope = StatusWord::CONDITIONS_NOT_SATISFIED;
    let att = LinkAttestation { card_id: ms[1].id, firmware_hash: [0; 32], signature: [0; 64] };
    assert_eq!(status_of(wc(&mut ts[0]).export_to(&ms[1].id)), nope, "EXPORT");
    assert_eq!(status_of(wc(&mut ts[0]).link_primary(&OTHER_BUNDLE, 1)), nope, "LINK PRIMARY");
    assert_eq!(status_of(wc(&mut ts[1]).link_backup(&OTHER_BUNDLE, &ms[0].cert, &[0; 32])), nope, "LINK BACKUP");
    assert_eq!(status_of(wc(&mut ts[0]).add_backup(&ms[1].cert, &att)), nope, "ADD BACKUP");
    assert_eq!(status_of(wc(&mut ts[0]).generate_wallet_key()), nope, "GENERATE");
    assert_eq!(status_of(wc(&mut ts[1]).prove_wallet(&[0; 32])), nope, "PROVE WALLET");
    assert_eq!(status_of(wc(&mut ts[1]).finalize()), nope, "FINALIZE twice");
    let blob = TransferBlob {
        bundle_id: BUNDLE,
        from: ms[0].id,
        to: ms[1].id,
        wallet_key: wallet_pub,
        ephemeral_key: wallet_pub,
        gcm_nonce: [0; 12],
        ciphertext: [0; 48],
        signature: [0; 64],
    };
    assert_eq!(status_of(wc(&mut ts[1]).import(&blob.encode())), nope, "IMPORT");
    let conf = card::wallet::ImportConfirmation { card_id: ms[1].id, wallet_key: wallet_pub, signature: [0; 64] };
    assert_eq!(status_of(wc(&mut ts[0]).confirm_backup(&conf)), nope, "CONFIRM BACKUP");
    for t in ts.iter_mut() {
        assert_eq!(status_of(wc(t).abort_bundle()), nope, "ABORT after sealing");
    }
    for (i, v) in before.iter().enumerate() {
        let now = b.cards.view(i);
        assert_eq!(CardView { apdus: 0, ..now.clone() }, CardView { apdus: 0, ..v.clone() }, "card {i} unchanged");
        assert_eq!(now.wallet_public_key, Some(wallet_pub));
    }
    drop(ts);
    // The card manager refuses to DELETE a sealed wallet (section 8.2).
    let mut t = b.readers[1].connect().expect("card");
    let ring = KeyRing::new().with(0xFF, KeySource::Static(StaticKeys::gp_default()));
    let mut gp = GpSession::open(&mut *t, &ring, 0, SecurityLevel::CMac).expect("GP session");
    assert_eq!(status_of(gp.delete(&APPLET_AID, false)), nope, "DELETE instance");
    assert_eq!(status_of(gp.delete(&PACKAGE_AID, true)), nope, "DELETE package and related");
    assert_eq!(b.cards.view(1).wallet_public_key, Some(wallet_pub));
}

fn assert_reworked(t: &mut Box<dyn Transport + Send + '_>, what: &str) {
    let info = wc(t).select().expect("SELECT");
    assert_eq!(
        (info.lifecycle, info.role, info.bundle_id, info.has_wallet_key),
        (Lifecycle::Installed, None, None, false),
        "{what}"
    );
    let raw = t.transmit(&card::Command::new(0x80, 0x22, 0, 0).with_le(256)).expect("answer");
    assert_eq!(raw.sw, StatusWord::REFERENCED_DATA_NOT_FOUND, "{what}: GET WALLET KEY");
}

#[test]
fn abort_before_sealing_wipes_primary_and_backup() {
    let mut b = bench(12, &[Make::Genuine, Make::Genuine, Make::Genuine]);
    let ms = linked(&mut b, 3);
    let mut ts = connect_selected(&mut b.readers);
    // Backup 1 imports; backup 2 does not: the bundle is half done.
    let blob = wc(&mut ts[0]).export_to(&ms[1].id).expect("EXPORT");
    wc(&mut ts[1]).import(&blob).expect("IMPORT");
    assert!(b.cards.view(1).wallet_public_key.is_some());
    for (i, t) in ts.iter_mut().enumerate() {
        wc(t).abort_bundle().expect("ABORT");
        assert_reworked(t, &format!("card {i}"));
        // Idempotent: an Installed card aborts to Installed.
        wc(t).abort_bundle().expect("ABORT again");
    }
    for i in 0..3 {
        let v = b.cards.view(i);
        assert_eq!(
            (v.wallet_lifecycle, v.wallet_public_key, v.wallet_bundle),
            (Some(Lifecycle::Installed), None, None)
        );
    }
    // A Keyed card outside any bundle aborts too (its key is wiped).
    wc(&mut ts[0]).generate_wallet_key().expect("GENERATE");
    wc(&mut ts[0]).abort_bundle().expect("ABORT a Keyed card");
    assert_reworked(&mut ts[0], "keyed card");
    // The same cards make a new bundle.
    assert!(run_bundle(&mut ts, &OTHER_BUNDLE).is_ok());
    for t in ts.iter_mut() {
        assert_eq!(status_of(wc(t).abort_bundle()), StatusWord::CONDITIONS_NOT_SATISFIED, "sealed now");
    }
}

#[test]
fn the_access_code_gates_sign_on_a_sealed_card() {
    let mut b = bench(13, &[Make::Genuine, Make::Genuine]);
    let wallet_pub = {
        let mut ts = connect(&mut b.readers);
        // Before sealing there is no access code to set or verify.
        wc(&mut ts[0]).select().expect("SELECT");
        assert_eq!(status_of(wc(&mut ts[0]).set_access_code(CODE)), StatusWord::CONDITIONS_NOT_SATISFIED);
        assert_eq!(status_of(wc(&mut ts[0]).verify_access_code(CODE)), StatusWord::CONDITIONS_NOT_SATISFIED);
        run_bundle(&mut ts, &BUNDLE).expect("seals")
    };
    let wallet = VerifyingKey::from_sec1_bytes(&wallet_pub).expect("point");
    let digest = [0x77; 32];
    {
        let mut ts = connect(&mut b.readers);
        let t = &mut ts[1];
        wc(t).select().expect("SELECT");
        assert_eq!(status_of(wc(t).sign(&digest)), StatusWord::SECURITY_STATUS, "sealed, no code");
        assert_eq!(status_of(wc(t).verify_access_code(CODE)), StatusWord::REFERENCED_DATA_NOT_FOUND, "no code set");
        for short in [&b"12345"[..], &[0x31; 17][..]] {
            assert_eq!(status_of(wc(t).set_access_code(short)), StatusWord::WRONG_LENGTH);
        }
        wc(t).set_access_code(CODE).expect("SET ACCESS CODE");
        assert_eq!(status_of(wc(t).set_access_code(b"999999")), StatusWord::CONDITIONS_NOT_SATISFIED, "only once");
        assert_eq!(status_of(wc(t).sign(&digest)), StatusWord::SECURITY_STATUS, "set is not verified");
        // VERIFY without data reports the tries left (ISO 7816-4).
        assert_eq!(status_of(wc(t).verify_access_code(&[])), StatusWord(0x63C5));
        wc(t).verify_access_code(CODE).expect("VERIFY");
        wc(t).verify_access_code(&[]).expect("verified in this session");
        let sig = wc(t).sign(&digest).expect("SIGN after VERIFY");
        assert!(verify_digest(&wallet, &digest, &sig));
        // SELECT again keeps the session's verification; only power-off ends it.
        wc(t).select().expect("SELECT");
        wc(t).sign(&digest).expect("still unlocked");
    }
    assert_eq!(b.cards.view(1).access_code_tries, Some(5));
    let mut ts = connect(&mut b.readers);
    let t = &mut ts[1];
    wc(t).select().expect("SELECT");
    assert_eq!(status_of(wc(t).sign(&digest)), StatusWord::SECURITY_STATUS, "locked again after power-off");
    assert_eq!(status_of(wc(t).verify_access_code(b"1234")), StatusWord::WRONG_LENGTH, "not a try");
    for left in (0..5u8).rev() {
        assert_eq!(status_of(wc(t).verify_access_code(b"000000")), StatusWord::new(0x63, 0xC0 | left));
        assert_eq!(b.cards.view(1).access_code_tries, Some(left), "the count is committed");
    }
    assert_eq!(status_of(wc(t).verify_access_code(CODE)), StatusWord::AUTH_METHOD_BLOCKED, "blocked");
    assert_eq!(status_of(wc(t).sign(&digest)), StatusWord::SECURITY_STATUS);
    // A right code before the last try resets the count (on the other card).
    let t0 = &mut ts[0];
    wc(t0).select().expect("SELECT");
    wc(t0).set_access_code(b"correct horse").expect("SET");
    assert_eq!(status_of(wc(t0).verify_access_code(b"wrong horse")), StatusWord(0x63C4));
    wc(t0).verify_access_code(b"correct horse").expect("VERIFY");
    assert_eq!(b.cards.view(0).access_code_tries, Some(5));
    // The code itself is nowhere in the card's state: only a salted hash.
    let wrong = |t: &mut Box<dyn Transport + Send + '_>| {
        t.transmit(&card::Command::new(0x00, 0x20, 0x00, 0x80).with_data(CODE.to_vec())).expect("answer").sw
    };
    assert_eq!(wrong(t0), StatusWord::INCORRECT_P1P2, "P2 must be 81");
}

#[test]
fn a_chained_command_needs_all_its_parts() {
    let mut b = bench(14, &[Make::Genuine, Make::Genuine]);
    let mut ts = connect(&mut b.readers);
    let ms = members(&mut ts);
    wc(&mut ts[0]).generate_wallet_key().expect("GENERATE");
    let nonce = wc(&mut ts[0]).link_primary(&BUNDLE, 1).expect("LINK PRIMARY");
    let att = wc(&mut ts[1]).link_backup(&BUNDLE, &ms[0].cert, &nonce).expect("LINK BACKUP");
    let body = [ms[1].cert.clone(), att.encode()].concat();
    let part = |cla: u8, data: &[u8]| card::Command::new(cla, 0x26, 0, 0).with_data(data.to_vec());
    let t = &mut ts[0];
    // The first part alone is buffered; another command in between drops it.
    assert_eq!(t.transmit(&part(0x90, &body[..200])).expect("answer").sw, StatusWord::OK);
    wc(t).prove_wallet(&[3; 32]).expect("another command");
    assert_eq!(t.transmit(&part(0x80, &body[200..])).expect("answer").sw, StatusWord::WRONG_DATA);
    // A SELECT drops it too.
    assert_eq!(t.transmit(&part(0x90, &body[..200])).expect("answer").sw, StatusWord::OK);
    wc(t).select().expect("SELECT");
    assert_eq!(t.transmit(&part(0x80, &body[200..])).expect("answer").sw, StatusWord::WRONG_DATA);
    // Chained parts of an unknown instruction are refused at once.
    let unknown = card::Command::new(0x90, 0x2E, 0, 0).with_data(vec![1, 2, 3]);
    assert_eq!(t.transmit(&unknown).expect("answer").sw, StatusWord::INS_NOT_SUPPORTED);
    // In three parts it works.
    for chunk in [&body[..100], &body[100..200]] {
        assert_eq!(t.transmit(&part(0x90, chunk)).expect("answer").sw, StatusWord::OK);
    }
    assert_eq!(t.transmit(&part(0x80, &body[200..])).expect("answer").sw, StatusWord::OK);
    assert_eq!(b.cards.view(0).wallet_bundle.expect("linked").backups, vec![(ms[1].id, false)]);
}

// ---------------------------------------------------------------------------
// Tearing

const TEAR_SEED: u64 = 90;
const TEAR_CHALLENGE_BUNDLE: [u8; 16] = *b"tear-bundle-0001";
const TEAR_SECOND_BUNDLE: [u8; 16] = *b"tear-bundle-0002";

/// A transport that records the card's state after every APDU it carries.
struct Watch<'a> {
    inner: Box<dyn Transport + Send + 'a>,
    slot: Arc<EmuSlot>,
    states: Vec<CardView>,
}

impl Transport for Watch<'_> {
    fn transmit_raw(&mut self, apdu: &[u8]) -> Result<Vec<u8>, TransportError> {
        let r = self.inner.transmit_raw(apdu);
        self.states.push(state(&self.slot.inspect(EmuCard::view).expect("card")));
        r
    }

    fn atr(&self) -> &Atr {
        self.inner.atr()
    }

    fn reset(&mut self) -> Result<(), TransportError> {
        self.inner.reset()
    }
}

/// A view without the APDU count: the card's state.
fn state(v: &CardView) -> CardView {
    CardView { apdus: 0, ..v.clone() }
}

#[test]
fn tearing_any_apdu_of_a_bundle_leaves_consistent_cards_that_abort_or_finish() {
    let makes = [Make::Genuine, Make::Genuine, Make::Genuine];
    // The reference run: each card's state before the run and after each
    // of its APDUs.
    let (reference, reference_key) = {
        let mut b = bench(TEAR_SEED, &makes);
        let slots: Vec<Arc<EmuSlot>> = (0..3).map(|i| Arc::clone(b.cards.slot(i))).collect();
        let starts: Vec<CardView> = (0..3).map(|i| state(&b.cards.view(i))).collect();
        let mut watched: Vec<Watch<'_>> = b
            .readers
            .iter_mut()
            .zip(slots)
            .zip(starts)
            .map(|((r, slot), start)| Watch { inner: r.connect().expect("card"), slot, states: vec![start] })
            .collect();
        let mut boxed: Vec<Box<dyn Transport + Send + '_>> = Vec::new();
        for w in watched.iter_mut() {
            boxed.push(Box::new(Borrowed(w)));
        }
        let key = run_bundle(&mut boxed, &TEAR_CHALLENGE_BUNDLE).expect("the reference bundle seals");
        drop(boxed);
        (watched.into_iter().map(|w| w.states).collect::<Vec<_>>(), key)
    };
    let lens: Vec<usize> = reference.iter().map(|r| r.len() - 1).collect();
    // Primary: SELECT, GET IDENTITY, GENERATE, LINK PRIMARY, 2 x ADD BACKUP
    // (two chained APDUs each), 2 x EXPORT, 2 x CONFIRM, PROVE, FINALIZE.
    // Backups: SELECT, GET IDENTITY, LINK BACKUP, IMPORT, PROVE, FINALIZE.
    assert_eq!(lens, [14, 6, 6]);

    let mut outcomes = std::collections::BTreeMap::new();
    for (k, &len) in lens.iter().enumerate() {
        for n in 1..=len {
            for point in [TearPoint::Before, TearPoint::After] {
                let what = format!("card {k} torn at its bundle APDU {n} ({point:?})");
                let mut b = bench(TEAR_SEED, &makes);
                let start = b.cards.view(k).apdus;
                b.cards
                    .set_faults(k, CardFaults { remove_at: Some((start + n as u64, point)), ..CardFaults::default() });
                let err = {
                    let mut ts = connect(&mut b.readers);
                    run_bundle(&mut ts, &TEAR_CHALLENGE_BUNDLE).expect_err("the card leaves mid-bundle")
                };
                assert!(matches!(err, CardError::Transport(TransportError::CardRemoved)), "{what}: {err}");
                // The torn card holds the state of before or after the command.
                let torn = b.cards.slot(k).remove().expect("the torn card can be collected");
                let v = torn.view();
                assert_eq!(v.apdus, start + n as u64, "{what}");
                let want = if point == TearPoint::Before { &reference[k][n - 1] } else { &reference[k][n] };
                assert_eq!(&state(&v), want, "{what}");
                b.cards.slot(k).insert(torn).expect("slot is empty");

                // No card is sealed unless the primary has every backup confirmed.
                let views: Vec<CardView> = (0..3).map(|i| b.cards.view(i)).collect();
                let sealed: Vec<bool> = views.iter().map(|v| v.wallet_lifecycle == Some(Lifecycle::Sealed)).collect();
                if sealed.iter().any(|s| *s) {
                    let p = views[0].wallet_bundle.as_ref().expect("the primary is linked");
                    assert!(p.backups.len() == 2 && p.backups.iter().all(|(_, c)| *c), "{what}: sealed too early");
                }
                let mut ts = connect(&mut b.readers);
                let outcome = if sealed.iter().any(|s| *s) {
                    // Sealing started: the rest seal too (ABORT is refused).
                    for (i, t) in ts.iter_mut().enumerate() {
                        wc(t).select().expect("SELECT");
                        if sealed[i] {
                            assert_eq!(status_of(wc(t).abort_bundle()), StatusWord::CONDITIONS_NOT_SATISFIED);
                        } else {
                            wc(t).finalize().unwrap_or_else(|e| panic!("{what}: finalize card {i}: {e}"));
                        }
                    }
                    for i in 0..3 {
                        let v = b.cards.view(i);
                        assert_eq!(v.wallet_lifecycle, Some(Lifecycle::Sealed), "{what}: card {i}");
                        assert_eq!(v.wallet_public_key, Some(reference_key), "{what}: card {i}");
                    }
                    "finished"
                } else {
                    // Otherwise ABORT brings every card back, and a new bundle works.
                    for (i, t) in ts.iter_mut().enumerate() {
                        wc(t).select().expect("SELECT");
                        wc(t).abort_bundle().unwrap_or_else(|e| panic!("{what}: abort card {i}: {e}"));
                        assert_reworked(t, &format!("{what}: card {i}"));
                    }
                    run_bundle(&mut ts, &TEAR_SECOND_BUNDLE).unwrap_or_else(|e| panic!("{what}: fresh bundle: {e}"));
                    "aborted"
                };
                *outcomes.entry(outcome).or_insert(0) += 1;
            }
        }
    }
    // Both recoveries happened: tears before sealing and during it.
    assert!(outcomes.get("aborted").is_some_and(|n| *n > 20), "{outcomes:?}");
    assert!(outcomes.get("finished").is_some_and(|n| *n >= 4), "{outcomes:?}");
}

/// Lends a `Watch` as a boxed transport for `run_bundle`.
struct Borrowed<'w, 'a>(&'w mut Watch<'a>);

impl Transport for Borrowed<'_, '_> {
    fn transmit_raw(&mut self, apdu: &[u8]) -> Result<Vec<u8>, TransportError> {
        self.0.transmit_raw(apdu)
    }

    fn atr(&self) -> &Atr {
        self.0.atr()
    }

    fn reset(&mut self) -> Result<(), TransportError> {
        self.0.reset()
    }
}
