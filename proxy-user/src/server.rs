//! Start-up, the accept loops, and stopping: SIGTERM drains (listeners close,
//! open connections get the drain timeout), SIGINT stops at once. SIGHUP
//! re-reads the configuration and applies only the XDP source filter's
//! allow list (every other setting needs a restart).

use std::{sync::Arc, time::Duration};

use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::Semaphore,
    task::JoinSet,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    addr::UpstreamTarget,
    cli::Options,
    config::Config,
    dataplane::{DataPlane, sockmap::SockmapPlane},
    dns::ResolveError,
    edge::EdgeConfig,
    kernel::{KernelError, KernelPrograms},
    listener::{BindError, Listener},
    proxy::Proxy,
    service_manager,
    xdp_filter::{SourceFilter, SourceFilterConfig, SourceFilterError},
};

/// Time connections get to close after they were told to stop.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
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
    /// Each bound listener with the edge settings of its connections.
    listeners: Vec<(Listener, Arc<EdgeConfig>)>,
    /// Loaded kernel programs not used by the data plane, kept for their logs.
    _kernel: Option<KernelPrograms>,
    proxy: Arc<Proxy>,
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
    /// ports already guarded), and binds every listener; nothing is accepted
    /// yet. `kernel` is the loaded kernel programs, or why they could not be
    /// loaded; `flags` is the command line `config` came from.
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
            config.source_filter.as_ref().map(|c| start_source_filter(c, &fixed_ports)).transpose()?;
        let (sockmap, kernel) = match (config.dataplane, kernel) {
            (DataPlane::Sockmap { max_inflight, fallback_pipe_size }, Ok(kernel)) => {
                (Some(SockmapPlane::start(kernel, max_inflight, fallback_pipe_size)?), None)
            }
            (DataPlane::Sockmap { .. }, Err(error)) => return Err(StartError::NoKernel(error.to_string())),
            (_, kernel) => (None, kernel.ok()),
        };
        let proxy = Arc::new(Proxy::new(config, sockmap)?);
        let listeners: Vec<(Listener, Arc<EdgeConfig>)> = config
            .listeners
            .iter()
            .map(|l| Ok((Listener::bind(l.addr)?, Arc::clone(&l.edge))))
            .collect::<Result<_, BindError>>()?;
        if let Some(filter) = &mut source_filter {
            // Port 0 listeners got their port only now.
            let ports: Vec<u16> = listeners.iter().map(|(l, _)| l.addr.0.port()).collect();
            filter.guard_ports(&ports)?;
            tracing::info!(?ports, "XDP source filter guards the listen ports");
        }
        Ok(Self {
            source_filter,
            flags: flags.clone(),
            listeners,
            proxy,
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
        let connections = TaskTracker::new();
        let mut accept_loops = JoinSet::new();
        let slots = Arc::new(Semaphore::new(self.max_connections));
        let mut targets: Vec<UpstreamTarget> = Vec::new();
        let listening: Vec<_> = self.listeners.iter().map(|(l, _)| l.addr).collect();
        for (listener, edge) in self.listeners.drain(..) {
            tracing::info!(
                listen = %listener.addr,
                upstream = edge.upstreams.describe(),
                proxy_protocol = ?edge.proxy_protocol.mode,
                allowed_vpce_ids = ?edge.proxy_protocol.allowed_vpce_ids,
                "listening"
            );
            for target in edge.upstreams.targets() {
                if !targets.contains(target) {
                    targets.push(target.clone());
                }
            }
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
        for target in targets {
            tokio::spawn(startup_check(Arc::clone(&self.proxy), target));
        }
        tracing::info!("ready");
        service_manager::ready(&listening, self.proxy.dataplane().label());

        let drain = loop {
            tokio::select! {
                _ = self.sigterm.recv() => break true,
                _ = self.sigint.recv() => break false,
                _ = self.sighup.recv() => self.reload_source_list(),
            }
        };
        if drain {
            service_manager::draining(connections.len(), self.drain_timeout);
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

    /// SIGHUP: re-reads the configuration (file and flags, validated as at
    /// start-up) and applies its allow list to the source filter. Anything
    /// invalid leaves the old list in place and logs why.
    fn reload_source_list(&mut self) {
        let Some(filter) = &mut self.source_filter else {
            tracing::info!("SIGHUP: no XDP source filter, nothing to reload");
            return;
        };
        let config = match Config::load(&self.flags) {
            Ok(config) => config,
            Err(error) => {
                tracing::warn!(%error, "SIGHUP: configuration rejected; the source list stays as it was");
                return;
            }
        };
        let Some(new) = config.source_filter else {
            tracing::warn!(
                "SIGHUP: the configuration no longer sets xdp_interface; removing the filter needs a \
                 restart; the source list stays as it was"
            );
            return;
        };
        if let Some(attached) = filter.attached().filter(|a| a.interface != new.interface) {
            tracing::warn!(
                attached = attached.interface,
                configured = new.interface,
                "SIGHUP: moving the filter to another interface needs a restart; reloading its list only"
            );
        }
        // The counters so far, so each reload also reports what the old list did.
        let (passed, dropped) =
            filter.counters().map_or((None, None), |c| (Some(c.passed()), Some(c.dropped)));
        match filter.reload(&new.allowed) {
            Ok(summary) => tracing::info!(
                added = ?strings(&summary.added),
                removed = ?strings(&summary.removed),
                allowed = ?strings(&filter.allowed()),
                passed,
                dropped,
                "SIGHUP: source list reloaded"
            ),
            Err(error) => {
                tracing::error!(%error, "SIGHUP: reloading the source list failed; the old list stays")
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
            match filter.counters() {
                Ok(c) => tracing::info!(
                    passed = c.passed(),
                    dropped = c.dropped,
                    allowed = c.allowed,
                    unguarded = c.unguarded,
                    fragments = c.fragments,
                    malformed = c.malformed,
                    "xdp source filter totals"
                ),
                Err(error) => tracing::warn!(%error, "cannot read the XDP source filter counters"),
            }
        }
    }
}

/// Loads the source filter with its allow list and the `ports` known before
/// binding, then attaches it, logging the mode and why.
fn start_source_filter(
    config: &SourceFilterConfig,
    ports: &[u16],
) -> Result<SourceFilter, SourceFilterError> {
    let mut filter = SourceFilter::load(&config.allowed)?;
    filter.guard_ports(ports)?;
    let attached = filter.attach(&config.interface)?;
    tracing::info!(
        interface = attached.interface,
        mode = %attached.mode,
        why = attached.why,
        allowed = ?strings(&filter.allowed()),
        "XDP source filter attached"
    );
    Ok(filter)
}

fn strings<T: ToString>(items: &[T]) -> Vec<String> {
    items.iter().map(ToString::to_string).collect()
}

/// Tells every connection to stop, waits briefly for them, and returns how many there were.
async fn cut_all(connections: &TaskTracker, stop: &CancellationToken) -> usize {
    let open = connections.len();
    stop.cancel();
    let _ = tokio::time::timeout(CLOSE_GRACE, connections.wait()).await;
    open
}

/// A name that does not resolve at start-up is only a warning: it may appear later.
async fn startup_check(proxy: Arc<Proxy>, upstream: UpstreamTarget) {
    match proxy.resolve_upstream(&upstream).await {
        Ok(addrs) => {
            let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
            tracing::info!(%upstream, addrs = ?addrs, "upstream resolves");
        }
        Err(error) => {
            tracing::warn!(%upstream, %error, "upstream does not resolve yet; will retry for every connection");
        }
    }
}
