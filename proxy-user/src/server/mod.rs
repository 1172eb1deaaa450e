//! Start-up (signals, source filter, data plane, listeners, admin endpoint,
//! health-check port), the accept loops and upstream probes, and stopping:
//! SIGTERM turns readiness false at once, keeps accepting for the drain
//! delay, then closes the listeners and gives open connections the drain
//! timeout; SIGINT stops at once. SIGHUP reloads the configuration
//! ([`reload`]).

mod listeners;
mod probes;
mod reload;
mod source_filter;

use std::{sync::Arc, time::Duration};

use listeners::{Accepting, Bound, ListenerSet};
use probes::Probes;
use reload::ConnectionLimit;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::watch,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::{AdminEndpoint, AdminError, AdminState},
    cli::Options,
    config::Config,
    connections::ConnectionTable,
    dataplane::{DataPlane, sockmap::SockmapPlane},
    dns::ResolveError,
    health::Health,
    health_port::HealthPort,
    kernel::{KernelError, KernelPrograms},
    listener::{BindError, Listener},
    metrics::{
        Metrics,
        collectors::{ProxyCollector, StateCollector, XdpCollector},
    },
    proxy::{Observers, Proxy},
    service_manager,
    xdp_filter::{SourceFilter, SourceFilterError},
};

/// Time connections get to close after they were told to stop.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Longest wait for the health-check port to close when a drain starts.
const HEALTH_PORT_CLOSE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("health-check port (health_listen, --health-listen): {0}")]
    HealthBind(BindError),
    #[error(transparent)]
    Resolver(#[from] ResolveError),
    #[error("cannot install the signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("the sockmap data plane needs the kernel programs, which did not load: {0}")]
    NoKernel(String),
    #[error("starting the sockmap data plane: {0}")]
    Sockmap(#[from] KernelError),
    #[error("XDP source filter: {0}")]
    SourceFilter(#[from] SourceFilterError),
}

impl StartError {
    /// A listen, admin or health-check address could not be bound.
    #[must_use]
    pub fn is_bind(&self) -> bool {
        matches!(self, Self::Bind(_) | Self::HealthBind(_) | Self::Admin(AdminError::Bind { .. }))
    }
}

/// How the server stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// SIGTERM, and every connection finished within the drain timeout.
    Drained,
    /// SIGTERM, and `cut` connections were still open at the drain timeout.
    DrainTimedOut { cut: usize },
    /// SIGINT (also during a drain): everything closed at once.
    Interrupted { cut: usize },
}

/// A server with its listeners bound and its signal handlers installed.
pub struct Server {
    /// Detached when the server is dropped (on exit, or when start-up fails).
    source_filter: Option<SourceFilter>,
    /// The command line, to re-read the configuration with on SIGHUP.
    flags: Options,
    /// The configuration in force (the last reload's, fixed settings as started).
    config: Config,
    listeners: ListenerSet,
    /// Loaded kernel programs not used by the data plane, kept for their logs.
    _kernel: Option<KernelPrograms>,
    proxy: Arc<Proxy>,
    health: Arc<Health>,
    health_port: Option<HealthPort>,
    /// The background probe of every upstream of every listener.
    probes: Probes,
    limit: ConnectionLimit,
    /// What the accept loops hand connections to.
    accepting: Accepting,
    /// On sockmap: the connections its maps were sized for.
    sockmap_capacity: Option<usize>,
    sigterm: Signal,
    sigint: Signal,
    sighup: Signal,
}

impl Server {
    /// Installs the signal handlers, builds the resolver and the data plane,
    /// attaches the XDP source filter (before binding, with the fixed listen
    /// ports already guarded), binds every listener, the health-check port
    /// and the admin endpoint, which starts serving (not ready yet); no
    /// connection is accepted yet. `kernel` is the loaded kernel programs, or
    /// why they could not be loaded; `flags` is the command line `config` came from.
    pub fn start(
        config: &Config,
        kernel: Result<KernelPrograms, KernelError>,
        flags: &Options,
    ) -> Result<Self, StartError> {
        let sigterm = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
        let sigint = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;
        let sighup = signal(SignalKind::hangup()).map_err(StartError::Signals)?;
        let fixed_ports: Vec<u16> =
            config.listeners.iter().map(|l| l.addr.0.port()).filter(|p| *p != 0).collect();
        let mut source_filter =
            config.source_filter.as_ref().map(|c| source_filter::start(c, &fixed_ports)).transpose()?;
        let (sockmap, kernel) = match (config.dataplane, kernel) {
            (DataPlane::Sockmap { max_inflight, fallback_pipe_size }, Ok(kernel)) => {
                (Some(SockmapPlane::start(kernel, max_inflight, fallback_pipe_size)?), None)
            }
            (DataPlane::Sockmap { .. }, Err(error)) => return Err(StartError::NoKernel(error.to_string())),
            (_, kernel) => (None, kernel.ok()),
        };
        let sockmap_capacity = sockmap.is_some().then_some(config.max_connections);
        let health = Arc::new(Health::new(&probes::targets(config), config.admin.readiness_window()));
        let metrics = Metrics::default();
        let connections = Arc::new(ConnectionTable::default());
        let observers = Observers {
            metrics: metrics.clone(),
            health: Arc::clone(&health),
            connections: Arc::clone(&connections),
        };
        let proxy = Arc::new(Proxy::new(config, sockmap, observers)?);
        let bound = config
            .listeners
            .iter()
            .map(|l| Ok(Bound { configured: l.addr, listener: Listener::bind(l.addr)? }))
            .collect::<Result<_, BindError>>()?;
        let listeners = ListenerSet::new(bound, &config.listeners)?;
        if let Some(filter) = &mut source_filter {
            // Port 0 listeners got their port only now.
            let ports: Vec<u16> = listeners.addrs().iter().map(|a| a.0.port()).collect();
            filter.guard_ports(&ports)?;
            tracing::info!(?ports, "XDP source filter guards the listen ports");
        }
        let health_port =
            config.admin.health_listen.map(HealthPort::bind).transpose().map_err(StartError::HealthBind)?;
        let admin = AdminEndpoint::bind(config.admin.listen)?;
        let admin_addr = admin.addr;
        let mut collectors: Vec<Box<dyn prometheus_client::collector::Collector>> = vec![
            Box::new(StateCollector {
                health: Arc::clone(&health),
                connections: Arc::clone(&connections),
                addresses: Arc::clone(metrics.addresses()),
                plane: config.dataplane.label(),
            }),
            Box::new(ProxyCollector(Arc::clone(&proxy))),
        ];
        if let Some(filter) = &source_filter {
            collectors.push(Box::new(XdpCollector(filter.counters_handle())));
        }
        admin.spawn(AdminState {
            registry: metrics.registry(collectors),
            health: Arc::clone(&health),
            connections,
        })?;
        tracing::info!(admin = %admin_addr, "admin endpoint listening");
        if let Some(port) = &health_port {
            tracing::info!(health = %port.addr, "health-check port bound; open while ready");
        }
        let limit = ConnectionLimit::new(config.max_connections);
        let accepting = Accepting {
            proxy: Arc::clone(&proxy),
            connections: TaskTracker::new(),
            stop_connections: CancellationToken::new(),
            slots: Arc::clone(&limit.slots),
        };
        Ok(Self {
            source_filter,
            flags: flags.clone(),
            config: config.clone(),
            listeners,
            probes: Probes::new(Arc::clone(&proxy)),
            proxy,
            health,
            health_port,
            limit,
            accepting,
            sockmap_capacity,
            _kernel: kernel,
            sigterm,
            sigint,
            sighup,
        })
    }

    /// Accepts and serves until a signal stops it.
    pub async fn run(&mut self) -> Stopped {
        let _stop_probes_on_return = self.probes.stopper().drop_guard();
        let (connections, stop_connections) =
            (self.accepting.connections.clone(), self.accepting.stop_connections.clone());
        self.listeners.start(&self.accepting);
        let why = self.config.dataplane_reason;
        tracing::info!(dataplane = self.proxy.dataplane().label(), why, "data plane");
        self.probes.set(&probes::targets(&self.config), self.config.admin.probe_interval);
        let (health_port_closed, mut health_port_watch) = watch::channel(self.health_port.is_none());
        if let Some(port) = self.health_port.take() {
            tokio::spawn(port.run(Arc::clone(&self.health), health_port_closed));
        }
        tracing::info!("ready");
        service_manager::ready(&self.listeners.addrs(), self.proxy.dataplane().label());

        let mut drain = loop {
            tokio::select! {
                _ = self.sigterm.recv() => break true,
                _ = self.sigint.recv() => break false,
                _ = self.sighup.recv() => self.reload(),
            }
        };
        let drain_timeout = self.config.drain_timeout;
        if drain {
            self.health.start_drain();
            service_manager::draining(connections.len(), drain_timeout);
            let _ =
                tokio::time::timeout(HEALTH_PORT_CLOSE, health_port_watch.wait_for(|closed| *closed)).await;
            drain = self.drain_delay(connections.len()).await;
        } else {
            service_manager::stopping_now(connections.len());
        }
        self.listeners.close().await;
        connections.close();
        if drain {
            tracing::info!(open = connections.len(), timeout = ?drain_timeout, "SIGTERM: draining");
            tokio::select! {
                () = connections.wait() => {
                    tracing::info!("drained: every connection finished");
                    return Stopped::Drained;
                }
                () = tokio::time::sleep(drain_timeout) => {
                    let cut = cut_all(&connections, &stop_connections).await;
                    tracing::warn!(cut, "drain timeout: closed the connections still open");
                    return Stopped::DrainTimedOut { cut };
                }
                _ = self.sigint.recv() => {}
            }
        }
        let cut = cut_all(&connections, &stop_connections).await;
        tracing::info!(cut, "SIGINT: stopped");
        Stopped::Interrupted { cut }
    }

    /// Readiness is already false: go on accepting for the drain delay so
    /// the NLB deregisters this target first. A second SIGTERM ends the
    /// delay early; SIGINT too, and then nothing is drained (returns false).
    async fn drain_delay(&mut self, open: usize) -> bool {
        let delay = self.config.admin.drain_delay;
        tracing::info!(
            ?delay,
            open,
            "SIGTERM: not ready; still accepting until the drain delay is over, then the listeners close"
        );
        let deadline = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return true,
                _ = self.sigterm.recv() => {
                    tracing::info!("second SIGTERM: the drain delay ends now");
                    return true;
                }
                _ = self.sigint.recv() => return false,
                _ = self.sighup.recv() => self.reload(),
            }
        }
    }

    /// Logs what the edge guards, the sockmap plane (when it is in use) and
    /// the source filter did over the whole run.
    pub fn log_totals(&self) {
        self.proxy.edge_stats().log_totals();
        if let Some(sockmap) = self.proxy.sockmap() {
            sockmap.log_totals();
        }
        if let Some(filter) = &self.source_filter {
            source_filter::log_totals(filter);
        }
    }
}

/// Tells every connection to stop, waits briefly for them, and returns how many there were.
async fn cut_all(connections: &TaskTracker, stop: &CancellationToken) -> usize {
    let open = connections.len();
    stop.cancel();
    let _ = tokio::time::timeout(CLOSE_GRACE, connections.wait()).await;
    open
}
