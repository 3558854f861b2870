//! `station doctor` as an operator runs it: the JSON report's shape, the
//! profile checks, and (when scripts/test.sh's pcscd with vpcd readers is
//! up, TAPLINE_VPCD_PORT set) the PC/SC checks.

use std::path::Path;
use std::process::Command;

#[test]
fn doctor_json_reports_profile_firmware_and_pcsc() {
    let o = Command::new(env!("CARGO_BIN_EXE_station"))
        .args(["doctor", "--profile", "profiles/demo.yaml", "--json"])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .output()
        .expect("station runs");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let report: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("JSON on stdout ({e}): {stdout}"));
    let checks = report["checks"].as_array().expect("checks array");
    assert!(!checks.is_empty());
    for c in checks {
        assert!(c["name"].is_string() && c["detail"].is_string(), "{c}");
        let status = c["status"].as_str().expect("status");
        assert!(["ok", "warn", "fail"].contains(&status), "{c}");
        if status == "fail" {
            assert!(c["fix"].is_string(), "a failure says how to fix it: {c}");
        }
    }
    let check = |name: &str| {
        checks.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no {name:?} check in {report:#}"))
    };
    // Exit code follows the verdict: only failures fail.
    let failed = checks.iter().any(|c| c["status"] == "fail");
    assert_eq!(report["ok"], !failed);
    assert_eq!(o.status.success(), !failed, "{}", String::from_utf8_lossy(&o.stderr));
    for name in ["profile", "firmware", "ledger folder"] {
        assert_eq!(check(name)["status"], "ok", "{:#}", check(name));
    }
    let pcsc = check("pcsc service");
    if std::env::var_os("TAPLINE_VPCD_PORT").is_some() {
        assert_eq!(pcsc["status"], "ok", "{pcsc:#}");
        let readers = check("readers");
        assert_eq!(readers["status"], "ok", "{readers:#}");
        let items = readers["items"].as_array().expect("reader list");
        assert!(
            items
                .iter()
                .any(|r| r.as_str().is_some_and(|r| r.starts_with("Tapline vpcd ") && r.contains("vpcd (emulated)"))),
            "{readers:#}"
        );
        // vpcd's driver answers no APDU size (pcsc-lite 1.9.9, vsmartcard
        // 3.3): each vpcd reader is listed as unknown, with the reason.
        let apdu = check("extended apdu");
        assert_eq!(apdu["status"], "warn", "{apdu:#}");
        let items = apdu["items"].as_array().expect("one line per reader");
        assert_eq!(items.len(), readers["items"].as_array().map_or(0, Vec::len), "{apdu:#}");
        let vpcd: Vec<&str> =
            items.iter().filter_map(|i| i.as_str()).filter(|i| i.starts_with("Tapline vpcd ")).collect();
        assert!(!vpcd.is_empty(), "{apdu:#}");
        for line in vpcd {
            assert!(
                line.contains(": unknown: the reader reports no APDU size: SCARD_ATTR_MAXINPUT: not supported"),
                "{line}"
            );
        }
    } else {
        assert!(pcsc["status"] == "ok" || pcsc["status"] == "fail", "{pcsc:#}");
    }
}
