//! Upstream name resolution, done again for every new connection: EKS moves
//! its API endpoint between ENIs, so no address is ever pinned. Answers may be
//! reused for at most `max_ttl` (0 = never reused).

mod cache;
mod udp_pool;

use cache::AnswerCache;

use std::{
    cell::RefCell,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use hickory_resolver::{
    Resolver,
    config::{ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts},
    net::NetError,
    system_conf,
};
use udp_pool::PooledUdpProvider;

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

/// Resolves the upstream target to the addresses to try, in DNS order.
#[derive(Debug)]
pub struct UpstreamResolver {
    /// What every thread's hickory resolver is built from (see [`THREAD_RESOLVERS`]).
    settings: Arc<ResolverSettings>,
    /// hickory's own bound on one query (`dns_timeout`).
    query_timeout: Duration,
    /// The bound on a whole lookup, hickory's retries included.
    timeout: Duration,
    /// The record types asked for, as errors name them.
    records: &'static str,
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
        options.ip_strategy = match config.family {
            DnsFamily::Any => LookupIpStrategy::Ipv4AndIpv6,
            DnsFamily::Ipv4 => LookupIpStrategy::Ipv4Only,
            DnsFamily::Ipv6 => LookupIpStrategy::Ipv6Only,
        };
        options.timeout = config.timeout;
        options.attempts = 1;
        options.positive_max_ttl = Some(config.max_ttl);
        options.negative_max_ttl = Some(config.max_ttl);
        if config.max_ttl.is_zero() {
            options.cache_size = 0;
        }
        let settings = Arc::new(ResolverSettings { servers, options });
        // Built once here so that settings hickory refuses fail at start-up
        // (or a reload), not at a connection's lookup.
        settings.build()?;
        // hickory retries on its own; this bounds the whole lookup for the client.
        Ok(Self {
            settings,
            query_timeout: config.timeout,
            records: match config.family {
                DnsFamily::Any => "A or AAAA",
                DnsFamily::Ipv4 => "A",
                DnsFamily::Ipv6 => "AAAA",
            },
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
        let resolver = self.thread_resolver()?;
        let lookup = tokio::time::timeout(self.timeout, resolver.lookup_ip(name.as_str()))
            .await
            .map_err(|_| ResolveError::Timeout { name: name.clone(), timeout: self.timeout })?
            .map_err(|source| self.classify(name, source))?;
        let ips: Arc<[IpAddr]> = lookup.iter().collect();
        if ips.is_empty() {
            return Err(ResolveError::NoRecords { name: name.clone(), records: self.records });
        }
        self.answers.put(name, Arc::clone(&ips), lookup.valid_until(), Instant::now());
        Ok(addrs(&ips))
    }

    fn classify(&self, name: &str, source: NetError) -> ResolveError {
        let name = name.to_owned();
        if source.is_nx_domain() {
            ResolveError::NxDomain { name }
        } else if source.is_no_records_found() {
            ResolveError::NoRecords { name, records: self.records }
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

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
        sync::{Arc, Mutex},
        time::Duration,
    };

    use hickory_resolver::proto::{
        op::{Message, MessageType, OpCode, ResponseCode},
        rr::{
            RData, Record, RecordType,
            rdata::{A, AAAA},
        },
    };
    use tokio::net::UdpSocket;

    use super::{DnsConfig, DnsFamily, UpstreamResolver};
    use crate::addr::UpstreamTarget;

    /// The source port and record type of every query a test server got.
    type Queries = Arc<Mutex<Vec<(u16, RecordType)>>>;

    /// Answers every A query with 10.0.0.N, N counting the A queries, every
    /// AAAA query with fd00::1, and sends each answer twice, as a network
    /// that duplicates datagrams would deliver it.
    async fn duplicating_server(socket: UdpSocket, queries: Queries) {
        let mut buf = [0; 512];
        let mut n = 0u8;
        loop {
            let (len, from) = socket.recv_from(&mut buf).await.unwrap();
            let query = Message::from_vec(&buf[..len]).unwrap();
            let mut answer = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
            answer.metadata.recursion_desired = true;
            answer.metadata.recursion_available = true;
            answer.metadata.response_code = ResponseCode::NoError;
            answer.add_queries(query.queries.clone());
            let question = &query.queries[0];
            queries.lock().unwrap().push((from.port(), question.query_type()));
            let name = question.name().clone();
            match question.query_type() {
                RecordType::A => {
                    n += 1;
                    answer.add_answer(Record::from_rdata(name, 0, RData::A(A(Ipv4Addr::new(10, 0, 0, n)))));
                }
                RecordType::AAAA => {
                    answer.add_answer(Record::from_rdata(name, 0, RData::AAAA(AAAA(V6))));
                }
                _ => {}
            }
            let bytes = answer.to_vec().unwrap();
            socket.send_to(&bytes, from).await.unwrap();
            socket.send_to(&bytes, from).await.unwrap();
        }
    }

    const V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);

    /// A resolver of `family` that asks a new duplicating server, whose queries are returned.
    async fn resolver(family: DnsFamily) -> (UpstreamResolver, Queries) {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let config = DnsConfig {
            servers: vec![server.local_addr().unwrap()],
            max_ttl: Duration::ZERO,
            timeout: Duration::from_secs(2),
            family,
        };
        let queries = Queries::default();
        tokio::spawn(duplicating_server(server, Arc::clone(&queries)));
        (UpstreamResolver::new(&config).unwrap(), queries)
    }

    fn addrs(ips: &[IpAddr]) -> Vec<SocketAddr> {
        ips.iter().map(|&ip| SocketAddr::new(ip, 443)).collect()
    }

    #[tokio::test]
    async fn an_answer_that_arrives_twice_is_not_taken_for_the_next_one() {
        let (resolver, queries) = resolver(DnsFamily::Any).await;
        let target: UpstreamTarget = "api.example:443".parse().unwrap();
        for n in 1..=100 {
            let got = resolver.resolve(&target).await.unwrap();
            let v4 = IpAddr::V4(Ipv4Addr::new(10, 0, 0, n));
            let got: Vec<_> = got.iter().map(|a| a.0).collect();
            assert_eq!(got, addrs(&[v4, IpAddr::V6(V6)]), "lookup {n}: A first");
        }
        let mut ports: Vec<_> = queries.lock().unwrap().iter().map(|(port, _)| *port).collect();
        assert_eq!(ports.len(), 200, "an A and an AAAA query for each lookup");
        ports.sort_unstable();
        ports.dedup();
        assert!(ports.len() <= 200 / 32, "the queries' sockets were reused: {} ports", ports.len());
    }

    #[tokio::test]
    async fn a_family_asks_for_its_records_only() {
        let target: UpstreamTarget = "api.example:443".parse().unwrap();
        let cases = [
            (DnsFamily::Ipv4, vec![RecordType::A], addrs(&[IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))])),
            (DnsFamily::Ipv6, vec![RecordType::AAAA], addrs(&[IpAddr::V6(V6)])),
        ];
        for (family, asked, expected) in cases {
            let (resolver, queries) = resolver(family).await;
            let got = resolver.resolve(&target).await.unwrap();
            assert_eq!(got.iter().map(|a| a.0).collect::<Vec<_>>(), expected, "{family:?}");
            let types: Vec<_> = queries.lock().unwrap().iter().map(|(_, t)| *t).collect();
            assert_eq!(types, asked, "{family:?}");
        }
    }
}
