//! `rig run` end to end: the shipped plans on the sim target (smoke and the
//! whole regression plan with its tearing sweep), the smoke plan through the
//! REAL pcscd (vpcd readers 2..5 of `scripts/pcscd-vpcd.sh`, which
//! `scripts/test.sh` starts with 8 readers; TAPLINE_VPCD_PORT is their port
//! base; no other test of this binary uses pcscd), a plan whose expectation
//! is wrong (exit code 1, the failure in junit.xml with the card's APDU
//! trace), and an invalid plan (exit code 2, file:line and field).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn plans() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("plans")
}

fn rig(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rig")).args(args).output().expect("rig runs")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A small well-formedness check of the XML the runner writes: one root,
/// every element closed in order, attributes quoted, no raw `<` or `&` in
/// text.
fn assert_well_formed(xml: &str) {
    let body = xml.strip_prefix("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n").expect("XML declaration");
    let mut stack: Vec<String> = Vec::new();
    let mut rest = body;
    let mut roots = 0;
    while let Some(open) = rest.find('<') {
        let text = &rest[..open];
        assert!(!text.contains('>'), "raw > in text: {text:?}");
        for (i, _) in text.match_indices('&') {
            let ent = &text[i..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;"].iter().any(|e| ent.starts_with(e)),
                "bare & in text: {ent:.20}"
            );
        }
        let close = rest[open..].find('>').expect("tag closed") + open;
        let tag = &rest[open + 1..close];
        assert!(!tag.contains('<'), "< inside a tag: {tag}");
        assert_eq!(tag.matches('"').count() % 2, 0, "unbalanced quotes: {tag}");
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(stack.pop().as_deref(), Some(name), "close {name} out of order");
        } else if !tag.ends_with('/') {
            if stack.is_empty() {
                roots += 1;
            }
            stack.push(tag.split_whitespace().next().expect("name").to_string());
        } else if stack.is_empty() {
            roots += 1;
        }
        rest = &rest[close + 1..];
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
    assert_eq!(roots, 1, "one root element");
}

fn run_plan(plan: &Path, target: &str, dir: &Path) -> (Output, String) {
    let extra = std::env::var("TAPLINE_VPCD_PORT").unwrap_or_else(|_| "35963".into());
    let o = rig(&[
        "run",
        plan.to_str().expect("path"),
        "--target",
        target,
        "--report-dir",
        dir.to_str().expect("path"),
        "--vpcd-port-base",
        &extra,
    ]);
    let junit = std::fs::read_to_string(dir.join("junit.xml")).unwrap_or_default();
    (o, junit)
}

#[test]
fn the_smoke_plan_passes_on_sim_and_writes_its_reports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (o, junit) = run_plan(&plans().join("smoke.yaml"), "sim", dir.path());
    assert!(o.status.success(), "{}", text(&o));
    assert_well_formed(&junit);
    assert!(junit.contains("tests=\"3\" failures=\"0\""), "{junit}");
    let md = std::fs::read_to_string(dir.path().join("summary.md")).expect("summary.md");
    assert!(md.starts_with("# Plan smoke on sim: PASSED"), "{md}");
    let html = std::fs::read_to_string(dir.path().join("summary.html")).expect("summary.html");
    assert!(html.contains("<svg") && html.contains("PASSED"), "{html}");
}

#[test]
fn the_regression_plan_passes_on_sim_with_every_tearing_point() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (o, junit) = run_plan(&plans().join("regression.yaml"), "sim", dir.path());
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert_well_formed(&junit);
    let sweep = out.lines().find(|l| l.contains("tearing points")).expect("sweep figures printed");
    println!("{sweep}");
    // recipe of N APDUs; 2N tearing points; all of them torn, resumed, passed.
    let n: usize = sweep.split("recipe of ").nth(1).and_then(|s| s.split(' ').next()?.parse().ok()).expect("N");
    assert!(
        sweep.contains(&format!("{} tearing points", 2 * n)) && sweep.contains(&format!("{} torn, resumed", 2 * n))
    );
    for fault in ["reader_unplug fired", "pcscd_restart fired", "power_cut fired"] {
        assert!(out.contains(fault), "{fault}: {out}");
    }
}

#[test]
fn a_wrong_expectation_fails_the_run_and_junit_reports_it_with_the_trace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text_in = std::fs::read_to_string(plans().join("smoke.yaml")).expect("smoke");
    let wrong = text_in.replace(
        "expect: { result: failed, step: identify, reason: counterfeit, retryable: false }",
        "expect: { result: passed }",
    );
    assert_ne!(wrong, text_in);
    let plan = plans().join(format!("wrong-{}.yaml", std::process::id()));
    std::fs::write(&plan, wrong).expect("write plan");
    let (o, junit) = run_plan(&plan, "sim", dir.path());
    let _ = std::fs::remove_file(&plan);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_well_formed(&junit);
    assert!(junit.contains("failures=\"1\""), "{junit}");
    assert!(junit.contains("<failure message=\"scenarios[1].cards[0] (counterfeit card"), "{junit}");
    assert!(junit.contains("expected passed, got failed at identify"), "{junit}");
    // The failed card's APDUs, redacted: headers and lengths.
    assert!(junit.contains("&gt;&gt; 00 A4 04 00"), "{junit}");
    let md = std::fs::read_to_string(dir.path().join("summary.md")).expect("summary.md");
    assert!(md.contains("FAILED") && md.contains("APDU traces"), "{md}");
}

#[test]
fn an_invalid_plan_is_refused_with_file_line_and_field() {
    let text_in = std::fs::read_to_string(plans().join("smoke.yaml")).expect("smoke");
    let plan = plans().join(format!("invalid-{}.yaml", std::process::id()));
    std::fs::write(&plan, text_in.replace("kind: counterfeit", "kind: forged")).expect("write plan");
    let o = rig(&["run", plan.to_str().expect("path"), "--report-dir", "/nonexistent/never"]);
    let _ = std::fs::remove_file(&plan);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    let line = text_in.lines().position(|l| l.contains("kind: counterfeit")).expect("line") + 1;
    assert!(err.contains(&format!(".yaml:{line}:")) && err.contains("scenarios[1].cards[0].kind"), "{err}");
}

#[test]
fn the_smoke_plan_passes_through_pcscd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (o, junit) = run_plan(&plans().join("smoke.yaml"), "pcsc", dir.path());
    assert!(
        o.status.success(),
        "needs scripts/pcscd-vpcd.sh start 8 $TAPLINE_VPCD_PORT (scripts/test.sh does): {}",
        text(&o)
    );
    assert_well_formed(&junit);
    assert!(junit.contains("tests=\"3\" failures=\"0\" skipped=\"0\""), "{junit}");
}
