//! The plain TCP health-check port (`--health-listen`) for NLB TCP health
//! checks, which pass when the TCP handshake completes. So the port listens
//! only while the proxy is ready: accepted connections are closed at once
//! (FIN); while not ready the socket is closed, and a check gets a reset.
//! From the first moment of a drain it stays closed.
//!
//! It is bound once at start-up to check the port is free (a port in use
//! fails the start) and closed again at once: it opens at the first
//! readiness, on the same port (the one port 0 got).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};

use crate::{
    addr::ListenAddr,
    health::Health,
    server::listeners::socket::{BindError, Listener},
};

/// How often readiness is looked at (it also changes as successes age).
const RECHECK: Duration = Duration::from_millis(200);

/// The bound health-check port, not yet serving.
#[derive(Debug)]
pub struct HealthPort {
    pub addr: SocketAddr,
    listener: Option<TcpListener>,
}

impl HealthPort {
    /// Binds `addr` and closes it again (port 0: the port it got is kept),
    /// so a port in use fails now and nothing is accepted before readiness.
    pub fn bind(addr: SocketAddr) -> Result<Self, BindError> {
        let listener = Listener::bind(ListenAddr(addr))?;
        Ok(Self { addr: listener.addr.0, listener: None })
    }

    /// A graceful upgrade: the old process still has `addr` open until it
    /// starts draining, so it is not bound now; it opens at readiness once
    /// the old process let it go (retried meanwhile).
    #[must_use]
    pub fn inherited(addr: SocketAddr) -> Self {
        Self { addr, listener: None }
    }

    /// Opens and closes the port as readiness changes, until a drain starts.
    /// `closed` turns true once the port is closed for the drain.
    pub async fn run(mut self, health: Arc<Health>, closed: watch::Sender<bool>) {
        let mut drain = health.subscribe_drain();
        let mut bind_failed = false;
        loop {
            if *drain.borrow_and_update() {
                self.listener = None;
                closed.send_replace(true);
                tracing::info!(health = %self.addr, "health-check port closed: draining");
                return;
            }
            let ready = health.readiness().ready;
            match (&self.listener, ready) {
                (None, true) => match Listener::bind(ListenAddr(self.addr)) {
                    Ok(listener) => {
                        self.listener = Some(listener.into_inner());
                        bind_failed = false;
                        tracing::info!(health = %self.addr, "health-check port open: ready");
                    }
                    Err(error) if !bind_failed => {
                        bind_failed = true;
                        tracing::warn!(%error, "health-check port: cannot reopen; retrying");
                    }
                    Err(_) => {}
                },
                (Some(_), false) => {
                    self.listener = None;
                    tracing::info!(health = %self.addr, "health-check port closed: not ready");
                }
                _ => {}
            }
            let accept = async {
                match &self.listener {
                    Some(listener) => listener.accept().await.ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = drain.changed() => {}
                // Accepted: that is the check; closing the stream sends FIN.
                accepted = accept => drop(accepted),
                () = tokio::time::sleep(RECHECK) => {}
            }
        }
    }
}
