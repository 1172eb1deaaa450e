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
//! first, and only then switched: a short connection ends here at two
//! calls per message, and a long one (a watch, a log stream, a bulk
//! copy) is moved to the program, where its bytes cost the proxy nothing.
//!
//! Each direction reads into a small buffer and writes it on before it
//! reads again; the relay stops only with both buffers empty, so none is
//! held here when the switch or the next plane takes over. An end (EOF)
//! is carried across at once (with the last bytes when it comes right
//! behind them) and the other direction goes on; a connection that ends
//! both ways here is over here, its last end sent by the close of both
//! sockets. One still half-open when it is worth the switch goes to the
//! next plane, told which end it sent (the EOF stays to be read again). An
//! error read or written ends the connection here, both sides reset, as on
//! the copy plane.

use std::{
    io,
    pin::pin,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{net::TcpStream, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::dataplane::{
    both_ways::{self, Behind},
    transfer::{ByteProgress, Ending, EndsSent, Side, set_long_lived_options},
};
use crate::sockopt::TcpConfig;

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
    /// Both sides closed, each end carried across (the last by the close
    /// of both sockets, which follows at once): the connection is over.
    Completed,
    /// One side closed, its end carried across, and the connection lived
    /// or carried enough before the other did: the next plane carries the
    /// rest, but for the end already sent.
    HalfClosed(EndsSent),
    /// A read or a write failed, or the proxy stops: the connection is
    /// over, both sockets set to reset on close.
    Over(Ending),
}

/// Relays a connection's sockets by hand until the connection is worth the
/// switch by `after`, it ends, or `stop`; sets the upstream socket's `due`
/// options (taken: its `Sockets::upstream_options_due`) once it has lived
/// their [`TcpConfig::long_lived_after`].
pub(super) async fn relay_until_worth_switching(
    [client, upstream]: [&TcpStream; 2],
    due: &mut Option<Box<TcpConfig>>,
    progress: &ByteProgress,
    after: SwitchAfter,
    stop: &CancellationToken,
) -> Early {
    let started = Instant::now();
    let switch_at = started + after.time;
    let options_at = due.as_ref().map_or(switch_at, |tcp| started + tcp.long_lived_after());
    // One timer for the whole relay, not one armed and disarmed each turn:
    // first for the options, then for the switch.
    let mut deadline = pin!(tokio::time::sleep_until(options_at.min(switch_at)));
    let relayed = || {
        progress.client_to_upstream.load(Ordering::Relaxed)
            + progress.upstream_to_client.load(Ordering::Relaxed)
    };
    let relayed_before = relayed();
    let mut up =
        Direction::new(client, upstream, &progress.client_to_upstream, [Side::Downstream, Side::Upstream]);
    let mut down =
        Direction::new(upstream, client, &progress.upstream_to_client, [Side::Upstream, Side::Downstream]);
    // Once it is worth the switch, nothing more is read: what is pending is
    // written on, then the relay stops. A side that ends has its end
    // carried across at once, and the other goes on (a half-close).
    let mut worth = false;
    loop {
        worth |= relayed() - relayed_before >= after.bytes || up.reads + down.reads >= after.reads;
        if !up.pending() && !down.pending() {
            if up.ended && down.ended {
                return Early::Completed;
            }
            if worth && (up.ended || down.ended) {
                return Early::HalfClosed(EndsSent { to_upstream: up.end_sent, to_client: down.end_sent });
            }
            if worth {
                return Early::WorthSwitching;
            }
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => return over([client, upstream], Ending::Stopped),
            () = deadline.as_mut(), if !worth => {
                if let Some(tcp) = due.take() {
                    set_long_lived_options(upstream, &tcp);
                }
                if Instant::now() >= switch_at {
                    worth = true;
                } else {
                    deadline.as_mut().reset(switch_at);
                }
            }
            _ = upstream.writable(), if up.pending() => {}
            _ = client.writable(), if down.pending() => {}
            _ = client.readable(), if up.reading(worth) => {}
            _ = upstream.readable(), if down.reading(worth) => {}
        }
        for direction in [&mut up, &mut down] {
            let step = if direction.pending() {
                direction.flush()
            } else if direction.reading(worth) {
                direction.read()
            } else {
                Ok(())
            };
            if let Err(ending) = step {
                return over([client, upstream], ending);
            }
        }
        let ended = [up.ended, down.ended];
        for (direction, other_ended) in [(&mut up, ended[1]), (&mut down, ended[0])] {
            if let Err(ending) = direction.send_end(other_ended) {
                return over([client, upstream], ending);
            }
        }
    }
}

fn over([client, upstream]: [&TcpStream; 2], ending: Ending) -> Early {
    both_ways::finish(ending, client, upstream);
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
    /// Whether `from` has ended (EOF read; it stays for a next plane).
    ended: bool,
    /// Whether `to`'s write side was shut behind the last bytes.
    end_sent: bool,
}

impl<'a> Direction<'a> {
    fn new(from: &'a TcpStream, to: &'a TcpStream, moved: &'a AtomicU64, sides: [Side; 2]) -> Self {
        Self {
            from,
            to,
            moved,
            sides,
            buffer: Vec::new(),
            filled: 0,
            written: 0,
            reads: 0,
            ended: false,
            end_sent: false,
        }
    }

    fn pending(&self) -> bool {
        self.written < self.filled
    }

    /// Whether this direction reads (when its source is readable): not
    /// once it is worth the switch, nor after its end, nor with bytes
    /// still to write on.
    fn reading(&self, worth: bool) -> bool {
        !worth && !self.ended && !self.pending()
    }

    /// Carries the end across once everything before it is written: shuts
    /// `to`'s write side, unless the other direction has ended too, when
    /// the close of both sockets, which follows at once, sends it (one
    /// system call fewer).
    fn send_end(&mut self, other_ended: bool) -> Result<(), Ending> {
        if self.ended && !self.end_sent && !self.pending() && !other_ended {
            both_ways::shutdown_write(self.to).map_err(|error| failed(self.sides[1], &error))?;
            self.end_sent = true;
        }
        Ok(())
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

    /// Reads once (nothing pending), and writes it on; marks `from` ended
    /// at its EOF (left for a next plane to read again). Bytes the end
    /// comes right behind go out with it, `to` shut here
    /// ([`both_ways::send_last`]).
    fn read(&mut self) -> Result<(), Ending> {
        if self.buffer.is_empty() {
            self.buffer = vec![0; FIRST_BUFFER];
        } else if self.filled == self.buffer.len() && self.buffer.len() < RELAY_BUFFER {
            self.buffer.resize(self.buffer.len() * 2, 0);
        }
        match both_ways::try_read_all_there_is(self.from, &mut self.buffer) {
            Ok(0) => {
                self.ended = true;
                Ok(())
            }
            Ok(n) => {
                let mut filled = n;
                let behind = both_ways::end_follows(self.from, &mut self.buffer, &mut filled);
                (self.filled, self.written) = (filled, 0);
                self.reads += 1;
                if let Behind::Failure(error) = behind {
                    // The bytes first, as far as `to` takes them now; then
                    // the reset, which ends the connection.
                    self.flush()?;
                    return Err(failed(self.sides[0], &error));
                }
                if let Behind::End = behind {
                    let sent = both_ways::send_last(self.to, &self.buffer[..filled])
                        .map_err(|error| failed(self.sides[1], &error))?;
                    self.written = sent;
                    self.moved.fetch_add(sent as u64, Ordering::Relaxed);
                    self.ended = true;
                    self.end_sent = sent == filled;
                }
                self.flush()
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(error) => Err(failed(self.sides[0], &error)),
        }
    }
}

fn failed(side: Side, error: &io::Error) -> Ending {
    tracing::debug!(%error, ?side, "relaying a connection before the switch");
    Ending::of_error(side, error)
}
