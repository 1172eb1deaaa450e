//! One direction of a kernel-spliced connection: waiting for its FIN, reset
//! or pause; copying what a paused direction passes, in order; closing it
//! once every byte is accounted for.

use std::{
    io,
    net::TcpStream,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use proxy_common::{Flow, pause};

use super::{
    DirectionState, SockmapPlane, hangups,
    paused_io::{PausedIo, recv_now, send_now},
};
use crate::{
    dataplane::both_ways::{PumpError, shutdown_write},
    tcpstat,
};

/// How long a peer may take none of the redirected bytes before the
/// connection is cut (a reader that never drains).
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// First wait of a direction, after a wake-up, before it looks for itself:
/// spliced, at its pause flag and for a FIN; paused, for bytes to read.
/// Safety nets under the pause events, the hang-up epoll and the readiness
/// of a paused source: none is known to fail, and a missed one would leave
/// the direction waiting for bytes that cannot come (a paused socket's
/// window closes).
const RECHECK_FIRST: Duration = Duration::from_millis(50);
/// Longest such wait: it doubles while nothing happens. A paused direction
/// goes on looking every [`RECHECK_LAST`]; a spliced one stops once the wait
/// reaches it, so an idle spliced connection costs no wake-ups at all (a
/// pause event the ring buffer had no room for is caught plane-wide, see
/// `events::watch_lost_events`).
const RECHECK_LAST: Duration = Duration::from_secs(5);
/// Bytes a paused direction may hold in user space, read but not yet
/// written (see [`SockmapPlane::copy_passed`]).
const PENDING_LIMIT: usize = 1 << 20;
/// First size of that buffer.
const PENDING_START: usize = 64 << 10;
/// Largest single read from a paused source. tcp_bpf holds the socket lock
/// while it copies, and packets that arrive meanwhile wait in the socket
/// backlog, which drops them once full: shorter reads drop fewer, and a lossy
/// link recovers faster (docs/kernel-notes.md, *Facts re-checked*).
const READ_CHUNK: usize = 128 << 10;
/// Poll interval while waiting for a peer to take redirected bytes (only at
/// close and after a pause).
const DRAIN_POLL: Duration = Duration::from_millis(1);

/// What [`SockmapPlane::copy_passed`] stopped at.
enum Passed {
    /// Nothing more to read for now.
    Drained,
    /// The source's EOF.
    Eof,
}

/// Bytes read from a paused source and not yet written: one buffer, filled
/// at `end` and written from `start`. It starts at [`PENDING_START`] bytes and
/// doubles when full up to [`PENDING_LIMIT`], so the many connections that
/// pause for a few bytes do not each take (and leave the allocator holding)
/// a whole megabyte.
#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn has_room(&self) -> bool {
        self.end < self.buf.len() || self.buf.len() < PENDING_LIMIT
    }

    /// Where the next read goes: at most [`READ_CHUNK`] bytes.
    fn room(&mut self) -> &mut [u8] {
        if self.end == self.buf.len() {
            let grown = (self.buf.len() * 2).clamp(PENDING_START, PENDING_LIMIT);
            self.buf.resize(grown, 0);
        }
        let end = self.buf.len().min(self.end + READ_CHUNK);
        &mut self.buf[self.end..end]
    }

    fn filled(&mut self, n: usize) {
        self.end += n;
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn written(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
    }
}

impl SockmapPlane {
    /// One direction. While the program splices it, user space only waits
    /// for the source's FIN, reset or a pause. While it is paused, user space
    /// copies what the program passed, after making sure the peer has taken
    /// every byte redirected before them, and tells the program how far it
    /// got; the program resumes splicing by itself once that is everything.
    /// `in_map`: the source socket is in the socket map (false only for a
    /// client that could not be inserted: then everything is copied).
    pub(super) async fn direction(
        &self,
        from: &TcpStream,
        to: &TcpStream,
        state: &DirectionState,
        in_map: bool,
        copied: &AtomicU64,
    ) -> Result<(), PumpError> {
        let mut pending = Pending::default();
        let mut copying = !in_map;
        // The registrations with tokio while user space copies.
        let mut paused_io: Option<PausedIo> = None;
        let mut recheck = RECHECK_FIRST;
        loop {
            if copying {
                let io = match paused_io.take() {
                    Some(io) => io,
                    None => PausedIo::register(from, to).map_err(PumpError::Read)?,
                };
                let before = copied.load(Ordering::Relaxed);
                match Box::pin(self.copy_passed(from, to, &io, state, &mut pending, copied)).await? {
                    Passed::Eof => {
                        return Box::pin(self.close_direction(from, to, &io, state, &mut pending, copied))
                            .await;
                    }
                    // Nothing to read now: splicing again if the program resumed.
                    Passed::Drained => {
                        copying = !in_map || self.flow(state.cookie).paused != 0;
                        if copied.load(Ordering::Relaxed) > before || !copying {
                            recheck = RECHECK_FIRST;
                        }
                        // Spliced again: out of tokio's reactor.
                        paused_io = copying.then_some(io);
                    }
                }
            }
            tokio::select! {
                // A pause, or the source's FIN, reset or error: read to find out.
                () = state.wake.notified() => {
                    copying = true;
                    recheck = RECHECK_FIRST;
                }
                ready = source_readable(paused_io.as_ref()), if copying => {
                    ready.map_err(PumpError::Read)?;
                }
                () = tokio::time::sleep(recheck), if copying || recheck < RECHECK_LAST => {
                    recheck = (recheck * 2).min(RECHECK_LAST);
                    if copying {
                        if tcpstat::readable_bytes(from).is_ok_and(|n| n > 0) {
                            self.counters.reads_found_by_recheck.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(cookie = state.cookie, "passed bytes found by the re-check, not by a wake-up");
                        }
                    } else if self.flow(state.cookie).paused != 0 || hangups::needs_reading(from) {
                        self.counters.pauses_found_by_recheck.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(cookie = state.cookie, "pause, FIN or passed bytes found by the re-check before an event");
                        copying = true;
                    }
                }
            }
        }
    }

    /// The flow from `cookie` as the program left it (default when gone).
    fn flow(&self, cookie: u64) -> Flow {
        self.kernel().flow(cookie).ok().flatten().unwrap_or_default()
    }

    /// Reads and forwards what the program passed to `from`'s own queue
    /// until nothing is left to read (or the EOF) and everything read is
    /// written. Reading goes on while a write waits (up to
    /// [`PENDING_LIMIT`] bytes): a paused socket whose reader stalls behind
    /// its write closes its receive window, and this kernel then refuses the
    /// peer's acknowledgements that carry a sequence beyond that window, so
    /// the other direction's writes through it stall too; with both
    /// directions paused that was a deadlock (docs/kernel-notes.md, *Facts re-checked*).
    async fn copy_passed(
        &self,
        from: &TcpStream,
        to: &TcpStream,
        io: &PausedIo,
        state: &DirectionState,
        pending: &mut Pending,
        copied: &AtomicU64,
    ) -> Result<Passed, PumpError> {
        let (mut eof, mut drained, mut ordered) = (false, false, false);
        // Bytes were read since the flow was last looked at.
        let mut unchecked = false;
        let mut taken_last = None;
        let mut progressed = Instant::now();
        loop {
            if !eof && !drained && pending.has_room() {
                match recv_now(from, pending.room()) {
                    Ok(0) => eof = true,
                    Ok(n) => {
                        pending.filled(n);
                        unchecked = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => drained = true,
                    Err(e) => return Err(PumpError::Read(e)),
                }
                continue;
            }
            if pending.is_empty() {
                return Ok(if eof { Passed::Eof } else { Passed::Drained });
            }
            if unchecked || !ordered {
                // Looked at after the reads, so the program had marked the
                // flow before it passed any of the bytes read.
                let flow = self.flow_without_repeats(state.cookie)?;
                unchecked = false;
                if !ordered {
                    // The program redirects nothing while passed bytes are
                    // unwritten, so this count covers every byte that must
                    // reach the peer's send queue before these.
                    let redirected = flow.redirected_bytes;
                    let taken =
                        tcpstat::sent_total(to).map_err(PumpError::Write)?.saturating_sub(state.peer_base);
                    ordered = taken >= redirected + copied.load(Ordering::Relaxed);
                    if !ordered {
                        self.check_taking(to, taken, redirected, &mut taken_last, &mut progressed)?;
                    }
                }
            }
            let wrote = if ordered {
                match send_now(to, pending.data()) {
                    Ok(k) => k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(e) => return Err(PumpError::Write(e)),
                }
            } else {
                0
            };
            if wrote > 0 {
                pending.written(wrote);
                let total = copied.fetch_add(wrote as u64, Ordering::Relaxed) + wrote as u64;
                if pending.is_empty() {
                    // Only now can the count equal what the program passed,
                    // which lets it resume; and once it has resumed,
                    // redirected and paused again, bytes read after that
                    // wait for the new redirected ones to be taken.
                    ordered = false;
                    if let Err(error) = self.kernel().set_user_bytes(state.cookie, total) {
                        // Safe: the program only stays paused.
                        tracing::debug!(%error, "publishing the user byte count");
                    }
                }
                continue;
            }
            let can_read = !eof && pending.has_room();
            tokio::select! {
                ready = io.source_readable(), if can_read => {
                    ready.map_err(PumpError::Read)?;
                    drained = false;
                }
                ready = io.destination_writable(), if ordered => {
                    ready.map_err(PumpError::Write)?;
                }
                () = tokio::time::sleep(DRAIN_POLL), if !ordered => {}
            }
        }
    }

    /// The flow from `cookie` (default when gone: a client that never
    /// entered the map has none), or an error when the bytes read may repeat
    /// ones already forwarded: the program paused it because an skb's head
    /// did so and could not be cut off ([`pause::NO_SEQ`]), or the map could
    /// not be read to know. Then none of them is written and the connection
    /// is reset (a reset is seen; a repeat is not).
    fn flow_without_repeats(&self, cookie: u64) -> Result<Flow, PumpError> {
        let flow = match self.kernel().flow(cookie) {
            Ok(flow) => flow.unwrap_or_default(),
            Err(error) => return Err(PumpError::Read(io::Error::other(error))),
        };
        if flow.pause_reason != pause::NO_SEQ {
            return Ok(flow);
        }
        self.counters.overlap_resets.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            "sockmap: a retransmitted skb repeated bytes already forwarded and its head could not be cut \
             off; connection reset rather than forward them twice"
        );
        Err(PumpError::Read(io::Error::new(
            io::ErrorKind::InvalidData,
            "a retransmitted skb's head repeated forwarded bytes and could not be cut off",
        )))
    }

    /// While passed bytes wait for the peer to take earlier redirected ones:
    /// notes progress, and gives up after [`STALL_TIMEOUT`] without any.
    fn check_taking(
        &self,
        to: &TcpStream,
        taken: u64,
        redirected: u64,
        last: &mut Option<u64>,
        progressed: &mut Instant,
    ) -> Result<(), PumpError> {
        if let Some(error) = tcpstat::take_error(to) {
            return Err(PumpError::Write(error));
        }
        if *last != Some(taken) {
            *last = Some(taken);
            *progressed = Instant::now();
        } else if progressed.elapsed() > STALL_TIMEOUT {
            self.counters.stalls.fetch_add(1, Ordering::Relaxed);
            return Err(PumpError::Write(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "peer took none of {} waiting bytes for {STALL_TIMEOUT:?}",
                    redirected.saturating_sub(taken)
                ),
            )));
        }
        Ok(())
    }

    /// The source's EOF: once every byte it received was redirected or
    /// copied and the peer has taken them all, shut the peer's write side.
    /// tcp_bpf's recvmsg reports EOF once the FIN is in and the psock's
    /// message queue is empty, even while passed skbs still wait on the
    /// psock's backlog queue (when the receive buffer was full); so EOF counts
    /// only once every byte the socket received (`tcpi_bytes_received`, minus
    /// one for the FIN and the bytes read before set-up) is accounted for.
    async fn close_direction(
        &self,
        from: &TcpStream,
        to: &TcpStream,
        io: &PausedIo,
        state: &DirectionState,
        pending: &mut Pending,
        copied: &AtomicU64,
    ) -> Result<(), PumpError> {
        if let Some(error) = tcpstat::take_error(from) {
            return Err(PumpError::Read(error));
        }
        let mut progressed = Instant::now();
        loop {
            let redirected = self.flow(state.cookie).redirected_bytes;
            let received = tcpstat::received_total(from)
                .map_err(PumpError::Read)?
                .saturating_sub(1)
                .saturating_sub(state.source_read);
            let done = copied.load(Ordering::Relaxed);
            if redirected + done >= received {
                self.wait_taken(to, state.peer_base, redirected + done).await?;
                return shutdown_write(to).map_err(PumpError::Write);
            }
            if progressed.elapsed() > STALL_TIMEOUT {
                self.counters.stalls.fetch_add(1, Ordering::Relaxed);
                return Err(PumpError::Read(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "bytes received before the FIN never became readable",
                )));
            }
            tokio::time::sleep(DRAIN_POLL).await;
            self.copy_passed(from, to, io, state, pending, copied).await?;
            if copied.load(Ordering::Relaxed) > done {
                progressed = Instant::now();
            }
        }
    }

    /// Waits until `to` has taken `redirected` bytes into its send queue.
    async fn wait_taken(&self, to: &TcpStream, base: u64, redirected: u64) -> Result<(), PumpError> {
        let mut last = None;
        let mut progressed = Instant::now();
        loop {
            let taken = tcpstat::sent_total(to).map_err(PumpError::Write)?.saturating_sub(base);
            if taken >= redirected {
                return Ok(());
            }
            self.check_taking(to, taken, redirected, &mut last, &mut progressed)?;
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }
}

/// [`PausedIo::source_readable`] while copying; never ready otherwise.
async fn source_readable(io: Option<&PausedIo>) -> io::Result<()> {
    match io {
        Some(io) => io.source_readable().await,
        None => std::future::pending().await,
    }
}
