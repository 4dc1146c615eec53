//! The `McpPolicy` custom resource (`toolgate.dev/v1alpha1`): a policy [`Document`]
//! flattened into `spec`, next to the pod `selector` and the enforcement `mode`.
//!
//! Only kube-core and k8s-openapi types live here (no client), so that the operator and
//! the CLI can share them without depending on each other. `crds/` is generated from these
//! types (`make crds`); their doc comments are the `kubectl explain` text.
//!
//! # Validation happens twice
//!
//! The CRD schema (and its CEL rules) lets the apiserver refuse what it can on
//! `kubectl apply`: wrong types, unknown enum values, missing required fields, a version
//! other than "1". It cannot do everything: `#[serde(deny_unknown_fields)]` has no effect
//! through `#[serde(flatten)]`, so deserializing an [`McpPolicy`] silently drops unknown
//! policy keys, and globs, regexes, durations and argument schemas are only checked by the
//! policy crate. The controller and admission therefore validate
//! [`McpPolicySpec::document_value`] with [`crate::document_from_value`] and
//! [`crate::Policy::compile`], whose errors name the offending field.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition as K8sCondition, LabelSelector};
use kube_derive::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Document;

/// Label on pods (or their namespace) that asks for the toolgate sidecar.
pub const INJECT_LABEL: &str = "toolgate.dev/inject";

/// Policy for the MCP tool calls of the pods it selects: which tools they may call, with
/// which arguments, how often, and who may call them. The policy fields (`version`,
/// `default`, `tools`, `grants`, ...) are those of a toolgate policy file, written directly
/// under `spec`.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "toolgate.dev",
    version = "v1alpha1",
    kind = "McpPolicy",
    plural = "mcppolicies",
    singular = "mcppolicy",
    shortname = "mcpp",
    category = "toolgate",
    namespaced,
    status = "McpPolicyStatus",
    derive = "PartialEq",
    doc = "An McpPolicy: a toolgate policy for the MCP tool calls of the pods it selects.",
    crates(kube = "::kube_derive", kube_core = "::kube_core"),
    // The root type derives `KubeSchema` for the CEL rule; point it at kube-core too.
    attr = "x_kube(crates(kube_core = \"::kube_core\"))",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode","description":"enforce or dryRun"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status","description":"Whether the policy is valid"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status","description":"Whether every selected pod has a sidecar enforcing this generation"}"#,
    printcolumn = r#"{"name":"Targets","type":"integer","jsonPath":".status.targets","description":"Every running or pending pod of the namespace the selector matches, with or without a sidecar"}"#,
    printcolumn = r#"{"name":"Enforcing","type":"integer","jsonPath":".status.enforcing","description":"Selected pods whose injected sidecar acknowledged this generation"}"#,
    printcolumn = r#"{"name":"Unprotected","type":"integer","jsonPath":".status.unprotected","description":"Selected pods without the injected sidecar: nothing enforces the policy there"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.spec.version == '1'").message("spec.version must be \"1\"").field_path(".spec.version").reason(Reason::FieldValueInvalid)
)]
#[serde(rename_all = "camelCase")]
pub struct McpPolicySpec {
    /// Which pods of this namespace the policy governs, by label. Empty (the default)
    /// selects every pod of the namespace. Selected pods without the toolgate sidecar are
    /// counted in `status.unprotected` and keep the policy from being Ready.
    #[serde(default)]
    pub selector: LabelSelector,

    /// `enforce` (the default) refuses calls the policy refuses; `dryRun` only logs and
    /// counts them (`decision="would_deny"` etc.) and lets them through.
    #[serde(default)]
    pub mode: Mode,

    /// The policy document.
    #[serde(flatten)]
    pub policy: Document,
}

impl McpPolicySpec {
    /// The policy part of a raw `spec` (everything but `selector` and `mode`), for strict
    /// validation with [`crate::document_from_value`]: unlike deserializing an
    /// [`McpPolicy`], that refuses unknown keys and names them.
    pub fn document_value(raw_spec: &Value) -> Value {
        let mut value = raw_spec.clone();
        if let Some(map) = value.as_object_mut() {
            map.remove("selector");
            map.remove("mode");
        }
        value
    }
}

/// Whether a policy's refusals are enforced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Mode {
    /// Refused calls are answered with a refusal and never reach the MCP server.
    #[default]
    Enforce,
    /// Refused calls are logged and counted as would-be refusals, then forwarded.
    DryRun,
}

/// What the operator observed about an McpPolicy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct McpPolicyStatus {
    /// `Accepted` (the spec is a valid policy; when False, the message names the bad
    /// field), `Ready` (every selected pod has the injected sidecar and it enforces this
    /// generation; False with reason `Unprotected`, naming the pods, while a selected pod
    /// runs without it) and `PodsLeft` (True, naming them, while running pods that this
    /// policy selected no longer match its selector).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<K8sCondition>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Number of pods the selector matches (running or pending, not being deleted), with or
    /// without a sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<i32>,

    /// Number of selected pods whose injected sidecar acknowledged this generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcing: Option<i32>,

    /// Number of selected pods without the sidecar as the operator injects it (opted out,
    /// created before injection was enabled, or with a changed sidecar): nothing enforces
    /// the policy on them. Their names are in the `Ready` condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unprotected: Option<i32>,
}

/// A tool call held by a sidecar until a person decides. Created by the operator; decided
/// by setting `status.phase` to `Approved` or `Denied` (`toolgate approve|deny NAME`),
/// which needs the `toolgate-approver` role. Who decided is recorded by the operator's
/// admission webhook from the authenticated request, never from what the client sends.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "toolgate.dev",
    version = "v1alpha1",
    kind = "McpApproval",
    plural = "mcpapprovals",
    singular = "mcpapproval",
    shortname = "mcpa",
    category = "toolgate",
    namespaced,
    status = "McpApprovalStatus",
    derive = "PartialEq",
    doc = "An McpApproval: one held MCP tool call waiting for a person's decision.",
    crates(kube = "::kube_derive", kube_core = "::kube_core"),
    attr = "x_kube(crates(kube_core = \"::kube_core\"))",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Tool","type":"string","jsonPath":".spec.tool"}"#,
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".spec.pod"}"#,
    printcolumn = r#"{"name":"Decided-By","type":"string","jsonPath":".status.decidedBy","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.spec == oldSelf.spec").message("spec of an McpApproval is immutable").reason(Reason::FieldValueForbidden),
    validation = Rule::new("!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase == 'Pending' || self.status == oldSelf.status").message("a decided McpApproval is final").reason(Reason::FieldValueForbidden)
)]
#[serde(rename_all = "camelCase")]
pub struct McpApprovalSpec {
    /// The pod whose sidecar holds the call.
    pub pod: String,
    /// UID of that pod.
    pub pod_uid: String,
    /// The sidecar process holding the call.
    pub instance: String,
    /// The tool called.
    pub tool: String,
    /// The grant the caller matched, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    /// SHA-256 fingerprint of the caller's credential.
    pub identity: String,
    /// MCP session of the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// McpPolicy that asked for approval.
    pub policy: String,
    /// Rule path in that policy.
    pub rule: String,
    /// Why approval is needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// SHA-256 (hex) of the canonical JSON of the arguments: an approval covers exactly
    /// these arguments.
    pub arguments_digest: String,
    /// Top-level argument keys.
    #[serde(default)]
    pub argument_keys: Vec<String>,
    /// The arguments, when the policy allows showing them (`approval.show_arguments`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
    pub arguments: Option<Value>,
    /// When the call was held (RFC 3339).
    pub requested_at: String,
    /// When the held call is refused as expired (RFC 3339).
    pub expires_at: String,
}

/// Where an approval stands (always compiled: the push protocol carries it too).
pub use crate::push::ApprovalPhase;

/// The decision on an McpApproval.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct McpApprovalStatus {
    /// Pending, Approved, Denied, Expired, Cancelled or Abandoned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ApprovalPhase>,
    /// The decider's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who decided: set by the operator's admission webhook from the authenticated user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// When (RFC 3339); set with `decidedBy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<String>,
}

#[cfg(test)]
mod tests {
    use kube_core::CustomResourceExt;
    use serde_json::json;

    use super::*;

    const SEED: &str = r#"{"version":"1","default":"deny","tools":{"start-pod":{"limits":[{"counter":"start-pod_rate","window":"minute","max":10,"scope":"grant"}]}}}"#;

    fn seed_spec() -> Value {
        serde_json::from_str(SEED).expect("seed policy is JSON")
    }

    #[test]
    fn the_seed_policy_under_spec_is_an_mcp_policy() {
        let object = json!({
            "apiVersion": "toolgate.dev/v1alpha1",
            "kind": "McpPolicy",
            "metadata": {"name": "seed", "namespace": "agents"},
            "spec": seed_spec(),
        });
        let policy: McpPolicy = serde_json::from_value(object).expect("seed McpPolicy");
        assert_eq!(policy.spec.mode, Mode::Enforce);
        assert_eq!(policy.spec.selector, LabelSelector::default());
        let expected = crate::parse_document(SEED).expect("seed parses");
        assert_eq!(policy.spec.policy, expected);
        // Round trip: the document fields stay directly under spec.
        let back = serde_json::to_value(&policy.spec).expect("serialize");
        assert_eq!(back["tools"]["start-pod"]["limits"][0]["max"], json!(10));
        assert_eq!(back["mode"], json!("enforce"));
    }

    #[test]
    fn selector_and_mode_are_read_next_to_the_policy() {
        let mut spec = seed_spec();
        spec["mode"] = json!("dryRun");
        spec["selector"] = json!({"matchLabels": {"app": "agent"}});
        let parsed: McpPolicySpec = serde_json::from_value(spec.clone()).expect("spec");
        assert_eq!(parsed.mode, Mode::DryRun);
        assert_eq!(parsed.selector.match_labels.as_ref().and_then(|m| m.get("app")).map(String::as_str), Some("agent"));
        let doc = McpPolicySpec::document_value(&spec);
        assert!(doc.get("mode").is_none() && doc.get("selector").is_none());
        let (strict, _) = crate::document_from_value(doc).expect("strict parse of the policy part");
        assert_eq!(strict, parsed.policy);
    }

    #[test]
    fn unknown_top_level_keys_need_the_strict_parser() {
        let mut spec = seed_spec();
        spec["defualt"] = json!("allow");
        // serde's flatten ignores the document's deny_unknown_fields at the top level...
        let lenient: McpPolicySpec = serde_json::from_value(spec.clone()).expect("flatten is lenient");
        assert_eq!(lenient.policy, crate::parse_document(SEED).expect("seed"));
        // ...so the controller uses the strict parser, which names the key.
        let err = crate::document_from_value(McpPolicySpec::document_value(&spec))
            .expect_err("the strict parser refuses the typo");
        assert!(err.to_string().contains("defualt"), "{err}");

        // Nested types are not flattened and stay strict.
        let mut nested = seed_spec();
        nested["tools"]["start-pod"]["limts"] = json!([]);
        let err = serde_json::from_value::<McpPolicySpec>(nested).expect_err("nested typo");
        assert!(err.to_string().contains("limts"), "{err}");
    }

    #[test]
    fn unknown_mode_is_refused() {
        let mut spec = seed_spec();
        spec["mode"] = json!("audit");
        assert!(serde_json::from_value::<McpPolicySpec>(spec).is_err());
    }

    #[test]
    fn crd_names_columns_and_rules() {
        let crd = McpPolicy::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("mcppolicies.toolgate.dev"));
        assert_eq!(crd.spec.names.short_names, Some(vec!["mcpp".to_owned()]));
        assert_eq!(crd.spec.names.categories, Some(vec!["toolgate".to_owned()]));
        assert_eq!(crd.spec.scope, "Namespaced");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        let columns: Vec<&str> = version.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
        assert_eq!(columns, ["Mode", "Accepted", "Ready", "Targets", "Enforcing", "Unprotected", "Age"]);
        let schema = serde_json::to_value(&version.schema).expect("schema");
        let text = schema.to_string();
        assert!(text.contains("self.spec.version == '1'"), "{text}");
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["properties"]["mode"]["default"], json!("enforce"));
        assert_eq!(spec["properties"]["mode"]["enum"], json!(["enforce", "dryRun"]));
        assert_eq!(spec["required"], json!(["version"]));
        let tool = &spec["properties"]["tools"]["additionalProperties"];
        assert_eq!(tool["properties"]["arguments"]["x-kubernetes-preserve-unknown-fields"], json!(true));
        // A window is a string or a number of seconds (PolicyLayer's `window: 60`).
        let window = &tool["properties"]["limits"]["items"]["properties"]["window"];
        assert_eq!(window["x-kubernetes-int-or-string"], json!(true), "{window}");
        assert!(window.get("type").is_none(), "int-or-string has no type: {window}");
    }

    #[test]
    fn a_window_in_seconds_under_spec() {
        let mut spec = seed_spec();
        spec["tools"]["start-pod"]["limits"][0]["window"] = json!(60);
        let parsed: McpPolicySpec = serde_json::from_value(spec.clone()).expect("spec");
        assert_eq!(parsed.policy.tools["start-pod"].limits[0].window, crate::Window::Seconds(60));
        let (strict, _) = crate::document_from_value(McpPolicySpec::document_value(&spec)).expect("strict");
        assert_eq!(strict, parsed.policy);
        crate::Policy::compile(vec![("p".into(), strict)]).expect("valid");
        spec["tools"]["start-pod"]["limits"][0]["window"] = json!(-60);
        let err = crate::document_from_value(McpPolicySpec::document_value(&spec)).expect_err("negative");
        assert!(err.to_string().contains("tools.start-pod.limits[0].window"), "{err}");
    }
}
