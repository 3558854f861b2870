//! The daemon's configuration (`station::daemon::config::DaemonConfig`)
//! parsed from arbitrary text, anchored at the repository's deploy/ folder.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use station::daemon::config::DaemonConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/fuzz.yaml"));
    let _ = DaemonConfig::parse(text, path);
});
