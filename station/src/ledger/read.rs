//! Read-only queries for one batch: what the batch report needs (the batch
//! row, its cards and bundles in the export format, its step journal).
//! Opens its own read-only connection, like `export`.

use std::path::Path;

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use super::LedgerError;
use super::export::{self, Export, StepExport};

/// One row of `batches`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct BatchRecord {
    pub id: i64,
    pub name: String,
    pub profile: String,
    pub product: String,
    /// Firmware name and version.
    pub firmware: String,
    /// SHA-256 of the firmware's load file.
    pub firmware_sha256: String,
    pub started_at: String,
    pub finished_at: Option<String>,
}

/// Everything the ledger holds about one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchData {
    pub batch: BatchRecord,
    /// The cards whose latest attempt ran in this batch and the bundles
    /// formed in it, exactly as `station ledger export` writes them.
    pub export: Export,
    /// The step journal of those cards during the batch (from its start to
    /// its finish), oldest first.
    pub steps: Vec<StepExport>,
}

/// Every batch, oldest first.
pub fn batches(path: &Path) -> Result<Vec<BatchRecord>, LedgerError> {
    let conn = export::open_read(path)?;
    let sql = |source| LedgerError::Sqlite { path: path.to_path_buf(), source };
    let mut stmt = conn
        .prepare(
            "SELECT id, name, profile, product, firmware, firmware_sha256, started_at, finished_at
             FROM batches ORDER BY id",
        )
        .map_err(sql)?;
    stmt.query_map([], batch_row).map_err(sql)?.collect::<Result<Vec<_>, _>>().map_err(sql)
}

fn batch_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BatchRecord> {
    Ok(BatchRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        profile: r.get(2)?,
        product: r.get(3)?,
        firmware: r.get(4)?,
        firmware_sha256: r.get(5)?,
        started_at: r.get(6)?,
        finished_at: r.get(7)?,
    })
}

/// Finds a batch by name (the latest batch of that name) or, when no batch
/// has that name, by numeric id.
pub fn find_batch(path: &Path, id_or_name: &str) -> Result<BatchRecord, LedgerError> {
    let conn = export::open_read(path)?;
    let sql = |source| LedgerError::Sqlite { path: path.to_path_buf(), source };
    let cols = "SELECT id, name, profile, product, firmware, firmware_sha256, started_at, finished_at FROM batches";
    let by_name = conn
        .query_row(&format!("{cols} WHERE name = ?1 ORDER BY id DESC LIMIT 1"), [id_or_name], batch_row)
        .optional()
        .map_err(sql)?;
    if let Some(b) = by_name {
        return Ok(b);
    }
    if let Ok(id) = id_or_name.trim().parse::<i64>()
        && let Some(b) = conn.query_row(&format!("{cols} WHERE id = ?1"), [id], batch_row).optional().map_err(sql)?
    {
        return Ok(b);
    }
    Err(LedgerError::Refused { path: path.to_path_buf(), detail: format!("no batch named or numbered {id_or_name:?}") })
}

/// The export (same rows and format as `station ledger export`) restricted
/// to one batch: cards whose latest attempt ran in it (`batch_id`) and the
/// bundles formed in it.
pub fn batch_export(path: &Path, batch_id: i64) -> Result<Export, LedgerError> {
    let mut doc = export::export(path)?;
    doc.cards.retain(|c| c.batch_id == Some(batch_id));
    doc.bundles.retain(|b| b.batch_id == Some(batch_id));
    Ok(doc)
}

/// The step journal of the batch's cards between the batch's start and
/// finish (to now while it runs), oldest first.
pub fn batch_steps(path: &Path, batch: &BatchRecord) -> Result<Vec<StepExport>, LedgerError> {
    let conn = export::open_read(path)?;
    let sql = |source| LedgerError::Sqlite { path: path.to_path_buf(), source };
    // Timestamps are RFC 3339 UTC with milliseconds: text order is time order.
    let mut stmt = conn
        .prepare(
            "SELECT s.card_id, s.attempt, s.step, s.event, s.detail, s.at
             FROM steps s JOIN cards c ON c.card_id = s.card_id
             WHERE c.batch_id = ?1 AND s.at >= ?2 AND (?3 IS NULL OR s.at <= ?3)
             ORDER BY s.id",
        )
        .map_err(sql)?;
    stmt.query_map(params![batch.id, batch.started_at, batch.finished_at], super::export::step_row)
        .map_err(sql)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql)
}

/// Everything about one batch (by name or id).
pub fn batch_data(path: &Path, id_or_name: &str) -> Result<BatchData, LedgerError> {
    let batch = find_batch(path, id_or_name)?;
    let export = batch_export(path, batch.id)?;
    let steps = batch_steps(path, &batch)?;
    Ok(BatchData { batch, export, steps })
}

#[cfg(test)]
mod tests {
    use card::CardId;

    use super::*;
    use crate::ledger::{BatchInfo, Ledger, StepEvent};

    fn info(name: &str) -> BatchInfo {
        BatchInfo {
            name: name.into(),
            profile: "p".into(),
            product: "x".into(),
            firmware: "fw 1".into(),
            firmware_sha256: "ab".into(),
        }
    }

    #[test]
    fn a_batch_is_found_by_name_or_id_and_holds_only_its_cards_and_steps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("l.db");
        let (l, w) = Ledger::open(&path).expect("open");
        let b1 = l.start_batch(info("first")).expect("batch");
        let (c1, c2) = (CardId([1; 10]), CardId([2; 10]));
        l.begin_card(c1, "r0", b1, "", "").expect("begin");
        l.step(c1, 1, "identify", StepEvent::Intent, "", "r0").expect("step");
        l.pass(c1, 1, "ready_for_pairing").expect("pass");
        l.finish_batch(b1, None).expect("finish");
        std::thread::sleep(std::time::Duration::from_millis(5));
        let b2 = l.start_batch(info("second")).expect("batch");
        l.begin_card(c2, "r1", b2, "", "").expect("begin");
        l.step(c2, 1, "identify", StepEvent::Intent, "", "r1").expect("step");
        l.fail(c2, 1, "identify", "card removed", "gone", true).expect("fail");
        drop(l);
        w.close();

        assert_eq!(batches(&path).expect("batches").len(), 2);
        let d = batch_data(&path, "second").expect("by name");
        assert_eq!((d.batch.id, d.batch.finished_at.is_none()), (b2, true));
        assert_eq!(d.export.cards.len(), 1);
        assert_eq!(d.export.cards[0].card_id, c2.to_hex());
        assert!(d.steps.iter().all(|s| s.card_id == c2.to_hex()), "{:?}", d.steps);
        assert_eq!(d.steps.len(), 2);
        let d = batch_data(&path, &b1.to_string()).expect("by id");
        assert_eq!(d.batch.name, "first");
        assert_eq!(d.export.cards[0].card_id, c1.to_hex());
        assert!(d.steps.iter().any(|s| s.step == "record"));
        let err = batch_data(&path, "nope").expect_err("unknown");
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
