//! The emulator's latency model: how long a real card takes per operation,
//! from public measurements (docs in the brief: JCOP4 over an ACR1252
//! contactless reader, JCAlgTest figures). The card reports modeled time;
//! the emulated transport sleeps it scaled by the speed factor.

use std::time::Duration;

/// What a command cost the card, in model terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cost {
    /// A small APDU round trip (select, get data, status).
    Small,
    /// INITIALIZE UPDATE / EXTERNAL AUTHENTICATE: round trip plus AES work.
    SecureChannel,
    /// One LOAD block written to EEPROM.
    LoadBlock,
    /// The final LOAD block: linking and hash check.
    LoadFinal,
    Install,
    Delete,
    PutKey,
    /// Round trip plus an EC key generation and one signature.
    KeyGen,
    /// Round trip plus `n` ECDSA signatures.
    Sign(u32),
    /// Round trip plus an ECDH.
    Ecdh,
    /// EXPORT: round trip, an ephemeral EC key generation, an ECDH and one
    /// signature (the AES-GCM of 32 bytes is negligible).
    Export,
    /// IMPORT: round trip, a signature verification (about a signature's
    /// time), an ECDH and one signature.
    Import,
    /// The on-card known-answer test suite.
    SelfTestKat,
    /// Memory test: an EEPROM write and read of the test region.
    MemoryTest,
}

/// Milliseconds per operation on a realistic card at speed 1.0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyModel {
    pub small_apdu_ms: f64,
    pub secure_channel_ms: f64,
    pub load_block_ms: f64,
    pub load_final_ms: f64,
    pub install_ms: f64,
    pub delete_ms: f64,
    pub put_key_ms: f64,
    pub keygen_ms: f64,
    pub sign_ms: f64,
    pub ecdh_ms: f64,
    pub self_test_kat_ms: f64,
    pub memory_test_ms: f64,
}

impl LatencyModel {
    /// JCOP4-class card over an ACR1252 contactless reader: small APDU
    /// 9-18 ms, 255-byte LOAD block about 44 ms, final block 0.45-0.7 s,
    /// EC keygen 25-31 ms, ECDSA sign 32 ms, ECDH 20 ms.
    pub const JCOP4: Self = Self {
        small_apdu_ms: 12.0,
        secure_channel_ms: 25.0,
        load_block_ms: 44.0,
        load_final_ms: 550.0,
        install_ms: 180.0,
        delete_ms: 120.0,
        put_key_ms: 60.0,
        keygen_ms: 28.0,
        sign_ms: 32.0,
        ecdh_ms: 20.0,
        self_test_kat_ms: 150.0,
        memory_test_ms: 60.0,
    };

    /// A slow card (Feitian A22CR-class LOAD and INSTALL figures, JCOP3
    /// J3H145 crypto): 125 ms a LOAD block, INSTALL 250 ms, keygen 150 ms,
    /// sign 56 ms.
    pub const SLOW: Self = Self {
        small_apdu_ms: 18.0,
        secure_channel_ms: 40.0,
        load_block_ms: 125.0,
        load_final_ms: 900.0,
        install_ms: 250.0,
        delete_ms: 200.0,
        put_key_ms: 100.0,
        keygen_ms: 150.0,
        sign_ms: 56.0,
        ecdh_ms: 40.0,
        self_test_kat_ms: 300.0,
        memory_test_ms: 100.0,
    };

    /// The modeled duration of one operation at speed 1.0.
    pub fn duration(&self, cost: Cost) -> Duration {
        let ms = match cost {
            Cost::Small => self.small_apdu_ms,
            Cost::SecureChannel => self.secure_channel_ms,
            Cost::LoadBlock => self.load_block_ms,
            Cost::LoadFinal => self.load_final_ms,
            Cost::Install => self.install_ms,
            Cost::Delete => self.delete_ms,
            Cost::PutKey => self.put_key_ms,
            Cost::KeyGen => self.small_apdu_ms + self.keygen_ms + self.sign_ms,
            Cost::Sign(n) => self.small_apdu_ms + self.sign_ms * f64::from(n),
            Cost::Ecdh => self.small_apdu_ms + self.ecdh_ms,
            Cost::Export => self.small_apdu_ms + self.keygen_ms + self.ecdh_ms + self.sign_ms,
            Cost::Import => self.small_apdu_ms + self.ecdh_ms + 2.0 * self.sign_ms,
            Cost::SelfTestKat => self.small_apdu_ms + self.self_test_kat_ms,
            Cost::MemoryTest => self.small_apdu_ms + self.memory_test_ms,
        };
        Duration::from_secs_f64(ms / 1000.0)
    }
}

impl Default for LatencyModel {
    fn default() -> Self {
        Self::JCOP4
    }
}

/// Scales a modeled duration by a speed factor (1.0 realistic, 0 instant).
pub fn scaled(d: Duration, speed: f64) -> Duration {
    if speed <= 0.0 { Duration::ZERO } else { d.mul_f64(speed) }
}
