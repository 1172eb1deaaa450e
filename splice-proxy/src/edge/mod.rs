//! The edge guard: what a connection must show before the proxy opens an
//! upstream connection for it, so the proxy is no open relay behind a
//! PrivateLink NLB. Per listener: a PROXY protocol header (the client
//! address, the VPC endpoint the connection came through, NLB health checks),
//! then the TLS ClientHello's server name, which picks the upstream.
//!
//! Parsing is pure ([`proxy_protocol`], [`client_hello`], [`routes`]); the
//! socket side is [`peek`] and [`guard`].

pub mod client_hello;
pub mod guard;
pub mod peek;
pub mod proxy_protocol;
pub mod routes;
pub mod stats;

use std::{collections::BTreeSet, fmt, io, time::Duration};

use serde::Deserialize;

use crate::close_reason::CloseReason;

pub use guard::{Learned, guard};
pub use routes::{Route, Upstreams};
pub use stats::EdgeStats;

/// `--proxy-protocol`: whether connections start with a PROXY protocol header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocolMode {
    /// No header is read; the bytes go to the upstream as they come.
    #[default]
    Off,
    /// A header is read when the connection starts with one.
    Optional,
    /// A connection without a valid header is closed.
    Required,
}

/// `--chained-proxy-headers`: what a second PROXY header right after the
/// first (proxies chained) gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChainedHeaders {
    /// The connection is closed and counted.
    #[default]
    Refuse,
    /// Up to three more headers are read and dropped, each checked as
    /// strictly as the first; only the first (the NLB's) is believed.
    Strip,
}

/// Headers read and dropped after the first with [`ChainedHeaders::Strip`].
pub const MAX_CHAINED_HEADERS: usize = 3;

/// Validated PROXY protocol settings of one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyProtocolConfig {
    pub mode: ProxyProtocolMode,
    /// v1 (text) headers are accepted too.
    pub accept_v1: bool,
    pub chained: ChainedHeaders,
    /// Time for the whole header to arrive.
    pub header_timeout: Duration,
    /// VPC endpoint IDs allowed; empty = any (no check).
    pub allowed_vpce_ids: BTreeSet<String>,
}

/// Everything the guard checks on one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeConfig {
    pub proxy_protocol: ProxyProtocolConfig,
    pub upstreams: Upstreams,
    /// Time for the whole ClientHello to arrive (from the end of the header).
    pub client_hello_timeout: Duration,
}

/// A VPC endpoint ID as AWS writes it: `vpce-` and 8 or 17 lowercase hex digits.
#[must_use]
pub fn is_vpce_id(id: &str) -> bool {
    id.strip_prefix("vpce-").is_some_and(|hex| {
        matches!(hex.len(), 8 | 17) && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Why the guard closed a connection, with what the access log says of it.
#[derive(Debug)]
pub enum Refusal {
    /// A LOCAL header: the NLB's health check, answered with a clean close.
    HealthCheck,
    /// The client closed before sending anything.
    ClosedBeforeData,
    HeaderMissing,
    HeaderInvalid(String),
    HeaderOversized(String),
    HeaderTimeout,
    ChainedHeader,
    VpceMissing,
    VpceDenied(String),
    NotTls(String),
    ClientHelloInvalid(String),
    ClientHelloTimeout,
    SniMissing,
    SniDenied(String),
    /// The client reset or another error while the guard read.
    ClientError(io::Error),
}

impl Refusal {
    /// The reason it is logged and counted under.
    #[must_use]
    pub fn reason(&self) -> CloseReason {
        match self {
            Self::HealthCheck => CloseReason::HealthCheck,
            Self::ClosedBeforeData => CloseReason::ClosedBeforeData,
            Self::HeaderMissing => CloseReason::ProxyHeaderMissing,
            Self::HeaderInvalid(_) => CloseReason::ProxyHeaderInvalid,
            Self::HeaderOversized(_) => CloseReason::ProxyHeaderOversized,
            Self::HeaderTimeout => CloseReason::ProxyHeaderTimeout,
            Self::ChainedHeader => CloseReason::ChainedHeaderRefused,
            Self::VpceMissing => CloseReason::VpceMissing,
            Self::VpceDenied(_) => CloseReason::VpceDenied,
            Self::NotTls(_) => CloseReason::NotTls,
            Self::ClientHelloInvalid(_) => CloseReason::ClientHelloInvalid,
            Self::ClientHelloTimeout => CloseReason::ClientHelloTimeout,
            Self::SniMissing => CloseReason::SniMissing,
            Self::SniDenied(_) => CloseReason::SniDenied,
            Self::ClientError(_) => CloseReason::EdgeClientError,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HealthCheck => f.write_str("LOCAL PROXY header (health check)"),
            Self::ClosedBeforeData => f.write_str("the client closed before sending anything"),
            Self::HeaderMissing => f.write_str("the connection does not start with a PROXY protocol header"),
            Self::HeaderInvalid(why) | Self::HeaderOversized(why) => f.write_str(why),
            Self::HeaderTimeout => f.write_str("no complete PROXY header within the header timeout"),
            Self::ChainedHeader => f.write_str("a second PROXY header follows the first"),
            Self::VpceMissing => f.write_str("no VPC endpoint ID in the PROXY header"),
            Self::VpceDenied(id) => write!(f, "VPC endpoint {id} is not allowed"),
            Self::NotTls(why) | Self::ClientHelloInvalid(why) => f.write_str(why),
            Self::ClientHelloTimeout => f.write_str("no complete ClientHello within the handshake timeout"),
            Self::SniMissing => f.write_str("the ClientHello names no server"),
            Self::SniDenied(name) => write!(f, "server name {name} is not allowed"),
            Self::ClientError(e) => write!(f, "reading the client: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_vpce_id;

    #[test]
    fn vpce_ids() {
        assert!(is_vpce_id("vpce-0123456789abcdef0"));
        assert!(is_vpce_id("vpce-0123abcd"));
        for bad in
            ["vpce-0123456789ABCDEF0", "vpce-012", "vpc-0123456789abcdef0", "vpce-0123456789abcdefg", ""]
        {
            assert!(!is_vpce_id(bad), "{bad}");
        }
    }
}
