//! Everything one scenario runs on, built in order and torn down in reverse
//! (fields drop in declaration order): kubectl and the forwarder, the two
//! proxies, the API servers and the DNS server, the namespace runtimes, the
//! WireGuard tunnel, the namespaces, the files.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::ExitStatus,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use nix::sys::signal::Signal;

use super::{
    ADMIN_PORT, API_HOST, OTHER_ENDPOINT_PORT, PROXY_PORT, VPCE_ALLOWED, VPCE_OTHER,
    forwarder::Forwarder,
    kube_api::KubeApi,
    kubectl::Kubectl,
    node::Node,
    topology::{ASG_A, ASG_B, DNS, ENDPOINT, ENIS, Topology},
    wireguard::Tunnel,
};
use crate::{
    admin::Exposition,
    api::Pki,
    dns::{Answer, DnsServer},
    process::{ProxyProcess, message},
};

/// The DNS answers' TTL ("short", as EKS's 60 s is, scaled down).
pub const DNS_TTL: Duration = Duration::from_secs(1);
/// The proxy hosts: asg-a, asg-b.
pub const HOSTS: [Ipv4Addr; 2] = [ASG_A, ASG_B];

pub struct World {
    pub name: String,
    pub kubectl: Kubectl,
    pub forwarder: Forwarder,
    proxies: Mutex<[Option<ProxyProcess>; 2]>,
    /// Proxies that exited or were killed, kept for the report.
    retired: Mutex<Vec<(usize, ProxyProcess)>>,
    apis: Mutex<BTreeMap<Ipv4Addr, KubeApi>>,
    dns: Mutex<Option<DnsServer>>,
    dns_answer: Mutex<Vec<Ipv4Addr>>,
    pub pki: Arc<Pki>,
    pub control: Node,
    pub acct: Node,
    pub eks: Node,
    /// The DNS server's own runtime in eks (the cluster VPC's resolver is
    /// not slowed by the API servers' TLS work).
    dns_node: Node,
    tunnel: Tunnel,
    pub topology: Topology,
    config: PathBuf,
    dir: tempfile::TempDir,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl World {
    /// Builds the whole path and waits until the forwarder sees both proxy
    /// hosts healthy. The DNS answer names the first two ENIs.
    pub async fn build(name: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let topology = Topology::create()?;
        let tunnel = Tunnel::start(&topology, dir.path())?;
        let (control, acct, eks) = (
            Node::start(&topology.control, 2)?,
            Node::start(&topology.acct, 2)?,
            Node::start(&topology.eks, 2)?,
        );
        let dns_node = Node::start(&topology.eks, 1)?;
        let pki = Arc::new(Pki::new(API_HOST)?);
        let dns = dns_node.run(DnsServer::start_on(SocketAddr::new(DNS.into(), 53), DNS_TTL, &[])).await??;
        let mut apis = BTreeMap::new();
        for eni in ENIS {
            let pki = Arc::clone(&pki);
            apis.insert(eni, eks.run(async move { KubeApi::start(&pki, eni.into()).await }).await??);
        }
        let config = dir.path().join("config.toml");
        std::fs::write(&config, deployed_config()?)?;
        let kubectl = Kubectl::new(&topology.control, dir.path(), pki.ca_pem())?;
        let listeners = [
            (SocketAddr::new(ENDPOINT.into(), PROXY_PORT), VPCE_ALLOWED),
            (SocketAddr::new(ENDPOINT.into(), OTHER_ENDPOINT_PORT), VPCE_OTHER),
        ];
        let targets =
            HOSTS.map(|h| (SocketAddr::new(h.into(), PROXY_PORT), SocketAddr::new(h.into(), ADMIN_PORT)));
        let forwarder = acct.run(async move { Forwarder::start(&listeners, &targets).await }).await??;
        let world = Self {
            name: name.to_owned(),
            kubectl,
            forwarder,
            proxies: Mutex::new([None, None]),
            retired: Mutex::new(Vec::new()),
            apis: Mutex::new(apis),
            dns: Mutex::new(Some(dns)),
            dns_answer: Mutex::new(Vec::new()),
            pki,
            control,
            acct,
            eks,
            dns_node,
            tunnel,
            topology,
            config,
            dir,
        };
        world.set_dns(&ENIS[..2]);
        for host in 0..2 {
            world.start_proxy(host)?;
        }
        world.forwarder.wait_all_healthy(Duration::from_secs(30)).await?;
        Ok(world)
    }

    /// Starts the proxy on host `host` (0 = asg-a, 1 = asg-b) with the
    /// deployed configuration; returns once it accepts.
    pub fn start_proxy(&self, host: usize) -> Result<()> {
        let netns = if host == 0 { &self.topology.asg_a } else { &self.topology.asg_b };
        let proxy = tokio::task::block_in_place(|| ProxyProcess::start_deployed(netns, &self.config))?;
        if let Some(old) = lock(&self.proxies)[host].replace(proxy) {
            lock(&self.retired).push((host, old));
        }
        Ok(())
    }

    /// The PID of host `host`'s proxy.
    pub fn proxy_pid(&self, host: usize) -> Result<nix::unistd::Pid> {
        lock(&self.proxies)[host].as_ref().map(ProxyProcess::pid).context("that proxy is not running")
    }

    pub fn signal(&self, host: usize, signal: Signal) -> Result<()> {
        lock(&self.proxies)[host].as_ref().context("that proxy is not running")?.signal(signal)
    }

    /// Waits for host `host`'s proxy to exit; it moves to the retired ones.
    pub async fn wait_proxy_exit(&self, host: usize, timeout: Duration) -> Result<ExitStatus> {
        let mut proxy = lock(&self.proxies)[host].take().context("that proxy is not running")?;
        let status = proxy.wait_exit(timeout).await;
        lock(&self.retired).push((host, proxy));
        status
    }

    /// The proxy's log events so far.
    pub fn events(&self, host: usize) -> Vec<serde_json::Value> {
        lock(&self.proxies)[host].as_ref().map(ProxyProcess::events).unwrap_or_default()
    }

    /// `GET path` on host `host`'s admin port, from proxyacct (where the
    /// NLB's health check comes from).
    pub async fn admin_get(&self, host: usize, path: &'static str) -> Result<(u16, String)> {
        let addr = SocketAddr::new(HOSTS[host].into(), ADMIN_PORT);
        self.acct
            .run(async move {
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .with_context(|| format!("connecting {addr}"))?;
                crate::admin::get_on(stream, path).await
            })
            .await?
    }

    pub async fn metrics(&self, host: usize) -> Result<Exposition> {
        let (status, body) = self.admin_get(host, "/metrics").await?;
        anyhow::ensure!(status == 200, "/metrics of host {host} answered {status}");
        Exposition::parse(&body)
    }

    /// A counter summed over both running proxies.
    pub async fn total(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let mut sum = 0.0;
        for host in 0..2 {
            if lock(&self.proxies)[host].is_some() {
                sum += self.metrics(host).await?.count(name, labels);
            }
        }
        Ok(sum)
    }

    /// The DNS server answers `enis` for the API host name from now on.
    pub fn set_dns(&self, enis: &[Ipv4Addr]) {
        *lock(&self.dns_answer) = enis.to_vec();
        if let Some(dns) = lock(&self.dns).as_ref() {
            dns.set(API_HOST, Answer::Addrs(enis.iter().map(|&e| IpAddr::V4(e)).collect()));
        }
    }

    /// The DNS server stops (its port closes).
    pub async fn stop_dns(&self) {
        let dns = lock(&self.dns).take();
        if let Some(dns) = dns {
            dns.stop().await;
        }
    }

    /// The DNS server is back, with the last answer.
    pub async fn start_dns(&self) -> Result<()> {
        let answer = Answer::Addrs(lock(&self.dns_answer).iter().map(|&e| IpAddr::V4(e)).collect());
        let serving = async move {
            DnsServer::start_on(SocketAddr::new(DNS.into(), 53), DNS_TTL, &[(API_HOST, answer)]).await
        };
        let dns = self.dns_node.run(serving).await??;
        *lock(&self.dns) = Some(dns);
        Ok(())
    }

    /// The API server on `eni` goes away: its listener and connections close.
    pub async fn withdraw_eni(&self, eni: Ipv4Addr) -> Result<()> {
        let api = lock(&self.apis).remove(&eni).with_context(|| format!("no API server on {eni}"))?;
        api.stop().await;
        Ok(())
    }

    /// Requests each API server answered so far.
    pub fn api_requests(&self) -> BTreeMap<Ipv4Addr, u64> {
        lock(&self.apis).iter().map(|(eni, api)| (*eni, api.requests())).collect()
    }

    /// Open descriptors (DNS query sockets left out) and resident memory
    /// (KiB) of host `host`'s proxy.
    pub fn proxy_resources(&self, host: usize) -> Result<(usize, u64)> {
        let pid = self.proxy_pid(host)?;
        // The proxy's only UDP sockets are its DNS query sockets, which each
        // thread keeps (a bounded number, for a bounded time) for the next
        // lookups: not descriptors a connection left behind.
        let mut udp = String::new();
        for table in ["udp", "udp6"] {
            udp += &std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        }
        let udp_inodes: std::collections::HashSet<&str> =
            udp.lines().skip(1).filter_map(|line| line.split_whitespace().nth(9)).collect();
        let mut fds = 0;
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
            let target = std::fs::read_link(fd?.path()).unwrap_or_default();
            let target = target.to_string_lossy();
            let inode = target.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']'));
            if !inode.is_some_and(|inode| udp_inodes.contains(inode)) {
                fds += 1;
            }
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no VmRSS")?;
        Ok((fds, rss))
    }

    /// The panic messages any proxy of this world (running or retired)
    /// wrote to its log: a proxy's panic is a bug even when the task it hit
    /// was restarted and the scenario's checks passed.
    #[must_use]
    pub fn proxy_panics(&self) -> Vec<String> {
        let mut panics: Vec<String> = lock(&self.retired).iter().flat_map(|(_, p)| p.panics()).collect();
        panics.extend(lock(&self.proxies).iter().flatten().flat_map(ProxyProcess::panics));
        panics
    }

    /// What a failed scenario prints: per proxy (running and retired) its
    /// warnings and errors, its last log lines and its metrics; the
    /// forwarder's view; the tunnel.
    pub async fn report(&self) -> String {
        let mut out = format!("==== end-to-end scenario {:?} failed; what the proxies saw ====\n", self.name);
        let _ = writeln!(out, "forwarder: {}", self.forwarder.summary());
        let _ = writeln!(out, "API server requests by ENI: {:?}", self.api_requests());
        match lock(&self.dns).as_ref() {
            Some(dns) => _ = writeln!(out, "DNS server: serving, {} queries since it started", dns.queries()),
            None => _ = writeln!(out, "DNS server: stopped"),
        }
        let mut logs: Vec<(String, Vec<serde_json::Value>)> = Vec::new();
        for (host, proxy) in lock(&self.retired).iter() {
            logs.push((format!("{} (exited or killed)", host_name(*host)), proxy.events()));
        }
        for host in 0..2 {
            if let Some(proxy) = lock(&self.proxies)[host].as_ref() {
                logs.push((format!("{} (running)", host_name(host)), proxy.events()));
            }
        }
        for (who, events) in logs {
            let _ = writeln!(out, "---- log of {who}: {} lines ----", events.len());
            let notable = |e: &serde_json::Value| matches!(e["level"].as_str(), Some("WARN" | "ERROR"));
            let tail_from = events.len().saturating_sub(150);
            for (i, event) in events.iter().enumerate() {
                if i >= tail_from || notable(event) || message(event) != "connection closed" {
                    let _ = writeln!(out, "{event}");
                }
            }
        }
        for host in 0..2 {
            match self.admin_get(host, "/metrics").await {
                Ok((_, body)) => _ = writeln!(out, "---- metrics of {} ----\n{body}", host_name(host)),
                Err(e) => _ = writeln!(out, "---- metrics of {}: {e:#}", host_name(host)),
            }
        }
        let _ = writeln!(out, "---- wireguard ----\n{}", self.tunnel.show());
        let _ = writeln!(out, "(files in {})", self.dir.path().display());
        out
    }
}

#[must_use]
pub fn host_name(host: usize) -> &'static str {
    if host == 0 { "asg-a" } else { "asg-b" }
}

/// The configuration the CloudFormation stack's user data writes to
/// `/etc/splice-proxy/config.toml`, its parameters filled in (ports at
/// their defaults, the API host name), plus `allowed_vpce_ids` with the
/// endpoint's ID as the cross-cloud page's step 3 says; and the data plane
/// `SPLICE_PROXY_E2E_DATAPLANE` names, when it is set (the file's otherwise).
pub fn deployed_config() -> Result<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/cloudformation/splice-proxy.yaml");
    let template = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let plane = std::env::var("SPLICE_PROXY_E2E_DATAPLANE").ok();
    let start = "cat > /etc/splice-proxy/config.toml <<'CONFIG'\n";
    let body = template.split_once(start).with_context(|| format!("no config heredoc in {path}"))?.1;
    let mut config = String::new();
    for line in body.lines() {
        let line = line.trim_start();
        if line == "CONFIG" {
            let config = config
                .replace("${ProxyPort}", &PROXY_PORT.to_string())
                .replace("${AdminPort}", &ADMIN_PORT.to_string())
                .replace("${ApiServerHostName}", API_HOST)
                .replace("${AWS::StackName}", "splice-proxy-e2e");
            anyhow::ensure!(!config.contains("${"), "a parameter left in the configuration:\n{config}");
            let mut config = config
                .lines()
                .filter(|l| !(plane.is_some() && l.starts_with("dataplane")))
                .fold(String::new(), |mut kept, line| {
                    kept.push_str(line);
                    kept.push('\n');
                    kept
                });
            if let Some(plane) = &plane {
                config.push_str(&format!("dataplane = \"{plane}\"\n"));
            }
            return Ok(format!("{config}allowed_vpce_ids = [\"{VPCE_ALLOWED}\"]\n"));
        }
        config.push_str(line);
        config.push('\n');
    }
    anyhow::bail!("the config heredoc in {path} does not end")
}

/// Polls `check` every 50 ms until it holds; fails after `timeout` with `what`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
