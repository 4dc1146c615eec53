//! The HTTP headers of MCP's Streamable HTTP transport, as typed names: looking a header up
//! by `&str` parses and hashes the name again on every request.

use hyper::header::HeaderName;

/// `Mcp-Session-Id`: the session a request belongs to (set by the server on `initialize`).
pub const SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");
/// `Mcp-Method`: the JSON-RPC method, repeated in a header (must match the body).
pub const METHOD: HeaderName = HeaderName::from_static("mcp-method");
/// `Mcp-Name`: the tool name of a `tools/call`, repeated in a header (must match the body).
pub const NAME: HeaderName = HeaderName::from_static("mcp-name");
