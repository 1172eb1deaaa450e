//! kubectl's pattern on a new connection, for the TLS workload: a TLS
//! handshake (the server's certificate verified), one request, its whole
//! answer; the server then closes (the request asks it to), so no port of
//! the client or of the proxy waits in TIME_WAIT. The upstream is the tests'
//! fake API server.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use rustls::{ClientConfig, ClientConnection, StreamOwned, pki_types::ServerName};
use splice_proxy_tests::api::Pki;

use crate::connect_rate::STALL_TIMEOUT;

/// The name the API server's certificate is for.
pub const HOSTNAME: &str = "api.bench.test";
const REQUEST: &[u8] = b"GET /version HTTP/1.1\r\nhost: api.bench.test\r\nconnection: close\r\n\r\n";
/// Largest answer head read.
const MAX_HEAD: usize = 16 << 10;

/// Verifies the server's certificate against the bench's CA.
pub struct TlsClient {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl TlsClient {
    pub fn new(pki: &Pki) -> Result<Self> {
        Ok(Self { config: pki.client_config()?, name: ServerName::try_from(HOSTNAME)? })
    }

    /// One connection through `addr`: the time from connect() to the whole
    /// answer.
    pub fn request(&self, addr: SocketAddr) -> Result<Duration> {
        let opened = Instant::now();
        let tcp = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(STALL_TIMEOUT))?;
        let connection = ClientConnection::new(Arc::clone(&self.config), self.name.clone())?;
        let mut tls = StreamOwned::new(connection, tcp);
        tls.write_all(REQUEST).with_context(|| format!("the handshake and request through {addr}"))?;
        read_answer(&mut tls).with_context(|| format!("the answer through {addr}"))?;
        let took = opened.elapsed();
        // The server's end: whatever it is (close_notify or not), the
        // connection is done.
        let _ = tls.read(&mut [0; 64]);
        Ok(took)
    }
}

/// Reads one HTTP/1.1 200 answer whole (head and `content-length` body).
fn read_answer(stream: &mut impl std::io::Read) -> Result<()> {
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            bail!("closed after {} bytes, before the whole answer", answer.len());
        }
        answer.extend_from_slice(&buffer[..n]);
        let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
            ensure!(answer.len() <= MAX_HEAD, "no end of the answer's head in {} bytes", answer.len());
            continue;
        };
        let head = std::str::from_utf8(&answer[..end]).context("the answer's head is not UTF-8")?;
        ensure!(head.starts_with("HTTP/1.1 200"), "answered {:?}", head.lines().next());
        let length: usize = head
            .lines()
            .find_map(|line| {
                line.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
            })
            .context("no content-length")?
            .parse()
            .context("content-length")?;
        if answer.len() >= end + 4 + length {
            return Ok(());
        }
    }
}
