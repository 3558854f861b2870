//! Firmware releases: a directory with a CAP file, `manifest.yaml` and
//! `manifest.sig` (a release key's ECDSA signature over the manifest bytes).
//! The station refuses a firmware whose signature, CAP hash, load-file hash
//! or AIDs do not verify, before it touches any card.

use std::fmt;
use std::path::{Path, PathBuf};

use card::cap::CapFile;
use k256::ecdsa::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const MANIFEST: &str = "manifest.yaml";
pub const SIGNATURE: &str = "manifest.sig";
/// Domain label of manifest signatures.
const MANIFEST_DOMAIN: &[u8] = b"TAPLINE/firmware-manifest/v1";

/// One applet instance the firmware installs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestApplet {
    pub class_aid: String,
    pub instance_aid: String,
    /// GP privileges byte, hex.
    pub privileges: String,
    /// Application specific install parameters, hex (wrapped in C9).
    pub install_params: String,
}

/// `manifest.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    /// CAP file name inside the firmware directory.
    pub cap: String,
    pub cap_sha256: String,
    pub package_aid: String,
    /// Package version as "major.minor", from the CAP Header.
    pub package_version: String,
    /// Load file order: whether the Descriptor component is loaded.
    pub with_descriptor: bool,
    /// SHA-256 of the load file (what the card reports in ATTEST).
    pub load_file_sha256: String,
    pub applets: Vec<ManifestApplet>,
}

#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("firmware {dir}: cannot read {file}: {source}")]
    Io {
        dir: PathBuf,
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("firmware {dir}: {file} is malformed: {detail}")]
    Malformed { dir: PathBuf, file: String, detail: String },
    #[error("firmware {dir}: manifest signature does not verify against any pinned release key")]
    BadSignature { dir: PathBuf },
    #[error("firmware {dir}: {field} mismatch: manifest says {expected}, {actual_from} gives {actual}")]
    Mismatch { dir: PathBuf, field: &'static str, expected: String, actual_from: String, actual: String },
    #[error("firmware {dir}: CAP file: {source}")]
    Cap {
        dir: PathBuf,
        #[source]
        source: card::cap::CapError,
    },
}

/// A verified firmware, ready to load.
#[derive(Clone)]
pub struct Firmware {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub package_aid: Vec<u8>,
    pub package_version: (u8, u8),
    pub load_file_sha256: [u8; 32],
    /// The C4-wrapped load file, split into LOAD blocks by the recipe.
    pub load_file_data_block: Vec<u8>,
    pub applets: Vec<InstallSpec>,
}

impl fmt::Debug for Firmware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Firmware({} {} at {})", self.manifest.name, self.manifest.version, self.dir.display())
    }
}

/// One applet instance to install, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallSpec {
    pub class_aid: Vec<u8>,
    pub instance_aid: Vec<u8>,
    pub privileges: u8,
    pub params: Vec<u8>,
}

fn manifest_digest(bytes: &[u8]) -> [u8; 32] {
    let inner: [u8; 32] = Sha256::digest(bytes).into();
    card::wallet::message_digest(MANIFEST_DOMAIN, &[&inner])
}

/// Signs manifest bytes with a release key (the release tool's side).
pub fn sign_manifest(key: &SigningKey, manifest: &[u8]) -> String {
    hex::encode(card::wallet::sign_digest(key, &manifest_digest(manifest)))
}

fn read(dir: &Path, file: &str) -> Result<Vec<u8>, FirmwareError> {
    std::fs::read(dir.join(file)).map_err(|source| FirmwareError::Io {
        dir: dir.to_path_buf(),
        file: file.to_string(),
        source,
    })
}

fn parse_hex(dir: &Path, field: &str, s: &str) -> Result<Vec<u8>, FirmwareError> {
    hex::decode(s.trim()).map_err(|e| FirmwareError::Malformed {
        dir: dir.to_path_buf(),
        file: MANIFEST.to_string(),
        detail: format!("{field}: {e}"),
    })
}

/// Reads the manifest, refusing one larger than any YAML file the station
/// reads (`yaml::MAX_FILE_BYTES`) before reading it: it is hashed before its
/// signature says whether it is ours.
fn read_manifest(dir: &Path) -> Result<Vec<u8>, FirmwareError> {
    let path = dir.join(MANIFEST);
    let io = |source| FirmwareError::Io { dir: dir.to_path_buf(), file: MANIFEST.to_string(), source };
    let size = std::fs::metadata(&path).map_err(io)?.len();
    if size > crate::yaml::MAX_FILE_BYTES {
        return Err(FirmwareError::Malformed {
            dir: dir.to_path_buf(),
            file: MANIFEST.to_string(),
            detail: format!("{size} bytes: larger than {} KiB", crate::yaml::MAX_FILE_BYTES / 1024),
        });
    }
    read(dir, MANIFEST)
}

impl Firmware {
    /// Loads and verifies a firmware directory against the pinned release keys.
    pub fn load(dir: &Path, release_keys: &[VerifyingKey]) -> Result<Self, FirmwareError> {
        let manifest_bytes = read_manifest(dir)?;
        let sig_text = read(dir, SIGNATURE)?;
        let manifest = Self::verify_manifest(dir, &manifest_bytes, &sig_text, release_keys)?;
        Self::from_manifest(dir, manifest)
    }

    /// The file-free first half of [`Firmware::load`]: checks `sig_text`
    /// (the contents of `manifest.sig`) over `manifest_bytes` against the
    /// pinned release keys, then parses the manifest. `dir` only names the
    /// firmware in errors. (The fuzz targets call this directly.)
    pub fn verify_manifest(
        dir: &Path,
        manifest_bytes: &[u8],
        sig_text: &[u8],
        release_keys: &[VerifyingKey],
    ) -> Result<Manifest, FirmwareError> {
        let sig = hex::decode(String::from_utf8_lossy(sig_text).trim()).map_err(|e| FirmwareError::Malformed {
            dir: dir.to_path_buf(),
            file: SIGNATURE.to_string(),
            detail: e.to_string(),
        })?;
        let digest = manifest_digest(manifest_bytes);
        if !release_keys.iter().any(|k| card::wallet::verify_digest(k, &digest, &sig)) {
            return Err(FirmwareError::BadSignature { dir: dir.to_path_buf() });
        }
        let text = std::str::from_utf8(manifest_bytes).map_err(|e| FirmwareError::Malformed {
            dir: dir.to_path_buf(),
            file: MANIFEST.to_string(),
            detail: e.to_string(),
        })?;
        crate::yaml::from_str(text).map_err(|e| {
            let (line, column, key, message) = crate::yaml::place(text, &e);
            FirmwareError::Malformed {
                dir: dir.to_path_buf(),
                file: if line > 0 { format!("{MANIFEST}:{line}:{column}") } else { MANIFEST.to_string() },
                detail: format!("{key}: {message}"),
            }
        })
    }

    fn from_manifest(dir: &Path, manifest: Manifest) -> Result<Self, FirmwareError> {
        if manifest.cap.contains('/') || manifest.cap.contains("..") {
            return Err(FirmwareError::Malformed {
                dir: dir.to_path_buf(),
                file: MANIFEST.to_string(),
                detail: format!("cap: {:?} must be a file name inside the firmware directory", manifest.cap),
            });
        }
        let cap_bytes = read(dir, &manifest.cap)?;
        Self::from_manifest_and_cap(dir, manifest, &cap_bytes)
    }

    /// The file-free second half of [`Firmware::load`]: checks a parsed
    /// manifest against the bytes of its CAP file (hashes, package AID and
    /// version, applet AIDs) and decodes the install specs. `dir` only names
    /// the firmware in errors. (The fuzz targets call this directly.)
    pub fn from_manifest_and_cap(dir: &Path, manifest: Manifest, cap_bytes: &[u8]) -> Result<Self, FirmwareError> {
        let mismatch = |field, expected: String, actual_from: &str, actual: String| FirmwareError::Mismatch {
            dir: dir.to_path_buf(),
            field,
            expected,
            actual_from: actual_from.to_string(),
            actual,
        };
        let cap_hash = hex::encode(Sha256::digest(cap_bytes));
        if !cap_hash.eq_ignore_ascii_case(manifest.cap_sha256.trim()) {
            let from = format!("the CAP file {}", manifest.cap);
            return Err(mismatch("cap_sha256", manifest.cap_sha256.clone(), &from, cap_hash));
        }
        let cap =
            CapFile::from_bytes(cap_bytes).map_err(|source| FirmwareError::Cap { dir: dir.to_path_buf(), source })?;
        let package_aid = parse_hex(dir, "package_aid", &manifest.package_aid)?;
        if package_aid != cap.package_aid() {
            return Err(mismatch(
                "package_aid",
                manifest.package_aid.clone(),
                "the CAP Header",
                hex::encode_upper(cap.package_aid()),
            ));
        }
        let version = format!("{}.{}", cap.package_version().0, cap.package_version().1);
        if version != manifest.package_version {
            return Err(mismatch("package_version", manifest.package_version.clone(), "the CAP Header", version));
        }
        let load_hash = cap.load_file_sha256(manifest.with_descriptor);
        if !hex::encode(load_hash).eq_ignore_ascii_case(manifest.load_file_sha256.trim()) {
            return Err(mismatch(
                "load_file_sha256",
                manifest.load_file_sha256.clone(),
                "the CAP load file",
                hex::encode(load_hash),
            ));
        }
        let mut applets = Vec::new();
        for (i, a) in manifest.applets.iter().enumerate() {
            let class_aid = parse_hex(dir, &format!("applets[{i}].class_aid"), &a.class_aid)?;
            if !cap.applet_aids().contains(&class_aid.as_slice()) {
                return Err(mismatch(
                    "applets.class_aid",
                    a.class_aid.clone(),
                    "the CAP Applet component",
                    cap.applet_aids().iter().map(hex::encode_upper).collect::<Vec<_>>().join(","),
                ));
            }
            let privileges = parse_hex(dir, &format!("applets[{i}].privileges"), &a.privileges)?;
            let [privileges] = privileges[..] else {
                return Err(FirmwareError::Malformed {
                    dir: dir.to_path_buf(),
                    file: MANIFEST.to_string(),
                    detail: format!("applets[{i}].privileges: one byte expected"),
                });
            };
            applets.push(InstallSpec {
                class_aid,
                instance_aid: parse_hex(dir, &format!("applets[{i}].instance_aid"), &a.instance_aid)?,
                privileges,
                params: parse_hex(dir, &format!("applets[{i}].install_params"), &a.install_params)?,
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            package_aid,
            package_version: cap.package_version(),
            load_file_sha256: load_hash,
            load_file_data_block: cap.load_file_data_block(manifest.with_descriptor),
            applets,
            manifest,
        })
    }
}

/// Writes a firmware release directory: copies the CAP, writes the manifest
/// and signs it (the release tool behind `station firmware pack`).
pub fn pack(
    cap_path: &Path,
    out: &Path,
    name: &str,
    version: &str,
    with_descriptor: bool,
    applets: Vec<ManifestApplet>,
    key: &SigningKey,
) -> Result<Manifest, FirmwareError> {
    let io = |file: &Path| {
        let (dir, file) = (out.to_path_buf(), file.display().to_string());
        move |source| FirmwareError::Io { dir, file, source }
    };
    let cap_bytes = std::fs::read(cap_path).map_err(io(cap_path))?;
    let cap =
        CapFile::from_bytes(&cap_bytes).map_err(|source| FirmwareError::Cap { dir: out.to_path_buf(), source })?;
    let file_name = cap_path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| FirmwareError::Malformed {
            dir: out.to_path_buf(),
            file: cap_path.display().to_string(),
            detail: "not a file name".into(),
        })?
        .to_string();
    let applets = if applets.is_empty() {
        cap.applet_aids()
            .iter()
            .map(|a| ManifestApplet {
                class_aid: hex::encode_upper(a),
                instance_aid: hex::encode_upper(a),
                privileges: "00".into(),
                install_params: String::new(),
            })
            .collect()
    } else {
        applets
    };
    let manifest = Manifest {
        name: name.to_string(),
        version: version.to_string(),
        cap: file_name.clone(),
        cap_sha256: hex::encode(Sha256::digest(&cap_bytes)),
        package_aid: hex::encode_upper(cap.package_aid()),
        package_version: format!("{}.{}", cap.package_version().0, cap.package_version().1),
        with_descriptor,
        load_file_sha256: hex::encode(cap.load_file_sha256(with_descriptor)),
        applets,
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let text = serde_saphyr::to_string(&manifest).map_err(|e| FirmwareError::Malformed {
        dir: out.to_path_buf(),
        file: MANIFEST.into(),
        detail: e.to_string(),
    })?;
    let target = out.join(&file_name);
    if cap_path.canonicalize().ok() != target.canonicalize().ok() {
        std::fs::write(&target, &cap_bytes).map_err(io(&target))?;
    }
    std::fs::write(out.join(MANIFEST), text.as_bytes()).map_err(io(Path::new(MANIFEST)))?;
    std::fs::write(out.join(SIGNATURE), format!("{}\n", sign_manifest(key, text.as_bytes())))
        .map_err(io(Path::new(SIGNATURE)))?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware/wallet-demo")
    }

    fn demo_release_key() -> VerifyingKey {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware/keys/DEMO-ONLY-release.key.pub"),
        )
        .expect("demo release public key");
        VerifyingKey::from_sec1_bytes(&hex::decode(text.trim()).expect("hex")).expect("key")
    }

    /// A copy of the demo firmware to tamper with.
    fn copy_demo() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for entry in std::fs::read_dir(demo_dir()).expect("demo dir") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
        }
        dir
    }

    #[test]
    fn demo_firmware_verifies() {
        let fw = Firmware::load(&demo_dir(), &[demo_release_key()]).expect("verifies");
        assert_eq!(fw.package_aid, card::wallet::PACKAGE_AID);
        assert_eq!(fw.applets[0].instance_aid, card::wallet::APPLET_AID);
        assert_eq!(fw.load_file_data_block[0], 0xC4);
    }

    #[test]
    fn another_release_key_is_refused() {
        let other = SigningKey::from_slice(&[7; 32]).expect("key");
        let err = Firmware::load(&demo_dir(), &[*other.verifying_key()]).expect_err("unpinned signer");
        assert!(matches!(err, FirmwareError::BadSignature { .. }), "{err}");
    }

    #[test]
    fn an_edited_manifest_is_refused() {
        let dir = copy_demo();
        let m = dir.path().join(MANIFEST);
        let text = std::fs::read_to_string(&m).expect("manifest");
        std::fs::write(&m, text.replace("version: \"1.0.0\"", "version: \"1.0.1\"")).expect("write");
        let err = Firmware::load(dir.path(), &[demo_release_key()]).expect_err("tampered");
        assert!(matches!(err, FirmwareError::BadSignature { .. }), "{err}");
    }

    #[test]
    fn a_swapped_cap_file_is_refused_by_hash() {
        let dir = copy_demo();
        let cap = dir.path().join("tapline-wallet-demo.cap");
        let mut bytes = std::fs::read(&cap).expect("cap");
        let n = bytes.len();
        bytes[n / 2] ^= 0x01;
        std::fs::write(&cap, bytes).expect("write");
        let err = Firmware::load(dir.path(), &[demo_release_key()]).expect_err("tampered CAP");
        assert!(matches!(err, FirmwareError::Mismatch { field: "cap_sha256", .. }), "{err}");
        assert!(err.to_string().contains("cap_sha256"), "{err}");
    }

    #[test]
    fn a_signed_manifest_that_lies_about_the_load_file_is_refused() {
        let dir = copy_demo();
        let key = SigningKey::from_slice(&[9; 32]).expect("key");
        let m = dir.path().join(MANIFEST);
        let text = std::fs::read_to_string(&m).expect("manifest");
        let lie = text.replace("with_descriptor: false", "with_descriptor: true");
        std::fs::write(&m, &lie).expect("write");
        std::fs::write(dir.path().join(SIGNATURE), sign_manifest(&key, lie.as_bytes())).expect("sig");
        let err = Firmware::load(dir.path(), &[*key.verifying_key()]).expect_err("hash lie");
        assert!(matches!(err, FirmwareError::Mismatch { field: "load_file_sha256", .. }), "{err}");
    }

    #[test]
    fn missing_files_name_the_file() {
        let dir = copy_demo();
        std::fs::remove_file(dir.path().join(SIGNATURE)).expect("rm");
        let err = Firmware::load(dir.path(), &[demo_release_key()]).expect_err("no signature");
        assert!(err.to_string().contains(SIGNATURE), "{err}");
    }

    #[test]
    fn pack_then_load_round_trips() {
        let out = tempfile::tempdir().expect("tempdir");
        let key = SigningKey::from_slice(&[5; 32]).expect("key");
        let cap = demo_dir().join("tapline-wallet-demo.cap");
        let m = pack(&cap, out.path(), "t", "2.0.0", true, Vec::new(), &key).expect("pack");
        assert!(m.with_descriptor);
        let fw = Firmware::load(out.path(), &[*key.verifying_key()]).expect("loads");
        assert_eq!(fw.manifest, m);
    }
}
