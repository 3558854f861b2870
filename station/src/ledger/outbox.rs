//! The PostgreSQL backend's outbox: a small SQLite file next to the station
//! that holds ledger ops, in order, while the database is unreachable. Each
//! op keeps the id it was given when the station asked for it, so draining
//! it twice (a crash between the database's commit and the outbox's delete)
//! applies it once: the database remembers every op id it applied (`ops`).

use std::path::{Path, PathBuf};

use rusqlite::{Connection, params};

use super::LedgerError;

/// One queued op.
#[derive(Debug, Clone)]
pub struct Queued {
    pub seq: i64,
    pub op_id: String,
    /// When the station asked for it (the row's timestamps).
    pub at: String,
    /// The op as JSON.
    pub op: String,
}

pub struct Outbox {
    conn: Connection,
    path: PathBuf,
    len: u64,
}

impl Outbox {
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let sql = |source| LedgerError::Sqlite { path: path.to_path_buf(), source };
        let conn = super::open_connection(path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS outbox (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                op_id TEXT NOT NULL UNIQUE,
                at TEXT NOT NULL,
                op TEXT NOT NULL
            )",
        )
        .map_err(sql)?;
        let len: i64 = conn.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0)).map_err(sql)?;
        Ok(Self { conn, path: path.to_path_buf(), len: len as u64 })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Ops waiting.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends ops (op id, time, op JSON) in order, durably, in one
    /// transaction.
    pub fn push(&mut self, items: &[(String, String, String)]) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        for (op_id, at, op) in items {
            tx.execute(
                "INSERT INTO outbox (op_id, at, op) VALUES (?1, ?2, ?3) ON CONFLICT (op_id) DO NOTHING",
                params![op_id, at, op],
            )?;
        }
        tx.commit()?;
        self.len = self.count()?;
        Ok(())
    }

    /// The oldest `n` ops.
    pub fn peek(&self, n: usize) -> rusqlite::Result<Vec<Queued>> {
        let mut stmt = self.conn.prepare("SELECT seq, op_id, at, op FROM outbox ORDER BY seq LIMIT ?1")?;
        stmt.query_map([n as i64], |r| Ok(Queued { seq: r.get(0)?, op_id: r.get(1)?, at: r.get(2)?, op: r.get(3)? }))?
            .collect()
    }

    /// Forgets every op up to and including `seq` (applied in the database).
    pub fn remove_through(&mut self, seq: i64) -> rusqlite::Result<()> {
        self.conn.execute("DELETE FROM outbox WHERE seq <= ?1", [seq])?;
        self.len = self.count()?;
        Ok(())
    }

    fn count(&self) -> rusqlite::Result<u64> {
        self.conn.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0)).map(|n| n as u64)
    }
}
