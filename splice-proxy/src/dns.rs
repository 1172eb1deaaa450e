//! Upstream name resolution, done again for every new connection: EKS moves
//! its API endpoint between ENIs, so no address is ever pinned. Answers may be
//! reused for at most `max_ttl` (0 = never reused).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
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
    /// hickory's own bound on one query (`dns_timeout`).
    query_timeout: Duration,
    /// The bound on a whole lookup, hickory's retries included.
    timeout: Duration,
    answers: AnswerCache,
}

/// Names the answer cache holds at most (the upstreams and routes of a
/// configuration; more only if a reload keeps adding names).
const CACHED_NAMES_AT_MOST: usize = 1024;

/// Positive answers by name, each kept until its own TTL or `max_ttl` ends,
/// whichever is first; nothing with `max_ttl` 0. hickory caches as well,
/// but a lookup it answers from its cache still runs its whole lookup
/// machinery (futures, name parsing, cache locks) for every connection; this
/// is one lock and a clone. Failures are not kept here (hickory keeps
/// negative answers for up to `max_ttl`).
#[derive(Debug)]
struct AnswerCache {
    max_ttl: Duration,
    answers: Mutex<HashMap<String, CachedAnswer>>,
}

/// The addresses of a name and when they stop being used.
type CachedAnswer = (Arc<[IpAddr]>, Instant);

impl AnswerCache {
    fn new(max_ttl: Duration) -> Self {
        Self { max_ttl, answers: Mutex::default() }
    }

    fn get(&self, name: &str, now: Instant) -> Option<Arc<[IpAddr]>> {
        if self.max_ttl.is_zero() {
            return None;
        }
        let answers = self.answers.lock().unwrap_or_else(PoisonError::into_inner);
        answers.get(name).filter(|(_, until)| *until > now).map(|(ips, _)| Arc::clone(ips))
    }

    /// Keeps `ips` for `name` until `valid_until` (the answer's TTL), at most `max_ttl` from `now`.
    fn put(&self, name: &str, ips: Arc<[IpAddr]>, valid_until: Instant, now: Instant) {
        if self.max_ttl.is_zero() {
            return;
        }
        let until = valid_until.min(now + self.max_ttl);
        let mut answers = self.answers.lock().unwrap_or_else(PoisonError::into_inner);
        if answers.len() >= CACHED_NAMES_AT_MOST && !answers.contains_key(name) {
            answers.retain(|_, (_, until)| *until > now);
            if answers.len() >= CACHED_NAMES_AT_MOST {
                answers.clear();
            }
        }
        answers.insert(name.to_owned(), (ips, until));
    }
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
        Ok(Self {
            resolver,
            query_timeout: config.timeout,
            timeout: config.timeout.saturating_mul(2),
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
        let lookup = tokio::time::timeout(self.timeout, self.resolver.lookup_ip(name.as_str()))
            .await
            .map_err(|_| ResolveError::Timeout { name: name.clone(), timeout: self.timeout })?
            .map_err(|source| classify(name, self.query_timeout, source))?;
        let ips: Arc<[IpAddr]> = lookup.iter().collect();
        if ips.is_empty() {
            return Err(ResolveError::NoRecords { name: name.clone() });
        }
        self.answers.put(name, Arc::clone(&ips), lookup.valid_until(), Instant::now());
        Ok(addrs(&ips))
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

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr},
        sync::Arc,
        time::{Duration, Instant},
    };

    use super::AnswerCache;

    fn ips(last: u8) -> Arc<[IpAddr]> {
        Arc::from([IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))])
    }

    #[test]
    fn an_answer_is_kept_until_its_ttl_or_max_ttl_whichever_ends_first() {
        let cache = AnswerCache::new(Duration::from_secs(5));
        let now = Instant::now();
        cache.put("api.example", ips(1), now + Duration::from_secs(60), now);
        assert_eq!(cache.get("api.example", now + Duration::from_secs(4)), Some(ips(1)));
        assert_eq!(cache.get("api.example", now + Duration::from_secs(5)), None, "max_ttl bounds a long TTL");
        cache.put("short.example", ips(2), now + Duration::from_secs(1), now);
        assert_eq!(cache.get("short.example", now), Some(ips(2)));
        assert_eq!(
            cache.get("short.example", now + Duration::from_secs(1)),
            None,
            "the record's TTL bounds it"
        );
        assert_eq!(cache.get("other.example", now), None);
    }

    #[test]
    fn a_new_answer_replaces_the_old_one() {
        let cache = AnswerCache::new(Duration::from_secs(5));
        let now = Instant::now();
        cache.put("api.example", ips(1), now + Duration::from_secs(60), now);
        cache.put("api.example", ips(2), now + Duration::from_secs(60), now);
        assert_eq!(cache.get("api.example", now), Some(ips(2)));
    }

    #[test]
    fn max_ttl_zero_keeps_nothing() {
        let cache = AnswerCache::new(Duration::ZERO);
        let now = Instant::now();
        cache.put("api.example", ips(1), now + Duration::from_secs(60), now);
        assert_eq!(cache.get("api.example", now), None);
    }

    #[test]
    fn a_full_cache_drops_expired_names_then_everything() {
        let cache = AnswerCache::new(Duration::from_secs(5));
        let now = Instant::now();
        for n in 0..super::CACHED_NAMES_AT_MOST {
            cache.put(&format!("n{n}.example"), ips(1), now + Duration::from_secs(60), now);
        }
        let later = now + Duration::from_secs(1);
        cache.put("new.example", ips(2), later + Duration::from_secs(60), later);
        assert_eq!(cache.get("new.example", later), Some(ips(2)));
        assert_eq!(cache.get("n0.example", later), None, "the full cache was emptied");
        let len = cache.answers.lock().unwrap().len();
        assert_eq!(len, 1);
    }
}
