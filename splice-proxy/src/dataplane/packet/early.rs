//! A connection's first moments, relayed by the proxy by hand, before the
//! switch.
//!
//! The switch costs a connection some thirty system calls and a few map
//! writes whether or not it joins it, and most connections kubectl and the
//! controllers open are short: a TLS handshake, a request, an answer, a
//! close. So a connection is relayed here until it has lived
//! [`SwitchAfter::time`] or carried [`SwitchAfter::bytes`], whichever comes
//! first, and only then switched: a short connection ends here (its end is
//! handed to the next plane, which carries it as it carries every end) at
//! a few calls per message, and a long one (a watch, a log stream, a bulk
//! copy) is moved to the program, where its bytes cost the proxy nothing.
//!
//! Bytes are peeked, written to the other socket and only then consumed, so
//! none is held here when the relay stops; a reader's end or error is never
//! read here (only the bytes `SIOCINQ` counts are), so the next plane sees
//! it as it came.

use std::{
    io,
    os::fd::{AsFd, AsRawFd as _},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use nix::sys::socket::{MsgFlags, recv, send};
use tokio::{io::Interest, net::TcpStream, time::Instant};
use tokio_util::sync::CancellationToken;

use super::repair;
use crate::{
    dataplane::{
        both_ways,
        transfer::{ByteProgress, Ending, Side, Sockets},
    },
    tcpstat,
};

/// Most bytes moved per look at one direction.
const RELAY_BUFFER: usize = 64 << 10;

/// When a connection is worth the switch: once it has lived `time` or
/// carried `bytes` (both directions), whichever comes first; zero in either
/// switches it at once (`--packet-switch-after`,
/// `--packet-switch-after-bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchAfter {
    pub time: Duration,
    pub bytes: u64,
}

impl SwitchAfter {
    /// Whether a connection is switched as soon as it starts.
    #[must_use]
    pub fn at_once(self) -> bool {
        self.time.is_zero() || self.bytes == 0
    }
}

/// How the first moments ended.
#[derive(Debug)]
pub(super) enum Early {
    /// The connection lived or carried enough: switch it.
    WorthSwitching,
    /// A peer closed or reset it: the next plane carries the end.
    Ended,
    /// A write failed or the proxy stops: the connection is over, both
    /// sockets set to reset on close.
    Over(Ending),
}

/// What one look at one direction found.
enum Look {
    /// Everything readable was moved, or nothing was there.
    Drained,
    /// More is readable than one buffer took.
    More,
    /// The other socket takes nothing now.
    Full,
    /// The reader's end or error is next on the socket.
    End,
    /// A read or write failed on this side.
    Failed(Side, io::Error),
}

/// Relays `sockets` by hand until the connection is worth the switch by
/// `after`, it ends, or `stop`.
pub(super) async fn relay_until_worth_switching(
    sockets: &Sockets,
    progress: &ByteProgress,
    after: SwitchAfter,
    stop: &CancellationToken,
) -> Early {
    let deadline = Instant::now() + after.time;
    let relayed = || {
        progress.client_to_upstream.load(Ordering::Relaxed)
            + progress.upstream_to_client.load(Ordering::Relaxed)
    };
    let relayed_before = relayed();
    // Allocated at the first byte: a quiet connection holds none.
    let mut buffer = Vec::new();
    let (client, upstream) = (&sockets.client, &sockets.upstream);
    // Per direction (up, down): its writer took nothing at the last look.
    let mut full = [false; 2];
    loop {
        if relayed() - relayed_before >= after.bytes {
            return Early::WorthSwitching;
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => return over(sockets, Ending::Stopped),
            () = tokio::time::sleep_until(deadline) => return Early::WorthSwitching,
            _ = client.readable(), if !full[0] => {}
            _ = upstream.writable(), if full[0] => full[0] = false,
            _ = upstream.readable(), if !full[1] => {}
            _ = client.writable(), if full[1] => full[1] = false,
        }
        let directions = [
            (client, upstream, &progress.client_to_upstream, [Side::Downstream, Side::Upstream]),
            (upstream, client, &progress.upstream_to_client, [Side::Upstream, Side::Downstream]),
        ];
        for ((from, to, moved, sides), full) in directions.into_iter().zip(&mut full) {
            if *full {
                continue;
            }
            match look(from, to, moved, &mut buffer, sides) {
                Look::Drained | Look::More => {}
                Look::Full => *full = true,
                Look::End => return Early::Ended,
                Look::Failed(side, error) => {
                    let ending = if error.kind() == io::ErrorKind::ConnectionReset {
                        Ending::Reset(side)
                    } else {
                        Ending::Error(side)
                    };
                    tracing::debug!(%error, ?side, "relaying a connection before the switch");
                    return over(sockets, ending);
                }
            }
        }
    }
}

fn over(sockets: &Sockets, ending: Ending) -> Early {
    both_ways::finish(ending, &sockets.client, &sockets.upstream);
    Early::Over(ending)
}

/// Moves at most one buffer of what `from` holds to `to`. Everything runs
/// inside tokio's `try_io`, so that the readiness it clears (when all that
/// was readable moved, or `to` is full) is the readiness it had before the
/// first call: an event after that stays, and no wake-up is lost.
/// `sides`: the sides `from` and `to` are.
fn look(
    from: &TcpStream,
    to: &TcpStream,
    moved: &AtomicU64,
    buffer: &mut Vec<u8>,
    [reads, writes]: [Side; 2],
) -> Look {
    let mut found = Look::Drained;
    let result = from.try_io(Interest::READABLE, || {
        let unread = tcpstat::readable_bytes(from)?;
        if unread == 0 {
            // Nothing counted: an end or an error (left on the socket), or
            // a readiness that is stale.
            let established = repair::negotiated(from).map_err(io::Error::other)?.1;
            if established {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            found = Look::End;
            return Ok(());
        }
        let want = usize::try_from(unread).unwrap_or(usize::MAX).min(RELAY_BUFFER);
        if buffer.len() < want {
            buffer.resize(want, 0);
        }
        let peeked = recv(fd(from), &mut buffer[..want], MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT)?;
        let sent = to.try_io(Interest::WRITABLE, || {
            Ok(send(fd(to), &buffer[..peeked], MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL)?)
        });
        let written = match sent {
            Ok(written) => written,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                found = Look::Full;
                return Ok(());
            }
            Err(error) => {
                found = Look::Failed(writes, error);
                return Ok(());
            }
        };
        // Consume exactly what was written: it is there (peeked above).
        let consumed = recv(fd(from), &mut buffer[..written], MsgFlags::MSG_DONTWAIT)?;
        if consumed != written {
            return Err(io::Error::other(format!("consumed {consumed} of the {written} bytes written on")));
        }
        moved.fetch_add(written as u64, Ordering::Relaxed);
        if written as u64 == unread {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        found = Look::More;
        Ok(())
    });
    match result {
        Ok(()) => found,
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => found,
        Err(error) => Look::Failed(reads, error),
    }
}

fn fd(socket: &TcpStream) -> std::os::fd::RawFd {
    socket.as_fd().as_raw_fd()
}
