//! Batch reports: `reports/<batch>/` with `report.md`, a self-contained
//! `report.html` (inline CSS and SVG charts, no scripts, nothing fetched),
//! the batch's ledger export (`ledger-export.json`, `ledger-export.csv`) and
//! the bundle labels the coordinator already wrote to `labels/`.
//!
//! The figures come from the ledger only (`ledger::read`), so a report can
//! be written again at any time from the ledger file. [`Report::new`]
//! computes them from plain data and the `render_*` functions are pure, so
//! both are tested without SQLite.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::ledger::LedgerError;
use crate::ledger::export::{self, BundleExport, CardExport};
use crate::ledger::read::{self, BatchData, BatchRecord};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The files a report consists of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportFiles {
    pub dir: PathBuf,
    pub markdown: PathBuf,
    pub html: PathBuf,
    pub export_json: PathBuf,
    pub export_csv: PathBuf,
    /// Bundle label files found in `dir/labels` (written by the bundle
    /// coordinator during the batch; left as they are).
    pub labels: Vec<PathBuf>,
}

/// Writes the report of one batch (by name, or by id when no batch has
/// that name) from the ledger at `ledger` into `dir`, creating it. Files
/// already there other than the report's own (labels, summary.txt) are left
/// alone.
pub fn write_batch_report(ledger: &Path, batch: &str, dir: &Path) -> Result<ReportFiles, ReportError> {
    let data = read::batch_data(ledger, batch)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReportError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let labels_dir = dir.join("labels");
    let mut labels: Vec<String> = match std::fs::read_dir(&labels_dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(&labels_dir)(e)),
    };
    labels.sort();
    let report = Report::new(&data, labels);
    let files = ReportFiles {
        dir: dir.to_path_buf(),
        markdown: dir.join("report.md"),
        html: dir.join("report.html"),
        export_json: dir.join("ledger-export.json"),
        export_csv: dir.join("ledger-export.csv"),
        labels: report.labels.iter().map(|l| labels_dir.join(l)).collect(),
    };
    let json = serde_json::to_string_pretty(&data.export).map_err(|e| io(&files.export_json)(e.into()))? + "\n";
    let writes = [
        (&files.export_json, json),
        (&files.export_csv, export::cards_csv(&data.export)),
        (&files.markdown, render_markdown(&report)),
        (&files.html, render_html(&report)),
    ];
    for (path, text) in writes {
        std::fs::write(path, text).map_err(io(path))?;
    }
    Ok(files)
}

/// The summary figures of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    /// Cards whose latest attempt ran in the batch.
    pub cards: usize,
    pub passed: usize,
    pub failed: usize,
    pub in_progress: usize,
    /// Passed on their first attempt.
    pub first_pass: usize,
    /// `first_pass` over all cards (0 without cards).
    pub first_pass_yield: f64,
    /// Batch start to finish (to its last journal line while unfinished).
    pub duration_s: f64,
    /// Cards in a final state per hour of `duration_s`.
    pub cards_per_hour: f64,
    pub bundles_sealed: usize,
    pub bundles_aborted: usize,
    pub bundles_forming: usize,
}

/// Durations of one step over the batch, in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    pub step: String,
    /// Timed runs (an intent followed by done or failed).
    pub runs: usize,
    pub failed: usize,
    pub min: f64,
    pub median: f64,
    pub p95: f64,
    pub max: f64,
}

/// One bar of the failure Pareto: failed cards by step and reason.
#[derive(Debug, Clone, PartialEq)]
pub struct ParetoItem {
    pub step: String,
    pub reason: String,
    pub count: usize,
    /// Share of all failed cards up to and including this bar, in percent.
    pub cumulative_pct: f64,
}

/// Everything a report shows, computed from the ledger's data.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub batch: BatchRecord,
    pub figures: Figures,
    /// (seconds since the batch started, cards in a final state so far), in
    /// time order, one point per card.
    pub throughput: Vec<(f64, usize)>,
    pub steps: Vec<StepStats>,
    pub pareto: Vec<ParetoItem>,
    pub cards: Vec<CardExport>,
    pub bundles: Vec<BundleExport>,
    /// Label file names found in the report's `labels/` folder.
    pub labels: Vec<String>,
    /// Sealed bundles without a label file there.
    pub unlabelled: Vec<String>,
}

/// The order recipe and pairing steps run in; others follow by name.
const STEP_ORDER: &[&str] = &[
    "identify",
    "gp_session",
    "firmware",
    "key_rotation",
    "attestation",
    "self_tests",
    "record",
    "pair_link",
    "pair_transfer",
    "pair_prove",
    "pair_seal",
    "pair_abort",
];

/// Milliseconds since the Unix epoch of an RFC 3339 UTC timestamp as the
/// ledger writes them (`2026-11-24T09:25:45.007Z`; fraction optional).
pub fn parse_utc(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let frac = format!("{frac:0<3}");
    let ms: i64 = frac.get(..3)?.parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000) + ms)
}

/// Nearest-rank percentile of sorted values (`p` in 0..=100).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Report {
    /// Computes the figures, series and tables from a batch's data;
    /// `labels` are the label file names found in the report folder.
    pub fn new(data: &BatchData, labels: Vec<String>) -> Report {
        let start = parse_utc(&data.batch.started_at);
        let since = |at: &str| match (start, parse_utc(at)) {
            (Some(s), Some(t)) => (t - s).max(0) as f64 / 1000.0,
            _ => 0.0,
        };
        let cards = &data.export.cards;
        let is_final = |c: &&CardExport| c.status == "passed" || c.status == "failed";
        let passed = cards.iter().filter(|c| c.status == "passed").count();
        let failed = cards.iter().filter(|c| c.status == "failed").count();
        let first_pass = cards.iter().filter(|c| c.status == "passed" && c.attempts <= 1).count();
        let mut throughput: Vec<f64> = cards.iter().filter(is_final).map(|c| since(&c.updated_at)).collect();
        throughput.sort_by(f64::total_cmp);
        let throughput: Vec<(f64, usize)> = throughput.into_iter().enumerate().map(|(i, t)| (t, i + 1)).collect();
        let last_event =
            data.steps.iter().map(|s| since(&s.at)).chain(throughput.last().map(|p| p.0)).fold(0.0f64, f64::max);
        let duration_s = match &data.batch.finished_at {
            Some(f) => since(f).max(last_event),
            None => last_event,
        };
        let done = passed + failed;
        let bundles = &data.export.bundles;
        let count = |s: &str| bundles.iter().filter(|b| b.status == s).count();
        let figures = Figures {
            cards: cards.len(),
            passed,
            failed,
            in_progress: cards.len() - done,
            first_pass,
            first_pass_yield: if cards.is_empty() { 0.0 } else { first_pass as f64 / cards.len() as f64 },
            duration_s,
            cards_per_hour: if duration_s > 0.0 { done as f64 * 3600.0 / duration_s } else { 0.0 },
            bundles_sealed: count("sealed"),
            bundles_aborted: count("aborted"),
            bundles_forming: count("forming"),
        };
        let unlabelled = bundles
            .iter()
            .filter(|b| b.status == "sealed" && !labels.contains(&format!("bundle-{}.txt", b.bundle_id)))
            .map(|b| b.bundle_id.clone())
            .collect();
        Report {
            batch: data.batch.clone(),
            figures,
            throughput,
            steps: step_stats(&data.steps),
            pareto: pareto(cards),
            cards: cards.clone(),
            bundles: bundles.clone(),
            labels,
            unlabelled,
        }
    }
}

/// Per step: each intent paired with the done or failed line of the same
/// card, attempt and step that follows it.
fn step_stats(steps: &[export::StepExport]) -> Vec<StepStats> {
    let mut open: HashMap<(&str, i64, &str), i64> = HashMap::new();
    let mut runs: BTreeMap<&str, (Vec<f64>, usize)> = BTreeMap::new();
    for s in steps {
        let key = (s.card_id.as_str(), s.attempt, s.step.as_str());
        let Some(at) = parse_utc(&s.at) else { continue };
        match s.event.as_str() {
            "intent" => {
                open.insert(key, at);
            }
            "done" | "failed" => {
                if let Some(began) = open.remove(&key) {
                    let e = runs.entry(s.step.as_str()).or_default();
                    e.0.push((at - began).max(0) as f64 / 1000.0);
                    if s.event == "failed" {
                        e.1 += 1;
                    }
                }
            }
            _ => {}
        }
    }
    let mut out: Vec<StepStats> = runs
        .into_iter()
        .map(|(step, (mut d, failed))| {
            d.sort_by(f64::total_cmp);
            StepStats {
                step: step.to_string(),
                runs: d.len(),
                failed,
                min: d[0],
                median: percentile(&d, 50.0),
                p95: percentile(&d, 95.0),
                max: d[d.len() - 1],
            }
        })
        .collect();
    let rank = |s: &str| STEP_ORDER.iter().position(|o| *o == s).unwrap_or(STEP_ORDER.len());
    out.sort_by(|a, b| rank(&a.step).cmp(&rank(&b.step)).then(a.step.cmp(&b.step)));
    out
}

/// Failed cards by (step, reason), most frequent first (ties by name), with
/// the cumulative share.
pub fn pareto(cards: &[CardExport]) -> Vec<ParetoItem> {
    let mut m: BTreeMap<(String, String), usize> = BTreeMap::new();
    for c in cards.iter().filter(|c| c.status == "failed") {
        let step = c.failed_step.clone().unwrap_or_else(|| "unknown".into());
        let reason = c.failure_reason.clone().unwrap_or_else(|| "unknown".into());
        *m.entry((step, reason)).or_default() += 1;
    }
    let total: usize = m.values().sum();
    let mut v: Vec<_> = m.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut sum = 0;
    v.into_iter()
        .map(|((step, reason), count)| {
            sum += count;
            ParetoItem { step, reason, count, cumulative_pct: sum as f64 * 100.0 / total as f64 }
        })
        .collect()
}

/// Escapes text for HTML and XML (element content and quoted attributes).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Seconds with a precision that suits their size.
fn secs(s: f64) -> String {
    if s < 10.0 { format!("{s:.3}") } else { format!("{s:.1}") }
}

fn pct(f: f64) -> String {
    format!("{:.1}%", f * 100.0)
}

/// A tick step of about `max / 5` rounded to 1, 2 or 5 times a power of ten.
fn nice_step(max: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let n = raw / mag;
    mag * if n <= 1.0 {
        1.0
    } else if n <= 2.0 {
        2.0
    } else if n <= 5.0 {
        5.0
    } else {
        10.0
    }
}

fn num(v: f64) -> String {
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.into() }
}

const W: f64 = 640.0;
const H: f64 = 280.0;
const ML: f64 = 56.0;
const MR: f64 = 56.0;
const MT: f64 = 20.0;
const MB: f64 = 44.0;

fn svg_open(id: &str, title: &str, height: f64) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"{id}\" class=\"chart\" viewBox=\"0 0 {W} {height}\" \
         width=\"{W}\" height=\"{height}\" role=\"img\" aria-label=\"{t}\"><title>{t}</title>\n",
        t = escape(title)
    )
}

fn no_data(s: &mut String, height: f64, text: &str) {
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" class=\"muted\">{}</text>",
        num(W / 2.0),
        num(height / 2.0),
        escape(text)
    );
}

/// Cards in a final state over time since the batch started: a step line.
pub fn throughput_svg(points: &[(f64, usize)], duration_s: f64) -> String {
    let mut s = svg_open("chart-throughput", "Throughput: cards finished over time", H);
    if points.is_empty() {
        no_data(&mut s, H, "no card finished");
        s.push_str("</svg>");
        return s;
    }
    let xmax = duration_s.max(points.last().map_or(0.0, |p| p.0)).max(0.001);
    let ymax = points.last().map_or(1, |p| p.1).max(1) as f64;
    let (pw, ph) = (W - ML - MR, H - MT - MB);
    let x = |t: f64| ML + t / xmax * pw;
    let y = |n: f64| MT + ph - n / ymax * ph;
    axes(&mut s, &x, &y, xmax, ymax, true, "seconds since start", "cards");
    let mut path = format!("M{} {}", num(x(0.0)), num(y(0.0)));
    let mut prev = 0usize;
    for &(t, n) in points {
        let _ = write!(path, " L{} {} L{} {}", num(x(t)), num(y(prev as f64)), num(x(t)), num(y(n as f64)));
        prev = n;
    }
    let _ = write!(path, " L{} {}", num(x(xmax)), num(y(prev as f64)));
    let _ = writeln!(s, "<path class=\"series\" d=\"{path}\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\"/>");
    s.push_str("</svg>");
    s
}

#[allow(clippy::too_many_arguments)]
fn axes(
    s: &mut String,
    x: &dyn Fn(f64) -> f64,
    y: &dyn Fn(f64) -> f64,
    xmax: f64,
    ymax: f64,
    xticks: bool,
    xl: &str,
    yl: &str,
) {
    let _ = writeln!(
        s,
        "<g class=\"axes\" stroke=\"#444\"><line x1=\"{l}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\"/>\
         <line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{b}\"/></g>",
        l = num(x(0.0)),
        r = num(x(xmax)),
        t = num(y(ymax)),
        b = num(y(0.0))
    );
    let step = nice_step(xmax);
    let mut v = 0.0;
    while xticks && v <= xmax * 1.0001 {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" class=\"tick\">{}</text>",
            num(x(v)),
            num(y(0.0) + 16.0),
            num(v)
        );
        v += step;
    }
    let step = nice_step(ymax).max(if ymax >= 1.0 { 1.0 } else { 0.0 });
    let mut v = 0.0;
    while v <= ymax * 1.0001 {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" class=\"tick\">{}</text>",
            num(x(0.0) - 6.0),
            num(y(v) + 4.0),
            num(v)
        );
        v += step;
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" class=\"label\">{}</text>",
        num((x(0.0) + x(xmax)) / 2.0),
        num(y(0.0) + 36.0),
        escape(xl)
    );
    let _ = writeln!(
        s,
        "<text x=\"14\" y=\"{}\" text-anchor=\"middle\" class=\"label\" transform=\"rotate(-90 14 {})\">{}</text>",
        num((y(0.0) + y(ymax)) / 2.0),
        num((y(0.0) + y(ymax)) / 2.0),
        escape(yl)
    );
}

/// Per step, one row: a line from min to max, a box from the median to
/// the 95th percentile, a tick at the median (seconds, linear).
pub fn step_duration_svg(stats: &[StepStats]) -> String {
    const ROW: f64 = 26.0;
    const LEFT: f64 = 110.0;
    let height = MT + MB + ROW * stats.len().max(1) as f64;
    let mut s = svg_open("chart-steps", "Step durations: min, median, 95th percentile, max (seconds)", height);
    if stats.is_empty() {
        no_data(&mut s, height, "no timed steps");
        s.push_str("</svg>");
        return s;
    }
    let xmax = stats.iter().map(|st| st.max).fold(0.0f64, f64::max).max(0.001);
    let pw = W - LEFT - MR;
    let x = |v: f64| LEFT + v / xmax * pw;
    let bottom = MT + ROW * stats.len() as f64;
    let _ = writeln!(
        s,
        "<line x1=\"{l}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#444\"/>",
        l = num(LEFT),
        r = num(x(xmax)),
        b = num(bottom)
    );
    let step = nice_step(xmax);
    let mut v = 0.0;
    while v <= xmax * 1.0001 {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" class=\"tick\">{}</text>",
            num(x(v)),
            num(bottom + 16.0),
            num(v)
        );
        v += step;
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" class=\"label\">seconds</text>",
        num((LEFT + x(xmax)) / 2.0),
        num(bottom + 36.0)
    );
    for (i, st) in stats.iter().enumerate() {
        let cy = MT + ROW * i as f64 + ROW / 2.0;
        let _ = writeln!(
            s,
            "<g class=\"step\" data-step=\"{name}\"><title>{name}: {n} runs, min {min} s, median {med} s, \
             p95 {p95} s, max {max} s</title>\
             <text x=\"{tx}\" y=\"{ty}\" text-anchor=\"end\" class=\"tick\">{name}</text>\
             <line x1=\"{x0}\" y1=\"{cy}\" x2=\"{x3}\" y2=\"{cy}\" stroke=\"#888\"/>\
             <rect x=\"{x1}\" y=\"{by}\" width=\"{bw}\" height=\"{bh}\" fill=\"#aec7e8\" stroke=\"#1f77b4\"/>\
             <line x1=\"{x1}\" y1=\"{by}\" x2=\"{x1}\" y2=\"{be}\" stroke=\"#d62728\" stroke-width=\"2\"/></g>",
            name = escape(&st.step),
            n = st.runs,
            min = secs(st.min),
            med = secs(st.median),
            p95 = secs(st.p95),
            max = secs(st.max),
            tx = num(LEFT - 6.0),
            ty = num(cy + 4.0),
            x0 = num(x(st.min)),
            x3 = num(x(st.max)),
            cy = num(cy),
            x1 = num(x(st.median)),
            by = num(cy - 8.0),
            be = num(cy + 8.0),
            bw = num((x(st.p95) - x(st.median)).max(1.0)),
            bh = 16,
        );
    }
    s.push_str("</svg>");
    s
}

/// Failed cards by step and reason: bars sorted by count (numbered; the
/// table beside names them) and the cumulative share as a line (right axis).
pub fn pareto_svg(items: &[ParetoItem]) -> String {
    let mut s = svg_open("chart-pareto", "Failure Pareto: failed cards by step and reason", H);
    if items.is_empty() {
        no_data(&mut s, H, "no failed cards");
        s.push_str("</svg>");
        return s;
    }
    let ymax = items.iter().map(|i| i.count).max().unwrap_or(1).max(1) as f64;
    let (pw, ph) = (W - ML - MR, H - MT - MB);
    let slot = pw / items.len() as f64;
    let x = |v: f64| ML + v / items.len() as f64 * pw;
    let y = |n: f64| MT + ph - n / ymax * ph;
    let yp = |p: f64| MT + ph - p / 100.0 * ph;
    axes(&mut s, &x, &y, items.len() as f64, ymax, false, "step and reason (numbered as in the table)", "failed cards");
    let mut line = String::new();
    for (i, it) in items.iter().enumerate() {
        let bx = ML + slot * i as f64 + slot * 0.15;
        let _ = writeln!(
            s,
            "<g class=\"bar\"><title>{rank}. {step}: {reason}: {n} ({cum:.1}% cumulative)</title>\
             <rect x=\"{bx}\" y=\"{by}\" width=\"{bw}\" height=\"{bh}\" fill=\"#d62728\"/>\
             <text x=\"{cx}\" y=\"{ly}\" text-anchor=\"middle\" class=\"tick\">{rank}</text>\
             <text x=\"{cx}\" y=\"{ny}\" text-anchor=\"middle\" class=\"tick\">{n}</text></g>",
            rank = i + 1,
            step = escape(&it.step),
            reason = escape(&it.reason),
            n = it.count,
            cum = it.cumulative_pct,
            bx = num(bx),
            by = num(y(it.count as f64)),
            bw = num(slot * 0.7),
            bh = num(y(0.0) - y(it.count as f64)),
            cx = num(bx + slot * 0.35),
            ly = num(y(0.0) + 16.0),
            ny = num(y(it.count as f64) - 4.0),
        );
        let _ = write!(
            line,
            "{}{} {}",
            if i == 0 { "" } else { " " },
            num(ML + slot * (i as f64 + 0.5)),
            num(yp(it.cumulative_pct))
        );
    }
    let _ = writeln!(
        s,
        "<polyline class=\"cumulative\" points=\"{line}\" fill=\"none\" stroke=\"#333\" stroke-width=\"2\"/>"
    );
    let r = W - MR;
    let _ =
        writeln!(s, "<line x1=\"{r}\" y1=\"{}\" x2=\"{r}\" y2=\"{}\" stroke=\"#444\"/>", num(yp(0.0)), num(yp(100.0)));
    for p in [0.0, 25.0, 50.0, 75.0, 100.0] {
        let _ =
            writeln!(s, "<text x=\"{}\" y=\"{}\" class=\"tick\">{}%</text>", num(r + 4.0), num(yp(p) + 4.0), num(p));
    }
    s.push_str("</svg>");
    s
}

/// The figures as (id, label, value) rows, shared by both renderings.
fn figure_rows(r: &Report) -> Vec<(&'static str, &'static str, String)> {
    let f = &r.figures;
    let b = &r.batch;
    vec![
        ("batch", "Batch", format!("{} (id {})", b.name, b.id)),
        ("profile", "Profile", b.profile.clone()),
        ("product", "Product", b.product.clone()),
        ("firmware", "Firmware", b.firmware.clone()),
        ("firmware-sha256", "Firmware load file SHA-256", b.firmware_sha256.clone()),
        ("started", "Started", b.started_at.clone()),
        ("finished", "Finished", b.finished_at.clone().unwrap_or_else(|| "(not finished)".into())),
        ("duration", "Duration", format!("{} s", secs(f.duration_s))),
        ("cards", "Cards", f.cards.to_string()),
        ("passed", "Passed", f.passed.to_string()),
        ("failed", "Failed", f.failed.to_string()),
        ("in-progress", "In progress", f.in_progress.to_string()),
        (
            "first-pass-yield",
            "First-pass yield",
            format!("{} ({} of {})", pct(f.first_pass_yield), f.first_pass, f.cards),
        ),
        ("cards-per-hour", "Throughput", format!("{:.0} cards/hour", f.cards_per_hour)),
        ("bundles-sealed", "Bundles sealed", f.bundles_sealed.to_string()),
        ("bundles-aborted", "Bundles aborted", f.bundles_aborted.to_string()),
    ]
}

fn labels_note(r: &Report) -> Option<String> {
    if r.unlabelled.is_empty() {
        return None;
    }
    Some(format!(
        "{} sealed bundle(s) have no label in this folder's labels/: the labels are written during the batch to \
         the folder `station run --report-dir` named (default reports/<batch>/labels).",
        r.unlabelled.len()
    ))
}

/// Text for a Markdown table cell.
fn md(s: &str) -> String {
    s.replace('\\', "\\\\").replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// `report.md`: the figures and tables (the charts are in report.html).
pub fn render_markdown(r: &Report) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "# Batch report: {}\n", md(&r.batch.name));
    t.push_str("| | |\n| --- | --- |\n");
    for (_, label, value) in figure_rows(r) {
        let _ = writeln!(t, "| {label} | {} |", md(&value));
    }
    t.push_str("\nCharts (throughput, step durations, failure Pareto): report.html.\n");
    t.push_str("\n## Step durations (seconds)\n\n");
    if r.steps.is_empty() {
        t.push_str("No timed steps.\n");
    } else {
        t.push_str(
            "| step | runs | failed | min | median | p95 | max |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        );
        for s in &r.steps {
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} |",
                md(&s.step),
                s.runs,
                s.failed,
                secs(s.min),
                secs(s.median),
                secs(s.p95),
                secs(s.max)
            );
        }
    }
    t.push_str("\n## Failures by step and reason\n\n");
    if r.pareto.is_empty() {
        t.push_str("No failed cards.\n");
    } else {
        t.push_str("| # | step | reason | cards | cumulative |\n| ---: | --- | --- | ---: | ---: |\n");
        for (i, p) in r.pareto.iter().enumerate() {
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {:.1}% |",
                i + 1,
                md(&p.step),
                md(&p.reason),
                p.count,
                p.cumulative_pct
            );
        }
    }
    t.push_str("\n## Bundles\n\n");
    if r.bundles.is_empty() {
        t.push_str("No bundles.\n");
    } else {
        t.push_str("| bundle | status | primary | backups | reason |\n| --- | --- | --- | --- | --- |\n");
        for b in &r.bundles {
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} |",
                md(&b.bundle_id),
                md(&b.status),
                md(b.primary.as_deref().unwrap_or("-")),
                md(&b.backups.join(", ")),
                md(b.reason.as_deref().unwrap_or(""))
            );
        }
    }
    t.push_str("\n## Bundle labels\n\n");
    if r.labels.is_empty() {
        t.push_str("No label files in labels/.\n");
    }
    for l in &r.labels {
        let _ = writeln!(t, "- [labels/{0}](labels/{0})", md(l));
    }
    if let Some(n) = labels_note(r) {
        let _ = writeln!(t, "\n{n}");
    }
    t.push_str("\n## Cards\n\n");
    if r.cards.is_empty() {
        t.push_str("No cards.\n");
    } else {
        t.push_str(
            "| card | status | stage | serial | reader | attempts | failed step | reason |\n\
             | --- | --- | --- | ---: | --- | ---: | --- | --- |\n",
        );
        for c in &r.cards {
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                md(&c.card_id),
                md(&c.status),
                md(c.stage.as_deref().unwrap_or("")),
                c.serial.map(|s| s.to_string()).unwrap_or_default(),
                md(&c.reader),
                c.attempts,
                md(c.failed_step.as_deref().unwrap_or("")),
                md(c.failure_reason.as_deref().unwrap_or(""))
            );
        }
    }
    t.push_str("\nLedger export of this batch: ledger-export.json, ledger-export.csv (docs/ledger.md).\n");
    t
}

const CSS: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}\
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.2em .6em;text-align:left}\
td{overflow-wrap:anywhere}td.n{text-align:right}code,.mono{font-family:monospace}figure{margin:1em 0}figcaption{font-weight:bold}\
svg.chart{border:1px solid #ddd;background:#fff;max-width:100%;height:auto}svg .tick{font-size:11px;fill:#333}svg .label{font-size:12px;fill:#333}\
svg .muted{font-size:14px;fill:#888}.note{background:#fff3cd;padding:.5em}";

/// `report.html`: self-contained (inline CSS and SVG, no scripts, nothing
/// fetched).
pub fn render_html(r: &Report) -> String {
    let mut h = String::new();
    let name = escape(&r.batch.name);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>Batch report: {name}</title>\n<style>{CSS}</style>\n</head>\n<body>\n\
         <h1>Batch report: {name}</h1>\n<table id=\"figures\">\n"
    );
    for (id, label, value) in figure_rows(r) {
        let _ = writeln!(h, "<tr><th>{label}</th><td id=\"fig-{id}\">{}</td></tr>", escape(&value));
    }
    h.push_str("</table>\n<h2>Charts</h2>\n");
    for (caption, svg) in [
        ("Throughput: cards in a final state over time", throughput_svg(&r.throughput, r.figures.duration_s)),
        ("Step durations (seconds): min to max line, median (red) to p95 box", step_duration_svg(&r.steps)),
        ("Failure Pareto: failed cards by step and reason, cumulative share", pareto_svg(&r.pareto)),
    ] {
        let _ = writeln!(h, "<figure><figcaption>{}</figcaption>\n{svg}\n</figure>", escape(caption));
    }
    h.push_str("<h2>Step durations (seconds)</h2>\n");
    if r.steps.is_empty() {
        h.push_str("<p>No timed steps.</p>\n");
    } else {
        h.push_str(
            "<table id=\"steps\"><tr><th>step</th><th>runs</th><th>failed</th><th>min</th><th>median</th>\
             <th>p95</th><th>max</th></tr>\n",
        );
        for s in &r.steps {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
                 <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                escape(&s.step),
                s.runs,
                s.failed,
                secs(s.min),
                secs(s.median),
                secs(s.p95),
                secs(s.max)
            );
        }
        h.push_str("</table>\n");
    }
    h.push_str("<h2>Failures by step and reason</h2>\n");
    if r.pareto.is_empty() {
        h.push_str("<p>No failed cards.</p>\n");
    } else {
        h.push_str(
            "<table id=\"failures\"><tr><th>#</th><th>step</th><th>reason</th><th>cards</th><th>cumulative</th></tr>\n",
        );
        for (i, p) in r.pareto.iter().enumerate() {
            let _ = writeln!(
                h,
                "<tr><td class=\"n\">{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{:.1}%</td></tr>",
                i + 1,
                escape(&p.step),
                escape(&p.reason),
                p.count,
                p.cumulative_pct
            );
        }
        h.push_str("</table>\n");
    }
    h.push_str("<h2>Bundles</h2>\n");
    if r.bundles.is_empty() {
        h.push_str("<p>No bundles.</p>\n");
    } else {
        h.push_str(
            "<table id=\"bundles\"><tr><th>bundle</th><th>status</th><th>primary</th><th>backups</th>\
             <th>reason</th></tr>\n",
        );
        for b in &r.bundles {
            let _ = writeln!(
                h,
                "<tr><td class=\"mono\">{}</td><td>{}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td>\
                 <td>{}</td></tr>",
                escape(&b.bundle_id),
                escape(&b.status),
                escape(b.primary.as_deref().unwrap_or("-")),
                escape(&b.backups.join(", ")),
                escape(b.reason.as_deref().unwrap_or(""))
            );
        }
        h.push_str("</table>\n");
    }
    h.push_str("<h2>Bundle labels</h2>\n");
    if r.labels.is_empty() {
        h.push_str("<p>No label files in labels/.</p>\n");
    } else {
        h.push_str("<ul id=\"labels\">\n");
        for l in &r.labels {
            let _ = writeln!(h, "<li><a href=\"labels/{0}\">labels/{0}</a></li>", escape(l));
        }
        h.push_str("</ul>\n");
    }
    if let Some(n) = labels_note(r) {
        let _ = writeln!(h, "<p class=\"note\">{}</p>", escape(&n));
    }
    h.push_str("<h2>Cards</h2>\n");
    if r.cards.is_empty() {
        h.push_str("<p>No cards.</p>\n");
    } else {
        h.push_str(
            "<table id=\"cards\"><tr><th>card</th><th>status</th><th>stage</th><th>serial</th><th>reader</th>\
             <th>attempts</th><th>failed step</th><th>reason</th></tr>\n",
        );
        for c in &r.cards {
            let _ = writeln!(
                h,
                "<tr><td class=\"mono\">{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td>{}</td>\
                 <td class=\"n\">{}</td><td>{}</td><td>{}</td></tr>",
                escape(&c.card_id),
                escape(&c.status),
                escape(c.stage.as_deref().unwrap_or("")),
                c.serial.map(|s| s.to_string()).unwrap_or_default(),
                escape(&c.reader),
                c.attempts,
                escape(c.failed_step.as_deref().unwrap_or("")),
                escape(c.failure_reason.as_deref().unwrap_or(""))
            );
        }
        h.push_str("</table>\n");
    }
    h.push_str(
        "<p>Ledger export of this batch: <a href=\"ledger-export.json\">ledger-export.json</a>, \
         <a href=\"ledger-export.csv\">ledger-export.csv</a>.</p>\n</body>\n</html>\n",
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::export::{Export, StepExport};

    /// A small XML well-formedness check: balanced tags, quoted attributes,
    /// known entities only. Returns the element names in document order.
    fn check_xml(s: &str) -> Vec<String> {
        let mut stack: Vec<String> = Vec::new();
        let mut names = Vec::new();
        let mut rest = s;
        while let Some(i) = rest.find(['<', '&']) {
            let text = &rest[..i];
            assert!(!text.contains('>'), "stray '>' in text {text:?}");
            rest = &rest[i..];
            if rest.starts_with('&') {
                let end = rest.find(';').expect("entity ends");
                let ent = &rest[1..end];
                assert!(["amp", "lt", "gt", "quot", "#39"].contains(&ent), "entity {ent}");
                rest = &rest[end + 1..];
                continue;
            }
            let end = rest.find('>').expect("tag ends");
            let tag = &rest[1..end];
            rest = &rest[end + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop().as_deref(), Some(name.trim()), "closing tag");
                continue;
            }
            let self_closing = tag.ends_with('/');
            let tag = tag.trim_end_matches('/');
            let (name, mut attrs) = tag.split_once(char::is_whitespace).unwrap_or((tag, ""));
            assert!(!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric()), "tag name {name:?}");
            loop {
                attrs = attrs.trim_start();
                if attrs.is_empty() {
                    break;
                }
                let eq = attrs.find('=').expect("attribute has a value");
                let key = &attrs[..eq];
                assert!(key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ':'), "attr {key:?}");
                assert!(attrs[eq + 1..].starts_with('"'), "attribute {key} quoted");
                let close = attrs[eq + 2..].find('"').expect("quote closes") + eq + 2;
                assert!(!attrs[eq + 2..close].contains('<'), "'<' in attribute {key}");
                attrs = &attrs[close + 1..];
            }
            names.push(name.to_string());
            if !self_closing {
                stack.push(name.to_string());
            }
        }
        assert!(stack.is_empty(), "unclosed {stack:?}");
        names
    }

    fn card(id: &str, status: &str, attempts: i64, failed: Option<(&str, &str)>, at: &str) -> CardExport {
        CardExport {
            card_id: id.into(),
            status: status.into(),
            stage: (status == "passed").then(|| "bundled".into()),
            serial: None,
            reader: "emu-0".into(),
            batch_id: Some(1),
            attempts,
            failed_step: failed.map(|f| f.0.into()),
            failure_reason: failed.map(|f| f.1.into()),
            failure_detail: None,
            retryable: None,
            firmware_sha256: None,
            gp_key_version: None,
            attested: false,
            attest_counter: None,
            card_public_key: None,
            ca_key_id: None,
            self_tests: false,
            bundle_id: None,
            role: None,
            wallet_pubkey: None,
            first_seen: "2026-11-24T10:00:00.000Z".into(),
            updated_at: at.into(),
            station_id: None,
        }
    }

    fn step(card: &str, step: &str, event: &str, at: &str) -> StepExport {
        StepExport {
            card_id: card.into(),
            attempt: 1,
            step: step.into(),
            event: event.into(),
            detail: None,
            at: at.into(),
        }
    }

    fn batch(name: &str) -> BatchRecord {
        BatchRecord {
            id: 1,
            name: name.into(),
            profile: "profiles/demo.yaml".into(),
            product: "Demo wallet".into(),
            firmware: "wallet 1.0".into(),
            firmware_sha256: "ab".repeat(32),
            started_at: "2026-11-24T10:00:00.000Z".into(),
            finished_at: Some("2026-11-24T10:01:00.000Z".into()),
        }
    }

    fn data(cards: Vec<CardExport>, steps: Vec<StepExport>) -> BatchData {
        BatchData { batch: batch("b1"), export: Export { cards, bundles: Vec::new() }, steps }
    }

    #[test]
    fn timestamps_parse_back() {
        for (secs, ms) in [(0, 0), (1_795_512_345, 7), (951_782_400, 999), (4_102_444_800, 1)] {
            let s = crate::ledger::format_utc(secs, ms);
            assert_eq!(parse_utc(&s), Some(secs as i64 * 1000 + ms as i64), "{s}");
        }
        assert_eq!(parse_utc("2026-11-24T09:25:45Z"), Some(1_795_512_345_000));
        assert_eq!(parse_utc("2026-11-24T09:25:45.5Z"), Some(1_795_512_345_500));
        assert_eq!(parse_utc("2026-13-24T09:25:45Z"), None);
        assert_eq!(parse_utc("yesterday"), None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!((percentile(&v, 50.0), percentile(&v, 95.0), percentile(&v, 100.0)), (10.0, 19.0, 20.0));
        assert_eq!(percentile(&[3.0], 95.0), 3.0);
    }

    #[test]
    fn pareto_is_sorted_by_count_with_the_cumulative_share() {
        let t = "2026-11-24T10:00:10.000Z";
        let cards = vec![
            card("01", "failed", 1, Some(("self_tests", "known-answer test failed")), t),
            card("02", "failed", 1, Some(("attestation", "counterfeit")), t),
            card("03", "passed", 1, None, t),
            card("04", "failed", 2, Some(("attestation", "counterfeit")), t),
            card("05", "failed", 1, Some(("attestation", "counterfeit")), t),
            card("06", "failed", 1, Some(("firmware", "card removed")), t),
            card("07", "in_progress", 1, None, t),
        ];
        let p = pareto(&cards);
        let got: Vec<(&str, usize)> = p.iter().map(|i| (i.reason.as_str(), i.count)).collect();
        assert_eq!(got, [("counterfeit", 3), ("card removed", 1), ("known-answer test failed", 1)]);
        let cum: Vec<f64> = p.iter().map(|i| i.cumulative_pct).collect();
        assert_eq!(cum, [60.0, 80.0, 100.0]);
        let svg = pareto_svg(&p);
        check_xml(&svg);
        assert_eq!(svg.matches("<rect").count(), 3);
        // The cumulative line rises left to right (smaller y is higher).
        let pts = svg.split("points=\"").nth(1).and_then(|s| s.split('"').next()).expect("polyline");
        let ys: Vec<f64> = pts.split(' ').collect::<Vec<_>>().chunks(2).map(|c| c[1].parse().expect("y")).collect();
        assert!(ys.windows(2).all(|w| w[1] <= w[0]), "{ys:?}");
    }

    #[test]
    fn figures_and_step_durations_come_from_the_journal() {
        let cards = vec![
            card("01", "passed", 1, None, "2026-11-24T10:00:20.000Z"),
            card("02", "passed", 2, None, "2026-11-24T10:00:40.000Z"),
            card("03", "failed", 1, Some(("firmware", "card removed")), "2026-11-24T10:00:30.000Z"),
            card("04", "in_progress", 1, None, "2026-11-24T10:00:50.000Z"),
        ];
        let steps = vec![
            step("01", "identify", "intent", "2026-11-24T10:00:01.000Z"),
            step("01", "identify", "done", "2026-11-24T10:00:01.250Z"),
            step("01", "firmware", "intent", "2026-11-24T10:00:02.000Z"),
            step("03", "firmware", "intent", "2026-11-24T10:00:02.000Z"),
            step("01", "firmware", "done", "2026-11-24T10:00:05.000Z"),
            step("03", "firmware", "failed", "2026-11-24T10:00:03.000Z"),
            step("01", "record", "done", "2026-11-24T10:00:05.100Z"),
        ];
        let r = Report::new(&data(cards, steps), Vec::new());
        let f = &r.figures;
        assert_eq!((f.cards, f.passed, f.failed, f.in_progress, f.first_pass), (4, 2, 1, 1, 1));
        assert_eq!(f.first_pass_yield, 0.25);
        assert_eq!(f.duration_s, 60.0);
        assert_eq!(f.cards_per_hour, 180.0);
        assert_eq!(r.throughput, [(20.0, 1), (30.0, 2), (40.0, 3)]);
        let names: Vec<&str> = r.steps.iter().map(|s| s.step.as_str()).collect();
        assert_eq!(names, ["identify", "firmware"], "recipe order; record has no intent");
        let fw = &r.steps[1];
        assert_eq!((fw.runs, fw.failed, fw.min, fw.median, fw.max), (2, 1, 1.0, 1.0, 3.0));
        let html = render_html(&r);
        check_xml(html.trim_start_matches("<!DOCTYPE html>\n").replace("<meta charset=\"utf-8\">", "").as_str());
        for id in ["chart-throughput", "chart-steps", "chart-pareto", "fig-passed", "fig-first-pass-yield"] {
            assert!(html.contains(&format!("id=\"{id}\"")), "{id}");
        }
        assert!(html.contains("<td id=\"fig-first-pass-yield\">25.0% (1 of 4)</td>"));
        let md = render_markdown(&r);
        assert!(md.contains("| Passed | 2 |") && md.contains("| firmware | card removed | 1 | 100.0% |"), "{md}");
    }

    #[test]
    fn an_empty_batch_renders_with_empty_charts() {
        let mut d = data(Vec::new(), Vec::new());
        d.batch.finished_at = None;
        let r = Report::new(&d, Vec::new());
        assert_eq!((r.figures.cards, r.figures.first_pass_yield, r.figures.cards_per_hour), (0, 0.0, 0.0));
        let html = render_html(&r);
        for svg in [throughput_svg(&r.throughput, 0.0), step_duration_svg(&r.steps), pareto_svg(&r.pareto)] {
            let names = check_xml(&svg);
            assert_eq!(names[0], "svg");
            assert!(html.contains(&svg));
        }
        assert!(html.contains("no card finished") && html.contains("No cards.") && html.contains("(not finished)"));
        assert!(render_markdown(&r).contains("No failed cards."));
    }

    #[test]
    fn a_batch_of_failures_only_has_no_yield_and_a_full_pareto() {
        let t = "2026-11-24T10:00:10.000Z";
        let cards = vec![
            card("01", "failed", 1, Some(("attestation", "counterfeit")), t),
            card("02", "failed", 3, Some(("identify", "card removed")), t),
        ];
        let r = Report::new(&data(cards, Vec::new()), Vec::new());
        assert_eq!((r.figures.passed, r.figures.failed, r.figures.first_pass_yield), (0, 2, 0.0));
        assert_eq!(r.pareto.len(), 2);
        assert_eq!(r.pareto[1].cumulative_pct, 100.0);
        for svg in [throughput_svg(&r.throughput, 60.0), step_duration_svg(&r.steps), pareto_svg(&r.pareto)] {
            check_xml(&svg);
        }
        assert!(render_html(&r).contains("<td id=\"fig-passed\">0</td>"));
    }

    #[test]
    fn text_from_the_ledger_is_escaped() {
        let t = "2026-11-24T10:00:10.000Z";
        let evil = "<script>alert('x')</script> & \"q\"";
        let mut d = data(vec![card("01", "failed", 1, Some(("identify", evil)), t)], Vec::new());
        d.batch.name = evil.into();
        let r = Report::new(&d, vec!["bundle-<x>.txt".into()]);
        let html = render_html(&r);
        assert!(!html.contains("<script") && !html.contains("<x>"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"));
        check_xml(&pareto_svg(&r.pareto));
        check_xml(html.trim_start_matches("<!DOCTYPE html>\n").replace("<meta charset=\"utf-8\">", "").as_str());
        d.batch.name = "a|b".into();
        let md = render_markdown(&Report::new(&d, Vec::new()));
        assert!(md.contains("| Batch | a\\|b (id 1) |"), "{md}");
    }
}
