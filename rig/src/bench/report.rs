//! The bench report: `bench.md` (every figure, the goals, the machine's
//! load), `bench.json` (the whole run) and `scaling.svg` (throughput and
//! efficiency over readers).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde_json::Value;

use super::figures::get;

/// Today's date (UTC), YYYY-MM-DD.
pub fn today() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    station::ledger::format_utc(secs, 0)[..10].to_string()
}

pub fn write(dir: &Path, v: &Value) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("bench.json"), serde_json::to_string_pretty(v)?)?;
    std::fs::write(dir.join("scaling.svg"), scaling_svg(v))?;
    std::fs::write(dir.join("bench.md"), markdown(v))?;
    Ok(())
}

fn points(v: &Value) -> Vec<Value> {
    v["scaling"]["points"].as_array().cloned().unwrap_or_default()
}

/// Cards per hour over readers (log2 axis), with the ideal line N x one
/// reader's (work-normalized) rate, and the work efficiency on a right axis.
pub fn scaling_svg(v: &Value) -> String {
    let ps = points(v);
    let (w, h, l, r, t, b) = (640.0, 360.0, 70.0, 60.0, 40.0, 50.0);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = write!(
        s,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="14">Scaling: cards per hour over readers (card speed {})</text>"#,
        w / 2.0,
        v["scaling"]["card_speed"]
    );
    if ps.is_empty() {
        s.push_str("</svg>\n");
        return s;
    }
    let xs: Vec<f64> = ps.iter().map(|p| get(p, "readers").log2()).collect();
    let xmax = xs.iter().cloned().fold(1.0, f64::max);
    let base = ps.iter().find(|p| get(p, "readers") == 1.0);
    let ideal: Vec<f64> = ps
        .iter()
        .map(|p| match base {
            Some(b) => {
                get(p, "readers") * get(b, "steady_cards_per_hour") * get(b, "modeled_card_s")
                    / get(p, "modeled_card_s")
            }
            None => f64::NAN,
        })
        .collect();
    let ymax = ps
        .iter()
        .map(|p| get(p, "cards_per_hour"))
        .chain(ideal.iter().cloned())
        .filter(|y| y.is_finite())
        .fold(1.0, f64::max)
        * 1.1;
    let px = |x: f64| l + (w - l - r) * x / xmax;
    let py = |y: f64| h - b - (h - t - b) * y / ymax;
    let pe = |e: f64| h - b - (h - t - b) * e.clamp(0.0, 1.2) / 1.2;
    // Axes and grid.
    for i in 0..=5 {
        let y = ymax * i as f64 / 5.0;
        let _ = write!(
            s,
            r##"<line x1="{l}" x2="{x2}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{tx}" y="{ty:.1}" text-anchor="end">{y:.0}</text>"##,
            x2 = w - r,
            yy = py(y),
            tx = l - 6.0,
            ty = py(y) + 4.0,
        );
        let e = 1.2 * i as f64 / 5.0;
        let _ = write!(s, r##"<text x="{}" y="{:.1}" fill="#c60">{e:.2}</text>"##, w - r + 6.0, pe(e) + 4.0);
    }
    for (p, x) in ps.iter().zip(&xs) {
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            px(*x),
            h - b + 18.0,
            get(p, "readers")
        );
    }
    let _ = write!(s, r#"<text x="{}" y="{}" text-anchor="middle">readers</text>"#, (l + w - r) / 2.0, h - 10.0);
    let _ = write!(
        s,
        r#"<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">cards per hour</text>"#,
        h / 2.0,
        h / 2.0
    );
    let line = |s: &mut String, pts: Vec<(f64, f64)>, color: &str, dash: &str| {
        let d: Vec<String> = pts.iter().filter(|(_, y)| y.is_finite()).map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}" points="{}"/>"#,
            d.join(" ")
        );
        for (x, y) in pts.iter().filter(|(_, y)| y.is_finite()) {
            let _ = write!(s, r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{color}"/>"#);
        }
    };
    line(&mut s, xs.iter().zip(&ideal).map(|(x, y)| (px(*x), py(*y))).collect(), "#999", "6 4");
    line(
        &mut s,
        xs.iter().zip(&ps).map(|(x, p)| (px(*x), py(get(p, "steady_cards_per_hour")))).collect(),
        "#1f5fbf",
        "",
    );
    line(&mut s, xs.iter().zip(&ps).map(|(x, p)| (px(*x), pe(get(p, "work_efficiency")))).collect(), "#c60", "2 3");
    let _ = write!(
        s,
        r##"<text x="{}" y="{}" fill="#1f5fbf">measured</text><text x="{}" y="{}" fill="#999">ideal (N x one reader)</text><text x="{}" y="{}" fill="#c60">efficiency (right axis)</text>"##,
        l + 10.0,
        t + 14.0,
        l + 90.0,
        t + 14.0,
        l + 250.0,
        t + 14.0
    );
    s.push_str("</svg>\n");
    s
}

fn md_table(s: &mut String, header: &[&str], rows: Vec<Vec<String>>) {
    let _ = writeln!(s, "| {} |", header.join(" | "));
    let _ = writeln!(s, "|{}|", header.iter().map(|_| "---").collect::<Vec<_>>().join("|"));
    for r in rows {
        let _ = writeln!(s, "| {} |", r.join(" | "));
    }
    s.push('\n');
}

fn n(v: f64, d: usize) -> String {
    super::figures::f(v, d)
}

/// The share of a reader's time a bundle barrier costs by itself: with N
/// readers cards become ready about T/N apart, and of a bundle's k cards
/// the first waits k - 1 such intervals, the last none: (k - 1) / 2
/// intervals on average, (k - 1) / (2N) of the time. The demo's bundles
/// are 1 + 2 (1 + 1 on two readers).
fn barrier(readers: f64) -> f64 {
    let k = readers.min(3.0);
    (k - 1.0) / 2.0 / readers
}

/// Where a bundled card's reader time goes around pairing, and what the
/// 3-card barrier costs by itself.
fn pairing_split(s: &mut String, v: &Value) {
    let ps: Vec<Value> = points(v).into_iter().filter(|p| get(&p["pairing_s_per_card"], "cards") > 0.0).collect();
    if ps.is_empty() {
        return;
    }
    s.push_str(
        "### Where a bundled reader's time goes\n\nShares of a reader's wall time per card (the whole batch), measured by the workers and the bundle threads: *partner wait* from the card's offer to the coordinator to its first pairing call (waiting for the other members' recipes to finish, and the bundle's start in the ledger); *pair calls* the card's own pairing calls (card work); *held* from its first pairing call to its verdict, minus its own calls: waiting while the other members' calls, the host's checks and the ledger's commits run (*ledger/bundle* is the bundle thread's time in ledger commits, which every member waits through). A card stays on its reader until its bundle is sealed, so a bundle is a barrier: in a steady line cards become ready about T/N apart (T a reader's time per card, N readers), and of a bundle of 3 the first waits about two such intervals, the second one, the third none, about T/N a card on average, a share of about 1/N of every reader's time (6.25% at 16 readers, 1.6% at 64; a bundle of 2 costs half that) that no scheduling of the pairing calls removes; *barrier* shows it next to the measured partner wait (a short batch's start and end add to the measured wait). Most of *held* is the protocol's own order: the backups wait through the primary's calls that only it can make, one after another (wallet key generation, LINK, ADD BACKUP, EXPORT and CONFIRM for each backup, and its FINALIZE after theirs: about 0.6 s of JCOP4 card time, part of it overlapped with the backups' imports by the pipelined transfer), and every member waits through the bundle's five ledger commits (*ledger/bundle*). Neither goes away while a bundle's cards must stay on their readers until it is recorded: with the barrier they bound the work efficiency of a 1 + 2 line at about 0.88 to 0.9 at 16 readers, whatever the host does.\n\n",
    );
    md_table(
        s,
        &["readers", "partner wait", "barrier", "pair calls", "held", "ledger/bundle ms", "work eff."],
        ps.iter()
            .map(|p| {
                let split = &p["pairing_s_per_card"];
                let wall = get(p, "wall_per_card_per_reader_s");
                let share = |k: &str| format!("{:.1}%", get(split, k) / wall * 100.0);
                vec![
                    n(get(p, "readers"), 0),
                    share("partner_wait"),
                    format!("{:.1}%", barrier(get(p, "readers")) * 100.0),
                    share("card_calls"),
                    share("held"),
                    n(get(split, "ledger_per_bundle") * 1000.0, 1),
                    n(get(p, "work_efficiency"), 3),
                ]
            })
            .collect(),
    );
}

pub fn markdown(v: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Tapline benchmarks, {}\n", v["date"].as_str().unwrap_or("?"));
    let _ = writeln!(
        s,
        "`rig bench all{}` (release build), {:.0} s. Machine: {} cores, load average {} at the end (other builds ran on it: compare ratios within this run).\n",
        if v["quick"].as_bool() == Some(true) { " --quick" } else { "" },
        get(v, "elapsed_s"),
        v["load"]["cores"],
        v["load"]["loadavg"].as_str().unwrap_or("?"),
    );
    s.push_str("## Goals\n\n");
    let goals = v["goals"].as_array().cloned().unwrap_or_default();
    md_table(
        &mut s,
        &["goal", "figure", "met"],
        goals
            .iter()
            .map(|g| {
                vec![
                    g["goal"].as_str().unwrap_or("").into(),
                    g["figure"].as_str().unwrap_or("").into(),
                    if g["met"].as_bool() == Some(true) { "yes".into() } else { "**no**".into() },
                ]
            })
            .collect(),
    );
    let _ = writeln!(
        s,
        "## 1. Scaling\n\nEmulated readers, JCOP4 latency model scaled by {} (a card models {:.2} s at speed 1.0), {} cards a reader, demo profile with bundling (1 reader: no bundles; 2 readers: 1 + 1). Each card's latency is the JCOP4 model scaled by a factor drawn in 0.9..1.1 (real cards of one type differ; identical cards would run every reader in lockstep). Each point ran in a fresh child process (its own peak RSS). *cards/h batch* is the whole batch (start and tail included); *cards/h steady* is the outcome rate between the outcome at 20% and the one at 80% of the cards, the rate a line holds. *efficiency* = steady throughput(N) / (N x steady throughput(1)); *work eff.* is the same with each throughput weighted by the modeled card time per card, because the bundles a line can form (and so the pairing work per card) depend on its reader count; the goals use it. *wall/modeled* is reader wall time per card over the card's modeled time at this speed.\n\n![scaling](scaling.svg)\n",
        v["scaling"]["card_speed"],
        get(&v["scaling"], "modeled_card_s_at_speed_1"),
        v["scaling"]["cards_per_reader"],
    );
    md_table(
        &mut s,
        &[
            "readers",
            "cards",
            "cards/h batch",
            "cards/h steady",
            "efficiency",
            "work eff.",
            "wall/modeled",
            "modeled s/card",
            "host CPU ms/card",
            "peak RSS MiB",
        ],
        points(v)
            .iter()
            .map(|p| {
                vec![
                    n(get(p, "readers"), 0),
                    n(get(p, "cards"), 0),
                    n(get(p, "cards_per_hour"), 0),
                    n(get(p, "steady_cards_per_hour"), 0),
                    n(get(p, "efficiency"), 3),
                    n(get(p, "work_efficiency"), 3),
                    n(get(p, "overhead_ratio"), 3),
                    n(get(p, "modeled_card_s"), 2),
                    n(get(p, "cpu_s_per_card") * 1000.0, 1),
                    n(get(p, "peak_rss_kb") / 1024.0, 1),
                ]
            })
            .collect(),
    );
    pairing_split(&mut s, v);
    let _ = writeln!(
        s,
        "## 2. Overhead\n\nThe per-card recipe (identify, GP session, 20 KB LOAD, key rotation, attestation, self-tests, record; bundling off, every card exactly the JCOP4 model) at card speed {} ({} cards a reader): reader wall time per card over the emulator's modeled card time for the same cards; host overhead = ratio - 1.\n",
        v["overhead"]["card_speed"], v["overhead"]["cards_per_reader"]
    );
    md_table(
        &mut s,
        &["readers", "cards", "wall s/card/reader", "modeled s/card", "ratio", "host overhead"],
        v["overhead"]["points"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|p| {
                vec![
                    n(get(p, "readers"), 0),
                    n(get(p, "cards"), 0),
                    n(get(p, "wall_per_card_per_reader_s"), 3),
                    n(get(p, "modeled_card_s") * get(p, "card_speed"), 3),
                    n(get(p, "overhead_ratio"), 4),
                    format!("{:.2}%", get(p, "host_overhead") * 100.0),
                ]
            })
            .collect(),
    );
    s.push_str("## 3. APDU path\n\n");
    s.push_str("```\n");
    s.push_str(&super::apdu::apdu_table(&v["apdu"]));
    s.push_str("```\n\n");
    let h = &v["host"];
    let _ = writeln!(
        s,
        "## 4. Host cost\n\n{} instant cards (card speed 0) on {} readers, emulator and durable ledger included: {:.2} s, **{:.1} cards/s**. The ledger file ends at {:.1} KB a card (tables, step journal and audit log). CPU split by in-process accounting: per-thread CPU from /proc/self/task/*/stat (ledger writer thread; batch thread, Live ticker and bundle threads as coordination), and the emulator's share of the worker threads measured with the thread's own CPU clock (/proc/thread-self/schedstat) around one APDU in 16 and around every card the emulated chip factory makes; the rest of the worker threads is the station's recipe (SCP03, k256 verification, codecs, ledger calls).\n",
        get(h, "cards"),
        get(h, "readers"),
        get(h, "wall_s"),
        get(h, "cards_per_second"),
        get(h, "ledger_bytes_per_card") / 1000.0
    );
    let cards = get(h, "cards");
    let total = get(h, "cpu_s");
    let mut rows: Vec<Vec<String>> = h["split_cpu_s"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, c)| {
                    let c = c.as_f64().unwrap_or(0.0);
                    vec![k.clone(), n(c / cards * 1000.0, 2), format!("{:.1}%", c / total * 100.0)]
                })
                .collect()
        })
        .unwrap_or_default();
    rows.push(vec!["total (process)".into(), n(total / cards * 1000.0, 2), "100%".into()]);
    md_table(&mut s, &["where", "CPU ms/card", "share"], rows);
    let k = &v["soak"];
    let _ = writeln!(
        s,
        "## 5. Soak\n\n{} instant cards on {} readers in {:.1} s. RSS x{:.3} and open fds x{:.3} from the first tenth of the cards to the end.\n",
        get(k, "cards"),
        get(k, "readers"),
        get(k, "wall_s"),
        get(k, "rss_growth"),
        get(k, "fd_growth")
    );
    md_table(
        &mut s,
        &["cards", "RSS MiB", "open fds"],
        k["samples"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|x| vec![n(get(x, "cards"), 0), n(get(x, "rss_kb") / 1024.0, 1), n(get(x, "fds"), 0)])
            .collect(),
    );
    s.push_str("Reproduce: `cargo build --release -p rig && target/release/rig bench all --json` (see the README's performance section).\n");
    s
}
