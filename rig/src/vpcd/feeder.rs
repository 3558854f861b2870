//! The bridge's card feeder: one thread per vpcd slot serving the card in
//! it (`VpcdCard`), a hopper of fresh cards, PASS/FAIL bins, and what the
//! control socket asks of them (eject, remove, insert, status). It owns the
//! cards and the loopback connections to vpcd; it never talks PC/SC.
//!
//! A card in a slot is either arriving (due at an instant), in the field
//! (its slot thread owns it and serves vpcd), pulled aside, or gone to a
//! bin. Between a card leaving a slot and the next one entering it at
//! least `reinsert_gap` passes: pcscd polls presence every 400 ms and can
//! miss a re-insertion faster than that (it then never powers the new card
//! up and answers "no smart card" until it leaves).

use std::collections::VecDeque;
use std::fmt;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use card::cardid::CardId;
use card::emu::EmuCard;

use super::{Served, VpcdCard};

/// Least time between a card leaving a slot and the next entering it.
pub const REINSERT_GAP: Duration = Duration::from_millis(1100);

/// Longest wait between two connection attempts while vpcd is not listening.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Where the operator's verdict sends a card.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
        })
    }
}

#[derive(Debug, Clone)]
pub struct FeederConfig {
    /// Slot i serves vpcd port `port_base + i`.
    pub port_base: u16,
    pub readers: usize,
    /// Scales the cards' modeled latency: 1.0 realistic, 0 instant.
    pub speed: f64,
    /// How long a mute card keeps vpcd waiting before its connection
    /// closes: vpcd itself never times out (the reader's timeout).
    pub mute_timeout: Duration,
    pub reinsert_gap: Duration,
}

impl FeederConfig {
    /// Instant cards (speed 0) on `readers` ports from `port_base`, mute
    /// cards released after 2 s, the usual re-insertion gap: what tests
    /// through a real pcscd want.
    pub fn instant(port_base: u16, readers: usize) -> Self {
        Self { port_base, readers, speed: 0.0, mute_timeout: Duration::from_secs(2), reinsert_gap: REINSERT_GAP }
    }

    pub fn ports(&self) -> impl Iterator<Item = u16> + use<> {
        let base = self.port_base;
        (0..self.readers).map(move |i| base + i as u16)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FeederError {
    #[error("no slot on port {0}")]
    NoSlot(u16),
    #[error("port {0}: no card in the slot")]
    NoCard(u16),
    #[error("port {0}: card {1} is in the slot")]
    Occupied(u16, CardId),
    #[error("port {0}: card {1} is on its way in")]
    Arriving(u16, CardId),
    #[error("port {0}: the card is already being taken out")]
    Busy(u16),
    #[error("the hopper is empty")]
    HopperEmpty,
    #[error("port {0}: the slot did not let go of its card within {1:?}")]
    Stuck(u16, Duration),
    #[error("the feeder is shutting down")]
    ShuttingDown,
}

/// Where a slot's card is.
enum Holder {
    Empty,
    /// Enters the field at `at`. `fresh`: straight from the hopper, never
    /// seen by a reader (the operator cannot have a verdict on it yet).
    Arriving {
        card: EmuCard,
        at: Instant,
        fresh: bool,
    },
    /// In the field: the slot thread owns the card.
    InField {
        id: CardId,
    },
    /// Out of the reader, kept aside (scripted removal or REMOVE).
    Pulled(EmuCard),
}

/// What the control asked of a card in the field.
#[derive(Debug, Clone, Copy)]
enum Kick {
    Eject(Verdict),
    Remove,
}

/// Why a card's time in the field ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Taken out by the control or the shutdown (before or after connecting).
    Interrupted,
    /// vpcd closed the connection (pcscd stopped).
    Closed,
    /// The card's fault script pulled it out.
    Removed,
    /// Mute: silent for the mute timeout, then the connection closed.
    Mute,
    /// Browned out: the connection closed without an answer.
    Reset,
}

struct Slot {
    port: u16,
    holder: Holder,
    /// The live connection, for shutting it down from the control.
    conn: Option<TcpStream>,
    kick: Option<Kick>,
    left_at: Option<Instant>,
    apdus: u64,
    modeled: Duration,
}

struct State {
    slots: Vec<Slot>,
    hopper: VecDeque<EmuCard>,
    pass: Vec<CardId>,
    fail: Vec<CardId>,
    inserted: u64,
    quit: bool,
}

/// A line of the feeder's log (one card event).
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

struct Shared {
    config: FeederConfig,
    state: Mutex<State>,
    changed: Condvar,
    log: Log,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// The feeder: cloneable handle on the slots, hopper and bins.
#[derive(Clone)]
pub struct Feeder {
    shared: Arc<Shared>,
}

/// What EJECT did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ejected {
    pub card: CardId,
    /// The next card from the hopper and when it enters the field.
    pub next: Option<(CardId, Duration)>,
}

/// A slot as STATUS shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotView {
    Present(CardId),
    Arriving(CardId),
    Pulled(CardId),
    Empty,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub slots: Vec<(u16, SlotView)>,
    pub hopper: usize,
    pub pass: usize,
    pub fail: usize,
}

impl fmt::Display for Status {
    /// `46100=present:ID 46101=empty 46102=pulled:ID 46103=arriving:ID hopper=N pass=N fail=N`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (port, view) in &self.slots {
            match view {
                SlotView::Present(id) => write!(f, "{port}=present:{id} ")?,
                SlotView::Arriving(id) => write!(f, "{port}=arriving:{id} ")?,
                SlotView::Pulled(id) => write!(f, "{port}=pulled:{id} ")?,
                SlotView::Empty => write!(f, "{port}=empty ")?,
            }
        }
        write!(f, "hopper={} pass={} fail={}", self.hopper, self.pass, self.fail)
    }
}

/// The end of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Cards entering the field, re-seats included.
    pub inserted: u64,
    pub pass: Vec<CardId>,
    pub fail: Vec<CardId>,
    pub pulled: Vec<(u16, CardId)>,
    /// Cards still in (or on their way into) a slot.
    pub in_slots: Vec<(u16, CardId)>,
    pub hopper: usize,
    /// Per slot: port, command APDUs, modeled card time (speed 1.0).
    pub slots: Vec<(u16, u64, Duration)>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "summary: {} insertions; binned {} PASS, {} FAIL; {} pulled aside, {} in slots, {} left in the hopper",
            self.inserted,
            self.pass.len(),
            self.fail.len(),
            self.pulled.len(),
            self.in_slots.len(),
            self.hopper
        )?;
        for (port, apdus, modeled) in &self.slots {
            writeln!(f, "  port {port}: {apdus} APDUs, modeled card time {:.3} s", modeled.as_secs_f64())?;
        }
        Ok(())
    }
}

impl Feeder {
    /// Puts a card from `cards` (the hopper, in order) on every slot and
    /// starts one thread per slot. The first cards too enter only after the
    /// re-insertion gap: a card of an earlier run (another bridge, a test)
    /// may just have left the same vpcd port.
    pub fn start(config: FeederConfig, cards: Vec<EmuCard>, log: Log) -> Self {
        let now = Instant::now() + config.reinsert_gap;
        let mut hopper: VecDeque<EmuCard> = cards.into();
        let slots = config
            .ports()
            .map(|port| Slot {
                port,
                holder: match hopper.pop_front() {
                    Some(card) => Holder::Arriving { card, at: now, fresh: true },
                    None => Holder::Empty,
                },
                conn: None,
                kick: None,
                left_at: None,
                apdus: 0,
                modeled: Duration::ZERO,
            })
            .collect();
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(State { slots, hopper, pass: Vec::new(), fail: Vec::new(), inserted: 0, quit: false }),
            changed: Condvar::new(),
            log,
            threads: Mutex::new(Vec::new()),
        });
        let threads = (0..shared.config.readers)
            .map(|i| {
                let s = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("vpcd-{}", s.config.port_base as usize + i))
                    .spawn(move || run_slot(&s, i))
                    .expect("spawning a slot thread")
            })
            .collect();
        *shared.threads.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = threads;
        Self { shared }
    }

    pub fn config(&self) -> &FeederConfig {
        &self.shared.config
    }

    /// The card leaves its slot for a bin; the next card from the hopper
    /// follows after the re-insertion gap. Works on a card in the field,
    /// pulled aside, or being re-seated.
    pub fn eject(&self, port: u16, verdict: Verdict) -> Result<Ejected, FeederError> {
        let sh = &self.shared;
        let mut st = sh.lock();
        let i = sh.index(&st, port)?;
        let card = match &st.slots[i].holder {
            Holder::InField { id } => {
                let id = *id;
                st = sh.interrupt(st, i, Kick::Eject(verdict))?;
                let next = match &st.slots[i].holder {
                    Holder::Arriving { card, at, fresh: true } => {
                        Some((card.id(), at.saturating_duration_since(Instant::now())))
                    }
                    _ => None,
                };
                return Ok(Ejected { card: id, next });
            }
            Holder::Arriving { card, fresh: true, .. } => return Err(FeederError::Arriving(port, card.id())),
            Holder::Empty => return Err(FeederError::NoCard(port)),
            Holder::Pulled(_) | Holder::Arriving { fresh: false, .. } => {
                match std::mem::replace(&mut st.slots[i].holder, Holder::Empty) {
                    Holder::Pulled(card) | Holder::Arriving { card, .. } => card,
                    _ => unreachable!("matched above"),
                }
            }
        };
        let id = card.id();
        sh.bin(&mut st, port, id, verdict);
        let at = sh.next_insertion(&st.slots[i]);
        let next = sh.refill(&mut st, i, at);
        sh.changed.notify_all();
        Ok(Ejected { card: id, next })
    }

    /// Pulls the card out of the reader without a verdict; it is kept aside
    /// until INSERT or EJECT.
    pub fn remove(&self, port: u16) -> Result<CardId, FeederError> {
        let sh = &self.shared;
        let mut st = sh.lock();
        let i = sh.index(&st, port)?;
        match &st.slots[i].holder {
            Holder::InField { id } => {
                let id = *id;
                drop(sh.interrupt(st, i, Kick::Remove)?);
                Ok(id)
            }
            Holder::Arriving { card, fresh: true, .. } => Err(FeederError::Arriving(port, card.id())),
            Holder::Arriving { fresh: false, .. } => {
                let Holder::Arriving { card, .. } = std::mem::replace(&mut st.slots[i].holder, Holder::Empty) else {
                    unreachable!("matched above")
                };
                let id = card.id();
                st.slots[i].holder = Holder::Pulled(card);
                sh.changed.notify_all();
                Ok(id)
            }
            Holder::Pulled(_) | Holder::Empty => Err(FeederError::NoCard(port)),
        }
    }

    /// Puts the pulled card back, or else the next card from the hopper;
    /// it enters the field once the re-insertion gap has passed.
    pub fn insert(&self, port: u16) -> Result<(CardId, Duration), FeederError> {
        let sh = &self.shared;
        let mut st = sh.lock();
        if st.quit {
            return Err(FeederError::ShuttingDown);
        }
        let i = sh.index(&st, port)?;
        let at = sh.next_insertion(&st.slots[i]);
        match std::mem::replace(&mut st.slots[i].holder, Holder::Empty) {
            Holder::Pulled(card) => {
                let id = card.id();
                st.slots[i].holder = Holder::Arriving { card, at, fresh: false };
                sh.changed.notify_all();
                Ok((id, at.saturating_duration_since(Instant::now())))
            }
            Holder::Empty => sh.refill(&mut st, i, at).ok_or(FeederError::HopperEmpty).inspect(|_| {
                sh.changed.notify_all();
            }),
            other => {
                let err = match &other {
                    Holder::InField { id } => FeederError::Occupied(port, *id),
                    Holder::Arriving { card, .. } => FeederError::Arriving(port, card.id()),
                    _ => unreachable!("handled above"),
                };
                st.slots[i].holder = other;
                Err(err)
            }
        }
    }

    pub fn status(&self) -> Status {
        let st = self.shared.lock();
        Status {
            slots: st
                .slots
                .iter()
                .map(|s| {
                    let view = match &s.holder {
                        Holder::InField { id } => SlotView::Present(*id),
                        Holder::Arriving { card, .. } => SlotView::Arriving(card.id()),
                        Holder::Pulled(card) => SlotView::Pulled(card.id()),
                        Holder::Empty => SlotView::Empty,
                    };
                    (s.port, view)
                })
                .collect(),
            hopper: st.hopper.len(),
            pass: st.pass.len(),
            fail: st.fail.len(),
        }
    }

    /// Takes every card out of the field (closing the vpcd connections),
    /// stops the slot threads and sums up. Idempotent.
    pub fn shutdown(&self) -> Summary {
        let sh = &self.shared;
        {
            let mut st = sh.lock();
            st.quit = true;
            for slot in &mut st.slots {
                if let Some(conn) = &slot.conn {
                    let _ = conn.shutdown(Shutdown::Both);
                }
            }
            sh.changed.notify_all();
        }
        let threads = std::mem::take(&mut *sh.threads.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        for t in threads {
            let _ = t.join();
        }
        let st = sh.lock();
        let mut pulled = Vec::new();
        let mut in_slots = Vec::new();
        for s in &st.slots {
            match &s.holder {
                Holder::Pulled(card) => pulled.push((s.port, card.id())),
                Holder::Arriving { card, .. } => in_slots.push((s.port, card.id())),
                Holder::InField { id } => in_slots.push((s.port, *id)),
                Holder::Empty => {}
            }
        }
        Summary {
            inserted: st.inserted,
            pass: st.pass.clone(),
            fail: st.fail.clone(),
            pulled,
            in_slots,
            hopper: st.hopper.len(),
            slots: st.slots.iter().map(|s| (s.port, s.apdus, s.modeled)).collect(),
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a slot thread panicked; every update
        // of the state is a single move, so it is still consistent.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn log(&self, line: &str) {
        (self.log)(line);
    }

    fn index(&self, st: &State, port: u16) -> Result<usize, FeederError> {
        st.slots.iter().position(|s| s.port == port).ok_or(FeederError::NoSlot(port))
    }

    /// Asks the slot thread to take its card out of the field (closing the
    /// connection wakes it from any read) and waits until it has.
    fn interrupt<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        i: usize,
        kick: Kick,
    ) -> Result<MutexGuard<'a, State>, FeederError> {
        let port = st.slots[i].port;
        if st.slots[i].kick.is_some() {
            return Err(FeederError::Busy(port));
        }
        st.slots[i].kick = Some(kick);
        if let Some(conn) = &st.slots[i].conn {
            let _ = conn.shutdown(Shutdown::Both);
        }
        self.changed.notify_all();
        // The thread may be sleeping a card's modeled latency (under a
        // second at speed 1.0) before it notices.
        let limit = Duration::from_secs(10) + Duration::from_secs_f64(self.config.speed.clamp(0.0, 100.0));
        let deadline = Instant::now() + limit;
        while st.slots[i].kick.is_some() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FeederError::Stuck(port, limit));
            }
            st = self.changed.wait_timeout(st, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
        Ok(st)
    }

    fn bin(&self, st: &mut State, port: u16, id: CardId, verdict: Verdict) {
        match verdict {
            Verdict::Pass => st.pass.push(id),
            Verdict::Fail => st.fail.push(id),
        }
        self.log(&format!("port {port}: card {id} binned {verdict}"));
    }

    /// When the next card may enter slot `slot`: the re-insertion gap after
    /// the last card left.
    fn next_insertion(&self, slot: &Slot) -> Instant {
        let now = Instant::now();
        slot.left_at.map_or(now, |t| (t + self.config.reinsert_gap).max(now))
    }

    /// Schedules the next hopper card into the (empty) slot `i`.
    fn refill(&self, st: &mut State, i: usize, at: Instant) -> Option<(CardId, Duration)> {
        let card = st.hopper.pop_front()?;
        let id = card.id();
        st.slots[i].holder = Holder::Arriving { card, at, fresh: true };
        Some((id, at.saturating_duration_since(Instant::now())))
    }

    /// Blocks until slot `i`'s arriving card is due, and takes it into the
    /// field; `None` at shutdown.
    fn next_arrival(&self, i: usize) -> Option<EmuCard> {
        let mut st = self.lock();
        loop {
            if st.quit {
                return None;
            }
            let now = Instant::now();
            let wait = match &st.slots[i].holder {
                Holder::Arriving { at, .. } if *at <= now => Duration::ZERO,
                Holder::Arriving { at, .. } => *at - now,
                _ => Duration::from_secs(3600),
            };
            if wait.is_zero() {
                let Holder::Arriving { card, .. } = std::mem::replace(&mut st.slots[i].holder, Holder::Empty) else {
                    unreachable!("matched above")
                };
                st.slots[i].holder = Holder::InField { id: card.id() };
                st.inserted += 1;
                self.changed.notify_all();
                return Some(card);
            }
            st = self.changed.wait_timeout(st, wait).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
    }

    fn interrupted(&self, st: &State, i: usize) -> bool {
        st.quit || st.slots[i].kick.is_some()
    }

    /// Sleeps up to `d`, waking early when the slot is interrupted.
    fn pause(&self, i: usize, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut st = self.lock();
        loop {
            if self.interrupted(&st, i) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self.changed.wait_timeout(st, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
    }

    /// Files the card of slot `i` after its time in the field: the control's
    /// request first, then what the card did.
    fn settle(&self, i: usize, card: EmuCard, end: End, apdus: u64, modeled: Duration) {
        let mut st = self.lock();
        let now = Instant::now();
        let id = card.id();
        let slot = &mut st.slots[i];
        let port = slot.port;
        slot.conn = None;
        slot.left_at = Some(now);
        slot.apdus += apdus;
        slot.modeled += modeled;
        let kick = slot.kick.take();
        let reseat = now + self.config.reinsert_gap;
        if st.quit {
            st.slots[i].holder = Holder::Arriving { card, at: now, fresh: false };
        } else {
            match kick {
                Some(Kick::Eject(verdict)) => {
                    st.slots[i].holder = Holder::Empty;
                    self.bin(&mut st, port, id, verdict);
                    if self.refill(&mut st, i, reseat).is_none() {
                        self.log(&format!("port {port}: hopper empty, slot stays empty"));
                    }
                }
                Some(Kick::Remove) => {
                    st.slots[i].holder = Holder::Pulled(card);
                    self.log(&format!("port {port}: card {id} pulled out, kept aside"));
                }
                None => {
                    let why = match end {
                        End::Removed => None,
                        End::Mute => Some("was mute: vpcd connection closed after the mute timeout"),
                        End::Reset => Some("browned out: left the field"),
                        End::Closed => Some("lost its vpcd connection (pcscd stopped?)"),
                        End::Interrupted => Some("was interrupted"),
                    };
                    match why {
                        None => {
                            st.slots[i].holder = Holder::Pulled(card);
                            self.log(&format!(
                                "port {port}: card {id} left the field (scripted removal), kept aside: INSERT puts it back, EJECT bins it"
                            ));
                        }
                        Some(why) => {
                            st.slots[i].holder = Holder::Arriving { card, at: reseat, fresh: false };
                            self.log(&format!(
                                "port {port}: card {id} {why}; re-seated in {} ms",
                                self.config.reinsert_gap.as_millis()
                            ));
                        }
                    }
                }
            }
        }
        self.changed.notify_all();
    }
}

/// What the factory made the card as, and its fault script if any.
fn describe(card: &EmuCard) -> String {
    let f = card.faults();
    let mut parts = vec![card.label().to_string()];
    if let Some((n, point)) = f.remove_at {
        parts.push(format!("pulled out at APDU {n} ({point:?})"));
    }
    if let Some(n) = f.mute_from {
        parts.push(format!("mute from APDU {n}"));
    }
    if let Some(n) = f.reset_at {
        parts.push(format!("browns out at APDU {n}"));
    }
    if let Some((ins, sw)) = f.wrong_sw {
        parts.push(format!("INS {ins:02X} answers {sw:?}"));
    }
    for (on, what) in [
        (f.bad_signature, "bad signatures"),
        (f.stuck_rng, "stuck RNG"),
        (f.failing_kat, "failing self-test"),
        (f.bad_memory, "bad memory"),
    ] {
        if on {
            parts.push(what.to_string());
        }
    }
    if f.slow_factor != 1.0 {
        parts.push(format!("{}x slower", f.slow_factor));
    }
    parts.join(", ")
}

/// One slot's thread: waits for a card to be due, serves it until it
/// leaves the field, files it, again.
fn run_slot(sh: &Shared, i: usize) {
    let port = sh.config.port_base + i as u16;
    while let Some(card) = sh.next_arrival(i) {
        sh.log(&format!("port {port}: card {} ({}) inserted", card.id(), describe(&card)));
        let (card, end, apdus, modeled) = serve(sh, i, port, card);
        sh.settle(i, card, end, apdus, modeled);
    }
}

/// Connects the card to vpcd (retrying while vpcd is not listening) and
/// serves it until its time in the field ends.
fn serve(sh: &Shared, i: usize, port: u16, card: EmuCard) -> (EmuCard, End, u64, Duration) {
    // vpcd binds all interfaces; the cards only ever use loopback.
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut backoff = Duration::from_millis(50);
    let mut told = false;
    let stream = loop {
        if sh.interrupted(&sh.lock(), i) {
            return (card, End::Interrupted, 0, Duration::ZERO);
        }
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => break s,
            Err(e) => {
                if !told {
                    sh.log(&format!("port {port}: vpcd not reachable ({e}); retrying"));
                    told = true;
                }
                if sh.pause(i, backoff) {
                    return (card, End::Interrupted, 0, Duration::ZERO);
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    };
    let mut vc = VpcdCard::new(stream, card, sh.config.speed);
    {
        let mut st = sh.lock();
        st.slots[i].conn = vc.stream_handle().ok();
        if sh.interrupted(&st, i) {
            vc.close();
        }
    }
    let end = loop {
        match vc.serve_one() {
            Served::Control(_) | Served::Answered => {}
            Served::Closed => break End::Closed,
            Served::Removed => break End::Removed,
            Served::Reset => break End::Reset,
            Served::Mute => {
                sh.log(&format!(
                    "port {port}: card {} is mute; vpcd never times out, the connection closes in {} ms",
                    vc.card().id(),
                    sh.config.mute_timeout.as_millis()
                ));
                vc.hold_silent(sh.config.mute_timeout);
                vc.close();
                break End::Mute;
            }
        }
    };
    let (apdus, modeled) = (vc.apdus(), vc.modeled_time());
    (vc.into_card(), end, apdus, modeled)
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use card::emu::factory::{ChipFactory, ChipKind};
    use card::emu::{CardFaults, TearPoint};

    use super::*;
    use crate::vpcd::{CTRL_ATR, read_message, write_message};

    const SELECT_ISD: [u8; 13] = [0x00, 0xA4, 0x04, 0x00, 0x08, 0xA0, 0x00, 0x00, 0x01, 0x51, 0x00, 0x00, 0x00];

    /// Plays vpcd for one slot: a listener on a free loopback port.
    struct FakeVpcd {
        listener: TcpListener,
    }

    impl FakeVpcd {
        fn new() -> Self {
            Self { listener: TcpListener::bind("127.0.0.1:0").expect("bind") }
        }
        fn port(&self) -> u16 {
            self.listener.local_addr().expect("addr").port()
        }
        fn accept(&self) -> TcpStream {
            let (s, _) = self.listener.accept().expect("accept");
            s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            s
        }
    }

    fn atr_of(s: &mut TcpStream) -> Vec<u8> {
        write_message(s, &[CTRL_ATR]).expect("send");
        read_message(s).expect("read").expect("an ATR")
    }

    fn cards(n: usize, faults: CardFaults) -> Vec<EmuCard> {
        let mut f = ChipFactory::new(3);
        (0..n).map(|_| f.make(ChipKind::Genuine, faults.clone())).collect()
    }

    fn feeder(port: u16, cards: Vec<EmuCard>, gap: Duration) -> Feeder {
        let config = FeederConfig {
            port_base: port,
            readers: 1,
            speed: 0.0,
            mute_timeout: Duration::from_millis(100),
            reinsert_gap: gap,
        };
        Feeder::start(config, cards, Arc::new(|_: &str| {}))
    }

    fn wait_for(f: &Feeder, what: impl Fn(&SlotView) -> bool) -> SlotView {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let view = f.status().slots[0].1.clone();
            if what(&view) || Instant::now() > deadline {
                return view;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn eject_bins_the_card_and_the_next_arrives_after_the_gap() {
        let vpcd = FakeVpcd::new();
        let port = vpcd.port();
        let cs = cards(3, CardFaults::default());
        let ids: Vec<CardId> = cs.iter().map(EmuCard::id).collect();
        let atrs: Vec<Vec<u8>> = cs.iter().map(|c| c.atr().to_vec()).collect();
        let f = feeder(port, cs, Duration::from_millis(300));
        let mut conn = vpcd.accept();
        assert_eq!(atr_of(&mut conn), atrs[0]);
        assert_eq!(wait_for(&f, |v| matches!(v, SlotView::Present(_))), SlotView::Present(ids[0]));

        let t = Instant::now();
        let ejected = f.eject(port, Verdict::Pass).expect("eject");
        assert_eq!(ejected.card, ids[0]);
        assert_eq!(ejected.next.map(|n| n.0), Some(ids[1]));
        assert_eq!(read_message(&mut conn).expect("closed"), None, "ejecting closes the connection");
        let mut conn = vpcd.accept();
        assert!(t.elapsed() >= Duration::from_millis(300), "next card only after the gap: {:?}", t.elapsed());
        assert_eq!(atr_of(&mut conn), atrs[1]);
        let st = f.status();
        assert_eq!((st.pass, st.fail, st.hopper), (1, 0, 1));

        assert_eq!(f.eject(port, Verdict::Fail).expect("eject").card, ids[1]);
        let _third = vpcd.accept();
        assert_eq!(wait_for(&f, |v| matches!(v, SlotView::Present(_))), SlotView::Present(ids[2]));
        assert_eq!(f.eject(port, Verdict::Pass).expect("eject").next, None, "hopper empty");
        assert_eq!(f.status().slots[0].1, SlotView::Empty);
        assert_eq!(f.eject(port, Verdict::Pass), Err(FeederError::NoCard(port)));
        assert_eq!(f.insert(port), Err(FeederError::HopperEmpty));
        assert_eq!(f.eject(port + 1, Verdict::Pass), Err(FeederError::NoSlot(port + 1)));
        let summary = f.shutdown();
        assert_eq!((summary.inserted, summary.pass.len(), summary.fail.len()), (3, 2, 1));
    }

    #[test]
    fn remove_keeps_the_card_aside_and_insert_puts_it_back() {
        let vpcd = FakeVpcd::new();
        let port = vpcd.port();
        let cs = cards(2, CardFaults::default());
        let first = cs[0].id();
        let f = feeder(port, cs, Duration::from_millis(100));
        let mut conn = vpcd.accept();
        atr_of(&mut conn);
        wait_for(&f, |v| matches!(v, SlotView::Present(_)));
        assert_eq!(f.remove(port), Ok(first));
        assert_eq!(read_message(&mut conn).expect("closed"), None);
        assert_eq!(f.status().slots[0].1, SlotView::Pulled(first));
        assert_eq!(f.remove(port), Err(FeederError::NoCard(port)));
        let (again, _) = f.insert(port).expect("insert");
        assert_eq!(again, first, "the pulled card goes back, not a new one");
        let mut conn = vpcd.accept();
        atr_of(&mut conn);
        assert_eq!(wait_for(&f, |v| matches!(v, SlotView::Present(_))), SlotView::Present(first));
        assert_eq!(f.insert(port), Err(FeederError::Occupied(port, first)));
        assert_eq!(f.status().hopper, 1);
        f.shutdown();
    }

    #[test]
    fn a_scripted_removal_pulls_the_card_and_eject_bins_it() {
        let vpcd = FakeVpcd::new();
        let port = vpcd.port();
        let cs = cards(2, CardFaults { remove_at: Some((1, TearPoint::Before)), ..CardFaults::default() });
        let (first, second) = (cs[0].id(), cs[1].id());
        let f = feeder(port, cs, Duration::from_millis(50));
        let mut conn = vpcd.accept();
        write_message(&mut conn, &SELECT_ISD).expect("send");
        assert_eq!(read_message(&mut conn).expect("closed"), None, "the card left without answering");
        assert_eq!(wait_for(&f, |v| matches!(v, SlotView::Pulled(_))), SlotView::Pulled(first));
        let ejected = f.eject(port, Verdict::Fail).expect("eject");
        assert_eq!((ejected.card, ejected.next.map(|n| n.0)), (first, Some(second)));
        let _next = vpcd.accept();
        assert_eq!(wait_for(&f, |v| matches!(v, SlotView::Present(_))), SlotView::Present(second));
        assert_eq!(f.shutdown().fail, vec![first]);
    }

    #[test]
    fn a_mute_card_is_closed_after_the_timeout_and_reseated() {
        let vpcd = FakeVpcd::new();
        let port = vpcd.port();
        let cs = cards(1, CardFaults { mute_from: Some(1), ..CardFaults::default() });
        let id = cs[0].id();
        let f = feeder(port, cs, Duration::from_millis(50));
        let mut conn = vpcd.accept();
        write_message(&mut conn, &SELECT_ISD).expect("send");
        let t = Instant::now();
        assert_eq!(read_message(&mut conn).expect("closed"), None);
        assert!(t.elapsed() >= Duration::from_millis(100), "silent for the mute timeout");
        // Still the same card: a mute card stays on the reader.
        let mut conn = vpcd.accept();
        atr_of(&mut conn);
        assert_eq!(wait_for(&f, |v| matches!(v, SlotView::Present(_))), SlotView::Present(id));
        f.shutdown();
    }

    #[test]
    fn waits_for_vpcd_and_shutdown_interrupts_the_wait() {
        // Nothing listens on this port (bound, then dropped).
        let port = FakeVpcd::new().port();
        let f = feeder(port, cards(1, CardFaults::default()), Duration::from_millis(50));
        assert!(matches!(wait_for(&f, |v| matches!(v, SlotView::Present(_))), SlotView::Present(_)));
        std::thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        let summary = f.shutdown();
        assert!(t.elapsed() < Duration::from_secs(3));
        assert_eq!(summary.in_slots.len(), 1);
        assert_eq!(summary.slots[0].1, 0);
    }
}
