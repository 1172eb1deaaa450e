//! A lookup answered by one query per record type, sent straight from the
//! thread's kept UDP socket to the one name server, without hickory's
//! lookup machinery.
//!
//! hickory passes a query through its cache, its name server pool and an
//! exchange task before the datagram leaves, and the answer back the same
//! way, work a lookup on every connection pays each time besides the
//! query's round trip. This path only answers what hickory would
//! answer the same way: a name hickory asks for as it is first (no search
//! domain before it), not in the hosts file, one UDP name server, and a
//! clean answer with addresses. Anything else (an error code, a truncated
//! or unreadable answer, no addresses at all, no answer in time) is left to
//! hickory, which asks again and decides.
//!
//! What it keeps of hickory's defence against forged answers: a random ID
//! per query, the answer read only from the server's address and port, its
//! ID and question checked, anything else skipped; the sockets rotate as in
//! [`super::udp_pool`].

use std::{
    cell::RefCell,
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use hickory_resolver::{
    Hosts,
    config::{ProtocolConfig, ResolveHosts, ResolverConfig, ResolverOpts},
    net::runtime::DnsUdpSocket as _,
    proto::{
        op::{Message, MessageType, OpCode, Query, ResponseCode},
        rr::{DNSClass, Name, RData, RecordType, domain::usage},
    },
};

use super::{cache::make_room, udp_pool};
use crate::config::DnsFamily;

/// Aliases followed in one answer at most.
const CNAMES_AT_MOST: usize = 8;

/// A plain query's answer fits in 512 bytes or comes truncated.
const ANSWER_BYTES_AT_MOST: usize = 512;

/// When lookups may take the direct path, and how.
#[derive(Debug)]
pub(super) struct DirectPath {
    server: SocketAddr,
    /// Names with more labels than this are asked for as they are first.
    ndots: usize,
    /// No search domain could come before a name asked for as it is.
    no_search: bool,
    hosts: Arc<Hosts>,
    record_types: &'static [RecordType],
    timeout: Duration,
    /// How long a declined name is left to hickory: `max_ttl`, at least 1 s.
    decline_for: Duration,
}

/// One query's outcome.
enum Answered {
    Addrs(Vec<IpAddr>, u32),
    /// A clean answer without records of the type asked for.
    NoData,
    /// hickory is to decide.
    Declined,
}

impl DirectPath {
    /// The direct path for these settings, if they have exactly one name
    /// server that takes UDP.
    pub(super) fn new(
        servers: &ResolverConfig,
        options: &ResolverOpts,
        family: DnsFamily,
        timeout: Duration,
        max_ttl: Duration,
    ) -> Option<Self> {
        let [server] = servers.name_servers() else { return None };
        let udp =
            server.connections.iter().find(|c| c.protocol == ProtocolConfig::Udp && c.bind_addr.is_none())?;
        let hosts = match options.use_hosts_file {
            // As hickory reads it (once, when a resolver is built).
            ResolveHosts::Always | ResolveHosts::Auto => Hosts::from_system().unwrap_or_default(),
            ResolveHosts::Never => Hosts::default(),
        };
        Some(Self {
            server: SocketAddr::new(server.ip, udp.port),
            ndots: options.ndots,
            no_search: servers.search().is_empty() && servers.domain().is_none(),
            hosts: Arc::new(hosts),
            record_types: family.record_types(),
            timeout,
            decline_for: max_ttl.max(Duration::from_secs(1)),
        })
    }

    /// `name`'s addresses (IPv4 first) and until when they hold, or `None`:
    /// hickory is to look the name up.
    pub(super) async fn lookup(&self, text: &str) -> Option<(Vec<IpAddr>, Instant)> {
        // Parsed as hickory parses a name it is given.
        let mut name = Name::from_utf8(text).ok()?;
        let as_it_is_first = name.is_fqdn() || name.num_labels() as usize > self.ndots || self.no_search;
        if !as_it_is_first {
            return None;
        }
        // As an answer's names are read (absolute); the same on the wire.
        name.set_fqdn(true);
        // Names hickory answers itself without asking (RFC 6761).
        let special = [&*usage::LOCALHOST, &*usage::INVALID, &*usage::ONION];
        if name.is_localhost() || special.iter().any(|zone| zone.zone_of(&name)) {
            return None;
        }
        let in_hosts = |&record_type: &RecordType| {
            self.hosts.lookup_static_host(&Query::query(name.clone(), record_type)).is_some()
        };
        if self.record_types.iter().any(in_hosts) || declined_lately(text, Instant::now()) {
            return None;
        }
        let asked = Instant::now();
        let answers = match self.record_types {
            [one] => vec![self.query(&name, *one).await],
            [first, second] => {
                let (a, b) = tokio::join!(self.query(&name, *first), self.query(&name, *second));
                vec![a, b]
            }
            _ => return None,
        };
        let (mut addrs, mut ttl) = (Vec::new(), u32::MAX);
        for answer in answers {
            match answer {
                Answered::Addrs(found, found_ttl) => {
                    addrs.extend(found);
                    ttl = ttl.min(found_ttl);
                }
                Answered::NoData => {}
                Answered::Declined => addrs.clear(),
            }
        }
        if addrs.is_empty() {
            self.decline(text, asked);
            return None;
        }
        Some((addrs, asked + Duration::from_secs(ttl.into())))
    }

    /// hickory answers `name` on this thread for a while: when a name
    /// fails, hickory's cache keeps its failure (for up to `max_ttl`), and a
    /// direct query before each of its answers would double the queries
    /// of every failing connection.
    fn decline(&self, name: &str, now: Instant) {
        DECLINED.with_borrow_mut(|declined| {
            make_room(declined, name, DECLINED_NAMES_AT_MOST, |until| *until > now);
            declined.insert(name.to_owned(), now + self.decline_for);
        });
    }
}

/// Whether `name` was declined on this thread and is still hickory's.
fn declined_lately(name: &str, now: Instant) -> bool {
    DECLINED.with_borrow(|declined| declined.get(name).is_some_and(|until| *until > now))
}

/// Names one thread remembers as declined at most.
const DECLINED_NAMES_AT_MOST: usize = 256;

thread_local! {
    /// Names this thread's direct path declined lately, until when hickory
    /// answers them.
    static DECLINED: RefCell<HashMap<String, Instant>> = RefCell::new(HashMap::new());
}

impl DirectPath {
    async fn query(&self, name: &Name, record_type: RecordType) -> Answered {
        match tokio::time::timeout(self.timeout, self.exchange(name, record_type)).await {
            Ok(Ok(answered)) => answered,
            Ok(Err(_)) | Err(_) => Answered::Declined,
        }
    }

    /// Sends the query and reads until its answer (others are skipped).
    async fn exchange(&self, name: &Name, record_type: RecordType) -> std::io::Result<Answered> {
        let mut query = Message::query();
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(name.clone(), record_type));
        let bytes = query.to_vec().map_err(std::io::Error::other)?;
        let any_port = match self.server {
            SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
        };
        let socket = udp_pool::lend(any_port, self.server).await?;
        socket.send_to(&bytes, self.server).await?;
        let mut buf = [0; ANSWER_BYTES_AT_MOST];
        loop {
            let (len, from) = socket.recv_from(&mut buf).await?;
            let from_server = from.ip().to_canonical() == self.server.ip().to_canonical()
                && from.port() == self.server.port();
            if !from_server || buf[..len.min(2)] != query.metadata.id.to_be_bytes() {
                continue;
            }
            let Ok(answer) = Message::from_vec(&buf[..len]) else { return Ok(Answered::Declined) };
            if answer.metadata.message_type != MessageType::Response || answer.queries != query.queries {
                continue;
            }
            return Ok(read_answer(&answer, name, record_type));
        }
    }
}

/// The addresses of `record_type` the answer gives `name`, through its
/// aliases, with their least TTL.
fn read_answer(answer: &Message, name: &Name, record_type: RecordType) -> Answered {
    let clean = answer.metadata.op_code == OpCode::Query
        && !answer.metadata.truncation
        && answer.metadata.response_code == ResponseCode::NoError;
    if !clean {
        return Answered::Declined;
    }
    let mut owner = name.clone();
    let mut ttl = u32::MAX;
    for _ in 0..CNAMES_AT_MOST {
        let alias = answer.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if r.name == owner && r.dns_class == DNSClass::IN => {
                Some((target.0.clone(), r.ttl))
            }
            _ => None,
        });
        let Some((target, alias_ttl)) = alias else { break };
        owner = target;
        ttl = ttl.min(alias_ttl);
    }
    let addrs: Vec<(IpAddr, u32)> = answer
        .answers
        .iter()
        .filter(|r| r.name == owner && r.dns_class == DNSClass::IN)
        .filter_map(|r| match (&r.data, record_type) {
            (RData::A(a), RecordType::A) => Some((IpAddr::V4(a.0), r.ttl)),
            (RData::AAAA(aaaa), RecordType::AAAA) => Some((IpAddr::V6(aaaa.0), r.ttl)),
            _ => None,
        })
        .collect();
    if addrs.is_empty() {
        // Aliases without their addresses are hickory's to chase.
        return if owner == *name && answer.answers.is_empty() {
            Answered::NoData
        } else {
            Answered::Declined
        };
    }
    let ttl = addrs.iter().map(|(_, t)| *t).fold(ttl, u32::min);
    Answered::Addrs(addrs.into_iter().map(|(ip, _)| ip).collect(), ttl)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hickory_resolver::{
        config::{NameServerConfig, ResolverConfig, ResolverOpts},
        proto::rr::Name,
    };
    use tokio::net::UdpSocket;

    use super::DirectPath;
    use crate::config::DnsFamily;

    const TIMEOUT: Duration = Duration::from_millis(50);

    /// Whether `name` was sent to the name server by a path whose
    /// configuration has `search` as its search list.
    async fn asked(name: &str, search: &[&str]) -> bool {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut ns = NameServerConfig::udp_and_tcp(server.local_addr().unwrap().ip());
        ns.connections.iter_mut().for_each(|c| c.port = server.local_addr().unwrap().port());
        let search = search.iter().map(|s| Name::from_ascii(s).unwrap()).collect();
        let servers = ResolverConfig::from_parts(None, search, vec![ns]);
        let path =
            DirectPath::new(&servers, &ResolverOpts::default(), DnsFamily::Ipv4, TIMEOUT, Duration::ZERO)
                .expect("one UDP name server");
        assert_eq!(path.lookup(name).await, None, "the server never answers");
        let mut buf = [0; 512];
        server.try_recv_from(&mut buf).is_ok()
    }

    #[tokio::test]
    async fn only_a_name_hickory_asks_for_as_it_is_first_goes_direct() {
        // ndots is 1 by default: two labels or more are asked as they are first.
        assert!(asked("api.example", &["cluster.local."]).await);
        assert!(asked("api", &[]).await, "no search domain could come first");
        assert!(asked("api.", &["cluster.local."]).await, "absolute");
        assert!(!asked("kube", &["cluster.local."]).await, "a search domain comes first");
        assert!(!asked("localhost.", &[]).await, "the hosts file answers it");
        assert!(!asked("api.localhost", &[]).await, "hickory answers loopback itself");
        assert!(!asked("api.invalid", &[]).await, "hickory answers NXDOMAIN itself");
    }
}
