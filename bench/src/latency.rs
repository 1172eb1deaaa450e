//! Request/response latency: one persistent connection through the peer to
//! the echo server, TCP_NODELAY, one request of `size` bytes at a time, the
//! round trip timed until all `size` bytes are back.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::Serialize;

/// Round trips before the measured ones (connection set-up, first allocations).
const WARM_UP: usize = 500;
/// How long one round trip may take before the measurement fails.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The request sizes measured: 1 byte, and 16 KiB.
pub const SIZES: [usize; 2] = [1, 16 * 1024];

/// Percentiles of one run's round trips, in microseconds.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

pub fn size_name(size: usize) -> String {
    if size >= 1024 { format!("{} KiB", size / 1024) } else { format!("{size} B") }
}

/// `count` round trips of `size` bytes through `addr`.
pub fn run(addr: SocketAddr, size: usize, count: usize) -> Result<Sample> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(STALL_TIMEOUT))?;
    stream.set_write_timeout(Some(STALL_TIMEOUT))?;
    let request = vec![0xa5u8; size];
    let mut response = vec![0u8; size];
    let mut rtts_ns: Vec<u64> = Vec::with_capacity(count);
    for i in 0..WARM_UP + count {
        let started = Instant::now();
        stream.write_all(&request).context("sending a request")?;
        stream.read_exact(&mut response).context("reading the echo")?;
        if i >= WARM_UP {
            rtts_ns.push(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
    }
    if response != request {
        anyhow::bail!("the echo of {size} bytes through {addr} differs from what was sent");
    }
    rtts_ns.sort_unstable();
    Ok(Sample {
        p50_us: percentile_us(&rtts_ns, 0.50),
        p99_us: percentile_us(&rtts_ns, 0.99),
        p999_us: percentile_us(&rtts_ns, 0.999),
    })
}

/// The value below which a share `q` of the sorted samples lie (nearest rank).
pub fn percentile_us(sorted_ns: &[u64], q: f64) -> f64 {
    if sorted_ns.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted_ns.len() as f64).ceil() as usize).clamp(1, sorted_ns.len());
    sorted_ns[rank - 1] as f64 / 1000.0
}
