//! Listening sockets and the accept loop.

use std::{
    io,
    net::SocketAddr,
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
    /// Binds with SO_REUSEADDR and a deep backlog, and without SO_REUSEPORT:
    /// the port is this socket's alone (a later bind by anyone fails "in
    /// use"). `addr` may have port 0; the returned listener knows the port it
    /// got.
    pub fn bind(addr: ListenAddr) -> Result<Self, BindError> {
        bound(addr.0, false).and_then(Self::listen).map_err(|source| BindError { addr, source })
    }

    /// [`Self::bind`], as the first socket of an SO_REUSEPORT group that
    /// others join ([`Self::join`]); the kernel never picks a port 0 some
    /// group listens on. A fixed port is first bound for a moment without
    /// SO_REUSEPORT, so a port another process listens on, another
    /// splice-proxy's group included, fails here as "in use" instead of
    /// being shared with it.
    pub fn bind_group(addr: ListenAddr) -> Result<Self, BindError> {
        let err = |source| BindError { addr, source };
        if addr.0.port() != 0 {
            drop(bound(addr.0, false).map_err(err)?);
        }
        bound(addr.0, true).and_then(Self::listen).map_err(err)
    }

    /// A new socket in this one's SO_REUSEPORT group, on the same address:
    /// the kernel spreads new connections over the group's sockets by their
    /// addresses, so a worker accepting on a socket of its own is woken only
    /// for the connections that socket gets.
    pub fn join(&self) -> io::Result<Self> {
        bound(self.addr.0, true).and_then(Self::listen)
    }

    fn listen(socket: TcpSocket) -> io::Result<Self> {
        let inner = socket.listen(BACKLOG)?;
        Ok(Self { addr: ListenAddr(inner.local_addr()?), inner })
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

/// A socket bound to `addr` with SO_REUSEADDR, and SO_REUSEPORT if
/// `reuseport` (not listening yet).
fn bound(addr: SocketAddr, reuseport: bool) -> io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }?;
    socket.set_reuseaddr(true)?;
    if reuseport {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    Ok(socket)
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// Takes what each of `group` has in its accept queue until `total`
    /// connections were accepted; how many each accepted.
    fn accept_all(group: Vec<Listener>, total: usize) -> Vec<usize> {
        let group: Vec<_> = group.into_iter().map(|l| l.into_inner().into_std().unwrap()).collect();
        let mut accepted = vec![0; group.len()];
        let deadline = Instant::now() + Duration::from_secs(10);
        while accepted.iter().sum::<usize>() < total {
            assert!(Instant::now() < deadline, "accepted {accepted:?} of {total}");
            for (socket, count) in group.iter().zip(&mut accepted) {
                while socket.accept().is_ok() {
                    *count += 1;
                }
            }
            std::thread::yield_now();
        }
        accepted
    }

    #[tokio::test]
    async fn a_group_spreads_connections_over_its_sockets_and_loses_none() {
        let first = Listener::bind_group(ListenAddr("127.0.0.1:0".parse().unwrap())).unwrap();
        let group = vec![first.join().unwrap(), first.join().unwrap()];
        assert!(group.iter().all(|s| s.addr == first.addr));
        let group: Vec<_> = std::iter::once(first).chain(group).collect();
        let addr = group[0].addr.0;
        let clients: Vec<_> = (0..120).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
        let accepted = accept_all(group, clients.len());
        assert_eq!(accepted.iter().sum::<usize>(), 120);
        assert!(accepted.iter().all(|&n| n > 0), "every socket of the group takes a share: {accepted:?}");
    }

    #[tokio::test]
    async fn a_fixed_port_another_group_listens_on_is_in_use() {
        let running = Listener::bind_group(ListenAddr("127.0.0.1:0".parse().unwrap())).unwrap();
        for bind in [Listener::bind, Listener::bind_group] {
            let error = bind(running.addr).unwrap_err();
            assert_eq!(error.source.kind(), io::ErrorKind::AddrInUse, "{error}");
        }
        assert!(running.join().is_ok(), "the group itself still takes sockets");
    }

    #[tokio::test]
    async fn a_single_listener_cannot_be_joined() {
        let alone = Listener::bind(ListenAddr("127.0.0.1:0".parse().unwrap())).unwrap();
        let error = alone.join().unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse, "{error}");
    }
}
