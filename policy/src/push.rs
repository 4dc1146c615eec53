//! The wire format of policy distribution ("push") between the operator and its sidecars.
//! Only types: the operator serves it, the proxy consumes it (docs/operator.md, "Policy push").
//!
//! - `GET /v1/stream` with `Authorization: Bearer <projected token, audience toolgate>`:
//!   `200`, `Content-Type: application/x-ndjson`, one [`Message`] per line, for as long as
//!   the connection lasts. The first message is always [`Message::Policies`].
//! - `POST /v1/ack` with the same token and an [`Ack`] body: `204`.
//! - Refusals: `401` (token missing, invalid, expired or for another audience), `403`
//!   (token not bound to a pod, or the pod is unknown); body `{"error": "..."}`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Path of the policy stream.
pub const STREAM_PATH: &str = "/v1/stream";
/// Path of acknowledgements.
pub const ACK_PATH: &str = "/v1/ack";
/// `POST` an [`ApprovalRequest`] here (on the stream's connection): `201` with an
/// [`ApprovalCreated`]. `POST {APPROVALS_PATH}/{name}/close` with an [`ApprovalClose`]
/// when the sidecar gives up waiting (timeout, client gone).
pub const APPROVALS_PATH: &str = "/v1/approvals";
/// Request header on the stream naming this sidecar process (random per start): the
/// operator marks approvals of earlier instances of the pod as abandoned.
pub const INSTANCE_HEADER: &str = "toolgate-instance";
/// Largest line the sidecar accepts on the stream (a policy set is at most this big).
pub const MAX_LINE_BYTES: usize = 8 * 1024 * 1024;

/// One line of the stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Message {
    /// The complete effective policy set for the pod; replaces whatever came before.
    Policies(PolicySet),
    /// An approval of this pod changed phase (sent on change, and on connect for every
    /// decided approval of this instance).
    Approval(ApprovalUpdate),
    /// Nothing changed; the stream is alive. The sidecar reconnects after three missed
    /// heartbeat intervals.
    Heartbeat {
        /// Seconds between heartbeats, so that the sidecar knows when to give up.
        #[serde(rename = "intervalSeconds")]
        interval_seconds: u64,
    },
}

/// The effective policies of one pod.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySet {
    /// Content hash of `policies` ([`PolicySet::compute_revision`]); acknowledged by the
    /// sidecar.
    pub revision: String,
    /// Namespace and name of the pod the set is for (from the token, not the sidecar).
    pub pod: PodRef,
    /// Every McpPolicy whose selector matches the pod, ordered by name. Empty: deny all.
    pub policies: Vec<PushedPolicy>,
}

/// The pod a stream serves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    /// Namespace of the pod.
    pub namespace: String,
    /// Name of the pod.
    pub name: String,
}

/// One McpPolicy as a sidecar enforces it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PushedPolicy {
    /// `metadata.name` of the McpPolicy; the document name in decisions and audit lines.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.generation` the document comes from (the last accepted one when the
    /// newest generation is invalid).
    pub generation: i64,
    /// `true`: refusals are only logged and counted (`would_*`), calls go through.
    #[serde(default)]
    pub dry_run: bool,
    /// The policy document (the McpPolicy `spec` without `selector` and `mode`).
    pub document: Value,
}

/// The sidecar's answer to a [`PolicySet`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ack {
    /// The revision the sidecar now enforces (or failed to).
    pub revision: String,
    /// Set when the sidecar could not compile the set; it keeps its previous policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A held call asks for a person's decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRequest {
    /// The tool called.
    pub tool: String,
    /// The grant the caller matched, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    /// SHA-256 fingerprint of the caller's credential (never the credential).
    pub identity: String,
    /// MCP session of the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The document (McpPolicy name) and rule path that asked for approval.
    pub policy: String,
    /// Path of the rule.
    pub rule: String,
    /// Why approval is needed (the rule's reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// SHA-256 (hex) of the canonical JSON of the arguments.
    pub arguments_digest: String,
    /// Top-level argument keys.
    #[serde(default)]
    pub argument_keys: Vec<String>,
    /// The arguments, only when the rule allows showing them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<Value>,
    /// Seconds until the call is refused as expired.
    pub timeout_seconds: u64,
    /// The sidecar process (see [`INSTANCE_HEADER`]).
    pub instance: String,
}

/// The McpApproval the operator created for an [`ApprovalRequest`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalCreated {
    /// `metadata.name` of the McpApproval (in the pod's namespace).
    pub name: String,
}

/// A phase change of an approval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalUpdate {
    /// `metadata.name` of the McpApproval.
    pub name: String,
    /// Its phase now.
    pub phase: ApprovalPhase,
    /// The decider's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who decided (the user the apiserver authenticated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
}

/// The sidecar stopped waiting for an approval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalClose {
    /// Why the sidecar stopped waiting.
    pub phase: ClosePhase,
}

/// Where an approval stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ApprovalPhase {
    /// Waiting for a decision.
    #[default]
    Pending,
    /// A person approved: the held call is forwarded.
    Approved,
    /// A person denied: the held call is refused.
    Denied,
    /// Nobody decided in time: the held call was refused.
    Expired,
    /// The client went away or cancelled the call.
    Cancelled,
    /// The sidecar holding the call restarted or its pod is gone.
    Abandoned,
}

impl ApprovalPhase {
    /// The phase name as written in `status.phase`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Approved => "Approved",
            Self::Denied => "Denied",
            Self::Expired => "Expired",
            Self::Cancelled => "Cancelled",
            Self::Abandoned => "Abandoned",
        }
    }
}

/// Why a sidecar stopped waiting for an approval ([`ApprovalClose`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ClosePhase {
    /// No decision in time.
    Expired,
    /// The client went away or cancelled the call.
    Cancelled,
}

impl ClosePhase {
    /// The phase the McpApproval gets.
    pub fn phase(self) -> ApprovalPhase {
        match self {
            Self::Expired => ApprovalPhase::Expired,
            Self::Cancelled => ApprovalPhase::Cancelled,
        }
    }

    /// The phase name, as on the wire.
    pub fn as_str(self) -> &'static str {
        self.phase().as_str()
    }
}

impl PolicySet {
    /// The revision of a list of policies: 16 hex digits of the SHA-256 of their JSON.
    pub fn compute_revision(policies: &[PushedPolicy]) -> String {
        let bytes = serde_json::to_vec(policies).unwrap_or_default();
        let digest = Sha256::digest(&bytes);
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A set with its revision computed.
    pub fn new(pod: PodRef, policies: Vec<PushedPolicy>) -> Self {
        Self { revision: Self::compute_revision(&policies), pod, policies }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_a_stable_tagged_shape() {
        let set = PolicySet::new(
            PodRef { namespace: "agents".into(), name: "runpod-0".into() },
            vec![PushedPolicy {
                name: "seed".into(),
                uid: "u1".into(),
                generation: 2,
                dry_run: false,
                document: serde_json::json!({"version": "1"}),
            }],
        );
        let line = serde_json::to_value(Message::Policies(set.clone())).expect("serializes");
        assert_eq!(line["type"], "policies");
        assert_eq!(line["policies"][0]["dryRun"], false);
        assert_eq!(line["revision"].as_str().map(str::len), Some(16));
        let back: Message = serde_json::from_value(line).expect("parses");
        assert_eq!(back, Message::Policies(set.clone()));
        let hb: Message = serde_json::from_str(r#"{"type":"heartbeat","intervalSeconds":10}"#).expect("parses");
        assert_eq!(hb, Message::Heartbeat { interval_seconds: 10 });
        let mut other = set.policies.clone();
        other[0].generation = 3;
        assert_ne!(PolicySet::compute_revision(&other), set.revision, "a new generation is a new revision");
    }
}
