//! What every plane does around its directions: runs both until they end
//! or one fails, carries a half-close across, and turns a failure into a
//! reset of both sockets.

use std::{
    io,
    os::fd::AsFd,
    pin::{Pin, pin},
    sync::atomic::AtomicU64,
};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::transfer::{ByteProgress, Ending, Side, Sockets, Transfer};
use crate::sockopt;

/// An I/O error in one direction, by where it happened.
#[derive(Debug)]
pub(crate) enum PumpError {
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

/// Runs the client→upstream (`up`) and upstream→client (`down`) directions
/// until both end, one fails, or `stop` is cancelled. The directions come
/// pinned by the caller: taken by value and pinned here, each would be
/// stored twice in this future (the argument and the pinned local), and an
/// idle connection holds this future for as long as it is open.
pub(crate) async fn drive(
    mut up: Pin<&mut impl Future<Output = Result<(), PumpError>>>,
    mut down: Pin<&mut impl Future<Output = Result<(), PumpError>>>,
    stop: &CancellationToken,
) -> Ending {
    let (mut up_done, mut down_done) = (false, false);
    loop {
        let result = tokio::select! {
            r = up.as_mut(), if !up_done => {
                up_done = true;
                r.map_err(|e| e.side(Side::Downstream, Side::Upstream))
            }
            r = down.as_mut(), if !down_done => {
                down_done = true;
                r.map_err(|e| e.side(Side::Upstream, Side::Downstream))
            }
            () = stop.cancelled() => return Ending::Stopped,
        };
        match result {
            Err((side, error)) => return Ending::of_error(side, &error),
            Ok(()) if up_done && down_done => return Ending::Completed,
            Ok(()) => {}
        }
    }
}

/// A connection that did not complete is closed with a reset on both sides.
pub(crate) fn finish<F: AsFd>(ending: Ending, client: &F, upstream: &F) {
    if ending != Ending::Completed {
        // Best effort: the socket may already be gone, and it is closed next anyway.
        let _ = sockopt::reset_on_close(client);
        let _ = sockopt::reset_on_close(upstream);
    }
}

/// Waits until `from` has a byte to read or its EOF: whether it has a byte.
/// Readiness alone is not enough: an accepted socket can be reported
/// readable with nothing to read (seen on every idle connection of the
/// bench), and the copy and splice planes allocate their buffer or pipe
/// only once this says there is a byte, so an idle connection holds
/// neither, and a direction that only ends (most short connections' other
/// half) never makes one.
pub(crate) async fn data_or_eof(from: &TcpStream) -> io::Result<bool> {
    from.peek(&mut [0u8; 1]).await.map(|n| n > 0)
}

/// `shutdown(SHUT_WR)`: the peer reads EOF once it has read everything before.
pub(crate) fn shutdown_write<F: AsFd>(socket: &F) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    nix::sys::socket::shutdown(socket.as_fd().as_raw_fd(), nix::sys::socket::Shutdown::Write)
        .map_err(io::Error::from)
}

/// How one direction moves bytes through user space (a buffer, or a pipe
/// with splice(2)).
pub(crate) trait Pump: Copy {
    /// Moves `from` → `to` until EOF, then shuts `to`'s write side; adds
    /// every byte moved to `moved`. Called once `from` has a byte.
    fn run<'a>(
        self,
        from: &'a TcpStream,
        to: &'a TcpStream,
        moved: &'a AtomicU64,
    ) -> impl Future<Output = Result<(), PumpError>> + Send + 'a;
}

/// Forwards both directions of `sockets` with `pump`, counting into
/// `progress`, until both end, a side fails or `stop` is cancelled; then
/// closes both sockets.
pub(crate) async fn forward_in_user_space(
    sockets: Sockets,
    stop: &CancellationToken,
    progress: &ByteProgress,
    pump: impl Pump,
) -> Transfer {
    let Sockets { client, upstream, .. } = sockets;
    let up = pin!(one_way(pump, &client, &upstream, &progress.client_to_upstream));
    let down = pin!(one_way(pump, &upstream, &client, &progress.upstream_to_client));
    let ending = drive(up, down, stop).await;
    finish(ending, &client, &upstream);
    Transfer::counted(progress, ending)
}

/// One direction: waits for a first byte, then pumps; an EOF first is
/// carried across at once, with no pump. The pump is boxed: an idle
/// connection holds only the wait, and the buffer or pipe is allocated once
/// there is something to move.
async fn one_way(
    pump: impl Pump,
    from: &TcpStream,
    to: &TcpStream,
    moved: &AtomicU64,
) -> Result<(), PumpError> {
    if !data_or_eof(from).await.map_err(PumpError::Read)? {
        return shutdown_write(to).map_err(PumpError::Write);
    }
    Box::pin(pump.run(from, to, moved)).await
}
