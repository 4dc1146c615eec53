//! Property tests of the JSON-RPC framing and the gate behind it, on bytes a caller
//! chooses (generators in mcp/proptests.rs). The property: nothing panics, and whenever
//! the gate forwards a body, every `tools/call` in it, as the upstream reads it, was
//! decided and holds quota (a refused body holds none).
//!
//! `make test` runs a fixed seed and 256 cases per property; `PROPTEST_CASES=100000` (and
//! `PROPTEST_RNG_SEED=N` for another sequence) runs longer (docs/testing.md).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use proptest::prelude::*;
use serde_json::{Value, json};
use toolgate_policy::{Call, Caller, DecisionKind, Policy};

use crate::gate::{Checked, Gate};
use crate::live::Effective;
use crate::mcp::jsonrpc;
use crate::mcp::proptests::{any_body, config, mutated_message, tool_call};

/// How many messages of `bytes` the upstream would run as `tools/call` (it parses JSON
/// keeping the last of duplicate keys; any object whose method is "tools/call" counts,
/// whatever its id).
fn upstream_tool_calls(bytes: &[u8]) -> usize {
    let is_call = |m: &Value| m.get("method").and_then(Value::as_str) == Some("tools/call");
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Array(items)) => items.iter().filter(|m| is_call(m)).count(),
        Ok(m) => usize::from(is_call(&m)),
        Err(_) => 0,
    }
}

/// A gate allowing every tool under one global limit of `max` calls an hour.
fn gate_with_limit(max: usize) -> (Gate, Arc<Effective>) {
    let text = format!(
        "version: '1'\ndefault: allow\nall_tools:\n  limits: [{{counter: all, window: hour, max: {max}, scope: global}}]\n"
    );
    crate::gate::tests::gate_for(Arc::new(Effective::files(Policy::from_text("props", &text).expect("valid"))))
}

/// Whether one more call fits the gate's global limit (reserving it if so).
fn room_for_one(gate: &Gate, policy: &Effective, caller: &Caller) -> bool {
    let args = json!({});
    let probe = Call { tool: "probe", arguments: &args, caller };
    let d = policy.enforce.decide(&gate.limiter, &probe, gate.now());
    if let Some(r) = d.reservation {
        r.commit();
    }
    d.kind == DecisionKind::Allow
}

fn check_body(bytes: &[u8]) -> Result<(), TestCaseError> {
    let Ok(body) = jsonrpc::parse_body(bytes) else { return Ok(()) };
    for m in &body.messages {
        let _ = (m.kind(), m.id(), jsonrpc::tool_call(m).map(|c| (c.name.len(), c.arguments.is_null())));
    }
    let calls = upstream_tool_calls(bytes);
    let max = calls.max(1);
    let (gate, policy) = gate_with_limit(max);
    let caller = Caller { identity: "sha256:props".into(), ..Caller::default() };
    match gate.check(&body, &caller, &policy, None, None) {
        Checked::Forward(tracker) => {
            if calls > 0 {
                // `calls` units fit the limit; if every call was decided they are all held
                // now, so there is no room for one more.
                prop_assert!(
                    !room_for_one(&gate, &policy, &caller),
                    "forwarded with {} tools/call, not all decided: {}",
                    calls,
                    String::from_utf8_lossy(bytes)
                );
            }
            tracker.keep_spent();
        }
        Checked::Refuse(refusal) => {
            let answer = refusal.into_answer();
            prop_assert!(answer.is_object() || answer.is_array(), "{answer}");
            // Nothing of a refused body is forwarded, so it holds no quota.
            for i in 0..max {
                prop_assert!(room_for_one(&gate, &policy, &caller), "unit {i} of {max} held by a refused body");
            }
        }
        Checked::Hold(_) => prop_assert!(false, "nothing is held without an approver"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn framing_and_gate_never_panic_and_forward_only_decided_calls(bytes in any_body()) {
        check_body(&bytes)?;
    }

    #[test]
    fn batches_of_mutated_messages(parts in prop::collection::vec(mutated_message(), 1..6)) {
        // Several (mutated) messages in one batch, as one body.
        let mut t = b"[".to_vec();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                t.push(b',');
            }
            t.extend_from_slice(p);
        }
        t.push(b']');
        check_body(&t)?;
    }
}

#[test]
fn the_gate_property_catches_an_undecided_call() {
    // The property's own check: a forwarded body holding fewer units than its calls is
    // seen (here a probe spends the room a real call would have held).
    let body = jsonrpc::parse_body(tool_call(json!(1), "start-pod", json!({})).to_string().as_bytes()).unwrap();
    let (gate, policy) = gate_with_limit(2);
    let caller = Caller::default();
    let Checked::Forward(t) = gate.check(&body, &caller, &policy, None, None) else { panic!("forwarded") };
    assert!(room_for_one(&gate, &policy, &caller), "one of two units is left");
    assert!(!room_for_one(&gate, &policy, &caller));
    t.keep_spent();
    assert_eq!(upstream_tool_calls(br#"[{"method":"tools/call"},{"method":"x"},{"id":1,"method":"tools/call"}]"#), 2);
}
