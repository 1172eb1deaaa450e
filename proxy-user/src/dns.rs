//! Upstream name resolution, done again for every new connection: EKS moves
//! its API endpoint between ENIs, so no address is ever pinned. Answers may be
//! reused for at most `max_ttl` (0 = never reused).

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts},
    net::{NetError, runtime::TokioRuntimeProvider},
};

use crate::addr::{UpstreamAddr, UpstreamHost, UpstreamTarget};

/// Validated DNS settings (see [`crate::config`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Servers to ask; empty = the system configuration (/etc/resolv.conf).
    pub servers: Vec<SocketAddr>,
    pub max_ttl: Duration,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot read the system DNS configuration: {0}")]
    SystemConfig(NetError),
    #[error("{name} does not exist (NXDOMAIN)")]
    NxDomain { name: String },
    #[error("{name} has no A or AAAA records")]
    NoRecords { name: String },
    #[error("resolving {name} timed out after {timeout:?}")]
    Timeout { name: String, timeout: Duration },
    #[error("resolving {name} failed: {source}")]
    Failed { name: String, source: NetError },
}

impl ResolveError {
    /// A short stable label for logs and metrics.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::SystemConfig(_) => "config",
            Self::NxDomain { .. } => "nxdomain",
            Self::NoRecords { .. } => "no_records",
            Self::Timeout { .. } => "timeout",
            Self::Failed { source, .. } => source.as_metrics_label(),
        }
    }
}

/// Resolves the upstream target to the addresses to try, in DNS order.
#[derive(Debug)]
pub struct UpstreamResolver {
    resolver: TokioResolver,
    timeout: Duration,
}

impl UpstreamResolver {
    pub fn new(config: &DnsConfig) -> Result<Self, ResolveError> {
        let mut builder = if config.servers.is_empty() {
            TokioResolver::builder_tokio().map_err(ResolveError::SystemConfig)?
        } else {
            let servers = config
                .servers
                .iter()
                .map(|server| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = server.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = server.port();
                    NameServerConfig::new(server.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.timeout = config.timeout;
        opts.attempts = 1;
        opts.positive_max_ttl = Some(config.max_ttl);
        opts.negative_max_ttl = Some(config.max_ttl);
        if config.max_ttl.is_zero() {
            opts.cache_size = 0;
        }
        let resolver = builder.build().map_err(ResolveError::SystemConfig)?;
        // hickory retries on its own; this bounds the whole lookup for the client.
        Ok(Self { resolver, timeout: config.timeout.saturating_mul(2) })
    }

    /// The upstream's addresses now. An IP literal needs no lookup.
    pub async fn resolve(&self, target: &UpstreamTarget) -> Result<Vec<UpstreamAddr>, ResolveError> {
        let name = match &target.host {
            UpstreamHost::Ip(ip) => return Ok(vec![UpstreamAddr(SocketAddr::new(*ip, target.port))]),
            UpstreamHost::Name(name) => name,
        };
        let lookup = tokio::time::timeout(self.timeout, self.resolver.lookup_ip(name.as_str()))
            .await
            .map_err(|_| ResolveError::Timeout { name: name.clone(), timeout: self.timeout })?
            .map_err(|source| classify(name, self.timeout, source))?;
        let addrs: Vec<UpstreamAddr> =
            lookup.iter().map(|ip: IpAddr| UpstreamAddr(SocketAddr::new(ip, target.port))).collect();
        if addrs.is_empty() {
            return Err(ResolveError::NoRecords { name: name.clone() });
        }
        Ok(addrs)
    }
}

fn classify(name: &str, timeout: Duration, source: NetError) -> ResolveError {
    let name = name.to_owned();
    if source.is_nx_domain() {
        ResolveError::NxDomain { name }
    } else if source.is_no_records_found() {
        ResolveError::NoRecords { name }
    } else if matches!(source, NetError::Timeout) {
        ResolveError::Timeout { name, timeout }
    } else {
        ResolveError::Failed { name, source }
    }
}
