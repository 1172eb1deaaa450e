//! A connection's first moments, relayed by the proxy by hand, before the
//! switch.
//!
//! The switch costs a connection about twenty system calls (four of them
//! map writes) even when it then leaves it to the next plane, and most
//! connections kubectl and the controllers open are short: a TLS
//! handshake, a request, an answer, a close. So a connection is relayed here until it has lived
//! [`SwitchAfter::time`], carried [`SwitchAfter::bytes`] or made
//! [`SwitchAfter::reads`] reads with data (a chatty connection: its
//! messages cost two calls each here, nothing once joined), whichever comes
//! first, and only then switched: a short connection ends here (its end is
//! handed to the next plane, which carries it as it carries every end) at
//! two calls per message, and a long one (a watch, a log stream, a bulk
//! copy) is moved to the program, where its bytes cost the proxy nothing.
//!
//! Each direction reads into a small buffer and writes it on before it
//! reads again; the relay stops only with both buffers empty, so none is
//! held here when the switch or the next plane takes over. An end (EOF)
//! read is read again by the next plane (it stays); an error read or
//! written ends the connection here, both sides reset, as on the copy
//! plane.

use std::{
    io,
    pin::pin,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{net::TcpStream, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::dataplane::{
    both_ways,
    transfer::{ByteProgress, Ending, EndsSent, Side, Sockets},
};

/// Each direction's buffer: this much at its first read (a socket reported
/// readable with nothing to read costs little), doubled each time a read
/// fills it up to [`RELAY_BUFFER`]; small, since many short connections may
/// be here at once.
const FIRST_BUFFER: usize = 2 << 10;
const RELAY_BUFFER: usize = 16 << 10;

/// When a connection is worth the switch: once it has lived `time`,
/// carried `bytes` (both directions) or made `reads` reads that returned
/// data (both directions), whichever comes first; zero in any switches it
/// at once (`--packet-switch-after`, `--packet-switch-after-bytes`,
/// `--packet-switch-after-reads`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchAfter {
    pub time: Duration,
    pub bytes: u64,
    pub reads: u64,
}

impl SwitchAfter {
    /// Whether a connection is switched as soon as it starts.
    #[must_use]
    pub fn at_once(self) -> bool {
        self.time.is_zero() || self.bytes == 0 || self.reads == 0
    }
}

/// How the first moments ended.
#[derive(Debug)]
pub(super) enum Early {
    /// The connection lived or carried enough: switch it.
    WorthSwitching,
    /// A peer closed or reset it: the next plane carries the end, but for
    /// the ends already sent with a direction's last bytes.
    Ended(EndsSent),
    /// A read or a write failed, or the proxy stops: the connection is
    /// over, both sockets set to reset on close.
    Over(Ending),
}

/// Relays `sockets` by hand until the connection is worth the switch by
/// `after`, it ends, or `stop`.
pub(super) async fn relay_until_worth_switching(
    sockets: &Sockets,
    progress: &ByteProgress,
    after: SwitchAfter,
    stop: &CancellationToken,
) -> Early {
    // One timer for the whole relay, not one armed and disarmed each turn.
    let mut deadline = pin!(tokio::time::sleep_until(Instant::now() + after.time));
    let relayed = || {
        progress.client_to_upstream.load(Ordering::Relaxed)
            + progress.upstream_to_client.load(Ordering::Relaxed)
    };
    let relayed_before = relayed();
    let (client, upstream) = (&sockets.client, &sockets.upstream);
    let mut up =
        Direction::new(client, upstream, &progress.client_to_upstream, [Side::Downstream, Side::Upstream]);
    let mut down =
        Direction::new(upstream, client, &progress.upstream_to_client, [Side::Upstream, Side::Downstream]);
    // Once it is due (worth the switch, or a side ended), nothing more is
    // read: what is pending is written on, then the relay stops.
    let (mut worth, mut ended) = (false, false);
    loop {
        worth |= relayed() - relayed_before >= after.bytes || up.reads + down.reads >= after.reads;
        if (worth || ended) && !up.pending() && !down.pending() {
            return if ended {
                Early::Ended(EndsSent { to_upstream: up.end_sent, to_client: down.end_sent })
            } else {
                Early::WorthSwitching
            };
        }
        let reading = !(worth || ended);
        tokio::select! {
            biased;
            () = stop.cancelled() => return over(sockets, Ending::Stopped),
            () = deadline.as_mut(), if !worth => worth = true,
            _ = upstream.writable(), if up.pending() => {}
            _ = client.writable(), if down.pending() => {}
            _ = client.readable(), if reading && !up.pending() => {}
            _ = upstream.readable(), if reading && !down.pending() => {}
        }
        for direction in [&mut up, &mut down] {
            let step = if direction.pending() {
                direction.flush().map(|()| false)
            } else if !(worth || ended) {
                direction.read()
            } else {
                Ok(false)
            };
            match step {
                Ok(eof) => ended |= eof,
                Err(ending) => return over(sockets, ending),
            }
        }
    }
}

fn over(sockets: &Sockets, ending: Ending) -> Early {
    both_ways::finish(ending, &sockets.client, &sockets.upstream);
    Early::Over(ending)
}

/// One direction: what it read and has not written on yet.
struct Direction<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    moved: &'a AtomicU64,
    /// The sides `from` and `to` are.
    sides: [Side; 2],
    buffer: Vec<u8>,
    filled: usize,
    written: usize,
    /// Reads that returned data.
    reads: u64,
    /// Whether `to`'s write side was shut behind the last bytes.
    end_sent: bool,
}

impl<'a> Direction<'a> {
    fn new(from: &'a TcpStream, to: &'a TcpStream, moved: &'a AtomicU64, sides: [Side; 2]) -> Self {
        Self { from, to, moved, sides, buffer: Vec::new(), filled: 0, written: 0, reads: 0, end_sent: false }
    }

    fn pending(&self) -> bool {
        self.written < self.filled
    }

    /// Writes what is pending, as far as `to` takes it now.
    fn flush(&mut self) -> Result<(), Ending> {
        while self.pending() {
            match self.to.try_write(&self.buffer[self.written..self.filled]) {
                Ok(n) => {
                    self.written += n;
                    self.moved.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) => return Err(failed(self.sides[1], &error)),
            }
        }
        Ok(())
    }

    /// Reads once (nothing pending), and writes it on: whether `from` has
    /// ended (EOF, left for the next plane to read again). Bytes the end
    /// comes right behind go out with it, `to` shut here
    /// ([`both_ways::send_last`]).
    fn read(&mut self) -> Result<bool, Ending> {
        if self.buffer.is_empty() {
            self.buffer = vec![0; FIRST_BUFFER];
        } else if self.filled == self.buffer.len() && self.buffer.len() < RELAY_BUFFER {
            self.buffer.resize(self.buffer.len() * 2, 0);
        }
        match both_ways::try_read_all_there_is(self.from, &mut self.buffer) {
            Ok(0) => Ok(true),
            Ok(n) => {
                let mut filled = n;
                let last = both_ways::end_follows(self.from, &mut self.buffer, &mut filled)
                    .map_err(|error| failed(self.sides[0], &error))?;
                (self.filled, self.written) = (filled, 0);
                self.reads += 1;
                if last {
                    let sent = both_ways::send_last(self.to, &self.buffer[..filled])
                        .map_err(|error| failed(self.sides[1], &error))?;
                    self.written = sent;
                    self.moved.fetch_add(sent as u64, Ordering::Relaxed);
                    self.end_sent = sent == filled;
                }
                self.flush().map(|()| last)
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(error) => Err(failed(self.sides[0], &error)),
        }
    }
}

fn failed(side: Side, error: &io::Error) -> Ending {
    tracing::debug!(%error, ?side, "relaying a connection before the switch");
    Ending::of_error(side, error)
}
