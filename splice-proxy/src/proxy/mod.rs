//! The life of one connection: the edge guard (PROXY header, ClientHello),
//! resolve the upstream now, connect, forward, and write one access log line
//! when it closes; each step feeds the metrics, the readiness state and the
//! table of open connections.

mod access_log;

use std::{
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, Instant},
};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, field::Empty};

use access_log::{AccessLine, close_refused, record_learned};

use crate::{
    addr::{ClientAddr, ListenAddr, UpstreamAddr, UpstreamTarget},
    close_reason::CloseReason,
    config::Config,
    connect::{ConnectConfig, ConnectError, Connected, Connector},
    connections::{ConnectionTable, Registration},
    dataplane::{EndsSent, Plane, Sockets},
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
    /// The data plane every connection starts on.
    plane: Plane,
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
    /// The upstream socket's options still due (a plane that defers them),
    /// boxed: the connection's future keeps a pointer, not the options.
    upstream_options_due: Option<Box<TcpConfig>>,
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
    fn reason(&self) -> CloseReason {
        match self {
            Self::Resolve(_) => CloseReason::ResolveFailed,
            Self::Connect(_) => CloseReason::ConnectFailed,
            Self::Sockopt(_) => CloseReason::InternalError,
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
    /// `plane`: the plane started (`auto` may have fallen back from the
    /// configured one).
    pub fn new(config: &Config, plane: Plane, observers: Observers) -> Result<Self, ResolveError> {
        Ok(Self {
            path: RwLock::new(Arc::new(PathSettings::new(config, None)?)),
            plane,
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
    pub fn plane(&self) -> &Plane {
        &self.plane
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
            upstream_options_due,
        } = established;
        registration.forwarding(upstream_addr);
        let sockets = Sockets {
            client,
            upstream,
            client_read: client_bytes_read,
            ends_sent: EndsSent::default(),
            upstream_options_due,
        };
        let transfer = self.plane.forward(sockets, stop, registration.bytes()).await;
        let reason = transfer.ending.reason();
        // Counted before the log line, so whoever reads the line finds it counted.
        self.metrics.closed(
            reason,
            transfer.client_to_upstream,
            transfer.upstream_to_client,
            transfer.kernel_bytes,
        );
        AccessLine {
            upstream: Some(upstream_addr),
            target: Some(target),
            chained_headers,
            edge_time,
            resolve_time: Some(resolve_time),
            connect_time: Some(connect_time),
            transfer: Some(&transfer),
            error: None,
        }
        .write(reason, started);
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
        // The client's socket has its TCP options from the listener.
        let path = self.path();
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
                self.refused(refusal.reason(), &refusal, &learned, edge_time, started);
                close_refused(client).await;
                return None;
            }
            None => {
                let stopped = "stopped during the edge checks";
                self.refused(CloseReason::Stopped, &stopped, &learned, edge_time, started);
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
                AccessLine {
                    target: Some(target),
                    chained_headers: learned.chained_headers,
                    edge_time,
                    resolve_time: Some(resolve_time),
                    connect_time: Some(connect_time),
                    error: Some(&error),
                    ..AccessLine::default()
                }
                .write(error.reason(), started);
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
            upstream_options_due: self.plane.defers_upstream_options().then(|| Box::new(path.tcp)),
        })
    }

    /// Counts and logs a connection closed before any upstream was chosen.
    fn refused(
        &self,
        reason: CloseReason,
        error: &dyn std::fmt::Display,
        learned: &Learned,
        edge_time: Duration,
        started: Instant,
    ) {
        self.metrics.closed(reason, 0, 0, 0);
        let line = AccessLine {
            chained_headers: learned.chained_headers,
            edge_time,
            error: Some(error),
            ..AccessLine::default()
        };
        line.write(reason, started);
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
        if self.plane.defers_upstream_options() {
            sockopt::apply_at_connect(&stream)?;
        } else {
            sockopt::apply(&stream, &path.tcp)?;
        }
        Ok((stream, addr))
    }

    /// The upstream connections made or tried for clients and the probes.
    #[must_use]
    pub(crate) fn resolver(&self) -> Arc<UpstreamResolver> {
        Arc::clone(&self.path().resolver)
    }

    #[must_use]
    pub(crate) fn connector(&self) -> Arc<Connector> {
        Arc::clone(&self.path().connector)
    }

    #[must_use]
    pub(crate) fn health(&self) -> &Health {
        &self.health
    }

    #[must_use]
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}
