//! The card identity certificate: the chip's card public key, signed at chip
//! manufacture by the card vendor's CA (secp256k1). A compact TLV format of
//! Tapline's own (docs/card-protocol.md), not X.509: cards parse nothing
//! bigger than they must.

use k256::ecdsa::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use super::{domain, message_digest, public_key_bytes, sign_digest, tag, verify_digest};
use crate::CardError;
use crate::cardid::CardId;
use crate::tlv::{self, TlvError};

pub const CERT_VERSION: u8 = 1;

mod ctag {
    pub const VERSION: u32 = 0x5F29;
    pub const ISSUER: u32 = 0x42;
    pub const SUBJECT: u32 = 0x5F20;
    /// Constructed public key template holding the point in tag 86, as
    /// ISO 7816-8 card-verifiable certificates do.
    pub const PUBLIC_KEY: u32 = 0x7F49;
    pub const POINT: u32 = 0x86;
    pub const NOT_BEFORE: u32 = 0x5F25;
    pub const NOT_AFTER: u32 = 0x5F24;
    pub const SIGNATURE: u32 = 0x5F37;
}

/// The 8-byte identifier of a CA key: the first 8 bytes of SHA-256 of its
/// compressed SEC1 encoding.
pub fn ca_key_id(ca: &VerifyingKey) -> [u8; 8] {
    let h = Sha256::digest(public_key_bytes(ca));
    let mut id = [0u8; 8];
    id.copy_from_slice(&h[..8]);
    id
}

/// A parsed identity certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    pub version: u8,
    pub issuer: [u8; 8],
    pub subject: CardId,
    pub public_key: [u8; 33],
    /// Validity, seconds since the Unix epoch.
    pub not_before: u64,
    pub not_after: u64,
    pub signature: [u8; 64],
}

/// Why a certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("issuer {0} is not a pinned CA")]
    UnknownIssuer(String),
    #[error("CA signature does not verify")]
    BadSignature,
    #[error("not valid before {not_before} (now {now})")]
    NotYetValid { not_before: u64, now: u64 },
    #[error("expired at {not_after} (now {now})")]
    Expired { not_after: u64, now: u64 },
    #[error("card public key is not a secp256k1 point")]
    BadPublicKey,
    #[error("unsupported certificate version {0}")]
    Version(u8),
}

impl Certificate {
    /// Issues a certificate (the chip factory's side).
    pub fn issue(ca: &SigningKey, subject: CardId, card_key: &VerifyingKey, not_before: u64, not_after: u64) -> Self {
        let mut cert = Self {
            version: CERT_VERSION,
            issuer: ca_key_id(ca.verifying_key()),
            subject,
            public_key: public_key_bytes(card_key),
            not_before,
            not_after,
            signature: [0; 64],
        };
        cert.signature = sign_digest(ca, &cert.tbs_digest());
        cert
    }

    fn tbs(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        tlv::encode(ctag::VERSION, &[self.version], &mut out);
        tlv::encode(ctag::ISSUER, &self.issuer, &mut out);
        tlv::encode(ctag::SUBJECT, self.subject.as_bytes(), &mut out);
        tlv::encode(ctag::PUBLIC_KEY, &tlv::tlv(ctag::POINT, &self.public_key), &mut out);
        tlv::encode(ctag::NOT_BEFORE, &self.not_before.to_be_bytes(), &mut out);
        tlv::encode(ctag::NOT_AFTER, &self.not_after.to_be_bytes(), &mut out);
        out
    }

    fn tbs_digest(&self) -> [u8; 32] {
        message_digest(domain::CERT, &[&self.tbs()])
    }

    /// The certificate as the card stores and returns it (tag 7F21).
    pub fn encode(&self) -> Vec<u8> {
        let mut body = self.tbs();
        tlv::encode(ctag::SIGNATURE, &self.signature, &mut body);
        tlv::tlv(tag::CERTIFICATE, &body)
    }

    pub fn parse(data: &[u8]) -> Result<Self, CardError> {
        let bad = |e: TlvError| CardError::malformed("identity certificate", e);
        let (outer, rest) = tlv::parse_one(data).map_err(bad)?;
        if outer.tag != tag::CERTIFICATE || !rest.is_empty() {
            return Err(CardError::malformed("identity certificate", format!("outer tag {:X}", outer.tag)));
        }
        let objs = outer.children().map_err(bad)?;
        let key_template = tlv::parse_all(tlv::require(&objs, ctag::PUBLIC_KEY).map_err(bad)?).map_err(bad)?;
        let cert = Self {
            version: tlv::require_array::<1>(&objs, ctag::VERSION).map_err(bad)?[0],
            issuer: tlv::require_array(&objs, ctag::ISSUER).map_err(bad)?,
            subject: CardId(tlv::require_array(&objs, ctag::SUBJECT).map_err(bad)?),
            public_key: tlv::require_array(&key_template, ctag::POINT).map_err(bad)?,
            not_before: u64::from_be_bytes(tlv::require_array(&objs, ctag::NOT_BEFORE).map_err(bad)?),
            not_after: u64::from_be_bytes(tlv::require_array(&objs, ctag::NOT_AFTER).map_err(bad)?),
            signature: tlv::require_array(&objs, ctag::SIGNATURE).map_err(bad)?,
        };
        // Exactly one encoding is valid: fields in order, no duplicates, no
        // extra tags, minimal lengths. Anything else is refused rather than
        // normalised, so two different byte strings never pass as one
        // certificate.
        if cert.encode() != data {
            return Err(CardError::malformed("identity certificate", "not in canonical encoding"));
        }
        Ok(cert)
    }

    /// Verifies the certificate against the pinned CA keys at time `now`
    /// and returns the card's verifying key and the CA that signed it.
    pub fn verify(&self, pinned: &[VerifyingKey], now: u64) -> Result<(VerifyingKey, usize), CertError> {
        let index = self.check_issuer_and_signature(pinned)?;
        if now < self.not_before {
            return Err(CertError::NotYetValid { not_before: self.not_before, now });
        }
        if now > self.not_after {
            return Err(CertError::Expired { not_after: self.not_after, now });
        }
        let key = VerifyingKey::from_sec1_bytes(&self.public_key).map_err(|_| CertError::BadPublicKey)?;
        Ok((key, index))
    }

    /// Like [`Certificate::verify`] without the validity period: version,
    /// issuer, CA signature and key. For cards checking each other's
    /// certificates during backup linking: a card has no clock.
    pub fn verify_untimed(&self, pinned: &[VerifyingKey]) -> Result<(VerifyingKey, usize), CertError> {
        let index = self.check_issuer_and_signature(pinned)?;
        let key = VerifyingKey::from_sec1_bytes(&self.public_key).map_err(|_| CertError::BadPublicKey)?;
        Ok((key, index))
    }

    fn check_issuer_and_signature(&self, pinned: &[VerifyingKey]) -> Result<usize, CertError> {
        if self.version != CERT_VERSION {
            return Err(CertError::Version(self.version));
        }
        let (index, ca) = pinned
            .iter()
            .enumerate()
            .find(|(_, ca)| ca_key_id(ca) == self.issuer)
            .ok_or_else(|| CertError::UnknownIssuer(hex::encode_upper(self.issuer)))?;
        if !verify_digest(ca, &self.tbs_digest(), &self.signature) {
            return Err(CertError::BadSignature);
        }
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 32]).expect("valid scalar")
    }

    #[test]
    fn issue_parse_verify() {
        let ca = key(1);
        let card = key(2);
        let cert = Certificate::issue(&ca, CardId([5; 10]), card.verifying_key(), 100, 200);
        let parsed = Certificate::parse(&cert.encode()).expect("parses");
        assert_eq!(parsed, cert);
        let (k, idx) = parsed.verify(&[*key(9).verifying_key(), *ca.verifying_key()], 150).expect("valid");
        assert_eq!(&k, card.verifying_key());
        assert_eq!(idx, 1);
    }

    #[test]
    fn refusals_name_the_reason() {
        let ca = key(1);
        let cert = Certificate::issue(&ca, CardId([5; 10]), key(2).verifying_key(), 100, 200);
        let pinned = [*ca.verifying_key()];
        assert!(matches!(cert.verify(&[*key(3).verifying_key()], 150), Err(CertError::UnknownIssuer(_))));
        assert!(matches!(cert.verify(&pinned, 50), Err(CertError::NotYetValid { .. })));
        assert!(matches!(cert.verify(&pinned, 250), Err(CertError::Expired { .. })));
        // Cards have no clock: the untimed check ignores validity only.
        assert!(cert.verify_untimed(&pinned).is_ok());
        assert!(matches!(cert.verify_untimed(&[*key(3).verifying_key()]), Err(CertError::UnknownIssuer(_))));
        let mut forged = cert.clone();
        forged.subject = CardId([6; 10]);
        assert_eq!(forged.verify(&pinned, 150), Err(CertError::BadSignature));
        assert_eq!(forged.verify_untimed(&pinned), Err(CertError::BadSignature));
    }

    #[test]
    fn malformed_certificates_are_errors() {
        let cert = Certificate::issue(&key(1), CardId([5; 10]), key(2).verifying_key(), 1, 2).encode();
        for n in 0..cert.len() {
            assert!(Certificate::parse(&cert[..n]).is_err(), "prefix {n}");
        }
        let mut trailing = cert.clone();
        trailing.push(0);
        assert!(Certificate::parse(&trailing).is_err());
        // Same fields, another order: refused (only the canonical encoding).
        let c = Certificate::parse(&cert).expect("canonical");
        let mut body = Vec::new();
        tlv::encode(ctag::ISSUER, &c.issuer, &mut body);
        tlv::encode(ctag::VERSION, &[c.version], &mut body);
        tlv::encode(ctag::SUBJECT, c.subject.as_bytes(), &mut body);
        tlv::encode(ctag::PUBLIC_KEY, &tlv::tlv(ctag::POINT, &c.public_key), &mut body);
        tlv::encode(ctag::NOT_BEFORE, &c.not_before.to_be_bytes(), &mut body);
        tlv::encode(ctag::NOT_AFTER, &c.not_after.to_be_bytes(), &mut body);
        tlv::encode(ctag::SIGNATURE, &c.signature, &mut body);
        let reordered = tlv::tlv(tag::CERTIFICATE, &body);
        assert_ne!(reordered, cert);
        assert!(Certificate::parse(&reordered).is_err());
    }
}
