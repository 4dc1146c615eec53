//! Hyper: the listeners, the router, the upstream clients and `--stdio`.

pub mod connections;
pub mod frontdoor;
pub mod legacy;
pub mod ordering;
pub mod owners;
pub mod server;
pub mod sessions;
pub mod stdio;
pub mod upstream;
