//! `/metrics` end to end: a real emulated batch feeds the station's `Live`
//! (as `station run` does), the HTTP server serves the exposition, Debian's
//! `promtool` (package `prometheus`; scripts/test.sh installs it) checks the
//! exact bytes, and the counters agree with the ledger export. The deploy
//! examples are checked against the code: the Grafana dashboard only
//! queries metrics and labels the station exports, its PromQL parses, and
//! the Prometheus scrape config is valid.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use card::CardId;
use card::emu::factory::{ChipFactory, ChipKind};
use card::emu::{CardFaults, EmuCard};
use card::transport::ReaderMonitor;
use card::transport::emu::EmuBank;
use station::batch::{self, Summary};
use station::control::OneBatch;
use station::firmware::Firmware;
use station::handler::EmuFeeder;
use station::http::{Api, Server};
use station::ledger::export::{self, Export};
use station::ledger::{BatchInfo, Ledger};
use station::live::Live;
use station::metrics::Metrics;
use station::pairing::BundleStatus;
use station::recipe::{CardOutcome, Failure, Passed, Progress, Step};
use station::state::BatchStart;
use station::worker::{Control, Event};
use tapline_tests::{demo_profile, repo};

/// `promtool`: $PROMTOOL or the one on PATH. Missing is a failure, not a
/// skip: the exposition must be checked by Prometheus' own parser.
fn promtool() -> PathBuf {
    let path = std::env::var_os("PROMTOOL").map_or_else(|| PathBuf::from("promtool"), PathBuf::from);
    let found = Command::new(&path).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    assert!(
        found.is_ok_and(|s| s.success()),
        "promtool not found ({}; set PROMTOOL to another path): install Debian's `prometheus` package \
         (`sudo apt-get install prometheus`; scripts/test.sh installs it) to check the metrics exposition",
        path.display()
    );
    path
}

/// Runs promtool with `args` and `stdin`; returns (success, stdout+stderr).
fn run_promtool(args: &[&str], stdin: &[u8]) -> (bool, String) {
    let mut child = Command::new(promtool())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool starts");
    child.stdin.take().expect("stdin").write_all(stdin).expect("write to promtool");
    let out = child.wait_with_output().expect("promtool runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// One sample of the exposition: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the samples of a text exposition (the label values this test
/// meets hold no escaped quotes).
fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("sample has a value");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}').expect("labels close")),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once("=\"").expect("label=\"value\"");
                    (k.to_string(), v.trim_end_matches('"').to_string())
                })
                .collect();
            Sample { name: name.to_string(), labels, value: value.parse().expect("sample value") }
        })
        .collect()
}

/// The sum of the samples named `name` whose labels include `want`.
fn sum(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && want.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

/// 12 cards: 8 genuine, 2 counterfeit (fail at identify), 2 with a failing
/// known-answer test (fail at self-tests). None of these faults is
/// retryable and every card identifies itself, so each card has exactly
/// one outcome and one ledger row.
fn cards() -> Vec<EmuCard> {
    let mut f = ChipFactory::new(2031);
    (0..12)
        .map(|i| match i % 6 {
            1 => f.make(ChipKind::Counterfeit, CardFaults::default()),
            4 => f.make(ChipKind::Genuine, CardFaults { failing_kat: true, ..CardFaults::default() }),
            _ => f.make(ChipKind::Genuine, CardFaults::default()),
        })
        .collect()
}

struct Run {
    summary: Summary,
    export: Export,
    apdus_on_cards: u64,
    live: Arc<Live>,
    _dir: tempfile::TempDir,
}

/// Runs the batch the way `station run` does: events into `Live`, ledger
/// write latencies into the metrics.
fn run_batch(readers: usize, cards: Vec<EmuCard>) -> Run {
    let profile = demo_profile();
    let target = cards.len();
    let firmware = Arc::new(Firmware::load(&profile.firmware_dir, &profile.release_keys).expect("firmware"));
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger_path = dir.path().join("ledger.db");
    let (ledger, writer) = Ledger::open(&ledger_path).expect("ledger");
    let live = Live::new("st-metrics");
    {
        let live = Arc::clone(&live);
        ledger.observe_writes(Arc::new(move |d| live.metrics().observe_ledger_write(d)));
    }
    let batch_id = ledger
        .start_batch(BatchInfo {
            name: "metrics".into(),
            profile: "demo".into(),
            product: profile.product.clone(),
            firmware: firmware.manifest.name.clone(),
            firmware_sha256: hex::encode(firmware.load_file_sha256),
        })
        .expect("batch");
    let bank = EmuBank::new(readers, 0.0, Duration::from_millis(200));
    let feeder = Arc::new(EmuFeeder::new(bank.clone(), cards));
    feeder.fill();
    let mut monitor: Box<dyn ReaderMonitor> = Box::new(bank);
    live.set_profile("demo");
    {
        let mut m = live.model();
        m.set_readers(monitor.readers().expect("readers"));
        let start = BatchStart { name: "metrics".into(), id: batch_id, profile: "demo".into(), target: Some(target) };
        m.batch_started(start, Instant::now(), SystemTime::now());
    }
    let recipe = Arc::new(station::recipe::Recipe::new(profile, firmware, ledger.clone(), batch_id));
    let output = batch::Output { labels: Some(dir.path().join("labels")), keep_outcomes: true };
    let summary =
        batch::run(&mut *monitor, recipe, Arc::clone(&feeder) as _, Some(target), output, Control::new(), |ev| {
            live.on_event(ev)
        })
        .expect("batch runs");
    live.model().batch_finished(Instant::now(), SystemTime::now());
    live.publish();
    ledger.finish_batch(batch_id, None).expect("finish");
    drop(ledger);
    writer.close();
    let export = export::export(&ledger_path).expect("export");
    let apdus_on_cards = feeder.take_bins().iter().map(|(_, c)| c.view().apdus).sum();
    Run { summary, export, apdus_on_cards, live, _dir: dir }
}

#[test]
fn served_metrics_pass_promtool_and_agree_with_the_ledger() {
    let run = run_batch(4, cards());
    let server = Server::start(
        "127.0.0.1:0".parse().expect("addr"),
        Api {
            live: Arc::clone(&run.live),
            controller: Arc::new(OneBatch { control: Control::new(), live: Arc::clone(&run.live) }),
            token: None,
        },
    )
    .expect("server starts");
    let resp = ureq::get(format!("http://{}/metrics", server.addr)).call().expect("GET /metrics");
    let content_type = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let body = resp.into_body().read_to_string().expect("body");
    server.stop();

    // The bytes served, as Prometheus' own parser and linter see them.
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    let (ok, said) = run_promtool(&["check", "metrics"], body.as_bytes());
    assert!(ok && said.trim().is_empty(), "promtool check metrics: {said}\n--- exposition ---\n{body}");

    // What the comparison rests on: one outcome per card, one ledger row
    // per card. (A retried card has one outcome per attempt but one ledger
    // row, and a card too mute to identify has an outcome but no row: with
    // such faults tapline_cards_total counts outcomes, as the batch summary
    // does, not ledger rows.)
    let (s, e) = (&run.summary, &run.export);
    assert_eq!(s.outcomes.len(), 12);
    assert_eq!(e.cards.len(), 12, "one ledger row per outcome");
    assert!(e.cards.iter().all(|c| c.attempts == 1), "{:#?}", e.cards);

    let m = samples(&body);
    let station = ("station", "st-metrics");
    assert!(m.iter().all(|x| x.labels.get("station").map(String::as_str) == Some("st-metrics")), "{body}");
    let ledger_count = |status: &str| e.cards.iter().filter(|c| c.status == status).count() as f64;
    let cards = |outcome| sum(&m, "tapline_cards_total", &[station, ("profile", "demo"), ("outcome", outcome)]);
    assert_eq!(cards("passed"), ledger_count("passed"));
    assert_eq!(cards("failed"), ledger_count("failed"));
    assert_eq!((cards("passed"), cards("failed")), (8.0, 4.0));
    assert_eq!((s.passed() as f64, s.failed() as f64), (8.0, 4.0));
    let first_pass = e.cards.iter().filter(|c| c.status == "passed" && c.attempts == 1).count() as f64;
    assert_eq!(sum(&m, "tapline_cards_first_pass_total", &[("profile", "demo")]), first_pass);

    // Failures by step and reason, exactly as the ledger records them.
    let mut ledger_failures: BTreeMap<(String, String), f64> = BTreeMap::new();
    for c in e.cards.iter().filter(|c| c.status == "failed") {
        let key = (c.failed_step.clone().unwrap_or_default(), c.failure_reason.clone().unwrap_or_default());
        *ledger_failures.entry(key).or_default() += 1.0;
    }
    let metric_failures: BTreeMap<(String, String), f64> = m
        .iter()
        .filter(|x| x.name == "tapline_failures_total")
        .map(|x| ((x.labels["step"].clone(), x.labels["reason"].clone()), x.value))
        .collect();
    assert_eq!(metric_failures, ledger_failures);
    assert!(ledger_failures.keys().any(|(step, _)| step == "identify"), "{ledger_failures:?}");
    assert!(ledger_failures.keys().any(|(step, _)| step == "self_tests"), "{ledger_failures:?}");

    // Bundles: 8 passed cards in bundles of 3 make 2 sealed bundles.
    let ledger_bundles = |status: &str| e.bundles.iter().filter(|b| b.status == status).count() as f64;
    let bundles = |outcome| sum(&m, "tapline_bundles_total", &[("outcome", outcome)]);
    assert_eq!(bundles("sealed"), ledger_bundles("sealed"));
    assert_eq!(bundles("aborted"), ledger_bundles("aborted"));
    assert_eq!((bundles("sealed"), s.bundles_sealed.len() as f64), (2.0, 2.0));

    // Durations: one card observation per outcome; every step observed.
    assert_eq!(sum(&m, "tapline_card_duration_seconds_count", &[]), 12.0);
    let steps: BTreeSet<&str> = m
        .iter()
        .filter(|x| x.name == "tapline_step_duration_seconds_count" && x.value > 0.0)
        .map(|x| x.labels["step"].as_str())
        .collect();
    // (`record` is a ledger write, not a timed card step: the recipe reports
    // no StepDone for it; pairing is timed by the worker.)
    for step in Step::ALL.into_iter().filter(|s| *s != Step::Record).chain([Step::Pairing]) {
        assert!(steps.contains(step.name()), "no duration for {step}: {steps:?}");
    }
    // The station counted every APDU the cards saw.
    assert_eq!(sum(&m, "tapline_apdus_total", &[("profile", "demo")]), run.apdus_on_cards as f64);
    // Four readers, one state each; the ledger committed and was timed.
    assert_eq!(sum(&m, "tapline_readers", &[]), 4.0);
    assert!(sum(&m, "tapline_ledger_write_seconds_count", &[]) > 0.0);
}

/// A `Metrics` with one series of every kind, encoded.
fn every_kind_of_sample() -> String {
    let m = Metrics::new("st-1");
    let reader = card::transport::ReaderId("emu-0".into());
    let outcome = |result| {
        Event::Outcome(CardOutcome {
            reader: reader.clone(),
            card_id: Some(CardId([1; 10])),
            result,
            elapsed: Duration::from_secs(5),
            attempt: 1,
            ready: None,
        })
    };
    m.observe(&outcome(Ok(Passed { serial: Some(1), stage: "bundled".into(), bundle: None, role: None })), "demo");
    m.observe(&outcome(Err(Failure::new(Step::Attestation, "counterfeit", "", false))), "demo");
    for ok in [true, false] {
        let done = Progress::StepDone { step: Step::Firmware, elapsed: Duration::from_secs(3), ok };
        m.observe(&Event::Progress { reader: reader.clone(), progress: done }, "demo");
    }
    m.observe(&Event::Apdus { reader: reader.clone(), count: 100 }, "demo");
    m.observe(&Event::Bundle { bundle: "b".into(), status: BundleStatus::Sealed, members: vec![] }, "demo");
    m.observe_ledger_write(Duration::from_millis(2));
    m.encode()
}

fn dashboard() -> serde_json::Value {
    let path = repo().join("deploy/grafana/tapline-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("dashboard file");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

/// Every PromQL expression in the dashboard (panel targets and variables).
fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(o) => {
            for (k, x) in o {
                match (k.as_str(), x) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_queries(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| dashboard_queries(x, out)),
        _ => {}
    }
}

/// A label matcher: the label name and, for `=`, the value (`=~` has none).
type Matcher = (String, Option<String>);

/// The `tapline_*` metric names in `expr`, each with the label names its
/// selector matches on and the values of its `=` matchers.
fn selectors(expr: &str) -> Vec<(String, Vec<Matcher>)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("tapline_") {
        rest = &rest[at..];
        let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
        let name = rest[..end].to_string();
        rest = &rest[end..];
        let mut matchers = Vec::new();
        if let Some(body) = rest.strip_prefix('{') {
            let close = body.find('}').expect("selector closes");
            for m in body[..close].split(',').filter(|m| !m.trim().is_empty()) {
                let (key, value) = if let Some((k, _)) = m.split_once("=~") {
                    (k, None)
                } else {
                    let (k, v) = m.split_once('=').expect("label matcher");
                    (k, Some(v.trim().trim_matches('"').to_string()))
                };
                matchers.push((key.trim().to_string(), value));
            }
            rest = &body[close..];
        }
        out.push((name, matchers));
    }
    out
}

/// The label names of every `by (...)` clause in `expr`.
fn grouping_labels(expr: &str) -> Vec<String> {
    expr.split("by (")
        .skip(1)
        .flat_map(|s| s.split(')').next().unwrap_or_default().split(',').map(|l| l.trim().to_string()))
        .collect()
}

#[test]
fn the_grafana_dashboard_queries_only_what_the_station_exports() {
    let d = dashboard();
    assert!(d["title"].is_string() && d["uid"].is_string(), "a dashboard has a title and uid");
    let panels = d["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8, "{} panels", panels.len());
    let mut queries = Vec::new();
    dashboard_queries(&d, &mut queries);
    assert!(!queries.is_empty());

    let exported = samples(&every_kind_of_sample());
    let mut used = BTreeSet::new();
    for q in &queries {
        let sel = selectors(q);
        assert!(!sel.is_empty(), "a query that reads no tapline metric: {q}");
        for (name, matchers) in &sel {
            used.insert(name.clone());
            let series: Vec<&Sample> = exported.iter().filter(|s| &s.name == name).collect();
            assert!(!series.is_empty(), "the dashboard queries {name}, which the station does not export: {q}");
            for (key, value) in matchers {
                assert!(series.iter().any(|s| s.labels.contains_key(key)), "{name} has no label {key}: {q}");
                if let Some(v) = value {
                    assert!(series.iter().any(|s| s.labels.get(key) == Some(v)), "{name} never has {key}=\"{v}\": {q}");
                }
            }
        }
        for label in grouping_labels(q) {
            assert!(
                sel.iter().any(|(n, _)| exported.iter().any(|s| &s.name == n && s.labels.contains_key(&label))),
                "grouping by {label}, which no metric of the query has: {q}"
            );
        }
    }
    // The line view (issue #9): a multi-select station variable with All,
    // and throughput, yield and failures both per station and for the
    // whole line (summed over the selected stations).
    let station_var = d["templating"]["list"]
        .as_array()
        .and_then(|l| l.iter().find(|v| v["name"] == "station"))
        .expect("a station variable");
    assert!(station_var["multi"] == true && station_var["includeAll"] == true, "{station_var}");
    for (what, needle) in
        [("throughput", "tapline_cards_total{"), ("yield", "outcome=\"passed\""), ("failures", "outcome=\"failed\"")]
    {
        let per_station = queries.iter().any(|q| {
            let by = grouping_labels(q);
            q.contains(needle) && !by.is_empty() && by.iter().all(|l| l == "station")
        });
        let whole_line = queries.iter().any(|q| q.contains(needle) && q.starts_with("sum(") && !q.contains("by ("));
        assert!(per_station && whole_line, "{what}: a per-station and a whole-line panel");
    }

    // The panels the issue asks for.
    for name in [
        "tapline_cards_total",
        "tapline_cards_first_pass_total",
        "tapline_failures_total",
        "tapline_step_duration_seconds_bucket",
        "tapline_readers",
        "tapline_bundles_total",
        "tapline_ledger_write_seconds_bucket",
    ] {
        assert!(used.contains(name), "no panel reads {name}");
    }

    // And every panel query is PromQL that Prometheus parses: promtool
    // checks them as recording rules (Grafana's variables substituted).
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in queries.iter().filter(|q| !q.starts_with("label_values(")).enumerate() {
        let expr = q.replace("$__range", "1h").replace("$station", ".*");
        let expr = serde_json::to_string(&expr).expect("json string");
        rules.push_str(&format!("      - record: tapline:dashboard_query_{i}\n        expr: {expr}\n"));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, &rules).expect("write rules");
    let (ok, said) = run_promtool(&["check", "rules", file.to_str().expect("utf8")], b"");
    assert!(ok, "promtool check rules on the dashboard's queries: {said}\n{rules}");
}

#[test]
fn the_prometheus_scrape_config_is_valid() {
    let path: &Path = &repo().join("deploy/prometheus/prometheus.yml");
    let (ok, said) = run_promtool(&["check", "config", path.to_str().expect("utf8")], b"");
    assert!(ok, "promtool check config: {said}");
    let text = std::fs::read_to_string(path).expect("config");
    assert!(text.contains("job_name: tapline") && text.contains(":9464"), "{text}");
    // A line: several stations scraped, none given a `station` target label
    // (the stations label their own series).
    let targets = text
        .lines()
        .filter(|l| l.trim_start().starts_with("- targets:"))
        .map(|l| l.matches(":94").count())
        .sum::<usize>();
    assert!(targets >= 3, "a line of stations is scraped: {text}");
    assert!(!text.lines().any(|l| l.trim_start().starts_with("station:")), "{text}");
}
