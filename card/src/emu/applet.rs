//! The emulated Tapline wallet applet (docs/card-protocol.md): dispatch
//! (with ISO command chaining), identity, attestation, wallet key, signing,
//! self-tests and GET CHALLENGE, with the lifecycle rules enforced on the
//! card; the backup-linking commands and the access code are in `linking`.
//! Instances of any other package are inert applets that answer only SELECT.

use k256::ecdsa::SigningKey;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::latency::Cost;
use super::linking;
use super::memory::{CommandChain, WalletState};
use super::{Ctx, Handled, status};
use crate::apdu::{Command, Response};
use crate::sw::StatusWord;
use crate::tlv;
use crate::wallet::{
    self, Attestation, Lifecycle, PROTOCOL_VERSION, WalletKeyProof, ins, public_key_bytes, self_test, sign_digest, tag,
};

fn is_wallet(ctx: &Ctx<'_>, aid: &[u8]) -> bool {
    ctx.mem.instances.iter().any(|i| i.aid == aid && i.package_aid == wallet::PACKAGE_AID)
}

pub(crate) fn select_response(ctx: &Ctx<'_>, aid: &[u8]) -> Handled {
    if !is_wallet(ctx, aid) {
        return (Response::ok(Vec::new()), Cost::Small);
    }
    let lifecycle = ctx.mem.wallet.as_ref().map_or(Lifecycle::Installed, |w| w.lifecycle);
    let has_key = ctx.mem.wallet.as_ref().is_some_and(|w| w.wallet_key.is_some());
    let mut out = tlv::tlv(tag::VERSION, &[PROTOCOL_VERSION]);
    tlv::encode(tag::LIFECYCLE, &[lifecycle as u8], &mut out);
    tlv::encode(tag::HAS_WALLET_KEY, &[u8::from(has_key)], &mut out);
    if let Some(b) = ctx.mem.wallet.as_ref().and_then(|w| w.bundle.as_ref()) {
        tlv::encode(tag::ROLE, &[linking::role_of(b) as u8], &mut out);
        tlv::encode(tag::BUNDLE_ID, &b.id, &mut out);
    }
    (Response::ok(out), Cost::Small)
}

/// The CLA 80 instructions this applet knows (chained parts of anything
/// else are refused at once).
fn known_ins(ins: u8) -> bool {
    matches!(
        ins,
        ins::GET_IDENTITY
            | ins::ATTEST
            | ins::GENERATE_WALLET_KEY
            | ins::GET_WALLET_KEY
            | ins::LINK_PRIMARY
            | ins::LINK_BACKUP
            | ins::ADD_BACKUP
            | ins::EXPORT
            | ins::IMPORT
            | ins::CONFIRM_BACKUP
            | ins::PROVE_WALLET
            | ins::FINALIZE
            | ins::ABORT_BUNDLE
            | ins::SET_ACCESS_CODE
            | ins::SIGN
            | ins::SELF_TEST
    )
}

/// The most data a chained command may carry in all.
const CHAIN_MAX: usize = 1024;

/// ISO 7816-4 command chaining, as a JavaCard applet does it in RAM: a part
/// (CLA 90) is buffered and answered 9000; the last part (CLA 80, same
/// INS P1 P2) gets the whole data. Any other command drops a pending chain.
fn unchain(ctx: &mut Ctx<'_>, cmd: &Command) -> Result<Option<Command>, Handled> {
    let pending = ctx.ram.chain.take();
    let same = |c: &CommandChain| (c.ins, c.p1, c.p2) == (cmd.ins, cmd.p1, cmd.p2);
    if cmd.cla == wallet::CLA_CHAINING {
        if !known_ins(cmd.ins) {
            return Err(status(StatusWord::INS_NOT_SUPPORTED));
        }
        let mut data = pending.filter(same).map_or_else(Vec::new, |c| c.data);
        data.extend_from_slice(&cmd.data);
        if data.len() > CHAIN_MAX {
            return Err(status(StatusWord::WRONG_LENGTH));
        }
        ctx.ram.chain = Some(CommandChain { ins: cmd.ins, p1: cmd.p1, p2: cmd.p2, data });
        return Err((Response::ok(Vec::new()), Cost::Small));
    }
    match pending.filter(|c| cmd.cla == wallet::CLA && same(c)) {
        Some(c) => {
            let mut whole = cmd.clone();
            whole.data = [c.data, cmd.data.clone()].concat();
            Ok(Some(whole))
        }
        None => Ok(None),
    }
}

pub(crate) fn handle(ctx: &mut Ctx<'_>, aid: &[u8], cmd: &Command) -> Handled {
    if !is_wallet(ctx, aid) {
        return status(StatusWord::INS_NOT_SUPPORTED);
    }
    if cmd.cla == 0x00 && cmd.ins == ins::GET_CHALLENGE {
        ctx.ram.chain = None;
        return get_challenge(ctx, cmd);
    }
    if cmd.cla == 0x00 && cmd.ins == ins::VERIFY {
        ctx.ram.chain = None;
        return linking::verify_access_code(ctx, cmd);
    }
    let whole = match unchain(ctx, cmd) {
        Ok(w) => w,
        Err(handled) => return handled,
    };
    let cmd = whole.as_ref().unwrap_or(cmd);
    if cmd.cla != wallet::CLA {
        return status(StatusWord::CLA_NOT_SUPPORTED);
    }
    match cmd.ins {
        ins::GET_IDENTITY => (Response::ok(ctx.chip.certificate.clone()), Cost::Small),
        ins::ATTEST => attest(ctx, cmd),
        ins::GENERATE_WALLET_KEY => generate_wallet_key(ctx),
        ins::GET_WALLET_KEY => get_wallet_key(ctx),
        ins::LINK_PRIMARY => linking::link_primary(ctx, cmd),
        ins::LINK_BACKUP => linking::link_backup(ctx, cmd),
        ins::ADD_BACKUP => linking::add_backup(ctx, cmd),
        ins::EXPORT => linking::export(ctx, cmd),
        ins::IMPORT => linking::import(ctx, cmd),
        ins::CONFIRM_BACKUP => linking::confirm_backup(ctx, cmd),
        ins::PROVE_WALLET => linking::prove_wallet(ctx, cmd),
        ins::FINALIZE => linking::finalize(ctx),
        ins::ABORT_BUNDLE => linking::abort_bundle(ctx),
        ins::SET_ACCESS_CODE => linking::set_access_code(ctx, cmd),
        ins::SIGN => sign(ctx, cmd),
        ins::SELF_TEST => self_test(ctx, cmd),
        _ => status(StatusWord::INS_NOT_SUPPORTED),
    }
}

/// A card-key signature, corrupted when the fault script says so.
pub(super) fn card_sign(ctx: &Ctx<'_>, digest: &[u8; 32]) -> [u8; 64] {
    let mut sig = sign_digest(&ctx.chip.card_key, digest);
    if ctx.faults.bad_signature {
        sig[40] ^= 0x01;
    }
    sig
}

fn state<'a>(ctx: &'a Ctx<'_>) -> Option<&'a WalletState> {
    ctx.mem.wallet.as_ref()
}

pub(super) fn wallet_public(w: &WalletState) -> Option<[u8; 33]> {
    let k = w.wallet_key.as_ref()?;
    SigningKey::from_slice(&k[..]).ok().map(|k| public_key_bytes(k.verifying_key()))
}

/// The verified hash of the package this applet runs from.
pub(super) fn firmware_hash(ctx: &Ctx<'_>) -> [u8; 32] {
    ctx.mem.packages.iter().find(|p| p.aid == wallet::PACKAGE_AID).map_or([0; 32], |p| p.hash)
}

fn attest(ctx: &mut Ctx<'_>, cmd: &Command) -> Handled {
    let Ok(challenge) = <[u8; 32]>::try_from(cmd.data.as_slice()) else {
        return status(StatusWord::WRONG_LENGTH);
    };
    let Some(w) = state(ctx) else {
        return status(StatusWord::CONDITIONS_NOT_SATISFIED);
    };
    let lifecycle = w.lifecycle as u8;
    let wallet_key = wallet_public(w);
    // The counter moves before the signature is released, so no two
    // attestations ever carry the same counter value.
    let Some(counter) = ctx.mem.attest_counter.checked_add(1) else {
        return status(StatusWord::CONDITIONS_NOT_SATISFIED);
    };
    ctx.mem.attest_counter = counter;
    let mut att = Attestation {
        card_id: ctx.chip.id,
        counter,
        lifecycle,
        firmware_hash: firmware_hash(ctx),
        wallet_key,
        signature: [0; 64],
    };
    att.signature = card_sign(ctx, &att.digest(&challenge));
    (Response::ok(att.encode()), Cost::Sign(1))
}

fn wallet_key_proof(ctx: &Ctx<'_>, public_key: [u8; 33]) -> Vec<u8> {
    let signature = card_sign(ctx, &wallet::wallet_key_digest(&ctx.chip.id, &public_key));
    WalletKeyProof { public_key, signature }.encode()
}

fn generate_wallet_key(ctx: &mut Ctx<'_>) -> Handled {
    match state(ctx) {
        Some(w) if w.lifecycle == Lifecycle::Installed && w.wallet_key.is_none() => {}
        Some(_) => return status(StatusWord::CONDITIONS_NOT_SATISFIED),
        None => return status(StatusWord::CONDITIONS_NOT_SATISFIED),
    }
    let key = ctx.rng.scalar();
    let public = public_key_bytes(key.verifying_key());
    let secret = Zeroizing::new(<[u8; 32]>::from(key.to_bytes()));
    ctx.mem.wallet =
        Some(WalletState { lifecycle: Lifecycle::Keyed, wallet_key: Some(secret), ..WalletState::installed() });
    (Response::ok(wallet_key_proof(ctx, public)), Cost::KeyGen)
}

fn get_wallet_key(ctx: &Ctx<'_>) -> Handled {
    match state(ctx).and_then(wallet_public) {
        Some(public) => (Response::ok(wallet_key_proof(ctx, public)), Cost::Sign(1)),
        None => status(StatusWord::REFERENCED_DATA_NOT_FOUND),
    }
}

fn sign(ctx: &Ctx<'_>, cmd: &Command) -> Handled {
    let Ok(digest) = <[u8; 32]>::try_from(cmd.data.as_slice()) else {
        return status(StatusWord::WRONG_LENGTH);
    };
    let Some(w) = state(ctx) else {
        return status(StatusWord::CONDITIONS_NOT_SATISFIED);
    };
    // Sealed cards sign only for their owner: after VERIFY with the access
    // code (which the owner sets; the station never does) since power-up.
    if w.lifecycle == Lifecycle::Sealed && !ctx.ram.wallet_unlocked {
        return status(StatusWord::SECURITY_STATUS);
    }
    let Some(secret) = w.wallet_key.as_ref() else {
        return status(StatusWord::CONDITIONS_NOT_SATISFIED);
    };
    let Ok(key) = SigningKey::from_slice(&secret[..]) else {
        return status(StatusWord::MEMORY_FAILURE);
    };
    (Response::ok(tlv::tlv(tag::SIGNATURE, &sign_digest(&key, &digest))), Cost::Sign(1))
}

fn self_test(ctx: &mut Ctx<'_>, cmd: &Command) -> Handled {
    match cmd.p1 {
        self_test::KAT => {
            let mut result = known_answer_tests();
            // Continuous RNG test (the card's own): two fresh blocks must differ.
            let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
            if !ctx.faults.stuck_rng {
                ctx.rng.fill(&mut a);
                ctx.rng.fill(&mut b);
            }
            if a == b {
                result &= !self_test::KAT_RNG;
            }
            if ctx.faults.failing_kat {
                result &= !self_test::KAT_ECDSA;
            }
            (Response::ok(tlv::tlv(tag::KAT_RESULT, &[result])), Cost::SelfTestKat)
        }
        self_test::SIGN_VECTOR => {
            if cmd.data.is_empty() || cmd.data.len() > 128 {
                return status(StatusWord::WRONG_LENGTH);
            }
            let sig = card_sign(ctx, &wallet::self_test_digest(&ctx.chip.id, &cmd.data));
            (Response::ok(tlv::tlv(tag::SIGNATURE, &sig)), Cost::Sign(1))
        }
        self_test::MEMORY => {
            let [s0, s1, s2, s3, l0, l1] = cmd.data[..] else {
                return status(StatusWord::WRONG_LENGTH);
            };
            let len = u16::from_be_bytes([l0, l1]) as usize;
            if len == 0 || len > self_test::MEMORY_MAX {
                return status(StatusWord::WRONG_DATA);
            }
            let mut written = wallet::memory_pattern(&[s0, s1, s2, s3], len);
            if ctx.faults.bad_memory {
                written[len / 2] ^= 0x10;
            }
            ctx.mem.test_region = std::sync::Arc::new(written);
            let read_back: [u8; 32] = Sha256::digest(ctx.mem.test_region.as_slice()).into();
            (Response::ok(tlv::tlv(tag::DIGEST, &read_back)), Cost::MemoryTest)
        }
        _ => status(StatusWord::INCORRECT_P1P2),
    }
}

/// Runs the card's known-answer tests for real (SHA-256, AES-128, ECDSA,
/// ECDH) against published vectors; returns the bitmap of those that pass.
fn known_answer_tests() -> u8 {
    use aes::cipher::{BlockCipherEncrypt, KeyInit};
    let mut result = self_test::KAT_RNG;
    // FIPS 180-2 "abc".
    let sha = Sha256::digest(b"abc");
    if hex::encode(sha) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" {
        result |= self_test::KAT_SHA256;
    }
    // FIPS 197 appendix C.1.
    let key = hex::decode("000102030405060708090a0b0c0d0e0f").unwrap_or_default();
    let pt = hex::decode("00112233445566778899aabbccddeeff").unwrap_or_default();
    if let Ok(cipher) = aes::Aes128::new_from_slice(&key) {
        let mut block = aes::Block::try_from(pt.as_slice()).unwrap_or_default();
        cipher.encrypt_block(&mut block);
        if hex::encode(block) == "69c4e0d86a7b0430d8cdb78070b4c55a" {
            result |= self_test::KAT_AES;
        }
    }
    // ECDSA: sign and verify with a fixed key; deterministic signatures
    // must repeat exactly.
    if let Ok(k) = SigningKey::from_slice(&[0x11; 32]) {
        let d = wallet::message_digest(b"kat", &[]);
        let s1 = sign_digest(&k, &d);
        if s1 == sign_digest(&k, &d) && wallet::verify_digest(k.verifying_key(), &d, &s1) {
            result |= self_test::KAT_ECDSA;
        }
    }
    // ECDH: both sides agree.
    if let (Ok(a), Ok(b)) = (k256::SecretKey::from_slice(&[0x21; 32]), k256::SecretKey::from_slice(&[0x22; 32])) {
        let ab = k256::ecdh::diffie_hellman(a.to_nonzero_scalar(), b.public_key().as_affine());
        let ba = k256::ecdh::diffie_hellman(b.to_nonzero_scalar(), a.public_key().as_affine());
        if ab.raw_secret_bytes() == ba.raw_secret_bytes() {
            result |= self_test::KAT_ECDH;
        }
    }
    result
}

fn get_challenge(ctx: &mut Ctx<'_>, cmd: &Command) -> Handled {
    let n = cmd.le.unwrap_or(8).min(256);
    let mut out = vec![0u8; n];
    if !ctx.faults.stuck_rng {
        ctx.rng.fill(&mut out);
    }
    (Response::ok(out), Cost::Small)
}
