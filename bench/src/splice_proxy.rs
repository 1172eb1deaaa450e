//! splice-proxy as a peer: the release binary with one data plane, plain TCP
//! (no SNI check), its upstream an address or a name the bench's DNS server
//! resolves.

use std::{net::SocketAddr, path::Path, process::Stdio};

use anyhow::{Context as _, Result, bail};

use crate::{
    peers::{DnsCache, UPSTREAM_NAME, Upstream},
    process::{Process, is_root},
    topology::Topology,
};

/// Starts the proxy; returns it, its listening address and its admin
/// endpoint's.
pub fn start(
    binary: &Path,
    upstream: Upstream,
    dataplane: &str,
    topology: &Topology,
) -> Result<(Process, SocketAddr, SocketAddr)> {
    if !binary.is_file() {
        bail!("{} is missing: run `cargo build --release --bin splice-proxy` first", binary.display());
    }
    if matches!(dataplane, "sockmap" | "packet") && !is_root() {
        bail!(
            "the {dataplane} data plane needs root (BPF): run the bench as root, or pick peers with --only"
        );
    }
    let addr = topology.proxy_addr()?;
    let admin = topology.proxy_addr()?;
    let mut command = topology.proxy_command(binary);
    command
        .args(["--listen", &addr.to_string()])
        .args(["--dataplane", dataplane])
        // Several proxies run at once: an admin port each (the bench reads
        // the kernel's share of the bytes there).
        .args(["--admin-listen", &admin.to_string()])
        // The bench moves plain TCP, not TLS.
        .arg("--no-sni-check")
        // `BENCH_PROXY_LOG` raises the proxies' log level when chasing a figure.
        .env("RUST_LOG", std::env::var("BENCH_PROXY_LOG").unwrap_or_else(|_| "warn".to_owned()))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    match upstream.dns {
        None => command.args(["--upstream", &upstream.addr.to_string()]),
        Some((server, cache)) => {
            command
                .args(["--upstream", &format!("{UPSTREAM_NAME}:{}", upstream.addr.port())])
                .args(["--dns-server", &server.to_string()])
                // A records only, as HAProxy's `do-resolve(..., ipv4)` asks:
                // the same queries for both.
                .args(["--dns-family", "ipv4"]);
            match cache {
                DnsCache::Off => command.args(["--dns-max-ttl", "0s"]),
                DnsCache::Default => &mut command,
            }
        }
    };
    let child = command.spawn().with_context(|| format!("starting {}", binary.display()))?;
    let mut process = Process { name: format!("splice-proxy --dataplane {dataplane}"), child, log: None };
    process.wait_until_accepting(addr)?;
    Ok((process, addr, admin))
}
