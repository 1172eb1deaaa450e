//! The background upstream probe: per upstream target, every probe
//! interval, resolve the name and connect to one of its addresses (closed at
//! once), so a fresh proxy becomes ready without client traffic and an
//! upstream outage turns it not ready. The first probe runs at start-up and
//! logs its result (the start-up check); later ones log only changes.
//! [`schedule`]: one task per target, following reloads.

pub mod schedule;

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    addr::{UpstreamAddr, UpstreamTarget},
    connect::ConnectError,
    dns::ResolveError,
    proxy::Proxy,
};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Resolve(ResolveError),
    #[error(transparent)]
    Connect(ConnectError),
}

impl ProbeError {
    /// The `result` label of the probe counter.
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            Self::Resolve(_) => "resolve_failed",
            Self::Connect(_) => "connect_failed",
        }
    }
}

/// Resolves `target` with the proxy's resolver (its cache too) and connects
/// to one of its addresses, then closes the connection. Records successes
/// for readiness; feeds no client-connection metric.
pub async fn probe(proxy: &Proxy, target: &UpstreamTarget) -> Result<Vec<UpstreamAddr>, ProbeError> {
    let addrs = proxy.resolver().resolve(target).await.map_err(ProbeError::Resolve)?;
    proxy.health().resolved(target);
    let connected = proxy.connector().connect(&addrs).await.map_err(ProbeError::Connect)?;
    proxy.health().connected(target);
    drop(connected.stream);
    Ok(addrs)
}

/// Probes `target` every `interval` until `stop` is cancelled.
pub async fn run(proxy: Arc<Proxy>, target: UpstreamTarget, interval: Duration, stop: CancellationToken) {
    let mut last_ok = None;
    loop {
        let result = tokio::select! {
            result = probe(&proxy, &target) => result,
            () = stop.cancelled() => return,
        };
        proxy.metrics().probed(result.as_ref().map_or_else(ProbeError::label, |_| "ok"));
        let ok = result.is_ok();
        match (&result, last_ok) {
            (Ok(addrs), None) => {
                let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                tracing::info!(upstream = %target, addrs = ?addrs, "upstream resolves");
            }
            (Err(ProbeError::Resolve(error)), None) => tracing::warn!(
                upstream = %target,
                %error,
                "upstream does not resolve yet; will retry for every connection"
            ),
            (Err(error), None | Some(true)) => {
                tracing::warn!(upstream = %target, %error, "upstream probe failed");
            }
            (Ok(_), Some(false)) => tracing::info!(upstream = %target, "upstream probe succeeded again"),
            _ => {}
        }
        last_ok = Some(ok);
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stop.cancelled() => return,
        }
    }
}
