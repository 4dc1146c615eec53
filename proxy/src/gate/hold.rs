//! A call held for a person's approval, and what the gate needs from whoever asks that
//! person ([`Approver`], implemented by `crate::approval::Approvals`). The approver never
//! sees the gate: it returns an [`Outcome`], and the gate finishes the call.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde_json::Value;
use toolgate_policy::{Call, Caller, Decision, Reservation};

/// A `tools/call` with owned parts (a held call outlives its request's body).
#[derive(Clone, Debug)]
pub struct OwnedCall {
    pub tool: String,
    pub arguments: Value,
    pub caller: Caller,
}

impl OwnedCall {
    pub fn as_call(&self) -> Call<'_> {
        Call { tool: &self.tool, arguments: &self.arguments, caller: &self.caller }
    }
}

/// A call held for approval: the decision and what finishing it needs.
#[derive(Debug)]
pub struct Hold {
    pub approvals: Arc<dyn Approver>,
    pub id: Value,
    pub call: OwnedCall,
    /// Kind `Approval`; its limits are reserved once approved.
    pub decision: Decision,
    /// Units of the dry-run documents, held with the call.
    pub(super) dry_run: Option<Reservation>,
    /// Of the policy that decided.
    pub revision: String,
    /// [`crate::mcp::canonical::arguments_sha256_hex`] of the arguments.
    pub digest: String,
    pub started: Instant,
}

/// How the wait for a decision ended.
#[derive(Debug)]
pub enum Outcome {
    Approved {
        name: String,
        decided_by: Option<String>,
        reason: Option<String>,
    },
    /// Not forwarded: the answer says why.
    Refused(super::refusal::Refusal),
}

/// Who asks a person about held calls.
pub trait Approver: Debug + Send + Sync {
    /// An approval that covers this call now (`reuse_for`), if any.
    fn reusable(&self, key: &ReuseKey) -> Option<Reusable>;
    /// Remembers an approval for identical calls during `window`.
    fn remember(&self, key: ReuseKey, name: &str, decided_by: Option<&str>, window: Duration);
    /// `notifications/cancelled` from `caller` for request `id` (its JSON text): ends the
    /// wait of that held call, if there is one.
    fn cancel(&self, caller: &Caller, id: &str);
    /// Asks about `hold` and waits for the decision (or a timeout, or the client leaving).
    fn wait(self: Arc<Self>, hold: &Hold) -> BoxFuture<'static, Outcome>;
}

/// Who decides calls held for approval.
#[derive(Debug)]
pub enum Approvers {
    /// The operator (sidecar mode over HTTP): such calls are held until decided.
    Operator(Arc<dyn Approver>),
    /// Nobody: such calls are refused with `-32012`, saying why (this text).
    Unavailable(&'static str),
}

/// What an approval given once covers with `reuse_for`: the same tool, canonical
/// arguments, grant and caller, decided by the same rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ReuseKey {
    policy: String,
    rule: String,
    tool: String,
    grant: Option<String>,
    identity: String,
    digest: String,
}

impl ReuseKey {
    pub fn new(
        hold_policy: Option<&str>,
        rule: Option<&str>,
        tool: &str,
        grant: Option<&str>,
        identity: &str,
        digest: &str,
    ) -> Self {
        Self {
            policy: hold_policy.unwrap_or("").to_owned(),
            rule: rule.unwrap_or("").to_owned(),
            tool: tool.to_owned(),
            grant: grant.map(str::to_owned),
            identity: identity.to_owned(),
            digest: digest.to_owned(),
        }
    }
}

impl ReuseKey {
    /// The key's identity in a store shared by replicas: SHA-256 (hex) over its
    /// length-prefixed parts, so no field's text can run into another's.
    pub fn shared_id(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let grant = self.grant.as_deref().map_or_else(|| "0".to_owned(), |g| format!("1{g}"));
        for part in [&self.policy, &self.rule, &self.tool, &grant, &self.identity, &self.digest] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// An approval that still covers identical calls.
#[derive(Clone, Debug)]
pub struct Reusable {
    pub name: String,
    pub decided_by: Option<String>,
    pub until: Instant,
}
