//! The audit log against an attacker with the SQLite file: a real batch's
//! ledger, then one tampering each (a cards row edited, an audit row edited,
//! deleted or moved, the tail cut, the chain rewritten with recomputed
//! hashes, the head re-signed with another key). `ledger::audit::verify`
//! must name each; the untouched ledger verifies.

use std::path::Path;

use k256::ecdsa::signature::Signer;
use rusqlite::Connection;
use station::ledger::audit::{self, AuditRow, ProblemKind, VerifyReport};
use tapline_tests::{demo_profile, repo, run_batch};

fn pinned() -> k256::ecdsa::VerifyingKey {
    let text = std::fs::read_to_string(repo().join("firmware/keys/DEMO-ONLY-audit.key.pub")).expect("pub key");
    audit::parse_public_key(text.trim()).expect("key")
}

/// Copies the ledger, applies `tamper` to the copy, verifies it.
fn tampered(ledger: &Path, tamper: impl FnOnce(&Connection)) -> VerifyReport {
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("t.db");
    // The writer closed cleanly: the WAL is checkpointed into the file.
    std::fs::copy(ledger, &copy).expect("copy");
    let conn = Connection::open(&copy).expect("open copy");
    tamper(&conn);
    drop(conn);
    audit::verify(&copy, Some(&pinned())).expect("verify runs")
}

fn first(r: &VerifyReport) -> &audit::Problem {
    r.problems.first().unwrap_or_else(|| panic!("tampering not detected: {r:?}"))
}

fn rows(conn: &Connection, from: i64) -> Vec<AuditRow> {
    let mut stmt = conn
        .prepare("SELECT seq, batch_id, at, kind, card_id, step, detail, prev_hash, hash FROM audit WHERE seq >= ?1 ORDER BY seq")
        .expect("prepare");
    stmt.query_map([from], |r| {
        Ok(AuditRow {
            seq: r.get(0)?,
            batch_id: r.get(1)?,
            at: r.get(2)?,
            kind: r.get(3)?,
            card_id: r.get(4)?,
            step: r.get(5)?,
            detail: r.get(6)?,
            prev_hash: r.get(7)?,
            hash: r.get(8)?,
        })
    })
    .expect("query")
    .collect::<Result<_, _>>()
    .expect("rows")
}

/// What a careful attacker does after editing row `from`: recompute every
/// hash from there to the end so the chain links again.
fn rechain(conn: &Connection, from: i64) {
    let mut prev: String =
        conn.query_row("SELECT hash FROM audit WHERE seq = ?1", [from - 1], |r| r.get(0)).expect("prev");
    for mut row in rows(conn, from) {
        row.prev_hash = prev;
        row.hash = row.compute_hash();
        conn.execute(
            "UPDATE audit SET prev_hash = ?2, hash = ?3 WHERE seq = ?1",
            rusqlite::params![row.seq, row.prev_hash, row.hash],
        )
        .expect("rechain");
        prev = row.hash;
    }
}

/// The seq of the last audit row that snapshots `card`.
fn last_entry_of(conn: &Connection, card: &str) -> i64 {
    conn.query_row("SELECT MAX(seq) FROM audit WHERE detail LIKE '%' || ?1 || '%'", [card], |r| r.get(0)).expect("seq")
}

#[test]
fn verify_catches_every_kind_of_tampering_and_passes_an_untouched_ledger() {
    let cards = station::sim::make_cards(9, 7, &Default::default());
    let batch = run_batch(demo_profile(), 3, cards, 0.0);
    assert_eq!(batch.summary.passed(), 9);

    let clean = audit::verify(&batch.ledger, Some(&pinned())).expect("verify");
    assert!(clean.ok(), "{:?}", clean.problems);
    assert_eq!(clean.heads.len(), 1);
    assert_eq!(clean.heads[0].signature, "valid");
    assert_eq!(clean.rows_after_last_head, 0);

    let card = batch.export.cards.iter().find(|c| c.serial.is_some()).expect("a passed card").card_id.clone();

    // A cards row edited (the audit log untouched).
    let r = tampered(&batch.ledger, |c| {
        c.execute("UPDATE cards SET status = 'failed' WHERE card_id = ?1", [&card]).expect("update");
    });
    let p = first(&r);
    assert_eq!((p.table.as_str(), p.kind), ("cards", ProblemKind::Edited), "{p}");
    assert!(p.message.contains(&card) && p.message.contains("status is \"failed\""), "{p}");

    // An audit row's detail edited.
    let r = tampered(&batch.ledger, |c| {
        let n = c
            .execute("UPDATE audit SET detail = replace(detail, '\"attempt\":1', '\"attempt\":2') WHERE seq = 12", [])
            .expect("update");
        assert_eq!(n, 1);
    });
    let p = first(&r);
    assert_eq!((p.table.as_str(), p.seq, p.kind), ("audit", Some(12), ProblemKind::Edited), "{p}");

    // An audit row deleted in the middle.
    let r = tampered(&batch.ledger, |c| {
        c.execute("DELETE FROM audit WHERE seq = 40", []).expect("delete");
    });
    let p = first(&r);
    assert_eq!((p.seq, p.kind), (Some(40), ProblemKind::Deleted), "{p}");
    assert!(p.message.contains("seq 40 is missing"), "{p}");

    // Two rows' seqs swapped.
    let r = tampered(&batch.ledger, |c| {
        c.execute_batch(
            "UPDATE audit SET seq = -1 WHERE seq = 30; UPDATE audit SET seq = 30 WHERE seq = 35;
             UPDATE audit SET seq = 35 WHERE seq = -1;",
        )
        .expect("swap");
    });
    let p = first(&r);
    assert_eq!((p.seq, p.kind), (Some(30), ProblemKind::Reordered), "{p}");

    // The tail cut, head included.
    let head = clean.heads[0].seq;
    let r = tampered(&batch.ledger, |c| {
        c.execute("DELETE FROM audit WHERE seq > ?1", [head - 10]).expect("truncate");
    });
    let p = first(&r);
    assert_eq!((p.seq, p.kind), (Some(head - 9), ProblemKind::Truncated), "{p}");
    assert!(r.problems.iter().any(|p| p.message.contains("no head")), "{:?}", r.problems);

    // The careful attacker: a card's row and its last audit snapshot edited
    // together, the chain recomputed. Only the signed head shows it.
    let r = tampered(&batch.ledger, |c| {
        let seq = last_entry_of(c, &card);
        c.execute("UPDATE cards SET serial = 999 WHERE card_id = ?1", [&card]).expect("update");
        let serial = batch.export.cards.iter().find(|x| x.card_id == card).and_then(|x| x.serial).expect("serial");
        let n = c
            .execute(
                "UPDATE audit SET detail = replace(detail, ?2, '\"serial\":999') WHERE seq = ?1",
                rusqlite::params![seq, format!("\"serial\":{serial}")],
            )
            .expect("update");
        assert_eq!(n, 1);
        rechain(c, seq);
    });
    let p = first(&r);
    assert_eq!(p.kind, ProblemKind::Edited, "{p}");
    assert!(p.message.contains("the chain was rewritten"), "{p}");
    assert_eq!(r.problems.len(), 1, "tables and chain agree, only the head does not: {:?}", r.problems);

    // ... and then the head re-signed with the attacker's own key.
    let r = tampered(&batch.ledger, |c| {
        let seq = last_entry_of(c, &card);
        c.execute("UPDATE cards SET serial = 999 WHERE card_id = ?1", [&card]).expect("update");
        let serial = batch.export.cards.iter().find(|x| x.card_id == card).and_then(|x| x.serial).expect("serial");
        c.execute(
            "UPDATE audit SET detail = replace(detail, ?2, '\"serial\":999') WHERE seq = ?1",
            rusqlite::params![seq, format!("\"serial\":{serial}")],
        )
        .expect("update");
        rechain(c, seq);
        let head_row = rows(c, head).remove(0);
        let finish = rows(c, head - 1).remove(0);
        let mut d: serde_json::Value = serde_json::from_str(&head_row.detail).expect("json");
        let attacker = k256::ecdsa::SigningKey::from_slice(&[7u8; 32]).expect("key");
        let mut msg = b"tapline-audit-head-v1\0".to_vec();
        msg.extend_from_slice(&head_row.batch_id.expect("batch").to_be_bytes());
        msg.extend_from_slice(&finish.seq.to_be_bytes());
        msg.extend_from_slice(finish.hash.as_bytes());
        msg.extend_from_slice(d["counts"].to_string().as_bytes());
        let sig: k256::ecdsa::Signature = attacker.sign(&msg);
        d["head_hash"] = finish.hash.clone().into();
        d["signature"] = hex::encode_upper(sig.to_bytes()).into();
        d["public_key"] = hex::encode_upper(attacker.verifying_key().to_sec1_point(true)).into();
        c.execute("UPDATE audit SET detail = ?2 WHERE seq = ?1", rusqlite::params![head, d.to_string()]).expect("head");
        rechain(c, head);
    });
    let p = first(&r);
    assert_eq!((p.seq, p.kind), (Some(head), ProblemKind::BadSignature), "{p}");
    assert!(p.message.contains("not by the pinned key"), "{p}");

    // A signature that is simply wrong (the right key, bytes flipped).
    let r = tampered(&batch.ledger, |c| {
        let head_row = rows(c, head).remove(0);
        let mut d: serde_json::Value = serde_json::from_str(&head_row.detail).expect("json");
        let sig = d["signature"].as_str().expect("signed").to_string();
        let flipped = format!("{}{}", &sig[..10], if &sig[10..11] == "0" { "1" } else { "0" }) + &sig[11..];
        d["signature"] = flipped.into();
        c.execute("UPDATE audit SET detail = ?2 WHERE seq = ?1", rusqlite::params![head, d.to_string()]).expect("head");
        rechain(c, head);
    });
    let p = first(&r);
    assert_eq!((p.seq, p.kind), (Some(head), ProblemKind::BadSignature), "{p}");
    assert!(p.message.contains("does not verify"), "{p}");
}

#[test]
fn the_cli_exits_non_zero_naming_the_bad_row() {
    let cards = station::sim::make_cards(3, 3, &Default::default());
    let batch = run_batch(demo_profile(), 3, cards, 0.0);
    let bin = env!("CARGO_BIN_EXE_station");
    let key = repo().join("firmware/keys/DEMO-ONLY-audit.key.pub");
    let run = |ledger: &Path| {
        std::process::Command::new(bin)
            .args(["ledger", "verify", "--ledger"])
            .arg(ledger)
            .arg("--public-key")
            .arg(&key)
            .output()
            .expect("station runs")
    };
    let out = run(&batch.ledger);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("intact"));
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("t.db");
    std::fs::copy(&batch.ledger, &copy).expect("copy");
    Connection::open(&copy).expect("open").execute("DELETE FROM audit WHERE seq = 5", []).expect("delete");
    let out = run(&copy);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("audit: seq 5: deleted"), "{err}");
}
