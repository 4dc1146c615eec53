//! Who may knock: the `Host` and `Origin` allow-lists of the MCP endpoints (DNS-rebinding
//! protection, as the MCP Streamable HTTP transport requires of servers), and who may read
//! `/policy` on the admin listener.
//!
//! A DNS-rebinding page makes a browser send requests for the attacker's own name (its
//! `Host`) to an address the attacker chose (the proxy on loopback, or a port-forward); a
//! cross-site page sends its own `Origin`. The proxy forwards with the upstream's `Host`,
//! so the upstream cannot see either: the proxy checks both before anything else.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::header::{self, HeaderMap};

use crate::transport::connections::LogLimiter;

/// A pattern of allowed host names (ports never matter).
#[derive(Clone, Debug, PartialEq, Eq)]
enum HostPattern {
    /// A name or an IP address, normalized (lowercase, IPv6 without brackets).
    Exact(String),
    /// `*.example.com`: names ending in `.example.com` (not `example.com` itself).
    Suffix(String),
    /// Any IP address literal (a literal cannot be rebound to another address).
    AnyIp,
    /// A name without dots (a Kubernetes Service's short name, resolved by the search path).
    SingleLabel,
    /// Anything (`*`): the Host check is off.
    Any,
}

impl HostPattern {
    fn matches(&self, host: &Host) -> bool {
        match self {
            HostPattern::Exact(name) => host.name == *name,
            HostPattern::Suffix(suffix) => host.name.len() > suffix.len() && host.name.ends_with(suffix.as_str()),
            HostPattern::AnyIp => host.ip,
            HostPattern::SingleLabel => !host.ip && !host.name.contains('.'),
            HostPattern::Any => true,
        }
    }

    /// An `--allowed-hosts` entry: `name`, `IP`, `[IPv6]`, `*.suffix` or `*`.
    fn parse(entry: &str) -> Result<Self, String> {
        let entry = entry.trim();
        if entry == "*" {
            return Ok(HostPattern::Any);
        }
        if let Some(suffix) = entry.strip_prefix("*.") {
            let host = Host::parse_name(suffix)
                .filter(|h| !h.ip)
                .ok_or_else(|| format!("{entry:?}: after \"*.\" comes a DNS name, e.g. *.example.com"))?;
            return Ok(HostPattern::Suffix(format!(".{}", host.name)));
        }
        match Host::parse(entry) {
            Some((host, None)) => Ok(HostPattern::Exact(host.name)),
            Some((_, Some(_))) => Err(format!("{entry:?}: give the host without a port (any port is accepted)")),
            None => Err(format!("{entry:?} is not a host name, an IP address, *.SUFFIX or *")),
        }
    }
}

/// A host from a `Host` header, an `:authority` or an origin, normalized.
#[derive(Debug, PartialEq, Eq)]
struct Host {
    /// Lowercase, without a trailing dot; an IPv6 address in its canonical text, without
    /// brackets.
    name: String,
    ip: bool,
}

impl Host {
    /// `host[:port]` (IPv6 in brackets). `None` when malformed.
    fn parse(value: &str) -> Option<(Host, Option<u16>)> {
        let (host, port) = if let Some(rest) = value.strip_prefix('[') {
            let (inside, after) = rest.split_once(']')?;
            let ip: Ipv6Addr = inside.parse().ok()?;
            let port = match after {
                "" => None,
                p => Some(parse_port(p.strip_prefix(':')?)?),
            };
            return Some((Host { name: ip.to_string(), ip: true }, port));
        } else if let Ok(ip) = value.parse::<Ipv6Addr>() {
            // A bare IPv6 address (only in --allowed-hosts; a Host header brackets it).
            return Some((Host { name: ip.to_string(), ip: true }, None));
        } else {
            match value.rsplit_once(':') {
                Some((h, p)) => (h, Some(parse_port(p)?)),
                None => (value, None),
            }
        };
        Some((Host::parse_name(host)?, port))
    }

    /// A DNS name or an IPv4 address, without a port.
    fn parse_name(name: &str) -> Option<Host> {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Some(Host { name: ip.to_string(), ip: true });
        }
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        valid.then_some(Host { name, ip: false })
    }
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse().ok()
}

/// An allowed origin: a scheme and a host pattern, any port or one.
#[derive(Clone, Debug, PartialEq, Eq)]
enum OriginRule {
    Match {
        scheme: String,
        host: HostPattern,
        port: Option<u16>,
    },
    /// The literal origin `null` (sandboxed frames, `file:` pages).
    Null,
    /// Any origin (`*`): the Origin check is off.
    Any,
}

impl OriginRule {
    fn parse(entry: &str) -> Result<Self, String> {
        let entry = entry.trim();
        match entry {
            "*" => return Ok(OriginRule::Any),
            "null" => return Ok(OriginRule::Null),
            _ => {}
        }
        let bad = || format!("{entry:?} is not an origin (SCHEME://HOST[:PORT], HOST may be *.SUFFIX), null or *");
        let (scheme, authority) = entry.split_once("://").ok_or_else(bad)?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme.is_empty() || !scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b)) {
            return Err(bad());
        }
        let (host, port) = if let Some(suffix) = authority.strip_prefix("*.") {
            let (name, port) = match suffix.rsplit_once(':') {
                Some((n, p)) => (n, Some(parse_port(p).ok_or_else(bad)?)),
                None => (suffix, None),
            };
            (HostPattern::parse(&format!("*.{name}"))?, port)
        } else {
            let (host, port) = Host::parse(authority).ok_or_else(bad)?;
            (HostPattern::Exact(host.name), port)
        };
        Ok(OriginRule::Match { scheme, host, port })
    }

    fn matches(&self, origin: &Origin) -> bool {
        match (self, origin) {
            (OriginRule::Any, _) | (OriginRule::Null, Origin::Null) => true,
            (OriginRule::Match { scheme, host, port }, Origin::Tuple { scheme: s, host: h, port: p }) => {
                scheme == s && host.matches(h) && port.is_none_or(|port| Some(port) == *p)
            }
            _ => false,
        }
    }
}

#[derive(Debug)]
enum Origin {
    Null,
    Tuple { scheme: String, host: Host, port: Option<u16> },
}

impl Origin {
    fn parse(value: &str) -> Option<Origin> {
        if value == "null" {
            return Some(Origin::Null);
        }
        let (scheme, authority) = value.split_once("://")?;
        if scheme.is_empty() || !scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b)) {
            return None;
        }
        let (host, port) = Host::parse(authority)?;
        Some(Origin::Tuple { scheme: scheme.to_ascii_lowercase(), host, port })
    }
}

/// Why a request was refused: `reason` is the metric label (`host`, `origin`).
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

/// The Host and Origin allow-lists of the MCP listener.
#[derive(Debug)]
pub struct HostRules {
    hosts: Vec<HostPattern>,
    origins: Vec<OriginRule>,
    log: Mutex<LogLimiter>,
    /// Host values accepted before, byte for byte: a client sends the same `Host` on every
    /// request, and parsing it (IP forms, lower-casing) was ~3 k instructions of each call.
    /// Only accepted values are kept (a refused one is parsed again, and logged), at most
    /// [`Self::ACCEPTED`] of at most [`Self::ACCEPTED_LEN`] bytes, emptied when full: the
    /// rules never change, so an exact repeat always gets the same answer.
    accepted: Mutex<Vec<Box<str>>>,
}

const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

impl HostRules {
    /// The rules for a listener on `listen`:
    ///
    /// - hosts: `localhost`, `127.0.0.1`, `[::1]`; the listen address when it is a specific
    ///   one; when it is unspecified (`0.0.0.0`, `::`: a pod's sidecar, reached through the
    ///   pod IP or its Services) also any IP address, names without a dot (Service short
    ///   names) and names ending in `.svc` or `.svc.cluster.local`; and `allowed_hosts`.
    /// - origins (a request without `Origin` passes): `http`/`https` on the loopback names,
    ///   on the specific listen address and on the `allowed_hosts` names (not `*`), any port;
    ///   and `allowed_origins`.
    pub fn new(listen: SocketAddr, allowed_hosts: &[String], allowed_origins: &[String]) -> Result<Self, String> {
        let mut hosts: Vec<HostPattern> = LOOPBACK_NAMES.iter().map(|n| HostPattern::Exact((*n).into())).collect();
        if listen.ip().is_unspecified() {
            hosts.extend([
                HostPattern::AnyIp,
                HostPattern::SingleLabel,
                HostPattern::Suffix(".svc".into()),
                HostPattern::Suffix(".svc.cluster.local".into()),
            ]);
        } else {
            hosts.push(HostPattern::Exact(listen.ip().to_canonical().to_string()));
        }
        let mut origin_hosts: Vec<HostPattern> =
            hosts.iter().filter(|h| matches!(h, HostPattern::Exact(_))).cloned().collect();
        for entry in allowed_hosts.iter().filter(|e| !e.trim().is_empty()) {
            let pattern = HostPattern::parse(entry).map_err(|e| format!("--allowed-hosts: {e}"))?;
            if pattern != HostPattern::Any {
                origin_hosts.push(pattern.clone());
            }
            hosts.push(pattern);
        }
        let mut origins = Vec::new();
        for host in origin_hosts {
            for scheme in ["http", "https"] {
                origins.push(OriginRule::Match { scheme: scheme.into(), host: host.clone(), port: None });
            }
        }
        for entry in allowed_origins.iter().filter(|e| !e.trim().is_empty()) {
            origins.push(OriginRule::parse(entry).map_err(|e| format!("--allowed-origins: {e}"))?);
        }
        Ok(Self {
            hosts,
            origins,
            log: Mutex::new(LogLimiter::new(Duration::from_secs(1))),
            accepted: Mutex::default(),
        })
    }

    /// Checks a request's `Host` (and HTTP/2 `:authority`, given as `authority`) and
    /// `Origin`.
    pub fn check(&self, headers: &HeaderMap, authority: Option<&str>) -> Result<(), Refusal> {
        let refused = |reason: &'static str, message: String| {
            self.log_refusal(&message);
            Err(Refusal { reason, message })
        };
        let mut hosts = headers.get_all(header::HOST).iter();
        let host_header = hosts.next();
        if hosts.next().is_some() {
            return refused("host", "several Host headers: send one".into());
        }
        let given: Vec<&str> = match (host_header, authority) {
            (None, None) => return refused("host", "no Host header: send one".into()),
            (h, a) => {
                let h = match h.map(|v| v.to_str()) {
                    Some(Ok(v)) => Some(v),
                    Some(Err(_)) => return refused("host", "the Host header is not ASCII".into()),
                    None => None,
                };
                h.into_iter().chain(a).collect()
            }
        };
        for value in given {
            if !self.host_allowed(value) {
                return refused(
                    "host",
                    format!(
                        "Host {:?} is not allowed (DNS rebinding protection): add the name to --allowed-hosts (TOOLGATE_ALLOWED_HOSTS; Helm value sidecar.allowedHosts)",
                        clip(value)
                    ),
                );
            }
        }
        let mut origins = headers.get_all(header::ORIGIN).iter();
        let Some(origin) = origins.next() else { return Ok(()) };
        if origins.next().is_some() {
            return refused("origin", "several Origin headers: send one".into());
        }
        let value = origin.to_str().unwrap_or("");
        let allowed = Origin::parse(value.trim()).is_some_and(|o| self.origins.iter().any(|r| r.matches(&o)));
        if allowed {
            Ok(())
        } else {
            refused(
                "origin",
                format!(
                    "Origin {:?} is not allowed: add it to --allowed-origins (TOOLGATE_ALLOWED_ORIGINS; Helm value sidecar.allowedOrigins)",
                    clip(value)
                ),
            )
        }
    }

    pub const ACCEPTED: usize = 16;
    pub const ACCEPTED_LEN: usize = 256;

    /// Whether a `Host` (or `:authority`) value names an allowed host.
    fn host_allowed(&self, value: &str) -> bool {
        let cacheable = value.len() <= Self::ACCEPTED_LEN;
        let mut accepted = self.accepted.lock().unwrap_or_else(|p| p.into_inner());
        if cacheable && accepted.iter().any(|a| **a == *value) {
            return true;
        }
        let allowed = Host::parse(value.trim()).is_some_and(|(host, _)| self.hosts.iter().any(|p| p.matches(&host)));
        if allowed && cacheable {
            if accepted.len() >= Self::ACCEPTED {
                accepted.clear();
            }
            accepted.push(value.into());
        }
        allowed
    }

    fn log_refusal(&self, message: &str) {
        let allow = self.log.lock().unwrap_or_else(|p| p.into_inner()).allow(Instant::now());
        if let Some(suppressed) = allow {
            tracing::warn!(suppressed, "request refused: {message}");
        }
    }
}

/// At most 100 characters of a value a client chose, for messages.
fn clip(value: &str) -> String {
    value.chars().take(100).collect()
}

/// Whether `/policy` (the whole policy, grants included) may be shown to `peer`: only to
/// loopback peers (reached through `kubectl port-forward`, or on the same host), unless
/// `--admin-policy-public`.
pub fn policy_visible(peer: SocketAddr, public: bool) -> bool {
    public || peer.ip().to_canonical().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn rules(listen: &str, hosts: &[&str], origins: &[&str]) -> HostRules {
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        HostRules::new(listen.parse().expect("listen address"), &s(hosts), &s(origins)).expect("valid rules")
    }

    fn check(r: &HostRules, host: Option<&str>, origin: Option<&str>) -> Result<(), &'static str> {
        let mut h = HeaderMap::new();
        if let Some(v) = host {
            h.insert(header::HOST, HeaderValue::from_str(v).expect("header value"));
        }
        if let Some(v) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(v).expect("header value"));
        }
        r.check(&h, None).map_err(|e| e.reason)
    }

    #[test]
    fn loopback_names_pass_with_any_port_others_do_not() {
        let r = rules("127.0.0.1:8080", &[], &[]);
        for ok in ["localhost", "localhost:8080", "127.0.0.1:1", "[::1]:8080", "[::1]", "LOCALHOST:9", "localhost.:80"]
        {
            assert_eq!(check(&r, Some(ok), None), Ok(()), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "10.0.0.1",
            "runpod",
            "a.svc",
            "localhost:",
            "localhost:99999",
            "localhost:80:80",
            "[::1",
            "local host",
            "",
        ] {
            assert_eq!(check(&r, Some(bad), None), Err("host"), "{bad}");
        }
        assert_eq!(check(&r, None, None), Err("host"), "no Host at all");
    }

    #[test]
    fn the_listen_address_passes() {
        let r = rules("10.1.2.3:8080", &[], &[]);
        assert_eq!(check(&r, Some("10.1.2.3:8080"), None), Ok(()));
        assert_eq!(check(&r, Some("10.1.2.4:8080"), None), Err("host"));
        let r = rules("[fd00::5]:8080", &[], &[]);
        assert_eq!(check(&r, Some("[fd00:0::5]:8080"), None), Ok(()));
    }

    #[test]
    fn in_a_pod_ips_service_names_pass_foreign_names_do_not() {
        let r = rules("0.0.0.0:15080", &[], &[]);
        for ok in [
            "10.244.1.7:15080",
            "[fd00::7]:15080",
            "runpod-mcp:15080",
            "runpod-mcp.agents.svc",
            "runpod-mcp.agents.svc.cluster.local:15080",
            "localhost:15080",
        ] {
            assert_eq!(check(&r, Some(ok), None), Ok(()), "{ok}");
        }
        // Two-label names ("service.namespace") could be public names (namespace "dev",
        // "app"): only by --allowed-hosts.
        for bad in ["evil.example", "runpod-mcp.agents", "x.svc.evil.example", "evil.svc.cluster.local.evil"] {
            assert_eq!(check(&r, Some(bad), None), Err("host"), "{bad}");
        }
    }

    #[test]
    fn allowed_hosts_add_names_and_suffixes() {
        let r = rules("127.0.0.1:8080", &["mcp.example.com", "*.corp.example", "[fd00::1]", "10.0.0.9"], &[]);
        for ok in
            ["mcp.example.com", "MCP.example.com:443", "a.corp.example", "a.b.corp.example", "[fd00::1]:80", "10.0.0.9"]
        {
            assert_eq!(check(&r, Some(ok), None), Ok(()), "{ok}");
        }
        for bad in ["corp.example", "x.mcp.example.com", "evilcorp.example", "example.com"] {
            assert_eq!(check(&r, Some(bad), None), Err("host"), "{bad}");
        }
        let any = rules("127.0.0.1:8080", &["*"], &[]);
        assert_eq!(check(&any, Some("whatever.example"), None), Ok(()));
        // `*` opens the Host check, not the Origin check.
        assert_eq!(check(&any, Some("whatever.example"), Some("http://whatever.example")), Err("origin"));
    }

    #[test]
    fn bad_entries_are_refused_with_the_flag_named() {
        let bad = |hosts: &[&str], origins: &[&str]| {
            let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
            HostRules::new("127.0.0.1:1".parse().expect("addr"), &s(hosts), &s(origins)).expect_err("refused")
        };
        assert!(bad(&["example.com:80"], &[]).contains("--allowed-hosts"));
        assert!(bad(&["*example.com"], &[]).contains("--allowed-hosts"));
        assert!(bad(&["*.1.2.3.4"], &[]).contains("--allowed-hosts"));
        assert!(bad(&["a/b"], &[]).contains("--allowed-hosts"));
        assert!(bad(&[], &["example.com"]).contains("--allowed-origins"));
        assert!(bad(&[], &["https://"]).contains("--allowed-origins"));
        assert!(bad(&[], &["https://a.example/path"]).contains("--allowed-origins"));
    }

    #[test]
    fn origins_default_to_loopback_and_allowed_hosts() {
        let r = rules("127.0.0.1:8080", &["mcp.example.com", "*.corp.example"], &["https://app.example.org", "null"]);
        let host = Some("localhost:8080");
        for ok in [
            "http://localhost:3000",
            "https://127.0.0.1",
            "http://[::1]:6274",
            "https://mcp.example.com",
            "http://ui.corp.example:8443",
            "https://app.example.org",
            "https://app.example.org:8443",
            "HTTPS://APP.example.org",
            "null",
        ] {
            assert_eq!(check(&r, host, Some(ok)), Ok(()), "{ok}");
        }
        for bad in [
            "http://evil.example",
            "http://localhost.evil.example",
            "http://app.example.org",
            "ftp://localhost",
            "http://10.0.0.1",
            "localhost",
            "http://localhost/path",
            "",
        ] {
            assert_eq!(check(&r, host, Some(bad)), Err("origin"), "{bad}");
        }
        // No Origin (a non-browser client) passes the Origin check.
        assert_eq!(check(&r, host, None), Ok(()));
        // In a pod, IP literals and Service names pass as Host but not as Origin.
        let pod = rules("0.0.0.0:15080", &[], &[]);
        assert_eq!(check(&pod, Some("10.0.0.1"), Some("http://203.0.113.5")), Err("origin"));
        assert_eq!(check(&pod, Some("10.0.0.1"), Some("http://intranet")), Err("origin"));
        assert_eq!(check(&pod, Some("10.0.0.1"), Some("http://localhost:6274")), Ok(()));
        let pinned = rules("127.0.0.1:8080", &[], &["https://app.example.org:8443"]);
        assert_eq!(check(&pinned, host, Some("https://app.example.org:8443")), Ok(()));
        assert_eq!(check(&pinned, host, Some("https://app.example.org")), Err("origin"));
        let any = rules("127.0.0.1:8080", &[], &["*"]);
        assert_eq!(check(&any, host, Some("http://evil.example")), Ok(()));
        assert_eq!(check(&any, Some("evil.example"), Some("http://evil.example")), Err("host"));
    }

    #[test]
    fn remembered_hosts_get_the_same_answers_and_stay_bounded() {
        let r = rules("127.0.0.1:8080", &["*.example.com"], &[]);
        let mut values: Vec<String> = (0..40).map(|i| format!("a{i}.example.com:80")).collect();
        values.extend(
            ["evil.example", "localhost", " LOCALHOST. ", "a.example.com.evil", "example.com"].map(String::from),
        );
        let answers = |r: &HostRules| -> Vec<bool> { values.iter().map(|v| check(r, Some(v), None).is_ok()).collect() };
        let first = answers(&r);
        assert!(first[..40].iter().all(|a| *a), "{first:?}");
        assert_eq!(&first[40..], &[false, true, true, false, false]);
        for _ in 0..3 {
            assert_eq!(answers(&r), first, "a remembered value gets the answer it got first");
        }
        let accepted = r.accepted.lock().expect("lock");
        assert!(accepted.len() <= HostRules::ACCEPTED, "{}", accepted.len());
        assert!(accepted.iter().all(|a| !a.contains("evil") && &**a != "example.com"), "{accepted:?}");
    }

    #[test]
    fn repeated_headers_and_authority_are_checked() {
        let r = rules("127.0.0.1:8080", &[], &[]);
        let mut h = HeaderMap::new();
        h.append(header::HOST, HeaderValue::from_static("localhost"));
        h.append(header::HOST, HeaderValue::from_static("evil.example"));
        assert_eq!(r.check(&h, None).map_err(|e| e.reason), Err("host"));
        let mut h = HeaderMap::new();
        h.append(header::HOST, HeaderValue::from_static("localhost"));
        h.append(header::ORIGIN, HeaderValue::from_static("http://localhost"));
        h.append(header::ORIGIN, HeaderValue::from_static("http://evil.example"));
        assert_eq!(r.check(&h, None).map_err(|e| e.reason), Err("origin"));
        // HTTP/2: the :authority is checked, with or without a Host header.
        assert_eq!(r.check(&HeaderMap::new(), Some("localhost:8080")), Ok(()));
        assert_eq!(r.check(&HeaderMap::new(), Some("evil.example")).map_err(|e| e.reason), Err("host"));
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("localhost"));
        assert_eq!(r.check(&h, Some("evil.example")).map_err(|e| e.reason), Err("host"));
    }

    #[test]
    fn refusal_names_the_header_and_the_flag() {
        let r = rules("127.0.0.1:8080", &[], &[]);
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("evil.example"));
        let e = r.check(&h, None).expect_err("refused");
        assert!(e.message.contains("Host \"evil.example\"") && e.message.contains("--allowed-hosts"), "{}", e.message);
        h.insert(header::HOST, HeaderValue::from_static("localhost"));
        h.insert(header::ORIGIN, HeaderValue::from_static("http://evil.example"));
        let e = r.check(&h, None).expect_err("refused");
        assert!(e.message.contains("Origin") && e.message.contains("--allowed-origins"), "{}", e.message);
    }

    #[test]
    fn policy_is_shown_to_loopback_peers_only() {
        let peer = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert!(policy_visible(peer("127.0.0.1:5000"), false));
        assert!(policy_visible(peer("127.8.9.10:5000"), false));
        assert!(policy_visible(peer("[::1]:5000"), false));
        assert!(policy_visible(peer("[::ffff:127.0.0.1]:5000"), false));
        assert!(!policy_visible(peer("10.244.0.5:5000"), false));
        assert!(!policy_visible(peer("[fd00::5]:5000"), false));
        assert!(!policy_visible(peer("[::ffff:10.0.0.1]:5000"), false));
        assert!(policy_visible(peer("10.244.0.5:5000"), true));
    }
}
