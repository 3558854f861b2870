//! BER-TLV (card::tlv): parse_all / parse_one on arbitrary bytes, the
//! constructed objects' children (nested a few levels), lookups, and a
//! round trip: every object parsed re-encodes to something that parses
//! back to the same tag and value.
#![no_main]

use card::tlv::{self, Tlv};
use libfuzzer_sys::fuzz_target;

fn walk(objs: &[Tlv<'_>], depth: usize) {
    for o in objs {
        let again = tlv::tlv(o.tag, o.value);
        let parsed = tlv::parse_all(&again).expect("an encoded object parses");
        assert_eq!(parsed.len(), 1, "one object encodes to one object");
        assert_eq!((parsed[0].tag, parsed[0].value), (o.tag, o.value), "round trip");
        let _ = tlv::find(objs, o.tag);
        let _ = tlv::require_array::<4>(objs, o.tag);
        if depth < 8
            && o.is_constructed()
            && let Ok(children) = o.children()
        {
            walk(&children, depth + 1);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok((one, rest)) = tlv::parse_one(data) {
        assert!(rest.len() < data.len(), "parse_one consumes input");
        let _ = one.children();
    }
    if let Ok(objs) = tlv::parse_all(data) {
        walk(&objs, 0);
    }
});
