//! The end-to-end harness (issue 14): the whole cross-cloud path on one
//! machine. Five network namespaces joined by veth pairs — `control` (kubectl
//! and our TLS clients) —WireGuard— `proxyacct` (the VPC endpoint + NLB: a
//! PROXY v2 forwarder) — `asg-a`, `asg-b` (the built splice-proxy with the
//! deployed configuration) — `eks` (ENI addresses, DNS, fake API servers).
//! [`World`] builds it and tears every part of it down on drop.

pub mod forwarder;
pub mod kube_api;
pub mod kubectl;
pub mod load;
pub mod node;
pub mod topology;
pub mod wireguard;
pub mod world;

pub use world::World;

/// The cluster's EKS-style API host name (lower case, as `aws eks
/// describe-cluster` prints it).
pub const API_HOST: &str = "0123456789abcdef0123456789abcdef.gr7.us-east-1.eks.amazonaws.com";
/// The VPC endpoint the forwarder's main listener stands for (allowed).
pub const VPCE_ALLOWED: &str = "vpce-0e2e0000000000001";
/// Another consumer's endpoint (the forwarder's second listener): refused.
pub const VPCE_OTHER: &str = "vpce-0e2e00000000000ff";
/// The proxy port and admin port: the CloudFormation parameters' defaults.
pub const PROXY_PORT: u16 = 443;
pub const ADMIN_PORT: u16 = 9901;
/// The forwarder's port for the other endpoint's traffic.
pub const OTHER_ENDPOINT_PORT: u16 = 8443;

/// Whether the long soak was asked for (`cargo xtask e2e --long`).
#[must_use]
pub fn long() -> bool {
    std::env::var("SPLICE_PROXY_E2E_LONG").is_ok_and(|v| v == "1")
}
