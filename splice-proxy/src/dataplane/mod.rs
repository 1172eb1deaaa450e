//! Data planes: how the bytes of an established connection are moved.
//!
//! Every plane forwards both directions until both have ended, carries a
//! half-close across (EOF on one side becomes `shutdown(SHUT_WR)` on the
//! other while the other direction goes on), and turns a reset or error on
//! either side into a reset on both ([`both_ways`]). They differ in how one
//! direction moves its bytes: [`copy`] through a userspace buffer,
//! [`splice`] through a pipe with splice(2), never touching user memory,
//! [`sockmap`] in the kernel with a BPF verdict program, [`packet`] with a
//! tc program that joins the two TCP connections packet by packet.
//!
//! Each plane is one module with one entry: a user-space plane gives the
//! [`both_ways::Pump`] that moves one direction (its `forward` is
//! [`both_ways::forward_in_user_space`]); a kernel plane a `forward(sockets,
//! …)` that returns a [`Step`]: the connection's [`Transfer`] when it ended
//! there, or [`Step::HandOver`] to move it to the plane after it
//! ([`Plane::next`]).
//! [`Plane`] is the registry: adding a plane adds its module, a variant
//! there, an arm in [`DataPlane::choose`] and a value of [`DataPlaneChoice`].

pub mod both_ways;
pub mod copy;
pub mod packet;
pub mod sockmap;
pub mod splice;
pub mod transfer;

use std::{borrow::Cow, sync::Arc};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

pub use transfer::{ByteProgress, Ending, EndsSent, Side, Sockets, Step, Transfer};

use self::{both_ways::forward_in_user_space, packet::PacketPlane, sockmap::SockmapPlane};

/// The `--dataplane` choice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPlaneChoice {
    /// packet, else splice: the packet plane where its program starts (a
    /// connection it cannot join goes through splice, its reason counted),
    /// splice where it cannot; the start-up log says which and why (sockmap
    /// only when asked for, see docs/kernel-notes.md).
    #[default]
    Auto,
    /// splice(2) through a pipe per direction: the bytes stay in the kernel.
    Splice,
    /// A userspace buffer per direction.
    Copy,
    /// Both sockets in a BPF socket map; an `sk_skb` verdict program redirects
    /// every skb to the peer, pausing to user space when a peer does not drain.
    Sockmap,
    /// A tc program joins the client's and the upstream's TCP connections
    /// packet by packet once both are quiescent; a connection it cannot join
    /// goes through splice, its reason counted.
    Packet,
}

/// The plane in use, with its settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPlane {
    Splice {
        pipe_size: usize,
    },
    Copy {
        buffer_size: usize,
    },
    /// `fallback_pipe_size`: connections that cannot be spliced in the kernel
    /// (the client closed before insertion) go through splice(2).
    Sockmap {
        max_inflight: u64,
        fallback_pipe_size: usize,
    },
    /// `fallback_pipe_size`: connections that are not spliced go through
    /// splice(2).
    Packet {
        fallback_pipe_size: usize,
    },
}

/// Why `auto` starts on packet: its correctness gate (idle and busy hosts,
/// lossy links, connections negotiated differently, the kubectl suite)
/// holds, and a spliced connection costs the proxy nothing per byte.
/// Sockmap forwarded one skb twice on a busy host (both cores taken by
/// other work), so it is offered only when asked for until its contention
/// gate holds (docs/kernel-notes.md, "Sockmap duplicate under load").
const AUTO_REASON: &str = "auto: packet, the plane whose correctness gate holds on an idle and on \
     a busy host and whose spliced connections cost the proxy nothing per byte; a connection it \
     cannot join goes through splice, its reason counted; sockmap runs only with --dataplane \
     sockmap, because under CPU contention it was seen to forward one skb twice";

/// The plane `--dataplane` asks for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ChosenPlane {
    pub plane: DataPlane,
    /// `auto` only: what runs instead when `plane` needs the kernel programs
    /// and they did not load (no CAP_BPF, CAP_NET_ADMIN or CAP_PERFMON, no
    /// BTF, an old kernel), or the packet plane could not start (no routed
    /// interface to attach to). An explicit `--dataplane sockmap` or
    /// `packet` has none: the proxy then refuses to start.
    pub fallback: Option<DataPlane>,
    /// Why `plane` was chosen (logged at start-up).
    pub reason: &'static str,
}

impl std::fmt::Debug for ChosenPlane {
    /// The planes without the reason: what a reload that changes them names.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.fallback {
            None => write!(f, "{:?}", self.plane),
            Some(fallback) => write!(f, "auto: {:?}, else {fallback:?}", self.plane),
        }
    }
}

impl DataPlane {
    /// Resolves `--dataplane` from the configuration alone: the plane to
    /// start, and why. The kernel programs load later; `auto` then falls back
    /// (see [`ChosenPlane::fallback`]).
    #[must_use]
    pub fn choose(
        choice: DataPlaneChoice,
        pipe_size: usize,
        buffer_size: usize,
        max_inflight: u64,
    ) -> ChosenPlane {
        let sockmap = Self::Sockmap { max_inflight, fallback_pipe_size: pipe_size };
        let chosen = |plane, fallback, reason| ChosenPlane { plane, fallback, reason };
        match choice {
            DataPlaneChoice::Auto => chosen(
                Self::Packet { fallback_pipe_size: pipe_size },
                Some(Self::Splice { pipe_size }),
                AUTO_REASON,
            ),
            DataPlaneChoice::Splice => {
                chosen(Self::Splice { pipe_size }, None, "chosen with --dataplane splice")
            }
            DataPlaneChoice::Copy => chosen(Self::Copy { buffer_size }, None, "chosen with --dataplane copy"),
            DataPlaneChoice::Sockmap => chosen(sockmap, None, "chosen with --dataplane sockmap"),
            DataPlaneChoice::Packet => {
                chosen(Self::Packet { fallback_pipe_size: pipe_size }, None, "chosen with --dataplane packet")
            }
        }
    }

    /// A short stable label for logs and metrics.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Splice { .. } => "splice",
            Self::Copy { .. } => "copy",
            Self::Sockmap { .. } => "sockmap",
            Self::Packet { .. } => "packet",
        }
    }
}

/// A plane ready to forward connections: its settings and what it holds of
/// the kernel. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Plane {
    Splice { pipe_size: usize },
    Copy { buffer_size: usize },
    Sockmap(Arc<SockmapPlane>),
    Packet(Arc<PacketPlane>),
}

impl Plane {
    /// The plane's settings (what a reload compares and the logs name).
    #[must_use]
    pub fn settings(&self) -> DataPlane {
        match self {
            Self::Splice { pipe_size } => DataPlane::Splice { pipe_size: *pipe_size },
            Self::Copy { buffer_size } => DataPlane::Copy { buffer_size: *buffer_size },
            Self::Sockmap(plane) => DataPlane::Sockmap {
                max_inflight: plane.max_inflight(),
                fallback_pipe_size: plane.fallback_pipe_size(),
            },
            Self::Packet(plane) => DataPlane::Packet { fallback_pipe_size: plane.fallback_pipe_size() },
        }
    }

    /// A short stable label for logs and metrics.
    #[must_use]
    pub fn label(&self) -> &'static str {
        self.settings().label()
    }

    /// Whether a connection's upstream socket gets keepalive and the user
    /// timeout only once it has lived (`Sockets::upstream_options_due`),
    /// not at connect: on packet, whose early relay has a timer of its own
    /// for them, so that a short connection saves the calls at no cost to
    /// an idle one. A plane that would need a timer per connection for
    /// them (copy, splice: its memory, held by every idle connection until
    /// it fires, counts more than the calls) and sockmap set them at once.
    #[must_use]
    pub fn defers_upstream_options(&self) -> bool {
        matches!(self, Self::Packet(_))
    }

    /// Where a connection this plane hands over goes on: sockmap and packet
    /// hand a connection they could not put in the kernel to splice(2).
    #[must_use]
    pub fn next(&self) -> Option<Self> {
        match self {
            Self::Splice { .. } | Self::Copy { .. } => None,
            Self::Sockmap(plane) => Some(Self::Splice { pipe_size: plane.fallback_pipe_size() }),
            Self::Packet(plane) => Some(Self::Splice { pipe_size: plane.fallback_pipe_size() }),
        }
    }

    /// Forwards `sockets` until the connection ends or `stop` is cancelled,
    /// then closes both; moves it from plane to plane as each hands it over.
    /// `progress` shows the bytes as they move.
    ///
    /// Each plane's future is boxed: an idle connection holds it for as long
    /// as it is open, and one future over every plane would be as large as
    /// the largest (sockmap's) whichever plane runs.
    pub async fn forward(
        &self,
        mut sockets: Sockets,
        stop: CancellationToken,
        progress: &ByteProgress,
    ) -> Transfer {
        // Borrowed until a hand-over: no reference count touched per connection.
        let mut plane = Cow::Borrowed(self);
        loop {
            let step = match plane.as_ref() {
                Self::Splice { pipe_size } => {
                    let pump = splice::SplicePump { pipe_size: *pipe_size };
                    Step::Finished(Box::pin(forward_in_user_space(sockets, &stop, progress, pump)).await)
                }
                Self::Copy { buffer_size } => {
                    let pump = copy::CopyPump { buffer_size: *buffer_size };
                    Step::Finished(Box::pin(forward_in_user_space(sockets, &stop, progress, pump)).await)
                }
                Self::Sockmap(sockmap) => Box::pin(sockmap.forward(sockets, &stop, progress)).await,
                Self::Packet(packet) => Box::pin(packet.forward(sockets, &stop, progress)).await,
            };
            match step {
                Step::Finished(transfer) => return transfer,
                Step::HandOver(handed) => match plane.next() {
                    Some(next) => {
                        tracing::debug!(from = plane.label(), to = next.label(), "connection handed over");
                        (plane, sockets) = (Cow::Owned(next), handed);
                    }
                    None => {
                        tracing::error!(
                            plane = plane.label(),
                            "a plane with no next plane handed a connection over"
                        );
                        both_ways::finish(Ending::Error(Side::Downstream), &handed.client, &handed.upstream);
                        return Transfer::counted(progress, Ending::Error(Side::Downstream));
                    }
                },
            }
        }
    }

    /// Logs the plane's own counters over the whole run, if it keeps any.
    pub fn log_totals(&self) {
        match self {
            Self::Sockmap(plane) => plane.log_totals(),
            Self::Packet(plane) => plane.log_totals(),
            Self::Splice { .. } | Self::Copy { .. } => {}
        }
    }

    /// The plane's own counters for the metrics endpoint: name (without the
    /// `splice_proxy_` prefix and `_total` suffix), help, value.
    #[must_use]
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        match self {
            Self::Splice { .. } | Self::Copy { .. } => Vec::new(),
            Self::Sockmap(plane) => plane.counters.listed(),
            Self::Packet(plane) => plane.listed(),
        }
    }

    /// The packet plane's fallbacks by reason (`packet_fallbacks_total{reason}`).
    #[must_use]
    pub fn fallbacks(&self) -> Option<Vec<(&'static str, u64)>> {
        match self {
            Self::Packet(plane) => Some(plane.counters.fallbacks_by_reason()),
            Self::Splice { .. } | Self::Copy { .. } | Self::Sockmap(_) => None,
        }
    }
}
