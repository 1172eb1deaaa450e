//! Data planes: how the bytes of an established connection are moved.
//!
//! Every plane forwards both directions until both have ended, carries a
//! half-close across (EOF on one side becomes `shutdown(SHUT_WR)` on the
//! other while the other direction goes on), and turns a reset or error on
//! either side into a reset on both. They differ only in how one direction
//! moves its bytes: [`copy`] through a userspace buffer, [`splice`] through a
//! pipe with splice(2), never touching user memory.

pub mod copy;
pub mod sockmap;
pub mod splice;

use std::{
    io,
    os::fd::AsFd,
    pin::{Pin, pin},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::sockopt;

/// The `--dataplane` choice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPlaneChoice {
    /// splice: the plane that passes the correctness gate on a busy host
    /// too; the start-up log says why (sockmap only when asked for, see
    /// docs/kernel-notes.md).
    #[default]
    Auto,
    /// splice(2) through a pipe per direction: the bytes stay in the kernel.
    Splice,
    /// A userspace buffer per direction.
    Copy,
    /// Both sockets in a BPF socket map; an `sk_skb` verdict program redirects
    /// every skb to the peer, pausing to user space when a peer does not drain.
    Sockmap,
}

/// The plane in use, with its settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPlane {
    Splice {
        pipe_size: usize,
    },
    Copy {
        buffer_size: usize,
    },
    /// `fallback_pipe_size`: connections that cannot be spliced in the kernel
    /// (the client closed before insertion) go through splice(2).
    Sockmap {
        max_inflight: u64,
        fallback_pipe_size: usize,
    },
}

/// Why `auto` starts on splice. Sockmap forwarded one skb twice on a busy
/// host (both cores taken by other work), so it is offered only when asked
/// for until its contention gate holds (docs/kernel-notes.md, "Sockmap
/// duplicate under load").
const AUTO_REASON: &str = "auto: splice, the plane that passes the correctness gate on an idle \
     and on a busy host; sockmap runs only with --dataplane sockmap, because under CPU \
     contention it was seen to forward one skb twice";

/// The plane `--dataplane` asks for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ChosenPlane {
    pub plane: DataPlane,
    /// `auto` only: what runs instead when `plane` needs the kernel programs
    /// and they did not load (no CAP_BPF, CAP_NET_ADMIN or CAP_PERFMON, no
    /// BTF, an old kernel). An explicit `--dataplane sockmap` has none: the
    /// proxy then refuses to start.
    pub fallback: Option<DataPlane>,
    /// Why `plane` was chosen (logged at start-up).
    pub reason: &'static str,
}

impl std::fmt::Debug for ChosenPlane {
    /// The planes without the reason: what a reload that changes them names.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.fallback {
            None => write!(f, "{:?}", self.plane),
            Some(fallback) => write!(f, "auto: {:?}, else {fallback:?}", self.plane),
        }
    }
}

impl DataPlane {
    /// Resolves `--dataplane` from the configuration alone: the plane to
    /// start, and why. The kernel programs load later; `auto` then falls back
    /// (see [`ChosenPlane::fallback`]).
    #[must_use]
    pub fn choose(
        choice: DataPlaneChoice,
        pipe_size: usize,
        buffer_size: usize,
        max_inflight: u64,
    ) -> ChosenPlane {
        let sockmap = Self::Sockmap { max_inflight, fallback_pipe_size: pipe_size };
        let chosen = |plane, fallback, reason| ChosenPlane { plane, fallback, reason };
        match choice {
            DataPlaneChoice::Auto => chosen(Self::Splice { pipe_size }, None, AUTO_REASON),
            DataPlaneChoice::Splice => {
                chosen(Self::Splice { pipe_size }, None, "chosen with --dataplane splice")
            }
            DataPlaneChoice::Copy => chosen(Self::Copy { buffer_size }, None, "chosen with --dataplane copy"),
            DataPlaneChoice::Sockmap => chosen(sockmap, None, "chosen with --dataplane sockmap"),
        }
    }

    /// A short stable label for logs and metrics.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Splice { .. } => "splice",
            Self::Copy { .. } => "copy",
            Self::Sockmap { .. } => "sockmap",
        }
    }
}

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

/// What the data plane did.
#[derive(Debug)]
pub struct Transfer {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    /// Of those, the bytes the kernel redirected (sockmap plane) without user space.
    pub kernel_bytes: u64,
    /// Directions the sockmap program paused and user space finished.
    pub paused_directions: u32,
    /// Times the program paused a direction, and resumed one (sockmap plane).
    pub pauses: u32,
    pub resumes: u32,
    pub reason: CloseReason,
}

impl Transfer {
    /// A connection that ended before any byte moved.
    pub(crate) fn failed(reason: CloseReason) -> Self {
        Self {
            client_to_upstream: 0,
            upstream_to_client: 0,
            kernel_bytes: 0,
            paused_directions: 0,
            pauses: 0,
            resumes: 0,
            reason,
        }
    }
}

/// Bytes moved so far each way, for `/debug/connections`: the copy and
/// splice planes add to the counters as they go; on sockmap they hold what
/// user space moved, and the kernel's share is read from the flows on demand.
#[derive(Debug, Default)]
pub struct ByteProgress {
    pub client_to_upstream: AtomicU64,
    pub upstream_to_client: AtomicU64,
    /// While a sockmap connection is spliced: where to read the kernel's share.
    kernel: std::sync::Mutex<Option<sockmap::KernelShare>>,
}

impl ByteProgress {
    /// Bytes moved so far (client to upstream, upstream to client).
    #[must_use]
    pub fn totals(&self) -> (u64, u64) {
        let kernel = self.kernel_share();
        let kernel = kernel.as_ref().map_or([0, 0], sockmap::KernelShare::read);
        (
            self.client_to_upstream.load(Ordering::Relaxed) + kernel[0],
            self.upstream_to_client.load(Ordering::Relaxed) + kernel[1],
        )
    }

    fn kernel_share(&self) -> std::sync::MutexGuard<'_, Option<sockmap::KernelShare>> {
        self.kernel.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

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

/// Forwards both directions with `plane` until both are finished, a side
/// fails, or `stop` is cancelled; then closes both sockets. `client_read`:
/// bytes read from the client before (a PROXY header), which the sockmap
/// plane must leave out of its count of what the client sent. `progress`
/// shows the bytes as they move.
///
/// The future is boxed per plane: an idle connection holds it for as long as
/// it is open, and one `async fn` over every plane would be as large as the
/// largest (sockmap's) whichever plane runs.
pub fn forward<'a>(
    plane: DataPlane,
    sockmap: Option<&'a Arc<sockmap::SockmapPlane>>,
    client: TcpStream,
    upstream: TcpStream,
    stop: CancellationToken,
    client_read: u64,
    progress: &'a ByteProgress,
) -> Pin<Box<dyn Future<Output = Transfer> + Send + 'a>> {
    match (plane, sockmap) {
        (DataPlane::Sockmap { .. }, Some(sockmap)) => {
            Box::pin(sockmap::SockmapPlane::forward(sockmap, client, upstream, stop, client_read, progress))
        }
        (DataPlane::Copy { buffer_size }, _) => {
            Box::pin(forward_user_counted(client, upstream, stop, UserPump::Copy { buffer_size }, progress))
        }
        (DataPlane::Splice { pipe_size }, _)
        | (DataPlane::Sockmap { fallback_pipe_size: pipe_size, .. }, None) => {
            Box::pin(forward_user_counted(client, upstream, stop, UserPump::Splice { pipe_size }, progress))
        }
    }
}

/// How a direction moves bytes when the kernel does not splice it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum UserPump {
    Copy { buffer_size: usize },
    Splice { pipe_size: usize },
}

impl UserPump {
    /// One direction: waits for a first byte (or the EOF), then moves bytes.
    /// The pump is boxed: an idle connection holds only the wait, and the
    /// buffer or pipe is allocated once there is something to move.
    async fn run(self, from: &TcpStream, to: &TcpStream, copied: &AtomicU64) -> Result<(), PumpError> {
        data_or_eof(from).await.map_err(PumpError::Read)?;
        match self {
            Self::Copy { buffer_size } => Box::pin(copy::pump(from, to, buffer_size, copied)).await,
            Self::Splice { pipe_size } => Box::pin(splice::pump(from, to, pipe_size, copied)).await,
        }
    }
}

/// Runs one pump per direction (copy or splice), counting into `progress`.
pub(crate) async fn forward_user_counted(
    client: TcpStream,
    upstream: TcpStream,
    stop: CancellationToken,
    pump: UserPump,
    progress: &ByteProgress,
) -> Transfer {
    let to_upstream = &progress.client_to_upstream;
    let to_client = &progress.upstream_to_client;
    let up = pin!(pump.run(&client, &upstream, to_upstream));
    let down = pin!(pump.run(&upstream, &client, to_client));
    let reason = drive(up, down, &stop).await;
    finish(reason, &client, &upstream);
    Transfer {
        client_to_upstream: to_upstream.load(Ordering::Relaxed),
        upstream_to_client: to_client.load(Ordering::Relaxed),
        kernel_bytes: 0,
        paused_directions: 0,
        pauses: 0,
        resumes: 0,
        reason,
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
) -> CloseReason {
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
            () = stop.cancelled() => return CloseReason::Stopped,
        };
        match result {
            Err((side, error)) if error.kind() == io::ErrorKind::ConnectionReset => {
                return CloseReason::Reset(side);
            }
            Err((side, _)) => return CloseReason::Error(side),
            Ok(()) if up_done && down_done => return CloseReason::Completed,
            Ok(()) => {}
        }
    }
}

/// A connection that did not complete is closed with a reset on both sides.
pub(crate) fn finish<F: AsFd>(reason: CloseReason, client: &F, upstream: &F) {
    if reason != CloseReason::Completed {
        // Best effort: the socket may already be gone, and it is closed next anyway.
        let _ = sockopt::reset_on_close(client);
        let _ = sockopt::reset_on_close(upstream);
    }
}

/// Waits until `from` has a byte to read or its EOF. Readiness alone is not
/// enough: an accepted socket can be reported readable with nothing to read
/// (seen on every idle connection of the bench), and the copy and splice
/// planes allocate their buffer or pipe only once this returns, so an idle
/// connection holds neither.
async fn data_or_eof(from: &TcpStream) -> io::Result<()> {
    from.peek(&mut [0u8; 1]).await.map(drop)
}

/// `shutdown(SHUT_WR)`: the peer reads EOF once it has read everything before.
fn shutdown_write<F: AsFd>(socket: &F) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    nix::sys::socket::shutdown(socket.as_fd().as_raw_fd(), nix::sys::socket::Shutdown::Write)
        .map_err(io::Error::from)
}
