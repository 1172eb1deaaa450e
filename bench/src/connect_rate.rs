//! Connection set-up: new connections per second through the peer, each
//! complete when the upstream's first byte has arrived (the greeter writes
//! one byte on accept and closes), with the time to that first byte.

use std::{
    io::Read as _,
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::latency::percentile_us;

/// Client threads opening connections one after the other, each.
pub const CLIENTS: usize = 4;
/// How long one connection may take to bring its first byte.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    pub connections_per_s: f64,
    /// Time from the start of connect() to the upstream's first byte.
    pub ttfb_p50_us: f64,
    pub ttfb_p99_us: f64,
}

/// [`CLIENTS`] threads connect to `addr` again and again for `duration`.
pub fn run(addr: SocketAddr, duration: Duration) -> Result<Sample> {
    let started = Instant::now();
    let per_client: Vec<Vec<u64>> = thread::scope(|scope| {
        let clients: Vec<_> =
            (0..CLIENTS).map(|_| scope.spawn(move || connect_repeatedly(addr, started, duration))).collect();
        clients.into_iter().map(|client| client.join().expect("client thread panicked")).collect::<Vec<_>>()
    })
    .into_iter()
    .collect::<Result<_>>()?;
    let wall = started.elapsed().as_secs_f64();
    let mut ttfb_ns: Vec<u64> = per_client.into_iter().flatten().collect();
    ttfb_ns.sort_unstable();
    Ok(Sample {
        connections_per_s: ttfb_ns.len() as f64 / wall,
        ttfb_p50_us: percentile_us(&ttfb_ns, 0.50),
        ttfb_p99_us: percentile_us(&ttfb_ns, 0.99),
    })
}

/// Times to first byte, in nanoseconds, of every connection made.
fn connect_repeatedly(addr: SocketAddr, started: Instant, duration: Duration) -> Result<Vec<u64>> {
    let mut ttfb_ns = Vec::new();
    while started.elapsed() < duration {
        let opened = Instant::now();
        let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(STALL_TIMEOUT))?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).with_context(|| format!("waiting for the first byte through {addr}"))?;
        ttfb_ns.push(u64::try_from(opened.elapsed().as_nanos()).unwrap_or(u64::MAX));
        // The upstream closes first: wait for its FIN, so this side does not
        // hold the port in TIME_WAIT.
        let _ = stream.read(&mut byte);
    }
    Ok(ttfb_ns)
}
