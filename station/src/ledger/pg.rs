//! The PostgreSQL backend: one ledger for a line of stations.
//!
//! Same logical schema as SQLite (same tables, columns and versions; TEXT
//! timestamps, BIGINT for integers and flags), plus what a shared database
//! needs: serials and bundle numbers from sequences, a claim on each card in
//! progress (`held_by`, `lease_until`), and `ops`, the result of every op
//! applied, by op id, so a retry after a lost connection gets the stored
//! result instead of applying twice. While the database is unreachable ops
//! go to the local outbox (`outbox.rs`) and drain in order when it returns.
//! docs/ledger.md describes the rules.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::{Client, NoTls, Transaction};

use super::outbox::Outbox;
use super::{Backend, CardStatus, LedgerError, LedgerStatus, Op, PriorRecord, Reply, Shared, StepEvent};

/// Versioned migrations, the PostgreSQL twin of `schema::MIGRATIONS`
/// (index + 1 is the version; the same number means the same tables).
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: batches, cards, the step journal, bundles.
    r"
    CREATE TABLE batches (
        id BIGSERIAL PRIMARY KEY,
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
        batch_id BIGINT REFERENCES batches(id),
        reader TEXT NOT NULL,
        attempts BIGINT NOT NULL DEFAULT 0,
        current_step TEXT,
        failed_step TEXT,
        failure_reason TEXT,
        failure_detail TEXT,
        retryable BIGINT,
        atr TEXT,
        cplc TEXT,
        gp_key_version BIGINT,
        firmware_sha256 TEXT,
        card_public_key TEXT,
        ca_key_id TEXT,
        attest_counter BIGINT,
        attested BIGINT NOT NULL DEFAULT 0,
        self_tests BIGINT NOT NULL DEFAULT 0,
        serial BIGINT UNIQUE,
        bundle_id TEXT,
        role TEXT,
        wallet_pubkey TEXT,
        first_seen TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE steps (
        id BIGSERIAL PRIMARY KEY,
        card_id TEXT NOT NULL,
        attempt BIGINT NOT NULL,
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
        size BIGINT NOT NULL,
        wallet_pubkey TEXT,
        created_at TEXT NOT NULL,
        sealed_at TEXT
    );
    ",
    // 2: bundle membership.
    r"
    ALTER TABLE bundles ADD COLUMN batch_id BIGINT REFERENCES batches(id);
    ALTER TABLE bundles ADD COLUMN reason TEXT;
    CREATE TABLE bundle_members (
        bundle_id TEXT NOT NULL REFERENCES bundles(bundle_id),
        card_id TEXT NOT NULL REFERENCES cards(card_id),
        role TEXT NOT NULL CHECK (role IN ('primary', 'backup')),
        position BIGINT NOT NULL,
        sealed BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (bundle_id, card_id)
    );
    CREATE UNIQUE INDEX one_sealed_bundle_per_card ON bundle_members(card_id) WHERE sealed = 1;
    ",
    // 3: the audit table (kept empty on PostgreSQL: see docs/ledger.md).
    r"
    CREATE TABLE audit (
        seq BIGSERIAL PRIMARY KEY,
        batch_id BIGINT,
        at TEXT NOT NULL,
        kind TEXT NOT NULL,
        card_id TEXT,
        step TEXT,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE
    );
    ",
    // 4: the fleet: station ids and bundle numbers (as on SQLite), and the
    // line's coordination: sequences, card claims, applied op ids.
    r"
    ALTER TABLE batches ADD COLUMN station_id TEXT;
    ALTER TABLE cards ADD COLUMN station_id TEXT;
    ALTER TABLE steps ADD COLUMN station_id TEXT;
    ALTER TABLE bundles ADD COLUMN station_id TEXT;
    ALTER TABLE bundles ADD COLUMN bundle_no BIGINT;
    CREATE UNIQUE INDEX bundles_by_no ON bundles(bundle_no);
    CREATE SEQUENCE card_serials;
    CREATE SEQUENCE bundle_numbers;
    ALTER TABLE cards ADD COLUMN held_by TEXT;
    ALTER TABLE cards ADD COLUMN lease_until TIMESTAMPTZ;
    CREATE TABLE ops (
        op_id TEXT PRIMARY KEY,
        station_id TEXT NOT NULL,
        reply TEXT NOT NULL,
        at TEXT NOT NULL
    );
    ALTER TABLE audit ADD COLUMN station_id TEXT;
    ALTER TABLE audit ADD COLUMN station_seq BIGINT;
    CREATE UNIQUE INDEX audit_by_station ON audit(station_id, station_seq);
    ",
];

/// The advisory lock key every station takes while migrating ("tapline").
const MIGRATE_LOCK: i64 = 0x7461_706C_696E_6501;

/// How long a station's claim on a card in progress lasts without a new
/// step (each step intent renews it).
const CARD_LEASE_S: i64 = 120;

/// A card waiting for pairing keeps its claim this long.
const READY_LEASE_S: i64 = 3600;

/// How often an offline station tries the database again.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Ops applied from the outbox per transaction.
const DRAIN_CHUNK: usize = 200;

/// Connects with short timeouts, so an unreachable database is noticed in
/// seconds, not minutes.
pub fn connect(url: &str) -> Result<Client, postgres::Error> {
    let mut config: postgres::Config = url.parse()?;
    config
        .connect_timeout(Duration::from_secs(3))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .tcp_user_timeout(Duration::from_secs(10));
    if config.get_application_name().is_none() {
        config.application_name("tapline-station");
    }
    config.connect(NoTls)
}

/// Brings the database to the current schema. Safe when several stations
/// start at once: migrations run under a transaction-scoped advisory lock,
/// so one station migrates and the others then find the work done. Refuses
/// a database from a newer Tapline.
pub fn migrate(client: &mut Client) -> Result<Result<(), String>, postgres::Error> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")?;
    let current: i64 = tx.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])?.get(0);
    let current = current as usize;
    if current > MIGRATIONS.len() {
        return Ok(Err(format!(
            "ledger schema version {current} is newer than this station's {}; upgrade the station",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        tx.batch_execute(sql)?;
        tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&((i + 1) as i64)])?;
    }
    tx.commit()?;
    Ok(Ok(()))
}

/// Connects and migrates (for `open`, `sync` and snapshots).
pub fn open_client(url: &str) -> Result<Client, LedgerError> {
    let shown = super::target::redact(url);
    let err = |detail: String| LedgerError::Postgres { target: shown.clone(), detail };
    let mut client = connect(url).map_err(|e| err(format!("cannot connect: {}", describe(&e))))?;
    migrate(&mut client).map_err(|e| err(format!("migrating: {}", describe(&e))))?.map_err(err)?;
    Ok(client)
}

/// The error's own words (the database's message, or the I/O cause).
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(s) => format!("{e}: {s}"),
            None => e.to_string(),
        },
    }
}

/// The connection itself failed (as opposed to the database refusing a
/// statement): the outcome of what was in flight is unknown.
fn is_connection(e: &postgres::Error) -> bool {
    e.as_db_error().is_none()
        && (e.is_closed() || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()))
}

/// Why one op was not applied.
enum ApplyError {
    Sql(postgres::Error),
    Refused(String),
}

impl From<postgres::Error> for ApplyError {
    fn from(e: postgres::Error) -> Self {
        Self::Sql(e)
    }
}

fn refused(detail: String) -> ApplyError {
    ApplyError::Refused(detail)
}

fn opt_i64<T: Into<i64> + Copy>(v: Option<T>) -> Option<i64> {
    v.map(Into::into)
}

/// Refuses a change to a card another station holds (its lease running).
fn check_holder(tx: &mut Transaction<'_>, id: &str, station: &str) -> Result<String, ApplyError> {
    let row = tx.query_opt(
        "SELECT status, held_by, COALESCE(lease_until > now(), false) FROM cards WHERE card_id = $1 FOR UPDATE",
        &[&id],
    )?;
    let Some(row) = row else { return Err(refused(format!("card {id} is not in the ledger"))) };
    let (status, held_by, active): (String, Option<String>, bool) = (row.get(0), row.get(1), row.get(2));
    if status == "in_progress"
        && active
        && let Some(h) = held_by
        && h != station
    {
        return Err(refused(format!("card {id} is in progress at station {h}")));
    }
    Ok(status)
}

fn apply(tx: &mut Transaction<'_>, op: &Op, ts: &str, station: &str) -> Result<Reply, ApplyError> {
    match op {
        Op::Many(ops) => {
            let mut last = Reply::Unit;
            for op in ops {
                last = apply(tx, op, ts, station)?;
            }
            Ok(last)
        }
        Op::StartBatch(b) => {
            let row = tx.query_one(
                "INSERT INTO batches (name, profile, product, firmware, firmware_sha256, started_at, station_id)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                &[&b.name, &b.profile, &b.product, &b.firmware, &b.firmware_sha256, &ts, &station],
            )?;
            Ok(Reply::Id(row.get(0)))
        }
        Op::FinishBatch { batch, .. } => {
            tx.execute("UPDATE batches SET finished_at = $1 WHERE id = $2", &[&ts, batch])?;
            Ok(Reply::Unit)
        }
        // Only what this station holds: another station's cards, bundles
        // and batches are never touched (its own start recovers them).
        Op::Recover { reason, .. } => {
            let bundles = tx.execute(
                "UPDATE bundles SET status = 'aborted', reason = $2 WHERE status = 'forming' AND station_id = $1",
                &[&station, reason],
            )?;
            let mine = "status = 'in_progress' AND (held_by = $1 OR (held_by IS NULL AND station_id = $1))";
            let detail = format!("recovered when station {station} started again");
            tx.execute(
                &format!(
                    "INSERT INTO steps (card_id, attempt, step, event, detail, at, station_id)
                     SELECT card_id, attempts, COALESCE(current_step,
                            CASE WHEN stage = 'ready_for_pairing' THEN 'pairing' ELSE 'identify' END),
                            'failed', $2, $3, $1
                     FROM cards WHERE {mine} ORDER BY updated_at, card_id"
                ),
                &[&station, &format!("{reason}: {detail}"), &ts],
            )?;
            let cards = tx.execute(
                &format!(
                    "UPDATE cards SET status = 'failed',
                        failed_step = COALESCE(current_step,
                            CASE WHEN stage = 'ready_for_pairing' THEN 'pairing' ELSE 'identify' END),
                        failure_reason = $2, failure_detail = $3, retryable = 1, current_step = NULL,
                        updated_at = $4, held_by = NULL, lease_until = NULL
                     WHERE {mine}"
                ),
                &[&station, reason, &detail, &ts],
            )?;
            let batches = tx.execute(
                "UPDATE batches SET finished_at = $2 WHERE finished_at IS NULL AND station_id = $1",
                &[&station, &ts],
            )?;
            Ok(Reply::Recovered(super::Recovered { cards, batches, bundles }))
        }
        Op::BeginCard { card, reader, batch, atr, cplc } => {
            let id = card.to_hex();
            // Twice at most: a first sight that loses the insert race to
            // another station finds that station's row the second time.
            for _ in 0..2 {
                let row = tx.query_opt(
                    "SELECT status, attempts, gp_key_version, card_public_key, attest_counter, held_by,
                            COALESCE(lease_until > now(), false)
                     FROM cards WHERE card_id = $1 FOR UPDATE",
                    &[&id],
                )?;
                if let Some(r) = row {
                    let prior = PriorRecord {
                        status: CardStatus::parse(&r.get::<_, String>(0)),
                        attempts: r.get::<_, i64>(1) as u32,
                        gp_key_version: r.get::<_, Option<i64>>(2).map(|v| v as u8),
                        card_public_key: r.get(3),
                        attest_counter: r.get::<_, Option<i64>>(4).map(|v| v as u32),
                    };
                    let (held_by, active): (Option<String>, bool) = (r.get(5), r.get(6));
                    if prior.status == CardStatus::InProgress
                        && active
                        && let Some(h) = held_by
                        && h != station
                    {
                        return Ok(Reply::Held { station: h });
                    }
                    if prior.status != CardStatus::Passed {
                        tx.execute(
                            "UPDATE cards SET status = 'in_progress', attempts = attempts + 1, reader = $2, batch_id = $3,
                             atr = $4, failed_step = NULL, failure_reason = NULL, failure_detail = NULL, retryable = NULL,
                             current_step = NULL, updated_at = $5, station_id = $6, held_by = $6,
                             lease_until = now() + $7::bigint * interval '1 second'
                             WHERE card_id = $1",
                            &[&id, reader, batch, atr, &ts, &station, &CARD_LEASE_S],
                        )?;
                    }
                    return Ok(Reply::Prior(Some(prior)));
                }
                let n = tx.execute(
                    "INSERT INTO cards (card_id, status, batch_id, reader, attempts, atr, cplc, first_seen, updated_at,
                                        station_id, held_by, lease_until)
                     VALUES ($1, 'in_progress', $2, $3, 1, $4, $5, $6, $6, $7, $7, now() + $8::bigint * interval '1 second')
                     ON CONFLICT (card_id) DO NOTHING",
                    &[&id, batch, reader, atr, cplc, &ts, &station, &CARD_LEASE_S],
                )?;
                if n == 1 {
                    return Ok(Reply::Prior(None));
                }
            }
            Err(refused(format!("card {id}: could not claim it")))
        }
        Op::Step { card, attempt, step, event, detail, reader } => {
            let id = card.to_hex();
            tx.execute(
                "INSERT INTO steps (card_id, attempt, step, event, detail, reader, at, station_id)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[&id, &i64::from(*attempt), step, &event.as_str(), detail, reader, &ts, &station],
            )?;
            if *event == StepEvent::Intent {
                tx.execute(
                    "UPDATE cards SET current_step = $2, updated_at = $3,
                     lease_until = CASE WHEN held_by = $4 THEN now() + $5::bigint * interval '1 second' ELSE lease_until END
                     WHERE card_id = $1 AND status = 'in_progress'
                       AND (held_by IS NULL OR held_by = $4 OR lease_until IS NULL OR lease_until <= now())",
                    &[&id, step, &ts, &station, &CARD_LEASE_S],
                )?;
            }
            Ok(Reply::Unit)
        }
        Op::StepDone { card, attempt, step, detail, update } => {
            let id = card.to_hex();
            tx.execute(
                "INSERT INTO steps (card_id, attempt, step, event, detail, at, station_id)
                 VALUES ($1, $2, $3, 'done', $4, $5, $6)",
                &[&id, &i64::from(*attempt), step, detail, &ts, &station],
            )?;
            tx.execute(
                "UPDATE cards SET
                    gp_key_version = COALESCE($2, gp_key_version),
                    firmware_sha256 = COALESCE($3, firmware_sha256),
                    card_public_key = COALESCE($4, card_public_key),
                    ca_key_id = COALESCE($5, ca_key_id),
                    attest_counter = COALESCE($6, attest_counter),
                    attested = COALESCE($7, attested),
                    self_tests = COALESCE($8, self_tests),
                    updated_at = $9
                 WHERE card_id = $1
                   AND (held_by IS NULL OR held_by = $10 OR lease_until IS NULL OR lease_until <= now())",
                &[
                    &id,
                    &opt_i64(update.gp_key_version),
                    &update.firmware_sha256,
                    &update.card_public_key,
                    &update.ca_key_id,
                    &opt_i64(update.attest_counter),
                    &update.attested.map(i64::from),
                    &update.self_tests.map(i64::from),
                    &ts,
                    &station,
                ],
            )?;
            Ok(Reply::Unit)
        }
        Op::Pass { card, attempt, stage } => {
            let id = card.to_hex();
            let status = check_holder(tx, &id, station)?;
            if status != "in_progress" {
                return Err(refused(format!("card {id} is {status}, not in progress")));
            }
            let serial: i64 = tx.query_one("SELECT nextval('card_serials')", &[])?.get(0);
            tx.execute(
                "UPDATE cards SET status = 'passed', stage = $2, serial = $3, current_step = NULL, updated_at = $4,
                 held_by = NULL, lease_until = NULL WHERE card_id = $1",
                &[&id, stage, &serial, &ts],
            )?;
            tx.execute(
                "INSERT INTO steps (card_id, attempt, step, event, detail, at, station_id)
                 VALUES ($1, $2, 'record', 'done', $3, $4, $5)",
                &[&id, &i64::from(*attempt), &format!("serial {serial}"), &ts, &station],
            )?;
            Ok(Reply::Id(serial))
        }
        Op::Ready { card, attempt } => {
            let id = card.to_hex();
            check_holder(tx, &id, station)?;
            let n = tx.execute(
                "UPDATE cards SET stage = 'ready_for_pairing', current_step = NULL, updated_at = $2,
                 lease_until = now() + $3::bigint * interval '1 second'
                 WHERE card_id = $1 AND status = 'in_progress'",
                &[&id, &ts, &READY_LEASE_S],
            )?;
            if n != 1 {
                return Err(refused(format!("card {id} is not in progress")));
            }
            tx.execute(
                "INSERT INTO steps (card_id, attempt, step, event, detail, at, station_id)
                 VALUES ($1, $2, 'record', 'done', 'ready for pairing', $3, $4)",
                &[&id, &i64::from(*attempt), &ts, &station],
            )?;
            Ok(Reply::Unit)
        }
        Op::BundleStart { bundle, batch, members } => {
            tx.execute(
                "INSERT INTO bundles (bundle_id, status, size, created_at, batch_id, station_id, bundle_no)
                 VALUES ($1, 'forming', $2, $3, $4, $5, nextval('bundle_numbers'))",
                &[bundle, &(members.len() as i64), &ts, batch, &station],
            )?;
            for (position, (card, role)) in members.iter().enumerate() {
                let id = card.to_hex();
                check_holder(tx, &id, station)?;
                let ok: i64 = tx
                    .query_one(
                        "SELECT COUNT(*) FROM cards
                         WHERE card_id = $1 AND status = 'in_progress' AND stage = 'ready_for_pairing'",
                        &[&id],
                    )?
                    .get(0);
                if ok != 1 {
                    return Err(refused(format!("card {id} is not ready for pairing")));
                }
                tx.execute(
                    "INSERT INTO bundle_members (bundle_id, card_id, role, position) VALUES ($1, $2, $3, $4)",
                    &[bundle, &id, role, &(position as i64)],
                )?;
            }
            Ok(Reply::Unit)
        }
        Op::BundleSealed { bundle, wallet_pubkey } => {
            let status: Option<String> = tx
                .query_opt("SELECT status FROM bundles WHERE bundle_id = $1 FOR UPDATE", &[bundle])?
                .map(|r| r.get(0));
            let Some(status) = status else { return Err(refused(format!("bundle {bundle} is not in the ledger"))) };
            if status != "forming" {
                return Err(refused(format!("bundle {bundle} is {status}, not forming")));
            }
            let members: Vec<(String, String)> = tx
                .query("SELECT card_id, role FROM bundle_members WHERE bundle_id = $1 ORDER BY position", &[bundle])?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let mut serials = Vec::with_capacity(members.len());
            for (id, role) in &members {
                let serial: i64 = tx.query_one("SELECT nextval('card_serials')", &[])?.get(0);
                let n = tx.execute(
                    "UPDATE cards SET status = 'passed', stage = 'bundled', serial = $2, bundle_id = $3, role = $4,
                     wallet_pubkey = $5, current_step = NULL, updated_at = $6, held_by = NULL, lease_until = NULL
                     WHERE card_id = $1 AND status = 'in_progress'",
                    &[id, &serial, bundle, role, wallet_pubkey, &ts],
                )?;
                if n != 1 {
                    return Err(refused(format!("member {id} of bundle {bundle} is not in progress")));
                }
                tx.execute(
                    "UPDATE bundle_members SET sealed = 1 WHERE bundle_id = $1 AND card_id = $2",
                    &[bundle, id],
                )?;
                tx.execute(
                    "INSERT INTO steps (card_id, attempt, step, event, detail, at, station_id)
                     SELECT card_id, attempts, 'record', 'done', $2, $3, $4 FROM cards WHERE card_id = $1",
                    &[id, &format!("serial {serial}, {role} of bundle {bundle}"), &ts, &station],
                )?;
                let card = id.parse::<card::CardId>().map_err(|e| refused(e.to_string()))?;
                serials.push((card, serial));
            }
            tx.execute(
                "UPDATE bundles SET status = 'sealed', wallet_pubkey = $2, sealed_at = $3 WHERE bundle_id = $1",
                &[bundle, wallet_pubkey, &ts],
            )?;
            Ok(Reply::Serials(serials))
        }
        Op::BundleAborted { bundle, reason } => {
            tx.execute(
                "UPDATE bundles SET status = 'aborted', reason = $2 WHERE bundle_id = $1 AND status = 'forming'",
                &[bundle, reason],
            )?;
            Ok(Reply::Unit)
        }
        Op::Fail { card, attempt, step, reason, detail, retryable } => {
            let id = card.to_hex();
            tx.execute(
                "INSERT INTO steps (card_id, attempt, step, event, detail, at, station_id)
                 VALUES ($1, $2, $3, 'failed', $4, $5, $6)",
                &[&id, &i64::from(*attempt), step, &format!("{reason}: {detail}"), &ts, &station],
            )?;
            // Only the holder (or anyone once the claim has run out) fails it.
            tx.execute(
                "UPDATE cards SET status = 'failed', failed_step = $2, failure_reason = $3, failure_detail = $4,
                 retryable = $5, current_step = NULL, updated_at = $6, held_by = NULL, lease_until = NULL
                 WHERE card_id = $1 AND status != 'passed'
                   AND (held_by IS NULL OR held_by = $7 OR lease_until IS NULL OR lease_until <= now())",
                &[&id, step, reason, detail, &i64::from(*retryable), &ts, &station],
            )?;
            Ok(Reply::Unit)
        }
    }
}

/// The audit row's kind, card, step and batch for an op.
fn audit_fields(op: &Op) -> (&'static str, Option<String>, Option<String>, Option<i64>) {
    match op {
        Op::StartBatch(_) => ("batch_start", None, None, None),
        Op::FinishBatch { batch, .. } => ("batch_finish", None, None, Some(*batch)),
        Op::BeginCard { card, batch, .. } => ("card_begin", Some(card.to_hex()), None, Some(*batch)),
        Op::Step { card, step, event, .. } => {
            let kind = match event {
                StepEvent::Intent => "step_intent",
                StepEvent::Done => "step_done",
                StepEvent::Failed => "step_failed",
                StepEvent::Refused => "step_refused",
            };
            (kind, Some(card.to_hex()), Some(step.clone()), None)
        }
        Op::StepDone { card, step, .. } => ("step_done", Some(card.to_hex()), Some(step.clone()), None),
        Op::Pass { card, .. } => ("card_pass", Some(card.to_hex()), Some("record".into()), None),
        Op::Ready { card, .. } => ("card_ready", Some(card.to_hex()), Some("record".into()), None),
        Op::Fail { card, step, .. } => ("card_fail", Some(card.to_hex()), Some(step.clone()), None),
        Op::BundleStart { batch, .. } => ("bundle_start", None, None, Some(*batch)),
        Op::BundleSealed { .. } => ("bundle_sealed", None, None, None),
        Op::BundleAborted { .. } => ("bundle_aborted", None, None, None),
        Op::Recover { .. } => ("recover", None, None, None),
        Op::Many(ops) => ops.last().map_or(("many", None, None, None), audit_fields),
    }
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Appends the op's row to this station's audit chain (in the op's
/// savepoint): detail = the op and its reply as JSON (no key material: the
/// audit key is never serialized), hashed like the SQLite log's rows with
/// the station's own sequence number.
fn append_audit(
    tx: &mut Transaction<'_>,
    station: &str,
    op: &Op,
    reply: &Reply,
    ts: &str,
) -> Result<(), postgres::Error> {
    let last = tx.query_opt(
        "SELECT station_seq, hash FROM audit WHERE station_id = $1 ORDER BY station_seq DESC LIMIT 1",
        &[&station],
    )?;
    let (seq, prev_hash) = last.map_or((1, GENESIS.to_string()), |r| (r.get::<_, i64>(0) + 1, r.get(1)));
    let (kind, card_id, step, batch_id) = audit_fields(op);
    let batch_id = match (op, reply) {
        (Op::StartBatch(_), Reply::Id(id)) => Some(*id),
        _ => batch_id,
    };
    let detail = serde_json::json!({ "op": op, "reply": reply }).to_string();
    let mut row = super::audit::AuditRow {
        seq,
        batch_id,
        at: ts.to_string(),
        kind: kind.to_string(),
        card_id,
        step,
        detail,
        prev_hash,
        hash: String::new(),
    };
    row.hash = row.compute_hash();
    tx.execute(
        "INSERT INTO audit (batch_id, at, kind, card_id, step, detail, prev_hash, hash, station_id, station_seq)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        &[
            &row.batch_id,
            &row.at,
            &row.kind,
            &row.card_id,
            &row.step,
            &row.detail,
            &row.prev_hash,
            &row.hash,
            &station,
            &row.seq,
        ],
    )?;
    Ok(())
}

/// One station's audit chain on PostgreSQL, as checked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChainReport {
    pub station: String,
    pub rows: usize,
    /// What is wrong, first problem first (empty when intact).
    pub problems: Vec<String>,
}

/// Checks every station's audit chain: sequence numbers dense from 1, each
/// row's hash from its content, each `prev_hash` the row before's. The
/// tables are not compared with the log and there are no signed heads on
/// PostgreSQL (docs/ledger.md).
pub fn verify_chains(url: &str) -> Result<Vec<ChainReport>, LedgerError> {
    let mut client = open_client(url)?;
    let shown = super::target::redact(url);
    let err = |e: postgres::Error| LedgerError::Postgres { target: shown.clone(), detail: describe(&e) };
    let rows = client
        .query(
            "SELECT station_id, station_seq, batch_id, at, kind, card_id, step, detail, prev_hash, hash
             FROM audit WHERE station_id IS NOT NULL ORDER BY station_id, station_seq",
            &[],
        )
        .map_err(err)?;
    let mut reports: Vec<ChainReport> = Vec::new();
    let mut prev = GENESIS.to_string();
    for r in &rows {
        let station: String = r.get(0);
        if reports.last().is_none_or(|c| c.station != station) {
            reports.push(ChainReport { station: station.clone(), rows: 0, problems: Vec::new() });
            prev = GENESIS.to_string();
        }
        let Some(report) = reports.last_mut() else { continue };
        report.rows += 1;
        if !report.problems.is_empty() {
            // The first problem is the one to look at; the rest follow from it.
            continue;
        }
        let row = super::audit::AuditRow {
            seq: r.get(1),
            batch_id: r.get(2),
            at: r.get(3),
            kind: r.get(4),
            card_id: r.get(5),
            step: r.get(6),
            detail: r.get(7),
            prev_hash: r.get(8),
            hash: r.get(9),
        };
        let expected_seq = report.rows as i64;
        if row.seq != expected_seq {
            report.problems.push(format!("station {station}: seq {expected_seq} is missing (next is {})", row.seq));
        } else if row.prev_hash != prev {
            report
                .problems
                .push(format!("station {station}: seq {}: prev_hash is not the hash of the row before", row.seq));
        } else if row.compute_hash() != row.hash {
            report
                .problems
                .push(format!("station {station}: seq {}: edited (its hash does not match its content)", row.seq));
        }
        prev = row.hash;
    }
    Ok(reports)
}

/// A stored result: the reply, or the refusal's words.
fn encode(r: &Result<Reply, String>) -> String {
    let v = match r {
        Ok(reply) => serde_json::json!({ "ok": reply }),
        Err(e) => serde_json::json!({ "err": e }),
    };
    v.to_string()
}

fn decode(text: &str) -> Result<Reply, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("stored result unreadable: {e}"))?;
    if let Some(e) = v.get("err").and_then(serde_json::Value::as_str) {
        return Err(e.to_string());
    }
    serde_json::from_value(v.get("ok").cloned().unwrap_or_default())
        .map_err(|e| format!("stored result unreadable: {e}"))
}

/// Applies one op in its own savepoint and stores its result under its op
/// id, in `tx`. `Ok(Err(..))` is a refusal (stored too); `Err` is a failed
/// connection (the caller finds out later what committed).
fn apply_one(
    tx: &mut Transaction<'_>,
    op_id: &str,
    op: &Op,
    ts: &str,
    station: &str,
) -> Result<Result<Reply, String>, postgres::Error> {
    let mut sp = tx.savepoint("op")?;
    let mut r = apply(&mut sp, op, ts, station);
    // Two stations that both hold one card and want the other's (only
    // clones do that) deadlock; PostgreSQL breaks it by failing one
    // statement. That op runs again once instead of being refused.
    if let Err(ApplyError::Sql(e)) = &r
        && e.code().is_some_and(|c| {
            *c == postgres::error::SqlState::T_R_DEADLOCK_DETECTED
                || *c == postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
        })
    {
        sp.rollback()?;
        sp = tx.savepoint("op")?;
        r = apply(&mut sp, op, ts, station);
    }
    let result = match r {
        Ok(reply) => {
            append_audit(&mut sp, station, op, &reply, ts)?;
            let ok = Ok(reply);
            sp.execute(
                "INSERT INTO ops (op_id, station_id, reply, at) VALUES ($1, $2, $3, $4)",
                &[&op_id, &station, &encode(&ok), &ts],
            )?;
            sp.commit()?;
            return Ok(ok);
        }
        Err(ApplyError::Sql(e)) if is_connection(&e) => return Err(e),
        Err(ApplyError::Sql(e)) => Err(describe(&e)),
        Err(ApplyError::Refused(m)) => Err(m),
    };
    sp.rollback()?;
    tx.execute(
        "INSERT INTO ops (op_id, station_id, reply, at) VALUES ($1, $2, $3, $4)",
        &[&op_id, &station, &encode(&result), &ts],
    )?;
    Ok(result)
}

pub(super) struct PgBackend {
    url: String,
    shown: String,
    station: String,
    client: Option<Client>,
    outbox: Outbox,
    shared: Arc<Shared>,
    next_try: Instant,
}

impl PgBackend {
    /// Connects and migrates (the database must be reachable when a
    /// station starts), then drains what an earlier run left in the outbox.
    pub(super) fn open(url: &str, station: &str, outbox: &Path, shared: Arc<Shared>) -> Result<Self, LedgerError> {
        let client = open_client(url)?;
        let outbox = Outbox::open(outbox)?;
        let mut b = Self {
            url: url.to_string(),
            shown: super::target::redact(url),
            station: station.to_string(),
            client: Some(client),
            outbox,
            shared,
            next_try: Instant::now(),
        };
        if !b.outbox.is_empty() {
            tracing::info!(ledger = %b.shown, ops = b.outbox.len(), "draining the outbox of an earlier run");
            b.drain();
        }
        b.publish();
        Ok(b)
    }

    fn publish(&self) {
        self.shared.set(LedgerStatus { online: self.client.is_some(), outbox_ops: self.outbox.len() });
    }

    /// A connection, (re)connecting when none is open and a retry is due.
    fn ensure_client(&mut self) -> bool {
        if self.client.is_some() {
            return true;
        }
        if Instant::now() < self.next_try {
            return false;
        }
        match connect(&self.url) {
            Ok(c) => {
                tracing::info!(ledger = %self.shown, "ledger database reachable again");
                self.client = Some(c);
            }
            Err(e) => {
                tracing::debug!(ledger = %self.shown, error = %describe(&e), "ledger database still unreachable");
                self.next_try = Instant::now() + RETRY_EVERY;
            }
        }
        self.publish();
        self.client.is_some()
    }

    fn lost(&mut self, e: &postgres::Error) {
        if self.client.take().is_some() {
            tracing::warn!(ledger = %self.shown, error = %describe(e), "lost the ledger database; ops go to the outbox");
        }
        self.next_try = Instant::now() + RETRY_EVERY;
        self.publish();
    }

    /// One transaction for the group; `Err` when the connection failed.
    fn run(&mut self, group: &[(&str, &Op)], ts: &str) -> Result<Vec<Result<Reply, String>>, postgres::Error> {
        let station = self.station.clone();
        let Some(client) = self.client.as_mut() else { unreachable_client() };
        let mut tx = client.transaction()?;
        let mut results = Vec::with_capacity(group.len());
        for (op_id, op) in group {
            results.push(apply_one(&mut tx, op_id, op, ts, &station)?);
        }
        tx.commit()?;
        Ok(results)
    }

    /// The stored results of those of `ids` the database has applied.
    fn lookup(&mut self, ids: &[&str]) -> Result<HashMap<String, Result<Reply, String>>, postgres::Error> {
        let Some(client) = self.client.as_mut() else { unreachable_client() };
        let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        let rows = client.query("SELECT op_id, reply FROM ops WHERE op_id = ANY($1)", &[&ids])?;
        Ok(rows.iter().map(|r| (r.get::<_, String>(0), decode(&r.get::<_, String>(1)))).collect())
    }

    /// Moves the outbox into the database in order, a chunk per
    /// transaction; stops at the first connection failure.
    fn drain(&mut self) {
        while !self.outbox.is_empty() {
            if !self.ensure_client() {
                return;
            }
            let chunk = match self.outbox.peek(DRAIN_CHUNK) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(outbox = %self.outbox.path().display(), error = %e, "cannot read the outbox");
                    return;
                }
            };
            let Some(last) = chunk.last().map(|q| q.seq) else { return };
            let station = self.station.clone();
            let shown = self.shown.clone();
            let Some(client) = self.client.as_mut() else { return };
            let r = (|| -> Result<(), postgres::Error> {
                let mut tx = client.transaction()?;
                for q in &chunk {
                    if tx.query_opt("SELECT 1 FROM ops WHERE op_id = $1", &[&q.op_id])?.is_some() {
                        continue; // applied before (its commit's answer was lost)
                    }
                    let op: Op = match serde_json::from_str(&q.op) {
                        Ok(op) => op,
                        Err(e) => {
                            tracing::error!(op = %q.op_id, error = %e, "outbox op unreadable; skipped");
                            continue;
                        }
                    };
                    if let Err(refusal) = apply_one(&mut tx, &q.op_id, &op, &q.at, &station)? {
                        tracing::warn!(ledger = %shown, op = %q.op_id, "outbox op refused on drain: {refusal}");
                    }
                }
                tx.commit()
            })();
            match r {
                Ok(()) => {
                    if let Err(e) = self.outbox.remove_through(last) {
                        tracing::error!(outbox = %self.outbox.path().display(), error = %e, "cannot trim the outbox");
                        return;
                    }
                    self.publish();
                }
                Err(e) => {
                    self.lost(&e);
                    return;
                }
            }
        }
        tracing::info!(ledger = %self.shown, "outbox drained");
    }

    /// Queues ops while the database is away. A batch cannot start offline
    /// (its id comes from the database): that is refused, not queued.
    fn queue(&mut self, group: &[(&str, &Op)], ts: &str) -> Vec<Result<Reply, String>> {
        let mut items = Vec::new();
        let mut results = Vec::with_capacity(group.len());
        for (op_id, op) in group {
            if matches!(op, Op::StartBatch(_)) {
                results.push(Err(format!(
                    "PostgreSQL {} is unreachable: a batch starts only with the database (its id comes from there)",
                    self.shown
                )));
                continue;
            }
            match serde_json::to_string(op) {
                Ok(json) => {
                    items.push((op_id.to_string(), ts.to_string(), json));
                    results.push(Ok(Reply::Queued));
                }
                Err(e) => results.push(Err(format!("cannot queue op: {e}"))),
            }
        }
        if let Err(e) = self.outbox.push(&items) {
            let m = format!("ledger database unreachable and the outbox {} failed: {e}", self.outbox.path().display());
            tracing::error!("{m}");
            return group.iter().map(|_| Err(m.clone())).collect();
        }
        self.publish();
        results
    }
}

fn unreachable_client() -> ! {
    unreachable!("called only with an open connection")
}

impl Backend for PgBackend {
    fn apply_group(&mut self, group: &[(&str, &Op)], ts: &str) -> Vec<Result<Reply, String>> {
        if !self.outbox.is_empty() {
            self.drain();
        }
        let mut pending: Vec<usize> = (0..group.len()).collect();
        let mut results: Vec<Option<Result<Reply, String>>> = vec![None; group.len()];
        // A few rounds: a round whose commit's answer is lost is looked up
        // by op id; what did not commit runs again.
        for _ in 0..3 {
            if pending.is_empty() || !self.outbox.is_empty() || !self.ensure_client() {
                break;
            }
            let sub: Vec<(&str, &Op)> = pending.iter().map(|&i| group[i]).collect();
            match self.run(&sub, ts) {
                Ok(rs) => {
                    for (&i, r) in pending.iter().zip(rs) {
                        results[i] = Some(r);
                    }
                    pending.clear();
                }
                Err(e) => {
                    tracing::warn!(ledger = %self.shown, error = %describe(&e),
                        "connection lost before the commit was confirmed; looking up what committed");
                    self.lost(&e);
                    self.next_try = Instant::now();
                    if !self.ensure_client() {
                        break;
                    }
                    let ids: Vec<&str> = pending.iter().map(|&i| group[i].0).collect();
                    match self.lookup(&ids) {
                        Ok(found) => {
                            pending.retain(|&i| match found.get(group[i].0) {
                                Some(stored) => {
                                    tracing::info!(op = %group[i].0, "op had committed; returning its stored result");
                                    results[i] = Some(stored.clone());
                                    false
                                }
                                None => true,
                            });
                        }
                        Err(e) => self.lost(&e),
                    }
                }
            }
        }
        if !pending.is_empty() {
            // Unknown or not applied: into the outbox, where the op id keeps
            // an op that did commit from applying twice.
            let sub: Vec<(&str, &Op)> = pending.iter().map(|&i| group[i]).collect();
            for (&i, r) in pending.iter().zip(self.queue(&sub, ts)) {
                results[i] = Some(r);
            }
        }
        results.into_iter().map(|r| r.unwrap_or_else(|| Err("not applied".into()))).collect()
    }

    fn idle(&mut self) {
        if !self.outbox.is_empty() {
            self.drain();
        } else if self.client.is_none() {
            self.ensure_client();
        }
    }

    fn close(&mut self) {
        if !self.outbox.is_empty() {
            self.next_try = Instant::now();
            self.drain();
            if !self.outbox.is_empty() {
                tracing::warn!(outbox = %self.outbox.path().display(), ops = self.outbox.len(),
                    "stopping with ops in the outbox: the next start drains them");
            }
        }
    }
}

/// A throwaway database on the test server (`TAPLINE_TEST_PG`, default
/// postgres://postgres@127.0.0.1:5432), dropped when done.
#[cfg(test)]
pub(crate) mod testdb {
    pub struct TestDb {
        pub url: String,
        name: String,
        base: String,
    }

    fn base() -> String {
        std::env::var("TAPLINE_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
    }

    impl TestDb {
        pub fn new() -> Self {
            let base = base();
            let mut r = [0u8; 6];
            getrandom::fill(&mut r).expect("random");
            let name = format!("tapline_t_{}", hex::encode(r));
            let mut admin = postgres::Client::connect(&format!("{base}/test"), postgres::NoTls)
                .unwrap_or_else(|e| panic!("the test PostgreSQL at {base}/test: {e}"));
            admin.batch_execute(&format!("CREATE DATABASE {name}")).expect("create database");
            Self { url: format!("{base}/{name}"), name, base }
        }
    }

    impl Drop for TestDb {
        fn drop(&mut self) {
            if let Ok(mut admin) = postgres::Client::connect(&format!("{}/test", self.base), postgres::NoTls) {
                let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testdb::TestDb;
    use super::*;
    use crate::ledger::BatchInfo;

    #[test]
    fn stations_starting_together_migrate_once() {
        let db = TestDb::new();
        let barrier = Arc::new(std::sync::Barrier::new(6));
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let (url, barrier) = (db.url.clone(), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    let mut c = connect(&url).expect("connect");
                    barrier.wait();
                    migrate(&mut c).expect("sql").expect("migrated")
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let mut c = connect(&db.url).expect("connect");
        let versions: Vec<i64> = c
            .query("SELECT version FROM schema_version ORDER BY version", &[])
            .expect("q")
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(versions, (1..=MIGRATIONS.len() as i64).collect::<Vec<_>>(), "each version applied once");
        assert_eq!(MIGRATIONS.len(), crate::ledger::SCHEMA_VERSION, "both backends at the same schema version");
        c.execute("INSERT INTO schema_version (version) VALUES (99)", &[]).expect("bump");
        let err = open_client(&db.url).err().expect("a newer schema is refused");
        assert!(err.to_string().contains("newer"), "{err}");
        assert!(err.to_string().contains(&super::super::target::redact(&db.url)), "{err}");
    }

    #[test]
    fn recovery_fails_only_this_stations_cards_and_batches() {
        use crate::ledger::{INTERRUPTED, Ledger, LedgerTarget, OpenOptions, Recovered};
        use card::CardId;
        let db = TestDb::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = |station: &str| OpenOptions {
            target: LedgerTarget::parse(&db.url).expect("url"),
            station_id: station.into(),
            outbox: Some(dir.path().join(format!("outbox-{station}.db"))),
        };
        let info = |name: &str| BatchInfo {
            name: name.into(),
            profile: "p".into(),
            product: "x".into(),
            firmware: "f".into(),
            firmware_sha256: "00".into(),
        };
        let (a, b_card) = (CardId([0xA1; 10]), CardId([0xB1; 10]));
        let (la, wa) = Ledger::open_with(&opts("st-a")).expect("open a");
        let batch_a = la.start_batch(info("a")).expect("batch a");
        la.begin_card(a, "ra", batch_a, "", "").expect("begin a");
        la.step(a, 1, "firmware", crate::ledger::StepEvent::Intent, "", "ra").expect("intent a");
        let (lb, wb) = Ledger::open_with(&opts("st-b")).expect("open b");
        let batch_b = lb.start_batch(info("b")).expect("batch b");
        lb.begin_card(b_card, "rb", batch_b, "", "").expect("begin b");
        // Station B dies and starts again: its card is recovered, A's not.
        drop(lb);
        wb.close();
        let (lb, wb, r) = Ledger::open_for_provisioning(&opts("st-b"), None).expect("reopen b");
        assert_eq!(r, Recovered { cards: 1, batches: 1, bundles: 0 });
        drop(lb);
        wb.close();
        let mut c = connect(&db.url).expect("connect");
        let card = |c: &mut Client, id: CardId| {
            let r = c
                .query_one(
                    "SELECT status, failure_reason, retryable, failed_step, held_by FROM cards WHERE card_id = $1",
                    &[&id.to_hex()],
                )
                .expect("card");
            (
                r.get::<_, String>(0),
                r.get::<_, Option<String>>(1),
                r.get::<_, Option<i64>>(2),
                r.get::<_, Option<String>>(3),
                r.get::<_, Option<String>>(4),
            )
        };
        assert_eq!(
            card(&mut c, b_card),
            ("failed".into(), Some(INTERRUPTED.into()), Some(1), Some("identify".into()), None)
        );
        assert_eq!(
            card(&mut c, a),
            ("in_progress".into(), None, None, None, Some("st-a".into())),
            "station A's card is not touched"
        );
        let finished = |c: &mut Client, id: i64| {
            c.query_one("SELECT finished_at IS NOT NULL FROM batches WHERE id = $1", &[&id])
                .expect("batch")
                .get::<_, bool>(0)
        };
        assert!(finished(&mut c, batch_b), "B's interrupted batch is closed");
        assert!(!finished(&mut c, batch_a), "A's running batch is not");
        let journal: i64 = c
            .query_one(
                "SELECT COUNT(*) FROM steps WHERE card_id = $1 AND event = 'failed' AND station_id = 'st-b'",
                &[&b_card.to_hex()],
            )
            .expect("steps")
            .get(0);
        assert_eq!(journal, 1);
        // A is still at work: its card goes on.
        la.step(a, 1, "firmware", crate::ledger::StepEvent::Done, "", "ra").expect("a continues");
        la.pass(a, 1, "ready_for_pairing").expect("pass a");
        drop(la);
        wa.close();
        assert!(verify_chains(&db.url).expect("chains").iter().all(|ch| ch.problems.is_empty()));
    }

    #[test]
    fn the_same_op_id_applies_once_and_returns_the_stored_result() {
        let db = TestDb::new();
        let mut c = open_client(&db.url).expect("open");
        let batch = {
            let mut tx = c.transaction().expect("tx");
            let info = BatchInfo {
                name: "b".into(),
                profile: "p".into(),
                product: "x".into(),
                firmware: "f".into(),
                firmware_sha256: "00".into(),
            };
            let r = apply_one(&mut tx, "st/1/0", &Op::StartBatch(info), "t", "st").expect("sql").expect("ok");
            tx.commit().expect("commit");
            match r {
                Reply::Id(id) => id,
                other => panic!("{other:?}"),
            }
        };
        let card = card::CardId([7; 10]);
        let begin = Op::BeginCard { card, reader: "r".into(), batch, atr: String::new(), cplc: String::new() };
        let pass = Op::Pass { card, attempt: 1, stage: "ready_for_pairing".into() };
        let shared = Arc::new(Shared::default());
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = PgBackend::open(&db.url, "st", &dir.path().join("ob.db"), shared).expect("backend");
        let first = b.apply_group(&[("st/1/1", &begin), ("st/1/2", &pass)], "t");
        let serial = match &first[1] {
            Ok(Reply::Id(s)) => *s,
            other => panic!("{other:?}"),
        };
        // What a retry after a lost answer does: look the ops up.
        let found = b.lookup(&["st/1/1", "st/1/2", "st/1/3"]).expect("lookup");
        assert_eq!(found.len(), 2);
        assert_eq!(found["st/1/2"], Ok(Reply::Id(serial)));
        assert_eq!(found["st/1/1"], Ok(Reply::Prior(None)));
        let n: i64 = c.query_one("SELECT COUNT(*) FROM cards", &[]).expect("q").get(0);
        assert_eq!(n, 1);
        // Another station's claim refuses a second station, naming the holder.
        let other = Op::BeginCard {
            card: card::CardId([8; 10]),
            reader: "r".into(),
            batch,
            atr: String::new(),
            cplc: String::new(),
        };
        assert!(matches!(b.apply_group(&[("st/1/4", &other)], "t")[0], Ok(Reply::Prior(None))));
        let shared2 = Arc::new(Shared::default());
        let mut b2 = PgBackend::open(&db.url, "st-2", &dir.path().join("ob2.db"), shared2).expect("backend 2");
        let again = Op::BeginCard {
            card: card::CardId([8; 10]),
            reader: "r9".into(),
            batch,
            atr: String::new(),
            cplc: String::new(),
        };
        assert_eq!(b2.apply_group(&[("st-2/1/0", &again)], "t")[0], Ok(Reply::Held { station: "st".into() }));
        // A passed card is no one's: the second station learns it passed.
        let seen = Op::BeginCard { card, reader: "r9".into(), batch, atr: String::new(), cplc: String::new() };
        match &b2.apply_group(&[("st-2/1/1", &seen)], "t")[0] {
            Ok(Reply::Prior(Some(p))) => assert_eq!(p.status, CardStatus::Passed),
            other => panic!("{other:?}"),
        }
    }
}
