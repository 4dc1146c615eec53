//! Human approval, operator side.
//!
//! - A sidecar holding a call asks for an approval (`POST /v1/approvals`): the operator
//!   creates an `McpApproval` in the pod's namespace (phase Pending) from the request and
//!   from what it knows itself (pod name and uid come from the token, not the request).
//!   Only the operator creates McpApprovals: the `/approval` webhook refuses a CREATE by
//!   anyone else ([`Deciders::operator_user`]), so a copy of a pending approval cannot be
//!   made, in the pod's namespace or another one.
//! - A person decides by setting `status.phase` (RBAC: the `toolgate-approver` role).
//!   The `/approval` admission webhook (on `mcpapprovals/status`) records who decided from
//!   the authenticated request and refuses the requesting pod's own service account, and
//!   service accounts the operator is told not to trust ([`Deciders`]).
//! - Decisions reach the sidecar instance holding the call over its stream
//!   ([`crate::hub::Hub::push_approvals`]), also after operator restarts (they are API
//!   objects). A decision counts only in the pod's own namespace, for the pod's name and
//!   uid.
//! - The sidecar closes approvals it stopped waiting for (Expired, Cancelled); approvals
//!   of an earlier sidecar instance of the pod, or of a pod that is gone, are Abandoned.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, ResourceExt};
use serde_json::json;
use toolgate_policy::crd::{ApprovalPhase, McpApproval, McpApprovalSpec};
use toolgate_policy::push::ApprovalRequest;

use crate::auth::PodIdentity;
use crate::hub::Hub;

/// Longest wait a sidecar may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(31 * 86_400);
/// Shown arguments larger than this are dropped (the digest still binds them).
const MAX_SHOWN_ARGUMENTS: usize = 64 * 1024;
/// Label on every McpApproval: the pod it belongs to.
pub const POD_LABEL: &str = "toolgate.dev/pod";

fn bad(field: &str, why: &str) -> String {
    format!("{field}: {why}")
}

/// Checks a request from a sidecar; the error names the field.
fn check(req: &ApprovalRequest) -> Result<(), String> {
    let short = |field: &str, v: &str, max: usize| {
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
pub async fn create(client: &Client, id: &PodIdentity, req: ApprovalRequest) -> Result<String, (u16, String)> {
    check(&req).map_err(|e| (400, e))?;
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
        .map_err(|e| (503, format!("creating the McpApproval: {e}")))?;
    let name = created.name_any();
    set_phase(&api, &name, ApprovalPhase::Pending, None)
        .await
        .map_err(|e| (503, format!("setting phase Pending: {e}")))?;
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
pub async fn close(client: &Client, id: &PodIdentity, name: &str, phase: &str) -> Result<(), (u16, String)> {
    let phase = match phase {
        "Expired" => ApprovalPhase::Expired,
        "Cancelled" => ApprovalPhase::Cancelled,
        other => return Err((400, format!("phase: {other:?} is not Expired or Cancelled"))),
    };
    let api: Api<McpApproval> = Api::namespaced(client.clone(), &id.namespace);
    let approval = match api.get_opt(name).await {
        Ok(Some(a)) => a,
        Ok(None) => return Err((404, format!("no McpApproval {name}"))),
        Err(e) => return Err((503, e.to_string())),
    };
    if approval.spec.pod_uid != id.pod_uid {
        return Err((403, "the McpApproval belongs to another pod".into()));
    }
    if approval.status.as_ref().and_then(|s| s.phase).is_some_and(|p| p != ApprovalPhase::Pending) {
        return Ok(());
    }
    let why = if phase == ApprovalPhase::Expired { "no decision before the timeout" } else { "the client went away" };
    set_phase(&api, name, phase, Some(why)).await.map(|_| ()).map_err(|e| (503, e.to_string()))
}

/// Leader: approvals whose pod is gone become Abandoned; approvals left Pending well
/// past their expiry (their sidecar died before closing them) become Expired.
pub async fn janitor(client: Client, hub: std::sync::Arc<Hub>) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = Timestamp::now();
        let pending = hub
            .approvals
            .state_filter(|a| a.status.as_ref().and_then(|s| s.phase).is_none_or(|p| p == ApprovalPhase::Pending));
        for a in pending {
            let ns = a.namespace().unwrap_or_default();
            if !hub.governs(&ns) {
                continue;
            }
            let pod = hub.pods.get(&ObjectRef::<Pod>::new(&a.spec.pod).within(&ns));
            let pod_gone = pod.is_none_or(|p| p.uid().as_deref() != Some(a.spec.pod_uid.as_str()));
            let overdue = a
                .spec
                .expires_at
                .parse::<Timestamp>()
                .is_ok_and(|t| now.duration_since(t) > k8s_openapi::jiff::SignedDuration::from_secs(30));
            let api: Api<McpApproval> = Api::namespaced(client.clone(), &ns);
            let result = if pod_gone {
                set_phase(&api, &a.name_any(), ApprovalPhase::Abandoned, Some("the pod is gone")).await
            } else if overdue {
                set_phase(&api, &a.name_any(), ApprovalPhase::Expired, Some("no decision before the timeout")).await
            } else {
                continue;
            };
            if let Err(e) = result {
                tracing::debug!(approval = %a.name_any(), error = %e, "janitor could not close the approval");
            }
        }
    }
}

/// Which service accounts may decide approvals (`--decider-service-accounts`). Anyone
/// with `edit` in a namespace can impersonate its service accounts (and mint their
/// tokens), so a service account of the pod's namespace is only as trusted as the
/// namespace's editors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServiceAccountDeciders {
    /// Any service account the approver role is bound to (the requesting pod's own excepted).
    Any,
    /// Service accounts of other namespaces than the pod's; those of the pod's namespace
    /// only when listed.
    #[default]
    OtherNamespaces,
    /// No service account unless listed: only people (users of the cluster's authenticator).
    None,
}

impl std::str::FromStr for ServiceAccountDeciders {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "any" => Ok(Self::Any),
            "other-namespaces" => Ok(Self::OtherNamespaces),
            "none" => Ok(Self::None),
            other => Err(format!("{other:?}: expected any, other-namespaces or none")),
        }
    }
}

/// Who may create and decide McpApprovals (the `/approval` webhook's rules).
#[derive(Clone, Debug, Default)]
pub struct Deciders {
    /// The operator's own user name (from a SelfSubjectReview at start): the only user
    /// that may create McpApprovals. `None`: every CREATE is refused.
    pub operator_user: Option<String>,
    /// Which service accounts may decide.
    pub service_accounts: ServiceAccountDeciders,
    /// Service accounts (`system:serviceaccount:NS:NAME`) that may decide whatever
    /// [`Deciders::service_accounts`] says (`--allowed-decider-service-accounts`). The
    /// requesting pod's own service account is refused even when listed.
    pub allowed: BTreeSet<String>,
}

impl Deciders {
    /// Parses one `NAMESPACE/NAME` entry of `--allowed-decider-service-accounts` into the
    /// user name the apiserver authenticates the service account as.
    pub fn service_account_user(entry: &str) -> Result<String, String> {
        let valid = |s: &str| {
            !s.is_empty()
                && s.len() <= 253
                && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        };
        match entry.trim().split_once('/') {
            Some((ns, name)) if valid(ns) && valid(name) => Ok(format!("system:serviceaccount:{ns}:{name}")),
            _ => Err(format!("{entry:?}: expected NAMESPACE/NAME of a service account")),
        }
    }

    /// Why `user` may not decide an approval of a pod in `namespace`, if it may not.
    fn refuses(&self, user: &str, namespace: &str) -> Option<String> {
        let sa_namespace = user.strip_prefix("system:serviceaccount:")?.split_once(':')?.0;
        if self.allowed.contains(user) {
            return None;
        }
        let refused = match self.service_accounts {
            ServiceAccountDeciders::Any => false,
            ServiceAccountDeciders::OtherNamespaces => sa_namespace == namespace,
            ServiceAccountDeciders::None => true,
        };
        refused.then(|| {
            let whose = if sa_namespace == namespace { "of the pod's namespace " } else { "" };
            format!(
                "toolgate: the service account {user} {whose}may not decide approvals of namespace {namespace}: \
                 anyone who can edit namespace {sa_namespace} can impersonate it. Decide as a person, or have the \
                 operator list it (--allowed-decider-service-accounts, chart value \
                 approvals.allowedDeciderServiceAccounts)"
            )
        })
    }
}

/// The `/approval` admission webhook (mutating, on `mcpapprovals` creations and
/// `mcpapprovals/status` updates): only the operator creates approvals; a decision
/// records the authenticated user; the requesting pod's own service account, and service
/// accounts [`Deciders`] does not trust, may not decide.
pub fn review(
    hub: &Hub,
    deciders: &Deciders,
    request: &AdmissionRequest<McpApproval>,
) -> (&'static str, AdmissionResponse) {
    let response = AdmissionResponse::from(request);
    let user = request.user_info.username.clone().unwrap_or_default();
    if matches!(request.operation, Operation::Create) && request.sub_resource.as_deref().unwrap_or_default().is_empty()
    {
        if deciders.operator_user.as_deref() == Some(user.as_str()) {
            return ("created", response);
        }
        // Namespaces another operator (release) governs are its webhook's to judge: each
        // admits only its own user where it governs.
        if !hub.governs(request.namespace.as_deref().unwrap_or_default()) {
            return ("not_governed", response);
        }
        return (
            "refused_not_operator",
            forbidden(
                response,
                format!(
                    "toolgate: McpApprovals are created by the toolgate operator for the calls its sidecars hold; \
                     {user:?} cannot create one (a copy of another approval releases nothing)"
                ),
            ),
        );
    }
    let (Some(new), Operation::Update) = (&request.object, &request.operation) else {
        return ("ignored", response);
    };
    let old_phase = request.old_object.as_ref().and_then(|o| o.status.as_ref()).and_then(|s| s.phase);
    let new_phase = new.status.as_ref().and_then(|s| s.phase);
    if new_phase == old_phase || new_phase.is_none_or(|p| p == ApprovalPhase::Pending) {
        return ("unchanged", response);
    }
    let ns = request.namespace.clone().unwrap_or_default();
    let pod_sa = hub
        .pods
        .get(&ObjectRef::<Pod>::new(&new.spec.pod).within(&ns))
        .and_then(|p| p.spec.as_ref().and_then(|s| s.service_account_name.clone()))
        .unwrap_or_else(|| "default".into());
    let decision = matches!(new_phase, Some(ApprovalPhase::Approved | ApprovalPhase::Denied));
    if decision && user == format!("system:serviceaccount:{ns}:{pod_sa}") {
        return ("refused_self", response.deny("the requesting pod's own service account cannot decide its approvals"));
    }
    if decision && let Some(why) = deciders.refuses(&user, &ns) {
        return ("refused_service_account", forbidden(response, why));
    }
    let now = Timestamp::now().to_string();
    let status_exists = new.status.is_some();
    let mut ops = Vec::new();
    if !status_exists {
        ops.push(json!({"op": "add", "path": "/status", "value": {}}));
    }
    ops.push(json!({"op": "add", "path": "/status/decidedBy", "value": user}));
    ops.push(json!({"op": "add", "path": "/status/decidedAt", "value": now}));
    let patch: json_patch::Patch = match serde_json::from_value(serde_json::Value::Array(ops)) {
        Ok(p) => p,
        Err(e) => return ("error", response.deny(format!("toolgate: {e}"))),
    };
    match response.with_patch(patch) {
        Ok(r) => ("recorded", r),
        Err(e) => ("error", AdmissionResponse::from(request).deny(format!("toolgate: {e}"))),
    }
}

/// A denial with code 403 (Forbidden), like RBAC's.
fn forbidden(response: AdmissionResponse, message: String) -> AdmissionResponse {
    let mut response = response.deny(message);
    response.result.code = 403;
    response.result.reason = "Forbidden".into();
    response.result.status = Some(kube::core::response::StatusSummary::Failure);
    response
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
    fn requests_are_checked_field_by_field() {
        assert_eq!(check(&request()), Ok(()));
        let mut r = request();
        r.arguments_digest = "zz".into();
        assert!(check(&r).is_err_and(|e| e.starts_with("argumentsDigest")));
        let mut r = request();
        r.timeout_seconds = 0;
        assert!(check(&r).is_err_and(|e| e.starts_with("timeoutSeconds")));
        let mut r = request();
        r.tool = "x".repeat(300);
        assert!(check(&r).is_err_and(|e| e.starts_with("tool")));
    }

    #[test]
    fn service_accounts_decide_only_as_configured() {
        let mut d = Deciders::default();
        let bot = "system:serviceaccount:team-a:bot";
        assert!(d.refuses("alice@example.com", "team-a").is_none(), "people are not service accounts");
        assert!(d.refuses(bot, "team-a").is_some_and(|m| m.contains("impersonate")));
        assert!(d.refuses(bot, "team-b").is_none(), "another namespace's account");
        d.allowed.insert(Deciders::service_account_user("team-a/bot").expect("valid"));
        assert!(d.refuses(bot, "team-a").is_none(), "listed");
        d.service_accounts = ServiceAccountDeciders::None;
        assert!(d.refuses("system:serviceaccount:ops:approver", "team-a").is_some());
        assert!(d.refuses(bot, "team-a").is_none(), "listed");
        d.service_accounts = ServiceAccountDeciders::Any;
        assert!(d.refuses("system:serviceaccount:team-a:other", "team-a").is_none());
        for bad in ["bot", "/bot", "team-a/", "Team/bot", "a/b/c"] {
            assert!(Deciders::service_account_user(bad).is_err(), "{bad}");
        }
        assert_eq!("other-namespaces".parse(), Ok(ServiceAccountDeciders::OtherNamespaces));
        assert!("some".parse::<ServiceAccountDeciders>().is_err());
    }
}
