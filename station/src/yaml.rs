//! The one way YAML comes in: profiles, the daemon's configuration,
//! firmware manifests and the rig's regression plans are read and parsed
//! here, under limits that hold for hostile files (issue #8: an alias bomb,
//! 100,000 nested `[`, a huge file are each refused in well under a second
//! and 50 MB, naming the file and the place; station/tests/hostile_config.rs
//! runs the real binary on them under a 50 MB data limit). What the file means is the
//! caller's business; this module only bounds what reading it may cost.
//!
//! serde-saphyr (the parser) already enforces a budget by default, but its
//! defaults are sized for big documents: a million replayed alias events
//! and a million recorded anchor events are each far over 50 MB of parser
//! events. Our files are small (the demo profile is 3 KB), so the limits
//! below are tight and still leave a factor of 50 or more to real files.

use std::io::Read;
use std::path::Path;

use serde::Deserialize;

/// Largest YAML file read (256 KiB; the largest shipped, the regression
/// plan, is 7 KB).
pub const MAX_FILE_BYTES: u64 = 256 * 1024;
/// Deepest nesting of mappings and sequences (real files use 4).
pub const MAX_DEPTH: usize = 32;
/// Most aliases (`*name`) a file may use, and anchors it may define. Each
/// alias of a long string becomes a copy of it in the parsed value, so
/// aliases times the file size bounds what aliases cost: 64 x 256 KiB.
pub const MAX_ALIASES: usize = 64;
/// Most parser events an alias may replay, summed over the document, and
/// most events recorded for anchors: an alias bomb stops here.
pub const MAX_REPLAYED_EVENTS: usize = 20_000;
/// Most parser events and nodes in one file.
pub const MAX_EVENTS: usize = 200_000;
/// Most bytes of scalar text in one file, and of anchored text recorded.
pub const MAX_SCALAR_BYTES: usize = 1024 * 1024;

/// The parser's options with the limits above.
pub fn options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_reader_input_bytes = Some(MAX_FILE_BYTES as usize);
    budget.max_depth = MAX_DEPTH;
    budget.flow_nesting_limit = MAX_DEPTH;
    budget.max_aliases = MAX_ALIASES;
    budget.max_anchors = MAX_ALIASES;
    budget.max_recorded_anchor_events = MAX_REPLAYED_EVENTS;
    budget.max_recorded_anchor_bytes = MAX_SCALAR_BYTES;
    budget.max_events = MAX_EVENTS;
    budget.max_nodes = MAX_EVENTS;
    budget.max_total_scalar_bytes = MAX_SCALAR_BYTES;
    budget.max_documents = 1;
    budget.max_merge_keys = MAX_ALIASES;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.alias_limits.max_total_replayed_events = MAX_REPLAYED_EVENTS;
    options.alias_limits.max_replay_stack_depth = MAX_DEPTH;
    options
}

/// Parses YAML text under the limits.
pub fn from_str<'de, T: Deserialize<'de>>(text: &'de str) -> Result<T, serde_saphyr::Error> {
    serde_saphyr::from_str_with_options(text, options())
}

/// Reads a YAML file as text, refusing one over `MAX_FILE_BYTES` before
/// reading it (a device or a huge file never fills memory). The error is
/// the message to show; the caller names the file.
pub fn read(path: &Path) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    let n = file.take(MAX_FILE_BYTES + 1).read_to_string(&mut text).map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData { "not UTF-8 text".into() } else { e.to_string() }
    })?;
    if n as u64 > MAX_FILE_BYTES {
        return Err(format!("larger than {} KiB: not a configuration file", MAX_FILE_BYTES / 1024));
    }
    Ok(text)
}

/// Where a parse error in `text` is: line and column (0, 0 when the parser
/// gives none), the key written on that line (`(yaml)` when there is
/// none), and the message without the parser's own place prefix.
pub fn place(text: &str, e: &serde_saphyr::Error) -> (u64, u64, String, String) {
    let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
    let mut message = crate::profile::first_line(e);
    if let Some(what) = message.strip_prefix("budget breached:") {
        message = format!(
            "over the limits for configuration files ({}): too many aliases, too deep or too much text",
            what.trim()
        );
    }
    (line, column, key_at(text, line), message)
}

/// The key written on `line` of `text` (1-based), when the line has one:
/// a parse error names the key as well as the place.
pub fn key_at(text: &str, line: u64) -> String {
    let Some(l) = (line as usize).checked_sub(1).and_then(|i| text.lines().nth(i)) else {
        return "(yaml)".into();
    };
    let l = l.trim_start().trim_start_matches("- ");
    match l.split_once(':') {
        Some((k, _)) if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => k.to_string(),
        _ => "(yaml)".into(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Instant;

    use super::*;

    /// A billion laughs: each level a list of ten aliases of the one before.
    pub(crate) fn alias_bomb(levels: usize) -> String {
        let mut t = String::from("a0: &a0 [\"lol\", \"lol\", \"lol\", \"lol\", \"lol\"]\n");
        for i in 1..=levels {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            t.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        t
    }

    #[test]
    fn an_alias_bomb_is_refused_quickly_with_a_place() {
        let started = Instant::now();
        let e = from_str::<BTreeMap<String, serde_json::Value>>(&alias_bomb(9)).expect_err("refused");
        let (line, _, _, message) = place(&alias_bomb(9), &e);
        assert!(started.elapsed().as_secs() < 2, "{:?}", started.elapsed());
        assert!(line > 0, "a place: {e}");
        assert!(message.contains("budget") || message.contains("alias"), "{message}");
    }

    #[test]
    fn deep_nesting_is_refused_with_a_place() {
        for text in [
            "[".repeat(100_000),
            "a:\n".to_string() + &(1..200).map(|i| format!("{}- \n", " ".repeat(i))).collect::<String>(),
        ] {
            let e = from_str::<serde_json::Value>(&text).expect_err("refused");
            let (line, column, _, _) = place(&text, &e);
            assert!(line > 0 && column > 0, "a place: {e}");
        }
    }

    #[test]
    fn ordinary_documents_with_a_few_aliases_still_parse() {
        let v: serde_json::Value = from_str("keys: &k {enc: 1, mac: 2}\nrotation: *k\n").expect("parses");
        assert_eq!(v["rotation"]["mac"], 2);
    }

    #[test]
    fn an_oversized_file_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = dir.path().join("big.yaml");
        std::fs::write(&big, "# padding\n".repeat(30_000)).expect("write");
        assert!(read(&big).expect_err("refused").contains("larger than 256 KiB"));
        let missing = read(&dir.path().join("nope.yaml")).expect_err("missing");
        assert!(missing.contains("No such file"), "{missing}");
        std::fs::write(&big, [0xff, 0xfe, b'a']).expect("write");
        assert_eq!(read(&big).expect_err("binary"), "not UTF-8 text");
    }
}
