//! Graceful upgrades. [`protocol`] has the design and the exchange of
//! sockets over the upgrade socket; here is the server's side: a new process builds its listeners from the
//! sockets it got; a running one answers requests on its upgrade socket
//! and, once the new process is ready, stops accepting and drains; SIGUSR2
//! starts the binary again to do that.

use std::{
    net::SocketAddr,
    os::{fd::OwnedFd, unix::net::UnixStream},
};

use tokio::sync::mpsc;

pub mod protocol;

pub use protocol::{HandedSocket, Handover, UpgradeError, listen, take_over};

use super::{
    Server,
    listeners::{Bound, keep},
};
use crate::{
    addr::ListenAddr,
    config::ListenerConfig,
    server::listeners::socket::{BindError, Listener},
    service_manager,
};

/// Every configured listener: the handed-over sockets it matches (by the
/// rule a reload keeps listeners by; a listener's group comes as several
/// sockets with the same addresses), else a new group of `sockets`. Sockets
/// nobody matches are closed here (the old process closes its copies as it
/// drains).
pub(super) fn listeners(
    configs: &[ListenerConfig],
    handed: Vec<HandedSocket>,
    sockets: usize,
) -> Result<Vec<Bound>, BindError> {
    let mut groups: Vec<((ListenAddr, ListenAddr), Vec<OwnedFd>)> = Vec::new();
    for h in handed {
        let addrs = (ListenAddr(h.configured), ListenAddr(h.bound));
        match groups.iter_mut().find(|(a, _)| *a == addrs) {
            Some((_, fds)) => fds.push(h.fd),
            None => groups.push((addrs, vec![h.fd])),
        }
    }
    let running: Vec<_> = groups.iter().map(|(addrs, _)| *addrs).collect();
    let wanted: Vec<_> = configs.iter().map(|c| c.addr).collect();
    let mut handed: Vec<Option<Vec<OwnedFd>>> = groups.into_iter().map(|(_, fds)| Some(fds)).collect();
    configs
        .iter()
        .zip(keep(&running, &wanted))
        .map(|(config, kept)| match kept.and_then(|i| handed[i].take()) {
            Some(fds) => {
                let group = fds
                    .into_iter()
                    .map(Listener::from_fd)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|source| BindError { addr: config.addr, source })?;
                tracing::info!(listen = %group[0].addr, sockets = group.len(), "upgrade: listener taken over");
                Ok(Bound { configured: config.addr, sockets: group })
            }
            None => Bound::bind(config.addr, sockets),
        })
        .collect()
}

/// Whether the handed admin socket is the one `configured` asks for.
pub(super) fn admin_matches(handed: &HandedSocket, configured: SocketAddr) -> bool {
    let want = [ListenAddr(configured)];
    keep(&[(ListenAddr(handed.configured), ListenAddr(handed.bound))], &want)[0].is_some()
}

/// A running process's upgrade socket: requests in, outcomes out.
pub(super) struct Upgrades {
    requests: mpsc::Receiver<UnixStream>,
    outcomes: mpsc::Receiver<bool>,
    report: mpsc::Sender<bool>,
}

/// What happened on the upgrade socket.
pub(super) enum UpgradeEvent {
    /// A new process asks for the sockets.
    Request(UnixStream),
    /// A hand-over ended: the new process took over (true) or gave up.
    Outcome(bool),
}

impl Upgrades {
    /// Accepts on `listener` in the background.
    pub fn start(listener: std::os::unix::net::UnixListener) -> std::io::Result<Self> {
        let listener = tokio::net::UnixListener::from_std(listener)?;
        let (send, requests) = mpsc::channel(1);
        tokio::spawn(async move {
            loop {
                // Out of descriptors, say: try again rather than stop answering upgrades.
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream.into_std().and_then(|s| s.set_nonblocking(false).map(|()| s)),
                    Err(error) => Err(error),
                };
                match stream {
                    Ok(stream) => {
                        if send.send(stream).await.is_err() {
                            return;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "upgrade socket: cannot take a connection");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        });
        let (report, outcomes) = mpsc::channel(1);
        Ok(Self { requests, outcomes, report })
    }

    pub async fn next(&mut self) -> UpgradeEvent {
        tokio::select! {
            Some(stream) = self.requests.recv() => UpgradeEvent::Request(stream),
            Some(outcome) = self.outcomes.recv() => UpgradeEvent::Outcome(outcome),
        }
    }

    /// Sends the sockets and waits for the new process (on a blocking
    /// thread); the outcome comes back through [`Self::next`].
    pub fn hand_over(
        &self,
        stream: UnixStream,
        listeners: Vec<(ListenAddr, ListenAddr, OwnedFd)>,
        admin: Option<(SocketAddr, SocketAddr, OwnedFd)>,
    ) {
        let report = self.report.clone();
        tracing::info!(listeners = listeners.len(), "upgrade: a new process asks for the sockets");
        tokio::task::spawn_blocking(move || {
            let outcome = match protocol::hand_over(stream, &listeners, admin.as_ref()) {
                Ok(true) => true,
                Ok(false) => {
                    tracing::warn!("upgrade: the new process gave up before it was ready; still serving");
                    false
                }
                Err(error) => {
                    tracing::warn!(%error, "upgrade: the hand-over failed; still serving");
                    false
                }
            };
            let _ = report.blocking_send(outcome);
        });
    }
}

/// SIGUSR2: starts this program again (the path it was started as, so a new
/// build installed there, with the same arguments and environment); the new
/// process takes the sockets over through the upgrade socket.
pub(super) fn start_new_binary() {
    let mut args = std::env::args_os();
    let Some(program) = args.next() else {
        tracing::error!("SIGUSR2: no program path in the arguments; cannot start a new binary");
        return;
    };
    match std::process::Command::new(&program).args(args).spawn() {
        Ok(mut child) => {
            let pid = child.id();
            tracing::info!(pid, ?program, "SIGUSR2: started the new binary; it takes over when ready");
            // Reaps it if it fails (it outlives this process when it succeeds).
            std::thread::spawn(move || {
                if let Ok(status) = child.wait() {
                    tracing::warn!(pid, %status, "upgrade: the new binary exited");
                }
            });
        }
        Err(error) => tracing::error!(%error, ?program, "SIGUSR2: cannot start the new binary"),
    }
}

impl Server {
    /// Sockets were taken over: listen on the upgrade socket (for the next
    /// upgrade) and tell the old process and the service manager.
    pub(super) fn take_over(&mut self, handover: Handover, plane: &str) {
        if let Some(path) = &self.config.upgrade_socket {
            match protocol::listen(path).and_then(|l| {
                Upgrades::start(l).map_err(|source| UpgradeError::Io {
                    path: path.clone(),
                    what: "listening",
                    source,
                })
            }) {
                Ok(upgrades) => self.upgrades = Some(upgrades),
                Err(error) => {
                    tracing::error!(%error, "upgrade: no upgrade socket; a later upgrade needs a restart")
                }
            }
        }
        match handover.ready() {
            Ok(()) => tracing::info!("upgrade: took over; the old process drains"),
            Err(error) => {
                tracing::error!(%error, "upgrade: cannot tell the old process; it may still accept")
            }
        }
        service_manager::took_over(&self.listeners.addrs(), plane);
    }

    /// Hands this process's sockets to the new process on `stream`.
    pub(super) fn hand_over_to(&self, stream: UnixStream) {
        let (Some(upgrades), Ok(listeners), Ok(admin_fd)) =
            (&self.upgrades, self.listeners.handover(), self.admin_socket.2.try_clone())
        else {
            tracing::error!("upgrade: cannot duplicate the sockets to hand over; still serving");
            return;
        };
        upgrades.hand_over(stream, listeners, Some((self.admin_socket.0, self.admin_socket.1, admin_fd)));
    }
}

/// The next upgrade event; never, without an upgrade socket.
pub(super) async fn next_upgrade(upgrades: Option<&mut Upgrades>) -> UpgradeEvent {
    match upgrades {
        Some(upgrades) => upgrades.next().await,
        None => std::future::pending().await,
    }
}
