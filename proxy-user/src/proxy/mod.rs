//! The life of one connection: the edge guard (PROXY header, ClientHello),
//! resolve the upstream now, connect, forward, and write one access log line
//! when it closes; each step feeds the metrics, the readiness state and the
//! table of open connections. [`probe`]: the background upstream probe.

mod closing;
pub mod probe;

use std::{
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, Instant},
};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, field::Empty};

use closing::{close_refused, log_refused, millis, record_learned};

use crate::{
    addr::{ClientAddr, ListenAddr, UpstreamAddr, UpstreamTarget},
    config::Config,
    connect::{ConnectConfig, ConnectError, Connected, Connector},
    connections::{ConnectionTable, Registration},
    dataplane::{self, DataPlane, Transfer, sockmap::SockmapPlane},
    dns::{DnsConfig, ResolveError, UpstreamResolver},
    edge::{self, EdgeConfig, EdgeStats, Learned},
    health::Health,
    metrics::Metrics,
    sockopt::{self, TcpConfig},
};

/// Everything a connection needs, shared by all of them.
#[derive(Debug)]
pub struct Proxy {
    /// Resolver, connector and socket options; a SIGHUP reload replaces
    /// them for new connections (a connection keeps the ones it started with).
    path: RwLock<Arc<PathSettings>>,
    dataplane: DataPlane,
    /// Set when the data plane is sockmap.
    sockmap: Option<Arc<SockmapPlane>>,
    /// What the edge guards of every listener admitted and refused.
    edge_stats: EdgeStats,
    metrics: Metrics,
    health: Arc<Health>,
    connections: Arc<ConnectionTable>,
}

/// A connection the edge guard admitted, connected to its upstream.
struct Established<'e> {
    client: TcpStream,
    upstream: TcpStream,
    upstream_addr: UpstreamAddr,
    /// The upstream the guard chose (a route, or the default).
    target: &'e UpstreamTarget,
    chained_headers: usize,
    /// Bytes read from the client before forwarding (PROXY headers).
    client_bytes_read: u64,
    edge_time: Duration,
    resolve_time: Duration,
    connect_time: Duration,
}

/// The settings of the connection path a reload may change.
#[derive(Debug)]
pub struct PathSettings {
    dns: DnsConfig,
    resolver: Arc<UpstreamResolver>,
    connect: ConnectConfig,
    connector: Arc<Connector>,
    tcp: TcpConfig,
}

impl PathSettings {
    /// From `config`, reusing the resolver (its cache) and the connector
    /// (its failed addresses) of `current` when their settings are unchanged.
    pub fn new(config: &Config, current: Option<&Self>) -> Result<Self, ResolveError> {
        let resolver = match current.filter(|c| c.dns == config.dns) {
            Some(current) => Arc::clone(&current.resolver),
            None => Arc::new(UpstreamResolver::new(&config.dns)?),
        };
        let connector = match current.filter(|c| c.connect == config.connect) {
            Some(current) => Arc::clone(&current.connector),
            None => Arc::new(Connector::new(config.connect)),
        };
        Ok(Self { dns: config.dns.clone(), resolver, connect: config.connect, connector, tcp: config.tcp })
    }
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

/// Where a connection reports what happens to it.
#[derive(Debug, Clone)]
pub struct Observers {
    pub metrics: Metrics,
    pub health: Arc<Health>,
    pub connections: Arc<ConnectionTable>,
}

impl Proxy {
    /// `dataplane`: the plane started (`auto` may have fallen back from the
    /// configured one); `sockmap` its maps when it is sockmap.
    pub fn new(
        config: &Config,
        dataplane: DataPlane,
        sockmap: Option<Arc<SockmapPlane>>,
        observers: Observers,
    ) -> Result<Self, ResolveError> {
        Ok(Self {
            path: RwLock::new(Arc::new(PathSettings::new(config, None)?)),
            dataplane,
            sockmap,
            edge_stats: EdgeStats::default(),
            metrics: observers.metrics,
            health: observers.health,
            connections: observers.connections,
        })
    }

    /// The connection path settings new connections use now.
    #[must_use]
    pub fn path(&self) -> Arc<PathSettings> {
        Arc::clone(&self.path.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// A reload: new connections use `path` from now on.
    pub fn set_path(&self, path: PathSettings) {
        *self.path.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(path);
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
        self.metrics.accepted(listen);
        let registration = self.connections.register(peer, listen);
        let span = tracing::info_span!(
            "conn",
            client = Empty,
            peer = %peer,
            listen = %listen,
            proxy_header = Empty,
            vpce = Empty,
            sni = Empty
        );
        self.serve_inner(client, peer, &edge, stop, &registration).instrument(span).await;
    }

    async fn serve_inner(
        &self,
        client: TcpStream,
        peer: ClientAddr,
        edge: &EdgeConfig,
        stop: CancellationToken,
        registration: &Registration,
    ) {
        let started = Instant::now();
        // Both stages are boxed (`forward` boxes its own). Inline, this future
        // would be as large as its largest stage (the sockmap plane's) for
        // the whole life of the connection, and an idle connection's
        // memory is mostly this future; boxed, the set-up's state is freed
        // once it is done.
        let Some(established) =
            Box::pin(self.establish(client, peer, edge, &stop, registration, started)).await
        else {
            return;
        };
        let Established {
            client,
            upstream,
            upstream_addr,
            target,
            chained_headers,
            client_bytes_read,
            edge_time,
            resolve_time,
            connect_time,
        } = established;
        let sockmap = self.sockmap.as_ref();
        registration.forwarding(upstream_addr);
        let progress = registration.bytes();
        let Transfer {
            client_to_upstream,
            upstream_to_client,
            kernel_bytes,
            paused_directions,
            pauses,
            resumes,
            reason,
        } = dataplane::forward(self.dataplane, sockmap, client, upstream, stop, client_bytes_read, progress)
            .await;
        // Counted before the log line, so whoever reads the line finds it counted.
        self.metrics.closed(reason.label(), client_to_upstream, upstream_to_client, kernel_bytes);
        tracing::info!(
            upstream = %upstream_addr,
            target = %target,
            chained_headers,
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

    /// The stages before forwarding: socket options, the edge guard, the
    /// resolution and the connection to the upstream. A refusal or failure
    /// is counted, logged and closed here (`None`).
    async fn establish<'e>(
        &self,
        mut client: TcpStream,
        peer: ClientAddr,
        edge: &'e EdgeConfig,
        stop: &CancellationToken,
        registration: &Registration,
        started: Instant,
    ) -> Option<Established<'e>> {
        let path = self.path();
        if let Err(error) = sockopt::apply(&client, &path.tcp) {
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
                self.metrics.closed(refusal.label(), 0, 0, 0);
                log_refused(refusal.label(), &refusal, &learned, edge_time, started);
                close_refused(client).await;
                return None;
            }
            None => {
                self.metrics.closed("stopped", 0, 0, 0);
                log_refused("stopped", &"stopped during the edge checks", &learned, edge_time, started);
                return None;
            }
        };
        registration.connecting(learned.client, learned.server_name.as_deref(), target.to_string());
        let resolve_started = Instant::now();
        let resolved = path.resolver.resolve(target).await;
        let resolve_time = resolve_started.elapsed();
        self.metrics.resolved(resolve_time, resolved.as_ref().err().map(ResolveError::kind));
        let connect_started = Instant::now();
        let connected = match resolved {
            Ok(addrs) => {
                self.health.resolved(target);
                let connected = self.connect(&path, &addrs).await;
                self.metrics.connect_time(connect_started.elapsed());
                connected
            }
            Err(e) => Err(e.into()),
        };
        let connect_time = connect_started.elapsed();
        let (upstream, upstream_addr) = match connected {
            Ok(connected) => {
                self.health.connected(target);
                connected
            }
            Err(error) => {
                self.metrics.closed(error.reason(), 0, 0, 0);
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
                return None;
            }
        };
        Some(Established {
            client,
            upstream,
            upstream_addr,
            target,
            chained_headers: learned.chained_headers,
            client_bytes_read: learned.bytes_read,
            edge_time,
            resolve_time,
            connect_time,
        })
    }

    /// Connects to one of `addrs` for a client connection, counting each
    /// failed address and the one that accepted.
    async fn connect(
        &self,
        path: &PathSettings,
        addrs: &[UpstreamAddr],
    ) -> Result<(TcpStream, UpstreamAddr), SetupError> {
        let result = path.connector.connect(addrs).await;
        let failed = match &result {
            Ok(connected) => &connected.failed,
            Err(error) => &error.attempts,
        };
        for attempt in failed {
            self.metrics.connect_failed(attempt.addr);
        }
        let Connected { stream, addr, .. } = result?;
        self.metrics.connected(addr);
        sockopt::apply(&stream, &path.tcp)?;
        Ok((stream, addr))
    }

    /// Resolves `target` and connects to one of its addresses, then closes
    /// the connection: the background probe. Records successes for
    /// readiness; feeds no client-connection metric.
    pub async fn probe(&self, target: &UpstreamTarget) -> Result<Vec<UpstreamAddr>, probe::ProbeError> {
        let path = self.path();
        let addrs = path.resolver.resolve(target).await.map_err(probe::ProbeError::Resolve)?;
        self.health.resolved(target);
        let connected = path.connector.connect(&addrs).await.map_err(probe::ProbeError::Connect)?;
        self.health.connected(target);
        drop(connected.stream);
        Ok(addrs)
    }

    #[must_use]
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}
