//! Policy files: loaded at start (an invalid one stops the proxy before it binds a
//! port), then polled for changes. A valid edit replaces the policy for the next call;
//! an invalid edit is logged with its paths and counted, and the last good policy stays.
//!
//! Polling (not inotify) because Kubernetes ConfigMap volumes swap a symlink, which
//! file watchers miss, and because reading a few KiB every half second costs nothing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use toolgate_policy::Policy;

use crate::live::Effective;
use crate::telemetry::metrics::Metrics;

fn read_all(paths: &[PathBuf]) -> Result<Vec<(PathBuf, String)>, String> {
    paths
        .iter()
        .map(|p| {
            let meta = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
            if meta.len() > toolgate_policy::MAX_DOCUMENT_BYTES as u64 {
                return Err(format!("{}: larger than {} bytes", p.display(), toolgate_policy::MAX_DOCUMENT_BYTES));
            }
            let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            Ok((p.clone(), text))
        })
        .collect()
}

fn compile(texts: &[(PathBuf, String)]) -> Result<Policy, String> {
    let mut docs = Vec::with_capacity(texts.len());
    for (p, text) in texts {
        let doc = toolgate_policy::parse_document(text).map_err(|e| indent(p, &e.to_string()))?;
        let name = p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned());
        docs.push((name, doc));
    }
    Policy::compile(docs).map_err(|e| e.to_string())
}

fn indent(p: &std::path::Path, s: &str) -> String {
    let body: Vec<String> = s.lines().map(|l| format!("  {l}")).collect();
    format!("{}:\n{}", p.display(), body.join("\n"))
}

pub fn load(paths: &[PathBuf]) -> Result<Policy, String> {
    compile(&read_all(paths)?)
}

pub async fn watch(paths: Vec<PathBuf>, every: Duration, tx: watch::Sender<Arc<Effective>>, metrics: Arc<Metrics>) {
    let mut last = read_all(&paths).ok();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = match read_all(&paths) {
            Ok(t) => t,
            Err(e) => {
                if last.is_some() {
                    tracing::error!(error = %e, "cannot read the policy; keeping the last good one");
                    metrics.reload_error();
                    last = None;
                }
                continue;
            }
        };
        if last.as_ref() == Some(&now) {
            continue;
        }
        last = Some(now.clone());
        match tokio::task::spawn_blocking(move || compile(&now)).await {
            Ok(Ok(policy)) => {
                tracing::info!(revision = policy.revision(), "policy reloaded");
                let effective = Effective::files(policy);
                crate::live::enforced(&metrics, &effective);
                metrics.policy_applied();
                if tx.send(Arc::new(effective)).is_err() {
                    return;
                }
            }
            Ok(Err(e)) => {
                tracing::error!("policy edit refused; the last good policy stays enforced:\n{e}");
                metrics.reload_error();
            }
            Err(_) => metrics.reload_error(),
        }
    }
}
