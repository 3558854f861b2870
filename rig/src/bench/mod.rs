//! `rig bench`: the station's performance benchmarks. Each prints a table
//! (and with `--json` one JSON object on the last line): scaling over
//! readers, host overhead against the modeled card time, the APDU path
//! through pcscd + vpcd, host cost with instant cards, and a soak. `all`
//! runs a short version of each and writes `reports/bench/<date>/`.
//! Figures are what this machine did in this run: compare ratios from one
//! run, not absolute figures across runs.

pub mod apdu;
pub mod emu;
pub mod figures;
pub mod procfs;
pub mod report;

use std::path::{Path, PathBuf};
use std::process::Command as Process;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use figures::{f, get, run_json, table};

#[derive(clap::Subcommand)]
pub enum Bench {
    /// Throughput over reader counts, each point in a fresh child process.
    Scaling(ScalingArgs),
    /// One scaling point in this process (used by `scaling`).
    ScalingPoint(PointArgs),
    /// Reader wall time per card over the modeled card time, at 1 and 16 readers.
    Overhead(OverheadArgs),
    /// One APDU round trip: the station's PcscTransport, a direct pcsc loop,
    /// and scriptor (pcsc-tools), against pcscd + vpcd.
    Apdu(apdu::ApduArgs),
    /// The measuring side of `apdu` (runs with PCSCLITE_CSOCK_NAME set).
    #[command(hide = true)]
    ApduRun(apdu::ApduArgs),
    /// Cards per second with instant cards, and where the CPU goes.
    Host(HostArgs),
    /// Many instant cards on 16 readers: RSS and file descriptors over time.
    Soak(SoakArgs),
    /// A short version of each; writes reports/bench/<date>/.
    All(AllArgs),
    /// Writes bench.md and scaling.svg again from a bench.json.
    #[command(hide = true)]
    Report {
        /// The bench.json of a run; the report goes beside it.
        json: PathBuf,
    },
}

#[derive(clap::Args, Clone)]
pub struct ScalingArgs {
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
    pub readers: Vec<usize>,
    /// Card speed: 1.0 = realistic JCOP4 latency (about 5.5 s a card).
    #[arg(long, default_value_t = 0.1)]
    pub card_speed: f64,
    #[arg(long, default_value_t = 3)]
    pub cards_per_reader: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Clone)]
pub struct PointArgs {
    #[arg(long)]
    pub readers: usize,
    #[arg(long)]
    pub card_speed: f64,
    #[arg(long)]
    pub cards_per_reader: usize,
    /// The recipe alone: bundling off.
    #[arg(long)]
    pub no_bundles: bool,
    /// Every card exactly the JCOP4 model (no +-10% spread between cards).
    #[arg(long)]
    pub no_spread: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Clone)]
pub struct OverheadArgs {
    #[arg(long, default_value_t = 1.0)]
    pub card_speed: f64,
    #[arg(long, default_value_t = 2)]
    pub cards_per_reader: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Clone)]
pub struct HostArgs {
    #[arg(long, default_value_t = 16)]
    pub readers: usize,
    #[arg(long, default_value_t = 1000)]
    pub cards: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Clone)]
pub struct SoakArgs {
    #[arg(long, default_value_t = 16)]
    pub readers: usize,
    #[arg(long, default_value_t = 10_000)]
    pub cards: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Clone)]
pub struct AllArgs {
    /// A much shorter run for CI smoke tests (figures are printed, not judged).
    #[arg(long)]
    pub quick: bool,
    /// Where the report goes [default: reports/bench/<date>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: Bench) -> anyhow::Result<()> {
    match cmd {
        Bench::Scaling(a) => scaling(&a)?,
        Bench::ScalingPoint(a) => point(&a)?,
        Bench::Overhead(a) => overhead(&a)?,
        Bench::Apdu(a) => apdu::bench(&a)?,
        Bench::ApduRun(a) => apdu::measure(&a)?,
        Bench::Host(a) => host(&a)?,
        Bench::Soak(a) => soak(&a)?,
        Bench::All(a) => all(&a)?,
        Bench::Report { json } => {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
            let dir = json.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
            report::write(&dir, &v)?;
            println!("report: {}", dir.join("bench.md").display());
            v
        }
    };
    Ok(())
}

fn emit(json: bool, text: &str, v: &Value) {
    print!("{text}");
    if json {
        println!("{v}");
    }
}

fn load_line() -> Value {
    let (l, cores) = procfs::load();
    json!({"loadavg": l, "cores": cores})
}

fn tempdir() -> anyhow::Result<tempfile::TempDir> {
    // On the disk (not a tmpfs): the ledger's fsyncs are real.
    tempfile::Builder::new().prefix("tapline-bench-").tempdir_in(std::env::temp_dir()).context("temporary directory")
}

fn point(a: &PointArgs) -> anyhow::Result<Value> {
    let dir = tempdir()?;
    let r = emu::run(
        a.readers,
        a.card_speed,
        a.readers * a.cards_per_reader,
        !a.no_bundles,
        !a.no_spread,
        dir.path(),
        |_| {},
    )?;
    let mut v = run_json(&r);
    v["peak_rss_kb"] = json!(procfs::peak_rss_kb());
    v["open_fds"] = json!(procfs::open_fds());
    if a.json {
        println!("{v}");
    } else {
        println!("{v:#}");
    }
    Ok(v)
}

/// Runs one scaling point in a child process (its own VmHWM).
fn child_point(readers: usize, speed: f64, per_reader: usize, bundles: bool) -> anyhow::Result<Value> {
    let exe = std::env::current_exe()?;
    let mut p = Process::new(exe);
    p.args(["bench", "scaling-point", "--json", "--readers"])
        .arg(readers.to_string())
        .arg("--card-speed")
        .arg(speed.to_string())
        .arg("--cards-per-reader")
        .arg(per_reader.to_string());
    // The recipe alone (the overhead bench) runs identical cards: with a
    // spread, the readers that drew fast cards would idle at the batch's
    // end, which is not host time.
    if !bundles {
        p.args(["--no-bundles", "--no-spread"]);
    }
    let out = p.output().context("running a scaling point")?;
    if !out.status.success() {
        bail!("scaling point at {readers} readers failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.starts_with('{')).context("no JSON from the scaling point")?;
    Ok(serde_json::from_str(line)?)
}

fn scaling(a: &ScalingArgs) -> anyhow::Result<Value> {
    let v = scaling_figures(a)?;
    emit(a.json, &scaling_table(&v), &v);
    Ok(v)
}

/// Throughput per reader normalized by the card work (modeled seconds per
/// card): a 1- or 2-reader line cannot form the demo's 3-card bundles, so
/// its cards do less pairing work than those of a larger line.
fn work_rate(p: &Value) -> f64 {
    get(p, "steady_cards_per_hour") * get(p, "modeled_card_s") / get(p, "readers")
}

fn scaling_figures(a: &ScalingArgs) -> anyhow::Result<Value> {
    let mut points = Vec::new();
    for &n in &a.readers {
        eprintln!("bench scaling: {n} readers, card speed {}, {} cards a reader", a.card_speed, a.cards_per_reader);
        points.push(child_point(n, a.card_speed, a.cards_per_reader, true)?);
    }
    let base = points.iter().find(|p| get(p, "readers") == 1.0).cloned();
    for p in &mut points {
        let n = get(p, "readers");
        let (eff, weff) = match &base {
            Some(b) => {
                (get(p, "steady_cards_per_hour") / (n * get(b, "steady_cards_per_hour")), work_rate(p) / work_rate(b))
            }
            None => (f64::NAN, f64::NAN),
        };
        p["efficiency"] = json!(eff);
        p["work_efficiency"] = json!(weff);
    }
    Ok(json!({
        "card_speed": a.card_speed,
        "cards_per_reader": a.cards_per_reader,
        "modeled_card_s_at_speed_1": points.last().map(|p| get(p, "modeled_card_s")),
        "points": points,
        "load": load_line(),
    }))
}

fn scaling_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v["points"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    vec![
                        f(get(p, "readers"), 0),
                        f(get(p, "cards"), 0),
                        f(get(p, "cards_per_hour"), 0),
                        f(get(p, "steady_cards_per_hour"), 0),
                        f(get(p, "efficiency"), 3),
                        f(get(p, "work_efficiency"), 3),
                        f(get(p, "overhead_ratio"), 3),
                        f(get(p, "cpu_s_per_card") * 1000.0, 1),
                        f(get(p, "peak_rss_kb") / 1024.0, 1),
                        pairing_share(p, "partner_wait"),
                        pairing_share(p, "card_calls"),
                        pairing_share(p, "held"),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "scaling (card speed {}: modeled {:.2} s a card at speed 1)\n{}",
        v["card_speed"],
        get(v, "modeled_card_s_at_speed_1"),
        table(
            &[
                "readers",
                "cards",
                "cards/h batch",
                "cards/h steady",
                "efficiency",
                "work eff.",
                "wall/modeled",
                "CPU ms/card",
                "peak RSS MiB",
                "partner wait",
                "pair calls",
                "held"
            ],
            &rows
        )
    )
}

/// One part of a bundled card's pairing time as a share of a reader's wall
/// time per card ("-" without bundling).
fn pairing_share(p: &Value, part: &str) -> String {
    let split = &p["pairing_s_per_card"];
    if get(split, "cards") > 0.0 {
        format!("{:.1}%", get(split, part) / get(p, "wall_per_card_per_reader_s") * 100.0)
    } else {
        "-".into()
    }
}

fn overhead(a: &OverheadArgs) -> anyhow::Result<Value> {
    let v = overhead_figures(a)?;
    emit(a.json, &overhead_table(&v), &v);
    Ok(v)
}

fn overhead_figures(a: &OverheadArgs) -> anyhow::Result<Value> {
    let mut points = Vec::new();
    for n in [1, 16] {
        eprintln!("bench overhead: {n} readers, card speed {}", a.card_speed);
        let mut p = child_point(n, a.card_speed, a.cards_per_reader, false)?;
        p["host_overhead"] = json!(get(&p, "overhead_ratio") - 1.0);
        points.push(p);
    }
    Ok(
        json!({"card_speed": a.card_speed, "cards_per_reader": a.cards_per_reader, "points": points, "load": load_line()}),
    )
}

fn overhead_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v["points"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    vec![
                        f(get(p, "readers"), 0),
                        f(get(p, "cards"), 0),
                        f(get(p, "wall_per_card_per_reader_s"), 3),
                        f(get(p, "modeled_card_s") * get(p, "card_speed"), 3),
                        f(get(p, "overhead_ratio"), 4),
                        format!("{:.2}%", get(p, "host_overhead") * 100.0),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "overhead: the recipe (bundling off), card speed {}\n{}",
        v["card_speed"],
        table(&["readers", "cards", "wall s/card/reader", "modeled s/card", "ratio", "overhead"], &rows)
    )
}

fn host(a: &HostArgs) -> anyhow::Result<Value> {
    let v = host_figures(a)?;
    emit(a.json, &host_table(&v), &v);
    Ok(v)
}

fn host_figures(a: &HostArgs) -> anyhow::Result<Value> {
    let dir = tempdir()?;
    eprintln!("bench host: {} instant cards on {} readers", a.cards, a.readers);
    let r = emu::run(a.readers, 0.0, a.cards, true, false, dir.path(), |_| {})?;
    let mut v = run_json(&r);
    let t = |k: &str| r.threads.iter().filter(|(n, _)| *n == k).map(|(_, c)| c).sum::<f64>();
    let emulator = (r.emulator_apdu + r.emulator_factory).as_secs_f64();
    let workers = t("workers");
    let split = json!({
        "emulator": emulator,
        "station_recipe": (workers - r.emulator_apdu.as_secs_f64() - r.emulator_factory.as_secs_f64()).max(0.0),
        "ledger_writer": t("ledger"),
        "coordination": t("batch") + t("live") + t("pairing") + t("ended threads"),
    });
    v["cards_per_second"] = json!(r.cards as f64 / r.wall.as_secs_f64());
    // The ledger file once its writer closed (the WAL checkpointed into it):
    // tables, journal and audit log.
    let bytes: u64 = ["ledger.db", "ledger.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.path().join(f)).ok())
        .map(|m| m.len())
        .sum();
    v["ledger_bytes_per_card"] = json!(bytes as f64 / r.cards.max(1) as f64);
    v["split_cpu_s"] = split;
    v["load"] = load_line();
    Ok(v)
}

fn host_table(v: &Value) -> String {
    let cards = get(v, "cards");
    let total = get(v, "cpu_s");
    let mut rows = Vec::new();
    if let Some(s) = v["split_cpu_s"].as_object() {
        for (k, c) in s {
            let c = c.as_f64().unwrap_or(0.0);
            rows.push(vec![k.clone(), f(c / cards * 1000.0, 2), format!("{:.1}%", c / total * 100.0)]);
        }
    }
    rows.push(vec!["total (process)".into(), f(total / cards * 1000.0, 2), "100%".into()]);
    format!(
        "host cost: {} instant cards on {} readers in {:.2} s: {:.1} cards/s, ledger {:.1} KB a card\n{}",
        cards,
        get(v, "readers"),
        get(v, "wall_s"),
        get(v, "cards_per_second"),
        get(v, "ledger_bytes_per_card") / 1000.0,
        table(&["where", "CPU ms/card", "share"], &rows)
    )
}

fn soak(a: &SoakArgs) -> anyhow::Result<Value> {
    let v = soak_figures(a)?;
    emit(a.json, &soak_table(&v), &v);
    Ok(v)
}

fn soak_figures(a: &SoakArgs) -> anyhow::Result<Value> {
    let dir = tempdir()?;
    eprintln!("bench soak: {} instant cards on {} readers", a.cards, a.readers);
    let step = (a.cards / 10).max(1);
    let mut samples = vec![json!({"cards": 0, "rss_kb": procfs::rss_kb(), "fds": procfs::open_fds()})];
    let r = emu::run(a.readers, 0.0, a.cards, true, false, dir.path(), |done| {
        if done % step == 0 {
            samples.push(json!({"cards": done, "rss_kb": procfs::rss_kb(), "fds": procfs::open_fds()}));
        }
    })?;
    let first = samples.get(1).cloned().unwrap_or(json!({}));
    let last = samples.last().cloned().unwrap_or(json!({}));
    Ok(json!({
        "readers": a.readers,
        "cards": r.cards,
        "wall_s": r.wall.as_secs_f64(),
        "samples": samples,
        "rss_growth": get(&last, "rss_kb") / get(&first, "rss_kb"),
        "fd_growth": get(&last, "fds") / get(&first, "fds"),
        "load": load_line(),
    }))
}

fn soak_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v["samples"]
        .as_array()
        .map(|ss| {
            ss.iter()
                .map(|s| vec![f(get(s, "cards"), 0), f(get(s, "rss_kb") / 1024.0, 1), f(get(s, "fds"), 0)])
                .collect()
        })
        .unwrap_or_default();
    format!(
        "soak: {} instant cards on {} readers in {:.1} s; RSS x{:.3}, fds x{:.3} from the first tenth to the end\n{}",
        get(v, "cards"),
        get(v, "readers"),
        get(v, "wall_s"),
        get(v, "rss_growth"),
        get(v, "fd_growth"),
        table(&["cards", "RSS MiB", "open fds"], &rows)
    )
}

/// The goals of issue #7 against the figures of one run.
pub fn goals(v: &Value) -> Vec<(String, String, bool)> {
    let mut g = Vec::new();
    let pts = v["scaling"]["points"].as_array().cloned().unwrap_or_default();
    for (n, min) in [(16.0, 0.95), (64.0, 0.90)] {
        let goal = format!("scaling efficiency at {n} readers >= {min}");
        match pts.iter().find(|p| get(p, "readers") == n) {
            Some(p) => {
                let e = get(p, "work_efficiency");
                g.push((goal, format!("{e:.3}"), e >= min));
            }
            None => g.push((goal, "not measured".into(), false)),
        }
    }
    let o = v["overhead"]["points"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| get(p, "readers") == 16.0))
        .map_or(f64::NAN, |p| get(p, "host_overhead"));
    g.push(("host overhead at 16 readers <= 2%".into(), format!("{:.2}%", o * 100.0), o <= 0.02));
    let r = get(&v["apdu"], "transport_over_direct");
    g.push(("APDU via PcscTransport <= 1.15 x direct pcsc".into(), f(r, 3), r <= 1.15));
    let c = get(&v["host"], "cards_per_second");
    g.push(("instant cards >= 100 cards/s".into(), format!("{c:.1}"), c >= 100.0));
    let (rg, fg) = (get(&v["soak"], "rss_growth"), get(&v["soak"], "fd_growth"));
    g.push(("soak RSS flat within 10%".into(), format!("x{rg:.3}"), rg <= 1.10));
    g.push(("soak fds flat within 10%".into(), format!("x{fg:.3}"), fg <= 1.10));
    g
}

fn all(a: &AllArgs) -> anyhow::Result<Value> {
    let started = std::time::Instant::now();
    let q = a.quick;
    let scaling_args = ScalingArgs {
        readers: if q { vec![1, 2, 4, 16] } else { vec![1, 2, 4, 8, 16, 32, 64] },
        card_speed: if q { 0.02 } else { 0.1 },
        cards_per_reader: if q { 1 } else { 8 },
        json: false,
    };
    let scaling = scaling_figures(&scaling_args)?;
    print!("{}", scaling_table(&scaling));
    let overhead_args = OverheadArgs { card_speed: if q { 0.05 } else { 1.0 }, cards_per_reader: 1, json: false };
    let overhead = overhead_figures(&overhead_args)?;
    print!("{}", overhead_table(&overhead));
    let apdu = match apdu::bench(&apdu::ApduArgs {
        rounds: if q { 3 } else { 9 },
        apdus: if q { 100 } else { 500 },
        ..apdu::ApduArgs::default()
    }) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("bench apdu: {e:#}");
            json!({"error": format!("{e:#}")})
        }
    };
    let host = host_figures(&HostArgs { readers: 16, cards: if q { 60 } else { 1000 }, json: false })?;
    print!("{}", host_table(&host));
    let soak = soak_figures(&SoakArgs { readers: 16, cards: if q { 100 } else { 10_000 }, json: false })?;
    print!("{}", soak_table(&soak));
    let mut v = json!({
        "date": report::today(),
        "quick": q,
        "scaling": scaling,
        "overhead": overhead,
        "apdu": apdu,
        "host": host,
        "soak": soak,
        "load": load_line(),
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    let goals = goals(&v);
    v["goals"] = goals.iter().map(|(g, fig, ok)| json!({"goal": g, "figure": fig, "met": ok})).collect();
    println!("goals:");
    for (g, fig, ok) in &goals {
        println!("  [{}] {g}: {fig}", if *ok { "met" } else { "MISSED" });
    }
    let out = a.out.clone().unwrap_or_else(|| Path::new("reports/bench").join(report::today()));
    report::write(&out, &v)?;
    println!("report: {}", out.join("bench.md").display());
    if a.json {
        println!("{v}");
    }
    Ok(v)
}
