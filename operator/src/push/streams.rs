//! The operator's shared view: the [`Index`] (caches, validated policies, selections),
//! the connected sidecar streams (at most one per pod) and what each acknowledged, and
//! the acknowledgements other replicas reported.
//!
//! Every replica has one [`Hub`]; it serves the streams of the sidecars connected to it
//! from its own caches. The counts status needs (`enforcing`) come from here; status
//! itself is computed and written by the leader's controller (`crate::status`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::{Notify, watch};
use toolgate_policy::crd::{ApprovalPhase, McpApproval, McpPolicy};
use toolgate_policy::push::{ApprovalUpdate, PolicySet};

use crate::inject::InjectConfig;
use crate::metrics::Metrics;
use crate::push::index::{Index, Scope};

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
    /// The caches and what is derived from them.
    pub index: Index,
    slots: Mutex<HashMap<String, Slot>>,
    /// Acknowledgements of sidecars connected to other replicas (leader only).
    remote: Mutex<AckReport>,
    next_id: AtomicU64,
    /// Woken whenever a cache changes; the pusher recomputes every stream's set.
    pub changed: Notify,
    /// Policies whose status may have changed (acks, disconnects), for the controller.
    status_tx: tokio::sync::mpsc::UnboundedSender<ObjectRef<McpPolicy>>,
    pub metrics: Arc<Metrics>,
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
            index: Index::new(policies, pods, approvals, scope, sidecar),
            slots: Mutex::default(),
            remote: Mutex::default(),
            next_id: AtomicU64::new(1),
            changed: Notify::new(),
            status_tx,
            metrics,
        };
        (Arc::new(hub), status_rx)
    }

    /// Forgets validations and per-policy metrics of policies that no longer exist.
    pub fn prune(&self) {
        let names = self.index.prune();
        self.metrics.retain_policies(&names);
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
            for p in self.index.policies.state() {
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
        let set = Arc::new(self.index.effective_set(pod));
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
            .index
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
            self.index.policies.find(|p| p.uid().as_deref() == Some(uid) && p.namespace().as_deref() == Some(namespace))
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
            let Some(pod) = self.index.pods.get(&key) else {
                // The pod is gone (or its cache entry is): its sidecar is done.
                gone.push(pod_uid.clone());
                continue;
            };
            if pod.uid().as_deref() != Some(pod_uid.as_str()) {
                gone.push(pod_uid.clone());
                continue;
            }
            let set = self.index.effective_set(&pod);
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
    use serde_json::{Value, json};

    use super::*;
    use crate::push::index::deny_all_document;

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
        let set = w.hub.index.effective_set(&pod("p", "pu", json!({"app": "runpod"})));
        let names: Vec<_> = set.policies.iter().map(|p| (p.name.as_str(), p.generation)).collect();
        assert_eq!(names, [("a-all", 3), ("b-runpod", 1)]);
        assert!(
            set.policies.iter().all(|p| p.document.get("selector").is_none()),
            "selector is not part of the document"
        );
        let other = w.hub.index.effective_set(&pod("q", "qu", json!({"app": "none"})));
        assert_eq!(other.policies.len(), 1);
    }

    #[test]
    fn an_invalid_edit_keeps_pushing_the_last_good_generation_and_a_never_valid_policy_denies_all() {
        let mut w = world();
        apply_policy(&mut w, policy("seed", "u1", 1, seed()));
        let p = pod("p", "pu", json!({}));
        let first = w.hub.index.effective_set(&p);
        assert_eq!(first.policies[0].generation, 1);
        let mut bad = seed();
        bad["tools"]["start-pod"]["limits"][0]["window"] = json!("fortnight");
        apply_policy(&mut w, policy("seed", "u1", 2, bad.clone()));
        let view = w.hub.index.view(&w.hub.index.policies.state()[0]);
        assert!(
            view.error.as_ref().is_some_and(|e| e.to_string().contains("window") && e.metric_label() == "invalid"),
            "{view:?}"
        );
        let second = w.hub.index.effective_set(&p);
        assert_eq!(second.policies[0].generation, 1, "sidecars keep the last valid generation");
        assert_eq!(second.revision, first.revision);

        apply_policy(&mut w, policy("fresh", "u2", 1, bad));
        let third = w.hub.index.effective_set(&p);
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
        let targets =
            w.hub.index.targets(&w.hub.index.policies.state()[0], &w.hub.index.view(&w.hub.index.policies.state()[0]));
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
            let policy = w.hub.index.policies.state()[0].clone();
            let targets = w.hub.index.targets(&policy, &w.hub.index.view(&policy));
            w.hub.index.departures(&policy, &targets)
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
