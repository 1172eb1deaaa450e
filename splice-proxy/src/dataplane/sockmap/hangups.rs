//! FINs, resets and errors of spliced sockets, without their data wake-ups.
//!
//! A socket in the SOCKHASH wakes its epoll waiters with EPOLLIN for every
//! skb the verdict program redirects: tcp_bpf's data-ready hook calls the
//! socket's own after the verdict, though nothing is left to read. In
//! tokio's reactor that woke a worker thread per skb (thousands a second on
//! a paced stream; bench/README.md has the profile), and the wake-up cost
//! the sending thread too. So while a
//! connection is spliced its sockets stay out of tokio's reactor and sit in
//! this epoll, registered for EPOLLRDHUP only (EPOLLHUP and EPOLLERR always
//! come): the kernel matches each keyed data wake-up against that mask and
//! wakes nobody, while the FIN (an unkeyed state-change wake-up) and errors
//! come through. One task reads this epoll and wakes the direction whose
//! source socket it was, by cookie.
//!
//! Written here rather than taken from mio: mio registers readability as
//! EPOLLIN | EPOLLRDHUP together, and the point is to leave EPOLLIN out.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsFd, AsRawFd, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use nix::{
    errno::Errno,
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout},
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::Notify,
};

/// Events taken from the epoll per `epoll_wait`.
const EVENTS_PER_WAIT: usize = 64;

/// The epoll of the spliced sockets, readable (to tokio) when one of them hung up.
pub(super) struct Hangups {
    epoll: AsyncFd<HangupEpoll>,
    /// Events read (FINs, resets, errors), for the totals.
    pub(super) received: AtomicU64,
}

/// [`Epoll`] with the raw descriptor tokio's `AsyncFd` registers.
struct HangupEpoll(Epoll);

impl AsRawFd for HangupEpoll {
    fn as_raw_fd(&self) -> RawFd {
        self.0.0.as_raw_fd()
    }
}

impl Hangups {
    /// A new epoll, registered with tokio for readability.
    pub(super) fn new() -> io::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        Ok(Self {
            // SAFETY: the epoll's fd is owned by `HangupEpoll`, which `AsyncFd`
            // owns and never replaces; `as_raw_fd` always returns that fd.
            #[allow(unsafe_code)]
            epoll: unsafe { AsyncFd::register_with_interest(HangupEpoll(epoll), Interest::READABLE) }
                .map_err(io::Error::from)?,
            received: AtomicU64::new(0),
        })
    }

    /// Reports `socket`'s FIN, reset or error under `cookie` from now on,
    /// including one that already happened.
    pub(super) fn watch<F: AsFd>(&self, socket: &F, cookie: u64) -> io::Result<()> {
        let event = EpollEvent::new(EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET, cookie);
        self.epoll.get_ref().0.add(socket.as_fd(), event).map_err(io::Error::from)
    }

    /// Stops reporting `socket` (before it is closed).
    pub(super) fn unwatch<F: AsFd>(&self, socket: &F) {
        if let Err(error) = self.epoll.get_ref().0.delete(socket.as_fd()) {
            tracing::debug!(%error, "removing a socket from the hang-up epoll");
        }
    }

    /// Wakes the direction waiting on each hung-up socket, until the epoll fails.
    pub(super) async fn dispatch(self: Arc<Self>, waiters: Arc<Mutex<HashMap<u64, Arc<Notify>>>>) {
        let mut events = [EpollEvent::empty(); EVENTS_PER_WAIT];
        loop {
            let mut guard = match self.epoll.readable().await {
                Ok(guard) => guard,
                Err(error) => {
                    tracing::error!(%error, "waiting on the hang-up epoll; FINs of idle spliced connections go unseen");
                    return;
                }
            };
            // Clear first, then drain: a hang-up that lands while we drain wakes us again.
            guard.clear_ready();
            loop {
                let n = match self.epoll.get_ref().0.wait(&mut events, EpollTimeout::ZERO) {
                    Ok(n) => n,
                    Err(Errno::EINTR) => continue,
                    Err(error) => {
                        tracing::error!(%error, "reading the hang-up epoll; FINs of idle spliced connections go unseen");
                        return;
                    }
                };
                self.received.fetch_add(n as u64, Ordering::Relaxed);
                let waiters = waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                for event in &events[..n] {
                    if let Some(waiter) = waiters.get(&event.data()) {
                        waiter.notify_one();
                    }
                }
                if n < events.len() {
                    break;
                }
            }
        }
    }
}

/// Whether `socket` has anything for user space now: bytes the program
/// passed, its FIN, a reset or an error (one `poll` without waiting). The
/// re-check under the epoll's and the ring buffer's events.
pub(super) fn needs_reading<F: AsFd>(socket: &F) -> bool {
    let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
}
