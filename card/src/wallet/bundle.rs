//! Backup linking (docs/card-protocol.md, section 16): roles, the messages
//! that cards sign while they link, transfer, confirm, prove and seal, the
//! encodings of those responses, and the transfer crypto (ECDH on
//! secp256k1, HKDF-SHA256, AES-256-GCM). Hosts parse and verify with this
//! module; sealing and opening a transfer need card keys, so only cards (the
//! emulated applet) and the test vectors call `seal_transfer` and
//! `open_transfer`. Nothing here talks to a card.

use aes_gcm::aead::{Nonce, Tag};
use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit};
use k256::ecdsa::{SigningKey, VerifyingKey};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{Lifecycle, domain, message_digest, public_key_bytes, sign_digest, tag, verify_digest};
use crate::CardError;
use crate::cardid::CardId;
use crate::tlv;

/// Length of a bundle id (chosen by the host).
pub const BUNDLE_ID_LEN: usize = 16;
/// Length of the primary's link nonce.
pub const LINK_NONCE_LEN: usize = 32;
/// Length of the AES-GCM nonce of a transfer.
pub const GCM_NONCE_LEN: usize = 12;
/// The wallet secret (32) and the GCM tag (16).
pub const CIPHERTEXT_LEN: usize = 48;
/// A bundle has one primary and 1..=4 backups.
pub const MAX_BACKUPS: u8 = 4;
/// Owner access code length, in bytes.
pub const ACCESS_CODE_MIN: usize = 6;
pub const ACCESS_CODE_MAX: usize = 16;
/// Wrong access codes a sealed card accepts before it blocks.
pub const ACCESS_CODE_TRIES: u8 = 5;

/// A card's role in a bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Generates the wallet key and exports it to each backup.
    Primary = 0x01,
    /// Imports the wallet key from the primary.
    Backup = 0x02,
}

impl Role {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0x01 => Some(Self::Primary),
            0x02 => Some(Self::Backup),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Backup => "backup",
        }
    }
}

// ---------------------------------------------------------------------------
// Signed messages.

/// LINK BACKUP: the backup's card key binds it to one primary's fresh nonce
/// in one bundle, with the firmware it runs and its new lifecycle (Linked).
pub fn link_digest(
    bundle_id: &[u8; 16],
    primary: &CardId,
    nonce: &[u8; 32],
    backup: &CardId,
    firmware_hash: &[u8; 32],
    lifecycle: u8,
) -> [u8; 32] {
    message_digest(
        domain::LINK,
        &[bundle_id, primary.as_bytes(), nonce, backup.as_bytes(), firmware_hash, &[lifecycle]],
    )
}

/// EXPORT: the primary's card key over every field of the transfer blob.
pub fn transfer_digest(
    route: &TransferRoute,
    wallet_key: &[u8; 33],
    ephemeral_key: &[u8; 33],
    gcm_nonce: &[u8; 12],
    ciphertext: &[u8; 48],
) -> [u8; 32] {
    message_digest(
        domain::TRANSFER,
        &[
            &route.bundle_id,
            route.from.as_bytes(),
            route.to.as_bytes(),
            wallet_key,
            ephemeral_key,
            gcm_nonce,
            ciphertext,
        ],
    )
}

/// IMPORT: the backup's card key says it now holds this wallet key, for
/// this primary, in this bundle.
pub fn confirm_digest(bundle_id: &[u8; 16], backup: &CardId, primary: &CardId, wallet_key: &[u8; 33]) -> [u8; 32] {
    message_digest(domain::CONFIRM, &[bundle_id, backup.as_bytes(), primary.as_bytes(), wallet_key])
}

/// PROVE WALLET: the *wallet* key over a host challenge, the card and its
/// bundle (the empty part when the card is in none).
pub fn wallet_proof_digest(challenge: &[u8; 32], card_id: &CardId, bundle_id: Option<&[u8; 16]>) -> [u8; 32] {
    message_digest(domain::WALLET_PROOF, &[challenge, card_id.as_bytes(), bundle_id.map_or(&[][..], |b| &b[..])])
}

/// FINALIZE: the card key says this card is sealed in this bundle, in this
/// role, with this wallet key.
pub fn sealed_digest(bundle_id: &[u8; 16], card_id: &CardId, role: Role, wallet_key: &[u8; 33]) -> [u8; 32] {
    message_digest(domain::SEALED, &[bundle_id, card_id.as_bytes(), &[role as u8], wallet_key])
}

// ---------------------------------------------------------------------------
// Responses.

fn malformed(what: &'static str) -> impl Fn(tlv::TlvError) -> CardError {
    move |e| CardError::malformed(what, e)
}

fn canonical<T>(what: &'static str, value: T, encoded: Vec<u8>, data: &[u8]) -> Result<T, CardError> {
    // Only the canonical encoding is accepted (section 13.6).
    if encoded != data {
        return Err(CardError::malformed(what, "not in canonical encoding"));
    }
    Ok(value)
}

/// The LINK BACKUP response: the backup attests, with its card key, that it
/// linked to a primary's nonce in a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkAttestation {
    pub card_id: CardId,
    pub firmware_hash: [u8; 32],
    pub signature: [u8; 64],
}

impl LinkAttestation {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(112);
        tlv::encode(tag::CARD_ID, self.card_id.as_bytes(), &mut out);
        tlv::encode(tag::FIRMWARE_HASH, &self.firmware_hash, &mut out);
        tlv::encode(tag::SIGNATURE, &self.signature, &mut out);
        out
    }

    pub fn parse(data: &[u8]) -> Result<Self, CardError> {
        const WHAT: &str = "link attestation";
        let objs = tlv::parse_all(data).map_err(malformed(WHAT))?;
        let att = Self {
            card_id: CardId(tlv::require_array(&objs, tag::CARD_ID).map_err(malformed(WHAT))?),
            firmware_hash: tlv::require_array(&objs, tag::FIRMWARE_HASH).map_err(malformed(WHAT))?,
            signature: tlv::require_array(&objs, tag::SIGNATURE).map_err(malformed(WHAT))?,
        };
        let encoded = att.encode();
        canonical(WHAT, att, encoded, data)
    }

    /// The digest the backup signed, for the primary and nonce it was given.
    pub fn digest(&self, bundle_id: &[u8; 16], primary: &CardId, nonce: &[u8; 32]) -> [u8; 32] {
        link_digest(bundle_id, primary, nonce, &self.card_id, &self.firmware_hash, Lifecycle::Linked as u8)
    }

    /// Checks the signature with the backup's card key (from its verified
    /// certificate).
    pub fn verify(
        &self,
        card_key: &VerifyingKey,
        bundle_id: &[u8; 16],
        primary: &CardId,
        nonce: &[u8; 32],
    ) -> Result<(), CardError> {
        if verify_digest(card_key, &self.digest(bundle_id, primary, nonce), &self.signature) {
            Ok(())
        } else {
            Err(CardError::verification("link attestation", "card key signature does not verify"))
        }
    }
}

/// The IMPORT response: the backup confirms, with its card key, the wallet
/// key it imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportConfirmation {
    pub card_id: CardId,
    pub wallet_key: [u8; 33],
    pub signature: [u8; 64],
}

impl ImportConfirmation {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(113);
        tlv::encode(tag::CARD_ID, self.card_id.as_bytes(), &mut out);
        tlv::encode(tag::PUBLIC_KEY, &self.wallet_key, &mut out);
        tlv::encode(tag::SIGNATURE, &self.signature, &mut out);
        out
    }

    pub fn parse(data: &[u8]) -> Result<Self, CardError> {
        const WHAT: &str = "import confirmation";
        let objs = tlv::parse_all(data).map_err(malformed(WHAT))?;
        let conf = Self {
            card_id: CardId(tlv::require_array(&objs, tag::CARD_ID).map_err(malformed(WHAT))?),
            wallet_key: tlv::require_array(&objs, tag::PUBLIC_KEY).map_err(malformed(WHAT))?,
            signature: tlv::require_array(&objs, tag::SIGNATURE).map_err(malformed(WHAT))?,
        };
        let encoded = conf.encode();
        canonical(WHAT, conf, encoded, data)
    }

    pub fn digest(&self, bundle_id: &[u8; 16], primary: &CardId) -> [u8; 32] {
        confirm_digest(bundle_id, &self.card_id, primary, &self.wallet_key)
    }

    /// Checks the signature with the backup's card key.
    pub fn verify(&self, card_key: &VerifyingKey, bundle_id: &[u8; 16], primary: &CardId) -> Result<(), CardError> {
        if verify_digest(card_key, &self.digest(bundle_id, primary), &self.signature) {
            Ok(())
        } else {
            Err(CardError::verification("import confirmation", "card key signature does not verify"))
        }
    }
}

/// The PROVE WALLET response: the wallet key's signature over a host
/// challenge, and the wallet public key it verifies with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalletProof {
    pub wallet_key: [u8; 33],
    pub signature: [u8; 64],
}

impl WalletProof {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(101);
        tlv::encode(tag::PUBLIC_KEY, &self.wallet_key, &mut out);
        tlv::encode(tag::SIGNATURE, &self.signature, &mut out);
        out
    }

    pub fn parse(data: &[u8]) -> Result<Self, CardError> {
        const WHAT: &str = "wallet proof";
        let objs = tlv::parse_all(data).map_err(malformed(WHAT))?;
        let proof = Self {
            wallet_key: tlv::require_array(&objs, tag::PUBLIC_KEY).map_err(malformed(WHAT))?,
            signature: tlv::require_array(&objs, tag::SIGNATURE).map_err(malformed(WHAT))?,
        };
        let encoded = proof.encode();
        canonical(WHAT, proof, encoded, data)
    }

    /// Checks the wallet key's signature over the host's own challenge and
    /// returns the wallet key. Whether it is the *expected* wallet key is
    /// the caller's comparison.
    pub fn verify(
        &self,
        challenge: &[u8; 32],
        card_id: &CardId,
        bundle_id: Option<&[u8; 16]>,
    ) -> Result<VerifyingKey, CardError> {
        let key = VerifyingKey::from_sec1_bytes(&self.wallet_key)
            .map_err(|_| CardError::verification("wallet proof", "wallet key is not a secp256k1 point"))?;
        if !verify_digest(&key, &wallet_proof_digest(challenge, card_id, bundle_id), &self.signature) {
            return Err(CardError::verification("wallet proof", "wallet key signature does not verify"));
        }
        Ok(key)
    }
}

// ---------------------------------------------------------------------------
// The transfer blob.

/// Which bundle a transfer belongs to, and between which cards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferRoute {
    pub bundle_id: [u8; 16],
    /// The primary.
    pub from: CardId,
    /// The backup.
    pub to: CardId,
}

/// The EXPORT response and IMPORT command data: the wallet secret encrypted
/// to one backup's card key, signed by the primary's card key. The host
/// relays it; the metadata is readable, the secret is not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferBlob {
    pub bundle_id: [u8; 16],
    pub from: CardId,
    pub to: CardId,
    pub wallet_key: [u8; 33],
    pub ephemeral_key: [u8; 33],
    pub gcm_nonce: [u8; 12],
    /// AES-256-GCM ciphertext of the 32-byte wallet secret, then the tag.
    pub ciphertext: [u8; 48],
    pub signature: [u8; 64],
}

impl TransferBlob {
    pub fn route(&self) -> TransferRoute {
        TransferRoute { bundle_id: self.bundle_id, from: self.from, to: self.to }
    }

    /// The digest the primary signed.
    pub fn digest(&self) -> [u8; 32] {
        transfer_digest(&self.route(), &self.wallet_key, &self.ephemeral_key, &self.gcm_nonce, &self.ciphertext)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(242);
        tlv::encode(tag::BUNDLE_ID, &self.bundle_id, &mut out);
        tlv::encode(tag::FROM, self.from.as_bytes(), &mut out);
        tlv::encode(tag::TO, self.to.as_bytes(), &mut out);
        tlv::encode(tag::PUBLIC_KEY, &self.wallet_key, &mut out);
        tlv::encode(tag::EPHEMERAL_KEY, &self.ephemeral_key, &mut out);
        tlv::encode(tag::GCM_NONCE, &self.gcm_nonce, &mut out);
        tlv::encode(tag::CIPHERTEXT, &self.ciphertext, &mut out);
        tlv::encode(tag::SIGNATURE, &self.signature, &mut out);
        out
    }

    pub fn parse(data: &[u8]) -> Result<Self, CardError> {
        const WHAT: &str = "transfer blob";
        let m = malformed(WHAT);
        let objs = tlv::parse_all(data).map_err(&m)?;
        let blob = Self {
            bundle_id: tlv::require_array(&objs, tag::BUNDLE_ID).map_err(&m)?,
            from: CardId(tlv::require_array(&objs, tag::FROM).map_err(&m)?),
            to: CardId(tlv::require_array(&objs, tag::TO).map_err(&m)?),
            wallet_key: tlv::require_array(&objs, tag::PUBLIC_KEY).map_err(&m)?,
            ephemeral_key: tlv::require_array(&objs, tag::EPHEMERAL_KEY).map_err(&m)?,
            gcm_nonce: tlv::require_array(&objs, tag::GCM_NONCE).map_err(&m)?,
            ciphertext: tlv::require_array(&objs, tag::CIPHERTEXT).map_err(&m)?,
            signature: tlv::require_array(&objs, tag::SIGNATURE).map_err(&m)?,
        };
        let encoded = blob.encode();
        canonical(WHAT, blob, encoded, data)
    }

    /// Checks the primary's signature (with the primary's card key from its
    /// verified certificate).
    pub fn verify(&self, primary_card_key: &VerifyingKey) -> Result<(), CardError> {
        if verify_digest(primary_card_key, &self.digest(), &self.signature) {
            Ok(())
        } else {
            Err(CardError::verification("transfer blob", "primary card key signature does not verify"))
        }
    }
}

/// Why a card refuses to open a transfer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error("the primary's signature does not verify")]
    BadSignature,
    #[error("the ephemeral key is not a secp256k1 point")]
    BadEphemeralKey,
    #[error("decryption failed (wrong key, or tampered ciphertext or metadata)")]
    Decryption,
    #[error("the decrypted secret is not the announced wallet key")]
    WrongWalletKey,
}

/// ECDH on secp256k1: the x-coordinate of `secret * public`.
pub fn ecdh_x(secret: &SigningKey, public: &VerifyingKey) -> Zeroizing<[u8; 32]> {
    let shared = k256::ecdh::diffie_hellman(secret.as_nonzero_scalar(), public.as_affine());
    let mut x = Zeroizing::new([0u8; 32]);
    x.copy_from_slice(shared.raw_secret_bytes());
    x
}

/// The AES-256 key of a transfer: HKDF-SHA256 with the bundle id as salt,
/// the ECDH x-coordinate as input key material, and
/// `"TAPLINE/transfer/v1" || primary id || backup id` as info.
pub fn transfer_key(route: &TransferRoute, shared_x: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut info = Vec::with_capacity(domain::TRANSFER.len() + 20);
    info.extend_from_slice(domain::TRANSFER);
    info.extend_from_slice(route.from.as_bytes());
    info.extend_from_slice(route.to.as_bytes());
    let mut key = Zeroizing::new([0u8; 32]);
    hkdf::Hkdf::<Sha256>::new(Some(&route.bundle_id), shared_x)
        .expand(&info, &mut key[..])
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    key
}

/// The AES-GCM associated data: `bundle id || primary id || backup id ||
/// wallet public key`.
pub fn transfer_aad(route: &TransferRoute, wallet_key: &[u8; 33]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(16 + 10 + 10 + 33);
    aad.extend_from_slice(&route.bundle_id);
    aad.extend_from_slice(route.from.as_bytes());
    aad.extend_from_slice(route.to.as_bytes());
    aad.extend_from_slice(wallet_key);
    aad
}

fn cipher(key: &[u8; 32]) -> Aes256Gcm {
    Aes256Gcm::new_from_slice(key).expect("a 32-byte key is an AES-256 key")
}

/// The primary's side of EXPORT: encrypts `wallet` to the backup's card
/// key with a fresh `ephemeral` key and `gcm_nonce` (both from the card's
/// RNG; fixed only in test vectors), and signs the blob with the primary's
/// card key.
pub fn seal_transfer(
    route: &TransferRoute,
    wallet: &SigningKey,
    backup_card_key: &VerifyingKey,
    primary_card_key: &SigningKey,
    ephemeral: &SigningKey,
    gcm_nonce: &[u8; 12],
) -> TransferBlob {
    let wallet_key = public_key_bytes(wallet.verifying_key());
    let key = transfer_key(route, &ecdh_x(ephemeral, backup_card_key));
    let mut buf = Zeroizing::new(<[u8; 32]>::from(wallet.to_bytes()));
    let tag = cipher(&key)
        .encrypt_inout_detached(
            &Nonce::<Aes256Gcm>::from(*gcm_nonce),
            &transfer_aad(route, &wallet_key),
            (&mut buf[..]).into(),
        )
        .expect("a 32-byte message is within AES-GCM limits");
    let mut ciphertext = [0u8; 48];
    ciphertext[..32].copy_from_slice(&buf[..]);
    ciphertext[32..].copy_from_slice(&tag);
    let mut blob = TransferBlob {
        bundle_id: route.bundle_id,
        from: route.from,
        to: route.to,
        wallet_key,
        ephemeral_key: public_key_bytes(ephemeral.verifying_key()),
        gcm_nonce: *gcm_nonce,
        ciphertext,
        signature: [0; 64],
    };
    blob.signature = sign_digest(primary_card_key, &blob.digest());
    blob
}

/// The backup's side of IMPORT, after it has checked the route against its
/// own records: verifies the primary's signature, decrypts with its card
/// key, and checks that the secret belongs to the announced wallet key.
pub fn open_transfer(
    blob: &TransferBlob,
    backup_card_key: &SigningKey,
    primary_card_key: &VerifyingKey,
) -> Result<SigningKey, TransferError> {
    if !verify_digest(primary_card_key, &blob.digest(), &blob.signature) {
        return Err(TransferError::BadSignature);
    }
    let ephemeral = VerifyingKey::from_sec1_bytes(&blob.ephemeral_key).map_err(|_| TransferError::BadEphemeralKey)?;
    let route = blob.route();
    let key = transfer_key(&route, &ecdh_x(backup_card_key, &ephemeral));
    let mut buf = Zeroizing::new([0u8; 32]);
    buf.copy_from_slice(&blob.ciphertext[..32]);
    let tag = Tag::<Aes256Gcm>::try_from(&blob.ciphertext[32..]).map_err(|_| TransferError::Decryption)?;
    cipher(&key)
        .decrypt_inout_detached(
            &Nonce::<Aes256Gcm>::from(blob.gcm_nonce),
            &transfer_aad(&route, &blob.wallet_key),
            (&mut buf[..]).into(),
            &tag,
        )
        .map_err(|_| TransferError::Decryption)?;
    let wallet = SigningKey::from_slice(&buf[..]).map_err(|_| TransferError::WrongWalletKey)?;
    if public_key_bytes(wallet.verifying_key()) != blob.wallet_key {
        return Err(TransferError::WrongWalletKey);
    }
    Ok(wallet)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 32]).expect("valid scalar")
    }

    fn route() -> TransferRoute {
        TransferRoute { bundle_id: [0xB0; 16], from: CardId([1; 10]), to: CardId([2; 10]) }
    }

    #[test]
    fn transfer_round_trip() {
        let (wallet, primary, backup) = (key(3), key(4), key(5));
        let blob = seal_transfer(&route(), &wallet, backup.verifying_key(), &primary, &key(6), &[7; 12]);
        let parsed = TransferBlob::parse(&blob.encode()).expect("canonical");
        assert_eq!(parsed, blob);
        assert!(blob.verify(primary.verifying_key()).is_ok());
        let opened = open_transfer(&parsed, &backup, primary.verifying_key()).expect("opens");
        assert_eq!(opened.to_bytes(), wallet.to_bytes());
        // Another card cannot open it; another signer is refused.
        assert_eq!(open_transfer(&parsed, &key(8), primary.verifying_key()).err(), Some(TransferError::Decryption));
        assert_eq!(open_transfer(&parsed, &backup, key(8).verifying_key()).err(), Some(TransferError::BadSignature));
    }

    #[test]
    fn every_field_is_bound() {
        let (wallet, primary, backup) = (key(3), key(4), key(5));
        let blob = seal_transfer(&route(), &wallet, backup.verifying_key(), &primary, &key(6), &[7; 12]);
        let encoded = blob.encode();
        // Flip one bit in every value byte position of every field: the
        // signature or the parse refuses each.
        for i in 0..encoded.len() {
            let mut bad = encoded.clone();
            bad[i] ^= 0x01;
            let refused = match TransferBlob::parse(&bad) {
                Err(_) => true,
                Ok(b) => open_transfer(&b, &backup, primary.verifying_key()).is_err(),
            };
            assert!(refused, "byte {i}");
        }
        // Re-signed by the primary after tampering, GCM still refuses.
        let mut forged = blob.clone();
        forged.to = CardId([9; 10]);
        forged.signature = sign_digest(&primary, &forged.digest());
        assert_eq!(open_transfer(&forged, &backup, primary.verifying_key()).err(), Some(TransferError::Decryption));
    }

    #[test]
    fn responses_parse_only_canonically() {
        let att = LinkAttestation { card_id: CardId([1; 10]), firmware_hash: [2; 32], signature: [3; 64] };
        assert_eq!(LinkAttestation::parse(&att.encode()).expect("parses"), att);
        let mut extra = att.encode();
        extra.extend_from_slice(&[0x85, 0x01, 0x01]);
        assert!(LinkAttestation::parse(&extra).is_err());
        let conf = ImportConfirmation { card_id: CardId([1; 10]), wallet_key: [2; 33], signature: [3; 64] };
        assert_eq!(ImportConfirmation::parse(&conf.encode()).expect("parses"), conf);
        assert!(ImportConfirmation::parse(&conf.encode()[..50]).is_err());
        let proof = WalletProof { wallet_key: [2; 33], signature: [3; 64] };
        assert_eq!(WalletProof::parse(&proof.encode()).expect("parses"), proof);
        let swapped: Vec<u8> = proof.encode()[35..].iter().chain(&proof.encode()[..35]).copied().collect();
        assert!(WalletProof::parse(&swapped).is_err());
    }

    #[test]
    fn digests_bind_their_parts() {
        let (b, p, c) = ([1u8; 16], CardId([2; 10]), CardId([3; 10]));
        let d = link_digest(&b, &p, &[4; 32], &c, &[5; 32], 7);
        assert_ne!(d, link_digest(&[9; 16], &p, &[4; 32], &c, &[5; 32], 7));
        assert_ne!(d, link_digest(&b, &c, &[4; 32], &p, &[5; 32], 7));
        assert_ne!(sealed_digest(&b, &p, Role::Primary, &[6; 33]), sealed_digest(&b, &p, Role::Backup, &[6; 33]));
        assert_ne!(wallet_proof_digest(&[1; 32], &p, None), wallet_proof_digest(&[1; 32], &p, Some(&[0; 16])));
        assert_eq!(Role::from_byte(Role::Backup as u8), Some(Role::Backup));
        assert_eq!(Role::from_byte(0), None);
    }
}
