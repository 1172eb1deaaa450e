//! Idle connections: the memory a peer holds for connections that carry no
//! data (the `kubectl --watch` case). Connections are opened one after the
//! other to the holder upstream until each count is reached; at each count,
//! once the upstream has accepted them all, the proxy's resident memory and
//! the kernel's socket memory are read and compared with the readings before
//! the first connection.

use std::{
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::{
    cpu::{kernel_socket_memory, tree_rss_bytes},
    servers::Holder,
};

/// Connections the client may be ahead of the upstream's accepts (so listen
/// backlogs never overflow into SYN retransmissions).
const AHEAD: usize = 512;
/// How long the upstream may take to accept every connection of a step.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Time for the proxy to finish setting up the last connections of a step.
const SETTLE: Duration = Duration::from_secs(1);

/// Memory at one count of idle connections, as differences from the reading
/// with none.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Point {
    pub connections: usize,
    /// Resident memory of the proxy (and its children) added.
    pub proxy_rss_bytes: i64,
    /// TCP socket buffer memory added (/proc/net/sockstat `mem` pages), all
    /// sockets of the machine: the client's, the proxy's two, the upstream's.
    pub tcp_buffer_bytes: i64,
    /// Kernel slab memory added (/proc/meminfo `Slab`, whole machine, so
    /// other work on the machine shows here too): socket structures, files.
    pub slab_bytes: i64,
}

impl Point {
    pub fn per_connection(&self, bytes: i64) -> f64 {
        bytes as f64 / self.connections as f64
    }
}

/// Opens connections to `addr` (a peer in front of `holder`) up to each of
/// `counts` in turn; closes them all at the end (with a reset, so no port is
/// left in TIME_WAIT). Returns the points reached, and the error that ended
/// the run early, if any.
pub fn run(
    addr: SocketAddr,
    holder: &Holder,
    proxy: Option<u32>,
    counts: &[usize],
) -> (Vec<Point>, Option<anyhow::Error>) {
    let rss = || proxy.map_or(0, tree_rss_bytes);
    let (tcp_before, slab_before) = kernel_socket_memory();
    let rss_before = rss();
    let accepted_before = holder.accepted();
    let mut clients: Vec<TcpStream> = Vec::with_capacity(counts.iter().copied().max().unwrap_or(0));
    let mut points = Vec::new();
    let result = (|| {
        for &count in counts {
            let deadline = Instant::now() + STEP_TIMEOUT;
            while clients.len() < count {
                while clients.len() >= holder.accepted() - accepted_before + AHEAD {
                    if Instant::now() > deadline {
                        bail!(
                            "{addr}: the upstream accepted {} of {} connections in {STEP_TIMEOUT:?}",
                            holder.accepted() - accepted_before,
                            clients.len()
                        );
                    }
                    thread::sleep(Duration::from_millis(1));
                }
                let stream = TcpStream::connect(addr)
                    .with_context(|| format!("opening idle connection {} to {addr}", clients.len() + 1))?;
                clients.push(stream);
            }
            while holder.accepted() - accepted_before < count {
                if Instant::now() > deadline {
                    bail!("{addr}: the upstream accepted {} of {count}", holder.accepted() - accepted_before);
                }
                thread::sleep(Duration::from_millis(10));
            }
            thread::sleep(SETTLE);
            let (tcp, slab) = kernel_socket_memory();
            points.push(Point {
                connections: count,
                proxy_rss_bytes: signed(rss()) - signed(rss_before),
                tcp_buffer_bytes: signed(tcp) - signed(tcp_before),
                slab_bytes: signed(slab) - signed(slab_before),
            });
        }
        Ok(())
    })();
    for stream in &clients {
        let _ = nix::sys::socket::setsockopt(
            stream,
            nix::sys::socket::sockopt::Linger,
            &nix::libc::linger { l_onoff: 1, l_linger: 0 },
        );
    }
    drop(clients);
    holder.clear();
    (points, result.err())
}

fn signed(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}
