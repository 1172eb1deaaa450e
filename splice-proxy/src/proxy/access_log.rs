//! What a connection's access log line says and how a refused client is
//! closed: the span fields the guard learned, the one "connection closed"
//! line, a FIN (never a reset) to a client that could not be served.

use std::{
    fmt, io,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use tracing::Level;

use crate::{
    addr::{ClientAddr, UpstreamAddr, UpstreamTarget},
    close_reason::CloseReason,
    dataplane::Transfer,
    edge::Learned,
};

/// How long a refused client may take to close after our FIN before we drop it.
const REFUSED_LINGER: Duration = Duration::from_secs(1);

/// The client address (the header's, or the peer's), PROXY header version,
/// VPC endpoint and server name go into the connection's span, so every line
/// of it shows them.
pub(super) fn record_learned(learned: &Learned, peer: ClientAddr) {
    let span = tracing::Span::current();
    match learned.client {
        Some(client) => span.record("client", tracing::field::display(client)),
        None => span.record("client", tracing::field::display(peer)),
    };
    if let Some(version) = learned.proxy_version {
        span.record("proxy_header", version);
    }
    if let Some(vpce) = &learned.vpce_id {
        span.record("vpce", vpce.as_str());
    }
    if let Some(sni) = &learned.server_name {
        span.record("sni", sni.as_str());
    }
}

/// The line written when a connection closes, whatever closed it: the
/// access log. Stages the connection did not reach are left out (`None`);
/// byte counts are 0 for a connection that was not forwarded.
#[derive(Default)]
pub(super) struct AccessLine<'a> {
    pub upstream: Option<UpstreamAddr>,
    pub target: Option<&'a UpstreamTarget>,
    pub chained_headers: usize,
    pub edge_time: Duration,
    pub resolve_time: Option<Duration>,
    pub connect_time: Option<Duration>,
    /// What the data plane did, for a forwarded connection.
    pub transfer: Option<&'a Transfer>,
    pub error: Option<&'a dyn fmt::Display>,
}

/// The access line's fields, at one level (tracing needs it constant).
macro_rules! access_event {
    ($level:expr, $line:expr, $reason:expr, $started:expr) => {{
        let line = $line;
        let t = line.transfer;
        tracing::event!(
            $level,
            upstream = %Dash(line.upstream),
            target = line.target.map(tracing::field::display),
            chained_headers = line.chained_headers,
            edge_ms = millis(line.edge_time),
            resolve_ms = line.resolve_time.map(millis),
            connect_ms = line.connect_time.map(millis),
            bytes_up = t.map_or(0, |t| t.client_to_upstream),
            bytes_down = t.map_or(0, |t| t.upstream_to_client),
            kernel_bytes = t.map(|t| t.kernel_bytes),
            paused_directions = t.map(|t| t.paused_directions),
            pauses = t.map(|t| t.pauses),
            resumes = t.map(|t| t.resumes),
            duration_ms = millis($started.elapsed()),
            reason = $reason.label(),
            error = line.error.map(tracing::field::display),
            "connection closed"
        )
    }};
}

impl AccessLine<'_> {
    /// Writes the line at the level the reason's row gives.
    pub fn write(&self, reason: CloseReason, started: Instant) {
        match reason.info().level {
            Level::ERROR => access_event!(Level::ERROR, self, reason, started),
            Level::WARN => access_event!(Level::WARN, self, reason, started),
            Level::INFO => access_event!(Level::INFO, self, reason, started),
            Level::DEBUG => access_event!(Level::DEBUG, self, reason, started),
            Level::TRACE => access_event!(Level::TRACE, self, reason, started),
        }
    }
}

/// An address, or `-` where there is none.
struct Dash(Option<UpstreamAddr>);

impl fmt::Display for Dash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("-"),
        }
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Closes a client we could not serve with a FIN, not a reset: the client may
/// already have sent its ClientHello, and closing a socket with unread bytes
/// would reset it. So: FIN, then read and discard until the client closes too
/// (or [`REFUSED_LINGER`] passes).
pub(super) async fn close_refused(mut client: TcpStream) {
    if client.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let discard = async {
        loop {
            match client.read(&mut sink).await {
                Ok(0) => return Ok::<(), io::Error>(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    };
    let _ = tokio::time::timeout(REFUSED_LINGER, discard).await;
}
