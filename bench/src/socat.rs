//! socat as a peer: one forked process per connection (`fork`), TCP_NODELAY
//! on both sides like the other proxies, and 30 s (not 0.5 s) for the other
//! direction to finish after one side's EOF (the sink answers only after it).

use std::{net::SocketAddr, path::Path, process::Stdio};

use anyhow::{Context as _, Result};

use crate::{process::Process, topology::Topology};

pub fn start(binary: &Path, upstream: SocketAddr, topology: &Topology) -> Result<(Process, SocketAddr)> {
    let addr = topology.proxy_addr()?;
    let child = topology
        .proxy_command(binary)
        .args(["-t", "30"])
        .arg(format!("TCP-LISTEN:{},bind={},reuseaddr,fork,backlog=4096,nodelay", addr.port(), addr.ip()))
        .arg(format!("TCP:{upstream},nodelay"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let mut process = Process { name: "socat".into(), child, log: None };
    process.wait_until_accepting(addr)?;
    Ok((process, addr))
}
