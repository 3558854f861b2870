//! The ledger: the station's durable record of batches, cards and every
//! recipe step. Only this module talks SQL. One writer thread owns the write
//! connection; callers block until their change is committed (WAL,
//! `synchronous = FULL`), and the writer commits the requests of all readers
//! that arrive together in one transaction (group commit), so durability
//! costs one fsync per round, not per card.

pub mod audit;
pub mod export;
pub mod outbox;
pub mod pg;
pub mod read;
mod schema;
pub mod sync;
mod target;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use card::CardId;
use crossbeam_channel::{Receiver, Sender};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

pub use audit::AuditKey;
pub use schema::SCHEMA_VERSION;
pub use target::{LedgerTarget, ReadCopy};

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("ledger {path}: {detail}")]
    Refused { path: PathBuf, detail: String },
    #[error("ledger writer has stopped")]
    WriterGone,
    #[error("ledger {target}: {detail}")]
    Postgres { target: String, detail: String },
    /// The card is in progress at another station of the line.
    #[error("card {card} is in progress at station {station}: finish it there (or wait for its lease to run out)")]
    Held { card: String, station: String },
}

/// A card's status as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CardStatus {
    InProgress,
    Passed,
    Failed,
}

impl CardStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InProgress => "in_progress",
            Self::Passed => "passed",
            Self::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "passed" => Self::Passed,
            "failed" => Self::Failed,
            _ => Self::InProgress,
        }
    }
}

/// What the ledger knew of a card when an attempt began.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriorRecord {
    pub status: CardStatus,
    pub attempts: u32,
    pub gp_key_version: Option<u8>,
    pub card_public_key: Option<String>,
    pub attest_counter: Option<u32>,
}

/// Columns a step may set on the card row (None = leave as is).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardUpdate {
    pub gp_key_version: Option<u8>,
    pub firmware_sha256: Option<String>,
    pub card_public_key: Option<String>,
    pub ca_key_id: Option<String>,
    pub attest_counter: Option<u32>,
    pub attested: Option<bool>,
    pub self_tests: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepEvent {
    Intent,
    Done,
    Failed,
    Refused,
}

impl StepEvent {
    fn as_str(self) -> &'static str {
        match self {
            Self::Intent => "intent",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Refused => "refused",
        }
    }
}

/// A new batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchInfo {
    pub name: String,
    pub profile: String,
    pub product: String,
    pub firmware: String,
    pub firmware_sha256: String,
}

/// One change to the ledger. Serializable so an op can wait in the
/// PostgreSQL backend's outbox (`outbox.rs`) while the database is away;
/// the audit key never goes there (heads are signed on SQLite only).
#[derive(Debug, Serialize, Deserialize)]
enum Op {
    StartBatch(BatchInfo),
    FinishBatch {
        batch: i64,
        #[serde(skip)]
        key: Option<AuditKey>,
    },
    BeginCard {
        #[serde(with = "card_hex")]
        card: CardId,
        reader: String,
        batch: i64,
        atr: String,
        cplc: String,
    },
    Step {
        #[serde(with = "card_hex")]
        card: CardId,
        attempt: u32,
        step: String,
        event: StepEvent,
        detail: String,
        reader: String,
    },
    StepDone {
        #[serde(with = "card_hex")]
        card: CardId,
        attempt: u32,
        step: String,
        detail: String,
        update: CardUpdate,
    },
    Pass {
        #[serde(with = "card_hex")]
        card: CardId,
        attempt: u32,
        stage: String,
    },
    Ready {
        #[serde(with = "card_hex")]
        card: CardId,
        attempt: u32,
    },
    BundleStart {
        bundle: String,
        batch: i64,
        #[serde(with = "members_hex")]
        members: Vec<(CardId, String)>,
    },
    BundleSealed {
        bundle: String,
        wallet_pubkey: String,
    },
    BundleAborted {
        bundle: String,
        reason: String,
    },
    Fail {
        #[serde(with = "card_hex")]
        card: CardId,
        attempt: u32,
        step: String,
        reason: String,
        detail: String,
        retryable: bool,
    },
    /// Several changes as one: all applied, or none (the reply is the
    /// last one's).
    Many(Vec<Op>),
    /// What a previous process of this station left when it stopped
    /// mid-card (`kill -9`, power loss): every card it held in progress is
    /// failed retryable at its current step with `reason`, its bundles
    /// still forming are aborted and its unfinished batches are finished
    /// (their heads signed with `key`). On SQLite it is applied and audited
    /// as those single changes (`Fail`, `BundleAborted`, `FinishBatch`).
    Recover {
        reason: String,
        #[serde(skip)]
        key: Option<AuditKey>,
    },
}

/// The reason recorded on a card that a stopped station left in progress
/// (stable: reports and operators match on it).
pub const INTERRUPTED: &str = "interrupted: the station stopped mid-card";

/// What [`Ledger::recover`] closed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovered {
    pub cards: u64,
    pub batches: u64,
    pub bundles: u64,
}

/// A card id as its hex text (the ledger's `card_id`).
mod card_hex {
    use card::CardId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(c: &CardId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&c.to_hex())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<CardId, D::Error> {
        let text = String::deserialize(d)?;
        text.parse::<CardId>().map_err(|e| serde::de::Error::custom(format!("card id {text:?}: {e}")))
    }
}

/// Bundle members (card id as hex, role).
mod members_hex {
    use card::CardId;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(m: &[(CardId, String)], s: S) -> Result<S::Ok, S::Error> {
        m.iter().map(|(c, r)| (c.to_hex(), r.as_str())).collect::<Vec<_>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(CardId, String)>, D::Error> {
        Vec::<(String, String)>::deserialize(d)?
            .into_iter()
            .map(|(c, r)| {
                c.parse::<CardId>().map(|c| (c, r)).map_err(|e| serde::de::Error::custom(format!("card id {c:?}: {e}")))
            })
            .collect()
    }
}

impl Op {
    /// The single changes of this op, in order (`Many` flattened).
    fn parts(&self) -> Vec<&Op> {
        match self {
            Op::Many(ops) => ops.iter().flat_map(Op::parts).collect(),
            op => vec![op],
        }
    }
}

fn step_ops(lines: Vec<StepLine>) -> Vec<Op> {
    lines
        .into_iter()
        .map(|l| Op::Step {
            card: l.card,
            attempt: l.attempt,
            step: l.step.to_string(),
            event: l.event,
            detail: l.detail,
            reader: l.reader,
        })
        .collect()
}

/// A step's success that the recipe writes together with the card's next
/// change (the next step's intent, its failure, or the card's result), in
/// one transaction: both are durable before the next step touches the
/// card, at one commit instead of two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    pub card: CardId,
    pub attempt: u32,
    pub step: &'static str,
    pub detail: String,
    pub update: CardUpdate,
}

impl Done {
    fn op(self) -> Op {
        Op::StepDone {
            card: self.card,
            attempt: self.attempt,
            step: self.step.to_string(),
            detail: self.detail,
            update: self.update,
        }
    }
}

/// One journal line for [`Ledger::steps`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepLine {
    pub card: CardId,
    pub attempt: u32,
    pub step: &'static str,
    pub event: StepEvent,
    pub detail: String,
    pub reader: String,
}

/// What a request got back. Stored with its op id on PostgreSQL (`ops`), so
/// a retry after a lost connection gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Reply {
    Unit,
    Id(i64),
    Prior(Option<PriorRecord>),
    #[serde(with = "serials_hex")]
    Serials(Vec<(CardId, i64)>),
    /// The card is in progress at another station (PostgreSQL): nothing
    /// was changed.
    Held {
        station: String,
    },
    /// Taken into the outbox while PostgreSQL is away: durable here, applied
    /// there in order when it returns (serials are allocated then).
    Queued,
    /// What [`Op::Recover`] closed.
    Recovered(Recovered),
}

/// Serials by card (card id as hex).
mod serials_hex {
    use card::CardId;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(m: &[(CardId, i64)], s: S) -> Result<S::Ok, S::Error> {
        m.iter().map(|(c, n)| (c.to_hex(), *n)).collect::<Vec<_>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(CardId, i64)>, D::Error> {
        Vec::<(String, i64)>::deserialize(d)?
            .into_iter()
            .map(|(c, n)| {
                c.parse::<CardId>().map(|c| (c, n)).map_err(|e| serde::de::Error::custom(format!("card id {c:?}: {e}")))
            })
            .collect()
    }
}

struct Request {
    op: Op,
    /// Unique for the life of the ledger (station, boot, counter): the key a
    /// retry finds the stored result by.
    op_id: String,
    reply: Sender<Result<Reply, String>>,
}

/// Whether the ledger's database is reachable and how many ops wait in the
/// outbox (always online with no outbox on SQLite).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LedgerStatus {
    pub online: bool,
    pub outbox_ops: u64,
}

/// Sees every change of [`LedgerStatus`] (metrics and the dashboard).
pub type StatusObserver = Arc<dyn Fn(LedgerStatus) + Send + Sync>;

/// Status shared by the handle and the writer thread.
#[derive(Default)]
pub(crate) struct Shared {
    status: std::sync::Mutex<LedgerStatus>,
    observer: OnceLock<StatusObserver>,
}

impl Shared {
    pub(crate) fn set(&self, status: LedgerStatus) {
        let changed = {
            let mut s = self.status.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let changed = *s != status;
            *s = status;
            changed
        };
        if changed && let Some(o) = self.observer.get() {
            o(status);
        }
    }

    fn get(&self) -> LedgerStatus {
        *self.status.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The writer handle: cheap to clone, one per worker.
#[derive(Clone)]
pub struct Ledger {
    tx: Sender<Request>,
    path: PathBuf,
    target: Arc<LedgerTarget>,
    station: Arc<str>,
    boot: Arc<str>,
    next_op: Arc<std::sync::atomic::AtomicU64>,
    observer: Arc<OnceLock<WriteObserver>>,
    shared: Arc<Shared>,
}

/// Sees how long each ledger write took, from request to durable commit
/// (the `tapline_ledger_write_seconds` metric).
pub type WriteObserver = Arc<dyn Fn(std::time::Duration) + Send + Sync>;

/// Owns the writer thread; dropping every `Ledger` and calling `close`
/// stops it after the last commit.
pub struct LedgerWriter {
    handle: JoinHandle<()>,
}

impl LedgerWriter {
    pub fn close(self) {
        let _ = self.handle.join();
    }
}

fn now() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format_utc(d.as_secs(), d.subsec_millis())
}

/// RFC 3339 UTC timestamp with milliseconds, without a date crate.
pub fn format_utc(secs: u64, millis: u32) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

pub(crate) fn open_connection(path: &Path) -> Result<Connection, LedgerError> {
    let sql = |source| LedgerError::Sqlite { path: path.to_path_buf(), source };
    let conn = Connection::open(path).map_err(sql)?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(sql)?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(sql)?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(sql)?;
    conn.pragma_update(None, "foreign_keys", "ON").map_err(sql)?;
    Ok(conn)
}

/// The station id when none is given: the host name.
pub fn default_station_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "station".to_string())
}

/// Where the ledger lives and what this station is called in it.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub target: LedgerTarget,
    /// Written on every batch, card, step and bundle row.
    pub station_id: String,
    /// PostgreSQL only: the local outbox file that holds ops while the
    /// database is away (default `tapline-outbox-<station>.db`).
    pub outbox: Option<PathBuf>,
}

impl OpenOptions {
    pub fn new(target: LedgerTarget, station_id: &str) -> Self {
        Self { target, station_id: station_id.to_string(), outbox: None }
    }

    /// The outbox file (PostgreSQL).
    pub fn outbox_path(&self) -> PathBuf {
        self.outbox.clone().unwrap_or_else(|| PathBuf::from(format!("tapline-outbox-{}.db", self.station_id)))
    }
}

/// A backend's side of the writer thread: applies one group of requests as
/// one transaction and gives one result per request.
trait Backend: Send {
    fn apply_group(&mut self, group: &[(&str, &Op)], ts: &str) -> Vec<Result<Reply, String>>;
    /// Called when no request came for a while (the outbox drains here).
    fn idle(&mut self) {}
    /// Called once after the last request (a last outbox drain).
    fn close(&mut self) {}
}

impl Ledger {
    /// Opens (creating and migrating) the SQLite ledger file and starts its
    /// writer; the station id is the host name.
    pub fn open(path: &Path) -> Result<(Ledger, LedgerWriter), LedgerError> {
        Self::open_with(&OpenOptions::new(LedgerTarget::Sqlite(path.to_path_buf()), &default_station_id()))
    }

    /// Opens the ledger `options` name (SQLite file or PostgreSQL), applying
    /// its migrations, and starts its writer.
    pub fn open_with(options: &OpenOptions) -> Result<(Ledger, LedgerWriter), LedgerError> {
        let shared = Arc::new(Shared::default());
        let path = options.target.where_();
        let backend: Box<dyn Backend> = match &options.target {
            LedgerTarget::Sqlite(file) => {
                let mut conn = open_connection(file)?;
                schema::migrate(&mut conn, &now())
                    .map_err(|source| LedgerError::Sqlite { path: file.clone(), source })?
                    .map_err(|detail| LedgerError::Refused { path: file.clone(), detail })?;
                shared.set(LedgerStatus { online: true, outbox_ops: 0 });
                Box::new(SqliteBackend { conn, path: file.clone(), station: options.station_id.clone() })
            }
            LedgerTarget::Postgres(url) => {
                Box::new(pg::PgBackend::open(url, &options.station_id, &options.outbox_path(), Arc::clone(&shared))?)
            }
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        let handle = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || writer(backend, rx))
            .map_err(|e| LedgerError::Refused { path: path.clone(), detail: e.to_string() })?;
        let mut boot = [0u8; 6];
        let _ = getrandom::fill(&mut boot);
        Ok((
            Ledger {
                tx,
                path,
                target: Arc::new(options.target.clone()),
                station: Arc::from(options.station_id.as_str()),
                boot: Arc::from(hex::encode(boot).as_str()),
                next_op: Arc::default(),
                observer: Arc::default(),
                shared,
            },
            LedgerWriter { handle },
        ))
    }

    /// Opens the ledger for provisioning (`station run`, `station daemon`):
    /// [`Ledger::open_with`], then [`Ledger::recover`] of what a previous
    /// process of this station left in progress. `key` signs the heads of
    /// the batches it closes.
    pub fn open_for_provisioning(
        options: &OpenOptions,
        key: Option<&AuditKey>,
    ) -> Result<(Ledger, LedgerWriter, Recovered), LedgerError> {
        let (ledger, writer) = Self::open_with(options)?;
        let recovered = ledger.recover(key)?;
        tracing::info!(
            ledger = %ledger.path().display(),
            station = %ledger.station_id(),
            cards = recovered.cards,
            batches = recovered.batches,
            bundles = recovered.bundles,
            "recovered what a previous run of this station left in progress (cards failed retryable: {INTERRUPTED})"
        );
        Ok((ledger, writer, recovered))
    }

    /// Closes what a previous process of this station left when it stopped
    /// mid-card: its cards still in progress are failed retryable at their
    /// current step ([`INTERRUPTED`]; presenting one again resumes it), its
    /// bundles still forming are aborted and its unfinished batches are
    /// finished, in one transaction. SQLite: everything in the file;
    /// PostgreSQL: only what this station holds, never another station's.
    /// Call it before this process starts any card.
    pub fn recover(&self, key: Option<&AuditKey>) -> Result<Recovered, LedgerError> {
        match self.call(Op::Recover { reason: INTERRUPTED.to_string(), key: key.cloned() })? {
            Reply::Recovered(r) => Ok(r),
            // PostgreSQL away: applied from the outbox when it returns.
            Reply::Queued => Ok(Recovered::default()),
            _ => Err(LedgerError::WriterGone),
        }
    }

    /// The SQLite file, or for PostgreSQL its URL without the password
    /// (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn target(&self) -> &LedgerTarget {
        &self.target
    }

    pub fn station_id(&self) -> &str {
        &self.station
    }

    /// Online, and how many ops wait in the outbox.
    pub fn status(&self) -> LedgerStatus {
        self.shared.get()
    }

    /// Sets the observer of write latencies (once; later calls are ignored).
    pub fn observe_writes(&self, observer: WriteObserver) {
        let _ = self.observer.set(observer);
    }

    /// Sets the observer of status changes (once) and gives it the status now.
    pub fn observe_status(&self, observer: StatusObserver) {
        let now = self.shared.get();
        if self.shared.observer.set(Arc::clone(&observer)).is_ok() {
            observer(now);
        }
    }

    /// `op`, after `done` when there is one, in one transaction.
    fn call_after(&self, done: Option<Done>, op: Op) -> Result<Reply, LedgerError> {
        match done {
            Some(d) => self.call(Op::Many(vec![d.op(), op])),
            None => self.call(op),
        }
    }

    fn call(&self, op: Op) -> Result<Reply, LedgerError> {
        let started = std::time::Instant::now();
        let (reply, rx) = crossbeam_channel::bounded(1);
        let n = self.next_op.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let op_id = format!("{}/{}/{n}", self.station, self.boot);
        self.tx.send(Request { op, op_id, reply }).map_err(|_| LedgerError::WriterGone)?;
        let r = rx
            .recv()
            .map_err(|_| LedgerError::WriterGone)?
            .map_err(|detail| LedgerError::Refused { path: self.path.clone(), detail });
        if let Some(o) = self.observer.get() {
            o(started.elapsed());
        }
        r
    }

    pub fn start_batch(&self, info: BatchInfo) -> Result<i64, LedgerError> {
        match self.call(Op::StartBatch(info))? {
            Reply::Id(id) => Ok(id),
            _ => Err(LedgerError::WriterGone),
        }
    }

    /// Records the batch finished and closes its stretch of the audit log
    /// with a head signed by `key` (unsigned without one; `ledger verify`
    /// then warns).
    pub fn finish_batch(&self, batch: i64, key: Option<&AuditKey>) -> Result<(), LedgerError> {
        self.call(Op::FinishBatch { batch, key: key.cloned() }).map(|_| ())
    }

    /// Records the start of an attempt on a card (creating its row on first
    /// sight) and returns what was known before. A card already passed is
    /// left untouched. On PostgreSQL the attempt claims the card for this
    /// station: a card in progress at another station is refused
    /// ([`LedgerError::Held`]) and nothing is changed.
    pub fn begin_card(
        &self,
        card: CardId,
        reader: &str,
        batch: i64,
        atr: &str,
        cplc: &str,
    ) -> Result<Option<PriorRecord>, LedgerError> {
        let op =
            Op::BeginCard { card, reader: reader.to_string(), batch, atr: atr.to_string(), cplc: cplc.to_string() };
        match self.call(op)? {
            Reply::Prior(p) => Ok(p),
            // Offline: the shared record is out of reach; the card is
            // treated as new here and reconciled on drain (docs/ledger.md).
            Reply::Queued => Ok(None),
            Reply::Held { station } => Err(LedgerError::Held { card: card.to_hex(), station }),
            _ => Err(LedgerError::WriterGone),
        }
    }

    pub fn step(
        &self,
        card: CardId,
        attempt: u32,
        step: &'static str,
        event: StepEvent,
        detail: &str,
        reader: &str,
    ) -> Result<(), LedgerError> {
        self.step_after(None, card, attempt, step, event, detail, reader)
    }

    /// [`Ledger::step`] after a step's success, in one transaction.
    #[allow(clippy::too_many_arguments)]
    pub fn step_after(
        &self,
        done: Option<Done>,
        card: CardId,
        attempt: u32,
        step: &'static str,
        event: StepEvent,
        detail: &str,
        reader: &str,
    ) -> Result<(), LedgerError> {
        let op = Op::Step {
            card,
            attempt,
            step: step.to_string(),
            event,
            detail: detail.to_string(),
            reader: reader.to_string(),
        };
        self.call_after(done, op).map(|_| ())
    }

    /// Several journal lines (e.g. one pairing phase for every member of a
    /// bundle) in one transaction: one commit for all.
    pub fn steps(&self, lines: Vec<StepLine>) -> Result<(), LedgerError> {
        self.call(Op::Many(step_ops(lines))).map(|_| ())
    }

    /// Records a step's success together with what it established.
    pub fn step_done(
        &self,
        card: CardId,
        attempt: u32,
        step: &'static str,
        detail: &str,
        update: CardUpdate,
    ) -> Result<(), LedgerError> {
        self.call(Op::StepDone { card, attempt, step: step.to_string(), detail: detail.to_string(), update })
            .map(|_| ())
    }

    /// Marks the card passed at `stage` and allocates its serial; `None`
    /// when PostgreSQL is away: the pass is durable in the outbox and the
    /// serial is allocated when it drains.
    pub fn pass(&self, card: CardId, attempt: u32, stage: &'static str) -> Result<Option<i64>, LedgerError> {
        self.pass_after(None, card, attempt, stage)
    }

    /// [`Ledger::pass`] after a step's success, in one transaction.
    pub fn pass_after(
        &self,
        done: Option<Done>,
        card: CardId,
        attempt: u32,
        stage: &'static str,
    ) -> Result<Option<i64>, LedgerError> {
        match self.call_after(done, Op::Pass { card, attempt, stage: stage.to_string() })? {
            Reply::Id(serial) => Ok(Some(serial)),
            Reply::Queued => Ok(None),
            _ => Err(LedgerError::WriterGone),
        }
    }

    /// Records that the card passed its own recipe and waits for pairing
    /// (it stays in progress until it is bundled or released).
    pub fn ready(&self, card: CardId, attempt: u32) -> Result<(), LedgerError> {
        self.ready_after(None, card, attempt)
    }

    /// [`Ledger::ready`] after a step's success, in one transaction.
    pub fn ready_after(&self, done: Option<Done>, card: CardId, attempt: u32) -> Result<(), LedgerError> {
        self.call_after(done, Op::Ready { card, attempt }).map(|_| ())
    }

    /// Records a bundle being formed from ready cards; `members` in
    /// position order with their roles ("primary" or "backup").
    pub fn bundle_start(
        &self,
        bundle: &str,
        batch: i64,
        members: Vec<(CardId, &'static str)>,
    ) -> Result<(), LedgerError> {
        let members = members.into_iter().map(|(c, r)| (c, r.to_string())).collect();
        self.call(Op::BundleStart { bundle: bundle.to_string(), batch, members }).map(|_| ())
    }

    /// Records a bundle sealed and verified: in one transaction every
    /// member passes (with its serial), joins the bundle with its role and
    /// the wallet public key. Refused unless every member is still in
    /// progress and in no other sealed bundle. Empty while PostgreSQL is
    /// away (the serials are allocated when the outbox drains).
    pub fn bundle_sealed(&self, bundle: &str, wallet_pubkey: &str) -> Result<Vec<(CardId, i64)>, LedgerError> {
        match self.call(Op::BundleSealed { bundle: bundle.to_string(), wallet_pubkey: wallet_pubkey.to_string() })? {
            Reply::Serials(v) => Ok(v),
            Reply::Queued => Ok(Vec::new()),
            _ => Err(LedgerError::WriterGone),
        }
    }

    /// [`Ledger::bundle_start`] and then journal `lines` (the members'
    /// first pairing intent), in one transaction.
    pub fn bundle_start_then(
        &self,
        bundle: &str,
        batch: i64,
        members: Vec<(CardId, &'static str)>,
        lines: Vec<StepLine>,
    ) -> Result<(), LedgerError> {
        let members = members.into_iter().map(|(c, r)| (c, r.to_string())).collect();
        let mut ops = vec![Op::BundleStart { bundle: bundle.to_string(), batch, members }];
        ops.extend(step_ops(lines));
        self.call(Op::Many(ops)).map(|_| ())
    }

    /// Journal `lines` (the members' last pairing result) and then
    /// [`Ledger::bundle_sealed`], in one transaction.
    pub fn bundle_sealed_after(
        &self,
        lines: Vec<StepLine>,
        bundle: &str,
        wallet_pubkey: &str,
    ) -> Result<Vec<(CardId, i64)>, LedgerError> {
        let mut ops = step_ops(lines);
        ops.push(Op::BundleSealed { bundle: bundle.to_string(), wallet_pubkey: wallet_pubkey.to_string() });
        match self.call(Op::Many(ops))? {
            Reply::Serials(v) => Ok(v),
            // Into the outbox while the database is away: the serials are
            // allocated when it drains (as for `bundle_sealed`).
            Reply::Queued => Ok(Vec::new()),
            _ => Err(LedgerError::WriterGone),
        }
    }

    pub fn bundle_aborted(&self, bundle: &str, reason: &str) -> Result<(), LedgerError> {
        self.call(Op::BundleAborted { bundle: bundle.to_string(), reason: reason.to_string() }).map(|_| ())
    }

    pub fn fail(
        &self,
        card: CardId,
        attempt: u32,
        step: &'static str,
        reason: &str,
        detail: &str,
        retryable: bool,
    ) -> Result<(), LedgerError> {
        self.fail_after(None, card, attempt, step, reason, detail, retryable)
    }

    /// [`Ledger::fail`] after a step's success, in one transaction.
    #[allow(clippy::too_many_arguments)]
    pub fn fail_after(
        &self,
        done: Option<Done>,
        card: CardId,
        attempt: u32,
        step: &'static str,
        reason: &str,
        detail: &str,
        retryable: bool,
    ) -> Result<(), LedgerError> {
        let op = Op::Fail {
            card,
            attempt,
            step: step.to_string(),
            reason: reason.to_string(),
            detail: detail.to_string(),
            retryable,
        };
        self.call_after(done, op).map(|_| ())
    }
}

/// The most requests committed together in one transaction.
const GROUP_LIMIT: usize = 512;

/// How often an idle writer looks at its backend (outbox drain).
const IDLE_TICK: std::time::Duration = std::time::Duration::from_millis(250);

fn writer(mut backend: Box<dyn Backend>, rx: Receiver<Request>) {
    loop {
        let first = match rx.recv_timeout(IDLE_TICK) {
            Ok(r) => r,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                backend.idle();
                continue;
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        };
        let mut group = vec![first];
        while group.len() < GROUP_LIMIT {
            match rx.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        let ts = now();
        let parts: Vec<(&str, &Op)> = group.iter().map(|r| (r.op_id.as_str(), &r.op)).collect();
        let results = backend.apply_group(&parts, &ts);
        for (req, r) in group.into_iter().zip(results) {
            let _ = req.reply.send(r);
        }
    }
    backend.close();
}

/// The SQLite backend: the station's own file, with the audit log.
struct SqliteBackend {
    conn: Connection,
    path: PathBuf,
    station: String,
}

impl Backend for SqliteBackend {
    fn apply_group(&mut self, group: &[(&str, &Op)], ts: &str) -> Vec<Result<Reply, String>> {
        let station = self.station.as_str();
        let mut results: Vec<Result<Reply, String>> = Vec::with_capacity(group.len());
        let committed = (|| -> rusqlite::Result<()> {
            let mut tx = self.conn.transaction()?;
            for (_, op) in group {
                // Each request in its own savepoint: one refused request
                // does not undo the others in the group.
                // The op and its audit row commit together or not at all.
                let mut sp = tx.savepoint()?;
                // Each change of a request gets its own audit row, right
                // after it is applied; the reply is the last change's.
                let r = (|| {
                    // A recovery is audited as the single changes it makes.
                    let (expanded, recovered) = match op {
                        Op::Recover { reason, key } => {
                            let (ops, r) = recover_parts(&sp, reason, key.as_ref(), station)?;
                            (Some(ops), Some(r))
                        }
                        _ => (None, None),
                    };
                    let parts = expanded.as_ref().map_or_else(|| op.parts(), |ops| ops.iter().collect());
                    let reply = parts.into_iter().try_fold(Reply::Unit, |_, op| {
                        let before = audit::before(&sp, op)?;
                        let reply = apply(&sp, op, ts, station)?;
                        audit::record(&sp, op, &reply, ts, &before)?;
                        Ok::<_, ApplyError>(reply)
                    })?;
                    Ok::<_, ApplyError>(recovered.map_or(reply, Reply::Recovered))
                })();
                match r {
                    Ok(reply) => {
                        sp.commit()?;
                        results.push(Ok(reply));
                    }
                    Err(e) => {
                        sp.rollback()?;
                        drop(sp);
                        results.push(Err(e.to_string()));
                    }
                }
            }
            tx.set_drop_behavior(rusqlite::DropBehavior::Commit);
            tx.commit()
        })();
        match committed {
            Ok(()) => results,
            Err(e) => {
                tracing::error!(ledger = %self.path.display(), error = %e, "ledger commit failed");
                group.iter().map(|_| Err(format!("commit failed: {e}"))).collect()
            }
        }
    }
}

/// Why one request was not applied.
#[derive(Debug, thiserror::Error)]
enum ApplyError {
    #[error(transparent)]
    Sql(#[from] rusqlite::Error),
    /// Refused on the ledger's own rules (the SQL ran fine).
    #[error("{0}")]
    Refused(String),
}

fn refused(detail: String) -> ApplyError {
    ApplyError::Refused(detail)
}

/// The single changes of a recovery on SQLite (every card in progress,
/// every bundle forming, every unfinished batch in the file: one file is
/// one station's), and what they close.
fn recover_parts(
    tx: &Connection,
    reason: &str,
    key: Option<&AuditKey>,
    station: &str,
) -> Result<(Vec<Op>, Recovered), ApplyError> {
    let mut ops = Vec::new();
    let bundles: Vec<String> = tx
        .prepare("SELECT bundle_id FROM bundles WHERE status = 'forming' ORDER BY created_at, bundle_id")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let cards: Vec<(String, i64, String)> = tx
        .prepare(
            "SELECT card_id, attempts, COALESCE(current_step,
                    CASE WHEN stage = 'ready_for_pairing' THEN 'pairing' ELSE 'identify' END)
             FROM cards WHERE status = 'in_progress' ORDER BY updated_at, card_id",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let batches: Vec<i64> = tx
        .prepare("SELECT id FROM batches WHERE finished_at IS NULL ORDER BY id")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let recovered =
        Recovered { cards: cards.len() as u64, batches: batches.len() as u64, bundles: bundles.len() as u64 };
    for bundle in bundles {
        ops.push(Op::BundleAborted { bundle, reason: reason.to_string() });
    }
    for (id, attempts, step) in cards {
        let card = id.parse::<CardId>().map_err(|e| refused(format!("card {id}: {e}")))?;
        ops.push(Op::Fail {
            card,
            attempt: attempts as u32,
            step,
            reason: reason.to_string(),
            detail: format!("recovered when station {station} started again"),
            retryable: true,
        });
    }
    for batch in batches {
        ops.push(Op::FinishBatch { batch, key: key.cloned() });
    }
    Ok((ops, recovered))
}

fn apply(tx: &Connection, op: &Op, ts: &str, station: &str) -> Result<Reply, ApplyError> {
    match op {
        // Unaudited here (the writer audits its parts one by one).
        Op::Recover { reason, key } => {
            let (ops, recovered) = recover_parts(tx, reason, key.as_ref(), station)?;
            for op in &ops {
                apply(tx, op, ts, station)?;
            }
            Ok(Reply::Recovered(recovered))
        }
        // Inside the request's savepoint: a refused part undoes them all.
        Op::Many(ops) => {
            let mut last = Reply::Unit;
            for op in ops {
                last = apply(tx, op, ts, station)?;
            }
            Ok(last)
        }
        Op::StartBatch(b) => {
            tx.execute(
                "INSERT INTO batches (name, profile, product, firmware, firmware_sha256, started_at, station_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![b.name, b.profile, b.product, b.firmware, b.firmware_sha256, ts, station],
            )?;
            Ok(Reply::Id(tx.last_insert_rowid()))
        }
        Op::FinishBatch { batch: id, .. } => {
            tx.execute("UPDATE batches SET finished_at = ?1 WHERE id = ?2", params![ts, id])?;
            Ok(Reply::Unit)
        }
        Op::BeginCard { card, reader, batch, atr, cplc } => {
            let id = card.to_hex();
            let prior = tx
                .query_row(
                    "SELECT status, attempts, gp_key_version, card_public_key, attest_counter FROM cards WHERE card_id = ?1",
                    [&id],
                    |r| {
                        Ok(PriorRecord {
                            status: CardStatus::parse(&r.get::<_, String>(0)?),
                            attempts: r.get::<_, i64>(1)? as u32,
                            gp_key_version: r.get::<_, Option<i64>>(2)?.map(|v| v as u8),
                            card_public_key: r.get(3)?,
                            attest_counter: r.get::<_, Option<i64>>(4)?.map(|v| v as u32),
                        })
                    },
                )
                .optional()?;
            match &prior {
                Some(p) if p.status == CardStatus::Passed => {}
                Some(_) => {
                    tx.execute(
                        "UPDATE cards SET status = 'in_progress', attempts = attempts + 1, reader = ?2, batch_id = ?3,
                         atr = ?4, failed_step = NULL, failure_reason = NULL, failure_detail = NULL, retryable = NULL,
                         current_step = NULL, updated_at = ?5, station_id = ?6 WHERE card_id = ?1",
                        params![id, reader, batch, atr, ts, station],
                    )?;
                }
                None => {
                    tx.execute(
                        "INSERT INTO cards (card_id, status, batch_id, reader, attempts, atr, cplc, first_seen, updated_at, station_id)
                         VALUES (?1, 'in_progress', ?2, ?3, 1, ?4, ?5, ?6, ?6, ?7)",
                        params![id, batch, reader, atr, cplc, ts, station],
                    )?;
                }
            }
            Ok(Reply::Prior(prior))
        }
        Op::Step { card, attempt, step, event, detail, reader } => {
            tx.execute(
                "INSERT INTO steps (card_id, attempt, step, event, detail, reader, at, station_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![card.to_hex(), attempt, step, event.as_str(), detail, reader, ts, station],
            )?;
            if *event == StepEvent::Intent {
                tx.execute(
                    "UPDATE cards SET current_step = ?2, updated_at = ?3 WHERE card_id = ?1 AND status = 'in_progress'",
                    params![card.to_hex(), step, ts],
                )?;
            }
            Ok(Reply::Unit)
        }
        Op::StepDone { card, attempt, step, detail, update } => {
            let id = card.to_hex();
            tx.execute(
                "INSERT INTO steps (card_id, attempt, step, event, detail, at, station_id)
                 VALUES (?1, ?2, ?3, 'done', ?4, ?5, ?6)",
                params![id, attempt, step, detail, ts, station],
            )?;
            tx.execute(
                "UPDATE cards SET
                    gp_key_version = COALESCE(?2, gp_key_version),
                    firmware_sha256 = COALESCE(?3, firmware_sha256),
                    card_public_key = COALESCE(?4, card_public_key),
                    ca_key_id = COALESCE(?5, ca_key_id),
                    attest_counter = COALESCE(?6, attest_counter),
                    attested = COALESCE(?7, attested),
                    self_tests = COALESCE(?8, self_tests),
                    updated_at = ?9
                 WHERE card_id = ?1",
                params![
                    id,
                    update.gp_key_version,
                    update.firmware_sha256,
                    update.card_public_key,
                    update.ca_key_id,
                    update.attest_counter,
                    update.attested,
                    update.self_tests,
                    ts
                ],
            )?;
            Ok(Reply::Unit)
        }
        Op::Pass { card, attempt, stage } => {
            let id = card.to_hex();
            let status: String = tx.query_row("SELECT status FROM cards WHERE card_id = ?1", [&id], |r| r.get(0))?;
            if status != "in_progress" {
                return Err(refused(format!("card {id} is {status}, not in progress")));
            }
            let serial: i64 = tx.query_row("SELECT COALESCE(MAX(serial), 0) + 1 FROM cards", [], |r| r.get(0))?;
            tx.execute(
                "UPDATE cards SET status = 'passed', stage = ?2, serial = ?3, current_step = NULL, updated_at = ?4 WHERE card_id = ?1",
                params![id, stage, serial, ts],
            )?;
            tx.execute(
                "INSERT INTO steps (card_id, attempt, step, event, detail, at, station_id)
                 VALUES (?1, ?2, 'record', 'done', ?3, ?4, ?5)",
                params![id, attempt, format!("serial {serial}"), ts, station],
            )?;
            Ok(Reply::Id(serial))
        }
        Op::Ready { card, attempt } => {
            let id = card.to_hex();
            let n = tx.execute(
                "UPDATE cards SET stage = 'ready_for_pairing', current_step = NULL, updated_at = ?2
                 WHERE card_id = ?1 AND status = 'in_progress'",
                params![id, ts],
            )?;
            if n != 1 {
                return Err(refused(format!("card {id} is not in progress")));
            }
            tx.execute(
                "INSERT INTO steps (card_id, attempt, step, event, detail, at, station_id)
                 VALUES (?1, ?2, 'record', 'done', 'ready for pairing', ?3, ?4)",
                params![id, attempt, ts, station],
            )?;
            Ok(Reply::Unit)
        }
        Op::BundleStart { bundle, batch, members } => {
            tx.execute(
                "INSERT INTO bundles (bundle_id, status, size, created_at, batch_id, station_id, bundle_no)
                 VALUES (?1, 'forming', ?2, ?3, ?4, ?5, (SELECT COALESCE(MAX(bundle_no), 0) + 1 FROM bundles))",
                params![bundle, members.len() as i64, ts, batch, station],
            )?;
            for (position, (card, role)) in members.iter().enumerate() {
                let id = card.to_hex();
                let ok: i64 = tx.query_row(
                    "SELECT COUNT(*) FROM cards WHERE card_id = ?1 AND status = 'in_progress' AND stage = 'ready_for_pairing'",
                    [&id],
                    |r| r.get(0),
                )?;
                if ok != 1 {
                    return Err(refused(format!("card {id} is not ready for pairing")));
                }
                tx.execute(
                    "INSERT INTO bundle_members (bundle_id, card_id, role, position) VALUES (?1, ?2, ?3, ?4)",
                    params![bundle, id, role, position as i64],
                )?;
            }
            Ok(Reply::Unit)
        }
        Op::BundleSealed { bundle, wallet_pubkey } => {
            let status: String =
                tx.query_row("SELECT status FROM bundles WHERE bundle_id = ?1", [bundle], |r| r.get(0))?;
            if status != "forming" {
                return Err(refused(format!("bundle {bundle} is {status}, not forming")));
            }
            let members: Vec<(String, String)> = tx
                .prepare("SELECT card_id, role FROM bundle_members WHERE bundle_id = ?1 ORDER BY position")?
                .query_map([bundle], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            let mut serials = Vec::with_capacity(members.len());
            for (id, role) in &members {
                let serial: i64 = tx.query_row("SELECT COALESCE(MAX(serial), 0) + 1 FROM cards", [], |r| r.get(0))?;
                let n = tx.execute(
                    "UPDATE cards SET status = 'passed', stage = 'bundled', serial = ?2, bundle_id = ?3, role = ?4,
                     wallet_pubkey = ?5, current_step = NULL, updated_at = ?6
                     WHERE card_id = ?1 AND status = 'in_progress'",
                    params![id, serial, bundle, role, wallet_pubkey, ts],
                )?;
                if n != 1 {
                    return Err(refused(format!("member {id} of bundle {bundle} is not in progress")));
                }
                tx.execute(
                    "UPDATE bundle_members SET sealed = 1 WHERE bundle_id = ?1 AND card_id = ?2",
                    params![bundle, id],
                )?;
                tx.execute(
                    "INSERT INTO steps (card_id, attempt, step, event, detail, at, station_id)
                     SELECT card_id, attempts, 'record', 'done', ?2, ?3, ?4 FROM cards WHERE card_id = ?1",
                    params![id, format!("serial {serial}, {role} of bundle {bundle}"), ts, station],
                )?;
                let card = id.parse::<CardId>().map_err(|e| refused(e.to_string()))?;
                serials.push((card, serial));
            }
            tx.execute(
                "UPDATE bundles SET status = 'sealed', wallet_pubkey = ?2, sealed_at = ?3 WHERE bundle_id = ?1",
                params![bundle, wallet_pubkey, ts],
            )?;
            Ok(Reply::Serials(serials))
        }
        Op::BundleAborted { bundle, reason } => {
            tx.execute(
                "UPDATE bundles SET status = 'aborted', reason = ?2 WHERE bundle_id = ?1 AND status = 'forming'",
                params![bundle, reason],
            )?;
            Ok(Reply::Unit)
        }
        Op::Fail { card, attempt, step, reason, detail, retryable } => {
            let id = card.to_hex();
            tx.execute(
                "INSERT INTO steps (card_id, attempt, step, event, detail, at, station_id)
                 VALUES (?1, ?2, ?3, 'failed', ?4, ?5, ?6)",
                params![id, attempt, step, format!("{reason}: {detail}"), ts, station],
            )?;
            tx.execute(
                "UPDATE cards SET status = 'failed', failed_step = ?2, failure_reason = ?3, failure_detail = ?4,
                 retryable = ?5, current_step = NULL, updated_at = ?6 WHERE card_id = ?1 AND status != 'passed'",
                params![id, step, reason, detail, retryable, ts],
            )?;
            Ok(Reply::Unit)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, PathBuf, Ledger, LedgerWriter, i64) {
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
        (dir, path, l, w, b)
    }

    fn id(n: u8) -> CardId {
        CardId([n; 10])
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_utc(1_795_512_345, 7), "2026-11-24T09:25:45.007Z");
        assert_eq!(format_utc(951_782_400, 0), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn serials_are_unique_under_concurrent_writers() {
        let (_d, path, l, w, b) = open();
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let l = l.clone();
                std::thread::spawn(move || {
                    (0..25u8)
                        .map(|i| {
                            let c = CardId([t, i, 0, 0, 0, 0, 0, 0, 0, 1]);
                            l.begin_card(c, "r", b, "", "").expect("begin");
                            l.step(c, 1, "identify", StepEvent::Intent, "", "r").expect("step");
                            l.pass(c, 1, "ready_for_pairing").expect("pass").expect("a serial on SQLite")
                        })
                        .collect::<Vec<i64>>()
                })
            })
            .collect();
        let mut serials: Vec<i64> = threads.into_iter().flat_map(|t| t.join().expect("thread")).collect();
        serials.sort_unstable();
        assert_eq!(serials, (1..=200).collect::<Vec<_>>());
        drop(l);
        w.close();
        let doc = export::export(&path).expect("export");
        assert_eq!(doc.cards.len(), 200);
        assert!(doc.cards.iter().all(|c| c.status == "passed"));
    }

    #[test]
    fn a_passed_card_cannot_be_reset_or_failed() {
        let (_d, path, l, w, b) = open();
        l.begin_card(id(1), "r", b, "", "").expect("begin");
        let serial = l.pass(id(1), 1, "ready_for_pairing").expect("pass");
        let serial = serial.expect("a serial on SQLite");
        let prior = l.begin_card(id(1), "r2", b, "", "").expect("again").expect("known");
        assert_eq!(prior.status, CardStatus::Passed);
        l.fail(id(1), 2, "identify", "x", "y", false).expect("no-op on a passed card");
        assert!(l.pass(id(1), 2, "ready_for_pairing").is_err(), "a second serial is refused");
        drop(l);
        w.close();
        let c = &export::export(&path).expect("export").cards[0];
        assert_eq!((c.status.as_str(), c.serial, c.reader.as_str()), ("passed", Some(serial), "r"));
    }

    #[test]
    fn retries_count_attempts_and_clear_the_failure() {
        let (_d, path, l, w, b) = open();
        l.begin_card(id(2), "r", b, "", "").expect("begin");
        l.fail(id(2), 1, "firmware", "card removed", "d", true).expect("fail");
        let prior = l.begin_card(id(2), "r", b, "", "").expect("again").expect("known");
        assert_eq!((prior.status, prior.attempts), (CardStatus::Failed, 1));
        l.step_done(id(2), 2, "gp_session", "", CardUpdate { gp_key_version: Some(1), ..Default::default() })
            .expect("done");
        drop(l);
        w.close();
        let c = &export::export(&path).expect("export").cards[0];
        assert_eq!((c.status.as_str(), c.attempts, c.failed_step.as_deref()), ("in_progress", 2, None));
        assert_eq!(c.gp_key_version, Some(1));
    }

    #[test]
    fn reopening_migrates_once_and_a_newer_schema_is_refused() {
        let (_d, path, l, w, _) = open();
        drop(l);
        w.close();
        let (l, w) = Ledger::open(&path).expect("reopen");
        drop(l);
        w.close();
        let conn = Connection::open(&path).expect("conn");
        let n: i64 = conn.query_row("SELECT COUNT(*) FROM schema_version", [], |r| r.get(0)).expect("count");
        assert_eq!(n as usize, SCHEMA_VERSION);
        conn.execute("INSERT INTO schema_version (version) VALUES (999)", []).expect("bump");
        drop(conn);
        let err = Ledger::open(&path).err().expect("refused");
        assert!(err.to_string().contains("newer"), "{err}");
    }

    #[test]
    fn a_schema_2_ledger_is_migrated_with_its_history_adopted_and_verifies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("old.db");
        let conn = Connection::open(&path).expect("conn");
        conn.execute_batch("CREATE TABLE schema_version (version INTEGER NOT NULL)").expect("versions");
        for (i, sql) in schema::MIGRATIONS.iter().take(2).enumerate() {
            conn.execute_batch(sql).expect("migration");
            conn.execute("INSERT INTO schema_version (version) VALUES (?1)", [(i + 1) as i64]).expect("version");
        }
        conn.execute_batch(
            "INSERT INTO batches (name, profile, product, firmware, firmware_sha256, started_at, finished_at)
               VALUES ('old', 'p', 'x', 'f', '00', '2025-01-01T00:00:00.000Z', '2025-01-01T01:00:00.000Z');
             INSERT INTO cards (card_id, status, batch_id, reader, attempts, serial, first_seen, updated_at)
               VALUES ('0101010101', 'passed', 1, 'r', 1, 1, '2025-01-01T00:00:01.000Z', '2025-01-01T00:00:02.000Z');
             INSERT INTO steps (card_id, attempt, step, event, detail, at)
               VALUES ('0101010101', 1, 'record', 'done', 'serial 1', '2025-01-01T00:00:02.000Z');",
        )
        .expect("old history");
        drop(conn);
        let (l, w) = Ledger::open(&path).expect("migrate");
        let b = l
            .start_batch(BatchInfo {
                name: "new".into(),
                profile: "p".into(),
                product: "x".into(),
                firmware: "f".into(),
                firmware_sha256: "00".into(),
            })
            .expect("batch");
        l.begin_card(id(9), "r", b, "", "").expect("begin");
        l.pass(id(9), 1, "ready_for_pairing").expect("pass");
        l.finish_batch(b, None).expect("finish");
        drop(l);
        w.close();
        let report = audit::verify(&path, None).expect("verify");
        assert!(report.ok(), "{:?}", report.problems);
        assert!(report.warnings.iter().any(|w| w.contains("adopted")), "{:?}", report.warnings);
        assert!(report.warnings.iter().any(|w| w.contains("unsigned")), "{:?}", report.warnings);
        // The old batch is finished but has no head: adopted history is
        // not held to the rule a new batch is.
        let conn = Connection::open(&path).expect("conn");
        conn.execute("UPDATE cards SET serial = 5 WHERE card_id = '0101010101'", []).expect("tamper");
        drop(conn);
        let report = audit::verify(&path, None).expect("verify");
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(report.problems[0].message.contains("serial is 5"), "{}", report.problems[0]);
    }

    #[test]
    fn a_schema_3_ledger_with_an_audit_log_gets_station_ids_and_still_verifies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v3.db");
        let conn = Connection::open(&path).expect("conn");
        conn.execute_batch("CREATE TABLE schema_version (version INTEGER NOT NULL)").expect("versions");
        for (i, sql) in schema::MIGRATIONS.iter().take(3).enumerate() {
            conn.execute_batch(sql).expect("migration");
            conn.execute("INSERT INTO schema_version (version) VALUES (?1)", [(i + 1) as i64]).expect("version");
        }
        conn.execute_batch(
            "INSERT INTO batches (name, profile, product, firmware, firmware_sha256, started_at, finished_at)
               VALUES ('v3', 'p', 'x', 'f', '00', '2025-01-01T00:00:00.000Z', '2025-01-01T01:00:00.000Z');
             INSERT INTO cards (card_id, status, batch_id, reader, attempts, serial, first_seen, updated_at)
               VALUES ('0202020202', 'passed', 1, 'r', 1, 1, '2025-01-01T00:00:01.000Z', '2025-01-01T00:00:02.000Z');",
        )
        .expect("history");
        audit::adopt(&conn, 2, "2025-01-01T02:00:00.000Z").expect("a v3 audit log");
        drop(conn);
        let (l, w) = Ledger::open_with(&OpenOptions::new(LedgerTarget::Sqlite(path.clone()), "st-9")).expect("migrate");
        let b = l
            .start_batch(BatchInfo {
                name: "v4".into(),
                profile: "p".into(),
                product: "x".into(),
                firmware: "f".into(),
                firmware_sha256: "00".into(),
            })
            .expect("batch");
        l.begin_card(id(3), "r", b, "", "").expect("begin");
        l.pass(id(3), 1, "ready_for_pairing").expect("pass");
        l.finish_batch(b, None).expect("finish");
        drop(l);
        w.close();
        let report = audit::verify(&path, None).expect("verify");
        assert!(report.ok(), "{:?}", report.problems);
        let doc = export::export(&path).expect("export");
        let station = |card: &str| doc.cards.iter().find(|c| c.card_id == card).and_then(|c| c.station_id.clone());
        assert_eq!(station(&id(3).to_hex()), Some("st-9".to_string()));
        assert_eq!(station("0202020202"), None, "old rows have no station");
    }

    #[test]
    fn recovery_fails_what_a_stopped_station_left_in_progress_and_it_resumes() {
        let (_d, path, l, w, b) = open();
        l.begin_card(id(1), "r1", b, "", "").expect("begin");
        l.step(id(1), 1, "firmware", StepEvent::Intent, "", "r1").expect("intent");
        l.begin_card(id(2), "r2", b, "", "").expect("begin, no step yet");
        l.begin_card(id(3), "r3", b, "", "").expect("begin");
        let serial = l.pass(id(3), 1, "ready_for_pairing").expect("pass").expect("serial");
        l.begin_card(id(4), "r4", b, "", "").expect("begin");
        l.fail(id(4), 1, "gp_session", "wrong keys", "d", false).expect("fail");
        l.begin_card(id(5), "r5", b, "", "").expect("begin");
        l.ready(id(5), 1).expect("ready");
        l.bundle_start("B1", b, vec![(id(5), "primary")]).expect("bundle");
        // The process dies here (nothing finishes); a new one starts.
        drop(l);
        w.close();
        let (l, w, r) =
            Ledger::open_for_provisioning(&OpenOptions::new(LedgerTarget::Sqlite(path.clone()), "st-1"), None)
                .expect("reopen");
        assert_eq!(r, Recovered { cards: 3, batches: 1, bundles: 1 });
        assert_eq!(l.recover(None).expect("again"), Recovered::default(), "nothing left the second time");
        drop(l);
        w.close();
        let doc = export::export(&path).expect("export");
        let card = |n: u8| doc.cards.iter().find(|c| c.card_id == id(n).to_hex()).expect("card");
        for (n, step) in [(1, "firmware"), (2, "identify"), (5, "pairing")] {
            let c = card(n);
            assert_eq!(
                (c.status.as_str(), c.failed_step.as_deref(), c.failure_reason.as_deref(), c.retryable),
                ("failed", Some(step), Some(INTERRUPTED), Some(true)),
                "card {n}"
            );
            let journal = export::steps(&path, &c.card_id).expect("steps");
            let last = journal.last().expect("a journal line");
            assert_eq!((last.step.as_str(), last.event.as_str(), last.attempt), (step, "failed", 1));
            assert!(last.detail.as_deref().is_some_and(|d| d.starts_with(INTERRUPTED)), "{last:?}");
        }
        assert_eq!((card(3).status.as_str(), card(3).serial), ("passed", Some(serial)));
        assert_eq!(
            (card(4).failure_reason.as_deref(), card(4).retryable, card(4).failed_step.as_deref()),
            (Some("wrong keys"), Some(false), Some("gp_session")),
            "an earlier failure is left as it was"
        );
        assert_eq!(doc.bundles[0].status, "aborted");
        let conn = Connection::open(&path).expect("conn");
        let open: i64 =
            conn.query_row("SELECT COUNT(*) FROM batches WHERE finished_at IS NULL", [], |r| r.get(0)).expect("n");
        assert_eq!(open, 0, "the interrupted batch is closed");
        drop(conn);
        let report = audit::verify(&path, None).expect("verify");
        assert!(report.ok(), "{:?}", report.problems);
        assert_eq!(report.heads.len(), 1, "the closed batch has its head");
        // Presented again, a recovered card resumes: attempt 2, in progress.
        let (l, w) = Ledger::open(&path).expect("reopen");
        let prior = l.begin_card(id(1), "r1", b, "", "").expect("again").expect("known");
        assert_eq!((prior.status, prior.attempts), (CardStatus::Failed, 1));
        drop(l);
        w.close();
        let c = export::export(&path).expect("export").cards.into_iter().find(|c| c.card_id == id(1).to_hex());
        let c = c.expect("card 1");
        assert_eq!((c.status.as_str(), c.attempts, c.failure_reason), ("in_progress", 2, None));
        assert!(audit::verify(&path, None).expect("verify").ok());
    }

    #[test]
    fn an_unwritable_ledger_is_a_clear_error() {
        let err = Ledger::open(Path::new("/nonexistent-dir/x/ledger.db")).err().expect("refused");
        assert!(err.to_string().contains("/nonexistent-dir/x/ledger.db"), "{err}");
    }
}
