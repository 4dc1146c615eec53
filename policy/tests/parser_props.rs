//! The policy parser under attack: arbitrary text and mutated valid policies (the shipped
//! examples with one value changed, a line inserted, truncated, a byte flipped, re-encoded
//! as JSON) through parsing, Intercept conversion and compilation. Nothing panics; what
//! parses re-encodes (JSON or YAML) to the same document, which compiles the same way.
//!
//! `make test` runs a fixed seed and 256 cases per property; `PROPTEST_CASES=N` (and
//! `PROPTEST_RNG_SEED=S`) run longer or elsewhere (docs/testing.md).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use serde_json::Value;
use toolgate_policy::{Document, Policy, document_from_value, parse_document};

const SEED: u64 = 0x7001_6a7e_0011_0014;

fn config(cases: u32) -> ProptestConfig {
    let mut c = ProptestConfig { failure_persistence: None, ..ProptestConfig::default() };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        c.rng_seed = RngSeed::Fixed(SEED);
    }
    c
}

const EXAMPLES: &[&str] = &[
    include_str!("../../examples/policies/seed-start-pod.json"),
    include_str!("../../examples/policies/intercept-github.yaml"),
    include_str!("../../examples/policies/runpod-1.1.0.yaml"),
    include_str!("../../examples/policies/runpod-4.0.0.yaml"),
    "version: '1'\ngrants:\n  - {name: a, match: {header: {name: X-Team, values: [ops]}}, tools: {x: {limits: [{window: 60, max: 1}]}}}\n",
];

/// YAML/JSON scalars and fragments spliced in place of a value.
const VALUES: &[&str] = &[
    "0",
    "-1",
    "60",
    "1.5",
    "1e400",
    "99999999999999999999",
    "''",
    "\"\"",
    "null",
    "~",
    "true",
    "[]",
    "{}",
    "[{}]",
    "minute",
    "'60'",
    "deny",
    "approval",
    "\"*\"",
    "'[{'",
    "&a x",
    "*a",
    "!!binary aGk=",
    ".inf",
    ".nan",
    "0x10",
    "|\n  x",
    "{a: 1, a: 2}",
    "\"\\ud800\"",
    "args.x.0",
    "state.x.y",
];

/// Lines inserted somewhere (keys in the wrong place, anchors, tabs, odd indentation).
const LINES: &[&str] = &[
    "tools: {}",
    "  limits: [{window: 60, max: 1}]",
    "grants: [{name: a, match: {}}]",
    "\tversion: '1'",
    "<<: *x",
    "version: '1'",
    "- 1",
    "---",
    "all_tools: {limits: [{window: -5, max: 1}]}",
    "    rules: [{name: r, rate_limit: 1/minute}]",
];

fn mutate(text: &str, muts: &[(u8, u32, u32)]) -> String {
    let mut t = text.to_owned();
    for &(kind, a, b) in muts {
        let (a, b) = (a as usize, b as usize);
        match kind % 6 {
            // The value after some `: ` replaced.
            0 => {
                let spots: Vec<usize> = t.match_indices(": ").map(|(i, _)| i + 2).collect();
                if !spots.is_empty() {
                    let at = spots[a % spots.len()];
                    let end = t[at..].find(['\n', ',', '}']).map_or(t.len(), |e| at + e);
                    t.replace_range(at..end, VALUES[b % VALUES.len()]);
                }
            }
            // A line inserted.
            1 => {
                let starts: Vec<usize> = std::iter::once(0).chain(t.match_indices('\n').map(|(i, _)| i + 1)).collect();
                let at = starts[a % starts.len()];
                t.insert_str(at, &format!("{}\n", LINES[b % LINES.len()]));
            }
            // Truncated (on a character boundary).
            2 => {
                let mut at = a % (t.len() + 1);
                while !t.is_char_boundary(at) {
                    at -= 1;
                }
                t.truncate(at);
            }
            // A byte changed to another ASCII byte.
            3 if !t.is_empty() => {
                let i = a % t.len();
                if t.is_char_boundary(i) && t.is_char_boundary(i + 1) {
                    t.replace_range(i..i + 1, &char::from(b as u8 % 128).to_string());
                }
            }
            // A line duplicated (often a duplicate key).
            4 => {
                let lines: Vec<&str> = t.lines().collect();
                if !lines.is_empty() {
                    let i = a % lines.len();
                    let mut v: Vec<String> = lines.iter().map(|s| (*s).to_owned()).collect();
                    v.insert(i, lines[i].to_owned());
                    t = v.join("\n");
                }
            }
            _ => {}
        }
    }
    t
}

fn compiles(doc: Document) -> Result<String, Vec<String>> {
    match Policy::compile(vec![("p".into(), doc)]) {
        Ok(p) => Ok(p.revision().to_owned()),
        Err(e) => Err(e.problems().into_iter().map(|p| p.to_string()).collect()),
    }
}

/// Parses, compiles, and when the text parses checks that the document re-encoded as
/// JSON and as YAML parses to the same document and compiles the same way.
fn exercise(text: &str) -> Result<(), TestCaseError> {
    let Ok(doc) = parse_document(text) else { return Ok(()) };
    let compiled = compiles(doc.clone());
    let json = serde_json::to_string(&doc).expect("a document serialises");
    let again = parse_document(&json);
    prop_assert_eq!(again.as_ref().ok(), Some(&doc), "JSON re-encoding of {:?}: {}", text, json);
    let yaml = serde_norway::to_string(&doc).expect("a document serialises as YAML");
    let again = parse_document(&yaml);
    prop_assert_eq!(again.as_ref().ok(), Some(&doc), "YAML re-encoding of {:?}: {}", text, yaml);
    prop_assert_eq!(compiles(doc), compiled);
    Ok(())
}

fn json_value() -> impl Strategy<Value = Value> {
    const KEYS: &[&str] = &[
        "version",
        "default",
        "hide",
        "tools",
        "all_tools",
        "grants",
        "limits",
        "window",
        "max",
        "scope",
        "rules",
        "name",
        "rate_limit",
        "state",
        "conditions",
        "path",
        "op",
        "value",
        "match",
        "fingerprints",
        "counter",
        "increment_from",
        "action",
        "approval",
        "timeout",
        "start-pod",
        "*",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-1e3f64..1e3).prop_map(Value::from),
        (0..KEYS.len()).prop_map(|i| Value::from(KEYS[i])),
        prop_oneof![Just("1"), Just("minute"), Just("10/minute"), Just("eq"), Just("lte"), Just("args.x")]
            .prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((0..KEYS.len(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (KEYS[k].to_owned(), v)).collect())),
        ]
    })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn mutated_policies_never_panic_and_reencode_alike(
        i in 0..EXAMPLES.len(),
        muts in prop::collection::vec((any::<u8>(), any::<u32>(), any::<u32>()), 0..4),
    ) {
        exercise(&mutate(EXAMPLES[i], &muts))?;
    }

    #[test]
    fn arbitrary_text_never_panics(text in "[ -~\t\n{}\\[\\]:,'\"#&*!|>-]{0,200}") {
        exercise(&text)?;
    }

    #[test]
    fn arbitrary_values_never_panic(mut v in json_value(), version in any::<bool>()) {
        // Mostly shaped like a document, so the deeper checks are reached.
        if version && let Value::Object(m) = &mut v {
            m.insert("version".into(), "1".into());
        }
        if let Ok((doc, _)) = document_from_value(v.clone()) {
            let _ = compiles(doc);
        }
        exercise(&v.to_string())?;
    }
}
