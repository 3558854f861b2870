//! GlobalPlatform SCP03 static key material: the AES-128 key type with its key
//! check value, the ENC/MAC/DEK key set and per-card key diversification (KDF3).
//! Key bytes are zeroized on drop and never appear in `Debug` output.

use std::fmt;
use std::str::FromStr;

use aes::Aes128;
use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use cmac::{Cmac, Mac};
use zeroize::Zeroizing;

/// Length of an AES-128 key, the only SCP03 key length supported here
/// (Amendment D §6.1 also allows 24 and 32 bytes).
pub const AES128_KEY_LEN: usize = 16;

/// AES block length.
pub const BLOCK_LEN: usize = 16;

/// The well-known GlobalPlatform test key (`404142…4F`) that cards ship with.
const GP_DEFAULT_KEY: [u8; AES128_KEY_LEN] =
    [0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49, 0x4A, 0x4B, 0x4C, 0x4D, 0x4E, 0x4F];

/// Why key material could not be read. Messages never contain key bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("AES-128 key must be 16 bytes, got {0} bytes")]
    BadLength(usize),
    #[error("AES-128 key must be 32 hex digits, got {0} hex digits")]
    BadHexLength(usize),
    #[error("AES key is not valid hex: non-hex character at position {0}")]
    BadHex(usize),
    #[error("unknown key diversification scheme {0:?} (expected \"none\" or \"kdf3\")")]
    UnknownDiversification(String),
}

/// The role of a key within an SCP03 key set (Amendment D §6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyRole {
    Enc,
    Mac,
    Dek,
}

impl KeyRole {
    /// The three roles in PUT KEY order (key identifiers 1, 2, 3).
    pub const ALL: [KeyRole; 3] = [KeyRole::Enc, KeyRole::Mac, KeyRole::Dek];

    /// Key identifier within the key set: ENC=1, MAC=2, DEK=3 (GP Card
    /// Specification §11.1.8 convention, also the KDF3 key-type byte).
    pub const fn key_id(self) -> u8 {
        match self {
            KeyRole::Enc => 1,
            KeyRole::Mac => 2,
            KeyRole::Dek => 3,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            KeyRole::Enc => "ENC",
            KeyRole::Mac => "MAC",
            KeyRole::Dek => "DEK",
        }
    }
}

impl fmt::Display for KeyRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An AES-128 key. The bytes live in a [`Zeroizing`] buffer and are wiped on
/// drop; `Debug` prints only the key check value.
///
/// Note: transient `aes`/`cmac` cipher instances built from the key hold an
/// expanded key schedule that is only wiped when those crates' `zeroize`
/// feature is enabled.
#[derive(Clone)]
pub struct AesKey(Zeroizing<[u8; AES128_KEY_LEN]>);

impl AesKey {
    pub fn new(bytes: [u8; AES128_KEY_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let arr: &[u8; AES128_KEY_LEN] = bytes.try_into().map_err(|_| KeyError::BadLength(bytes.len()))?;
        Ok(Self::new(*arr))
    }

    /// Parses 32 hex digits; ASCII whitespace anywhere is ignored so keys can
    /// be written in groups (`4041 4243 …`).
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let clean: Zeroizing<Vec<u8>> = Zeroizing::new(text.bytes().filter(|b| !b.is_ascii_whitespace()).collect());
        if let Some(pos) = clean.iter().position(|b| !b.is_ascii_hexdigit()) {
            return Err(KeyError::BadHex(pos));
        }
        if clean.len() != 2 * AES128_KEY_LEN {
            return Err(KeyError::BadHexLength(clean.len()));
        }
        let mut key = Zeroizing::new([0u8; AES128_KEY_LEN]);
        hex::decode_to_slice(&*clean, &mut *key).map_err(|_| KeyError::BadHex(0))?;
        Ok(Self(key))
    }

    pub fn as_bytes(&self) -> &[u8; AES128_KEY_LEN] {
        &self.0
    }

    /// GP AES key check value (Amendment D §7.2.2): encrypt one block of
    /// sixteen `01` bytes and keep the three leftmost bytes.
    pub fn kcv(&self) -> [u8; 3] {
        let block = self.encrypt_block(&[0x01; BLOCK_LEN]);
        [block[0], block[1], block[2]]
    }

    fn cipher(&self) -> Aes128 {
        let key: &Array<u8, _> = (&*self.0).into();
        Aes128::new(key)
    }

    /// One AES block encryption (ECB of a single block).
    pub(crate) fn encrypt_block(&self, input: &[u8; BLOCK_LEN]) -> [u8; BLOCK_LEN] {
        let mut block = Array::from(*input);
        self.cipher().encrypt_block(&mut block);
        block.into()
    }

    /// AES-CBC encryption in place. `data.len()` must be a multiple of 16
    /// (callers pad first); a trailing partial block is left untouched.
    pub(crate) fn cbc_encrypt(&self, iv: &[u8; BLOCK_LEN], data: &mut [u8]) {
        debug_assert!(data.len().is_multiple_of(BLOCK_LEN));
        let cipher = self.cipher();
        let mut prev = *iv;
        for chunk in data.chunks_exact_mut(BLOCK_LEN) {
            let mut block = Array::from(prev);
            for (b, d) in block.iter_mut().zip(chunk.iter()) {
                *b ^= d;
            }
            cipher.encrypt_block(&mut block);
            chunk.copy_from_slice(&block);
            prev = block.into();
        }
    }

    /// AES-CBC decryption in place; same length rule as [`Self::cbc_encrypt`].
    pub(crate) fn cbc_decrypt(&self, iv: &[u8; BLOCK_LEN], data: &mut [u8]) {
        debug_assert!(data.len().is_multiple_of(BLOCK_LEN));
        let cipher = self.cipher();
        let mut prev = *iv;
        for chunk in data.chunks_exact_mut(BLOCK_LEN) {
            let mut ct = [0u8; BLOCK_LEN];
            ct.copy_from_slice(chunk);
            let mut block = Array::from(ct);
            cipher.decrypt_block(&mut block);
            for ((out, b), p) in chunk.iter_mut().zip(block.iter()).zip(prev.iter()) {
                *out = b ^ p;
            }
            prev = ct;
        }
    }

    /// AES-CMAC (NIST SP 800-38B, Amendment D §4.1.3) over the concatenation
    /// of `parts`, full 16-byte output.
    pub(crate) fn cmac(&self, parts: &[&[u8]]) -> [u8; BLOCK_LEN] {
        let key: &Array<u8, _> = (&*self.0).into();
        let mut mac = <Cmac<Aes128> as KeyInit>::new(key);
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }
}

impl PartialEq for AesKey {
    /// Constant-time comparison.
    fn eq(&self, other: &Self) -> bool {
        ct_eq(&self.0[..], &other.0[..])
    }
}

impl Eq for AesKey {}

impl fmt::Debug for AesKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AesKey(KCV {})", hex::encode_upper(self.kcv()))
    }
}

/// Constant-time equality for MACs, cryptograms and keys (length is not secret).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Per-card key diversification applied to master keys before opening a
/// secure channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Diversification {
    /// The card holds the keys as given.
    #[default]
    None,
    /// GlobalPlatformPro's `kdf3` scheme; see [`StaticKeys::diversify`].
    Kdf3,
}

impl Diversification {
    pub const fn as_str(self) -> &'static str {
        match self {
            Diversification::None => "none",
            Diversification::Kdf3 => "kdf3",
        }
    }
}

impl fmt::Display for Diversification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Diversification {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Diversification::None),
            "kdf3" => Ok(Diversification::Kdf3),
            _ => Err(KeyError::UnknownDiversification(s.to_owned())),
        }
    }
}

/// An SCP03 static key set (Amendment D §6.1): Key-ENC, Key-MAC, Key-DEK.
#[derive(Clone, PartialEq, Eq)]
pub struct StaticKeys {
    pub enc: AesKey,
    pub mac: AesKey,
    pub dek: AesKey,
}

impl StaticKeys {
    pub fn new(enc: AesKey, mac: AesKey, dek: AesKey) -> Self {
        Self { enc, mac, dek }
    }

    /// One key used as ENC, MAC and DEK (how master keys and test keys are
    /// usually given).
    pub fn from_single(key: AesKey) -> Self {
        Self { enc: key.clone(), mac: key.clone(), dek: key }
    }

    /// `404142434445464748494A4B4C4D4E4F` for all three keys: the
    /// GlobalPlatform test key set that unpersonalized cards ship with.
    pub fn gp_default() -> Self {
        Self::from_single(AesKey::new(GP_DEFAULT_KEY))
    }

    pub fn get(&self, role: KeyRole) -> &AesKey {
        match role {
            KeyRole::Enc => &self.enc,
            KeyRole::Mac => &self.mac,
            KeyRole::Dek => &self.dek,
        }
    }

    /// KCVs in ENC, MAC, DEK order.
    pub fn kcvs(&self) -> [[u8; 3]; 3] {
        KeyRole::ALL.map(|r| self.get(r).kcv())
    }

    /// Derives the card's own keys from these (master) keys and the 10-byte
    /// key diversification data (KDD) the card returns in its INITIALIZE
    /// UPDATE response (Amendment D §7.1.1.1).
    ///
    /// [`Diversification::Kdf3`] matches GlobalPlatformPro's `kdf3` template
    /// (`$_ 00 00 00 $k 00 $0 … $9`, `PlaintextKeys.java`): each role's key is
    /// derived from the master key of the same role with the SP 800-108
    /// counter-mode KDF, PRF = AES-CMAC, and this PRF input for AES-128 (one
    /// iteration, i = 01):
    ///
    /// ```text
    /// offset  0    1  2  3    4        5    6 .. 15
    ///         i    00 00 00   key id   00   KDD[0..10]
    ///         01              01 ENC
    ///                         02 MAC
    ///                         03 DEK
    /// ```
    ///
    /// Unlike the SCP03 session-key KDF (§4.1.5) there is no 11-byte label
    /// and no L field; the counter byte comes first. The derived key is the
    /// full 16-byte CMAC.
    pub fn diversify(&self, scheme: Diversification, kdd: &[u8; 10]) -> StaticKeys {
        match scheme {
            Diversification::None => self.clone(),
            Diversification::Kdf3 => {
                let derive = |role: KeyRole| {
                    let input = kdf3_prf_input(1, role, kdd);
                    AesKey(Zeroizing::new(self.get(role).cmac(&[&input])))
                };
                StaticKeys { enc: derive(KeyRole::Enc), mac: derive(KeyRole::Mac), dek: derive(KeyRole::Dek) }
            }
        }
    }
}

/// PRF input of KDF3 iteration `counter` for `role` (layout in
/// [`StaticKeys::diversify`]).
fn kdf3_prf_input(counter: u8, role: KeyRole, kdd: &[u8; 10]) -> [u8; 16] {
    let mut input = [0u8; 16];
    input[0] = counter;
    input[4] = role.key_id();
    input[6..].copy_from_slice(kdd);
    input
}

impl fmt::Debug for StaticKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticKeys").field("enc", &self.enc).field("mac", &self.mac).field("dek", &self.dek).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(h: &str) -> AesKey {
        AesKey::from_hex(h).expect("test key")
    }

    #[test]
    fn kcv_known_answers() {
        // GlobalPlatformPro library/src/test/java/pro/javacard/gp/test/TestPlaintextKeys.java,
        // testSessionKeys_SCP03: the static DEK 404142…4F has AES KCV 504A77.
        assert_eq!(StaticKeys::gp_default().dek.kcv(), [0x50, 0x4A, 0x77]);
        // osmocom/pysim tests/unittests/test_globalplatform.py, SCP03_KCV_Test.
        assert_eq!(key("000102030405060708090a0b0c0d0e0f").kcv(), [0xC3, 0x52, 0x80]);
        assert_eq!(key("101112131415161718191a1b1c1d1e1f").kcv(), [0x01, 0x38, 0x08]);
        assert_eq!(key("202122232425262728292a2b2c2d2e2f").kcv(), [0x84, 0x0D, 0xE5]);
    }

    #[test]
    fn cmac_matches_sp800_38b_example() {
        // NIST SP 800-38B Appendix D.1 (AES-128), Example 2 (16-byte message).
        let k = key("2b7e151628aed2a6abf7158809cf4f3c");
        let msg = hex::decode("6bc1bee22e409f96e93d7e117393172a").expect("hex");
        assert_eq!(hex::encode(k.cmac(&[&msg])), "070a16b46b4d4144f79bdd9dd04a287c");
        // Split input gives the same MAC.
        assert_eq!(k.cmac(&[&msg[..5], &msg[5..]]), k.cmac(&[&msg]));
    }

    #[test]
    fn cbc_matches_sp800_38a_example() {
        // NIST SP 800-38A F.2.1 CBC-AES128.Encrypt, first two blocks.
        let k = key("2b7e151628aed2a6abf7158809cf4f3c");
        let iv: [u8; 16] = hex::decode("000102030405060708090a0b0c0d0e0f").expect("hex").try_into().expect("16");
        let plain = hex::decode("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51").expect("hex");
        let mut data = plain.clone();
        k.cbc_encrypt(&iv, &mut data);
        assert_eq!(hex::encode(&data), "7649abac8119b246cee98e9b12e9197d5086cb9b507219ee95db113a917678b2");
        k.cbc_decrypt(&iv, &mut data);
        assert_eq!(data, plain);
    }

    #[test]
    fn kdf3_matches_globalplatformpro() {
        // GlobalPlatformPro TestPlaintextKeys.testDiversification_KDF3_SCP03_AES128 (also
        // tool TestPlaintextKeysProvider.testDefaultKeysWithDiversifier): master 404142…4F,
        // KDD 00010203040506070809 -> KCVs ENC E79C05, MAC D1BD77, DEK 3FDE8C.
        let kdd = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];
        let card = StaticKeys::gp_default().diversify(Diversification::Kdf3, &kdd);
        assert_eq!(card.enc.kcv(), [0xE7, 0x9C, 0x05]);
        assert_eq!(card.mac.kcv(), [0xD1, 0xBD, 0x77]);
        assert_eq!(card.dek.kcv(), [0x3F, 0xDE, 0x8C]);
        assert_eq!(StaticKeys::gp_default().diversify(Diversification::None, &kdd), StaticKeys::gp_default());
    }

    #[test]
    fn kdf3_layout_matches_external_aes256_vector() {
        // GlobalPlatformPro TestPlaintextKeys.testDiversification_KDF3_ExternalVector (an
        // "external test vector" in that suite): AES-256 master key, KDD D9B1DE5D0362DEDCE4FB,
        // derived ENC key 9AAC…4781. Our key type is AES-128 only, so this drives the same
        // PRF-input layout through AES-256-CMAC by hand (two iterations, i = 01, 02).
        use aes::Aes256;
        let master = hex::decode("8C72C72CF908411653018807950D82FBAD947562F0828A0B10B8B9606ABF3BCD").expect("hex");
        let kdd: [u8; 10] = hex::decode("D9B1DE5D0362DEDCE4FB").expect("hex").try_into().expect("10");
        let mut derived = Vec::new();
        for i in 1..=2u8 {
            let mut mac = <Cmac<Aes256> as KeyInit>::new_from_slice(&master).expect("32-byte key");
            mac.update(&kdf3_prf_input(i, KeyRole::Enc, &kdd));
            derived.extend_from_slice(&mac.finalize().into_bytes());
        }
        assert_eq!(hex::encode_upper(derived), "9AAC5D0B3601F89438A0D9D0B6B256CFB47E6462DFA5228D3420C4AC7C224781");
    }

    #[test]
    fn hex_parsing_names_the_problem() {
        assert_eq!(key("40414243 44454647 48494A4B 4C4D4E4F"), StaticKeys::gp_default().enc);
        assert_eq!(AesKey::from_hex("4041").err(), Some(KeyError::BadHexLength(4)));
        assert_eq!(AesKey::from_hex("4041424344454647484940414243444Z").err(), Some(KeyError::BadHex(31)));
        assert_eq!(AesKey::from_bytes(&[0; 15]).err(), Some(KeyError::BadLength(15)));
        assert!(AesKey::from_hex("4041").expect_err("short").to_string().contains("32 hex digits"));
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let keys = StaticKeys::gp_default();
        let s = format!("{keys:?}");
        assert!(s.contains("504A77"), "{s}");
        assert!(!s.to_ascii_uppercase().contains("404142"), "{s}");
        assert!(!s.contains("64, 65"), "{s}");
    }

    #[test]
    fn diversification_parses() {
        assert_eq!("kdf3".parse::<Diversification>(), Ok(Diversification::Kdf3));
        assert_eq!(" KDF3 ".parse::<Diversification>(), Ok(Diversification::Kdf3));
        assert_eq!("none".parse::<Diversification>(), Ok(Diversification::None));
        assert!("emv".parse::<Diversification>().is_err());
        assert_eq!(Diversification::Kdf3.to_string(), "kdf3");
    }
}
