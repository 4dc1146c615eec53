//! `toolgate approvals | approve | deny`: the human side of approval, with the caller's
//! kubeconfig. Deciding sets `status.phase` of an McpApproval (RBAC: the
//! `toolgate-approver` role); who decided is recorded by the operator's admission webhook
//! from the authenticated request, not by this command.

use anyhow::{Context, bail};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use toolgate_policy::crd::{ApprovalPhase, McpApproval};

async fn client() -> anyhow::Result<Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::try_default().await.context("no Kubernetes configuration (KUBECONFIG or in-cluster)")
}

fn age(since: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>) -> String {
    let Some(t) = since else { return "-".into() };
    let secs = Timestamp::now().duration_since(t.0).as_secs().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Lists approvals (pending only unless `all`).
pub async fn list(namespace: Option<String>, all_namespaces: bool, all: bool) -> anyhow::Result<()> {
    let client = client().await?;
    let api: Api<McpApproval> = if all_namespaces {
        Api::all(client.clone())
    } else {
        Api::namespaced(client.clone(), namespace.as_deref().unwrap_or(client.default_namespace()))
    };
    let list = api.list(&ListParams::default()).await.context("listing McpApprovals")?;
    let mut rows =
        vec![["NAMESPACE", "NAME", "PHASE", "TOOL", "POD", "POLICY", "ARGUMENTS", "EXPIRES", "AGE"].map(str::to_owned)];
    for a in list.items {
        let phase = a.status.as_ref().and_then(|s| s.phase).unwrap_or_default();
        if !all && phase != ApprovalPhase::Pending {
            continue;
        }
        let arguments = match &a.spec.arguments {
            Some(v) => v.to_string(),
            None => format!(
                "keys={} sha256={}",
                a.spec.argument_keys.join(","),
                &a.spec.arguments_digest[..12.min(a.spec.arguments_digest.len())]
            ),
        };
        rows.push([
            a.namespace().unwrap_or_default(),
            a.name_any(),
            phase.as_str().to_owned(),
            a.spec.tool.clone(),
            a.spec.pod.clone(),
            format!("{}/{}", a.spec.policy, a.spec.rule),
            arguments.chars().take(60).collect(),
            a.spec.expires_at.clone(),
            age(a.metadata.creation_timestamp.as_ref()),
        ]);
    }
    if rows.len() == 1 {
        println!("No {}approvals.", if all { "" } else { "pending " });
        return Ok(());
    }
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    for row in rows {
        let line: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", line.join("  ").trim_end());
    }
    Ok(())
}

/// Approves or denies one pending approval.
pub async fn decide(
    name: &str,
    namespace: Option<String>,
    approve: bool,
    reason: Option<String>,
) -> anyhow::Result<()> {
    let client = client().await?;
    let namespace = namespace.unwrap_or_else(|| client.default_namespace().to_owned());
    let api: Api<McpApproval> = Api::namespaced(client, &namespace);
    let current = api.get(name).await.with_context(|| format!("mcpapproval {name} in namespace {namespace}"))?;
    let status = current.status.clone().unwrap_or_default();
    let phase = status.phase.unwrap_or_default();
    if phase != ApprovalPhase::Pending {
        bail!(
            "mcpapproval {name} is already {}{}",
            phase.as_str(),
            status.decided_by.map(|u| format!(" (by {u})")).unwrap_or_default()
        );
    }
    let new_phase = if approve { ApprovalPhase::Approved } else { ApprovalPhase::Denied };
    let mut patch = json!({"status": {"phase": new_phase.as_str()}});
    if let Some(r) = reason {
        patch["status"]["reason"] = json!(r);
    }
    let decided = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("deciding mcpapproval {name} (needs the toolgate-approver role)"))?;
    let by = decided.status.and_then(|s| s.decided_by).unwrap_or_else(|| "?".into());
    println!(
        "mcpapproval/{name} {} ({} {} from pod {}; recorded decider: {by})",
        if approve { "approved" } else { "denied" },
        current.spec.tool,
        current.spec.policy,
        current.spec.pod
    );
    Ok(())
}
