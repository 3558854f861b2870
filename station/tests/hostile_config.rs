//! Hostile configuration files through the real `station` binary (issue
//! #8, "Malformed configuration"): alias bombs, 100,000 nested brackets,
//! unknown keys, wrong types, missing and oversized files, as profiles
//! (`station profile check`), daemon configurations (`station daemon
//! --config`) and signed firmware manifests (`station firmware verify`).
//! Each must be refused with a message naming the file and the line or key.
//!
//! Every run is a child process under a 50 MB data limit (`prlimit
//! --data`, util-linux: heap and anonymous memory; an allocation past it
//! fails and aborts the process, which the test catches as a crash) and
//! measured by GNU time (`/usr/bin/time`, package `time`) for its peak
//! resident set; elapsed time and peak memory are printed for each file
//! (shown, not asserted: timing on a shared machine is no test).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("repo")
}

/// The memory the station may use on any configuration file.
const LIMIT_BYTES: u64 = 50 * 1024 * 1024;

struct Limited {
    ok: bool,
    code: Option<i32>,
    text: String,
    elapsed: Duration,
    peak_kib: u64,
}

/// Runs `station ARGS` under the 50 MB data limit, measured.
fn station_limited(label: &str, args: &[&str]) -> Limited {
    for tool in ["prlimit", "/usr/bin/time"] {
        let found = Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} is needed to run the station under a memory limit and measure it \
             (util-linux and Debian's `time` package; scripts/test.sh installs them)"
        );
    }
    let started = Instant::now();
    let o = Command::new("prlimit")
        .arg(format!("--data={LIMIT_BYTES}:{LIMIT_BYTES}"))
        .args(["--", "/usr/bin/time", "-f", "TAPLINE-PEAK-KIB %M"])
        .arg(env!("CARGO_BIN_EXE_station"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("prlimit runs");
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&o.stderr);
    let peak_kib = stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("TAPLINE-PEAK-KIB "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{label}: no peak from time: {stderr}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr.lines().filter(|l| !l.starts_with("TAPLINE-PEAK-KIB")).collect::<Vec<_>>().join("\n")
    );
    // GNU time exits with the command's code, or 128+signal when it died.
    let code = o.status.code();
    let said = text.lines().rev().find(|l| !l.trim().is_empty() && !l.starts_with("Command exited")).unwrap_or("");
    let said: String = said.trim().chars().take(110).collect();
    println!("{label:<40} {:>6.3} s  peak {:>5} KiB  exit {code:?}  {said}", elapsed.as_secs_f64(), peak_kib);
    Limited { ok: o.status.success(), code, text, elapsed, peak_kib }
}

/// Refused cleanly: exit code 1 (an error message, not a crash or an
/// allocation failure), every `want` in the message.
fn assert_refused(label: &str, r: &Limited, want: &[&str]) {
    assert!(!r.ok, "{label}: accepted:\n{}", r.text);
    assert_eq!(r.code, Some(1), "{label}: not a clean error exit (a crash or out of memory?):\n{}", r.text);
    assert!(!r.text.contains("panicked") && !r.text.contains("memory allocation"), "{label}:\n{}", r.text);
    for w in want {
        assert!(r.text.contains(w), "{label}: {w:?} missing from:\n{}", r.text);
    }
    assert!(r.peak_kib * 1024 < LIMIT_BYTES, "{label}: peak {} KiB", r.peak_kib);
    let _ = r.elapsed;
}

/// Classic billion laughs: nine levels of ten aliases of the level before.
fn alias_bomb(prefix: &str) -> String {
    let mut t = format!("{prefix}a0: &a0 [\"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\"]\n");
    for i in 1..=9 {
        t.push_str(&format!("{prefix}a{i}: &a{i} [{}]\n", vec![format!("*a{}", i - 1); 10].join(", ")));
    }
    t
}

/// A long string anchored on `anchor_key` and aliased 400 times in the list
/// at `list_path` (both keys the station reads): each alias would become a
/// copy of the string, 80 MB in all.
fn string_laughs(anchor_key: &str, list_path: &str) -> String {
    let long = "x".repeat(200 * 1024);
    let refs = vec!["*s"; 400].join(", ");
    format!("{anchor_key}: &s \"{long}\"\n{list_path} [{refs}]\n")
}

/// `key: [[[[...` 100,000 deep.
fn deep_flow(key: &str) -> String {
    format!("{key}: {}\n", "[".repeat(100_000))
}

/// A block mapping nested 300 deep, two spaces a level.
fn deep_block(key: &str) -> String {
    let mut t = format!("{key}:\n");
    for i in 1..300 {
        t.push_str(&format!("{}k{i}:\n", "  ".repeat(i)));
    }
    t
}

/// The line (1-based) of the first line containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).expect("needle") + 1
}

#[test]
fn the_demo_files_pass_under_the_same_limit() {
    // The control: a good profile (with its firmware) and the shipped
    // daemon configuration's profile check run fine under 50 MB.
    let r = station_limited("profile: profiles/demo.yaml", &["profile", "check", "profiles/demo.yaml"]);
    assert!(r.ok, "{}", r.text);
    let r = station_limited(
        "firmware: firmware/wallet-demo",
        &["firmware", "verify", "firmware/wallet-demo", "--profile", "profiles/demo.yaml"],
    );
    assert!(r.ok, "{}", r.text);
}

#[test]
fn hostile_profiles_are_refused_naming_the_file_and_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let demo = std::fs::read_to_string(repo().join("profiles/demo.yaml")).expect("demo");
    let demo = demo
        .replace("dir: ../firmware/wallet-demo", &format!("dir: {}", repo().join("firmware/wallet-demo").display()));
    let unknown = demo.replace("product: Tapline Wallet (demo)", "product: Tapline Wallet (demo)\nturbo: on");
    let wrong = demo.replace("signatures: 5", "signatures: many");
    let big = format!("{demo}{}", "# padding padding padding padding padding\n".repeat(8000));
    let cases: Vec<(&str, String, Vec<String>)> = vec![
        ("alias bomb", alias_bomb(""), vec!["bomb.yaml:".into()]),
        ("string aliased 400 times", string_laughs("product", "readers:\n  include:"), vec!["string.yaml:".into()]),
        ("100,000 nested [", deep_flow("product"), vec!["deep.yaml:1:".into()]),
        ("block nesting 300 deep", deep_block("gp"), vec!["block.yaml:".into()]),
        (
            "unknown key",
            unknown.clone(),
            vec![format!("unknown.yaml:{}:1", line_of(&unknown, "turbo")), "unknown field `turbo`".into()],
        ),
        (
            "wrong type",
            wrong.clone(),
            vec![format!("wrong.yaml:{}:15: signatures: invalid u32", line_of(&wrong, "signatures: many"))],
        ),
        ("oversized file", big, vec!["big.yaml".into(), "larger than 256 KiB".into()]),
    ];
    let names = ["bomb", "string", "deep", "block", "unknown", "wrong", "big"];
    for ((what, text, want), name) in cases.into_iter().zip(names) {
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, text).expect("write");
        let r = station_limited(&format!("profile: {what}"), &["profile", "check", file.to_str().expect("utf8")]);
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        assert_refused(what, &r, &want);
    }
    let missing = dir.path().join("missing.yaml");
    let r = station_limited("profile: missing file", &["profile", "check", missing.to_str().expect("utf8")]);
    assert_refused("missing", &r, &["missing.yaml", "(file)", "No such file"]);
}

#[test]
fn hostile_daemon_configurations_are_refused_naming_the_file_and_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = format!(
        "station_id: s1\nlisten: 127.0.0.1:0\nledger: l.db\nreaders:\n  sim:\n    readers: 2\nprofiles:\n  demo: {}\n",
        repo().join("profiles/demo.yaml").display()
    );
    let unknown = good.replace("ledger: l.db", "ledger: l.db\nturbo: on");
    let wrong = good.replace("readers: 2", "readers: lots");
    let cases: Vec<(&str, String, Vec<String>)> = vec![
        ("alias bomb", alias_bomb(""), vec!["bomb.yaml:".into()]),
        (
            "string aliased 400 times",
            string_laughs("station_id", "readers:\n  pcsc:\n    include:"),
            vec!["string.yaml:".into()],
        ),
        ("100,000 nested [", deep_flow("readers"), vec!["deep.yaml:1:".into()]),
        ("block nesting 300 deep", deep_block("readers"), vec!["block.yaml:".into()]),
        (
            "unknown key",
            unknown.clone(),
            vec![format!("unknown.yaml:{}:1: turbo: unknown field", line_of(&unknown, "turbo"))],
        ),
        ("wrong type", wrong.clone(), vec![format!("wrong.yaml:{}:14: readers: invalid", line_of(&wrong, "lots"))]),
    ];
    let names = ["bomb", "string", "deep", "block", "unknown", "wrong"];
    for ((what, text, want), name) in cases.into_iter().zip(names) {
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, text).expect("write");
        let r =
            station_limited(&format!("daemon config: {what}"), &["daemon", "--config", file.to_str().expect("utf8")]);
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        assert_refused(what, &r, &want);
    }
    let missing = dir.path().join("missing.yaml");
    let r = station_limited("daemon config: missing file", &["daemon", "--config", missing.to_str().expect("utf8")]);
    assert_refused("missing", &r, &["missing.yaml", "No such file"]);
}

#[test]
fn hostile_signed_manifests_are_refused_naming_the_file_and_place() {
    // A release key of the test's own, so the hostile manifests carry a
    // valid signature and reach the parser (an unsigned one stops at the
    // signature check, before any parsing).
    let key = k256::ecdsa::SigningKey::from_slice(&[0x5A; 32]).expect("key");
    let public = hex::encode(card::wallet::public_key_bytes(key.verifying_key()));
    let demo = std::fs::read_to_string(repo().join("firmware/wallet-demo/manifest.yaml")).expect("manifest");
    let unknown = format!("{demo}turbo: true\n");
    let wrong = demo.replace("with_descriptor: false", "with_descriptor: maybe");
    assert_ne!(wrong, demo, "the demo manifest has with_descriptor: false");
    let big = format!("{demo}{}", "# padding padding padding padding padding\n".repeat(8000));
    let cases: Vec<(&str, String, Vec<String>)> = vec![
        ("alias bomb", alias_bomb(""), vec!["manifest.yaml:".into()]),
        ("100,000 nested [", deep_flow("name"), vec!["manifest.yaml:1:".into()]),
        ("block nesting 300 deep", deep_block("applets"), vec!["manifest.yaml:".into()]),
        (
            "unknown key",
            unknown.clone(),
            vec![format!("manifest.yaml:{}:1", line_of(&unknown, "turbo")), "turbo: unknown field".into()],
        ),
        (
            "wrong type",
            wrong.clone(),
            vec![format!("manifest.yaml:{}:18", line_of(&wrong, "maybe")), "with_descriptor: invalid boolean".into()],
        ),
        ("oversized manifest", big, vec!["manifest.yaml".into(), "larger than 256 KiB".into()]),
    ];
    for (i, (what, text, want)) in cases.into_iter().enumerate() {
        let fw = tempfile::tempdir().expect("tempdir");
        for e in std::fs::read_dir(repo().join("firmware/wallet-demo")).expect("dir") {
            let e = e.expect("entry");
            std::fs::copy(e.path(), fw.path().join(e.file_name())).expect("copy");
        }
        std::fs::write(fw.path().join("manifest.yaml"), &text).expect("manifest");
        std::fs::write(
            fw.path().join("manifest.sig"),
            format!("{}\n", station::firmware::sign_manifest(&key, text.as_bytes())),
        )
        .expect("sig");
        let r = station_limited(
            &format!("manifest {i}: {what}"),
            &["firmware", "verify", fw.path().to_str().expect("utf8"), "--release-key", &public],
        );
        let mut want: Vec<&str> = want.iter().map(String::as_str).collect();
        let dir_text = fw.path().display().to_string();
        want.push(&dir_text);
        assert_refused(what, &r, &want);
    }
}
