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

use super::both_ways::{Behind, Pump, PumpEnd, PumpError, end_follows, send_last, try_read_all_there_is};

/// Size of a direction's buffer at first; it doubles up to the configured
/// size each time a read fills it. A short exchange (a TLS handshake, an API
/// call) never needs the full buffer, and allocating and zeroing 128 KiB per
/// direction showed in the connection set-up profile.
const FIRST_BUFFER: usize = 16 << 10;

/// How the copy plane moves one direction: `buffer_size` is its largest
/// buffer (`--copy-buffer-size`).
#[derive(Debug, Clone, Copy)]
pub struct CopyPump {
    pub buffer_size: usize,
}

impl Pump for CopyPump {
    /// Copies one direction until EOF; the last bytes take the end with
    /// them when it comes right behind them. Called once the source has a
    /// byte ([`super::both_ways::data_or_eof`]).
    async fn run(self, from: &TcpStream, to: &TcpStream, moved: &AtomicU64) -> Result<PumpEnd, PumpError> {
        let mut buf = vec![0u8; self.buffer_size.min(FIRST_BUFFER)];
        loop {
            let mut n = read_some(from, &mut buf).await.map_err(PumpError::Read)?;
            if n == 0 {
                return Ok(PumpEnd::ToSend);
            }
            let behind = end_follows(from, &mut buf, &mut n);
            if let Behind::End = behind {
                let sent = send_last(to, &buf[..n]).map_err(PumpError::Write)?;
                if sent < n {
                    write_all(to, &buf[sent..n]).await.map_err(PumpError::Write)?;
                }
                moved.fetch_add(n as u64, Ordering::Relaxed);
                return Ok(if sent < n { PumpEnd::ToSend } else { PumpEnd::Sent });
            }
            write_all(to, &buf[..n]).await.map_err(PumpError::Write)?;
            moved.fetch_add(n as u64, Ordering::Relaxed);
            if let Behind::Failure(error) = behind {
                return Err(PumpError::Read(error));
            }
            if n == buf.len() && buf.len() < self.buffer_size {
                buf.resize((buf.len() * 2).min(self.buffer_size), 0);
            }
        }
    }
}

/// Reads what is there, waiting until something (or EOF) is.
pub(crate) async fn read_some(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match try_read_all_there_is(from, buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => from.readable().await?,
            result => return result,
        }
    }
}

/// Writes all of `data`, waiting for room as needed.
pub(crate) async fn write_all(to: &TcpStream, data: &[u8]) -> io::Result<()> {
    let mut written = 0;
    while written < data.len() {
        match to.try_write(&data[written..]) {
            Ok(k) => written += k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
