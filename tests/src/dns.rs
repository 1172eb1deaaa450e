//! An authoritative DNS server for the tests and the demo (hickory-server with
//! our own handler), whose answers the test changes while the proxy runs.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use hickory_proto::{
    op::{Header, HeaderCounts, Metadata, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata},
};
use hickory_server::{
    Server,
    net::runtime::Time,
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
};

/// What the server says for one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// These addresses (A and AAAA records as they apply).
    Addrs(Vec<IpAddr>),
    /// NXDOMAIN.
    NxDomain,
    /// SERVFAIL.
    ServFail,
    /// No answer at all: the client times out.
    Silent,
}

#[derive(Debug, Default)]
struct Zone {
    answers: Mutex<HashMap<String, Answer>>,
    queries: AtomicU64,
    ttl: AtomicU64,
}

struct Handler(Arc<Zone>);

/// A running DNS server (UDP and TCP on the same loopback port).
pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Arc<Zone>,
    server: Server<Handler>,
}

impl DnsServer {
    /// Starts on `127.0.0.1` with an ephemeral port; answers carry `ttl`.
    pub async fn start(ttl: Duration) -> Result<Self> {
        // UDP and TCP on one port: the port the UDP socket got may be taken
        // for TCP (by a busy test's outgoing connection), so try a few.
        let mut attempt = 0;
        let (udp, tcp) = loop {
            let udp =
                tokio::net::UdpSocket::bind("127.0.0.1:0").await.context("binding the DNS UDP socket")?;
            match crate::listen(udp.local_addr()?) {
                Ok(tcp) => break (udp, tcp),
                Err(_) if attempt < 50 => attempt += 1,
                Err(e) => return Err(e).context("binding the DNS TCP socket"),
            }
        };
        Self::serve(udp, tcp, ttl, &[])
    }

    /// Starts on `addr` (UDP and TCP), in the namespace of the calling
    /// thread, answering `answers` from its first query (a server restarted
    /// under load must not say NXDOMAIN before its records are set).
    pub async fn start_on(addr: SocketAddr, ttl: Duration, answers: &[(&str, Answer)]) -> Result<Self> {
        let udp =
            tokio::net::UdpSocket::bind(addr).await.with_context(|| format!("binding DNS UDP {addr}"))?;
        let tcp = crate::listen(addr).with_context(|| format!("binding DNS TCP {addr}"))?;
        Self::serve(udp, tcp, ttl, answers)
    }

    fn serve(
        udp: tokio::net::UdpSocket,
        tcp: tokio::net::TcpListener,
        ttl: Duration,
        answers: &[(&str, Answer)],
    ) -> Result<Self> {
        let addr = udp.local_addr()?;
        let zone = Arc::new(Zone::default());
        zone.ttl.store(ttl.as_secs(), Ordering::Relaxed);
        zone.answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(answers.iter().map(|(name, answer)| (normalize(name), answer.clone())));
        let mut server = Server::new(Handler(Arc::clone(&zone)));
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 4096);
        Ok(Self { addr, zone, server })
    }

    /// Sets what `name` resolves to from now on.
    pub fn set(&self, name: &str, answer: Answer) {
        let key = normalize(name);
        self.zone.answers.lock().unwrap_or_else(|p| p.into_inner()).insert(key, answer);
    }

    /// Queries received so far.
    #[must_use]
    pub fn queries(&self) -> u64 {
        self.zone.queries.load(Ordering::Relaxed)
    }

    /// Stops serving; later queries get no answer.
    pub async fn stop(mut self) {
        let _ = self.server.shutdown_gracefully().await;
    }
}

fn normalize(name: &str) -> String {
    let name = name.to_ascii_lowercase();
    if name.ends_with('.') { name } else { format!("{name}.") }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        self.0.queries.fetch_add(1, Ordering::Relaxed);
        let Ok(info) = request.request_info() else {
            return not_sent(request);
        };
        let name = info.query.name().to_string();
        let query_type = info.query.query_type();
        let answer = self.0.answers.lock().unwrap_or_else(|p| p.into_inner()).get(&normalize(&name)).cloned();
        let ttl = u32::try_from(self.0.ttl.load(Ordering::Relaxed)).unwrap_or(u32::MAX);
        let builder = MessageResponseBuilder::new(&request.queries, None);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let sent = match answer {
            Some(Answer::Silent) => return not_sent(request),
            None | Some(Answer::NxDomain) => {
                response_handle
                    .send_response(builder.error_msg(&request.metadata, ResponseCode::NXDomain))
                    .await
            }
            Some(Answer::ServFail) => {
                response_handle
                    .send_response(builder.error_msg(&request.metadata, ResponseCode::ServFail))
                    .await
            }
            Some(Answer::Addrs(addrs)) => {
                let owner = Name::from_ascii(&name).unwrap_or_default();
                let records: Vec<Record> = addrs
                    .iter()
                    .filter_map(|ip| match (ip, query_type) {
                        (IpAddr::V4(v4), RecordType::A) => Some(RData::A(rdata::A(*v4))),
                        (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(rdata::AAAA(*v6))),
                        _ => None,
                    })
                    .map(|rdata| Record::from_rdata(owner.clone(), ttl, rdata))
                    .collect();
                response_handle.send_response(builder.build(metadata, records.iter(), [], [], [])).await
            }
        };
        sent.unwrap_or_else(|_| not_sent(request))
    }
}

/// The record of a request that got no response (Silent, or a send error).
fn not_sent(request: &Request) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() })
}
