//! Profiles: the YAML that tells the station what to make (product,
//! firmware, GP keys and security level, key rotation, pinned CAs,
//! self-tests, timeouts, retries). Parsed with unknown keys rejected, then validated
//! as a whole: every problem is reported with file, line and field. Secrets
//! (GP keys) may be given inline (demo only), or as `env:NAME` or
//! `file:PATH`, and are never printed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use card::gp::keys::{AesKey, Diversification, StaticKeys};
use card::gp::scp03::SecurityLevel;
use card::gp::session::{KeyRing, KeySource};
use card::wallet::cert::ca_key_id;
use k256::ecdsa::VerifyingKey;
use serde::Deserialize;
use serde_saphyr::Spanned;
use zeroize::Zeroizing;

/// One problem in a profile, with its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: u64,
    pub column: u64,
    pub field: String,
    pub message: String,
}

/// Every problem found in one profile file.
#[derive(Debug, thiserror::Error)]
pub struct ProfileError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_problems(f, "profile", &self.file, &self.problems)
    }
}

/// "WHAT FILE has N problem(s):" and one line per problem with its place:
/// the message of every YAML file the station and the rig validate
/// (profiles, the daemon's configuration, regression plans).
pub fn write_problems(f: &mut fmt::Formatter<'_>, what: &str, file: &Path, problems: &[Problem]) -> fmt::Result {
    write!(f, "{what} {} has {} problem(s):", file.display(), problems.len())?;
    for p in problems {
        if p.line > 0 {
            write!(f, "\n  {}:{}:{}: {}: {}", file.display(), p.line, p.column, p.field, p.message)?;
        } else {
            write!(f, "\n  {}: {}: {}", file.display(), p.field, p.message)?;
        }
    }
    Ok(())
}

// ---- the file as written -------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    product: Spanned<String>,
    firmware: RawFirmware,
    gp: RawGp,
    attestation: RawAttestation,
    #[serde(default)]
    self_tests: RawSelfTests,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    retries: RawRetries,
    #[serde(default)]
    bundles: Option<RawBundles>,
    #[serde(default)]
    readers: RawReaders,
    /// The station's audit signing key (k256, hex): `env:NAME` or
    /// `file:PATH`; it signs each batch's audit head.
    #[serde(default)]
    audit_key: Option<Spanned<String>>,
    /// The station's id on every ledger record and metric (default: the
    /// host name; `--station-id` wins).
    #[serde(default)]
    station_id: Option<Spanned<String>>,
    /// The ledger: a SQLite file (relative to this file) or a postgres://
    /// URL (`--ledger` wins).
    #[serde(default)]
    ledger: Option<Spanned<String>>,
}

/// Which PC/SC readers the station takes, by name pattern (`*`, `?`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReaders {
    #[serde(default)]
    include: Vec<String>,
    #[serde(default)]
    exclude: Vec<String>,
    /// `shared` (default) or `exclusive` card connections.
    #[serde(default)]
    sharing: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBundles {
    /// Backup cards per primary (1..=4); 0 turns bundling off.
    backups: Spanned<u32>,
    /// A ready card waiting longer than this for partners is released.
    #[serde(default = "default_max_wait_s")]
    max_wait_s: Spanned<u32>,
    /// What a released (unpaired) card becomes: `pass` or `fail`.
    #[serde(default = "default_unpaired")]
    unpaired: Spanned<String>,
}

fn default_max_wait_s() -> Spanned<u32> {
    unspanned(600)
}
fn default_unpaired() -> Spanned<String> {
    unspanned("pass".to_string())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetries {
    /// Extra attempts on a card that failed for a retryable reason (reset,
    /// timeout) while it stays on the reader.
    #[serde(default = "default_card_retries")]
    card: Spanned<u32>,
}

fn default_card_retries() -> Spanned<u32> {
    unspanned(1)
}

impl Default for RawRetries {
    fn default() -> Self {
        Self { card: default_card_retries() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFirmware {
    /// Firmware directory, relative to the profile file.
    dir: Spanned<String>,
    /// Pinned release public keys (compressed SEC1, hex).
    release_keys: Vec<Spanned<String>>,
    #[serde(default = "default_block_size")]
    load_block_size: Spanned<u32>,
}

fn default_block_size() -> Spanned<u32> {
    Spanned::new(DEFAULT_LOAD_BLOCK, serde_saphyr::Location::UNKNOWN, serde_saphyr::Location::UNKNOWN)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGp {
    security_level: Spanned<String>,
    factory_keys: RawKeySet,
    #[serde(default)]
    rotation: Option<RawRotation>,
}

/// A key set: `key` (one key for all three roles, or `default` for the GP
/// test keys 40..4F) or `enc`, `mac` and `dek`. `version` belongs to the
/// factory set only (a rotation gives its version beside `master`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeySet {
    #[serde(default)]
    version: Option<Spanned<u32>>,
    #[serde(default)]
    key: Option<Spanned<String>>,
    #[serde(default)]
    enc: Option<Spanned<String>>,
    #[serde(default)]
    mac: Option<Spanned<String>>,
    #[serde(default)]
    dek: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRotation {
    enabled: bool,
    version: Spanned<u32>,
    diversification: Spanned<String>,
    master: RawKeySet,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttestation {
    /// Pinned card vendor CA public keys (compressed SEC1, hex).
    vendor_cas: Vec<Spanned<String>>,
    /// What is no longer trusted, although a pinned CA may have signed it.
    #[serde(default)]
    revoked: RawRevoked,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRevoked {
    /// Vendor CAs: public keys (hex SEC1) or CA key ids (16 hex digits).
    #[serde(default)]
    cas: Vec<Spanned<String>>,
    /// Card ids (20 hex digits).
    #[serde(default)]
    card_ids: Vec<Spanned<String>>,
    /// Card public keys (hex SEC1).
    #[serde(default)]
    card_keys: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSelfTests {
    #[serde(default = "yes")]
    kat: bool,
    #[serde(default = "default_signatures")]
    signatures: Spanned<u32>,
    #[serde(default = "default_rng_bytes")]
    rng_bytes: Spanned<u32>,
    #[serde(default = "default_memory_bytes")]
    memory_bytes: Spanned<u32>,
}

fn yes() -> bool {
    true
}
fn unspanned<T>(v: T) -> Spanned<T> {
    Spanned::new(v, serde_saphyr::Location::UNKNOWN, serde_saphyr::Location::UNKNOWN)
}
fn default_signatures() -> Spanned<u32> {
    unspanned(5)
}
fn default_rng_bytes() -> Spanned<u32> {
    unspanned(256)
}
fn default_memory_bytes() -> Spanned<u32> {
    unspanned(1024)
}

impl Default for RawSelfTests {
    fn default() -> Self {
        Self {
            kat: true,
            signatures: default_signatures(),
            rng_bytes: default_rng_bytes(),
            memory_bytes: default_memory_bytes(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    #[serde(default = "default_apdu_ms")]
    apdu_ms: Spanned<u32>,
    #[serde(default = "default_card_s")]
    card_s: Spanned<u32>,
}

fn default_apdu_ms() -> Spanned<u32> {
    unspanned(5_000)
}
fn default_card_s() -> Spanned<u32> {
    unspanned(120)
}

impl Default for RawTimeouts {
    fn default() -> Self {
        Self { apdu_ms: default_apdu_ms(), card_s: default_card_s() }
    }
}

// ---- the validated profile ---------------------------------------------

pub const DEFAULT_LOAD_BLOCK: u32 = 240;
/// LOAD data must leave room in a short APDU for the C-MAC (8 bytes) and,
/// with C-DECRYPTION, up to 16 bytes of padding: 255 - 8 - 16.
pub const MAX_LOAD_BLOCK: u32 = 231;

/// Key rotation: replace the factory keys with per-card keys.
#[derive(Clone)]
pub struct Rotation {
    pub version: u8,
    pub master: StaticKeys,
    pub diversification: Diversification,
}

impl fmt::Debug for Rotation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Rotation(version {:02X}, {:?}, master {:?})", self.version, self.diversification, self.master)
    }
}

#[derive(Debug, Clone)]
pub struct SelfTests {
    pub kat: bool,
    pub signatures: u32,
    pub rng_bytes: usize,
    pub memory_bytes: u16,
}

#[derive(Debug, Clone)]
pub struct Timeouts {
    pub apdu: Duration,
    pub card: Duration,
}

/// A validated profile.
#[derive(Debug, Clone)]
pub struct Profile {
    pub path: PathBuf,
    pub product: String,
    pub firmware_dir: PathBuf,
    pub release_keys: Vec<VerifyingKey>,
    pub load_block_size: usize,
    pub security_level: SecurityLevel,
    pub factory_version: u8,
    pub factory_keys: StaticKeys,
    pub rotation: Option<Rotation>,
    pub vendor_cas: Vec<VerifyingKey>,
    /// The attestation revocation list: refused even when a pinned CA
    /// signed them.
    pub revoked: Revoked,
    pub self_tests: SelfTests,
    pub timeouts: Timeouts,
    /// Extra attempts on a card still on its reader after a retryable failure.
    pub card_retries: u32,
    /// Pairing into bundles; `None` leaves cards "ready for pairing".
    pub bundles: Option<Bundles>,
    /// PC/SC reader selection and connection sharing.
    pub readers: card::transport::pcsc::ReaderFilter,
    pub sharing: card::transport::pcsc::Sharing,
    /// Signs each batch's audit head; `None` leaves heads unsigned.
    pub audit_key: Option<crate::ledger::AuditKey>,
    /// The station id, when the profile names one.
    pub station_id: Option<String>,
    /// The ledger, when the profile names one.
    pub ledger: Option<crate::ledger::LedgerTarget>,
}

/// The profile's revocation list (`attestation.revoked`): vendor CAs by key
/// id, card ids, and card public keys (compressed SEC1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revoked {
    pub cas: Vec<[u8; 8]>,
    pub card_ids: Vec<card::CardId>,
    pub card_keys: Vec<[u8; 33]>,
}

impl Revoked {
    pub fn ca(&self, key_id: &[u8; 8]) -> bool {
        self.cas.contains(key_id)
    }

    pub fn card_id(&self, id: &card::CardId) -> bool {
        self.card_ids.contains(id)
    }

    pub fn card_key(&self, key: &[u8; 33]) -> bool {
        self.card_keys.contains(key)
    }

    pub fn is_empty(&self) -> bool {
        self.cas.is_empty() && self.card_ids.is_empty() && self.card_keys.is_empty()
    }
}

/// What happens to a ready card that finds no partners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpaired {
    /// Recorded passed, stage "unpaired".
    Pass,
    /// Recorded failed at pairing.
    Fail,
}

/// Bundle settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundles {
    pub backups: usize,
    pub max_wait: Duration,
    pub unpaired: Unpaired,
}

impl Bundles {
    /// Cards per bundle: the primary and its backups.
    pub fn size(&self) -> usize {
        self.backups + 1
    }
}

impl Profile {
    /// The key sets the station may meet on a card: the factory set and,
    /// with rotation, the per-card set.
    pub fn key_ring(&self) -> KeyRing {
        let ring = KeyRing::new().with(self.factory_version, KeySource::Static(self.factory_keys.clone()));
        match &self.rotation {
            Some(r) => {
                ring.with(r.version, KeySource::Diversified { master: r.master.clone(), scheme: r.diversification })
            }
            None => ring,
        }
    }

    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let text = crate::yaml::read(path).map_err(|message| ProfileError {
            file: path.to_path_buf(),
            problems: vec![Problem { line: 0, column: 0, field: "(file)".into(), message }],
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates profile text; `path` names it in errors and
    /// anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ProfileError> {
        let raw: RawProfile = crate::yaml::from_str(text).map_err(|e| {
            let (line, column, field, message) = crate::yaml::place(text, &e);
            ProfileError { file: path.to_path_buf(), problems: vec![Problem { line, column, field, message }] }
        })?;
        let mut v = Validator { problems: Vec::new(), base: path.parent().unwrap_or(Path::new(".")).to_path_buf() };
        let profile = v.profile(raw, path);
        match profile {
            Some(p) if v.problems.is_empty() => Ok(p),
            _ => Err(ProfileError { file: path.to_path_buf(), problems: v.problems }),
        }
    }
}

/// The parser's message without its own "error: line N column M:" prefix
/// (the place is reported separately).
pub fn first_line(e: &impl fmt::Display) -> String {
    let s = e.to_string();
    let mut m = s.lines().next().unwrap_or("invalid YAML").trim();
    m = m.strip_prefix("error:").unwrap_or(m).trim_start();
    if m.starts_with("line ")
        && let Some((_, rest)) = m.split_once(": ")
    {
        m = rest;
    }
    m.to_string()
}

/// Reads an AES-128 key given as 32 hex digits, `env:NAME` or `file:PATH`
/// (relative to `base`; lines starting with `#` are comments). The error
/// names the source, never the value: it may be a secret.
pub fn resolve_key(spec: &str, base: &Path) -> Result<AesKey, String> {
    let s = spec.trim();
    let text: Zeroizing<String> = if let Some(name) = s.strip_prefix("env:") {
        Zeroizing::new(std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?)
    } else if let Some(file) = s.strip_prefix("file:") {
        let raw = Zeroizing::new(
            std::fs::read_to_string(base.join(file)).map_err(|e| format!("cannot read key file {file}: {e}"))?,
        );
        Zeroizing::new(raw.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join(""))
    } else {
        Zeroizing::new(s.to_string())
    };
    AesKey::from_hex(text.trim()).map_err(|_| "not an AES-128 key (32 hex digits)".to_string())
}

struct Validator {
    problems: Vec<Problem>,
    base: PathBuf,
}

impl Validator {
    fn problem<T>(&mut self, at: &Spanned<T>, field: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            line: at.referenced.line(),
            column: at.referenced.column(),
            field: field.to_string(),
            message: message.into(),
        });
    }

    fn u8_field(&mut self, v: &Spanned<u32>, field: &str, range: std::ops::RangeInclusive<u32>) -> Option<u8> {
        if range.contains(&v.value) {
            Some(v.value as u8)
        } else {
            self.problem(v, field, format!("{} is outside {}..={}", v.value, range.start(), range.end()));
            None
        }
    }

    fn public_key(&mut self, v: &Spanned<String>, field: &str) -> Option<VerifyingKey> {
        match hex::decode(v.value.trim()).ok().and_then(|b| VerifyingKey::from_sec1_bytes(&b).ok()) {
            Some(k) => Some(k),
            None => {
                self.problem(v, field, "not a secp256k1 public key in hex (SEC1, 33 or 65 bytes)");
                None
            }
        }
    }

    /// `attestation.revoked`: every entry checked, duplicates refused (a
    /// duplicate usually means a mistyped second entry).
    fn revoked(&mut self, raw: &RawRevoked) -> Revoked {
        let mut out = Revoked::default();
        for (i, v) in raw.cas.iter().enumerate() {
            let field = format!("attestation.revoked.cas[{i}]");
            let text = v.value.trim();
            let id = if text.len() == 16 {
                hex::decode(text).ok().and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            } else {
                hex::decode(text).ok().and_then(|b| VerifyingKey::from_sec1_bytes(&b).ok()).map(|k| ca_key_id(&k))
            };
            match id {
                Some(id) if out.cas.contains(&id) => self.problem(v, &field, "listed twice"),
                Some(id) => out.cas.push(id),
                None => self.problem(v, &field, "not a CA public key in hex (SEC1) nor a CA key id (16 hex digits)"),
            }
        }
        for (i, v) in raw.card_ids.iter().enumerate() {
            let field = format!("attestation.revoked.card_ids[{i}]");
            match v.value.trim().parse::<card::CardId>() {
                Ok(id) if out.card_ids.contains(&id) => self.problem(v, &field, "listed twice"),
                Ok(id) => out.card_ids.push(id),
                Err(_) => self.problem(v, &field, "not a card id (20 hex digits)"),
            }
        }
        for (i, v) in raw.card_keys.iter().enumerate() {
            let field = format!("attestation.revoked.card_keys[{i}]");
            match self.public_key(v, &field).map(|k| card::wallet::public_key_bytes(&k)) {
                Some(k) if out.card_keys.contains(&k) => self.problem(v, &field, "listed twice"),
                Some(k) => out.card_keys.push(k),
                None => {}
            }
        }
        out
    }

    /// A key given as hex, `env:NAME` or `file:PATH`.
    fn secret_key(&mut self, v: &Spanned<String>, field: &str) -> Option<AesKey> {
        match resolve_key(&v.value, &self.base) {
            Ok(k) => Some(k),
            Err(detail) => {
                self.problem(v, field, detail);
                None
            }
        }
    }

    /// The keys of a key set; `at` places problems that have no field of
    /// their own.
    fn key_set<T>(&mut self, set: &RawKeySet, field: &str, at: &Spanned<T>, allow_default: bool) -> Option<StaticKeys> {
        match (&set.key, [&set.enc, &set.mac, &set.dek]) {
            (Some(k), [None, None, None]) if allow_default && k.value.trim() == "default" => {
                Some(StaticKeys::gp_default())
            }
            (Some(k), [None, None, None]) => self.secret_key(k, &format!("{field}.key")).map(StaticKeys::from_single),
            (None, [Some(e), Some(m), Some(d)]) => {
                let enc = self.secret_key(e, &format!("{field}.enc"));
                let mac = self.secret_key(m, &format!("{field}.mac"));
                let dek = self.secret_key(d, &format!("{field}.dek"));
                Some(StaticKeys { enc: enc?, mac: mac?, dek: dek? })
            }
            _ => {
                self.problem(at, field, "give either `key` (one key for all roles) or all of `enc`, `mac`, `dek`");
                None
            }
        }
    }

    fn profile(&mut self, raw: RawProfile, path: &Path) -> Option<Profile> {
        if raw.product.value.trim().is_empty() {
            self.problem(&raw.product, "product", "must not be empty");
        }
        let firmware_dir = self.base.join(&raw.firmware.dir.value);
        if !firmware_dir.is_dir() {
            self.problem(&raw.firmware.dir, "firmware.dir", format!("{} is not a directory", firmware_dir.display()));
        }
        if raw.firmware.release_keys.is_empty() {
            self.problems.push(Problem {
                line: raw.firmware.dir.referenced.line(),
                column: 1,
                field: "firmware.release_keys".into(),
                message: "at least one pinned release key is required".into(),
            });
        }
        let release_keys: Vec<_> = raw
            .firmware
            .release_keys
            .iter()
            .enumerate()
            .filter_map(|(i, k)| self.public_key(k, &format!("firmware.release_keys[{i}]")))
            .collect();
        let block = &raw.firmware.load_block_size;
        if !(16..=MAX_LOAD_BLOCK).contains(&block.value) {
            self.problem(
                block,
                "firmware.load_block_size",
                format!("{} is outside 16..={MAX_LOAD_BLOCK}", block.value),
            );
        }
        let level = &raw.gp.security_level;
        let security_level = match level.value.as_str() {
            "cmac" => Some(SecurityLevel::CMac),
            "cmac-cdec" => Some(SecurityLevel::CMacCDec),
            "cmac-rmac" => Some(SecurityLevel::CMacRMac),
            "cmac-cdec-rmac" => Some(SecurityLevel::CMacCDecRMac),
            other => {
                self.problem(
                    level,
                    "gp.security_level",
                    format!("unknown level {other:?}; use cmac, cmac-cdec, cmac-rmac or cmac-cdec-rmac"),
                );
                None
            }
        };
        let fk = &raw.gp.factory_keys;
        let factory_version = match &fk.version {
            Some(v) => self.u8_field(v, "gp.factory_keys.version", 1..=255),
            None => {
                self.problem(level, "gp.factory_keys.version", "the factory key version is required");
                None
            }
        };
        let factory_keys = self.key_set(fk, "gp.factory_keys", level, true);
        let rotation = match &raw.gp.rotation {
            Some(r) if r.enabled => {
                let version = self.u8_field(&r.version, "gp.rotation.version", 1..=0x7F);
                if version.is_some() && version == factory_version {
                    self.problem(&r.version, "gp.rotation.version", "must differ from gp.factory_keys.version");
                }
                let diversification = match r.diversification.value.parse::<Diversification>() {
                    Ok(d) => Some(d),
                    Err(_) => {
                        self.problem(&r.diversification, "gp.rotation.diversification", "use none or kdf3");
                        None
                    }
                };
                if let Some(v) = &r.master.version {
                    self.problem(v, "gp.rotation.master.version", "give the version as gp.rotation.version");
                }
                let master = self.key_set(&r.master, "gp.rotation.master", &r.version, false);
                match (version, master, diversification) {
                    (Some(version), Some(master), Some(diversification)) => {
                        Some(Rotation { version, master, diversification })
                    }
                    // The problems are recorded; keep validating the rest.
                    _ => None,
                }
            }
            _ => None,
        };
        if raw.attestation.vendor_cas.is_empty() {
            self.problems.push(Problem {
                line: 0,
                column: 0,
                field: "attestation.vendor_cas".into(),
                message: "at least one pinned vendor CA is required".into(),
            });
        }
        let vendor_cas: Vec<_> = raw
            .attestation
            .vendor_cas
            .iter()
            .enumerate()
            .filter_map(|(i, k)| self.public_key(k, &format!("attestation.vendor_cas[{i}]")))
            .collect();
        let revoked = self.revoked(&raw.attestation.revoked);
        let st = &raw.self_tests;
        if st.signatures.value > 64 {
            self.problem(&st.signatures, "self_tests.signatures", "at most 64");
        }
        if !(64..=4096).contains(&st.rng_bytes.value) {
            self.problem(&st.rng_bytes, "self_tests.rng_bytes", "must be within 64..=4096");
        }
        if !(1..=card::wallet::self_test::MEMORY_MAX as u32).contains(&st.memory_bytes.value) {
            self.problem(
                &st.memory_bytes,
                "self_tests.memory_bytes",
                format!("must be within 1..={}", card::wallet::self_test::MEMORY_MAX),
            );
        }
        let t = &raw.timeouts;
        if !(100..=60_000).contains(&t.apdu_ms.value) {
            self.problem(&t.apdu_ms, "timeouts.apdu_ms", "must be within 100..=60000");
        }
        if !(1..=3600).contains(&t.card_s.value) {
            self.problem(&t.card_s, "timeouts.card_s", "must be within 1..=3600");
        }
        let bundles = match &raw.bundles {
            None => None,
            Some(b) if b.backups.value == 0 => None,
            Some(b) => {
                if b.backups.value > 4 {
                    self.problem(&b.backups, "bundles.backups", "at most 4 backups per primary (0 turns bundling off)");
                }
                if !(1..=86_400).contains(&b.max_wait_s.value) {
                    self.problem(&b.max_wait_s, "bundles.max_wait_s", "must be within 1..=86400");
                }
                let unpaired = match b.unpaired.value.as_str() {
                    "pass" => Unpaired::Pass,
                    "fail" => Unpaired::Fail,
                    other => {
                        self.problem(&b.unpaired, "bundles.unpaired", format!("{other:?}: use pass or fail"));
                        Unpaired::Pass
                    }
                };
                Some(Bundles {
                    backups: b.backups.value as usize,
                    max_wait: Duration::from_secs(u64::from(b.max_wait_s.value)),
                    unpaired,
                })
            }
        };
        let sharing = match &raw.readers.sharing {
            None => card::transport::pcsc::Sharing::Shared,
            Some(v) => match v.value.as_str() {
                "shared" => card::transport::pcsc::Sharing::Shared,
                "exclusive" => card::transport::pcsc::Sharing::Exclusive,
                other => {
                    self.problem(v, "readers.sharing", format!("{other:?}: use shared or exclusive"));
                    card::transport::pcsc::Sharing::Shared
                }
            },
        };
        let audit_key =
            raw.audit_key.as_ref().and_then(|v| match crate::ledger::AuditKey::resolve(&v.value, &self.base) {
                Ok(k) => Some(k),
                Err(detail) => {
                    self.problem(v, "audit_key", detail);
                    None
                }
            });
        if raw.retries.card.value > 5 {
            self.problem(&raw.retries.card, "retries.card", "at most 5");
        }
        let station_id = raw.station_id.as_ref().and_then(|v| {
            let id = v.value.trim();
            if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
                self.problem(v, "station_id", "must be non-empty letters, digits, '-', '_' or '.'");
                return None;
            }
            Some(id.to_string())
        });
        let ledger = raw.ledger.as_ref().and_then(|v| match crate::ledger::LedgerTarget::parse(&v.value) {
            Ok(crate::ledger::LedgerTarget::Sqlite(p)) => Some(crate::ledger::LedgerTarget::Sqlite(self.base.join(p))),
            Ok(t) => Some(t),
            Err(detail) => {
                self.problem(v, "ledger", detail);
                None
            }
        });
        if !self.problems.is_empty() {
            return None;
        }
        Some(Profile {
            path: path.to_path_buf(),
            product: raw.product.value,
            firmware_dir,
            release_keys,
            load_block_size: block.value as usize,
            security_level: security_level?,
            factory_version: factory_version?,
            factory_keys: factory_keys?,
            rotation,
            vendor_cas,
            revoked,
            self_tests: SelfTests {
                kat: st.kat,
                signatures: st.signatures.value,
                rng_bytes: st.rng_bytes.value as usize,
                memory_bytes: st.memory_bytes.value as u16,
            },
            timeouts: Timeouts {
                apdu: Duration::from_millis(u64::from(t.apdu_ms.value)),
                card: Duration::from_secs(u64::from(t.card_s.value)),
            },
            card_retries: raw.retries.card.value,
            bundles,
            readers: card::transport::pcsc::ReaderFilter::new(raw.readers.include, raw.readers.exclude),
            sharing,
            audit_key,
            station_id,
            ledger,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo_text() -> (String, PathBuf) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles/demo.yaml");
        (std::fs::read_to_string(&path).expect("demo profile"), path)
    }

    fn problems(text: &str) -> Vec<Problem> {
        let (_, path) = demo_text();
        Profile::parse(text, &path).expect_err("should be refused").problems
    }

    #[test]
    fn station_id_and_ledger_keys() {
        let (text, path) = demo_text();
        let p = Profile::parse(&format!("{text}\nstation_id: st-7\nledger: line.db\n"), &path).expect("valid");
        assert_eq!(p.station_id.as_deref(), Some("st-7"));
        let base = path.parent().expect("dir").join("line.db");
        assert_eq!(p.ledger, Some(crate::ledger::LedgerTarget::Sqlite(base)), "relative to the profile");
        let p = Profile::parse(&format!("{text}\nledger: postgres://db/line\n"), &path).expect("valid");
        assert!(matches!(p.ledger, Some(crate::ledger::LedgerTarget::Postgres(_))));
        let bad = problems(&format!("{text}\nstation_id: 'two words'\n"));
        assert!(bad.iter().any(|p| p.field == "station_id"), "{bad:?}");
    }

    #[test]
    fn demo_profile_is_valid() {
        let (text, path) = demo_text();
        let p = Profile::parse(&text, &path).expect("valid");
        assert_eq!(p.security_level, SecurityLevel::CMacCDecRMac);
        assert_eq!(p.factory_version, 0xFF);
        assert_eq!(p.rotation.as_ref().map(|r| r.version), Some(1));
        assert_eq!(p.vendor_cas.len(), 1);
        assert_eq!(p.key_ring().versions(), vec![0xFF, 1]);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_line() {
        let (text, _) = demo_text();
        let bad = text.replace("  load_block_size: 231", "  load_block_size: 231\n  colour: blue");
        let line = bad.lines().position(|l| l.contains("colour")).expect("line") as u64 + 1;
        let p = problems(&bad);
        assert_eq!(p.len(), 1);
        assert!(p[0].message.contains("colour"), "{p:?}");
        assert_eq!(p[0].line, line, "{p:?}");
    }

    #[test]
    fn every_semantic_problem_is_reported_with_field_and_line() {
        let (text, _) = demo_text();
        let bad = text
            .replace("security_level: cmac-cdec-rmac", "security_level: cmac-rot13")
            .replace("key: 5441504C494E452D44454D4F2D4D4B31", "key: 5441504C494E45")
            .replace("signatures: 5", "signatures: 500")
            .replace("load_block_size: 231", "load_block_size: 250");
        let p = problems(&bad);
        let cases = [
            ("gp.security_level", "cmac-rot13"),
            ("gp.rotation.master.key", "key: 5441504C494E45"),
            ("self_tests.signatures", "signatures: 500"),
            ("firmware.load_block_size", "load_block_size: 250"),
        ];
        assert_eq!(p.len(), cases.len(), "{p:#?}");
        for (field, needle) in cases {
            let x = p.iter().find(|x| x.field == field).unwrap_or_else(|| panic!("{field} missing in {p:#?}"));
            let line = bad.lines().position(|l| l.contains(needle)).expect("needle") as u64 + 1;
            assert_eq!(x.line, line, "{x:?}");
        }
        // The bad key's value is never echoed (it may be a secret).
        assert!(p.iter().all(|x| !x.message.contains("5441504C494E45")), "{p:?}");
    }

    #[test]
    fn keys_from_the_environment_and_missing_ones() {
        let (text, path) = demo_text();
        let via_env = text.replace("key: 5441504C494E452D44454D4F2D4D4B31", "key: env:TAPLINE_TEST_MASTER_UNSET_VAR");
        let p = Profile::parse(&via_env, &path).expect_err("unset variable").problems;
        assert!(p[0].message.contains("TAPLINE_TEST_MASTER_UNSET_VAR"), "{p:?}");
        let via_file = text.replace("key: 5441504C494E452D44454D4F2D4D4B31", "key: file:does-not-exist.key");
        let p = Profile::parse(&via_file, &path).expect_err("missing file").problems;
        assert!(p[0].message.contains("does-not-exist.key"), "{p:?}");
    }

    #[test]
    fn bad_pinned_keys_and_missing_firmware_dir() {
        let (text, _) = demo_text();
        let bad = text
            .replace("02B6684FC5AAE553C9098B41B9BC28E9D48917B3F87E2AA4155913A2666C777DF1", "02B6684FC5")
            .replace("dir: ../firmware/wallet-demo", "dir: ../firmware/nope");
        let fields: Vec<String> = problems(&bad).into_iter().map(|p| p.field).collect();
        assert!(fields.contains(&"attestation.vendor_cas[0]".to_string()), "{fields:?}");
        assert!(fields.contains(&"firmware.dir".to_string()), "{fields:?}");
    }

    const DEMO_CA: &str = "02B6684FC5AAE553C9098B41B9BC28E9D48917B3F87E2AA4155913A2666C777DF1";

    #[test]
    fn the_revocation_list_is_read_and_every_bad_entry_has_its_line() {
        let (text, path) = demo_text();
        let with = |revoked: &str| text.replace("\nself_tests:", &format!("  revoked:\n{revoked}\nself_tests:"));
        let good = with(&format!(
            "    cas: [{DEMO_CA}, 0011223344556677]\n    card_ids: [47905040AABBCCDDEEFF]\n    card_keys: [{DEMO_CA}]"
        ));
        let p = Profile::parse(&good, &path).expect("valid");
        let demo = VerifyingKey::from_sec1_bytes(&hex::decode(DEMO_CA).expect("hex")).expect("key");
        assert!(p.revoked.ca(&ca_key_id(&demo)));
        assert!(p.revoked.ca(&[0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77]));
        assert!(p.revoked.card_id(&"47905040AABBCCDDEEFF".parse().expect("id")));
        assert!(p.revoked.card_key(&card::wallet::public_key_bytes(&demo)));
        let plain = Profile::parse(&text, &path).expect("valid");
        assert!(plain.revoked.is_empty(), "no list: nothing revoked");

        let bad = with(
            "    cas: [0011]\n    card_ids: [4790, 47905040AABBCCDDEEFF, 47905040AABBCCDDEEFF]\n    card_keys: [02B668]",
        );
        let p = Profile::parse(&bad, &path).expect_err("refused").problems;
        let fields: Vec<&str> = p.iter().map(|x| x.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "attestation.revoked.cas[0]",
                "attestation.revoked.card_ids[0]",
                "attestation.revoked.card_ids[2]",
                "attestation.revoked.card_keys[0]"
            ],
            "{p:#?}"
        );
        for x in &p {
            let needle = x.field.rsplit('.').next().and_then(|f| f.split('[').next()).expect("field");
            let line = bad.lines().position(|l| l.trim_start().starts_with(needle)).expect("line") as u64 + 1;
            assert_eq!(x.line, line, "{x:?}");
        }
        assert!(p[2].message.contains("twice"), "{p:?}");

        let unknown = with("    serials: [1]");
        let p = Profile::parse(&unknown, &path).expect_err("unknown key").problems;
        assert!(p[0].message.contains("serials"), "{p:?}");
        let line = unknown.lines().position(|l| l.contains("serials")).expect("line") as u64 + 1;
        assert_eq!(p[0].line, line, "{p:?}");
    }

    #[test]
    fn yaml_syntax_errors_have_a_place() {
        let p = problems("product: x\nfirmware: [unclosed\n");
        assert!(p[0].line >= 2, "{p:?}");
    }

    #[test]
    fn debug_output_never_shows_keys() {
        let (text, path) = demo_text();
        let p = Profile::parse(&text, &path).expect("valid");
        let dbg = format!("{p:?}");
        assert!(!dbg.to_uppercase().contains("5441504C494E452D44454D4F2D4D4B31"), "{dbg}");
        assert!(!dbg.contains("404142434445"), "{dbg}");
    }
}
