//! Signed firmware manifests (station::firmware). The first byte picks:
//! even: the rest is a manifest that the harness signs with its own
//!   release key, so parsing and the checks against the demo firmware's CAP
//!   (hashes, AIDs, install specs) are reached;
//! odd: the rest is u16-length-prefixed manifest bytes and manifest.sig
//!   text, checked against the pinned key as they come (signature path).
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use station::firmware::{Firmware, sign_manifest};
use tapline_fuzz::{chunks, key};

const CAP: &[u8] = include_bytes!("../../firmware/wallet-demo/tapline-wallet-demo.cap");

fuzz_target!(|data: &[u8]| {
    static RELEASE: OnceLock<k256::ecdsa::SigningKey> = OnceLock::new();
    let release = RELEASE.get_or_init(|| key(0x31));
    let pinned = [*release.verifying_key()];
    let dir = Path::new("fuzz-firmware");
    let Some((&mode, rest)) = data.split_first() else { return };
    let manifest = if mode % 2 == 0 {
        let sig = sign_manifest(release, rest);
        Firmware::verify_manifest(dir, rest, sig.as_bytes(), &pinned)
    } else {
        let parts = chunks(rest);
        let (m, s) = (parts.first().copied().unwrap_or_default(), parts.get(1).copied().unwrap_or_default());
        Firmware::verify_manifest(dir, m, s, &pinned)
    };
    if let Ok(manifest) = manifest {
        let _ = Firmware::from_manifest_and_cap(dir, manifest, CAP);
    }
});
