use std::path::PathBuf;

use super::*;

fn smoke() -> (String, PathBuf) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("plans/smoke.yaml");
    (std::fs::read_to_string(&path).expect("smoke plan"), path)
}

fn problems(text: &str) -> Vec<Problem> {
    let (_, path) = smoke();
    Plan::parse(text, &path).expect_err("should be refused").problems
}

fn line_of(text: &str, needle: &str) -> u64 {
    text.lines().position(|l| l.contains(needle)).expect("needle") as u64 + 1
}

#[test]
fn shipped_plans_are_valid() {
    for name in ["smoke.yaml", "regression.yaml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("plans").join(name);
        let plan = Plan::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(!plan.scenarios.is_empty(), "{name}");
    }
}

#[test]
fn unknown_keys_name_their_line_and_field() {
    let (text, _) = smoke();
    let bad = text.replace("    readers: 3\n", "    readers: 3\n    colour: blue\n");
    let p = problems(&bad);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].line, line_of(&bad, "colour"), "{p:?}");
    assert_eq!(p[0].field, "colour", "{p:?}");
    assert!(p[0].message.contains("colour"), "{p:?}");
}

#[test]
fn wrong_types_name_their_line_and_field() {
    let (text, _) = smoke();
    let bad = text.replace("        count: 3", "        count: three");
    let p = problems(&bad);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!((p[0].line, p[0].field.as_str()), (line_of(&bad, "count: three"), "count"), "{p:?}");
}

#[test]
fn bad_expectations_and_kinds_are_all_reported_with_field_and_line() {
    let (text, _) = smoke();
    let bad = text
        .replace("result: failed, step: identify", "result: broken, step: identify")
        .replace("kind: counterfeit", "kind: forged")
        .replace("step: firmware, offset: 20", "step: flashing, offset: 20")
        .replace("stage: bundled", "stage: ready_for_pairing");
    let p = problems(&bad);
    let cases = [
        ("scenarios[1].cards[0].kind", "kind: forged"),
        ("scenarios[2].cards[0].remove.step", "step: flashing"),
        ("scenarios[0].cards[0].expect.stage", "stage: ready_for_pairing, attempts: 1"),
    ];
    for (field, needle) in cases {
        let x = p.iter().find(|x| x.field == field).unwrap_or_else(|| panic!("{field} not reported: {p:?}"));
        assert_eq!(x.line, line_of(&bad, needle), "{x:?}");
    }
    // The unknown kind hides that card's expectation; the others are
    // reported all at once.
    assert_eq!(p.len(), 3, "{p:?}");
    let bad = text.replace("result: failed, step: identify", "result: broken, step: identify");
    let p = problems(&bad);
    assert_eq!(p[0].field, "scenarios[1].cards[0].expect.result", "{p:?}");
    assert_eq!(p[0].line, line_of(&bad, "result: broken"), "{p:?}");
    let err = Plan::parse(&bad, &smoke().1).expect_err("refused").to_string();
    assert!(err.contains("smoke.yaml:") && err.contains("expect.result"), "{err}");
}
