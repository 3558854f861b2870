//! Hostile regression plans through the real `rig run` (issue #8,
//! "Malformed configuration"): an alias bomb, a string aliased 400 times,
//! 100,000 nested brackets, an unknown key, a wrong type, missing and
//! oversized files. Each is refused with exit code 2 and a message naming
//! the file and the place, by a child under a 50 MB data limit (`prlimit
//! --data`, util-linux) measured by GNU time (`/usr/bin/time`, package
//! `time`); elapsed time and peak memory are printed, not asserted. The
//! plans go through `station::yaml`, like the station's files
//! (station/tests/hostile_config.rs has the same for those).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const LIMIT_BYTES: u64 = 50 * 1024 * 1024;

fn plans() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("plans")
}

/// `rig run PLAN` under the limit: (exit code, output, peak KiB).
fn rig_limited(label: &str, plan: &Path) -> (Option<i32>, String, u64) {
    let started = Instant::now();
    let o = Command::new("prlimit")
        .arg(format!("--data={LIMIT_BYTES}:{LIMIT_BYTES}"))
        .args(["--", "/usr/bin/time", "-f", "TAPLINE-PEAK-KIB %M"])
        .arg(env!("CARGO_BIN_EXE_rig"))
        .arg("run")
        .arg(plan)
        .args(["--report-dir", "/nonexistent/never"])
        .output()
        .unwrap_or_else(|e| panic!("prlimit and /usr/bin/time (util-linux, Debian's `time`) are needed: {e}"));
    let stderr = String::from_utf8_lossy(&o.stderr);
    let peak: u64 = stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("TAPLINE-PEAK-KIB "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{label}: no peak from /usr/bin/time: {stderr}"));
    let text = format!("{}{stderr}", String::from_utf8_lossy(&o.stdout));
    let said = text.lines().rev().find(|l| l.contains(".yaml")).unwrap_or("").trim().to_string();
    println!("{label:<28} {:>6.3} s  peak {peak:>5} KiB  {said:.110}", started.elapsed().as_secs_f64());
    (o.status.code(), text, peak)
}

#[test]
fn hostile_plans_are_refused_naming_the_file_and_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let smoke = std::fs::read_to_string(plans().join("smoke.yaml")).expect("smoke");
    let mut bomb = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..=9 {
        bomb.push_str(&format!("a{i}: &a{i} [{}]\n", vec![format!("*a{}", i - 1); 10].join(", ")));
    }
    let laughs = format!(
        "name: &s \"{}\"\nscenarios: [{}]\n",
        "x".repeat(200 * 1024),
        vec!["{name: *s, cards: [{kind: genuine, expect: {result: passed}}]}"; 400].join(", ")
    );
    let deep = format!("name: smoke\nscenarios: {}\n", "[".repeat(100_000));
    let unknown = smoke.replace("target: sim", "target: sim\nturbo: on");
    let wrong = smoke.replace("card_speed: 0", "card_speed: fast");
    let big = format!("{smoke}{}", "# padding padding padding padding padding\n".repeat(8000));
    let line = |t: &str, n: &str| t.lines().position(|l| l.contains(n)).expect("needle") + 1;
    let cases = [
        ("alias bomb", bomb, "alias-bomb.yaml:1:1: a0: unknown field".to_string()),
        ("string aliased 400 times", laughs, "over the limits for configuration files".to_string()),
        ("100,000 nested [", deep, "[.yaml:2:".to_string()),
        (
            "unknown key",
            unknown.clone(),
            format!("unknown-key.yaml:{}:1: turbo: unknown field", line(&unknown, "turbo")),
        ),
        ("wrong type", wrong.clone(), format!("wrong-type.yaml:{}:15: card_speed:", line(&wrong, "card_speed: fast"))),
        ("oversized file", big, "oversized-file.yaml: (file): larger than 256 KiB".to_string()),
    ];
    for (what, text, want) in cases {
        let name = what.replace(' ', "-");
        let plan = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&plan, text).expect("plan");
        let (code, out, peak) = rig_limited(what, &plan);
        assert_eq!(code, Some(2), "{what}: not refused as an invalid plan (a crash or out of memory?):\n{out}");
        assert!(out.contains(&want), "{what}: {want:?} missing from:\n{out}");
        assert!(!out.contains("panicked") && peak * 1024 < LIMIT_BYTES, "{what}: peak {peak} KiB:\n{out}");
    }
    let (code, out, _) = rig_limited("missing file", &dir.path().join("missing.yaml"));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("missing.yaml") && out.contains("No such file"), "{out}");
}
