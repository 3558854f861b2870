//! `station daemon` as a line runs it: the real binary with a YAML config,
//! batches started and drained through the HTTP API, SIGTERM in the middle
//! of a batch (drain, nothing left in progress), SIGHUP with a broken
//! profile (the last good profiles stay), and configuration errors that
//! name their place.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("repo")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

const TOKEN: &str = "daemon-test-token-0123456789";

struct Daemon {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config_text(dir: &Path, port: u16, profiles: &[(&str, PathBuf)], speed: f64) -> String {
    let mut t = format!(
        "station_id: test-st\nlisten: 127.0.0.1:{port}\ntoken: file:token.txt\nledger: ledger.db\nreports: reports\n\
         readers:\n  sim:\n    readers: 4\n    card_speed: {speed}\n    seed: 7\nprofiles:\n"
    );
    for (name, path) in profiles {
        t.push_str(&format!("  {name}: {}\n", path.display()));
    }
    let _ = dir;
    t
}

fn demo() -> PathBuf {
    repo().join("profiles/demo.yaml")
}

impl Daemon {
    fn start(speed: f64) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        std::fs::write(dir.path().join("token.txt"), format!("{TOKEN}\n")).expect("token");
        std::fs::write(dir.path().join("station.yaml"), config_text(dir.path(), port, &[("demo", demo())], speed))
            .expect("config");
        let log = std::fs::File::create(dir.path().join("daemon.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_station"))
            .args(["daemon", "--config"])
            .arg(dir.path().join("station.yaml"))
            .args(["--drain-timeout", "20", "--log-file"])
            .arg(dir.path().join("station-log.txt"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .current_dir(dir.path())
            .spawn()
            .expect("station daemon starts");
        let d = Daemon { child, addr: format!("127.0.0.1:{port}"), dir };
        d.wait("healthz", Duration::from_secs(20), || {
            ureq::get(format!("http://{}/healthz", d.addr)).call().is_ok().then_some(())
        });
        d
    }

    fn log(&self) -> String {
        let a = std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default();
        let b = std::fs::read_to_string(self.dir.path().join("station-log.txt")).unwrap_or_default();
        format!("{a}\n--- log file ---\n{b}")
    }

    fn wait<T>(&self, what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let started = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(started.elapsed() < limit, "timed out waiting for {what}; daemon output:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn status(&self) -> Value {
        let r = ureq::get(format!("http://{}/api/status", self.addr))
            .header("Authorization", format!("Bearer {TOKEN}"))
            .call()
            .expect("status");
        serde_json::from_str(&r.into_body().read_to_string().expect("body")).expect("json")
    }

    fn act(&self, body: &str) -> (u16, Value) {
        let r = ureq::post(format!("http://{}/api/actions", self.addr))
            .header("Authorization", format!("Bearer {TOKEN}"))
            .header("Content-Type", "application/json")
            .config()
            .http_status_as_error(false)
            .build()
            .send(body)
            .expect("action");
        let code = r.status().as_u16();
        (code, serde_json::from_str(&r.into_body().read_to_string().expect("body")).expect("json"))
    }

    /// Waits until batch `name` has finished and the station is idle.
    fn wait_finished(&self, name: &str, limit: Duration) -> Value {
        self.wait(&format!("batch {name} to finish"), limit, || {
            let s = self.status();
            (s["mode"] == "idle" && s["batch"]["name"] == name && s["batch"]["finished"] == true)
                .then(|| s["batch"].clone())
        })
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().expect("kill");
        assert!(ok.success());
    }

    fn ledger(&self) -> PathBuf {
        self.dir.path().join("ledger.db")
    }
}

fn export(ledger: &Path) -> Value {
    let o = Command::new(env!("CARGO_BIN_EXE_station"))
        .args(["ledger", "export", "--format", "json", "--ledger"])
        .arg(ledger)
        .output()
        .expect("export");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("json")
}

#[test]
fn two_batches_through_the_api_then_sigterm_mid_batch_drains_cleanly() {
    let mut d = Daemon::start(0.1);
    // The API wants the token; metrics and health do not.
    let no_token = ureq::get(format!("http://{}/api/status", d.addr)).call();
    assert!(matches!(no_token, Err(ureq::Error::StatusCode(401))), "{no_token:?}");
    assert!(ureq::get(format!("http://{}/metrics", d.addr)).call().is_ok());
    assert_eq!(d.status()["mode"], "idle");
    assert_eq!(d.status()["lanes"].as_array().map(Vec::len), Some(4), "the daemon owns its readers while idle");

    // Pause and resume every reader (kept across batches).
    let (code, r) = d.act(r#"{"action":"pause"}"#);
    assert_eq!(code, 200, "{r}");
    let lanes = d.status()["lanes"].clone();
    assert!(lanes.as_array().is_some_and(|l| l.iter().all(|l| l["paused"] == true)), "{lanes}");
    let (code, r) = d.act(r#"{"action":"resume"}"#);
    assert_eq!(code, 200, "{r}");
    let lanes = d.status()["lanes"].clone();
    assert!(lanes.as_array().is_some_and(|l| l.iter().all(|l| l["paused"] == false)), "{lanes}");
    let (code, r) = d.act(r#"{"action":"pause_reader","reader":"no-such-reader"}"#);
    assert_eq!(code, 409, "{r}");

    // Batch 1: a card count.
    let (code, r) = d.act(r#"{"action":"start_batch","profile":"demo","name":"b1","cards":8}"#);
    assert_eq!(code, 200, "{r}");
    let (code, r) = d.act(r#"{"action":"start_batch","profile":"demo","name":"b1-again","cards":8}"#);
    assert_eq!(code, 409, "one batch at a time: {r}");
    assert!(r["message"].as_str().is_some_and(|m| m.contains("running")), "{r}");
    let (code, r) = d.act(r#"{"action":"start_batch","profile":"nope"}"#);
    assert_eq!(code, 409, "{r}");
    let b1 = d.wait_finished("b1", Duration::from_secs(120));
    assert_eq!(b1["passed"].as_u64().unwrap_or(0) + b1["failed"].as_u64().unwrap_or(0), 8, "{b1}");
    assert_eq!(b1["passed"], 8, "{b1}");
    let report = d.dir.path().join("reports/b1/report.html");
    d.wait("b1's report", Duration::from_secs(10), || report.is_file().then_some(()));

    // Batch 2: no count, drained through the API once some cards passed.
    let (code, r) = d.act(r#"{"action":"start_batch","profile":"demo","name":"b2"}"#);
    assert_eq!(code, 200, "{r}");
    d.wait("b2 to pass 4 cards", Duration::from_secs(120), || {
        let s = d.status();
        (s["batch"]["name"] == "b2" && s["batch"]["passed"].as_u64().unwrap_or(0) >= 4).then_some(())
    });
    let (code, r) = d.act(r#"{"action":"drain"}"#);
    assert_eq!(code, 200, "{r}");
    let b2 = d.wait_finished("b2", Duration::from_secs(120));
    assert!(b2["passed"].as_u64().unwrap_or(0) >= 4, "{b2}");
    assert!(b2["target"].is_null(), "{b2}");
    let doc = export(&d.ledger());
    let cards = doc["cards"].as_array().expect("cards");
    assert!(cards.iter().all(|c| c["status"] != "in_progress"), "a drained batch leaves nothing in progress: {doc}");
    let passed = cards.iter().filter(|c| c["status"] == "passed").count() as u64;
    assert_eq!(passed, 8 + b2["passed"].as_u64().unwrap_or(0), "ledger agrees with the two batches");

    // Batch 3: SIGTERM while cards are in flight.
    let (code, r) = d.act(r#"{"action":"start_batch","profile":"demo","name":"b3"}"#);
    assert_eq!(code, 200, "{r}");
    d.wait("b3 to have cards in flight", Duration::from_secs(60), || {
        let s = d.status();
        let busy = s["lanes"].as_array().is_some_and(|l| l.iter().any(|l| l["state"] == "working"));
        (s["batch"]["name"] == "b3" && busy).then_some(())
    });
    d.signal("-TERM");
    let started = Instant::now();
    let status = loop {
        if let Some(st) = d.child.try_wait().expect("wait") {
            break st;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no exit after SIGTERM; output:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "exit status {status:?}; output:\n{}", d.log());
    let took = started.elapsed();
    let doc = export(&d.ledger());
    let cards = doc["cards"].as_array().expect("cards");
    assert!(
        cards.iter().all(|c| c["status"] != "in_progress"),
        "SIGTERM drains: every card finished or recorded ({took:?}): {doc}"
    );
    let log = d.log();
    assert!(log.contains("draining"), "{log}");
    assert!(log.contains("station daemon stopped"), "{log}");
    assert!(!log.contains(TOKEN), "the token never appears in the log");
}

#[test]
fn sighup_with_a_broken_profile_keeps_the_last_good_ones() {
    let d = Daemon::start(0.0);
    let cfg = d.dir.path().join("station.yaml");
    let port: u16 = d.addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    let bad = d.dir.path().join("broken.yaml");
    std::fs::write(&bad, "product: [unclosed\n").expect("write");
    std::fs::write(&cfg, config_text(d.dir.path(), port, &[("demo", demo()), ("broken", bad.clone())], 0.0))
        .expect("config");
    d.signal("-HUP");
    let err = d.wait("the reload error to show", Duration::from_secs(10), || {
        d.status()["config_error"].as_str().map(str::to_string)
    });
    assert!(err.contains("broken.yaml") && err.contains("last good"), "{err}");
    let s = d.status();
    assert_eq!(s["profiles"], serde_json::json!(["demo"]), "{s}");
    assert!(s["events"].as_array().is_some_and(|e| e.iter().any(|e| e["level"] == "error")), "{s}");
    // The station keeps working with what it had.
    let (code, r) = d.act(r#"{"action":"start_batch","profile":"demo","name":"after-bad-reload","cards":4}"#);
    assert_eq!(code, 200, "{r}");
    let b = d.wait_finished("after-bad-reload", Duration::from_secs(60));
    assert_eq!(b["passed"], 4, "{b}");
    // Fixed: the reload takes, the error clears.
    std::fs::write(&cfg, config_text(d.dir.path(), port, &[("demo", demo()), ("demo2", demo())], 0.0)).expect("config");
    d.signal("-HUP");
    d.wait("the fixed reload", Duration::from_secs(10), || {
        let s = d.status();
        (s["config_error"].is_null() && s["profiles"] == serde_json::json!(["demo", "demo2"])).then_some(())
    });
}

#[test]
fn bad_configurations_are_refused_naming_the_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("station.yaml");
    std::fs::write(
        &cfg,
        format!(
            "station_id: s1\nlisten: 0.0.0.0:9464\nledger: l.db\nreaders:\n  sim:\n    readers: 2\nprofiles:\n  demo: {}\n",
            demo().display()
        ),
    )
    .expect("write");
    let o = Command::new(env!("CARGO_BIN_EXE_station"))
        .args(["daemon", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(text.contains("station.yaml:2:") && text.contains("listen") && text.contains("token"), "{text}");

    // The shipped example parses as it is.
    let shipped = station::daemon::config::DaemonConfig::load(&repo().join("deploy/station.yaml"));
    assert!(shipped.is_ok(), "{:?}", shipped.err().map(|e| e.to_string()));
}

#[test]
fn the_shipped_systemd_unit_verifies() {
    // systemd-analyze checks the unit's syntax and that ExecStart exists;
    // point it at the binary under test instead of /usr/local/bin.
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/tapline-station.service")).expect("unit");
    assert!(unit.contains("ExecStart=/usr/local/bin/station daemon --config"), "{unit}");
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"), "SIGHUP reloads: {unit}");
    assert!(unit.contains("KillSignal=SIGTERM"), "SIGTERM drains: {unit}");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tapline-station.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/station", env!("CARGO_BIN_EXE_station"))).expect("write");
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("systemd-analyze (Debian package systemd) is needed to verify the unit: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success() && text.trim().is_empty(), "systemd-analyze verify complains:\n{text}");
}

#[test]
fn sighup_with_hostile_files_keeps_the_last_good_configuration() {
    let d = Daemon::start(0.0);
    let cfg = d.dir.path().join("station.yaml");
    let good = std::fs::read_to_string(&cfg).expect("config");
    let port: u16 = d.addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    // The configuration itself replaced by an alias bomb, then by 100,000
    // nested brackets; then a profile that is a bomb of aliased strings.
    let mut bomb = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..=9 {
        bomb.push_str(&format!("a{i}: &a{i} [{}]\n", vec![format!("*a{}", i - 1); 10].join(", ")));
    }
    let deep = format!("station_id: test-st\nprofiles: {}\n", "[".repeat(100_000));
    let laughs = d.dir.path().join("laughs.yaml");
    std::fs::write(
        &laughs,
        format!("product: &s \"{}\"\nreaders:\n  include: [{}]\n", "x".repeat(200 * 1024), vec!["*s"; 400].join(", ")),
    )
    .expect("profile");
    let with_laughs = config_text(d.dir.path(), port, &[("demo", demo()), ("laughs", laughs)], 0.0);
    // A profile whose firmware copy has one CAP byte changed.
    let fw = d.dir.path().join("tampered-fw");
    std::fs::create_dir_all(&fw).expect("dir");
    for e in std::fs::read_dir(repo().join("firmware/wallet-demo")).expect("firmware") {
        let e = e.expect("entry");
        let mut bytes = std::fs::read(e.path()).expect("read");
        if e.path().extension().is_some_and(|x| x == "cap") {
            let at = bytes.len() / 2;
            bytes[at] ^= 0x01;
        }
        std::fs::write(fw.join(e.file_name()), bytes).expect("write");
    }
    let tampered = d.dir.path().join("tampered.yaml");
    std::fs::write(
        &tampered,
        std::fs::read_to_string(demo())
            .expect("demo")
            .replace("dir: ../firmware/wallet-demo", &format!("dir: {}", fw.display()))
            .replace("file:../firmware/keys/", &format!("file:{}/", repo().join("firmware/keys").display())),
    )
    .expect("profile");
    let with_tampered = config_text(d.dir.path(), port, &[("demo", demo()), ("tampered", tampered)], 0.0);
    for (what, text, names) in [
        ("alias bomb", bomb, "station.yaml:1:1"),
        ("deep nesting", deep, "station.yaml:2:"),
        ("aliased strings", with_laughs, "laughs.yaml:"),
        ("tampered firmware", with_tampered, "cap_sha256 mismatch"),
    ] {
        std::fs::write(&cfg, &text).expect("config");
        let started = Instant::now();
        d.signal("-HUP");
        let err = d.wait(&format!("the reload error for the {what}"), Duration::from_secs(10), || {
            d.status()["config_error"].as_str().map(str::to_string)
        });
        println!("{what}: reload refused in {:?}: {err}", started.elapsed());
        assert!(err.contains(names) && err.contains("last good"), "{what}: {err}");
        let s = d.status();
        assert_eq!(s["profiles"], serde_json::json!(["demo"]), "{what}: {s}");
        // Back to good: the error clears, so the next hostile file shows anew.
        std::fs::write(&cfg, &good).expect("config");
        d.signal("-HUP");
        d.wait("the good reload", Duration::from_secs(10), || d.status()["config_error"].is_null().then_some(()));
    }
    // The daemon still works with what it had.
    let (code, r) = d.act(r#"{"action":"start_batch","profile":"demo","name":"after-hostile","cards":2}"#);
    assert_eq!(code, 200, "{r}");
    let b = d.wait_finished("after-hostile", Duration::from_secs(60));
    assert_eq!(b["passed"], 2, "{b}");
}
