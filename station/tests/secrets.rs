//! Secrets canary: a batch runs with canary key values and every output is
//! searched for them, raw and in hex (upper, lower) and base64 (standard
//! and URL-safe, at the three byte alignments). Pass: zero hits.
//!
//! - `the_binary_leaks_no_key_anywhere`: `station run --sim` (the binary)
//!   at trace level with a random rotation master key and a random audit
//!   signing key (both `file:`), and the GP default keys 40..4F as factory
//!   keys (the emulated chip factory ships those; they are public, but the
//!   station must treat them as keys). Searched: the log file, /metrics and
//!   /api/status fetched during the run, the report folder (md, html,
//!   json, csv, summary, labels), the ledger file and its WAL (copied
//!   mid-run), and a core dump of the running process (`gcore`). In the
//!   core, hex and base64 text of a key must not appear; the raw key bytes
//!   are counted and reported, not failed on: the profile holds the master
//!   key while the batch runs, and in `--sim` the emulated chips (with
//!   their keys) live in the station process.
//! - `wallet_secrets_never_leave_the_emulated_cards`: the wallet secret
//!   exists only inside the cards, so it is read from the emulator's memory
//!   (`EmuCard::wallet_secret_for_tests`) after an in-process batch at trace
//!   level (logs captured), with the rotated per-card GP keys; searched: the
//!   logs, the ledger, the report folder and the labels.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn b64(data: &[u8], url: bool) -> String {
    let table: &[u8; 64] = if url {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    // Whole 3-byte groups only: the last partial group depends on what
    // follows the secret in the encoded stream.
    data.chunks_exact(3)
        .flat_map(|c| {
            let n = (u32::from(c[0]) << 16) | (u32::from(c[1]) << 8) | u32::from(c[2]);
            [18, 12, 6, 0].map(|s| table[((n >> s) & 63) as usize] as char)
        })
        .collect()
}

/// Every form a secret could take in an output, by name.
fn encodings(secret: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut v = vec![
        ("raw".to_string(), secret.to_vec()),
        ("hex".to_string(), hex::encode(secret).into_bytes()),
        ("HEX".to_string(), hex::encode_upper(secret).into_bytes()),
    ];
    for a in 0..3 {
        v.push((format!("base64@{a}"), b64(&secret[a..], false).into_bytes()));
        v.push((format!("base64url@{a}"), b64(&secret[a..], true).into_bytes()));
    }
    v
}

/// Occurrences of each pattern (all at least 8 bytes) in `hay`, in one pass
/// keyed on the first 8 bytes (a core dump is large).
fn count(hay: &[u8], patterns: &[(String, Vec<u8>)]) -> Vec<usize> {
    let mut by_prefix: HashMap<[u8; 8], Vec<usize>> = HashMap::new();
    for (i, (_, p)) in patterns.iter().enumerate() {
        let key: [u8; 8] = p[..8].try_into().expect("8 bytes");
        by_prefix.entry(key).or_default().push(i);
    }
    let mut hits = vec![0; patterns.len()];
    for i in 0..hay.len().saturating_sub(7) {
        let key: [u8; 8] = hay[i..i + 8].try_into().expect("8 bytes");
        if let Some(ps) = by_prefix.get(&key) {
            for &p in ps {
                if hay[i..].starts_with(&patterns[p].1) {
                    hits[p] += 1;
                }
            }
        }
    }
    hits
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Searches every (name, bytes) for every canary; returns the hits as
/// "where: canary encoding xN" lines, and how many places were searched.
/// `image`: the program file; an encoding it holds as a constant (the GP
/// default keys are public and written in some crate) is in every core, so
/// a core's hits count only above the image's.
fn search(places: &[(String, Vec<u8>)], canaries: &[(&str, Vec<u8>)], raw_ok_in: &[&str], image: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    for (name, secret) in canaries {
        let pats = encodings(secret);
        let in_image = count(image, &pats);
        for (place, bytes) in places {
            for (((enc, _), n), constant) in pats.iter().zip(count(bytes, &pats)).zip(&in_image) {
                let n = if place == "core" { n.saturating_sub(*constant) } else { n };
                if place == "core" && *constant > 0 {
                    eprintln!("(program image constant, x{constant}) {name} {enc}");
                }
                if n > 0 {
                    let line = format!("{place}: {name} {enc} x{n}");
                    if enc == "raw" && raw_ok_in.contains(&place.as_str()) {
                        eprintln!("(expected, live in memory) {line}");
                    } else {
                        found.push(line);
                    }
                }
            }
        }
    }
    found
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("random");
    b
}

fn get(addr: &str, path: &str) -> Vec<u8> {
    ureq::get(&format!("http://{addr}{path}"))
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_to_vec().ok())
        .unwrap_or_default()
}

#[test]
fn the_binary_leaks_no_key_anywhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let master: [u8; 16] = random();
    let audit: [u8; 32] = loop {
        let k: [u8; 32] = random();
        if k256::ecdsa::SigningKey::from_slice(&k).is_ok() {
            break k;
        }
    };
    let factory: Vec<u8> = (0x40..=0x4F).collect();
    std::fs::write(d.join("master.key"), hex::encode_upper(master)).expect("master");
    std::fs::write(d.join("audit.key"), hex::encode(audit)).expect("audit");
    let demo = std::fs::read_to_string(repo().join("profiles/demo.yaml")).expect("demo profile");
    let fw = repo().join("firmware/wallet-demo").canonicalize().expect("firmware");
    let profile = demo
        .replace("../firmware/wallet-demo", fw.to_str().expect("utf8"))
        .replace("5441504C494E452D44454D4F2D4D4B31", "file:master.key")
        .replace("file:../firmware/keys/DEMO-ONLY-audit.key", "file:audit.key");
    assert!(profile.contains("file:master.key") && profile.contains("file:audit.key"), "{profile}");
    std::fs::write(d.join("canary.yaml"), profile).expect("profile");

    let (log, ledger, reports) = (d.join("station.log"), d.join("ledger.db"), d.join("reports"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_station"))
        .args(["--log-level", "trace", "--log-file"])
        .arg(&log)
        .args(["run", "--sim", "4", "--cards", "12", "--card-speed", "0.4", "--headless", "--seed", "5"])
        .args(["--listen", "127.0.0.1:0", "--profile"])
        .arg(d.join("canary.yaml"))
        .arg("--ledger")
        .arg(&ledger)
        .arg("--report-dir")
        .arg(&reports)
        .current_dir(d)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("station starts");
    let pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let addr = loop {
        let line = lines.next().expect("station printed its address").expect("line");
        if let Some(a) = line.strip_prefix("metrics and API on http://") {
            break a.to_string();
        }
    };
    // Let cards get going, then take everything a running station shows.
    std::thread::sleep(Duration::from_millis(1500));
    let metrics = get(&addr, "/metrics");
    let status = get(&addr, "/api/status");
    assert!(!metrics.is_empty() && !status.is_empty(), "API answered");
    let wal = std::fs::read(d.join("ledger.db-wal")).unwrap_or_default();
    let core_base = d.join("core");
    let gcore = Command::new("gcore").arg("-o").arg(&core_base).arg(pid.to_string()).output();
    let core_path = PathBuf::from(format!("{}.{pid}", core_base.display()));
    let core = match &gcore {
        Ok(_) if core_path.exists() => std::fs::read(&core_path).expect("core"),
        Ok(o) => panic!("gcore made no core: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => panic!("gcore (gdb) is needed for the core dump search: {e}"),
    };
    std::fs::remove_file(&core_path).expect("remove core");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let out = child.wait_with_output().expect("station ends");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(rest.iter().any(|l| l.contains("batch report")), "{rest:?}");

    let mut places: Vec<(String, Vec<u8>)> = vec![
        ("log".into(), std::fs::read(&log).expect("log")),
        ("/metrics".into(), metrics),
        ("/api/status".into(), status),
        ("stdout".into(), rest.join("\n").into_bytes()),
        ("stderr".into(), out.stderr),
        ("ledger".into(), std::fs::read(&ledger).expect("ledger")),
        ("ledger WAL (mid-run)".into(), wal),
        ("core".into(), core),
    ];
    let mut files = Vec::new();
    files_under(&reports, &mut files);
    assert!(files.iter().any(|f| f.ends_with("report.html")), "{files:?}");
    assert!(files.iter().any(|f| f.to_string_lossy().contains("labels")), "{files:?}");
    for f in &files {
        places.push((f.strip_prefix(d).unwrap_or(f).display().to_string(), std::fs::read(f).expect("report file")));
    }
    let log_len = places[0].1.len();
    assert!(log_len > 100_000, "a trace-level log: {log_len} bytes");
    let canaries: [(&str, Vec<u8>); 3] =
        [("rotation master key", master.to_vec()), ("audit signing key", audit.to_vec()), ("GP factory keys", factory)];
    let image = std::fs::read(env!("CARGO_BIN_EXE_station")).expect("station binary");
    let hits = search(&places, &canaries, &["core"], &image);
    eprintln!(
        "searched {} places ({} report files, log {} bytes, core {} bytes) for 3 canaries x 9 encodings",
        places.len(),
        files.len(),
        log_len,
        places.iter().find(|p| p.0 == "core").map_or(0, |p| p.1.len())
    );
    assert!(hits.is_empty(), "secrets found:\n{}", hits.join("\n"));
}

/// Captures an in-process tracing subscriber's output.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn wallet_secrets_never_leave_the_emulated_cards() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // Global: the batch's workers run on their own threads.
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber in this test binary");
    let profile = tapline_tests::demo_profile();
    let rotation = profile.rotation.as_ref().map(|r| r.version).expect("rotation");
    let cards = station::sim::make_cards(9, 21, &Default::default());
    let batch = tapline_tests::run_batch(profile, 3, cards, 0.0);
    assert_eq!(batch.summary.passed(), 9);
    let report_dir = batch.labels().parent().expect("dir").join("report");
    station::report::write_batch_report(&batch.ledger, "e2e", &report_dir).expect("report");

    let mut canaries: Vec<(String, Vec<u8>)> = Vec::new();
    for (_, card) in &batch.bins {
        if let Some(s) = card.wallet_secret_for_tests() {
            canaries.push((format!("wallet secret of {}", card.id()), s.to_vec()));
        }
        if let Some(k) = card.key_set(rotation) {
            for (role, key) in [("ENC", &k.enc), ("MAC", &k.mac), ("DEK", &k.dek)] {
                canaries.push((format!("rotated {role} key of {}", card.id()), key.as_bytes().to_vec()));
            }
        }
    }
    assert!(canaries.iter().filter(|c| c.0.starts_with("wallet")).count() >= 6, "bundled cards hold wallet keys");
    let mut places: Vec<(String, Vec<u8>)> = vec![
        ("trace log".into(), captured.0.lock().expect("lock").clone()),
        ("ledger".into(), std::fs::read(&batch.ledger).expect("ledger")),
    ];
    let mut files = Vec::new();
    files_under(batch.labels().parent().expect("dir"), &mut files);
    for f in files.iter().filter(|f| !f.to_string_lossy().contains("ledger.db")) {
        places.push((f.display().to_string(), std::fs::read(f).expect("file")));
    }
    assert!(places[0].1.len() > 10_000, "trace logs were captured");
    let named: Vec<(&str, Vec<u8>)> = canaries.iter().map(|(n, s)| (n.as_str(), s.clone())).collect();
    let hits = search(&places, &named, &[], &[]);
    eprintln!("searched {} places for {} canaries x 9 encodings", places.len(), named.len());
    assert!(hits.is_empty(), "secrets found:\n{}", hits.join("\n"));
}
