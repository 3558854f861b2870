//! A pcscd restart under a running reader: the PC/SC backend re-establishes
//! its context by itself and sees the card again, without reopening the
//! reader (the station keeps running). Restarts the pcscd of
//! `scripts/pcscd-vpcd.sh` (as `scripts/test.sh` started it) and leaves it
//! running again with the same readers (TAPLINE_VPCD_READERS of them); cargo runs test binaries one after
//! another, so no other test uses pcscd meanwhile.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use card::gp::session;
use card::transport::pcsc::{PcscMonitor, ReaderFilter, Sharing};
use card::transport::{ReaderMonitor, SlotState};
use rig::vpcd::feeder::{Feeder, FeederConfig};
use station::sim::{SimFaults, make_cards};
use tapline_tests::{repo, wait_readers_empty};

fn port_base() -> u16 {
    std::env::var("TAPLINE_VPCD_PORT").ok().and_then(|v| v.parse().ok()).unwrap_or(35963)
}

fn script(args: &[&str]) {
    let out = Command::new("bash")
        .arg(repo().join("scripts/pcscd-vpcd.sh"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("scripts/pcscd-vpcd.sh runs");
    assert!(
        out.status.success(),
        "pcscd-vpcd.sh {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until the reader shows a card, up to `limit`.
fn wait_present(reader: &mut dyn card::transport::CardReader, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut known = SlotState::Empty;
    while started.elapsed() < limit {
        // Errors while pcscd is away are expected; the reader retries.
        if let Ok(s) = reader.wait_change(&known, Duration::from_millis(500)) {
            if matches!(s, SlotState::Present { .. }) {
                return Some(started.elapsed());
            }
            known = s;
        }
    }
    None
}

#[test]
fn a_reader_survives_a_pcscd_restart_and_sees_the_card_again() {
    let base = port_base();
    // Started again with as many readers as scripts/test.sh started.
    let readers: usize = std::env::var("TAPLINE_VPCD_READERS").ok().and_then(|v| v.parse().ok()).unwrap_or(6);
    let port = base + 4;
    wait_readers_empty(&[format!("Tapline vpcd {port} 00 00")], Duration::from_secs(5));
    let config = FeederConfig::instant(port, 1);
    let feeder = Feeder::start(config, make_cards(1, 99, &SimFaults::default()), Arc::new(|_| {}));
    let name = format!("Tapline vpcd {port} 00 00");
    let mut monitor = PcscMonitor::new(ReaderFilter::new([name.clone()], [""; 0]), Sharing::Shared)
        .expect("no pcscd: start one with `scripts/pcscd-vpcd.sh start 6` (scripts/test.sh does)");
    let ids = monitor.readers().expect("readers");
    assert_eq!(ids.len(), 1, "reader {name:?} missing: {ids:?}");
    let mut reader = monitor.open(&ids[0]).expect("open");
    assert!(wait_present(&mut *reader, Duration::from_secs(10)).is_some(), "the card never arrived");
    let before = {
        let mut t = reader.connect().expect("connect");
        session::select_isd(&mut *t).expect("select");
        session::read_cplc(&mut *t).expect("cplc").card_id()
    };

    script(&["stop"]);
    script(&["start", &readers.to_string(), &base.to_string()]);
    let restarted = Instant::now();

    // The same reader object, never reopened: it re-establishes its
    // context and sees the (re-seated) card again.
    let recovered = wait_present(&mut *reader, Duration::from_secs(20));
    let after = {
        let mut t = reader.connect().expect("connect after the restart");
        session::select_isd(&mut *t).expect("select after the restart");
        session::read_cplc(&mut *t).expect("cplc after the restart").card_id()
    };
    feeder.shutdown();
    let recovered = recovered.expect("the reader did not see the card again within 20 s of the restart");
    println!("pcscd restart: card seen again {:.1} s after pcscd was back", recovered.as_secs_f64());
    assert_eq!(before, after, "the same card, seen again");
    assert!(restarted.elapsed() < Duration::from_secs(60));
}
