//! The APDU path: one SELECT of the card manager (a small APDU) to an
//! instant emulated card behind pcscd + vpcd, three ways in one run: the
//! station's `PcscTransport` (`Transport::transmit` with a typed command,
//! as the recipe sends it), a minimal loop on the `pcsc` crate
//! (`Card::transmit` on raw bytes), and `scriptor` (pcsc-tools, a peer
//! client no one here wrote) running the same APDU script. Direct and
//! transport alternate round by round; the median round counts.
//!
//! By default the bench starts a private pcscd (scripts/pcscd-vpcd.sh in
//! its private mode: its own socket, so no other pcscd is disturbed; needs
//! root for unshare) with 2 vpcd readers on ports from --port-base (36963,
//! clear of the test suite's 35963..35970), runs the measuring side in a
//! child process that talks to that pcscd, and stops it. `--use-running`
//! uses whatever pcscd PCSCLITE_CSOCK_NAME (or the system socket) reaches,
//! with a vpcd reader on --port-base free for the bench's card.

use std::ffi::CString;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command as Process, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use card::apdu::Command;
use card::transport::pcsc::{PcscMonitor, ReaderFilter, Sharing};
use card::transport::{ReaderMonitor, SlotState};
use serde_json::{Value, json};

use super::figures::{f, get, table};
use crate::vpcd::feeder::{Feeder, FeederConfig};

#[derive(clap::Args, Clone, Debug)]
pub struct ApduArgs {
    /// The vpcd port of the bench's reader (and the private pcscd's base).
    #[arg(long, default_value_t = 36963)]
    pub port_base: u16,
    /// Alternating rounds of each loop.
    #[arg(long, default_value_t = 9)]
    pub rounds: usize,
    /// APDUs per round (and in scriptor's script).
    #[arg(long, default_value_t = 500)]
    pub apdus: usize,
    /// Use the running pcscd instead of starting a private one.
    #[arg(long)]
    pub use_running: bool,
    #[arg(long)]
    pub json: bool,
}

impl Default for ApduArgs {
    fn default() -> Self {
        Self { port_base: 36963, rounds: 9, apdus: 500, use_running: false, json: false }
    }
}

fn select_isd() -> Command {
    card::gp::select(&card::gp::ISD_AID)
}

fn repo() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Starts a private pcscd, measures in a child process, stops the pcscd.
pub fn bench(a: &ApduArgs) -> anyhow::Result<Value> {
    let v = if a.use_running {
        measure_quiet(a)?
    } else {
        let dir = std::env::temp_dir().join(format!("tapline-bench-pcscd-{}", a.port_base));
        let socket = dir.join("run/pcscd.comm");
        let script = repo().join("scripts/pcscd-vpcd.sh");
        let env = |p: &mut Process| {
            p.env("TAPLINE_PCSCD_DIR", &dir).env("PCSCLITE_CSOCK_NAME", &socket);
        };
        let mut start = Process::new(&script);
        env(&mut start);
        let out = start.args(["start", "2", &a.port_base.to_string()]).output().context("scripts/pcscd-vpcd.sh")?;
        if !out.status.success() {
            bail!("cannot start a private pcscd: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let mut child = Process::new(std::env::current_exe()?);
        env(&mut child);
        let res = child
            .args(["bench", "apdu-run", "--json", "--use-running", "--port-base"])
            .arg(a.port_base.to_string())
            .arg("--rounds")
            .arg(a.rounds.to_string())
            .arg("--apdus")
            .arg(a.apdus.to_string())
            .stderr(Stdio::inherit())
            .output();
        let mut stop = Process::new(&script);
        env(&mut stop);
        let _ = stop.arg("stop").output();
        let out = res.context("running the APDU bench")?;
        if !out.status.success() {
            bail!("the APDU bench failed (exit {})", out.status);
        }
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.lines().rev().find(|l| l.starts_with('{')).context("no JSON from the APDU bench")?)?
    };
    print!("{}", apdu_table(&v));
    if a.json {
        println!("{v}");
    }
    Ok(v)
}

fn measure_quiet(a: &ApduArgs) -> anyhow::Result<Value> {
    measure_inner(a)
}

/// The measuring side (`rig bench apdu-run`): prints the JSON object.
pub fn measure(a: &ApduArgs) -> anyhow::Result<Value> {
    let v = measure_inner(a)?;
    println!("{v}");
    Ok(v)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn measure_inner(a: &ApduArgs) -> anyhow::Result<Value> {
    let cards = station::sim::make_cards(1, 1, &station::sim::SimFaults::default());
    let feeder = Feeder::start(FeederConfig::instant(a.port_base, 1), cards, Arc::new(|_: &str| {}));
    let name = crate::vpcd::reader_name(a.port_base, a.port_base);
    let r = measure_with(a, &name);
    let _ = feeder.shutdown();
    r
}

fn measure_with(a: &ApduArgs, name: &str) -> anyhow::Result<Value> {
    let mut monitor = PcscMonitor::new(ReaderFilter::new([name.to_string()], [""; 0]), Sharing::Shared)
        .context("cannot reach pcscd")?;
    let id = monitor.readers()?.into_iter().next().with_context(|| format!("no reader {name:?} in pcscd"))?;
    let mut reader = monitor.open(&id)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut state = SlotState::Empty;
    while state == SlotState::Empty {
        if Instant::now() > deadline {
            bail!("no card on {name} after 10 s");
        }
        state = reader.wait_change(&state, Duration::from_millis(500))?;
    }
    let mut transport = reader.connect()?;
    let ctx = pcsc::Context::establish(pcsc::Scope::User)?;
    let cname = CString::new(name)?;
    let direct = ctx.connect(&cname, pcsc::ShareMode::Shared, pcsc::Protocols::ANY)?;
    let cmd = select_isd();
    let raw = cmd.to_bytes()?;
    let mut buf = vec![0u8; pcsc::MAX_BUFFER_SIZE];
    // Warm up both paths.
    for _ in 0..20 {
        direct.transmit(&raw, &mut buf)?;
        transport.transmit(&cmd)?;
    }
    let (mut d, mut t) = (Vec::new(), Vec::new());
    for _ in 0..a.rounds {
        let s = Instant::now();
        for _ in 0..a.apdus {
            let resp = direct.transmit(&raw, &mut buf)?;
            if resp.len() < 2 || resp[resp.len() - 2] != 0x90 {
                bail!("direct: the card answered {}", hex::encode(resp));
            }
        }
        d.push(s.elapsed().as_secs_f64() / a.apdus as f64);
        let s = Instant::now();
        for _ in 0..a.apdus {
            let resp = transport.transmit(&cmd)?;
            if !resp.is_ok() {
                bail!("transport: the card answered {:04X}", resp.sw.0);
            }
        }
        t.push(s.elapsed().as_secs_f64() / a.apdus as f64);
    }
    drop(direct);
    drop(transport);
    drop(reader);
    let (d, t) = (median(d), median(t));
    let scriptor = match scriptor(name, &raw, a.apdus) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bench apdu: scriptor: {e:#}");
            f64::NAN
        }
    };
    Ok(json!({
        "reader": name,
        "apdu": hex::encode_upper(&raw),
        "apdus_per_round": a.apdus,
        "rounds": a.rounds,
        "direct_us": d * 1e6,
        "transport_us": t * 1e6,
        "scriptor_us": scriptor * 1e6,
        "transport_over_direct": t / d,
        "scriptor_over_direct": scriptor / d,
        "load": super::load_line(),
    }))
}

/// scriptor's seconds per APDU: a script of `n` (at least 1000) APDUs
/// minus a script of one (its start-up: perl, PC/SC context, connect).
fn scriptor(name: &str, raw: &[u8], n: usize) -> anyhow::Result<f64> {
    let line = hex::encode_upper(raw)
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let run = |count: usize| -> anyhow::Result<f64> {
        let mut file = tempfile::NamedTempFile::new()?;
        for _ in 0..count {
            writeln!(file, "{line}")?;
        }
        file.flush()?;
        let s = Instant::now();
        let out = Process::new("scriptor")
            .arg("-r")
            .arg(name)
            .arg(file.path())
            .stdin(Stdio::null())
            .output()
            .context("scriptor (Debian package pcsc-tools) not found")?;
        let e = s.elapsed().as_secs_f64();
        let text = String::from_utf8_lossy(&out.stdout);
        let ok = text.matches(": 90 00").count() + text.matches("Normal processing").count();
        if !out.status.success() || ok < count {
            bail!("scriptor failed or answered {ok} of {count} OK: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(e)
    };
    // Three tries of each, the medians: one process start-up is noisy.
    let n = n.max(1000);
    let mut ones = Vec::new();
    let mut manys = Vec::new();
    for _ in 0..3 {
        ones.push(run(1)?);
        manys.push(run(n)?);
    }
    Ok((median(manys) - median(ones)).max(0.0) / (n - 1) as f64)
}

pub fn apdu_table(v: &Value) -> String {
    if let Some(e) = v.get("error") {
        return format!("APDU path: not measured: {e}\n");
    }
    let d = get(v, "direct_us");
    let rows = vec![
        vec!["pcsc crate, direct loop".into(), f(d, 1), "1.000".into()],
        vec!["station PcscTransport".into(), f(get(v, "transport_us"), 1), f(get(v, "transport_over_direct"), 3)],
        vec!["scriptor (pcsc-tools)".into(), f(get(v, "scriptor_us"), 1), f(get(v, "scriptor_over_direct"), 3)],
    ];
    format!(
        "APDU path: SELECT ISD round trip via pcscd + vpcd ({})\n{}",
        v["reader"].as_str().unwrap_or("?"),
        table(&["client", "us/APDU", "x direct"], &rows)
    )
}
