//! Upstream name resolution, done again for every new connection: EKS moves
//! its API endpoint between ENIs, so no address is ever pinned. Answers may be
//! reused for at most `max_ttl` (0 = never reused).

mod cache;
mod direct;
mod flights;
#[cfg(test)]
mod tests;
mod udp_pool;

use cache::AnswerCache;

use std::{
    cell::RefCell,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use direct::DirectPath;
use hickory_resolver::{
    Resolver,
    config::{ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts},
    net::NetError,
    proto::rr::RecordType,
    system_conf,
};
use udp_pool::PooledUdpProvider;
pub use udp_pool::close_expired as close_expired_query_sockets;

use crate::{
    addr::{UpstreamAddr, UpstreamHost, UpstreamTarget},
    config::DnsFamily,
};

/// Validated DNS settings (see [`crate::config`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Servers to ask; empty = the system configuration (/etc/resolv.conf).
    pub servers: Vec<SocketAddr>,
    pub max_ttl: Duration,
    pub timeout: Duration,
    /// The records a lookup asks for.
    pub family: DnsFamily,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot read the system DNS configuration: {0}")]
    SystemConfig(NetError),
    #[error("{name} does not exist (NXDOMAIN)")]
    NxDomain { name: String },
    #[error("{name} has no {records} records")]
    NoRecords { name: String, records: &'static str },
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

impl DnsFamily {
    /// hickory's strategy for the records of this family.
    fn lookup_strategy(self) -> LookupIpStrategy {
        match self {
            Self::Any => LookupIpStrategy::Ipv4AndIpv6,
            Self::Ipv4 => LookupIpStrategy::Ipv4Only,
            Self::Ipv6 => LookupIpStrategy::Ipv6Only,
        }
    }

    /// The record types asked for, in the order their addresses are tried.
    fn record_types(self) -> &'static [RecordType] {
        match self {
            Self::Any => &[RecordType::A, RecordType::AAAA],
            Self::Ipv4 => &[RecordType::A],
            Self::Ipv6 => &[RecordType::AAAA],
        }
    }

    /// The record types, as errors name them.
    fn records_named(self) -> &'static str {
        match self {
            Self::Any => "A or AAAA",
            Self::Ipv4 => "A",
            Self::Ipv6 => "AAAA",
        }
    }
}

/// A name's addresses and until when they may be used (cached, shared).
type Answer = (Arc<[IpAddr]>, Instant);

/// Resolves the upstream target to the addresses to try, in DNS order.
#[derive(Debug)]
pub struct UpstreamResolver {
    /// What every thread's hickory resolver is built from (see [`THREAD_RESOLVERS`]).
    settings: Arc<ResolverSettings>,
    /// Queries sent without hickory, when the settings allow it.
    direct: Option<DirectPath>,
    /// hickory's own bound on one query (`dns_timeout`).
    query_timeout: Duration,
    /// The records asked for.
    family: DnsFamily,
    answers: AnswerCache,
}

/// A hickory resolver whose UDP queries reuse the thread's sockets.
type ThreadResolver = Resolver<PooledUdpProvider>;

/// The servers and options a hickory resolver is built from.
#[derive(Debug)]
struct ResolverSettings {
    servers: ResolverConfig,
    options: ResolverOpts,
}

impl ResolverSettings {
    fn build(&self) -> Result<ThreadResolver, ResolveError> {
        Resolver::builder_with_config(self.servers.clone(), PooledUdpProvider::default())
            .with_options(self.options.clone())
            .build()
            .map_err(ResolveError::SystemConfig)
    }
}

thread_local! {
    /// Each thread's own hickory resolver for every [`UpstreamResolver`]
    /// that has looked a name up on it, by its settings. hickory runs a name
    /// server's exchange as a task on the runtime of the first lookup; one
    /// resolver shared by the workers would send each query from a worker
    /// through a channel to that task on another thread and its answer
    /// back, two thread wake-ups per query. A resolver per thread keeps the
    /// exchange on the worker that asked.
    static THREAD_RESOLVERS: RefCell<Vec<(Weak<ResolverSettings>, ThreadResolver)>> =
        const { RefCell::new(Vec::new()) };
}

impl UpstreamResolver {
    pub fn new(config: &DnsConfig) -> Result<Self, ResolveError> {
        let (servers, mut options) = if config.servers.is_empty() {
            system_conf::read_system_conf().map_err(ResolveError::SystemConfig)?
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
            (ResolverConfig::from_name_servers(servers), ResolverOpts::default())
        };
        options.ip_strategy = config.family.lookup_strategy();
        options.timeout = config.timeout;
        options.attempts = 1;
        options.positive_max_ttl = Some(config.max_ttl);
        options.negative_max_ttl = Some(config.max_ttl);
        if config.max_ttl.is_zero() {
            options.cache_size = 0;
        }
        let direct = DirectPath::new(&servers, &options, config.family, config.timeout, config.max_ttl);
        let settings = Arc::new(ResolverSettings { servers, options });
        // Built once here so that settings hickory refuses fail at start-up
        // (or a reload), not at a connection's lookup.
        settings.build()?;
        Ok(Self {
            settings,
            direct,
            query_timeout: config.timeout,
            family: config.family,
            answers: AnswerCache::new(config.max_ttl),
        })
    }

    /// The upstream's addresses now. An IP literal needs no lookup.
    pub async fn resolve(&self, target: &UpstreamTarget) -> Result<Vec<UpstreamAddr>, ResolveError> {
        let name = match &target.host {
            UpstreamHost::Ip(ip) => return Ok(vec![UpstreamAddr(SocketAddr::new(*ip, target.port))]),
            UpstreamHost::Name(name) => name,
        };
        let addrs =
            |ips: &[IpAddr]| ips.iter().map(|&ip| UpstreamAddr(SocketAddr::new(ip, target.port))).collect();
        if let Some(ips) = self.answers.get(name, Instant::now()) {
            return Ok(addrs(&ips));
        }
        // Two queries' time: the direct path's and hickory's, or hickory's
        // and its retry.
        let bound = self.query_timeout.saturating_mul(2);
        let (ips, valid_until) = tokio::time::timeout(bound, self.ask_shared(name))
            .await
            .map_err(|_| ResolveError::Timeout { name: name.clone(), timeout: bound })??;
        if ips.is_empty() {
            return Err(ResolveError::NoRecords { name: name.clone(), records: self.family.records_named() });
        }
        self.answers.put(name, Arc::clone(&ips), valid_until, Instant::now());
        Ok(addrs(&ips))
    }

    /// [`Self::ask`], or the answer of the same lookup already in flight
    /// ([`flights`]); if that one fails or goes away, asks.
    async fn ask_shared(&self, name: &str) -> Result<Answer, ResolveError> {
        match flights::join_or_lead(Arc::as_ptr(&self.settings) as usize, name) {
            flights::Role::Waiting(outcome) => match flights::wait(outcome).await {
                Some(answer) => Ok(answer),
                None => self.ask(name).await,
            },
            flights::Role::Leading(leader) => {
                let asked = self.ask(name).await;
                leader.finish(asked.as_ref().ok().cloned());
                asked
            }
        }
    }

    /// `name`'s addresses from the name server, and until when they hold:
    /// by the direct path when it answers (within one query's timeout),
    /// else by hickory.
    async fn ask(&self, name: &str) -> Result<Answer, ResolveError> {
        if let Some(direct) = &self.direct
            && let Some((ips, valid_until)) = direct.lookup(name).await
        {
            return Ok((ips.into(), valid_until));
        }
        let lookup =
            self.thread_resolver()?.lookup_ip(name).await.map_err(|source| self.classify(name, source))?;
        Ok((lookup.iter().collect(), lookup.valid_until()))
    }

    fn classify(&self, name: &str, source: NetError) -> ResolveError {
        let name = name.to_owned();
        if source.is_nx_domain() {
            ResolveError::NxDomain { name }
        } else if source.is_no_records_found() {
            ResolveError::NoRecords { name, records: self.family.records_named() }
        } else if matches!(source, NetError::Timeout) {
            ResolveError::Timeout { name, timeout: self.query_timeout }
        } else {
            ResolveError::Failed { name, source }
        }
    }

    /// This thread's hickory resolver for these settings, built on the
    /// thread's first lookup. Those of resolvers since dropped (replaced by
    /// a reload) are let go then too.
    fn thread_resolver(&self) -> Result<ThreadResolver, ResolveError> {
        THREAD_RESOLVERS.with_borrow_mut(|resolvers| {
            // A `Weak` keeps its allocation, so no later settings can have
            // the address of dropped ones that are still listed.
            let mine = Arc::as_ptr(&self.settings);
            if let Some((_, resolver)) = resolvers.iter().find(|(settings, _)| settings.as_ptr() == mine) {
                return Ok(resolver.clone());
            }
            resolvers.retain(|(settings, _)| settings.strong_count() > 0);
            let resolver = self.settings.build()?;
            resolvers.push((Arc::downgrade(&self.settings), resolver.clone()));
            Ok(resolver)
        })
    }
}
