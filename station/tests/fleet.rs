//! A line of stations on one PostgreSQL ledger, against the real server
//! (127.0.0.1:5432, or `TAPLINE_TEST_PG`=postgres://USER@HOST:PORT). Each
//! test makes its own database `tapline_t_<random>` and drops it after.
//!
//! - three `station daemon` processes, each with its own emulated readers,
//!   300 cards: every card once, bundles within a station, no id twice,
//!   counts equal to the three stations' /metrics;
//! - one card identity at two stations at once: one wins, the other refuses
//!   naming the card and the station holding it;
//! - the database unreachable for part of a batch (a TCP forwarder the test
//!   controls, cut and restored): the outbox fills and drains;
//! - the connection dropped right after COMMIT was sent: the retry returns
//!   the stored row, nothing twice;
//! - `station ledger sync` twice, `ledger export` and `report` on PostgreSQL.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use station::ledger::{BatchInfo, Ledger, LedgerTarget, OpenOptions, StepEvent};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("repo")
}

fn pg_base() -> String {
    std::env::var("TAPLINE_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// HOST:PORT of the test server.
fn pg_addr() -> String {
    let base = pg_base();
    let rest = base.split("://").nth(1).unwrap_or("127.0.0.1:5432");
    let host = rest.rsplit('@').next().unwrap_or(rest);
    host.split('/').next().unwrap_or(host).to_string()
}

/// A throwaway database, dropped at the end.
struct TestDb {
    name: String,
}

impl TestDb {
    fn new() -> Self {
        let mut r = [0u8; 6];
        getrandom::fill(&mut r).expect("random");
        let name = format!("tapline_t_{}", hex::encode(r));
        let mut admin = postgres::Client::connect(&format!("{}/test", pg_base()), postgres::NoTls)
            .unwrap_or_else(|e| panic!("the test PostgreSQL at {}/test: {e}", pg_base()));
        admin.batch_execute(&format!("CREATE DATABASE {name}")).expect("create database");
        Self { name }
    }

    fn url(&self) -> String {
        format!("{}/{}", pg_base(), self.name)
    }

    /// The same database through a forwarder on `port`.
    fn url_via(&self, port: u16) -> String {
        let base = pg_base();
        let user = base.split("://").nth(1).and_then(|r| r.split_once('@')).map_or("postgres", |(u, _)| u).to_string();
        format!("postgres://{user}@127.0.0.1:{port}/{}", self.name)
    }

    fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url(), postgres::NoTls).expect("connect to the test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = postgres::Client::connect(&format!("{}/test", pg_base()), postgres::NoTls) {
            let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        }
    }
}

// ---- a TCP forwarder the test controls ------------------------------------

/// The simple-protocol message the client sends to commit.
const COMMIT_MSG: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";

#[derive(Default)]
struct FwdState {
    down: AtomicBool,
    /// Commits whose answer to drop (forward COMMIT, then cut before the
    /// reply).
    drop_commits: AtomicUsize,
    dropped: AtomicUsize,
    conns: Mutex<Vec<(TcpStream, TcpStream)>>,
}

struct Forwarder {
    port: u16,
    state: Arc<FwdState>,
}

impl Forwarder {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind forwarder");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(FwdState::default());
        let st = Arc::clone(&state);
        let upstream: SocketAddr = pg_addr().parse().unwrap_or_else(|_| "127.0.0.1:5432".parse().expect("addr"));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if st.down.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else { continue };
                if let (Ok(a), Ok(b)) = (client.try_clone(), server.try_clone()) {
                    st.conns.lock().expect("conns").push((a, b));
                }
                let kill = Arc::new(AtomicBool::new(false));
                let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                let (st1, kill1) = (Arc::clone(&st), Arc::clone(&kill));
                std::thread::spawn(move || pump_up(client, server, &st1, &kill1));
                std::thread::spawn(move || pump_down(s2, c2, &kill));
            }
        });
        Self { port, state }
    }

    /// Closes every connection and refuses new ones.
    fn cut(&self) {
        self.state.down.store(true, Ordering::SeqCst);
        for (a, b) in self.state.conns.lock().expect("conns").drain(..) {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.state.down.store(false, Ordering::SeqCst);
    }

    fn drop_next_commit_answer(&self) {
        self.state.drop_commits.fetch_add(1, Ordering::SeqCst);
    }

    fn dropped(&self) -> usize {
        self.state.dropped.load(Ordering::SeqCst)
    }
}

fn pump_up(mut client: TcpStream, mut server: TcpStream, st: &FwdState, kill: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let commit = chunk.windows(COMMIT_MSG.len()).any(|w| w == COMMIT_MSG);
        let armed =
            commit && st.drop_commits.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| d.checked_sub(1)).is_ok();
        if armed {
            // The reply must not reach the client: mark before forwarding.
            kill.store(true, Ordering::SeqCst);
            st.dropped.fetch_add(1, Ordering::SeqCst);
        }
        if server.write_all(chunk).is_err() {
            break;
        }
        if armed {
            // Let the server run the COMMIT, then cut both sides.
            std::thread::sleep(Duration::from_millis(300));
            break;
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
}

fn pump_down(mut server: TcpStream, mut client: TcpStream, kill: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match server.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if kill.load(Ordering::SeqCst) || client.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
}

// ---- station daemons -------------------------------------------------------

const TOKEN: &str = "fleet-test-token-0123456789";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

struct Daemon {
    child: Child,
    addr: String,
    id: String,
    dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn start(id: &str, ledger: &str, seed: u64, readers: usize, speed: f64) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        std::fs::write(dir.path().join("token.txt"), format!("{TOKEN}\n")).expect("token");
        let config = format!(
            "station_id: {id}\nlisten: 127.0.0.1:{port}\ntoken: file:token.txt\nledger: {ledger}\noutbox: outbox.db\n\
             reports: reports\nreaders:\n  sim:\n    readers: {readers}\n    card_speed: {speed}\n    seed: {seed}\n\
             profiles:\n  demo: {}\n",
            repo().join("profiles/demo.yaml").display()
        );
        std::fs::write(dir.path().join("station.yaml"), config).expect("config");
        let log = std::fs::File::create(dir.path().join("daemon.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_station"))
            .args(["daemon", "--config"])
            .arg(dir.path().join("station.yaml"))
            .args(["--drain-timeout", "20", "--log-file"])
            .arg(dir.path().join("station-log.txt"))
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .current_dir(dir.path())
            .spawn()
            .expect("station daemon starts");
        let d = Daemon { child, addr: format!("127.0.0.1:{port}"), id: id.to_string(), dir };
        d.wait("healthz", Duration::from_secs(30), || {
            ureq::get(format!("http://{}/healthz", d.addr)).call().is_ok().then_some(())
        });
        d
    }

    fn log(&self) -> String {
        let a = std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default();
        let b = std::fs::read_to_string(self.dir.path().join("station-log.txt")).unwrap_or_default();
        format!("--- {} ---\n{a}\n--- log file ---\n{b}", self.id)
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

    fn start_batch(&self, name: &str, cards: usize) {
        let body = format!(r#"{{"action":"start_batch","profile":"demo","name":"{name}","cards":{cards}}}"#);
        let r = ureq::post(format!("http://{}/api/actions", self.addr))
            .header("Authorization", format!("Bearer {TOKEN}"))
            .header("Content-Type", "application/json")
            .config()
            .http_status_as_error(false)
            .build()
            .send(&body)
            .expect("action");
        let code = r.status().as_u16();
        assert_eq!(
            code,
            200,
            "{}: start_batch: {}\n{}",
            self.id,
            r.into_body().read_to_string().unwrap_or_default(),
            self.log()
        );
    }

    fn wait_finished(&self, name: &str, limit: Duration) -> Value {
        self.wait(&format!("batch {name} to finish"), limit, || {
            let s = self.status();
            (s["mode"] == "idle" && s["batch"]["name"] == name && s["batch"]["finished"] == true)
                .then(|| s["batch"].clone())
        })
    }

    fn metrics(&self) -> String {
        ureq::get(format!("http://{}/metrics", self.addr))
            .call()
            .expect("metrics")
            .into_body()
            .read_to_string()
            .expect("body")
    }
}

/// Sum of the samples of `name` whose labels contain every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

fn station(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_station")).args(args).current_dir(repo()).output().expect("station runs")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn export(ledger: &str) -> Value {
    let o = station(&["ledger", "export", "--format", "json", "--ledger", ledger]);
    assert!(o.status.success(), "export: {}", text(&o));
    serde_json::from_slice(&o.stdout).expect("json")
}

fn strs<'a>(v: &'a Value, key: &str) -> Vec<&'a Value> {
    v[key].as_array().map(|a| a.iter().collect()).unwrap_or_default()
}

/// No serial and no bundle id or number twice; every card once.
fn assert_unique_ids(doc: &Value) {
    let cards = strs(doc, "cards");
    let ids: BTreeSet<&str> = cards.iter().filter_map(|c| c["card_id"].as_str()).collect();
    assert_eq!(ids.len(), cards.len(), "a card recorded twice");
    let serials: Vec<i64> = cards.iter().filter_map(|c| c["serial"].as_i64()).collect();
    assert_eq!(serials.iter().collect::<BTreeSet<_>>().len(), serials.len(), "a serial issued twice");
    let bundles = strs(doc, "bundles");
    let bids: BTreeSet<&str> = bundles.iter().filter_map(|b| b["bundle_id"].as_str()).collect();
    assert_eq!(bids.len(), bundles.len(), "a bundle id twice");
    let nos: Vec<i64> = bundles.iter().filter_map(|b| b["bundle_no"].as_i64()).collect();
    assert_eq!(nos.len(), bundles.len(), "every bundle has a number");
    assert_eq!(nos.iter().collect::<BTreeSet<_>>().len(), nos.len(), "a bundle number twice");
}

#[test]
fn three_stations_on_one_database_record_each_of_300_cards_once() {
    let db = TestDb::new();
    let url = db.url();
    let stations: Vec<Daemon> =
        (0..3).map(|i| Daemon::start(&format!("st-{}", i + 1), &url, 100 + i as u64, 4, 0.0)).collect();
    let started = Instant::now();
    for s in &stations {
        s.start_batch("line", 100);
    }
    let mut passed_by_station = BTreeMap::new();
    let mut sealed_by_station = BTreeMap::new();
    for s in &stations {
        let b = s.wait_finished("line", Duration::from_secs(300));
        assert_eq!(b["passed"], 100, "{}: {b}\n{}", s.id, s.log());
        let m = s.metrics();
        let station_label = format!(r#"station="{}""#, s.id);
        passed_by_station
            .insert(s.id.clone(), sample(&m, "tapline_cards_total", &[&station_label, r#"outcome="passed""#]) as usize);
        sealed_by_station.insert(
            s.id.clone(),
            sample(&m, "tapline_bundles_total", &[&station_label, r#"outcome="sealed""#]) as usize,
        );
        // A figure, not a goal: the mean ledger write (request to commit)
        // with three stations on one database.
        let (sum, count) = (
            sample(&m, "tapline_ledger_write_seconds_sum", &[&station_label]),
            sample(&m, "tapline_ledger_write_seconds_count", &[&station_label]),
        );
        println!("{}: {count} ledger writes, mean {:.2} ms", s.id, 1000.0 * sum / count.max(1.0));
        assert_eq!(sample(&m, "tapline_ledger_online", &[&station_label]), 1.0, "{m}");
        assert_eq!(sample(&m, "tapline_ledger_outbox_ops", &[&station_label]), 0.0, "{m}");
    }
    println!("3 stations x 100 cards (card speed 0, 4 readers each): {:.1} s", started.elapsed().as_secs_f64());
    let doc = export(&url);
    let cards = strs(&doc, "cards");
    assert_eq!(cards.len(), 300, "every card recorded, once");
    assert!(cards.iter().all(|c| c["status"] == "passed" && c["serial"].is_i64()), "all passed with a serial");
    assert_unique_ids(&doc);
    let mut by_station: HashMap<&str, usize> = HashMap::new();
    let station_of: HashMap<&str, &str> =
        cards.iter().map(|c| (c["card_id"].as_str().unwrap_or(""), c["station_id"].as_str().unwrap_or(""))).collect();
    for c in &cards {
        *by_station.entry(c["station_id"].as_str().expect("station id on every card")).or_default() += 1;
    }
    for (id, n) in &passed_by_station {
        assert_eq!(by_station.get(id.as_str()), Some(n), "ledger count of {id} equals its /metrics");
    }
    assert_eq!(passed_by_station.values().sum::<usize>(), 300, "the three stations' metrics add up to the ledger");
    // Bundles are formed within a station.
    let sealed: Vec<&Value> = strs(&doc, "bundles").into_iter().filter(|b| b["status"] == "sealed").collect();
    assert!(!sealed.is_empty());
    for b in &sealed {
        let owner = b["station_id"].as_str().expect("bundle station");
        let mut members = vec![b["primary"].as_str().expect("primary")];
        members.extend(b["backups"].as_array().expect("backups").iter().filter_map(Value::as_str));
        for m in members {
            assert_eq!(station_of.get(m), Some(&owner), "bundle {} mixes stations", b["bundle_id"]);
        }
    }
    for (id, n) in &sealed_by_station {
        assert_eq!(sealed.iter().filter(|b| b["station_id"] == id.as_str()).count(), *n, "{id}'s sealed bundles");
    }
    // Every journal line names its station, too.
    let mut c = db.client();
    let unnamed: i64 = c.query_one("SELECT COUNT(*) FROM steps WHERE station_id IS NULL", &[]).expect("q").get(0);
    assert_eq!(unnamed, 0);
    let batches: i64 = c.query_one("SELECT COUNT(DISTINCT station_id) FROM batches", &[]).expect("q").get(0);
    assert_eq!(batches, 3);
    // One intact audit chain per station.
    let o = station(&["ledger", "verify", "--ledger", &url]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("3 station audit chain(s)"), "{}", text(&o));
}

/// The demo profile without bundles, with its paths made absolute.
fn single_card_profile(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("profiles/demo.yaml")).expect("demo profile");
    let mut out = String::new();
    let mut in_bundles = false;
    for line in text.lines() {
        if line.starts_with("bundles:") {
            in_bundles = true;
            continue;
        }
        if in_bundles && (line.starts_with(' ') || line.is_empty()) {
            continue;
        }
        in_bundles = false;
        out.push_str(&line.replace("../", &format!("{}/", repo().display())));
        out.push('\n');
    }
    let path = dir.join("single.yaml");
    std::fs::write(&path, out).expect("profile");
    path
}

#[test]
fn the_same_card_at_two_stations_at_once_one_wins_the_other_refuses_naming_the_holder() {
    let db = TestDb::new();
    let url = db.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let profile = single_card_profile(dir.path());
    // One seed: both emulated chip factories make the same chip identity.
    let spawn = |id: &str| {
        Command::new(env!("CARGO_BIN_EXE_station"))
            .args(["run", "--profile"])
            .arg(&profile)
            .args(["--sim", "1", "--cards", "1", "--card-speed", "0.5", "--seed", "4242", "--headless"])
            .args(["--ledger", &url, "--station-id", id, "--batch", id])
            .arg("--outbox")
            .arg(dir.path().join(format!("{id}-outbox.db")))
            .arg("--report-dir")
            .arg(dir.path().join(id))
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("station run starts")
    };
    let (a, b) = (spawn("st-a"), spawn("st-b"));
    let (a, b) = (a.wait_with_output().expect("st-a"), b.wait_with_output().expect("st-b"));
    let (ta, tb) = (text(&a), text(&b));
    assert!(a.status.success() && b.status.success(), "st-a:\n{ta}\nst-b:\n{tb}");
    let (winner, loser, lost_text) = match (ta.contains(" PASS "), tb.contains(" PASS ")) {
        (true, false) => ("st-a", "st-b", &tb),
        (false, true) => ("st-b", "st-a", &ta),
        _ => panic!("exactly one station must pass the card:\nst-a:\n{ta}\nst-b:\n{tb}"),
    };
    assert!(lost_text.contains(&format!("in progress at station {winner}")), "{loser} names the holder:\n{lost_text}");
    let doc = export(&url);
    let cards = strs(&doc, "cards");
    assert_eq!(cards.len(), 1, "{doc}");
    let card_id = cards[0]["card_id"].as_str().expect("id");
    assert!(lost_text.contains(card_id), "{loser} names the card {card_id}:\n{lost_text}");
    assert_eq!(cards[0]["station_id"], winner);
    assert_eq!(cards[0]["status"], "passed");
    assert_eq!(cards[0]["attempts"], 1, "the refused station did not touch the record");
    let mut c = db.client();
    let loser_steps: i64 =
        c.query_one("SELECT COUNT(*) FROM steps WHERE station_id = $1", &[&loser]).expect("q").get(0);
    assert_eq!(loser_steps, 0, "nothing journalled by {loser}");
}

#[test]
fn a_card_torn_at_one_station_resumes_at_another_from_the_shared_record() {
    let db = TestDb::new();
    let url = db.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let profile = single_card_profile(dir.path());
    // One seed: both chip factories make the same chip identity. At st-a
    // the card is pulled mid-recipe and not put back; the operator then
    // takes it to st-b.
    let run = |id: &str, faults: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_station"))
            .args(["run", "--profile"])
            .arg(&profile)
            .args(["--sim", "1", "--cards", "1", "--card-speed", "0", "--seed", "4242", "--headless"])
            .args(["--sim-faults", faults])
            .args(["--ledger", &url, "--station-id", id, "--batch", id])
            .arg("--outbox")
            .arg(dir.path().join(format!("{id}-outbox.db")))
            .arg("--report-dir")
            .arg(dir.path().join(id))
            .current_dir(dir.path())
            .output()
            .expect("station run");
        let t = text(&o);
        assert!(o.status.success(), "{id}:\n{t}");
        t
    };
    let ta = run("st-a", "tear=1");
    assert!(ta.contains("card removed") && !ta.contains(" PASS "), "st-a: the card is torn:\n{ta}");
    let tb = run("st-b", "");
    assert!(tb.contains(" PASS "), "st-b finishes the card:\n{tb}");

    let doc = export(&url);
    let cards = strs(&doc, "cards");
    assert_eq!(cards.len(), 1, "one card, one record: {doc}");
    let card = cards[0];
    let card_id = card["card_id"].as_str().expect("id");
    assert_eq!(card["status"], "passed");
    assert_eq!(card["station_id"], "st-b", "the station that finished it");
    assert_eq!(card["attempts"], 2, "st-b went on from st-a's attempt, it did not start a new record");
    // Both attempts are in the one journal of the card: st-a's, ended by
    // the tear (retryable), then st-b's.
    let mut c = db.client();
    let rows: Vec<(String, i64, String, String)> = c
        .query("SELECT station_id, attempt, step, event FROM steps WHERE card_id = $1 ORDER BY id", &[&card_id])
        .expect("steps")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let a: Vec<_> = rows.iter().filter(|r| r.0 == "st-a").collect();
    let b: Vec<_> = rows.iter().filter(|r| r.0 == "st-b").collect();
    assert!(!a.is_empty() && a.iter().all(|r| r.1 == 1), "st-a journalled attempt 1: {rows:?}");
    assert!(a.iter().any(|r| r.3 == "failed"), "st-a's attempt ended failed: {rows:?}");
    assert!(!b.is_empty() && b.iter().all(|r| r.1 == 2), "st-b journalled attempt 2: {rows:?}");
    assert!(b.iter().any(|r| r.2 == "record" && r.3 == "done"), "st-b recorded the card: {rows:?}");
    let first_b = rows.iter().position(|r| r.0 == "st-b").expect("st-b rows");
    assert!(rows[..first_b].iter().all(|r| r.0 == "st-a"), "st-a's attempt comes first: {rows:?}");
    assert_unique_ids(&doc);
}

#[test]
fn an_unreachable_database_fills_the_outbox_which_drains_when_it_returns() {
    let db = TestDb::new();
    let fwd = Forwarder::start();
    let url = db.url_via(fwd.port);
    let s = Daemon::start("st-out", &url, 9, 4, 0.2);
    let total = 45;
    s.start_batch("outage", total);
    s.wait("some cards before the cut", Duration::from_secs(120), || {
        (s.status()["batch"]["passed"].as_u64().unwrap_or(0) >= 6).then_some(())
    });
    fwd.cut();
    let before = s.status()["batch"]["passed"].as_u64().unwrap_or(0);
    // Offline: the station says so and keeps provisioning into the outbox.
    let outbox_during = s.wait("the station to report the ledger offline", Duration::from_secs(30), || {
        let m = s.metrics();
        let (online, ops) = (sample(&m, "tapline_ledger_online", &[]), sample(&m, "tapline_ledger_outbox_ops", &[]));
        (online == 0.0 && ops > 0.0).then_some(ops)
    });
    assert!(outbox_during > 0.0);
    let st = s.status();
    assert_eq!(st["ledger"]["online"], false, "{st}");
    s.wait("cards provisioned while offline", Duration::from_secs(120), || {
        (s.status()["batch"]["passed"].as_u64().unwrap_or(0) >= before + 9).then_some(())
    });
    let grown = sample(&s.metrics(), "tapline_ledger_outbox_ops", &[]);
    assert!(grown > outbox_during, "the outbox grew while offline: {outbox_during} -> {grown}");
    fwd.restore();
    let b = s.wait_finished("outage", Duration::from_secs(300));
    s.wait("the outbox to drain", Duration::from_secs(60), || {
        let m = s.metrics();
        (sample(&m, "tapline_ledger_online", &[]) == 1.0 && sample(&m, "tapline_ledger_outbox_ops", &[]) == 0.0)
            .then_some(())
    });
    assert_eq!(s.status()["ledger"]["online"], true);
    let m = s.metrics();
    let passed = sample(&m, "tapline_cards_total", &[r#"outcome="passed""#]) as usize;
    assert_eq!(b["passed"].as_u64(), Some(passed as u64), "{b}");
    let doc = export(&db.url());
    let cards = strs(&doc, "cards");
    assert_eq!(
        cards.iter().filter(|c| c["status"] == "passed").count(),
        passed,
        "final counts equal the cards provisioned"
    );
    assert_eq!(cards.len(), total, "every card recorded once");
    assert!(cards.iter().all(|c| c["serial"].is_i64()), "serials allocated on drain: {doc}");
    assert_unique_ids(&doc);
    let sealed = strs(&doc, "bundles").into_iter().filter(|b| b["status"] == "sealed").count();
    assert_eq!(sealed as f64, sample(&m, "tapline_bundles_total", &[r#"outcome="sealed""#]));
    let outbox = s.dir.path().join("outbox.db");
    let conn = rusqlite::Connection::open(&outbox).expect("outbox");
    let left: i64 = conn.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0)).expect("count");
    assert_eq!(left, 0, "the outbox is empty");
}

#[test]
fn a_commit_whose_answer_is_lost_returns_the_stored_row_not_a_second_one() {
    let db = TestDb::new();
    let fwd = Forwarder::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let target = LedgerTarget::parse(&db.url_via(fwd.port)).expect("url");
    let opts = OpenOptions { target, station_id: "st-c".into(), outbox: Some(dir.path().join("outbox.db")) };
    let (l, w) = Ledger::open_with(&opts).expect("open");
    let batch = l
        .start_batch(BatchInfo {
            name: "b".into(),
            profile: "p".into(),
            product: "x".into(),
            firmware: "f".into(),
            firmware_sha256: "00".into(),
        })
        .expect("batch");
    let card = card::CardId([0x42; 10]);
    assert_eq!(l.begin_card(card, "r0", batch, "", "").expect("begin"), None);
    l.step(card, 1, "identify", StepEvent::Intent, "", "r0").expect("step");
    fwd.drop_next_commit_answer();
    let serial = l.pass(card, 1, "ready_for_pairing").expect("the pass is answered").expect("with its serial");
    assert_eq!(fwd.dropped(), 1, "the forwarder dropped a COMMIT's answer");
    assert!(l.status().online && l.status().outbox_ops == 0, "{:?}", l.status());
    // The next op runs normally on the new connection.
    let second = card::CardId([0x43; 10]);
    l.begin_card(second, "r0", batch, "", "").expect("begin 2");
    let serial2 = l.pass(second, 1, "ready_for_pairing").expect("pass 2").expect("serial 2");
    drop(l);
    w.close();
    let mut c = db.client();
    let rows = c.query("SELECT serial FROM cards WHERE card_id = $1", &[&card.to_hex()]).expect("q");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, Option<i64>>(0), Some(serial), "the stored serial came back");
    let records: i64 = c
        .query_one("SELECT COUNT(*) FROM steps WHERE card_id = $1 AND step = 'record'", &[&card.to_hex()])
        .expect("q")
        .get(0);
    assert_eq!(records, 1, "recorded once");
    assert_eq!(serial2, serial + 1, "no serial spent on a second apply");
}

#[test]
fn ledger_sync_copies_a_sqlite_ledger_once_and_export_and_report_read_postgres() {
    let db = TestDb::new();
    let url = db.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = dir.path().join("st.db");
    let sqlite = sqlite.to_str().expect("utf8");
    let o = station(&[
        "run",
        "--profile",
        "profiles/demo.yaml",
        "--sim",
        "3",
        "--cards",
        "12",
        "--card-speed",
        "0",
        "--seed",
        "77",
        "--headless",
        "--ledger",
        sqlite,
        "--station-id",
        "st-old",
        "--batch",
        "old-batch",
        "--report-dir",
        dir.path().join("r").to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let local = export(sqlite);
    let o = station(&["ledger", "sync", "--from", sqlite, "--to", &url, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let first: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(first["cards_added"], 12, "{first}");
    let o = station(&["ledger", "sync", "--from", sqlite, "--to", &url, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let second: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        (&second["cards_added"], &second["steps_added"], &second["batches_added"], &second["bundles_added"]),
        (&Value::from(0), &Value::from(0), &Value::from(0), &Value::from(0)),
        "a second sync changes nothing: {second}"
    );
    assert_eq!(second["cards_present"], 12);
    let shared = export(&url);
    let pick = |d: &Value| -> BTreeMap<String, (Value, Value, Value)> {
        strs(d, "cards")
            .iter()
            .map(|c| {
                (
                    c["card_id"].as_str().unwrap_or("").to_string(),
                    (c["serial"].clone(), c["status"].clone(), c["station_id"].clone()),
                )
            })
            .collect()
    };
    assert_eq!(pick(&shared), pick(&local), "same cards, serials, outcomes and station");
    assert!(strs(&shared, "cards").iter().all(|c| c["station_id"] == "st-old"));
    assert_unique_ids(&shared);
    // A station on the database now allocates serials above the copied ones.
    let opts = OpenOptions::new(LedgerTarget::parse(&url).expect("url"), "st-new");
    let opts = OpenOptions { outbox: Some(dir.path().join("ob.db")), ..opts };
    let (l, w) = Ledger::open_with(&opts).expect("open");
    let b = l
        .start_batch(BatchInfo {
            name: "new".into(),
            profile: "p".into(),
            product: "x".into(),
            firmware: "f".into(),
            firmware_sha256: "00".into(),
        })
        .expect("batch");
    l.begin_card(card::CardId([9; 10]), "r", b, "", "").expect("begin");
    let serial = l.pass(card::CardId([9; 10]), 1, "ready_for_pairing").expect("pass").expect("serial");
    drop(l);
    w.close();
    let max_local = strs(&local, "cards").iter().filter_map(|c| c["serial"].as_i64()).max().unwrap_or(0);
    assert!(serial > max_local, "serial {serial} after the copied {max_local}");
    // The batch report reads PostgreSQL too.
    let out = dir.path().join("pg-report");
    let o = station(&["report", "--ledger", &url, "--batch", "old-batch", "--out", out.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", text(&o));
    let md = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    assert!(md.contains("old-batch"), "{md}");
    // Each station's ops form a hash chain on PostgreSQL; an edit shows.
    let o = station(&["ledger", "verify", "--ledger", &url]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("station st-new: 3 rows, intact"), "{}", text(&o));
    let mut c = db.client();
    c.execute(
        "UPDATE audit SET detail = replace(detail, 'ready_for_pairing', 'bundled') \
         WHERE station_id = 'st-new' AND kind = 'card_pass'",
        &[],
    )
    .expect("tamper");
    let o = station(&["ledger", "verify", "--ledger", &url]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("station st-new: seq 3: edited"), "{}", text(&o));
    c.execute("DELETE FROM audit WHERE station_id = 'st-new' AND station_seq = 2", &[]).expect("delete");
    let o = station(&["ledger", "verify", "--ledger", &url]);
    assert!(text(&o).contains("station st-new: seq 2 is missing"), "{}", text(&o));
}
