//! Sidecar injection as a pure function: a Pod (and its namespace's labels) in, a JSON
//! patch or the reason for not injecting out. The admission webhook only parses the
//! `AdmissionReview` and calls [`inject`]; everything that decides lives here and is tested
//! with JSON fixtures (`operator/tests/fixtures/inject/`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

/// Label (on a pod or its namespace) that asks for the sidecar: `enabled`.
pub const INJECT_LABEL: &str = "toolgate.dev/inject";
/// Annotation on a pod that opts out of a namespace-wide injection: `disabled`.
pub const INJECT_ANNOTATION: &str = "toolgate.dev/inject";
/// Annotation naming the port of the MCP server the sidecar forwards to.
pub const UPSTREAM_PORT_ANNOTATION: &str = "toolgate.dev/upstream-port";
/// Annotation with the MCP endpoint path of the upstream (default `/mcp`).
pub const UPSTREAM_PATH_ANNOTATION: &str = "toolgate.dev/upstream-path";
/// Marker set on injected pods; its presence makes re-invocation a no-op.
pub const INJECTED_ANNOTATION: &str = "toolgate.dev/injected";
/// Label set on injected pods (`true`), for selectors (PodMonitor, NetworkPolicy). It proves
/// nothing: the operator checks the pod spec ([`holds_injected_sidecar`]).
pub const INJECTED_LABEL: &str = "toolgate.dev/injected";
/// Name of the emptyDir where the sidecar persists its last good policy across restarts.
pub const STATE_VOLUME: &str = "toolgate-state";
/// Label on a namespace (`true`) that lets its pods opt out with the annotation. Only
/// namespace owners and cluster admins can label a namespace.
pub const ALLOW_OPT_OUT_LABEL: &str = "toolgate.dev/allow-opt-out";
/// Name of the injected container.
pub const CONTAINER_NAME: &str = "toolgate-proxy";
/// Annotation naming the Secret (in the pod's namespace) that holds the upstream's
/// credential: mounted read-only into the sidecar only, which sets it on every request
/// upstream (`--upstream-credential-file`); the app container never gets it.
pub const CREDENTIAL_SECRET_ANNOTATION: &str = "toolgate.dev/upstream-credential-secret";
/// The key of that Secret (default: the operator's `--sidecar-upstream-credential-key`).
pub const CREDENTIAL_KEY_ANNOTATION: &str = "toolgate.dev/upstream-credential-key";
/// The header that carries it upstream (default `--sidecar-upstream-credential-header`).
pub const CREDENTIAL_HEADER_ANNOTATION: &str = "toolgate.dev/upstream-credential-header";
/// The scheme written before it (default `--sidecar-upstream-credential-scheme`; empty: none).
pub const CREDENTIAL_SCHEME_ANNOTATION: &str = "toolgate.dev/upstream-credential-scheme";
/// Annotation naming a Secret (key `api-keys`) of caller API keys (`name sha256:<hex>`
/// lines): mounted into the sidecar only (`--api-keys-file`).
pub const API_KEYS_SECRET_ANNOTATION: &str = "toolgate.dev/api-keys-secret";
/// The key of the API-keys Secret.
pub const API_KEYS_KEY: &str = "api-keys";
/// Name of the injected volume with the upstream credential.
pub const CREDENTIAL_VOLUME: &str = "toolgate-upstream-credential";
/// Name of the injected volume with the caller API keys.
pub const API_KEYS_VOLUME: &str = "toolgate-api-keys";
/// Where the sidecar reads the upstream credential.
const CREDENTIAL_DIR: &str = "/var/run/secrets/toolgate-upstream";
/// Where the sidecar reads the API keys.
const API_KEYS_DIR: &str = "/var/run/secrets/toolgate-api-keys";
/// Name of the projected volume with the service-account token (audience `toolgate`).
pub const TOKEN_VOLUME: &str = "toolgate-token";
/// Audience of the projected token the sidecar presents to the operator.
pub const TOKEN_AUDIENCE: &str = "toolgate";
/// Name of the Secret volume with the shared counter store's password (and CA), when the
/// sidecars count rate limits in Redis/Valkey ([`CounterStoreConfig`]).
pub const STORE_VOLUME: &str = "toolgate-store";
/// Where [`STORE_VOLUME`] is mounted in the sidecar.
pub const STORE_MOUNT: &str = "/var/run/secrets/toolgate-store";
/// The label the API server sets on every Namespace: its name.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// What the injected container looks like; from the operator's flags or Helm values.
#[derive(Clone, Debug)]
pub struct InjectConfig {
    /// Image of `toolgate-proxy`.
    pub image: String,
    /// Where sidecars stream their policy from (the operator Service).
    pub operator_url: String,
    /// ConfigMap (in the pod's namespace) with `ca.crt`, the CA of the operator's serving
    /// certificate. `None`: the sidecar uses the system roots.
    pub ca_config_map: Option<String>,
    /// Port the sidecar serves MCP on (agents connect here).
    pub proxy_port: u16,
    /// Port of `/metrics`, `/healthz`, `/readyz`, `/policy`.
    pub admin_port: u16,
    /// Resource requests and limits of the sidecar (`cpu`, `memory`).
    pub requests: BTreeMap<String, String>,
    /// Resource limits of the sidecar.
    pub limits: BTreeMap<String, String>,
    /// Host names the sidecar's MCP port accepts besides its defaults (`--allowed-hosts`).
    pub allowed_hosts: Vec<String>,
    /// Origins the sidecar's MCP port accepts besides its defaults (`--allowed-origins`).
    pub allowed_origins: Vec<String>,
    /// Default key of the upstream-credential Secret.
    pub credential_key: String,
    /// Default header that carries the upstream credential.
    pub credential_header: String,
    /// Default scheme before the upstream credential (empty: the value as is).
    pub credential_scheme: String,
    /// Sidecars authenticate callers by Kubernetes service-account tokens of this audience
    /// (`--k8s-token-audience`); `None`: they do not.
    pub k8s_audience: Option<String>,
    /// The cluster's service-account issuer (`--k8s-issuer` of the sidecars).
    pub k8s_issuer: String,
    /// The shared counter store the sidecars count rate limits in; `None`: each sidecar
    /// counts in its own memory.
    pub counter_store: Option<CounterStoreConfig>,
}

impl InjectConfig {
    /// Whether the credential and identity defaults are usable (checked at start).
    pub fn check(&self) -> Result<(), String> {
        if !is_secret_key(&self.credential_key) {
            return Err(format!("--sidecar-upstream-credential-key {:?} is not a Secret key", self.credential_key));
        }
        if !is_token(&self.credential_header) {
            return Err(format!(
                "--sidecar-upstream-credential-header {:?} is not a header name",
                self.credential_header
            ));
        }
        if !(self.credential_scheme.is_empty() || is_token(&self.credential_scheme)) {
            return Err(format!("--sidecar-upstream-credential-scheme {:?} is not one word", self.credential_scheme));
        }
        if let Some(a) = &self.k8s_audience
            && (a.contains(char::is_whitespace) || a.contains(','))
        {
            return Err(format!("--sidecar-k8s-token-audience {a:?}: one audience, no spaces or commas"));
        }
        if !self.k8s_issuer.starts_with("https://") || self.k8s_issuer.contains(char::is_whitespace) {
            return Err(format!("--sidecar-k8s-issuer {:?} is not an https:// URL", self.k8s_issuer));
        }
        Ok(())
    }
}

/// The shared counter store (Redis/Valkey) the injected sidecars use (docs/operator.md,
/// "Shared rate-limit counters").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterStoreConfig {
    /// `redis://host:port[/db]` or `rediss://…`, without a password.
    pub url: String,
    /// Base key prefix: a sidecar's prefix is `<prefix><pod namespace>/`, so every sidecar
    /// enforcing the same McpPolicy (namespace and name) shares its counters and no two
    /// namespaces share a key.
    pub prefix: String,
    /// Secret in the pod's own namespace: `password`, optionally `username` and `ca.crt`.
    pub secret: String,
    /// The Secret holds `ca.crt`, the roots of a `rediss://` store's certificate.
    pub ca: bool,
    /// The sidecar's `--counter-store-on-failure`: `closed`, `local` or `open`.
    pub on_failure: String,
    /// The sidecar's `--counter-store-timeout-ms`.
    pub timeout_ms: u64,
}

impl CounterStoreConfig {
    /// Longest base prefix: with a 63-character namespace and `/` the sidecar's prefix
    /// stays within the 128 characters it accepts.
    pub const MAX_PREFIX: usize = 64;

    /// Checks what the sidecars would otherwise refuse at start (or leak): a clear error
    /// for the operator's flags.
    pub fn validate(&self) -> Result<(), String> {
        // The URL is never echoed: it might hold a password.
        let (scheme, rest) = self.url.split_once("://").unwrap_or_default();
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        if authority.contains('@') {
            return Err("the URL must not hold a user or password: it would be readable in every pod spec; \
                        put them in the Secret (keys username, password)"
                .to_owned());
        }
        if !matches!(scheme, "redis" | "rediss" | "redis+cluster" | "rediss+cluster" | "redis+sentinel")
            || authority.is_empty()
        {
            return Err("use a redis://host:port, rediss://host:port, redis+cluster://h1:p,h2:p, \
                        rediss+cluster://… or redis+sentinel://s1:p,s2:p/<master> URL"
                .to_owned());
        }
        if self.ca && !scheme.starts_with("rediss") {
            return Err("a CA is only used with a rediss:// or rediss+cluster:// URL".to_owned());
        }
        if self.prefix.len() > Self::MAX_PREFIX || self.prefix.contains(['{', '}', '*', '?', '[', ']', ' ']) {
            return Err(format!(
                "prefix {:?}: at most {} characters, without braces, glob characters or spaces",
                self.prefix,
                Self::MAX_PREFIX
            ));
        }
        if self.secret.is_empty() {
            return Err("the Secret name is empty".to_owned());
        }
        if !matches!(self.on_failure.as_str(), "closed" | "local" | "open") {
            return Err(format!("on-failure {:?}: closed, local or open", self.on_failure));
        }
        if self.timeout_ms == 0 || self.timeout_ms > 60_000 {
            return Err(format!("timeout {} ms: from 1 to 60000", self.timeout_ms));
        }
        Ok(())
    }

    /// The key prefix of the sidecars in `namespace`.
    pub fn prefix_for(&self, namespace: &str) -> String {
        format!("{}{namespace}/", self.prefix)
    }
}

impl Default for InjectConfig {
    fn default() -> Self {
        let map = |cpu: &str, mem: &str| BTreeMap::from([("cpu".into(), cpu.into()), ("memory".into(), mem.into())]);
        Self {
            image: "ghcr.io/toolgate/toolgate-proxy:0.1.0".into(),
            operator_url: "https://toolgate-operator.toolgate-system.svc:8443".into(),
            ca_config_map: Some("toolgate-ca".into()),
            proxy_port: 15080,
            admin_port: 15090,
            requests: map("50m", "32Mi"),
            limits: map("1", "128Mi"),
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            credential_key: "api-key".into(),
            credential_header: "authorization".into(),
            credential_scheme: "Bearer".into(),
            k8s_audience: None,
            k8s_issuer: "https://kubernetes.default.svc.cluster.local".into(),
            counter_store: None,
        }
    }
}

/// Why a pod is not patched (a metric label, so few and stable). Some pods are admitted
/// unchanged ([`Skip::refused`] is false); every other selected pod that cannot get the
/// sidecar is refused: in a namespace that opted in, no pod runs unprotected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Skip {
    /// Neither the pod nor its namespace is labelled `toolgate.dev/inject=enabled`.
    NotSelected,
    /// The pod is annotated `toolgate.dev/inject: disabled` and its namespace carries
    /// `toolgate.dev/allow-opt-out=true` (set by the namespace owner, not the pod author).
    OptedOut,
    /// The pod already holds exactly the sidecar this webhook injects (re-invocation, or an
    /// injected pod submitted again): admitted unchanged.
    AlreadyInjected,
    /// Refused: the pod is annotated `toolgate.dev/inject: disabled` but its namespace does
    /// not allow opting out.
    OptOutNotAllowed,
    /// Refused: the marker annotation is set but the injected sidecar is not there as the
    /// webhook would inject it.
    FakeMarker,
    /// Refused: a container or init container named `toolgate-proxy` that is not the
    /// injected sidecar.
    ForeignSidecar,
    /// Refused: no `toolgate.dev/upstream-port` annotation and no container port.
    NoUpstreamPort,
    /// Refused: `toolgate.dev/upstream-port` is not a port number.
    BadUpstreamPort,
    /// Refused: the pod uses the host network, where the sidecar's ports would be the node's.
    HostNetwork,
    /// Refused: an upstream-credential or API-keys annotation is not a valid Secret name,
    /// key, header name or scheme.
    BadCredentialAnnotation,
    /// Refused: a container other than the sidecar mounts one of the sidecar's volumes (its
    /// operator token, state, upstream credential or API keys), or the pod declares a volume
    /// of one of those names itself.
    SidecarVolumeInApp,
    /// Refused: the sidecars count in a shared store, whose key prefix names the pod's
    /// namespace, and the namespace is not known.
    NoNamespace,
}

impl Skip {
    /// The metric label / log reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::NotSelected => "not_selected",
            Skip::OptedOut => "opted_out",
            Skip::AlreadyInjected => "already_injected",
            Skip::OptOutNotAllowed => "opt_out_not_allowed",
            Skip::FakeMarker => "fake_marker",
            Skip::ForeignSidecar => "foreign_sidecar",
            Skip::NoUpstreamPort => "no_upstream_port",
            Skip::BadUpstreamPort => "bad_upstream_port",
            Skip::HostNetwork => "host_network",
            Skip::BadCredentialAnnotation => "bad_credential_annotation",
            Skip::SidecarVolumeInApp => "sidecar_volume_in_app",
            Skip::NoNamespace => "no_namespace",
        }
    }

    /// Whether the pod is refused (rather than admitted unchanged).
    pub fn refused(self) -> bool {
        !matches!(self, Skip::NotSelected | Skip::OptedOut | Skip::AlreadyInjected)
    }

    /// The webhook's result label: the reason, prefixed `refused_` for a refusal.
    pub fn metric_label(self) -> &'static str {
        match self {
            Skip::NotSelected | Skip::OptedOut | Skip::AlreadyInjected => self.as_str(),
            Skip::OptOutNotAllowed => "refused_opt_out_not_allowed",
            Skip::FakeMarker => "refused_fake_marker",
            Skip::ForeignSidecar => "refused_foreign_sidecar",
            Skip::NoUpstreamPort => "refused_no_upstream_port",
            Skip::BadUpstreamPort => "refused_bad_upstream_port",
            Skip::HostNetwork => "refused_host_network",
            Skip::BadCredentialAnnotation => "refused_bad_credential_annotation",
            Skip::SidecarVolumeInApp => "refused_sidecar_volume_in_app",
            Skip::NoNamespace => "refused_no_namespace",
        }
    }

    /// Why a refused pod is refused and how to fix it (the admission message).
    pub fn message(self) -> String {
        match self {
            Skip::NotSelected | Skip::OptedOut | Skip::AlreadyInjected => {
                format!("toolgate: not injected ({})", self.as_str())
            }
            Skip::OptOutNotAllowed => format!(
                "toolgate: the pod is annotated {INJECT_ANNOTATION}: disabled but its namespace does not allow \
                 opting out of the toolgate sidecar: remove the annotation, or have the namespace owner label \
                 the namespace {ALLOW_OPT_OUT_LABEL}=true"
            ),
            Skip::FakeMarker => format!(
                "toolgate: the pod carries the {INJECTED_ANNOTATION} annotation without the sidecar the webhook \
                 injects: remove the annotation (and any {CONTAINER_NAME} container) and let the webhook inject it"
            ),
            Skip::ForeignSidecar => format!(
                "toolgate: the pod has a container named {CONTAINER_NAME} that is not the sidecar the webhook \
                 injects: rename the container (the name is reserved for the injected sidecar)"
            ),
            Skip::NoUpstreamPort => format!(
                "toolgate: the pod declares no container port, so the sidecar has no upstream: add a \
                 containerPort or the {UPSTREAM_PORT_ANNOTATION} annotation"
            ),
            Skip::BadUpstreamPort => format!(
                "toolgate: the {UPSTREAM_PORT_ANNOTATION} annotation is not a port number (1-65535): fix the \
                 annotation"
            ),
            Skip::HostNetwork => "toolgate: the pod uses hostNetwork: true, where the sidecar's ports would be \
                 the node's and other pods could reach the MCP server past it: run the pod without hostNetwork"
                .to_owned(),
            Skip::BadCredentialAnnotation => format!(
                "toolgate: an annotation {CREDENTIAL_SECRET_ANNOTATION}, {CREDENTIAL_KEY_ANNOTATION}, \
                 {CREDENTIAL_HEADER_ANNOTATION}, {CREDENTIAL_SCHEME_ANNOTATION} or {API_KEYS_SECRET_ANNOTATION} is \
                 not valid (a Secret name, a Secret key, an HTTP header name, a scheme word): fix the annotation"
            ),
            Skip::SidecarVolumeInApp => format!(
                "toolgate: a container of the pod mounts, or the pod declares, a volume named {TOKEN_VOLUME}, \
                 {STATE_VOLUME}, {STORE_VOLUME}, {CREDENTIAL_VOLUME} or {API_KEYS_VOLUME}: these are the {CONTAINER_NAME} \
                 sidecar's alone (the upstream credential must never reach the app): remove that volume and \
                 mount, and name the Secret with the {CREDENTIAL_SECRET_ANNOTATION} annotation instead"
            ),
            Skip::NoNamespace => "toolgate: the pod's namespace is not known, and the sidecar's shared rate-limit \
                 counters are keyed by it: create the pod in a namespace"
                .to_owned(),
        }
    }
}

/// The patch that adds the sidecar to `pod`, or why it is not patched (admitted unchanged
/// or refused: see [`Skip::refused`]).
pub fn inject(
    pod: &Pod,
    namespace_labels: &BTreeMap<String, String>,
    config: &InjectConfig,
) -> Result<json_patch::Patch, Skip> {
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let enabled = |m: &BTreeMap<String, String>| m.get(INJECT_LABEL).is_some_and(|v| v == "enabled");
    if !enabled(labels) && !enabled(namespace_labels) {
        return Err(Skip::NotSelected);
    }
    if annotations.get(INJECT_ANNOTATION).is_some_and(|v| v == "disabled") {
        // Opting out is the namespace owner's decision: only they can label the namespace.
        return if namespace_labels.get(ALLOW_OPT_OUT_LABEL).is_some_and(|v| v == "true") {
            Err(Skip::OptedOut)
        } else {
            Err(Skip::OptOutNotAllowed)
        };
    }
    let spec = pod.spec.as_ref().ok_or(Skip::NoUpstreamPort)?;
    if spec.host_network == Some(true) {
        return Err(Skip::HostNetwork);
    }
    let init = spec.init_containers.as_deref().unwrap_or_default();
    let upstream_port = match annotations.get(UPSTREAM_PORT_ANNOTATION) {
        Some(v) => v.trim().parse::<u16>().ok().filter(|p| *p != 0).ok_or(Skip::BadUpstreamPort)?,
        None => spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .next()
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or(Skip::NoUpstreamPort)?,
    };
    let path = annotations.get(UPSTREAM_PATH_ANNOTATION).map(String::as_str).unwrap_or("/mcp");
    let credentials = Credentials::from_annotations(annotations, config)?;
    let mut container = sidecar(config, upstream_port, path, &credentials);
    if let Some(store) = &config.counter_store {
        let namespace = pod_namespace(pod, namespace_labels).ok_or(Skip::NoNamespace)?;
        with_counter_store(&mut container, store, namespace);
    }
    let volumes = injected_volumes(config, &credentials);

    // The sidecar's volumes are the sidecar's: an app container that mounts one (the
    // webhook would add the volume its mount names) would get the upstream key or the
    // sidecar's operator token.
    let mounts_reserved = |mounts: Option<&Vec<k8s_openapi::api::core::v1::VolumeMount>>| {
        mounts.into_iter().flatten().any(|m| RESERVED_VOLUMES.contains(&m.name.as_str()))
    };
    if init
        .iter()
        .chain(&spec.containers)
        .any(|c| c.name != CONTAINER_NAME && mounts_reserved(c.volume_mounts.as_ref()))
        || spec.ephemeral_containers.iter().flatten().any(|c| mounts_reserved(c.volume_mounts.as_ref()))
    {
        return Err(Skip::SidecarVolumeInApp);
    }

    let marked = annotations.contains_key(INJECTED_ANNOTATION);
    let named = |c: &&k8s_openapi::api::core::v1::Container| c.name == CONTAINER_NAME;
    if marked || init.iter().chain(&spec.containers).any(|c| named(&c)) {
        // Admitted unchanged only when it is exactly what this webhook injects: the marker,
        // the sidecar first among the init containers (and nowhere else), and its volumes.
        let ours = marked
            && init.first().is_some_and(|c| is_injected(c, &container))
            && init.iter().skip(1).chain(&spec.containers).all(|c| !named(&c))
            && volumes.iter().all(|want| {
                spec.volumes.iter().flatten().filter(|v| v.name == want["name"]).count() == 1
                    && spec.volumes.iter().flatten().any(|v| {
                        v.name == want["name"] && serde_json::to_value(v).is_ok_and(|got| matches_injected(want, &got))
                    })
            });
        return Err(if ours {
            Skip::AlreadyInjected
        } else if marked && !init.iter().chain(&spec.containers).any(|c| named(&c)) {
            Skip::FakeMarker
        } else {
            Skip::ForeignSidecar
        });
    }

    if spec.volumes.iter().flatten().any(|v| RESERVED_VOLUMES.contains(&v.name.as_str())) {
        return Err(Skip::SidecarVolumeInApp);
    }
    let mut ops = Vec::new();
    // First among the init containers, so that it also serves the ones after it.
    if init.is_empty() {
        ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [container]}));
    } else {
        ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": container}));
    }
    if spec.volumes.as_ref().is_none_or(Vec::is_empty) {
        ops.push(json!({"op": "add", "path": "/spec/volumes", "value": volumes}));
    } else {
        for volume in volumes {
            ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume}));
        }
    }
    if pod.metadata.labels.is_none() {
        ops.push(json!({"op": "add", "path": "/metadata/labels", "value": {INJECTED_LABEL: "true"}}));
    } else {
        ops.push(json!({"op": "add", "path": format!("/metadata/labels/{}", escape(INJECTED_LABEL)), "value": "true"}));
    }
    let mut add = BTreeMap::from([(INJECTED_ANNOTATION.to_owned(), env!("CARGO_PKG_VERSION").to_owned())]);
    // Scrape annotations only where the pod has none: never redirect the app's own metrics.
    if !annotations.keys().any(|k| k.starts_with("prometheus.io/")) {
        add.insert("prometheus.io/scrape".into(), "true".into());
        add.insert("prometheus.io/port".into(), config.admin_port.to_string());
        add.insert("prometheus.io/path".into(), "/metrics".into());
    }
    if pod.metadata.annotations.is_none() {
        ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": add}));
    } else {
        for (k, v) in add {
            ops.push(json!({"op": "add", "path": format!("/metadata/annotations/{}", escape(&k)), "value": v}));
        }
    }
    // The operations above are well-formed by construction.
    Ok(serde_json::from_value(Value::Array(ops)).expect("valid JSON patch operations"))
}

/// Whether `pod`'s spec holds exactly the sidecar this operator's webhook injects (image,
/// args, env, mounts, volumes, as [`inject`] checks an already injected pod), whatever its
/// labels and annotations say. Only such a pod may open a policy stream and count as
/// protected: a hand-set `toolgate.dev/injected` label or marker proves nothing. A pod
/// injected with another configuration (an older operator's image or flags) does not
/// match until it is recreated.
pub fn holds_injected_sidecar(pod: &Pod, config: &InjectConfig) -> bool {
    let mut pod = pod.clone();
    // Labels and annotations that would make `inject` skip or refuse before it looks at
    // the containers; the namespace is taken as opted in.
    if let Some(annotations) = pod.metadata.annotations.as_mut() {
        annotations.remove(INJECT_ANNOTATION);
    }
    let opted_in = BTreeMap::from([(INJECT_LABEL.to_owned(), "enabled".to_owned())]);
    matches!(inject(&pod, &opted_in, config), Err(Skip::AlreadyInjected))
}

/// JSON Pointer escaping of one path segment (RFC 6901).
fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// The sidecar's own API token and the cluster's CA, in the toolgate-token volume.
const KUBE_API_TOKEN: &str = "kube-api-token";
const KUBE_CA: &str = "kube-ca.crt";

/// The volumes only the sidecar mounts.
const RESERVED_VOLUMES: [&str; 5] = [TOKEN_VOLUME, STATE_VOLUME, STORE_VOLUME, CREDENTIAL_VOLUME, API_KEYS_VOLUME];

/// The upstream credential a pod's annotations name.
#[derive(Clone, Debug, PartialEq, Eq)]
struct UpstreamCredential {
    secret: String,
    key: String,
    header: String,
    scheme: String,
}

/// The Secrets a pod's annotations give its sidecar.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Credentials {
    upstream: Option<UpstreamCredential>,
    api_keys_secret: Option<String>,
}

impl Credentials {
    /// From the annotations (defaults from `config`); a bad value refuses the pod. The
    /// key, header and scheme annotations without the Secret annotation are refused too:
    /// they would silently do nothing.
    fn from_annotations(annotations: &BTreeMap<String, String>, config: &InjectConfig) -> Result<Self, Skip> {
        let get = |k: &str| annotations.get(k).map(|v| v.trim());
        let bad = Skip::BadCredentialAnnotation;
        let upstream = match get(CREDENTIAL_SECRET_ANNOTATION) {
            None => {
                if [CREDENTIAL_KEY_ANNOTATION, CREDENTIAL_HEADER_ANNOTATION, CREDENTIAL_SCHEME_ANNOTATION]
                    .iter()
                    .any(|k| annotations.contains_key(*k))
                {
                    return Err(bad);
                }
                None
            }
            Some(secret) => {
                let key = get(CREDENTIAL_KEY_ANNOTATION).unwrap_or(&config.credential_key);
                let header = get(CREDENTIAL_HEADER_ANNOTATION).unwrap_or(&config.credential_header);
                let scheme = get(CREDENTIAL_SCHEME_ANNOTATION).unwrap_or(&config.credential_scheme);
                if !is_secret_name(secret)
                    || !is_secret_key(key)
                    || !is_token(header)
                    || !(scheme.is_empty() || is_token(scheme))
                {
                    return Err(bad);
                }
                Some(UpstreamCredential {
                    secret: secret.to_owned(),
                    key: key.to_owned(),
                    header: header.to_ascii_lowercase(),
                    scheme: scheme.to_owned(),
                })
            }
        };
        let api_keys_secret = match get(API_KEYS_SECRET_ANNOTATION) {
            None => None,
            Some(s) if is_secret_name(s) => Some(s.to_owned()),
            Some(_) => return Err(bad),
        };
        Ok(Self { upstream, api_keys_secret })
    }
}

/// A Secret name: an RFC 1123 subdomain.
fn is_secret_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A Secret's data key.
fn is_secret_key(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

/// An HTTP token (RFC 9110): a header name or an auth scheme.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The volumes the webhook adds.
fn injected_volumes(config: &InjectConfig, credentials: &Credentials) -> Vec<Value> {
    let mut volumes = vec![token_volume(config), state_volume()];
    if let Some(c) = &credentials.upstream {
        volumes.push(json!({"name": CREDENTIAL_VOLUME, "secret": {
            "secretName": c.secret, "items": [{"key": c.key, "path": "credential"}]}}));
    }
    if let Some(secret) = &credentials.api_keys_secret {
        volumes.push(json!({"name": API_KEYS_VOLUME, "secret": {
            "secretName": secret, "items": [{"key": API_KEYS_KEY, "path": API_KEYS_KEY}]}}));
    }
    if let Some(store) = &config.counter_store {
        volumes.push(store_volume(store));
    }
    volumes
}

fn sidecar(config: &InjectConfig, upstream_port: u16, path: &str, credentials: &Credentials) -> Value {
    let mut args = vec![
        format!("--listen=0.0.0.0:{}", config.proxy_port),
        format!("--admin-listen=0.0.0.0:{}", config.admin_port),
        format!("--upstream=http://127.0.0.1:{upstream_port}{path}"),
        format!("--operator={}", config.operator_url),
        "--token-file=/var/run/secrets/toolgate/token".to_owned(),
        "--state-dir=/var/lib/toolgate".to_owned(),
    ];
    if config.ca_config_map.is_some() {
        args.push("--ca-file=/var/run/secrets/toolgate/ca.crt".into());
    }
    if !config.allowed_hosts.is_empty() {
        args.push(format!("--allowed-hosts={}", config.allowed_hosts.join(",")));
    }
    if !config.allowed_origins.is_empty() {
        args.push(format!("--allowed-origins={}", config.allowed_origins.join(",")));
    }
    let mut mounts = vec![
        json!({"name": TOKEN_VOLUME, "mountPath": "/var/run/secrets/toolgate", "readOnly": true}),
        json!({"name": STATE_VOLUME, "mountPath": "/var/lib/toolgate"}),
    ];
    if let Some(audience) = &config.k8s_audience {
        // The cluster's keys are read with the sidecar's own API token and trusted by the
        // cluster's CA, both in the toolgate-token volume (the pod's own API token mount
        // may be off: automountServiceAccountToken).
        args.push(format!("--k8s-token-audience={audience}"));
        args.push(format!("--k8s-issuer={}", config.k8s_issuer));
        args.push(format!("--k8s-api-token-file=/var/run/secrets/toolgate/{KUBE_API_TOKEN}"));
        args.push(format!("--k8s-ca-file=/var/run/secrets/toolgate/{KUBE_CA}"));
    }
    if let Some(c) = &credentials.upstream {
        args.push(format!("--upstream-credential-file={CREDENTIAL_DIR}/credential"));
        args.push(format!("--upstream-credential-header={}", c.header));
        args.push(format!("--upstream-credential-scheme={}", c.scheme));
        mounts.push(json!({"name": CREDENTIAL_VOLUME, "mountPath": CREDENTIAL_DIR, "readOnly": true}));
    }
    if credentials.api_keys_secret.is_some() {
        args.push(format!("--api-keys-file={API_KEYS_DIR}/{API_KEYS_KEY}"));
        mounts.push(json!({"name": API_KEYS_VOLUME, "mountPath": API_KEYS_DIR, "readOnly": true}));
    }
    json!({
        "name": CONTAINER_NAME,
        "image": config.image,
        "args": args,
        // A native sidecar: started before, and kept running alongside, the app containers.
        "restartPolicy": "Always",
        "env": [{"name": "TOOLGATE_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "ports": [
            {"name": "toolgate-mcp", "containerPort": config.proxy_port, "protocol": "TCP"},
            {"name": "toolgate-admin", "containerPort": config.admin_port, "protocol": "TCP"},
        ],
        // Ready only once a policy is loaded: until then every call would be refused.
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": config.admin_port}, "periodSeconds": 2},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": config.admin_port}, "periodSeconds": 10},
        "resources": {"requests": config.requests, "limits": config.limits},
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    })
}

/// Fields the apiserver fills in with defaults on what the webhook injects; any value is
/// accepted there when checking an already injected pod. Everything else must be as
/// injected, and nothing else may be added (a `command`, another volume mount, ...).
const DEFAULTED: &[&str] = &[
    "terminationMessagePath",
    "terminationMessagePolicy",
    "imagePullPolicy",
    "timeoutSeconds",
    "successThreshold",
    "failureThreshold",
    "scheme",
    "apiVersion",
    "defaultMode",
];

/// Where the apiserver's ServiceAccount admission mounts the pod's API token into every
/// container, the sidecar included (after the webhook, hence seen on re-invocation).
const SERVICE_ACCOUNT_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

fn is_injected(container: &k8s_openapi::api::core::v1::Container, want: &Value) -> bool {
    let Ok(mut got) = serde_json::to_value(container) else { return false };
    // The API token mount is the only mount the sidecar may have beyond its own: read-only,
    // at the ServiceAccount path (the sidecar does not read it).
    if let Some(mounts) = got.get_mut("volumeMounts").and_then(Value::as_array_mut) {
        mounts.retain(|m| {
            !(m["mountPath"] == SERVICE_ACCOUNT_MOUNT
                && m["readOnly"] == true
                && m["name"].as_str().is_some_and(|n| n.starts_with("kube-api-access-"))
                && m.as_object().is_some_and(|o| o.len() == 3))
        });
    }
    matches_injected(want, &got)
}

/// `got` is `want` up to the fields the apiserver defaults ([`DEFAULTED`]).
fn matches_injected(want: &Value, got: &Value) -> bool {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            w.iter().all(|(k, wv)| g.get(k).is_some_and(|gv| matches_injected(wv, gv)))
                && g.keys().all(|k| w.contains_key(k) || DEFAULTED.contains(&k.as_str()))
        }
        (Value::Array(w), Value::Array(g)) => {
            w.len() == g.len() && w.iter().zip(g).all(|(a, b)| matches_injected(a, b))
        }
        // Quantities come back normalised by the apiserver only when they are not already
        // canonical; the injected ones are canonical.
        _ => want == got,
    }
}

fn state_volume() -> Value {
    json!({"name": STATE_VOLUME, "emptyDir": {"sizeLimit": "16Mi"}})
}

fn token_volume(config: &InjectConfig) -> Value {
    let mut sources = vec![json!({"serviceAccountToken": {
        "audience": TOKEN_AUDIENCE, "expirationSeconds": 3600, "path": "token"}})];
    if let Some(name) = &config.ca_config_map {
        sources.push(json!({"configMap": {"name": name, "items": [{"key": "ca.crt", "path": "ca.crt"}]}}));
    }
    if config.k8s_audience.is_some() {
        // No audience: the apiserver's own, for reading /openid/v1/jwks.
        sources.push(json!({"serviceAccountToken": {"expirationSeconds": 3600, "path": KUBE_API_TOKEN}}));
        sources.push(json!({"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": KUBE_CA}]}}));
    }
    json!({"name": TOKEN_VOLUME, "projected": {"sources": sources}})
}

/// The pod's namespace: the API server's `kubernetes.io/metadata.name` label of the
/// namespace the pod is created in, else the pod's own `metadata.namespace`.
fn pod_namespace<'a>(pod: &'a Pod, namespace_labels: &'a BTreeMap<String, String>) -> Option<&'a str> {
    namespace_labels
        .get(NAMESPACE_NAME_LABEL)
        .map(String::as_str)
        .or(pod.metadata.namespace.as_deref())
        .filter(|n| !n.is_empty())
}

/// The sidecar counts rate limits in the shared store: its URL, a key prefix of its own
/// namespace (McpPolicies are namespaced; the proxy keys counters by McpPolicy name), the
/// password file and CA from the Secret volume, the user name from the Secret if it has one.
fn with_counter_store(container: &mut Value, store: &CounterStoreConfig, namespace: &str) {
    let mut args = vec![
        format!("--counter-store={}", store.url),
        format!("--counter-store-prefix={}", store.prefix_for(namespace)),
        format!("--counter-store-password-file={STORE_MOUNT}/password"),
        format!("--counter-store-on-failure={}", store.on_failure),
        format!("--counter-store-timeout-ms={}", store.timeout_ms),
    ];
    if store.ca {
        args.push(format!("--counter-store-ca-file={STORE_MOUNT}/ca.crt"));
    }
    if let Some(list) = container["args"].as_array_mut() {
        list.extend(args.into_iter().map(Value::String));
    }
    if let Some(env) = container["env"].as_array_mut() {
        env.push(json!({"name": "TOOLGATE_COUNTER_STORE_USERNAME", "valueFrom": {"secretKeyRef": {
            "name": store.secret, "key": "username", "optional": true}}}));
    }
    if let Some(mounts) = container["volumeMounts"].as_array_mut() {
        mounts.push(json!({"name": STORE_VOLUME, "mountPath": STORE_MOUNT, "readOnly": true}));
    }
}

/// The store's Secret, only the keys the sidecar reads. Not optional: without the Secret
/// the pod does not start (rather than run with limits it cannot count).
fn store_volume(store: &CounterStoreConfig) -> Value {
    let mut items = vec![json!({"key": "password", "path": "password"})];
    if store.ca {
        items.push(json!({"key": "ca.crt", "path": "ca.crt"}));
    }
    json!({"name": STORE_VOLUME, "secret": {"secretName": store.secret, "items": items}})
}
