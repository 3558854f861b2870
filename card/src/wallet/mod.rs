//! The Tapline wallet applet protocol (docs/card-protocol.md): AIDs,
//! instructions, tags, lifecycle, the identity certificate and the signed
//! messages, shared by the host client and the emulated applet so that both
//! sides build exactly the same bytes. Signing and verification live here;
//! transport lives in `client`; backup linking in `bundle`.

pub mod bundle;
pub mod cert;
pub mod client;

pub use bundle::{ImportConfirmation, LinkAttestation, Role, TransferBlob, WalletProof};

use k256::ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
use k256::ecdsa::{Signature, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::cardid::CardId;

/// Package AID of the wallet firmware. `F0` is ISO 7816-5's category for
/// proprietary, unregistered AIDs; the rest spells "TAPLINE".
pub const PACKAGE_AID: [u8; 8] = [0xF0, 0x54, 0x41, 0x50, 0x4C, 0x49, 0x4E, 0x45];
/// Applet class AID (and default instance AID).
pub const APPLET_AID: [u8; 9] = [0xF0, 0x54, 0x41, 0x50, 0x4C, 0x49, 0x4E, 0x45, 0x01];
/// Protocol version this crate speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// Class byte of every proprietary wallet command.
pub const CLA: u8 = 0x80;
/// The class byte of every part but the last of a chained command (ISO
/// 7816-4 command chaining: CLA bit 0x10). ADD BACKUP needs it: its data
/// does not fit one short APDU.
pub const CLA_CHAINING: u8 = CLA | 0x10;

/// Instruction bytes. 0x24..=0x2F belong to backup linking (next to the
/// wallet key commands; clear of GlobalPlatform's 0x50 INITIALIZE UPDATE
/// and of ISO's invalid 6X/9X); 0x2E and 0x2F are still reserved.
pub mod ins {
    pub const GET_IDENTITY: u8 = 0x10;
    pub const ATTEST: u8 = 0x12;
    pub const GENERATE_WALLET_KEY: u8 = 0x20;
    pub const GET_WALLET_KEY: u8 = 0x22;
    pub const LINK_PRIMARY: u8 = 0x24;
    pub const LINK_BACKUP: u8 = 0x25;
    pub const ADD_BACKUP: u8 = 0x26;
    pub const EXPORT: u8 = 0x27;
    pub const IMPORT: u8 = 0x28;
    pub const CONFIRM_BACKUP: u8 = 0x29;
    pub const PROVE_WALLET: u8 = 0x2A;
    pub const FINALIZE: u8 = 0x2B;
    pub const ABORT_BUNDLE: u8 = 0x2C;
    pub const SET_ACCESS_CODE: u8 = 0x2D;
    pub const SIGN: u8 = 0x30;
    pub const SELF_TEST: u8 = 0x40;
    /// ISO 7816-4 VERIFY (CLA 00, P2 = `ACCESS_CODE_REFERENCE`): the owner
    /// access code. Same INS byte as GENERATE WALLET KEY, other class.
    pub const VERIFY: u8 = 0x20;
    /// ISO 7816-4 GET CHALLENGE (CLA 00).
    pub const GET_CHALLENGE: u8 = 0x84;
}

/// P2 of VERIFY: the access code is a specific (application) reference
/// data object, number 1 (ISO 7816-4 §7.5.1: bit 8 set = specific).
pub const ACCESS_CODE_REFERENCE: u8 = 0x81;

/// SELF TEST P1 values.
pub mod self_test {
    pub const KAT: u8 = 0x01;
    pub const SIGN_VECTOR: u8 = 0x02;
    pub const MEMORY: u8 = 0x03;
    /// KAT result bits: SHA-256, AES, ECDSA, ECDH, RNG continuous test.
    pub const KAT_SHA256: u8 = 0x01;
    pub const KAT_AES: u8 = 0x02;
    pub const KAT_ECDSA: u8 = 0x04;
    pub const KAT_ECDH: u8 = 0x08;
    pub const KAT_RNG: u8 = 0x10;
    pub const KAT_ALL: u8 = 0x1F;
    /// Bounds of the memory test region.
    pub const MEMORY_MAX: usize = 4096;
}

/// Data object tags (context-specific, primitive).
pub mod tag {
    pub const CARD_ID: u32 = 0x80;
    pub const COUNTER: u32 = 0x81;
    pub const LIFECYCLE: u32 = 0x82;
    pub const FIRMWARE_HASH: u32 = 0x83;
    pub const PUBLIC_KEY: u32 = 0x84;
    pub const VERSION: u32 = 0x85;
    pub const KAT_RESULT: u32 = 0x86;
    pub const DIGEST: u32 = 0x87;
    pub const SIGNATURE: u32 = 0x9E;
    pub const CERTIFICATE: u32 = 0x7F21;
    // Backup linking.
    pub const ROLE: u32 = 0x88;
    pub const BUNDLE_ID: u32 = 0x89;
    pub const HAS_WALLET_KEY: u32 = 0x8A;
    pub const LINK_NONCE: u32 = 0x8B;
    /// Transfer blob: the sending card (the primary).
    pub const FROM: u32 = 0x8C;
    /// Transfer blob: the receiving card (a backup).
    pub const TO: u32 = 0x8D;
    pub const EPHEMERAL_KEY: u32 = 0x8E;
    pub const GCM_NONCE: u32 = 0x8F;
    pub const CIPHERTEXT: u32 = 0x90;
}

/// Applet lifecycle, enforced by the card. The values are codes to compare
/// for equality, not bit sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lifecycle {
    /// Installed, no wallet key.
    Installed = 0x01,
    /// Holds a wallet key (generated on card, or imported from a primary).
    Keyed = 0x03,
    /// Linked into a bundle (as primary or backup), transfer in progress.
    Linked = 0x07,
    /// Bundle sealed: no more link, export, import or abort; SIGN needs the
    /// owner's access code.
    Sealed = 0x0F,
}

impl Lifecycle {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0x01 => Some(Self::Installed),
            0x03 => Some(Self::Keyed),
            0x07 => Some(Self::Linked),
            0x0F => Some(Self::Sealed),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Installed => "installed",
            Self::Keyed => "keyed",
            Self::Linked => "linked",
            Self::Sealed => "sealed",
        }
    }
}

/// Domain separation labels: each signed message type has its own, so a
/// signature made for one purpose can never verify as another.
pub mod domain {
    pub const CERT: &[u8] = b"TAPLINE/cert/v1";
    pub const ATTEST: &[u8] = b"TAPLINE/attest/v1";
    pub const WALLET_KEY: &[u8] = b"TAPLINE/wallet-key/v1";
    pub const SELF_TEST: &[u8] = b"TAPLINE/self-test/v1";
    pub const MEMORY_PATTERN: &[u8] = b"TAPLINE/memory-pattern/v1";
    pub const LINK: &[u8] = b"TAPLINE/link/v1";
    /// Signed by the primary over a transfer blob; also the HKDF info prefix.
    pub const TRANSFER: &[u8] = b"TAPLINE/transfer/v1";
    pub const CONFIRM: &[u8] = b"TAPLINE/confirm/v1";
    /// Signed by the wallet key (PROVE WALLET).
    pub const WALLET_PROOF: &[u8] = b"TAPLINE/wallet-proof/v1";
    pub const SEALED: &[u8] = b"TAPLINE/sealed/v1";
    /// The card's salted hash of the owner access code (never signed).
    pub const ACCESS_CODE: &[u8] = b"TAPLINE/access-code/v1";
}

/// SHA-256 over a domain label and length-prefixed parts (u16 big-endian
/// length before each part), so no two different inputs collide.
pub fn message_digest(domain: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((domain.len() as u16).to_be_bytes());
    h.update(domain);
    for p in parts {
        h.update((p.len() as u16).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// Deterministic ECDSA (RFC 6979) over a prehashed message, low-S.
pub fn sign_digest(key: &SigningKey, digest: &[u8; 32]) -> [u8; 64] {
    let sig: Signature = key.sign_prehash(digest).expect("a 32-byte prehash is always signable");
    sig.to_bytes().into()
}

/// Verifies a 64-byte r||s signature; high-S signatures are rejected.
pub fn verify_digest(key: &VerifyingKey, digest: &[u8; 32], sig: &[u8]) -> bool {
    Signature::from_slice(sig).is_ok_and(|s| key.verify_prehash(digest, &s).is_ok())
}

/// Compressed SEC1 encoding (33 bytes) of a public key.
pub fn public_key_bytes(key: &VerifyingKey) -> [u8; 33] {
    let point = key.to_sec1_point(true);
    let mut out = [0u8; 33];
    out.copy_from_slice(point.as_bytes());
    out
}

/// The ATTEST message: a fresh host challenge bound to the card's identity,
/// the firmware it runs, its lifecycle, its monotonic counter, and its wallet
/// public key when it has one.
pub fn attestation_digest(
    challenge: &[u8; 32],
    card_id: &CardId,
    counter: u32,
    lifecycle: u8,
    firmware_hash: &[u8; 32],
    wallet_key: Option<&[u8; 33]>,
) -> [u8; 32] {
    message_digest(
        domain::ATTEST,
        &[
            challenge,
            card_id.as_bytes(),
            &counter.to_be_bytes(),
            &[lifecycle],
            firmware_hash,
            wallet_key.map_or(&[][..], |k| &k[..]),
        ],
    )
}

/// The wallet key proof: the card key vouches that the wallet key was born
/// in (or imported into) this card.
pub fn wallet_key_digest(card_id: &CardId, wallet_key: &[u8; 33]) -> [u8; 32] {
    message_digest(domain::WALLET_KEY, &[card_id.as_bytes(), wallet_key])
}

/// The self-test signature over a host test vector.
pub fn self_test_digest(card_id: &CardId, vector: &[u8]) -> [u8; 32] {
    message_digest(domain::SELF_TEST, &[card_id.as_bytes(), vector])
}

/// The memory-test pattern both sides compute from a seed: SHA-256 in
/// counter mode, truncated to `len`.
pub fn memory_pattern(seed: &[u8; 4], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut counter: u32 = 0;
    while out.len() < len {
        out.extend_from_slice(&message_digest(domain::MEMORY_PATTERN, &[seed, &counter.to_be_bytes()]));
        counter += 1;
    }
    out.truncate(len);
    out
}

/// A parsed ATTEST response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attestation {
    pub card_id: CardId,
    pub counter: u32,
    pub lifecycle: u8,
    pub firmware_hash: [u8; 32],
    pub wallet_key: Option<[u8; 33]>,
    pub signature: [u8; 64],
}

impl Attestation {
    pub fn digest(&self, challenge: &[u8; 32]) -> [u8; 32] {
        attestation_digest(
            challenge,
            &self.card_id,
            self.counter,
            self.lifecycle,
            &self.firmware_hash,
            self.wallet_key.as_ref(),
        )
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        crate::tlv::encode(tag::CARD_ID, self.card_id.as_bytes(), &mut out);
        crate::tlv::encode(tag::COUNTER, &self.counter.to_be_bytes(), &mut out);
        crate::tlv::encode(tag::LIFECYCLE, &[self.lifecycle], &mut out);
        crate::tlv::encode(tag::FIRMWARE_HASH, &self.firmware_hash, &mut out);
        if let Some(k) = &self.wallet_key {
            crate::tlv::encode(tag::PUBLIC_KEY, k, &mut out);
        }
        crate::tlv::encode(tag::SIGNATURE, &self.signature, &mut out);
        out
    }

    pub fn parse(data: &[u8]) -> Result<Self, crate::CardError> {
        use crate::tlv::{find, parse_all, require_array};
        let bad = |e: crate::tlv::TlvError| crate::CardError::malformed("ATTEST response", e);
        let objs = parse_all(data).map_err(bad)?;
        let wallet_key = match find(&objs, tag::PUBLIC_KEY) {
            None => None,
            Some(v) => Some(v.try_into().map_err(|_| {
                crate::CardError::malformed("ATTEST response", format!("wallet key of {} bytes", v.len()))
            })?),
        };
        let att = Self {
            card_id: CardId(require_array(&objs, tag::CARD_ID).map_err(bad)?),
            counter: u32::from_be_bytes(require_array(&objs, tag::COUNTER).map_err(bad)?),
            lifecycle: require_array::<1>(&objs, tag::LIFECYCLE).map_err(bad)?[0],
            firmware_hash: require_array(&objs, tag::FIRMWARE_HASH).map_err(bad)?,
            wallet_key,
            signature: require_array(&objs, tag::SIGNATURE).map_err(bad)?,
        };
        // Only the canonical encoding (order, no extras) is accepted.
        if att.encode() != data {
            return Err(crate::CardError::malformed("ATTEST response", "not in canonical encoding"));
        }
        Ok(att)
    }
}

/// A parsed wallet key proof (GENERATE / GET WALLET KEY response).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalletKeyProof {
    pub public_key: [u8; 33],
    pub signature: [u8; 64],
}

impl WalletKeyProof {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(104);
        crate::tlv::encode(tag::PUBLIC_KEY, &self.public_key, &mut out);
        crate::tlv::encode(tag::SIGNATURE, &self.signature, &mut out);
        out
    }

    pub fn parse(data: &[u8]) -> Result<Self, crate::CardError> {
        let bad = |e: crate::tlv::TlvError| crate::CardError::malformed("wallet key proof", e);
        let objs = crate::tlv::parse_all(data).map_err(bad)?;
        let proof = Self {
            public_key: crate::tlv::require_array(&objs, tag::PUBLIC_KEY).map_err(bad)?,
            signature: crate::tlv::require_array(&objs, tag::SIGNATURE).map_err(bad)?,
        };
        if proof.encode() != data {
            return Err(crate::CardError::malformed("wallet key proof", "not in canonical encoding"));
        }
        Ok(proof)
    }

    /// Checks the card key's signature over the wallet key.
    pub fn verify(&self, card_id: &CardId, card_key: &VerifyingKey) -> Result<VerifyingKey, crate::CardError> {
        let wallet = VerifyingKey::from_sec1_bytes(&self.public_key)
            .map_err(|_| crate::CardError::verification("wallet key", "not a secp256k1 point"))?;
        if !verify_digest(card_key, &wallet_key_digest(card_id, &self.public_key), &self.signature) {
            return Err(crate::CardError::verification("wallet key proof", "card key signature does not verify"));
        }
        Ok(wallet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 32]).expect("valid scalar")
    }

    #[test]
    fn digests_separate_domains_and_lengths() {
        let a = message_digest(b"x", &[b"ab", b"c"]);
        let b = message_digest(b"x", &[b"a", b"bc"]);
        let c = message_digest(b"y", &[b"ab", b"c"]);
        assert_ne!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn signatures_are_deterministic_low_s_and_verify() {
        let k = key(7);
        let d = message_digest(b"t", &[b"hello"]);
        let s1 = sign_digest(&k, &d);
        assert_eq!(s1, sign_digest(&k, &d));
        let sig = Signature::from_slice(&s1).expect("sig");
        assert!(sig.normalize_s() == sig, "low-S");
        assert!(verify_digest(k.verifying_key(), &d, &s1));
        let mut bad = s1;
        bad[10] ^= 1;
        assert!(!verify_digest(k.verifying_key(), &d, &bad));
        assert!(!verify_digest(key(8).verifying_key(), &d, &s1));
    }

    #[test]
    fn attestation_round_trip_and_binding() {
        let k = key(3);
        let challenge = [9u8; 32];
        let mut att = Attestation {
            card_id: CardId([1; 10]),
            counter: 5,
            lifecycle: Lifecycle::Installed as u8,
            firmware_hash: [4; 32],
            wallet_key: None,
            signature: [0; 64],
        };
        att.signature = sign_digest(&k, &att.digest(&challenge));
        let parsed = Attestation::parse(&att.encode()).expect("parses");
        assert_eq!(parsed, att);
        assert!(verify_digest(k.verifying_key(), &parsed.digest(&challenge), &parsed.signature));
        assert!(!verify_digest(k.verifying_key(), &parsed.digest(&[8u8; 32]), &parsed.signature), "replay");
        let mut older = parsed.clone();
        older.counter = 4;
        assert!(!verify_digest(k.verifying_key(), &older.digest(&challenge), &older.signature));
    }

    #[test]
    fn memory_pattern_is_deterministic_and_sized() {
        let p = memory_pattern(&[1, 2, 3, 4], 100);
        assert_eq!(p.len(), 100);
        assert_eq!(p, memory_pattern(&[1, 2, 3, 4], 100));
        assert_ne!(p, memory_pattern(&[1, 2, 3, 5], 100));
    }
}
