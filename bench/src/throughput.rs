//! The throughput scenarios and one measurement of one: bytes sent, wall time
//! until the sink has read them all, whole-machine busy time over that wall
//! time (ncpu × wall − Δidle, see [`crate::cpu`]), and the proxy process's
//! own CPU ticks.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::Barrier,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::{
    cpu::{clock_ticks_per_second, idle_seconds, ncpu, tree_ticks},
    proxy_counters::ByteCounters,
};

/// Size of each write to the peer.
const WRITE_SIZE: usize = 256 * 1024;
/// Size of each write of the paced sender, made on its schedule.
const PACED_CHUNK: usize = 64 * 1024;
/// How long a write, or the wait for the sink's final byte, may block.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug)]
pub enum Scenario {
    /// `streams` connections at once, each sending as fast as it can.
    FullSpeed { streams: usize },
    /// `streams` connections at once, each sending at a fixed rate.
    Paced { streams: usize, gbit_per_s: f64 },
}

impl Scenario {
    /// With the `--scenario` name of each.
    pub const ALL: [(&str, Self); 5] = [
        ("1", Self::FullSpeed { streams: 1 }),
        ("8", Self::FullSpeed { streams: 8 }),
        ("64", Self::FullSpeed { streams: 64 }),
        ("paced", Self::Paced { streams: 1, gbit_per_s: 3.0 }),
        // Several flows of a host behind an NLB, each well under EC2's 5 Gbit/s per flow.
        ("paced8", Self::Paced { streams: 8, gbit_per_s: 0.5 }),
    ];

    pub fn title(self) -> String {
        match self {
            Self::FullSpeed { streams: 1 } => "1 stream, full speed".into(),
            Self::FullSpeed { streams } => format!("{streams} streams, full speed"),
            Self::Paced { streams: 1, gbit_per_s } => format!("1 stream paced at {gbit_per_s} Gbit/s"),
            Self::Paced { streams, gbit_per_s } => {
                format!("{streams} streams paced at {gbit_per_s} Gbit/s each")
            }
        }
    }

    pub fn streams(self) -> usize {
        match self {
            Self::FullSpeed { streams } | Self::Paced { streams, .. } => streams,
        }
    }
}

/// One measured run.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    /// All streams together, over the wall time.
    pub gbit_per_s: f64,
    /// Whole-machine busy time as a share of ncpu × wall.
    pub busy_percent: f64,
    /// Busy core-seconds per 10^9 bytes carried.
    pub core_s_per_gb: f64,
    /// The proxy process's own CPU (with its children: nginx's workers,
    /// socat's per-connection processes) per 10^9 bytes, from its tick
    /// counters; None for direct.
    pub proxy_core_s_per_gb: Option<f64>,
    /// splice-proxy only: the share of the bytes forwarded (both ways) that
    /// the kernel redirected, from its counters, in percent.
    pub kernel_percent: Option<f64>,
}

/// Connects every stream of `scenario` to `addr`, sends for `duration`, and
/// waits until the sink has read every byte of every stream. `proxy` is the
/// PID of the process in between, if any; `admin` splice-proxy's admin
/// endpoint, where the kernel's share is read once the run is over.
pub fn run(
    scenario: Scenario,
    addr: SocketAddr,
    duration: Duration,
    proxy: Option<u32>,
    admin: Option<SocketAddr>,
) -> Result<Sample> {
    let counters_before = admin.map(ByteCounters::read).transpose()?;
    let streams: Vec<TcpStream> = (0..scenario.streams())
        .map(|_| connect(addr))
        .collect::<Result<_>>()
        .with_context(|| format!("connecting to {addr}"))?;
    // The senders start together, after the clock and the idle counter.
    let start = Barrier::new(streams.len() + 1);
    let (sent, wall, idle, proxy_ticks) = thread::scope(|scope| {
        let senders: Vec<_> = streams
            .into_iter()
            .map(|stream| {
                let start = &start;
                scope.spawn(move || {
                    start.wait();
                    send_then_wait_for_sink(stream, scenario, duration)
                })
            })
            .collect();
        let idle_before = idle_seconds();
        let ticks_before = proxy.map(tree_ticks);
        let started = Instant::now();
        start.wait();
        let mut sent = 0u64;
        for sender in senders {
            sent += sender.join().expect("sender thread panicked")?;
        }
        let wall = started.elapsed().as_secs_f64();
        let ticks =
            proxy.map(tree_ticks).zip(ticks_before).map(|(after, before)| after.saturating_sub(before));
        anyhow::Ok((sent, wall, idle_seconds()? - idle_before?, ticks))
    })?;
    let capacity = ncpu() as f64 * wall;
    let busy = (capacity - idle).max(0.0);
    let gb = sent as f64 / 1e9;
    let kernel_percent = admin
        .zip(counters_before)
        .map(|(admin, before)| before.kernel_percent_since(admin, sent))
        .transpose()?;
    Ok(Sample {
        kernel_percent,
        gbit_per_s: gb * 8.0 / wall,
        busy_percent: 100.0 * busy / capacity,
        core_s_per_gb: busy / gb,
        proxy_core_s_per_gb: proxy_ticks.map(|ticks| ticks as f64 / clock_ticks_per_second() / gb),
    })
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect(addr)?;
    stream.set_write_timeout(Some(STALL_TIMEOUT))?;
    stream.set_read_timeout(Some(STALL_TIMEOUT))?;
    Ok(stream)
}

/// Returns the bytes sent.
fn send_then_wait_for_sink(mut stream: TcpStream, scenario: Scenario, duration: Duration) -> Result<u64> {
    let started = Instant::now();
    let mut sent = 0u64;
    match scenario {
        Scenario::FullSpeed { .. } => {
            let buf = vec![0x5au8; WRITE_SIZE];
            while started.elapsed() < duration {
                stream.write_all(&buf).context("sending")?;
                sent += buf.len() as u64;
            }
        }
        Scenario::Paced { gbit_per_s, .. } => {
            let buf = vec![0x5au8; PACED_CHUNK];
            let bytes_per_s = gbit_per_s * 1e9 / 8.0;
            while started.elapsed() < duration {
                // The next chunk is due once the schedule has reached the
                // bytes already sent; behind schedule, it goes at once.
                let due = Duration::from_secs_f64(sent as f64 / bytes_per_s);
                if let Some(early) = due.checked_sub(started.elapsed()) {
                    thread::sleep(early);
                }
                stream.write_all(&buf).context("sending")?;
                sent += buf.len() as u64;
            }
        }
    }
    stream.shutdown(Shutdown::Write)?;
    // The sink answers with one byte once it has read everything.
    let mut done = [0u8; 1];
    stream.read_exact(&mut done).context("waiting for the sink to have read everything")?;
    Ok(sent)
}
