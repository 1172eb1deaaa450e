//! The resolver against a DNS server of the test's own, on loopback.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use hickory_resolver::proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, AAAA, CNAME},
    },
};
use tokio::net::UdpSocket;

use super::{DnsConfig, DnsFamily, UpstreamResolver};
use crate::addr::UpstreamTarget;

/// The source port and record type of every query a test server got.
type Queries = Arc<Mutex<Vec<(u16, RecordType)>>>;

/// What the test server answers.
#[derive(Clone, Copy)]
enum Zone {
    /// A: 10.0.0.N, N counting the A queries; AAAA: fd00::1.
    Counting,
    /// An alias to `real.example.`, with its A record 10.9.9.9.
    Alias,
    /// NXDOMAIN.
    NxDomain,
}

const V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);

/// Answers as `zone` says, each answer twice, as a network that duplicates
/// datagrams would deliver it.
async fn server(socket: UdpSocket, zone: Zone, queries: Queries) {
    let mut buf = [0; 512];
    let mut n = 0u8;
    loop {
        let (len, from) = socket.recv_from(&mut buf).await.unwrap();
        let query = Message::from_vec(&buf[..len]).unwrap();
        let mut answer = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
        answer.metadata.recursion_desired = true;
        answer.metadata.recursion_available = true;
        answer.add_queries(query.queries.clone());
        let question = &query.queries[0];
        queries.lock().unwrap().push((from.port(), question.query_type()));
        let name = question.name().clone();
        match (zone, question.query_type()) {
            (Zone::Counting, RecordType::A) => {
                n += 1;
                answer.add_answer(Record::from_rdata(name, 0, RData::A(A(Ipv4Addr::new(10, 0, 0, n)))));
            }
            (Zone::Counting, RecordType::AAAA) => {
                answer.add_answer(Record::from_rdata(name, 0, RData::AAAA(AAAA(V6))));
            }
            (Zone::Alias, RecordType::A) => {
                let real = Name::from_ascii("real.example.").unwrap();
                answer.add_answer(Record::from_rdata(name, 60, RData::CNAME(CNAME(real.clone()))));
                answer.add_answer(Record::from_rdata(real, 60, RData::A(A(Ipv4Addr::new(10, 9, 9, 9)))));
            }
            (Zone::NxDomain, _) => answer.metadata.response_code = ResponseCode::NXDomain,
            _ => {}
        }
        let bytes = answer.to_vec().unwrap();
        socket.send_to(&bytes, from).await.unwrap();
        socket.send_to(&bytes, from).await.unwrap();
    }
}

/// A resolver of `family` that asks a new server of `zone`, whose queries are returned.
async fn resolver(zone: Zone, family: DnsFamily) -> (UpstreamResolver, Queries) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let config = DnsConfig {
        servers: vec![socket.local_addr().unwrap()],
        max_ttl: Duration::ZERO,
        timeout: Duration::from_secs(2),
        family,
    };
    let queries = Queries::default();
    tokio::spawn(server(socket, zone, Arc::clone(&queries)));
    (UpstreamResolver::new(&config).unwrap(), queries)
}

fn target() -> UpstreamTarget {
    "api.example:443".parse().unwrap()
}

fn addrs(ips: &[IpAddr]) -> Vec<SocketAddr> {
    ips.iter().map(|&ip| SocketAddr::new(ip, 443)).collect()
}

async fn resolve(resolver: &UpstreamResolver) -> Vec<SocketAddr> {
    resolver.resolve(&target()).await.unwrap().iter().map(|a| a.0).collect()
}

#[tokio::test]
async fn an_answer_that_arrives_twice_is_not_taken_for_the_next_one() {
    let (resolver, queries) = resolver(Zone::Counting, DnsFamily::Any).await;
    for n in 1..=100 {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 0, 0, n));
        assert_eq!(resolve(&resolver).await, addrs(&[v4, IpAddr::V6(V6)]), "lookup {n}: A first");
    }
    let mut ports: Vec<_> = queries.lock().unwrap().iter().map(|(port, _)| *port).collect();
    assert_eq!(ports.len(), 200, "an A and an AAAA query for each lookup");
    ports.sort_unstable();
    ports.dedup();
    assert!(ports.len() <= 200 / 32, "the queries' sockets were reused: {} ports", ports.len());
}

#[tokio::test]
async fn a_family_asks_for_its_records_only() {
    let cases = [
        (DnsFamily::Ipv4, vec![RecordType::A], addrs(&[IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))])),
        (DnsFamily::Ipv6, vec![RecordType::AAAA], addrs(&[IpAddr::V6(V6)])),
    ];
    for (family, asked, expected) in cases {
        let (resolver, queries) = resolver(Zone::Counting, family).await;
        assert_eq!(resolve(&resolver).await, expected, "{family:?}");
        let types: Vec<_> = queries.lock().unwrap().iter().map(|(_, t)| *t).collect();
        assert_eq!(types, asked, "{family:?}");
    }
}

#[tokio::test]
async fn an_alias_is_followed_to_its_addresses() {
    let (resolver, queries) = resolver(Zone::Alias, DnsFamily::Ipv4).await;
    assert_eq!(resolve(&resolver).await, addrs(&[IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9))]));
    assert_eq!(queries.lock().unwrap().len(), 1, "one query, answered directly");
}

#[tokio::test]
async fn an_error_answer_is_left_to_hickory_which_names_it() {
    let (resolver, queries) = resolver(Zone::NxDomain, DnsFamily::Ipv4).await;
    let error = resolver.resolve(&target()).await.unwrap_err();
    assert_eq!(error.kind(), "nxdomain", "{error}");
    assert_eq!(queries.lock().unwrap().len(), 2, "the direct query, then hickory's");
    let error = resolver.resolve(&target()).await.unwrap_err();
    assert_eq!(error.kind(), "nxdomain", "{error}");
    assert_eq!(queries.lock().unwrap().len(), 3, "a failing name is hickory's for a while: its query only");
}

#[tokio::test]
async fn lookups_of_a_name_at_once_share_the_query_in_flight() {
    let (resolver, queries) = resolver(Zone::Counting, DnsFamily::Ipv4).await;
    let first = addrs(&[IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))]);
    let r = &resolver;
    let together = tokio::join!(resolve(r), resolve(r), resolve(r), resolve(r), resolve(r));
    let together = [together.0, together.1, together.2, together.3, together.4];
    assert!(together.iter().all(|got| *got == first), "{together:?}");
    assert_eq!(queries.lock().unwrap().len(), 1, "one query for five lookups at once");
    // One after the other, each asks: nothing is kept (dns_max_ttl 0).
    let second = addrs(&[IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))]);
    assert_eq!(resolve(&resolver).await, second);
    assert_eq!(queries.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_shared_lookup_that_fails_leaves_each_to_ask_for_itself() {
    let (resolver, queries) = resolver(Zone::NxDomain, DnsFamily::Ipv4).await;
    let target = target();
    let (a, b) = tokio::join!(resolver.resolve(&target), resolver.resolve(&target));
    for error in [a.unwrap_err(), b.unwrap_err()] {
        assert_eq!(error.kind(), "nxdomain", "{error}");
    }
    // The first: the direct query, then hickory's; the second, told the
    // shared one failed: hickory's (the name is hickory's by then).
    assert_eq!(queries.lock().unwrap().len(), 3);
}
