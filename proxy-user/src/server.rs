//! Start-up, the accept loops, and stopping: SIGTERM drains (listeners close,
//! open connections get the drain timeout), SIGINT stops at once.

use std::{sync::Arc, time::Duration};

use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::Semaphore,
    task::JoinSet,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    addr::UpstreamTarget,
    config::Config,
    dataplane::{DataPlane, sockmap::SockmapPlane},
    dns::ResolveError,
    edge::EdgeConfig,
    kernel::{KernelError, KernelPrograms},
    listener::{BindError, Listener},
    proxy::Proxy,
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
}

impl Server {
    /// Installs the signal handlers, builds the resolver and the data plane,
    /// and binds every listener; nothing is accepted yet. `kernel` is the
    /// loaded kernel programs, or why they could not be loaded.
    pub fn start(config: &Config, kernel: Result<KernelPrograms, KernelError>) -> Result<Self, StartError> {
        let sigterm = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
        let sigint = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;
        let (sockmap, kernel) = match (config.dataplane, kernel) {
            (DataPlane::Sockmap { max_inflight, fallback_pipe_size }, Ok(kernel)) => {
                (Some(SockmapPlane::start(kernel, max_inflight, fallback_pipe_size)?), None)
            }
            (DataPlane::Sockmap { .. }, Err(error)) => return Err(StartError::NoKernel(error.to_string())),
            (_, kernel) => (None, kernel.ok()),
        };
        let proxy = Arc::new(Proxy::new(config, sockmap)?);
        let listeners = config
            .listeners
            .iter()
            .map(|l| Ok((Listener::bind(l.addr)?, Arc::clone(&l.edge))))
            .collect::<Result<_, BindError>>()?;
        Ok(Self {
            listeners,
            proxy,
            _kernel: kernel,
            drain_timeout: config.drain_timeout,
            max_connections: config.max_connections,
            dataplane_reason: config.dataplane_reason,
            sigterm,
            sigint,
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

        let drain = tokio::select! {
            _ = self.sigterm.recv() => true,
            _ = self.sigint.recv() => false,
        };
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

    /// Logs what the edge guards and the sockmap plane (when it is in use)
    /// did over the whole run.
    pub fn log_totals(&self) {
        self.proxy.edge_stats().log_totals();
        if let Some(sockmap) = self.proxy.sockmap() {
            sockmap.log_totals();
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
