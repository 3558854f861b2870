//! `station report` after real emulated batches: the report folder, its
//! figures against the ledger export, and report.html rendered by a
//! headless Chromium (Debian's `chromium`; scripts/test.sh installs it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use station::ledger::export::Export;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn station(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_station")).args(args).current_dir(cwd).output().expect("station runs")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn run_batch(cwd: &Path, ledger: &str, name: &str, cards: &str, seed: &str) {
    let profile = repo().join("profiles/demo.yaml");
    let o = station(
        cwd,
        &[
            "run",
            "--profile",
            profile.to_str().expect("utf8"),
            "--sim",
            "4",
            "--cards",
            cards,
            "--card-speed",
            "0",
            "--ledger",
            ledger,
            "--headless",
            "--seed",
            seed,
            "--batch",
            name,
            "--sim-faults",
            "counterfeit=0.2,selftest=0.1",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
}

/// The Chromium binary: $CHROMIUM or /usr/bin/chromium. Missing is a
/// failure, not a skip: the report's HTML must be checked in a browser.
fn chromium() -> PathBuf {
    let path = std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(
        path.is_file(),
        "headless Chromium not found at {} (set CHROMIUM to another path): install Debian's `chromium` \
         package (`sudo apt-get install chromium`; scripts/test.sh installs it) to check report.html renders",
        path.display()
    );
    path
}

/// Runs headless Chromium with `args` on `page`, killing it after a minute.
fn chromium_run(profile_dir: &Path, args: &[&str], page: &Path) -> Output {
    let mut child = Command::new(chromium())
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
        .arg(format!("--user-data-dir={}", profile_dir.display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium starts");
    let started = Instant::now();
    while child.try_wait().expect("chromium status").is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("chromium did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().expect("chromium output")
}

fn figure(html: &str, id: &str) -> String {
    let open = format!("<td id=\"fig-{id}\">");
    let start = html.find(&open).unwrap_or_else(|| panic!("figure {id} missing")) + open.len();
    html[start..].split("</td>").next().expect("figure ends").to_string()
}

#[test]
fn report_of_an_emulated_batch_matches_the_ledger_and_renders_in_a_browser() {
    let chromium_path = chromium();
    let dir = tempfile::tempdir().expect("tempdir");
    let cwd = dir.path();
    let ledger = cwd.join("l.db");
    let ledger = ledger.to_str().expect("utf8");
    // Two batches in one ledger: the report holds only its own.
    run_batch(cwd, ledger, "warmup", "6", "3");
    run_batch(cwd, ledger, "b2", "12", "11");

    let o = station(cwd, &["report", "--ledger", ledger, "--batch", "b2"]);
    assert!(o.status.success(), "{}", text(&o));
    // Default folder: reports/<batch>, where `station run` wrote the labels.
    let out = cwd.join("reports/b2");
    for f in ["report.md", "report.html", "ledger-export.json", "ledger-export.csv", "summary.txt"] {
        assert!(out.join(f).is_file(), "{f} missing: {}", text(&o));
    }

    let full = station(cwd, &["ledger", "export", "--ledger", ledger, "--format", "json"]);
    let full: Export = serde_json::from_slice(&full.stdout).expect("export json");
    let batch_ids: std::collections::BTreeSet<i64> = full.cards.iter().filter_map(|c| c.batch_id).collect();
    assert_eq!(batch_ids.len(), 2, "both batches in the ledger");
    let b2 = *batch_ids.last().expect("second batch");
    let mine: Export = serde_json::from_str(&std::fs::read_to_string(out.join("ledger-export.json")).expect("json"))
        .expect("report export");
    let mut want = full.clone();
    want.cards.retain(|c| c.batch_id == Some(b2));
    want.bundles.retain(|b| b.batch_id == Some(b2));
    assert_eq!(mine, want, "the report's export is the ledger export of its batch");
    assert_eq!(mine.cards.len(), 12);
    let csv = std::fs::read_to_string(out.join("ledger-export.csv")).expect("csv");
    assert!(csv.starts_with("card_id,status,") && csv.lines().count() == 13, "{csv}");

    let passed = mine.cards.iter().filter(|c| c.status == "passed").count();
    let failed = mine.cards.iter().filter(|c| c.status == "failed").count();
    let first = mine.cards.iter().filter(|c| c.status == "passed" && c.attempts <= 1).count();
    let sealed: Vec<_> = mine.bundles.iter().filter(|b| b.status == "sealed").collect();
    let aborted = mine.bundles.iter().filter(|b| b.status == "aborted").count();
    assert!(failed > 0 && !sealed.is_empty(), "the fault mix fails cards and bundles form: {mine:?}");

    let html = std::fs::read_to_string(out.join("report.html")).expect("html");
    // Self-contained: no scripts, nothing loaded (the only URL is the SVG
    // namespace name); links go to the files beside it.
    assert!(!html.contains("<script") && !html.contains("src=") && !html.contains("url("), "self-contained");
    assert!(html.matches("http").count() == html.matches("xmlns=\"http://www.w3.org/2000/svg\"").count());
    assert_eq!(figure(&html, "cards"), "12");
    assert_eq!(figure(&html, "passed"), passed.to_string());
    assert_eq!(figure(&html, "failed"), failed.to_string());
    assert_eq!(figure(&html, "first-pass-yield"), format!("{:.1}% ({first} of 12)", first as f64 * 100.0 / 12.0));
    assert_eq!(figure(&html, "bundles-sealed"), sealed.len().to_string());
    assert_eq!(figure(&html, "bundles-aborted"), aborted.to_string());
    for b in &sealed {
        assert!(html.contains(&format!("labels/bundle-{}.txt", b.bundle_id)), "label of {} listed", b.bundle_id);
    }
    assert!(!html.contains("have no label"), "every label is in the report folder");
    let md = std::fs::read_to_string(out.join("report.md")).expect("md");
    assert!(md.contains(&format!("| Passed | {passed} |")) && md.contains("| Batch | b2 (id "), "{md}");

    // The failure table agrees with the ledger: counts by step and reason.
    let mut by_reason = std::collections::BTreeMap::<(String, String), usize>::new();
    for c in mine.cards.iter().filter(|c| c.status == "failed") {
        let key = (c.failed_step.clone().unwrap_or_default(), c.failure_reason.clone().unwrap_or_default());
        *by_reason.entry(key).or_default() += 1;
    }
    for ((step, reason), n) in &by_reason {
        let row = format!("<td>{step}</td><td>{}</td><td class=\"n\">{n}</td>", station::report::escape(reason));
        assert!(html.contains(&row), "failure row {row}");
    }

    // Rendered by a real browser: the DOM after parsing holds the three
    // charts as SVG with their marks, and the figures.
    let profile = tempfile::tempdir().expect("chromium profile");
    let page = out.join("report.html").canonicalize().expect("path");
    let dom = chromium_run(profile.path(), &["--dump-dom"], &page);
    let dom_text = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.status.success() && dom_text.contains("</html>"), "{} {}", chromium_path.display(), text(&dom));
    for id in ["chart-throughput", "chart-steps", "chart-pareto"] {
        assert!(dom_text.contains(&format!("<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"{id}\"")), "{id} in DOM");
    }
    assert!(dom_text.contains("class=\"series\""), "throughput line drawn");
    assert!(dom_text.matches("<g class=\"step\"").count() >= 6, "a row per recipe step");
    assert_eq!(dom_text.matches("<g class=\"bar\"").count(), by_reason.len(), "a bar per failure reason");
    assert!(dom_text.contains(&format!("<td id=\"fig-passed\">{passed}</td>")), "figures in the DOM");

    // And painted: a screenshot of the page is a real PNG, not an error page.
    let shot = cwd.join("report.png");
    let o = chromium_run(
        profile.path(),
        &[&format!("--screenshot={}", shot.display()), "--window-size=1200,2400", "--hide-scrollbars"],
        &page,
    );
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot ({e}): {}", text(&o)));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 20_000, "screenshot of {} bytes", png.len());
}

#[test]
fn report_of_an_unknown_batch_names_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = dir.path().join("l.db");
    let ledger = ledger.to_str().expect("utf8");
    run_batch(dir.path(), ledger, "only", "2", "5");
    let o = station(dir.path(), &["report", "--ledger", ledger, "--batch", "nope"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("no batch named or numbered \"nope\""), "{}", text(&o));
    // By id, into a chosen folder without labels.
    let out = dir.path().join("elsewhere");
    let o = station(dir.path(), &["report", "--ledger", ledger, "--batch", "1", "--out", out.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", text(&o));
    let html = std::fs::read_to_string(out.join("report.html")).expect("html");
    assert!(html.contains("<td id=\"fig-batch\">only (id 1)</td>"), "{html}");
}
