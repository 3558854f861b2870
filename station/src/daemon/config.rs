//! The daemon's configuration file (`station daemon --config FILE`, YAML):
//! the station id, where the API listens and its token, the ledger and
//! report folders, the readers (emulated or PC/SC) and the profiles batches
//! may be started with. Unknown keys are rejected and every problem is
//! reported with file, line and field, as for profiles; the token is never
//! printed.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::Spanned;
use zeroize::Zeroizing;

use crate::profile::Problem;
use crate::sim::SimFaults;

/// Every problem found in one configuration file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::profile::write_problems(f, "configuration", &self.file, &self.problems)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    station_id: Spanned<String>,
    #[serde(default)]
    listen: Option<Spanned<String>>,
    #[serde(default)]
    token: Option<Spanned<String>>,
    ledger: Spanned<String>,
    /// PostgreSQL ledger: the local outbox file (default
    /// tapline-outbox-<station id>.db next to this file).
    #[serde(default)]
    outbox: Option<Spanned<String>>,
    #[serde(default)]
    reports: Option<Spanned<String>>,
    readers: RawReaders,
    profiles: Spanned<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReaders {
    #[serde(default)]
    sim: Option<RawSim>,
    #[serde(default)]
    pcsc: Option<RawPcsc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSim {
    readers: Spanned<usize>,
    #[serde(default)]
    card_speed: Option<Spanned<f64>>,
    #[serde(default)]
    faults: Option<Spanned<String>>,
    #[serde(default)]
    seed: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPcsc {
    #[serde(default)]
    include: Vec<String>,
    #[serde(default)]
    exclude: Vec<String>,
    #[serde(default)]
    feeder: Option<Spanned<String>>,
    /// A serial fixture (docs/fixtures.md): serial:/dev/ttyX[,power=/dev/ttyY].
    #[serde(default)]
    fixture: Option<Spanned<String>>,
}

/// Where the daemon's cards come from.
#[derive(Debug, Clone)]
pub enum ReaderSource {
    /// Emulated readers fed by the emulated feeder from an endless hopper.
    Sim { readers: usize, card_speed: f64, faults: SimFaults, seed: Option<u64> },
    /// The system's pcscd; `feeder` is the rig's control socket, if any;
    /// `fixture` a serial feeder/sorter (and power relays), if any.
    Pcsc {
        include: Vec<String>,
        exclude: Vec<String>,
        feeder: Option<SocketAddr>,
        fixture: Option<crate::fixture::FixtureSpec>,
    },
}

/// The daemon's validated configuration.
#[derive(Clone)]
pub struct DaemonConfig {
    pub file: PathBuf,
    pub station_id: String,
    pub listen: SocketAddr,
    /// Required on every `/api/` request when set; required when `listen`
    /// is not loopback.
    pub token: Option<Zeroizing<String>>,
    /// A SQLite file (relative to the config) or a postgres:// URL.
    pub ledger: crate::ledger::LedgerTarget,
    /// The outbox of a PostgreSQL ledger.
    pub outbox: PathBuf,
    pub reports: PathBuf,
    pub readers: ReaderSource,
    /// Profile name -> file.
    pub profiles: BTreeMap<String, PathBuf>,
}

impl fmt::Debug for DaemonConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DaemonConfig")
            .field("file", &self.file)
            .field("station_id", &self.station_id)
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "(set)"))
            .field("ledger", &self.ledger)
            .field("outbox", &self.outbox)
            .field("reports", &self.reports)
            .field("readers", &self.readers)
            .field("profiles", &self.profiles)
            .finish()
    }
}

/// The API's default address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

impl DaemonConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = crate::yaml::read(path).map_err(|message| ConfigError {
            file: path.to_path_buf(),
            problems: vec![Problem { line: 0, column: 0, field: "(file)".into(), message }],
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates configuration text; `path` names it in errors
    /// and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = crate::yaml::from_str(text).map_err(|e| {
            let (line, column, field, message) = crate::yaml::place(text, &e);
            ConfigError { file: path.to_path_buf(), problems: vec![Problem { line, column, field, message }] }
        })?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut problems = Vec::new();
        let mut problem = |line: u64, column: u64, field: &str, message: String| {
            problems.push(Problem { line, column, field: field.into(), message })
        };
        macro_rules! at {
            ($s:expr) => {
                ($s.referenced.line(), $s.referenced.column())
            };
        }
        let station_id = raw.station_id.value.trim().to_string();
        if station_id.is_empty()
            || !station_id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            let (l, c) = at!(raw.station_id);
            problem(l, c, "station_id", "must be non-empty letters, digits, '-', '_' or '.'".into());
        }
        let listen_text = raw.listen.as_ref().map_or(DEFAULT_LISTEN, |l| l.value.as_str());
        let listen = match listen_text.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                let (l, c) = raw.listen.as_ref().map_or((0, 0), |s| at!(s));
                problem(l, c, "listen", format!("{listen_text:?} is not HOST:PORT (e.g. {DEFAULT_LISTEN})"));
                None
            }
        };
        let token = match &raw.token {
            None => None,
            Some(t) => match resolve_secret(&t.value, &base) {
                Ok(v) if v.len() >= 16 => Some(v),
                Ok(_) => {
                    let (l, c) = at!(t);
                    problem(l, c, "token", "must be at least 16 characters".into());
                    None
                }
                Err(e) => {
                    let (l, c) = at!(t);
                    problem(l, c, "token", e);
                    None
                }
            },
        };
        if let Some(a) = listen
            && !a.ip().is_loopback()
            && token.is_none()
            && raw.token.is_none()
        {
            let (l, c) = raw.listen.as_ref().map_or((0, 0), |s| at!(s));
            problem(
                l,
                c,
                "listen",
                format!("{a} is not loopback: set `token` (env:NAME or file:PATH) to protect the API"),
            );
        }
        let readers = match (&raw.readers.sim, &raw.readers.pcsc) {
            (Some(s), None) => {
                let (l, c) = at!(s.readers);
                if !(1..=256).contains(&s.readers.value) {
                    problem(l, c, "readers.sim.readers", format!("{} is outside 1..=256", s.readers.value));
                }
                let speed = s.card_speed.as_ref().map_or(1.0, |v| v.value);
                if !(0.0..=100.0).contains(&speed) {
                    let (l, c) = s.card_speed.as_ref().map_or((0, 0), |v| at!(v));
                    problem(l, c, "readers.sim.card_speed", format!("{speed} is outside 0..=100"));
                }
                let faults = match s.faults.as_ref().map_or(Ok(SimFaults::default()), |f| f.value.parse()) {
                    Ok(f) => f,
                    Err(e) => {
                        let (l, c) = s.faults.as_ref().map_or((0, 0), |v| at!(v));
                        problem(l, c, "readers.sim.faults", format!("{e}"));
                        SimFaults::default()
                    }
                };
                Some(ReaderSource::Sim { readers: s.readers.value, card_speed: speed, faults, seed: s.seed })
            }
            (None, Some(p)) => {
                let feeder = match &p.feeder {
                    None => None,
                    Some(f) => match f.value.strip_prefix("rig:").and_then(|a| a.parse::<SocketAddr>().ok()) {
                        Some(a) => Some(a),
                        None => {
                            let (l, c) = at!(f);
                            problem(l, c, "readers.pcsc.feeder", "expected rig:HOST:PORT".into());
                            None
                        }
                    },
                };
                let fixture = match &p.fixture {
                    None => None,
                    Some(f) => match f.value.parse::<crate::fixture::FixtureSpec>() {
                        Ok(spec) => Some(spec),
                        Err(e) => {
                            let (l, c) = at!(f);
                            problem(l, c, "readers.pcsc.fixture", e);
                            None
                        }
                    },
                };
                if let (Some(_), Some(f)) = (&feeder, &p.fixture) {
                    let (l, c) = at!(f);
                    problem(l, c, "readers.pcsc.fixture", "give either `feeder` or `fixture`, not both".into());
                }
                Some(ReaderSource::Pcsc { include: p.include.clone(), exclude: p.exclude.clone(), feeder, fixture })
            }
            _ => {
                problem(0, 0, "readers", "give exactly one of `sim` or `pcsc`".into());
                None
            }
        };
        let mut profiles = BTreeMap::new();
        for (name, file) in &raw.profiles.value {
            let p = base.join(file);
            if !p.is_file() {
                let (l, c) = at!(raw.profiles);
                problem(l, c, &format!("profiles.{name}"), format!("{} does not exist", p.display()));
            }
            profiles.insert(name.clone(), p);
        }
        if raw.profiles.value.is_empty() {
            let (l, c) = at!(raw.profiles);
            problem(l, c, "profiles", "name at least one profile".into());
        }
        let reports = base.join(raw.reports.as_ref().map_or("reports", |r| r.value.as_str()));
        let ledger = match crate::ledger::LedgerTarget::parse(&raw.ledger.value) {
            Ok(crate::ledger::LedgerTarget::Sqlite(p)) => Some(crate::ledger::LedgerTarget::Sqlite(base.join(p))),
            Ok(t) => Some(t),
            Err(detail) => {
                let (l, c) = at!(raw.ledger);
                problem(l, c, "ledger", detail);
                None
            }
        };
        let outbox = base
            .join(raw.outbox.as_ref().map_or_else(|| format!("tapline-outbox-{station_id}.db"), |o| o.value.clone()));
        match (problems.is_empty(), listen, readers, ledger) {
            (true, Some(listen), Some(readers), Some(ledger)) => Ok(Self {
                file: path.to_path_buf(),
                station_id,
                listen,
                token,
                ledger,
                outbox,
                reports,
                readers,
                profiles,
            }),
            _ => Err(ConfigError { file: path.to_path_buf(), problems }),
        }
    }
}

/// A secret given as `env:NAME`, `file:PATH` or inline; errors name the
/// source, never the value.
fn resolve_secret(spec: &str, base: &Path) -> Result<Zeroizing<String>, String> {
    let s = spec.trim();
    if let Some(name) = s.strip_prefix("env:") {
        std::env::var(name).map(Zeroizing::new).map_err(|_| format!("environment variable {name} is not set"))
    } else if let Some(file) = s.strip_prefix("file:") {
        std::fs::read_to_string(base.join(file))
            .map(|t| Zeroizing::new(t.trim().to_string()))
            .map_err(|e| format!("cannot read token file {file}: {e}"))
    } else {
        Ok(Zeroizing::new(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DaemonConfig, ConfigError> {
        let dir = std::env::temp_dir();
        std::fs::write(dir.join("tapline-cfg-test-profile.yaml"), "x").expect("write");
        DaemonConfig::parse(text, &dir.join("station.yaml"))
    }

    #[test]
    fn a_complete_sim_config_parses_with_defaults() {
        let c = parse(
            "station_id: st-1\nledger: l.db\nreaders:\n  sim:\n    readers: 4\n    card_speed: 0\nprofiles:\n  demo: tapline-cfg-test-profile.yaml\n",
        )
        .expect("valid");
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert!(c.token.is_none());
        assert!(matches!(c.readers, ReaderSource::Sim { readers: 4, .. }));
        assert!(c.reports.ends_with("reports"));
    }

    #[test]
    fn a_postgres_ledger_gets_an_outbox_and_a_bad_url_names_the_field() {
        let c = parse(
            "station_id: st-2\nledger: postgres://tap:pw-secret@db/line\nreaders: {sim: {readers: 1}}\nprofiles: {demo: tapline-cfg-test-profile.yaml}\n",
        )
        .expect("valid");
        assert!(matches!(c.ledger, crate::ledger::LedgerTarget::Postgres(_)));
        assert!(c.outbox.ends_with("tapline-outbox-st-2.db"), "{}", c.outbox.display());
        assert!(!format!("{c:?}").contains("pw-secret"), "the password never shows");
        let e = parse(
            "station_id: st-2\nledger: postgres://db:port/line\nreaders: {sim: {readers: 1}}\nprofiles: {demo: tapline-cfg-test-profile.yaml}\n",
        )
        .expect_err("bad url");
        assert!(e.to_string().contains("ledger"), "{e}");
    }

    #[test]
    fn every_problem_is_reported_with_its_place_and_no_token_is_echoed() {
        let e = parse(
            "station_id: 'bad id'\nlisten: 0.0.0.0:9464\nledger: l.db\nreaders:\n  sim:\n    readers: 0\nprofiles:\n  demo: missing.yaml\n",
        )
        .expect_err("invalid");
        let text = e.to_string();
        for field in ["station_id", "listen", "readers.sim.readers", "profiles.demo"] {
            assert!(e.problems.iter().any(|p| p.field == field), "{field} missing in {text}");
        }
        assert!(text.contains("station.yaml:2:"), "{text}");
        let e = parse(
            "station_id: s\nledger: l\ntoken: short-secret-x\nreaders: {sim: {readers: 1}}\nprofiles: {demo: tapline-cfg-test-profile.yaml}\n",
        )
        .expect_err("short token");
        assert!(!e.to_string().contains("short-secret-x"), "{e}");
        let e = parse("station_id: s\nledger: l\nreadrs: {}\n").expect_err("unknown key");
        assert!(e.to_string().contains("readrs"), "{e}");
    }

    #[test]
    fn a_serial_fixture_is_configured_and_a_bad_one_reported_in_place() {
        let c = parse(
            "station_id: s\nledger: l\nreaders:\n  pcsc:\n    fixture: serial:/dev/ttyUSB0,power=/dev/ttyUSB1\nprofiles: {demo: tapline-cfg-test-profile.yaml}\n",
        )
        .expect("valid");
        let ReaderSource::Pcsc { fixture: Some(spec), .. } = c.readers else { panic!("no fixture") };
        assert_eq!((spec.port.as_str(), spec.power.as_deref()), ("/dev/ttyUSB0", Some("/dev/ttyUSB1")));
        let e = parse(
            "station_id: s\nledger: l\nreaders:\n  pcsc:\n    fixture: /dev/ttyUSB0\nprofiles: {demo: tapline-cfg-test-profile.yaml}\n",
        )
        .expect_err("no serial: prefix");
        assert!(e.problems.iter().any(|p| p.field == "readers.pcsc.fixture"), "{e}");
        assert!(e.to_string().contains("station.yaml:5:"), "{e}");
    }
}
