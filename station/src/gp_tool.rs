//! GlobalPlatform utility commands for one card (`station gp ...`): what lab
//! staff use for rework. Built on the same card stack as the recipe
//! (`GpSession`, `KeyRing`/`KeySource`, `CapFile`, the PC/SC backend); the
//! CLI only parses and prints the typed results returned here.
//!
//! Secrets stay in zeroized key types; results and errors carry key check
//! values at most.

use std::path::{Path, PathBuf};
use std::time::Duration;

use card::CardError;
use card::cap::CapFile;
use card::gp::keys::{AesKey, Diversification, StaticKeys};
use card::gp::scp03::{Scp03Error, SecurityLevel};
use card::gp::session::{GpSession, KeyRing, KeySource};
use card::gp::{StatusScope, app_state, card_state};
use card::sw::StatusWord;
use card::transport::pcsc::{PcscMonitor, ReaderFilter, Sharing};
use card::transport::{CardReader, ReaderId, ReaderMonitor, SlotState, Transport, TransportError};
use serde::Serialize;

use crate::profile::{Profile, ProfileError};

/// Default LOAD block size (bytes of load file data per LOAD command).
pub const DEFAULT_BLOCK_SIZE: usize = 240;

#[derive(Debug, thiserror::Error)]
pub enum GpToolError {
    #[error(
        "card cryptogram mismatch on {reader}: the keys are wrong for this card (key, key version or \
         diversification). EXTERNAL AUTHENTICATE was NOT sent, so the card's authentication retry \
         counter is untouched"
    )]
    WrongKeys { reader: String },
    #[error("no PC/SC reader{}; is pcscd running with the reader attached?", matching(.pattern))]
    NoReaders { pattern: Option<String> },
    #[error("no card in any reader{}; readers: {}", matching(.pattern), .readers.join(", "))]
    NoCard { pattern: Option<String>, readers: Vec<String> },
    #[error("cards in more than one reader{}; choose one with --reader NAME_OR_GLOB: {}", matching(.pattern), .readers.join(", "))]
    AmbiguousReader { pattern: Option<String>, readers: Vec<String> },
    #[error("{0}")]
    Usage(String),
    #[error("{what}: {detail}")]
    Key { what: String, detail: String },
    #[error("no application or load file {aid} on the card")]
    NotFound { aid: String },
    #[error("cannot reach pcscd (is it running? scripts/pcscd-vpcd.sh starts one with emulated readers): {0}")]
    NoService(TransportError),
    #[error("{reader}: {source}")]
    Transport { reader: String, source: TransportError },
    #[error("{reader}: {source}")]
    Card { reader: String, source: CardError },
    #[error(transparent)]
    Cap(#[from] card::cap::CapError),
    #[error(transparent)]
    Profile(#[from] ProfileError),
}

fn matching(pattern: &Option<String>) -> String {
    pattern.as_ref().map(|p| format!(" matching {p:?}")).unwrap_or_default()
}

/// Parses a security level name: `cmac`, `cmac-cdec`, `cmac-rmac`,
/// `cmac-cdec-rmac`.
pub fn parse_level(s: &str) -> Result<SecurityLevel, GpToolError> {
    Ok(match s.trim().to_ascii_lowercase().as_str() {
        "cmac" => SecurityLevel::CMac,
        "cmac-cdec" => SecurityLevel::CMacCDec,
        "cmac-rmac" => SecurityLevel::CMacRMac,
        "cmac-cdec-rmac" => SecurityLevel::CMacCDecRMac,
        _ => {
            return Err(GpToolError::Usage(format!(
                "unknown security level {s:?} (expected cmac, cmac-cdec, cmac-rmac or cmac-cdec-rmac)"
            )));
        }
    })
}

/// Parses a key version: decimal (`1`, `255`), `0x`-prefixed hex, or hex
/// with letters (`FF`).
pub fn parse_key_version(s: &str) -> Result<u8, GpToolError> {
    let t = s.trim();
    let parsed = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u8::from_str_radix(h, 16).ok()
    } else if t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse().ok()
    } else {
        u8::from_str_radix(t, 16).ok()
    };
    parsed.ok_or_else(|| GpToolError::Usage(format!("key version {s:?} is not 0..255 (decimal, or hex like FF)")))
}

/// Parses hex bytes (whitespace allowed); `what` names the option.
pub fn parse_hex(what: &str, s: &str) -> Result<Vec<u8>, GpToolError> {
    let clean: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    hex::decode(&clean).map_err(|_| GpToolError::Usage(format!("{what}: {s:?} is not hex")))
}

/// Parses an AID (5 to 16 bytes of hex).
pub fn parse_aid(what: &str, s: &str) -> Result<Vec<u8>, GpToolError> {
    let aid = parse_hex(what, s)?;
    if !(5..=16).contains(&aid.len()) {
        return Err(GpToolError::Usage(format!("{what}: an AID is 5 to 16 bytes, got {}", aid.len())));
    }
    Ok(aid)
}

/// Reads a key given as 32 hex digits, `env:NAME`, `file:PATH` (lines
/// starting with `#` are comments) or `default` (the GP test key 40..4F).
/// Errors name the option and the source, never the value.
pub fn read_key(what: &str, spec: &str) -> Result<AesKey, GpToolError> {
    let err = |detail: String| GpToolError::Key { what: what.to_string(), detail };
    let s = spec.trim();
    if s.eq_ignore_ascii_case("default") {
        return Ok(StaticKeys::gp_default().enc.clone());
    }
    crate::profile::resolve_key(s, Path::new(".")).map_err(err)
}

/// How to authenticate to the card manager, as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct KeyOptions {
    /// Key version for INITIALIZE UPDATE; 0 = the card's choice.
    pub key_version: u8,
    /// One key for ENC, MAC and DEK (`default` when nothing is given).
    pub key: Option<String>,
    pub enc: Option<String>,
    pub mac: Option<String>,
    pub dek: Option<String>,
    /// Derive per-card keys from the given keys as master keys.
    pub diversification: Diversification,
    pub level: Option<SecurityLevel>,
    /// Take keys and level from this profile's key ring.
    pub profile: Option<PathBuf>,
}

/// Resolved authentication: the key ring, the requested version, the level.
#[derive(Debug, Clone)]
pub struct Auth {
    pub ring: KeyRing,
    pub requested: u8,
    pub level: SecurityLevel,
    /// Key block size from the profile, if any.
    pub block_size: Option<usize>,
}

impl KeyOptions {
    pub fn resolve(&self) -> Result<Auth, GpToolError> {
        if let Some(path) = &self.profile {
            if self.key.is_some()
                || self.enc.is_some()
                || self.mac.is_some()
                || self.dek.is_some()
                || self.diversification != Diversification::None
            {
                return Err(GpToolError::Usage(
                    "--profile takes the keys from the profile; do not combine it with --key/--enc/--mac/--dek/--diversification"
                        .into(),
                ));
            }
            let p = Profile::load(path)?;
            return Ok(Auth {
                ring: p.key_ring(),
                requested: self.key_version,
                level: self.level.unwrap_or(p.security_level),
                block_size: Some(p.load_block_size),
            });
        }
        let keys = match (&self.key, &self.enc, &self.mac, &self.dek) {
            (Some(k), None, None, None) => StaticKeys::from_single(read_key("--key", k)?),
            (Some(_), ..) => {
                return Err(GpToolError::Usage("give either --key or --enc/--mac/--dek, not both".into()));
            }
            (None, Some(e), Some(m), Some(d)) => {
                StaticKeys::new(read_key("--enc", e)?, read_key("--mac", m)?, read_key("--dek", d)?)
            }
            (None, None, None, None) => StaticKeys::gp_default(),
            (None, ..) => return Err(GpToolError::Usage("--enc, --mac and --dek go together".into())),
        };
        let source = match self.diversification {
            Diversification::None => KeySource::Static(keys),
            scheme => KeySource::Diversified { master: keys, scheme },
        };
        Ok(Auth {
            ring: ring_for(self.key_version, source),
            requested: self.key_version,
            level: self.level.unwrap_or(SecurityLevel::CMacCDecRMac),
            block_size: None,
        })
    }
}

/// A ring with `source` for `kvn`, or for every version when `kvn` is 0
/// (the card chooses; the given keys are tried for whatever it reports).
fn ring_for(kvn: u8, source: KeySource) -> KeyRing {
    if kvn != 0 {
        return KeyRing::new().with(kvn, source);
    }
    (1..=u8::MAX).fold(KeyRing::new(), |r, v| r.with(v, source.clone()))
}

/// Finds the one reader with a card (among those matching `pattern`, a
/// reader name or glob) and runs `f` on its card.
pub fn with_card<T>(
    pattern: Option<&str>,
    f: impl FnOnce(&ReaderId, &mut dyn Transport) -> Result<T, GpToolError>,
) -> Result<T, GpToolError> {
    let filter = ReaderFilter::new(pattern.map(str::to_string), [""; 0]);
    let mut monitor = PcscMonitor::new(filter, Sharing::Exclusive).map_err(GpToolError::NoService)?;
    let readers = monitor.readers().map_err(GpToolError::NoService)?;
    let pat = pattern.map(str::to_string);
    if readers.is_empty() {
        return Err(GpToolError::NoReaders { pattern: pat });
    }
    let mut with_card = Vec::new();
    for id in &readers {
        let mut r =
            monitor.open_reader(id).map_err(|e| GpToolError::Transport { reader: id.to_string(), source: e })?;
        if let Ok(SlotState::Present { .. }) = r.wait_change(&SlotState::Empty, Duration::from_millis(100)) {
            with_card.push((id.clone(), r));
        }
    }
    match with_card.len() {
        0 => Err(GpToolError::NoCard { pattern: pat, readers: readers.iter().map(ToString::to_string).collect() }),
        1 => {
            let (id, mut r) = with_card.pop().expect("one");
            let mut t = r.connect().map_err(|e| GpToolError::Transport { reader: id.to_string(), source: e })?;
            f(&id, &mut *t)
        }
        _ => Err(GpToolError::AmbiguousReader {
            pattern: pat,
            readers: with_card.iter().map(|(id, _)| id.to_string()).collect(),
        }),
    }
}

/// Opens the session; a card cryptogram mismatch becomes [`GpToolError::WrongKeys`].
pub fn open_session<'t>(
    reader: &ReaderId,
    t: &'t mut dyn Transport,
    auth: &Auth,
) -> Result<GpSession<'t>, GpToolError> {
    GpSession::open(t, &auth.ring, auth.requested, auth.level).map_err(|e| match e {
        CardError::Scp03(Scp03Error::CardCryptogramMismatch) => GpToolError::WrongKeys { reader: reader.to_string() },
        e => card_err(reader, e),
    })
}

fn card_err(reader: &ReaderId, e: CardError) -> GpToolError {
    GpToolError::Card { reader: reader.to_string(), source: e }
}

// ---- gp list -------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
pub struct IsdInfo {
    pub aid: String,
    pub lifecycle: u8,
    pub state: String,
    pub privileges: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadFileInfo {
    pub aid: String,
    pub lifecycle: u8,
    pub version: Option<String>,
    pub modules: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AppInfo {
    pub aid: String,
    pub lifecycle: u8,
    pub state: String,
    pub privileges: String,
    pub privilege_names: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CardListing {
    pub reader: String,
    pub key_version: u8,
    pub security_level: String,
    pub isd: Option<IsdInfo>,
    pub load_files: Vec<LoadFileInfo>,
    pub applications: Vec<AppInfo>,
}

pub fn card_state_name(s: u8) -> String {
    match s {
        card_state::OP_READY => "OP_READY".into(),
        card_state::INITIALIZED => "INITIALIZED".into(),
        card_state::SECURED => "SECURED".into(),
        card_state::CARD_LOCKED => "CARD_LOCKED".into(),
        card_state::TERMINATED => "TERMINATED".into(),
        other => format!("{other:02X}"),
    }
}

pub fn app_state_name(s: u8) -> String {
    match s {
        app_state::LOADED => "LOADED".into(),
        app_state::INSTALLED => "INSTALLED".into(),
        app_state::SELECTABLE => "SELECTABLE".into(),
        s if s & 0x80 != 0 => "LOCKED".into(),
        s if s & 0x07 == 0x07 => format!("SELECTABLE (application state {s:02X})"),
        other => format!("{other:02X}"),
    }
}

/// Names of the first privilege byte's bits (GP Card Spec v2.3 table 6-1).
pub fn privilege_names(p: &[u8]) -> Vec<String> {
    const BITS: [(u8, &str); 8] = [
        (0x80, "SecurityDomain"),
        (0x40, "DAPVerification"),
        (0x20, "DelegatedManagement"),
        (0x10, "CardLock"),
        (0x08, "CardTerminate"),
        (0x04, "CardReset"),
        (0x02, "CVMManagement"),
        (0x01, "MandatedDAPVerification"),
    ];
    let first = p.first().copied().unwrap_or(0);
    BITS.iter().filter(|(b, _)| first & b != 0).map(|(_, n)| (*n).to_string()).collect()
}

pub fn list(reader: Option<&str>, opts: &KeyOptions) -> Result<CardListing, GpToolError> {
    let auth = opts.resolve()?;
    with_card(reader, |id, t| {
        let mut gp = open_session(id, t, &auth)?;
        let e = |err| card_err(id, err);
        let isd = gp.get_status(StatusScope::IssuerSecurityDomain).map_err(e)?;
        // Load files with their modules (10); cards that do not offer it get 20.
        let files = match gp.get_status(StatusScope::LoadFilesAndModules) {
            Err(CardError::Status { sw, .. }) if sw == StatusWord::INCORRECT_P1P2 => {
                gp.get_status(StatusScope::LoadFiles).map_err(e)?
            }
            r => r.map_err(e)?,
        };
        let apps = gp.get_status(StatusScope::Applications).map_err(e)?;
        Ok(CardListing {
            reader: id.to_string(),
            key_version: gp.key_version(),
            security_level: gp.level().to_string(),
            isd: isd.first().map(|i| IsdInfo {
                aid: hex::encode_upper(&i.aid),
                lifecycle: i.lifecycle,
                state: card_state_name(i.lifecycle),
                privileges: hex::encode_upper(&i.privileges),
            }),
            load_files: files
                .iter()
                .map(|f| LoadFileInfo {
                    aid: hex::encode_upper(&f.aid),
                    lifecycle: f.lifecycle,
                    version: f.version.as_ref().map(|v| v.iter().map(u8::to_string).collect::<Vec<_>>().join(".")),
                    modules: f.modules.iter().map(hex::encode_upper).collect(),
                })
                .collect(),
            applications: apps
                .iter()
                .map(|a| AppInfo {
                    aid: hex::encode_upper(&a.aid),
                    lifecycle: a.lifecycle,
                    state: app_state_name(a.lifecycle),
                    privileges: hex::encode_upper(&a.privileges),
                    privilege_names: privilege_names(&a.privileges),
                })
                .collect(),
        })
    })
}

// ---- gp load / install / delete ------------------------------------------

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub reader: String,
    pub package_aid: String,
    pub package_version: String,
    pub load_file_size: usize,
    pub load_file_sha256: String,
    pub blocks: usize,
    pub block_size: usize,
}

pub fn load(
    reader: Option<&str>,
    opts: &KeyOptions,
    cap_path: &Path,
    with_descriptor: bool,
    block_size: Option<usize>,
) -> Result<LoadReport, GpToolError> {
    let auth = opts.resolve()?;
    let cap = CapFile::from_path(cap_path)?;
    let block_size = block_size.or(auth.block_size).unwrap_or(DEFAULT_BLOCK_SIZE);
    if !(1..=255).contains(&block_size) {
        return Err(GpToolError::Usage(format!("--block-size {block_size} is outside 1..=255")));
    }
    let data_block = cap.load_file_data_block(with_descriptor);
    let hash = cap.load_file_sha256(with_descriptor);
    with_card(reader, |id, t| {
        let mut gp = open_session(id, t, &auth)?;
        let mut blocks = 0;
        gp.load(cap.package_aid(), &hash, &data_block, block_size, &mut |_, total| blocks = total)
            .map_err(|e| card_err(id, e))?;
        let (major, minor) = cap.package_version();
        Ok(LoadReport {
            reader: id.to_string(),
            package_aid: hex::encode_upper(cap.package_aid()),
            package_version: format!("{major}.{minor}"),
            load_file_size: cap.load_file_len(with_descriptor),
            load_file_sha256: hex::encode(hash),
            blocks,
            block_size,
        })
    })
}

#[derive(Debug, Clone)]
pub struct InstallSpec {
    pub package: Vec<u8>,
    pub applet: Vec<u8>,
    pub instance: Option<Vec<u8>>,
    pub privileges: u8,
    pub params: Vec<u8>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstallReport {
    pub reader: String,
    pub instance_aid: String,
    pub state: String,
}

pub fn install(reader: Option<&str>, opts: &KeyOptions, spec: &InstallSpec) -> Result<InstallReport, GpToolError> {
    let auth = opts.resolve()?;
    let instance = spec.instance.clone().unwrap_or_else(|| spec.applet.clone());
    with_card(reader, |id, t| {
        let mut gp = open_session(id, t, &auth)?;
        let e = |err| card_err(id, err);
        gp.install_for_install(&spec.package, &spec.applet, &instance, spec.privileges, &spec.params).map_err(e)?;
        let apps = gp.get_status(StatusScope::Applications).map_err(e)?;
        let state = apps
            .iter()
            .find(|a| a.aid == instance)
            .map_or_else(|| "not listed after INSTALL".to_string(), |a| app_state_name(a.lifecycle));
        Ok(InstallReport { reader: id.to_string(), instance_aid: hex::encode_upper(&instance), state })
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct DeleteReport {
    pub reader: String,
    pub aid: String,
    pub related: bool,
}

pub fn delete(reader: Option<&str>, opts: &KeyOptions, aid: &[u8], related: bool) -> Result<DeleteReport, GpToolError> {
    let auth = opts.resolve()?;
    with_card(reader, |id, t| {
        let mut gp = open_session(id, t, &auth)?;
        if !gp.delete(aid, related).map_err(|e| card_err(id, e))? {
            return Err(GpToolError::NotFound { aid: hex::encode_upper(aid) });
        }
        Ok(DeleteReport { reader: id.to_string(), aid: hex::encode_upper(aid), related })
    })
}

// ---- gp rotate-keys ------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
pub struct RotateReport {
    pub reader: String,
    pub from: u8,
    pub to: u8,
    pub diversification: String,
    /// Key check values of the card's new ENC, MAC, DEK keys.
    pub kcvs: [String; 3],
}

/// PUT KEY replacing the key set in use with version `new_version`, keys
/// from `master` (per card with `scheme`); proven by a new session with the
/// new keys before reporting success.
pub fn rotate_keys(
    reader: Option<&str>,
    opts: &KeyOptions,
    new_version: u8,
    master: &str,
    scheme: Diversification,
) -> Result<RotateReport, GpToolError> {
    if !(1..=0x7F).contains(&new_version) {
        return Err(GpToolError::Usage(format!("--new-version {new_version} is outside 1..=127")));
    }
    let auth = opts.resolve()?;
    let master = StaticKeys::from_single(read_key("--master", master)?);
    let source = match scheme {
        Diversification::None => KeySource::Static(master),
        scheme => KeySource::Diversified { master, scheme },
    };
    with_card(reader, |id, t| {
        let mut gp = open_session(id, t, &auth)?;
        let from = gp.key_version();
        let keys = source.keys_for(gp.kdd());
        gp.put_keys(new_version, &keys, true).map_err(|e| card_err(id, e))?;
        let proof_auth = Auth {
            ring: KeyRing::new().with(new_version, source.clone()),
            requested: new_version,
            level: auth.level,
            block_size: None,
        };
        let proof = open_session(id, gp.into_transport(), &proof_auth)?;
        if proof.key_version() != new_version {
            return Err(card_err(
                id,
                CardError::verification(
                    "key rotation",
                    format!("card still reports key version {:02X}", proof.key_version()),
                ),
            ));
        }
        let kcvs = keys.kcvs().map(hex::encode_upper);
        Ok(RotateReport { reader: id.to_string(), from, to: new_version, diversification: scheme.to_string(), kcvs })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse() {
        assert_eq!(parse_key_version("1").expect("valid"), 1);
        assert_eq!(parse_key_version("FF").expect("valid"), 0xFF);
        assert_eq!(parse_key_version("0x20").expect("valid"), 0x20);
        assert!(parse_key_version("300").is_err());
        assert_eq!(parse_level("cmac-cdec-rmac").expect("valid"), SecurityLevel::CMacCDecRMac);
        assert!(parse_level("none").is_err());
        assert!(parse_aid("--package", "F054").is_err());
    }

    #[test]
    fn key_errors_never_echo_the_value() {
        let e = read_key("--key", "00112233445566778899AABBCCDDEEZZ").expect_err("refused").to_string();
        assert!(!e.contains("0011"), "{e}");
        assert_eq!(read_key("--key", "default").expect("valid"), StaticKeys::gp_default().enc);
    }

    #[test]
    fn card_choice_tries_the_keys_for_every_version() {
        let auth = KeyOptions::default().resolve().expect("valid");
        assert!(auth.ring.get(0xFF).is_some() && auth.ring.get(1).is_some());
        let auth = KeyOptions { key_version: 1, ..KeyOptions::default() }.resolve().expect("valid");
        assert_eq!(auth.ring.versions(), vec![1]);
    }
}
