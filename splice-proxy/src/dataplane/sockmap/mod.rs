//! The sockmap plane: both sockets of a connection go into the SOCKHASH whose
//! verdict program redirects every skb to the peer's egress. User space keeps
//! the control:
//!
//! - set-up (here): both sockets' buffers fixed, a flow entry per direction,
//!   then the upstream socket (the target of the client's first bytes) before
//!   the client socket, then SO_RCVLOWAT on both so bytes queued before
//!   insertion (the ClientHello) are read;
//! - each direction ([`direction`]): on FIN, wait until the peer socket has
//!   taken every redirected byte into its send queue, then `shutdown(SHUT_WR)`
//!   it; a reset becomes a reset on both (SO_LINGER 0); while the program has
//!   a direction paused (its peer did not drain: SK_PASS keeps the bytes on
//!   the source socket, charged to its receive buffer, so TCP slows the
//!   sender), copy the passed bytes in order and tell the program, which
//!   resumes splicing once user space has caught up;
//! - pause events from the program's ring buffer ([`events`]);
//! - FINs and errors of spliced sockets from an epoll that leaves their data
//!   wake-ups out ([`hangups`]): while spliced, a connection's sockets are
//!   outside tokio's reactor, and a paused direction registers its own
//!   ([`paused_io`]).
//!
//! Sockets leave the maps only when they are closed.

mod direction;
mod events;
mod hangups;
mod paused_io;

use std::{
    collections::HashMap,
    io,
    net::TcpStream as StdTcpStream,
    pin::pin,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
};

use proxy_common::{Flow, pause};
use tokio::{net::TcpStream, sync::Notify};
use tokio_util::sync::CancellationToken;

use self::hangups::Hangups;
use crate::dataplane::{
    both_ways::{drive, finish},
    transfer::{ByteProgress, Ending, LiveBytes, Side, Sockets, Step, Transfer},
};
use crate::{
    kernel::{KernelError, KernelPrograms, socket_cookie},
    sockopt as tcp_options, tcpstat,
};

/// Smallest socket buffers of a spliced connection (the kernel doubles them):
/// smaller ones make a lossy link crawl once paused (docs/kernel-notes.md,
/// *Facts re-checked*).
const BUFFER_FLOOR: u64 = 1 << 20;
/// Largest socket buffers of a spliced connection, whatever `--max-inflight`
/// says: the memory a connection may pin stays bounded.
const BUFFER_CEILING: u64 = 16 << 20;

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
    /// Connections reset because a retransmitted skb repeated bytes already
    /// forwarded and the program could not cut them off.
    pub overlap_resets: AtomicU64,
    /// Pauses user space found by reading the flag before (or without) the
    /// program's event.
    pub pauses_found_by_recheck: AtomicU64,
    /// Times a paused direction's timer found bytes to read that no wake-up announced.
    pub reads_found_by_recheck: AtomicU64,
}

impl SockmapCounters {
    /// Each counter with its metric name and help, for the metrics endpoint.
    #[must_use]
    pub fn listed(&self) -> Vec<(&'static str, &'static str, u64)> {
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        vec![
            ("sockmap_spliced", "Connections spliced in the kernel", load(&self.spliced)),
            (
                "sockmap_fallbacks",
                "Connections that ran on splice(2): the upstream socket was not inserted",
                load(&self.fallbacks),
            ),
            (
                "sockmap_client_not_inserted",
                "Connections whose client socket was not inserted (already closed)",
                load(&self.client_not_inserted),
            ),
            ("sockmap_pauses", "Times the kernel program paused a direction", load(&self.pauses)),
            ("sockmap_resumes", "Times the kernel program resumed a paused direction", load(&self.resumes)),
            ("sockmap_stalls", "Connections cut because a peer took no redirected bytes", load(&self.stalls)),
            (
                "sockmap_overlap_resets",
                "Connections reset because a retransmitted skb repeated forwarded bytes that could not be cut off",
                load(&self.overlap_resets),
            ),
        ]
    }
}

/// The kernel side shared by every connection on this plane.
pub struct SockmapPlane {
    kernel: Mutex<KernelPrograms>,
    /// Who waits for a pause of the flow keyed by source cookie, or for a
    /// FIN or an error of that source.
    waiters: Arc<Mutex<HashMap<u64, Arc<Notify>>>>,
    /// Pause events read from the program's ring buffer (each pause sends one).
    pause_events: Arc<AtomicU64>,
    /// FINs and errors of the spliced sockets.
    hangups: Arc<Hangups>,
    max_inflight: u64,
    fallback_pipe_size: usize,
    pub counters: SockmapCounters,
}

impl std::fmt::Debug for SockmapPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SockmapPlane").field("max_inflight", &self.max_inflight).finish_non_exhaustive()
    }
}

impl SockmapPlane {
    /// Takes the loaded programs and starts the pause and hang-up readers.
    pub fn start(
        mut kernel: KernelPrograms,
        max_inflight: u64,
        fallback_pipe_size: usize,
    ) -> Result<Arc<Self>, KernelError> {
        let events = kernel.take_events()?;
        let hangups = Arc::new(Hangups::new().map_err(KernelError::HangupEpoll)?);
        let waiters = Arc::new(Mutex::new(HashMap::new()));
        let pause_events = Arc::new(AtomicU64::new(0));
        tokio::spawn(events::dispatch_pauses(events, Arc::clone(&waiters), Arc::clone(&pause_events)));
        tokio::spawn(Arc::clone(&hangups).dispatch(Arc::clone(&waiters)));
        let plane = Arc::new(Self {
            kernel: Mutex::new(kernel),
            waiters,
            pause_events,
            hangups,
            max_inflight,
            fallback_pipe_size,
            counters: SockmapCounters::default(),
        });
        tokio::spawn(events::watch_lost_events(Arc::downgrade(&plane)));
        Ok(plane)
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
                pause_events = load(&self.pause_events),
                hangup_events = load(&self.hangups.received),
                resumes = load(&c.resumes),
                stalls = load(&c.stalls),
                overlap_resets = load(&c.overlap_resets),
                pauses_found_by_recheck = load(&c.pauses_found_by_recheck),
                reads_found_by_recheck = load(&c.reads_found_by_recheck),
                skbs = v.skbs,
                redirected_bytes = v.redirected_bytes,
                passed_bytes = v.passed_bytes,
                trimmed_bytes = v.trimmed_bytes,
                old_skbs = v.old_skbs,
                trim_failures = v.trim_failures,
                lost_events = v.lost_events,
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
        self.waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The bound on bytes in flight per direction (`--max-inflight`).
    #[must_use]
    pub fn max_inflight(&self) -> u64 {
        self.max_inflight
    }

    /// The pipe size of the splice(2) plane a connection falls back to.
    #[must_use]
    pub fn fallback_pipe_size(&self) -> usize {
        self.fallback_pipe_size
    }

    /// Splices one connection until it ends, or hands it over (to splice(2))
    /// when its sockets cannot go into the map. `progress` shows the bytes
    /// moved so far: what user space copied, plus the kernel's share read
    /// from the flows while they exist.
    pub async fn forward(
        self: &Arc<Self>,
        sockets: Sockets,
        stop: &CancellationToken,
        progress: &ByteProgress,
    ) -> Step {
        let Sockets { client, upstream, client_read, ends_sent, upstream_options_due } = sockets;
        // Out of tokio's reactor: a spliced socket would wake it for every
        // redirected skb (see `hangups`).
        let (client, upstream) = match leave_reactor(client, upstream) {
            Ok(sockets) => sockets,
            Err((side, error)) => {
                tracing::warn!(%error, ?side, "taking a socket out of the reactor failed; connection closed");
                return Step::Finished(Transfer::counted(progress, Ending::Error(side)));
            }
        };
        let setup = match self.set_up(&client, &upstream, client_read) {
            Ok(setup) => setup,
            Err(error) => {
                tracing::debug!(%error, "not spliced in the kernel; handed over to splice(2)");
                self.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
                return match (TcpStream::from_std(client), TcpStream::from_std(upstream)) {
                    (Ok(client), Ok(upstream)) => Step::HandOver(Sockets {
                        client,
                        upstream,
                        client_read,
                        ends_sent,
                        upstream_options_due,
                    }),
                    (Err(error), _) | (_, Err(error)) => {
                        tracing::warn!(%error, "registering a socket with the reactor failed; connection closed");
                        Step::Finished(Transfer::counted(progress, Ending::Error(Side::Downstream)))
                    }
                };
            }
        };
        progress.attach(Box::new(KernelShare {
            plane: Arc::downgrade(self),
            cookies: [setup.up.cookie, setup.down.cookie],
        }));
        let copied_up = &progress.client_to_upstream;
        let copied_down = &progress.upstream_to_client;
        let up = pin!(self.direction(&client, &upstream, &setup.up, setup.client_in_map, copied_up));
        let down = pin!(self.direction(&upstream, &client, &setup.down, true, copied_down));
        let ending = drive(up, down, stop).await;
        if let Ending::Error(_) = ending {
            tracing::debug!(?ending, "sockmap connection failed");
        }
        finish(ending, &client, &upstream);
        // The kernel's share moves into the counters with the flows' removal,
        // so a reader of `progress` never sees it missing.
        let [up, down] = progress.settle(|| {
            let flows = self.tear_down(&setup, [&client, &upstream]);
            (flows.map(|flow| flow.redirected_bytes), flows)
        });
        self.counters.pauses.fetch_add(u64::from(up.pauses + down.pauses), Ordering::Relaxed);
        self.counters.resumes.fetch_add(u64::from(up.resumes + down.resumes), Ordering::Relaxed);
        Step::Finished(Transfer {
            kernel_bytes: up.redirected_bytes + down.redirected_bytes,
            paused_directions: [up, down].iter().map(|f| u32::from(f.pauses != 0)).sum(),
            pauses: up.pauses + down.pauses,
            resumes: up.resumes + down.resumes,
            ..Transfer::counted(progress, ending)
        })
    }

    fn set_up(
        &self,
        client: &StdTcpStream,
        upstream: &StdTcpStream,
        client_read: u64,
    ) -> Result<Setup, SetupError> {
        // Both buffers are fixed before the sockets enter the map. A paused
        // socket's receive buffer must not autotune to tcp_rmem[2], and
        // capping it only at pause time, below what it already held, hung
        // connections; the program keeps what waits for a socket's send
        // queue within that queue's free room (ARCHITECTURE.md, the sockmap plane).
        let buffer =
            usize::try_from(self.max_inflight.clamp(BUFFER_FLOOR, BUFFER_CEILING)).unwrap_or(usize::MAX);
        for socket in [client, upstream] {
            tcp_options::fix_receive_buffer(socket, buffer).map_err(SetupError::Buffer)?;
            tcp_options::fix_send_buffer(socket, buffer).map_err(SetupError::Buffer)?;
        }
        let client_cookie = socket_cookie(client).map_err(SetupError::Io)?;
        let upstream_cookie = socket_cookie(upstream).map_err(SetupError::Io)?;
        let up = DirectionState::new(
            client_cookie,
            tcpstat::sent_total(upstream).map_err(SetupError::Io)?,
            client_read,
        );
        let down =
            DirectionState::new(upstream_cookie, tcpstat::sent_total(client).map_err(SetupError::Io)?, 0);
        {
            let mut waiters = self.waiters();
            waiters.insert(client_cookie, Arc::clone(&up.wake));
            waiters.insert(upstream_cookie, Arc::clone(&down.wake));
        }
        let watched = self
            .hangups
            .watch(client, client_cookie)
            .and_then(|()| self.hangups.watch(upstream, upstream_cookie));
        let mut setup = Setup { up, down, client_in_map: true };
        if let Err(error) = watched {
            self.tear_down(&setup, [client, upstream]);
            return Err(SetupError::Io(error));
        }
        let flow = |peer_cookie| Flow { peer_cookie, max_inflight: self.max_inflight, ..Flow::default() };
        let mut kernel = self.kernel();
        let inserted = kernel
            .set_flow(client_cookie, &flow(upstream_cookie))
            .and_then(|()| kernel.set_flow(upstream_cookie, &flow(client_cookie)))
            // The upstream first: the client's first bytes are redirected to it.
            .and_then(|()| kernel.insert_socket(upstream));
        if let Err(error) = inserted {
            drop(kernel);
            self.tear_down(&setup, [client, upstream]);
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
            setup.down.wake.notify_one();
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

    /// Removes the flows, waiters and hang-up registrations of `sockets`;
    /// returns the last state of each flow (up, down).
    fn tear_down(&self, setup: &Setup, sockets: [&StdTcpStream; 2]) -> [Flow; 2] {
        for socket in sockets {
            self.hangups.unwatch(socket);
        }
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

/// Where the bytes the kernel redirected for one spliced connection are
/// read while it is spliced (for `/debug/connections`).
#[derive(Debug)]
pub struct KernelShare {
    plane: Weak<SockmapPlane>,
    /// The flows' keys: the client's cookie (up), the upstream's (down).
    cookies: [u64; 2],
}

impl LiveBytes for KernelShare {
    /// Bytes redirected so far (up, down); 0 for a flow already gone.
    fn read(&self) -> [u64; 2] {
        let Some(plane) = self.plane.upgrade() else { return [0, 0] };
        let kernel = plane.kernel();
        self.cookies.map(|cookie| kernel.flow(cookie).ok().flatten().map_or(0, |flow| flow.redirected_bytes))
    }
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
    /// Bytes the source received that user space read before set-up (the
    /// client's PROXY header): not part of this direction.
    source_read: u64,
    /// Notified when the program pauses this flow, and at the source's FIN,
    /// reset or error.
    wake: Arc<Notify>,
}

impl DirectionState {
    fn new(cookie: u64, peer_base: u64, source_read: u64) -> Self {
        Self { cookie, peer_base, source_read, wake: Arc::new(Notify::new()) }
    }
}

/// Both sockets out of tokio's reactor (nonblocking, as they were); on
/// failure, the side whose socket failed.
fn leave_reactor(
    client: TcpStream,
    upstream: TcpStream,
) -> Result<(StdTcpStream, StdTcpStream), (Side, io::Error)> {
    let client = client.into_std().map_err(|e| (Side::Downstream, e))?;
    let upstream = upstream.into_std().map_err(|e| (Side::Upstream, e))?;
    Ok((client, upstream))
}

struct Setup {
    up: DirectionState,
    down: DirectionState,
    client_in_map: bool,
}
