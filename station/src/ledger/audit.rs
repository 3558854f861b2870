//! The audit log: an append-only, hash-chained record of every ledger
//! write, with a signed head per batch, and `verify`, which checks the
//! chain, the heads and that the state tables (batches, cards, bundles,
//! bundle members, steps) are exactly what the log says they became.
//!
//! Every write op appends its audit row in the same savepoint as its
//! change (writer thread, same transaction as the group commit), so a crash
//! leaves both or neither. Each row carries what the op changed: a new row
//! in full, a changed row as its key and the columns that changed (against
//! the row as it was just before the op, read in the same savepoint), and
//! the journal rows it added; replaying the log gives what every table must
//! hold.
//! The hash is SHA-256(prev_hash || canonical encoding of the row with its
//! seq); a plain hash chain only shows edits by someone who does not
//! recompute it, so `finish_batch` signs the head (k256 ECDSA) and verify
//! checks that signature against a pinned public key.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use k256::ecdsa::signature::{Signer, Verifier};
use k256::ecdsa::{Signature, SigningKey, VerifyingKey};
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::{LedgerError, Op, Reply, StepEvent};

/// The `prev_hash` of the first row.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Domain separation of the signed head message.
const HEAD_CONTEXT: &[u8] = b"tapline-audit-head-v1\0";

/// The station's audit signing key (k256; zeroized on drop by `SigningKey`).
/// `Debug` shows the public key only.
#[derive(Clone)]
pub struct AuditKey(SigningKey);

impl AuditKey {
    pub fn new(key: SigningKey) -> Self {
        Self(key)
    }

    /// Compressed SEC1 public key, hex.
    pub fn public_hex(&self) -> String {
        hex::encode_upper(self.0.verifying_key().to_sec1_point(true))
    }

    /// Reads a hex private key given as `env:NAME` or `file:PATH` (relative
    /// to `base`; lines starting with `#` are comments). Errors name the
    /// source, never the value.
    pub fn resolve(spec: &str, base: &Path) -> Result<Self, String> {
        use zeroize::Zeroizing;
        let s = spec.trim();
        let text: Zeroizing<String> = if let Some(name) = s.strip_prefix("env:") {
            Zeroizing::new(std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?)
        } else if let Some(file) = s.strip_prefix("file:") {
            let raw = Zeroizing::new(
                std::fs::read_to_string(base.join(file)).map_err(|e| format!("cannot read key file {file}: {e}"))?,
            );
            Zeroizing::new(raw.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join(""))
        } else {
            return Err("give the audit key as env:NAME or file:PATH".into());
        };
        let bytes = Zeroizing::new(hex::decode(text.trim()).map_err(|_| "not a hex private key".to_string())?);
        SigningKey::from_slice(&bytes).map(Self).map_err(|_| "not a secp256k1 private key".to_string())
    }
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuditKey(public {})", self.public_hex())
    }
}

fn put_str(h: &mut Sha256, s: &str) {
    h.update((s.len() as u64).to_be_bytes());
    h.update(s.as_bytes());
}

fn put_opt_str(h: &mut Sha256, s: Option<&str>) {
    match s {
        None => h.update([0u8]),
        Some(s) => {
            h.update([1u8]);
            put_str(h, s);
        }
    }
}

/// One audit row as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRow {
    pub seq: i64,
    pub batch_id: Option<i64>,
    pub at: String,
    pub kind: String,
    pub card_id: Option<String>,
    pub step: Option<String>,
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditRow {
    /// The hash this row's content gives (hex): SHA-256 over the previous
    /// hash (32 bytes, or the hex text when it is not hex) and every field,
    /// length-prefixed, with options tagged.
    pub fn compute_hash(&self) -> String {
        let mut h = Sha256::new();
        match hex::decode(&self.prev_hash) {
            Ok(b) if b.len() == 32 => h.update(&b),
            _ => put_str(&mut h, &self.prev_hash),
        }
        h.update(self.seq.to_be_bytes());
        match self.batch_id {
            None => h.update([0u8]),
            Some(b) => {
                h.update([1u8]);
                h.update(b.to_be_bytes());
            }
        }
        put_str(&mut h, &self.at);
        put_str(&mut h, &self.kind);
        put_opt_str(&mut h, self.card_id.as_deref());
        put_opt_str(&mut h, self.step.as_deref());
        put_str(&mut h, &self.detail);
        hex::encode(h.finalize())
    }
}

fn value_json(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => json!(i),
        ValueRef::Real(f) => json!(f),
        ValueRef::Text(t) => Value::String(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::String(hex::encode(b)),
    }
}

/// Every row `sql` selects, as JSON objects of column name to value. The
/// statement is cached: the writer runs the same few on every op.
fn rows_json(conn: &Connection, sql: &str, p: impl rusqlite::Params) -> rusqlite::Result<Vec<Value>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let names: Vec<String> = stmt.column_names().map(str::to_string).collect();
    let mut rows = stmt.query(p)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let mut m = Map::new();
        for (i, n) in names.iter().enumerate() {
            m.insert(n.clone(), value_json(r.get_ref(i)?));
        }
        out.push(Value::Object(m));
    }
    Ok(out)
}

fn bundle_row(conn: &Connection, id: &str) -> rusqlite::Result<Option<Value>> {
    let Some(mut row) = rows_json(conn, "SELECT * FROM bundles WHERE bundle_id = ?1", [id])?.pop() else {
        return Ok(None);
    };
    let members =
        rows_json(conn, "SELECT * FROM bundle_members WHERE bundle_id = ?1 ORDER BY position, card_id", [id])?;
    if let Value::Object(m) = &mut row {
        m.insert("members".into(), Value::Array(members));
    }
    Ok(Some(row))
}

/// The largest `steps.id` (the journal rows an op adds are those above it).
fn last_step_id(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT COALESCE(MAX(id), 0) FROM steps")?.query_row([], |r| r.get(0))
}

/// A row of a state table an op may change, by key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Batch(i64),
    Card(String),
    Bundle(String),
}

impl Key {
    fn table(&self) -> &'static str {
        match self {
            Self::Batch(_) => "batches",
            Self::Card(_) => "cards",
            Self::Bundle(_) => "bundles",
        }
    }

    fn column(&self) -> &'static str {
        match self {
            Self::Batch(_) => "id",
            Self::Card(_) => "card_id",
            Self::Bundle(_) => "bundle_id",
        }
    }
}

/// A row as read before an op: a batch or card row as its raw column
/// values (compared column by column afterwards, only the changed ones
/// turned into JSON), a bundle with its members as JSON.
enum Snapshot {
    Raw(Vec<SqlValue>),
    Json(Value),
}

const BATCH_ROW: &str = "SELECT * FROM batches WHERE id = ?1";
const CARD_ROW: &str = "SELECT * FROM cards WHERE card_id = ?1";

fn read_raw(conn: &Connection, key: &Key) -> rusqlite::Result<Option<Vec<SqlValue>>> {
    let (sql, p): (&str, &dyn rusqlite::ToSql) = match key {
        Key::Batch(id) => (BATCH_ROW, id),
        Key::Card(id) => (CARD_ROW, id),
        Key::Bundle(_) => return Ok(None),
    };
    let mut stmt = conn.prepare_cached(sql)?;
    let n = stmt.column_count();
    stmt.query_row([p], |r| (0..n).map(|i| r.get::<_, SqlValue>(i)).collect::<Result<Vec<_>, _>>()).optional()
}

fn snapshot(conn: &Connection, key: &Key) -> rusqlite::Result<Option<Snapshot>> {
    Ok(match key {
        Key::Bundle(id) => bundle_row(conn, id)?.map(Snapshot::Json),
        other => read_raw(conn, other)?.map(Snapshot::Raw),
    })
}

/// The rows an op may change, as they stood before it ran (None: not there
/// yet), and the journal's last id: what [`record`] diffs against.
pub(super) struct Before {
    steps: i64,
    rows: Vec<(Key, Option<Snapshot>)>,
}

/// Reads what `op` may change, just before it is applied (same savepoint).
pub(super) fn before(conn: &Connection, op: &Op) -> rusqlite::Result<Before> {
    let mut keys: Vec<Key> = Vec::new();
    match op {
        // A recovery is audited as its single changes (the writer expands it).
        Op::Many(_) | Op::StartBatch(_) | Op::Recover { .. } => {}
        Op::FinishBatch { batch, .. } => keys.push(Key::Batch(*batch)),
        // A journal line other than an intent only adds its steps row.
        Op::Step { event, .. } if *event != StepEvent::Intent => {}
        Op::BeginCard { card, .. }
        | Op::Step { card, .. }
        | Op::StepDone { card, .. }
        | Op::Pass { card, .. }
        | Op::Ready { card, .. }
        | Op::Fail { card, .. } => keys.push(Key::Card(card.to_hex())),
        // It adds the bundle and its members; the cards are not changed.
        Op::BundleStart { bundle, .. } => keys.push(Key::Bundle(bundle.clone())),
        Op::BundleSealed { bundle, .. } | Op::BundleAborted { bundle, .. } => {
            keys.push(Key::Bundle(bundle.clone()));
            let mut stmt =
                conn.prepare_cached("SELECT card_id FROM bundle_members WHERE bundle_id = ?1 ORDER BY position")?;
            let ids = stmt.query_map([bundle], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
            keys.extend(ids.into_iter().map(Key::Card));
        }
    }
    let mut rows = Vec::with_capacity(keys.len());
    for key in keys {
        let snap = snapshot(conn, &key)?;
        rows.push((key, snap));
    }
    Ok(Before { steps: last_step_id(conn)?, rows })
}

/// What became of one row since `before`: all of it when it is new, else
/// its key and the columns whose values changed (a bundle's `members`
/// count as one column); None when nothing changed or the row is not
/// there. Also the row's `batch_id`.
fn change(conn: &Connection, key: &Key, before: Option<&Snapshot>) -> rusqlite::Result<(Option<Value>, Option<i64>)> {
    let key_col = key.column();
    let changed = |name: &str, differs: bool| differs || name == key_col;
    if let Key::Bundle(id) = key {
        let Some(Value::Object(now)) = bundle_row(conn, id)? else { return Ok((None, None)) };
        let batch = now.get("batch_id").and_then(Value::as_i64);
        let old = match before {
            Some(Snapshot::Json(Value::Object(m))) => Some(m),
            _ => None,
        };
        let mut out = Map::new();
        for (k, v) in now {
            if changed(&k, old.is_none_or(|o| o.get(&k) != Some(&v))) {
                out.insert(k, v);
            }
        }
        return Ok(((out.len() > 1).then_some(Value::Object(out)), batch));
    }
    let (sql, p): (&str, &dyn rusqlite::ToSql) = match key {
        Key::Batch(id) => (BATCH_ROW, id),
        Key::Card(id) => (CARD_ROW, id),
        Key::Bundle(_) => unreachable!("handled above"),
    };
    let old = match before {
        Some(Snapshot::Raw(v)) => Some(v),
        _ => None,
    };
    let mut stmt = conn.prepare_cached(sql)?;
    let names: Vec<String> = stmt.column_names().map(str::to_string).collect();
    let found = stmt
        .query_row([p], |r| {
            let mut out = Map::new();
            let mut batch = None;
            for (i, name) in names.iter().enumerate() {
                let v = r.get_ref(i)?;
                if name == "batch_id" {
                    batch = v.as_i64_or_null().ok().flatten();
                }
                let differs = old.and_then(|o| o.get(i)).is_none_or(|o| ValueRef::from(o) != v);
                if changed(name, differs) {
                    out.insert(name.clone(), value_json(v));
                }
            }
            Ok((out, batch))
        })
        .optional()?;
    Ok(match found {
        Some((out, batch)) if out.len() > 1 => (Some(Value::Object(out)), batch),
        Some((_, batch)) => (None, batch),
        None => (None, None),
    })
}

fn last_row(conn: &Connection) -> rusqlite::Result<(i64, String)> {
    Ok(conn
        .prepare_cached("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?
        .unwrap_or((0, GENESIS.to_string())))
}

/// Appends one row to the chain; returns it.
fn append(
    conn: &Connection,
    batch_id: Option<i64>,
    at: &str,
    kind: &str,
    card_id: Option<&str>,
    step: Option<&str>,
    detail: &Value,
) -> rusqlite::Result<AuditRow> {
    let (last, prev_hash) = last_row(conn)?;
    let mut row = AuditRow {
        seq: last + 1,
        batch_id,
        at: at.to_string(),
        kind: kind.to_string(),
        card_id: card_id.map(str::to_string),
        step: step.map(str::to_string),
        detail: detail.to_string(),
        prev_hash,
        hash: String::new(),
    };
    row.hash = row.compute_hash();
    conn.prepare_cached(
        "INSERT INTO audit (seq, batch_id, at, kind, card_id, step, detail, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        row.seq,
        row.batch_id,
        row.at,
        row.kind,
        row.card_id,
        row.step,
        row.detail,
        row.prev_hash,
        row.hash
    ])?;
    Ok(row)
}

/// Appends the audit row(s) of an op that has just been applied, given what
/// its rows were before ([`before`]). The detail holds the op's own fields
/// (`op`), each row it changed (`batches`, `cards`, `bundles`: a new row in
/// full, a changed one as its key and the changed columns) and the journal
/// rows it added (`steps`, in full); replaying the log row by row gives the
/// tables.
pub(super) fn record(conn: &Connection, op: &Op, reply: &Reply, at: &str, before: &Before) -> rusqlite::Result<()> {
    let (kind, card, step, op_detail): (&str, Option<&card::CardId>, Option<&str>, Value) = match op {
        // The writer records each part of a `Many` on its own.
        Op::Many(_) | Op::Recover { .. } => return Ok(()),
        Op::StartBatch(b) => ("batch_start", None, None, json!({ "name": b.name })),
        Op::FinishBatch { .. } => ("batch_finish", None, None, json!({})),
        Op::BeginCard { card, reader, batch, .. } => {
            ("card_begin", Some(card), None, json!({ "reader": reader, "batch": batch }))
        }
        Op::Step { card, attempt, step, event, detail, reader } => {
            let kind = match event {
                StepEvent::Intent => "step_intent",
                StepEvent::Done => "step_done",
                StepEvent::Failed => "step_failed",
                StepEvent::Refused => "step_refused",
            };
            (kind, Some(card), Some(step.as_str()), json!({ "attempt": attempt, "detail": detail, "reader": reader }))
        }
        Op::StepDone { card, attempt, step, detail, .. } => {
            ("step_done", Some(card), Some(step.as_str()), json!({ "attempt": attempt, "detail": detail }))
        }
        Op::Pass { card, attempt, stage } => {
            let serial = match reply {
                Reply::Id(s) => Some(*s),
                _ => None,
            };
            ("card_pass", Some(card), Some("record"), json!({ "attempt": attempt, "stage": stage, "serial": serial }))
        }
        Op::Ready { card, attempt } => ("card_ready", Some(card), Some("record"), json!({ "attempt": attempt })),
        Op::Fail { card, attempt, step, reason, retryable, .. } => (
            "card_fail",
            Some(card),
            Some(step.as_str()),
            json!({ "attempt": attempt, "reason": reason, "retryable": retryable }),
        ),
        Op::BundleStart { bundle, .. } => ("bundle_start", None, None, json!({ "bundle": bundle })),
        Op::BundleSealed { bundle, .. } => ("bundle_sealed", None, None, json!({ "bundle": bundle })),
        Op::BundleAborted { bundle, .. } => ("bundle_aborted", None, None, json!({ "bundle": bundle })),
    };
    // A new batch is read by the id it was given.
    let new_batch = match (op, reply) {
        (Op::StartBatch(_), Reply::Id(id)) => Some((Key::Batch(*id), None)),
        _ => None,
    };
    let mut detail = Map::new();
    detail.insert("op".into(), op_detail);
    let mut batch_id = None;
    for (key, old) in before.rows.iter().chain(new_batch.iter()) {
        let (c, batch) = change(conn, key, old.as_ref())?;
        if batch_id.is_none() {
            batch_id = match key {
                Key::Batch(id) => Some(*id),
                _ => batch,
            };
        }
        if let Some(c) = c
            && let Value::Array(list) = detail.entry(key.table()).or_insert_with(|| Value::Array(Vec::new()))
        {
            list.push(c);
        }
    }
    let steps = rows_json(conn, "SELECT * FROM steps WHERE id > ?1 ORDER BY id", [before.steps])?;
    if !steps.is_empty() {
        detail.insert("steps".into(), Value::Array(steps));
    }
    let card_hex = card.map(card::CardId::to_hex);
    let detail = Value::Object(detail);
    let row = append(conn, batch_id, at, kind, card_hex.as_deref(), step, &detail)?;
    if let Op::FinishBatch { batch, key } = op {
        let counts = batch_counts(conn, *batch, row.seq)?;
        let message = head_message(*batch, row.seq, &row.hash, &counts);
        let (public_key, signature) = match key {
            Some(k) => {
                let sig: Signature = k.0.sign(&message);
                (Value::String(k.public_hex()), Value::String(hex::encode_upper(sig.to_bytes())))
            }
            None => (Value::Null, Value::Null),
        };
        let detail = json!({
            "head_seq": row.seq,
            "head_hash": row.hash,
            "counts": counts,
            "public_key": public_key,
            "signature": signature,
        });
        append(conn, Some(*batch), at, "head", None, None, &detail)?;
    }
    Ok(())
}

fn batch_counts(conn: &Connection, batch: i64, seq: i64) -> rusqlite::Result<Value> {
    let count = |sql: &str| conn.query_row(sql, [batch], |r| r.get::<_, i64>(0));
    Ok(json!({
        "cards_passed": count("SELECT COUNT(*) FROM cards WHERE batch_id = ?1 AND status = 'passed'")?,
        "cards_failed": count("SELECT COUNT(*) FROM cards WHERE batch_id = ?1 AND status = 'failed'")?,
        "cards_in_progress": count("SELECT COUNT(*) FROM cards WHERE batch_id = ?1 AND status = 'in_progress'")?,
        "bundles_sealed": count("SELECT COUNT(*) FROM bundles WHERE batch_id = ?1 AND status = 'sealed'")?,
        "audit_rows": seq,
    }))
}

/// The bytes a batch head's signature covers.
fn head_message(batch: i64, seq: i64, hash: &str, counts: &Value) -> Vec<u8> {
    let mut m = HEAD_CONTEXT.to_vec();
    m.extend_from_slice(&batch.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash.as_bytes());
    m.extend_from_slice(counts.to_string().as_bytes());
    m
}

/// Run by the migration that adds the audit table to a ledger that already
/// has history: one `adopted` row holding a snapshot of every existing row.
/// That history is taken as it stood when the station adopted it; the chain
/// proves nothing about it before then.
pub(super) fn adopt(conn: &Connection, from_version: usize, at: &str) -> rusqlite::Result<()> {
    let batches = rows_json(conn, "SELECT * FROM batches ORDER BY id", [])?;
    let cards = rows_json(conn, "SELECT * FROM cards ORDER BY card_id", [])?;
    if batches.is_empty() && cards.is_empty() {
        return Ok(());
    }
    let mut bundles = Vec::new();
    for id in rows_json(conn, "SELECT bundle_id FROM bundles ORDER BY bundle_id", [])? {
        if let Some(id) = id.get("bundle_id").and_then(Value::as_str) {
            bundles.extend(bundle_row(conn, id)?);
        }
    }
    let steps = rows_json(conn, "SELECT * FROM steps ORDER BY id", [])?;
    let detail = json!({
        "op": { "from_schema_version": from_version },
        "batches": batches, "cards": cards, "bundles": bundles, "steps": steps,
    });
    append(conn, None, at, "adopted", None, None, &detail).map(|_| ())
}

// ---- verify ------------------------------------------------------------

/// What is wrong with a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    Edited,
    Deleted,
    Reordered,
    Truncated,
    Inserted,
    BadSignature,
}

impl ProblemKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Edited => "edited",
            Self::Deleted => "deleted",
            Self::Reordered => "reordered",
            Self::Truncated => "truncated",
            Self::Inserted => "inserted",
            Self::BadSignature => "bad signature",
        }
    }
}

/// One finding of `verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The audit row concerned, when there is one.
    pub seq: Option<i64>,
    pub table: String,
    pub kind: ProblemKind,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.seq {
            Some(s) => write!(f, "{}: seq {s}: {}: {}", self.table, self.kind.as_str(), self.message),
            None => write!(f, "{}: {}: {}", self.table, self.kind.as_str(), self.message),
        }
    }
}

/// One batch head as found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeadReport {
    pub batch_id: Option<i64>,
    pub seq: i64,
    pub head_seq: i64,
    /// "valid", "unsigned", "bad", or "valid (key not pinned)".
    pub signature: String,
    pub public_key: Option<String>,
}

/// The result of `verify`: `problems` empty means intact; `warnings` are
/// things to know (unsigned heads, an unpinned key, adopted history).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub ledger: String,
    pub audit_rows: i64,
    pub heads: Vec<HeadReport>,
    pub rows_after_last_head: i64,
    pub problems: Vec<Problem>,
    pub warnings: Vec<String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

fn problem(seq: Option<i64>, table: &str, kind: ProblemKind, message: impl Into<String>) -> Problem {
    Problem { seq, table: table.to_string(), kind, message: message.into() }
}

/// State as the log says it is: every row as its logged changes left it,
/// with the seq of the last change.
#[derive(Default)]
struct Replay {
    batches: Logged,
    cards: Logged,
    bundles: Logged,
    steps: Logged,
}

/// Key -> (seq of the last change, the row it gives).
type Logged = BTreeMap<String, (i64, Value)>;

impl Replay {
    fn apply(&mut self, seq: i64, detail: &Value) {
        let tables: [(&str, &str, &mut Logged); 4] = [
            ("batches", "id", &mut self.batches),
            ("cards", "card_id", &mut self.cards),
            ("bundles", "bundle_id", &mut self.bundles),
            ("steps", "id", &mut self.steps),
        ];
        for (table, key, map) in tables {
            for row in detail.get(table).and_then(Value::as_array).into_iter().flatten() {
                // A row is logged in full when new and as its changed
                // columns after that: laid over what the log held before.
                if let (Some(k), Some(cols)) = (row.get(key), row.as_object()) {
                    let entry = map.entry(key_text(k)).or_insert_with(|| (seq, Value::Object(Map::new())));
                    entry.0 = seq;
                    if let Value::Object(state) = &mut entry.1 {
                        for (c, v) in cols {
                            state.insert(c.clone(), v.clone());
                        }
                    }
                }
            }
        }
    }
}

fn key_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn describe_difference(now: &Value, then: &Value) -> String {
    let (Some(n), Some(t)) = (now.as_object(), then.as_object()) else { return "row differs".into() };
    let mut cols: Vec<String> = Vec::new();
    for (k, tv) in t {
        let nv = n.get(k).unwrap_or(&Value::Null);
        if nv != tv {
            cols.push(format!("{k} is {nv}, the log says {tv}"));
        }
    }
    for k in n.keys().filter(|k| !t.contains_key(*k)) {
        cols.push(format!("column {k} not in the log"));
    }
    if cols.is_empty() { "row differs".into() } else { cols.join("; ") }
}

/// Checks the audit chain, every batch head (against `pinned` when given)
/// and that the state tables are what the log replays to. Read-only.
pub fn verify(path: &Path, pinned: Option<&VerifyingKey>) -> Result<VerifyReport, LedgerError> {
    let conn = super::export::open_read(path)?;
    let sql = |source| LedgerError::Sqlite { path: path.to_path_buf(), source };
    let has_audit: bool = conn
        .query_row("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'audit'", [], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(sql)?
        > 0;
    if !has_audit {
        return Err(LedgerError::Refused {
            path: path.to_path_buf(),
            detail: "this ledger has no audit log (schema before version 3): open it once with this station to \
                     migrate"
                .into(),
        });
    }
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let rows: Vec<AuditRow> = conn
        .prepare("SELECT seq, batch_id, at, kind, card_id, step, detail, prev_hash, hash FROM audit ORDER BY seq")
        .map_err(sql)?
        .query_map([], |r| {
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
        .map_err(sql)?
        .collect::<Result<_, _>>()
        .map_err(sql)?;
    let by_hash: HashMap<&str, i64> = rows.iter().map(|r| (r.hash.as_str(), r.seq)).collect();

    // 1. The chain.
    let mut prev: Option<&AuditRow> = None;
    for row in &rows {
        let expected_seq = prev.map_or(1, |p| p.seq + 1);
        let expected_prev = prev.map_or(GENESIS, |p| p.hash.as_str());
        let content_ok = row.compute_hash() == row.hash;
        let linked = row.prev_hash == expected_prev;
        if row.seq != expected_seq && row.seq > expected_seq {
            let range = if row.seq - 1 == expected_seq {
                format!("seq {expected_seq} is missing")
            } else {
                format!("seqs {expected_seq}..{} are missing", row.seq - 1)
            };
            problems.push(problem(Some(expected_seq), "audit", ProblemKind::Deleted, range));
        } else if !content_ok || !linked {
            let elsewhere = by_hash.get(row.prev_hash.as_str()).copied().filter(|s| Some(*s) != prev.map(|p| p.seq));
            if let Some(s) = elsewhere {
                problems.push(problem(
                    Some(row.seq),
                    "audit",
                    ProblemKind::Reordered,
                    format!("this {} row was chained after seq {s}, not after seq {}", row.kind, row.seq - 1),
                ));
            } else if !content_ok {
                problems.push(problem(
                    Some(row.seq),
                    "audit",
                    ProblemKind::Edited,
                    format!("the {} row's content does not give its hash", row.kind),
                ));
            } else {
                problems.push(problem(
                    Some(row.seq),
                    "audit",
                    ProblemKind::Edited,
                    format!("the {} row's prev_hash is not the hash of seq {}", row.kind, row.seq - 1),
                ));
            }
        }
        prev = Some(row);
    }
    let last_seq = rows.last().map_or(0, |r| r.seq);
    let issued: Option<i64> = conn
        .query_row("SELECT seq FROM sqlite_sequence WHERE name = 'audit'", [], |r| r.get(0))
        .optional()
        .map_err(sql)?;
    if let Some(issued) = issued
        && issued > last_seq
    {
        problems.push(problem(
            Some(last_seq + 1),
            "audit",
            ProblemKind::Truncated,
            format!("the log ends at seq {last_seq} but the ledger issued seqs up to {issued}"),
        ));
    }

    // 2. The heads.
    let mut heads = Vec::new();
    let mut last_head_seq = 0;
    let hash_at: HashMap<i64, &str> = rows.iter().map(|r| (r.seq, r.hash.as_str())).collect();
    for row in rows.iter().filter(|r| r.kind == "head") {
        last_head_seq = row.seq;
        let d: Value = serde_json::from_str(&row.detail).unwrap_or(Value::Null);
        let head_seq = d.get("head_seq").and_then(Value::as_i64).unwrap_or(0);
        let head_hash = d.get("head_hash").and_then(Value::as_str).unwrap_or("");
        let counts = d.get("counts").cloned().unwrap_or(Value::Null);
        let public_key = d.get("public_key").and_then(Value::as_str).map(str::to_string);
        let signature = d.get("signature").and_then(Value::as_str);
        if hash_at.get(&head_seq).copied() != Some(head_hash) {
            problems.push(problem(
                Some(head_seq),
                "audit",
                ProblemKind::Edited,
                format!(
                    "batch {} head (seq {}) covers hash {} at seq {head_seq}, the log has {}: the chain was rewritten",
                    row.batch_id.map_or("?".into(), |b| b.to_string()),
                    row.seq,
                    short(head_hash),
                    short(hash_at.get(&head_seq).copied().unwrap_or("nothing"))
                ),
            ));
        }
        let verdict = match (&public_key, signature) {
            (None, None) => {
                warnings.push(format!(
                    "batch {} head (seq {}) is unsigned (no audit_key configured): the chain shows edits only to \
                     someone who does not recompute it",
                    row.batch_id.map_or("?".into(), |b| b.to_string()),
                    row.seq
                ));
                "unsigned".to_string()
            }
            (Some(pk), Some(sig)) => {
                let message = head_message(row.batch_id.unwrap_or(0), head_seq, head_hash, &counts);
                let key = hex::decode(pk).ok().and_then(|b| VerifyingKey::from_sec1_bytes(&b).ok());
                let sig = hex::decode(sig).ok().and_then(|b| Signature::from_slice(&b).ok());
                let good = matches!((&key, &sig), (Some(k), Some(s)) if k.verify(&message, s).is_ok());
                let pinned_ok = match (pinned, &key) {
                    (Some(p), Some(k)) => p == k,
                    (Some(_), None) => false,
                    (None, _) => true,
                };
                if !good {
                    problems.push(problem(
                        Some(row.seq),
                        "audit",
                        ProblemKind::BadSignature,
                        format!(
                            "batch {} head signature does not verify",
                            row.batch_id.map_or("?".into(), |b| b.to_string())
                        ),
                    ));
                    "bad".to_string()
                } else if !pinned_ok {
                    problems.push(problem(
                        Some(row.seq),
                        "audit",
                        ProblemKind::BadSignature,
                        format!(
                            "batch {} head is signed by {}, not by the pinned key",
                            row.batch_id.map_or("?".into(), |b| b.to_string()),
                            short(pk)
                        ),
                    ));
                    "bad".to_string()
                } else if pinned.is_none() {
                    "valid (key not pinned)".to_string()
                } else {
                    "valid".to_string()
                }
            }
            _ => {
                problems.push(problem(
                    Some(row.seq),
                    "audit",
                    ProblemKind::BadSignature,
                    "head has a public key or a signature but not both",
                ));
                "bad".to_string()
            }
        };
        heads.push(HeadReport { batch_id: row.batch_id, seq: row.seq, head_seq, signature: verdict, public_key });
    }
    if pinned.is_none() && heads.iter().any(|h| h.public_key.is_some()) {
        warnings.push(
            "no --public-key given: head signatures were checked against the key written in the ledger itself, \
             which someone rewriting the ledger could replace"
                .into(),
        );
    }
    for row in rows.iter().filter(|r| r.kind == "adopted") {
        warnings.push(format!(
            "seq {}: history from before the audit log (schema {}) was adopted as it stood at {}; nothing before \
             that is proven",
            row.seq,
            serde_json::from_str::<Value>(&row.detail)
                .ok()
                .and_then(|d| d.pointer("/op/from_schema_version").cloned())
                .unwrap_or(Value::Null),
            row.at
        ));
    }

    // 3. Every finished batch has a head.
    let finished: Vec<(i64, Option<String>)> = conn
        .prepare("SELECT id, finished_at FROM batches ORDER BY id")
        .map_err(sql)?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(sql)?
        .collect::<Result<_, _>>()
        .map_err(sql)?;
    // Batches adopted from before the audit log have no head of their own.
    let adopted: std::collections::HashSet<i64> = rows
        .iter()
        .filter(|r| r.kind == "adopted")
        .filter_map(|r| serde_json::from_str::<Value>(&r.detail).ok())
        .flat_map(|d| d.get("batches").and_then(Value::as_array).cloned().unwrap_or_default())
        .filter_map(|b| b.get("id").and_then(Value::as_i64))
        .collect();
    for (id, at) in &finished {
        if at.is_some() && !adopted.contains(id) && !heads.iter().any(|h| h.batch_id == Some(*id)) {
            problems.push(problem(
                None,
                "audit",
                ProblemKind::Truncated,
                format!("batch {id} is finished but the log has no head for it"),
            ));
        }
    }

    // 4. The state tables against the replayed log.
    let mut replay = Replay::default();
    for row in &rows {
        if let Ok(d) = serde_json::from_str::<Value>(&row.detail) {
            replay.apply(row.seq, &d);
        }
    }
    let read = |sql_text: &str| rows_json(&conn, sql_text, []).map_err(sql);
    let mut bundles_now = read("SELECT * FROM bundles ORDER BY bundle_id")?;
    for b in &mut bundles_now {
        let id = b.get("bundle_id").map(key_text).unwrap_or_default();
        let members =
            rows_json(&conn, "SELECT * FROM bundle_members WHERE bundle_id = ?1 ORDER BY position, card_id", [&id])
                .map_err(sql)?;
        if let Value::Object(m) = b {
            m.insert("members".into(), Value::Array(members));
        }
    }
    let tables = [
        ("batches", "id", read("SELECT * FROM batches ORDER BY id")?, &replay.batches),
        ("cards", "card_id", read("SELECT * FROM cards ORDER BY card_id")?, &replay.cards),
        ("bundles", "bundle_id", bundles_now, &replay.bundles),
        ("steps", "id", read("SELECT * FROM steps ORDER BY id")?, &replay.steps),
    ];
    for (table, key, now, logged) in tables {
        let mut seen = std::collections::HashSet::new();
        for row in &now {
            let k = row.get(key).map(key_text).unwrap_or_default();
            seen.insert(k.clone());
            match logged.get(&k) {
                None => problems.push(problem(
                    None,
                    table,
                    ProblemKind::Inserted,
                    format!("{key} {k} is not in the audit log (written outside the station)"),
                )),
                Some((seq, then)) if then != row => problems.push(problem(
                    Some(*seq),
                    table,
                    ProblemKind::Edited,
                    format!("{key} {k} differs from its last audit entry: {}", describe_difference(row, then)),
                )),
                Some(_) => {}
            }
        }
        for (k, (seq, _)) in logged {
            if !seen.contains(k) {
                problems.push(problem(
                    Some(*seq),
                    table,
                    ProblemKind::Deleted,
                    format!("{key} {k} is in the audit log but not in the table"),
                ));
            }
        }
    }
    // Chain problems first (in seq order), then the tables.
    problems.sort_by_key(|p| (p.table != "audit", p.seq.unwrap_or(i64::MAX)));
    Ok(VerifyReport {
        ledger: path.display().to_string(),
        audit_rows: rows.len() as i64,
        heads,
        rows_after_last_head: rows.iter().filter(|r| r.seq > last_head_seq).count() as i64,
        problems,
        warnings,
    })
}

fn short(h: &str) -> String {
    if h.len() > 16 { format!("{}…", &h[..16]) } else { h.to_string() }
}

/// Parses `--public-key`: hex (SEC1) or a file holding it.
pub fn parse_public_key(spec: &str) -> Result<VerifyingKey, String> {
    let text = match std::fs::read_to_string(spec) {
        Ok(t) => t.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<String>(),
        Err(_) => spec.to_string(),
    };
    hex::decode(text.trim())
        .ok()
        .and_then(|b| VerifyingKey::from_sec1_bytes(&b).ok())
        .ok_or_else(|| format!("{spec:?}: not a secp256k1 public key in hex, nor a file holding one"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{BatchInfo, Ledger};

    #[test]
    fn a_row_is_logged_in_full_once_then_as_its_changed_columns_and_replays_to_the_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("l.db");
        let (l, w) = Ledger::open(&path).expect("open");
        let b = l
            .start_batch(BatchInfo {
                name: "b".into(),
                profile: "p".into(),
                product: "x".into(),
                firmware: "f".into(),
                firmware_sha256: "00".into(),
            })
            .expect("batch");
        let c = card::CardId([3; 10]);
        l.begin_card(c, "r", b, "3B8F80", "CPLC-TEXT").expect("begin");
        l.step(c, 1, "identify", StepEvent::Intent, "", "r").expect("intent");
        l.step(c, 1, "identify", StepEvent::Done, "ok", "r").expect("done");
        drop(l);
        w.close();
        let conn = Connection::open(&path).expect("conn");
        let rows: Vec<(String, Value)> = conn
            .prepare("SELECT kind, detail FROM audit ORDER BY seq")
            .expect("prepare")
            .query_map([], |r| Ok((r.get(0)?, serde_json::from_str(&r.get::<_, String>(1)?).unwrap_or(Value::Null))))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        let kinds: Vec<&str> = rows.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(kinds, ["batch_start", "card_begin", "step_intent", "step_done"]);
        // The new card row in full, every column.
        let begun = &rows[1].1["cards"][0];
        assert_eq!(begun["cplc"], "CPLC-TEXT");
        let columns: usize = conn
            .query_row("SELECT COUNT(*) FROM pragma_table_info('cards')", [], |r| r.get::<_, i64>(0))
            .expect("columns") as usize;
        assert_eq!(begun.as_object().map(Map::len), Some(columns), "{begun}");
        // The intent changed the card's current step: only that (and the
        // time, when it moved) with the key.
        let intent = rows[2].1["cards"][0].as_object().expect("a card change");
        assert_eq!(intent.get("card_id"), Some(&json!(c.to_hex())));
        assert_eq!(intent.get("current_step"), Some(&json!("identify")));
        assert!(intent.keys().all(|k| ["card_id", "current_step", "updated_at"].contains(&k.as_str())), "{intent:?}");
        assert_eq!(rows[2].1["steps"][0]["event"], "intent");
        // A done line changes no card: only its journal row is logged.
        assert!(rows[3].1.get("cards").is_none(), "{}", rows[3].1);
        assert_eq!(rows[3].1["steps"][0]["detail"], "ok");
        // Replaying the changes gives the tables.
        let report = verify(&path, None).expect("verify");
        assert!(report.ok(), "{:?}", report.problems);
        // And a column edited in the table is named against the replay.
        conn.execute("UPDATE cards SET current_step = 'firmware'", []).expect("tamper");
        let report = verify(&path, None).expect("verify");
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert_eq!(report.problems[0].seq, Some(3), "{}", report.problems[0]);
        assert!(report.problems[0].message.contains("current_step is \"firmware\""), "{}", report.problems[0]);
    }
}
