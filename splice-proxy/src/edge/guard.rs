//! The guard's socket side, per connection: read the PROXY header (exactly
//! its bytes, so what follows stays for the data plane), check the VPC
//! endpoint, peek at the ClientHello (taking nothing: the upstream receives
//! it byte for byte) and pick the upstream by its server name. Each step is
//! bounded by its timeout; a refusal is counted in [`EdgeStats`].

use std::{net::SocketAddr, sync::atomic::Ordering};

use tokio::{
    io::AsyncReadExt as _,
    net::TcpStream,
    time::{Instant, timeout_at},
};

use super::{
    ChainedHeaders, EdgeConfig, EdgeStats, MAX_CHAINED_HEADERS, ProxyProtocolMode, Refusal,
    client_hello::{self, ClientHello, HelloError},
    peek::{Peeked, peek_now, peek_until},
    proxy_protocol::{self, Command, HeaderError, Parsed, ProxyHeader},
    routes::SniRefusal,
};
use crate::addr::UpstreamTarget;

/// What the guard learned about a connection, admitted or not (for its log line).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Learned {
    /// The client the PROXY header names (the NLB's own address is the peer).
    pub client: Option<SocketAddr>,
    /// Version of the PROXY header read (1 or 2).
    pub proxy_version: Option<u8>,
    pub vpce_id: Option<String>,
    pub server_name: Option<String>,
    /// Headers dropped after the first (`chained_proxy_headers = "strip"`).
    pub chained_headers: usize,
    /// Bytes read from the connection (the headers); everything after them
    /// is left for the data plane.
    pub bytes_read: u64,
}

/// Runs the checks of `edge` on a new connection and returns the upstream to
/// connect to, or why the connection must be closed (counted by the caller,
/// with every other close). `stats` counts what it accepted.
pub async fn guard<'a>(
    stream: &mut TcpStream,
    edge: &'a EdgeConfig,
    stats: &EdgeStats,
    learned: &mut Learned,
) -> Result<&'a UpstreamTarget, Refusal> {
    let pp = &edge.proxy_protocol;
    let mut after_header = false;
    if pp.mode != ProxyProtocolMode::Off {
        let deadline = Instant::now() + pp.header_timeout;
        let header = timeout_at(deadline, read_header(stream, pp.accept_v1))
            .await
            .map_err(|_| Refusal::HeaderTimeout)??;
        match header {
            None if pp.mode == ProxyProtocolMode::Required => return Err(Refusal::HeaderMissing),
            None => {}
            Some(header) => {
                stats.proxy_headers_accepted.fetch_add(1, Ordering::Relaxed);
                learned.bytes_read += header.len as u64;
                learned.client = header.source;
                learned.proxy_version = Some(header.version);
                learned.vpce_id = header.vpce_id;
                if header.command == Command::Local {
                    return Err(Refusal::HealthCheck);
                }
                after_header = true;
            }
        }
        if !pp.allowed_vpce_ids.is_empty() {
            match &learned.vpce_id {
                None => return Err(Refusal::VpceMissing),
                Some(id) if !pp.allowed_vpce_ids.contains(id) => return Err(Refusal::VpceDenied(id.clone())),
                Some(_) => {}
            }
        }
    }
    if !edge.upstreams.sni_check() {
        if after_header {
            drop_chained_already_there(stream, pp.chained, learned).await?;
        }
        return Ok(edge
            .upstreams
            .default_upstream()
            .expect("validated: without the SNI check there is an upstream"));
    }
    let deadline = Instant::now() + edge.client_hello_timeout;
    let hello = timeout_at(deadline, read_client_hello(stream, after_header, pp.chained, learned))
        .await
        .map_err(|_| Refusal::ClientHelloTimeout)??;
    stats.client_hellos_accepted.fetch_add(1, Ordering::Relaxed);
    learned.server_name.clone_from(&hello.server_name);
    edge.upstreams.choose(hello.server_name.as_deref()).map_err(|refusal| match refusal {
        SniRefusal::Missing => Refusal::SniMissing,
        SniRefusal::Denied(name) => Refusal::SniDenied(name),
    })
}

/// Waits for the first bytes: a complete header (then read, exactly), or
/// enough to tell there is none.
async fn read_header(stream: &mut TcpStream, accept_v1: bool) -> Result<Option<ProxyHeader>, Refusal> {
    let peeked = peek_until(stream, proxy_protocol::MAX_V2_HEADER, |buf| {
        match proxy_protocol::parse(buf, accept_v1) {
            Ok(Parsed::Incomplete) => None,
            Ok(Parsed::NotAHeader) => Some(Ok(None)),
            Ok(Parsed::Header(header)) => Some(Ok(Some(header))),
            Err(e) => Some(Err(e)),
        }
    })
    .await
    .map_err(Refusal::ClientError)?;
    match peeked {
        Peeked::Closed { bytes: 0 } => Err(Refusal::ClosedBeforeData),
        Peeked::Closed { bytes } => Err(Refusal::HeaderInvalid(format!(
            "truncated: the client closed after {bytes} bytes of a header"
        ))),
        Peeked::Decided(Ok(Some(header))) => {
            consume(stream, header.len).await?;
            Ok(Some(header))
        }
        Peeked::Decided(Ok(None)) => Ok(None),
        Peeked::Decided(Err(e)) => Err(header_refusal(e)),
    }
}

fn header_refusal(e: HeaderError) -> Refusal {
    match e {
        HeaderError::Oversized { .. } => Refusal::HeaderOversized(e.to_string()),
        HeaderError::InvalidV1(_) | HeaderError::InvalidV2(_) => Refusal::HeaderInvalid(e.to_string()),
    }
}

/// Reads exactly `len` bytes (already peeked, so they are there) and drops them.
async fn consume(stream: &mut TcpStream, len: usize) -> Result<(), Refusal> {
    let mut header = vec![0u8; len];
    stream.read_exact(&mut header).await.map_err(Refusal::ClientError)?;
    Ok(())
}

/// What the bytes after a header start with.
enum Next {
    Header(ProxyHeader),
    Hello(ClientHello),
}

/// Peeks until a whole ClientHello is there. After a PROXY header, a second
/// one (either version, whatever `proxy_protocol_v1` says) is looked for first.
async fn read_client_hello(
    stream: &mut TcpStream,
    after_header: bool,
    chained: ChainedHeaders,
    learned: &mut Learned,
) -> Result<ClientHello, Refusal> {
    loop {
        let peeked = peek_until(stream, client_hello::MAX_PEEK, |buf| decide(buf, after_header, chained))
            .await
            .map_err(Refusal::ClientError)?;
        match peeked {
            Peeked::Closed { bytes: 0 } => return Err(Refusal::ClosedBeforeData),
            Peeked::Closed { bytes } => {
                return Err(Refusal::ClientHelloInvalid(format!(
                    "truncated: the client closed after {bytes} bytes of a ClientHello"
                )));
            }
            Peeked::Decided(Ok(Next::Hello(hello))) => return Ok(hello),
            Peeked::Decided(Ok(Next::Header(header))) => {
                drop_chained(stream, chained, &header, learned).await?
            }
            Peeked::Decided(Err(refusal)) => return Err(refusal),
        }
    }
}

fn decide(buf: &[u8], after_header: bool, chained: ChainedHeaders) -> Option<Result<Next, Refusal>> {
    if after_header {
        match proxy_protocol::parse(buf, true) {
            Ok(Parsed::Incomplete) => return None,
            Ok(Parsed::Header(header)) => return Some(Ok(Next::Header(header))),
            Err(_) if chained == ChainedHeaders::Refuse => return Some(Err(Refusal::ChainedHeader)),
            Err(e) => return Some(Err(header_refusal(e))),
            Ok(Parsed::NotAHeader) => {}
        }
    }
    match client_hello::parse(buf) {
        Ok(hello) => Some(Ok(Next::Hello(hello))),
        Err(HelloError::Incomplete) => None,
        Err(e @ HelloError::NotTls(_)) => Some(Err(Refusal::NotTls(e.to_string()))),
        Err(e) => Some(Err(Refusal::ClientHelloInvalid(e.to_string()))),
    }
}

/// A header after the first: refused, or read and dropped.
async fn drop_chained(
    stream: &mut TcpStream,
    chained: ChainedHeaders,
    header: &ProxyHeader,
    learned: &mut Learned,
) -> Result<(), Refusal> {
    if chained == ChainedHeaders::Refuse || learned.chained_headers == MAX_CHAINED_HEADERS {
        return Err(Refusal::ChainedHeader);
    }
    consume(stream, header.len).await?;
    learned.bytes_read += header.len as u64;
    learned.chained_headers += 1;
    Ok(())
}

/// Without the SNI check the client need not speak first, so nothing is
/// waited for: only bytes that arrived with the header are looked at.
async fn drop_chained_already_there(
    stream: &mut TcpStream,
    chained: ChainedHeaders,
    learned: &mut Learned,
) -> Result<(), Refusal> {
    loop {
        let buf = peek_now(stream, proxy_protocol::MAX_V2_HEADER).map_err(Refusal::ClientError)?;
        match proxy_protocol::parse(&buf, true) {
            Ok(Parsed::Header(header)) => drop_chained(stream, chained, &header, learned).await?,
            Err(_) if chained == ChainedHeaders::Refuse => return Err(Refusal::ChainedHeader),
            Err(e) => return Err(header_refusal(e)),
            Ok(Parsed::Incomplete | Parsed::NotAHeader) => return Ok(()),
        }
    }
}
