//! The upstream servers the peers forward to, one kind per workload, each on
//! its own port (where the topology puts upstreams) with threads of the
//! bench's own process.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
};

use anyhow::Result;

use crate::topology::Topology;

/// Buffer size of the sink's and the echo server's reads.
const READ_BUFFER: usize = 256 * 1024;

/// Reads each connection to EOF, then writes one byte, so the client's
/// measurement ends only when every byte has arrived.
pub fn start_sink(topology: &Topology) -> Result<SocketAddr> {
    serve_each(topology, |mut stream| {
        let mut buf = vec![0u8; READ_BUFFER];
        while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
        let _ = stream.write_all(&[1]);
    })
}

/// Writes back every byte it reads, until EOF (TCP_NODELAY on).
pub fn start_echo(topology: &Topology) -> Result<SocketAddr> {
    serve_each(topology, |mut stream| {
        let _ = stream.set_nodelay(true);
        let mut buf = vec![0u8; READ_BUFFER];
        while let Ok(n @ 1..) = stream.read(&mut buf) {
            if stream.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    })
}

/// A thread per connection running `serve`.
fn serve_each(topology: &Topology, serve: fn(TcpStream)) -> Result<SocketAddr> {
    let listener = topology.upstream_listener()?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            thread::spawn(move || serve(stream));
        }
    });
    Ok(addr)
}

/// Writes one byte to each connection as soon as it is accepted, then closes
/// it (the server closes first, so no client port waits in TIME_WAIT). On
/// the accepting thread: no thread per connection.
pub fn start_greeter(topology: &Topology) -> Result<SocketAddr> {
    let listener = topology.upstream_listener()?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for mut stream in listener.incoming().map_while(Result::ok) {
            let _ = stream.write_all(&[1]);
        }
    });
    Ok(addr)
}

/// Accepts connections and holds them open without reading, until cleared.
pub struct Holder {
    pub addr: SocketAddr,
    held: Arc<Mutex<Vec<TcpStream>>>,
    accepted: Arc<AtomicUsize>,
}

impl Holder {
    pub fn start(topology: &Topology) -> Result<Self> {
        let listener = topology.upstream_listener()?;
        let addr = listener.local_addr()?;
        let held = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (held_by_thread, accepted_by_thread) = (Arc::clone(&held), Arc::clone(&accepted));
        thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                held_by_thread.lock().unwrap_or_else(|p| p.into_inner()).push(stream);
                accepted_by_thread.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(Self { addr, held, accepted })
    }

    /// Connections accepted so far (a proxy's readiness probes count too).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Closes every held connection.
    pub fn clear(&self) {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.clear();
    }
}
