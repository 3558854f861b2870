//! GlobalPlatform Secure Channel Protocol '03' (GP Card Specification v2.3
//! Amendment D), S8 mode, both sides: the SP 800-108 data derivation, session
//! keys and cryptograms, INITIALIZE UPDATE / EXTERNAL AUTHENTICATE, C-MAC,
//! C-DECRYPTION, R-MAC and R-ENCRYPTION wrapping for the host
//! ([`HostChannel`]) and the card emulator ([`CardChannel`]), and the PUT KEY
//! key-data format for AES key sets.
//!
//! Section numbers (§) refer to Amendment D v1.1.1 unless stated otherwise.

use std::fmt;

use zeroize::Zeroizing;

use crate::apdu::{Command, EXTENDED_MAX, Response, SHORT_MAX_DATA, SHORT_MAX_LE};
use crate::gp::keys::{AES128_KEY_LEN, AesKey, BLOCK_LEN, KeyRole, StaticKeys, ct_eq};
use crate::sw::StatusWord;

/// Secure Channel Protocol identifier in the key information (§7.1.1.1).
pub const SCP03_ID: u8 = 0x03;
/// GlobalPlatform proprietary class byte.
pub const CLA_GP: u8 = 0x80;
/// CLA bit b3: GlobalPlatform proprietary secure messaging (§6.2.4).
pub const CLA_SECURE_MESSAGING: u8 = 0x04;
pub const INS_INITIALIZE_UPDATE: u8 = 0x50;
pub const INS_EXTERNAL_AUTHENTICATE: u8 = 0x82;
pub const INS_PUT_KEY: u8 = 0xD8;
/// C-MAC and R-MAC length in S8 mode (§6.2.4: the 8 most significant bytes).
pub const MAC_LEN: usize = 8;
/// Challenge and cryptogram length in S8 mode (§6.2.2).
pub const CHALLENGE_LEN: usize = 8;
/// PUT KEY key type for AES keys (§7.2.1 Table 7-10).
pub const KEY_TYPE_AES: u8 = 0x88;
/// PUT KEY P2: b8 = several keys in one command, b7..b1 = first key id 1.
pub const PUT_KEY_P2_MULTIPLE_FROM_1: u8 = 0x81;

/// "i" parameter (§5.1 Table 5-1) b5: pseudo-random card challenge; the
/// INITIALIZE UPDATE response then ends with the sequence counter.
pub const I_PSEUDO_RANDOM_CHALLENGE: u8 = 0x10;
/// "i" b6: R-MAC supported.
pub const I_RMAC: u8 = 0x20;
/// "i" b7 (with b6): R-MAC and R-ENCRYPTION supported.
pub const I_RENC: u8 = 0x40;
/// "i" b1: RFU in v1.1.1; later revisions use it for S16 mode (16-byte
/// challenges, cryptograms and MACs), which this module does not implement.
pub const I_S16: u8 = 0x01;

/// Everything that can go wrong in the secure channel. Messages never carry
/// key bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Scp03Error {
    #[error("card cryptogram mismatch: wrong static keys, key version or diversification")]
    CardCryptogramMismatch,
    #[error("bad host cryptogram in EXTERNAL AUTHENTICATE; secure channel closed")]
    BadHostCryptogram,
    #[error("C-MAC mismatch; secure channel closed")]
    CMacMismatch,
    #[error("R-MAC mismatch; secure channel closed")]
    RMacMismatch,
    #[error("response with status {sw} lacks the R-MAC the security level requires; secure channel closed")]
    RMacMissing { sw: StatusWord },
    #[error("bad padding in decrypted {0}")]
    BadPadding(&'static str),
    #[error("malformed {field}: {detail}")]
    Malformed { field: &'static str, detail: String },
    #[error("key check value mismatch for the {role} key")]
    KcvMismatch { role: KeyRole },
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("command lacks the secure messaging the security level requires; secure channel closed")]
    Unprotected,
    #[error("secure channel {0}")]
    State(&'static str),
    #[error("secure channel was closed after a security error; start a new INITIALIZE UPDATE")]
    Closed,
    #[error("protected command data of {0} bytes exceeds the extended APDU limit")]
    TooLong(usize),
}

fn malformed(field: &'static str, detail: impl Into<String>) -> Scp03Error {
    Scp03Error::Malformed { field, detail: detail.into() }
}

// ---------------------------------------------------------------------------
// Data derivation (§4.1.5)

/// Derivation constants of §4.1.5 Table 4-1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DerivationConstant {
    CardCryptogram = 0x00,
    HostCryptogram = 0x01,
    CardChallenge = 0x02,
    SEnc = 0x04,
    SMac = 0x06,
    SRmac = 0x07,
}

/// The SCP03 data derivation scheme (§4.1.5): NIST SP 800-108 KDF in counter
/// mode with PRF = AES-CMAC (full 16-byte output). Each PRF input is
///
/// ```text
/// 00 × 11 ‖ constant ‖ 00 (separation) ‖ L (2 bytes, bits) ‖ i (1 byte) ‖ context
/// ```
///
/// with i = 01, 02, … and the output truncated to `N` bytes (`L = 8·N`).
/// `N` may be 8, 16, 24 or 32 (`L` = 0040, 0080, 00C0, 0100).
pub fn kdf<const N: usize>(key: &AesKey, constant: DerivationConstant, context: &[u8]) -> Zeroizing<[u8; N]> {
    const { assert!(N == 8 || N == 16 || N == 24 || N == 32, "SCP03 KDF output is 8, 16, 24 or 32 bytes") };
    let l_bits = ((N * 8) as u16).to_be_bytes();
    let mut fixed = [0u8; 16];
    fixed[11] = constant as u8;
    // fixed[12] = 00: separation indicator.
    fixed[13..15].copy_from_slice(&l_bits);
    let mut out = Zeroizing::new([0u8; N]);
    for (i, chunk) in out.chunks_mut(BLOCK_LEN).enumerate() {
        fixed[15] = i as u8 + 1;
        let block = Zeroizing::new(key.cmac(&[&fixed, context]));
        chunk.copy_from_slice(&block[..chunk.len()]);
    }
    out
}

/// Host challenge ‖ card challenge: the context of §6.2.1 and §6.2.2.
fn challenge_context(host: &[u8; CHALLENGE_LEN], card: &[u8; CHALLENGE_LEN]) -> [u8; 16] {
    let mut ctx = [0u8; 16];
    ctx[..8].copy_from_slice(host);
    ctx[8..].copy_from_slice(card);
    ctx
}

/// SCP03 session keys (§6.1 Table 6-1). There is no session DEK: sensitive
/// data is encrypted with the static Key-DEK (§6.2.8). Zeroized on drop.
#[derive(Clone)]
pub struct SessionKeys {
    pub s_enc: AesKey,
    pub s_mac: AesKey,
    pub s_rmac: AesKey,
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionKeys")
            .field("s_enc", &self.s_enc)
            .field("s_mac", &self.s_mac)
            .field("s_rmac", &self.s_rmac)
            .finish()
    }
}

/// Derives S-ENC (from Key-ENC, constant 04), S-MAC (Key-MAC, 06) and S-RMAC
/// (Key-MAC, 07) with context = host challenge ‖ card challenge (§6.2.1
/// Table 6-2).
pub fn derive_session_keys(
    keys: &StaticKeys,
    host_challenge: &[u8; CHALLENGE_LEN],
    card_challenge: &[u8; CHALLENGE_LEN],
) -> SessionKeys {
    let ctx = challenge_context(host_challenge, card_challenge);
    let derive = |key: &AesKey, c| AesKey::new(*kdf::<AES128_KEY_LEN>(key, c, &ctx));
    SessionKeys {
        s_enc: derive(&keys.enc, DerivationConstant::SEnc),
        s_mac: derive(&keys.mac, DerivationConstant::SMac),
        s_rmac: derive(&keys.mac, DerivationConstant::SRmac),
    }
}

/// Card authentication cryptogram (§6.2.2.2): KDF(S-MAC, 00, L=0040,
/// host challenge ‖ card challenge).
pub fn card_cryptogram(
    s_mac: &AesKey,
    host_challenge: &[u8; CHALLENGE_LEN],
    card_challenge: &[u8; CHALLENGE_LEN],
) -> [u8; CHALLENGE_LEN] {
    let ctx = challenge_context(host_challenge, card_challenge);
    *kdf::<CHALLENGE_LEN>(s_mac, DerivationConstant::CardCryptogram, &ctx)
}

/// Host authentication cryptogram (§6.2.2.3): KDF(S-MAC, 01, L=0040,
/// host challenge ‖ card challenge).
pub fn host_cryptogram(
    s_mac: &AesKey,
    host_challenge: &[u8; CHALLENGE_LEN],
    card_challenge: &[u8; CHALLENGE_LEN],
) -> [u8; CHALLENGE_LEN] {
    let ctx = challenge_context(host_challenge, card_challenge);
    *kdf::<CHALLENGE_LEN>(s_mac, DerivationConstant::HostCryptogram, &ctx)
}

/// Pseudo-random card challenge (§6.2.2.1): KDF(Key-ENC, 02, L=0040,
/// sequence counter (3 bytes) ‖ AID of the security domain). The card
/// increments the counter before each INITIALIZE UPDATE.
pub fn pseudo_random_card_challenge(
    static_enc: &AesKey,
    sequence_counter: &[u8; 3],
    sd_aid: &[u8],
) -> [u8; CHALLENGE_LEN] {
    let mut ctx = Vec::with_capacity(3 + sd_aid.len());
    ctx.extend_from_slice(sequence_counter);
    ctx.extend_from_slice(sd_aid);
    *kdf::<CHALLENGE_LEN>(static_enc, DerivationConstant::CardChallenge, &ctx)
}

// ---------------------------------------------------------------------------
// Security level (§7.1.2.1 Table 7-3)

/// The security level requested by EXTERNAL AUTHENTICATE P1. "No secure
/// messaging" (00) is deliberately not offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SecurityLevel {
    /// C-MAC (01).
    CMac = 0x01,
    /// C-DECRYPTION and C-MAC (03).
    CMacCDec = 0x03,
    /// C-MAC and R-MAC (11).
    CMacRMac = 0x11,
    /// C-DECRYPTION, C-MAC and R-MAC (13).
    CMacCDecRMac = 0x13,
    /// C-DECRYPTION, R-ENCRYPTION, C-MAC and R-MAC (33).
    CMacCDecRMacREnc = 0x33,
}

impl SecurityLevel {
    /// Every level this implementation speaks, weakest first.
    pub const ALL: [SecurityLevel; 5] = [
        SecurityLevel::CMac,
        SecurityLevel::CMacCDec,
        SecurityLevel::CMacRMac,
        SecurityLevel::CMacCDecRMac,
        SecurityLevel::CMacCDecRMacREnc,
    ];

    pub const fn to_byte(self) -> u8 {
        self as u8
    }

    pub fn from_byte(b: u8) -> Result<Self, Scp03Error> {
        Ok(match b {
            0x01 => Self::CMac,
            0x03 => Self::CMacCDec,
            0x11 => Self::CMacRMac,
            0x13 => Self::CMacCDecRMac,
            0x33 => Self::CMacCDecRMacREnc,
            _ => return Err(Scp03Error::Unsupported(format!("security level {b:02X}"))),
        })
    }

    pub const fn has_cdec(self) -> bool {
        self.to_byte() & 0x02 != 0
    }

    pub const fn has_rmac(self) -> bool {
        self.to_byte() & 0x10 != 0
    }

    pub const fn has_renc(self) -> bool {
        self.to_byte() & 0x20 != 0
    }
}

impl TryFrom<u8> for SecurityLevel {
    type Error = Scp03Error;

    fn try_from(b: u8) -> Result<Self, Self::Error> {
        Self::from_byte(b)
    }
}

impl From<SecurityLevel> for u8 {
    fn from(level: SecurityLevel) -> u8 {
        level.to_byte()
    }
}

impl fmt::Display for SecurityLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::CMac => "C-MAC",
            Self::CMacCDec => "C-MAC+C-DECRYPTION",
            Self::CMacRMac => "C-MAC+R-MAC",
            Self::CMacCDecRMac => "C-MAC+C-DECRYPTION+R-MAC",
            Self::CMacCDecRMacREnc => "C-MAC+C-DECRYPTION+R-MAC+R-ENCRYPTION",
        };
        write!(f, "{:02X} ({name})", self.to_byte())
    }
}

// ---------------------------------------------------------------------------
// INITIALIZE UPDATE (§7.1.1)

/// The INITIALIZE UPDATE command: `80 50 kv 00 08 <host challenge> 00`.
/// Key version 00 means "first available key set".
pub fn initialize_update(key_version: u8, host_challenge: &[u8; CHALLENGE_LEN]) -> Command {
    Command::new(CLA_GP, INS_INITIALIZE_UPDATE, key_version, 0x00)
        .with_data(host_challenge.to_vec())
        .with_le(SHORT_MAX_LE)
}

/// The INITIALIZE UPDATE response data field (§7.1.1.1 Table 7-2), S8 mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitUpdateResponse {
    /// Key diversification data (10 bytes), input to [`StaticKeys::diversify`].
    pub kdd: [u8; 10],
    /// Key information: key version number.
    pub key_version: u8,
    /// Key information: the SCP "i" parameter (§5.1 Table 5-1).
    pub i_param: u8,
    pub card_challenge: [u8; CHALLENGE_LEN],
    pub card_cryptogram: [u8; CHALLENGE_LEN],
    /// Present exactly when `i_param` announces pseudo-random challenges.
    pub sequence_counter: Option<[u8; 3]>,
}

/// Reads fixed-size fields in order, naming the field that is cut short.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8], what: &'static str) -> Self {
        Self { data, pos: 0, what }
    }

    fn take<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], Scp03Error> {
        let rest = &self.data[self.pos..];
        let Some(bytes) = rest.get(..N) else {
            return Err(malformed(
                field,
                format!(
                    "needs {N} bytes at offset {} of the {}-byte {}, only {} left",
                    self.pos,
                    self.data.len(),
                    self.what,
                    rest.len()
                ),
            ));
        };
        self.pos += N;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn byte(&mut self, field: &'static str) -> Result<u8, Scp03Error> {
        Ok(self.take::<1>(field)?[0])
    }

    fn finish(&self) -> Result<(), Scp03Error> {
        let extra = self.data.len() - self.pos;
        if extra == 0 {
            Ok(())
        } else {
            Err(malformed(self.what, format!("{extra} unexpected trailing bytes after {} bytes", self.pos)))
        }
    }
}

impl InitUpdateResponse {
    /// Length without / with the sequence counter.
    pub const LEN: usize = 29;
    pub const LEN_WITH_COUNTER: usize = 32;

    pub fn parse(data: &[u8]) -> Result<Self, Scp03Error> {
        let mut r = Reader::new(data, "INITIALIZE UPDATE response");
        let kdd = r.take::<10>("key diversification data")?;
        let [key_version, scp, i_param] = r.take::<3>("key information")?;
        if scp != SCP03_ID {
            return Err(malformed("key information", format!("SCP identifier {scp:02X}, expected 03")));
        }
        if i_param & I_S16 != 0 {
            return Err(Scp03Error::Unsupported(format!("S16 mode (i parameter {i_param:02X} has b1 set)")));
        }
        let card_challenge = r.take::<CHALLENGE_LEN>("card challenge")?;
        let card_cryptogram = r.take::<CHALLENGE_LEN>("card cryptogram")?;
        let sequence_counter =
            if i_param & I_PSEUDO_RANDOM_CHALLENGE != 0 { Some(r.take::<3>("sequence counter")?) } else { None };
        r.finish()?;
        Ok(Self { kdd, key_version, i_param, card_challenge, card_cryptogram, sequence_counter })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN_WITH_COUNTER);
        out.extend_from_slice(&self.kdd);
        out.extend_from_slice(&[self.key_version, SCP03_ID, self.i_param]);
        out.extend_from_slice(&self.card_challenge);
        out.extend_from_slice(&self.card_cryptogram);
        if let Some(seq) = &self.sequence_counter {
            out.extend_from_slice(seq);
        }
        out
    }

    pub fn pseudo_random_challenge(&self) -> bool {
        self.i_param & I_PSEUDO_RANDOM_CHALLENGE != 0
    }

    pub fn supports_rmac(&self) -> bool {
        self.i_param & I_RMAC != 0
    }

    pub fn supports_renc(&self) -> bool {
        self.i_param & (I_RMAC | I_RENC) == I_RMAC | I_RENC
    }
}

// ---------------------------------------------------------------------------
// Secure messaging primitives (§6.2.4 – §6.2.7)

/// ISO/IEC 9797-1 method 2 padding (§4.1.4): `80` then zeros to a block
/// boundary; always at least one byte is added.
fn pad80(data: &mut Vec<u8>) {
    data.push(0x80);
    while !data.len().is_multiple_of(BLOCK_LEN) {
        data.push(0x00);
    }
}

/// Removes method 2 padding; the `80` must sit in the last block.
fn unpad80(data: &mut Vec<u8>, what: &'static str) -> Result<(), Scp03Error> {
    let last_nonzero = data.iter().rposition(|&b| b != 0);
    match last_nonzero {
        Some(i) if data[i] == 0x80 && data.len() - i <= BLOCK_LEN => {
            data.truncate(i);
            Ok(())
        }
        _ => Err(Scp03Error::BadPadding(what)),
    }
}

/// The encryption counter as a full block, left padded with zeros (§6.2.6).
fn counter_block(counter: u128) -> [u8; BLOCK_LEN] {
    counter.to_be_bytes()
}

/// ICV for command encryption: AES(S-ENC, counter block) (§6.2.6).
fn command_icv(s_enc: &AesKey, counter: u128) -> [u8; BLOCK_LEN] {
    s_enc.encrypt_block(&counter_block(counter))
}

/// ICV for response encryption: the same counter block with its most
/// significant byte set to 80, encrypted with S-ENC (§6.2.7).
fn response_icv(s_enc: &AesKey, counter: u128) -> [u8; BLOCK_LEN] {
    let mut block = counter_block(counter);
    block[0] = 0x80;
    s_enc.encrypt_block(&block)
}

/// CLA bits b4 b3: the secure messaging indication of a first
/// interindustry class byte.
const CLA_SM_BITS: u8 = 0x0C;

/// The CLA used in the C-MAC input (§6.2.4): logical channel number (b2 b1)
/// set to zero, b4 = 0 and b3 = 1 (GlobalPlatform proprietary secure
/// messaging).
fn mac_cla(cla: u8) -> u8 {
    (cla & 0xF0) | CLA_SECURE_MESSAGING
}

/// Full 16-byte CMAC for a C-MAC (§6.2.4): S-MAC over MAC chaining value ‖
/// CLA INS P1 P2 ‖ Lc ‖ data, where `data` excludes the C-MAC, Lc counts the
/// 8 C-MAC bytes, Le is not included, and Lc is coded as the protected APDU
/// is sent (1 byte, or 00 ‖ 2 bytes when the protected APDU is extended —
/// the same rule as GlobalPlatformPro's SCP03 wrapper).
fn c_mac(s_mac: &AesKey, chain: &[u8; BLOCK_LEN], header: [u8; 4], data: &[u8], le: Option<usize>) -> [u8; BLOCK_LEN] {
    let lc = data.len() + MAC_LEN;
    let extended = lc > SHORT_MAX_DATA || le.is_some_and(|le| le > SHORT_MAX_LE);
    let header = [mac_cla(header[0]), header[1], header[2], header[3]];
    let lc_field = (lc as u16).to_be_bytes();
    let lc_field: &[u8] = if extended { &[0x00, lc_field[0], lc_field[1]] } else { &lc_field[1..] };
    s_mac.cmac(&[chain, &header, lc_field, data])
}

/// Full 16-byte CMAC for an R-MAC (§6.2.5): S-RMAC over MAC chaining value ‖
/// response data ‖ SW.
fn r_mac(s_rmac: &AesKey, chain: &[u8; BLOCK_LEN], data: &[u8], sw: StatusWord) -> [u8; BLOCK_LEN] {
    s_rmac.cmac(&[chain, data, &sw.to_bytes()])
}

/// §6.2.5: every status word except 9000, 62xx and 63xx is an error status
/// word, and error responses carry no R-MAC (and no data).
pub fn is_error_status(sw: StatusWord) -> bool {
    !(sw == StatusWord::OK || sw.sw1() == 0x62 || sw.sw1() == 0x63)
}

/// Where a secure channel stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelState {
    /// INITIALIZE UPDATE done, EXTERNAL AUTHENTICATE not yet (accepted).
    Initiated,
    /// Mutually authenticated; commands are protected at the session level.
    Open,
    /// Aborted by a security error; only a new INITIALIZE UPDATE helps
    /// (GP Card Specification §10 rules, restated in §5.6).
    Closed,
}

// ---------------------------------------------------------------------------
// Host side

/// How much of an unwrapped response can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseAuth {
    /// The R-MAC was present and correct: data and SW come from the card and
    /// belong to this command.
    RMacVerified,
    /// The security level has no R-MAC, so nothing vouches for the response.
    NotProtected,
    /// An error status word, which by §6.2.5 carries no R-MAC even when the
    /// level has one: the SW (and any data) may have been forged or replayed.
    ErrorStatus,
}

/// A response after [`HostChannel::unwrap`]: R-MAC stripped and, at
/// R-ENCRYPTION level, data decrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnwrappedResponse {
    pub response: Response,
    pub auth: ResponseAuth,
}

impl UnwrappedResponse {
    /// True only when an R-MAC vouched for this response. Irreversible
    /// actions should not be decided on anything else.
    pub fn is_authenticated(&self) -> bool {
        self.auth == ResponseAuth::RMacVerified
    }

    pub fn into_response(self) -> Response {
        self.response
    }
}

/// The host (off-card) end of an SCP03 session.
pub struct HostChannel {
    keys: SessionKeys,
    level: SecurityLevel,
    chain: [u8; BLOCK_LEN],
    counter: u128,
    state: ChannelState,
    /// A wrapped command whose response has not been unwrapped yet.
    pending: bool,
}

impl fmt::Debug for HostChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostChannel")
            .field("level", &self.level)
            .field("state", &self.state)
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl HostChannel {
    /// A channel from session keys the caller derived and whose card
    /// cryptogram it has already checked; next call
    /// [`Self::external_authenticate`].
    pub fn new(keys: SessionKeys, level: SecurityLevel) -> Self {
        Self { keys, level, chain: [0; BLOCK_LEN], counter: 0, state: ChannelState::Initiated, pending: false }
    }

    /// The usual path after INITIALIZE UPDATE: derives the session keys,
    /// checks the card cryptogram, and returns the channel with the
    /// EXTERNAL AUTHENTICATE command to send. Pass keys already diversified
    /// with the response's KDD when the card uses per-card keys.
    pub fn open(
        static_keys: &StaticKeys,
        host_challenge: &[u8; CHALLENGE_LEN],
        init_update: &InitUpdateResponse,
        level: SecurityLevel,
    ) -> Result<(Self, Command), Scp03Error> {
        if level.has_rmac() && !init_update.supports_rmac() {
            return Err(Scp03Error::Unsupported(format!(
                "security level {level} but the card's i parameter {:02X} has no R-MAC support",
                init_update.i_param
            )));
        }
        if level.has_renc() && !init_update.supports_renc() {
            return Err(Scp03Error::Unsupported(format!(
                "security level {level} but the card's i parameter {:02X} has no R-ENCRYPTION support",
                init_update.i_param
            )));
        }
        let cc = &init_update.card_challenge;
        let keys = derive_session_keys(static_keys, host_challenge, cc);
        if !ct_eq(&card_cryptogram(&keys.s_mac, host_challenge, cc), &init_update.card_cryptogram) {
            return Err(Scp03Error::CardCryptogramMismatch);
        }
        let host_cg = host_cryptogram(&keys.s_mac, host_challenge, cc);
        let mut channel = Self::new(keys, level);
        let cmd = channel.external_authenticate(&host_cg)?;
        Ok((channel, cmd))
    }

    /// EXTERNAL AUTHENTICATE (§7.1.2): `84 82 level 00 10 <host cryptogram>
    /// <C-MAC>`, MACed from a zero chaining value (§6.2.3). Its full CMAC
    /// starts the MAC chain and the encryption counter restarts, so the first
    /// following command uses counter 1 (§6.2.6). The card's answer carries
    /// no R-MAC (§6.2.5): check its SW directly, do not [`Self::unwrap`] it.
    /// Allowed once per channel, before any [`Self::wrap`].
    pub fn external_authenticate(&mut self, host_cryptogram: &[u8; CHALLENGE_LEN]) -> Result<Command, Scp03Error> {
        match self.state {
            ChannelState::Initiated => {}
            ChannelState::Open => return Err(Scp03Error::State("is already authenticated")),
            ChannelState::Closed => return Err(Scp03Error::Closed),
        }
        let level = self.level.to_byte();
        let header = [CLA_GP, INS_EXTERNAL_AUTHENTICATE, level, 0x00];
        self.chain = c_mac(&self.keys.s_mac, &[0; BLOCK_LEN], header, host_cryptogram, None);
        self.counter = 0;
        self.pending = false;
        self.state = ChannelState::Open;
        let mut data = host_cryptogram.to_vec();
        data.extend_from_slice(&self.chain[..MAC_LEN]);
        Ok(Command::new(CLA_GP | CLA_SECURE_MESSAGING, INS_EXTERNAL_AUTHENTICATE, level, 0x00).with_data(data))
    }

    pub fn level(&self) -> SecurityLevel {
        self.level
    }

    pub fn state(&self) -> ChannelState {
        self.state
    }

    fn check_open(&self) -> Result<(), Scp03Error> {
        match self.state {
            ChannelState::Open => Ok(()),
            ChannelState::Initiated => Err(Scp03Error::State("is not authenticated yet")),
            ChannelState::Closed => Err(Scp03Error::Closed),
        }
    }

    /// Protects a plain command. At C-DECRYPTION levels the encryption
    /// counter advances for every command, and a command with an empty data
    /// field is sent unencrypted but still consumes a counter value (§6.2.6;
    /// GlobalPlatformPro and pySim do the same — GlobalPlatformPro keeps an
    /// opt-in workaround for cards that get this wrong). Then the C-MAC is
    /// appended (§6.2.4) and CLA gets b3 (`| 04`). Le is kept. Extended
    /// commands work; Lc is then coded on three bytes in the MAC input.
    /// Only logical channels 0–3 (first interindustry CLA) are supported.
    pub fn wrap(&mut self, cmd: &Command) -> Result<Command, Scp03Error> {
        self.check_open()?;
        if cmd.cla & 0x40 != 0 {
            return Err(Scp03Error::Unsupported(format!(
                "CLA {:02X}: secure messaging on logical channels 4-19",
                cmd.cla
            )));
        }
        if cmd.cla & CLA_SM_BITS != 0 {
            return Err(malformed("CLA", format!("{:02X} already indicates secure messaging", cmd.cla)));
        }
        let encrypt = self.level.has_cdec() && !cmd.data.is_empty();
        let body_len = if encrypt { (cmd.data.len() / BLOCK_LEN + 1) * BLOCK_LEN } else { cmd.data.len() };
        if body_len + MAC_LEN > EXTENDED_MAX {
            // Checked before any state changes so the counters stay in step.
            return Err(Scp03Error::TooLong(body_len + MAC_LEN));
        }

        let mut data = Zeroizing::new(cmd.data.clone());
        if self.level.has_cdec() {
            self.counter += 1;
            if encrypt {
                pad80(&mut data);
                let icv = command_icv(&self.keys.s_enc, self.counter);
                self.keys.s_enc.cbc_encrypt(&icv, &mut data);
            }
        }
        let header = [cmd.cla, cmd.ins, cmd.p1, cmd.p2];
        self.chain = c_mac(&self.keys.s_mac, &self.chain, header, &data, cmd.le);
        let mut out = Vec::with_capacity(data.len() + MAC_LEN);
        out.extend_from_slice(&data);
        out.extend_from_slice(&self.chain[..MAC_LEN]);
        self.pending = true;
        Ok(Command { cla: cmd.cla | CLA_SECURE_MESSAGING, ins: cmd.ins, p1: cmd.p1, p2: cmd.p2, data: out, le: cmd.le })
    }

    /// Checks the response to the last wrapped command. At R-MAC levels a
    /// success or warning response (9000, 62xx, 63xx) must end with a
    /// correct R-MAC (first 8 bytes of CMAC(S-RMAC, chaining value ‖ data ‖
    /// SW), §6.2.5), which is stripped; at R-ENCRYPTION level the data is
    /// then decrypted (§6.2.7). Error status words carry no R-MAC and come
    /// back as [`ResponseAuth::ErrorStatus`]. Any R-MAC failure closes the
    /// channel. Give this the complete response (after any 61xx GET RESPONSE
    /// chaining).
    pub fn unwrap(&mut self, resp: Response) -> Result<UnwrappedResponse, Scp03Error> {
        self.check_open()?;
        if !std::mem::take(&mut self.pending) {
            return Err(Scp03Error::State(
                "has no wrapped command awaiting a response (EXTERNAL AUTHENTICATE's response has no R-MAC)",
            ));
        }
        if !self.level.has_rmac() {
            return Ok(UnwrappedResponse { response: resp, auth: ResponseAuth::NotProtected });
        }
        if is_error_status(resp.sw) {
            return Ok(UnwrappedResponse { response: resp, auth: ResponseAuth::ErrorStatus });
        }
        let Some(body_len) = resp.data.len().checked_sub(MAC_LEN) else {
            self.state = ChannelState::Closed;
            return Err(Scp03Error::RMacMissing { sw: resp.sw });
        };
        let (body, mac) = resp.data.split_at(body_len);
        let expected = r_mac(&self.keys.s_rmac, &self.chain, body, resp.sw);
        if !ct_eq(&expected[..MAC_LEN], mac) {
            self.state = ChannelState::Closed;
            return Err(Scp03Error::RMacMismatch);
        }
        let mut data = body.to_vec();
        if self.level.has_renc() && !data.is_empty() {
            if !data.len().is_multiple_of(BLOCK_LEN) {
                self.state = ChannelState::Closed;
                return Err(malformed(
                    "encrypted response data",
                    format!("{} bytes, not a multiple of 16", data.len()),
                ));
            }
            let icv = response_icv(&self.keys.s_enc, self.counter);
            self.keys.s_enc.cbc_decrypt(&icv, &mut data);
            if let Err(e) = unpad80(&mut data, "response data") {
                self.state = ChannelState::Closed;
                return Err(e);
            }
        }
        Ok(UnwrappedResponse { response: Response::new(data, resp.sw), auth: ResponseAuth::RMacVerified })
    }
}

// ---------------------------------------------------------------------------
// Card side

/// The card end of an SCP03 session, for the emulator. One value per
/// INITIALIZE UPDATE; a new INITIALIZE UPDATE replaces it.
pub struct CardChannel {
    keys: SessionKeys,
    key_version: u8,
    host_challenge: [u8; CHALLENGE_LEN],
    card_challenge: [u8; CHALLENGE_LEN],
    level: Option<SecurityLevel>,
    chain: [u8; BLOCK_LEN],
    counter: u128,
    state: ChannelState,
    /// An unwrapped command whose response has not been wrapped yet.
    pending: bool,
}

impl fmt::Debug for CardChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CardChannel")
            .field("key_version", &self.key_version)
            .field("level", &self.level)
            .field("state", &self.state)
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl CardChannel {
    /// Starts a session on INITIALIZE UPDATE: derives the session keys from
    /// the static keys of key set `key_version` and both challenges.
    pub fn new(
        static_keys: &StaticKeys,
        key_version: u8,
        host_challenge: &[u8; CHALLENGE_LEN],
        card_challenge: &[u8; CHALLENGE_LEN],
    ) -> Self {
        Self {
            keys: derive_session_keys(static_keys, host_challenge, card_challenge),
            key_version,
            host_challenge: *host_challenge,
            card_challenge: *card_challenge,
            level: None,
            chain: [0; BLOCK_LEN],
            counter: 0,
            state: ChannelState::Initiated,
            pending: false,
        }
    }

    /// INITIALIZE UPDATE on the card with a random card challenge: the
    /// channel awaiting EXTERNAL AUTHENTICATE and the response data field.
    /// `i_param` bit b5 (10, pseudo-random challenge) is cleared because the
    /// challenge given is random; announce R-MAC support with 20, R-MAC and
    /// R-ENCRYPTION with 60 (§5.1 Table 5-1).
    pub fn initialize_update(
        static_keys: &StaticKeys,
        kdd: [u8; 10],
        key_version: u8,
        i_param: u8,
        host_challenge: &[u8; CHALLENGE_LEN],
        card_challenge: [u8; CHALLENGE_LEN],
    ) -> (Self, Vec<u8>) {
        let channel = Self::new(static_keys, key_version, host_challenge, &card_challenge);
        let data = channel.init_update_response(&kdd, i_param, None).to_bytes();
        (channel, data)
    }

    /// The INITIALIZE UPDATE response for this session. `i_param` bit b5
    /// (pseudo-random challenge) is set exactly when `sequence_counter` is
    /// given, so the encoding is always self-consistent; with a counter the
    /// card challenge should come from [`pseudo_random_card_challenge`].
    pub fn init_update_response(
        &self,
        kdd: &[u8; 10],
        i_param: u8,
        sequence_counter: Option<[u8; 3]>,
    ) -> InitUpdateResponse {
        let pr = if sequence_counter.is_some() { I_PSEUDO_RANDOM_CHALLENGE } else { 0 };
        InitUpdateResponse {
            kdd: *kdd,
            key_version: self.key_version,
            i_param: (i_param & !I_PSEUDO_RANDOM_CHALLENGE) | pr,
            card_challenge: self.card_challenge,
            card_cryptogram: card_cryptogram(&self.keys.s_mac, &self.host_challenge, &self.card_challenge),
            sequence_counter,
        }
    }

    pub fn level(&self) -> Option<SecurityLevel> {
        self.level
    }

    pub fn state(&self) -> ChannelState {
        self.state
    }

    /// The key set version this session was opened with; that set's static
    /// Key-DEK decrypts PUT KEY data (§6.2.8).
    pub fn key_version(&self) -> u8 {
        self.key_version
    }

    /// Aborts the session (e.g. the emulator saw a SELECT).
    pub fn close(&mut self) {
        self.state = ChannelState::Closed;
        self.level = None;
        self.pending = false;
    }

    fn fail(&mut self, e: Scp03Error) -> Scp03Error {
        self.close();
        e
    }

    /// Checks EXTERNAL AUTHENTICATE: C-MAC from a zero chaining value
    /// (§6.2.3) and the host cryptogram (§6.2.2.3). Any failure closes the
    /// session (§5.2: authentication restarts from INITIALIZE UPDATE). On
    /// success the full CMAC becomes the chaining value and the session is
    /// open at the returned level. Answer with a plain 9000: this response
    /// carries no R-MAC (§6.2.5), which [`Self::wrap_response`] respects.
    pub fn verify_external_authenticate(&mut self, cmd: &Command) -> Result<SecurityLevel, Scp03Error> {
        match self.state {
            ChannelState::Initiated => {}
            ChannelState::Open => return Err(self.fail(Scp03Error::State("is already authenticated"))),
            ChannelState::Closed => return Err(Scp03Error::Closed),
        }
        if cmd.ins != INS_EXTERNAL_AUTHENTICATE {
            let e = malformed("EXTERNAL AUTHENTICATE", format!("INS {:02X}, expected 82", cmd.ins));
            return Err(self.fail(e));
        }
        if cmd.cla & CLA_SM_BITS != CLA_SECURE_MESSAGING {
            return Err(self.fail(Scp03Error::Unprotected));
        }
        if cmd.data.len() != CHALLENGE_LEN + MAC_LEN {
            let e = malformed(
                "EXTERNAL AUTHENTICATE data",
                format!("{} bytes, expected 16 (host cryptogram and C-MAC)", cmd.data.len()),
            );
            return Err(self.fail(e));
        }
        let level = match SecurityLevel::from_byte(cmd.p1) {
            Ok(level) => level,
            Err(e) => return Err(self.fail(e)),
        };
        if cmd.p2 != 0x00 {
            let e = malformed("EXTERNAL AUTHENTICATE P2", format!("{:02X}, expected 00", cmd.p2));
            return Err(self.fail(e));
        }
        let (cryptogram, mac) = cmd.data.split_at(CHALLENGE_LEN);
        let header = [cmd.cla, cmd.ins, cmd.p1, cmd.p2];
        let expected_mac = c_mac(&self.keys.s_mac, &[0; BLOCK_LEN], header, cryptogram, cmd.le);
        if !ct_eq(&expected_mac[..MAC_LEN], mac) {
            return Err(self.fail(Scp03Error::CMacMismatch));
        }
        let expected = host_cryptogram(&self.keys.s_mac, &self.host_challenge, &self.card_challenge);
        if !ct_eq(&expected, cryptogram) {
            return Err(self.fail(Scp03Error::BadHostCryptogram));
        }
        self.chain = expected_mac;
        self.counter = 0;
        self.level = Some(level);
        self.state = ChannelState::Open;
        self.pending = false;
        Ok(level)
    }

    /// Verifies and strips the C-MAC, decrypts the data at C-DECRYPTION
    /// levels (the counter advances for every command, empty data or not,
    /// §6.2.6) and returns the plain command with CLA b3 cleared. Every
    /// command must carry secure messaging once the session is open (§5.6);
    /// any security error closes the session and later commands get
    /// [`Scp03Error::Closed`].
    pub fn unwrap_command(&mut self, cmd: &Command) -> Result<Command, Scp03Error> {
        let level = match (self.state, self.level) {
            (ChannelState::Open, Some(level)) => level,
            (ChannelState::Closed, _) => return Err(Scp03Error::Closed),
            _ => return Err(Scp03Error::State("is not authenticated yet")),
        };
        self.pending = false;
        if cmd.cla & 0x40 != 0 {
            let e = Scp03Error::Unsupported(format!("CLA {:02X}: secure messaging on logical channels 4-19", cmd.cla));
            return Err(self.fail(e));
        }
        if cmd.cla & CLA_SM_BITS != CLA_SECURE_MESSAGING {
            return Err(self.fail(Scp03Error::Unprotected));
        }
        let Some(body_len) = cmd.data.len().checked_sub(MAC_LEN) else {
            let e = malformed("command data", format!("{} bytes, too short for the 8-byte C-MAC", cmd.data.len()));
            return Err(self.fail(e));
        };
        let (body, mac) = cmd.data.split_at(body_len);
        let header = [cmd.cla, cmd.ins, cmd.p1, cmd.p2];
        let expected = c_mac(&self.keys.s_mac, &self.chain, header, body, cmd.le);
        if !ct_eq(&expected[..MAC_LEN], mac) {
            return Err(self.fail(Scp03Error::CMacMismatch));
        }
        self.chain = expected;
        let mut data = body.to_vec();
        if level.has_cdec() {
            self.counter += 1;
            if !data.is_empty() {
                if !data.len().is_multiple_of(BLOCK_LEN) {
                    let e = malformed("encrypted command data", format!("{} bytes, not a multiple of 16", data.len()));
                    return Err(self.fail(e));
                }
                let icv = command_icv(&self.keys.s_enc, self.counter);
                self.keys.s_enc.cbc_decrypt(&icv, &mut data);
                if let Err(e) = unpad80(&mut data, "command data") {
                    return Err(self.fail(e));
                }
            }
        }
        self.pending = true;
        Ok(Command { cla: cmd.cla & !CLA_SECURE_MESSAGING, ins: cmd.ins, p1: cmd.p1, p2: cmd.p2, data, le: cmd.le })
    }

    /// Protects the response to the last unwrapped command: at R-MAC levels
    /// a 9000/62xx/63xx response gets its data encrypted (R-ENCRYPTION level,
    /// non-empty data, §6.2.7) and the R-MAC appended (§6.2.5); an error SW
    /// is returned alone, without data or R-MAC. Responses to anything else
    /// (EXTERNAL AUTHENTICATE, rejected commands) pass through unchanged.
    pub fn wrap_response(&mut self, resp: Response) -> Response {
        let pending = std::mem::take(&mut self.pending);
        let level = match (self.state, self.level) {
            (ChannelState::Open, Some(level)) if pending => level,
            _ => return resp,
        };
        if !level.has_rmac() {
            return resp;
        }
        if is_error_status(resp.sw) {
            return Response::status(resp.sw);
        }
        let mut data = resp.data;
        if level.has_renc() && !data.is_empty() {
            pad80(&mut data);
            let icv = response_icv(&self.keys.s_enc, self.counter);
            self.keys.s_enc.cbc_encrypt(&icv, &mut data);
        }
        let mac = r_mac(&self.keys.s_rmac, &self.chain, &data, resp.sw);
        data.extend_from_slice(&mac[..MAC_LEN]);
        Response::new(data, resp.sw)
    }
}

// ---------------------------------------------------------------------------
// PUT KEY (§7.2, GP Card Specification §11.8)

/// PUT KEY data field replacing or creating a whole AES-128 key set: new key
/// version number, then for ENC, MAC, DEK (key ids 1, 2, 3) the AES key data
/// of Table 7-10:
///
/// ```text
/// 88 (AES) ‖ 11 (length of what follows up to the KCV) ‖ 10 (key length)
///   ‖ AES-CBC(Key-DEK, ICV = 0, key) (16 bytes) ‖ 03 ‖ KCV (3 bytes)
/// ```
///
/// `dek` is the static Key-DEK of the key set the session was opened with
/// (§6.2.8: SCP03 has no session DEK). 16-byte keys need no padding.
pub fn put_key_data(new_kvn: u8, keys: &StaticKeys, dek: &AesKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 3 * 23);
    out.push(new_kvn);
    for role in KeyRole::ALL {
        let key = keys.get(role);
        let mut block = Zeroizing::new(*key.as_bytes());
        dek.cbc_encrypt(&[0; BLOCK_LEN], &mut *block);
        out.extend_from_slice(&[KEY_TYPE_AES, 1 + AES128_KEY_LEN as u8, AES128_KEY_LEN as u8]);
        out.extend_from_slice(&*block);
        out.push(3);
        out.extend_from_slice(&key.kcv());
    }
    out
}

/// The card-side inverse of [`put_key_data`]: decrypts the three keys with
/// the static Key-DEK and checks each against its KCV.
pub fn parse_put_key_data(data: &[u8], dek: &AesKey) -> Result<(u8, StaticKeys), Scp03Error> {
    const FIELD: &str = "PUT KEY key data";
    let mut r = Reader::new(data, "PUT KEY data field");
    let kvn = r.byte("new key version number")?;
    let mut keys: Vec<AesKey> = Vec::with_capacity(3);
    for role in KeyRole::ALL {
        let key_type = r.byte("key type")?;
        if key_type != KEY_TYPE_AES {
            return Err(malformed(FIELD, format!("{role} key type {key_type:02X}, expected 88 (AES)")));
        }
        let len = r.byte("key data length")?;
        let key_len = r.byte("key length")?;
        if len != 1 + AES128_KEY_LEN as u8 || key_len != AES128_KEY_LEN as u8 {
            return Err(malformed(
                FIELD,
                format!("{role} key lengths {len:02X}/{key_len:02X}, expected 11/10 (AES-128)"),
            ));
        }
        let mut block = Zeroizing::new(r.take::<AES128_KEY_LEN>("encrypted key")?);
        dek.cbc_decrypt(&[0; BLOCK_LEN], &mut *block);
        let key = AesKey::new(*block);
        let kcv_len = r.byte("key check value length")?;
        if kcv_len != 3 {
            return Err(malformed(FIELD, format!("{role} KCV length {kcv_len:02X}, expected 03")));
        }
        let kcv = r.take::<3>("key check value")?;
        if !ct_eq(&key.kcv(), &kcv) {
            return Err(Scp03Error::KcvMismatch { role });
        }
        keys.push(key);
    }
    r.finish()?;
    let [enc, mac, dek]: [AesKey; 3] = keys.try_into().map_err(|_| malformed(FIELD, "expected three keys"))?;
    Ok((kvn, StaticKeys { enc, mac, dek }))
}

/// PUT KEY (GP Card Specification §11.8): `80 D8 P1 81 Lc data 00`, P1 = the
/// key version being replaced, or 00 to add a new key set; P2 = 81 (several
/// keys, starting with key id 1). Send it through [`HostChannel::wrap`].
pub fn put_key(old_kvn: u8, data: Vec<u8>) -> Command {
    Command::new(CLA_GP, INS_PUT_KEY, old_kvn, PUT_KEY_P2_MULTIPLE_FROM_1).with_data(data).with_le(SHORT_MAX_LE)
}

/// The PUT KEY response data a card returns for a stored key set: the key
/// version number followed by the KCVs in key id order (GP Card
/// Specification §11.8.3).
pub fn put_key_response(new_kvn: u8, keys: &StaticKeys) -> Vec<u8> {
    let mut out = vec![new_kvn];
    for kcv in keys.kcvs() {
        out.extend_from_slice(&kcv);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gp::keys::Diversification;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s.replace(' ', "")).expect("test hex")
    }

    fn key(s: &str) -> AesKey {
        AesKey::from_hex(s).expect("test key")
    }

    fn cmd(s: &str) -> Command {
        Command::parse(&h(s)).expect("test APDU")
    }

    fn bytes(c: &Command) -> String {
        hex::encode(c.to_bytes().expect("encodes"))
    }

    // ---- Known answers ----------------------------------------------------

    /// GlobalPlatformPro, library/src/test/java/pro/javacard/gp/test/TestPlaintextKeys.java,
    /// testSessionKeys_SCP03: static keys 404142…4F, KDF context = 00010203040506070809;
    /// session key KCVs S-ENC C25559, S-MAC 0E12CC, S-RMAC 9ACB9C.
    #[test]
    fn kdf_session_keys_match_globalplatformpro() {
        let k = StaticKeys::gp_default();
        let ctx = h("00010203040506070809");
        let s_enc = AesKey::new(*kdf::<16>(&k.enc, DerivationConstant::SEnc, &ctx));
        let s_mac = AesKey::new(*kdf::<16>(&k.mac, DerivationConstant::SMac, &ctx));
        let s_rmac = AesKey::new(*kdf::<16>(&k.mac, DerivationConstant::SRmac, &ctx));
        assert_eq!(s_enc.kcv(), [0xC2, 0x55, 0x59]);
        assert_eq!(s_mac.kcv(), [0x0E, 0x12, 0xCC]);
        assert_eq!(s_rmac.kcv(), [0x9A, 0xCB, 0x9C]);
    }

    /// A complete SCP03 session from osmocom/pysim
    /// tests/unittests/test_globalplatform.py (class SCP03_Test and its AES-128
    /// subclasses): keys ENC 000102…0F, MAC 101112…1F, DEK 202122…2F, KVN 30.
    /// The test methods there run in name order on one SCP03 object, so the
    /// commands below are one MAC chain: GET EID, its response, then cases 1–4.
    struct PysimTrace {
        init_upd_cmd: &'static str,
        init_upd_rsp: &'static str,
        ext_auth_cmd: &'static str,
        get_eid_cmd: &'static str,
        get_eid_rsp: &'static str, // without the SW, which is 9000
        cases: [&'static str; 4],
    }

    const PYSIM_PLAIN_GET_EID: &str = "80E2910006BF3E035C015A00";
    const PYSIM_PLAIN_EID_RSP: &str = "bf3e125a1089882119900000000000000000000005";
    const PYSIM_PLAIN_CASES: [&str; 4] =
        ["80F22002", "80ca006600", "80F220020a4f0212345c054f9f70c5", "80f28002024f0000"];

    const PYSIM_AES128_11: PysimTrace = PysimTrace {
        init_upd_cmd: "8050300008b13e5f938fc108c400",
        init_upd_rsp: "000000000000000000003003703eb51047495b249f66c484c1d2ef1948000002",
        ext_auth_cmd: "84821100107d5f5826a993ebc89eea24957fa0b3ce",
        get_eid_cmd: "84e291000ebf3e035c015a558d036518a2829700",
        get_eid_rsp: "bf3e125a1089882119900000000000000000000005971be68992dbbdfa",
        cases: [
            "84f220020863a63f8959827fb2",
            "84ca006608a0c6a4a74166f7ce00",
            "84f22002124f0212345c054f9f70c52249b50272656536",
            "84f280020a4f00e91443f6dce6b8ed00",
        ],
    };

    const PYSIM_AES128_03: PysimTrace = PysimTrace {
        init_upd_cmd: "80503000088e1552d0513c60f300",
        init_upd_rsp: "0000000000000000000030037030760cd2c47c1dd395065fe5ead8a9d7000001",
        ext_auth_cmd: "8482030010fd4721a14d9b07003c451d2f8ae6bb21",
        get_eid_cmd: "84e2910018ca9c00f6713d79bc8baa642bdff51c3f6a4082d3bd9ad26c00",
        get_eid_rsp: "bf3e125a1089882119900000000000000000000005",
        cases: [
            "84f2200208c9811b11f1264cf1",
            "84ca006608e10ab60b3054798800",
            "84f22002184e2908bdb48b2315a55482e9e936ca122d6ecfae7d17416e",
            "84f28002180dd10a6b6193e5340b9e77d32d5a179cd710ac2773aefb2800",
        ],
    };

    const PYSIM_AES128_33: PysimTrace = PysimTrace {
        init_upd_cmd: "8050300008fdf38259a1e0de4400",
        init_upd_rsp: "000000000000000000003003703b1aca81e821f219081cdc01c26b372d000003",
        ext_auth_cmd: "84823300108c36f96bcc00724a4e13ad591d7da3f0",
        get_eid_cmd: "84e2910018267a85dfe4a98fca6fb0527e0dfecce4914e40401433c87f00",
        get_eid_rsp: "f3ba2b1013aa6224f5e1c138d71805c569e5439b47576260b75fc021b25097cb2e68f8a0144975b9",
        cases: [
            "84f2200208ac6a59024bed84cc",
            "84ca006608409912ad8fb7aed000",
            "84f22002185f3dafc3ac14c381536a488bf44e06d056df9d74dbd21e5a",
            "84f280021865165105be3373347d0424d4400af2ac393f569ec779389e00",
        ],
    };

    fn pysim_keys() -> StaticKeys {
        StaticKeys::new(
            key("000102030405060708090a0b0c0d0e0f"),
            key("101112131415161718191a1b1c1d1e1f"),
            key("202122232425262728292a2b2c2d2e2f"),
        )
    }

    fn run_pysim_trace(t: &PysimTrace) {
        let keys = pysim_keys();
        let iu_cmd = cmd(t.init_upd_cmd);
        let hc: [u8; 8] = iu_cmd.data.clone().try_into().expect("8-byte host challenge");
        assert_eq!(bytes(&initialize_update(0x30, &hc)), t.init_upd_cmd);

        // Host side.
        let iu = InitUpdateResponse::parse(&h(t.init_upd_rsp)).expect("parses");
        assert_eq!(iu.to_bytes(), h(t.init_upd_rsp));
        let level = SecurityLevel::from_byte(cmd(t.ext_auth_cmd).p1).expect("level");
        let (mut host, ea) = HostChannel::open(&keys, &hc, &iu, level).expect("card cryptogram");
        assert_eq!(bytes(&ea), t.ext_auth_cmd);
        let wrapped = host.wrap(&cmd(PYSIM_PLAIN_GET_EID)).expect("wraps");
        assert_eq!(bytes(&wrapped), t.get_eid_cmd);
        let rsp = host.unwrap(Response::new(h(t.get_eid_rsp), StatusWord::OK)).expect("R-MAC");
        assert_eq!(rsp.response, Response::ok(h(PYSIM_PLAIN_EID_RSP)));
        assert_eq!(rsp.is_authenticated(), level.has_rmac());
        for (plain, expected) in PYSIM_PLAIN_CASES.iter().zip(t.cases) {
            assert_eq!(bytes(&host.wrap(&cmd(plain)).expect("wraps")), expected, "{plain}");
        }

        // Card side, replaying the same session.
        let mut card = CardChannel::new(&keys, iu.key_version, &hc, &iu.card_challenge);
        let resp = card.init_update_response(&iu.kdd, iu.i_param, iu.sequence_counter);
        assert_eq!(resp.to_bytes(), h(t.init_upd_rsp));
        assert_eq!(card.verify_external_authenticate(&cmd(t.ext_auth_cmd)), Ok(level));
        let plain = card.unwrap_command(&cmd(t.get_eid_cmd)).expect("C-MAC ok");
        assert_eq!(plain, cmd(PYSIM_PLAIN_GET_EID));
        let protected = card.wrap_response(Response::ok(h(PYSIM_PLAIN_EID_RSP)));
        assert_eq!(protected, Response::new(h(t.get_eid_rsp), StatusWord::OK));
        for (plain, wrapped) in PYSIM_PLAIN_CASES.iter().zip(t.cases) {
            assert_eq!(card.unwrap_command(&cmd(wrapped)).expect("C-MAC ok"), cmd(plain));
        }
    }

    #[test]
    fn pysim_trace_aes128_cmac_rmac() {
        run_pysim_trace(&PYSIM_AES128_11);
    }

    /// Exercises the encryption counter advancing on the data-less cases 1
    /// and 2 before the encrypted cases 3 and 4 (§6.2.6).
    #[test]
    fn pysim_trace_aes128_cmac_cdec() {
        run_pysim_trace(&PYSIM_AES128_03);
    }

    #[test]
    fn pysim_trace_aes128_full_with_renc() {
        run_pysim_trace(&PYSIM_AES128_33);
    }

    /// The pySim traces use pseudo-random challenges (i = 70, sequence
    /// counters 000002, 000001, 000003). Their card challenges reproduce with
    /// §6.2.2.1 and context = counter ‖ AID, taking the AID to be the SGP.22
    /// ISD-R A0000005591010FFFFFFFF8900000100 (an inference: the traces send
    /// GET EID, an ISD-R command; all three sessions match).
    #[test]
    fn pysim_pseudo_random_card_challenges() {
        let enc = pysim_keys().enc;
        let isd_r = h("A0000005591010FFFFFFFF8900000100");
        for t in [&PYSIM_AES128_11, &PYSIM_AES128_03, &PYSIM_AES128_33] {
            let iu = InitUpdateResponse::parse(&h(t.init_upd_rsp)).expect("parses");
            assert!(iu.pseudo_random_challenge() && iu.supports_renc());
            let seq = iu.sequence_counter.expect("counter present");
            assert_eq!(pseudo_random_card_challenge(&enc, &seq, &isd_r), iu.card_challenge);
        }
    }

    #[test]
    fn pysim_card_cryptogram_mismatch_detected() {
        let t = &PYSIM_AES128_11;
        let hc: [u8; 8] = cmd(t.init_upd_cmd).data.try_into().expect("8");
        let mut iu = InitUpdateResponse::parse(&h(t.init_upd_rsp)).expect("parses");
        iu.card_cryptogram[7] ^= 0xFF;
        let err = HostChannel::open(&pysim_keys(), &hc, &iu, SecurityLevel::CMacRMac).err();
        assert_eq!(err, Some(Scp03Error::CardCryptogramMismatch));
        // Wrong keys too.
        iu.card_cryptogram[7] ^= 0xFF;
        let err = HostChannel::open(&StaticKeys::gp_default(), &hc, &iu, SecurityLevel::CMac).err();
        assert_eq!(err, Some(Scp03Error::CardCryptogramMismatch));
    }

    // ---- Round trips ------------------------------------------------------

    const HC: [u8; 8] = [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88];
    const CC: [u8; 8] = [0xA1, 0xB2, 0xC3, 0xD4, 0xE5, 0xF6, 0x07, 0x18];
    const KDD: [u8; 10] = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0];

    /// Runs INITIALIZE UPDATE / EXTERNAL AUTHENTICATE between the two sides.
    fn establish(level: SecurityLevel) -> (HostChannel, CardChannel) {
        let master = StaticKeys::gp_default();
        let card_keys = master.diversify(Diversification::Kdf3, &KDD);
        let iu_cmd = initialize_update(0x30, &HC);
        let (mut card, iu_bytes) = CardChannel::initialize_update(&card_keys, KDD, 0x30, I_RMAC | I_RENC, &HC, CC);
        assert_eq!(card.key_version(), 0x30);
        assert_eq!(iu_bytes[12], I_RMAC | I_RENC);
        assert_eq!(iu_bytes.len(), InitUpdateResponse::LEN);
        let iu = InitUpdateResponse::parse(&iu_bytes).expect("parses");
        let host_keys = master.diversify(Diversification::Kdf3, &iu.kdd);
        let hc: [u8; 8] = iu_cmd.data.try_into().expect("8");
        let (host, ea) = HostChannel::open(&host_keys, &hc, &iu, level).expect("opens");
        // Over the wire and back.
        let ea = Command::parse(&ea.to_bytes().expect("encodes")).expect("parses");
        assert_eq!(card.verify_external_authenticate(&ea), Ok(level));
        assert_eq!(card.wrap_response(Response::ok(vec![])), Response::ok(vec![]));
        (host, card)
    }

    /// One command/response exchange, through the APDU byte encodings.
    fn exchange(host: &mut HostChannel, card: &mut CardChannel, plain: &Command, reply: Response) -> UnwrappedResponse {
        let wire = host.wrap(plain).expect("wraps").to_bytes().expect("encodes");
        let received = card.unwrap_command(&Command::parse(&wire).expect("parses")).expect("verifies");
        assert_eq!(&received, plain);
        let rsp_wire = card.wrap_response(reply).to_bytes();
        host.unwrap(Response::parse(&rsp_wire).expect("parses")).expect("R-MAC")
    }

    #[test]
    fn round_trip_every_level() {
        let commands = [
            Command::new(0x80, 0xF2, 0x20, 0x02),                           // case 1
            Command::new(0x80, 0xCA, 0x00, 0x66).with_le(256),              // case 2
            Command::new(0x80, 0xE2, 0x90, 0x00).with_data(vec![0x5A; 16]), // case 3, block-aligned
            Command::new(0x80, 0xE2, 0x90, 0x00).with_data(vec![1, 2, 3]).with_le(0x20), // case 4
            Command::new(0x00, 0xA4, 0x04, 0x00).with_data(vec![0xA0; 7]),  // ISO CLA 00
            Command::new(0x81, 0xE2, 0x90, 0x00).with_data(vec![7; 5]),     // logical channel 1
            Command::new(0x80, 0xE8, 0x00, 0x00).with_data(vec![0xC4; 600]).with_le(1000), // extended
            Command::new(0x80, 0xE8, 0x00, 0x00).with_data(vec![0xC4; 240]), // 240+16+8: goes extended
            Command::new(0x80, 0xCA, 0x9F, 0x7F).with_le(65_536),           // extended Le only
            Command::new(0x80, 0xE8, 0x00, 0x00).with_data(vec![0x33; 65_000]), // large extended
        ];
        let replies = [
            Response::ok(vec![]),
            Response::ok(vec![0x42; 31]),
            Response::new(vec![0x10; 16], StatusWord::new(0x63, 0xC2)),
            Response::new(vec![], StatusWord::new(0x62, 0x83)),
            Response::ok(vec![0xEE; 500]),
        ];
        for level in SecurityLevel::ALL {
            let (mut host, mut card) = establish(level);
            for (i, c) in commands.iter().enumerate() {
                let reply = replies[i % replies.len()].clone();
                let got = exchange(&mut host, &mut card, c, reply.clone());
                assert_eq!(got.response, reply, "{level} command {i}");
                assert_eq!(got.is_authenticated(), level.has_rmac(), "{level}");
                let expect_auth =
                    if level.has_rmac() { ResponseAuth::RMacVerified } else { ResponseAuth::NotProtected };
                assert_eq!(got.auth, expect_auth);
            }
            assert_eq!(host.counter, card.counter, "{level}");
            let expected_counter = if level.has_cdec() { commands.len() as u128 } else { 0 };
            assert_eq!(host.counter, expected_counter, "counter advances per command incl. empty ones");
        }
    }

    #[test]
    fn wrapped_encoding_details() {
        let (mut host, _) = establish(SecurityLevel::CMacCDec);
        let w = host.wrap(&Command::new(0x80, 0xF2, 0x20, 0x02)).expect("wraps");
        // Empty data: no encryption, just the C-MAC; CLA gets b3.
        assert_eq!((w.cla, w.data.len(), w.le), (0x84, 8, None));
        let w = host.wrap(&Command::new(0x81, 0xE2, 0, 0).with_data(vec![0; 16]).with_le(256)).expect("wraps");
        // 16 bytes pad to 32 (method 2 always adds 80), plus the MAC; channel bits kept.
        assert_eq!((w.cla, w.data.len(), w.le), (0x85, 40, Some(256)));
        let w = host.wrap(&Command::new(0x80, 0xE8, 0, 0).with_data(vec![0; 300])).expect("wraps");
        assert!(w.is_extended());
        assert_eq!(w.data.len(), 304 + 8);
        let too_big = Command::new(0x80, 0xE8, 0, 0).with_data(vec![0; 65_520]);
        assert_eq!(host.wrap(&too_big), Err(Scp03Error::TooLong(65_536 + 8)));
        assert_eq!(host.counter, 3, "a rejected command does not consume a counter value");
    }

    // ---- Tampering and status words ----------------------------------------

    #[test]
    fn tampered_c_mac_closes_the_card_channel() {
        for level in SecurityLevel::ALL {
            let (mut host, mut card) = establish(level);
            let mut w = host.wrap(&Command::new(0x80, 0xE2, 0, 0).with_data(vec![1, 2, 3])).expect("wraps");
            let last = w.data.len() - 1;
            w.data[last] ^= 0x01;
            assert_eq!(card.unwrap_command(&w), Err(Scp03Error::CMacMismatch));
            assert_eq!(card.state(), ChannelState::Closed);
            let next = host.wrap(&Command::new(0x80, 0xF2, 0x20, 0x02)).expect("wraps");
            assert_eq!(card.unwrap_command(&next), Err(Scp03Error::Closed));
        }
    }

    #[test]
    fn tampered_header_or_data_or_order_rejected() {
        let (mut host, mut card) = establish(SecurityLevel::CMacCDec);
        let mut w = host.wrap(&Command::new(0x80, 0xE2, 0x90, 0).with_data(vec![9; 20])).expect("wraps");
        w.p1 = 0x80;
        assert_eq!(card.unwrap_command(&w), Err(Scp03Error::CMacMismatch));

        let (mut host, mut card) = establish(SecurityLevel::CMac);
        let mut w = host.wrap(&Command::new(0x80, 0xE2, 0x90, 0).with_data(vec![9; 20])).expect("wraps");
        w.data[0] ^= 0x80;
        assert_eq!(card.unwrap_command(&w), Err(Scp03Error::CMacMismatch));

        // Replaying or skipping a command breaks the MAC chain.
        let (mut host, mut card) = establish(SecurityLevel::CMac);
        let first = host.wrap(&Command::new(0x80, 0xF2, 0x20, 0x02)).expect("wraps");
        card.unwrap_command(&first).expect("first is fine");
        assert_eq!(card.unwrap_command(&first), Err(Scp03Error::CMacMismatch));

        // Unprotected command in an open session.
        let (_, mut card) = establish(SecurityLevel::CMac);
        assert_eq!(card.unwrap_command(&Command::new(0x80, 0xF2, 0x20, 0x02)), Err(Scp03Error::Unprotected));
        assert_eq!(card.state(), ChannelState::Closed);
    }

    #[test]
    fn bad_host_cryptogram_or_ea_mac_rejected() {
        let keys = StaticKeys::gp_default();
        let session = derive_session_keys(&keys, &HC, &CC);
        let good = host_cryptogram(&session.s_mac, &HC, &CC);

        let mut wrong = good;
        wrong[0] ^= 1;
        let mut host = HostChannel::new(session.clone(), SecurityLevel::CMac);
        let ea = host.external_authenticate(&wrong).expect("fresh channel"); // correctly MACed, wrong cryptogram
        let mut card = CardChannel::new(&keys, 0x30, &HC, &CC);
        assert_eq!(card.verify_external_authenticate(&ea), Err(Scp03Error::BadHostCryptogram));
        assert_eq!(card.state(), ChannelState::Closed);
        assert_eq!(card.verify_external_authenticate(&ea), Err(Scp03Error::Closed));

        let mut host = HostChannel::new(session.clone(), SecurityLevel::CMac);
        let mut ea = host.external_authenticate(&good).expect("fresh channel");
        ea.data[15] ^= 1;
        let mut card = CardChannel::new(&keys, 0x30, &HC, &CC);
        assert_eq!(card.verify_external_authenticate(&ea), Err(Scp03Error::CMacMismatch));

        // The level byte is MACed: downgrading it is caught.
        let mut host = HostChannel::new(session, SecurityLevel::CMacCDecRMac);
        let mut ea = host.external_authenticate(&good).expect("fresh channel");
        ea.p1 = 0x01;
        let mut card = CardChannel::new(&keys, 0x30, &HC, &CC);
        assert_eq!(card.verify_external_authenticate(&ea), Err(Scp03Error::CMacMismatch));
    }

    #[test]
    fn tampered_r_mac_rejected_and_closes_host() {
        for level in [SecurityLevel::CMacRMac, SecurityLevel::CMacCDecRMac, SecurityLevel::CMacCDecRMacREnc] {
            let (mut host, mut card) = establish(level);
            let w = host.wrap(&Command::new(0x80, 0xCA, 0, 0x66).with_le(256)).expect("wraps");
            card.unwrap_command(&w).expect("ok");
            let mut r = card.wrap_response(Response::ok(vec![1, 2, 3]));
            r.data[0] ^= 0x01;
            assert_eq!(host.unwrap(r), Err(Scp03Error::RMacMismatch));
            assert_eq!(host.state(), ChannelState::Closed);
            assert_eq!(host.wrap(&Command::new(0x80, 0xF2, 0, 0)), Err(Scp03Error::Closed));

            // A success SW with no room for an R-MAC.
            let (mut host, _) = establish(level);
            host.wrap(&Command::new(0x80, 0xF2, 0, 0)).expect("wraps");
            assert_eq!(host.unwrap(Response::ok(vec![1, 2])), Err(Scp03Error::RMacMissing { sw: StatusWord::OK }));

            // A forged warning SW (62xx/63xx must carry an R-MAC).
            let (mut host, mut card) = establish(level);
            let w = host.wrap(&Command::new(0x80, 0xF2, 0, 0)).expect("wraps");
            card.unwrap_command(&w).expect("ok");
            let mut r = card.wrap_response(Response::ok(vec![]));
            r.sw = StatusWord::new(0x63, 0x00);
            assert_eq!(host.unwrap(r), Err(Scp03Error::RMacMismatch));
        }
    }

    #[test]
    fn error_status_word_is_unauthenticated() {
        for level in SecurityLevel::ALL {
            let (mut host, mut card) = establish(level);
            let got = exchange(
                &mut host,
                &mut card,
                &Command::new(0x80, 0xE4, 0, 0).with_data(vec![0x4F, 0]),
                Response::new(vec![0xDE, 0xAD], StatusWord::REFERENCED_DATA_NOT_FOUND),
            );
            // §6.2.5: the card returns the SW alone; the host accepts it unauthenticated.
            let expected_data = if level.has_rmac() { vec![] } else { vec![0xDE, 0xAD] };
            assert_eq!(got.response, Response::new(expected_data, StatusWord::REFERENCED_DATA_NOT_FOUND));
            assert!(!got.is_authenticated());
            let expect_auth = if level.has_rmac() { ResponseAuth::ErrorStatus } else { ResponseAuth::NotProtected };
            assert_eq!(got.auth, expect_auth);
            // The session goes on.
            let got = exchange(&mut host, &mut card, &Command::new(0x80, 0xF2, 0, 0), Response::ok(vec![5]));
            assert_eq!(got.response, Response::ok(vec![5]));
        }
        assert!(is_error_status(StatusWord::SECURITY_STATUS));
        assert!(is_error_status(StatusWord::new(0x61, 0x10)));
        assert!(!is_error_status(StatusWord::new(0x62, 0x83)));
        assert!(!is_error_status(StatusWord::new(0x63, 0xC1)));
        assert!(!is_error_status(StatusWord::OK));
    }

    #[test]
    fn state_misuse_is_reported() {
        let (mut host, _) = establish(SecurityLevel::CMacRMac);
        // No wrapped command yet: the EXTERNAL AUTHENTICATE response must not be unwrapped.
        assert!(matches!(host.unwrap(Response::ok(vec![])), Err(Scp03Error::State(_))));
        let session = derive_session_keys(&StaticKeys::gp_default(), &HC, &CC);
        let mut fresh = HostChannel::new(session, SecurityLevel::CMac);
        assert!(matches!(fresh.wrap(&Command::new(0x80, 0xF2, 0, 0)), Err(Scp03Error::State(_))));
        let mut card = CardChannel::new(&StaticKeys::gp_default(), 0x30, &HC, &CC);
        assert!(matches!(card.unwrap_command(&Command::new(0x84, 0xF2, 0, 0)), Err(Scp03Error::State(_))));
        let (mut host, _) = establish(SecurityLevel::CMac);
        assert!(matches!(host.wrap(&Command::new(0x84, 0xF2, 0, 0)), Err(Scp03Error::Malformed { .. })));
        assert!(matches!(host.wrap(&Command::new(0x88, 0xF2, 0, 0)), Err(Scp03Error::Malformed { .. })));
        assert!(matches!(host.wrap(&Command::new(0xC0, 0xF2, 0, 0)), Err(Scp03Error::Unsupported(_))));
    }

    #[test]
    fn host_refuses_levels_the_card_does_not_offer() {
        let keys = StaticKeys::gp_default();
        let card = CardChannel::new(&keys, 0x30, &HC, &CC);
        let iu = card.init_update_response(&KDD, 0x00, None);
        let err = HostChannel::open(&keys, &HC, &iu, SecurityLevel::CMacRMac).err();
        assert!(matches!(err, Some(Scp03Error::Unsupported(_))), "{err:?}");
        let iu = card.init_update_response(&KDD, I_RMAC, None);
        assert!(HostChannel::open(&keys, &HC, &iu, SecurityLevel::CMacCDecRMac).is_ok());
        let err = HostChannel::open(&keys, &HC, &iu, SecurityLevel::CMacCDecRMacREnc).err();
        assert!(matches!(err, Some(Scp03Error::Unsupported(_))), "{err:?}");
    }

    // ---- INITIALIZE UPDATE response parsing ---------------------------------

    #[test]
    fn init_update_response_parse_errors_name_the_field() {
        let good = h(PYSIM_AES128_11.init_upd_rsp);
        let err = InitUpdateResponse::parse(&good[..20]).expect_err("short");
        assert!(err.to_string().contains("card challenge"), "{err}");
        assert!(err.to_string().contains("only 7 left"), "{err}");
        let err = InitUpdateResponse::parse(&good[..29]).expect_err("no counter");
        assert!(err.to_string().contains("sequence counter"), "{err}");
        let mut extra = good.clone();
        extra.push(0);
        let err = InitUpdateResponse::parse(&extra).expect_err("trailing");
        assert!(err.to_string().contains("1 unexpected trailing"), "{err}");
        let mut scp02 = good.clone();
        scp02[11] = 0x02;
        let err = InitUpdateResponse::parse(&scp02).expect_err("scp02");
        assert!(err.to_string().contains("key information"), "{err}");
        let mut s16 = good;
        s16[12] |= I_S16;
        assert!(matches!(InitUpdateResponse::parse(&s16), Err(Scp03Error::Unsupported(_))));

        let random = InitUpdateResponse::parse(
            &h(PYSIM_AES128_11.init_upd_rsp)[..29]
                .iter()
                .enumerate()
                .map(|(i, &b)| if i == 12 { 0x60 } else { b })
                .collect::<Vec<_>>(),
        )
        .expect("random challenge, no counter");
        assert_eq!(random.sequence_counter, None);
        assert!(random.supports_renc() && !random.pseudo_random_challenge());
    }

    #[test]
    fn security_level_bytes() {
        for level in SecurityLevel::ALL {
            assert_eq!(SecurityLevel::try_from(u8::from(level)), Ok(level));
        }
        assert!(SecurityLevel::CMacCDec.has_cdec() && !SecurityLevel::CMacCDec.has_rmac());
        assert!(SecurityLevel::CMacRMac.has_rmac() && !SecurityLevel::CMacRMac.has_cdec());
        assert!(SecurityLevel::CMacCDecRMacREnc.has_renc());
        assert!(!SecurityLevel::CMacCDecRMac.has_renc());
        assert!(SecurityLevel::from_byte(0x00).is_err());
        assert!(SecurityLevel::from_byte(0x02).is_err());
        assert_eq!(SecurityLevel::CMacCDecRMac.to_string(), "13 (C-MAC+C-DECRYPTION+R-MAC)");
    }

    // ---- PUT KEY ------------------------------------------------------------

    #[test]
    fn put_key_round_trip() {
        let dek = StaticKeys::gp_default().dek;
        let new_keys = pysim_keys();
        let data = put_key_data(0x31, &new_keys, &dek);
        assert_eq!(data.len(), 1 + 3 * 23);
        assert_eq!(data[0], 0x31);
        // ENC entry: 88 11 10 <16 encrypted> 03 C35280 (pysim's KCV for 000102…0F).
        assert_eq!(&data[1..4], &[0x88, 0x11, 0x10]);
        assert_eq!(&data[20..24], &[0x03, 0xC3, 0x52, 0x80]);
        assert_ne!(&data[4..20], new_keys.enc.as_bytes(), "key is not sent in clear");
        let (kvn, parsed) = parse_put_key_data(&data, &dek).expect("parses");
        assert_eq!(kvn, 0x31);
        assert_eq!(parsed, new_keys);
        assert_eq!(put_key_response(0x31, &parsed), h("31 C35280 013808 840DE5"));

        let c = put_key(0x30, data);
        assert_eq!((c.cla, c.ins, c.p1, c.p2, c.le), (0x80, 0xD8, 0x30, 0x81, Some(256)));

        // Through an encrypted channel.
        let (mut host, mut card) = establish(SecurityLevel::CMacCDecRMac);
        let got = exchange(&mut host, &mut card, &c, Response::ok(put_key_response(0x31, &new_keys)));
        assert!(got.is_authenticated());
    }

    #[test]
    fn put_key_kcv_mismatch_and_malformed() {
        let dek = StaticKeys::gp_default().dek;
        let data = put_key_data(0x31, &pysim_keys(), &dek);
        for (offset, role) in [(23, KeyRole::Enc), (46, KeyRole::Mac), (69, KeyRole::Dek)] {
            let mut bad = data.clone();
            bad[offset] ^= 0x01;
            assert_eq!(parse_put_key_data(&bad, &dek).err(), Some(Scp03Error::KcvMismatch { role }));
        }
        // Wrong DEK: the decrypted keys do not match their KCVs.
        let wrong_dek = pysim_keys().dek;
        assert_eq!(parse_put_key_data(&data, &wrong_dek).err(), Some(Scp03Error::KcvMismatch { role: KeyRole::Enc }));
        assert_eq!(
            Scp03Error::KcvMismatch { role: KeyRole::Mac }.to_string(),
            "key check value mismatch for the MAC key"
        );
        let mut des = data.clone();
        des[24] = 0x80; // MAC entry key type -> DES
        let err = parse_put_key_data(&des, &dek).expect_err("DES");
        assert!(err.to_string().contains("MAC key type 80"), "{err}");
        let err = parse_put_key_data(&data[..50], &dek).expect_err("short");
        assert!(err.to_string().contains("encrypted key"), "{err}");
        let mut long = data;
        long.push(0);
        assert!(parse_put_key_data(&long, &dek).is_err());
    }

    #[test]
    fn debug_output_hides_keys() {
        let keys = derive_session_keys(&StaticKeys::gp_default(), &HC, &CC);
        let s = format!("{keys:?}");
        assert!(s.contains("KCV"), "{s}");
        assert_eq!(s.matches("KCV").count(), 3);
        let (host, card) = establish(SecurityLevel::CMacCDecRMacREnc);
        let s = format!("{host:?} {card:?}");
        assert!(!s.contains("AesKey") && !s.contains("chain"), "{s}");
    }

    #[test]
    fn padding_rules() {
        let mut v = vec![1, 2, 3];
        pad80(&mut v);
        assert_eq!(v.len(), 16);
        assert_eq!(v[3], 0x80);
        unpad80(&mut v, "x").expect("valid");
        assert_eq!(v, [1, 2, 3]);
        let mut v = vec![0u8; 16];
        assert_eq!(unpad80(&mut v, "x"), Err(Scp03Error::BadPadding("x")));
        let mut v = vec![0x80; 1];
        v.extend_from_slice(&[0; 16]);
        assert_eq!(unpad80(&mut v, "x"), Err(Scp03Error::BadPadding("x")), "80 outside the last block");
        let mut v = vec![5; 15];
        v.push(0x01);
        assert!(unpad80(&mut v, "x").is_err());
    }
}
