//! `kill -9` of `station run` at random moments, on one ledger, again and
//! again: after every kill the ledger is intact (`integrity_check`), every
//! card the station printed PASS before it died is recorded passed with
//! that serial, no serial or sealed bundle membership is issued twice, the
//! cards a kill left in flight are listed as in progress (resumable, their
//! steps journaled), and the audit chain verifies (a kill between an op and
//! its audit row cannot happen: they share a savepoint). Each restart
//! recovers what the killed run left: after the last, clean run no card is
//! in progress, every card a kill left in flight is failed retryable
//! ("interrupted: the station stopped mid-card", journaled) and every batch
//! is finished with a signed head.
//!
//! The emulated cards are new chips on every run (another seed), so this
//! does not re-present a half-provisioned card: it proves the ledger side,
//! not the card side of resumption (tests/tests/batch.rs and the recipe
//! tests cover resuming a torn card).
//!
//! Short form (CI): 5 kills. Long form: `TAPLINE_KILLS=50` (see
//! scripts/kill-test.sh); `TAPLINE_KILL_SEED` repeats a run.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use station::ledger::audit;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// xorshift64*: enough randomness for kill times, repeatable from a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn between_ms(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

struct Run {
    /// Card id -> serial, for every PASS line printed.
    passed: Vec<(String, i64)>,
    killed: bool,
}

/// Starts a batch; kills it with SIGKILL after `kill_after` (or lets it
/// finish when `None`); returns what it printed.
fn run(ledger: &Path, reports: &Path, round: usize, seed: u64, kill_after: Option<Duration>) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_station"))
        .args(["run", "--profile", "profiles/demo.yaml", "--sim", "8", "--cards", "40", "--card-speed", "0.05"])
        .arg("--ledger")
        .arg(ledger)
        .arg("--report-dir")
        .arg(reports.join(format!("round-{round}")))
        .args(["--headless", "--batch", &format!("kill-{round}"), "--seed", &seed.to_string()])
        .current_dir(repo())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("station starts");
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut passed = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let t: Vec<&str> = line.split_whitespace().collect();
            if let Some(i) = t.iter().position(|w| *w == "PASS")
                && t.get(i + 1) == Some(&"serial")
                && let Some(serial) = t.get(i + 2).and_then(|s| s.parse::<i64>().ok())
            {
                passed.push((t[i - 1].to_string(), serial));
            }
        }
        passed
    });
    let killed = match kill_after {
        Some(d) => {
            let started = std::time::Instant::now();
            while started.elapsed() < d {
                if child.try_wait().expect("wait").is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let running = child.try_wait().expect("wait").is_none();
            let _ = child.kill(); // SIGKILL
            running
        }
        None => false,
    };
    let status = child.wait().expect("wait");
    if kill_after.is_none() {
        assert!(status.success(), "the last, unkilled batch failed: {status}");
    }
    Run { passed: reader.join().expect("reader"), killed }
}

/// Everything that must hold of the ledger after a kill; returns the
/// cards left in progress.
fn check(ledger: &Path, printed: &HashMap<String, i64>, pinned: &k256::ecdsa::VerifyingKey) -> Vec<String> {
    let conn = Connection::open_with_flags(ledger, OpenFlags::SQLITE_OPEN_READ_WRITE).expect("open");
    let ok: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).expect("integrity_check");
    assert_eq!(ok, "ok");
    let recorded: HashMap<String, (String, Option<i64>)> = conn
        .prepare("SELECT card_id, status, serial FROM cards")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("cards");
    for (card, serial) in printed {
        let (status, s) = recorded.get(card).unwrap_or_else(|| panic!("printed PASS {card} is not in the ledger"));
        assert_eq!((status.as_str(), *s), ("passed", Some(*serial)), "card {card} was printed PASS serial {serial}");
    }
    let serials: Vec<i64> = recorded.values().filter_map(|(_, s)| *s).collect();
    let distinct: HashSet<i64> = serials.iter().copied().collect();
    assert_eq!(serials.len(), distinct.len(), "a serial issued twice");
    assert!(recorded.values().all(|(st, s)| (st == "passed") == s.is_some()), "passed <=> serial");
    let twice: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM (SELECT card_id FROM bundle_members WHERE sealed = 1 GROUP BY card_id HAVING COUNT(*) > 1)",
            [],
            |r| r.get(0),
        )
        .expect("bundles");
    assert_eq!(twice, 0, "a card in two sealed bundles");
    let bundle_ids: i64 = conn
        .query_row("SELECT COUNT(*) - COUNT(DISTINCT bundle_id) FROM bundles", [], |r| r.get(0))
        .expect("bundle ids");
    assert_eq!(bundle_ids, 0, "a bundle id issued twice");
    // In-flight cards: in progress, with their journal up to the last
    // durable step; a later attempt on the same chip resumes from there.
    let in_progress: Vec<(String, Option<String>)> = conn
        .prepare("SELECT card_id, current_step FROM cards WHERE status = 'in_progress'")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("in progress");
    // (A kill right after `begin_card` leaves no steps row yet, but the
    // audit log has the begin.)
    for (card, _) in &in_progress {
        let begun: i64 = conn
            .query_row("SELECT COUNT(*) FROM audit WHERE card_id = ?1 AND kind = 'card_begin'", [card], |r| r.get(0))
            .expect("audit");
        assert!(begun > 0, "in-progress card {card} has no card_begin in the audit log");
    }
    drop(conn);
    let report = audit::verify(ledger, Some(pinned)).expect("verify");
    assert!(report.ok(), "audit after a kill: {:?}", report.problems);
    in_progress.into_iter().map(|(card, _)| card).collect()
}

/// After the last, clean run: nothing in progress, no batch unfinished,
/// and every card a kill left in progress was failed retryable by the
/// next start's recovery (at the step it was at, with a journal line).
fn check_recovered(ledger: &Path, left: &HashSet<String>) {
    let conn = Connection::open_with_flags(ledger, OpenFlags::SQLITE_OPEN_READ_ONLY).expect("open");
    let in_progress: i64 = conn
        .query_row("SELECT COUNT(*) FROM cards WHERE status = 'in_progress'", [], |r| r.get(0))
        .expect("in progress");
    assert_eq!(in_progress, 0, "cards still in progress after the clean run");
    let unfinished: i64 =
        conn.query_row("SELECT COUNT(*) FROM batches WHERE finished_at IS NULL", [], |r| r.get(0)).expect("batches");
    assert_eq!(unfinished, 0, "batches left unfinished");
    for card in left {
        let (status, reason, retryable, step): (String, Option<String>, Option<bool>, Option<String>) = conn
            .query_row(
                "SELECT status, failure_reason, retryable, failed_step FROM cards WHERE card_id = ?1",
                [card],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .expect("card");
        assert_eq!(
            (status.as_str(), reason.as_deref(), retryable),
            ("failed", Some(station::ledger::INTERRUPTED), Some(true)),
            "card {card} left in progress by a kill"
        );
        let journaled: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM steps WHERE card_id = ?1 AND event = 'failed' AND step = ?2 AND detail LIKE ?3",
                rusqlite::params![card, step, format!("{}%", station::ledger::INTERRUPTED)],
                |r| r.get(0),
            )
            .expect("journal");
        assert_eq!(journaled, 1, "card {card}: one journal line for its recovery");
    }
}

#[test]
fn kill_9_at_random_points_never_breaks_the_ledger() {
    let kills: usize = std::env::var("TAPLINE_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let seed: u64 = std::env::var("TAPLINE_KILL_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1
    });
    eprintln!("kill test: {kills} kills, TAPLINE_KILL_SEED={seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = dir.path().join("ledger.db");
    let pinned =
        audit::parse_public_key(repo().join("firmware/keys/DEMO-ONLY-audit.key.pub").to_str().expect("utf8 path"))
            .expect("audit key");
    let mut printed: HashMap<String, i64> = HashMap::new();
    let (mut killed_mid_batch, mut left_in_progress) = (0, 0);
    let mut left_by_kills: HashSet<String> = HashSet::new();
    for round in 0..=kills {
        let kill = (round < kills).then(|| Duration::from_millis(rng.between_ms(200, 2_000)));
        let r = run(&ledger, dir.path(), round, rng.next() >> 16, kill);
        killed_mid_batch += usize::from(r.killed);
        for (card, serial) in r.passed {
            assert!(printed.insert(card.clone(), serial).is_none(), "card {card} printed PASS twice");
        }
        let left = check(&ledger, &printed, &pinned);
        left_in_progress = left.len();
        if round < kills {
            left_by_kills.extend(left);
        }
        eprintln!(
            "round {round}: {} after {kill:?}; {} cards printed PASS so far; {left_in_progress} in progress",
            if r.killed { "killed" } else { "finished" },
            printed.len()
        );
    }
    let report = audit::verify(&ledger, Some(&pinned)).expect("verify");
    assert!(report.ok(), "{:?}", report.problems);
    assert!(report.heads.iter().all(|h| h.signature == "valid"), "{:?}", report.heads);
    assert!(!report.heads.is_empty(), "the last batch finished and signed its head");
    assert_eq!(left_in_progress, 0, "the clean run leaves nothing in progress");
    check_recovered(&ledger, &left_by_kills);
    eprintln!(
        "kill test: {killed_mid_batch}/{kills} kills landed mid-batch; {} PASS cards all recorded; {} audit rows, \
         {} heads; {} cards left in progress by kills, all recovered failed retryable; {left_in_progress} left \
         in progress at the end",
        printed.len(),
        report.audit_rows,
        report.heads.len(),
        left_by_kills.len()
    );
}
