//! Stopping: SIGTERM (not ready, the drain delay, listeners closed, the
//! drain timeout), SIGINT (everything cut at once), or a graceful upgrade
//! (not ready, listeners and admin endpoint closed in this process, the
//! drain timeout; no drain delay, as the sockets live on in the new process).

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Server, Stop, Stopped};
use crate::service_manager;

/// Time connections get to close after they were told to stop.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Longest wait for the health-check port to close when a drain starts.
const HEALTH_PORT_CLOSE: Duration = Duration::from_secs(1);

impl Server {
    /// Stops as `stop` says; `health_port_watch` turns true once the
    /// health-check port closed.
    pub(super) async fn stop(&mut self, stop: Stop, mut health_port_watch: watch::Receiver<bool>) -> Stopped {
        let (connections, stop_connections) =
            (self.accepting.connections.clone(), self.accepting.stop_connections.clone());
        let drain_timeout = self.config.drain_timeout;
        let upgraded = matches!(stop, Stop::Upgraded);
        let drain = match stop {
            Stop::Term => {
                self.health.start_drain();
                service_manager::draining(connections.len(), drain_timeout);
                let _ = tokio::time::timeout(HEALTH_PORT_CLOSE, health_port_watch.wait_for(|closed| *closed))
                    .await;
                self.drain_delay(connections.len()).await
            }
            Stop::Int => {
                service_manager::stopping_now(connections.len());
                false
            }
            Stop::Upgraded => {
                // No drain delay: the sockets stay open in the new process,
                // which the NLB keeps sending to. No STOPPING=1 either: the
                // service goes on (the new process is its main process now).
                self.health.start_drain();
                self.admin_stop.cancel();
                tracing::info!(open = connections.len(), "upgrade: the new process accepts; this one drains");
                true
            }
        };
        self.listeners.close().await;
        connections.close();
        if drain {
            if upgraded {
                tracing::info!(open = connections.len(), timeout = ?drain_timeout, "upgrade: draining");
            } else {
                tracing::info!(open = connections.len(), timeout = ?drain_timeout, "SIGTERM: draining");
            }
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
}

/// Tells every connection to stop, waits briefly for them, and returns how many there were.
async fn cut_all(connections: &TaskTracker, stop: &CancellationToken) -> usize {
    let open = connections.len();
    stop.cancel();
    let _ = tokio::time::timeout(CLOSE_GRACE, connections.wait()).await;
    open
}
