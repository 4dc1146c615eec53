//! The `/approval` admission decision, pure: who may create McpApprovals (only the
//! operator) and who may decide them ([`Deciders`]); a decision records the
//! authenticated user. The HTTP side is in the parent module.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use toolgate_policy::crd::{ApprovalPhase, McpApproval};

use crate::push::index::Index;

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
    index: &Index,
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
        if !index.governs(request.namespace.as_deref().unwrap_or_default()) {
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
    let pod_sa = index
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
