//! The virtual chip factory: makes emulated cards the way a chip vendor
//! does: a unique chip identifier and CPLC, a card key pair generated "in
//! the chip", an identity certificate signed by the vendor CA, the vendor's
//! default GP keys (version FF), and an empty card manager. Counterfeits get
//! a certificate from another CA; clones copy an existing card's identity
//! (a perfect clone with its card key, or an identity copy without it).
//!
//! DEMO ONLY: the vendor CA private keys below are public constants so that
//! demos and tests are reproducible. No real card may ever trust them.

use std::sync::Arc;

use k256::ecdsa::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use super::memory::{KeySet, Package, Persistent};
use super::{CardFaults, Chip, Drbg, EmuCard};
use crate::cardid::CardId;
use crate::gp::card_state;
use crate::gp::cplc::Cplc;
use crate::gp::keys::StaticKeys;
use crate::wallet::cert::Certificate;

/// The key version of the chip vendor's default keys.
pub const DEFAULT_KEY_VERSION: u8 = 0xFF;

/// Certificate validity given to genuine chips: 2024-01-01 to 2044-01-01.
pub const CERT_NOT_BEFORE: u64 = 1_704_067_200;
pub const CERT_NOT_AFTER: u64 = 2_335_219_200;

fn demo_key(label: &[u8]) -> SigningKey {
    let mut seed: [u8; 32] = Sha256::digest(label).into();
    loop {
        if let Ok(k) = SigningKey::from_slice(&seed) {
            return k;
        }
        seed = Sha256::digest(seed).into();
    }
}

/// DEMO ONLY: the demo card vendor CA that genuine emulated chips chain to.
pub fn demo_vendor_ca() -> SigningKey {
    demo_key(b"Tapline DEMO ONLY vendor CA v1")
}

/// DEMO ONLY: a CA nobody pins; counterfeit chips chain to it.
pub fn counterfeit_ca() -> SigningKey {
    demo_key(b"Tapline DEMO ONLY counterfeit CA v1")
}

/// DEMO ONLY: a second chip vendor's CA, for profiles that pin two vendors
/// (and revoke one).
pub fn second_vendor_ca() -> SigningKey {
    demo_key(b"Tapline DEMO ONLY second vendor CA v1")
}

pub fn demo_vendor_ca_public() -> VerifyingKey {
    *demo_vendor_ca().verifying_key()
}

/// The ATR of an ISO 14443-4 card as a PC/SC reader reports it (PC/SC part 3
/// pseudo-ATR: 3B 8n 80 01, historical bytes, TCK).
fn pseudo_atr(historical: &[u8]) -> Vec<u8> {
    let mut atr = vec![0x3B, 0x80 | historical.len() as u8, 0x80, 0x01];
    atr.extend_from_slice(historical);
    let tck = atr[1..].iter().fold(0u8, |a, b| a ^ b);
    atr.push(tck);
    atr
}

/// What kind of chip to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChipKind {
    Genuine,
    /// Identity certificate signed by a CA that is not pinned.
    Counterfeit,
    /// Same identity (card id, card key, certificate) as an existing chip:
    /// a perfect clone, as if the card key had been extracted.
    Clone(CardId),
    /// The public part of an existing chip's identity (CPLC, card id,
    /// certificate) copied onto another chip, which has its own card key
    /// (the original's cannot be read out): it cannot sign for the
    /// certificate it shows.
    CopiedIdentity(CardId),
    /// Genuine chip of a second vendor, whose certificate is signed by
    /// [`second_vendor_ca`].
    SecondVendor,
    /// Genuine chip whose certificate is damaged (version byte 02).
    MalformedCertificate,
    /// Genuine chip whose vendor shipped other default keys.
    WrongDefaultKeys,
    /// Genuine chip whose certificate expired.
    Expired,
}

/// Makes emulated chips. Deterministic for a given seed.
pub struct ChipFactory {
    vendor: SigningKey,
    fake_vendor: SigningKey,
    rng: Drbg,
    made: Vec<(CardId, [u8; 32])>,
}

impl ChipFactory {
    pub fn new(seed: u64) -> Self {
        let rng_seed: [u8; 32] = Sha256::digest([b"tapline factory".as_slice(), &seed.to_be_bytes()].concat()).into();
        Self { vendor: demo_vendor_ca(), fake_vendor: counterfeit_ca(), rng: Drbg::new(rng_seed), made: Vec::new() }
    }

    /// A fresh chip identifier: fabricator 4790 and IC type 5040 (a common
    /// layout), then six random bytes of batch and serial, unique within
    /// this factory and, with a random seed, across runs.
    fn next_id(&mut self) -> CardId {
        loop {
            let mut id = [0x47, 0x90, 0x50, 0x40, 0, 0, 0, 0, 0, 0];
            self.rng.fill(&mut id[4..]);
            let id = CardId(id);
            if !self.made.iter().any(|(m, _)| *m == id) {
                return id;
            }
        }
    }

    /// Makes one chip of the given kind with the given fault script.
    pub fn make(&mut self, kind: ChipKind, faults: CardFaults) -> EmuCard {
        let (id, key_seed) = match &kind {
            ChipKind::Clone(original) | ChipKind::CopiedIdentity(original) => {
                let seed = self.made.iter().find(|(i, _)| i == original).map(|(_, s)| *s);
                match seed {
                    Some(s) => (*original, s),
                    None => (self.next_id(), self.fresh_seed()),
                }
            }
            _ => (self.next_id(), self.fresh_seed()),
        };
        self.made.push((id, key_seed));
        let certified_key = Drbg::new(key_seed).scalar();
        let card_key = match kind {
            ChipKind::CopiedIdentity(_) => Drbg::new(self.fresh_seed()).scalar(),
            _ => certified_key.clone(),
        };
        let second = second_vendor_ca();
        let (ca, not_after) = match kind {
            ChipKind::Counterfeit => (&self.fake_vendor, CERT_NOT_AFTER),
            ChipKind::Expired => (&self.vendor, CERT_NOT_BEFORE + 86_400),
            ChipKind::SecondVendor => (&second, CERT_NOT_AFTER),
            _ => (&self.vendor, CERT_NOT_AFTER),
        };
        let mut certificate =
            Certificate::issue(ca, id, certified_key.verifying_key(), CERT_NOT_BEFORE, not_after).encode();
        if kind == ChipKind::MalformedCertificate {
            // 7F21 81 9A, then 5F29 01 <version>: the version byte.
            certificate[7] = 0x02;
        }
        let default_keys = match kind {
            ChipKind::WrongDefaultKeys => {
                StaticKeys::from_single(crate::gp::keys::AesKey::from_bytes(&[0x5A; 16]).expect("16-byte key"))
            }
            _ => StaticKeys::gp_default(),
        };
        let chip = Chip {
            id,
            cplc: Cplc::for_card(&id, [0x47, 0x00]),
            card_key,
            certificate,
            atr: pseudo_atr(b"TAPLINE-EMU"),
            // Every chip, counterfeits included, carries the genuine vendor
            // CA key: a counterfeit is made to look genuine, and only its
            // own certificate gives it away.
            vendor_ca: *self.vendor.verifying_key(),
        };
        let mem = Persistent {
            card_state: card_state::SECURED,
            key_sets: vec![KeySet { version: DEFAULT_KEY_VERSION, keys: default_keys }],
            auth_failures: 0,
            packages: Vec::new(),
            instances: Vec::new(),
            wallet: None,
            attest_counter: 0,
            test_region: Arc::new(Vec::new()),
        };
        let label = match &kind {
            ChipKind::Genuine => "genuine".to_string(),
            ChipKind::Counterfeit => "counterfeit".to_string(),
            ChipKind::Clone(_) => "clone".to_string(),
            ChipKind::CopiedIdentity(_) => "identity-copy".to_string(),
            ChipKind::SecondVendor => "second-vendor".to_string(),
            ChipKind::MalformedCertificate => "malformed-certificate".to_string(),
            ChipKind::WrongDefaultKeys => "wrong-default-keys".to_string(),
            ChipKind::Expired => "expired-certificate".to_string(),
        };
        EmuCard::new(chip, mem, self.fresh_seed(), faults, label)
    }

    fn fresh_seed(&mut self) -> [u8; 32] {
        let mut s = [0u8; 32];
        self.rng.fill(&mut s);
        s
    }
}

impl EmuCard {
    /// Preloads a package as if an earlier line had loaded it (for "wrong
    /// firmware already on the card" scenarios).
    pub fn preload_package(&mut self, aid: &[u8], version: (u8, u8), load_file: &[u8], applets: Vec<Vec<u8>>) {
        self.mem.packages.push(Package {
            aid: aid.to_vec(),
            version,
            hash: Sha256::digest(load_file).into(),
            applet_classes: applets,
            code: Arc::new(load_file.to_vec()),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atr_has_valid_tck() {
        let atr = pseudo_atr(b"TAPLINE-EMU");
        assert_eq!(atr[..4], [0x3B, 0x8B, 0x80, 0x01]);
        assert_eq!(atr[1..].iter().fold(0u8, |a, b| a ^ b), 0);
    }

    #[test]
    fn factory_is_deterministic_and_ids_unique() {
        let mut f1 = ChipFactory::new(7);
        let mut f2 = ChipFactory::new(7);
        let a: Vec<CardId> = (0..50).map(|_| f1.make(ChipKind::Genuine, CardFaults::default()).id()).collect();
        let b: Vec<CardId> = (0..50).map(|_| f2.make(ChipKind::Genuine, CardFaults::default()).id()).collect();
        assert_eq!(a, b);
        let mut sorted = a.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 50);
    }

    #[test]
    fn certificates_chain_to_the_right_ca() {
        let mut f = ChipFactory::new(1);
        let pinned = [demo_vendor_ca_public()];
        let g = f.make(ChipKind::Genuine, CardFaults::default());
        let cert = Certificate::parse(&g.chip.certificate).expect("parses");
        assert!(cert.verify(&pinned, CERT_NOT_BEFORE + 10).is_ok());
        let c = f.make(ChipKind::Counterfeit, CardFaults::default());
        let cert = Certificate::parse(&c.chip.certificate).expect("parses");
        assert!(cert.verify(&pinned, CERT_NOT_BEFORE + 10).is_err());
        let clone = f.make(ChipKind::Clone(g.id()), CardFaults::default());
        assert_eq!(clone.id(), g.id());
        assert_eq!(clone.chip.certificate, g.chip.certificate);
        let copy = f.make(ChipKind::CopiedIdentity(g.id()), CardFaults::default());
        assert_eq!((copy.id(), &copy.chip.certificate), (g.id(), &g.chip.certificate));
        assert_ne!(copy.chip.card_key.verifying_key(), g.chip.card_key.verifying_key(), "no key to copy");
        let other = f.make(ChipKind::SecondVendor, CardFaults::default());
        let cert = Certificate::parse(&other.chip.certificate).expect("parses");
        assert!(cert.verify(&pinned, CERT_NOT_BEFORE + 10).is_err());
        assert!(cert.verify(&[*second_vendor_ca().verifying_key()], CERT_NOT_BEFORE + 10).is_ok());
        let bad = f.make(ChipKind::MalformedCertificate, CardFaults::default());
        let refused = Certificate::parse(&bad.chip.certificate)
            .map_err(|e| e.to_string())
            .and_then(|c| c.verify(&pinned, CERT_NOT_BEFORE + 10).map(|_| ()).map_err(|e| e.to_string()));
        assert!(refused.is_err(), "a damaged certificate is refused");
    }
}
