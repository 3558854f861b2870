//! The PC/SC backend of the transport seams: `PcscMonitor` (which readers
//! pcscd offers, filtered by name), `PcscReader` (one slot, with its own
//! PC/SC context), `PcscTransport` (one connected card) and `PcscCanceller`
//! (ends blocked waits from another thread), and what a reader reports
//! about extended-length APDUs (`ExtendedApdu`). This is the only code in the
//! workspace that uses the `pcsc` crate; nothing here knows about recipes,
//! profiles or the ledger.
//!
//! Quirks of pcsc-lite 1.9.9 (Debian 12) that shape this module:
//! - one `SCardGetStatusChange` takes at most 16 reader states
//!   (`PCSCLITE_MAX_READERS_CONTEXTS`); longer lists are chunked;
//! - the PnP pseudo-reader is accepted but does not report reader-count
//!   changes (that came in 2.3.0), so the monitor re-lists readers on every
//!   wake-up and at least every [`RELIST_EVERY`];
//! - after a pcscd restart every call on an old context fails
//!   (`SCARD_F_COMM_ERROR`, then `SCARD_E_INVALID_HANDLE`): a new context
//!   must be established, which readers and the monitor do themselves;
//! - pcscd polls card presence every 400 ms, so a transfer that fails
//!   because the card left is reported as a generic transfer failure until
//!   pcscd's next poll: the transport asks again before it decides.

use std::ffi::{CStr, CString};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use pcsc::{Context, Disposition, Protocols, ReaderState, Scope, State};

use super::{Atr, CardReader, ReaderId, ReaderMonitor, SlotState, Transport, TransportError};

/// pcsc-lite's `PCSCLITE_MAX_READERS_CONTEXTS`: the most reader states one
/// `SCardGetStatusChange` call accepts.
pub const MAX_STATES_PER_CALL: usize = 16;

/// The monitor re-lists readers at least this often while it waits (the PnP
/// pseudo-reader of pcsc-lite 1.9.9 does not wake it for new readers).
pub const RELIST_EVERY: Duration = Duration::from_secs(1);

/// The longest single blocking call a reader makes. A cancel that lands
/// between the cancelled-flag check and the start of the call is not seen
/// by pcsc-lite (`SCardCancel` only ends a call in progress); slicing
/// bounds how late such a cancel takes effect.
const WAIT_SLICE: Duration = Duration::from_secs(1);

/// Re-establishing a lost context: first retry at once, then back off
/// doubling from the first delay up to the longest.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(3);

/// How long a transport keeps asking whether a failed transfer means the
/// card left: pcscd polls presence every 400 ms; three polls and a margin.
const REMOVAL_SETTLE: Duration = Duration::from_millis(1300);
const REMOVAL_POLL: Duration = Duration::from_millis(100);

// ---- vpcd readers of scripts/pcscd-vpcd.sh ------------------------------

/// The PC/SC reader name pcsc-lite 1.9.9 gives the vpcd slot on `port`,
/// when the reader.conf entries are the ones scripts/pcscd-vpcd.sh writes
/// (one entry per pair of ports from `port_base`, FRIENDLYNAME
/// "Tapline vpcd P"; pcsc-lite appends " %02X 00" and then numbers the
/// entry's slots in the last two digits).
pub fn reader_name(port_base: u16, port: u16) -> String {
    let entry = port_base + (port - port_base) / 2 * 2;
    format!("Tapline vpcd {entry} 00 {:02X}", port - entry)
}

/// The vpcd port a reader name stands for: "Tapline vpcd P 00 0S" is slot S
/// of the entry of port P, on port P + S. `None` for other readers.
pub fn port_of_reader(name: &str) -> Option<u16> {
    let mut words = name.strip_prefix("Tapline vpcd ")?.split(' ');
    let entry: u16 = words.next()?.parse().ok()?;
    let _reader_index = u8::from_str_radix(words.next()?, 16).ok()?;
    let slot = u8::from_str_radix(words.next()?, 16).ok()?;
    if words.next().is_some() || slot > 1 {
        return None;
    }
    entry.checked_add(u16::from(slot))
}

/// Every transport asks for T=0 or T=1; the reader picks from the ATR.
const PROTOCOLS: Protocols = Protocols::T0.union(Protocols::T1);

/// How a reader connection is shared with other PC/SC applications.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Sharing {
    /// Other applications (pcsc_scan, scriptor, opensc-tool) may connect to
    /// the same card, and may interleave their APDUs with ours.
    #[default]
    Shared,
    /// Nobody else may connect while a station transport is open: for a
    /// production line where nothing must come between a secure channel's
    /// commands.
    Exclusive,
}

impl Sharing {
    fn mode(self) -> pcsc::ShareMode {
        match self {
            Self::Shared => pcsc::ShareMode::Shared,
            Self::Exclusive => pcsc::ShareMode::Exclusive,
        }
    }
}

// ---------------------------------------------------------------------------
// Reader names and filters

/// The `ReaderId` of a PC/SC reader: its PC/SC name with surrounding
/// whitespace trimmed, nothing else. pcsc-lite builds the name from the
/// driver's friendly name (for USB readers with a serial number, the serial
/// is part of it), a two-digit index that tells apart readers of the same
/// name, and the slot number: `"Tapline vpcd 35963 00 01"`. That name comes
/// back the same after a pcscd restart; the one caveat is pcsc-lite's own:
/// two identical readers without a serial number are told apart only by
/// the index, which follows plug-in order. `None` for an empty name.
pub fn reader_id(pcsc_name: &CStr) -> Option<ReaderId> {
    let name = pcsc_name.to_string_lossy();
    let name = name.trim();
    (!name.is_empty()).then(|| ReaderId(name.to_string()))
}

/// Shell-style glob match, case-insensitive: `*` matches any run of
/// characters (also none), `?` exactly one; everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().flat_map(char::to_lowercase).collect();
    let t: Vec<char> = text.chars().flat_map(char::to_lowercase).collect();
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and where in the text its match ends so far:
    // on a mismatch, that star swallows one more character.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Which readers a monitor offers: a reader is offered when it matches one
/// `include` pattern (or `include` is empty) and no `exclude` pattern.
/// Patterns are [`glob_match`] patterns over the [`ReaderId`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReaderFilter {
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

impl ReaderFilter {
    /// Every reader.
    pub fn all() -> Self {
        Self::default()
    }

    pub fn new<I, E>(include: I, exclude: E) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
        E: IntoIterator,
        E::Item: Into<String>,
    {
        Self {
            include: include.into_iter().map(Into::into).collect(),
            exclude: exclude.into_iter().map(Into::into).collect(),
        }
    }

    pub fn matches(&self, id: &ReaderId) -> bool {
        (self.include.is_empty() || self.include.iter().any(|p| glob_match(p, id.as_str())))
            && !self.exclude.iter().any(|p| glob_match(p, id.as_str()))
    }
}

// ---------------------------------------------------------------------------
// Errors

/// Errors after which the context is dead: pcscd stopped or restarted.
fn service_lost(e: pcsc::Error) -> bool {
    use pcsc::Error as E;
    matches!(e, E::NoService | E::ServiceStopped | E::CommError | E::InvalidHandle | E::Shutdown)
}

/// Maps a PC/SC error of `operation` on `reader` to the seam's error.
/// `elapsed` is how long the call took (a timeout reports it).
fn map_error(operation: &'static str, reader: &ReaderId, e: pcsc::Error, elapsed: Duration) -> TransportError {
    use pcsc::Error as E;
    match e {
        E::RemovedCard | E::NoSmartcard => TransportError::CardRemoved,
        E::ResetCard => TransportError::CardReset,
        E::ReaderUnavailable | E::UnknownReader => TransportError::ReaderUnavailable(reader.to_string()),
        e if service_lost(e) => TransportError::ServiceUnavailable(e),
        // A card that does not answer the reader's power-up: a mute card,
        // as far as the recipe is concerned.
        E::Timeout | E::UnresponsiveCard => TransportError::Timeout(elapsed),
        E::Cancelled => TransportError::Cancelled,
        source => TransportError::Pcsc { operation, source },
    }
}

/// A transfer that failed without saying why. Readers report a card that
/// left mid-APDU this way until pcscd's next presence poll.
fn unexplained_transfer_failure(e: pcsc::Error) -> bool {
    use pcsc::Error as E;
    matches!(e, E::NotTransacted | E::CommDataLost | E::UnknownError | E::UnpoweredCard)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under these locks is a single store: a panic elsewhere
    // cannot leave them half-written.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------
// Cancellation

/// The context a reader or monitor currently waits on (none while pcscd is
/// away), shared with the cancellers it belongs to.
type ContextCell = Mutex<Option<Context>>;

#[derive(Default)]
struct CancelGroup {
    cancelled: AtomicBool,
    members: Mutex<Vec<Weak<ContextCell>>>,
}

/// Ends the blocked waits of the readers (and monitor) it belongs to, from
/// any thread, with `Context::cancel` (`SCardCancel`), and makes every
/// later wait of theirs return [`TransportError::Cancelled`] at once: it is
/// for shutdown, and a cancel cannot be lost between two waits. A reader's
/// own canceller reaches that reader; the monitor's reaches the monitor and
/// every reader opened from it.
#[derive(Clone)]
pub struct PcscCanceller(Arc<CancelGroup>);

impl fmt::Debug for PcscCanceller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PcscCanceller(cancelled: {})", self.is_cancelled())
    }
}

impl PcscCanceller {
    fn new() -> Self {
        Self(Arc::new(CancelGroup::default()))
    }

    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
        let cells: Vec<_> = lock(&self.0.members).iter().filter_map(Weak::upgrade).collect();
        for cell in cells {
            let ctx = lock(&cell).clone();
            if let Some(ctx) = ctx {
                // Fails only when no call is in progress or the context
                // is already dead; the flag covers both.
                let _ = ctx.cancel();
            }
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    fn register(&self, cell: &Arc<ContextCell>) {
        let mut members = lock(&self.0.members);
        members.retain(|w| w.strong_count() > 0);
        members.push(Arc::downgrade(cell));
    }
}

/// A PC/SC context that can be lost (pcscd restarted) and re-established
/// with backoff, published to the cancellers that must reach it.
struct LiveContext {
    ctx: Option<Context>,
    cell: Arc<ContextCell>,
    cancellers: Vec<PcscCanceller>,
    next_try: Instant,
    delay: Duration,
    last_error: pcsc::Error,
    /// Bumped on every establishment, so users can tell a new context.
    epoch: u64,
}

impl LiveContext {
    fn establish(cancellers: Vec<PcscCanceller>) -> Result<Self, TransportError> {
        let ctx = Context::establish(Scope::User).map_err(TransportError::ServiceUnavailable)?;
        let cell = Arc::new(Mutex::new(Some(ctx.clone())));
        for c in &cancellers {
            c.register(&cell);
        }
        Ok(Self {
            ctx: Some(ctx),
            cell,
            cancellers,
            next_try: Instant::now(),
            delay: BACKOFF_FIRST,
            last_error: pcsc::Error::NoService,
            epoch: 0,
        })
    }

    fn cancelled(&self) -> bool {
        self.cancellers.iter().any(PcscCanceller::is_cancelled)
    }

    /// Drops a context that pcscd no longer knows.
    fn lose(&mut self, e: pcsc::Error) {
        if self.ctx.take().is_some() {
            tracing::warn!(error = %e, "PC/SC context lost; establishing a new one");
        }
        *lock(&self.cell) = None;
        self.last_error = e;
    }

    /// The context, establishing a new one when it was lost: retries with
    /// backoff until `deadline`, then gives up with `ServiceUnavailable`
    /// (the next call goes on where the backoff left off).
    fn get(&mut self, deadline: Instant) -> Result<Context, TransportError> {
        loop {
            if let Some(ctx) = &self.ctx {
                return Ok(ctx.clone());
            }
            if self.cancelled() {
                return Err(TransportError::Cancelled);
            }
            let now = Instant::now();
            if now >= self.next_try {
                match Context::establish(Scope::User) {
                    Ok(ctx) => {
                        tracing::info!("PC/SC context established again");
                        *lock(&self.cell) = Some(ctx.clone());
                        self.ctx = Some(ctx.clone());
                        self.delay = BACKOFF_FIRST;
                        self.epoch += 1;
                        return Ok(ctx);
                    }
                    Err(e) => {
                        self.last_error = e;
                        self.next_try = now + self.delay;
                        self.delay = (self.delay * 2).min(BACKOFF_MAX);
                    }
                }
            }
            if self.next_try >= deadline {
                return Err(TransportError::ServiceUnavailable(self.last_error));
            }
            sleep_until(self.next_try, || self.cancelled());
        }
    }
}

/// Sleeps until `until` in short steps, stopping early when `stop` says so.
fn sleep_until(until: Instant, stop: impl Fn() -> bool) {
    const STEP: Duration = Duration::from_millis(50);
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || stop() {
            return;
        }
        std::thread::sleep(left.min(STEP));
    }
}

/// One `SCardGetStatusChange` over any number of states, in chunks of
/// [`MAX_STATES_PER_CALL`]: the first chunk blocks up to `timeout`, the
/// others are polled without waiting, so a change in a later chunk is seen
/// at the next call (callers loop with short timeouts). States are synced
/// after every call that reported a change. Returns whether any changed.
fn status_change_chunked(ctx: &Context, timeout: Duration, states: &mut [ReaderState]) -> Result<bool, pcsc::Error> {
    let mut changed = false;
    for (i, chunk) in states.chunks_mut(MAX_STATES_PER_CALL).enumerate() {
        let wait = if i == 0 { timeout } else { Duration::ZERO };
        match ctx.get_status_change(wait, chunk) {
            Ok(()) => {
                changed = true;
                chunk.iter_mut().for_each(ReaderState::sync_current_state);
            }
            Err(pcsc::Error::Timeout) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(changed)
}

// ---------------------------------------------------------------------------
// Monitor

/// Which PC/SC readers exist, filtered by name; opens readers for workers.
/// Owns one context for listing and waiting (re-established after a pcscd
/// restart); every reader it opens gets a context of its own.
pub struct PcscMonitor {
    live: LiveContext,
    canceller: PcscCanceller,
    filter: ReaderFilter,
    sharing: Sharing,
    /// The PnP pseudo-reader followed by the offered readers.
    watch: Vec<ReaderState>,
    /// The list last returned, for `wait_readers_change`.
    known: Option<Vec<ReaderId>>,
}

impl fmt::Debug for PcscMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PcscMonitor").field("filter", &self.filter).field("sharing", &self.sharing).finish()
    }
}

impl PcscMonitor {
    /// Establishes a context with pcscd: `ServiceUnavailable` when pcscd is
    /// not running.
    pub fn new(filter: ReaderFilter, sharing: Sharing) -> Result<Self, TransportError> {
        let canceller = PcscCanceller::new();
        let live = LiveContext::establish(vec![canceller.clone()])?;
        Ok(Self { live, canceller, filter, sharing, watch: Vec::new(), known: None })
    }

    /// Cancels this monitor's waits and those of every reader opened from
    /// it (shutdown).
    pub fn canceller(&self) -> PcscCanceller {
        self.canceller.clone()
    }

    pub fn filter(&self) -> &ReaderFilter {
        &self.filter
    }

    /// The offered readers with their PC/SC names, listed now. A lost
    /// context is replaced once (a single establishment attempt).
    fn list(&mut self, deadline: Instant) -> Result<Vec<(ReaderId, CString)>, TransportError> {
        let mut tries = 0;
        loop {
            let ctx = self.live.get(deadline)?;
            match ctx.list_readers_owned() {
                Ok(names) => {
                    let mut out: Vec<_> = names
                        .into_iter()
                        .filter_map(|n| reader_id(&n).map(|id| (id, n)))
                        .filter(|(id, _)| self.filter.matches(id))
                        .collect();
                    out.sort();
                    out.dedup_by(|a, b| a.0 == b.0);
                    return Ok(out);
                }
                Err(pcsc::Error::NoReadersAvailable) => return Ok(Vec::new()),
                Err(e) if service_lost(e) && tries == 0 => {
                    tries += 1;
                    self.live.lose(e);
                }
                Err(e) => return Err(self.error("SCardListReaders", e)),
            }
        }
    }

    fn error(&mut self, operation: &'static str, e: pcsc::Error) -> TransportError {
        if service_lost(e) {
            self.live.lose(e);
        }
        map_error(operation, &ReaderId("(reader list)".into()), e, Duration::ZERO)
    }

    /// Waits up to `timeout` for the offered readers to differ from the list
    /// this monitor last returned (from [`ReaderMonitor::readers`] or from
    /// here) and returns the current list (unchanged on timeout). Wakes on
    /// the PnP pseudo-reader and on any watched reader's state, and re-lists
    /// at least every [`RELIST_EVERY`]. A lost context is re-established
    /// with backoff; a cancel returns `Cancelled`.
    pub fn wait_readers_change(&mut self, timeout: Duration) -> Result<Vec<ReaderId>, TransportError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.canceller.is_cancelled() {
                return Err(TransportError::Cancelled);
            }
            let epoch = self.live.epoch;
            let current = self.list(deadline)?;
            if self.live.epoch != epoch {
                // A new context: old reader states mean nothing to it.
                self.watch.clear();
            }
            let ids: Vec<ReaderId> = current.iter().map(|(id, _)| id.clone()).collect();
            if self.known.as_ref() != Some(&ids) || Instant::now() >= deadline {
                self.known = Some(ids.clone());
                return Ok(ids);
            }
            self.sync_watch(&current);
            let slice = deadline.saturating_duration_since(Instant::now()).min(RELIST_EVERY);
            let Some(ctx) = self.live.ctx.clone() else { continue };
            match status_change_chunked(&ctx, slice, &mut self.watch) {
                Ok(_) | Err(pcsc::Error::Timeout) => {}
                Err(pcsc::Error::Cancelled) => return Err(TransportError::Cancelled),
                Err(e) if service_lost(e) => self.live.lose(e),
                Err(e) => return Err(self.error("SCardGetStatusChange", e)),
            }
        }
    }

    /// Watches the PnP pseudo-reader and the given readers, keeping the
    /// known state of readers already watched.
    fn sync_watch(&mut self, current: &[(ReaderId, CString)]) {
        let pnp = pcsc::PNP_NOTIFICATION();
        let mut old = std::mem::take(&mut self.watch);
        let mut take = |name: &CStr| match old.iter().position(|s| s.name() == name) {
            Some(i) => old.swap_remove(i),
            None => ReaderState::new(name, State::UNAWARE),
        };
        let mut watch = vec![take(pnp)];
        watch.extend(current.iter().map(|(_, name)| take(name)));
        self.watch = watch;
    }

    /// Opens one offered reader, with a context of its own.
    ///
    /// The context is established here, on the caller's thread, and the
    /// reader is then moved to its worker thread (`pcsc::Context` is
    /// `Send`). That is sound for pcsc-lite: what must not happen is two
    /// threads using one context at once, and from then on only the worker
    /// uses it (cancellers call `SCardCancel`, which is made for that).
    pub fn open_reader(&mut self, id: &ReaderId) -> Result<PcscReader, TransportError> {
        let (_, name) = self
            .list(Instant::now())?
            .into_iter()
            .find(|(i, _)| i == id)
            .ok_or_else(|| TransportError::ReaderUnavailable(id.to_string()))?;
        PcscReader::open(id.clone(), name, self.sharing, &self.canceller)
    }
}

impl ReaderMonitor for PcscMonitor {
    /// Lists the offered readers now (re-listed on every call: pcsc-lite
    /// 1.9.9 does not announce new readers).
    fn readers(&mut self) -> Result<Vec<ReaderId>, TransportError> {
        let ids: Vec<ReaderId> = self.list(Instant::now())?.into_iter().map(|(id, _)| id).collect();
        self.known = Some(ids.clone());
        Ok(ids)
    }

    fn open(&mut self, id: &ReaderId) -> Result<Box<dyn CardReader>, TransportError> {
        Ok(Box::new(self.open_reader(id)?))
    }

    fn cancel_waits(&self) {
        self.canceller().cancel();
    }
}

// ---------------------------------------------------------------------------
// Reader

/// Presence as seen through status changes, with the insertion counter.
///
/// `insertion` is counted here, per `PcscReader`, starting at 1 for the
/// first card seen: it goes up when a card is present and before it was
/// not, or when pcsc-lite's event counter (the upper 16 bits of the event
/// state, bumped by pcscd on every insertion and every removal) moved
/// between two sightings of a present card (a swap between two calls), or
/// on the first sighting after the context was re-established (pcscd
/// restarted: its counters started over and a card may have been swapped
/// meanwhile; the recipe is idempotent, so a same card seen as new only
/// costs a re-identification). It never repeats within a reader's life.
#[derive(Debug, Default)]
struct Presence {
    insertion: u64,
    /// The event counter and ATR while a card is present.
    card: Option<(u32, Atr)>,
    restarted: bool,
}

impl Presence {
    fn observe(&mut self, present: bool, event_count: u32, atr: &[u8]) {
        if !present {
            self.card = None;
        } else {
            let new = self.restarted || self.card.as_ref().is_none_or(|(count, _)| *count != event_count);
            if new {
                self.insertion += 1;
            }
            self.card = Some((event_count, Atr(atr.to_vec())));
        }
        self.restarted = false;
    }

    fn restart(&mut self) {
        self.restarted = true;
    }

    fn slot(&self) -> SlotState {
        match &self.card {
            Some((_, atr)) => SlotState::Present { atr: atr.clone(), insertion: self.insertion },
            None => SlotState::Empty,
        }
    }
}

/// One PC/SC reader slot, owned by one worker thread, with a PC/SC context
/// of its own (see [`PcscMonitor::open_reader`] for where it is made).
pub struct PcscReader {
    id: ReaderId,
    name: CString,
    sharing: Sharing,
    live: LiveContext,
    own: PcscCanceller,
    state: ReaderState,
    /// The context epoch `state` belongs to.
    epoch: u64,
    presence: Presence,
}

impl fmt::Debug for PcscReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PcscReader").field("id", &self.id).field("sharing", &self.sharing).finish()
    }
}

impl PcscReader {
    fn open(id: ReaderId, name: CString, sharing: Sharing, group: &PcscCanceller) -> Result<Self, TransportError> {
        let own = PcscCanceller::new();
        let live = LiveContext::establish(vec![own.clone(), group.clone()])?;
        let state = ReaderState::new(name.clone(), State::UNAWARE);
        Ok(Self { id, name, sharing, live, own, state, epoch: 0, presence: Presence::default() })
    }

    /// Cancels this reader's waits (now and from then on).
    pub fn canceller(&self) -> PcscCanceller {
        self.own.clone()
    }

    pub fn sharing(&self) -> Sharing {
        self.sharing
    }

    /// Records what the last status change reported.
    fn observe(&mut self) {
        if self.gone() {
            // Forget the card: a reader that comes back holds a new one.
            self.presence.observe(false, 0, &[]);
        } else {
            let present = self.state.event_state().contains(State::PRESENT);
            self.presence.observe(present, self.state.event_count(), self.state.atr());
        }
    }

    /// What the reader reports about extended-length APDUs
    /// ([`ExtendedApdu`]), asked over a direct connection
    /// (`SCARD_SHARE_DIRECT`): it needs no card, and the card in the reader,
    /// if any, is neither powered nor reset (the connection is closed with
    /// `SCARD_LEAVE_CARD`). Fails when the reader cannot be reached, e.g.
    /// while another application holds it exclusively.
    pub fn extended_apdu(&mut self) -> Result<ExtendedApdu, TransportError> {
        let ctx = self.live.get(Instant::now())?;
        let card = ctx
            .connect(&self.name, pcsc::ShareMode::Direct, Protocols::UNDEFINED)
            .map_err(|e| map_error("SCardConnect (direct)", &self.id, e, Duration::ZERO))?;
        let max_input = read_u32_attribute(&card, pcsc::Attribute::Maxinput);
        let part10 = read_max_apdu_data_size(&card);
        if let Err((_, e)) = card.disconnect(Disposition::LeaveCard) {
            tracing::debug!(reader = %self.id, error = %e, "closing the direct connection failed");
        }
        Ok(ExtendedApdu::judge(part10, max_input))
    }

    /// The reader went away (unplugged, or pcscd came back without it) as
    /// far as the last status change said.
    fn gone(&self) -> bool {
        self.state.event_state().intersects(State::UNKNOWN | State::IGNORE | State::UNAVAILABLE)
    }
}

impl CardReader for PcscReader {
    fn id(&self) -> &ReaderId {
        &self.id
    }

    /// Waits with `SCardGetStatusChange` on this reader, in slices of at
    /// most one second; re-establishes a lost context with backoff (the
    /// wait fails with `ServiceUnavailable` only if pcscd is still away at
    /// the deadline); a cancel returns `Cancelled`.
    fn wait_change(&mut self, known: &SlotState, timeout: Duration) -> Result<SlotState, TransportError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.live.cancelled() {
                return Err(TransportError::Cancelled);
            }
            let ctx = self.live.get(deadline)?;
            if self.epoch != self.live.epoch {
                self.epoch = self.live.epoch;
                self.state = ReaderState::new(self.name.clone(), State::UNAWARE);
                self.presence.restart();
            }
            let slice = deadline.saturating_duration_since(Instant::now()).min(WAIT_SLICE);
            match ctx.get_status_change(slice, std::slice::from_mut(&mut self.state)) {
                Ok(()) => {
                    self.observe();
                    self.state.sync_current_state();
                }
                Err(pcsc::Error::Timeout) => {}
                Err(e) if service_lost(e) => {
                    self.live.lose(e);
                    continue;
                }
                Err(e) => return Err(map_error("SCardGetStatusChange", &self.id, e, Duration::ZERO)),
            }
            if self.gone() {
                return Err(TransportError::ReaderUnavailable(self.id.to_string()));
            }
            let now = self.presence.slot();
            if now != *known || Instant::now() >= deadline {
                return Ok(now);
            }
        }
    }

    fn connect(&mut self) -> Result<Box<dyn Transport + Send + '_>, TransportError> {
        let ctx = self.live.get(Instant::now())?;
        match PcscTransport::connect(&ctx, &self.name, &self.id, self.sharing) {
            Err(TransportError::ServiceUnavailable(e)) => {
                self.live.lose(e);
                Err(TransportError::ServiceUnavailable(e))
            }
            other => Ok(Box::new(other?)),
        }
    }
}

// ---------------------------------------------------------------------------
// Extended-length APDUs: what the reader reports

/// pcsc-lite's client refuses an attribute buffer longer than its
/// `MAX_BUFFER_SIZE` (264 bytes) with `SCARD_E_INSUFFICIENT_BUFFER`, so
/// attributes are read into a buffer of exactly that size.
const ATTRIBUTE_BUFFER: usize = pcsc::MAX_BUFFER_SIZE;

/// PC/SC part 10: `CM_IOCTL_GET_FEATURE_REQUEST` is `SCARD_CTL_CODE(3400)`;
/// it lists the reader's features as TLVs (tag, length 4, big-endian
/// control code).
const GET_FEATURE_REQUEST: u32 = 3400;
/// PC/SC part 10 feature `FEATURE_GET_TLV_PROPERTIES`.
const FEATURE_GET_TLV_PROPERTIES: u8 = 0x12;
/// PC/SC part 10 property `dwMaxAPDUDataSize`: the most data bytes of an
/// APDU the reader exchanges, 0 when it exchanges short APDUs only.
const PROPERTY_MAX_APDU_DATA_SIZE: u8 = 0x0A;

/// The longest short command APDU: header, Lc, 255 data bytes, Le.
pub const SHORT_COMMAND_MAX: u32 = 4 + 1 + 255 + 1;

/// Where a reader's answer about extended APDUs came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApduSizeSource {
    /// PC/SC part 10 TLV property `dwMaxAPDUDataSize` (CCID readers through
    /// libccid report it).
    Part10MaxApduDataSize,
    /// `SCARD_ATTR_MAXINPUT`: the longest command message the reader takes.
    MaxInput,
}

impl fmt::Display for ApduSizeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Part10MaxApduDataSize => "PC/SC part 10 dwMaxAPDUDataSize",
            Self::MaxInput => "SCARD_ATTR_MAXINPUT",
        })
    }
}

/// Whether a reader carries extended-length APDUs, as far as it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtendedApdu {
    /// Extended APDUs pass: up to `limit` data bytes (part 10) or command
    /// bytes (`SCARD_ATTR_MAXINPUT`).
    Supported { limit: u32, source: ApduSizeSource },
    /// The reader exchanges short APDUs only.
    ShortOnly { source: ApduSizeSource },
    /// The reader's answers do not tell; `reason` says what it answered.
    Unknown { reason: String },
}

impl ExtendedApdu {
    /// Judges what a reader answered: `part10` is its `dwMaxAPDUDataSize`
    /// (`Ok(None)`: it has TLV properties but not that one), `max_input`
    /// its `SCARD_ATTR_MAXINPUT`; each `Err` says why it is missing. The
    /// part 10 property is explicit and wins. A `SCARD_ATTR_MAXINPUT` above
    /// [`SHORT_COMMAND_MAX`] means extended commands fit one message; at or
    /// below it the reader may still chain extended APDUs over T=1, which
    /// it does not report, so that stays unknown.
    pub fn judge(part10: Result<Option<u32>, String>, max_input: Result<u32, String>) -> Self {
        let part10_why = match part10 {
            Ok(Some(0..=255)) => return Self::ShortOnly { source: ApduSizeSource::Part10MaxApduDataSize },
            Ok(Some(limit)) => return Self::Supported { limit, source: ApduSizeSource::Part10MaxApduDataSize },
            Ok(None) => "no dwMaxAPDUDataSize among its TLV properties".to_string(),
            Err(why) => why,
        };
        match max_input {
            Ok(limit) if limit > SHORT_COMMAND_MAX => Self::Supported { limit, source: ApduSizeSource::MaxInput },
            Ok(limit) => Self::Unknown {
                reason: format!(
                    "the reader takes commands of up to {limit} bytes (SCARD_ATTR_MAXINPUT), enough for short \
                     APDUs; whether it chains extended ones it does not say (PC/SC part 10: {part10_why})"
                ),
            },
            Err(why) => Self::Unknown {
                reason: format!(
                    "the reader reports no APDU size: SCARD_ATTR_MAXINPUT: {why}; PC/SC part 10 \
                     dwMaxAPDUDataSize: {part10_why}"
                ),
            },
        }
    }

    pub fn is_known(&self) -> bool {
        !matches!(self, Self::Unknown { .. })
    }
}

impl fmt::Display for ExtendedApdu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Supported { limit, source: s @ ApduSizeSource::Part10MaxApduDataSize } => {
                write!(f, "extended APDUs, up to {limit} data bytes ({s})")
            }
            Self::Supported { limit, source: s @ ApduSizeSource::MaxInput } => {
                write!(f, "extended APDUs, commands up to {limit} bytes ({s})")
            }
            Self::ShortOnly { source } => write!(f, "short APDUs only ({source})"),
            Self::Unknown { reason } => write!(f, "unknown: {reason}"),
        }
    }
}

/// Why an attribute or control call gave nothing, in words for the report.
fn unanswered(e: pcsc::Error) -> String {
    match e {
        pcsc::Error::UnsupportedFeature => "not supported by the reader's driver".into(),
        e => format!("failed: {e}"),
    }
}

/// A DWORD attribute (pcsc-lite passes it in host byte order).
fn read_u32_attribute(card: &pcsc::Card, attribute: pcsc::Attribute) -> Result<u32, String> {
    let mut buf = [0u8; ATTRIBUTE_BUFFER];
    let value = card.get_attribute(attribute, &mut buf).map_err(unanswered)?;
    dword(value).ok_or_else(|| format!("answered {} bytes, not a 4-byte number", value.len()))
}

fn dword(value: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(value.try_into().ok()?))
}

/// `dwMaxAPDUDataSize` through PC/SC part 10: the feature list, then the
/// TLV properties.
fn read_max_apdu_data_size(card: &pcsc::Card) -> Result<Option<u32>, String> {
    let mut buf = [0u8; ATTRIBUTE_BUFFER];
    let features = card
        .control(pcsc::ctl_code(GET_FEATURE_REQUEST.into()), &[], &mut buf)
        .map_err(|e| format!("feature list {}", unanswered(e)))?;
    let Some(code) = part10_feature(features, FEATURE_GET_TLV_PROPERTIES) else {
        return Err("the reader lists no FEATURE_GET_TLV_PROPERTIES".into());
    };
    let mut buf = [0u8; ATTRIBUTE_BUFFER];
    let props = card.control(code.into(), &[], &mut buf).map_err(|e| format!("TLV properties {}", unanswered(e)))?;
    Ok(part10_property(props, PROPERTY_MAX_APDU_DATA_SIZE))
}

/// Iterates the (tag, value) pairs of a PC/SC part 10 TLV list (one-byte
/// tags and lengths); stops at a truncated entry.
fn part10_tlvs(mut data: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (&tag, rest) = data.split_first()?;
        let (&len, rest) = rest.split_first()?;
        let value = rest.get(..usize::from(len))?;
        data = &rest[usize::from(len)..];
        Some((tag, value))
    })
}

/// The control code of a part 10 feature (its value is big-endian).
pub fn part10_feature(features: &[u8], tag: u8) -> Option<u32> {
    part10_tlvs(features).find(|(t, _)| *t == tag).and_then(|(_, v)| Some(u32::from_be_bytes(v.try_into().ok()?)))
}

/// A numeric part 10 TLV property (1, 2 or 4 bytes, little-endian).
pub fn part10_property(props: &[u8], tag: u8) -> Option<u32> {
    let (_, v) = part10_tlvs(props).find(|(t, _)| *t == tag)?;
    match v.len() {
        1 | 2 | 4 => Some(v.iter().rev().fold(0u32, |acc, b| (acc << 8) | u32::from(*b))),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Transport

/// A connected card. Dropping it disconnects with a warm reset
/// (`pcsc::Card`'s own drop), so no secure channel outlives the transport.
pub struct PcscTransport {
    card: pcsc::Card,
    reader: ReaderId,
    sharing: Sharing,
    atr: Atr,
    /// Room for the longest extended-length response plus SW1 SW2.
    rx: Vec<u8>,
}

impl fmt::Debug for PcscTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PcscTransport").field("reader", &self.reader).field("atr", &self.atr).finish()
    }
}

impl PcscTransport {
    fn connect(ctx: &Context, name: &CStr, reader: &ReaderId, sharing: Sharing) -> Result<Self, TransportError> {
        let started = Instant::now();
        let card = ctx.connect(name, sharing.mode(), PROTOCOLS).map_err(|e| match e {
            pcsc::Error::NoSmartcard => TransportError::NoCard,
            e => map_error("SCardConnect", reader, e, started.elapsed()),
        })?;
        let atr = read_atr(&card, reader)?;
        Ok(Self { card, reader: reader.clone(), sharing, atr, rx: vec![0; pcsc::MAX_BUFFER_SIZE_EXTENDED] })
    }

    pub fn reader(&self) -> &ReaderId {
        &self.reader
    }

    /// Whether a failed transfer means the card left: asks pcscd about the
    /// card until its presence poll has had time to notice a removal.
    /// `Some(error)` when the card is gone (or the handle reports why it is
    /// unusable), `None` when it is still there.
    fn card_gone(&self) -> Option<TransportError> {
        let until = Instant::now() + REMOVAL_SETTLE;
        loop {
            match self.card.status2_owned() {
                Ok(s) if !s.status().contains(pcsc::Status::PRESENT) => return Some(TransportError::CardRemoved),
                Ok(_) => {}
                Err(e) => return Some(map_error("SCardStatus", &self.reader, e, Duration::ZERO)),
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(REMOVAL_POLL);
        }
    }
}

fn read_atr(card: &pcsc::Card, reader: &ReaderId) -> Result<Atr, TransportError> {
    card.status2_owned().map(|s| Atr(s.atr().to_vec())).map_err(|e| map_error("SCardStatus", reader, e, Duration::ZERO))
}

impl Transport for PcscTransport {
    fn transmit_raw(&mut self, apdu: &[u8]) -> Result<Vec<u8>, TransportError> {
        let started = Instant::now();
        match self.card.transmit(apdu, &mut self.rx) {
            // Every response carries SW1 SW2. vpcd answers a card that
            // left mid-APDU with an empty "success"; a real reader may too.
            Ok(resp) if resp.len() < 2 => {
                let resp = resp.to_vec();
                match self.card_gone() {
                    Some(e) => Err(e),
                    None => Ok(resp),
                }
            }
            Ok(resp) => Ok(resp.to_vec()),
            Err(e) if unexplained_transfer_failure(e) => {
                Err(self.card_gone().unwrap_or_else(|| map_error("SCardTransmit", &self.reader, e, started.elapsed())))
            }
            Err(e) => Err(map_error("SCardTransmit", &self.reader, e, started.elapsed())),
        }
    }

    fn atr(&self) -> &Atr {
        &self.atr
    }

    /// Warm reset (`SCardReconnect` with `SCARD_RESET_CARD`). Afterwards
    /// nothing is selected on the card; callers select again (the recipe's
    /// steps each start with a SELECT).
    fn reset(&mut self) -> Result<(), TransportError> {
        let started = Instant::now();
        self.card
            .reconnect(self.sharing.mode(), PROTOCOLS, Disposition::ResetCard)
            .map_err(|e| map_error("SCardReconnect", &self.reader, e, started.elapsed()))?;
        self.atr = read_atr(&self.card, &self.reader)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_like_a_shell_and_ignores_case() {
        let cases = [
            ("*", "", true),
            ("*", "anything", true),
            ("", "", true),
            ("", "x", false),
            ("ACS ACR1252*", "ACS ACR1252 Dual Reader [ACR1252 Dual Reader PICC] 00 00", true),
            ("acs acr1252*picc*", "ACS ACR1252 Dual Reader [ACR1252 Dual Reader PICC] 00 00", true),
            ("*SAM*", "ACS ACR1252 Dual Reader [ACR1252 Dual Reader PICC] 00 00", false),
            ("Tapline vpcd ????? 00 0?", "Tapline vpcd 35963 00 01", true),
            ("Tapline vpcd ???? 00 0?", "Tapline vpcd 35963 00 01", false),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("*aab", "aaaab", true),
            ("a**?", "ab", true),
            ("a**?", "a", false),
            ("?", "é", true),
            ("É*", "école", true),
            ("[x]", "[x]", true),
        ];
        for (pattern, text, want) in cases {
            assert_eq!(glob_match(pattern, text), want, "{pattern:?} vs {text:?}");
        }
    }

    #[test]
    fn filter_includes_then_excludes() {
        let id = |s: &str| ReaderId(s.into());
        let all = ReaderFilter::all();
        assert!(all.matches(&id("Anything 00 00")));
        let f = ReaderFilter::new(["*ACR1252*", "Tapline vpcd *"], ["*SAM*", "* 00 01"]);
        assert!(f.matches(&id("ACS ACR1252 Dual Reader [ACR1252 Dual Reader PICC] 00 00")));
        assert!(!f.matches(&id("ACS ACR1252 Dual Reader [ACR1252 Dual Reader SAM] 00 00")));
        assert!(f.matches(&id("tapline VPCD 35963 00 00")));
        assert!(!f.matches(&id("Tapline vpcd 35963 00 01")));
        assert!(!f.matches(&id("Yubico YubiKey 00 00")));
        let only_exclude = ReaderFilter::new(Vec::<String>::new(), ["Yubico*"]);
        assert!(only_exclude.matches(&id("Tapline vpcd 35963 00 00")));
        assert!(!only_exclude.matches(&id("Yubico YubiKey OTP+FIDO+CCID 00 00")));
    }

    #[test]
    fn reader_id_is_the_trimmed_pcsc_name() {
        let name = |s: &str| CString::new(s).expect("no NUL");
        assert_eq!(reader_id(&name("Tapline vpcd 35963 00 01")), Some(ReaderId("Tapline vpcd 35963 00 01".into())));
        assert_eq!(
            reader_id(&name("  Gemalto PC Twin Reader 00 00 \n")),
            Some(ReaderId("Gemalto PC Twin Reader 00 00".into()))
        );
        assert_eq!(reader_id(&name("   ")), None);
        assert_eq!(reader_id(&name("")), None);
        // The same name always gives the same id (pcscd restarts, re-lists).
        assert_eq!(reader_id(&name("X 00 00")), reader_id(&name("X 00 00")));
        // Not UTF-8: still an id, still stable.
        let odd = CString::new(vec![b'R', 0xFF, b' ', b'0']).expect("no NUL");
        assert_eq!(reader_id(&odd), Some(ReaderId("R\u{FFFD} 0".into())));
    }

    #[test]
    fn pcsc_errors_map_to_seam_errors() {
        use pcsc::Error as E;
        let r = ReaderId("R 00 00".into());
        let t = Duration::from_millis(1500);
        let map = |e| map_error("SCardTransmit", &r, e, t);
        assert!(matches!(map(E::RemovedCard), TransportError::CardRemoved));
        assert!(matches!(map(E::NoSmartcard), TransportError::CardRemoved));
        assert!(matches!(map(E::ResetCard), TransportError::CardReset));
        assert!(matches!(map(E::ReaderUnavailable), TransportError::ReaderUnavailable(n) if n == "R 00 00"));
        assert!(matches!(map(E::UnknownReader), TransportError::ReaderUnavailable(_)));
        for e in [E::NoService, E::ServiceStopped, E::CommError, E::InvalidHandle, E::Shutdown] {
            match map(e) {
                TransportError::ServiceUnavailable(src) => assert_eq!(src, e),
                other => panic!("{e:?} mapped to {other:?}"),
            }
        }
        assert!(matches!(map(E::Timeout), TransportError::Timeout(d) if d == t));
        assert!(matches!(map(E::UnresponsiveCard), TransportError::Timeout(_)));
        assert!(matches!(map(E::Cancelled), TransportError::Cancelled));
        let other = map(E::SharingViolation);
        assert!(
            matches!(other, TransportError::Pcsc { operation: "SCardTransmit", source: E::SharingViolation }),
            "{other:?}"
        );
        // The typed source is kept for error chains.
        let svc = map(E::CommError);
        let src = std::error::Error::source(&svc).expect("a source");
        assert_eq!(src.downcast_ref::<pcsc::Error>(), Some(&E::CommError));
        // Retry classes: removal, reset and timeout retry; a dead service
        // or a sharing violation does not on its own.
        assert!(map(E::RemovedCard).is_retryable());
        assert!(map(E::ResetCard).is_retryable());
        assert!(map(E::Timeout).is_retryable());
        assert!(!map(E::NoService).is_retryable());
        assert!(!map(E::SharingViolation).is_retryable());
    }

    #[test]
    fn insertion_changes_with_every_insertion() {
        let mut p = Presence::default();
        assert_eq!(p.slot(), SlotState::Empty);
        p.observe(true, 1, &[0x3B, 0x00]);
        let first = p.slot();
        assert_eq!(first, SlotState::Present { atr: Atr(vec![0x3B, 0x00]), insertion: 1 });
        // Same card, other state bits changed (in use): same insertion.
        p.observe(true, 1, &[0x3B, 0x00]);
        assert_eq!(p.slot(), first);
        // Removed and inserted again, seen both times.
        p.observe(false, 2, &[]);
        assert_eq!(p.slot(), SlotState::Empty);
        p.observe(true, 3, &[0x3B, 0x00]);
        assert!(matches!(p.slot(), SlotState::Present { insertion: 2, .. }));
        // Swapped between two calls: only pcscd's event counter tells.
        p.observe(true, 5, &[0x3B, 0x00]);
        assert!(matches!(p.slot(), SlotState::Present { insertion: 3, .. }));
        // pcscd restarted: its counter starts over; counted as new.
        p.restart();
        p.observe(true, 1, &[0x3B, 0x00]);
        assert!(matches!(p.slot(), SlotState::Present { insertion: 4, .. }));
        p.observe(true, 1, &[0x3B, 0x00]);
        assert!(matches!(p.slot(), SlotState::Present { insertion: 4, .. }));
        // A reader that never reports a counter still counts presence edges.
        let mut q = Presence::default();
        for n in 1..=3 {
            q.observe(true, 0, &[1]);
            q.observe(true, 0, &[1]);
            assert!(matches!(q.slot(), SlotState::Present { insertion, .. } if insertion == n));
            q.observe(false, 0, &[]);
        }
    }

    #[test]
    fn part10_tlvs_give_features_and_properties() {
        // FEATURE_VERIFY_PIN_DIRECT (06) and FEATURE_GET_TLV_PROPERTIES (12).
        let features = [0x06, 0x04, 0x42, 0x33, 0x00, 0x06, 0x12, 0x04, 0x42, 0x33, 0x00, 0x12];
        assert_eq!(part10_feature(&features, 0x12), Some(0x4233_0012));
        assert_eq!(part10_feature(&features, 0x06), Some(0x4233_0006));
        assert_eq!(part10_feature(&features, 0x13), None);
        assert_eq!(part10_feature(&features[..10], 0x12), None, "truncated entry");
        // wLcdLayout (01, 2 bytes), dwMaxAPDUDataSize (0A, 4 bytes LE), wIdVendor (0B).
        let props = [0x01, 0x02, 0x00, 0x00, 0x0A, 0x04, 0x00, 0x00, 0x01, 0x00, 0x0B, 0x02, 0x2F, 0x07];
        assert_eq!(part10_property(&props, 0x0A), Some(65_536));
        assert_eq!(part10_property(&props, 0x0B), Some(0x072F));
        assert_eq!(part10_property(&props, 0x01), Some(0));
        assert_eq!(part10_property(&props, 0x02), None);
        assert_eq!(part10_property(&[0x0A, 0x03, 1, 2, 3], 0x0A), None, "odd width");
        assert_eq!(part10_property(&[], 0x0A), None);
        assert_eq!(dword(&[0x05, 0x01, 0, 0]), Some(u32::from_ne_bytes([0x05, 0x01, 0, 0])));
        assert_eq!(dword(&[1, 2]), None);
    }

    #[test]
    fn extended_apdu_support_is_judged_from_what_the_reader_says() {
        use ApduSizeSource::{MaxInput, Part10MaxApduDataSize};
        let none = || Err::<u32, _>("not supported by the reader's driver".to_string());
        let p10 = |v: u32| Ok::<_, String>(Some(v));
        // Part 10 is explicit and wins over MAXINPUT.
        assert_eq!(
            ExtendedApdu::judge(p10(65_536), Ok(261)),
            ExtendedApdu::Supported { limit: 65_536, source: Part10MaxApduDataSize }
        );
        assert_eq!(ExtendedApdu::judge(p10(0), Ok(65_546)), ExtendedApdu::ShortOnly { source: Part10MaxApduDataSize });
        assert_eq!(ExtendedApdu::judge(p10(255), none()), ExtendedApdu::ShortOnly { source: Part10MaxApduDataSize });
        assert_eq!(
            ExtendedApdu::judge(Ok(None), Ok(65_546)),
            ExtendedApdu::Supported { limit: 65_546, source: MaxInput }
        );
        assert_eq!(
            ExtendedApdu::judge(Err("no".into()), Ok(SHORT_COMMAND_MAX + 1)),
            ExtendedApdu::Supported { limit: 262, source: MaxInput }
        );
        // A short-sized MAXINPUT does not tell (T=1 chaining).
        let short = ExtendedApdu::judge(Ok(None), Ok(SHORT_COMMAND_MAX));
        assert!(!short.is_known());
        assert!(short.to_string().contains("up to 261 bytes"), "{short}");
        // Nothing answered: unknown, saying what each query answered.
        let nothing = ExtendedApdu::judge(Err("feature list not supported".into()), none());
        assert_eq!(
            nothing.to_string(),
            "unknown: the reader reports no APDU size: SCARD_ATTR_MAXINPUT: not supported by the reader's \
             driver; PC/SC part 10 dwMaxAPDUDataSize: feature list not supported"
        );
        assert_eq!(
            ExtendedApdu::Supported { limit: 65_536, source: Part10MaxApduDataSize }.to_string(),
            "extended APDUs, up to 65536 data bytes (PC/SC part 10 dwMaxAPDUDataSize)"
        );
        assert_eq!(ExtendedApdu::ShortOnly { source: MaxInput }.to_string(), "short APDUs only (SCARD_ATTR_MAXINPUT)");
    }

    #[test]
    fn cancel_is_sticky_and_reaches_registered_contexts_only_while_alive() {
        let group = PcscCanceller::new();
        let cell: Arc<ContextCell> = Arc::new(Mutex::new(None));
        group.register(&cell);
        drop(cell);
        // A dead member is skipped; nothing to cancel is not an error.
        group.cancel();
        assert!(group.is_cancelled());
        assert!(group.clone().is_cancelled());
        group.register(&Arc::new(Mutex::new(None)));
        assert_eq!(lock(&group.0.members).len(), 1, "dead members are pruned");
    }
}
