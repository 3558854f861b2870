//! `rig`: the Tapline lab rig's command line.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use rig::vpcd::control;
use rig::vpcd::feeder::{Feeder, FeederConfig, REINSERT_GAP};
use station::sim::SimFaults;

#[derive(Parser)]
#[command(name = "rig", version, about = "Tapline hardware-in-the-loop rig")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the demo wallet firmware's CAP file (deterministic).
    MakeDemoCap {
        #[arg(long)]
        out: PathBuf,
        /// Package version MAJOR.MINOR.
        #[arg(long, default_value = "1.0")]
        version: String,
        /// Load file size in bytes (without Descriptor).
        #[arg(long, default_value_t = rig::DEMO_CODE_SIZE)]
        size: usize,
    },
    /// Print the DEMO ONLY vendor CA public key the emulated chips chain to.
    DemoCa,
    /// Put emulated cards behind a real pcscd, one per vpcd reader, fed from
    /// a hopper and binned through a control socket (docs/real-readers.md).
    /// Start pcscd first: scripts/pcscd-vpcd.sh start N PORT_BASE. Stop with
    /// QUIT on the control socket (prints the summary); Ctrl-C or SIGTERM
    /// end it without one.
    Vpcd(VpcdArgs),
    /// Run a regression plan (docs/rig-plans.md): every scenario through the
    /// station's own batch engine, outcomes compared with the plan's
    /// expectations; writes junit.xml, summary.md and summary.html. Exit
    /// code 0 when every scenario passed, 1 when one failed, 2 when the plan
    /// is invalid or cannot run.
    Run(RunArgs),
    /// The emulated serial card fixture (docs/fixtures.md).
    Fixture {
        #[command(subcommand)]
        command: FixtureCommand,
    },
    /// USB smart-card readers: list them, power-cycle their hub port.
    Usb {
        #[command(subcommand)]
        command: rig::usb::UsbCommand,
    },
    /// Performance benchmarks (tables; --json for one JSON object).
    #[command(subcommand)]
    Bench(rig::bench::Bench),
}

#[derive(Subcommand)]
enum FixtureCommand {
    /// Serve the fixture protocol on one end of a pty pair, e.g. after
    /// `socat -d -d pty,raw,echo=0,link=/tmp/tty-station pty,raw,echo=0,link=/tmp/tty-fixture`.
    Serve(rig::fixture::ServeArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The plan file (YAML).
    plan: PathBuf,
    /// Where to run: emulated readers in-process (sim) or vpcd readers
    /// behind the pcscd of scripts/pcscd-vpcd.sh (pcsc) [default: the plan's].
    #[arg(long, value_name = "sim|pcsc")]
    target: Option<String>,
    /// Folder for junit.xml, summary.md, summary.html [default: reports/plans/NAME-TARGET].
    #[arg(long, value_name = "DIR")]
    report_dir: Option<PathBuf>,
    /// The port base pcscd's vpcd readers were started with
    /// [default: $TAPLINE_VPCD_PORT, else 35963].
    #[arg(long, value_name = "P")]
    vpcd_port_base: Option<u16>,
}

#[derive(clap::Args)]
struct VpcdArgs {
    /// Virtual readers to serve: vpcd ports PORT_BASE .. PORT_BASE+N-1.
    #[arg(long, value_name = "N")]
    readers: usize,
    /// The first reader's vpcd port (as given to scripts/pcscd-vpcd.sh).
    #[arg(long, default_value_t = rig::vpcd::DEFAULT_PORT_BASE, value_name = "P")]
    port_base: u16,
    /// Emulated card speed: 1.0 = realistic latency, 0 = instant.
    #[arg(long, default_value_t = 1.0, value_name = "F")]
    card_speed: f64,
    /// Cards in the hopper (the first N go straight onto the readers).
    #[arg(long, default_value_t = 100, value_name = "COUNT")]
    cards: usize,
    /// Seed of the emulated chip factory (random when absent; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Faulty cards to mix in, e.g. counterfeit=0.05,tear=0.05,mute=0.02.
    #[arg(long, default_value = "", value_name = "SPEC")]
    sim_faults: String,
    /// Control socket address, loopback only [default: 127.0.0.1:PORT_BASE-1].
    #[arg(long, value_name = "ADDR")]
    control: Option<SocketAddr>,
    /// How long a mute card keeps its reader waiting before its connection
    /// drops: vpcd itself never times out.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    mute_timeout_ms: u64,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::MakeDemoCap { out, version, size } => {
            let (major, minor) = version
                .split_once('.')
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                .with_context(|| format!("--version {version:?}: expected MAJOR.MINOR"))?;
            let cap = rig::demo_wallet_cap((major, minor), size)?;
            std::fs::write(&out, &cap).with_context(|| format!("writing {}", out.display()))?;
            println!("{}: {} bytes", out.display(), cap.len());
        }
        Command::DemoCa => {
            println!(
                "{}",
                hex::encode_upper(card::wallet::public_key_bytes(&card::emu::factory::demo_vendor_ca_public()))
            );
        }
        Command::Vpcd(args) => run_vpcd(args)?,
        Command::Run(args) => std::process::exit(run_plan(args)),
        Command::Fixture { command: FixtureCommand::Serve(args) } => rig::fixture::run_serve(args)?,
        Command::Usb { command } => std::process::exit(rig::usb::run(command)),
        Command::Bench(b) => rig::bench::run(b)?,
    }
    Ok(())
}

/// `rig run`: the exit code (0 passed, 1 a scenario failed, 2 cannot run).
fn run_plan(args: RunArgs) -> i32 {
    use rig::plan::{Plan, Target, report, run};
    let plan = match Plan::load(&args.plan) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let target = match args.target.as_deref().map(|t| (t, Target::parse(t))) {
        None => plan.target,
        Some((_, Some(t))) => t,
        Some((t, None)) => {
            eprintln!("--target {t:?}: sim or pcsc");
            return 2;
        }
    };
    let mut pcsc = run::PcscSetup::default();
    if let Some(p) = args.vpcd_port_base {
        pcsc.port_base = p;
    }
    let dir = args.report_dir.unwrap_or_else(|| PathBuf::from(format!("reports/plans/{}-{target}", plan.name)));
    println!("rig run: plan {} ({}) on {target}", plan.name, args.plan.display());
    let result = match run::run_plan(&plan, target, &pcsc, |line| println!("{line}")) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rig run: {e}");
            return 2;
        }
    };
    if let Err(e) = report::write(&result, &dir) {
        eprintln!("rig run: cannot write the reports to {}: {e}", dir.display());
        return 2;
    }
    let count = |f: fn(&run::Status) -> bool| result.scenarios.iter().filter(|s| f(&s.status)).count();
    println!(
        "plan {}: {} passed, {} failed, {} skipped in {:.1} s; reports in {}",
        if result.passed() { "PASSED" } else { "FAILED" },
        count(|s| *s == run::Status::Passed),
        count(|s| *s == run::Status::Failed),
        count(|s| matches!(s, run::Status::Skipped(_))),
        result.elapsed.as_secs_f64(),
        dir.display()
    );
    if result.passed() { 0 } else { 1 }
}

fn run_vpcd(args: VpcdArgs) -> anyhow::Result<()> {
    if !(1..=rig::vpcd::MAX_READERS).contains(&args.readers) {
        bail!(
            "--readers {}: 1 to {} (pcsc-lite 1.9.9 runs at most {} readers in one pcscd)",
            args.readers,
            rig::vpcd::MAX_READERS,
            rig::vpcd::MAX_READERS
        );
    }
    if !(0.0..=100.0).contains(&args.card_speed) {
        bail!("--card-speed {} is outside 0..=100", args.card_speed);
    }
    let last = u32::from(args.port_base) + args.readers as u32 - 1;
    if args.port_base < 1025 || last > u32::from(u16::MAX) {
        bail!("--port-base {}: the ports {}..={last} must lie in 1025..=65535", args.port_base, args.port_base);
    }
    let faults: SimFaults = args.sim_faults.parse()?;
    let control_addr = args.control.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], args.port_base - 1)));
    if !control_addr.ip().is_loopback() {
        bail!("--control {control_addr}: the control socket listens on loopback only (127.0.0.1 or [::1])");
    }
    let listener = TcpListener::bind(control_addr).with_context(|| format!("control socket {control_addr}"))?;
    let seed = args.seed.unwrap_or_else(|| {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        u64::from_be_bytes(b) >> 16
    });
    let cards = station::sim::make_cards(args.cards, seed, &faults);
    let config = FeederConfig {
        port_base: args.port_base,
        readers: args.readers,
        speed: args.card_speed,
        mute_timeout: Duration::from_millis(args.mute_timeout_ms),
        reinsert_gap: REINSERT_GAP,
    };
    println!(
        "rig vpcd: {} cards, seed {seed}, card speed {}{}; control {control_addr}",
        args.cards,
        args.card_speed,
        if faults.rates.is_empty() { String::new() } else { format!(", faults {faults}") },
    );
    for port in config.ports() {
        println!("port {port}: reader \"{}\"", rig::vpcd::reader_name(args.port_base, port));
    }
    let feeder = Feeder::start(config, cards, Arc::new(|line: &str| println!("{line}")));
    let (quit_tx, quit_rx) = std::sync::mpsc::channel();
    let f = feeder.clone();
    std::thread::Builder::new().name("vpcd-control".into()).spawn(move || control::serve(listener, f, quit_tx))?;
    // Every sender lives in the control thread, which runs for ever: recv
    // returns only on a QUIT.
    let _ = quit_rx.recv();
    print!("{}", feeder.shutdown());
    Ok(())
}
