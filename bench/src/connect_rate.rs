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

use crate::{
    cpu::{clock_ticks_per_second, idle_seconds, ncpu, tree_ticks},
    latency::percentile_us,
};

/// Client threads opening connections one after the other, each, when
/// `--clients` is not given.
pub const DEFAULT_CLIENTS: usize = 4;
/// How long one connection may take to bring its first byte.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    pub connections_per_s: f64,
    /// Time from the start of connect() to the upstream's first byte.
    pub ttfb_p50_us: f64,
    pub ttfb_p99_us: f64,
    /// Whole-machine busy time (ncpu × wall − Δidle) per connection: the
    /// clients, the greeter, the DNS server, the peer and the kernel.
    pub machine_cpu_us_per_connection: f64,
    /// The peer process's own CPU (utime + stime of its tree, tick-sampled)
    /// per connection; none for direct.
    pub proxy_cpu_us_per_connection: Option<f64>,
    /// Connections made.
    pub connections: u64,
    /// Queries the bench's DNS server answered per connection, for a peer
    /// that resolves the upstream's name: below 1 with a lookup for every
    /// connection means lookups were shared (a connection joins one already
    /// in flight for the same name; HAProxy's `do-resolve` also takes the
    /// answer its lookup got earlier in the same millisecond).
    pub dns_queries_per_connection: Option<f64>,
}

/// `clients` threads make connections to `addr` with `connection` again
/// and again for `duration` (one whole connection, returning the time to
/// what it measures: [`first_byte`], a whole answer); `proxy`: the PID of
/// the peer's process, whose CPU is read.
pub fn run_with(
    addr: SocketAddr,
    clients: usize,
    proxy: Option<u32>,
    duration: Duration,
    connection: impl Fn(SocketAddr) -> Result<Duration> + Sync,
) -> Result<Sample> {
    let idle_before = idle_seconds()?;
    let ticks_before = proxy.map(tree_ticks);
    let started = Instant::now();
    let connection = &connection;
    let per_client: Vec<Vec<u64>> = thread::scope(|scope| {
        let clients: Vec<_> = (0..clients)
            .map(|_| scope.spawn(move || connect_repeatedly(addr, started, duration, connection)))
            .collect();
        clients.into_iter().map(|client| client.join().expect("client thread panicked")).collect::<Vec<_>>()
    })
    .into_iter()
    .collect::<Result<_>>()?;
    let wall = started.elapsed().as_secs_f64();
    let busy_s = (ncpu() as f64 * wall - (idle_seconds()? - idle_before)).max(0.0);
    let proxy_s = proxy
        .map(tree_ticks)
        .zip(ticks_before)
        .map(|(after, before)| after.saturating_sub(before) as f64 / clock_ticks_per_second());
    let mut ttfb_ns: Vec<u64> = per_client.into_iter().flatten().collect();
    ttfb_ns.sort_unstable();
    let connections = ttfb_ns.len().max(1) as f64;
    Ok(Sample {
        connections_per_s: ttfb_ns.len() as f64 / wall,
        machine_cpu_us_per_connection: busy_s * 1e6 / connections,
        proxy_cpu_us_per_connection: proxy_s.map(|s| s * 1e6 / connections),
        ttfb_p50_us: percentile_us(&ttfb_ns, 0.50),
        ttfb_p99_us: percentile_us(&ttfb_ns, 0.99),
        connections: ttfb_ns.len() as u64,
        dns_queries_per_connection: None,
    })
}

/// The times `connection` measured, in nanoseconds, of every connection
/// made.
fn connect_repeatedly(
    addr: SocketAddr,
    started: Instant,
    duration: Duration,
    connection: &impl Fn(SocketAddr) -> Result<Duration>,
) -> Result<Vec<u64>> {
    let mut ttfb_ns = Vec::new();
    while started.elapsed() < duration {
        let took = connection(addr)?;
        ttfb_ns.push(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
    }
    Ok(ttfb_ns)
}

/// One connection to the greeter: the time from connect() to its byte.
pub fn first_byte(addr: SocketAddr) -> Result<Duration> {
    let opened = Instant::now();
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(STALL_TIMEOUT))?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).with_context(|| format!("waiting for the first byte through {addr}"))?;
    let took = opened.elapsed();
    // The upstream closes first: wait for its FIN, so this side does not
    // hold the port in TIME_WAIT.
    let _ = stream.read(&mut byte);
    Ok(took)
}
