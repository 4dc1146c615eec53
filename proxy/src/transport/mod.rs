//! Hyper: the listeners, the router, the upstream clients and `--stdio`.

pub mod client;
pub mod connections;
pub mod frontdoor;
pub mod http;
pub mod legacy;
pub mod listener;
pub mod mcp_http;
pub mod ordering;
pub mod owners;
pub mod router;
pub mod sessions;
pub mod stdio;
pub mod upstream;
