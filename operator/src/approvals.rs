//! Human approval, operator side.
//!
//! - A sidecar holding a call asks for an approval (`POST /v1/approvals`): the operator
//!   creates an `McpApproval` in the pod's namespace (phase Pending) from the request and
//!   from what it knows itself (pod name and uid come from the token, not the request).
//!   Only the operator creates McpApprovals: the `/approval` webhook refuses a CREATE by
//!   anyone else (`crate::admission::approval_review`), so a copy of a pending approval
//!   cannot be made, in the pod's namespace or another one.
//! - A person decides by setting `status.phase` (RBAC: the `toolgate-approver` role).
//!   The `/approval` admission webhook (on `mcpapprovals/status`) records who decided from
//!   the authenticated request and refuses the requesting pod's own service account, and
//!   service accounts the operator is told not to trust (`Deciders`).
//! - Decisions reach the sidecar instance holding the call over its stream
//!   (`crate::push::Hub::push_approvals`), also after operator restarts (they are API
//!   objects). A decision counts only in the pod's own namespace, for the pod's name and
//!   uid.
//! - The sidecar closes approvals it stopped waiting for (Expired, Cancelled); approvals
//!   of an earlier sidecar instance of the pod, or of a pod that is gone, are Abandoned
//!   (by the leader: `crate::push::acks::abandon_replaced`, `crate::leader::duties::janitor`).
//!
//! This module talks to the apiserver only; it knows nothing of streams or caches.

use std::collections::BTreeMap;
use std::time::Duration;

use hyper::StatusCode;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use toolgate_policy::crd::{ApprovalPhase, McpApproval, McpApprovalSpec};
use toolgate_policy::push::{ApprovalRequest, ClosePhase};

use crate::auth::PodIdentity;

/// Longest wait a sidecar may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(31 * 86_400);
/// Shown arguments larger than this are dropped (the digest still binds them).
const MAX_SHOWN_ARGUMENTS: usize = 64 * 1024;
/// Label on every McpApproval: the pod it belongs to.
pub const POD_LABEL: &str = "toolgate.dev/pod";

/// Why an approval request or close of a sidecar failed.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    /// The request is malformed; the message names the field.
    #[error("{field}: {why}")]
    BadRequest { field: &'static str, why: String },
    #[error("no McpApproval {0}")]
    NotFound(String),
    /// The approval belongs to another pod than the caller.
    #[error("the McpApproval belongs to another pod")]
    Forbidden,
    /// The apiserver failed; `context` says at which step (empty, or ending in `: `).
    #[error("{context}{source}")]
    Unavailable {
        context: &'static str,
        #[source]
        source: kube::Error,
    },
}

impl ApprovalError {
    /// The HTTP status the sidecar gets.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A stable, low-cardinality label (`toolgate_operator_approval_requests_total`).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::BadRequest { .. } => "bad_request",
            Self::NotFound(_) => "not_found",
            Self::Forbidden => "forbidden",
            Self::Unavailable { .. } => "unavailable",
        }
    }
}

fn bad(field: &'static str, why: &str) -> ApprovalError {
    ApprovalError::BadRequest { field, why: why.to_owned() }
}

/// Checks a request from a sidecar; the error names the field.
fn check(req: &ApprovalRequest) -> Result<(), ApprovalError> {
    let short = |field: &'static str, v: &str, max: usize| {
        if v.is_empty() || v.len() > max { Err(bad(field, &format!("must be 1..{max} characters"))) } else { Ok(()) }
    };
    short("tool", &req.tool, 256)?;
    // Anonymous callers have an empty identity.
    if req.identity.len() > 128 {
        return Err(bad("identity", "must be at most 128 characters"));
    }
    short("policy", &req.policy, 253)?;
    short("rule", &req.rule, 512)?;
    short("instance", &req.instance, 64)?;
    if req.arguments_digest.len() != 64 || !req.arguments_digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("argumentsDigest", "must be 64 hex digits (SHA-256)"));
    }
    if req.argument_keys.len() > 256 || req.argument_keys.iter().any(|k| k.len() > 256) {
        return Err(bad("argumentKeys", "too many or too long"));
    }
    if req.timeout_seconds == 0 || Duration::from_secs(req.timeout_seconds) > MAX_TIMEOUT {
        return Err(bad("timeoutSeconds", "must be between 1 s and 31 days"));
    }
    Ok(())
}

/// Creates the McpApproval for a held call; returns its name.
pub async fn create(client: &Client, id: &PodIdentity, req: ApprovalRequest) -> Result<String, ApprovalError> {
    check(&req)?;
    let now = Timestamp::now();
    let expires =
        now + k8s_openapi::jiff::SignedDuration::from_secs(i64::try_from(req.timeout_seconds).unwrap_or(i64::MAX));
    let arguments =
        req.arguments.filter(|a| serde_json::to_vec(a).map(|v| v.len()).unwrap_or(usize::MAX) <= MAX_SHOWN_ARGUMENTS);
    let prefix: String = id.pod_name.chars().take(40).collect();
    let approval = McpApproval {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", prefix.trim_end_matches('-'))),
            labels: Some(BTreeMap::from([
                (
                    POD_LABEL.to_owned(),
                    id.pod_name.chars().take(63).collect::<String>().trim_end_matches(['-', '.', '_']).to_owned(),
                ),
                ("app.kubernetes.io/managed-by".to_owned(), "toolgate-operator".to_owned()),
            ])),
            ..ObjectMeta::default()
        },
        spec: McpApprovalSpec {
            pod: id.pod_name.clone(),
            pod_uid: id.pod_uid.clone(),
            instance: req.instance,
            tool: req.tool,
            grant: req.grant,
            identity: req.identity,
            session: req.session.map(|s| s.chars().take(256).collect()),
            policy: req.policy,
            rule: req.rule,
            reason: req.reason.map(|s| s.chars().take(1024).collect()),
            arguments_digest: req.arguments_digest,
            argument_keys: req.argument_keys,
            arguments,
            requested_at: now.to_string(),
            expires_at: expires.to_string(),
        },
        status: None,
    };
    let api: Api<McpApproval> = Api::namespaced(client.clone(), &id.namespace);
    let created = api
        .create(&PostParams::default(), &approval)
        .await
        .map_err(|source| ApprovalError::Unavailable { context: "creating the McpApproval: ", source })?;
    let name = created.name_any();
    set_phase(&api, &name, ApprovalPhase::Pending, None)
        .await
        .map_err(|source| ApprovalError::Unavailable { context: "setting phase Pending: ", source })?;
    tracing::info!(namespace = %id.namespace, approval = %name, pod = %id.pod_name, tool = %created.spec.tool, "approval requested");
    Ok(name)
}

/// Sets `status.phase` (and reason) with a merge patch; CEL keeps decided approvals final.
pub async fn set_phase(
    api: &Api<McpApproval>,
    name: &str,
    phase: ApprovalPhase,
    reason: Option<&str>,
) -> kube::Result<McpApproval> {
    let mut status = json!({"phase": phase.as_str()});
    if let Some(r) = reason {
        status["reason"] = json!(r);
    }
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(json!({"status": status}))).await
}

/// The sidecar stopped waiting: `Expired` or `Cancelled`, only for its own pod's
/// approvals and only while Pending.
pub async fn close(client: &Client, id: &PodIdentity, name: &str, phase: ClosePhase) -> Result<(), ApprovalError> {
    let phase = phase.phase();
    let unavailable = |source| ApprovalError::Unavailable { context: "", source };
    let api: Api<McpApproval> = Api::namespaced(client.clone(), &id.namespace);
    let approval = match api.get_opt(name).await {
        Ok(Some(a)) => a,
        Ok(None) => return Err(ApprovalError::NotFound(name.to_owned())),
        Err(e) => return Err(unavailable(e)),
    };
    if approval.spec.pod_uid != id.pod_uid {
        return Err(ApprovalError::Forbidden);
    }
    if approval.status.as_ref().and_then(|s| s.phase).is_some_and(|p| p != ApprovalPhase::Pending) {
        return Ok(());
    }
    let why = if phase == ApprovalPhase::Expired { "no decision before the timeout" } else { "the client went away" };
    set_phase(&api, name, phase, Some(why)).await.map(|_| ()).map_err(unavailable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> ApprovalRequest {
        ApprovalRequest {
            tool: "delete-pod".into(),
            grant: None,
            identity: "f".repeat(64),
            session: None,
            policy: "runpod".into(),
            rule: "tools.delete-pod".into(),
            reason: None,
            arguments_digest: "a".repeat(64),
            argument_keys: vec!["id".into()],
            arguments: None,
            timeout_seconds: 600,
            instance: "i-1".into(),
        }
    }

    #[test]
    fn failures_map_to_a_status_and_a_label_and_keep_their_messages() {
        let cases = [
            (bad("tool", "must be 1..256 characters"), 400, "bad_request", "tool: must be 1..256 characters"),
            (ApprovalError::NotFound("p-x1".into()), 404, "not_found", "no McpApproval p-x1"),
            (ApprovalError::Forbidden, 403, "forbidden", "the McpApproval belongs to another pod"),
            (
                ApprovalError::Unavailable {
                    context: "creating the McpApproval: ",
                    source: kube::Error::Service("connection refused".into()),
                },
                503,
                "unavailable",
                "creating the McpApproval: ServiceError: connection refused",
            ),
        ];
        for (e, status, label, message) in cases {
            assert_eq!((e.status().as_u16(), e.metric_label(), e.to_string().as_str()), (status, label, message));
        }
    }

    #[test]
    fn requests_are_checked_field_by_field() {
        assert!(check(&request()).is_ok());
        let mut r = request();
        r.arguments_digest = "zz".into();
        assert!(
            check(&r).is_err_and(|e| e.to_string().starts_with("argumentsDigest") && e.metric_label() == "bad_request")
        );
        let mut r = request();
        r.timeout_seconds = 0;
        assert!(check(&r).is_err_and(|e| e.to_string().starts_with("timeoutSeconds")));
        let mut r = request();
        r.tool = "x".repeat(300);
        assert!(check(&r).is_err_and(|e| e.to_string().starts_with("tool")));
    }
}
