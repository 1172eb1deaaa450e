//! Where the bench's pieces run.
//!
//! - **Loopback:** everything on 127.0.0.1 in the bench's own network
//!   namespace.
//! - **Routed:** three namespaces in a line over two veth pairs, client —
//!   proxy — upstream, with GRO on at every veth end, as a NIC has it. The
//!   bench's client threads run in the client namespace, its upstream
//!   servers listen in the upstream namespace, and every proxy runs in the
//!   middle one. The reference peer, `routed`, is the middle namespace
//!   forwarding the packets itself: the floor any middlebox can reach here.
//!   The namespaces are deleted on drop, even when the run fails.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::Path,
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use splice_proxy_tests::netns::{LineTopology, in_netns, ip};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TopologyKind {
    Loopback,
    Routed,
}

impl TopologyKind {
    pub const ALL: [Self; 2] = [Self::Loopback, Self::Routed];

    pub fn name(self) -> &'static str {
        match self {
            Self::Loopback => "loopback",
            Self::Routed => "routed",
        }
    }
}

/// A topology that exists: for the routed one, its namespaces.
pub enum Topology {
    Loopback,
    Routed(LineTopology),
}

impl Topology {
    pub fn create(kind: TopologyKind) -> Result<Self> {
        match kind {
            TopologyKind::Loopback => Ok(Self::Loopback),
            TopologyKind::Routed => {
                let line = LineTopology::create().context("creating the routed topology's namespaces")?;
                ip(&[
                    "-n",
                    &line.client,
                    "route",
                    "add",
                    "198.51.100.0/24",
                    "via",
                    LineTopology::PROXY_CLIENT_SIDE_ADDR,
                ])?;
                ip(&[
                    "-n",
                    &line.upstream,
                    "route",
                    "add",
                    "192.0.2.0/24",
                    "via",
                    LineTopology::PROXY_UPSTREAM_SIDE_ADDR,
                ])?;
                LineTopology::sysctl(&line.proxy, "net.ipv4.ip_forward=1")?;
                for (netns, interface) in [
                    (&line.client, "to-proxy"),
                    (&line.proxy, "to-client"),
                    (&line.proxy, "to-upstream"),
                    (&line.upstream, "to-proxy"),
                ] {
                    gro_on(netns, interface)?;
                }
                Ok(Self::Routed(line))
            }
        }
    }

    pub fn kind(&self) -> TopologyKind {
        match self {
            Self::Loopback => TopologyKind::Loopback,
            Self::Routed(_) => TopologyKind::Routed,
        }
    }

    /// A listener for an upstream server on a free port (backlog 4,096).
    pub fn upstream_listener(&self) -> Result<TcpListener> {
        match self {
            Self::Loopback => listen((Ipv4Addr::LOCALHOST, 0).into()),
            Self::Routed(line) => {
                let addr = SocketAddr::from((upstream_ip(), 0));
                in_netns(&line.upstream, || listen(addr))?
            }
        }
    }

    /// A free address where a proxy (or its admin endpoint) may listen,
    /// reachable from the clients.
    pub fn proxy_addr(&self) -> Result<SocketAddr> {
        match self {
            Self::Loopback => free_port((Ipv4Addr::LOCALHOST, 0).into()),
            Self::Routed(line) => {
                let addr = SocketAddr::from((proxy_client_side_ip(), 0));
                in_netns(&line.proxy, || free_port(addr))?
            }
        }
    }

    /// A command running `program` where the proxies run. `ip netns exec`
    /// replaces itself with the program, so the child's PID is the proxy's.
    pub fn proxy_command(&self, program: &Path) -> Command {
        match self {
            Self::Loopback => Command::new(program),
            Self::Routed(line) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", &line.proxy]).arg(program);
                command
            }
        }
    }

    /// Runs `f` with the calling thread where the clients run; threads it
    /// starts are there too.
    pub fn as_client<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        match self {
            Self::Loopback => Ok(f()),
            Self::Routed(line) => in_netns(&line.client, f),
        }
    }

    /// Runs `f` with the calling thread where the proxies run (sockets it
    /// makes stay there: the DNS server the proxies ask).
    pub fn as_proxy<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        match self {
            Self::Loopback => Ok(f()),
            Self::Routed(line) => in_netns(&line.proxy, f),
        }
    }
}

fn upstream_ip() -> Ipv4Addr {
    LineTopology::UPSTREAM_ADDR.parse().expect("a constant IPv4 address")
}

fn proxy_client_side_ip() -> Ipv4Addr {
    LineTopology::PROXY_CLIENT_SIDE_ADDR.parse().expect("a constant IPv4 address")
}

/// A listener with a backlog of 4,096 (std's is 128, which overflows when
/// many connections arrive at once).
fn listen(addr: SocketAddr) -> Result<TcpListener> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("binding an upstream server on {addr}"))?;
    nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::new(4096)?)
        .context("raising the listen backlog")?;
    Ok(listener)
}

/// Reserves a port, frees it, and hands it out.
fn free_port(addr: SocketAddr) -> Result<SocketAddr> {
    let port = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?.local_addr()?.port();
    Ok((addr.ip(), port).into())
}

/// `ethtool -K INTERFACE gro on` inside `netns`: a veth hands its packets
/// up one by one otherwise, unlike a NIC.
fn gro_on(netns: &str, interface: &str) -> Result<()> {
    let status = Command::new("ip")
        .args(["netns", "exec", netns, "ethtool", "-K", interface, "gro", "on"])
        .status()
        .context("running ethtool (Debian package ethtool; `cargo xtask setup --bench` installs it)")?;
    if !status.success() {
        bail!("ethtool -K {interface} gro on in {netns} failed: {status}");
    }
    Ok(())
}
