//! CAP files (card::cap): `CapFile::from_bytes` on arbitrary bytes (a ZIP
//! archive), then the load file built from what parsed, which must parse
//! back (`from_load_file`) to the same package; and `from_load_file` /
//! `components_of_load_file` on arbitrary bytes. The first byte picks the
//! mode; CAP seeds start with 'P' (a ZIP's "PK"), which picks from_bytes.
#![no_main]

use card::cap::{CapFile, components_of_load_file};
use libfuzzer_sys::fuzz_target;

fn exercise(cap: &CapFile) {
    let _ = (cap.header(), cap.package_name(), cap.package_path(), cap.applet_aids(), cap.imports());
    let _ = (cap.format_version(), cap.flags(), cap.has_descriptor());
    for with_descriptor in [false, true] {
        let load_file = cap.load_file(with_descriptor);
        assert_eq!(load_file.len(), cap.load_file_len(with_descriptor), "load_file_len");
        let _ = cap.load_file_data_block(with_descriptor);
        let _ = cap.load_file_sha256(with_descriptor);
        let back = CapFile::from_load_file(&load_file).expect("a built load file parses back");
        assert_eq!(back.package_aid(), cap.package_aid());
        assert_eq!(back.package_version(), cap.package_version());
        assert_eq!(back.applet_aids(), cap.applet_aids());
    }
}

fuzz_target!(|data: &[u8]| {
    match data.first() {
        Some(b'P') => {
            if let Ok(cap) = CapFile::from_bytes(data) {
                exercise(&cap);
            }
        }
        Some(_) => {
            let body = &data[1..];
            if let Ok(parts) = components_of_load_file(body) {
                let _ = parts.iter().count();
                let _ = parts.header();
                let _ = parts.applet_aids();
            }
            if let Ok(cap) = CapFile::from_load_file(body) {
                exercise(&cap);
            }
        }
        None => {}
    }
});
