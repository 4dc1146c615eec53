//! `toolgate`: check and dry-run policies without a cluster.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use toolgate_policy::{Call, Caller, Limiter, Policy, SourceFormat};

mod approvals;
mod scan;

#[derive(Parser, Debug)]
#[command(
    name = "toolgate",
    version,
    about = "Deterministic rules for MCP tool calls: check and dry-run policies, decide approvals"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate policy files (YAML or JSON, native or Intercept); exit 1 if any is invalid.
    Validate {
        /// Policy files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Dry-run the decision for one tool call and print it as JSON.
    Eval {
        /// Policy file; repeat to apply several documents together.
        #[arg(long = "policy", short = 'p', required = true)]
        policies: Vec<PathBuf>,
        /// Tool name.
        #[arg(long)]
        tool: String,
        /// The call's arguments as a JSON object.
        #[arg(long, default_value = "{}")]
        args: String,
        /// Caller identity: a `sha256:` fingerprint or any name (default: anonymous).
        #[arg(long, conflicts_with = "credential")]
        identity: Option<String>,
        /// Caller credential (the Authorization header value); only its fingerprint is used
        /// (any spelling of the scheme: see `toolgate fingerprint --help`).
        #[arg(long)]
        credential: Option<String>,
        /// MCP session id (for `scope: session` limits).
        #[arg(long)]
        session: Option<String>,
        /// A request header `NAME=VALUE` (for grants matched by header); repeatable.
        #[arg(long = "header", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        /// Dry-run as an authenticated token subject (`sub`); with `--issuer` and `--claims`.
        #[arg(long, conflicts_with_all = ["service_account", "api_key", "identity", "credential"])]
        subject: Option<String>,
        /// The token's issuer, for `--subject` (only part of the caller's stable identity).
        #[arg(long, default_value = "https://issuer.example", requires = "subject")]
        issuer: String,
        /// Verified token claims as a JSON object (for grants matched by `claims`), with
        /// `--subject` or `--service-account`.
        #[arg(long)]
        claims: Option<String>,
        /// Dry-run as a Kubernetes service account `namespace/name`.
        #[arg(long, conflicts_with_all = ["api_key", "identity", "credential"])]
        service_account: Option<String>,
        /// Dry-run as the API key of this name (its name in the proxy's key file).
        #[arg(long, conflicts_with_all = ["identity", "credential"])]
        api_key: Option<String>,
        /// Decide N identical calls in a row (at the same instant) and print the N-th,
        /// to see limits at work.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        count: u64,
    },
    /// Turn a PolicyLayer JSON, Intercept YAML or native file into an McpPolicy manifest.
    Convert {
        /// Policy file.
        file: PathBuf,
        /// metadata.name (default: derived from the file name).
        #[arg(long)]
        name: Option<String>,
        /// metadata.namespace.
        #[arg(long)]
        namespace: Option<String>,
    },
    /// Connect to a live MCP server, read its tools/list (every page) and print a policy
    /// scaffold: each tool with its description and parameters as comments, a suggested
    /// class (read, write, execute, destructive) and a conservative rule per class.
    Scan {
        /// A Streamable-HTTP MCP endpoint, e.g. http://127.0.0.1:3000/mcp.
        #[arg(long, conflicts_with = "command")]
        upstream: Option<String>,
        /// A request header `NAME: VALUE` for --upstream (e.g. "Authorization: Bearer …"); repeatable.
        #[arg(long = "header", requires = "upstream")]
        headers: Vec<String>,
        /// Write the scaffold here instead of stdout.
        #[arg(long, short = 'o')]
        output: Option<PathBuf>,
        /// The MCP server to run over stdio, after `--`.
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// List McpApprovals waiting for a decision (with --all, decided ones too).
    Approvals {
        /// Namespace (default: the kubeconfig's).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// Every namespace.
        #[arg(long, short = 'A')]
        all_namespaces: bool,
        /// Include decided approvals.
        #[arg(long)]
        all: bool,
    },
    /// Approve a held tool call: the sidecar forwards it.
    Approve {
        /// The McpApproval's name.
        name: String,
        /// Namespace (default: the kubeconfig's).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// Why (recorded in status.reason).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Deny a held tool call: the agent gets a refusal naming the approval.
    Deny {
        /// The McpApproval's name.
        name: String,
        /// Namespace (default: the kubeconfig's).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// Why (recorded in status.reason and shown to the agent).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Print the identity fingerprint of a credential (the Authorization header value),
    /// for `grants[].match.fingerprints`. Reads the credential from stdin when omitted.
    ///
    /// Every spelling of one credential has one fingerprint, as in the proxy: the scheme's
    /// case and the spaces or tabs around the value and after the scheme do not count
    /// (`bearer abc`, `BEARER  abc` and `Bearer abc` print the same); the credential after
    /// the scheme is case-sensitive.
    Fingerprint {
        /// The credential, e.g. "Bearer abc". Prefer stdin to keep it out of shell history.
        credential: Option<String>,
    },
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not NAME=VALUE"))?;
    Ok((k.trim().to_ascii_lowercase(), v.to_owned()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn read(path: &Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.len() > toolgate_policy::MAX_DOCUMENT_BYTES as u64 {
        bail!("{}: {} bytes; the limit is {} bytes", path.display(), meta.len(), toolgate_policy::MAX_DOCUMENT_BYTES);
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8 text", path.display()))
}

fn doc_name(path: &Path) -> String {
    path.file_name().map_or_else(|| "policy".to_owned(), |n| n.to_string_lossy().into_owned())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")
}

fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Validate { files } => Ok(validate(&files)),
        Command::Approvals { namespace, all_namespaces, all } => {
            runtime()?.block_on(approvals::list(namespace, all_namespaces, all))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Approve { name, namespace, reason } => {
            runtime()?.block_on(approvals::decide(&name, namespace, true, reason))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Deny { name, namespace, reason } => {
            runtime()?.block_on(approvals::decide(&name, namespace, false, reason))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval {
            policies,
            tool,
            args,
            identity,
            credential,
            session,
            headers,
            subject,
            issuer,
            claims,
            service_account,
            api_key,
            count,
        } => {
            let mut docs = Vec::new();
            for p in &policies {
                let text = read(p)?;
                let doc = toolgate_policy::parse_document(&text)
                    .map_err(|e| anyhow::anyhow!("{}: invalid policy:\n{}", p.display(), indent(&e.to_string())))?;
                docs.push((doc_name(p), doc));
            }
            let policy =
                Policy::compile(docs).map_err(|e| anyhow::anyhow!("invalid policy:\n{}", indent(&e.to_string())))?;
            let arguments: Value = serde_json::from_str(&args).context("--args is not valid JSON")?;
            let identity = match (identity, credential) {
                (Some(i), _) => i,
                (None, Some(c)) => toolgate_policy::fingerprint(&c),
                (None, None) => String::new(),
            };
            let principal = principal_for_eval(subject, issuer, claims.as_deref(), service_account, api_key)?;
            let caller = Caller { identity, session, headers, principal };
            let call = Call { tool: &tool, arguments: &arguments, caller: &caller };
            let limiter = Limiter::default();
            let mut last = None;
            for _ in 0..count {
                // Every call in the run succeeds upstream, so reservations stay spent.
                let mut d = policy.decide(&limiter, &call, Duration::ZERO);
                if let Some(r) = d.reservation.take() {
                    r.commit();
                }
                last = Some(d);
            }
            let d = last.context("count is at least 1")?;
            let mut out = json!({
                "decision": d.kind.as_str(),
                "tool": tool,
                "call": count,
                "policy": d.policy.as_deref(),
                "rule": d.rule.as_deref(),
                "grant": d.grant.as_deref(),
                "subject": caller.principal.as_ref().map(toolgate_policy::Principal::key),
                "reason": d.reason,
                "revision": policy.revision(),
            });
            if let Some(r) = d.retry_after {
                out["retryAfterSeconds"] = json!(r.as_secs_f64().ceil() as u64);
            }
            if let Some(t) = d.approval_timeout {
                out["approvalTimeoutSeconds"] = json!(t.as_secs());
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Convert { file, name, namespace } => {
            let text = read(&file)?;
            let doc = toolgate_policy::parse_document(&text)
                .map_err(|e| anyhow::anyhow!("{}: invalid policy:\n{}", file.display(), indent(&e.to_string())))?;
            Policy::compile(vec![(doc_name(&file), doc.clone())])
                .map_err(|e| anyhow::anyhow!("{}: invalid policy:\n{}", file.display(), indent(&e.to_string())))?;
            let name = match name {
                Some(n) => n,
                None => dns_label(&file),
            };
            let mut metadata = json!({ "name": name });
            if let Some(ns) = namespace {
                metadata["namespace"] = json!(ns);
            }
            let manifest = json!({
                "apiVersion": "toolgate.dev/v1alpha1",
                "kind": "McpPolicy",
                "metadata": metadata,
                "spec": doc,
            });
            print!("{}", serde_norway::to_string(&manifest)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Scan { upstream, headers, output, command } => {
            let (target, source) = match upstream {
                Some(url) => {
                    let headers = headers
                        .iter()
                        .map(|h| {
                            h.split_once(':')
                                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                                .ok_or_else(|| anyhow::anyhow!("--header {h:?} is not NAME: VALUE"))
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    (scan::Target::Url { url: url.clone(), headers }, url)
                }
                None if !command.is_empty() => (scan::Target::Command(command.clone()), command.join(" ")),
                None => bail!("give --upstream URL or -- CMD ARGS"),
            };
            let result = scan::scan(&target)?;
            let text = scan::scaffold(&result, &source);
            // The scaffold must be a valid policy, or scan has a bug.
            Policy::from_text("scan", &text)
                .map_err(|e| anyhow::anyhow!("generated scaffold is invalid (a bug):\n{e}"))?;
            match output {
                Some(p) => std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?,
                None => print!("{text}"),
            }
            eprintln!("{} tools from {}", result.tools.len(), result.server);
            Ok(ExitCode::SUCCESS)
        }
        Command::Fingerprint { credential } => {
            let credential = match credential {
                Some(c) => c,
                None => {
                    let mut s = String::new();
                    std::io::stdin().read_line(&mut s)?;
                    s.trim_end_matches(['\r', '\n']).to_owned()
                }
            };
            println!("{}", toolgate_policy::fingerprint(&credential));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn validate(files: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    for path in files {
        let result = read(path).and_then(|text| {
            let (doc, format) = toolgate_policy::parse_document_with_format(&text).map_err(anyhow::Error::from)?;
            let tools = doc.tools.len() + doc.grants.iter().map(|g| g.tools.len()).sum::<usize>();
            let policy = Policy::compile(vec![(doc_name(path), doc)]).map_err(anyhow::Error::from)?;
            Ok((format, tools, policy.revision().to_owned()))
        });
        match result {
            Ok((format, tools, revision)) => {
                let format = match format {
                    SourceFormat::Native => "native",
                    SourceFormat::Intercept => "intercept",
                };
                println!("{}: ok ({format}, {tools} tool rules, revision {revision})", path.display());
            }
            Err(e) => {
                ok = false;
                println!("{}: invalid", path.display());
                println!("{}", indent(&format!("{e:#}")));
            }
        }
    }
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n")
}

/// A Kubernetes object name from a file name: `RunPod 1.1.0.yaml` → `runpod-1-1-0`.
fn dns_label(path: &Path) -> String {
    let stem = path.file_stem().map_or_else(String::new, |s| s.to_string_lossy().to_ascii_lowercase());
    let mut out = String::new();
    for c in stem.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out: String = out.trim_matches('-').chars().take(63).collect();
    let out = out.trim_end_matches('-').to_owned();
    if out.is_empty() { "policy".to_owned() } else { out }
}

/// The authenticated caller `toolgate eval` dry-runs as, from `--subject`/`--claims`,
/// `--service-account` or `--api-key`.
fn principal_for_eval(
    subject: Option<String>,
    issuer: String,
    claims: Option<&str>,
    service_account: Option<String>,
    api_key: Option<String>,
) -> anyhow::Result<Option<toolgate_policy::Principal>> {
    use toolgate_policy::Principal;
    let claims = match claims {
        None => serde_json::Map::new(),
        Some(text) => match serde_json::from_str::<Value>(text).context("--claims is not valid JSON")? {
            Value::Object(m) => m,
            other => anyhow::bail!("--claims must be a JSON object, got {other}"),
        },
    };
    if let Some(subject) = subject {
        let mut claims = claims;
        claims.insert("sub".into(), Value::String(subject.clone()));
        claims.insert("iss".into(), Value::String(issuer.clone()));
        return Ok(Some(Principal::Token { issuer, subject, claims }));
    }
    if let Some(sa) = service_account {
        let Some((namespace, name)) = sa.split_once('/').filter(|(n, s)| !n.is_empty() && !s.is_empty()) else {
            anyhow::bail!("--service-account must be namespace/name, got {sa:?}");
        };
        let mut claims = claims;
        claims.insert("sub".into(), Value::String(format!("system:serviceaccount:{namespace}:{name}")));
        return Ok(Some(Principal::ServiceAccount {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            pod: None,
            claims,
        }));
    }
    if !claims.is_empty() {
        anyhow::bail!("--claims needs --subject or --service-account");
    }
    Ok(api_key.map(|name| Principal::ApiKey { name }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        assert_eq!(dns_label(Path::new("/x/RunPod 1.1.0.yaml")), "runpod-1-1-0");
        assert_eq!(dns_label(Path::new("seed-start-pod.json")), "seed-start-pod");
        assert_eq!(dns_label(Path::new("___.yaml")), "policy");
    }

    #[test]
    fn headers_parse() {
        assert_eq!(parse_header("X-Team=ops").ok(), Some(("x-team".into(), "ops".into())));
        assert!(parse_header("nope").is_err());
    }
}
