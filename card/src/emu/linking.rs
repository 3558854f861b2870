//! The wallet applet's backup-linking commands and the owner access code,
//! card side (docs/card-protocol.md, section 16): LINK PRIMARY / BACKUP,
//! ADD BACKUP, EXPORT, IMPORT, CONFIRM BACKUP, PROVE WALLET, FINALIZE, ABORT
//! BUNDLE, SET ACCESS CODE and VERIFY. Each handler makes every check before
//! its first write to `ctx.mem`, and every refusal is an error status word,
//! so the caller's commit-on-success leaves a refused command without
//! effect. The one deliberate exception is a wrong access code: its try
//! counter decrement is committed with its `63Cx` answer.

use k256::ecdsa::{SigningKey, VerifyingKey};
use zeroize::Zeroizing;

use super::applet::{card_sign, firmware_hash, wallet_public};
use super::latency::Cost;
use super::memory::{AccessCode, BundleState, Link, LinkedBackup, WalletState};
use super::{Ctx, Handled, status};
use crate::apdu::{Command, Response};
use crate::cardid::CardId;
use crate::sw::StatusWord;
use crate::tlv;
use crate::wallet::bundle::{
    self, ACCESS_CODE_MAX, ACCESS_CODE_MIN, ACCESS_CODE_TRIES, ImportConfirmation, LinkAttestation, MAX_BACKUPS, Role,
    TransferBlob, TransferRoute, WalletProof,
};
use crate::wallet::cert::Certificate;
use crate::wallet::{ACCESS_CODE_REFERENCE, Lifecycle, domain, message_digest, sign_digest, tag, verify_digest};

/// `6A89`: the backup is already recorded (ISO "data object already exists").
const ALREADY_RECORDED: StatusWord = StatusWord(0x6A89);

pub(crate) fn role_of(b: &BundleState) -> Role {
    match b.link {
        Link::Primary { .. } => Role::Primary,
        Link::Backup { .. } => Role::Backup,
    }
}

fn ok(data: Vec<u8>, cost: Cost) -> Handled {
    (Response::ok(data), cost)
}

fn wallet<'a>(ctx: &'a Ctx<'_>) -> Result<&'a WalletState, Handled> {
    ctx.mem.wallet.as_ref().ok_or_else(|| status(StatusWord::CONDITIONS_NOT_SATISFIED))
}

fn wallet_mut<'a>(ctx: &'a mut Ctx<'_>) -> &'a mut WalletState {
    ctx.mem.wallet.get_or_insert_with(WalletState::installed)
}

fn wallet_signing_key(w: &WalletState) -> Result<SigningKey, Handled> {
    let secret = w.wallet_key.as_ref().ok_or_else(|| status(StatusWord::CONDITIONS_NOT_SATISFIED))?;
    SigningKey::from_slice(&secret[..]).map_err(|_| status(StatusWord::MEMORY_FAILURE))
}

/// A Linked primary's bundle: id, nonce, announced count and backups.
struct PrimaryView<'a> {
    id: [u8; 16],
    nonce: [u8; 32],
    announced: u8,
    backups: &'a [LinkedBackup],
}

fn linked_primary<'a>(w: &'a WalletState) -> Result<PrimaryView<'a>, Handled> {
    match (&w.lifecycle, &w.bundle) {
        (Lifecycle::Linked, Some(BundleState { id, link: Link::Primary { nonce, announced, backups } })) => {
            Ok(PrimaryView { id: *id, nonce: *nonce, announced: *announced, backups })
        }
        _ => Err(status(StatusWord::CONDITIONS_NOT_SATISFIED)),
    }
}

fn backups_mut<'a>(ctx: &'a mut Ctx<'_>) -> Option<&'a mut Vec<LinkedBackup>> {
    match wallet_mut(ctx).bundle.as_mut().map(|b| &mut b.link) {
        Some(Link::Primary { backups, .. }) => Some(backups),
        _ => None,
    }
}

fn run(f: impl FnOnce() -> Result<Handled, Handled>) -> Handled {
    f().unwrap_or_else(|refused| refused)
}

/// LINK PRIMARY: a Keyed card becomes the primary of a bundle and answers a
/// fresh link nonce.
pub(crate) fn link_primary(ctx: &mut Ctx<'_>, cmd: &Command) -> Handled {
    run(|| {
        let Ok(data) = <[u8; 17]>::try_from(cmd.data.as_slice()) else {
            return Err(status(StatusWord::WRONG_LENGTH));
        };
        let w = wallet(ctx)?;
        if w.lifecycle != Lifecycle::Keyed || w.bundle.is_some() || w.wallet_key.is_none() {
            return Err(status(StatusWord::CONDITIONS_NOT_SATISFIED));
        }
        let announced = data[16];
        if !(1..=MAX_BACKUPS).contains(&announced) {
            return Err(status(StatusWord::WRONG_DATA));
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&data[..16]);
        let mut nonce = [0u8; 32];
        ctx.rng.fill(&mut nonce);
        let w = wallet_mut(ctx);
        w.bundle = Some(BundleState { id, link: Link::Primary { nonce, announced, backups: Vec::new() } });
        w.lifecycle = Lifecycle::Linked;
        Ok(ok(tlv::tlv(tag::LINK_NONCE, &nonce), Cost::Small))
    })
}

/// Splits `certificate || rest` (the certificate is one self-delimiting
/// TLV) and parses the certificate canonically.
fn split_certificate(data: &[u8]) -> Result<(Certificate, &[u8]), Handled> {
    let bad = || status(StatusWord::WRONG_DATA);
    let (_, rest) = tlv::parse_one(data).map_err(|_| bad())?;
    let cert = Certificate::parse(&data[..data.len() - rest.len()]).map_err(|_| bad())?;
    Ok((cert, rest))
}

/// Checks a peer's certificate against the vendor CA key in the chip
/// (signature, issuer, version, point; no clock on a card, so no validity).
fn peer_key(ctx: &Ctx<'_>, cert: &Certificate) -> Result<VerifyingKey, Handled> {
    cert.verify_untimed(&[ctx.chip.vendor_ca]).map(|(k, _)| k).map_err(|_| status(StatusWord::SECURITY_STATUS))
}

/// LINK BACKUP: an Installed card verifies the primary's certificate,
/// records the primary and attests itself over the primary's nonce.
pub(crate) fn link_backup(ctx: &mut Ctx<'_>, cmd: &Command) -> Handled {
    run(|| {
        if cmd.data.len() < 16 + 32 + 1 {
            return Err(status(StatusWord::WRONG_LENGTH));
        }
        let w = wallet(ctx)?;
        if w.lifecycle != Lifecycle::Installed || w.bundle.is_some() || w.wallet_key.is_some() {
            return Err(status(StatusWord::CONDITIONS_NOT_SATISFIED));
        }
        let (head, cert_bytes) = cmd.data.split_at(48);
        let mut id = [0u8; 16];
        id.copy_from_slice(&head[..16]);
        let mut nonce = [0u8; 32];
        nonce.copy_from_slice(&head[16..]);
        let (cert, rest) = split_certificate(cert_bytes)?;
        if !rest.is_empty() || cert.subject == ctx.chip.id {
            return Err(status(StatusWord::WRONG_DATA));
        }
        peer_key(ctx, &cert)?;
        let firmware = firmware_hash(ctx);
        let own = ctx.chip.id;
        let digest = bundle::link_digest(&id, &cert.subject, &nonce, &own, &firmware, Lifecycle::Linked as u8);
        let attestation = LinkAttestation { card_id: own, firmware_hash: firmware, signature: card_sign(ctx, &digest) };
        let w = wallet_mut(ctx);
        w.bundle = Some(BundleState { id, link: Link::Backup { primary: cert.subject, primary_key: cert.public_key } });
        w.lifecycle = Lifecycle::Linked;
        Ok(ok(attestation.encode(), Cost::Sign(2)))
    })
}

/// ADD BACKUP: the primary verifies a backup's certificate and its link
/// attestation over this primary's nonce, and records it.
pub(crate) fn add_backup(ctx: &mut Ctx<'_>, cmd: &Command) -> Handled {
    run(|| {
        let w = wallet(ctx)?;
        let p = linked_primary(w)?;
        let (cert, rest) = split_certificate(&cmd.data)?;
        let att = LinkAttestation::parse(rest).map_err(|_| status(StatusWord::WRONG_DATA))?;
        if att.card_id != cert.subject || cert.subject == ctx.chip.id {
            return Err(status(StatusWord::WRONG_DATA));
        }
        let key = peer_key(ctx, &cert)?;
        if att.firmware_hash != firmware_hash(ctx) {
            return Err(status(StatusWord::SECURITY_STATUS));
        }
        if !verify_digest(&key, &att.digest(&p.id, &ctx.chip.id, &p.nonce), &att.signature) {
            return Err(status(StatusWord::SECURITY_STATUS));
        }
        if p.backups.iter().any(|b| b.card_id == cert.subject) {
            return Err(status(ALREADY_RECORDED));
        }
        if p.backups.len() >= usize::from(p.announced) {
            return Err(status(StatusWord::CONDITIONS_NOT_SATISFIED));
        }
        let recorded = LinkedBackup { card_id: cert.subject, card_key: cert.public_key, confirmed: false };
        backups_mut(ctx).ok_or_else(|| status(StatusWord::CONDITIONS_NOT_SATISFIED))?.push(recorded);
        Ok(ok(Vec::new(), Cost::Sign(2)))
    })
}

/// EXPORT: the primary encrypts the wallet secret to one recorded backup.
pub(crate) fn export(ctx: &mut Ctx<'_>, cmd: &Command) -> Handled {
    run(|| {
        let Some(to) = CardId::from_slice(&cmd.data) else {
            return Err(status(StatusWord::WRONG_LENGTH));
        };
        let w = wallet(ctx)?;
        let p = linked_primary(w)?;
        let backup =
            p.backups.iter().find(|b| b.card_id == to).ok_or_else(|| status(StatusWord::REFERENCED_DATA_NOT_FOUND))?;
        let backup_key =
            VerifyingKey::from_sec1_bytes(&backup.card_key).map_err(|_| status(StatusWord::MEMORY_FAILURE))?;
        let wallet_key = wallet_signing_key(w)?;
        let route = TransferRoute { bundle_id: p.id, from: ctx.chip.id, to };
        let ephemeral = ctx.rng.scalar();
        let mut gcm_nonce = [0u8; 12];
        ctx.rng.fill(&mut gcm_nonce);
        let mut blob =
            bundle::seal_transfer(&route, &wallet_key, &backup_key, &ctx.chip.card_key, &ephemeral, &gcm_nonce);
        if ctx.faults.bad_signature {
            blob.signature[40] ^= 0x01;
        }
        Ok(ok(blob.encode(), Cost::Export))
    })
}

/// IMPORT: a linked backup without a key checks a blob's route and
/// signature, decrypts it and stores the wallet key.
pub(crate) fn import(ctx: &mut Ctx<'_>, cmd: &Command) -> Handled {
    run(|| {
        let w = wallet(ctx)?;
        let (id, primary, primary_key) = match (&w.lifecycle, &w.bundle, &w.wallet_key) {
            (Lifecycle::Linked, Some(BundleState { id, link: Link::Backup { primary, primary_key } }), None) => {
                (*id, *primary, *primary_key)
            }
            _ => return Err(status(StatusWord::CONDITIONS_NOT_SATISFIED)),
        };
        let blob = TransferBlob::parse(&cmd.data).map_err(|_| status(StatusWord::WRONG_DATA))?;
        if blob.bundle_id != id || blob.from != primary || blob.to != ctx.chip.id {
            return Err(status(StatusWord::WRONG_DATA));
        }
        let primary_key =
            VerifyingKey::from_sec1_bytes(&primary_key).map_err(|_| status(StatusWord::MEMORY_FAILURE))?;
        let key = bundle::open_transfer(&blob, &ctx.chip.card_key, &primary_key)
            .map_err(|_| status(StatusWord::SECURITY_STATUS))?;
        let own = ctx.chip.id;
        let signature = card_sign(ctx, &bundle::confirm_digest(&id, &own, &primary, &blob.wallet_key));
        let confirmation = ImportConfirmation { card_id: own, wallet_key: blob.wallet_key, signature };
        wallet_mut(ctx).wallet_key = Some(Zeroizing::new(<[u8; 32]>::from(key.to_bytes())));
        Ok(ok(confirmation.encode(), Cost::Import))
    })
}

/// CONFIRM BACKUP: the primary checks a backup's import confirmation.
pub(crate) fn confirm_backup(ctx: &mut Ctx<'_>, cmd: &Command) -> Handled {
    run(|| {
        let w = wallet(ctx)?;
        let p = linked_primary(w)?;
        let conf = ImportConfirmation::parse(&cmd.data).map_err(|_| status(StatusWord::WRONG_DATA))?;
        if Some(conf.wallet_key) != wallet_public(w) {
            return Err(status(StatusWord::WRONG_DATA));
        }
        let backup = p
            .backups
            .iter()
            .find(|b| b.card_id == conf.card_id)
            .ok_or_else(|| status(StatusWord::REFERENCED_DATA_NOT_FOUND))?;
        let key = VerifyingKey::from_sec1_bytes(&backup.card_key).map_err(|_| status(StatusWord::MEMORY_FAILURE))?;
        if !verify_digest(&key, &conf.digest(&p.id, &ctx.chip.id), &conf.signature) {
            return Err(status(StatusWord::SECURITY_STATUS));
        }
        if let Some(b) = backups_mut(ctx).and_then(|bs| bs.iter_mut().find(|b| b.card_id == conf.card_id)) {
            b.confirmed = true;
        }
        Ok(ok(Vec::new(), Cost::Sign(1)))
    })
}

/// PROVE WALLET: the wallet key signs a host challenge (before sealing).
pub(crate) fn prove_wallet(ctx: &mut Ctx<'_>, cmd: &Command) -> Handled {
    run(|| {
        let Ok(challenge) = <[u8; 32]>::try_from(cmd.data.as_slice()) else {
            return Err(status(StatusWord::WRONG_LENGTH));
        };
        let w = wallet(ctx)?;
        if !matches!(w.lifecycle, Lifecycle::Keyed | Lifecycle::Linked) {
            return Err(status(StatusWord::CONDITIONS_NOT_SATISFIED));
        }
        let key = wallet_signing_key(w)?;
        let bundle_id = w.bundle.as_ref().map(|b| b.id);
        let digest = bundle::wallet_proof_digest(&challenge, &ctx.chip.id, bundle_id.as_ref());
        let proof = WalletProof {
            wallet_key: crate::wallet::public_key_bytes(key.verifying_key()),
            signature: sign_digest(&key, &digest),
        };
        Ok(ok(proof.encode(), Cost::Sign(1)))
    })
}

/// FINALIZE: seals a complete bundle member.
pub(crate) fn finalize(ctx: &mut Ctx<'_>) -> Handled {
    run(|| {
        let w = wallet(ctx)?;
        let refused = || status(StatusWord::CONDITIONS_NOT_SATISFIED);
        let (Lifecycle::Linked, Some(b), Some(public)) = (&w.lifecycle, &w.bundle, wallet_public(w)) else {
            return Err(refused());
        };
        if let Link::Primary { announced, backups, .. } = &b.link
            && (backups.len() != usize::from(*announced) || !backups.iter().all(|b| b.confirmed))
        {
            return Err(refused());
        }
        let digest = bundle::sealed_digest(&b.id, &ctx.chip.id, role_of(b), &public);
        let signature = card_sign(ctx, &digest);
        wallet_mut(ctx).lifecycle = Lifecycle::Sealed;
        Ok(ok(tlv::tlv(tag::SIGNATURE, &signature), Cost::Sign(1)))
    })
}

/// ABORT BUNDLE: any unsealed wallet goes back to Installed, without its
/// link state and without its wallet key (rework).
pub(crate) fn abort_bundle(ctx: &mut Ctx<'_>) -> Handled {
    run(|| {
        if wallet(ctx)?.lifecycle == Lifecycle::Sealed {
            return Err(status(StatusWord::CONDITIONS_NOT_SATISFIED));
        }
        *wallet_mut(ctx) = WalletState::installed();
        Ok(ok(Vec::new(), Cost::Small))
    })
}

fn access_code_hash(salt: &[u8; 16], code: &[u8]) -> [u8; 32] {
    message_digest(domain::ACCESS_CODE, &[salt, code])
}

/// SET ACCESS CODE: once, on a sealed wallet.
pub(crate) fn set_access_code(ctx: &mut Ctx<'_>, cmd: &Command) -> Handled {
    run(|| {
        if !(ACCESS_CODE_MIN..=ACCESS_CODE_MAX).contains(&cmd.data.len()) {
            return Err(status(StatusWord::WRONG_LENGTH));
        }
        let w = wallet(ctx)?;
        if w.lifecycle != Lifecycle::Sealed || w.access_code.is_some() {
            return Err(status(StatusWord::CONDITIONS_NOT_SATISFIED));
        }
        let mut salt = [0u8; 16];
        ctx.rng.fill(&mut salt);
        let hash = access_code_hash(&salt, &cmd.data);
        wallet_mut(ctx).access_code = Some(AccessCode { salt, hash, tries_left: ACCESS_CODE_TRIES });
        Ok(ok(Vec::new(), Cost::Small))
    })
}

fn tries_left(n: u8) -> Handled {
    status(StatusWord::new(0x63, 0xC0 | (n & 0x0F)))
}

/// ISO VERIFY of the access code: unlocks SIGN until power-off.
pub(crate) fn verify_access_code(ctx: &mut Ctx<'_>, cmd: &Command) -> Handled {
    run(|| {
        if (cmd.p1, cmd.p2) != (0x00, ACCESS_CODE_REFERENCE) {
            return Err(status(StatusWord::INCORRECT_P1P2));
        }
        let w = wallet(ctx)?;
        if w.lifecycle != Lifecycle::Sealed {
            return Err(status(StatusWord::CONDITIONS_NOT_SATISFIED));
        }
        let Some(code) = w.access_code.as_ref() else {
            return Err(status(StatusWord::REFERENCED_DATA_NOT_FOUND));
        };
        if code.tries_left == 0 {
            return Err(status(StatusWord::AUTH_METHOD_BLOCKED));
        }
        // ISO 7816-4 §11.5.6: VERIFY without data asks for the status.
        if cmd.data.is_empty() {
            return Ok(if ctx.ram.wallet_unlocked { ok(Vec::new(), Cost::Small) } else { tries_left(code.tries_left) });
        }
        if !(ACCESS_CODE_MIN..=ACCESS_CODE_MAX).contains(&cmd.data.len()) {
            return Err(status(StatusWord::WRONG_LENGTH));
        }
        let right = access_code_hash(&code.salt, &cmd.data) == code.hash;
        let left = if right { ACCESS_CODE_TRIES } else { code.tries_left - 1 };
        if let Some(code) = wallet_mut(ctx).access_code.as_mut() {
            code.tries_left = left;
        }
        ctx.ram.wallet_unlocked = right;
        // A wrong code answers 63Cx, which the card commits: the decrement
        // and the answer are one atomic step, so tearing the card cannot
        // buy a free guess.
        Ok(if right { ok(Vec::new(), Cost::Small) } else { tries_left(left) })
    })
}
