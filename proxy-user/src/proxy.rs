//! The life of one connection: resolve the upstream now, connect, forward,
//! and write one access log line when it closes.

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
use tracing::Instrument as _;

use crate::{
    addr::{ClientAddr, ListenAddr, UpstreamAddr, UpstreamTarget},
    config::Config,
    connect::{ConnectError, Connector},
    dataplane::{self, DataPlane, Transfer, sockmap::SockmapPlane},
    dns::{ResolveError, UpstreamResolver},
    sockopt::{self, TcpConfig},
};

/// How long a refused client may take to close after our FIN before we drop it.
const REFUSED_LINGER: Duration = Duration::from_secs(1);

/// Everything a connection needs, shared by all of them.
#[derive(Debug)]
pub struct Proxy {
    upstream: UpstreamTarget,
    resolver: UpstreamResolver,
    connector: Connector,
    tcp: TcpConfig,
    dataplane: DataPlane,
    /// Set when the data plane is sockmap.
    sockmap: Option<Arc<SockmapPlane>>,
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
            upstream: config.upstream.clone(),
            resolver: UpstreamResolver::new(&config.dns)?,
            connector: Connector::new(config.connect),
            tcp: config.tcp,
            dataplane: config.dataplane,
            sockmap,
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
    pub fn upstream(&self) -> &UpstreamTarget {
        &self.upstream
    }

    /// Resolves the upstream once, for the start-up check.
    pub async fn resolve_upstream(&self) -> Result<Vec<UpstreamAddr>, ResolveError> {
        self.resolver.resolve(&self.upstream).await
    }

    /// Serves one accepted connection to its end. `stop` cuts it short.
    pub async fn serve(
        &self,
        client: TcpStream,
        client_addr: ClientAddr,
        listen: ListenAddr,
        stop: CancellationToken,
    ) {
        let span = tracing::info_span!("conn", client = %client_addr, listen = %listen);
        self.serve_inner(client, stop).instrument(span).await;
    }

    async fn serve_inner(&self, client: TcpStream, stop: CancellationToken) {
        let started = Instant::now();
        if let Err(error) = sockopt::apply(&client, &self.tcp) {
            tracing::warn!(%error, "client socket options");
        }
        let resolve_started = Instant::now();
        let resolved = self.resolver.resolve(&self.upstream).await;
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
        } = dataplane::forward(self.dataplane, self.sockmap.as_deref(), client, upstream, stop).await;
        tracing::info!(
            upstream = %upstream_addr,
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
