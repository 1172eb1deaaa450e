//! Test kit for splice-proxy's integration tests and the local demo: a DNS
//! server whose answers change on demand, fake TLS API servers, byte-exact
//! transfers, the proxy as a real process, and a network-namespace guard.

pub mod api;
pub mod dns;
pub mod netns;
pub mod process;
pub mod transfer;

/// The hostname the tests and the demo give their fake EKS API server.
pub const API_HOSTNAME: &str = "demo.gr7.us-east-1.eks.amazonaws.com";
