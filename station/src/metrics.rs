//! Prometheus metrics of the station (`/metrics`), fed by the same events as
//! the live state model. Names follow Prometheus conventions: `tapline_`
//! prefix, base units (seconds), `_total` counters. Every series carries the
//! station id as the `station` label, so one Prometheus can scrape a line of
//! stations. No card ids, bundle ids or serials as labels: a label value
//! comes from a fixed set (outcome, step, reader state), the profile name, or
//! a failure reason folded into at most `MAX_REASONS` values. The list of
//! metrics is docs/metrics.md. Nothing here touches hardware or the ledger.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::pairing::BundleStatus;
use crate::recipe::{CardOutcome, Progress};
use crate::state::{LaneShow, Snapshot};
use crate::worker::Event;

/// Distinct failure reasons kept as label values; later new reasons count
/// as `other` (a reason built from a foreign error text must not grow the
/// series without bound).
pub const MAX_REASONS: usize = 50;

/// The reason label of failures past `MAX_REASONS`.
pub const OTHER_REASON: &str = "other";

/// Longest label value kept (bytes); longer ones are cut at a character.
const MAX_LABEL_LEN: usize = 100;

/// Whole cards: an instant emulated card (`--card-speed 0`) takes
/// milliseconds, a JCOP4 card about 5.5 s, a slow card with pairing up to
/// the profile's card budget (120 s in the demo profile).
const CARD_BUCKETS: [f64; 15] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0];

/// One recipe step: milliseconds (identify on a fast card) to seconds
/// (firmware LOAD, about three quarters of a card; a mute card's timeout).
const STEP_BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0];

/// One ledger write, request to durable commit (SQLite WAL with FULL sync:
/// milliseconds; a stalled disk shows in the upper buckets).
const LEDGER_BUCKETS: [f64; 13] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CardLabels {
    profile: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProfileLabels {
    profile: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    step: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    profile: String,
    step: &'static str,
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn card_histogram() -> Histogram {
    Histogram::new(CARD_BUCKETS)
}

fn step_histogram() -> Histogram {
    Histogram::new(STEP_BUCKETS)
}

/// The station's metrics registry.
pub struct Metrics {
    registry: Registry,
    cards: Family<CardLabels, Counter>,
    cards_first_pass: Family<ProfileLabels, Counter>,
    card_duration: HistogramFamily<CardLabels>,
    step_duration: HistogramFamily<StepLabels>,
    apdus: Family<ProfileLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    reasons: Mutex<HashSet<String>>,
    readers: Family<StateLabels, Gauge>,
    bundles: Family<OutcomeLabels, Counter>,
    ledger_write: Histogram,
    ledger_online: Gauge,
    ledger_outbox: Gauge,
}

impl Metrics {
    pub fn new(station: &str) -> Self {
        let station = (Cow::Borrowed("station"), Cow::Owned(label_value(station)));
        let mut registry = Registry::with_prefix_and_labels("tapline", std::iter::once(station));
        let cards = Family::<CardLabels, Counter>::default();
        let cards_first_pass = Family::<ProfileLabels, Counter>::default();
        let card_duration = HistogramFamily::<CardLabels>::new_with_constructor(card_histogram as fn() -> Histogram);
        let step_duration = HistogramFamily::<StepLabels>::new_with_constructor(step_histogram as fn() -> Histogram);
        let apdus = Family::<ProfileLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let readers = Family::<StateLabels, Gauge>::default();
        let bundles = Family::<OutcomeLabels, Counter>::default();
        let ledger_write = Histogram::new(LEDGER_BUCKETS);
        let build_info = Family::<VersionLabels, Gauge>::default();
        let ledger_online = Gauge::default();
        ledger_online.set(1);
        let ledger_outbox = Gauge::default();

        // Series that exist from the start (a dashboard shows 0, not "no
        // data", and rate() sees the first increase).
        for show in LaneShow::ALL {
            let _ = readers.get_or_create(&StateLabels { state: show.metric() });
        }
        for outcome in ["sealed", "aborted"] {
            let _ = bundles.get_or_create(&OutcomeLabels { outcome });
        }
        build_info.get_or_create(&VersionLabels { version: env!("CARGO_PKG_VERSION") }).set(1);

        registry.register(
            "cards",
            "Cards that reached a final outcome (passed or failed), by profile; a card tried again counts each outcome",
            cards.clone(),
        );
        registry.register(
            "cards_first_pass",
            "Cards that passed on their first attempt, by profile (first-pass yield is this over tapline_cards_total)",
            cards_first_pass.clone(),
        );
        registry.register(
            "card_duration_seconds",
            "Time of one card on its reader, from its first step to its outcome (pairing included), by profile and outcome",
            card_duration.clone(),
        );
        registry.register(
            "step_duration_seconds",
            "Time of one recipe step, by step and outcome (ok or failed)",
            step_duration.clone(),
        );
        registry.register("apdus", "Command APDUs exchanged with cards, by profile", apdus.clone());
        registry.register(
            "failures",
            "Failed card outcomes by profile, step and reason (reasons past the first 50 count as \"other\")",
            failures.clone(),
        );
        registry.register("readers", "Readers by the state their lane shows", readers.clone());
        registry.register("bundles", "Bundles that ended, by outcome (sealed or aborted)", bundles.clone());
        registry.register(
            "ledger_write_seconds",
            "Time of one ledger write, from request to durable commit",
            ledger_write.clone(),
        );
        registry.register(
            "ledger_online",
            "1 while the ledger database is reachable, 0 while ops go to the local outbox (always 1 on SQLite)",
            ledger_online.clone(),
        );
        registry.register(
            "ledger_outbox_ops",
            "Ledger ops waiting in the local outbox for the database (PostgreSQL ledger)",
            ledger_outbox.clone(),
        );
        registry.register("build_info", "The station's version; always 1", build_info);

        Self {
            registry,
            cards,
            cards_first_pass,
            card_duration,
            step_duration,
            apdus,
            failures,
            reasons: Mutex::new(HashSet::new()),
            readers,
            bundles,
            ledger_write,
            ledger_online,
            ledger_outbox,
        }
    }

    /// Counts one event of a batch run with `profile`.
    pub fn observe(&self, ev: &Event, profile: &str) {
        match ev {
            Event::Outcome(o) => self.observe_outcome(o, profile),
            Event::Progress { progress: Progress::StepDone { step, elapsed, ok }, .. } => {
                let outcome = if *ok { "ok" } else { "failed" };
                self.step_duration.get_or_create(&StepLabels { step: step.name(), outcome }).observe(secs(*elapsed));
            }
            Event::Apdus { count, .. } => {
                self.apdus.get_or_create(&ProfileLabels { profile: label_value(profile) }).inc_by(*count);
            }
            Event::Bundle { status: BundleStatus::Sealed, .. } => {
                self.bundles.get_or_create(&OutcomeLabels { outcome: "sealed" }).inc();
            }
            Event::Bundle { status: BundleStatus::Aborted, .. } => {
                self.bundles.get_or_create(&OutcomeLabels { outcome: "aborted" }).inc();
            }
            Event::Bundle { status: BundleStatus::Forming, .. }
            | Event::Progress { .. }
            | Event::Lane { .. }
            | Event::Fatal { .. } => {}
        }
    }

    fn observe_outcome(&self, o: &CardOutcome, profile: &str) {
        let profile = label_value(profile);
        let outcome = if o.passed() { "passed" } else { "failed" };
        // Both outcomes exist once a profile has run: yield queries divide
        // by the sum and must not miss a series.
        for other in ["passed", "failed"] {
            let _ = self.cards.get_or_create(&CardLabels { profile: profile.clone(), outcome: other });
        }
        let _ = self.cards_first_pass.get_or_create(&ProfileLabels { profile: profile.clone() });
        let labels = CardLabels { profile: profile.clone(), outcome };
        self.cards.get_or_create(&labels).inc();
        self.card_duration.get_or_create(&labels).observe(secs(o.elapsed));
        match &o.result {
            // The same rule as the batch summary and the dashboard.
            Ok(_) if o.attempt <= 1 => {
                self.cards_first_pass.get_or_create(&ProfileLabels { profile }).inc();
            }
            Ok(_) => {}
            Err(f) => {
                let reason = self.reason(&f.reason);
                self.failures.get_or_create(&FailureLabels { profile, step: f.step.name(), reason }).inc();
            }
        }
    }

    /// The reason label: the reason itself while fewer than `MAX_REASONS`
    /// distinct ones were seen, else `other`.
    fn reason(&self, reason: &str) -> String {
        let reason = label_value(reason);
        let mut seen = self.reasons.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.contains(&reason) {
            return reason;
        }
        if seen.len() < MAX_REASONS {
            seen.insert(reason.clone());
            return reason;
        }
        OTHER_REASON.to_string()
    }

    /// Sets the readers-by-state gauges from a snapshot (every state, zero
    /// when no reader shows it).
    pub fn set_readers(&self, snapshot: &Snapshot) {
        let mut counts: BTreeMap<&'static str, i64> = LaneShow::ALL.iter().map(|s| (s.metric(), 0)).collect();
        for lane in &snapshot.lanes {
            *counts.entry(lane.state.metric()).or_default() += 1;
        }
        for (state, n) in counts {
            self.readers.get_or_create(&StateLabels { state }).set(n);
        }
    }

    /// Whether the ledger database is reachable and the outbox's length.
    pub fn set_ledger_status(&self, online: bool, outbox_ops: u64) {
        self.ledger_online.set(i64::from(online));
        self.ledger_outbox.set(outbox_ops as i64);
    }

    /// One ledger write, request to durable commit.
    pub fn observe_ledger_write(&self, elapsed: Duration) {
        self.ledger_write.observe(secs(elapsed));
    }

    /// The Prometheus text exposition format, version 0.0.4 (what
    /// `promtool check metrics` parses and `http` serves as
    /// `text/plain; version=0.0.4`).
    pub fn encode(&self) -> String {
        let mut openmetrics = String::new();
        // Writing into a String cannot fail; an error would be a bug in
        // the encoder, and half a scrape is still better than a panic.
        if let Err(e) = prometheus_client::encoding::text::encode_registry(&mut openmetrics, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        to_prometheus_text(&openmetrics)
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// A label value as the text format needs it. prometheus-client 0.24 writes
/// label values verbatim, so a quote, backslash or newline in a profile name,
/// station id or failure reason would break the exposition: escape them here
/// (text format 0.0.4: `\\`, `\"`, `\n`), and cut long values.
fn label_value(s: &str) -> String {
    let mut cut = s.trim();
    if cut.len() > MAX_LABEL_LEN {
        let mut end = MAX_LABEL_LEN;
        while !cut.is_char_boundary(end) {
            end -= 1;
        }
        cut = &cut[..end];
    }
    let mut out = String::with_capacity(cut.len());
    for c in cut.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// prometheus-client writes OpenMetrics text; Prometheus' classic text
/// format (0.0.4, which `promtool check metrics` parses) differs in what
/// this registry uses only in: a counter family is named with its `_total`
/// suffix (OpenMetrics names the family without it), and there is no
/// `# UNIT` and no `# EOF` line.
fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .filter(|name| !name.ends_with("_total"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|p| Some((p, line.strip_prefix(p)?)));
        if let Some((prefix, rest)) = meta {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(name) {
                let _ = writeln!(out, "{prefix}{name}_total {tail}");
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::{Failure, Passed, Step};
    use card::CardId;
    use card::transport::ReaderId;

    fn reader() -> ReaderId {
        ReaderId("emu-0".to_string())
    }

    fn outcome(card: u8, result: Result<Passed, Failure>, attempt: u32, elapsed_ms: u64) -> Event {
        Event::Outcome(CardOutcome {
            reader: reader(),
            card_id: Some(CardId([card; 10])),
            result,
            elapsed: Duration::from_millis(elapsed_ms),
            attempt,
            ready: None,
        })
    }

    fn pass() -> Result<Passed, Failure> {
        Ok(Passed { serial: Some(1), stage: "bundled".into(), bundle: Some("B1".into()), role: None })
    }

    fn fail(step: Step, reason: &str) -> Result<Passed, Failure> {
        Err(Failure::new(step, reason, "detail", false))
    }

    /// The value of the one sample named `name` whose labels contain every
    /// `name="value"` pair in `labels`.
    fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
        let found: Vec<f64> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter(|l| labels.iter().all(|p| l.contains(&format!("{p},")) || l.contains(&format!("{p}}}"))))
            .map(|l| l.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("sample value"))
            .collect();
        assert_eq!(found.len(), 1, "one sample {name}{labels:?} in:\n{text}");
        found[0]
    }

    #[test]
    fn counts_cards_failures_steps_apdus_and_bundles() {
        let m = Metrics::new("st-1");
        m.observe(&outcome(1, pass(), 1, 4_000), "demo");
        m.observe(&outcome(2, pass(), 2, 6_000), "demo");
        m.observe(&outcome(3, fail(Step::Attestation, "counterfeit"), 1, 300), "demo");
        m.observe(&outcome(4, fail(Step::Attestation, "counterfeit"), 1, 300), "demo");
        m.observe(&outcome(5, fail(Step::SelfTests, "KAT failed"), 1, 2_000), "demo");
        let step = |step, ms, ok| Event::Progress {
            reader: reader(),
            progress: Progress::StepDone { step, elapsed: Duration::from_millis(ms), ok },
        };
        m.observe(&step(Step::Firmware, 3_000, true), "demo");
        m.observe(&step(Step::Firmware, 4_000, true), "demo");
        m.observe(&step(Step::Identify, 20, false), "demo");
        m.observe(&Event::Apdus { reader: reader(), count: 120 }, "demo");
        m.observe(&Event::Apdus { reader: reader(), count: 30 }, "demo");
        let bundle = |status| Event::Bundle { bundle: "B1".into(), status, members: vec![CardId([1; 10])] };
        m.observe(&bundle(BundleStatus::Forming), "demo");
        m.observe(&bundle(BundleStatus::Sealed), "demo");
        m.observe(&bundle(BundleStatus::Aborted), "demo");
        m.observe(&bundle(BundleStatus::Sealed), "demo");
        m.observe_ledger_write(Duration::from_micros(1_500));

        let t = m.encode();
        let cards = |outcome: &str| {
            sample(
                &t,
                "tapline_cards_total",
                &[r#"station="st-1""#, r#"profile="demo""#, &format!(r#"outcome="{outcome}""#)],
            )
        };
        assert_eq!(cards("passed"), 2.0);
        assert_eq!(cards("failed"), 3.0);
        assert_eq!(sample(&t, "tapline_cards_first_pass_total", &[r#"profile="demo""#]), 1.0);
        assert_eq!(sample(&t, "tapline_failures_total", &[r#"step="attestation""#, r#"reason="counterfeit""#]), 2.0);
        assert_eq!(sample(&t, "tapline_failures_total", &[r#"step="self_tests""#, r#"reason="KAT failed""#]), 1.0);
        let card_count = |o: &str| sample(&t, "tapline_card_duration_seconds_count", &[&format!(r#"outcome="{o}""#)]);
        assert_eq!((card_count("passed"), card_count("failed")), (2.0, 3.0));
        // Histogram buckets are cumulative: 4 s and 6 s are both under 7.5 s.
        let passed_le = |le: &str| {
            sample(&t, "tapline_card_duration_seconds_bucket", &[r#"outcome="passed""#, &format!(r#"le="{le}""#)])
        };
        assert_eq!((passed_le("2.5"), passed_le("5.0"), passed_le("7.5"), passed_le("+Inf")), (0.0, 1.0, 2.0, 2.0));
        let sum = sample(&t, "tapline_card_duration_seconds_sum", &[r#"outcome="passed""#]);
        assert!((sum - 10.0).abs() < 1e-9, "{sum}");
        let fw = &[r#"step="firmware""#, r#"outcome="ok""#];
        assert_eq!(sample(&t, "tapline_step_duration_seconds_count", fw), 2.0);
        assert!((sample(&t, "tapline_step_duration_seconds_sum", fw) - 7.0).abs() < 1e-9);
        let id_failed = &[r#"step="identify""#, r#"outcome="failed""#, r#"le="0.025""#];
        assert_eq!(sample(&t, "tapline_step_duration_seconds_bucket", id_failed), 1.0);
        assert_eq!(sample(&t, "tapline_apdus_total", &[r#"profile="demo""#]), 150.0);
        assert_eq!(sample(&t, "tapline_bundles_total", &[r#"outcome="sealed""#]), 2.0);
        assert_eq!(sample(&t, "tapline_bundles_total", &[r#"outcome="aborted""#]), 1.0);
        assert_eq!(sample(&t, "tapline_ledger_write_seconds_count", &[]), 1.0);
        assert_eq!(sample(&t, "tapline_ledger_write_seconds_bucket", &[r#"le="0.001""#]), 0.0);
        assert_eq!(sample(&t, "tapline_ledger_write_seconds_bucket", &[r#"le="0.0025""#]), 1.0);
        assert_eq!(sample(&t, "tapline_build_info", &[&format!(r#"version="{}""#, env!("CARGO_PKG_VERSION"))]), 1.0);
        assert_eq!(sample(&t, "tapline_ledger_online", &[]), 1.0, "online until told otherwise");
        m.set_ledger_status(false, 7);
        let t = m.encode();
        assert_eq!(sample(&t, "tapline_ledger_online", &[]), 0.0);
        assert_eq!(sample(&t, "tapline_ledger_outbox_ops", &[]), 7.0);
    }

    #[test]
    fn every_series_carries_the_station_and_no_card_or_bundle_id() {
        let m = Metrics::new("line-2/st\"3");
        let card = CardId([0xAB; 10]);
        m.observe(&outcome(0xAB, fail(Step::Identify, "card mute"), 1, 10), "demo");
        m.observe(&outcome(0xAB, pass(), 1, 10), "demo");
        m.observe(
            &Event::Bundle { bundle: "BUNDLE-7F3A".into(), status: BundleStatus::Sealed, members: vec![card] },
            "demo",
        );
        let t = m.encode();
        let hex = card.to_hex();
        assert!(!t.to_lowercase().contains(&hex.to_lowercase()), "card id {hex} in:\n{t}");
        assert!(!t.contains("BUNDLE-7F3A"), "bundle id in:\n{t}");
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.contains(r#"station="line-2/st\"3""#), "no (escaped) station label: {line}");
        }
    }

    #[test]
    fn reasons_are_capped_and_label_values_escaped() {
        let m = Metrics::new("st-1");
        for i in 0..MAX_REASONS + 20 {
            m.observe(&outcome(1, fail(Step::Firmware, &format!("LOAD answered 6A{i:02X}")), 1, 10), "demo");
        }
        m.observe(&outcome(1, fail(Step::Firmware, "LOAD answered 6A00"), 1, 10), "demo");
        m.observe(&outcome(1, fail(Step::Identify, "a \"quoted\"\\ reason\nover lines"), 1, 10), "demo");
        let t = m.encode();
        let reasons: HashSet<&str> = t
            .lines()
            .filter(|l| l.starts_with("tapline_failures_total{"))
            .filter_map(|l| Some(l.split_once("reason=\"")?.1.split_once("\"}")?.0))
            .collect();
        assert_eq!(reasons.len(), MAX_REASONS + 1, "{reasons:?}");
        assert!(reasons.contains(OTHER_REASON));
        // A reason seen before the cap keeps its own series.
        assert_eq!(sample(&t, "tapline_failures_total", &[r#"reason="LOAD answered 6A00""#]), 2.0);
        // 20 late firmware reasons, and the odd one (also past the cap).
        assert_eq!(sample(&t, "tapline_failures_total", &[r#"step="firmware""#, r#"reason="other""#]), 20.0);
        assert_eq!(sample(&t, "tapline_failures_total", &[r#"step="identify""#, r#"reason="other""#]), 1.0);
        assert_eq!(label_value("a \"q\"\\ r\nx"), r#"a \"q\"\\ r\nx"#);
        assert_eq!(label_value(&"é".repeat(80)).len(), MAX_LABEL_LEN);
        let total: f64 = t
            .lines()
            .filter(|l| l.starts_with("tapline_failures_total{"))
            .map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).expect("value"))
            .sum();
        assert_eq!(total, sample(&t, "tapline_cards_total", &[r#"outcome="failed""#]));
    }

    #[test]
    fn readers_by_state_cover_every_state() {
        use crate::state::{LaneView, Mode};
        let lane = |state| LaneView {
            reader: "emu".into(),
            state,
            card: None,
            step: None,
            progress: None,
            elapsed_s: None,
            paused: false,
            last: None,
            error: None,
        };
        let snap = |lanes| Snapshot {
            station: "st-1".into(),
            at_ms: 0,
            mode: Mode::Running,
            batch: None,
            lanes,
            failures: vec![],
            events: vec![],
            profiles: vec![],
            config_error: None,
            ledger: None,
        };
        let m = Metrics::new("st-1");
        m.set_readers(&snap(vec![lane(LaneShow::Working), lane(LaneShow::Working), lane(LaneShow::ReaderError)]));
        let t = m.encode();
        for show in LaneShow::ALL {
            let want = match show {
                LaneShow::Working => 2.0,
                LaneShow::ReaderError => 1.0,
                _ => 0.0,
            };
            assert_eq!(sample(&t, "tapline_readers", &[&format!(r#"state="{}""#, show.metric())]), want, "{show:?}");
        }
        // A lane that leaves a state drops it back to zero.
        m.set_readers(&snap(vec![lane(LaneShow::Idle)]));
        let t = m.encode();
        assert_eq!(sample(&t, "tapline_readers", &[r#"state="working""#]), 0.0);
        assert_eq!(sample(&t, "tapline_readers", &[r#"state="idle""#]), 1.0);
    }

    #[test]
    fn the_exposition_is_prometheus_text_with_total_counters() {
        let m = Metrics::new("st-1");
        m.observe(&outcome(1, pass(), 1, 10), "demo");
        let t = m.encode();
        assert!(!t.contains("# EOF") && !t.contains("# UNIT"), "{t}");
        assert!(t.contains("# TYPE tapline_cards_total counter\n"), "{t}");
        assert!(t.contains("# HELP tapline_cards_total Cards that"), "{t}");
        assert!(t.contains("# TYPE tapline_card_duration_seconds histogram\n"), "{t}");
        assert!(t.contains("# TYPE tapline_readers gauge\n"), "{t}");
        // Every sample belongs to the family its TYPE line names.
        let mut family = String::new();
        for line in t.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap_or_default().to_string();
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                let base = ["_bucket", "_sum", "_count"].iter().fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
                assert!(name == family || base == family, "{name} under {family}");
            }
        }
    }

    #[test]
    fn openmetrics_counters_become_total_families() {
        let om = "# HELP x_cards Cards.\n# TYPE x_cards counter\n# UNIT x_cards cards\nx_cards_total 3\n\
                  # HELP x_g G.\n# TYPE x_g gauge\nx_g 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP x_cards_total Cards.\n# TYPE x_cards_total counter\nx_cards_total 3\n\
             # HELP x_g G.\n# TYPE x_g gauge\nx_g 1\n"
        );
    }
}
