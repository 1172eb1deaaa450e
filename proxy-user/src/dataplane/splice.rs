//! The splice(2) plane: per direction, socket → pipe → socket, so the bytes
//! never enter user memory. The pipe is created only once the direction has
//! something to read, and sized with F_SETPIPE_SZ (bigger pipes mean fewer
//! system calls per byte: HAProxy's best splice configuration used 1 MiB).

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

use super::{PumpError, shutdown_write};

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
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

/// Moves one direction until EOF, then shuts the destination's write side.
pub(crate) async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    pipe_size: usize,
    copied: &AtomicU64,
) -> Result<(), PumpError> {
    from.readable().await.map_err(PumpError::Read)?;
    let pipe = Pipe::new(pipe_size).map_err(PumpError::Read)?;
    loop {
        // The pipe is empty here, so EAGAIN can only mean the socket has nothing.
        let filled = match from.try_io(Interest::READABLE, || {
            splice(from, None, &pipe.write, None, pipe.size, FLAGS).map_err(io::Error::from)
        }) {
            Ok(0) => return shutdown_write(to).map_err(PumpError::Write),
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
        copied.fetch_add(filled as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::Pipe;

    #[test]
    fn pipes_get_the_size_asked_for() {
        let pipe = Pipe::new(1 << 20).unwrap();
        assert_eq!(pipe.size, 1 << 20);
        let pipe = Pipe::new(100_000).unwrap();
        assert!(pipe.size >= 100_000);
    }
}
