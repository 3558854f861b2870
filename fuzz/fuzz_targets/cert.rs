//! Identity certificates (card::wallet::cert): parse, re-encode (only the
//! canonical encoding parses) and verify against pinned CAs, timed and
//! untimed.
#![no_main]

use card::emu::factory::{counterfeit_ca, demo_vendor_ca_public};
use card::wallet::cert::Certificate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cert) = Certificate::parse(data) {
        assert_eq!(cert.encode(), data, "only the canonical encoding parses");
        let pinned = [demo_vendor_ca_public(), *counterfeit_ca().verifying_key()];
        for now in [0, 1_700_000_000, u64::MAX] {
            let _ = cert.verify(&pinned, now);
        }
        let _ = cert.verify_untimed(&pinned);
    }
});
