//! toolgate-proxy as a library: the binary (`main.rs`) only calls [`run::main`].
//!
//! Modules are layers; each imports only the layers listed before it (checked by
//! `tests/layering.rs`; see docs/proxy.md, "Code layout"):
//! `mcp` → `telemetry` → `live` → `gate` → `approval` → `control` → `transport` → `admin` → `cli` → `run`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod approval;
pub mod cli;
pub mod control;
pub mod gate;
pub mod live;
pub mod mcp;
pub mod run;
pub mod telemetry;
pub mod transport;
