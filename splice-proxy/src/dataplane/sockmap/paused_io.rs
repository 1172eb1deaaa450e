//! Reads and writes of a direction user space is copying (paused by the
//! program, or a client that could not enter the map).
//!
//! A spliced connection's sockets are outside tokio's reactor
//! ([`super::hangups`]). A paused direction registers a duplicate of its
//! source for readability and one of its destination for writability, and
//! drops both once the program splices again, so only directions that have
//! bytes to copy are woken by data.
//!
//! Readiness is only a hint: every read and write goes to the socket
//! (MSG_DONTWAIT), and a wait clears the readiness it returned before the
//! next attempt. Bytes that arrive after an attempt wake the next wait, and
//! bytes that arrive between a wait and the next attempt are read by it, so
//! no wake-up can be lost to a cleared readiness (the hang docs/kernel-notes.md
//! records came from clearing readiness without reading).

use std::{
    io,
    os::fd::{AsFd, AsRawFd as _, OwnedFd},
};

use nix::sys::socket::{MsgFlags, recv, send};
use tokio::io::{Interest, unix::AsyncFd};

/// The registrations of one paused direction.
pub(super) struct PausedIo {
    source: AsyncFd<OwnedFd>,
    destination: AsyncFd<OwnedFd>,
}

impl PausedIo {
    /// Registers duplicates of `from` (readable) and `to` (writable) with tokio.
    pub(super) fn register<F: AsFd>(from: &F, to: &F) -> io::Result<Self> {
        let source = from.as_fd().try_clone_to_owned()?;
        let destination = to.as_fd().try_clone_to_owned()?;
        Ok(Self {
            source: register(source, Interest::READABLE)?,
            destination: register(destination, Interest::WRITABLE)?,
        })
    }

    /// Waits until the source may have become readable since the last read
    /// (also for its FIN or an error).
    pub(super) async fn source_readable(&self) -> io::Result<()> {
        self.source.readable().await?.clear_ready();
        Ok(())
    }

    /// Waits until the destination may have become writable since the last write.
    pub(super) async fn destination_writable(&self) -> io::Result<()> {
        self.destination.writable().await?.clear_ready();
        Ok(())
    }
}

/// Registers a duplicate descriptor with tokio for `interest`.
fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `OwnedFd` is a duplicate only this `AsyncFd` owns; it is
    // neither replaced nor closed while registered.
    #[allow(unsafe_code)]
    let registered = unsafe { AsyncFd::register_with_interest(fd, interest) };
    registered.map_err(io::Error::from)
}

/// One read from `socket` without waiting: WouldBlock when nothing is there.
pub(super) fn recv_now<F: AsFd>(socket: &F, buf: &mut [u8]) -> io::Result<usize> {
    recv(socket.as_fd().as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)
}

/// One write to `socket` without waiting: WouldBlock when its send buffer is full.
pub(super) fn send_now<F: AsFd>(socket: &F, buf: &[u8]) -> io::Result<usize> {
    send(socket.as_fd().as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL)
        .map_err(io::Error::from)
}
