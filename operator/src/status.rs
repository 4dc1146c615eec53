//! The McpPolicy controller (leader only): validates each policy with the policy crate,
//! counts the pods it selects (with or without a sidecar), those without the injected
//! sidecar, the sidecars that acknowledged its generation and the running pods that left
//! its selection, and writes `status` by server-side apply with a fixed field manager,
//! only when it changed. Reconciles run per McpPolicy, when a pod of its namespace
//! changes, and when a sidecar acknowledges or disconnects. Rejections become Kubernetes
//! Events.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Config, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;
use toolgate_policy::crd::{McpPolicy, McpPolicyStatus};
use tracing::instrument;

use crate::push::index::Invalid;
use crate::push::streams::Hub;

/// Field manager of every status write.
pub const FIELD_MANAGER: &str = "toolgate-operator";
const MAX_MESSAGE: usize = 4096;
/// At most this many pod names in a condition message (the count is always given).
const MAX_NAMES: usize = 10;

/// `a, b, c` of at most [`MAX_NAMES`] names, then `and N more`.
fn name_list(names: &[String]) -> String {
    let mut text = names.iter().take(MAX_NAMES).map(String::as_str).collect::<Vec<_>>().join(", ");
    if names.len() > MAX_NAMES {
        text.push_str(&format!(" and {} more", names.len() - MAX_NAMES));
    }
    text
}

struct Ctx {
    client: kube::Client,
    hub: Arc<Hub>,
    recorder: Recorder,
    /// (uid, generation) of rejections already published as Events.
    evented: Mutex<HashSet<(String, i64)>>,
    failures: Mutex<HashMap<ObjectRef<McpPolicy>, u32>>,
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("writing status: {0}")]
    Status(#[source] kube::Error),
}

impl Error {
    /// A stable, low-cardinality label (`toolgate_operator_reconcile_errors_total`).
    fn metric_label(&self) -> &'static str {
        match self {
            Self::Status(_) => "status_patch",
        }
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

fn condition(type_: &str, ok: bool, reason: &str, message: String, generation: i64, old: &[Condition]) -> Condition {
    let status = if ok { "True" } else { "False" };
    // The transition time changes only when the status does.
    let last_transition_time = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| Time(Timestamp::now()), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: truncate(message),
        observed_generation: Some(generation),
        last_transition_time,
    }
}

/// The status `policy` should have now.
pub fn desired_status(hub: &Hub, policy: &McpPolicy) -> (McpPolicyStatus, Option<Invalid>) {
    let view = hub.index.view(policy);
    let generation = policy.metadata.generation.unwrap_or(0);
    let uid = policy.uid().unwrap_or_default();
    let targets = hub.index.targets(policy, &view);
    let old = policy.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let n = targets.len();
    // Selected pods without the injected sidecar: nothing enforces the policy there.
    let (protected, unprotected): (Vec<Arc<Pod>>, Vec<Arc<Pod>>) =
        targets.iter().cloned().partition(|p| hub.index.protected(p));
    let mut unprotected_names: Vec<String> = unprotected.iter().map(|p| p.name_any()).collect();
    unprotected_names.sort();
    let (departed, fresh) = hub.index.departures(policy, &targets);
    let namespace = policy.namespace().unwrap_or_default();
    if fresh > 0 {
        hub.metrics.pods_left_selection(&namespace, &policy.name_any(), fresh);
    }
    let (accepted, ready, enforcing) = match &view.error {
        None => {
            let enforcing = hub.enforcing(&uid, generation, &protected);
            let accepted = condition("Accepted", true, "Valid", "the policy is valid".into(), generation, old);
            let ready = if !unprotected.is_empty() {
                condition(
                    "Ready",
                    false,
                    "Unprotected",
                    format!(
                        "{} of {n} selected pods run without the toolgate sidecar, so nothing enforces this policy \
                         there: {}",
                        unprotected.len(),
                        name_list(&unprotected_names)
                    ),
                    generation,
                    old,
                )
            } else if enforcing == n {
                condition(
                    "Ready",
                    true,
                    "Enforcing",
                    format!("all {n} selected sidecars enforce generation {generation}"),
                    generation,
                    old,
                )
            } else {
                condition(
                    "Ready",
                    false,
                    "Pending",
                    format!("{enforcing} of {n} selected sidecars enforce generation {generation}"),
                    generation,
                    old,
                )
            };
            (accepted, ready, enforcing)
        }
        Some(problem) => {
            let consequence = match &view.pushed {
                Some(good) => format!("sidecars keep enforcing generation {}", good.generation),
                None => "the pods it selects deny every tool call until it is fixed".into(),
            };
            let accepted =
                condition("Accepted", false, "Invalid", format!("{problem} ({consequence})"), generation, old);
            let ready =
                condition("Ready", false, "Invalid", format!("generation {generation} is invalid"), generation, old);
            (accepted, ready, 0)
        }
    };
    let left = if departed.is_empty() {
        condition("PodsLeft", false, "None", "no running pod has left this policy's selection".into(), generation, old)
    } else {
        condition(
            "PodsLeft",
            true,
            "SelectionLost",
            format!(
                "{} running pods this policy selected no longer match its selector (relabelled, or the selector \
                 changed) and are no longer governed by it: {}",
                departed.len(),
                name_list(&departed)
            ),
            generation,
            old,
        )
    };
    let status = McpPolicyStatus {
        conditions: vec![accepted, ready, left],
        observed_generation: Some(generation),
        targets: Some(i32::try_from(n).unwrap_or(i32::MAX)),
        enforcing: Some(i32::try_from(enforcing).unwrap_or(i32::MAX)),
        unprotected: Some(i32::try_from(unprotected.len()).unwrap_or(i32::MAX)),
    };
    hub.metrics.policy_status(&namespace, &policy.name_any(), n, enforcing, unprotected.len());
    (status, view.error)
}

#[instrument(skip_all, fields(policy = %format!("{}/{}", policy.namespace().unwrap_or_default(), policy.name_any())))]
async fn reconcile(policy: Arc<McpPolicy>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    // Observed when dropped: on every return, errors included.
    let _timer = ctx.hub.metrics.reconcile_timer();
    if policy.meta().deletion_timestamp.is_some() || !ctx.hub.index.governs(&policy.namespace().unwrap_or_default()) {
        return Ok(Action::await_change());
    }
    let (status, problem) = desired_status(&ctx.hub, &policy);
    let namespace = policy.namespace().unwrap_or_default();
    if policy.status.as_ref() != Some(&status) {
        let api: Api<McpPolicy> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = json!({"apiVersion": "toolgate.dev/v1alpha1", "kind": "McpPolicy", "status": status});
        api.patch_status(&policy.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
            .await
            .map_err(Error::Status)?;
    }
    ctx.failures.lock().expect("failures lock").remove(&ObjectRef::from_obj(&*policy));
    let Some(problem) = problem else {
        ctx.hub.metrics.reconciled("ok");
        // A slow safety net; acks and pod changes trigger reconciles on their own.
        return Ok(Action::requeue(Duration::from_secs(300)));
    };
    ctx.hub.metrics.reconciled("invalid");
    let key = (policy.uid().unwrap_or_default(), policy.metadata.generation.unwrap_or(0));
    let fresh = ctx.evented.lock().expect("evented lock").insert(key);
    if fresh {
        tracing::warn!(policy = %format!("{namespace}/{}", policy.name_any()), %problem, kind = problem.metric_label(),
            "McpPolicy rejected");
        let event = Event {
            type_: EventType::Warning,
            reason: "InvalidPolicy".into(),
            note: Some(truncate(problem.to_string())),
            action: "Validate".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &policy.object_ref(&())).await {
            tracing::warn!(error = %e, "cannot publish the rejection event");
            ctx.hub.metrics.reconcile_error("event");
        }
    }
    // Invalid specs wait for the next edit.
    Ok(Action::await_change())
}

fn error_policy(policy: Arc<McpPolicy>, error: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.hub.metrics.reconciled("error");
    ctx.hub.metrics.reconcile_error(error.metric_label());
    let mut failures = ctx.failures.lock().expect("failures lock");
    let n = failures.entry(ObjectRef::from_obj(&*policy)).or_insert(0);
    *n = n.saturating_add(1);
    let delay = Duration::from_millis(500u64.saturating_mul(1 << (*n).min(9))).min(Duration::from_secs(300));
    tracing::warn!(policy = %policy.name_any(), %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Runs the controller until the future is dropped (when leadership is lost).
pub async fn run(
    client: kube::Client,
    hub: Arc<Hub>,
    status: mpsc::UnboundedReceiver<ObjectRef<McpPolicy>>,
    reporter: String,
) {
    let policies: Api<McpPolicy> = Api::all(client.clone());
    let pods: Api<Pod> = Api::all(client.clone());
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        hub: hub.clone(),
        recorder: Recorder::new(client, Reporter { controller: FIELD_MANAGER.into(), instance: Some(reporter) }),
        evented: Mutex::default(),
        failures: Mutex::default(),
    });
    let mapper_hub = hub.clone();
    Controller::new(policies, watcher::Config::default())
        .with_config(Config::default().debounce(Duration::from_millis(100)))
        .watches(pods, watcher::Config::default(), move |pod: Pod| {
            let namespace = pod.namespace();
            mapper_hub
                .index
                .policies
                .state()
                .into_iter()
                .filter(|p| p.namespace() == namespace)
                .map(|p| ObjectRef::from_obj(&*p))
                .collect::<Vec<_>>()
        })
        .reconcile_on(tokio_stream::wrappers::UnboundedReceiverStream::new(status))
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_name_lists_are_bounded() {
        let names: Vec<String> = (0..25).map(|i| format!("pod-{i}")).collect();
        assert_eq!(name_list(&names[..2]), "pod-0, pod-1");
        let long = name_list(&names);
        assert!(long.starts_with("pod-0, pod-1") && long.ends_with(" and 15 more"), "{long}");
        assert!(!long.contains("pod-10,"), "{long}");
    }
}
