//! Runs the current thread in a fresh network namespace (with `lo` up) and
//! removes it again on drop, even when the test fails.

use std::{
    fs::File,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};
use nix::sched::{CloneFlags, setns};

/// Fails with a clear message unless we are root: privileged tests do not skip.
pub fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} needs root (CAP_BPF, CAP_NET_ADMIN); run the tests as root, as CI does");
    }
    Ok(())
}

/// The calling thread is inside the namespace while this lives.
pub struct NetNs {
    name: String,
    original: File,
}

impl NetNs {
    pub fn enter() -> Result<Self> {
        require_root("a network namespace")?;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("splice-test-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name])?;
        let ns = Self { name, original: File::open("/proc/thread-self/ns/net")? };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        let target = File::open(format!("/run/netns/{}", ns.name))?;
        setns(&target, CloneFlags::CLONE_NEWNET).context("setns into the test namespace")?;
        Ok(ns)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = setns(&self.original, CloneFlags::CLONE_NEWNET);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Runs `f` on this thread inside the named namespace, then returns to the
/// original one. Sockets created in `f` stay in that namespace.
pub fn in_netns<T>(name: &str, f: impl FnOnce() -> T) -> Result<T> {
    let original = File::open("/proc/thread-self/ns/net")?;
    let target = File::open(format!("/run/netns/{name}")).with_context(|| format!("namespace {name}"))?;
    setns(&target, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns into {name}"))?;
    let result = f();
    setns(&original, CloneFlags::CLONE_NEWNET).context("setns back")?;
    Ok(result)
}

/// Three namespaces in a line, client — proxy — upstream, joined by two veth
/// pairs with documentation addresses (192.0.2.0/24 and 198.51.100.0/24).
/// Everything is deleted on drop, even when the test fails.
pub struct LineTopology {
    pub client: String,
    pub proxy: String,
    pub upstream: String,
    /// The proxy's interface facing the client (where a lossy link goes).
    pub proxy_client_side: &'static str,
}

impl LineTopology {
    pub const CLIENT_ADDR: &str = "192.0.2.1";
    pub const PROXY_CLIENT_SIDE_ADDR: &str = "192.0.2.2";
    pub const PROXY_UPSTREAM_SIDE_ADDR: &str = "198.51.100.1";
    pub const UPSTREAM_ADDR: &str = "198.51.100.2";

    pub fn create() -> Result<Self> {
        require_root("a network namespace topology")?;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let topology = Self {
            client: format!("sp-c-{id}"),
            proxy: format!("sp-p-{id}"),
            upstream: format!("sp-u-{id}"),
            proxy_client_side: "to-client",
        };
        for ns in [&topology.client, &topology.proxy, &topology.upstream] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let (c, p, u) = (&topology.client, &topology.proxy, &topology.upstream);
        ip(&["-n", c, "link", "add", "to-proxy", "type", "veth", "peer", "name", "to-client", "netns", p])?;
        ip(&["-n", p, "link", "add", "to-upstream", "type", "veth", "peer", "name", "to-proxy", "netns", u])?;
        for (ns, dev, addr) in [
            (c, "to-proxy", Self::CLIENT_ADDR),
            (p, "to-client", Self::PROXY_CLIENT_SIDE_ADDR),
            (p, "to-upstream", Self::PROXY_UPSTREAM_SIDE_ADDR),
            (u, "to-proxy", Self::UPSTREAM_ADDR),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(topology)
    }

    /// A [`TransferServer`] on the upstream namespace's address (port 0);
    /// call it inside a tokio runtime.
    pub fn transfer_server(&self) -> Result<crate::transfer::TransferServer> {
        let listener = in_netns(&self.upstream, || {
            std::net::TcpListener::bind((Self::UPSTREAM_ADDR, 0)).and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            })
        })??;
        crate::transfer::TransferServer::serve_on(tokio::net::TcpListener::from_std(listener)?)
    }

    /// Runs `sysctl -w setting` inside `netns`.
    pub fn sysctl(netns: &str, setting: &str) -> Result<()> {
        let status =
            Command::new("ip").args(["netns", "exec", netns, "sysctl", "-q", "-w", setting]).status()?;
        if !status.success() {
            bail!("sysctl {setting} in {netns} failed: {status}");
        }
        Ok(())
    }
}

impl Drop for LineTopology {
    fn drop(&mut self) {
        for ns in [&self.client, &self.proxy, &self.upstream] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// An XDP program attached to an interface, as `ip -d link` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdpAttachment {
    /// `xdp` (native), `xdpgeneric` or `xdpoffload`.
    pub mode: String,
    pub prog_id: u32,
}

/// The XDP program attached to `interface` in `netns`, if any.
pub fn xdp_attachment(netns: &str, interface: &str) -> Result<Option<XdpAttachment>> {
    let out = Command::new("ip")
        .args(["-n", netns, "-j", "-d", "link", "show", "dev", interface])
        .output()
        .context("running `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!("`ip -n {netns} link show dev {interface}` failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).context("`ip -j` output")?;
    let Some(xdp) = links[0].get("xdp") else { return Ok(None) };
    let mode = match xdp["mode"].as_u64() {
        Some(1) => "xdp",
        Some(2) => "xdpgeneric",
        Some(3) => "xdpoffload",
        _ => bail!("unknown XDP mode in {xdp}"),
    };
    let prog_id = xdp["prog"]["id"].as_u64().and_then(|id| u32::try_from(id).ok());
    let prog_id = prog_id.with_context(|| format!("no program id in {xdp}"))?;
    Ok(Some(XdpAttachment { mode: mode.to_owned(), prog_id }))
}

/// Runs `ip` with `args`; fails with its exit status.
pub fn ip(args: &[&str]) -> Result<()> {
    let status = Command::new("ip").args(args).status().context("running `ip` (install iproute2)")?;
    if !status.success() {
        bail!("`ip {}` failed: {status}", args.join(" "));
    }
    Ok(())
}
