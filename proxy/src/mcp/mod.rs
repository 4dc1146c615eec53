//! Framing: JSON-RPC messages and SSE events as MCP sends them. Pure and synchronous
//! (except the bounded line reader, [`lines`]); knows nothing of policy or hyper services.

pub mod canonical;
pub mod headers;
pub mod jsonrpc;
pub mod lines;
pub mod sse;

#[cfg(test)]
pub(crate) mod proptests;
