//! Reading the ledger out: the export document (`station ledger export`),
//! shared by the CLI, reports and tests. Read-only; opens its own connection.

use std::path::Path;

use rusqlite::OpenFlags;
use serde::Serialize;

use super::LedgerError;

/// One card as exported (docs/ledger.md describes every field).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CardExport {
    pub card_id: String,
    pub status: String,
    pub stage: Option<String>,
    pub serial: Option<i64>,
    pub reader: String,
    pub batch_id: Option<i64>,
    pub attempts: i64,
    pub failed_step: Option<String>,
    pub failure_reason: Option<String>,
    pub failure_detail: Option<String>,
    pub retryable: Option<bool>,
    pub firmware_sha256: Option<String>,
    pub gp_key_version: Option<i64>,
    pub attested: bool,
    pub attest_counter: Option<i64>,
    pub card_public_key: Option<String>,
    pub ca_key_id: Option<String>,
    pub self_tests: bool,
    pub bundle_id: Option<String>,
    pub role: Option<String>,
    pub wallet_pubkey: Option<String>,
    pub first_seen: String,
    pub updated_at: String,
    /// The station that last worked on the card (None in rows from before
    /// station ids).
    #[serde(default)]
    pub station_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct BundleExport {
    pub bundle_id: String,
    /// "forming", "sealed" or "aborted".
    pub status: String,
    pub size: i64,
    pub primary: Option<String>,
    pub backups: Vec<String>,
    pub wallet_pubkey: Option<String>,
    pub batch_id: Option<i64>,
    pub reason: Option<String>,
    pub created_at: String,
    pub sealed_at: Option<String>,
    /// The station that formed the bundle.
    #[serde(default)]
    pub station_id: Option<String>,
    /// The bundle's number on the line, allocated by the ledger.
    #[serde(default)]
    pub bundle_no: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Export {
    pub cards: Vec<CardExport>,
    pub bundles: Vec<BundleExport>,
}

/// One journal line of a card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StepExport {
    pub card_id: String,
    pub attempt: i64,
    pub step: String,
    pub event: String,
    pub detail: Option<String>,
    pub at: String,
}

pub(super) fn open_read(path: &Path) -> Result<rusqlite::Connection, LedgerError> {
    if !path.exists() {
        return Err(LedgerError::Refused { path: path.to_path_buf(), detail: "no such ledger file".into() });
    }
    rusqlite::Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|source| LedgerError::Sqlite { path: path.to_path_buf(), source })
}

/// Reads every card and bundle.
pub fn export(path: &Path) -> Result<Export, LedgerError> {
    let conn = open_read(path)?;
    let sql = |source| LedgerError::Sqlite { path: path.to_path_buf(), source };
    let mut stmt = conn
        .prepare(
            "SELECT card_id, status, stage, serial, reader, batch_id, attempts, failed_step, failure_reason,
                    failure_detail, retryable, firmware_sha256, gp_key_version, attested, attest_counter,
                    card_public_key, ca_key_id, self_tests, bundle_id, role, wallet_pubkey, first_seen, updated_at,
                    station_id
             FROM cards ORDER BY first_seen, card_id",
        )
        .map_err(sql)?;
    let cards = stmt
        .query_map([], |r| {
            Ok(CardExport {
                card_id: r.get(0)?,
                status: r.get(1)?,
                stage: r.get(2)?,
                serial: r.get(3)?,
                reader: r.get(4)?,
                batch_id: r.get(5)?,
                attempts: r.get(6)?,
                failed_step: r.get(7)?,
                failure_reason: r.get(8)?,
                failure_detail: r.get(9)?,
                retryable: r.get(10)?,
                firmware_sha256: r.get(11)?,
                gp_key_version: r.get(12)?,
                attested: r.get(13)?,
                attest_counter: r.get(14)?,
                card_public_key: r.get(15)?,
                ca_key_id: r.get(16)?,
                self_tests: r.get(17)?,
                bundle_id: r.get(18)?,
                role: r.get(19)?,
                wallet_pubkey: r.get(20)?,
                first_seen: r.get(21)?,
                updated_at: r.get(22)?,
                station_id: r.get(23)?,
            })
        })
        .map_err(sql)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql)?;
    let mut stmt = conn
        .prepare(
            "SELECT bundle_id, status, size, wallet_pubkey, batch_id, reason, created_at, sealed_at, station_id, bundle_no
             FROM bundles ORDER BY created_at, bundle_id",
        )
        .map_err(sql)?;
    let mut bundles = stmt
        .query_map([], |r| {
            Ok(BundleExport {
                bundle_id: r.get(0)?,
                status: r.get(1)?,
                size: r.get(2)?,
                primary: None,
                backups: Vec::new(),
                wallet_pubkey: r.get(3)?,
                batch_id: r.get(4)?,
                reason: r.get(5)?,
                created_at: r.get(6)?,
                sealed_at: r.get(7)?,
                station_id: r.get(8)?,
                bundle_no: r.get(9)?,
            })
        })
        .map_err(sql)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql)?;
    let mut stmt =
        conn.prepare("SELECT card_id, role FROM bundle_members WHERE bundle_id = ?1 ORDER BY position").map_err(sql)?;
    for b in &mut bundles {
        let members = stmt
            .query_map([&b.bundle_id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql)?;
        for (card, role) in members {
            if role == "primary" {
                b.primary = Some(card);
            } else {
                b.backups.push(card);
            }
        }
    }
    Ok(Export { cards, bundles })
}

/// One journal line from `SELECT card_id, attempt, step, event, detail, at`.
pub(super) fn step_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StepExport> {
    Ok(StepExport {
        card_id: r.get(0)?,
        attempt: r.get(1)?,
        step: r.get(2)?,
        event: r.get(3)?,
        detail: r.get(4)?,
        at: r.get(5)?,
    })
}

/// The step journal of one card, oldest first.
pub fn steps(path: &Path, card_id: &str) -> Result<Vec<StepExport>, LedgerError> {
    let conn = open_read(path)?;
    let sql = |source| LedgerError::Sqlite { path: path.to_path_buf(), source };
    let mut stmt = conn
        .prepare("SELECT card_id, attempt, step, event, detail, at FROM steps WHERE card_id = ?1 ORDER BY id")
        .map_err(sql)?;
    stmt.query_map([card_id], step_row).map_err(sql)?.collect::<Result<Vec<_>, _>>().map_err(sql)
}

/// CSV of the cards (RFC 4180 quoting), one header line then one per card.
pub fn cards_csv(export: &Export) -> String {
    fn field(s: &str) -> String {
        if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
    }
    fn opt<T: ToString>(v: &Option<T>) -> String {
        v.as_ref().map(ToString::to_string).unwrap_or_default()
    }
    let mut out = String::from(
        "card_id,status,stage,serial,reader,batch_id,attempts,failed_step,failure_reason,failure_detail,retryable,\
         firmware_sha256,gp_key_version,attested,attest_counter,card_public_key,ca_key_id,self_tests,bundle_id,role,\
         wallet_pubkey,first_seen,updated_at,station_id\n",
    );
    for c in &export.cards {
        let row = [
            c.card_id.clone(),
            c.status.clone(),
            opt(&c.stage),
            opt(&c.serial),
            c.reader.clone(),
            opt(&c.batch_id),
            c.attempts.to_string(),
            opt(&c.failed_step),
            opt(&c.failure_reason),
            opt(&c.failure_detail),
            opt(&c.retryable),
            opt(&c.firmware_sha256),
            opt(&c.gp_key_version),
            c.attested.to_string(),
            opt(&c.attest_counter),
            opt(&c.card_public_key),
            opt(&c.ca_key_id),
            c.self_tests.to_string(),
            opt(&c.bundle_id),
            opt(&c.role),
            opt(&c.wallet_pubkey),
            c.first_seen.clone(),
            c.updated_at.clone(),
            opt(&c.station_id),
        ];
        out.push_str(&row.iter().map(|s| field(s)).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    out
}
