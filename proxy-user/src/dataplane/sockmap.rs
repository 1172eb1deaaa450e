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
use nix::sys::socket::{setsockopt, sockopt};
use proxy_common::{Flow, FlowEvent, pause};
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpStream,
    sync::Notify,
};
use tokio_util::sync::CancellationToken;

use super::{CloseReason, PumpError, Transfer, UserPump, copy, drive, finish, shutdown_write};
use crate::{
    kernel::{KernelError, KernelPrograms, socket_cookie},
    sockopt as tcp_options, tcpstat,
};

/// How long a peer may take none of the redirected bytes before the
/// connection is cut (a reader that never drains).
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Smallest receive buffer a paused socket is capped to: smaller ones make a
/// lossy link crawl (a 64 KiB cap took 90 s for 64 MiB at 1 % loss).
const PAUSED_RCVBUF_FLOOR: u64 = 1 << 20;
/// While bytes flow through a spliced direction, how often its pause flag is
/// read from the map as well (a safety net under the ring buffer events).
const PAUSE_RECHECK: Duration = Duration::from_millis(50);
/// How often an idle paused direction reports its state (debug level).
const IDLE_REPORT: Duration = Duration::from_secs(5);
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
    /// Directions paused by the program and finished in user space.
    pub pauses: AtomicU64,
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
        Transfer {
            client_to_upstream: up.redirected_bytes + copied_up.load(Ordering::Relaxed),
            upstream_to_client: down.redirected_bytes + copied_down.load(Ordering::Relaxed),
            kernel_bytes: up.redirected_bytes + down.redirected_bytes,
            paused_directions: [up, down].iter().map(|f| u32::from(f.paused != 0)).sum(),
            reason,
        }
    }

    fn set_up(&self, client: &TcpStream, upstream: &TcpStream) -> Result<Setup, SetupError> {
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

    /// One direction: wait for the source's FIN (or reset, or a pause), then
    /// close or continue in user space. `in_map`: the source socket is in the
    /// socket map (false only for a client that could not be inserted).
    async fn direction(
        &self,
        from: &TcpStream,
        to: &TcpStream,
        state: &DirectionState,
        in_map: bool,
        copied: &AtomicU64,
    ) -> Result<(), PumpError> {
        if in_map {
            let mut checked = Instant::now();
            loop {
                tokio::select! {
                    ready = from.ready(Interest::READABLE) => {
                        let ready = ready.map_err(PumpError::Read)?;
                        if ready.is_read_closed() || ready.is_error() {
                            break;
                        }
                        // Woken by an skb the kernel already redirected: nothing to
                        // read. While bytes flow, also look at the pause flag now
                        // and then, in case a pause event was missed.
                        let _ = from.try_io(Interest::READABLE, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
                        if checked.elapsed() > PAUSE_RECHECK {
                            checked = Instant::now();
                            if self.kernel().flow(state.cookie).ok().flatten().is_some_and(|f| f.paused != 0) {
                                break;
                            }
                        }
                    }
                    () = state.paused.notified() => break,
                }
            }
            if let Some(error) = tcpstat::take_error(from) {
                return Err(PumpError::Read(error));
            }
        }
        let flow = self.kernel().flow(state.cookie).ok().flatten().unwrap_or_default();
        self.wait_taken(to, state.peer_base, flow.redirected_bytes).await?;
        if in_map && flow.paused == 0 {
            // FIN: every byte before it is in the peer's send queue now.
            return shutdown_write(to).map_err(PumpError::Write);
        }
        if flow.paused != 0 && flow.pause_reason != pause::USER {
            self.counters.pauses.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                reason = flow.pause_reason,
                redirected = flow.redirected_bytes,
                "direction paused"
            );
            // A paused socket's receive buffer must not autotune to tcp_rmem[2]
            // (the kernel doubles the value set here).
            let cap = usize::try_from(self.max_inflight.max(PAUSED_RCVBUF_FLOOR)).unwrap_or(usize::MAX);
            let _ = setsockopt(from, sockopt::RcvBuf, &cap);
        }
        self.finish_in_user_space(from, to, flow.redirected_bytes, copied).await
    }

    /// Copies the rest of a direction whose source is in the socket map, up to
    /// its EOF. tcp_bpf's recvmsg reports EOF once the FIN is in and the
    /// psock's message queue is empty, even while passed skbs still wait on
    /// the psock's backlog queue (when the receive buffer was full); so EOF
    /// counts only once every byte the socket received (`tcpi_bytes_received`,
    /// minus one for the FIN) was redirected or copied.
    async fn finish_in_user_space(
        &self,
        from: &TcpStream,
        to: &TcpStream,
        redirected: u64,
        copied: &AtomicU64,
    ) -> Result<(), PumpError> {
        let mut buf = vec![0u8; self.buffer_size];
        let mut progressed = Instant::now();
        loop {
            let Ok(read) = tokio::time::timeout(IDLE_REPORT, copy::read_some(from, &mut buf)).await else {
                // An idle source is normal (nothing to send); say where it stands.
                tracing::debug!(
                    received = tcpstat::received_total(from).ok(),
                    readable = tcpstat::readable_bytes(from).ok(),
                    redirected,
                    copied = copied.load(Ordering::Relaxed),
                    "paused direction idle"
                );
                continue;
            };
            let n = read.map_err(PumpError::Read)?;
            if n > 0 {
                copy::write_all(to, &buf[..n]).await.map_err(PumpError::Write)?;
                copied.fetch_add(n as u64, Ordering::Relaxed);
                progressed = Instant::now();
                continue;
            }
            let received = tcpstat::received_total(from).map_err(PumpError::Read)?.saturating_sub(1);
            if redirected + copied.load(Ordering::Relaxed) >= received {
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

#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error(transparent)]
    Io(io::Error),
    #[error(transparent)]
    Kernel(KernelError),
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
