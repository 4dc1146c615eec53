//! The index: what this replica knows from its informer caches, without the streams.
//! The caches of McpPolicies, pods (all of them, so that status can count the selected
//! pods without a sidecar) and McpApprovals; the validation of every policy generation
//! (cached per uid); which policies select which pod (the effective set a sidecar gets);
//! and which running pods left a policy's selection. Nothing here does I/O.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::{Value, json};
use toolgate_policy::crd::{McpApproval, McpPolicy, Mode};
use toolgate_policy::push::{PodRef, PolicySet, PushedPolicy};

use crate::inject::{InjectConfig, holds_injected_sidecar};

/// The document pushed for a policy that was never valid: deny everything it selects.
pub fn deny_all_document() -> Value {
    json!({"version": "1", "default": "deny"})
}

/// A policy generation that passed validation.
#[derive(Clone, Debug)]
pub struct Accepted {
    pub generation: i64,
    pub selector: Selector,
    pub dry_run: bool,
    pub document: Arc<Value>,
}

/// Why a policy generation is refused; the message names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("spec.selector: {0}")]
    Selector(String),
    #[error("spec: {0}")]
    Spec(String),
    /// The policy crate refused the document (`label` is its `metric_label()`).
    #[error("{message}")]
    Policy { label: &'static str, message: String },
}

impl Invalid {
    /// A stable, low-cardinality label.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Selector(_) => "selector",
            Self::Spec(_) => "spec",
            Self::Policy { label, .. } => label,
        }
    }
}

impl From<toolgate_policy::Error> for Invalid {
    fn from(e: toolgate_policy::Error) -> Self {
        Self::Policy { label: e.metric_label(), message: e.to_string() }
    }
}

/// Validates the `spec` of one generation with the policy crate.
pub fn validate(policy: &McpPolicy) -> Result<Accepted, Invalid> {
    let generation = policy.metadata.generation.unwrap_or(0);
    let selector = Selector::try_from(policy.spec.selector.clone()).map_err(|e| Invalid::Selector(e.to_string()))?;
    let value = serde_json::to_value(&policy.spec.policy).map_err(|e| Invalid::Spec(e.to_string()))?;
    let (doc, _) = toolgate_policy::document_from_value(value.clone())?;
    toolgate_policy::Policy::compile(vec![(policy.name_any(), doc)])?;
    Ok(Accepted { generation, selector, dry_run: policy.spec.mode == Mode::DryRun, document: Arc::new(value) })
}

/// The validation result of one McpPolicy, remembered per uid.
#[derive(Clone, Debug)]
struct Validation {
    generation: i64,
    /// `Err` when this generation is invalid.
    current: Result<Accepted, Invalid>,
    /// The newest generation that was valid (what sidecars keep enforcing).
    last_good: Option<Accepted>,
}

/// What the index knows about one McpPolicy.
#[derive(Clone, Debug)]
pub struct PolicyView {
    /// The generation the sidecars get (current if valid, else the last valid one).
    pub pushed: Option<Accepted>,
    /// Why the current generation is refused.
    pub error: Option<Invalid>,
    /// The selector used to pick targets: the pushed one, or the current one when the
    /// policy never was valid (its targets then get deny-all).
    pub selector: Option<Selector>,
}

/// The namespaces an operator governs (`--namespace-selector`); without one, all.
#[derive(Clone)]
#[allow(missing_debug_implementations)]
pub struct Scope {
    pub namespaces: Store<Namespace>,
    pub selector: Selector,
}

#[derive(Debug, Default)]
struct Selection {
    selected: BTreeMap<String, String>,
    departed: BTreeMap<String, String>,
}

/// The caches and what is derived from them (see the module docs).
pub struct Index {
    pub policies: Store<McpPolicy>,
    pub pods: Store<Pod>,
    pub approvals: Store<McpApproval>,
    validations: Mutex<HashMap<String, Validation>>,
    scope: Option<Scope>,
    /// The sidecar the webhook injects: what a pod must hold to count as protected.
    sidecar: InjectConfig,
    /// Per policy uid: the pods (uid -> name) it selected when last computed, and the pods
    /// that left its selection while still running (uid -> name), for status and metrics.
    selections: Mutex<HashMap<String, Selection>>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index").finish_non_exhaustive()
    }
}

impl Index {
    pub fn new(
        policies: Store<McpPolicy>,
        pods: Store<Pod>,
        approvals: Store<McpApproval>,
        scope: Option<Scope>,
        sidecar: InjectConfig,
    ) -> Self {
        Self { policies, pods, approvals, validations: Mutex::default(), scope, sidecar, selections: Mutex::default() }
    }

    /// Whether this operator governs `namespace` (its policies, pods and streams).
    pub fn governs(&self, namespace: &str) -> bool {
        match &self.scope {
            None => true,
            Some(scope) => {
                scope.namespaces.get(&ObjectRef::new(namespace)).is_some_and(|ns| scope.selector.matches(ns.labels()))
            }
        }
    }

    /// Validation (cached per uid and generation) and what is pushed for `policy`.
    pub fn view(&self, policy: &McpPolicy) -> PolicyView {
        let uid = policy.uid().unwrap_or_default();
        let generation = policy.metadata.generation.unwrap_or(0);
        let mut map = self.validations.lock().expect("validations lock");
        let entry = match map.get_mut(&uid) {
            Some(v) if v.generation == generation => v,
            _ => {
                let previous_good = map.remove(&uid).and_then(|v| v.last_good);
                let current = validate(policy);
                let last_good = match &current {
                    Ok(a) => Some(a.clone()),
                    Err(_) => previous_good,
                };
                map.entry(uid).or_insert(Validation { generation, current, last_good })
            }
        };
        let pushed = entry.current.as_ref().ok().cloned().or_else(|| entry.last_good.clone());
        let error = entry.current.as_ref().err().cloned();
        let selector = match &pushed {
            Some(a) => Some(a.selector.clone()),
            None => Selector::try_from(policy.spec.selector.clone()).ok(),
        };
        PolicyView { pushed, error, selector }
    }

    /// Forgets validations of policies that no longer exist; returns the (namespace,
    /// name) of those that do.
    pub fn prune(&self) -> HashSet<(String, String)> {
        let state = self.policies.state();
        let live: HashSet<String> = state.iter().filter_map(|p| p.uid()).collect();
        self.validations.lock().expect("validations lock").retain(|uid, _| live.contains(uid));
        self.selections.lock().expect("selections lock").retain(|uid, _| live.contains(uid));
        state.iter().map(|p| (p.namespace().unwrap_or_default(), p.name_any())).collect()
    }

    /// The effective policy set of a pod: every McpPolicy of its namespace whose selector
    /// matches its labels, ordered by name.
    pub fn effective_set(&self, pod: &Pod) -> PolicySet {
        let namespace = pod.namespace().unwrap_or_default();
        let labels = pod.labels();
        let mut selected: Vec<(String, PushedPolicy)> = Vec::new();
        for policy in self.policies.state() {
            if policy.namespace().as_deref() != Some(namespace.as_str()) {
                continue;
            }
            let view = self.view(&policy);
            let Some(selector) = &view.selector else { continue };
            if !selector.matches(labels) {
                continue;
            }
            let name = policy.name_any();
            let uid = policy.uid().unwrap_or_default();
            let pushed = match view.pushed {
                Some(a) => PushedPolicy {
                    name: name.clone(),
                    uid,
                    generation: a.generation,
                    dry_run: a.dry_run,
                    document: (*a.document).clone(),
                },
                None => PushedPolicy {
                    name: name.clone(),
                    uid,
                    generation: policy.metadata.generation.unwrap_or(0),
                    dry_run: false,
                    document: deny_all_document(),
                },
            };
            selected.push((name, pushed));
        }
        selected.sort_by(|a, b| a.0.cmp(&b.0));
        PolicySet::new(PodRef { namespace, name: pod.name_any() }, selected.into_iter().map(|(_, p)| p).collect())
    }

    /// Pods of the policy's namespace that it selects (running or pending, not deleted).
    pub fn targets(&self, policy: &McpPolicy, view: &PolicyView) -> Vec<Arc<Pod>> {
        let Some(selector) = &view.selector else { return Vec::new() };
        let namespace = policy.namespace();
        self.pods.state_filter(|pod| {
            pod.namespace() == namespace
                && pod.metadata.deletion_timestamp.is_none()
                && !matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded") | Some("Failed"))
                && selector.matches(pod.labels())
        })
    }

    /// Whether `pod` holds the sidecar as the webhook injects it (and so can enforce).
    pub fn protected(&self, pod: &Pod) -> bool {
        holds_injected_sidecar(pod, &self.sidecar)
    }

    /// Records the current `targets` of `policy` and returns the pods that left its
    /// selection while still existing (relabelled away, or the selector changed), oldest
    /// first, and how many of them left since the previous call.
    pub fn departures(&self, policy: &McpPolicy, targets: &[Arc<Pod>]) -> (Vec<String>, usize) {
        let uid = policy.uid().unwrap_or_default();
        let now: BTreeMap<String, String> =
            targets.iter().map(|p| (p.uid().unwrap_or_default(), p.name_any())).collect();
        let namespace = policy.namespace();
        let alive = |pod_uid: &str, name: &str| {
            self.pods.get(&ObjectRef::new(name).within(namespace.as_deref().unwrap_or_default())).is_some_and(|p| {
                p.uid().as_deref() == Some(pod_uid)
                    && p.metadata.deletion_timestamp.is_none()
                    && !matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded") | Some("Failed"))
            })
        };
        let mut selections = self.selections.lock().expect("selections lock");
        let entry = selections.entry(uid).or_default();
        let mut fresh = 0;
        for (pod_uid, name) in &entry.selected {
            if !now.contains_key(pod_uid) && alive(pod_uid, name) && !entry.departed.contains_key(pod_uid) {
                entry.departed.insert(pod_uid.clone(), name.clone());
                fresh += 1;
            }
        }
        // Back in the selection, or gone: no longer reported.
        entry.departed.retain(|pod_uid, name| !now.contains_key(pod_uid) && alive(pod_uid, name));
        entry.selected = now;
        let mut names: Vec<String> = entry.departed.values().cloned().collect();
        names.sort();
        (names, fresh)
    }
}
