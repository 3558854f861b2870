//! `station gp ...` through the REAL PC/SC stack: the pcscd with vpcd readers
//! that `scripts/pcscd-vpcd.sh` starts (as `scripts/test.sh` does), one
//! emulated card fed in-process by the rig's feeder on the reader of port
//! P+4, and the station binary driving it exactly as a card in a real reader.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use card::transport::pcsc::{PcscMonitor, ReaderFilter, Sharing};
use card::transport::{CardReader, ReaderMonitor, SlotState};
use rig::vpcd::feeder::{Feeder, FeederConfig};
use station::sim::{SimFaults, make_cards};

const PACKAGE: &str = "F05441504C494E45";
const APPLET: &str = "F05441504C494E4501";
const MASTER: &str = "5441504C494E452D44454D4F2D4D4B31";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The vpcd port base of the pcscd that scripts/pcscd-vpcd.sh started.
fn port_base() -> u16 {
    std::env::var("TAPLINE_VPCD_PORT").ok().and_then(|v| v.parse().ok()).unwrap_or(35963)
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Shuts the feeder down even when an assertion fails, so the card leaves
/// the vpcd port for the next test binary.
struct FeederGuard(Feeder);

impl Drop for FeederGuard {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

#[test]
fn gp_commands_list_load_install_delete_and_rotate_through_pcscd() {
    let started = Instant::now();
    let port = port_base() + 4;
    let reader = format!("Tapline vpcd {port} 00 00");

    let mut monitor = PcscMonitor::new(ReaderFilter::new([reader.clone()], [""; 0]), Sharing::Shared)
        .expect("no pcscd: start one with `scripts/pcscd-vpcd.sh start 6` (scripts/test.sh does)");
    let listed = monitor.readers().expect("readers");
    assert_eq!(
        listed.len(),
        1,
        "vpcd reader {reader:?} missing: {listed:?}; start pcscd with `scripts/pcscd-vpcd.sh start 6 {}`",
        port_base()
    );

    tapline_tests::wait_readers_empty(std::slice::from_ref(&reader), Duration::from_secs(5));
    let config = FeederConfig::instant(port, 1);
    let feeder = FeederGuard(Feeder::start(config, make_cards(1, 7070, &SimFaults::default()), Arc::new(|_| {})));

    // Wait until pcscd sees the card.
    let mut slot = monitor.open_reader(&listed[0]).expect("open reader");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = slot.wait_change(&SlotState::Empty, Duration::from_millis(500)).expect("reader state");
        if matches!(s, SlotState::Present { .. }) {
            break;
        }
        assert!(Instant::now() < deadline, "the feeder's card never appeared in {reader:?}");
    }
    drop(slot);

    let station = |args: &[&str]| -> Output {
        let mut all = vec!["gp"];
        all.extend_from_slice(&args[..1]);
        all.extend_from_slice(&["--reader", &reader]);
        all.extend_from_slice(&args[1..]);
        Command::new(env!("CARGO_BIN_EXE_station")).args(&all).current_dir(repo()).output().expect("station runs")
    };
    let ok = |args: &[&str]| -> String {
        let o = station(args);
        assert!(o.status.success(), "station gp {args:?} failed:\n{}", text(&o));
        text(&o)
    };
    let list_json = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["list", "--json"];
        args.extend_from_slice(extra);
        serde_json::from_str(&ok(&args)).expect("gp list --json is JSON")
    };

    // A virgin card: factory keys (version FF), nothing loaded.
    let l = list_json(&[]);
    assert_eq!(l["key_version"], 0xFF, "{l:#}");
    assert_eq!(l["load_files"].as_array().map(Vec::len), Some(0), "{l:#}");
    assert_eq!(l["isd"]["aid"], "A000000151000000", "{l:#}");
    let human = ok(&["list"]);
    assert!(human.contains("key version: FF"), "{human}");

    let out = ok(&["load", "firmware/wallet-demo/tapline-wallet-demo.cap"]);
    assert!(out.contains(&format!("loaded package {PACKAGE}")), "{out}");
    let out = ok(&["install", "--package", PACKAGE, "--applet", APPLET]);
    assert!(out.contains("SELECTABLE"), "{out}");

    let l = list_json(&[]);
    let files = l["load_files"].as_array().expect("load files");
    assert!(files.iter().any(|f| f["aid"] == PACKAGE && f["version"].is_string()), "{l:#}");
    let apps = l["applications"].as_array().expect("applications");
    assert!(apps.iter().any(|a| a["aid"] == APPLET && a["state"] == "SELECTABLE"), "{l:#}");

    ok(&["delete", PACKAGE, "--related"]);
    let l = list_json(&[]);
    assert_eq!(l["load_files"].as_array().map(Vec::len), Some(0), "{l:#}");
    assert_eq!(l["applications"].as_array().map(Vec::len), Some(0), "{l:#}");

    let out = ok(&["rotate-keys", "--new-version", "1", "--master", MASTER, "--diversification", "kdf3"]);
    assert!(out.contains("FF -> 01"), "{out}");
    assert!(!out.contains(MASTER), "the master key is never printed: {out}");

    let l = list_json(&["--key-version", "1", "--key", MASTER, "--diversification", "kdf3"]);
    assert_eq!(l["key_version"], 1, "{l:#}");

    // The default keys are now wrong: refused before EXTERNAL AUTHENTICATE.
    let o = station(&["list"]);
    let msg = text(&o);
    assert!(!o.status.success(), "default keys must be refused after rotation:\n{msg}");
    assert!(msg.contains("card cryptogram mismatch") && msg.contains("keys are wrong"), "{msg}");
    assert!(msg.contains("EXTERNAL AUTHENTICATE was NOT sent"), "{msg}");

    drop(feeder);
    eprintln!("gp commands through pcscd: {:.1} s", started.elapsed().as_secs_f64());
}
