//! Ledger schema and its migrations. Versions only ever go up; each
//! migration runs in the transaction that records it.

use rusqlite::Connection;

/// Ordered migrations; index + 1 is the schema version they produce.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: batches, cards, the step journal, bundles (filled by pairing).
    r"
    CREATE TABLE batches (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        profile TEXT NOT NULL,
        product TEXT NOT NULL,
        firmware TEXT NOT NULL,
        firmware_sha256 TEXT NOT NULL,
        started_at TEXT NOT NULL,
        finished_at TEXT
    );
    CREATE TABLE cards (
        card_id TEXT PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('in_progress', 'passed', 'failed')),
        stage TEXT,
        batch_id INTEGER REFERENCES batches(id),
        reader TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        current_step TEXT,
        failed_step TEXT,
        failure_reason TEXT,
        failure_detail TEXT,
        retryable INTEGER,
        atr TEXT,
        cplc TEXT,
        gp_key_version INTEGER,
        firmware_sha256 TEXT,
        card_public_key TEXT,
        ca_key_id TEXT,
        attest_counter INTEGER,
        attested INTEGER NOT NULL DEFAULT 0,
        self_tests INTEGER NOT NULL DEFAULT 0,
        serial INTEGER UNIQUE,
        bundle_id TEXT,
        role TEXT,
        wallet_pubkey TEXT,
        first_seen TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE steps (
        id INTEGER PRIMARY KEY,
        card_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        step TEXT NOT NULL,
        event TEXT NOT NULL CHECK (event IN ('intent', 'done', 'failed', 'refused')),
        detail TEXT,
        reader TEXT,
        at TEXT NOT NULL
    );
    CREATE INDEX steps_by_card ON steps(card_id, id);
    CREATE TABLE bundles (
        bundle_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        size INTEGER NOT NULL,
        wallet_pubkey TEXT,
        created_at TEXT NOT NULL,
        sealed_at TEXT
    );
    ",
    // 2: bundle membership. A card may appear in several bundle attempts
    // (aborted ones), but in at most one sealed bundle.
    r"
    ALTER TABLE bundles ADD COLUMN batch_id INTEGER REFERENCES batches(id);
    ALTER TABLE bundles ADD COLUMN reason TEXT;
    CREATE TABLE bundle_members (
        bundle_id TEXT NOT NULL REFERENCES bundles(bundle_id),
        card_id TEXT NOT NULL REFERENCES cards(card_id),
        role TEXT NOT NULL CHECK (role IN ('primary', 'backup')),
        position INTEGER NOT NULL,
        sealed INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (bundle_id, card_id)
    );
    CREATE UNIQUE INDEX one_sealed_bundle_per_card ON bundle_members(card_id) WHERE sealed = 1;
    ",
    // 3: the audit log (ledger::audit). AUTOINCREMENT keeps the highest seq
    // ever issued in sqlite_sequence, so a cut tail shows.
    r"
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        batch_id INTEGER,
        at TEXT NOT NULL,
        kind TEXT NOT NULL,
        card_id TEXT,
        step TEXT,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE
    );
    CREATE INDEX audit_by_card ON audit(card_id, seq);
    ",
    // 4: the fleet. Every record names the station that wrote it; bundles
    // get a number on the line (PostgreSQL allocates it from a sequence).
    r"
    ALTER TABLE batches ADD COLUMN station_id TEXT;
    ALTER TABLE cards ADD COLUMN station_id TEXT;
    ALTER TABLE steps ADD COLUMN station_id TEXT;
    ALTER TABLE bundles ADD COLUMN station_id TEXT;
    ALTER TABLE bundles ADD COLUMN bundle_no INTEGER;
    CREATE UNIQUE INDEX bundles_by_no ON bundles(bundle_no);
    ",
];

pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// Brings a database to the current schema. Refuses a database from a newer
/// Tapline rather than guessing.
pub fn migrate(conn: &mut Connection, now: &str) -> rusqlite::Result<Result<(), String>> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let current: usize = tx
        .query_row("SELECT COALESCE(MAX(version), 0) FROM schema_version", [], |r| r.get::<_, i64>(0))
        .map(|v| v as usize)?;
    if current > SCHEMA_VERSION {
        return Ok(Err(format!(
            "ledger schema version {current} is newer than this station's {SCHEMA_VERSION}; upgrade the station"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        tx.execute_batch(sql)?;
        tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [(i + 1) as i64])?;
    }
    // History written before this migration is adopted as it stands now
    // (with the columns the migration added), so the log replays to it.
    if current > 0 && current < SCHEMA_VERSION {
        super::audit::adopt(&tx, current, now)?;
    }
    tx.commit()?;
    Ok(Ok(()))
}
