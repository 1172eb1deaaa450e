//! The packet plane: once both connections of the proxy exist, a tc program
//! rewrites each packet of one connection into the other, so neither of the
//! proxy's TCP stacks touches the bytes.
//!
//! - [`early`]: a connection's first moments, relayed by hand; a short one
//!   ends there and is never switched, one that lives or carries enough
//!   ([`SwitchAfter`]) goes on to the switch.
//! - [`switch`]: holds both flows in the program, relays what the sockets
//!   still hold, waits until both are quiescent, reads them in repair mode
//!   and installs each direction's rewrite ([`rewrite`], from the state
//!   [`repair`] reads); or says why not ([`fallback`]), and the connection
//!   goes on on the next plane (splice).
//! - [`flow`]: a spliced connection until it ends (FIN each way, or a RST),
//!   read from the program's per-flow counters; then its entries linger,
//!   drop its late packets, and go, with the proxy's silent sockets.
//! - [`program`]: the kernel program, its flow map, its attachments
//!   ([`interfaces`]).
//!
//! What a live socket gives the switch, and why `TCP_REPAIR` alone does not
//! silence it: docs/kernel-notes.md, *A live socket, for packet splicing*.

mod early;
pub mod fallback;
mod flow;
pub mod grace;
pub mod interfaces;
mod keepalive;
pub mod program;
pub mod repair;
pub mod reset;
pub mod reset_helper;
pub mod rewrite;
mod switch;

use std::{
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio_util::sync::CancellationToken;

pub use self::early::SwitchAfter;
use self::{early::Early, fallback::Fallback, program::PacketProgram};
use super::transfer::{ByteProgress, Ending, Sockets, Step, Transfer};
use crate::kernel::KernelError;

/// The stall timeout with `--tcp-user-timeout 0` (the kernel's default):
/// about as long as the kernel retransmits before it gives a connection up.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Why the plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum PacketStartError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("reading the routes to find the interfaces to attach to: {0}")]
    Routes(std::io::Error),
    #[error(
        "no interface to attach the packet-splicing program to: the main routing table names none but lo"
    )]
    NoInterface,
    #[error("attaching the packet-splicing program to {interface}: {source}")]
    Attach { interface: String, source: Box<KernelError> },
    #[error(transparent)]
    ResetHelper(#[from] reset_helper::HelperError),
    #[error(transparent)]
    GracePeriods(#[from] grace::GraceError),
}

/// What the plane did, for logs and metrics.
#[derive(Debug, Default)]
pub struct PacketCounters {
    /// Connections joined in the kernel.
    pub spliced: AtomicU64,
    /// Connections left on the next plane, by [`Fallback::index`].
    pub fallbacks: [AtomicU64; Fallback::ALL.len()],
    /// Spliced connections that ended.
    pub ended: AtomicU64,
    /// Ended ones whose flow entries and sockets are gone (after the
    /// linger, or at once when the proxy let go of them): equal to
    /// [`Self::ended`] when nothing of an ended connection is held.
    pub retired: AtomicU64,
    /// Spliced connections cut (both ends reset) because a packet reached
    /// the proxy's socket during the switch after all: its bytes would
    /// otherwise be lost.
    pub switch_races: AtomicU64,
}

impl PacketCounters {
    fn fell_back(&self, reason: Fallback) {
        self.fallbacks[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// The reasons that happened, as `label=count` pairs, or `none`.
    #[must_use]
    pub fn fallbacks_line(&self) -> String {
        let pairs: Vec<String> = self
            .fallbacks_by_reason()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(l, n)| format!("{l}={n}"))
            .collect();
        if pairs.is_empty() { "none".to_owned() } else { pairs.join(" ") }
    }

    /// `(label, count)` for every reason.
    #[must_use]
    pub fn fallbacks_by_reason(&self) -> Vec<(&'static str, u64)> {
        Fallback::ALL.iter().map(|f| (f.label(), self.fallbacks[f.index()].load(Ordering::Relaxed))).collect()
    }
}

/// The loaded and attached program, and what the plane counts.
#[derive(Debug)]
pub struct PacketPlane {
    program: Mutex<PacketProgram>,
    fallback_pipe_size: usize,
    /// When a connection, relayed by hand until then, is switched.
    switch_after: SwitchAfter,
    /// How long a spliced connection's bytes may wait for an
    /// acknowledgement before that side counts as gone.
    stall_timeout: Duration,
    /// When a quiet end of a spliced connection is probed, and how many
    /// unanswered probes make it gone (`--tcp-keepalive-*`).
    keepalive: keepalive::KeepaliveTimes,
    pub counters: PacketCounters,
    /// Confirms each switch once the packets before its hold are delivered.
    grace_periods: grace::GracePeriods,
    /// Resets the ends of what is still spliced if this process dies.
    _reset_helper: reset_helper::ResetHelper,
}

impl PacketPlane {
    /// Loads the program with room for `max_connections` (and as many
    /// ended ones lingering), and attaches it to `interfaces`, or to every
    /// routed interface. A connection is relayed by hand until it is worth
    /// switching by `switch_after`.
    /// `tcp`: its `user_timeout` (`--tcp-user-timeout`) is how long a
    /// spliced connection's bytes may wait for an acknowledgement (zero
    /// takes [`DEFAULT_STALL_TIMEOUT`]); its keepalive times are those of
    /// the probes on quiet spliced connections.
    pub fn start(
        max_connections: usize,
        interfaces: Option<&[String]>,
        fallback_pipe_size: usize,
        tcp: crate::sockopt::TcpConfig,
        switch_after: SwitchAfter,
        log_format: crate::config::LogFormat,
    ) -> Result<Arc<Self>, PacketStartError> {
        let names = match interfaces {
            Some(names) => names.to_vec(),
            None => interfaces::routed().map_err(PacketStartError::Routes)?,
        };
        if names.is_empty() {
            return Err(PacketStartError::NoInterface);
        }
        let mut program = PacketProgram::load(max_connections.saturating_mul(2))?;
        for interface in &names {
            program.attach(interface).map_err(|source| PacketStartError::Attach {
                interface: interface.clone(),
                source: Box::new(source),
            })?;
        }
        let grace_periods = grace::GracePeriods::start()?;
        let reset_helper = reset_helper::ResetHelper::start(program.flows_fd(), log_format)?;
        tracing::info!(interfaces = ?names, "packet-splicing program attached");
        let stall_timeout = if tcp.user_timeout.is_zero() { DEFAULT_STALL_TIMEOUT } else { tcp.user_timeout };
        Ok(Arc::new(Self {
            program: Mutex::new(program),
            fallback_pipe_size,
            switch_after,
            stall_timeout,
            keepalive: keepalive::KeepaliveTimes::from(&tcp),
            counters: PacketCounters::default(),
            grace_periods,
            _reset_helper: reset_helper,
        }))
    }

    /// Where a connection that is not spliced goes on (splice(2)).
    #[must_use]
    pub fn fallback_pipe_size(&self) -> usize {
        self.fallback_pipe_size
    }

    fn program(&self) -> MutexGuard<'_, PacketProgram> {
        self.program.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Splices the connection and follows it to its end, or hands it over
    /// with the reason counted.
    pub async fn forward(
        self: &Arc<Self>,
        mut sockets: Sockets,
        stop: &CancellationToken,
        progress: &ByteProgress,
    ) -> Step {
        // A short connection ends relayed by hand, before anything of the
        // switch (its checks included) has cost it a system call.
        if !self.switch_after.at_once() {
            let Sockets { client, upstream, upstream_options_due, .. } = &mut sockets;
            let early = early::relay_until_worth_switching(
                [client, upstream],
                upstream_options_due,
                progress,
                self.switch_after,
                stop,
            )
            .await;
            match early {
                Early::WorthSwitching => {}
                Early::Completed => {
                    self.counters.fell_back(Fallback::ShortLived);
                    return Step::Finished(Transfer::counted(progress, Ending::Completed));
                }
                Early::HalfClosed(ends_sent) => {
                    sockets.ends_sent = ends_sent;
                    sockets.set_upstream_options();
                    return self.hand_over(sockets, Fallback::ShortLived);
                }
                Early::Over(ending) => return Step::Finished(Transfer::counted(progress, ending)),
            }
        }
        // Joined, the program carries the connection and these sockets fall
        // silent; if it is not, the next plane keeps it, long-lived.
        sockets.set_upstream_options();
        let keys = match switch::joinable(&sockets) {
            Ok(keys) => keys,
            Err(reason) => return self.hand_over(sockets, reason),
        };
        match switch::switch(self, &sockets, progress, keys).await {
            Ok(keys) => {
                self.counters.spliced.fetch_add(1, Ordering::Relaxed);
                let transfer = flow::follow(self, keys, sockets, stop, progress).await;
                self.counters.ended.fetch_add(1, Ordering::Relaxed);
                Step::Finished(transfer)
            }
            Err(reason) => self.hand_over(sockets, reason),
        }
    }

    /// Gives the connection to the next plane, the reason counted and
    /// logged (a short connection's at debug: most are).
    fn hand_over(&self, sockets: Sockets, reason: Fallback) -> Step {
        self.counters.fell_back(reason);
        if reason == Fallback::ShortLived {
            tracing::debug!(reason = reason.label(), "not spliced in the kernel");
        } else {
            tracing::info!(reason = reason.label(), "not spliced in the kernel");
        }
        Step::HandOver(sockets)
    }

    /// The plane's counters over the whole run, logged at exit.
    pub fn log_totals(&self) {
        let c = &self.counters;
        tracing::info!(
            spliced = c.spliced.load(Ordering::Relaxed),
            silenced = self.program().silenced().unwrap_or(0),
            ended = c.ended.load(Ordering::Relaxed),
            retired = c.retired.load(Ordering::Relaxed),
            switch_races = c.switch_races.load(Ordering::Relaxed),
            fallbacks = %self.counters.fallbacks_line(),
            "packet plane totals"
        );
    }

    /// The counters for the metrics endpoint (without the fallbacks, a
    /// family of their own).
    #[must_use]
    pub fn listed(&self) -> Vec<(&'static str, &'static str, u64)> {
        let c = &self.counters;
        vec![
            (
                "packet_spliced",
                "Connections joined by the packet-splicing program",
                c.spliced.load(Ordering::Relaxed),
            ),
            ("packet_ended", "Spliced connections that ended", c.ended.load(Ordering::Relaxed)),
            (
                "packet_retired",
                "Ended spliced connections whose flow entries and sockets are gone",
                c.retired.load(Ordering::Relaxed),
            ),
            (
                "packet_switch_races",
                "Spliced connections cut, both ends reset, because a packet reached the proxy's socket during the switch",
                c.switch_races.load(Ordering::Relaxed),
            ),
            (
                "packet_silenced",
                "Packets the proxy's own spliced sockets sent, dropped on their way out",
                self.program().silenced().unwrap_or(0),
            ),
        ]
    }
}
