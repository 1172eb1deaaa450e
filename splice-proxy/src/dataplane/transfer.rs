//! What every plane takes and gives back: the two sockets of a connection,
//! the bytes moved so far (live, for `/debug/connections`), and the
//! [`Transfer`] at the end, or a hand-over to the next plane.

use std::sync::{
    Mutex, MutexGuard, PoisonError,
    atomic::{AtomicU64, Ordering},
};

use tokio::net::TcpStream;

use crate::{close_reason::CloseReason, sockopt::TcpConfig};

/// Which socket an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The accepted (client) connection.
    Downstream,
    /// The connection to the upstream.
    Upstream,
}

/// Why a forwarded connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Both sides sent FIN; everything was forwarded.
    Completed,
    /// A side reset the connection; the reset was carried to the other side.
    Reset(Side),
    /// Another I/O error on a side; the other side was reset.
    Error(Side),
    /// The drain timeout ran out (or an immediate stop) and the proxy cut it.
    Stopped,
}

impl Ending {
    /// How an I/O error on `side` ends a connection: a reset is carried as
    /// one, anything else ends it as that side's error.
    #[must_use]
    pub fn of_error(side: Side, error: &std::io::Error) -> Self {
        if error.kind() == std::io::ErrorKind::ConnectionReset {
            Self::Reset(side)
        } else {
            Self::Error(side)
        }
    }

    /// The access log's reason.
    #[must_use]
    pub fn reason(self) -> CloseReason {
        match self {
            Self::Completed => CloseReason::Completed,
            Self::Reset(Side::Downstream) => CloseReason::ClientReset,
            Self::Reset(Side::Upstream) => CloseReason::UpstreamReset,
            Self::Error(Side::Downstream) => CloseReason::ClientError,
            Self::Error(Side::Upstream) => CloseReason::UpstreamError,
            Self::Stopped => CloseReason::Stopped,
        }
    }
}

/// A connection handed to a plane: both sockets, connected, what the
/// proxy read from the client before (a PROXY header), which is not part of
/// what the client sent the upstream, the ends an earlier plane has
/// already sent, and the upstream socket's options still to set.
#[derive(Debug)]
pub struct Sockets {
    pub client: TcpStream,
    pub upstream: TcpStream,
    pub client_read: u64,
    pub ends_sent: EndsSent,
    /// Keepalive and the user timeout, due on the upstream socket once the
    /// connection has lived [`TcpConfig::long_lived_after`], on a plane that
    /// defers them (`Plane::defers_upstream_options`: packet, whose early
    /// relay has a timer; it sets them at the switch too); `None` once set,
    /// and on every other plane, which set them at connect. Boxed: a
    /// pointer is all a connection's future keeps of it.
    pub upstream_options_due: Option<Box<TcpConfig>>,
}

impl Sockets {
    /// Sets the upstream socket's due options now, if any are; a failure is
    /// logged and the connection goes on without them.
    pub(crate) fn set_upstream_options(&mut self) {
        if let Some(tcp) = self.upstream_options_due.take() {
            set_long_lived_options(&self.upstream, &tcp);
        }
    }
}

/// [`crate::sockopt::apply_long_lived`] on a live connection's upstream
/// socket: a failure is logged, and the connection goes on without them.
pub(crate) fn set_long_lived_options(upstream: &TcpStream, tcp: &TcpConfig) {
    if let Err(error) = crate::sockopt::apply_long_lived(upstream, tcp) {
        tracing::warn!(%error, "the upstream socket's keepalive could not be set; the connection goes on without it");
    }
}

/// The write sides a plane shut (an end sent with a direction's last
/// bytes) before it handed the connection over. The next plane does not
/// shut them again: once the peer has closed too, a second `shutdown`
/// fails (`ENOTCONN`) and would end the connection as an error.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EndsSent {
    pub to_upstream: bool,
    pub to_client: bool,
}

/// How a plane's turn with a connection ended.
#[derive(Debug)]
pub enum Step {
    /// The connection is over.
    Finished(Transfer),
    /// The plane gives the connection, whole and with nothing of it
    /// in flight, to the plane after it (see `Plane::next`): the bytes it
    /// moved are already in the connection's [`ByteProgress`].
    HandOver(Sockets),
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
    pub ending: Ending,
}

impl Transfer {
    /// What user space moved (as counted in `progress`), with no kernel share.
    pub(crate) fn counted(progress: &ByteProgress, ending: Ending) -> Self {
        Self {
            client_to_upstream: progress.client_to_upstream.load(Ordering::Relaxed),
            upstream_to_client: progress.upstream_to_client.load(Ordering::Relaxed),
            kernel_bytes: 0,
            paused_directions: 0,
            pauses: 0,
            resumes: 0,
            ending,
        }
    }
}

/// Where a plane that moves bytes without user space reads how many it has
/// moved so far (up, down), while the connection is open.
pub trait LiveBytes: Send + Sync + std::fmt::Debug {
    fn read(&self) -> [u64; 2];
}

/// Bytes moved so far each way, for `/debug/connections`: user-space copies
/// add to the counters as they go; a plane that moves bytes in the kernel
/// attaches a [`LiveBytes`] while it does, and [`ByteProgress::settle`]s its
/// share into the counters at the end.
#[derive(Debug, Default)]
pub struct ByteProgress {
    pub client_to_upstream: AtomicU64,
    pub upstream_to_client: AtomicU64,
    live: Mutex<Option<Box<dyn LiveBytes>>>,
}

impl ByteProgress {
    /// Bytes moved so far (client to upstream, upstream to client).
    #[must_use]
    pub fn totals(&self) -> (u64, u64) {
        let live = self.live().as_ref().map_or([0, 0], |live| live.read());
        (
            self.client_to_upstream.load(Ordering::Relaxed) + live[0],
            self.upstream_to_client.load(Ordering::Relaxed) + live[1],
        )
    }

    /// From now on the totals include what `live` reports.
    pub(crate) fn attach(&self, live: Box<dyn LiveBytes>) {
        *self.live() = Some(live);
    }

    /// Adds the kernel's final share, which `last_counts` returns (up,
    /// down) as it removes the source, to the counters and detaches the
    /// source, in one step: a reader never sees the share missing or twice.
    pub(crate) fn settle<T>(&self, last_counts: impl FnOnce() -> ([u64; 2], T)) -> T {
        let mut live = self.live();
        let ([up, down], rest) = last_counts();
        self.client_to_upstream.fetch_add(up, Ordering::Relaxed);
        self.upstream_to_client.fetch_add(down, Ordering::Relaxed);
        *live = None;
        rest
    }

    fn live(&self) -> MutexGuard<'_, Option<Box<dyn LiveBytes>>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
