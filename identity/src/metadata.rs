//! OAuth 2.0 Protected Resource Metadata (RFC 9728), as the MCP authorization
//! specification asks of a protected MCP server: clients that get a 401 read
//! `WWW-Authenticate: Bearer resource_metadata="…"`, fetch the document, and learn which
//! authorization server to log in with.

use serde::Serialize;

/// The well-known path the document is served at.
pub const WELL_KNOWN_PATH: &str = "/.well-known/oauth-protected-resource";

/// The protected resource, as configured.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ProtectedResource {
    /// The MCP endpoint's public URL (tokens' audience).
    pub resource: String,
    /// Authorization servers (issuer URLs) clients log in with.
    pub authorization_servers: Vec<String>,
    /// Always `["header"]`: tokens are accepted in the Authorization header only.
    pub bearer_methods_supported: Vec<String>,
    /// Scopes, when configured.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scopes_supported: Vec<String>,
}

impl ProtectedResource {
    /// The document for `resource` naming `authorization_servers`.
    pub fn new(resource: String, authorization_servers: Vec<String>, scopes: Vec<String>) -> Self {
        ProtectedResource {
            resource,
            authorization_servers,
            bearer_methods_supported: vec!["header".into()],
            scopes_supported: scopes,
        }
    }

    /// The document's URL: the resource's origin + the well-known path + the resource's
    /// path (RFC 9728 §3.1).
    pub fn metadata_url(&self) -> String {
        let (origin, path) = split_origin(&self.resource);
        let path = path.trim_end_matches('/');
        format!("{origin}{WELL_KNOWN_PATH}{path}")
    }

    /// The path part of [`Self::metadata_url`], which the proxy serves.
    pub fn metadata_path(&self) -> String {
        let (_, path) = split_origin(&self.resource);
        format!("{WELL_KNOWN_PATH}{}", path.trim_end_matches('/'))
    }

    /// The `WWW-Authenticate` value of a 401 (RFC 6750 §3, RFC 9728 §5.1).
    pub fn www_authenticate(&self, invalid_token: bool) -> String {
        let url = self.metadata_url();
        if invalid_token {
            format!("Bearer resource_metadata=\"{url}\", error=\"invalid_token\"")
        } else {
            format!("Bearer resource_metadata=\"{url}\"")
        }
    }
}

fn split_origin(url: &str) -> (&str, &str) {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => url.split_at(after_scheme + i),
        None => (url, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_url_follows_rfc_9728() {
        let r = ProtectedResource::new("https://mcp.example/mcp".into(), vec!["https://idp.example".into()], vec![]);
        assert_eq!(r.metadata_url(), "https://mcp.example/.well-known/oauth-protected-resource/mcp");
        assert_eq!(r.metadata_path(), "/.well-known/oauth-protected-resource/mcp");
        let root = ProtectedResource::new("https://mcp.example".into(), vec![], vec![]);
        assert_eq!(root.metadata_url(), "https://mcp.example/.well-known/oauth-protected-resource");
        assert_eq!(
            r.www_authenticate(true),
            "Bearer resource_metadata=\"https://mcp.example/.well-known/oauth-protected-resource/mcp\", error=\"invalid_token\""
        );
        let doc = serde_json::to_value(&r).unwrap_or_default();
        assert_eq!(doc["authorization_servers"][0], "https://idp.example");
        assert_eq!(doc["bearer_methods_supported"][0], "header");
    }
}
