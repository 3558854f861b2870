//! Station profiles: `Profile::parse` on arbitrary text, anchored at the
//! repository's profiles/ folder so the demo profile's relative paths
//! (firmware dir, audit key file) resolve as they do for the station.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use station::profile::Profile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../profiles/fuzz.yaml"));
    if let Ok(p) = Profile::parse(text, path) {
        let _ = p.key_ring();
    }
});
