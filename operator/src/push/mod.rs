//! The policy push: the index of what this replica knows ([`index`]), the sidecar streams
//! and their acknowledgements ([`streams`]: the [`Hub`]), the HTTPS endpoints sidecars call
//! ([`server`]) and the exchange of acknowledgements between replicas ([`acks`]).

pub mod acks;
pub mod index;
pub mod server;
pub mod streams;

pub use index::{Index, Scope};
pub use streams::Hub;
