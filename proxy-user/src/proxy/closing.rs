//! What a connection's access log line says and how a refused client is
//! closed: the span fields the guard learned, the refusal line, a FIN
//! (never a reset) to a client that could not be served.

use std::{
    io,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::{addr::ClientAddr, edge::Learned};

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

/// The access log line of a connection the guard closed: a health check is
/// routine (info), anything else a warning.
pub(super) fn log_refused(
    reason: &'static str,
    error: &dyn std::fmt::Display,
    learned: &Learned,
    edge_time: Duration,
    started: Instant,
) {
    macro_rules! closed {
        ($level:ident) => {
            tracing::$level!(
                upstream = "-",
                chained_headers = learned.chained_headers,
                edge_ms = millis(edge_time),
                bytes_up = 0u64,
                bytes_down = 0u64,
                duration_ms = millis(started.elapsed()),
                reason,
                %error,
                "connection closed"
            )
        };
    }
    if reason == "health_check" {
        closed!(info);
    } else {
        closed!(warn);
    }
}

pub(super) fn millis(d: Duration) -> f64 {
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
