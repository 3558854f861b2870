//! The `station` binary as an operator uses it: exit codes, messages that
//! name the thing at fault, the demo batch and the exports.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn station(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_station")).args(args).current_dir(repo()).output().expect("station runs")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn demo_batch_with_faults_runs_and_exports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = dir.path().join("l.db");
    let ledger = ledger.to_str().expect("utf8");
    let o = station(&[
        "run",
        "--profile",
        "profiles/demo.yaml",
        "--sim",
        "4",
        "--cards",
        "20",
        "--card-speed",
        "0",
        "--ledger",
        ledger,
        "--headless",
        "--seed",
        "11",
        "--sim-faults",
        "counterfeit=0.2,selftest=0.1",
        "--report-dir",
        dir.path().to_str().expect("utf8"),
    ]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("summary: 20 cards"), "{out}");
    assert!(out.contains("failures by step and reason"), "{out}");

    let o = station(&["ledger", "export", "--ledger", ledger, "--format", "json"]);
    assert!(o.status.success(), "{}", text(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let cards = doc["cards"].as_array().expect("cards");
    assert_eq!(cards.len(), 20);
    let bundles = doc["bundles"].as_array().expect("bundles");
    let sealed: Vec<&serde_json::Value> = bundles.iter().filter(|b| b["status"] == "sealed").collect();
    assert!(!sealed.is_empty(), "the demo profile forms bundles: {doc}");
    for b in &sealed {
        assert!(b["bundle_id"].is_string() && b["primary"].is_string() && b["wallet_pubkey"].is_string(), "{b}");
        assert_eq!(b["backups"].as_array().expect("backups").len(), 2, "{b}");
    }
    let labels = std::fs::read_dir(dir.path().join("labels")).expect("labels folder").count();
    assert_eq!(labels, sealed.len(), "one label per sealed bundle");
    let report = std::fs::read_to_string(dir.path().join("summary.txt")).expect("summary report");
    assert!(report.contains(&format!("bundles sealed:   {}", sealed.len())), "{report}");
    for c in cards {
        for field in [
            "card_id",
            "status",
            "failed_step",
            "failure_reason",
            "firmware_sha256",
            "attested",
            "self_tests",
            "bundle_id",
            "role",
            "wallet_pubkey",
            "gp_key_version",
            "reader",
        ] {
            assert!(c.get(field).is_some(), "{field} missing in {c}");
        }
        match c["status"].as_str() {
            Some("passed") => {
                assert_eq!((c["attested"].as_bool(), c["self_tests"].as_bool()), (Some(true), Some(true)))
            }
            Some("failed") => assert!(c["failed_step"].is_string() && c["failure_reason"].is_string(), "{c}"),
            s => panic!("unexpected status {s:?}"),
        }
    }
    let failed = cards.iter().filter(|c| c["status"] == "failed").count();
    assert!(failed > 0, "the fault mix produced failures");

    let o = station(&["ledger", "export", "--ledger", ledger, "--format", "csv"]);
    let csv = String::from_utf8_lossy(&o.stdout);
    assert!(csv.starts_with("card_id,status,"), "{csv}");
    assert_eq!(csv.lines().count(), 21);
}

#[test]
fn bad_profile_names_file_line_and_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text_in = std::fs::read_to_string(repo().join("profiles/demo.yaml")).expect("demo");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, text_in.replace("dir: ../firmware/wallet-demo", "dir: ../firmware/wallet-demo\n  turbo: on"))
        .expect("write");
    let line =
        std::fs::read_to_string(&bad).expect("read").lines().position(|l| l.contains("turbo")).expect("line") + 1;
    let o = station(&["profile", "check", bad.to_str().expect("utf8")]);
    assert!(!o.status.success());
    let out = text(&o);
    assert!(out.contains(&format!("bad.yaml:{line}:3: turbo: unknown field `turbo`")), "{out}");
    assert!(out.contains("turbo"), "{out}");

    let o = station(&["run", "--profile", bad.to_str().expect("utf8"), "--sim", "1", "--cards", "1", "--headless"]);
    assert!(!o.status.success(), "a bad profile stops the station");
}

#[test]
fn refuses_to_run_without_a_usable_ledger_or_with_bad_arguments() {
    let o = station(&[
        "run",
        "--profile",
        "profiles/demo.yaml",
        "--sim",
        "1",
        "--cards",
        "1",
        "--ledger",
        "/nonexistent/dir/l.db",
        "--headless",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("/nonexistent/dir/l.db"), "{}", text(&o));

    let o = station(&[
        "run",
        "--profile",
        "profiles/demo.yaml",
        "--sim",
        "1",
        "--cards",
        "1",
        "--sim-faults",
        "meteor=0.1",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("unknown fault \"meteor\""), "{}", text(&o));
}

#[test]
fn firmware_inspect_shows_the_load_file_hash_of_a_real_cap() {
    let cap = repo().join("../shared/testdata/cap/Empty_0102030405_8d5ac9e2_2.2.1.cap");
    let o = station(&["firmware", "inspect", cap.to_str().expect("utf8"), "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(doc["package_aid"], "0102030405");
    assert!(doc["load_file_sha256"].as_str().expect("hash").starts_with("8d5ac9e2"), "{doc}");
    assert_eq!(doc["applet_aids"][0], "0102030405060708");
    let plain = station(&["firmware", "inspect", cap.to_str().expect("utf8"), "--with-descriptor"]);
    assert!(text(&plain).contains("Descriptor.cap"), "{}", text(&plain));
}

#[test]
fn firmware_verify_accepts_the_demo_and_refuses_a_tampered_copy() {
    let o = station(&["firmware", "verify", "firmware/wallet-demo", "--profile", "profiles/demo.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("signature verified"));

    let dir = tempfile::tempdir().expect("tempdir");
    for e in std::fs::read_dir(repo().join("firmware/wallet-demo")).expect("dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), dir.path().join(e.file_name())).expect("copy");
    }
    let m = dir.path().join("manifest.yaml");
    let t = std::fs::read_to_string(&m).expect("manifest").replace("tapline-wallet-demo\n", "tapline-wallet-evil\n");
    std::fs::write(&m, t).expect("write");
    let o = station(&["firmware", "verify", dir.path().to_str().expect("utf8"), "--profile", "profiles/demo.yaml"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("signature does not verify"), "{}", text(&o));
}

#[test]
fn a_fixture_needs_pcsc_and_a_serial_spec() {
    let o = station(&[
        "run",
        "--profile",
        "profiles/demo.yaml",
        "--sim",
        "2",
        "--cards",
        "1",
        "--fixture",
        "serial:/dev/null",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("cannot be used with"), "{}", text(&o));
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = dir.path().join("l.db");
    let o = station(&[
        "run",
        "--profile",
        "profiles/demo.yaml",
        "--pcsc",
        "--cards",
        "1",
        "--headless",
        "--ledger",
        ledger.to_str().expect("utf8"),
        "--fixture",
        "/dev/ttyUSB0",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--fixture \"/dev/ttyUSB0\": expected serial:"), "{}", text(&o));
}

/// A copy of the demo profile and its firmware in `dir`, the profile's
/// paths pointing at the copy; returns the profile and the firmware folder.
fn demo_copy(dir: &Path) -> (PathBuf, PathBuf) {
    let fw = dir.join("firmware");
    std::fs::create_dir_all(&fw).expect("firmware dir");
    for e in std::fs::read_dir(repo().join("firmware/wallet-demo")).expect("dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), fw.join(e.file_name())).expect("copy");
    }
    let keys = repo().join("firmware/keys").canonicalize().expect("keys");
    let text = std::fs::read_to_string(repo().join("profiles/demo.yaml"))
        .expect("demo")
        .replace("dir: ../firmware/wallet-demo", &format!("dir: {}", fw.display()))
        .replace("file:../firmware/keys/", &format!("file:{}/", keys.display()));
    let profile = dir.join("profile.yaml");
    std::fs::write(&profile, text).expect("profile");
    (profile, fw)
}

/// `station run --sim` on `profile` at trace level (every APDU logged);
/// returns its output, the log and whether the ledger holds any card.
fn traced_run(dir: &Path, profile: &Path) -> (Output, String, bool) {
    let ledger = dir.join("l.db");
    let log = dir.join("trace.log");
    let o = station(&[
        "run",
        "--profile",
        profile.to_str().expect("utf8"),
        "--sim",
        "2",
        "--cards",
        "2",
        "--card-speed",
        "0",
        "--headless",
        "--ledger",
        ledger.to_str().expect("utf8"),
        "--report-dir",
        dir.join("report").to_str().expect("utf8"),
        "--log-level",
        "trace",
        "--log-file",
        log.to_str().expect("utf8"),
    ]);
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    let cards = ledger.exists() && {
        let e = station(&["ledger", "export", "--ledger", ledger.to_str().expect("utf8"), "--format", "json"]);
        let doc: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap_or_default();
        doc["cards"].as_array().is_some_and(|c| !c.is_empty())
    };
    (o, log, cards)
}

/// A change made to a copy of the firmware folder.
type Tamper<'a> = Box<dyn Fn(&Path) + 'a>;

#[test]
fn tampered_firmware_is_refused_before_any_card_is_touched() {
    // The control: the untouched copy runs, and its trace shows the APDUs
    // (so "no APDU in the trace" below means something).
    let dir = tempfile::tempdir().expect("tempdir");
    let (profile, _) = demo_copy(dir.path());
    let (o, log, cards) = traced_run(dir.path(), &profile);
    assert!(o.status.success(), "{}", text(&o));
    assert!(log.contains("apdu >>") && cards, "the control run touched cards and recorded them:\n{log}");

    let cap_name = std::fs::read_to_string(repo().join("firmware/wallet-demo/manifest.yaml"))
        .expect("manifest")
        .lines()
        .find_map(|l| l.strip_prefix("cap: ").map(|c| c.trim().to_string()))
        .expect("cap: in the manifest");
    let other_key = k256::ecdsa::SigningKey::from_slice(&[0x33; 32]).expect("key");
    let cases: [(&str, Tamper, Vec<String>); 3] = [
        (
            "one byte of the CAP",
            Box::new(|fw: &Path| {
                let cap = fw.join(&cap_name);
                let mut b = std::fs::read(&cap).expect("cap");
                let at = b.len() / 2;
                b[at] ^= 0x01;
                std::fs::write(&cap, b).expect("cap");
            }),
            vec!["cap_sha256 mismatch".into(), cap_name.clone()],
        ),
        (
            "one byte of the manifest",
            Box::new(|fw: &Path| {
                let m = fw.join("manifest.yaml");
                let t = std::fs::read_to_string(&m).expect("manifest").replacen(
                    "version: \"1.0.0\"",
                    "version: \"1.0.1\"",
                    1,
                );
                std::fs::write(&m, t).expect("manifest");
            }),
            vec!["manifest signature does not verify".into()],
        ),
        (
            "signed by a wrong release key",
            Box::new(|fw: &Path| {
                let m = std::fs::read(fw.join("manifest.yaml")).expect("manifest");
                let sig = station::firmware::sign_manifest(&other_key, &m);
                std::fs::write(fw.join("manifest.sig"), format!("{sig}\n")).expect("sig");
            }),
            vec!["manifest signature does not verify against any pinned release key".into()],
        ),
    ];
    for (what, tamper, want) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let (profile, fw) = demo_copy(dir.path());
        tamper(&fw);
        let (o, log, cards) = traced_run(dir.path(), &profile);
        let out = text(&o);
        assert!(!o.status.success(), "{what}: the station ran:\n{out}");
        assert!(out.contains(&fw.display().to_string()), "{what}: the firmware folder is named:\n{out}");
        for w in &want {
            assert!(out.contains(w.as_str()), "{what}: {w:?} missing:\n{out}");
        }
        assert!(!log.contains("apdu"), "{what}: an APDU reached a card:\n{log}");
        assert!(!out.contains("cards on"), "{what}: a batch started:\n{out}");
        assert!(!cards, "{what}: the ledger has cards");
        // `station profile check` and the daemon refuse it the same way.
        let o = station(&["profile", "check", profile.to_str().expect("utf8")]);
        assert!(!o.status.success() && text(&o).contains(want[0].as_str()), "{what}: {}", text(&o));
        let cfg = dir.path().join("station.yaml");
        std::fs::write(
            &cfg,
            format!(
                "station_id: t1\nlisten: 127.0.0.1:0\nledger: {}\nreaders:\n  sim:\n    readers: 2\nprofiles:\n  demo: {}\n",
                dir.path().join("daemon.db").display(),
                profile.display()
            ),
        )
        .expect("config");
        let o = station(&["daemon", "--config", cfg.to_str().expect("utf8")]);
        let out = text(&o);
        assert!(!o.status.success() && out.contains(want[0].as_str()), "{what}: daemon:\n{out}");
        assert!(!dir.path().join("daemon.db").exists(), "{what}: the daemon opened its ledger");
    }
}
