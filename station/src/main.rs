//! `station`: the Tapline provisioning station's command line.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use card::transport::ReaderMonitor;
use card::transport::pcsc::PcscMonitor;
use clap::{Parser, Subcommand, ValueEnum};
use station::batch::{self, Summary};
use station::control::{Action, Controller, OneBatch};
use station::daemon::Daemon;
use station::daemon::config::DaemonConfig;
use station::firmware::{self, Firmware};
use station::gp_tool;
use station::handler::{CardHandler, EmuFeeder, ManualHandler, RigFeeder};
use station::http::{Api, Server};
use station::ledger::{BatchInfo, Ledger, LedgerTarget, OpenOptions, export};
use station::live::Live;
use station::profile::Profile;
use station::recipe::{Progress, Recipe};
use station::sim::{self, SimFaults};
use station::state::BatchStart;
use station::worker::{Control, Event, LaneState};

#[derive(Parser)]
#[command(name = "station", version, about = "Tapline provisioning station")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on standard error (or the --log-file): human or json.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax, e.g. info or station=debug);
    /// `trace` adds APDU traces with secrets redacted. RUST_LOG overrides.
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,
    /// Write logs to this file instead of standard error (the dashboard
    /// owns the terminal; without this flag its logs go to the batch's
    /// report folder).
    #[arg(long, global = true, value_name = "FILE")]
    log_file: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a batch: provision cards on readers until COUNT reached a final state.
    Run(RunArgs),
    /// Read the ledger.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Write a batch's report folder (report.md, report.html with charts, the
    /// batch's ledger export) from the ledger.
    Report {
        /// The ledger: a SQLite file or a postgres:// URL.
        #[arg(long, default_value = "tapline-ledger.db", value_parser = LedgerTarget::parse)]
        ledger: LedgerTarget,
        /// The batch's name, or its id (`batches.id`).
        #[arg(long, value_name = "ID_OR_NAME")]
        batch: String,
        /// Folder to write to (default reports/<batch name>, where `station
        /// run` put the bundle labels).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Inspect, verify and pack firmware.
    Firmware {
        #[command(subcommand)]
        command: FirmwareCommand,
    },
    /// Validate profiles.
    Profile {
        #[command(subcommand)]
        command: ProfileCommand,
    },
    /// Check what real operation needs (pcscd, readers, permissions, profile) and say how to fix it.
    Doctor {
        /// Also check this profile and its firmware.
        #[arg(long, value_name = "FILE")]
        profile: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// GlobalPlatform utility commands for one card (rework).
    Gp {
        #[command(subcommand)]
        command: GpCommand,
    },
    /// The terminal dashboard of a running station (`station run --listen`
    /// or `station daemon`), from another terminal or machine; with several
    /// --connect, the line view (a summary tab and one tab per station).
    Dash {
        /// The station's API address, HOST:PORT or http://HOST:PORT; repeat it
        /// to watch a line of stations.
        #[arg(long, value_name = "HOST:PORT", required = true)]
        connect: Vec<String>,
        /// The API token (every station's): env:NAME or file:PATH.
        #[arg(long, value_name = "SOURCE")]
        token: Option<String>,
    },
    /// Run all shift: own the readers and the ledger, take batches through
    /// the HTTP API (and `station dash --connect`); SIGTERM drains, SIGHUP
    /// reloads the profiles.
    Daemon {
        /// The daemon's configuration (YAML; see deploy/station.yaml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Seconds a SIGTERM waits for cards in flight before interrupting them.
        #[arg(long, default_value_t = 60, value_name = "SECONDS")]
        drain_timeout: u64,
    },
}

/// Reader and card manager keys, common to every `gp` command.
#[derive(clap::Args)]
struct GpKeyArgs {
    /// The reader (name or glob); required when more than one reader has a card.
    #[arg(long, value_name = "NAME_OR_GLOB")]
    reader: Option<String>,
    /// Key version for INITIALIZE UPDATE (decimal or hex like FF); 0 = the card's choice.
    #[arg(long, default_value = "0", value_name = "N", value_parser = parse_kvn)]
    key_version: u8,
    /// One key for ENC, MAC and DEK: HEX, env:NAME, file:PATH, or `default`
    /// (the GP test keys 40..4F, used when no key is given).
    #[arg(long, value_name = "KEY", conflicts_with_all = ["enc", "mac", "dek", "profile"])]
    key: Option<String>,
    #[arg(long, value_name = "KEY", requires_all = ["mac", "dek"], conflicts_with = "profile")]
    enc: Option<String>,
    #[arg(long, value_name = "KEY", requires_all = ["enc", "dek"], conflicts_with = "profile")]
    mac: Option<String>,
    #[arg(long, value_name = "KEY", requires_all = ["enc", "mac"], conflicts_with = "profile")]
    dek: Option<String>,
    /// Secure channel level: cmac, cmac-cdec, cmac-rmac, cmac-cdec-rmac
    /// (default cmac-cdec-rmac, or the profile's).
    #[arg(long, value_name = "LEVEL", value_parser = parse_level)]
    level: Option<card::gp::scp03::SecurityLevel>,
    /// Take the keys (factory and rotation) and level from a profile.
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
}

impl GpKeyArgs {
    fn options(&self, diversification: card::gp::keys::Diversification) -> gp_tool::KeyOptions {
        gp_tool::KeyOptions {
            key_version: self.key_version,
            key: self.key.clone(),
            enc: self.enc.clone(),
            mac: self.mac.clone(),
            dek: self.dek.clone(),
            diversification,
            level: self.level,
            profile: self.profile.clone(),
        }
    }
}

fn parse_kvn(s: &str) -> Result<u8, String> {
    gp_tool::parse_key_version(s).map_err(|e| e.to_string())
}

fn parse_level(s: &str) -> Result<card::gp::scp03::SecurityLevel, String> {
    gp_tool::parse_level(s).map_err(|e| e.to_string())
}

fn parse_div(s: &str) -> Result<card::gp::keys::Diversification, String> {
    s.parse().map_err(|e: card::gp::keys::KeyError| e.to_string())
}

#[derive(Subcommand)]
enum GpCommand {
    /// ISD state, key version, load files and applications (GET STATUS).
    List {
        #[command(flatten)]
        keys: GpKeyArgs,
        /// Derive per-card keys from --key/--enc/--mac/--dek as master keys.
        #[arg(long, visible_alias = "key-diversification", default_value = "none", value_parser = parse_div)]
        diversification: card::gp::keys::Diversification,
        #[arg(long)]
        json: bool,
    },
    /// INSTALL [for load] and LOAD a CAP file.
    Load {
        cap: PathBuf,
        #[command(flatten)]
        keys: GpKeyArgs,
        #[arg(long, visible_alias = "key-diversification", default_value = "none", value_parser = parse_div)]
        diversification: card::gp::keys::Diversification,
        /// Include the Descriptor component in the load file.
        #[arg(long)]
        with_descriptor: bool,
        /// Bytes of load file data per LOAD command (default 240, or the profile's).
        #[arg(long, value_name = "N")]
        block_size: Option<usize>,
    },
    /// INSTALL [for install and make selectable] an applet instance.
    Install {
        #[command(flatten)]
        keys: GpKeyArgs,
        #[arg(long, visible_alias = "key-diversification", default_value = "none", value_parser = parse_div)]
        diversification: card::gp::keys::Diversification,
        /// Load file (package) AID.
        #[arg(long, value_name = "AID")]
        package: String,
        /// Applet class AID.
        #[arg(long, value_name = "AID")]
        applet: String,
        /// Instance AID (default: the applet AID).
        #[arg(long, value_name = "AID")]
        instance: Option<String>,
        /// Privileges byte, hex.
        #[arg(long, default_value = "00", value_name = "HEX")]
        privileges: String,
        /// Install parameters (application specific, wrapped in C9), hex.
        #[arg(long, default_value = "", value_name = "HEX")]
        params: String,
    },
    /// DELETE an application or load file.
    Delete {
        aid: String,
        #[command(flatten)]
        keys: GpKeyArgs,
        #[arg(long, visible_alias = "key-diversification", default_value = "none", value_parser = parse_div)]
        diversification: card::gp::keys::Diversification,
        /// Also delete the load file's applications.
        #[arg(long)]
        related: bool,
    },
    /// PUT KEY: replace the key set in use with a new version from a master key.
    RotateKeys {
        #[command(flatten)]
        keys: GpKeyArgs,
        /// Diversification of the CURRENT keys (--key as master).
        #[arg(long, default_value = "none", value_parser = parse_div)]
        key_diversification: card::gp::keys::Diversification,
        /// The new key version (1..127).
        #[arg(long, value_name = "N", value_parser = parse_kvn)]
        new_version: u8,
        /// The new master key: HEX, env:NAME or file:PATH.
        #[arg(long, value_name = "KEY")]
        master: String,
        /// Diversification of the NEW keys from --master.
        #[arg(long, default_value = "none", value_parser = parse_div)]
        diversification: card::gp::keys::Diversification,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The profile (YAML) to provision with.
    #[arg(long)]
    profile: PathBuf,
    /// Run on N emulated readers (the emulated feeder supplies the cards).
    #[arg(long, value_name = "N", conflicts_with = "pcsc", required_unless_present = "pcsc")]
    sim: Option<usize>,
    /// Run on the PC/SC readers of the system's pcscd (real readers, or
    /// emulated cards behind vpcd).
    #[arg(long)]
    pcsc: bool,
    /// With --pcsc: only readers whose name matches (glob, repeatable;
    /// added to the profile's readers.include).
    #[arg(long = "reader-include", value_name = "PATTERN")]
    reader_include: Vec<String>,
    /// With --pcsc: skip readers whose name matches (glob, repeatable).
    #[arg(long = "reader-exclude", value_name = "PATTERN")]
    reader_exclude: Vec<String>,
    /// With --pcsc: the card feeder; `rig:HOST:PORT` is the rig's emulated
    /// feeder behind vpcd. Without it the operator removes and inserts cards.
    #[arg(long, value_name = "FEEDER")]
    feeder: Option<String>,
    /// With --pcsc: a serial card fixture (docs/fixtures.md) that bins each
    /// card PASS/FAIL, feeds the next and power-cycles a reader that stops
    /// answering: serial:/dev/ttyX[,power=/dev/ttyY][,cycle-ms=N].
    #[arg(long, value_name = "SPEC", conflicts_with_all = ["feeder", "sim"])]
    fixture: Option<String>,
    /// Cards to take to a final state.
    #[arg(long, value_name = "COUNT")]
    cards: usize,
    /// Emulated card speed: 1.0 = realistic latency, 0 = instant.
    #[arg(long, default_value_t = 1.0, value_name = "F")]
    card_speed: f64,
    /// The ledger: a SQLite file, or postgres://USER@HOST/DB for a line of
    /// stations on one database (default: the profile's `ledger`, else
    /// tapline-ledger.db).
    #[arg(long, value_parser = LedgerTarget::parse)]
    ledger: Option<LedgerTarget>,
    /// With a PostgreSQL ledger: the local outbox that keeps ops while the
    /// database is unreachable (default tapline-outbox-<station id>.db).
    #[arg(long, value_name = "FILE")]
    outbox: Option<PathBuf>,
    /// Plain progress lines instead of the terminal dashboard.
    #[arg(long)]
    headless: bool,
    /// Faulty cards to mix in, e.g. counterfeit=0.05,tear=0.05,selftest=0.02.
    #[arg(long, default_value = "", value_name = "SPEC")]
    sim_faults: String,
    /// Seed of the emulated chip factory (random when absent; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Batch name for the ledger (default: derived from the time).
    #[arg(long)]
    batch: Option<String>,
    /// Folder for the batch's files (bundle labels); default reports/<batch>.
    #[arg(long)]
    report_dir: Option<PathBuf>,
    /// Serve /metrics, /healthz and the API (/api/status, /api/actions) here
    /// while the batch runs, e.g. 127.0.0.1:9464. A non-loopback address
    /// needs --token.
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// The API token: env:NAME or file:PATH (required on every /api/ request).
    #[arg(long, value_name = "SOURCE")]
    token: Option<String>,
    /// The station id on every ledger record, metrics and the dashboard
    /// (default: the profile's `station_id`, else the host name).
    #[arg(long, value_name = "ID")]
    station_id: Option<String>,
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Export cards and bundles.
    Export {
        /// The ledger: a SQLite file or a postgres:// URL.
        #[arg(long, default_value = "tapline-ledger.db", value_parser = LedgerTarget::parse)]
        ledger: LedgerTarget,
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check the audit log: the hash chain, each batch's signed head, and
    /// that the cards, bundles, batches and steps are what the log says.
    /// Exits non-zero naming the first bad row.
    Verify {
        /// The ledger: a SQLite file (PostgreSQL ledgers keep no audit log:
        /// docs/ledger.md).
        #[arg(long, default_value = "tapline-ledger.db", value_parser = LedgerTarget::parse)]
        ledger: LedgerTarget,
        /// The station's audit public key (hex, or a file holding it) that
        /// heads must be signed with.
        #[arg(long, value_name = "HEX_OR_FILE")]
        public_key: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Copy a station's SQLite ledger into a PostgreSQL ledger. Idempotent:
    /// what is already there is left alone, so a second run adds nothing.
    Sync {
        /// The station's SQLite ledger file.
        #[arg(long)]
        from: PathBuf,
        /// The PostgreSQL ledger, postgres://USER@HOST/DB.
        #[arg(long, value_parser = LedgerTarget::parse)]
        to: LedgerTarget,
        /// Station id for rows written before ledgers had one (default: the
        /// host name).
        #[arg(long, value_name = "ID")]
        station_id: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Json,
    Csv,
}

#[derive(Subcommand)]
enum FirmwareCommand {
    /// Show a CAP file's package, applets, components and load file hash.
    Inspect {
        cap: PathBuf,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        with_descriptor: bool,
    },
    /// Check a firmware directory's manifest signature and hashes.
    Verify {
        dir: PathBuf,
        /// Pinned release public key (hex); repeatable.
        #[arg(long = "release-key")]
        release_keys: Vec<String>,
        /// Take the pinned release keys from this profile.
        #[arg(long)]
        profile: Option<PathBuf>,
    },
    /// Make a release signing key pair: FILE (private, hex) and FILE.pub.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Make a signed firmware release directory from a CAP file.
    Pack {
        #[arg(long)]
        cap: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        /// Release signing key file (hex private key).
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        with_descriptor: bool,
    },
}

#[derive(Subcommand)]
enum ProfileCommand {
    /// Validate a profile and its firmware.
    Check { file: PathBuf },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli) {
        eprintln!("station: {e:#}");
        return std::process::ExitCode::FAILURE;
    }
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("station: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Human or JSON logs to standard error or a file. The daemon logs at info
/// by default, everything else at warn.
fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let default = match (&cli.log_level, &cli.command) {
        (Some(l), _) => l.clone(),
        (None, Command::Daemon { .. }) => "info".into(),
        (None, _) => "warn".into(),
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&default))
        .with_context(|| format!("--log-level {default:?} is not a valid filter"))?;
    // A dashboard on this terminal must not be scribbled over: its logs go
    // to a file.
    let log_file = match (&cli.log_file, &cli.command) {
        (Some(f), _) => Some(f.clone()),
        (None, Command::Run(args)) if dashboard_wanted(args) => Some(PathBuf::from("station.log")),
        _ => None,
    };
    let ansi = log_file.is_none() && std::io::stderr().is_terminal();
    let writer = match log_file {
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot open log file {}", path.display()))?;
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::sync::Mutex::new(f))
        }
        None => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi);
    match cli.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).with_span_list(true).init(),
    }
    Ok(())
}

fn dashboard_wanted(args: &RunArgs) -> bool {
    !args.headless && std::io::stdout().is_terminal()
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => run_batch(args),
        Command::Dash { connect, token } => {
            let token = token.as_deref().map(resolve_token).transpose()?;
            let addrs = connect.iter().map(|c| station_addr(c)).collect::<anyhow::Result<Vec<_>>>()?;
            match addrs.as_slice() {
                [one] => Ok(station::dash::run_remote(one, token)?),
                _ => Ok(station::dash::run_line(&addrs, token)?),
            }
        }
        Command::Daemon { config, drain_timeout } => run_daemon(&config, Duration::from_secs(drain_timeout)),
        Command::Ledger { command: LedgerCommand::Export { ledger, format, out } } => {
            let copy = ledger.readable()?;
            let doc = export::export(copy.path())?;
            let text = match format {
                Format::Json => serde_json::to_string_pretty(&doc)? + "\n",
                Format::Csv => export::cards_csv(&doc),
            };
            match out {
                Some(p) => std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?,
                None => std::io::stdout().write_all(text.as_bytes())?,
            }
            Ok(())
        }
        Command::Ledger { command: LedgerCommand::Verify { ledger, public_key, json } } => match &ledger {
            LedgerTarget::Sqlite(path) => verify_command(path, public_key.as_deref(), json),
            LedgerTarget::Postgres(url) => {
                if public_key.is_some() {
                    bail!("ledger verify {ledger}: PostgreSQL audit chains have no signed heads; drop --public-key");
                }
                let chains = station::ledger::pg::verify_chains(url)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&chains)?);
                } else {
                    println!(
                        "ledger {ledger}: {} station audit chain(s); no signed heads and no table check on PostgreSQL \
                         (docs/ledger.md)",
                        chains.len()
                    );
                    for c in &chains {
                        let state = if c.problems.is_empty() { "intact" } else { "BROKEN" };
                        println!("  station {}: {} rows, {state}", c.station, c.rows);
                    }
                }
                match chains.iter().find_map(|c| c.problems.first()) {
                    Some(p) => bail!("ledger verify: {p}"),
                    None => Ok(()),
                }
            }
        },
        Command::Ledger { command: LedgerCommand::Sync { from, to, station_id, json } } => {
            let LedgerTarget::Postgres(url) = &to else {
                bail!("ledger sync --to {to}: give a postgres:// URL");
            };
            let station_id = station_id.unwrap_or_else(host_name);
            let r = station::ledger::sync::sync(&from, url, &station_id)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "ledger sync {} -> {to}: {} cards added ({} steps), {} already there, {} batches and {} bundles added",
                    from.display(),
                    r.cards_added,
                    r.steps_added,
                    r.cards_present,
                    r.batches_added,
                    r.bundles_added
                );
                for c in &r.conflicts {
                    println!("  not copied: {c}");
                }
            }
            if !r.conflicts.is_empty() {
                bail!("{} card(s) not copied (serial conflicts)", r.conflicts.len());
            }
            Ok(())
        }
        Command::Report { ledger, batch, out } => report_command(&ledger, &batch, out),
        Command::Firmware { command } => firmware_command(command),
        Command::Gp { command } => gp_command(command),
        Command::Doctor { profile, json } => {
            let report = station::doctor::run(&station::doctor::Options { profile, ..Default::default() });
            if json {
                println!("{}", serde_json::to_string_pretty(&report.json())?);
            } else {
                print!("{}", report.render());
            }
            if !report.ok() {
                bail!("doctor: some checks failed (fixes above)");
            }
            Ok(())
        }
        Command::Profile { command: ProfileCommand::Check { file } } => {
            let profile = Profile::load(&file)?;
            let fw = Firmware::load(&profile.firmware_dir, &profile.release_keys)?;
            println!(
                "{}: ok ({}; firmware {} {}, load file {}; GP {:?}, factory keys {:02X}{}; {} pinned CA(s))",
                file.display(),
                profile.product,
                fw.manifest.name,
                fw.manifest.version,
                hex::encode(fw.load_file_sha256),
                profile.security_level,
                profile.factory_version,
                profile
                    .rotation
                    .as_ref()
                    .map(|r| format!(", rotation to {:02X} ({})", r.version, r.diversification))
                    .unwrap_or_default(),
                profile.vendor_cas.len()
            );
            Ok(())
        }
    }
}

fn verify_command(ledger: &Path, public_key: Option<&str>, json: bool) -> anyhow::Result<()> {
    use station::ledger::audit;
    let pinned =
        public_key.map(audit::parse_public_key).transpose().map_err(|e| anyhow::anyhow!("--public-key {e}"))?;
    let report = audit::verify(ledger, pinned.as_ref())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("ledger {}: {} audit rows, {} batch head(s)", report.ledger, report.audit_rows, report.heads.len());
        for h in &report.heads {
            println!(
                "  batch {} head at seq {} (covers seq {}): {}",
                h.batch_id.map_or("?".to_string(), |b| b.to_string()),
                h.seq,
                h.head_seq,
                h.signature
            );
        }
        if report.rows_after_last_head > 0 {
            println!("  {} row(s) after the last head (a batch running or cut short)", report.rows_after_last_head);
        }
        for w in &report.warnings {
            println!("warning: {w}");
        }
        for p in &report.problems {
            println!("BAD: {p}");
        }
        if report.ok() {
            println!("intact");
        }
    }
    match report.problems.first() {
        None => Ok(()),
        Some(p) => bail!(
            "ledger verify: {p}{}",
            match report.problems.len() {
                1 => String::new(),
                n => format!(" (and {} more)", n - 1),
            }
        ),
    }
}

fn report_command(ledger: &LedgerTarget, batch: &str, out: Option<PathBuf>) -> anyhow::Result<()> {
    let copy = ledger.readable()?;
    let ledger = copy.path();
    let dir = match out {
        Some(d) => d,
        None => PathBuf::from("reports").join(station::ledger::read::find_batch(ledger, batch)?.name),
    };
    let files = station::report::write_batch_report(ledger, batch, &dir)?;
    println!("report of batch {batch} in {}:", files.dir.display());
    for f in [&files.markdown, &files.html, &files.export_json, &files.export_csv] {
        println!("  {}", f.display());
    }
    println!("  {} bundle label(s) in {}", files.labels.len(), files.dir.join("labels").display());
    Ok(())
}

fn firmware_command(command: FirmwareCommand) -> anyhow::Result<()> {
    match command {
        FirmwareCommand::Inspect { cap, json, with_descriptor } => {
            let c = card::cap::CapFile::from_path(&cap).with_context(|| format!("{}", cap.display()))?;
            let components: Vec<(String, usize)> =
                c.components().map(|(k, bytes)| (k.file_name().to_string(), bytes.len())).collect();
            let load_len = c.load_file_len(with_descriptor);
            let hash = hex::encode(c.load_file_sha256(with_descriptor));
            if json {
                let doc = serde_json::json!({
                    "file": cap.display().to_string(),
                    "package_aid": hex::encode_upper(c.package_aid()),
                    "package_version": format!("{}.{}", c.package_version().0, c.package_version().1),
                    "package_name": c.package_name(),
                    "cap_format": format!("{}.{}", c.format_version().0, c.format_version().1),
                    "applet_aids": c.applet_aids().iter().map(hex::encode_upper).collect::<Vec<_>>(),
                    "components": components.iter().map(|(n, s)| serde_json::json!({"name": n, "size": s})).collect::<Vec<_>>(),
                    "with_descriptor": with_descriptor,
                    "load_file_size": load_len,
                    "load_file_sha256": hash,
                });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                println!("file:             {}", cap.display());
                println!("package AID:      {}", hex::encode_upper(c.package_aid()));
                println!("package version:  {}.{}", c.package_version().0, c.package_version().1);
                println!("package name:     {}", c.package_name().unwrap_or("(none)"));
                println!("CAP format:       {}.{}", c.format_version().0, c.format_version().1);
                for a in c.applet_aids() {
                    println!("applet AID:       {}", hex::encode_upper(a));
                }
                println!("components:");
                for (n, s) in &components {
                    println!("  {n:<18} {s:>7} bytes");
                }
                println!(
                    "load file:        {load_len} bytes ({} Descriptor)",
                    if with_descriptor { "with" } else { "without" }
                );
                println!("load file SHA-256: {hash}");
            }
            Ok(())
        }
        FirmwareCommand::Verify { dir, release_keys, profile } => {
            let mut keys = Vec::new();
            for k in &release_keys {
                let bytes = hex::decode(k.trim()).with_context(|| format!("--release-key {k:?}"))?;
                keys.push(
                    k256::ecdsa::VerifyingKey::from_sec1_bytes(&bytes)
                        .map_err(|_| anyhow::anyhow!("--release-key {k:?} is not a secp256k1 public key"))?,
                );
            }
            if let Some(p) = profile {
                keys.extend(Profile::load(&p)?.release_keys);
            }
            if keys.is_empty() {
                bail!("give the pinned release keys: --release-key HEX or --profile FILE");
            }
            let fw = Firmware::load(&dir, &keys)?;
            println!(
                "{}: ok: {} {}, package {} {}.{}, load file {} ({} blocks at 240 bytes), signature verified",
                dir.display(),
                fw.manifest.name,
                fw.manifest.version,
                fw.manifest.package_aid,
                fw.package_version.0,
                fw.package_version.1,
                hex::encode(fw.load_file_sha256),
                fw.load_file_data_block.len().div_ceil(240)
            );
            Ok(())
        }
        FirmwareCommand::Keygen { out } => {
            if out.exists() {
                bail!("{} exists; refusing to overwrite a signing key", out.display());
            }
            let sk = loop {
                let mut b = zeroize::Zeroizing::new([0u8; 32]);
                getrandom::fill(&mut *b)?;
                if let Ok(k) = k256::ecdsa::SigningKey::from_slice(&*b) {
                    break k;
                }
            };
            let public = hex::encode_upper(card::wallet::public_key_bytes(sk.verifying_key()));
            let secret = zeroize::Zeroizing::new(hex::encode(sk.to_bytes()));
            write_private(&out, &format!("# Tapline firmware release signing key (secp256k1, hex)\n{}\n", *secret))?;
            let pub_path = PathBuf::from(format!("{}.pub", out.display()));
            std::fs::write(&pub_path, format!("{public}\n"))?;
            println!("{}: private key written; public key {public} in {}", out.display(), pub_path.display());
            Ok(())
        }
        FirmwareCommand::Pack { cap, out, name, version, key, with_descriptor } => {
            let sk = read_signing_key(&key)?;
            let m = firmware::pack(&cap, &out, &name, &version, with_descriptor, Vec::new(), &sk)?;
            println!("{}: {} {} signed, load file {}", out.display(), m.name, m.version, m.load_file_sha256);
            Ok(())
        }
    }
}

fn gp_command(command: GpCommand) -> anyhow::Result<()> {
    match command {
        GpCommand::List { keys, diversification, json } => {
            let l = gp_tool::list(keys.reader.as_deref(), &keys.options(diversification))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&l)?);
                return Ok(());
            }
            println!("reader:      {}", l.reader);
            println!("key version: {:02X} ({})", l.key_version, l.security_level);
            match &l.isd {
                Some(i) => println!("ISD:         {} {} (privileges {})", i.aid, i.state, i.privileges),
                None => println!("ISD:         (not listed)"),
            }
            println!("load files:{}", if l.load_files.is_empty() { "   (none)" } else { "" });
            for f in &l.load_files {
                println!("  {} version {}", f.aid, f.version.as_deref().unwrap_or("-"));
                for m in &f.modules {
                    println!("    module {m}");
                }
            }
            println!("applications:{}", if l.applications.is_empty() { " (none)" } else { "" });
            for a in &l.applications {
                let names = if a.privilege_names.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", a.privilege_names.join(", "))
                };
                println!("  {} {} privileges {}{names}", a.aid, a.state, a.privileges);
            }
            Ok(())
        }
        GpCommand::Load { cap, keys, diversification, with_descriptor, block_size } => {
            let r = gp_tool::load(
                keys.reader.as_deref(),
                &keys.options(diversification),
                &cap,
                with_descriptor,
                block_size,
            )?;
            println!(
                "{}: loaded package {} {} ({} bytes, {} blocks of {}; load file SHA-256 {})",
                r.reader,
                r.package_aid,
                r.package_version,
                r.load_file_size,
                r.blocks,
                r.block_size,
                r.load_file_sha256
            );
            Ok(())
        }
        GpCommand::Install { keys, diversification, package, applet, instance, privileges, params } => {
            let privileges = gp_tool::parse_hex("--privileges", &privileges)?;
            let [privileges] = privileges[..] else {
                bail!("--privileges: one byte of hex expected (e.g. 00)");
            };
            let spec = gp_tool::InstallSpec {
                package: gp_tool::parse_aid("--package", &package)?,
                applet: gp_tool::parse_aid("--applet", &applet)?,
                instance: instance.as_deref().map(|i| gp_tool::parse_aid("--instance", i)).transpose()?,
                privileges,
                params: gp_tool::parse_hex("--params", &params)?,
            };
            let r = gp_tool::install(keys.reader.as_deref(), &keys.options(diversification), &spec)?;
            println!("{}: installed {} ({})", r.reader, r.instance_aid, r.state);
            Ok(())
        }
        GpCommand::Delete { aid, keys, diversification, related } => {
            let aid = gp_tool::parse_aid("AID", &aid)?;
            let r = gp_tool::delete(keys.reader.as_deref(), &keys.options(diversification), &aid, related)?;
            println!("{}: deleted {}{}", r.reader, r.aid, if r.related { " and its applications" } else { "" });
            Ok(())
        }
        GpCommand::RotateKeys { keys, key_diversification, new_version, master, diversification } => {
            let r = gp_tool::rotate_keys(
                keys.reader.as_deref(),
                &keys.options(key_diversification),
                new_version,
                &master,
                diversification,
            )?;
            println!(
                "{}: keys rotated {:02X} -> {:02X} ({} diversification; KCVs ENC {} MAC {} DEK {}), proven by a new session",
                r.reader, r.from, r.to, r.diversification, r.kcvs[0], r.kcvs[1], r.kcvs[2]
            );
            Ok(())
        }
    }
}

/// Reads a hex private key file; lines starting with `#` are comments.
fn read_signing_key(path: &Path) -> anyhow::Result<k256::ecdsa::SigningKey> {
    let text =
        zeroize::Zeroizing::new(std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?);
    let hex_text: String = text.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<String>();
    let bytes = zeroize::Zeroizing::new(
        hex::decode(hex_text.trim()).map_err(|_| anyhow::anyhow!("{}: not a hex private key", path.display()))?,
    );
    k256::ecdsa::SigningKey::from_slice(&bytes)
        .map_err(|_| anyhow::anyhow!("{}: not a secp256k1 private key", path.display()))
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn run_batch(args: RunArgs) -> anyhow::Result<()> {
    let faults: SimFaults = args.sim_faults.parse()?;
    let fixture: Option<station::fixture::FixtureSpec> = match args.fixture.as_deref() {
        Some(f) => Some(f.parse().map_err(|e| anyhow::anyhow!("--fixture {f:?}: {e}"))?),
        None => None,
    };
    if args.sim == Some(0) {
        bail!("--sim must be at least 1 reader");
    }
    if args.cards == 0 {
        bail!("--cards must be at least 1");
    }
    if !(0.0..=100.0).contains(&args.card_speed) {
        bail!("--card-speed {} is outside 0..=100", args.card_speed);
    }
    let token = args.token.as_deref().map(resolve_token).transpose()?;
    if let Some(addr) = args.listen
        && !addr.ip().is_loopback()
        && token.is_none()
    {
        bail!("--listen {addr} is not loopback: give --token env:NAME or file:PATH to protect the API");
    }
    let profile = Arc::new(Profile::load(&args.profile)?);
    let fw = Arc::new(Firmware::load(&profile.firmware_dir, &profile.release_keys)?);
    let station_id = args.station_id.clone().or_else(|| profile.station_id.clone()).unwrap_or_else(host_name);
    let target = match (&args.ledger, &profile.ledger) {
        (Some(t), _) => t.clone(),
        (None, Some(t)) => t.clone(),
        (None, None) => LedgerTarget::Sqlite(PathBuf::from("tapline-ledger.db")),
    };
    let options = OpenOptions { target: target.clone(), station_id: station_id.clone(), outbox: args.outbox.clone() };
    let (ledger, writer, recovered) = Ledger::open_for_provisioning(&options, profile.audit_key.as_ref())?;
    if recovered.cards + recovered.batches + recovered.bundles > 0 {
        println!(
            "recovered {} card(s) left in progress, {} unfinished batch(es) and {} forming bundle(s) from a previous \
             run of station {station_id}: cards failed retryable ({}), resumed when presented again",
            recovered.cards,
            recovered.batches,
            recovered.bundles,
            station::ledger::INTERRUPTED
        );
    }
    let live = Live::new(&station_id);
    {
        let live = Arc::clone(&live);
        ledger.observe_writes(Arc::new(move |d| live.metrics().observe_ledger_write(d)));
    }
    if matches!(target, LedgerTarget::Postgres(_)) {
        let live = Arc::clone(&live);
        ledger.observe_status(Arc::new(move |s| live.set_ledger_link(s.online, s.outbox_ops)));
    }
    let name = args.batch.clone().unwrap_or_else(batch::default_name);
    let batch_id = ledger.start_batch(BatchInfo {
        name: name.clone(),
        profile: args.profile.display().to_string(),
        product: profile.product.clone(),
        firmware: format!("{} {}", fw.manifest.name, fw.manifest.version),
        firmware_sha256: hex::encode(fw.load_file_sha256),
    })?;
    let seed = args.seed.unwrap_or_else(|| {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        u64::from_be_bytes(b) >> 16
    });
    let (mut readers, handler, line): (Box<dyn ReaderMonitor>, Arc<dyn CardHandler>, String) = match args.sim {
        Some(n) => {
            let bank = card::transport::emu::EmuBank::new(n, args.card_speed, profile.timeouts.apdu);
            let feeder = Arc::new(EmuFeeder::new(bank.clone(), sim::make_cards(args.cards, seed, &faults)));
            feeder.fill();
            let line = format!("{n} emulated readers, card speed {}, seed {seed}", args.card_speed);
            (Box::new(bank), feeder, line)
        }
        None => {
            let mut filter = profile.readers.clone();
            filter.include.extend(args.reader_include.iter().cloned());
            filter.exclude.extend(args.reader_exclude.iter().cloned());
            let mut monitor = PcscMonitor::new(filter, profile.sharing).context(
                "cannot reach pcscd (is it running? scripts/pcscd-vpcd.sh starts one with emulated readers)",
            )?;
            let handler: Arc<dyn CardHandler> = match args.feeder.as_deref() {
                None if let Some(spec) = &fixture => {
                    let readers = monitor.readers().context("listing the readers for the fixture")?;
                    Arc::new(station::fixture::serial::SerialFeeder::start(spec, readers))
                }
                None => Arc::new(ManualHandler),
                Some(f) => {
                    let addr = f
                        .strip_prefix("rig:")
                        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
                        .with_context(|| format!("--feeder {f:?}: expected rig:HOST:PORT, e.g. rig:127.0.0.1:35962"))?;
                    Arc::new(RigFeeder::new(addr))
                }
            };
            (Box::new(monitor), handler, "PC/SC readers".to_string())
        }
    };
    let profile_name =
        args.profile.file_stem().map_or_else(|| "profile".to_string(), |s| s.to_string_lossy().into_owned());
    live.set_profile(&profile_name);
    {
        let mut m = live.model();
        m.set_profiles(vec![profile_name.clone()]);
        if let Ok(ids) = readers.readers() {
            m.set_readers(ids);
        }
        m.batch_started(
            BatchStart { name: name.clone(), id: batch_id, profile: profile_name, target: Some(args.cards) },
            std::time::Instant::now(),
            std::time::SystemTime::now(),
        );
    }
    live.publish();
    let control = Control::new();
    let controller: Arc<dyn Controller> = Arc::new(OneBatch { control: Arc::clone(&control), live: Arc::clone(&live) });
    let server = match args.listen {
        Some(addr) => Some(Server::start(
            addr,
            Api { live: Arc::clone(&live), controller: Arc::clone(&controller), token: token.map(Arc::new) },
        )?),
        None => None,
    };
    // The first SIGTERM/SIGINT drains the batch, the second interrupts the
    // cards in flight (recorded failed-and-retryable).
    let signals = station::signals::listen().context("cannot listen for signals")?;
    {
        let controller = Arc::clone(&controller);
        // Under the dashboard the event log shows it; stderr would scribble
        // over the screen.
        let say = !dashboard_wanted(&args);
        std::thread::spawn(move || {
            let mut terms = 0;
            for sig in signals {
                match sig {
                    station::signals::Signal::Terminate => {
                        terms += 1;
                        let action = if terms == 1 { Action::Drain } else { Action::Stop };
                        if let Ok(text) = controller.act(action)
                            && say
                        {
                            eprintln!("station: {text}");
                        }
                    }
                    station::signals::Signal::Reload => {
                        tracing::warn!("SIGHUP: `station run` has no profiles to reload (the daemon has)")
                    }
                }
            }
        });
    }
    let ticker_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = live.start_ticker(Arc::clone(&ticker_stop));
    println!(
        "batch {name}: {} cards on {line}{}; ledger {}",
        args.cards,
        if faults.rates.is_empty() { String::new() } else { format!(", faults {faults}") },
        target
    );
    if let Some(s) = &server {
        println!("metrics and API on http://{}", s.addr);
    }
    let dashboard = dashboard_wanted(&args);
    let total = args.cards;
    let mut done = 0usize;
    let report_dir = args.report_dir.clone().unwrap_or_else(|| PathBuf::from("reports").join(&name));
    let output =
        batch::Output { labels: profile.bundles.as_ref().map(|_| report_dir.join("labels")), keep_outcomes: false };
    let work = || {
        let result = batch::run(
            &mut *readers,
            recipe_for(&profile, &fw, &ledger, batch_id),
            handler,
            Some(total),
            output,
            control,
            |ev| {
                live.on_event(ev);
                if !dashboard {
                    print_event(ev, &mut done, total)
                }
            },
        );
        live.model().batch_finished(std::time::Instant::now(), std::time::SystemTime::now());
        live.publish();
        result
    };
    // The dashboard owns the terminal on this thread; the batch runs on another.
    let result = if dashboard { station::dash::run_local(&live, Arc::clone(&controller), work) } else { work() };
    ticker_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = ticker.join();
    let summary = result?;
    ledger.finish_batch(batch_id, profile.audit_key.as_ref())?;
    drop(ledger);
    writer.close();
    print_summary(&summary, &target.where_(), &report_dir, profile.bundles.is_some());
    let copy = target.readable()?;
    match station::report::write_batch_report(copy.path(), &name, &report_dir) {
        Ok(files) => println!("  batch report:     {}", files.html.display()),
        Err(e) => eprintln!("station: cannot write the batch report: {e}"),
    }
    if let Some(s) = server {
        s.stop();
    }
    Ok(())
}

fn recipe_for(profile: &Arc<Profile>, fw: &Arc<Firmware>, ledger: &Ledger, batch_id: i64) -> Arc<Recipe> {
    Arc::new(Recipe::new(Arc::clone(profile), Arc::clone(fw), ledger.clone(), batch_id))
}

/// The host name, for the default station id.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "station".to_string())
}

/// A station's API address from `--connect`: HOST:PORT, or a URL of it
/// (http only: the API speaks plain HTTP).
fn station_addr(spec: &str) -> anyhow::Result<String> {
    let addr = spec.strip_prefix("http://").unwrap_or(spec).trim_end_matches('/');
    if addr.is_empty() || addr.contains('/') || !addr.contains(':') {
        bail!("--connect {spec:?}: expected HOST:PORT or http://HOST:PORT");
    }
    Ok(addr.to_string())
}

/// An API token from env:NAME or file:PATH (never inline on a command line,
/// where every user of the machine can read it).
fn resolve_token(spec: &str) -> anyhow::Result<zeroize::Zeroizing<String>> {
    let t = if let Some(name) = spec.strip_prefix("env:") {
        std::env::var(name).with_context(|| format!("--token: environment variable {name} is not set"))?
    } else if let Some(path) = spec.strip_prefix("file:") {
        std::fs::read_to_string(path).with_context(|| format!("--token: cannot read {path}"))?.trim().to_string()
    } else {
        bail!("--token: give env:NAME or file:PATH (a token on the command line is visible to every user)");
    };
    if t.len() < 16 {
        bail!("--token: the token must be at least 16 characters");
    }
    Ok(zeroize::Zeroizing::new(t))
}

fn run_daemon(config: &Path, grace: Duration) -> anyhow::Result<()> {
    let cfg = DaemonConfig::load(config)?;
    let live = Live::new(&cfg.station_id);
    let signals = station::signals::listen().context("cannot listen for signals")?;
    let running = Daemon::start(cfg.clone(), Arc::clone(&live))?;
    let api = Api {
        live: Arc::clone(&live),
        controller: Arc::clone(&running.daemon) as Arc<dyn Controller>,
        token: cfg.token.clone().map(Arc::new),
    };
    let server = Server::start(cfg.listen, api)?;
    let ticker_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = live.start_ticker(Arc::clone(&ticker_stop));
    tracing::info!(station = %cfg.station_id, addr = %server.addr, config = %config.display(), "station daemon running");
    println!("station daemon {} on http://{} (SIGTERM drains, SIGHUP reloads profiles)", cfg.station_id, server.addr);
    for sig in signals {
        match sig {
            station::signals::Signal::Reload => {
                let _ = running.daemon.reload();
            }
            station::signals::Signal::Terminate => {
                tracing::info!("SIGTERM: draining and shutting down");
                break;
            }
        }
    }
    Daemon::shutdown(running, grace);
    server.stop();
    ticker_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = ticker.join();
    tracing::info!("station daemon stopped");
    Ok(())
}

fn print_event(ev: &Event, done: &mut usize, total: usize) {
    match ev {
        Event::Outcome(o) => {
            *done += 1;
            let id = o.card_id.map_or_else(|| "(unidentified)".to_string(), |c| c.to_hex());
            match &o.result {
                Ok(p) => println!(
                    "[{:>3}/{total}] {:<7} {id} PASS  serial {:<5} {:<9}{} {:>6.1}s",
                    *done,
                    o.reader.as_str(),
                    p.serial.map_or("-".to_string(), |s| s.to_string()),
                    p.stage,
                    match (&p.role, &p.bundle) {
                        (Some(r), Some(b)) => format!(" {r} of {}", &b[..8.min(b.len())]),
                        _ => String::new(),
                    },
                    o.elapsed.as_secs_f64()
                ),
                Err(f) => println!(
                    "[{:>3}/{total}] {:<7} {id} FAIL  {}: {}{} {:>6.1}s",
                    *done,
                    o.reader.as_str(),
                    f.step,
                    f.reason,
                    if f.retryable { " (retryable)" } else { "" },
                    o.elapsed.as_secs_f64()
                ),
            }
        }
        Event::Lane { reader, state: LaneState::ReaderError(e) } => println!("{reader}: reader error: {e}"),
        Event::Bundle { bundle, status: station::pairing::BundleStatus::Sealed, members } => {
            println!("        bundle {} sealed: {} cards", &bundle[..8.min(bundle.len())], members.len())
        }
        Event::Bundle { bundle, status: station::pairing::BundleStatus::Aborted, .. } => {
            println!("        bundle {} aborted", &bundle[..8.min(bundle.len())])
        }
        Event::Fatal { reader, error } => println!("{reader}: FATAL {error}"),
        Event::Progress { progress: Progress::Load { .. }, .. }
        | Event::Progress { .. }
        | Event::Apdus { .. }
        | Event::Lane { .. }
        | Event::Bundle { .. } => {}
    }
}

fn print_summary(s: &Summary, ledger: &Path, report_dir: &Path, bundles: bool) {
    let mut text = s.render(bundles);
    text.push_str(&format!("  ledger:           {}\n", ledger.display()));
    if bundles {
        text.push_str(&format!("  bundle labels:    {}\n", report_dir.join("labels").display()));
    }
    println!();
    print!("{text}");
    let path = report_dir.join("summary.txt");
    match std::fs::create_dir_all(report_dir).and_then(|()| std::fs::write(&path, &text)) {
        Ok(()) => println!("  report:           {}", path.display()),
        Err(e) => eprintln!("station: cannot write {}: {e}", path.display()),
    }
}
