//! The sockmap plane: both sockets of a connection go into the SOCKHASH whose
//! verdict program redirects every skb to the peer's egress. User space keeps
//! the control:
//!
//! - set-up: a flow entry per direction, then the upstream socket (the target
//!   of the client's first bytes) before the client socket, then SO_RCVLOWAT
//!   on both so bytes queued before insertion (the ClientHello) are read;
//! - close: on FIN from one side, wait until the peer socket has taken every
//!   redirected byte into its send queue, then `shutdown(SHUT_WR)` it; a reset
//!   becomes a reset on both (SO_LINGER 0);
//! - flow control: the program pauses a direction whose peer does not drain
//!   (SK_PASS: the bytes stay on the source socket, charged to its receive
//!   buffer, so TCP slows the sender) and tells us through a ring buffer; we
//!   cap that socket's receive buffer, wait for the redirected bytes to be
//!   taken, and finish the direction with plain reads and writes, never
//!   switching back (DESIGN.md: switching back is not safe).
//!
//! Sockets leave the maps only when they are closed.

use std::{
    collections::HashMap,
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use proxy_common::{Flow, FlowEvent, pause};
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpStream,
    sync::Notify,
};
use tokio_util::sync::CancellationToken;

use super::{CloseReason, PumpError, Transfer, UserPump, drive, finish, shutdown_write};
use crate::{
    kernel::{KernelError, KernelPrograms, socket_cookie},
    sockopt as tcp_options, tcpstat,
};

/// How long a peer may take none of the redirected bytes before the
/// connection is cut (a reader that never drains).
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Smallest socket buffers of a spliced connection (the kernel doubles them):
/// smaller ones make a lossy link crawl once paused (a 64 KiB receive buffer
/// took 90 s for 64 MiB at 1 % loss).
const BUFFER_FLOOR: u64 = 1 << 20;
/// Largest socket buffers of a spliced connection, whatever `--max-inflight`
/// says: the memory a connection may pin stays bounded.
const BUFFER_CEILING: u64 = 16 << 20;
/// While bytes flow through a spliced direction, how often its pause flag is
/// read from the map as well (a safety net under the ring buffer events).
const PAUSE_RECHECK: Duration = Duration::from_millis(50);
/// Bytes a paused direction may hold in user space, read but not yet
/// written (see [`SockmapPlane::copy_passed`]).
const PENDING_LIMIT: usize = 1 << 20;
/// Poll interval while waiting for a peer to take redirected bytes (only at
/// close and after a pause).
const DRAIN_POLL: Duration = Duration::from_millis(1);

/// Counts of what the plane did, for logs and metrics.
#[derive(Debug, Default)]
pub struct SockmapCounters {
    /// Connections spliced in the kernel (both sockets inserted).
    pub spliced: AtomicU64,
    /// Connections that fell back entirely (the upstream socket could not be inserted).
    pub fallbacks: AtomicU64,
    /// Connections whose client could not be inserted (already closed).
    pub client_not_inserted: AtomicU64,
    /// Times the program paused a direction (user space copied meanwhile).
    pub pauses: AtomicU64,
    /// Times the program resumed splicing a paused direction.
    pub resumes: AtomicU64,
    /// Connections cut because a peer took no redirected bytes for [`STALL_TIMEOUT`].
    pub stalls: AtomicU64,
}

/// The kernel side shared by every connection on this plane.
pub struct SockmapPlane {
    kernel: Mutex<KernelPrograms>,
    /// Who waits for a pause of the flow keyed by source cookie.
    pause_waiters: Arc<Mutex<HashMap<u64, Arc<Notify>>>>,
    max_inflight: u64,
    buffer_size: usize,
    fallback_pipe_size: usize,
    pub counters: SockmapCounters,
}

impl std::fmt::Debug for SockmapPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SockmapPlane").field("max_inflight", &self.max_inflight).finish_non_exhaustive()
    }
}

impl SockmapPlane {
    /// Takes the loaded programs and starts the pause event reader.
    pub fn start(
        mut kernel: KernelPrograms,
        max_inflight: u64,
        buffer_size: usize,
        fallback_pipe_size: usize,
    ) -> Result<Arc<Self>, KernelError> {
        let events = kernel.take_events()?;
        let pause_waiters = Arc::new(Mutex::new(HashMap::new()));
        tokio::spawn(dispatch_pauses(events, Arc::clone(&pause_waiters)));
        Ok(Arc::new(Self {
            kernel: Mutex::new(kernel),
            pause_waiters,
            max_inflight,
            buffer_size,
            fallback_pipe_size,
            counters: SockmapCounters::default(),
        }))
    }

    /// One log line with the plane's totals and the verdict program's counters.
    pub fn log_totals(&self) {
        let c = &self.counters;
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        match self.kernel().verdict_stats() {
            Ok(v) => tracing::info!(
                spliced = load(&c.spliced),
                fallbacks = load(&c.fallbacks),
                client_not_inserted = load(&c.client_not_inserted),
                pauses = load(&c.pauses),
                resumes = load(&c.resumes),
                stalls = load(&c.stalls),
                skbs = v.skbs,
                redirected_bytes = v.redirected_bytes,
                passed_bytes = v.passed_bytes,
                trimmed_bytes = v.trimmed_bytes,
                old_skbs = v.old_skbs,
                empty_skbs = v.empty_skbs,
                "sockmap totals"
            ),
            Err(error) => tracing::warn!(%error, "reading the verdict counters"),
        }
    }

    fn kernel(&self) -> std::sync::MutexGuard<'_, KernelPrograms> {
        self.kernel.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Notify>>> {
        self.pause_waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Splices one connection until it ends.
    pub async fn forward(&self, client: TcpStream, upstream: TcpStream, stop: CancellationToken) -> Transfer {
        let setup = match self.set_up(&client, &upstream) {
            Ok(setup) => setup,
            Err(error) => {
                tracing::debug!(%error, "not spliced in the kernel; using splice(2)");
                self.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
                let pump = UserPump::Splice { pipe_size: self.fallback_pipe_size };
                return super::forward_user(client, upstream, stop, pump).await;
            }
        };
        let copied_up = AtomicU64::new(0);
        let copied_down = AtomicU64::new(0);
        let up = self.direction(&client, &upstream, &setup.up, setup.client_in_map, &copied_up);
        let down = self.direction(&upstream, &client, &setup.down, true, &copied_down);
        let reason = drive(up, down, &stop).await;
        if let CloseReason::Error(_) = reason {
            tracing::debug!(?reason, "sockmap connection failed");
        }
        finish(reason, &client, &upstream);
        let [up, down] = self.tear_down(&setup);
        self.counters.pauses.fetch_add(u64::from(up.pauses + down.pauses), Ordering::Relaxed);
        self.counters.resumes.fetch_add(u64::from(up.resumes + down.resumes), Ordering::Relaxed);
        Transfer {
            client_to_upstream: up.redirected_bytes + copied_up.load(Ordering::Relaxed),
            upstream_to_client: down.redirected_bytes + copied_down.load(Ordering::Relaxed),
            kernel_bytes: up.redirected_bytes + down.redirected_bytes,
            paused_directions: [up, down].iter().map(|f| u32::from(f.pauses != 0)).sum(),
            pauses: up.pauses + down.pauses,
            resumes: up.resumes + down.resumes,
            reason,
        }
    }

    fn set_up(&self, client: &TcpStream, upstream: &TcpStream) -> Result<Setup, SetupError> {
        // Both buffers are fixed before the sockets enter the map. A paused
        // socket's receive buffer must not autotune to tcp_rmem[2], and
        // capping it only at pause time, below what it already held, hung
        // connections; the program keeps what waits for a socket's send
        // queue within that queue's free room (ARCHITECTURE.md).
        let buffer =
            usize::try_from(self.max_inflight.clamp(BUFFER_FLOOR, BUFFER_CEILING)).unwrap_or(usize::MAX);
        for socket in [client, upstream] {
            tcp_options::fix_receive_buffer(socket, buffer).map_err(SetupError::Buffer)?;
            tcp_options::fix_send_buffer(socket, buffer).map_err(SetupError::Buffer)?;
        }
        let client_cookie = socket_cookie(client).map_err(SetupError::Io)?;
        let upstream_cookie = socket_cookie(upstream).map_err(SetupError::Io)?;
        let up = DirectionState::new(client_cookie, tcpstat::sent_total(upstream).map_err(SetupError::Io)?);
        let down = DirectionState::new(upstream_cookie, tcpstat::sent_total(client).map_err(SetupError::Io)?);
        {
            let mut waiters = self.waiters();
            waiters.insert(client_cookie, Arc::clone(&up.paused));
            waiters.insert(upstream_cookie, Arc::clone(&down.paused));
        }
        let flow = |peer_cookie| Flow { peer_cookie, max_inflight: self.max_inflight, ..Flow::default() };
        let mut setup = Setup { up, down, client_in_map: true };
        let mut kernel = self.kernel();
        let inserted = kernel
            .set_flow(client_cookie, &flow(upstream_cookie))
            .and_then(|()| kernel.set_flow(upstream_cookie, &flow(client_cookie)))
            // The upstream first: the client's first bytes are redirected to it.
            .and_then(|()| kernel.insert_socket(upstream));
        if let Err(error) = inserted {
            drop(kernel);
            self.tear_down(&setup);
            return Err(SetupError::Kernel(error));
        }
        if let Err(error) = kernel.insert_socket(client) {
            // Typically EOPNOTSUPP: the client already sent its FIN. The upstream
            // stays in the map (removing it could lose bytes), paused: both
            // directions go through user space.
            tracing::debug!(%error, "client socket not spliced; this connection is copied in user space");
            self.counters.client_not_inserted.fetch_add(1, Ordering::Relaxed);
            let paused = Flow { paused: 1, pause_reason: pause::USER, ..flow(client_cookie) };
            let _ = kernel.set_flow(upstream_cookie, &paused);
            let _ = kernel.remove_flow(client_cookie);
            setup.client_in_map = false;
            setup.down.paused.notify_one();
        } else {
            self.counters.spliced.fetch_add(1, Ordering::Relaxed);
        }
        drop(kernel);
        // Run the verdict for bytes that arrived before insertion.
        for socket in [upstream, client] {
            if let Err(error) = tcp_options::set_rcvlowat(socket, 1) {
                tracing::debug!(%error, "SO_RCVLOWAT kick");
            }
        }
        Ok(setup)
    }

    /// One direction. While the program splices it, user space only waits
    /// for the source's FIN, reset or a pause. While it is paused, user space
    /// copies what the program passed, after making sure the peer has taken
    /// every byte redirected before them, and tells the program how far it
    /// got; the program resumes splicing by itself once that is everything.
    /// `in_map`: the source socket is in the socket map (false only for a
    /// client that could not be inserted: then everything is copied).
    async fn direction(
        &self,
        from: &TcpStream,
        to: &TcpStream,
        state: &DirectionState,
        in_map: bool,
        copied: &AtomicU64,
    ) -> Result<(), PumpError> {
        let mut buf = Vec::new();
        let mut copying = !in_map;
        let mut checked = Instant::now();
        loop {
            if copying {
                match self.copy_passed(from, to, state, &mut buf, copied).await? {
                    Passed::Eof => return self.close_direction(from, to, state, &mut buf, copied).await,
                    // Nothing to read now: splicing again if the program resumed.
                    Passed::Drained => copying = !in_map || self.flow(state.cookie).paused != 0,
                }
            }
            tokio::select! {
                ready = from.ready(Interest::READABLE) => {
                    let ready = ready.map_err(PumpError::Read)?;
                    if ready.is_read_closed() || ready.is_error() {
                        // Read to find out: passed bytes, the EOF, or the error.
                        copying = true;
                    } else if !copying {
                        // Woken by an skb the kernel already redirected: nothing to
                        // read. While bytes flow, also look at the pause flag now
                        // and then, in case a pause event was missed.
                        let _ = from.try_io(Interest::READABLE, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
                        if checked.elapsed() > PAUSE_RECHECK {
                            checked = Instant::now();
                            copying = self.flow(state.cookie).paused != 0;
                        }
                    }
                }
                () = state.paused.notified() => copying = true,
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
    /// directions paused that was a deadlock (ARCHITECTURE.md).
    async fn copy_passed(
        &self,
        from: &TcpStream,
        to: &TcpStream,
        state: &DirectionState,
        buf: &mut Vec<u8>,
        copied: &AtomicU64,
    ) -> Result<Passed, PumpError> {
        if buf.is_empty() {
            buf.resize(self.buffer_size, 0);
        }
        let mut pending: Vec<u8> = Vec::new();
        let (mut eof, mut drained, mut ordered) = (false, false, false);
        let mut taken_last = None;
        let mut progressed = Instant::now();
        loop {
            if !eof && !drained && pending.len() < PENDING_LIMIT {
                match from.try_read(buf) {
                    Ok(0) => eof = true,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => drained = true,
                    Err(e) => return Err(PumpError::Read(e)),
                }
                continue;
            }
            if pending.is_empty() {
                return Ok(if eof { Passed::Eof } else { Passed::Drained });
            }
            if !ordered {
                // The program redirects nothing while passed bytes are
                // unwritten, so this count covers every byte that must reach
                // the peer's send queue before these.
                let redirected = self.flow(state.cookie).redirected_bytes;
                let taken =
                    tcpstat::sent_total(to).map_err(PumpError::Write)?.saturating_sub(state.peer_base);
                ordered = taken >= redirected + copied.load(Ordering::Relaxed);
                if !ordered {
                    self.check_taking(to, taken, redirected, &mut taken_last, &mut progressed)?;
                }
            }
            let wrote = if ordered {
                match to.try_write(&pending) {
                    Ok(k) => k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(e) => return Err(PumpError::Write(e)),
                }
            } else {
                0
            };
            if wrote > 0 {
                pending.drain(..wrote);
                // Once everything passed is written the program may resume,
                // redirect, and pause again: bytes read after that wait for
                // the new redirected ones to be taken.
                ordered = !pending.is_empty();
                let total = copied.fetch_add(wrote as u64, Ordering::Relaxed) + wrote as u64;
                if let Err(error) = self.kernel().set_user_bytes(state.cookie, total) {
                    // Safe: the program only stays paused.
                    tracing::debug!(%error, "publishing the user byte count");
                }
                continue;
            }
            let can_read = !eof && pending.len() < PENDING_LIMIT;
            tokio::select! {
                ready = from.ready(Interest::READABLE), if can_read => {
                    ready.map_err(PumpError::Read)?;
                    drained = false;
                }
                ready = to.ready(Interest::WRITABLE), if ordered => {
                    ready.map_err(PumpError::Write)?;
                }
                () = tokio::time::sleep(DRAIN_POLL), if !ordered => {}
            }
        }
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
    /// one for the FIN) is accounted for.
    async fn close_direction(
        &self,
        from: &TcpStream,
        to: &TcpStream,
        state: &DirectionState,
        buf: &mut Vec<u8>,
        copied: &AtomicU64,
    ) -> Result<(), PumpError> {
        if let Some(error) = tcpstat::take_error(from) {
            return Err(PumpError::Read(error));
        }
        let mut progressed = Instant::now();
        loop {
            let redirected = self.flow(state.cookie).redirected_bytes;
            let received = tcpstat::received_total(from).map_err(PumpError::Read)?.saturating_sub(1);
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
            self.copy_passed(from, to, state, buf, copied).await?;
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
            if let Some(error) = tcpstat::take_error(to) {
                return Err(PumpError::Write(error));
            }
            if last != Some(taken) {
                last = Some(taken);
                progressed = Instant::now();
            } else if progressed.elapsed() > STALL_TIMEOUT {
                self.counters.stalls.fetch_add(1, Ordering::Relaxed);
                return Err(PumpError::Write(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("peer took none of {} waiting bytes for {STALL_TIMEOUT:?}", redirected - taken),
                )));
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }

    /// Removes the flows and waiters; returns the last state of each (up, down).
    fn tear_down(&self, setup: &Setup) -> [Flow; 2] {
        let mut kernel = self.kernel();
        let mut flows = [Flow::default(); 2];
        for (slot, state) in flows.iter_mut().zip([&setup.up, &setup.down]) {
            *slot = kernel.flow(state.cookie).ok().flatten().unwrap_or_default();
            if let Err(error) = kernel.remove_flow(state.cookie) {
                tracing::warn!(%error, cookie = state.cookie, "removing a flow");
            }
        }
        drop(kernel);
        let mut waiters = self.waiters();
        waiters.remove(&setup.up.cookie);
        waiters.remove(&setup.down.cookie);
        flows
    }
}

/// What [`SockmapPlane::copy_passed`] stopped at.
enum Passed {
    /// Nothing more to read for now.
    Drained,
    /// The source's EOF.
    Eof,
}

#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error(transparent)]
    Io(io::Error),
    #[error(transparent)]
    Kernel(KernelError),
    #[error(transparent)]
    Buffer(tcp_options::SockoptError),
}

/// One direction's bookkeeping.
struct DirectionState {
    /// Cookie of the source socket (the flow's key).
    cookie: u64,
    /// `sent_total` of the destination when the connection was set up.
    peer_base: u64,
    /// Notified when the program pauses this flow.
    paused: Arc<Notify>,
}

impl DirectionState {
    fn new(cookie: u64, peer_base: u64) -> Self {
        Self { cookie, peer_base, paused: Arc::new(Notify::new()) }
    }
}

struct Setup {
    up: DirectionState,
    down: DirectionState,
    client_in_map: bool,
}

/// Reads pause events and wakes the direction waiting for each.
async fn dispatch_pauses(
    mut events: AsyncFd<RingBuf<MapData>>,
    waiters: Arc<Mutex<HashMap<u64, Arc<Notify>>>>,
) {
    while let Ok(mut guard) = events.readable_mut().await {
        // Clear first, then drain: an event that lands while we drain wakes us again.
        guard.clear_ready();
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            let Some(event) = parse_event(&item) else { continue };
            let waiter =
                waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&event.cookie).cloned();
            if let Some(waiter) = waiter {
                waiter.notify_one();
            }
        }
    }
}

fn parse_event(bytes: &[u8]) -> Option<FlowEvent> {
    let cookie = u64::from_ne_bytes(bytes.get(0..8)?.try_into().ok()?);
    let reason = u32::from_ne_bytes(bytes.get(8..12)?.try_into().ok()?);
    Some(FlowEvent { cookie, reason, _pad: 0 })
}
