//! A Prometheus server on loopback (Debian's `prometheus`, see `make testbin`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::process::{Supervised, free_port};
use crate::serve::{http_get, url_encode};
use crate::tools::{Tool, tool_path};

/// A running Prometheus; dropping it stops it and removes its data directory.
#[derive(Debug)]
pub struct Prometheus {
    url: String,
    dir: PathBuf,
    _server: Supervised,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (plain HTTP `/metrics`) every second, in one job
    /// named `test`.
    pub async fn scraping(targets: &[SocketAddr]) -> Prometheus {
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        Self::start(&format!("- job_name: test\n  static_configs:\n  - targets: [{}]\n", targets.join(", "))).await
    }

    /// Starts Prometheus with the given `scrape_configs` (a YAML list) and a global scrape
    /// and evaluation interval of one second. Panics with the log if it does not get ready.
    pub async fn start(scrape_configs_yaml: &str) -> Prometheus {
        Self::try_start(scrape_configs_yaml).await.unwrap_or_else(|e| panic!("starting prometheus: {e:#}"))
    }

    async fn try_start(scrape_configs_yaml: &str) -> Result<Prometheus> {
        let binary = tool_path(Tool::Prometheus);
        let indented: String = scrape_configs_yaml.lines().map(|l| format!("  {l}\n")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{indented}"
        );
        let mut last_error = None;
        // A new port (and directory: the wrapper removes it when prometheus stops) per try,
        // in case another process took the free port first.
        for _attempt in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("toolgate-prometheus-")
                .tempdir()
                .context("creating a temporary directory")?
                .keep();
            let config_path = dir.join("prometheus.yml");
            std::fs::write(&config_path, &config).context("writing prometheus.yml")?;
            let port = free_port()?;
            let args = vec![
                format!("--config.file={}", config_path.display()),
                format!("--storage.tsdb.path={}", dir.join("data").display()),
                format!("--web.listen-address=127.0.0.1:{port}"),
                "--log.level=warn".to_owned(),
            ];
            let mut server = Supervised::spawn("prometheus", &binary, &args, &dir.join("prometheus.log"), Some(&dir))?;
            let url = format!("http://127.0.0.1:{port}");
            match wait_ready(&mut server, &url).await {
                Ok(()) => {
                    return Ok(Prometheus { url, dir, _server: server });
                }
                Err(e) => {
                    server.stop(Duration::from_secs(15));
                    let _ = std::fs::remove_dir_all(&dir);
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("prometheus did not start")))
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The data and configuration directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs an instant query and returns `data.result` (a JSON array).
    pub async fn query(&self, promql: &str) -> Result<Value> {
        let url = format!("{}/api/v1/query?query={}", self.url, url_encode(promql));
        let (status, body) = http_get(&url).await?;
        let json: Value =
            serde_json::from_str(&body).with_context(|| format!("GET {url} returned {status}, not JSON: {body}"))?;
        if json["status"] != "success" {
            bail!("query {promql:?} failed: {json}");
        }
        Ok(json["data"]["result"].clone())
    }

    /// Polls `promql` until it returns at least one sample; returns the samples.
    pub async fn wait_for_samples(&self, promql: &str, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.query(promql).await {
                Ok(Value::Array(samples)) if !samples.is_empty() => return samples,
                Ok(other) => format!("no samples yet ({other})"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                let targets =
                    http_get(&format!("{}/api/v1/targets", self.url)).await.map(|(_, body)| body).unwrap_or_default();
                panic!("prometheus returned no samples for {promql:?} within {timeout:?}: {last}\ntargets: {targets}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

async fn wait_ready(server: &mut Supervised, url: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        server.check_running()?;
        if let Ok((status, _)) = http_get(&format!("{url}/-/ready")).await
            && status.is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("prometheus was not ready within 60s; its log:\n{}", crate::process::log_tail(server.log_path(), 40));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
