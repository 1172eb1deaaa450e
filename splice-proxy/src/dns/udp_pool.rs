//! UDP sockets for DNS queries, kept between queries on each thread (for
//! hickory's queries and the direct path's).
//!
//! hickory sends every UDP query from a socket of its own: a socket bound
//! to a random port, registered with the event loop, and closed after the
//! answer, five system calls (and a socket's allocation and a port search
//! in the kernel) around the two that send and receive. A lookup for every
//! connection pays that once per record type. This provider hands hickory
//! a socket that answered an earlier query on the same thread instead, so
//! a query costs its send and its receive.
//!
//! What it keeps of hickory's defence against forged answers: each query
//! still has a random ID and hickory still checks the answer's source, ID
//! and question, skipping anything else (a late answer to an earlier query
//! included). Each socket is connected to the one server it asks, so the
//! kernel drops a datagram from any other address before it is queued (and
//! keeps the route to the server, which an unconnected send looks up each
//! time). A socket is kept only after the server it asked answered it,
//! what reaches it between two queries is dropped unread, and it is kept
//! for at most [`USES_AT_MOST`] queries and [`KEPT_AT_MOST`], so its random
//! source port changes as often as that. hickory's own I/O crate cannot do
//! this: its providers bind a new socket for each query by design.

use std::{
    cell::RefCell,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hickory_resolver::net::runtime::{
    DnsUdpSocket, RuntimeProvider, TokioHandle, TokioRuntimeProvider, TokioTime, iocompat::AsyncIoTokioAsStd,
};
use tokio::net::{TcpStream, UdpSocket};

/// Queries one socket sends before it is closed (and its port with it).
pub(super) const USES_AT_MOST: u32 = 64;

/// How long one socket is used at most, from its first query.
pub(super) const KEPT_AT_MOST: Duration = Duration::from_secs(10);

/// Datagrams (or errors) a kept socket is drained of at most when lent.
const STALE_READS_AT_MOST: usize = 64;

/// Idle sockets one thread keeps: as many as it had queries in flight at
/// once, up to this; any more are closed when their query ends.
const IDLE_AT_MOST: usize = 32;

thread_local! {
    /// This thread's idle query sockets. A socket is registered with the
    /// event loop of the runtime it was made on, the one this thread runs.
    static IDLE: RefCell<Vec<IdleSocket>> = const { RefCell::new(Vec::new()) };
}

/// A socket between queries.
#[derive(Debug)]
struct IdleSocket {
    socket: UdpSocket,
    /// The address it was bound to, as hickory asked (its port is the one the kernel gave).
    bound_ip: IpAddr,
    /// The server it is connected to: the only source it receives from.
    server: SocketAddr,
    uses: u32,
    since: Instant,
}

/// hickory's tokio provider, except that UDP query sockets come from (and
/// go back to) the thread's idle sockets.
#[derive(Clone, Default)]
pub struct PooledUdpProvider {
    tokio: TokioRuntimeProvider,
}

impl RuntimeProvider for PooledUdpProvider {
    type Handle = TokioHandle;
    type Timer = TokioTime;
    type Udp = QuerySocket;
    type Tcp = AsyncIoTokioAsStd<TcpStream>;

    fn create_handle(&self) -> Self::Handle {
        self.tokio.create_handle()
    }

    fn connect_tcp(
        &self,
        server_addr: SocketAddr,
        bind_addr: Option<SocketAddr>,
        timeout: Option<Duration>,
    ) -> Pin<Box<dyn Send + Future<Output = io::Result<Self::Tcp>>>> {
        self.tokio.connect_tcp(server_addr, bind_addr, timeout)
    }

    /// An idle socket bound to the same address as `local_addr` (any port)
    /// and connected to `server_addr`, else a new one (hickory picks a
    /// random port).
    fn bind_udp(
        &self,
        local_addr: SocketAddr,
        server_addr: SocketAddr,
    ) -> Pin<Box<dyn Send + Future<Output = io::Result<Self::Udp>>>> {
        Box::pin(lend(local_addr, server_addr))
    }
}

/// Closes this thread's idle sockets that have been kept for as long as
/// they may: a thread that stops looking names up must not hold them (and
/// their ports) for good. Called by each worker on its regular tick.
pub fn close_expired() {
    let _ = IDLE.try_with(|idle| close_expired_of(&mut idle.borrow_mut(), Instant::now()));
}

fn close_expired_of(idle: &mut Vec<IdleSocket>, now: Instant) {
    idle.retain(|s| s.since + KEPT_AT_MOST > now);
}

/// An idle socket of this thread bound to the same address as `local_addr`
/// (any port) and connected to `server`, else a new one bound to
/// `local_addr` and connected to `server`.
pub(super) fn lend(
    local_addr: SocketAddr,
    server: SocketAddr,
) -> impl Future<Output = io::Result<QuerySocket>> + Send {
    let now = Instant::now();
    let idle = IDLE.with_borrow_mut(|idle| {
        close_expired_of(idle, now);
        let found = idle.iter().rposition(|s| s.bound_ip == local_addr.ip() && s.server == server)?;
        Some(idle.swap_remove(found))
    });
    async move {
        let socket = match idle {
            Some(idle) => {
                // What came since its last answer (a late duplicate) is
                // dropped unread. An error read on the way (an ICMP error
                // the connected socket was told of) is cleared by the read
                // and passed over; the bound keeps a flooded socket from
                // holding the thread, and what is left fails the query's
                // checks of ID and question.
                let mut stale = [0; 512];
                for _ in 0..STALE_READS_AT_MOST {
                    match idle.socket.try_recv_from(&mut stale) {
                        Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                        _ => {}
                    }
                }
                idle
            }
            None => {
                let socket = UdpSocket::bind(local_addr).await?;
                socket.connect(server).await?;
                IdleSocket { socket, bound_ip: local_addr.ip(), server, uses: 0, since: now }
            }
        };
        Ok(QuerySocket { socket: Some(socket), asked: Mutex::new(None), answered: AtomicBool::new(false) })
    }
}

/// A socket lent to one query; dropped, it goes back to the thread's idle
/// sockets if an answer came and it may still be used.
#[derive(Debug)]
pub struct QuerySocket {
    socket: Option<IdleSocket>,
    /// Where the query was sent.
    asked: Mutex<Option<SocketAddr>>,
    /// A datagram came from there since the socket was lent (hickory reads
    /// until the answer to its query, so one came unless the query was
    /// abandoned).
    answered: AtomicBool,
}

impl QuerySocket {
    fn udp(&self) -> &UdpSocket {
        &self.socket.as_ref().expect("a query socket holds its socket until dropped").socket
    }
}

impl DnsUdpSocket for QuerySocket {
    type Time = TokioTime;

    fn poll_recv_from(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<(usize, SocketAddr)>> {
        let mut buf = tokio::io::ReadBuf::new(buf);
        let from = std::task::ready!(self.udp().poll_recv_from(cx, &mut buf))?;
        if *self.asked.lock().unwrap_or_else(PoisonError::into_inner) == Some(from) {
            self.answered.store(true, Ordering::Relaxed);
        }
        Poll::Ready(Ok((buf.filled().len(), from)))
    }

    fn poll_send_to(&self, cx: &mut Context<'_>, buf: &[u8], target: SocketAddr) -> Poll<io::Result<usize>> {
        // The socket is connected to the server it was lent for, and hears
        // only from it: a query to anyone else would never be answered.
        let server = self.socket.as_ref().map(|s| s.server);
        if server != Some(target) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a query socket connected to {server:?} cannot ask {target}"),
            )));
        }
        *self.asked.lock().unwrap_or_else(PoisonError::into_inner) = Some(target);
        self.udp().poll_send_to(cx, buf, target)
    }
}

impl Drop for QuerySocket {
    fn drop(&mut self) {
        let Some(mut socket) = self.socket.take() else { return };
        socket.uses += 1;
        let reusable =
            *self.answered.get_mut() && socket.uses < USES_AT_MOST && socket.since.elapsed() < KEPT_AT_MOST;
        if reusable {
            // `try_with`: a thread that is exiting has no idle list left.
            let _ = IDLE.try_with(|idle| {
                let mut idle = idle.borrow_mut();
                if idle.len() < IDLE_AT_MOST {
                    idle.push(socket);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use hickory_resolver::net::runtime::{DnsUdpSocket, RuntimeProvider};
    use tokio::net::UdpSocket;

    use super::{IDLE, PooledUdpProvider, USES_AT_MOST};

    const ANY_PORT: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

    /// Sends one query from a lent socket to `server`, which echoes it back
    /// when `answer`; returns the socket's local port.
    /// A test may run on a thread an earlier test ran on: its idle sockets
    /// belonged to that test's runtime.
    fn no_idle_sockets() -> PooledUdpProvider {
        IDLE.with_borrow_mut(Vec::clear);
        PooledUdpProvider::default()
    }

    async fn query(provider: &PooledUdpProvider, server: &UdpSocket, answer: bool) -> u16 {
        let socket = provider.bind_udp(ANY_PORT, server.local_addr().unwrap()).await.unwrap();
        socket.send_to(b"query", server.local_addr().unwrap()).await.unwrap();
        let mut buf = [0; 16];
        let (n, from) = server.recv_from(&mut buf).await.unwrap();
        if answer {
            server.send_to(&buf[..n], from).await.unwrap();
            socket.recv_from(&mut buf).await.unwrap();
        }
        from.port()
    }

    #[tokio::test]
    async fn an_answered_socket_is_lent_again_until_its_uses_run_out() {
        let server = UdpSocket::bind(ANY_PORT).await.unwrap();
        let provider = no_idle_sockets();
        let first = query(&provider, &server, true).await;
        for _ in 1..USES_AT_MOST {
            assert_eq!(query(&provider, &server, true).await, first, "the kept socket sends");
        }
        assert_eq!(IDLE.with_borrow(Vec::len), 0, "used up, it was closed");
        assert_ne!(query(&provider, &server, true).await, first, "a new socket, a new port");
    }

    #[tokio::test]
    async fn a_socket_whose_query_got_no_answer_is_closed() {
        let server = UdpSocket::bind(ANY_PORT).await.unwrap();
        let provider = no_idle_sockets();
        let unanswered = query(&provider, &server, false).await;
        assert_eq!(IDLE.with_borrow(Vec::len), 0);
        let next = query(&provider, &server, true).await;
        assert_ne!(next, unanswered);
        assert_eq!(query(&provider, &server, true).await, next);
    }

    #[tokio::test]
    async fn a_datagram_from_elsewhere_never_arrives_and_a_kept_socket_drops_what_came_since() {
        let server = UdpSocket::bind(ANY_PORT).await.unwrap();
        let stranger = UdpSocket::bind(ANY_PORT).await.unwrap();
        let provider = no_idle_sockets();
        let socket = provider.bind_udp(ANY_PORT, server.local_addr().unwrap()).await.unwrap();
        socket.send_to(b"query", server.local_addr().unwrap()).await.unwrap();
        server.recv_from(&mut [0; 16]).await.unwrap();
        let local = socket.udp().local_addr().unwrap();
        assert_eq!(
            socket.udp().peer_addr().unwrap(),
            server.local_addr().unwrap(),
            "connected to its server"
        );
        // Loopback delivers (or drops) each datagram within its send.
        stranger.send_to(b"forged", local).await.unwrap();
        server.send_to(b"answer", local).await.unwrap();
        let mut buf = [0; 16];
        let (n, from) = socket.recv_from(&mut buf).await.unwrap();
        assert_eq!(
            (&buf[..n], from),
            (&b"answer"[..], server.local_addr().unwrap()),
            "the stranger's never came"
        );
        drop(socket);
        assert_eq!(IDLE.with_borrow(Vec::len), 1, "answered by its server, it was kept");
        IDLE.with_borrow_mut(Vec::clear);

        let kept = query(&provider, &server, true).await;
        let kept_addr = SocketAddr::new(ANY_PORT.ip(), kept);
        stranger.send_to(b"planted", kept_addr).await.unwrap();
        server.send_to(b"late", kept_addr).await.unwrap();
        // Loopback delivers within the send: the stranger's datagram was
        // dropped (the socket hears only its server), the server's late one
        // waits in the socket, to be dropped unread when it is lent again.
        let socket = provider.bind_udp(ANY_PORT, server.local_addr().unwrap()).await.unwrap();
        assert_eq!(socket.udp().local_addr().unwrap().port(), kept, "the kept socket");
        socket.send_to(b"query", server.local_addr().unwrap()).await.unwrap();
        let (_, from) = server.recv_from(&mut [0; 16]).await.unwrap();
        server.send_to(b"answer", from).await.unwrap();
        let mut buf = [0; 16];
        let (n, _) = socket.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"answer", "what came between its queries was dropped");
    }

    #[tokio::test]
    async fn a_socket_is_lent_again_only_for_the_server_it_is_connected_to() {
        let (a, b) = (UdpSocket::bind(ANY_PORT).await.unwrap(), UdpSocket::bind(ANY_PORT).await.unwrap());
        let provider = no_idle_sockets();
        let asked_a = query(&provider, &a, true).await;
        let asked_b = query(&provider, &b, true).await;
        assert_ne!(asked_b, asked_a, "another server, another socket");
        assert_eq!(query(&provider, &a, true).await, asked_a);
        assert_eq!(query(&provider, &b, true).await, asked_b);
    }

    #[tokio::test]
    async fn a_socket_refuses_to_ask_another_server_than_its_own() {
        let (own, other) =
            (UdpSocket::bind(ANY_PORT).await.unwrap(), UdpSocket::bind(ANY_PORT).await.unwrap());
        let socket = no_idle_sockets().bind_udp(ANY_PORT, own.local_addr().unwrap()).await.unwrap();
        let error = socket.send_to(b"query", other.local_addr().unwrap()).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{error}");
    }

    #[tokio::test]
    async fn queries_in_flight_at_once_each_have_a_socket() {
        let server = UdpSocket::bind(ANY_PORT).await.unwrap();
        let provider = no_idle_sockets();
        let a = provider.bind_udp(ANY_PORT, server.local_addr().unwrap()).await.unwrap();
        let b = provider.bind_udp(ANY_PORT, server.local_addr().unwrap()).await.unwrap();
        assert_ne!(a.udp().local_addr().unwrap(), b.udp().local_addr().unwrap());
    }
}
