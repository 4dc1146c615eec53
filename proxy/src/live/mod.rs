//! The live policy (linkerd's "store"): one `watch` channel of [`Effective`] sets that the
//! `--policy` files ([`files`]) or the operator's stream (`crate::control`, through
//! [`set`]) write, and that
//! the gate reads per request, so a new policy applies to the next call, mid-connection.
//! Metrics follow what is live through [`enforced`].

use std::sync::Arc;

use tokio::sync::watch;
use toolgate_policy::{Caller, Policy};

use crate::telemetry::metrics::Metrics;

pub mod files;
pub mod set;

/// The receiving end of the live policy.
pub type PolicyRx = watch::Receiver<Arc<Effective>>;

/// Where the live documents came from (shown on `/policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `--policy` files.
    Files,
    /// The operator's policy stream (or the set persisted from it).
    Operator,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Files => "files",
            Source::Operator => "operator",
        }
    }
}

/// The policy the gate applies: enforcing and dry-run documents and their revision.
#[derive(Debug)]
pub struct Effective {
    /// Decides every call (empty: see [`Effective::decides_nothing`]).
    pub enforce: Policy,
    /// Evaluated and recorded, never enforced (empty when there are none).
    pub dry_run: Policy,
    /// The revision shown on `/policy`, in audit lines and metrics: the operator's
    /// `PolicySet` revision, or the files' content hash.
    pub revision: String,
    pub source: Source,
    header_names: Vec<String>,
}

impl Effective {
    /// The documents of `--policy` files (all enforced).
    pub fn files(policy: Policy) -> Self {
        let revision = policy.revision().to_owned();
        Self::new(policy, Policy::empty(), revision, Source::Files)
    }

    /// No document at all: every call is refused.
    pub fn none(source: Source) -> Self {
        Self::new(Policy::empty(), Policy::empty(), String::new(), source)
    }

    pub fn new(enforce: Policy, dry_run: Policy, revision: String, source: Source) -> Self {
        let mut header_names: Vec<String> =
            enforce.header_names().iter().chain(dry_run.header_names()).cloned().collect();
        header_names.sort();
        header_names.dedup();
        Self { enforce, dry_run, revision, source, header_names }
    }

    /// No document at all (neither enforcing nor dry-run): every call is refused and the
    /// proxy is not ready.
    pub fn is_empty(&self) -> bool {
        self.enforce.is_empty() && self.dry_run.is_empty()
    }

    /// Only dry-run documents: calls pass (they are being tried out), nothing is enforced.
    pub fn decides_nothing(&self) -> bool {
        self.enforce.is_empty() && !self.dry_run.is_empty()
    }

    /// Request headers that grants of any document match on.
    pub fn header_names(&self) -> &[String] {
        &self.header_names
    }

    /// Whether `tools/list` shows `tool`: the enforcing documents decide (with only
    /// dry-run documents everything is listed, since every call passes).
    pub fn lists_tool(&self, tool: &str, caller: &Caller) -> bool {
        if self.decides_nothing() { true } else { self.enforce.lists_tool(tool, caller) }
    }

    /// Every document with its mode (`enforce` or `dryRun`), enforcing ones first.
    pub fn documents(&self) -> impl Iterator<Item = (&str, &toolgate_policy::Document, &'static str)> {
        self.enforce
            .documents()
            .map(|(n, d)| (n, d, "enforce"))
            .chain(self.dry_run.documents().map(|(n, d)| (n, d, "dryRun")))
    }
}

/// Records `policy` as the one now enforced in the metrics (`toolgate_policy_info`,
/// `toolgate_policy_loaded`, and the tool names its documents name as label values).
///
/// Warns when a document asks for the shared counter store (`counters.store: shared`) and
/// this sidecar has none: its limited calls are refused (`store_unavailable`).
pub fn enforced(metrics: &Metrics, policy: &Effective) {
    if !metrics.store.is_shared() {
        let wanting: Vec<&str> = policy.enforce.wanting_shared_store().collect();
        if !wanting.is_empty() {
            tracing::warn!(
                policies = ?wanting,
                "these policies count their limits in the shared store (counters.store: shared) and this sidecar \
                 has none (--counter-store local): their limited calls are refused as store_unavailable"
            );
        }
    }
    metrics.policy_enforced(
        &policy.revision,
        !policy.is_empty(),
        policy.documents().flat_map(|(_, d, _)| {
            d.tools.keys().chain(d.grants.iter().flat_map(|g| g.tools.keys())).map(String::as_str)
        }),
    );
}
