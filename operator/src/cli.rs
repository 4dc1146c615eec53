//! The command line: [`Args`] (every flag, with its environment variable) and the
//! [`Config`] it becomes. Every check and clamp is here, so that a bad flag stops the
//! binary (exit 64) before it does any I/O.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use kube::core::Selector;

use crate::admission::approval_review::{Deciders, ServiceAccountDeciders};
use crate::http::Keepalive;
use crate::inject::{CounterStoreConfig, InjectConfig};
use crate::leader::duties::{CertConfig, CertSource, Duties};
use crate::leader::lease::Timing;
use crate::tls::Lifetimes;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CertMode {
    /// The operator creates, stores (Secret) and rotates its CA and serving certificate.
    Operator,
    /// Certificate files written by someone else (cert-manager), re-read when they change.
    Files,
}

/// McpPolicy controller, sidecar injector and policy push server.
#[derive(Parser, Debug)]
#[command(name = "toolgate-operator", version, about)]
pub struct Args {
    /// HTTPS listener: admission webhook (/inject) and sidecar policy streams (/v1/stream, /v1/ack).
    #[arg(long, env = "TOOLGATE_OPERATOR_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Plain HTTP listener: /metrics, /healthz, /readyz.
    #[arg(long, env = "TOOLGATE_OPERATOR_ADMIN_LISTEN", default_value = "0.0.0.0:8080")]
    admin_listen: SocketAddr,
    /// The operator's own namespace (TLS Secret, leader Lease).
    #[arg(long, env = "POD_NAMESPACE", default_value = "toolgate-system")]
    namespace: String,
    /// This replica's name: its identity in leader election.
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Name of the operator's Service: its DNS names go into the serving certificate.
    #[arg(long, env = "TOOLGATE_SERVICE_NAME", default_value = "toolgate-operator")]
    service_name: String,
    /// More names or IP addresses for the serving certificate (repeatable).
    #[arg(long = "extra-san", env = "TOOLGATE_EXTRA_SANS", value_delimiter = ',')]
    extra_sans: Vec<String>,
    /// Where the webhook is reached when the operator runs outside the cluster
    /// (development); its host is added to the serving certificate.
    #[arg(long, env = "TOOLGATE_WEBHOOK_URL")]
    webhook_url: Option<hyper::Uri>,
    /// Secret (in --namespace) holding the CA and serving certificate.
    #[arg(long, env = "TOOLGATE_TLS_SECRET", default_value = "toolgate-operator-tls")]
    tls_secret: String,
    /// Who issues the serving certificate.
    #[arg(long, env = "TOOLGATE_CERT_MODE", value_enum, default_value = "operator")]
    cert_mode: CertMode,
    /// Serving certificate (PEM) in `files` mode.
    #[arg(long, env = "TOOLGATE_TLS_CERT_FILE", required_if_eq("cert_mode", "files"))]
    tls_cert_file: Option<PathBuf>,
    /// Serving key (PEM) in `files` mode.
    #[arg(long, env = "TOOLGATE_TLS_KEY_FILE", required_if_eq("cert_mode", "files"))]
    tls_key_file: Option<PathBuf>,
    /// CA bundle (PEM) sidecars trust, in `files` mode.
    #[arg(long, env = "TOOLGATE_TLS_CA_FILE", required_if_eq("cert_mode", "files"))]
    tls_ca_file: Option<PathBuf>,
    /// Lifetime of the serving certificate the operator issues, in seconds.
    #[arg(long, env = "TOOLGATE_SERVING_CERT_SECONDS", default_value_t = 90 * 86_400)]
    serving_cert_seconds: u64,
    /// Lifetime of the CA the operator creates, in seconds.
    #[arg(long, env = "TOOLGATE_CA_CERT_SECONDS", default_value_t = 5 * 365 * 86_400)]
    ca_cert_seconds: u64,
    /// MutatingWebhookConfiguration whose caBundle the operator keeps current.
    #[arg(long, env = "TOOLGATE_WEBHOOK_CONFIG", default_value = "toolgate-operator")]
    webhook_config: String,
    /// ConfigMap (ca.crt) published into namespaces with injected pods.
    #[arg(long, env = "TOOLGATE_CA_CONFIG_MAP", default_value = "toolgate-ca")]
    ca_config_map: String,
    /// Image of the injected toolgate-proxy sidecar.
    #[arg(long, env = "TOOLGATE_SIDECAR_IMAGE", default_value = "ghcr.io/toolgate/toolgate-proxy:0.1.0")]
    sidecar_image: String,
    /// URL sidecars stream their policy from (default: https://SERVICE.NAMESPACE.svc:8443).
    #[arg(long, env = "TOOLGATE_SIDECAR_OPERATOR_URL")]
    sidecar_operator_url: Option<String>,
    /// Host names the injected sidecars' MCP port accepts besides its defaults (localhost,
    /// IP addresses, Service short names, *.svc, *.svc.cluster.local), comma-separated;
    /// `*.example.com` for subdomains. Passed as the sidecar's --allowed-hosts.
    #[arg(long, env = "TOOLGATE_SIDECAR_ALLOWED_HOSTS", value_delimiter = ',')]
    sidecar_allowed_hosts: Vec<String>,
    /// Origins the injected sidecars accept besides http(s) on localhost and the allowed
    /// hosts, comma-separated. Passed as the sidecar's --allowed-origins.
    #[arg(long, env = "TOOLGATE_SIDECAR_ALLOWED_ORIGINS", value_delimiter = ',')]
    sidecar_allowed_origins: Vec<String>,
    /// Default key, in the Secret a pod names with `toolgate.dev/upstream-credential-secret`,
    /// of the upstream credential its sidecar sets (`toolgate.dev/upstream-credential-key`
    /// overrides it per pod).
    #[arg(long, env = "TOOLGATE_SIDECAR_UPSTREAM_CREDENTIAL_KEY", default_value = "api-key")]
    sidecar_upstream_credential_key: String,
    /// Default header that carries the upstream credential (per pod:
    /// `toolgate.dev/upstream-credential-header`).
    #[arg(long, env = "TOOLGATE_SIDECAR_UPSTREAM_CREDENTIAL_HEADER", default_value = "authorization")]
    sidecar_upstream_credential_header: String,
    /// Default scheme written before the upstream credential; empty: the value as is (per
    /// pod: `toolgate.dev/upstream-credential-scheme`).
    #[arg(long, env = "TOOLGATE_SIDECAR_UPSTREAM_CREDENTIAL_SCHEME", default_value = "Bearer")]
    sidecar_upstream_credential_scheme: String,
    /// Injected sidecars authenticate callers by Kubernetes service-account tokens of this
    /// audience (a calling pod's projected token); passed as their --k8s-token-audience.
    #[arg(long, env = "TOOLGATE_SIDECAR_K8S_TOKEN_AUDIENCE")]
    sidecar_k8s_token_audience: Option<String>,
    /// The cluster's service-account issuer (the apiserver's --service-account-issuer),
    /// passed as the sidecars' --k8s-issuer with --sidecar-k8s-token-audience.
    #[arg(long, env = "TOOLGATE_SIDECAR_K8S_ISSUER", default_value = "https://kubernetes.default.svc.cluster.local")]
    sidecar_k8s_issuer: String,
    /// Shared counter store of the injected sidecars: a `redis://` or `rediss://` URL
    /// (Redis or Valkey) without a password. Unset: each sidecar counts rate limits in its
    /// own memory. See docs/operator.md, "Shared rate-limit counters".
    #[arg(long, env = "TOOLGATE_SIDECAR_COUNTER_STORE")]
    sidecar_counter_store: Option<String>,
    /// Base key prefix; each sidecar gets `<prefix><its namespace>/`.
    #[arg(long, env = "TOOLGATE_SIDECAR_COUNTER_STORE_PREFIX", default_value = "toolgate:")]
    sidecar_counter_store_prefix: String,
    /// Secret, in each injected pod's own namespace, with the store's `password` (and
    /// optionally `username` and `ca.crt`), mounted into the sidecar only.
    #[arg(long, env = "TOOLGATE_SIDECAR_COUNTER_STORE_SECRET", default_value = "toolgate-counter-store")]
    sidecar_counter_store_secret: String,
    /// The Secret holds `ca.crt`, the roots of a `rediss://` store's certificate.
    #[arg(long, env = "TOOLGATE_SIDECAR_COUNTER_STORE_CA", default_value_t = false, action = clap::ArgAction::Set)]
    sidecar_counter_store_ca: bool,
    /// The sidecars' --counter-store-on-failure: `closed`, `local` or `open`.
    #[arg(long, env = "TOOLGATE_SIDECAR_COUNTER_STORE_ON_FAILURE", default_value = "closed")]
    sidecar_counter_store_on_failure: String,
    /// The sidecars' --counter-store-timeout-ms.
    #[arg(long, env = "TOOLGATE_SIDECAR_COUNTER_STORE_TIMEOUT_MS", default_value_t = 250)]
    sidecar_counter_store_timeout_ms: u64,
    /// Seconds between heartbeats on idle policy streams.
    #[arg(long, env = "TOOLGATE_HEARTBEAT_SECONDS", default_value_t = 10)]
    heartbeat_seconds: u64,
    /// Seconds between HTTP/2 keepalive pings on idle connections of the HTTPS listener
    /// (sidecar streams).
    #[arg(long, env = "TOOLGATE_KEEPALIVE_SECONDS", default_value_t = 10)]
    keepalive_seconds: u64,
    /// Seconds a keepalive ping may go unanswered before the connection (and the sidecar's
    /// stream: it no longer counts as enforcing) is dropped.
    #[arg(long, env = "TOOLGATE_KEEPALIVE_TIMEOUT_SECONDS", default_value_t = 10)]
    keepalive_timeout_seconds: u64,
    /// Accept a sidecar's stream only from its pod's IP address (status.podIP/podIPs).
    /// Turn off only where pod-to-Service traffic is source-NATed (the token alone then
    /// identifies the pod, and anyone who can mint it can pose as the sidecar).
    #[arg(long, env = "TOOLGATE_BIND_POD_IP", default_value_t = true, action = clap::ArgAction::Set)]
    bind_pod_ip: bool,
    /// Govern only namespaces whose labels match this selector (e.g. `team=ml`); default:
    /// every namespace. Policies, streams and injection elsewhere are left alone.
    #[arg(long, env = "TOOLGATE_NAMESPACE_SELECTOR")]
    namespace_selector: Option<String>,
    /// Lease (in --namespace) used for leader election.
    #[arg(long, env = "TOOLGATE_LEASE_NAME", default_value = "toolgate-operator-leader")]
    lease_name: String,
    /// Seconds a leader lease is valid without renewal.
    #[arg(long, env = "TOOLGATE_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
    /// Which service accounts may approve or deny held calls: `any`, `other-namespaces`
    /// (not those of the pod's namespace, which its editors can impersonate) or `none`
    /// (people only). Listed accounts are always allowed.
    #[arg(long, env = "TOOLGATE_DECIDER_SERVICE_ACCOUNTS", default_value = "other-namespaces")]
    decider_service_accounts: ServiceAccountDeciders,
    /// Service accounts (NAMESPACE/NAME, comma-separated) that may decide approvals whatever
    /// --decider-service-accounts says; never the requesting pod's own.
    #[arg(long, env = "TOOLGATE_ALLOWED_DECIDER_SERVICE_ACCOUNTS", value_delimiter = ',')]
    allowed_decider_service_accounts: Vec<String>,
}

/// A flag that is wrong (the message names it).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// Everything the operator runs with, checked and clamped.
#[derive(Debug)]
pub struct Config {
    /// HTTPS listener (webhooks, sidecar streams).
    pub listen: SocketAddr,
    /// Plain HTTP listener (metrics, probes).
    pub admin_listen: SocketAddr,
    /// The operator's own namespace (TLS Secret, Leases).
    pub namespace: String,
    /// This replica's identity in leader election and acknowledgement reports.
    pub identity: String,
    /// Certificates, caBundle and CA ConfigMaps.
    pub duties: Duties,
    /// The sidecar the webhook injects.
    pub inject: InjectConfig,
    pub heartbeat: Duration,
    pub keepalive: Keepalive,
    pub bind_pod_ip: bool,
    /// `--namespace-selector`; `None`: every namespace.
    pub namespace_selector: Option<Selector>,
    /// The leader Lease's name and timing.
    pub lease_name: String,
    pub lease: Timing,
    /// Who may decide approvals; `operator_user` is filled in at start (a SelfSubjectReview).
    pub deciders: Deciders,
}

impl Config {
    /// Checks `args` (no I/O except reading `HOSTNAME` when `--pod-name` is not given).
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let namespace_selector = args.namespace_selector.as_deref().map(parse_selector).transpose()?;
        let allowed = args
            .allowed_decider_service_accounts
            .iter()
            .filter(|e| !e.trim().is_empty())
            .map(|e| Deciders::service_account_user(e))
            .collect::<Result<_, _>>()
            .map_err(|e| ConfigError(format!("--allowed-decider-service-accounts: {e}")))?;
        let deciders = Deciders { operator_user: None, service_accounts: args.decider_service_accounts, allowed };
        let identity = args
            .pod_name
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| format!("toolgate-operator-{}", std::process::id()));
        Ok(Self {
            listen: args.listen,
            admin_listen: args.admin_listen,
            identity,
            duties: Duties {
                certs: cert_config(&args)?,
                webhook_config: args.webhook_config.clone(),
                ca_config_map: args.ca_config_map.clone(),
            },
            inject: inject_config(&args)?,
            heartbeat: Duration::from_secs(args.heartbeat_seconds.max(1)),
            keepalive: Keepalive {
                interval: Duration::from_secs(args.keepalive_seconds.max(1)),
                timeout: Duration::from_secs(args.keepalive_timeout_seconds.max(1)),
            },
            bind_pod_ip: args.bind_pod_ip,
            namespace_selector,
            lease_name: args.lease_name,
            lease: Timing {
                duration: Duration::from_secs(args.lease_seconds.max(2)),
                renew: Duration::from_secs((args.lease_seconds / 7).clamp(1, 5)),
            },
            deciders,
            namespace: args.namespace,
        })
    }
}

/// `--cert-mode` and its files, the certificate's names and lifetimes.
fn cert_config(args: &Args) -> Result<CertConfig, ConfigError> {
    let source = match args.cert_mode {
        CertMode::Operator => CertSource::Operator { secret: args.tls_secret.clone() },
        CertMode::Files => {
            let file = |p: &Option<PathBuf>, flag: &str| {
                p.clone().ok_or_else(|| ConfigError(format!("{flag} is required with --cert-mode files")))
            };
            CertSource::Files {
                cert: file(&args.tls_cert_file, "--tls-cert-file")?,
                key: file(&args.tls_key_file, "--tls-key-file")?,
                ca: file(&args.tls_ca_file, "--tls-ca-file")?,
            }
        }
    };
    Ok(CertConfig {
        namespace: args.namespace.clone(),
        source,
        names: serving_names(args),
        lifetimes: Lifetimes {
            ca: Duration::from_secs(args.ca_cert_seconds.max(600)),
            serving: Duration::from_secs(args.serving_cert_seconds.max(10)),
        },
    })
}

/// The sidecar the webhook injects.
fn inject_config(args: &Args) -> Result<InjectConfig, ConfigError> {
    let operator_url = args
        .sidecar_operator_url
        .clone()
        .unwrap_or_else(|| format!("https://{}.{}.svc:{}", args.service_name, args.namespace, args.listen.port()));
    let trimmed = |items: &[String]| -> Vec<String> {
        items.iter().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty()).collect()
    };
    let inject = InjectConfig {
        image: args.sidecar_image.clone(),
        operator_url,
        ca_config_map: Some(args.ca_config_map.clone()),
        allowed_hosts: trimmed(&args.sidecar_allowed_hosts),
        allowed_origins: trimmed(&args.sidecar_allowed_origins),
        credential_key: args.sidecar_upstream_credential_key.trim().to_owned(),
        credential_header: args.sidecar_upstream_credential_header.trim().to_owned(),
        credential_scheme: args.sidecar_upstream_credential_scheme.trim().to_owned(),
        k8s_audience: args
            .sidecar_k8s_token_audience
            .as_deref()
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_owned),
        k8s_issuer: args.sidecar_k8s_issuer.trim().to_owned(),
        counter_store: counter_store(args)?,
        ..InjectConfig::default()
    };
    inject.check().map_err(ConfigError)?;
    Ok(inject)
}

/// The shared counter store the sidecars get, from the `--sidecar-counter-store*` flags;
/// a bad value stops the operator rather than inject sidecars that cannot start.
fn counter_store(args: &Args) -> Result<Option<CounterStoreConfig>, ConfigError> {
    let Some(url) = args.sidecar_counter_store.as_deref().map(str::trim).filter(|u| !u.is_empty()) else {
        return Ok(None);
    };
    let store = CounterStoreConfig {
        url: url.to_owned(),
        prefix: args.sidecar_counter_store_prefix.clone(),
        secret: args.sidecar_counter_store_secret.clone(),
        ca: args.sidecar_counter_store_ca,
        on_failure: args.sidecar_counter_store_on_failure.clone(),
        timeout_ms: args.sidecar_counter_store_timeout_ms,
    };
    store.validate().map_err(|e| ConfigError(format!("--sidecar-counter-store: {e}")))?;
    Ok(Some(store))
}

/// The DNS names (and addresses) of the serving certificate: the Service's names, the
/// host of `--webhook-url` and `--extra-san`, each once.
fn serving_names(args: &Args) -> Vec<String> {
    let (svc, ns) = (&args.service_name, &args.namespace);
    let mut names =
        vec![format!("{svc}.{ns}.svc"), svc.clone(), format!("{svc}.{ns}"), format!("{svc}.{ns}.svc.cluster.local")];
    if let Some(host) = args.webhook_url.as_ref().and_then(|u| u.host()) {
        names.push(host.trim_start_matches('[').trim_end_matches(']').to_owned());
    }
    names.extend(args.extra_sans.iter().filter(|s| !s.is_empty()).cloned());
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// `key=value[,key=value...]` (equality only) as a label selector.
fn parse_selector(text: &str) -> Result<Selector, ConfigError> {
    text.split(',')
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
            _ => Err(ConfigError(format!(
                "--namespace-selector: {pair:?} is not key=value (only equality selectors are supported)"
            ))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(flags: &[&str]) -> Result<Config, ConfigError> {
        let args = Args::try_parse_from(std::iter::once("toolgate-operator").chain(flags.iter().copied()))
            .map_err(|e| ConfigError(e.to_string()))?;
        Config::from_args(args)
    }

    #[test]
    fn bad_selectors_and_decider_lists_are_refused_before_anything_runs() {
        let e = config(&["--namespace-selector", "team"]).expect_err("no value");
        assert!(e.to_string().starts_with("--namespace-selector: \"team\""), "{e}");
        let e = config(&["--allowed-decider-service-accounts", "ops/bot,nope"]).expect_err("no namespace");
        assert!(e.to_string().starts_with("--allowed-decider-service-accounts: \"nope\""), "{e}");
        let ok =
            config(&["--namespace-selector", "team=ml, tier = a", "--allowed-decider-service-accounts", "ops/bot,"])
                .expect("valid");
        assert_eq!(ok.namespace_selector.map(|s| s.to_string()).as_deref(), Some("team=ml,tier=a"));
        assert_eq!(ok.deciders.allowed.into_iter().collect::<Vec<_>>(), ["system:serviceaccount:ops:bot"]);
        assert!(ok.deciders.operator_user.is_none(), "filled in at start, from the apiserver");
    }

    #[test]
    fn serving_names_cover_the_service_and_the_webhook_url_once() {
        let c = config(&[
            "--namespace",
            "tg",
            "--webhook-url",
            "https://[::1]:9443/",
            "--extra-san",
            "toolgate-operator,10.0.0.1",
        ])
        .expect("valid");
        assert_eq!(
            c.duties.certs.names,
            [
                "toolgate-operator.tg.svc",
                "toolgate-operator",
                "toolgate-operator.tg",
                "toolgate-operator.tg.svc.cluster.local",
                "::1",
                "10.0.0.1",
            ]
        );
        assert_eq!(c.inject.operator_url, "https://toolgate-operator.tg.svc:8443");
    }

    #[test]
    fn durations_are_clamped() {
        let c = config(&[
            "--lease-seconds",
            "0",
            "--heartbeat-seconds",
            "0",
            "--keepalive-seconds",
            "0",
            "--serving-cert-seconds",
            "1",
            "--ca-cert-seconds",
            "1",
        ])
        .expect("valid");
        assert_eq!((c.lease.duration, c.lease.renew), (Duration::from_secs(2), Duration::from_secs(1)));
        assert_eq!((c.heartbeat, c.keepalive.interval), (Duration::from_secs(1), Duration::from_secs(1)));
        assert_eq!(
            (c.duties.certs.lifetimes.serving, c.duties.certs.lifetimes.ca),
            (Duration::from_secs(10), Duration::from_secs(600))
        );
        let files = config(&["--cert-mode", "files"]);
        assert!(files.is_err(), "files mode needs its three files");
    }
}
