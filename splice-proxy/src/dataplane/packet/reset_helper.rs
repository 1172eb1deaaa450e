//! The reset helper: a small process that resets both ends of every spliced
//! connection the proxy leaves behind when it dies without letting go of
//! them (SIGKILL, a crash, the OOM killer).
//!
//! A dead proxy's links go with it, so the program stops rewriting, and its
//! repaired sockets close without a word. A quiet end (a watch) would then
//! wait until it next sent to learn that its connection is gone. The
//! packet plane therefore starts this helper (the same binary, subcommand
//! [`SUBCOMMAND`]) and hands it the flow map over a Unix socket that is its
//! standard input. The proxy never writes to that socket again; the helper
//! blocks on it. When it reaches its end, the proxy has gone or let go of
//! the helper. The helper waits until it is no longer the proxy's child
//! (its parent has exited: every descriptor is closed, so the tuples are
//! free), reads the map, and resets both ends of each connection still
//! spliced ([`super::reset`]). A proxy that stops normally has let go of its
//! connections itself, so the helper finds none left.
//!
//! It ignores SIGTERM, SIGINT and SIGHUP, so a stop that signals the whole
//! group (systemd's, a terminal's) does not cut its few milliseconds of work
//! short. Where the proxy is its PID namespace's first process (a
//! container's entrypoint), the kernel kills the helper with it; there the
//! ends are reset as they next send (docs/dataplanes.md).

use std::{
    io::Read as _,
    os::{
        fd::{AsFd as _, BorrowedFd},
        unix::net::UnixStream,
    },
    process::{Child, Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData, MapError};
use nix::{
    sys::signal::{SigSet, Signal},
    unistd::getppid,
};
use proxy_common::{PacketFlowKey, PacketRewrite};

use super::reset::{End, ResetError, live_ends};
use crate::config::LogFormat;

/// The hidden subcommand that runs the helper.
pub const SUBCOMMAND: &str = "packet-reset-helper";
/// How long the helper waits, after its socket's end, for its parent to be
/// gone; a parent still there let go of the helper on purpose.
const PARENT_GONE_WITHIN: Duration = Duration::from_secs(5);
/// How long a tuple may still be held by a socket of the exited proxy
/// before the reset of that end is given up.
const TUPLE_FREE_WITHIN: Duration = Duration::from_millis(500);

/// Why the helper could not start or do its work.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("starting the packet plane's reset helper ({SUBCOMMAND}): {what}: {source}")]
    Start { what: &'static str, source: std::io::Error },
    #[error("the reset helper: {what}: {source}")]
    Io { what: &'static str, source: std::io::Error },
    #[error("the reset helper got no flow map on its standard input")]
    NoMap,
    #[error("the reset helper: the flow map: {0}")]
    Map(#[from] MapError),
}

/// The proxy's side: the running helper, which resets the ends of what is
/// still spliced once this process has exited.
#[derive(Debug)]
pub struct ResetHelper {
    /// Held until the process exits; its end is the helper's signal.
    _channel: UnixStream,
    child: Option<Child>,
}

impl ResetHelper {
    /// Starts the helper and hands it `flows` (the flow map's descriptor).
    pub fn start(flows: BorrowedFd<'_>, log_format: LogFormat) -> Result<Self, HelperError> {
        let start = |what| move |source| HelperError::Start { what, source };
        let (ours, theirs) = UnixStream::pair().map_err(start("a socket pair"))?;
        let log_format = crate::config::defaults::value_name(&log_format);
        // This very binary, even if the file was replaced since it started.
        let child = Command::new("/proc/self/exe")
            .args([SUBCOMMAND, "--log-format", &log_format])
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .spawn()
            .map_err(start("spawning /proc/self/exe"))?;
        crate::fd_passing::send(&ours, b"flows", &[flows]).map_err(start("handing over the flow map"))?;
        Ok(Self { _channel: ours, child: Some(child) })
    }
}

impl Drop for ResetHelper {
    /// The helper outlives a dropped handle by at most
    /// [`PARENT_GONE_WITHIN`] when this process goes on; it is waited for
    /// off the caller's thread, so it leaves no zombie behind.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            std::thread::spawn(move || child.wait());
        }
    }
}

/// The helper's side ([`SUBCOMMAND`]): waits for the proxy to be gone, then
/// resets what it left spliced.
#[must_use]
pub fn run(log_format: LogFormat) -> ExitCode {
    crate::logging::init(log_format);
    match reset_what_is_left() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "the packet plane's reset helper failed");
            ExitCode::FAILURE
        }
    }
}

fn reset_what_is_left() -> Result<(), HelperError> {
    let io = |what| move |source| HelperError::Io { what, source };
    let mut ignored = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        ignored.add(signal);
    }
    ignored.thread_block().map_err(|e| io("blocking the stop signals")(e.into()))?;
    let parent = getppid();
    let stdin = std::io::stdin().as_fd().try_clone_to_owned().map_err(io("standard input"))?;
    let mut channel = UnixStream::from(stdin);
    let mut buffer = [0u8; 16];
    let received = crate::fd_passing::receive(&channel, &mut buffer).map_err(io("receiving the flow map"))?;
    let flows = received.fds.into_iter().next().ok_or(HelperError::NoMap)?;
    // The proxy sends nothing more: this returns at the socket's end.
    while channel.read(&mut buffer).map_err(io("waiting on the proxy"))? > 0 {}
    let deadline = Instant::now() + PARENT_GONE_WITHIN;
    while getppid() == parent {
        if Instant::now() >= deadline {
            tracing::debug!("the proxy let go of its reset helper and runs on: nothing to reset");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let map =
        HashMap::<MapData, PacketFlowKey, PacketRewrite>::try_from(Map::HashMap(MapData::from_fd(flows)?))?;
    let entries: Vec<_> = map.iter().filter_map(Result::ok).collect();
    let ends = live_ends(&entries);
    let failed = ends
        .iter()
        .filter_map(|end| reset_when_free(end).err())
        .inspect(|error| tracing::warn!(%error))
        .count();
    if !ends.is_empty() {
        tracing::warn!(
            reset = ends.len() - failed,
            failed,
            "the proxy exited with connections spliced: their ends are reset"
        );
    }
    Ok(())
}

/// Resets `end`, trying again for up to [`TUPLE_FREE_WITHIN`] while its
/// tuple is still held (a socket of the exited proxy not yet released).
fn reset_when_free(end: &End) -> Result<(), ResetError> {
    let deadline = Instant::now() + TUPLE_FREE_WITHIN;
    loop {
        match end.reset() {
            Err(error) if error.tuple_busy() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            other => return other,
        }
    }
}
