//! The userspace copy plane: one buffer per direction, allocated only once
//! the direction has something to read (an idle connection holds none).
//!
//! Written here rather than with `tokio::io::copy_bidirectional` because that
//! returns no byte counts when a side fails and cannot carry a reset.

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
};

use tokio::net::TcpStream;

use super::{PumpError, shutdown_write};

/// Copies one direction until EOF, then shuts the destination's write side.
pub(crate) async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    buffer_size: usize,
    copied: &AtomicU64,
) -> Result<(), PumpError> {
    from.readable().await.map_err(PumpError::Read)?;
    let mut buf = vec![0u8; buffer_size];
    loop {
        let n = match from.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                from.readable().await.map_err(PumpError::Read)?;
                continue;
            }
            Err(e) => return Err(PumpError::Read(e)),
        };
        if n == 0 {
            return shutdown_write(to).map_err(PumpError::Write);
        }
        let mut written = 0;
        while written < n {
            match to.try_write(&buf[written..n]) {
                Ok(k) => written += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    to.writable().await.map_err(PumpError::Write)?;
                }
                Err(e) => return Err(PumpError::Write(e)),
            }
        }
        copied.fetch_add(n as u64, Ordering::Relaxed);
    }
}
