//! Start-up (signals, source filter, data plane, listeners, admin endpoint,
//! health-check port), the accept loops and upstream probes, and stopping:
//! SIGTERM turns readiness false at once, keeps accepting for the drain
//! delay, then closes the listeners and gives open connections the drain
//! timeout; SIGINT stops at once. SIGHUP reloads the configuration
//! ([`reload`]). With an upgrade socket, a new process may take the
//! listening sockets over; this one then drains ([`upgrade`]); SIGUSR2
//! starts one.

pub mod listeners;
mod plane;
mod reload;
mod source_filter;
mod stopping;
pub mod upgrade;
mod workers;

use std::{net::SocketAddr, num::NonZeroUsize, os::fd::OwnedFd, sync::Arc};

use listeners::{Accepting, ListenerSet};
use reload::ConnectionLimit;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::watch,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use upgrade::{Handover, UpgradeError, UpgradeEvent, Upgrades, next_upgrade};
use workers::{WorkerError, Workers};

use crate::{
    admin::{AdminEndpoint, AdminError, AdminState},
    config::{Config, ListenSockets, Options, defaults},
    connections::ConnectionTable,
    dataplane::Plane,
    dns::ResolveError,
    health::Health,
    health_port::HealthPort,
    kernel::{KernelError, KernelPrograms},
    metrics::{
        Metrics,
        collectors::{ProxyCollector, StateCollector, XdpCollector},
    },
    probe::schedule::{self as probes, Probes},
    proxy::{Observers, Proxy},
    server::listeners::socket::BindError,
    service_manager,
    source_filter::{SourceFilter, SourceFilterError},
};

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
    #[error("the packet data plane could not start: {0}")]
    PacketPlane(#[from] crate::dataplane::packet::PacketStartError),
    #[error("starting the sockmap data plane: {0}")]
    Sockmap(#[from] KernelError),
    #[error("XDP source filter: {0}")]
    SourceFilter(#[from] SourceFilterError),
    #[error(transparent)]
    Upgrade(#[from] UpgradeError),
    #[error(transparent)]
    Workers(#[from] WorkerError),
    #[error("reading the CPUs this process may run on (for listen_sockets): {0}")]
    Cpus(std::io::Error),
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
    /// The threads that accept and serve connections (after `listeners`,
    /// which hold their handles).
    _workers: Workers,
    /// Loaded kernel programs not used by the data plane, kept for their logs.
    _kernel: Option<KernelPrograms>,
    /// Why the data plane in use was chosen (logged once serving).
    dataplane_reason: std::borrow::Cow<'static, str>,
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
    /// Sockets taken over from an old process: it is told once this one accepts.
    handover: Option<Handover>,
    /// Requests for this process's sockets (with an upgrade socket).
    upgrades: Option<Upgrades>,
    /// The admin endpoint's address as configured and as bound, and a second
    /// descriptor of its socket: handed over on an upgrade.
    admin_socket: (SocketAddr, SocketAddr, OwnedFd),
    /// Stops the admin endpoint once a new process took its socket over.
    admin_stop: CancellationToken,
    sigterm: Signal,
    sigint: Signal,
    sighup: Signal,
    sigusr2: Signal,
}

/// Why the serving loop ended.
enum Stop {
    Term,
    Int,
    /// A new process took the sockets over.
    Upgraded,
}

impl Server {
    /// Installs the signal handlers, builds the resolver and the data plane,
    /// attaches the XDP source filter (before binding, with the fixed listen
    /// ports already guarded), binds every listener, the health-check port
    /// and the admin endpoint, which starts serving (not ready yet); no
    /// connection is accepted yet. `kernel` is the loaded kernel programs, or
    /// why they could not be loaded; `flags` is the command line `config` came
    /// from; `handover` the sockets taken over from an old process, if any
    /// (used where they match the configuration, the rest bound anew).
    pub fn start(
        config: &Config,
        kernel: Result<KernelPrograms, KernelError>,
        flags: &Options,
        mut handover: Option<Handover>,
    ) -> Result<Self, StartError> {
        let sigterm = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
        let sigint = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;
        let sighup = signal(SignalKind::hangup()).map_err(StartError::Signals)?;
        let sigusr2 = signal(SignalKind::user_defined2()).map_err(StartError::Signals)?;
        let handed_listeners =
            handover.as_mut().map(|h| std::mem::take(&mut h.listeners)).unwrap_or_default();
        let handed_admin = handover.as_mut().and_then(|h| h.admin.take());
        // Port 0 stays 0 (not known before binding).
        let fixed_ports: Vec<u16> = config.listeners.iter().map(|l| l.addr.0.port()).collect();
        let fixed_lists = source_filter::allow_lists(&config.listeners, &fixed_ports);
        let mut source_filter =
            config.source_filter.as_ref().map(|c| source_filter::start(c, &fixed_lists)).transpose()?;
        let plane::StartedPlane { plane, reason: dataplane_reason, unused_kernel } = plane::start(
            config.dataplane,
            kernel,
            plane::PacketSetup {
                max_connections: config.max_connections,
                interfaces: config.packet_interfaces.as_deref(),
                tcp: config.tcp,
                switch_after: config.packet_switch_after,
                log_format: config.log_format,
            },
        )?;
        let sockmap_capacity = matches!(plane, Plane::Sockmap(_)).then_some(config.max_connections);
        let packet_plane = matches!(plane, Plane::Packet(_));
        let health = Arc::new(Health::new(&probes::targets(config), config.admin.readiness_window()));
        let metrics = Metrics::default();
        let connections = Arc::new(ConnectionTable::default());
        let observers = Observers {
            metrics: metrics.clone(),
            health: Arc::clone(&health),
            connections: Arc::clone(&connections),
        };
        let proxy = Arc::new(Proxy::new(config, plane, observers)?);
        // A worker waits for a connection slot before it accepts: more
        // workers than slots would only wait.
        let workers =
            config.workers.min(NonZeroUsize::new(config.max_connections).unwrap_or(NonZeroUsize::MIN));
        // Chosen now that the plane (`auto` may have fallen back from
        // packet) and the worker count are known.
        let cpus = crate::cpus::allowed().map_err(StartError::Cpus)?;
        let listen_sockets = config
            .listen_sockets
            .unwrap_or_else(|| defaults::listen_sockets(workers.get(), cpus.len(), packet_plane));
        let sockets_per_listener = match listen_sockets {
            ListenSockets::Shared => 1,
            ListenSockets::PerWorker | ListenSockets::PerCpu => workers.get(),
        };
        // With `per-cpu`, worker N is pinned to the Nth CPU the process may
        // run on (the configuration checked there are enough; a shrunken
        // affinity since fails the workers' start).
        let cpu_of_worker = (listen_sockets == ListenSockets::PerCpu)
            .then(|| cpus.into_iter().take(workers.get()).collect::<Vec<_>>());
        let bound = upgrade::listeners(&config.listeners, handed_listeners, sockets_per_listener)?;
        let workers = Workers::start(workers, cpu_of_worker.as_deref())?;
        tracing::info!(workers = workers.handles().len(), ?listen_sockets, pinned_to_cpus = ?workers.cpus(), "workers");
        let listeners =
            ListenerSet::new(bound, &config.listeners, &config.tcp, &workers, sockets_per_listener)?;
        if let Some(filter) = &mut source_filter {
            // Port 0 listeners got their port only now.
            source_filter::guard_bound(filter, &config.listeners, &listeners.listening())?;
        }
        let health_port = match config.admin.health_listen {
            // The old process holds it until it drains.
            Some(addr) if handover.is_some() && addr.port() != 0 => Some(HealthPort::inherited(addr)),
            health => health.map(HealthPort::bind).transpose().map_err(StartError::HealthBind)?,
        };
        let admin = match handed_admin.filter(|h| upgrade::admin_matches(h, config.admin.listen)) {
            Some(handed) => AdminEndpoint::from_fd(handed.fd)?,
            None => AdminEndpoint::bind(config.admin.listen)?,
        };
        let admin_addr = admin.addr;
        let admin_fd =
            admin.try_clone_fd().map_err(|source| AdminError::Bind { addr: config.admin.listen, source })?;
        let admin_stop = CancellationToken::new();
        let mut collectors: Vec<Box<dyn prometheus_client::collector::Collector>> = vec![
            Box::new(StateCollector {
                health: Arc::clone(&health),
                connections: Arc::clone(&connections),
                addresses: Arc::clone(metrics.addresses()),
                plane: proxy.plane().label(),
            }),
            Box::new(ProxyCollector(Arc::clone(&proxy))),
        ];
        if let Some(filter) = &source_filter {
            collectors.push(Box::new(XdpCollector(filter.counters_handle())));
        }
        admin.spawn(
            AdminState { registry: metrics.registry(collectors), health: Arc::clone(&health), connections },
            admin_stop.clone(),
        )?;
        tracing::info!(admin = %admin_addr, "admin endpoint listening");
        if let Some(port) = &health_port {
            tracing::info!(health = %port.addr, "health-check port bound; open while ready");
        }
        // A new process takes the path over only once it is ready (`run`).
        let upgrades = match (&config.upgrade_socket, &handover) {
            (Some(path), None) => {
                Some(Upgrades::start(upgrade::listen(path)?).map_err(|source| UpgradeError::Io {
                    path: path.clone(),
                    what: "listening",
                    source,
                })?)
            }
            _ => None,
        };
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
            _workers: workers,
            probes: Probes::new(Arc::clone(&proxy)),
            proxy,
            health,
            health_port,
            limit,
            accepting,
            sockmap_capacity,
            _kernel: unused_kernel,
            dataplane_reason,
            handover,
            upgrades,
            admin_socket: (config.admin.listen, admin_addr, admin_fd),
            admin_stop,
            sigterm,
            sigint,
            sighup,
            sigusr2,
        })
    }

    /// Accepts and serves until a signal stops it.
    pub async fn run(&mut self) -> Stopped {
        let _stop_probes_on_return = self.probes.stopper().drop_guard();
        self.listeners.start(&self.accepting);
        tracing::info!(dataplane = self.proxy.plane().label(), why = %self.dataplane_reason, "data plane");
        self.probes.set(&probes::targets(&self.config), self.config.admin.probe_interval);
        let (health_port_closed, health_port_watch) = watch::channel(self.health_port.is_none());
        if let Some(port) = self.health_port.take() {
            tokio::spawn(port.run(Arc::clone(&self.health), health_port_closed));
        }
        tracing::info!("ready");
        let plane = self.proxy.plane().label();
        match self.handover.take() {
            Some(handover) => self.take_over(handover, plane),
            None => service_manager::ready(&self.listeners.addrs(), plane),
        }

        let stop = loop {
            tokio::select! {
                _ = self.sigterm.recv() => break Stop::Term,
                _ = self.sigint.recv() => break Stop::Int,
                _ = self.sighup.recv() => self.reload(),
                _ = self.sigusr2.recv() => match &self.config.upgrade_socket {
                    Some(_) => upgrade::start_new_binary(),
                    None => tracing::warn!("SIGUSR2: an upgrade needs --upgrade-socket; ignored"),
                },
                event = next_upgrade(self.upgrades.as_mut()) => match event {
                    UpgradeEvent::Request(stream) => self.hand_over_to(stream),
                    UpgradeEvent::Outcome(true) => break Stop::Upgraded,
                    UpgradeEvent::Outcome(false) => {}
                },
            }
        };
        self.stop(stop, health_port_watch).await
    }

    /// Logs what the edge guards, the sockmap plane (when it is in use) and
    /// the source filter did over the whole run.
    pub fn log_totals(&self) {
        self.proxy.edge_stats().log_totals(self.proxy.metrics().close_counts());
        self.proxy.plane().log_totals();
        if let Some(filter) = &self.source_filter {
            source_filter::log_totals(filter);
        }
    }
}
