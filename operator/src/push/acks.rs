//! Acknowledgements across replicas. A sidecar holds its stream (and sends its acks) on
//! one connection to one replica, but only the leader writes status. Every replica
//! therefore publishes what its sidecars acknowledged in a small Lease of its own
//! (`<lease-name>-acks-<identity>`, annotation `toolgate.dev/acks`, renewed every few
//! seconds), and the leader merges the fresh reports of the others into its count.
//! A replica that dies stops renewing; its report is ignored after the lease duration
//! and deleted by the leader later.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;
use tokio::sync::watch;

use crate::push::streams::{AckReport, Hub};

/// Label of report Leases.
pub const REPORT_LABEL: &str = "toolgate.dev/ack-report";
const ANNOTATION: &str = "toolgate.dev/acks";
/// A report not renewed for this long is ignored.
const FRESH: Duration = Duration::from_secs(15);
/// A report not renewed for this long is deleted by the leader.
const GARBAGE: Duration = Duration::from_secs(600);

fn report_name(lease_name: &str, identity: &str) -> String {
    let mut name = format!("{lease_name}-acks-{identity}").to_ascii_lowercase();
    name.retain(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    name.truncate(253);
    name
}

/// Publishes this replica's acknowledgements until `shutdown`.
pub async fn publish(
    api: Api<Lease>,
    lease_name: String,
    identity: String,
    hub: Arc<Hub>,
    mut shutdown: watch::Receiver<bool>,
) {
    let name = report_name(&lease_name, &identity);
    let mut last: Option<AckReport> = None;
    let mut written_at = tokio::time::Instant::now();
    loop {
        let report = hub.local_acks();
        let stale = written_at.elapsed() > FRESH / 3;
        if last.as_ref() != Some(&report) || stale {
            let lease = json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {
                    "name": name,
                    "labels": {REPORT_LABEL: "true"},
                    "annotations": {ANNOTATION: serde_json::to_string(&report).unwrap_or_default()},
                },
                "spec": {
                    "holderIdentity": identity,
                    "leaseDurationSeconds": FRESH.as_secs(),
                    // MicroTime: microsecond precision, as the apiserver insists.
                    "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(Timestamp::now()),
                },
            });
            match api.patch(&name, &PatchParams::apply("toolgate-operator").force(), &Patch::Apply(&lease)).await {
                Ok(_) => {
                    last = Some(report);
                    written_at = tokio::time::Instant::now();
                }
                Err(e) => tracing::warn!(error = %e, lease = %name, "cannot publish acknowledgements"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = crate::http::stopped(&mut shutdown) => break,
        }
    }
    // Leaving: a stale report would only be ignored, but say goodbye properly.
    let _ = api.delete(&name, &DeleteParams::default()).await;
}

/// The merged fresh reports of every replica but `identity`.
fn merge(leases: &[Lease], identity: &str, now: Timestamp) -> (AckReport, Vec<String>) {
    let mut merged = AckReport::new();
    let mut garbage = Vec::new();
    for lease in leases {
        let spec = lease.spec.clone().unwrap_or_default();
        let age = spec.renew_time.map(|t| now.duration_since(t.0).unsigned_abs()).unwrap_or(Duration::MAX);
        if age > GARBAGE {
            garbage.push(lease.name_any());
        }
        if spec.holder_identity.as_deref() == Some(identity) || age > FRESH {
            continue;
        }
        let Some(text) = lease.annotations().get(ANNOTATION) else { continue };
        let Ok(report) = serde_json::from_str::<AckReport>(text) else { continue };
        for (key, pods) in report {
            merged.entry(key).or_default().extend(pods);
        }
    }
    (merged, garbage)
}

/// Leader: pending McpApprovals held by a sidecar instance whose pod now streams only from
/// other instances (the sidecar restarted) become Abandoned. Only approvals older than a
/// report's freshness are considered, so that a stream that just moved to another replica
/// is seen before its calls are given up; a second stream for a pod (on any replica) does
/// not abandon anything while the first is alive.
pub async fn abandon_replaced(client: kube::Client, hub: Arc<Hub>) {
    use toolgate_policy::crd::{ApprovalPhase, McpApproval};
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = Timestamp::now();
        let pending = hub.index.approvals.state_filter(|a| {
            a.status.as_ref().and_then(|s| s.phase).is_none_or(|p| p == ApprovalPhase::Pending)
                && a.metadata
                    .creation_timestamp
                    .as_ref()
                    .is_some_and(|t| now.duration_since(t.0).unsigned_abs() > FRESH + Duration::from_secs(1))
        });
        for approval in pending {
            let namespace = approval.namespace().unwrap_or_default();
            if !hub.index.governs(&namespace) {
                continue;
            }
            let instances = hub.instances(&approval.spec.pod_uid);
            if instances.is_empty() || instances.contains(&approval.spec.instance) {
                continue;
            }
            let api: Api<McpApproval> = Api::namespaced(client.clone(), &namespace);
            let name = approval.name_any();
            match crate::approvals::set_phase(
                &api,
                &name,
                ApprovalPhase::Abandoned,
                Some("the sidecar holding the call restarted"),
            )
            .await
            {
                Ok(_) => tracing::info!(approval = %name, "approval abandoned: its sidecar restarted"),
                Err(e) => tracing::warn!(approval = %name, error = %e, "cannot mark the approval abandoned"),
            }
        }
    }
}

/// Leader: merges the other replicas' reports into the hub until the future is dropped.
pub async fn collect(api: Api<Lease>, identity: String, hub: Arc<Hub>) {
    let params = ListParams::default().labels(&format!("{REPORT_LABEL}=true"));
    loop {
        match api.list(&params).await {
            Ok(list) => {
                let (merged, garbage) = merge(&list.items, &identity, Timestamp::now());
                hub.set_remote(merged);
                for name in garbage {
                    let _ = api.delete(&name, &DeleteParams::default()).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the other replicas' acknowledgements"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, age_secs: i64, report: serde_json::Value) -> Lease {
        let renew = Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(age_secs);
        serde_json::from_value(json!({
            "metadata": {"name": format!("r-{holder}"), "annotations": {ANNOTATION: report.to_string()}},
            "spec": {"holderIdentity": holder, "renewTime": renew.to_string()},
        }))
        .expect("lease")
    }

    #[test]
    fn merges_fresh_reports_of_others_only_and_collects_garbage() {
        let leases = [
            lease("me", 1, json!({"p/1": ["a"]})),
            lease("b", 2, json!({"p/1": ["b1", "b2"]})),
            lease("c", 3, json!({"p/1": ["b2", "c1"], "q/2": ["c2"]})),
            lease("dead", 60, json!({"p/1": ["d1"]})),
            lease("ancient", 4000, json!({"p/1": ["x"]})),
            lease("garbled", 1, json!("not a report")),
        ];
        let (merged, garbage) = merge(&leases, "me", Timestamp::now());
        let p1: Vec<&str> = merged["p/1"].iter().map(String::as_str).collect();
        assert_eq!(p1, ["b1", "b2", "c1"], "own, stale and garbled reports are ignored; pods counted once");
        assert_eq!(merged["q/2"].len(), 1);
        assert_eq!(garbage, ["r-ancient"]);
    }

    #[test]
    fn report_names_are_valid_object_names() {
        assert_eq!(
            report_name("toolgate-operator-leader", "Operator_A-7f"),
            "toolgate-operator-leader-acks-operatora-7f"
        );
    }
}
