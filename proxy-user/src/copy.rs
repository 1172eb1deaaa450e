//! The userspace copy data plane: one buffer per direction, half-close carried
//! across (EOF on one side becomes `shutdown(SHUT_WR)` on the other, and the
//! other direction goes on), a reset or error on either side becomes a reset
//! on both.
//!
//! Written here rather than with `tokio::io::copy_bidirectional` because that
//! returns no byte counts when a side fails, and cannot carry a reset.

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};
use tokio_util::sync::CancellationToken;

use crate::sockopt;

/// Which socket an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The accepted (client) connection.
    Downstream,
    /// The connection to the upstream.
    Upstream,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides sent FIN; everything was forwarded.
    Completed,
    /// A side reset the connection; the reset was carried to the other side.
    Reset(Side),
    /// Another I/O error on a side; the other side was reset.
    Error(Side),
    /// The drain timeout ran out (or an immediate stop) and the proxy cut it.
    Stopped,
}

impl CloseReason {
    /// A short stable label for logs and metrics.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Reset(Side::Downstream) => "client_reset",
            Self::Reset(Side::Upstream) => "upstream_reset",
            Self::Error(Side::Downstream) => "client_error",
            Self::Error(Side::Upstream) => "upstream_error",
            Self::Stopped => "stopped",
        }
    }
}

/// What the copy did.
#[derive(Debug)]
pub struct Transfer {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    pub reason: CloseReason,
}

/// Forwards both directions until both are finished, a side fails, or `stop`
/// is cancelled; then closes both sockets.
pub async fn copy_bidirectional(
    mut client: TcpStream,
    mut upstream: TcpStream,
    buffer_size: usize,
    stop: CancellationToken,
) -> Transfer {
    let to_upstream = AtomicU64::new(0);
    let to_client = AtomicU64::new(0);
    let reason = {
        let (mut client_read, mut client_write) = client.split();
        let (mut upstream_read, mut upstream_write) = upstream.split();
        let up = pump(&mut client_read, &mut upstream_write, buffer_size, &to_upstream);
        let down = pump(&mut upstream_read, &mut client_write, buffer_size, &to_client);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            let result = tokio::select! {
                r = &mut up, if !up_done => { up_done = true; r.map_err(|e| e.side(Side::Downstream, Side::Upstream)) }
                r = &mut down, if !down_done => { down_done = true; r.map_err(|e| e.side(Side::Upstream, Side::Downstream)) }
                () = stop.cancelled() => break CloseReason::Stopped,
            };
            match result {
                Err((side, error)) if error.kind() == io::ErrorKind::ConnectionReset => {
                    break CloseReason::Reset(side);
                }
                Err((side, _)) => break CloseReason::Error(side),
                Ok(()) if up_done && down_done => break CloseReason::Completed,
                Ok(()) => {}
            }
        }
    };
    if reason != CloseReason::Completed {
        // Best effort: the socket may already be gone, and it is closed next anyway.
        let _ = sockopt::reset_on_close(&client);
        let _ = sockopt::reset_on_close(&upstream);
    }
    Transfer {
        client_to_upstream: to_upstream.load(Ordering::Relaxed),
        upstream_to_client: to_client.load(Ordering::Relaxed),
        reason,
    }
}

/// An I/O error in one direction, by where it happened.
enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

impl PumpError {
    /// The side the error belongs to, given the sides this direction reads and writes.
    fn side(self, reads: Side, writes: Side) -> (Side, io::Error) {
        match self {
            Self::Read(e) => (reads, e),
            Self::Write(e) => (writes, e),
        }
    }
}

/// Copies one direction until EOF, then shuts the destination's write side.
async fn pump(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    buffer_size: usize,
    copied: &AtomicU64,
) -> Result<(), PumpError> {
    // The buffer is allocated only once there is something to read, so an idle
    // connection holds no copy buffer in this direction.
    from.readable().await.map_err(PumpError::Read)?;
    let mut buf = vec![0u8; buffer_size];
    loop {
        let n = from.read(&mut buf).await.map_err(PumpError::Read)?;
        if n == 0 {
            return to.shutdown().await.map_err(PumpError::Write);
        }
        to.write_all(&buf[..n]).await.map_err(PumpError::Write)?;
        copied.fetch_add(n as u64, Ordering::Relaxed);
    }
}
