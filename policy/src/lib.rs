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
mod store;
mod strict;

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

pub use compile::{bounds, parse_duration};
pub use document::{
    Action, AllTools, ApprovalSettings, Condition, CounterSettings, DefaultAction, DenialStyle, Document, Grant,
    GrantMatch, HeaderMatch, Limit, OnStoreFailure, Op, Scope, StoreKind, ToolRule, Window,
};
pub use error::{Error, Problem, Result};
pub use eval::{Call, Caller, Decision, DecisionKind, Principal};
pub use limiter::{CounterKey, Demand, Limiter, Refusal, Reservation};
pub use parse::{MAX_DOCUMENT_BYTES, SourceFormat, document_from_value, parse_document, parse_document_with_format};
pub use store::{ApprovalMemory, CounterStore, Hold, LocalOnly, RememberedApproval, StoreRefusal};
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

    /// Names this set's documents `<namespace>/<name>` in counter keys (not in decisions
    /// or metrics): the McpPolicies of a sidecar in `namespace`. Two namespaces with an
    /// McpPolicy of the same name then never share a counter (or an approval reused
    /// through the shared store).
    #[must_use]
    pub fn with_counter_namespace(mut self, namespace: &str) -> Self {
        for d in &mut self.docs {
            d.counter_id = format!("{namespace}/{}", d.name).into();
        }
        self
    }

    /// The identity of document `name` in shared keys (counters, remembered approvals):
    /// its name, or `<namespace>/<name>` after [`Self::with_counter_namespace`].
    pub fn counter_id(&self, name: &str) -> Option<&str> {
        self.docs.iter().find(|d| &*d.name == name).map(|d| &*d.counter_id)
    }

    /// Names of the documents that ask for the shared counter store (`counters.store:
    /// shared`): on a sidecar without one, their limited calls are refused.
    pub fn wanting_shared_store(&self) -> impl Iterator<Item = &str> {
        self.docs.iter().filter(|d| d.counters.store == Some(StoreKind::Shared)).map(|d| &*d.name)
    }

    /// Decides one call and, when allowed, reserves its limits at `now` in `store` (a
    /// [`Limiter`], or any other [`CounterStore`]). A call without limits never reaches
    /// the store.
    pub fn decide(&self, store: &dyn CounterStore, call: &Call<'_>, now: Duration) -> Decision {
        eval::decide(&self.docs, store, call, now)
    }

    /// Whether `tools/list` shows `tool` to `caller`.
    pub fn lists_tool(&self, tool: &str, caller: &Caller) -> bool {
        eval::lists_tool(&self.docs, tool, caller)
    }
}

/// The identity toolgate derives from a credential (an `Authorization` header value):
/// `sha256:<hex>` of its [`canonical_credential`] form, so every spelling of one
/// credential (`bearer T`, `BEARER  T`, ` Bearer T `) is one caller. The credential itself
/// is never stored or logged.
pub fn fingerprint(credential: &str) -> String {
    fingerprint_bytes(credential.as_bytes())
}

/// [`fingerprint`] of a header value that need not be UTF-8 (its bytes are taken as they
/// are; only ASCII letters of the scheme and spaces/tabs around it are normalised).
pub fn fingerprint_bytes(credential: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(canonical_credential(credential))))
}

/// The canonical spelling of an `Authorization` header value, which [`fingerprint`] hashes.
///
/// The auth scheme is case-insensitive and is separated from the credentials by spaces
/// (RFC 9110 §11.1, §11.4); the credentials themselves (a token68 or auth-params) are
/// case-sensitive. So:
///
/// - spaces and tabs before and after the value are dropped;
/// - a value of the form `scheme 1*(SP / HTAB) credentials`, where `scheme` is an HTTP
///   `token`, becomes the scheme with its first letter upper-case and the rest lower-case
///   (`Bearer`, `Basic`, `Digest`, `Dpop`), one space, and the credentials as written;
/// - anything else (a lone token such as a bare API key, whose case matters; a value
///   whose first word is not a token) is kept as written.
///
/// The capitalised scheme keeps the fingerprints of the usual spellings `Bearer T` and
/// `Basic T` what they were before spellings were merged. Bytes that are not ASCII are
/// never changed, so any input, UTF-8 or not, has exactly one canonical form.
pub fn canonical_credential(value: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    use std::borrow::Cow;
    let is_ws = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !is_ws(b)).unwrap_or(value.len());
    let end = value.iter().rposition(|b| !is_ws(b)).map_or(start, |i| i + 1);
    let trimmed = &value[start..end];
    let Some(gap) = trimmed.iter().position(is_ws) else {
        return Cow::Borrowed(trimmed);
    };
    let scheme = &trimmed[..gap];
    if !scheme.iter().all(|&b| is_tchar(b)) {
        return Cow::Borrowed(trimmed);
    }
    let rest = &trimmed[gap..];
    let credentials = &rest[rest.iter().position(|b| !is_ws(b)).unwrap_or(rest.len())..];
    let canonical_scheme =
        scheme.iter().enumerate().all(|(i, b)| if i == 0 { !b.is_ascii_lowercase() } else { !b.is_ascii_uppercase() });
    if canonical_scheme && gap + 1 + credentials.len() == trimmed.len() && trimmed[gap] == b' ' {
        return Cow::Borrowed(trimmed);
    }
    let mut out = Vec::with_capacity(scheme.len() + 1 + credentials.len());
    for (i, b) in scheme.iter().enumerate() {
        out.push(if i == 0 { b.to_ascii_uppercase() } else { b.to_ascii_lowercase() });
    }
    out.push(b' ');
    out.extend_from_slice(credentials);
    Cow::Owned(out)
}

/// RFC 9110 `tchar`: the characters of a token (an auth scheme is one).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(s: &str) -> String {
        String::from_utf8(canonical_credential(s.as_bytes()).into_owned()).unwrap_or_default()
    }

    #[test]
    fn one_credential_many_spellings() {
        for spelling in [
            "Bearer T-x_Y.z~+/=",
            "bearer T-x_Y.z~+/=",
            "BEARER T-x_Y.z~+/=",
            "BeArEr T-x_Y.z~+/=",
            " Bearer   T-x_Y.z~+/= ",
            "\tBearer\tT-x_Y.z~+/=\t",
            "Bearer \t \tT-x_Y.z~+/=",
        ] {
            assert_eq!(canon(spelling), "Bearer T-x_Y.z~+/=", "{spelling:?}");
            assert_eq!(fingerprint(spelling), fingerprint("Bearer T-x_Y.z~+/="), "{spelling:?}");
        }
        assert_eq!(canon("basic dXNlcjpwYXNz"), "Basic dXNlcjpwYXNz");
        assert_eq!(canon("DPoP abc"), "Dpop abc");
        assert_eq!(canon("digest a=\"b\",  c=d "), "Digest a=\"b\",  c=d");
    }

    #[test]
    fn credentials_keep_their_case_and_different_credentials_differ() {
        assert_ne!(fingerprint("Bearer abc"), fingerprint("Bearer ABC"));
        assert_ne!(fingerprint("Bearer abc"), fingerprint("Basic abc"));
        assert_ne!(fingerprint("Bearer abc"), fingerprint("Bearer abcd"));
        // A lone token (a bare API key) is the credential: its case is kept.
        assert_eq!(canon("  sk-AbC  "), "sk-AbC");
        assert_ne!(fingerprint("sk-AbC"), fingerprint("sk-abc"));
        // The first word is not a token: nothing to normalise but the ends.
        assert_eq!(canon(" é T "), "é T");
        assert_eq!(canon("a\"b T"), "a\"b T");
        assert_eq!(canon(""), "");
        assert_eq!(canon(" \t "), "");
    }

    #[test]
    fn the_usual_spelling_keeps_its_fingerprint() {
        // Pinned: fingerprints users put into grants before spellings were merged.
        assert_eq!(
            fingerprint("Bearer bench-token"),
            "sha256:2266689a4bad04fcdf44edb46a3b4b6b1a16875737397a49d27c49e1629be133"
        );
        assert!(matches!(canonical_credential(b"Bearer bench-token"), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn any_bytes_have_one_canonical_form() {
        let odd: &[&[u8]] = &[b"\xff\xfe", b"bearer \xff", b"\x80 x", b" \t\xc3", b"B\x00 x"];
        for v in odd {
            let c = canonical_credential(v).into_owned();
            assert_eq!(canonical_credential(&c), c, "{v:?}");
            assert_eq!(fingerprint_bytes(v), fingerprint_bytes(&c));
        }
        assert_eq!(&*canonical_credential(b"bearer \xff"), b"Bearer \xff");
        assert_ne!(fingerprint_bytes(b"Bearer \xff"), fingerprint_bytes(b"Bearer \xfe"));
    }
}
