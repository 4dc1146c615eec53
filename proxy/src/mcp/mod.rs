//! Framing: JSON-RPC messages and SSE events as MCP sends them. Pure and synchronous
//! (except the bounded line reader); knows nothing of policy or hyper services.

pub mod jsonrpc;
pub mod sse;
