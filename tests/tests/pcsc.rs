//! The station through the real PC/SC stack: a real pcscd with vpcd virtual
//! readers (started by `scripts/pcscd-vpcd.sh`, as `scripts/test.sh` does),
//! emulated cards connected to vpcd by the rig's feeder, and the station's
//! `PcscMonitor` / `PcscTransport` / `RigFeeder` talking to them exactly as
//! to cards in real readers.

use std::sync::Arc;

use card::transport::pcsc::{PcscMonitor, ReaderFilter, Sharing};
use rig::vpcd::control;
use rig::vpcd::feeder::{Feeder, FeederConfig};
use station::handler::RigFeeder;
use station::sim::{SimFaults, make_cards};
use std::time::Duration;

use tapline_tests::{demo_profile, run_batch_on, wait_readers_empty};

/// The vpcd port base of the pcscd that scripts/pcscd-vpcd.sh started.
fn port_base() -> u16 {
    std::env::var("TAPLINE_VPCD_PORT").ok().and_then(|v| v.parse().ok()).unwrap_or(35963)
}

#[test]
fn a_batch_through_pcscd_is_provisioned_and_bundled() {
    // Readers P+2 .. P+5: P and P+1 belong to the card and rig pcsc tests.
    let base = port_base() + 2;
    let cards = make_cards(9, 4242, &SimFaults::default());
    let ids: std::collections::HashSet<String> = cards.iter().map(|c| c.id().to_hex()).collect();
    let patterns = [format!("Tapline vpcd {base} *"), format!("Tapline vpcd {} *", base + 2)];
    wait_readers_empty(&patterns, Duration::from_secs(5));
    let config = FeederConfig::instant(base, 4);
    let feeder = Feeder::start(config, cards, Arc::new(|_| {}));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("control port");
    let control_addr = listener.local_addr().expect("addr");
    let (quit, _quit_rx) = std::sync::mpsc::channel();
    let served = feeder.clone();
    std::thread::spawn(move || control::serve(listener, served, quit));

    let filter = ReaderFilter::new([format!("Tapline vpcd {base} *"), format!("Tapline vpcd {} *", base + 2)], [""; 0]);
    let monitor = PcscMonitor::new(filter, Sharing::Exclusive)
        .expect("no pcscd: start one with `scripts/pcscd-vpcd.sh start 6` (scripts/test.sh does)");
    let mut probe = PcscMonitor::new(ReaderFilter::new([format!("Tapline vpcd {base} *")], [""; 0]), Sharing::Shared)
        .expect("pcscd");
    let listed = card::transport::ReaderMonitor::readers(&mut probe).expect("readers");
    assert_eq!(listed.len(), 2, "vpcd readers of port {base} missing: {listed:?} (scripts/pcscd-vpcd.sh start 6)");

    let b = run_batch_on(demo_profile(), Box::new(monitor), Arc::new(RigFeeder::new(control_addr)), 9);
    let summary = feeder.shutdown();

    assert_eq!(b.summary.outcomes.len(), 9, "{:#?}", b.summary.outcomes);
    assert_eq!(b.export.cards.len(), 9);
    let failed: Vec<_> = b.summary.outcomes.iter().filter(|o| !o.passed()).collect();
    assert!(failed.is_empty(), "{failed:#?}");
    for c in &b.export.cards {
        assert!(ids.contains(&c.card_id), "{c:?} was fed by this test");
        assert_eq!(
            (c.status.as_str(), c.stage.as_deref()),
            ("passed", Some("bundled")),
            "{c:?} {:#?}",
            b.export.bundles
        );
        assert!(c.reader.starts_with("Tapline vpcd "), "{c:?}");
        assert!(c.attested && c.self_tests);
    }
    let sealed = b.export.bundles.iter().filter(|x| x.status == "sealed").count();
    assert_eq!(sealed, 3, "{:#?}", b.export.bundles);
    let readers: std::collections::HashSet<&str> = b.export.cards.iter().map(|c| c.reader.as_str()).collect();
    assert_eq!(readers.len(), 4, "all four readers worked: {readers:?}");
    // The rig binned every card as PASS through the control socket.
    assert_eq!((summary.pass.len(), summary.fail.len()), (9, 0), "{summary}");
}
