//! The operator's shared view: the informer caches of McpPolicies and pods (all of them,
//! so that status can count the selected pods without a sidecar), the validated policies,
//! the connected sidecar streams (at most one per pod) and what each acknowledged.
//!
//! Every replica has one [`Hub`]; it serves the streams of the sidecars connected to it
//! from its own caches. Status (`targets`, `enforcing`, `unprotected`, conditions) is
//! computed here and written by the leader's controller.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use toolgate_policy::crd::{ApprovalPhase, McpApproval, McpPolicy, Mode};
use toolgate_policy::push::{ApprovalUpdate, PodRef, PolicySet, PushedPolicy};

use crate::inject::{InjectConfig, holds_injected_sidecar};
use crate::metrics::Metrics;

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

/// The validation result of one McpPolicy, remembered per uid.
#[derive(Clone, Debug)]
struct Validation {
    generation: i64,
    /// `Err(message naming the field)` when this generation is invalid.
    current: Result<Accepted, String>,
    /// The newest generation that was valid (what sidecars keep enforcing).
    last_good: Option<Accepted>,
}

/// What the hub knows about one McpPolicy.
#[derive(Clone, Debug)]
pub struct PolicyView {
    /// The generation the sidecars get (current if valid, else the last valid one).
    pub pushed: Option<Accepted>,
    /// Why the current generation is refused.
    pub error: Option<String>,
    /// The selector used to pick targets: the pushed one, or the current one when the
    /// policy never was valid (its targets then get deny-all).
    pub selector: Option<Selector>,
}

/// Validates the `spec` of one generation with the policy crate.
pub fn validate(policy: &McpPolicy) -> Result<Accepted, String> {
    let generation = policy.metadata.generation.unwrap_or(0);
    let selector = Selector::try_from(policy.spec.selector.clone()).map_err(|e| format!("spec.selector: {e}"))?;
    let value = serde_json::to_value(&policy.spec.policy).map_err(|e| format!("spec: {e}"))?;
    let (doc, _) = toolgate_policy::document_from_value(value.clone()).map_err(|e| e.to_string())?;
    toolgate_policy::Policy::compile(vec![(policy.name_any(), doc)]).map_err(|e| e.to_string())?;
    Ok(Accepted { generation, selector, dry_run: policy.spec.mode == Mode::DryRun, document: Arc::new(value) })
}

type Enforced = Vec<(String, i64)>;

/// Acknowledgements by `policy-uid/generation`, as pod uids (what replicas exchange).
pub type AckReport = BTreeMap<String, std::collections::BTreeSet<String>>;

/// Prefix of the [`AckReport`] keys that carry, per pod uid, the sidecar instance whose
/// stream a replica holds (`stream/<pod uid>` -> {instance}).
pub const STREAM_KEY: &str = "stream/";

/// The key of a policy generation in an [`AckReport`].
pub fn ack_key(uid: &str, generation: i64) -> String {
    format!("{uid}/{generation}")
}

struct Slot {
    id: u64,
    namespace: String,
    name: String,
    tx: watch::Sender<Arc<PolicySet>>,
    /// Recently sent revisions and the (policy uid, generation) pairs they hold.
    sent: VecDeque<(String, Enforced, Instant)>,
    /// What the sidecar acknowledged last.
    acked: Option<Enforced>,
    /// The sidecar process (`toolgate-instance` header).
    instance: String,
    approvals: tokio::sync::mpsc::UnboundedSender<ApprovalUpdate>,
    /// (approval name, phase) already sent on this stream.
    delivered: std::collections::HashSet<(String, &'static str)>,
}

const SENT_KEPT: usize = 16;

/// Shared state of one operator replica.
pub struct Hub {
    pub policies: Store<McpPolicy>,
    pub pods: Store<Pod>,
    pub approvals: Store<McpApproval>,
    validations: Mutex<HashMap<String, Validation>>,
    slots: Mutex<HashMap<String, Slot>>,
    /// Acknowledgements of sidecars connected to other replicas (leader only).
    remote: Mutex<AckReport>,
    next_id: AtomicU64,
    /// Woken whenever a cache changes; the pusher recomputes every stream's set.
    pub changed: Notify,
    /// Policies whose status may have changed (acks, disconnects), for the controller.
    status_tx: tokio::sync::mpsc::UnboundedSender<ObjectRef<McpPolicy>>,
    pub metrics: Arc<Metrics>,
    scope: Option<Scope>,
    /// The sidecar the webhook injects: what a pod must hold to count as protected.
    sidecar: InjectConfig,
    /// Per policy uid: the pods (uid -> name) it selected when last computed, and the pods
    /// that left its selection while still running (uid -> name), for status and metrics.
    selections: Mutex<HashMap<String, Selection>>,
}

#[derive(Debug, Default)]
struct Selection {
    selected: BTreeMap<String, String>,
    departed: BTreeMap<String, String>,
}

/// The namespaces an operator governs (`--namespace-selector`); without one, all.
#[derive(Clone)]
#[allow(missing_debug_implementations)]
pub struct Scope {
    pub namespaces: Store<k8s_openapi::api::core::v1::Namespace>,
    pub selector: Selector,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

/// What [`Hub::register`] hands a stream: its guard, its policy sets and its approval
/// decisions.
pub type Registered =
    (StreamGuard, watch::Receiver<Arc<PolicySet>>, tokio::sync::mpsc::UnboundedReceiver<ApprovalUpdate>);

/// A registered sidecar stream; unregisters itself when dropped.
#[derive(Debug)]
pub struct StreamGuard {
    hub: Arc<Hub>,
    pod_uid: String,
    id: u64,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.hub.unregister(&self.pod_uid, self.id);
    }
}

impl Hub {
    pub fn new(
        policies: Store<McpPolicy>,
        pods: Store<Pod>,
        approvals: Store<McpApproval>,
        metrics: Arc<Metrics>,
        scope: Option<Scope>,
        sidecar: InjectConfig,
    ) -> (Arc<Self>, tokio::sync::mpsc::UnboundedReceiver<ObjectRef<McpPolicy>>) {
        let (status_tx, status_rx) = tokio::sync::mpsc::unbounded_channel();
        let hub = Self {
            policies,
            pods,
            approvals,
            validations: Mutex::default(),
            slots: Mutex::default(),
            remote: Mutex::default(),
            next_id: AtomicU64::new(1),
            changed: Notify::new(),
            status_tx,
            metrics,
            scope,
            sidecar,
            selections: Mutex::default(),
        };
        (Arc::new(hub), status_rx)
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

    /// Forgets validations and per-policy metrics of policies that no longer exist.
    pub fn prune(&self) {
        let state = self.policies.state();
        let live: std::collections::HashSet<String> = state.iter().filter_map(|p| p.uid()).collect();
        self.validations.lock().expect("validations lock").retain(|uid, _| live.contains(uid));
        self.selections.lock().expect("selections lock").retain(|uid, _| live.contains(uid));
        let names = state.iter().map(|p| (p.namespace().unwrap_or_default(), p.name_any())).collect();
        self.metrics.retain_policies(&names);
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

    /// How many of `targets` have a connected sidecar that acknowledged `generation` of
    /// the policy `uid`.
    pub fn enforcing(&self, uid: &str, generation: i64, targets: &[Arc<Pod>]) -> usize {
        let slots = self.slots.lock().expect("slots lock");
        let key = ack_key(uid, generation);
        let remote = self.remote.lock().expect("remote lock");
        let remote = remote.get(&key);
        targets
            .iter()
            .filter_map(|p| p.uid())
            .filter(|pod_uid| {
                slots
                    .get(pod_uid)
                    .and_then(|s| s.acked.as_ref())
                    .is_some_and(|acked| acked.iter().any(|(u, g)| u == uid && *g == generation))
                    || remote.is_some_and(|r| r.contains(pod_uid))
            })
            .count()
    }

    /// What the sidecars connected here acknowledged: `uid/generation` -> pod uids.
    pub fn local_acks(&self) -> AckReport {
        let slots = self.slots.lock().expect("slots lock");
        let mut report = AckReport::new();
        for (pod_uid, slot) in slots.iter() {
            for (uid, generation) in slot.acked.iter().flatten() {
                report.entry(ack_key(uid, *generation)).or_default().insert(pod_uid.clone());
            }
            report.entry(format!("{STREAM_KEY}{pod_uid}")).or_default().insert(slot.instance.clone());
        }
        report
    }

    /// The sidecar instances of a pod whose streams are alive: on this replica, and (on
    /// the leader) on the others, as their fresh reports say.
    pub fn instances(&self, pod_uid: &str) -> std::collections::BTreeSet<String> {
        let mut instances: std::collections::BTreeSet<String> =
            self.slots.lock().expect("slots lock").get(pod_uid).map(|s| s.instance.clone()).into_iter().collect();
        if let Some(remote) = self.remote.lock().expect("remote lock").get(&format!("{STREAM_KEY}{pod_uid}")) {
            instances.extend(remote.iter().cloned());
        }
        instances
    }

    /// Installs what the other replicas reported; asks for status reconciles of every
    /// policy when it changed.
    pub fn set_remote(&self, report: AckReport) {
        let changed = {
            let mut remote = self.remote.lock().expect("remote lock");
            let changed = *remote != report;
            *remote = report;
            changed
        };
        if changed {
            for p in self.policies.state() {
                let _ = self.status_tx.send(ObjectRef::from_obj(&*p));
            }
        }
    }

    /// Registers the stream of a pod's sidecar and returns the receiver of its policy
    /// sets, starting with the current one; `Err(instance)` with the instance holding it
    /// when the pod already has a stream here. A stream is never replaced: the first one
    /// stays until its connection closes or stops answering keepalive pings (then its
    /// guard unregisters it), so a second stream, e.g. opened with a token minted for the
    /// pod, cannot evict the sidecar's own or abandon its held calls.
    pub fn register(self: &Arc<Self>, pod: &Pod, instance: &str) -> Result<Registered, String> {
        let pod_uid = pod.uid().unwrap_or_default();
        if let Some(held) = self.slots.lock().expect("slots lock").get(&pod_uid) {
            return Err(held.instance.clone());
        }
        let set = Arc::new(self.effective_set(pod));
        let (tx, rx) = watch::channel(set.clone());
        let (approvals, approvals_rx) = tokio::sync::mpsc::unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Slot {
            id,
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            tx,
            sent: VecDeque::from([(set.revision.clone(), enforced(&set), Instant::now())]),
            acked: None,
            instance: instance.to_owned(),
            approvals,
            delivered: Default::default(),
        };
        let connected = {
            let mut slots = self.slots.lock().expect("slots lock");
            // Checked again under the lock: two streams may have raced past the first check.
            if let Some(held) = slots.get(&pod_uid) {
                return Err(held.instance.clone());
            }
            slots.insert(pod_uid.clone(), slot);
            slots.len()
        };
        self.metrics.sidecars_connected(connected);
        self.push_approvals();
        Ok((StreamGuard { hub: self.clone(), pod_uid, id }, rx, approvals_rx))
    }

    /// Sends every decided approval to the stream of the sidecar instance that holds
    /// its call, once per phase. A decision counts only where the operator created the
    /// approval: in the pod's namespace, for the pod's name and uid (a copy in another
    /// namespace names the same pod uid but is not the held call's approval).
    pub fn push_approvals(&self) {
        let decided: Vec<Arc<McpApproval>> = self
            .approvals
            .state_filter(|a| a.status.as_ref().and_then(|s| s.phase).is_some_and(|p| p != ApprovalPhase::Pending));
        if decided.is_empty() {
            return;
        }
        let mut slots = self.slots.lock().expect("slots lock");
        for approval in decided {
            let Some(slot) = slots.get_mut(&approval.spec.pod_uid) else { continue };
            if slot.instance != approval.spec.instance
                || approval.metadata.namespace.as_deref() != Some(slot.namespace.as_str())
                || approval.spec.pod != slot.name
            {
                continue;
            }
            let status = approval.status.clone().unwrap_or_default();
            let phase = status.phase.unwrap_or_default();
            if slot.delivered.insert((approval.name_any(), phase.as_str())) {
                let _ = slot.approvals.send(ApprovalUpdate {
                    name: approval.name_any(),
                    phase,
                    reason: status.reason,
                    decided_by: status.decided_by,
                });
            }
        }
    }

    fn unregister(&self, pod_uid: &str, id: u64) {
        let (removed, connected) = {
            let mut slots = self.slots.lock().expect("slots lock");
            let removed = match slots.get(pod_uid) {
                Some(s) if s.id == id => slots.remove(pod_uid),
                _ => None,
            };
            (removed, slots.len())
        };
        self.metrics.sidecars_connected(connected);
        if let Some(slot) = removed {
            for (uid, _) in slot.acked.iter().flatten() {
                self.touch(&slot.namespace, uid);
            }
        }
    }

    /// Records an acknowledgement; `false` when the pod has no stream here or the
    /// revision was never sent to it.
    pub fn ack(&self, pod_uid: &str, revision: &str) -> bool {
        let (namespace, enforced, latency) = {
            let mut slots = self.slots.lock().expect("slots lock");
            let Some(slot) = slots.get_mut(pod_uid) else { return false };
            let Some((_, enforced, sent_at)) = slot.sent.iter().find(|(r, _, _)| r == revision) else {
                return false;
            };
            let (enforced, latency) = (enforced.clone(), sent_at.elapsed());
            let before = slot.acked.replace(enforced.clone()).unwrap_or_default();
            let mut touched = enforced.clone();
            touched.extend(before);
            (slot.namespace.clone(), touched, latency)
        };
        self.metrics.push_acked(latency);
        for (uid, _) in &enforced {
            self.touch(&namespace, uid);
        }
        true
    }

    /// Asks the controller to recompute the status of the policy `uid` in `namespace`.
    fn touch(&self, namespace: &str, uid: &str) {
        if let Some(p) =
            self.policies.find(|p| p.uid().as_deref() == Some(uid) && p.namespace().as_deref() == Some(namespace))
        {
            let _ = self.status_tx.send(ObjectRef::from_obj(&*p));
        }
    }

    /// Recomputes the set of every connected sidecar and sends those that changed.
    pub fn push_all(&self) {
        let mut slots = self.slots.lock().expect("slots lock");
        let mut gone = Vec::new();
        for (pod_uid, slot) in slots.iter_mut() {
            let key = ObjectRef::new(&slot.name).within(&slot.namespace);
            let Some(pod) = self.pods.get(&key) else {
                // The pod is gone (or its cache entry is): its sidecar is done.
                gone.push(pod_uid.clone());
                continue;
            };
            if pod.uid().as_deref() != Some(pod_uid.as_str()) {
                gone.push(pod_uid.clone());
                continue;
            }
            let set = self.effective_set(&pod);
            if set.revision == slot.tx.borrow().revision {
                continue;
            }
            if slot.sent.len() == SENT_KEPT {
                slot.sent.pop_front();
            }
            slot.sent.push_back((set.revision.clone(), enforced(&set), Instant::now()));
            let _ = slot.tx.send(Arc::new(set));
        }
        for uid in gone {
            slots.remove(&uid);
        }
        let connected = slots.len();
        drop(slots);
        self.metrics.sidecars_connected(connected);
    }

    /// Connected sidecars by `namespace/name`, for logs and tests.
    pub fn connected(&self) -> BTreeMap<String, Option<usize>> {
        let slots = self.slots.lock().expect("slots lock");
        slots.values().map(|s| (format!("{}/{}", s.namespace, s.name), s.acked.as_ref().map(Vec::len))).collect()
    }
}

fn enforced(set: &PolicySet) -> Enforced {
    set.policies.iter().map(|p| (p.uid.clone(), p.generation)).collect()
}

#[cfg(test)]
mod tests {
    use kube::runtime::reflector::store;
    use kube::runtime::watcher;
    use serde_json::json;

    use super::*;

    fn policy(name: &str, uid: &str, generation: i64, spec: Value) -> McpPolicy {
        serde_json::from_value(json!({
            "apiVersion": "toolgate.dev/v1alpha1", "kind": "McpPolicy",
            "metadata": {"name": name, "namespace": "agents", "uid": uid, "generation": generation},
            "spec": spec,
        }))
        .expect("policy object")
    }

    fn pod(name: &str, uid: &str, labels: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "agents", "uid": uid, "labels": labels},
            "spec": {"containers": [{"name": "app", "image": "x"}]},
        }))
        .expect("pod object")
    }

    struct World {
        hub: Arc<Hub>,
        policies: store::Writer<McpPolicy>,
        pods: store::Writer<Pod>,
    }

    fn world() -> World {
        let (pr, pw) = store::store();
        let (or, ow) = store::store();
        let (ar, _aw) = store::store();
        let (hub, _rx) = Hub::new(pr, or, ar, Arc::new(Metrics::new()), None, InjectConfig::default());
        World { hub, policies: pw, pods: ow }
    }

    fn apply_policy(w: &mut World, p: McpPolicy) {
        w.policies.apply_watcher_event(&watcher::Event::Apply(p));
    }

    const SEED: &str = r#"{"version":"1","default":"deny","tools":{"start-pod":{"limits":[{"counter":"c","window":"minute","max":10,"scope":"grant"}]}}}"#;

    fn seed() -> Value {
        serde_json::from_str(SEED).expect("seed")
    }

    #[test]
    fn selectors_pick_the_policies_of_a_pod_in_name_order() {
        let mut w = world();
        let mut b = seed();
        b["selector"] = json!({"matchLabels": {"app": "runpod"}});
        apply_policy(&mut w, policy("b-runpod", "u-b", 1, b));
        apply_policy(&mut w, policy("a-all", "u-a", 3, seed()));
        let mut c = seed();
        c["selector"] = json!({"matchLabels": {"app": "other"}});
        apply_policy(&mut w, policy("c-other", "u-c", 1, c));
        let set = w.hub.effective_set(&pod("p", "pu", json!({"app": "runpod"})));
        let names: Vec<_> = set.policies.iter().map(|p| (p.name.as_str(), p.generation)).collect();
        assert_eq!(names, [("a-all", 3), ("b-runpod", 1)]);
        assert!(
            set.policies.iter().all(|p| p.document.get("selector").is_none()),
            "selector is not part of the document"
        );
        let other = w.hub.effective_set(&pod("q", "qu", json!({"app": "none"})));
        assert_eq!(other.policies.len(), 1);
    }

    #[test]
    fn an_invalid_edit_keeps_pushing_the_last_good_generation_and_a_never_valid_policy_denies_all() {
        let mut w = world();
        apply_policy(&mut w, policy("seed", "u1", 1, seed()));
        let p = pod("p", "pu", json!({}));
        let first = w.hub.effective_set(&p);
        assert_eq!(first.policies[0].generation, 1);
        let mut bad = seed();
        bad["tools"]["start-pod"]["limits"][0]["window"] = json!("fortnight");
        apply_policy(&mut w, policy("seed", "u1", 2, bad.clone()));
        let view = w.hub.view(&w.hub.policies.state()[0]);
        assert!(view.error.as_deref().is_some_and(|e| e.contains("window")), "{view:?}");
        let second = w.hub.effective_set(&p);
        assert_eq!(second.policies[0].generation, 1, "sidecars keep the last valid generation");
        assert_eq!(second.revision, first.revision);

        apply_policy(&mut w, policy("fresh", "u2", 1, bad));
        let third = w.hub.effective_set(&p);
        let fresh = third.policies.iter().find(|x| x.name == "fresh").expect("selected");
        assert_eq!(fresh.document, deny_all_document(), "never valid: its pods deny everything");
    }

    #[test]
    fn acks_count_only_the_generation_that_was_sent_and_drop_with_the_stream() {
        let mut w = world();
        apply_policy(&mut w, policy("seed", "u1", 1, seed()));
        let p = pod("p", "pu", json!({}));
        w.pods.apply_watcher_event(&watcher::Event::Apply(p.clone()));
        let (guard, rx, _approvals) = w.hub.register(&p, "i1").expect("registered");
        let revision = rx.borrow().revision.clone();
        let targets = w.hub.targets(&w.hub.policies.state()[0], &w.hub.view(&w.hub.policies.state()[0]));
        assert_eq!(targets.len(), 1);
        assert_eq!(w.hub.enforcing("u1", 1, &targets), 0);
        assert!(!w.hub.ack("pu", "not-a-revision"));
        assert!(w.hub.ack("pu", &revision));
        assert_eq!(w.hub.enforcing("u1", 1, &targets), 1);
        assert_eq!(w.hub.enforcing("u1", 2, &targets), 0, "another generation is not enforced");

        // A new generation is pushed; the old ack does not count for it.
        let mut edited = seed();
        edited["tools"]["start-pod"]["limits"][0]["max"] = json!(20);
        apply_policy(&mut w, policy("seed", "u1", 2, edited));
        w.hub.push_all();
        let new_revision = rx.borrow().revision.clone();
        assert_ne!(new_revision, revision);
        assert_eq!(w.hub.enforcing("u1", 2, &targets), 0);
        assert!(w.hub.ack("pu", &new_revision));
        assert_eq!(w.hub.enforcing("u1", 2, &targets), 1);
        drop(guard);
        assert_eq!(w.hub.enforcing("u1", 2, &targets), 0, "a disconnected sidecar enforces nothing we know of");
    }

    #[test]
    fn pods_that_leave_a_selection_are_reported_until_they_are_gone_or_back() {
        let mut w = world();
        let mut strict = seed();
        strict["selector"] = json!({"matchLabels": {"tier": "strict"}});
        apply_policy(&mut w, policy("strict", "u1", 1, strict));
        let p = pod("p", "pu", json!({"tier": "strict"}));
        w.pods.apply_watcher_event(&watcher::Event::Apply(p.clone()));
        let current = |w: &World| {
            let policy = w.hub.policies.state()[0].clone();
            let targets = w.hub.targets(&policy, &w.hub.view(&policy));
            w.hub.departures(&policy, &targets)
        };
        assert_eq!(current(&w), (vec![], 0));
        let relabelled = pod("p", "pu", json!({"tier": "relaxed"}));
        w.pods.apply_watcher_event(&watcher::Event::Apply(relabelled.clone()));
        assert_eq!(current(&w), (vec!["p".to_owned()], 1), "left while running");
        assert_eq!(current(&w), (vec!["p".to_owned()], 0), "reported, counted once");
        w.pods.apply_watcher_event(&watcher::Event::Apply(p.clone()));
        assert_eq!(current(&w), (vec![], 0), "back in the selection");
        w.pods.apply_watcher_event(&watcher::Event::Apply(relabelled.clone()));
        assert_eq!(current(&w), (vec!["p".to_owned()], 1), "left again");
        w.pods.apply_watcher_event(&watcher::Event::Delete(relabelled));
        assert_eq!(current(&w), (vec![], 0), "a deleted pod is not reported");
    }

    #[test]
    fn a_second_stream_of_the_same_pod_is_refused_while_the_first_lives() {
        let w = world();
        let p = pod("p", "pu", json!({}));
        let (old, _rx1, _a1) = w.hub.register(&p, "i1").expect("first stream");
        assert_eq!(w.hub.register(&p, "i2").err().as_deref(), Some("i1"), "the healthy stream stays");
        assert_eq!(w.hub.register(&p, "i1").err().as_deref(), Some("i1"), "even with the same instance header");
        drop(old);
        let (_new, _rx2, _a2) = w.hub.register(&p, "i2").expect("accepted once the first is gone");
        assert_eq!(w.hub.connected().len(), 1);
    }

    #[test]
    fn decisions_reach_the_sidecar_only_from_the_pods_own_namespace_and_name() {
        let (pr, _pw) = store::store();
        let (or, _ow) = store::store();
        let (ar, mut aw) = store::store::<McpApproval>();
        let (hub, _rx) = Hub::new(pr, or, ar, Arc::new(Metrics::new()), None, InjectConfig::default());
        let p = pod("p", "pu", json!({}));
        let (_guard, _set, mut updates) = hub.register(&p, "i1").expect("first stream");
        let approval = |namespace: &str, pod: &str, by: &str| -> McpApproval {
            serde_json::from_value(json!({
                "apiVersion": "toolgate.dev/v1alpha1", "kind": "McpApproval",
                "metadata": {"name": "p-x1", "namespace": namespace, "uid": format!("{namespace}-{pod}")},
                "spec": {"pod": pod, "podUid": "pu", "instance": "i1", "tool": "delete-pod", "identity": "",
                    "policy": "runpod", "rule": "tools.delete-pod", "argumentsDigest": "a".repeat(64),
                    "argumentKeys": [], "requestedAt": "2026-01-01T00:00:00Z", "expiresAt": "2026-01-01T01:00:00Z"},
                "status": {"phase": "Approved", "decidedBy": by},
            }))
            .expect("approval object")
        };
        // A copy in another namespace, and one naming another pod with this pod's uid.
        aw.apply_watcher_event(&watcher::Event::Apply(approval("elsewhere", "p", "mallory")));
        aw.apply_watcher_event(&watcher::Event::Apply(approval("agents", "q", "mallory")));
        hub.push_approvals();
        assert!(updates.try_recv().is_err(), "a decision outside the pod's own approval released the call");
        aw.apply_watcher_event(&watcher::Event::Apply(approval("agents", "p", "alice")));
        hub.push_approvals();
        let update = updates.try_recv().expect("the pod's own approval is delivered");
        assert_eq!((update.name.as_str(), update.decided_by.as_deref()), ("p-x1", Some("alice")));
    }
}
