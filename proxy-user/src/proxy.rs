//! The life of one connection: the edge guard (PROXY header, ClientHello),
//! resolve the upstream now, connect, forward, and write one access log line
//! when it closes.

use std::{
    io,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, field::Empty};

use crate::{
    addr::{ClientAddr, ListenAddr, UpstreamAddr, UpstreamTarget},
    config::Config,
    connect::{ConnectError, Connector},
    dataplane::{self, DataPlane, Transfer, sockmap::SockmapPlane},
    dns::{ResolveError, UpstreamResolver},
    edge::{self, EdgeConfig, EdgeStats, Learned},
    sockopt::{self, TcpConfig},
};

/// How long a refused client may take to close after our FIN before we drop it.
const REFUSED_LINGER: Duration = Duration::from_secs(1);

/// Everything a connection needs, shared by all of them.
#[derive(Debug)]
pub struct Proxy {
    resolver: UpstreamResolver,
    connector: Connector,
    tcp: TcpConfig,
    dataplane: DataPlane,
    /// Set when the data plane is sockmap.
    sockmap: Option<Arc<SockmapPlane>>,
    /// What the edge guards of every listener admitted and refused.
    edge_stats: EdgeStats,
}

/// Why no upstream connection was made.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("upstream socket: {0}")]
    Sockopt(#[from] sockopt::SockoptError),
}

impl SetupError {
    fn reason(&self) -> &'static str {
        match self {
            Self::Resolve(_) => "resolve_failed",
            Self::Connect(_) => "connect_failed",
            Self::Sockopt(_) => "internal_error",
        }
    }
}

impl Proxy {
    pub fn new(config: &Config, sockmap: Option<Arc<SockmapPlane>>) -> Result<Self, ResolveError> {
        Ok(Self {
            resolver: UpstreamResolver::new(&config.dns)?,
            connector: Connector::new(config.connect),
            tcp: config.tcp,
            dataplane: config.dataplane,
            sockmap,
            edge_stats: EdgeStats::default(),
        })
    }

    #[must_use]
    pub fn sockmap(&self) -> Option<&SockmapPlane> {
        self.sockmap.as_deref()
    }

    #[must_use]
    pub fn dataplane(&self) -> DataPlane {
        self.dataplane
    }

    #[must_use]
    pub fn edge_stats(&self) -> &EdgeStats {
        &self.edge_stats
    }

    /// Resolves an upstream once, for the start-up check.
    pub async fn resolve_upstream(&self, target: &UpstreamTarget) -> Result<Vec<UpstreamAddr>, ResolveError> {
        self.resolver.resolve(target).await
    }

    /// Serves one connection accepted from `peer` (the NLB, behind
    /// PrivateLink) to its end. The span's `client` is the address the PROXY
    /// header names, or the peer's. `stop` cuts it short.
    pub async fn serve(
        &self,
        client: TcpStream,
        peer: ClientAddr,
        listen: ListenAddr,
        edge: Arc<EdgeConfig>,
        stop: CancellationToken,
    ) {
        let span = tracing::info_span!(
            "conn",
            client = Empty,
            peer = %peer,
            listen = %listen,
            proxy_header = Empty,
            vpce = Empty,
            sni = Empty
        );
        self.serve_inner(client, peer, &edge, stop).instrument(span).await;
    }

    async fn serve_inner(
        &self,
        mut client: TcpStream,
        peer: ClientAddr,
        edge: &EdgeConfig,
        stop: CancellationToken,
    ) {
        let started = Instant::now();
        if let Err(error) = sockopt::apply(&client, &self.tcp) {
            tracing::warn!(%error, "client socket options");
        }
        let mut learned = Learned::default();
        let guarded = tokio::select! {
            guarded = edge::guard(&mut client, edge, &self.edge_stats, &mut learned) => Some(guarded),
            () = stop.cancelled() => None,
        };
        record_learned(&learned, peer);
        let edge_time = started.elapsed();
        let target = match guarded {
            Some(Ok(target)) => target,
            Some(Err(refusal)) => {
                log_refused(refusal.label(), &refusal, &learned, edge_time, started);
                close_refused(client).await;
                return;
            }
            None => {
                log_refused("stopped", &"stopped during the edge checks", &learned, edge_time, started);
                return;
            }
        };
        let resolve_started = Instant::now();
        let resolved = self.resolver.resolve(target).await;
        let resolve_time = resolve_started.elapsed();
        let connect_started = Instant::now();
        let connected = match resolved {
            Ok(addrs) => self.connect(&addrs).await,
            Err(e) => Err(e.into()),
        };
        let connect_time = connect_started.elapsed();
        let (upstream, upstream_addr) = match connected {
            Ok(connected) => connected,
            Err(error) => {
                tracing::warn!(
                    upstream = "-",
                    target = %target,
                    chained_headers = learned.chained_headers,
                    edge_ms = millis(edge_time),
                    resolve_ms = millis(resolve_time),
                    connect_ms = millis(connect_time),
                    bytes_up = 0u64,
                    bytes_down = 0u64,
                    duration_ms = millis(started.elapsed()),
                    reason = error.reason(),
                    %error,
                    "connection closed"
                );
                close_refused(client).await;
                return;
            }
        };
        let Transfer {
            client_to_upstream,
            upstream_to_client,
            kernel_bytes,
            paused_directions,
            pauses,
            resumes,
            reason,
        } = dataplane::forward(
            self.dataplane,
            self.sockmap.as_deref(),
            client,
            upstream,
            stop,
            learned.bytes_read,
        )
        .await;
        tracing::info!(
            upstream = %upstream_addr,
            target = %target,
            chained_headers = learned.chained_headers,
            edge_ms = millis(edge_time),
            resolve_ms = millis(resolve_time),
            connect_ms = millis(connect_time),
            bytes_up = client_to_upstream,
            bytes_down = upstream_to_client,
            kernel_bytes,
            paused_directions,
            pauses,
            resumes,
            duration_ms = millis(started.elapsed()),
            reason = reason.label(),
            "connection closed"
        );
    }

    async fn connect(&self, addrs: &[UpstreamAddr]) -> Result<(TcpStream, UpstreamAddr), SetupError> {
        let (stream, addr) = self.connector.connect(addrs).await?;
        sockopt::apply(&stream, &self.tcp)?;
        Ok((stream, addr))
    }
}

/// The client address (the header's, or the peer's), PROXY header version,
/// VPC endpoint and server name go into the connection's span, so every line
/// of it shows them.
fn record_learned(learned: &Learned, peer: ClientAddr) {
    let span = tracing::Span::current();
    match learned.client {
        Some(client) => span.record("client", tracing::field::display(client)),
        None => span.record("client", tracing::field::display(peer)),
    };
    if let Some(version) = learned.proxy_version {
        span.record("proxy_header", version);
    }
    if let Some(vpce) = &learned.vpce_id {
        span.record("vpce", vpce.as_str());
    }
    if let Some(sni) = &learned.server_name {
        span.record("sni", sni.as_str());
    }
}

/// The access log line of a connection the guard closed: a health check is
/// routine (info), anything else a warning.
fn log_refused(
    reason: &'static str,
    error: &dyn std::fmt::Display,
    learned: &Learned,
    edge_time: Duration,
    started: Instant,
) {
    macro_rules! closed {
        ($level:ident) => {
            tracing::$level!(
                upstream = "-",
                chained_headers = learned.chained_headers,
                edge_ms = millis(edge_time),
                bytes_up = 0u64,
                bytes_down = 0u64,
                duration_ms = millis(started.elapsed()),
                reason,
                %error,
                "connection closed"
            )
        };
    }
    if reason == "health_check" {
        closed!(info);
    } else {
        closed!(warn);
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Closes a client we could not serve with a FIN, not a reset: the client may
/// already have sent its ClientHello, and closing a socket with unread bytes
/// would reset it. So: FIN, then read and discard until the client closes too
/// (or [`REFUSED_LINGER`] passes).
async fn close_refused(mut client: TcpStream) {
    if client.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let discard = async {
        loop {
            match client.read(&mut sink).await {
                Ok(0) => return Ok::<(), io::Error>(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    };
    let _ = tokio::time::timeout(REFUSED_LINGER, discard).await;
}
