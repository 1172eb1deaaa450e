//! Looking at a connection's first bytes without taking them.
//!
//! `TcpStream::peek` leaves the socket's readiness set, so peeking again in a
//! loop would spin on the same bytes. Here each peek runs inside `try_io`:
//! when the bytes are not enough yet the closure says `WouldBlock`, which
//! clears readiness, and only new bytes (or a FIN) wake the task again.
//! Callers bound every wait with a timeout.

use std::{io, os::fd::AsRawFd as _};

use nix::sys::socket::{MsgFlags, recv};
use tokio::{io::Interest, net::TcpStream};

/// How a peek ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Peeked<T> {
    /// `decide` made up its mind on the bytes there.
    Decided(T),
    /// The client closed (FIN) with only this many bytes sent, and `decide`
    /// wanted more.
    Closed { bytes: usize },
}

/// Peeks at up to `cap` bytes each time new bytes arrive and hands them to
/// `decide`, until it returns `Some`. `decide` must decide once it sees `cap`
/// bytes (both parsers bound their input below the caps used here).
pub async fn peek_until<T>(
    stream: &TcpStream,
    cap: usize,
    mut decide: impl FnMut(&[u8]) -> Option<T>,
) -> io::Result<Peeked<T>> {
    let mut buf = vec![0u8; cap];
    let fd = stream.as_raw_fd();
    loop {
        let closed = stream.ready(Interest::READABLE).await?.is_read_closed();
        let peeked = stream.try_io(Interest::READABLE, || {
            // The socket is non-blocking: no bytes yet is EAGAIN (WouldBlock).
            let n = recv(fd, &mut buf, MsgFlags::MSG_PEEK).map_err(io::Error::from)?;
            if let Some(decided) = decide(&buf[..n]) {
                return Ok(Peeked::Decided(decided));
            }
            if n == 0 || closed {
                return Ok(Peeked::Closed { bytes: n });
            }
            Err(io::ErrorKind::WouldBlock.into())
        });
        match peeked {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => return other,
        }
    }
}

/// The bytes that have already arrived, up to `cap`, without waiting.
pub fn peek_now(stream: &TcpStream, cap: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; cap];
    match recv(stream.as_raw_fd(), &mut buf, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
        Ok(n) => {
            buf.truncate(n);
            Ok(buf)
        }
        Err(nix::errno::Errno::EAGAIN) => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}
