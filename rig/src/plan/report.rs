//! A plan run written up: `junit.xml` for CI (one test case per scenario,
//! the failures with their problems and the failed cards' APDU traces),
//! `summary.md` and a self-contained `summary.html` for people. Pure
//! rendering from a `PlanResult`; every text is escaped; traces are already
//! redacted by `card::apdu::trace_command`.

use std::fmt::Write;
use std::path::Path;

use station::report::escape;

use super::run::{PlanResult, ScenarioResult, Status};

/// Writes the three files into `dir` (created if needed).
pub fn write(result: &PlanResult, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("junit.xml"), junit(result))?;
    std::fs::write(dir.join("summary.md"), markdown(result))?;
    std::fs::write(dir.join("summary.html"), html(result))?;
    Ok(())
}

/// XML text: `escape` plus the characters XML 1.0 does not allow at all.
fn xml(s: &str) -> String {
    escape(&s.chars().filter(|c| matches!(c, '\t' | '\n' | '\r') || *c >= ' ').collect::<String>())
}

fn problems(s: &ScenarioResult) -> Vec<String> {
    let mut v = s.problems.clone();
    for c in s.failed_cards() {
        for p in &c.problems {
            v.push(format!("{} ({} card {}): {p}", c.field, c.kind.name(), c.card_id));
        }
    }
    v
}

/// The failed cards' last attempts as APDU traces.
fn traces(s: &ScenarioResult) -> String {
    let mut t = String::new();
    for c in s.failed_cards().take(10) {
        let _ = writeln!(t, "== {} ({} card {}): {}", c.field, c.kind.name(), c.card_id, c.attempts.join(" / "));
        let _ = writeln!(t, "   ledger: {}", c.ledger);
        for l in &c.trace {
            let _ = writeln!(t, "   {l}");
        }
    }
    t
}

pub fn junit(r: &PlanResult) -> String {
    let failures = r.scenarios.iter().filter(|s| s.status == Status::Failed).count();
    let skipped = r.scenarios.iter().filter(|s| matches!(s.status, Status::Skipped(_))).count();
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"{}\" tests=\"{}\" failures=\"{failures}\" skipped=\"{skipped}\" time=\"{:.3}\">",
        xml(&r.plan),
        r.scenarios.len(),
        r.elapsed.as_secs_f64()
    );
    let _ = writeln!(
        x,
        "  <testsuite name=\"{} ({})\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\" time=\"{:.3}\">",
        xml(&r.plan),
        r.target,
        r.scenarios.len(),
        r.elapsed.as_secs_f64()
    );
    for s in &r.scenarios {
        let _ = write!(
            x,
            "    <testcase classname=\"{}.{}\" name=\"{}\" time=\"{:.3}\"",
            xml(&r.plan),
            r.target,
            xml(&s.name),
            s.elapsed.as_secs_f64()
        );
        match &s.status {
            Status::Passed if s.notes.is_empty() => x.push_str("/>\n"),
            Status::Passed => {
                let _ = writeln!(x, ">\n      <system-out>{}</system-out>\n    </testcase>", xml(&s.notes.join("\n")));
            }
            Status::Skipped(why) => {
                let _ = writeln!(x, ">\n      <skipped message=\"{}\"/>\n    </testcase>", xml(why));
            }
            Status::Failed => {
                let p = problems(s);
                let _ = writeln!(
                    x,
                    ">\n      <failure message=\"{}\" type=\"expectation\">{}</failure>\n      <system-out>{}</system-out>\n    </testcase>",
                    xml(p.first().map_or("failed", String::as_str)),
                    xml(&p.join("\n")),
                    xml(&format!("{}\n{}", s.notes.join("\n"), traces(s)))
                );
            }
        }
    }
    x.push_str("  </testsuite>\n</testsuites>\n");
    x
}

fn status_word(s: &Status) -> &'static str {
    match s {
        Status::Passed => "pass",
        Status::Failed => "FAIL",
        Status::Skipped(_) => "skipped",
    }
}

pub fn markdown(r: &PlanResult) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "# Plan {} on {}: {}\n", r.plan, r.target, if r.passed() { "PASSED" } else { "FAILED" });
    let _ = writeln!(
        m,
        "{} in {:.1} s; a genuine card takes {} APDUs through the recipe.\n",
        r.file.display(),
        r.elapsed.as_secs_f64(),
        r.calibration.total
    );
    m.push_str("| scenario | result | time | cards | bundles sealed / aborted |\n|---|---|---|---|---|\n");
    for s in &r.scenarios {
        let result = match &s.status {
            Status::Skipped(why) => format!("skipped: {why}"),
            other => status_word(other).to_string(),
        };
        let _ = writeln!(
            m,
            "| {} | {} | {:.2} s | {} | {} / {} |",
            s.name.replace('|', "/"),
            result.replace('|', "/"),
            s.elapsed.as_secs_f64(),
            s.cards.len(),
            s.sealed,
            s.aborted
        );
    }
    for s in &r.scenarios {
        if s.notes.is_empty() && s.status != Status::Failed && s.cards.len() > 20 {
            continue;
        }
        let _ = writeln!(m, "\n## {} ({})\n", s.name, status_word(&s.status));
        for n in &s.notes {
            let _ = writeln!(m, "- {n}");
        }
        for p in problems(s) {
            let _ = writeln!(m, "- **{p}**");
        }
        if s.cards.len() <= 20 {
            for c in &s.cards {
                let _ = writeln!(
                    m,
                    "- {} {} ({}): {}; ledger: {}",
                    c.field,
                    c.card_id,
                    c.kind.name(),
                    c.attempts.join(" / "),
                    c.ledger
                );
            }
        }
        let t = traces(s);
        if !t.is_empty() {
            let _ = writeln!(m, "\nAPDU traces of the failed cards (last attempt, secrets redacted):\n\n```\n{t}```");
        }
    }
    m
}

pub fn html(r: &PlanResult) -> String {
    let mut h = String::new();
    let title = format!("Plan {} on {}", r.plan, r.target);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n<style>\
         body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}.pass{{color:#060}}.FAIL{{color:#b00;font-weight:bold}}\
         .skipped{{color:#777}}pre{{background:#f4f4f4;padding:.6em;overflow-x:auto}}</style></head><body>\n",
        escape(&title)
    );
    let _ = writeln!(
        h,
        "<h1>{}: <span class=\"{}\">{}</span></h1>",
        escape(&title),
        if r.passed() { "pass" } else { "FAIL" },
        if r.passed() { "PASSED" } else { "FAILED" }
    );
    let _ = writeln!(
        h,
        "<p>{} in {:.1} s; a genuine card takes {} APDUs through the recipe.</p>",
        escape(&r.file.display().to_string()),
        r.elapsed.as_secs_f64(),
        r.calibration.total
    );
    // Scenario times as bars (inline SVG, drawn here).
    let max = r.scenarios.iter().map(|s| s.elapsed.as_secs_f64()).fold(0.001, f64::max);
    let bar_h = 18;
    let _ = writeln!(
        h,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"720\" height=\"{}\" role=\"img\" aria-label=\"scenario times\">",
        r.scenarios.len() * bar_h + 4
    );
    for (i, s) in r.scenarios.iter().enumerate() {
        let w = (s.elapsed.as_secs_f64() / max * 380.0).max(1.0);
        let colour = match s.status {
            Status::Passed => "#4a4",
            Status::Failed => "#c33",
            Status::Skipped(_) => "#bbb",
        };
        let y = i * bar_h;
        let name: String = s.name.chars().take(40).collect();
        let _ = writeln!(
            h,
            "<text x=\"0\" y=\"{}\" font-size=\"12\">{}</text><rect x=\"280\" y=\"{}\" width=\"{w:.1}\" height=\"{}\" fill=\"{colour}\"/>\
             <text x=\"{:.1}\" y=\"{}\" font-size=\"11\">{:.2} s</text>",
            y + 13,
            escape(&name),
            y + 2,
            bar_h - 4,
            284.0 + w,
            y + 13,
            s.elapsed.as_secs_f64()
        );
    }
    h.push_str("</svg>\n<table><tr><th>scenario</th><th>result</th><th>time</th><th>cards</th><th>sealed / aborted</th></tr>\n");
    for s in &r.scenarios {
        let (class, text) = match &s.status {
            Status::Skipped(why) => ("skipped", format!("skipped: {why}")),
            other => (status_word(other), status_word(other).to_string()),
        };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td class=\"{class}\">{}</td><td>{:.2} s</td><td>{}</td><td>{} / {}</td></tr>",
            escape(&s.name),
            escape(&text),
            s.elapsed.as_secs_f64(),
            s.cards.len(),
            s.sealed,
            s.aborted
        );
    }
    h.push_str("</table>\n");
    for s in &r.scenarios {
        if s.notes.is_empty() && s.status != Status::Failed {
            continue;
        }
        let _ = writeln!(
            h,
            "<h2>{} <span class=\"{}\">({})</span></h2><ul>",
            escape(&s.name),
            status_word(&s.status),
            status_word(&s.status)
        );
        for n in &s.notes {
            let _ = writeln!(h, "<li>{}</li>", escape(n));
        }
        for p in problems(s) {
            let _ = writeln!(h, "<li class=\"FAIL\">{}</li>", escape(&p));
        }
        h.push_str("</ul>\n");
        let t = traces(s);
        if !t.is_empty() {
            let _ = writeln!(
                h,
                "<p>APDU traces of the failed cards (last attempt, secrets redacted):</p><pre>{}</pre>",
                escape(&t)
            );
        }
    }
    h.push_str("</body></html>\n");
    h
}
