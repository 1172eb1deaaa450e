//! Start-up (signals, source filter, data plane, listeners, admin endpoint,
//! health-check port), the accept loops and upstream probes, and stopping:
//! SIGTERM turns readiness false at once, keeps accepting for the drain
//! delay, then closes the listeners and gives open connections the drain
//! timeout; SIGINT stops at once. SIGHUP re-reads the configuration and
//! applies only the XDP source filter's allow list (every other setting
//! needs a restart).

mod source_filter;

use std::{sync::Arc, time::Duration};

use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::{Semaphore, watch},
    task::JoinSet,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    addr::UpstreamTarget,
    admin::{AdminEndpoint, AdminError, AdminState},
    cli::Options,
    config::{AdminConfig, Config},
    connections::ConnectionTable,
    dataplane::{DataPlane, sockmap::SockmapPlane},
    dns::ResolveError,
    edge::EdgeConfig,
    health::Health,
    health_port::HealthPort,
    kernel::{KernelError, KernelPrograms},
    listener::{BindError, Listener},
    metrics::{
        Metrics,
        collectors::{ProxyCollector, StateCollector, XdpCollector},
    },
    proxy::{Observers, Proxy, probe},
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
    /// Each listener's configured address and bound port, for the SIGHUP
    /// reload of the source lists.
    listening: Vec<source_filter::Listening>,
    /// Each bound listener with the edge settings of its connections.
    listeners: Vec<(Listener, Arc<EdgeConfig>)>,
    /// Loaded kernel programs not used by the data plane, kept for their logs.
    _kernel: Option<KernelPrograms>,
    proxy: Arc<Proxy>,
    health: Arc<Health>,
    health_port: Option<HealthPort>,
    /// Every upstream of every listener, probed in the background.
    targets: Vec<UpstreamTarget>,
    admin: AdminConfig,
    drain_timeout: Duration,
    max_connections: usize,
    dataplane_reason: &'static str,
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
        // Port 0 stays 0 (not known before binding).
        let fixed_ports: Vec<u16> = config.listeners.iter().map(|l| l.addr.0.port()).collect();
        let fixed_lists = source_filter::allow_lists(&config.listeners, &fixed_ports);
        let mut source_filter =
            config.source_filter.as_ref().map(|c| source_filter::start(c, &fixed_lists)).transpose()?;
        let (sockmap, kernel) = match (config.dataplane, kernel) {
            (DataPlane::Sockmap { max_inflight, fallback_pipe_size }, Ok(kernel)) => {
                (Some(SockmapPlane::start(kernel, max_inflight, fallback_pipe_size)?), None)
            }
            (DataPlane::Sockmap { .. }, Err(error)) => return Err(StartError::NoKernel(error.to_string())),
            (_, kernel) => (None, kernel.ok()),
        };
        let mut targets: Vec<UpstreamTarget> = Vec::new();
        for target in config.listeners.iter().flat_map(|l| l.edge.upstreams.targets()) {
            if !targets.contains(target) {
                targets.push(target.clone());
            }
        }
        let health = Arc::new(Health::new(&targets, config.admin.readiness_window()));
        let metrics = Metrics::default();
        let connections = Arc::new(ConnectionTable::default());
        let observers = Observers {
            metrics: metrics.clone(),
            health: Arc::clone(&health),
            connections: Arc::clone(&connections),
        };
        let proxy = Arc::new(Proxy::new(config, sockmap, observers)?);
        let listeners: Vec<(Listener, Arc<EdgeConfig>)> = config
            .listeners
            .iter()
            .map(|l| Ok((Listener::bind(l.addr)?, Arc::clone(&l.edge))))
            .collect::<Result<_, BindError>>()?;
        let listening: Vec<source_filter::Listening> =
            config.listeners.iter().zip(&listeners).map(|(c, (l, _))| (c.addr.0, l.addr.0.port())).collect();
        if let Some(filter) = &mut source_filter {
            // Port 0 listeners got their port only now.
            source_filter::guard_bound(filter, &config.listeners, &listening)?;
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
        Ok(Self {
            source_filter,
            listening,
            flags: flags.clone(),
            listeners,
            proxy,
            health,
            health_port,
            targets,
            admin: config.admin,
            _kernel: kernel,
            drain_timeout: config.drain_timeout,
            max_connections: config.max_connections,
            dataplane_reason: config.dataplane_reason,
            sigterm,
            sigint,
            sighup,
        })
    }

    /// Accepts and serves until a signal stops it.
    pub async fn run(&mut self) -> Stopped {
        let stop_accepting = CancellationToken::new();
        let stop_connections = CancellationToken::new();
        let stop_probes = CancellationToken::new();
        let _stop_probes_on_return = stop_probes.clone().drop_guard();
        let connections = TaskTracker::new();
        let mut accept_loops = JoinSet::new();
        let slots = Arc::new(Semaphore::new(self.max_connections));
        let listening: Vec<_> = self.listeners.iter().map(|(l, _)| l.addr).collect();
        for (listener, edge) in self.listeners.drain(..) {
            tracing::info!(
                listen = %listener.addr,
                upstream = edge.upstreams.describe(),
                proxy_protocol = ?edge.proxy_protocol.mode,
                allowed_vpce_ids = ?edge.proxy_protocol.allowed_vpce_ids,
                "listening"
            );
            let proxy = Arc::clone(&self.proxy);
            let connections = connections.clone();
            let stop_connections = stop_connections.clone();
            accept_loops.spawn(listener.accept_loop(
                stop_accepting.clone(),
                Arc::clone(&slots),
                move |stream, peer, listen, permit| {
                    let proxy = Arc::clone(&proxy);
                    let edge = Arc::clone(&edge);
                    let stop = stop_connections.clone();
                    connections.spawn(async move {
                        proxy.serve(stream, peer, listen, edge, stop).await;
                        drop(permit);
                    });
                },
            ));
        }
        tracing::info!(dataplane = self.proxy.dataplane().label(), why = self.dataplane_reason, "data plane");
        for target in &self.targets {
            let (proxy, target, stop) = (Arc::clone(&self.proxy), target.clone(), stop_probes.clone());
            tokio::spawn(probe::run(proxy, target, self.admin.probe_interval, stop));
        }
        let (health_port_closed, mut health_port_watch) = watch::channel(self.health_port.is_none());
        if let Some(port) = self.health_port.take() {
            tokio::spawn(port.run(Arc::clone(&self.health), health_port_closed));
        }
        tracing::info!("ready");
        service_manager::ready(&listening, self.proxy.dataplane().label());

        let mut drain = loop {
            tokio::select! {
                _ = self.sigterm.recv() => break true,
                _ = self.sigint.recv() => break false,
                _ = self.sighup.recv() => source_filter::reload(self.source_filter.as_mut(), &self.flags, &self.listening),
            }
        };
        if drain {
            self.health.start_drain();
            service_manager::draining(connections.len(), self.drain_timeout);
            let _ =
                tokio::time::timeout(HEALTH_PORT_CLOSE, health_port_watch.wait_for(|closed| *closed)).await;
            drain = self.drain_delay(connections.len()).await;
        } else {
            service_manager::stopping_now(connections.len());
        }
        stop_accepting.cancel();
        while accept_loops.join_next().await.is_some() {}
        connections.close();
        if drain {
            tracing::info!(open = connections.len(), timeout = ?self.drain_timeout, "SIGTERM: draining");
            tokio::select! {
                () = connections.wait() => {
                    tracing::info!("drained: every connection finished");
                    return Stopped::Drained;
                }
                () = tokio::time::sleep(self.drain_timeout) => {
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
        let delay = self.admin.drain_delay;
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
                _ = self.sighup.recv() => source_filter::reload(self.source_filter.as_mut(), &self.flags, &self.listening),
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
