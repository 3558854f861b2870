//! Table printing and JSON helpers shared by the benchmarks.

use serde_json::{Value, json};

use super::emu::Run;

/// A plain text table: a header row and rows of cells, right-aligned
/// except the first column.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.len());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i == 0 {
                s.push_str(&format!("{c:<width$}", width = w[i]));
            } else {
                s.push_str(&format!("  {c:>width$}", width = w[i]));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(header.to_vec());
    out.push_str(&line(w.iter().map(|n| "-".repeat(*n)).collect::<Vec<_>>().iter().map(String::as_str).collect()));
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

pub fn f(v: f64, decimals: usize) -> String {
    if v.is_finite() { format!("{v:.decimals$}") } else { "-".into() }
}

/// A batch run as JSON.
pub fn run_json(r: &Run) -> Value {
    json!({
        "readers": r.readers,
        "card_speed": r.speed,
        "cards": r.cards,
        "passed": r.passed,
        "bundles_sealed": r.bundles,
        "wall_s": r.wall.as_secs_f64(),
        "cards_per_hour": r.cards_per_hour(),
        "steady_cards_per_hour": r.steady_cards_per_hour,
        "modeled_card_s": r.modeled_per_card(),
        "wall_per_card_per_reader_s": r.wall_per_card(),
        "overhead_ratio": r.overhead_ratio(),
        "cpu_s": r.cpu,
        "cpu_s_per_card": r.cpu / r.cards.max(1) as f64,
        "apdus": r.apdus,
        "events": r.events,
        "ledger_writes": r.ledger_writes,
        "ledger_wait_s": r.ledger_wait.as_secs_f64(),
        "emulator_apdu_cpu_s": r.emulator_apdu.as_secs_f64(),
        "emulator_factory_cpu_s": r.emulator_factory.as_secs_f64(),
        "pairing_s_per_card": pairing_json(r),
        "threads_cpu_s": r.threads.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
    })
}

/// A bundled card's reader time around pairing, seconds per paired card:
/// waiting for partners, its own pairing calls, and held while the other
/// members' calls, the host's checks and the ledger ran.
fn pairing_json(r: &Run) -> Value {
    let p = &r.pairing;
    let per = |d: std::time::Duration| d.as_secs_f64() / p.cards.max(1) as f64;
    json!({
        "cards": p.cards,
        "partner_wait": per(p.partner_wait),
        "card_calls": per(p.card_calls),
        "held": per(p.held),
        "bundles": p.bundles,
        "ledger_per_bundle": p.bundle_ledger.as_secs_f64() / p.bundles.max(1) as f64,
    })
}

pub fn get(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
}
