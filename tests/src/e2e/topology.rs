//! The five namespaces, their veth pairs, addresses and routes, and the
//! per-namespace resolver files `ip netns exec` mounts over `/etc`: the
//! control plane's `hosts` (the API name → the VPC endpoint) and the proxy
//! hosts' `resolv.conf` (the cluster VPC's DNS server in `eks`). Everything
//! is deleted on drop, even when the test failed.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result};

use crate::netns::{ip, require_root};

/// control ↔ proxyacct: the underlay the WireGuard tunnel runs over.
pub const CONTROL_UNDERLAY: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 1);
pub const ACCT_UNDERLAY: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 2);
/// Inside the tunnel: the control plane and the VPC endpoint.
pub const CONTROL_TUNNEL: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
pub const ENDPOINT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// The proxy hosts, as the NLB (proxyacct) reaches them.
pub const ASG_A: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
pub const ASG_B: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 10);
/// The cluster VPC's DNS server, in `eks`.
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 53);
/// The API server ENI addresses available in `eks` (the DNS answer names two).
pub const ENIS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(10, 2, 0, 11),
    Ipv4Addr::new(10, 2, 0, 12),
    Ipv4Addr::new(10, 2, 0, 13),
    Ipv4Addr::new(10, 2, 0, 14),
];

/// The namespaces by role.
pub struct Topology {
    pub control: String,
    pub acct: String,
    pub asg_a: String,
    pub asg_b: String,
    pub eks: String,
    etc_dirs: Vec<PathBuf>,
}

impl Topology {
    pub fn create() -> Result<Self> {
        require_root("the end-to-end topology")?;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let name = |role: &str| format!("sp-e2e-{role}-{id}");
        let mut topology = Self {
            control: name("control"),
            acct: name("proxyacct"),
            asg_a: name("asg-a"),
            asg_b: name("asg-b"),
            eks: name("eks"),
            etc_dirs: Vec::new(),
        };
        for ns in topology.all() {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let t = &topology;
        // (namespace, interface, address/len) at each end of a veth pair.
        let pairs = [
            ((&t.control, "to-acct", "10.90.0.1/30"), (&t.acct, "to-control", "10.90.0.2/30")),
            ((&t.acct, "to-asg-a", "10.0.1.1/24"), (&t.asg_a, "to-nlb", "10.0.1.10/24")),
            ((&t.acct, "to-asg-b", "10.0.2.1/24"), (&t.asg_b, "to-nlb", "10.0.2.10/24")),
            ((&t.asg_a, "to-eks", "10.1.1.1/24"), (&t.eks, "to-asg-a", "10.1.1.2/24")),
            ((&t.asg_b, "to-eks", "10.1.2.1/24"), (&t.eks, "to-asg-b", "10.1.2.2/24")),
        ];
        for ((ns1, dev1, addr1), (ns2, dev2, addr2)) in pairs {
            ip(&["-n", ns1, "link", "add", dev1, "type", "veth", "peer", "name", dev2, "netns", ns2])?;
            for (ns, dev, addr) in [(ns1, dev1, addr1), (ns2, dev2, addr2)] {
                ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
                ip(&["-n", ns, "link", "set", dev, "up"])?;
            }
        }
        // The cluster VPC's addresses live on eks's loopback; each proxy host
        // routes them through its own link.
        ip(&["-n", &t.eks, "addr", "add", &format!("{DNS}/32"), "dev", "lo"])?;
        for eni in ENIS {
            topology.add_eni(eni)?;
        }
        ip(&["-n", &t.asg_a, "route", "add", "10.2.0.0/24", "via", "10.1.1.2"])?;
        ip(&["-n", &t.asg_b, "route", "add", "10.2.0.0/24", "via", "10.1.2.2"])?;
        let hosts = format!("127.0.0.1 localhost\n{ENDPOINT} {}\n", super::API_HOST);
        let (control, asg_a, asg_b) = (t.control.clone(), t.asg_a.clone(), t.asg_b.clone());
        topology.etc_file(&control, "hosts", &hosts)?;
        for ns in [asg_a, asg_b] {
            topology.etc_file(&ns, "resolv.conf", &format!("nameserver {DNS}\n"))?;
        }
        Ok(topology)
    }

    fn all(&self) -> [&String; 5] {
        [&self.control, &self.acct, &self.asg_a, &self.asg_b, &self.eks]
    }

    /// `/etc/netns/<ns>/<file>`, which `ip netns exec` mounts over `/etc/<file>`.
    fn etc_file(&mut self, netns: &str, file: &str, text: &str) -> Result<()> {
        let dir = PathBuf::from("/etc/netns").join(netns);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if !self.etc_dirs.contains(&dir) {
            self.etc_dirs.push(dir.clone());
        }
        std::fs::write(dir.join(file), text).with_context(|| format!("writing {}/{file}", dir.display()))
    }

    /// The ENI address answers again (on eks's loopback).
    pub fn add_eni(&self, eni: Ipv4Addr) -> Result<()> {
        ip(&["-n", &self.eks, "addr", "add", &format!("{eni}/32"), "dev", "lo"])
    }

    /// Blackholes an ENI: its address leaves eks, which does not forward, so
    /// packets to it vanish without an answer (SYNs time out).
    pub fn blackhole_eni(&self, eni: Ipv4Addr) -> Result<()> {
        ip(&["-n", &self.eks, "addr", "del", &format!("{eni}/32"), "dev", "lo"])
    }

    /// The proxy host namespace of `host` (its address as the NLB sees it).
    #[must_use]
    pub fn host_netns(&self, host: IpAddr) -> &str {
        if host == IpAddr::V4(ASG_A) { &self.asg_a } else { &self.asg_b }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.all() {
            let _ = ip(&["netns", "del", ns]);
        }
        for dir in &self.etc_dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
        // /etc/netns itself, if nothing else is in it (removing a directory
        // that is not empty fails, and is left).
        if !self.etc_dirs.is_empty() {
            let _ = std::fs::remove_dir("/etc/netns");
        }
    }
}
