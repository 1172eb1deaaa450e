//! The splice(2) plane: per direction, socket → pipe → socket, so the bytes
//! never enter user memory. The pipe is created only once the direction has
//! something to read, and grows with F_SETPIPE_SZ up to the configured size
//! while the direction fills it (bigger pipes mean fewer system calls per
//! byte: HAProxy's best splice configuration used 1 MiB).

use std::{
    io,
    os::fd::OwnedFd,
    sync::atomic::{AtomicU64, Ordering},
};

use nix::{
    fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice},
    unistd::pipe2,
};
use tokio::{io::Interest, net::TcpStream};

use super::both_ways::{Pump, PumpEnd, PumpError};

/// A pipe with its read and write ends.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// The capacity the kernel granted.
    pub size: usize,
}

impl Pipe {
    /// A non-blocking pipe of `size` bytes (rounded up by the kernel to pages).
    pub fn new(size: usize) -> io::Result<Self> {
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let wanted = i32::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let granted = fcntl(&write, FcntlArg::F_SETPIPE_SZ(wanted))?;
        Ok(Self { read, write, size: usize::try_from(granted).unwrap_or(size) })
    }

    /// Asks for `size` bytes of capacity (the pipe must hold no more than
    /// that); keeps the current one if the kernel refuses (an unprivileged
    /// user over `pipe-user-pages-soft`), and says whether it grew.
    fn grow(&mut self, size: usize) -> bool {
        let Ok(wanted) = i32::try_from(size) else { return false };
        match fcntl(&self.write, FcntlArg::F_SETPIPE_SZ(wanted)) {
            Ok(granted) => {
                self.size = usize::try_from(granted).unwrap_or(self.size);
                true
            }
            Err(_) => false,
        }
    }
}

/// Capacity of a direction's pipe at first; it doubles up to the configured
/// size each time one splice fills it. A short exchange never needs 1 MiB,
/// and the kernel allocates the pipe's slot array for the whole capacity up
/// front.
const FIRST_PIPE: usize = 64 << 10;

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

/// How the splice plane moves one direction: `pipe_size` is its largest
/// pipe (`--splice-pipe-size`).
#[derive(Debug, Clone, Copy)]
pub struct SplicePump {
    pub pipe_size: usize,
}

impl Pump for SplicePump {
    /// Moves one direction until EOF. Called once the source has a byte
    /// ([`super::both_ways::data_or_eof`]).
    async fn run(self, from: &TcpStream, to: &TcpStream, moved: &AtomicU64) -> Result<PumpEnd, PumpError> {
        let mut pipe = Pipe::new(self.pipe_size.min(FIRST_PIPE)).map_err(PumpError::Read)?;
        let mut largest = self.pipe_size;
        loop {
            // The pipe is empty here, so EAGAIN can only mean the socket has nothing.
            let filled = match from.try_io(Interest::READABLE, || {
                splice(from, None, &pipe.write, None, pipe.size, FLAGS).map_err(io::Error::from)
            }) {
                Ok(0) => return Ok(PumpEnd::ToSend),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    from.readable().await.map_err(PumpError::Read)?;
                    continue;
                }
                Err(e) => return Err(PumpError::Read(e)),
            };
            let mut in_pipe = filled;
            while in_pipe > 0 {
                match to.try_io(Interest::WRITABLE, || {
                    splice(&pipe.read, None, to, None, in_pipe, FLAGS).map_err(io::Error::from)
                }) {
                    Ok(n) => in_pipe -= n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        to.writable().await.map_err(PumpError::Write)?;
                    }
                    Err(e) => return Err(PumpError::Write(e)),
                }
            }
            moved.fetch_add(filled as u64, Ordering::Relaxed);
            if filled == pipe.size && pipe.size < largest && !pipe.grow((pipe.size * 2).min(largest)) {
                // Refused once, not asked again for every splice.
                largest = pipe.size;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Pipe;

    #[test]
    fn a_pipe_grows_when_asked() {
        let mut pipe = Pipe::new(super::FIRST_PIPE).unwrap();
        assert_eq!(pipe.size, super::FIRST_PIPE);
        assert!(pipe.grow(1 << 20));
        assert_eq!(pipe.size, 1 << 20);
    }

    #[test]
    fn pipes_get_the_size_asked_for() {
        let pipe = Pipe::new(1 << 20).unwrap();
        assert_eq!(pipe.size, 1 << 20);
        let pipe = Pipe::new(100_000).unwrap();
        assert!(pipe.size >= 100_000);
    }
}
