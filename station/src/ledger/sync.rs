//! Copying between the backends.
//!
//! - `sync`: a station's SQLite ledger into PostgreSQL (`station ledger
//!   sync`), idempotent: a second run finds everything there and adds
//!   nothing.
//! - `snapshot`: the PostgreSQL ledger into a temporary SQLite file with the
//!   same schema, so export and reports read both backends with one code
//!   path (`LedgerTarget::readable`).

use std::collections::HashMap;
use std::path::Path;

use postgres::types::ToSql;
use rusqlite::types::Value as SqlValue;

use super::{LedgerError, ReadCopy, pg};

/// The tables copied, parents first.
const TABLES: &[&str] = &["batches", "cards", "steps", "bundles", "bundle_members"];

/// One column value: both schemas use only integers and text.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Null,
    Int(i64),
    Text(String),
}

impl Cell {
    fn from_sqlite(v: SqlValue) -> Self {
        match v {
            SqlValue::Null => Self::Null,
            SqlValue::Integer(i) => Self::Int(i),
            SqlValue::Real(f) => Self::Text(f.to_string()),
            SqlValue::Text(t) => Self::Text(t),
            SqlValue::Blob(b) => Self::Text(hex::encode(b)),
        }
    }

    fn to_sqlite(&self) -> SqlValue {
        match self {
            Self::Null => SqlValue::Null,
            Self::Int(i) => SqlValue::Integer(*i),
            Self::Text(t) => SqlValue::Text(t.clone()),
        }
    }

    fn int(&self) -> Option<i64> {
        match self {
            Self::Int(i) => Some(*i),
            _ => None,
        }
    }

    fn text(&self) -> Option<&str> {
        match self {
            Self::Text(t) => Some(t),
            _ => None,
        }
    }
}

fn columns(conn: &rusqlite::Connection, table: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})"))?;
    stmt.query_map([], |r| r.get::<_, String>(1))?.collect()
}

fn pg_err(url: &str) -> impl Fn(postgres::Error) -> LedgerError + '_ {
    move |e| LedgerError::Postgres { target: super::target::redact(url), detail: pg::describe(&e) }
}

/// Copies the whole PostgreSQL ledger into a new temporary SQLite file.
pub fn snapshot(url: &str) -> Result<ReadCopy, LedgerError> {
    let mut client = pg::open_client(url)?;
    let perr = pg_err(url);
    let mut name = [0u8; 8];
    let _ = getrandom::fill(&mut name);
    let path = std::env::temp_dir().join(format!("tapline-pg-snapshot-{}.db", hex::encode(name)));
    let copy = ReadCopy::temporary(path.clone());
    let sql = |source| LedgerError::Sqlite { path: path.clone(), source };
    let mut conn = super::open_connection(&path)?;
    super::schema::migrate(&mut conn, &super::now())
        .map_err(sql)?
        .map_err(|detail| LedgerError::Refused { path: path.clone(), detail })?;
    // One repeatable-read transaction: every table as of one moment.
    let mut ptx = client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(&perr)?;
    let tx = conn.transaction().map_err(sql)?;
    for table in TABLES {
        let cols = columns(&tx, table).map_err(sql)?;
        let list = cols.join(", ");
        let rows = ptx.query(&format!("SELECT {list} FROM {table}"), &[]).map_err(&perr)?;
        let marks: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
        let mut ins =
            tx.prepare(&format!("INSERT INTO {table} ({list}) VALUES ({})", marks.join(", "))).map_err(sql)?;
        for row in &rows {
            let values: Vec<SqlValue> = (0..cols.len()).map(|i| pg_cell(row, i).to_sqlite()).collect();
            ins.execute(rusqlite::params_from_iter(values)).map_err(sql)?;
        }
    }
    tx.commit().map_err(sql)?;
    ptx.commit().map_err(&perr)?;
    Ok(copy)
}

fn pg_cell(row: &postgres::Row, i: usize) -> Cell {
    use postgres::types::Type;
    let ty = row.columns()[i].type_();
    if *ty == Type::INT8 || *ty == Type::INT4 {
        match row.get::<_, Option<i64>>(i) {
            Some(v) => Cell::Int(v),
            None => Cell::Null,
        }
    } else {
        match row.get::<_, Option<String>>(i) {
            Some(v) => Cell::Text(v),
            None => Cell::Null,
        }
    }
}

/// What `sync` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncReport {
    pub batches_added: usize,
    pub cards_added: usize,
    /// Cards the database already had (from an earlier sync, or recorded by
    /// another station): left as they are there.
    pub cards_present: usize,
    pub steps_added: usize,
    pub bundles_added: usize,
    /// Cards not copied because their serial belongs to another card there.
    pub conflicts: Vec<String>,
}

fn sqlite_rows(conn: &rusqlite::Connection, table: &str, order: &str) -> rusqlite::Result<Vec<HashMap<String, Cell>>> {
    let cols = columns(conn, table)?;
    let mut stmt = conn.prepare(&format!("SELECT {} FROM {table} ORDER BY {order}", cols.join(", ")))?;
    stmt.query_map([], |r| {
        let mut m = HashMap::new();
        for (i, c) in cols.iter().enumerate() {
            m.insert(c.clone(), Cell::from_sqlite(r.get::<_, SqlValue>(i)?));
        }
        Ok(m)
    })?
    .collect()
}

/// Integer columns (BIGINT on PostgreSQL); every other column is text.
const INT_COLUMNS: &[&str] = &[
    "id",
    "batch_id",
    "attempts",
    "retryable",
    "gp_key_version",
    "attest_counter",
    "attested",
    "self_tests",
    "serial",
    "size",
    "position",
    "sealed",
    "attempt",
    "bundle_no",
];

/// The PostgreSQL parameter for a cell of `column`, typed by the column.
fn param(column: &str, c: &Cell) -> Box<dyn ToSql + Sync> {
    if INT_COLUMNS.contains(&column) {
        Box::new(c.int())
    } else {
        Box::new(match c {
            Cell::Null => None,
            Cell::Int(i) => Some(i.to_string()),
            Cell::Text(t) => Some(t.clone()),
        })
    }
}

/// Inserts `row` (only the columns in `cols`) into `table`; `ON CONFLICT
/// DO NOTHING` when `key` is given. Returns rows inserted.
fn insert(
    tx: &mut postgres::Transaction<'_>,
    table: &str,
    row: &HashMap<String, Cell>,
    cols: &[&str],
    key: Option<&str>,
) -> Result<u64, postgres::Error> {
    let marks: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
    let boxed: Vec<Box<dyn ToSql + Sync>> = cols.iter().map(|c| param(c, row.get(*c).unwrap_or(&Cell::Null))).collect();
    let refs: Vec<&(dyn ToSql + Sync)> = boxed.iter().map(|b| b.as_ref()).collect();
    let conflict = key.map(|k| format!(" ON CONFLICT ({k}) DO NOTHING")).unwrap_or_default();
    let sql = format!("INSERT INTO {table} ({}) VALUES ({}){conflict}", cols.join(", "), marks.join(", "));
    tx.execute(&sql, &refs)
}

/// Copies the SQLite ledger at `from` into PostgreSQL at `url`, in one
/// transaction. Rows get `station` where they have no station id (a ledger
/// from before station ids). Batch ids are the database's (mapped);
/// serials are kept (they are on labels): a card whose serial another card
/// already has there is reported, not copied. Bundle numbers are allocated
/// there. A card already there is left alone with its journal.
pub fn sync(from: &Path, url: &str, station: &str) -> Result<SyncReport, LedgerError> {
    let conn = super::export::open_read(from)?;
    let sql = |source| LedgerError::Sqlite { path: from.to_path_buf(), source };
    let version: i64 =
        conn.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_version", [], |r| r.get(0)).map_err(sql)?;
    if version as usize != super::SCHEMA_VERSION {
        return Err(LedgerError::Refused {
            path: from.to_path_buf(),
            detail: format!(
                "schema version {version}, this station's is {}: open it once with this station (it migrates) and sync again",
                super::SCHEMA_VERSION
            ),
        });
    }
    let mut client = pg::open_client(url)?;
    let perr = pg_err(url);
    let mut report = SyncReport::default();
    let mut tx = client.transaction().map_err(&perr)?;
    // One sync at a time per database.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&0x7461_706C_696E_6502_i64]).map_err(&perr)?;
    let with_station = |mut row: HashMap<String, Cell>| {
        if matches!(row.get("station_id"), None | Some(Cell::Null)) {
            row.insert("station_id".into(), Cell::Text(station.to_string()));
        }
        row
    };
    // Batches: matched by station, name and start time.
    let mut batch_ids: HashMap<i64, i64> = HashMap::new();
    for b in sqlite_rows(&conn, "batches", "id").map_err(sql)? {
        let b = with_station(b);
        let found = tx
            .query_opt(
                "SELECT id FROM batches WHERE station_id = $1 AND name = $2 AND started_at = $3",
                &[&b["station_id"].text(), &b["name"].text(), &b["started_at"].text()],
            )
            .map_err(&perr)?;
        let id = match found {
            Some(r) => r.get::<_, i64>(0),
            None => {
                report.batches_added += 1;
                tx.query_one(
                    "INSERT INTO batches (name, profile, product, firmware, firmware_sha256, started_at, finished_at, station_id)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                    &[
                        &b["name"].text(),
                        &b["profile"].text(),
                        &b["product"].text(),
                        &b["firmware"].text(),
                        &b["firmware_sha256"].text(),
                        &b["started_at"].text(),
                        &b["finished_at"].text(),
                        &b["station_id"].text(),
                    ],
                )
                .map_err(&perr)?
                .get(0)
            }
        };
        if let Some(old) = b["id"].int() {
            batch_ids.insert(old, id);
        }
    }
    let map_batch = |row: &mut HashMap<String, Cell>| {
        if let Some(old) = row.get("batch_id").and_then(Cell::int) {
            row.insert("batch_id".into(), batch_ids.get(&old).map_or(Cell::Null, |n| Cell::Int(*n)));
        }
    };
    // Cards, each with its journal, in its own savepoint.
    let mut steps_by_card: HashMap<String, Vec<HashMap<String, Cell>>> = HashMap::new();
    for s in sqlite_rows(&conn, "steps", "id").map_err(sql)? {
        if let Some(c) = s.get("card_id").and_then(Cell::text) {
            steps_by_card.entry(c.to_string()).or_default().push(s);
        }
    }
    const CARD_COLS: &[&str] = &[
        "card_id",
        "status",
        "stage",
        "batch_id",
        "reader",
        "attempts",
        "current_step",
        "failed_step",
        "failure_reason",
        "failure_detail",
        "retryable",
        "atr",
        "cplc",
        "gp_key_version",
        "firmware_sha256",
        "card_public_key",
        "ca_key_id",
        "attest_counter",
        "attested",
        "self_tests",
        "serial",
        "bundle_id",
        "role",
        "wallet_pubkey",
        "first_seen",
        "updated_at",
        "station_id",
    ];
    const STEP_COLS: &[&str] = &["card_id", "attempt", "step", "event", "detail", "reader", "at", "station_id"];
    for mut c in sqlite_rows(&conn, "cards", "first_seen, card_id").map_err(sql)? {
        map_batch(&mut c);
        let c = with_station(c);
        let id = c["card_id"].text().unwrap_or_default().to_string();
        let mut sp = tx.savepoint("card").map_err(&perr)?;
        match insert(&mut sp, "cards", &c, CARD_COLS, Some("card_id")) {
            Ok(0) => {
                report.cards_present += 1;
                sp.rollback().map_err(&perr)?;
                continue;
            }
            Ok(_) => {}
            Err(e) if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) => {
                report.conflicts.push(format!(
                    "card {id}: serial {} is another card's in the database",
                    c["serial"].int().map_or("-".into(), |s| s.to_string())
                ));
                sp.rollback().map_err(&perr)?;
                continue;
            }
            Err(e) => return Err(perr(e)),
        }
        report.cards_added += 1;
        for s in steps_by_card.remove(&id).unwrap_or_default() {
            let s = with_station(s);
            insert(&mut sp, "steps", &s, STEP_COLS, None).map_err(&perr)?;
            report.steps_added += 1;
        }
        sp.commit().map_err(&perr)?;
    }
    // Bundles and their members; numbers from the database's sequence.
    for mut b in sqlite_rows(&conn, "bundles", "created_at, bundle_id").map_err(sql)? {
        map_batch(&mut b);
        let b = with_station(b);
        let n = tx
            .execute(
                "INSERT INTO bundles (bundle_id, status, size, wallet_pubkey, created_at, sealed_at, batch_id, reason,
                                      station_id, bundle_no)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, nextval('bundle_numbers'))
                 ON CONFLICT (bundle_id) DO NOTHING",
                &[
                    &b["bundle_id"].text(),
                    &b["status"].text(),
                    &b["size"].int(),
                    &b["wallet_pubkey"].text(),
                    &b["created_at"].text(),
                    &b["sealed_at"].text(),
                    &b["batch_id"].int(),
                    &b["reason"].text(),
                    &b["station_id"].text(),
                ],
            )
            .map_err(&perr)?;
        report.bundles_added += n as usize;
    }
    for m in sqlite_rows(&conn, "bundle_members", "bundle_id, position").map_err(sql)? {
        let mut sp = tx.savepoint("member").map_err(&perr)?;
        match insert(
            &mut sp,
            "bundle_members",
            &m,
            &["bundle_id", "card_id", "role", "position", "sealed"],
            Some("bundle_id, card_id"),
        ) {
            Ok(_) => sp.commit().map_err(&perr)?,
            // A member whose card was not copied (a conflict).
            Err(e) if e.code() == Some(&postgres::error::SqlState::FOREIGN_KEY_VIOLATION) => {
                sp.rollback().map_err(&perr)?
            }
            Err(e) => return Err(perr(e)),
        }
    }
    // New serials start above every serial now in the database.
    tx.execute(
        "SELECT setval('card_serials', GREATEST((SELECT COALESCE(MAX(serial), 0) FROM cards), \
         (SELECT last_value FROM card_serials)))",
        &[],
    )
    .map_err(&perr)?;
    tx.commit().map_err(&perr)?;
    Ok(report)
}
