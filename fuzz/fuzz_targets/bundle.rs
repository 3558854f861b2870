//! Backup-bundle blobs (card::wallet::bundle): link attestations, import
//! confirmations, wallet proofs and transfer blobs: parse, canonical
//! re-encoding, signature checks, and opening a transfer blob. The first
//! byte picks the kind; the rest is the blob.
#![no_main]

use card::cardid::CardId;
use card::wallet::bundle::{ImportConfirmation, LinkAttestation, TransferBlob, WalletProof, open_transfer};
use libfuzzer_sys::fuzz_target;
use tapline_fuzz::key;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, blob)) = data.split_first() else { return };
    let (primary, backup) = (key(0x21), key(0x22));
    let bundle_id = [0xB0; 16];
    let primary_id = CardId([1; 10]);
    match kind % 4 {
        0 => {
            if let Ok(a) = LinkAttestation::parse(blob) {
                assert_eq!(a.encode(), blob);
                let _ = a.verify(backup.verifying_key(), &bundle_id, &primary_id, &[3; 32]);
            }
        }
        1 => {
            if let Ok(c) = ImportConfirmation::parse(blob) {
                assert_eq!(c.encode(), blob);
                let _ = c.verify(backup.verifying_key(), &bundle_id, &primary_id);
            }
        }
        2 => {
            if let Ok(p) = WalletProof::parse(blob) {
                assert_eq!(p.encode(), blob);
                let _ = p.verify(&[4; 32], &primary_id, Some(&bundle_id));
            }
        }
        _ => {
            if let Ok(t) = TransferBlob::parse(blob) {
                assert_eq!(t.encode(), blob);
                let _ = t.verify(primary.verifying_key());
                let _ = open_transfer(&t, &backup, primary.verifying_key());
            }
        }
    }
});
