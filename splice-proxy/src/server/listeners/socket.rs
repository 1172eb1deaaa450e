//! Listening sockets and the accept loop.

use std::{
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_util::sync::CancellationToken;

use crate::addr::{ClientAddr, ListenAddr};

/// Pending connections the kernel may hold per listener.
const BACKLOG: u32 = 4096;
/// Pause after the process or system ran out of file descriptors or memory.
const RESOURCE_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    pub addr: ListenAddr,
    pub source: io::Error,
}

/// A bound listener.
#[derive(Debug)]
pub struct Listener {
    pub addr: ListenAddr,
    inner: TcpListener,
}

impl Listener {
    /// Binds with SO_REUSEADDR and a deep backlog. `addr` may have port 0; the
    /// returned listener knows the port it got.
    pub fn bind(addr: ListenAddr) -> Result<Self, BindError> {
        let err = |source| BindError { addr, source };
        let socket = if addr.0.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(err)?;
        socket.set_reuseaddr(true).map_err(err)?;
        socket.bind(addr.0).map_err(err)?;
        let inner = socket.listen(BACKLOG).map_err(err)?;
        let bound = ListenAddr(inner.local_addr().map_err(err)?);
        Ok(Self { addr: bound, inner })
    }

    /// A listening socket another process handed over (a graceful upgrade).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let std = std::net::TcpListener::from(fd);
        std.set_nonblocking(true)?;
        let inner = TcpListener::from_std(std)?;
        let addr = ListenAddr(inner.local_addr()?);
        Ok(Self { addr, inner })
    }

    /// Another descriptor of this listening socket, registered with the
    /// event loop of `worker`, for that worker's accept loop.
    pub fn on_worker(&self, worker: &tokio::runtime::Handle) -> io::Result<Self> {
        let std = std::net::TcpListener::from(self.inner.as_fd().try_clone_to_owned()?);
        let _registers_with_worker = worker.enter();
        Ok(Self { addr: self.addr, inner: TcpListener::from_std(std)? })
    }

    /// The tokio listener, for a caller with an accept loop of its own.
    #[must_use]
    pub fn into_inner(self) -> TcpListener {
        self.inner
    }

    /// Accepts until `stop` is cancelled, handing each connection to `serve`
    /// with a permit from `slots`: when none is free, accepting waits (new
    /// connections wait in the listen backlog) and says so once. Running out
    /// of descriptors or memory pauses accepting briefly instead of spinning;
    /// a connection aborted before accept is ignored.
    pub async fn accept_loop<F>(self, stop: CancellationToken, slots: Arc<Semaphore>, mut serve: F)
    where
        F: FnMut(TcpStream, ClientAddr, ListenAddr, OwnedSemaphorePermit),
    {
        loop {
            let permit = match Arc::clone(&slots).try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    tracing::warn!(listen = %self.addr, "connection limit reached: new connections wait");
                    tokio::select! {
                        () = stop.cancelled() => break,
                        permit = Arc::clone(&slots).acquire_owned() => match permit {
                            Ok(permit) => permit,
                            Err(_) => break,
                        },
                    }
                }
            };
            let accepted = tokio::select! {
                () = stop.cancelled() => break,
                accepted = self.inner.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => serve(stream, ClientAddr(peer), self.addr, permit),
                Err(e) if is_resource_exhaustion(&e) => {
                    tracing::warn!(listen = %self.addr, error = %e, "accept: out of resources, pausing");
                    tokio::time::sleep(RESOURCE_BACKOFF).await;
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    tracing::warn!(listen = %self.addr, error = %e, "accept failed");
                    tokio::time::sleep(RESOURCE_BACKOFF).await;
                }
            }
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}
