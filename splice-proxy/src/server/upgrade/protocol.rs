//! Graceful binary upgrade (`--upgrade-socket PATH`): a new process takes
//! the listening sockets over from the running one without a connection
//! being refused.
//!
//! Why socket passing and not SO_REUSEPORT overlap: with SO_REUSEPORT each
//! process has a listening socket of its own and the kernel spreads new
//! connections over them by hash; when the old process closes its socket,
//! the connections waiting in *its* accept queue are reset, so some are
//! refused at every upgrade, and a port-0 listener could not be shared at
//! all. Passing the socket itself (SCM_RIGHTS) keeps one accept queue: both
//! processes accept from it during the overlap, the old one stops, and the
//! queue lives on in the new process; nothing waiting in it is lost. It also
//! works for the admin endpoint's socket, and needs no socket option the
//! operator has to know about.
//!
//! The exchange, on a Unix stream socket at PATH that the running process
//! listens on:
//! 1. new → old: `take\n`;
//! 2. old → new: one message, text lines `listen CONFIGURED BOUND` (one per
//!    listener) and `admin CONFIGURED BOUND`, with the sockets as
//!    SCM_RIGHTS in the same order;
//! 3. the new process binds what it did not get, starts accepting on
//!    everything, takes PATH over (a socket bound beside it, renamed onto
//!    it) and sends `ready\n`;
//! 4. the old process stops accepting (its copies close; the sockets stay
//!    open in the new one) and drains its connections as on SIGTERM.
//!
//! If the new process fails before step 3 (or closes the connection), the
//! old one goes on serving as if nothing happened.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    os::{
        fd::{AsFd as _, OwnedFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{addr::ListenAddr, fd_passing};

/// How long the new process waits for the old one's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
const TAKE: &[u8] = b"take\n";
const READY: &[u8] = b"ready\n";

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("upgrade socket {path} (upgrade_socket, --upgrade-socket): {what}: {source}")]
    Io { path: PathBuf, what: &'static str, source: std::io::Error },
    #[error("upgrade socket {path}: the running process answered {answer:?}: {why}")]
    Protocol { path: PathBuf, answer: String, why: &'static str },
}

/// One socket handed over: as configured in the old process, as bound, the socket.
#[derive(Debug)]
pub struct HandedSocket {
    pub configured: SocketAddr,
    pub bound: SocketAddr,
    pub fd: OwnedFd,
}

/// What the new process got from the old one.
#[derive(Debug)]
pub struct Handover {
    pub listeners: Vec<HandedSocket>,
    pub admin: Option<HandedSocket>,
    /// To send `ready` on once this process accepts.
    stream: UnixStream,
}

impl Handover {
    /// Tells the old process this one accepts on every socket now: it stops
    /// accepting and drains.
    pub fn ready(mut self) -> std::io::Result<()> {
        self.stream.write_all(READY)
    }
}

/// The new process: asks the process listening on `path` for its sockets.
/// `Ok(None)`: nobody listens there (a first start, or a stale file).
pub fn take_over(path: &Path) -> Result<Option<Handover>, UpgradeError> {
    let io = |what| move |source| UpgradeError::Io { path: path.into(), what, source };
    let mut stream = match UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(e)
            if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(io("connecting")(e)),
    };
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(io("setting a timeout"))?;
    stream.write_all(TAKE).map_err(io("asking for the sockets"))?;
    let mut text = vec![0u8; 64 * 1024];
    let received = fd_passing::receive(&stream, &mut text).map_err(io("receiving the sockets"))?;
    if received.truncated {
        return Err(UpgradeError::Protocol {
            path: path.into(),
            answer: String::new(),
            why: "more sockets than one hand-over carries (80)",
        });
    }
    let (len, fds) = (received.len, received.fds);
    let answer = String::from_utf8_lossy(&text[..len]).into_owned();
    let bad = |why| UpgradeError::Protocol { path: path.into(), answer: answer.clone(), why };
    let mut fds = fds.into_iter();
    let (mut listeners, mut admin) = (Vec::new(), None);
    for line in answer.lines() {
        let mut words = line.split(' ');
        let (kind, configured, bound) = (words.next(), words.next(), words.next());
        let (Some(configured), Some(bound)) =
            (configured.and_then(|a| a.parse().ok()), bound.and_then(|a| a.parse().ok()))
        else {
            return Err(bad("a line without two addresses"));
        };
        let fd = fds.next().ok_or_else(|| bad("fewer sockets than lines"))?;
        let socket = HandedSocket { configured, bound, fd };
        match kind {
            Some("listen") => listeners.push(socket),
            Some("admin") => admin = Some(socket),
            _ => return Err(bad("an unknown line")),
        }
    }
    if len == 0 {
        return Err(bad("nothing (it closed the connection)"));
    }
    Ok(Some(Handover { listeners, admin, stream }))
}

/// The old process's side: sends `listeners` and `admin` (configured,
/// bound, socket) on `stream` once the new process asked, then waits for its
/// `ready`. Blocking; returns whether the new process took over.
pub fn hand_over(
    mut stream: UnixStream,
    listeners: &[(ListenAddr, ListenAddr, OwnedFd)],
    admin: Option<&(SocketAddr, SocketAddr, OwnedFd)>,
) -> std::io::Result<bool> {
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    let mut request = [0u8; TAKE.len()];
    stream.read_exact(&mut request)?;
    if request != TAKE {
        return Ok(false);
    }
    let mut text = String::new();
    let mut fds = Vec::new();
    for (configured, bound, fd) in listeners {
        text.push_str(&format!("listen {configured} {bound}\n"));
        fds.push(fd.as_fd());
    }
    if let Some((configured, bound, fd)) = admin {
        text.push_str(&format!("admin {configured} {bound}\n"));
        fds.push(fd.as_fd());
    }
    fd_passing::send(&stream, text.as_bytes(), &fds)?;
    // The new process has to start (kernel programs, resolver, binding the
    // rest) before it is ready: no timeout here; a failed start closes the stream.
    stream.set_read_timeout(None)?;
    let mut ready = [0u8; READY.len()];
    Ok(stream.read_exact(&mut ready).is_ok() && ready == READY)
}

/// Listens on `path`, replacing whatever is there: a stale socket file, or
/// the old process's socket after a hand-over (bound beside it and renamed
/// onto it, so a later upgrade never finds no socket at all).
pub fn listen(path: &Path) -> Result<UnixListener, UpgradeError> {
    let io = |what| move |source| UpgradeError::Io { path: path.into(), what, source };
    let mut beside = path.as_os_str().to_owned();
    beside.push(format!(".{}", std::process::id()));
    let beside = PathBuf::from(beside);
    let _ = std::fs::remove_file(&beside);
    let listener = UnixListener::bind(&beside).map_err(io("binding"))?;
    std::fs::rename(&beside, path).map_err(io("renaming the new socket onto it"))?;
    listener.set_nonblocking(true).map_err(io("making it non-blocking"))?;
    Ok(listener)
}
