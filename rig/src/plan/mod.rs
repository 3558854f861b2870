//! Regression plans: the YAML under `rig/plans/` (docs/rig-plans.md) that
//! says which cards and faults each scenario puts on the line and what must
//! come out of it. Parsed with unknown keys rejected, then validated as a
//! whole: every problem is reported with file, line and field. This module
//! owns the plan's format only; `run` runs plans, `report` writes them up.

pub mod cards;
pub mod report;
pub mod run;
pub mod trace;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;
use station::profile::Profile;
use station::recipe::Step;

/// Where a plan runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// Emulated readers in this process (`EmuBank`).
    Sim,
    /// A real pcscd with vpcd readers, cards served by the rig's feeder.
    Pcsc,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sim => "sim",
            Self::Pcsc => "pcsc",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sim" => Some(Self::Sim),
            "pcsc" => Some(Self::Pcsc),
            _ => None,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

pub use station::profile::Problem;

/// Every problem found in one plan file.
#[derive(Debug, thiserror::Error)]
pub struct PlanError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        station::profile::write_problems(f, "plan", &self.file, &self.problems)
    }
}

// ---- the file as written -------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    name: Spanned<String>,
    #[serde(default)]
    description: Option<String>,
    /// Profile file, relative to the plan.
    profile: Spanned<String>,
    #[serde(default)]
    target: Option<Spanned<String>>,
    #[serde(default)]
    sim: Option<RawSim>,
    #[serde(default)]
    pcsc: Option<RawPcsc>,
    #[serde(default)]
    sweep: Option<RawSweep>,
    #[serde(default)]
    scenarios: Vec<RawScenario>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSim {
    #[serde(default)]
    card_speed: Option<Spanned<f64>>,
    #[serde(default)]
    seed: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPcsc {
    /// The first vpcd reader of scripts/pcscd-vpcd.sh the plan uses, by
    /// number (its port is the pcscd's port base + n); scenarios use the
    /// readers from there on.
    first_reader: Spanned<u32>,
    /// How many readers from `first_reader` on the plan may use.
    readers: Spanned<u32>,
    #[serde(default)]
    card_speed: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSweep {
    #[serde(default)]
    readers: Option<Spanned<u32>>,
    #[serde(default)]
    points: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    targets: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: Spanned<String>,
    #[serde(default)]
    targets: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    readers: Option<Spanned<u32>>,
    #[serde(default)]
    bundles: Option<Spanned<bool>>,
    /// Overrides the target's card speed for this scenario.
    #[serde(default)]
    card_speed: Option<Spanned<f64>>,
    cards: Vec<RawCards>,
    #[serde(default)]
    faults: Vec<RawLineFault>,
    #[serde(default)]
    expect: Option<RawScenarioExpect>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCards {
    kind: Spanned<String>,
    #[serde(default)]
    count: Option<Spanned<u32>>,
    #[serde(default)]
    remove: Option<RawAt>,
    #[serde(default)]
    reset: Option<RawAt>,
    #[serde(default)]
    mute: Option<RawAt>,
    /// Times the card is put back after a failed attempt.
    #[serde(default)]
    reinsert: Option<Spanned<u32>>,
    expect: RawExpect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAt {
    #[serde(default)]
    apdu: Option<Spanned<u64>>,
    #[serde(default)]
    step: Option<Spanned<String>>,
    #[serde(default)]
    offset: Option<Spanned<u64>>,
    #[serde(default)]
    point: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExpect {
    result: Spanned<String>,
    #[serde(default)]
    step: Option<Spanned<String>>,
    #[serde(default)]
    reason: Option<Spanned<String>>,
    #[serde(default)]
    retryable: Option<Spanned<bool>>,
    #[serde(default)]
    attempts: Option<Spanned<u32>>,
    #[serde(default)]
    stage: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLineFault {
    kind: Spanned<String>,
    /// The reader (index in the scenario's readers) for `reader_unplug`.
    #[serde(default)]
    reader: Option<Spanned<u32>>,
    /// Fires when a card starts this step ...
    step: Spanned<String>,
    /// ... for the nth time in the scenario (default 1).
    #[serde(default)]
    nth: Option<Spanned<u32>>,
    /// How long the reader, service or power stays away.
    #[serde(default)]
    for_ms: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenarioExpect {
    #[serde(default)]
    sealed: Option<Spanned<u32>>,
    #[serde(default)]
    aborted: Option<Spanned<u32>>,
    #[serde(default)]
    bundle_size: Option<Spanned<u32>>,
    #[serde(default)]
    max_seconds: Option<Spanned<f64>>,
}

// ---- the validated plan -------------------------------------------------

/// The kinds of card a scenario can put on the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CardKind {
    Genuine,
    Counterfeit,
    /// A second chip with the identity of the scenario's first card.
    Clone,
    Expired,
    /// The vendor shipped other default GP keys.
    WrongKeys,
    StuckRng,
    /// The slow card model (125 ms a LOAD block).
    Slow,
    /// Stops answering at APDU 3 (or where `mute` says).
    Mute,
    /// An older build of the wallet package already loaded and installed.
    WrongFirmware,
    /// The card manager is in life cycle CARD_LOCKED.
    Locked,
    FailingKat,
    BadSignature,
    BadMemory,
    /// LOAD answers 6A84.
    FullMemory,
}

impl CardKind {
    pub const ALL: [CardKind; 14] = [
        Self::Genuine,
        Self::Counterfeit,
        Self::Clone,
        Self::Expired,
        Self::WrongKeys,
        Self::StuckRng,
        Self::Slow,
        Self::Mute,
        Self::WrongFirmware,
        Self::Locked,
        Self::FailingKat,
        Self::BadSignature,
        Self::BadMemory,
        Self::FullMemory,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Genuine => "genuine",
            Self::Counterfeit => "counterfeit",
            Self::Clone => "clone",
            Self::Expired => "expired",
            Self::WrongKeys => "wrong_keys",
            Self::StuckRng => "stuck_rng",
            Self::Slow => "slow",
            Self::Mute => "mute",
            Self::WrongFirmware => "wrong_firmware",
            Self::Locked => "locked",
            Self::FailingKat => "failing_kat",
            Self::BadSignature => "bad_signature",
            Self::BadMemory => "bad_memory",
            Self::FullMemory => "full_memory",
        }
    }
}

/// Where in a card's life a scripted event happens: an APDU number
/// (counted from the station's first APDU to the card), or the first APDU
/// of a recipe step plus an offset (resolved by calibration with a genuine
/// card, `run::Calibration`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    Apdu(u64),
    Step { step: Step, offset: u64 },
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Apdu(n) => write!(f, "APDU {n}"),
            Self::Step { step, offset: 0 } => write!(f, "first APDU of {step}"),
            Self::Step { step, offset } => write!(f, "first APDU of {step} + {offset}"),
        }
    }
}

/// One card of a scenario and what must become of it.
#[derive(Debug, Clone)]
pub struct CardSpec {
    pub kind: CardKind,
    pub remove: Option<(At, card::emu::TearPoint)>,
    pub reset: Option<At>,
    pub mute: Option<At>,
    pub reinsert: u32,
    pub expect: Expect,
    /// Where it is written, for messages: `scenarios[i].cards[j]`.
    pub field: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Passed,
    Failed,
}

/// What must become of a card: its final outcome and ledger record.
#[derive(Debug, Clone)]
pub struct Expect {
    pub result: Verdict,
    /// The failing step of the final attempt.
    pub step: Option<Step>,
    /// A substring of the failure reason.
    pub reason: Option<String>,
    pub retryable: Option<bool>,
    /// Attempts the ledger counts.
    pub attempts: Option<u32>,
    /// The ledger's stage of a passed card (`ready_for_pairing`, `bundled`, `unpaired`).
    pub stage: Option<String>,
}

/// Faults of the line rather than of one card.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFaultKind {
    /// One reader goes away and comes back.
    ReaderUnplug { reader: usize },
    /// The PC/SC service restarts.
    PcscdRestart,
    /// The fixture's power relay cuts every reader's power.
    PowerCut,
}

impl LineFaultKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::ReaderUnplug { .. } => "reader_unplug",
            Self::PcscdRestart => "pcscd_restart",
            Self::PowerCut => "power_cut",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineFault {
    pub kind: LineFaultKind,
    pub step: Step,
    pub nth: u32,
    pub duration: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct ScenarioExpect {
    pub sealed: Option<u32>,
    pub aborted: Option<u32>,
    pub bundle_size: Option<u32>,
    pub max_seconds: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub targets: Vec<Target>,
    pub readers: usize,
    /// Bundling on or off; `None`: as the profile says.
    pub bundles: Option<bool>,
    /// The card speed for this scenario; `None`: the target's.
    pub card_speed: Option<f64>,
    pub cards: Vec<CardSpec>,
    pub faults: Vec<LineFault>,
    pub expect: ScenarioExpect,
}

/// The tearing sweep: a genuine card torn at every APDU of the recipe.
#[derive(Debug, Clone)]
pub struct Sweep {
    pub readers: usize,
    pub points: Vec<card::emu::TearPoint>,
    pub targets: Vec<Target>,
}

/// A validated plan.
#[derive(Debug, Clone)]
pub struct Plan {
    pub file: PathBuf,
    pub name: String,
    pub description: Option<String>,
    pub profile: Arc<Profile>,
    pub target: Target,
    pub sim_speed: f64,
    pub seed: u64,
    /// vpcd reader numbers (port = base + n) for the pcsc target:
    /// `first .. first + count`.
    pub pcsc_readers: Option<(u16, usize)>,
    pub pcsc_speed: f64,
    pub sweep: Option<Sweep>,
    pub scenarios: Vec<Scenario>,
}

impl Plan {
    pub fn load(path: &Path) -> Result<Self, PlanError> {
        let text = station::yaml::read(path).map_err(|message| PlanError {
            file: path.to_path_buf(),
            problems: vec![Problem { line: 0, column: 0, field: "(file)".into(), message }],
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates plan text; `path` names it in errors and
    /// anchors the profile's path.
    pub fn parse(text: &str, path: &Path) -> Result<Self, PlanError> {
        let raw: RawPlan = station::yaml::from_str(text).map_err(|e| {
            let (line, column, field, message) = station::yaml::place(text, &e);
            PlanError { file: path.to_path_buf(), problems: vec![Problem { line, column, field, message }] }
        })?;
        let mut v = Validator { problems: Vec::new() };
        let plan = v.plan(raw, path);
        match plan {
            Some(p) if v.problems.is_empty() => Ok(p),
            _ => Err(PlanError { file: path.to_path_buf(), problems: v.problems }),
        }
    }
}

pub fn parse_step(name: &str) -> Option<Step> {
    Step::ALL.iter().copied().chain([Step::Pairing]).find(|s| s.name() == name)
}

fn step_names() -> String {
    Step::ALL.iter().copied().chain([Step::Pairing]).map(Step::name).collect::<Vec<_>>().join(", ")
}

struct Validator {
    problems: Vec<Problem>,
}

impl Validator {
    fn problem<T>(&mut self, at: &Spanned<T>, field: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            line: at.referenced.line(),
            column: at.referenced.column(),
            field: field.to_string(),
            message: message.into(),
        });
    }

    fn targets(&mut self, raw: Option<&Vec<Spanned<String>>>, field: &str) -> Vec<Target> {
        let Some(raw) = raw else { return vec![Target::Sim, Target::Pcsc] };
        let mut out = Vec::new();
        for (i, t) in raw.iter().enumerate() {
            match Target::parse(&t.value) {
                Some(x) => out.push(x),
                None => {
                    self.problem(t, &format!("{field}[{i}]"), format!("unknown target {:?}; known: sim, pcsc", t.value))
                }
            }
        }
        out
    }

    fn step(&mut self, s: &Spanned<String>, field: &str) -> Option<Step> {
        let step = parse_step(&s.value);
        if step.is_none() {
            self.problem(s, field, format!("unknown step {:?}; known: {}", s.value, step_names()));
        }
        step
    }

    fn speed(&mut self, s: Option<&Spanned<f64>>, field: &str) -> f64 {
        match s {
            Some(v) if (0.0..=100.0).contains(&v.value) => v.value,
            Some(v) => {
                self.problem(v, field, format!("{} is outside 0..=100", v.value));
                0.0
            }
            None => 0.0,
        }
    }

    fn plan(&mut self, raw: RawPlan, path: &Path) -> Option<Plan> {
        let base = path.parent().unwrap_or(Path::new("."));
        let profile_path = base.join(&raw.profile.value);
        let profile = match Profile::load(&profile_path) {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => {
                self.problem(&raw.profile, "profile", e.to_string());
                None
            }
        };
        let target = match &raw.target {
            None => Target::Sim,
            Some(t) => Target::parse(&t.value).unwrap_or_else(|| {
                self.problem(t, "target", format!("unknown target {:?}; known: sim, pcsc", t.value));
                Target::Sim
            }),
        };
        let sim_speed = self.speed(raw.sim.as_ref().and_then(|s| s.card_speed.as_ref()), "sim.card_speed");
        let seed = raw.sim.as_ref().and_then(|s| s.seed).unwrap_or(1);
        let mut pcsc_readers = None;
        let mut pcsc_speed = 0.0;
        if let Some(p) = &raw.pcsc {
            pcsc_speed = self.speed(p.card_speed.as_ref(), "pcsc.card_speed");
            let max = rig_max_readers() as u32;
            if p.first_reader.value >= max {
                self.problem(
                    &p.first_reader,
                    "pcsc.first_reader",
                    format!("{} is outside 0..{max}", p.first_reader.value),
                );
            } else if p.readers.value == 0 || p.first_reader.value + p.readers.value > max {
                self.problem(
                    &p.readers,
                    "pcsc.readers",
                    format!("readers {}.. must lie in 0..{max}", p.first_reader.value),
                );
            } else {
                pcsc_readers = Some((p.first_reader.value as u16, p.readers.value as usize));
            }
        }
        let sweep = raw.sweep.as_ref().map(|s| {
            let readers = self.readers(s.readers.as_ref(), "sweep.readers", 8);
            let mut points = Vec::new();
            match &s.points {
                None => points = vec![card::emu::TearPoint::Before, card::emu::TearPoint::After],
                Some(ps) => {
                    for (i, p) in ps.iter().enumerate() {
                        if let Some(x) = self.point(Some(p), &format!("sweep.points[{i}]")) {
                            points.push(x);
                        }
                    }
                }
            }
            Sweep { readers, points, targets: self.targets(s.targets.as_ref(), "sweep.targets") }
        });
        let mut scenarios = Vec::new();
        for (i, s) in raw.scenarios.into_iter().enumerate() {
            if let Some(s) = self.scenario(s, i, profile.as_deref()) {
                scenarios.push(s);
            }
        }
        for (i, s) in scenarios.iter().enumerate() {
            if scenarios[..i].iter().any(|o| o.name == s.name) {
                self.problems.push(Problem {
                    line: 0,
                    column: 0,
                    field: format!("scenarios[{i}].name"),
                    message: format!("{:?} is used twice", s.name),
                });
            }
        }
        if scenarios.is_empty() && sweep.is_none() && self.problems.is_empty() {
            self.problem(&raw.name, "scenarios", "the plan has no scenario and no sweep");
        }
        Some(Plan {
            file: path.to_path_buf(),
            name: raw.name.value,
            description: raw.description,
            profile: profile?,
            target,
            sim_speed,
            seed,
            pcsc_readers,
            pcsc_speed,
            sweep,
            scenarios,
        })
    }

    fn readers(&mut self, r: Option<&Spanned<u32>>, field: &str, default: usize) -> usize {
        match r {
            None => default,
            Some(v) if (1..=rig_max_readers() as u32).contains(&v.value) => v.value as usize,
            Some(v) => {
                self.problem(v, field, format!("{} is outside 1..={}", v.value, rig_max_readers()));
                1
            }
        }
    }

    fn point(&mut self, p: Option<&Spanned<String>>, field: &str) -> Option<card::emu::TearPoint> {
        match p.map(|p| (p, p.value.as_str())) {
            None => Some(card::emu::TearPoint::Before),
            Some((_, "before")) => Some(card::emu::TearPoint::Before),
            Some((_, "after")) => Some(card::emu::TearPoint::After),
            Some((p, other)) => {
                self.problem(p, field, format!("unknown tear point {other:?}; known: before, after"));
                None
            }
        }
    }

    fn at<T>(&mut self, raw: &RawAt, field: &str, anchor: &Spanned<T>) -> Option<At> {
        match (&raw.apdu, &raw.step) {
            (Some(n), None) => {
                if let Some(o) = &raw.offset {
                    self.problem(o, &format!("{field}.offset"), "offset goes with step, not apdu");
                }
                if n.value == 0 {
                    self.problem(n, &format!("{field}.apdu"), "APDUs count from 1");
                    return None;
                }
                Some(At::Apdu(n.value))
            }
            (None, Some(s)) => {
                let step = self.step(s, &format!("{field}.step"))?;
                Some(At::Step { step, offset: raw.offset.as_ref().map_or(0, |o| o.value) })
            }
            (Some(n), Some(_)) => {
                self.problem(n, field, "give apdu or step, not both");
                None
            }
            (None, None) => {
                self.problem(anchor, field, "give apdu: N or step: NAME");
                None
            }
        }
    }

    fn scenario(&mut self, raw: RawScenario, i: usize, profile: Option<&Profile>) -> Option<Scenario> {
        let f = format!("scenarios[{i}]");
        let targets = self.targets(raw.targets.as_ref(), &format!("{f}.targets"));
        let readers = self.readers(raw.readers.as_ref(), &format!("{f}.readers"), 1);
        let bundles = raw.bundles.as_ref().map(|b| b.value);
        let card_speed = raw.card_speed.as_ref().map(|v| self.speed(Some(v), &format!("{f}.card_speed")));
        let bundling = bundles.unwrap_or_else(|| profile.is_some_and(|p| p.bundles.is_some()));
        if bundling
            && profile.is_some_and(|p| p.bundles.is_none())
            && let Some(b) = &raw.bundles
        {
            self.problem(b, &format!("{f}.bundles"), "the profile has no bundles section to turn on");
        }
        let mut cards = Vec::new();
        if raw.cards.is_empty() {
            self.problem(&raw.name, &format!("{f}.cards"), "a scenario needs at least one card");
        }
        for (j, c) in raw.cards.iter().enumerate() {
            let cf = format!("{f}.cards[{j}]");
            let Some(kind) = CardKind::ALL.iter().copied().find(|k| k.name() == c.kind.value) else {
                let known: Vec<&str> = CardKind::ALL.iter().map(|k| k.name()).collect();
                self.problem(
                    &c.kind,
                    &format!("{cf}.kind"),
                    format!("unknown card kind {:?}; known: {}", c.kind.value, known.join(", ")),
                );
                continue;
            };
            if kind == CardKind::Clone && cards.is_empty() {
                self.problem(
                    &c.kind,
                    &format!("{cf}.kind"),
                    "a clone copies the scenario's first card: put another card before it",
                );
            }
            let count = match &c.count {
                None => 1,
                Some(n) if (1..=1000).contains(&n.value) => n.value,
                Some(n) => {
                    self.problem(n, &format!("{cf}.count"), format!("{} is outside 1..=1000", n.value));
                    1
                }
            };
            let remove = c.remove.as_ref().and_then(|r| {
                let at = self.at(r, &format!("{cf}.remove"), &c.kind)?;
                let point = self.point(r.point.as_ref(), &format!("{cf}.remove.point"))?;
                Some((at, point))
            });
            for (name, r) in [("reset", &c.reset), ("mute", &c.mute)] {
                if let Some(p) = r.as_ref().and_then(|r| r.point.as_ref()) {
                    self.problem(p, &format!("{cf}.{name}.point"), "a tear point belongs to remove only");
                }
            }
            let reset = c.reset.as_ref().and_then(|r| self.at(r, &format!("{cf}.reset"), &c.kind));
            let mute = c.mute.as_ref().and_then(|r| self.at(r, &format!("{cf}.mute"), &c.kind));
            let reinsert = c.reinsert.as_ref().map_or(0, |r| r.value);
            if reinsert > 5
                && let Some(r) = &c.reinsert
            {
                self.problem(r, &format!("{cf}.reinsert"), format!("{reinsert} is outside 0..=5"));
            }
            let Some(expect) = self.expect(&c.expect, &format!("{cf}.expect"), bundling) else { continue };
            for _ in 0..count {
                cards.push(CardSpec { kind, remove, reset, mute, reinsert, expect: expect.clone(), field: cf.clone() });
            }
        }
        let mut faults = Vec::new();
        for (j, lf) in raw.faults.iter().enumerate() {
            let ff = format!("{f}.faults[{j}]");
            let kind = match lf.kind.value.as_str() {
                "reader_unplug" => match &lf.reader {
                    Some(r) if (r.value as usize) < readers => LineFaultKind::ReaderUnplug { reader: r.value as usize },
                    Some(r) => {
                        self.problem(r, &format!("{ff}.reader"), format!("the scenario has readers 0..{readers}"));
                        continue;
                    }
                    None => {
                        self.problem(&lf.kind, &format!("{ff}.reader"), "reader_unplug needs reader: N");
                        continue;
                    }
                },
                "pcscd_restart" => LineFaultKind::PcscdRestart,
                "power_cut" => LineFaultKind::PowerCut,
                other => {
                    self.problem(
                        &lf.kind,
                        &format!("{ff}.kind"),
                        format!("unknown line fault {other:?}; known: reader_unplug, pcscd_restart, power_cut"),
                    );
                    continue;
                }
            };
            if let (Some(r), false) = (&lf.reader, matches!(kind, LineFaultKind::ReaderUnplug { .. })) {
                self.problem(r, &format!("{ff}.reader"), "only reader_unplug names a reader");
            }
            let Some(step) = self.step(&lf.step, &format!("{ff}.step")) else { continue };
            let nth = lf.nth.as_ref().map_or(1, |n| n.value.max(1));
            let ms = lf.for_ms.as_ref().map_or(1000, |d| d.value);
            if ms > 60_000
                && let Some(d) = &lf.for_ms
            {
                self.problem(d, &format!("{ff}.for_ms"), "at most 60000");
            }
            faults.push(LineFault { kind, step, nth, duration: Duration::from_millis(ms) });
        }
        let e = raw.expect.unwrap_or_default();
        Some(Scenario {
            name: raw.name.value,
            targets,
            readers,
            bundles,
            card_speed,
            cards,
            faults,
            expect: ScenarioExpect {
                sealed: e.sealed.map(|x| x.value),
                aborted: e.aborted.map(|x| x.value),
                bundle_size: e.bundle_size.map(|x| x.value),
                max_seconds: e.max_seconds.map(|x| x.value),
            },
        })
    }

    fn expect(&mut self, raw: &RawExpect, field: &str, bundling: bool) -> Option<Expect> {
        let result = match raw.result.value.as_str() {
            "passed" => Verdict::Passed,
            "failed" => Verdict::Failed,
            other => {
                self.problem(
                    &raw.result,
                    &format!("{field}.result"),
                    format!("unknown result {other:?}; known: passed, failed"),
                );
                return None;
            }
        };
        let step = raw.step.as_ref().and_then(|s| self.step(s, &format!("{field}.step")));
        if result == Verdict::Passed {
            for (name, present) in
                [("step", raw.step.is_some()), ("reason", raw.reason.is_some()), ("retryable", raw.retryable.is_some())]
            {
                if present {
                    self.problem(
                        &raw.result,
                        &format!("{field}.{name}"),
                        format!("{name} describes a failure, but the result is passed"),
                    );
                }
            }
        } else if let Some(s) = &raw.stage {
            self.problem(s, &format!("{field}.stage"), "stage describes a passed card, but the result is failed");
        }
        if let Some(s) = &raw.stage {
            let known = ["ready_for_pairing", "bundled", "unpaired"];
            if !known.contains(&s.value.as_str()) {
                self.problem(
                    s,
                    &format!("{field}.stage"),
                    format!("unknown stage {:?}; known: {}", s.value, known.join(", ")),
                );
            } else if (s.value == "ready_for_pairing") == bundling {
                self.problem(
                    s,
                    &format!("{field}.stage"),
                    format!("stage {} cannot happen with bundling {}", s.value, if bundling { "on" } else { "off" }),
                );
            }
        }
        Some(Expect {
            result,
            step,
            reason: raw.reason.as_ref().map(|r| r.value.clone()),
            retryable: raw.retryable.as_ref().map(|r| r.value),
            attempts: raw.attempts.as_ref().map(|a| a.value),
            stage: raw.stage.as_ref().map(|s| s.value.clone()),
        })
    }
}

fn rig_max_readers() -> usize {
    crate::vpcd::MAX_READERS
}

#[cfg(test)]
mod tests;
