//! toolgate's policy core: the document type, parsing of every accepted format,
//! validation with precise paths, compilation, evaluation and rate-limiting state.
//!
//! Pure: no async runtime, no I/O, no Kubernetes client. The proxy, operator and CLI
//! are shells around this crate.
//!
//! ```
//! use toolgate_policy::{Caller, Call, Limiter, Policy, DecisionKind};
//! use std::time::Duration;
//!
//! let doc = toolgate_policy::parse_document(
//!     r#"{"version":"1","default":"deny","tools":{"start-pod":{"limits":[{"counter":"start-pod_rate","window":"minute","max":10,"scope":"grant"}]}}}"#,
//! ).unwrap();
//! let policy = Policy::compile(vec![("seed".into(), doc)]).unwrap();
//! let limiter = Limiter::default();
//! let caller = Caller { identity: toolgate_policy::fingerprint("Bearer abc"), ..Caller::default() };
//! let args = serde_json::json!({"podId": "p1"});
//! let call = Call { tool: "start-pod", arguments: &args, caller: &caller };
//! for _ in 0..10 {
//!     assert_eq!(policy.decide(&limiter, &call, Duration::ZERO).kind, DecisionKind::Allow);
//! }
//! assert_eq!(policy.decide(&limiter, &call, Duration::ZERO).kind, DecisionKind::RateLimited);
//! let delete = Call { tool: "delete-pod", ..call };
//! assert_eq!(policy.decide(&limiter, &delete, Duration::ZERO).kind, DecisionKind::Deny);
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod compile;
#[cfg(feature = "crd")]
pub mod crd;
mod document;
mod error;
mod eval;
mod limiter;
mod parse;
pub mod push;
mod strict;

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

pub use compile::{bounds, parse_duration};
pub use document::{
    Action, AllTools, ApprovalSettings, Condition, DefaultAction, DenialStyle, Document, Grant, GrantMatch,
    HeaderMatch, Limit, Op, Scope, ToolRule, Window,
};
pub use error::{Error, Problem, Result};
pub use eval::{Call, Caller, Decision, DecisionKind};
pub use limiter::{CounterKey, Demand, Limiter, Refusal, Reservation};
pub use parse::{MAX_DOCUMENT_BYTES, SourceFormat, document_from_value, parse_document, parse_document_with_format};
pub use strict::{StrictValue, from_slice_strict};

/// A set of compiled documents that all apply together: a call passes only if every
/// document passes it; hides are the union; every limit applies; approval if any
/// document requires it.
#[derive(Debug)]
pub struct Policy {
    docs: Vec<compile::CompiledDoc>,
    revision: String,
    header_names: Vec<String>,
}

impl Policy {
    /// Validates and compiles named documents. With several documents, problem paths
    /// are prefixed with the document name (`name: tools.x.action`).
    pub fn compile(docs: Vec<(String, Document)>) -> Result<Self> {
        let mut compiled = Vec::with_capacity(docs.len());
        let mut problems = Vec::new();
        let several = docs.len() > 1;
        for (name, doc) in &docs {
            let mut mine = Vec::new();
            if let Some(c) = compile::compile_document(name, doc, &mut mine) {
                compiled.push(c);
            }
            if several {
                for p in &mut mine {
                    p.path = if p.path.is_empty() { name.clone() } else { format!("{name}: {}", p.path) };
                }
            }
            problems.extend(mine);
        }
        if !problems.is_empty() {
            return Err(Error::Invalid(problems));
        }
        let mut header_names: Vec<String> = compiled
            .iter()
            .flat_map(|d| d.grants.iter().filter_map(|g| g.header.as_ref().map(|(n, _)| n.clone())))
            .collect();
        header_names.sort();
        header_names.dedup();
        let canonical = serde_json::to_vec(&docs).unwrap_or_default();
        let digest = Sha256::digest(&canonical);
        let revision = hex(&digest[..6]);
        Ok(Self { docs: compiled, revision, header_names })
    }

    /// Parses and compiles one text (YAML or JSON, native or Intercept).
    pub fn from_text(name: &str, text: &str) -> Result<Self> {
        Self::compile(vec![(name.to_owned(), parse_document(text)?)])
    }

    /// A policy with no documents: every call is refused (fail closed).
    pub fn empty() -> Self {
        Self { docs: Vec::new(), revision: String::new(), header_names: Vec::new() }
    }

    /// Whether no document is loaded.
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// A short content hash of the documents (12 hex digits), empty when none.
    pub fn revision(&self) -> &str {
        &self.revision
    }

    /// Names of the documents, in evaluation order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.docs.iter().map(|d| &*d.name)
    }

    /// The documents as loaded (after format conversion), for `/policy` and the CLI.
    pub fn documents(&self) -> impl Iterator<Item = (&str, &Document)> {
        self.docs.iter().map(|d| (&*d.name, &d.source))
    }

    /// Lower-case names of the request headers that grants match on; the proxy puts
    /// these (and only these) into [`Caller::headers`].
    pub fn header_names(&self) -> &[String] {
        &self.header_names
    }

    /// Decides one call and, when allowed, reserves its limits at `now`.
    pub fn decide(&self, limiter: &Limiter, call: &Call<'_>, now: Duration) -> Decision {
        eval::decide(&self.docs, limiter, call, now)
    }

    /// Whether `tools/list` shows `tool` to `caller`.
    pub fn lists_tool(&self, tool: &str, caller: &Caller) -> bool {
        eval::lists_tool(&self.docs, tool, caller)
    }
}

/// The identity toolgate derives from a credential: `sha256:<hex>` of the exact
/// `Authorization` header value. The credential itself is never stored or logged.
pub fn fingerprint(credential: &str) -> String {
    format!("sha256:{}", hex(&Sha256::digest(credential.as_bytes())))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Keeps `Arc` in the public signature of [`Decision`] fields nameable.
pub type Name = Arc<str>;
