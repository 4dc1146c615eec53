//! The leader's periodic duties: certificate issue and rotation (`--cert-mode operator`),
//! the webhook configuration's `caBundle`, the CA ConfigMaps in governed namespaces, and
//! the approval janitor. Loading the serving certificate is also what every replica does
//! at start and on reload ([`load_certificates`]).

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, ResourceExt};
use toolgate_policy::crd::{ApprovalPhase, McpApproval};

use crate::approvals;
use crate::inject::{INJECT_LABEL, INJECTED_LABEL};
use crate::push::streams::Hub;
use crate::status::FIELD_MANAGER;
use crate::tls::{self, CertStore, Lifetimes};

/// Who issues the serving certificate (`--cert-mode`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertSource {
    /// The operator creates, stores (in this Secret of its namespace) and rotates its CA
    /// and serving certificate.
    Operator { secret: String },
    /// Certificate files written by someone else (cert-manager), re-read when they change.
    Files { cert: PathBuf, key: PathBuf, ca: PathBuf },
}

/// The serving certificate: where it comes from and what it covers.
#[derive(Clone, Debug)]
pub struct CertConfig {
    /// The operator's own namespace (its Secret).
    pub namespace: String,
    pub source: CertSource,
    /// DNS names and addresses of the serving certificate.
    pub names: Vec<String>,
    pub lifetimes: Lifetimes,
}

impl CertConfig {
    /// How often every replica re-reads the certificate (Secret or files).
    pub fn reload_interval(&self) -> Duration {
        (self.lifetimes.serving / 10).clamp(Duration::from_secs(1), Duration::from_secs(30))
    }
}

/// What the leader keeps current besides status.
#[derive(Clone, Debug)]
pub struct Duties {
    pub certs: CertConfig,
    /// MutatingWebhookConfiguration whose caBundle the leader keeps current.
    pub webhook_config: String,
    /// ConfigMap (ca.crt) published into namespaces with injected pods.
    pub ca_config_map: String,
}

/// Loads (and, when allowed, creates or renews) the serving certificate into `certs`.
pub async fn load_certificates(client: &Client, config: &CertConfig, certs: &CertStore, leader: bool) -> Result<bool> {
    let (cert, key, ca) = match &config.source {
        CertSource::Files { cert, key, ca } => {
            let read = |p: &PathBuf| -> Result<String> {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            (read(cert)?, read(key)?, read(ca)?)
        }
        CertSource::Operator { secret } => {
            let api: Api<Secret> = Api::namespaced(client.clone(), &config.namespace);
            let (bundle, wrote) = tls::reconcile_secret(&api, secret, &config.names, &config.lifetimes, leader).await?;
            if wrote {
                tracing::info!(%secret, "issued a serving certificate");
            }
            (bundle.cert, bundle.key, bundle.ca_bundle)
        }
    };
    let changed = certs.install(&cert, &key, &ca)?;
    if changed {
        tracing::info!("serving certificate loaded");
    }
    Ok(changed)
}

/// Certificate rotation, caBundle and CA ConfigMaps: the leader's periodic duties.
pub async fn leader_duties(client: &Client, duties: &Duties, certs: &CertStore, hub: &Hub) {
    let mut published: HashMap<String, String> = Default::default();
    loop {
        if matches!(duties.certs.source, CertSource::Operator { .. }) {
            match load_certificates(client, &duties.certs, certs, true).await {
                Ok(true) => hub.metrics.certificate_issued(),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "certificate rotation failed"),
            }
            if let Err(e) = patch_ca_bundle(client, &duties.webhook_config, &certs.ca_bundle()).await {
                tracing::warn!(error = %format!("{e:#}"), webhook = %duties.webhook_config, "cannot patch the caBundle");
            }
        }
        publish_ca(client, &duties.ca_config_map, certs, hub, &mut published).await;
        tokio::time::sleep(duties.certs.reload_interval().min(Duration::from_secs(5))).await;
    }
}

/// Sets every webhook's `caBundle` of the configuration to `ca` where it differs.
async fn patch_ca_bundle(client: &Client, name: &str, ca: &str) -> Result<()> {
    use base64::Engine as _;
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Some(config) = api.get_opt(name).await? else {
        tracing::debug!(webhook = %name, "no MutatingWebhookConfiguration to patch");
        return Ok(());
    };
    let mut ops = Vec::new();
    for (i, hook) in config.webhooks.iter().flatten().enumerate() {
        if hook.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(ca.as_bytes()) {
            ops.push(serde_json::json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": hook.name}));
            ops.push(serde_json::json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"),
                "value": base64::engine::general_purpose::STANDARD.encode(ca)}));
        }
    }
    if ops.is_empty() {
        return Ok(());
    }
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))?;
    api.patch(name, &PatchParams::default(), &Patch::<()>::Json(patch)).await?;
    tracing::info!(webhook = %name, "caBundle updated");
    Ok(())
}

/// Publishes the CA bundle as a ConfigMap into every namespace that is labelled for
/// injection, has injected pods or has McpPolicies.
async fn publish_ca(
    client: &Client,
    ca_config_map: &str,
    certs: &CertStore,
    hub: &Hub,
    published: &mut HashMap<String, String>,
) {
    let ca = certs.ca_bundle();
    if ca.is_empty() {
        return;
    }
    let mut namespaces: BTreeSet<String> = hub
        .index
        .pods
        .state()
        .iter()
        .filter(|p| p.labels().get(INJECTED_LABEL).is_some_and(|v| v == "true"))
        .filter_map(|p| p.namespace())
        .collect();
    namespaces.extend(hub.index.policies.state().iter().filter_map(|p| p.namespace()));
    let ns_api: Api<Namespace> = Api::all(client.clone());
    if let Ok(list) = ns_api.list_metadata(&ListParams::default().labels(&format!("{INJECT_LABEL}=enabled"))).await {
        namespaces.extend(list.items.iter().map(|n| n.name_any()));
    }
    for ns in namespaces {
        if published.get(&ns) == Some(&ca) || !hub.index.governs(&ns) {
            continue;
        }
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        let cm = serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": ca_config_map, "labels": {"app.kubernetes.io/managed-by": "toolgate-operator"}},
            "data": {"ca.crt": ca},
        });
        match api.patch(ca_config_map, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&cm)).await {
            Ok(_) => {
                published.insert(ns, ca.clone());
            }
            Err(e) => tracing::warn!(namespace = %ns, error = %e, "cannot publish the CA ConfigMap"),
        }
    }
}

/// Leader: approvals whose pod is gone become Abandoned; approvals left Pending well
/// past their expiry (their sidecar died before closing them) become Expired.
pub async fn janitor(client: Client, hub: Arc<Hub>) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = Timestamp::now();
        let pending = hub
            .index
            .approvals
            .state_filter(|a| a.status.as_ref().and_then(|s| s.phase).is_none_or(|p| p == ApprovalPhase::Pending));
        for a in pending {
            let ns = a.namespace().unwrap_or_default();
            if !hub.index.governs(&ns) {
                continue;
            }
            let pod = hub.index.pods.get(&ObjectRef::<Pod>::new(&a.spec.pod).within(&ns));
            let pod_gone = pod.is_none_or(|p| p.uid().as_deref() != Some(a.spec.pod_uid.as_str()));
            let overdue = a
                .spec
                .expires_at
                .parse::<Timestamp>()
                .is_ok_and(|t| now.duration_since(t) > k8s_openapi::jiff::SignedDuration::from_secs(30));
            let api: Api<McpApproval> = Api::namespaced(client.clone(), &ns);
            let result = if pod_gone {
                approvals::set_phase(&api, &a.name_any(), ApprovalPhase::Abandoned, Some("the pod is gone")).await
            } else if overdue {
                approvals::set_phase(
                    &api,
                    &a.name_any(),
                    ApprovalPhase::Expired,
                    Some("no decision before the timeout"),
                )
                .await
            } else {
                continue;
            };
            if let Err(e) = result {
                tracing::debug!(approval = %a.name_any(), error = %e, "janitor could not close the approval");
            }
        }
    }
}
