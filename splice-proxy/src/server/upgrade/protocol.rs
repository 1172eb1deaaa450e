//! Graceful binary upgrade (`--upgrade-socket PATH`): a new process takes
//! the listening sockets over from the running one without a connection
//! being refused.
//!
//! Why socket passing and not an SO_REUSEPORT overlap between the two
//! processes: with SO_REUSEPORT each socket has an accept queue of its own
//! and the kernel spreads new connections over a group's sockets by hash;
//! when the old process closes a socket, the connections waiting in *its*
//! queue are reset, so some would be refused at every upgrade. Passing the
//! sockets themselves (SCM_RIGHTS) keeps every queue: both processes accept
//! from them during the overlap, the old one stops, and the queues live on
//! in the new process; nothing waiting in them is lost. A listener's group
//! (with `listen_sockets = "per-worker"` or `"per-cpu"` a socket per
//! worker, [`crate::server::listeners`]) is passed whole for that reason;
//! a `per-cpu` group's steering program belongs to the group and goes with
//! it (the new process attaches its own, or takes it off in another mode). It also
//! works for the admin endpoint's socket, and needs no socket option the
//! operator has to know about.
//!
//! The new process accepts on the sockets it got, as many as they are (its
//! workers share them if it has more workers; a worker takes several if it
//! has fewer), and adds none to a group it took over: a socket it added
//! would take connections at once and reset them if the upgrade failed. A
//! changed worker count or `listen_sockets` has its own group size at the
//! next restart. An older version takes one socket of each group and closes
//! the others; the connections waiting in those when the old process closes
//! its copies are reset, and one that finds `more` lines (more sockets than
//! one message carries) refuses the upgrade, so the old process goes on
//! serving.
//!
//! The exchange, on a Unix stream socket at PATH that the running process
//! listens on:
//! 1. new → old: `take\n`;
//! 2. old → new: text lines `listen CONFIGURED BOUND` (one per socket: a
//!    listener's SO_REUSEPORT group is several sockets with the same
//!    addresses) and `admin CONFIGURED BOUND`, with the sockets as
//!    SCM_RIGHTS in the same order, in messages of at most
//!    [`fd_passing::MAX_FDS`] sockets; each but the last ends with a line
//!    `more`;
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
/// The last line of a message another follows.
const MORE: &str = "more";

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
    let (mut listeners, mut admin) = (Vec::new(), None);
    let mut text = vec![0u8; 64 * 1024];
    loop {
        let received = fd_passing::receive(&stream, &mut text).map_err(io("receiving the sockets"))?;
        let answer = String::from_utf8_lossy(&text[..received.len]).into_owned();
        let bad = |why| UpgradeError::Protocol { path: path.into(), answer: answer.clone(), why };
        if received.truncated {
            return Err(bad("more sockets in one message than it may carry"));
        }
        if received.len == 0 {
            return Err(bad("nothing (it closed the connection)"));
        }
        let mut fds = received.fds.into_iter();
        let mut more = false;
        for line in answer.lines() {
            if line == MORE {
                more = true;
                continue;
            }
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
        if !more {
            return Ok(Some(Handover { listeners, admin, stream }));
        }
    }
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
    let listeners = listeners.iter().map(|(configured, bound, fd)| ("listen", configured.0, bound.0, fd));
    let admin = admin.map(|(configured, bound, fd)| ("admin", *configured, *bound, fd));
    let sockets: Vec<_> = listeners.chain(admin).collect();
    let mut messages = sockets.chunks(fd_passing::MAX_FDS).peekable();
    while let Some(message) = messages.next() {
        let mut text = String::new();
        for (kind, configured, bound, _) in message {
            text.push_str(&format!("{kind} {configured} {bound}\n"));
        }
        if messages.peek().is_some() {
            text.push_str(MORE);
            text.push('\n');
        }
        let fds: Vec<_> = message.iter().map(|(.., fd)| fd.as_fd()).collect();
        fd_passing::send(&stream, text.as_bytes(), &fds)?;
    }
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

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn a_hand_over_of_more_sockets_than_one_message_carries_arrives_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("upgrade.sock");
        let upgrade_socket = UnixListener::bind(&path).unwrap();
        let sockets: Vec<_> = (0..2 * fd_passing::MAX_FDS + 3)
            .map(|_| {
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let bound = ListenAddr(listener.local_addr().unwrap());
                (ListenAddr("127.0.0.1:0".parse().unwrap()), bound, OwnedFd::from(listener))
            })
            .collect();
        let admin_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let admin_addr = admin_listener.local_addr().unwrap();
        let admin = (admin_addr, admin_addr, OwnedFd::from(admin_listener));
        let expected: Vec<_> = sockets.iter().map(|(_, bound, _)| bound.0).collect();
        let old = std::thread::spawn(move || {
            let (stream, _) = upgrade_socket.accept().unwrap();
            hand_over(stream, &sockets, Some(&admin)).unwrap()
        });

        let handover = take_over(&path).unwrap().expect("a process listens");
        let got: Vec<_> = handover.listeners.iter().map(|h| h.bound).collect();
        assert_eq!(got, expected);
        for handed in &handover.listeners {
            let socket = std::net::TcpListener::from(handed.fd.try_clone().unwrap());
            assert_eq!(socket.local_addr().unwrap(), handed.bound, "each line comes with its own socket");
        }
        let admin = handover.admin.as_ref().expect("the admin socket");
        assert_eq!(admin.bound, admin_addr);
        handover.ready().unwrap();
        assert!(old.join().unwrap(), "the old process saw `ready`");
    }
}
