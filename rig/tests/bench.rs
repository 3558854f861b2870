//! Smoke test of `rig bench all --quick --json`: every benchmark runs and
//! its figures are in the JSON and the report. Timing goals are judged by
//! the benchmark's own output on a real run, never here.

use std::process::Command;

use serde_json::Value;

fn num(v: &Value, path: &[&str]) -> f64 {
    let mut x = v;
    for k in path {
        x = &x[*k];
    }
    x.as_f64().unwrap_or_else(|| panic!("{} is not a number in the bench JSON: {x}", path.join(".")))
}

#[test]
fn bench_all_quick_prints_every_figure_and_writes_the_report() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_rig"))
        .args(["bench", "all", "--quick", "--json", "--out"])
        .arg(dir.path())
        .output()
        .expect("rig runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "rig bench all failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).expect("a JSON line");
    let v: Value = serde_json::from_str(line).expect("JSON");

    let points = v["scaling"]["points"].as_array().expect("scaling points");
    assert!(points.len() >= 2);
    for p in points {
        for k in ["readers", "cards_per_hour", "efficiency", "work_efficiency", "cpu_s_per_card", "peak_rss_kb"] {
            assert!(num(p, &[k]).is_finite(), "scaling {k}");
        }
    }
    let over = v["overhead"]["points"].as_array().expect("overhead points");
    let readers: Vec<f64> = over.iter().map(|p| num(p, &["readers"])).collect();
    assert_eq!(readers, [1.0, 16.0]);
    for p in over {
        assert!(num(p, &["overhead_ratio"]) > 0.0);
    }
    assert!(v["apdu"].get("error").is_none(), "APDU bench: {}", v["apdu"]);
    for k in ["direct_us", "transport_us", "scriptor_us", "transport_over_direct", "scriptor_over_direct"] {
        assert!(num(&v["apdu"], &[k]) > 0.0, "apdu {k}");
    }
    assert!(num(&v["host"], &["cards_per_second"]) > 0.0);
    for k in ["emulator", "station_recipe", "ledger_writer", "coordination"] {
        assert!(num(&v["host"], &["split_cpu_s", k]) >= 0.0, "host split {k}");
    }
    assert!(num(&v["soak"], &["rss_growth"]) > 0.0);
    assert!(num(&v["soak"], &["fd_growth"]) > 0.0);
    assert_eq!(v["goals"].as_array().map(Vec::len), Some(7), "every goal judged: {}", v["goals"]);

    let md = std::fs::read_to_string(dir.path().join("bench.md")).expect("bench.md");
    assert!(md.contains("![scaling](scaling.svg)"));
    let svg = std::fs::read_to_string(dir.path().join("scaling.svg")).expect("scaling.svg");
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
    assert!(dir.path().join("bench.json").exists());
}
