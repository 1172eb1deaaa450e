//! What the bench sends through: nothing (direct on loopback; in the routed
//! topology the middle namespace forwarding), splice-proxy in each data
//! plane, HAProxy in four configurations, nginx stream, socat. The proxies
//! are child processes where the topology runs proxies, each killed by its
//! PID on drop.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};

use crate::{
    haproxy::{Haproxy, HaproxyTuning, HaproxyUpstream},
    process::{Process, TempDir, find_program},
    topology::{Topology, TopologyKind},
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PeerKind {
    Direct,
    Routed,
    SpliceProxyPacket,
    SpliceProxySockmap,
    SpliceProxySplice,
    SpliceProxyCopy,
    HaproxySpliceAuto,
    HaproxySpliceBothPipe1M,
    HaproxyNoSpliceBuf256K,
    HaproxySpliceAutoOneThread,
    NginxStream,
    Socat,
}

impl PeerKind {
    /// In the order they are measured within a round and listed in the tables.
    pub const ALL: [Self; 12] = [
        Self::Direct,
        Self::Routed,
        Self::SpliceProxyPacket,
        Self::SpliceProxySockmap,
        Self::SpliceProxySplice,
        Self::SpliceProxyCopy,
        Self::HaproxySpliceAuto,
        Self::HaproxySpliceBothPipe1M,
        Self::HaproxyNoSpliceBuf256K,
        Self::HaproxySpliceAutoOneThread,
        Self::NginxStream,
        Self::Socat,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Routed => "routed",
            Self::SpliceProxyPacket => "splice-proxy packet",
            Self::SpliceProxySockmap => "splice-proxy sockmap",
            Self::SpliceProxySplice => "splice-proxy splice",
            Self::SpliceProxyCopy => "splice-proxy copy",
            Self::HaproxySpliceAuto => "HAProxy splice-auto",
            Self::HaproxySpliceBothPipe1M => "HAProxy splice-request+response, pipesize 1 MiB",
            Self::HaproxyNoSpliceBuf256K => "HAProxy no splice, bufsize 256 KiB",
            Self::HaproxySpliceAutoOneThread => "HAProxy splice-auto, nbthread 1",
            Self::NginxStream => "nginx stream",
            Self::Socat => "socat",
        }
    }

    /// For the x axis of the plots.
    pub fn short_name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Routed => "routed",
            Self::SpliceProxyPacket => "sp packet",
            Self::SpliceProxySockmap => "sp sockmap",
            Self::SpliceProxySplice => "sp splice",
            Self::SpliceProxyCopy => "sp copy",
            Self::HaproxySpliceAuto => "HAP auto",
            Self::HaproxySpliceBothPipe1M => "HAP splice 1M",
            Self::HaproxyNoSpliceBuf256K => "HAP buf 256K",
            Self::HaproxySpliceAutoOneThread => "HAP auto 1T",
            Self::NginxStream => "nginx",
            Self::Socat => "socat",
        }
    }

    /// The peer every ratio "÷ reference" divides by: direct on loopback,
    /// routed in the routed topology. Always measured.
    pub fn is_reference(self) -> bool {
        matches!(self, Self::Direct | Self::Routed)
    }

    /// Whether this peer is measured in `topology`. The packet plane needs
    /// interfaces to attach to, which loopback is not; the reference differs;
    /// socat (a process per connection) is measured on loopback only.
    pub fn runs_in(self, topology: TopologyKind) -> bool {
        match self {
            Self::Direct | Self::Socat => topology == TopologyKind::Loopback,
            Self::Routed | Self::SpliceProxyPacket => topology == TopologyKind::Routed,
            _ => true,
        }
    }

    pub fn is_haproxy(&self) -> bool {
        self.haproxy_tuning().is_some()
    }

    pub fn is_splice_proxy(&self) -> bool {
        self.dataplane().is_some()
    }

    fn dataplane(self) -> Option<&'static str> {
        match self {
            Self::SpliceProxyPacket => Some("packet"),
            Self::SpliceProxySockmap => Some("sockmap"),
            Self::SpliceProxySplice => Some("splice"),
            Self::SpliceProxyCopy => Some("copy"),
            _ => None,
        }
    }

    /// If this is HAProxy: its lines for the global section, and for the defaults.
    pub fn haproxy_tuning(self) -> Option<HaproxyTuning> {
        match self {
            Self::HaproxySpliceAuto => Some((&[], &["option splice-auto"])),
            Self::HaproxySpliceBothPipe1M => {
                Some((&["tune.pipesize 1048576"], &["option splice-request", "option splice-response"]))
            }
            Self::HaproxyNoSpliceBuf256K => Some((&["tune.bufsize 262144"], &[])),
            // One thread instead of one per CPU: where the clients share the
            // machine's few CPUs, a second thread competes with them and
            // costs HAProxy's cross-thread work, so one thread may set up
            // connections that `do-resolve` their upstream faster; runs
            // differ on it (bench/README, *Threads against threads on the
            // 2-CPU bench*). Measured beside the others, the best is used.
            Self::HaproxySpliceAutoOneThread => Some((&["nbthread 1"], &["option splice-auto"])),
            _ => None,
        }
    }
}

/// How splice-proxy (and HAProxy's `do-resolve`) finds its upstream in the
/// connection set-up workload: a name looked up for every connection
/// (`--dns-max-ttl 0`; HAProxy's shortest, `hold valid 1ms`) or reused for
/// at most the default 5 s.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DnsCache {
    Off,
    Default,
}

impl DnsCache {
    /// How long an answer is reused: splice-proxy's `--dns-max-ttl` (0, or
    /// its default 5 s), HAProxy's `hold valid`.
    pub fn hold(self) -> Duration {
        match self {
            Self::Off => Duration::ZERO,
            Self::Default => Duration::from_secs(5),
        }
    }
}

/// The name the bench's DNS server answers with the upstream's address.
pub const UPSTREAM_NAME: &str = "upstream.bench.test";

/// Where a peer forwards to: an address, or for splice-proxy a name resolved
/// by the bench's DNS server at `dns`.
#[derive(Clone, Copy, Debug)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub dns: Option<(SocketAddr, DnsCache)>,
}

/// The programs behind the peers.
pub struct Tools {
    pub proxy_bin: PathBuf,
    pub haproxy: Option<Haproxy>,
    pub nginx: Option<PathBuf>,
    pub socat: Option<PathBuf>,
    /// The open-file limit the proxies inherit: HAProxy's maxconn and
    /// nginx's worker_connections are sized to it.
    pub open_files: u64,
}

impl Tools {
    pub fn find(kinds: &[PeerKind], proxy_bin: PathBuf, haproxy_bin: &str, open_files: u64) -> Result<Self> {
        let needs = |kind: PeerKind| kinds.contains(&kind);
        let missing = |name: &str| {
            format!(
                "{name} was not found on PATH nor in /usr/sbin: run `cargo xtask setup --bench`, \
                 or leave it out with --only"
            )
        };
        let haproxy =
            if kinds.iter().any(PeerKind::is_haproxy) { Some(Haproxy::find(haproxy_bin)?) } else { None };
        let nginx =
            needs(PeerKind::NginxStream).then(|| find_program("nginx").with_context(|| missing("nginx")));
        let socat = needs(PeerKind::Socat).then(|| find_program("socat").with_context(|| missing("socat")));
        Ok(Self { proxy_bin, haproxy, nginx: nginx.transpose()?, socat: socat.transpose()?, open_files })
    }
}

/// A peer ready to be measured: where to connect, and the process behind it.
pub struct RunningPeer {
    pub kind: PeerKind,
    pub name: String,
    pub addr: SocketAddr,
    /// How it finds its upstream by name, if it does.
    pub dns: Option<DnsCache>,
    /// splice-proxy's admin endpoint (its byte counters).
    pub admin: Option<SocketAddr>,
    // Declared before the config directory so the process dies first.
    process: Option<Process>,
    /// Whether [`measure_alone`] left its process stopped, so that a peer
    /// is signalled (and its children looked up in /proc) only when that
    /// changes, not before every other peer's window.
    stopped: bool,
    _config_dir: Option<TempDir>,
}

impl RunningPeer {
    pub fn start(kind: PeerKind, upstream: Upstream, tools: &Tools, topology: &Topology) -> Result<Self> {
        let name = match upstream.dns {
            Some((_, DnsCache::Off)) if kind.is_splice_proxy() => {
                format!("{}, DNS each connection", kind.name())
            }
            Some((_, DnsCache::Default)) if kind.is_splice_proxy() => {
                format!("{}, DNS cached ≤ 5 s", kind.name())
            }
            Some((_, DnsCache::Off)) if kind.is_haproxy() => {
                format!("{}, do-resolve each connection", kind.name())
            }
            Some((_, DnsCache::Default)) if kind.is_haproxy() => {
                format!("{}, do-resolve held 5 s", kind.name())
            }
            _ => kind.name().to_owned(),
        };
        let mut admin = None;
        let (process, addr, dir) = if let Some(dataplane) = kind.dataplane() {
            let (process, addr, admin_addr) =
                crate::splice_proxy::start(&tools.proxy_bin, upstream, dataplane, topology)?;
            admin = Some(admin_addr);
            (Some(process), addr, None)
        } else if let Some(tuning) = kind.haproxy_tuning() {
            let haproxy = tools.haproxy.as_ref().context("HAProxy peer without a HAProxy binary")?;
            let target = match upstream.dns {
                None => HaproxyUpstream::Address(upstream.addr),
                Some((dns, cache)) => HaproxyUpstream::Resolved {
                    name: UPSTREAM_NAME,
                    port: upstream.addr.port(),
                    dns,
                    hold_valid: cache.hold(),
                },
            };
            let (process, addr, dir) = haproxy.start(&name, tuning, target, tools.open_files, topology)?;
            (Some(process), addr, Some(dir))
        } else if kind == PeerKind::NginxStream {
            let binary = tools.nginx.as_ref().context("nginx peer without an nginx binary")?;
            let (process, addr, dir) =
                crate::nginx::start(binary, upstream.addr, tools.open_files, topology)?;
            (Some(process), addr, Some(dir))
        } else if kind == PeerKind::Socat {
            let binary = tools.socat.as_ref().context("socat peer without a socat binary")?;
            let (process, addr) = crate::socat::start(binary, upstream.addr, topology)?;
            (Some(process), addr, None)
        } else if kind.is_reference() {
            (None, upstream.addr, None)
        } else {
            bail!("no way to start {kind:?}")
        };
        let dns = upstream.dns.map(|(_, cache)| cache);
        Ok(Self { kind, name, addr, dns, admin, process, stopped: false, _config_dir: dir })
    }

    /// Fails if the proxy behind this peer has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        self.process.as_mut().map_or(Ok(()), Process::check_alive)
    }

    /// Stops or continues the proxy process ([`Process::set_stopped`]),
    /// if it is not so already.
    fn set_stopped(&mut self, stopped: bool) -> Result<()> {
        if self.stopped != stopped {
            if let Some(process) = &self.process {
                process.set_stopped(stopped)?;
            }
            self.stopped = stopped;
        }
        Ok(())
    }

    /// The PID of the proxy process (None for the reference).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }
}

/// Gets `running[at]` ready to be measured alone: fails if its proxy has
/// exited, lets it go on, waits `pause` (for the queues and timers of the
/// peer measured before, which still runs), then stops every other peer's
/// proxy.
pub fn measure_alone(running: &mut [RunningPeer], at: usize, pause: Duration) -> Result<&RunningPeer> {
    running[at].check_alive()?;
    running[at].set_stopped(false)?;
    std::thread::sleep(pause);
    for (index, peer) in running.iter_mut().enumerate() {
        if index != at {
            peer.set_stopped(true)?;
        }
    }
    Ok(&running[at])
}

/// Starts every peer of `kinds` in front of `upstream`.
pub fn start_all(
    kinds: &[PeerKind],
    upstream: Upstream,
    tools: &Tools,
    topology: &Topology,
) -> Result<Vec<RunningPeer>> {
    kinds.iter().map(|kind| RunningPeer::start(*kind, upstream, tools, topology)).collect()
}

#[cfg(test)]
mod tests {
    use std::{process::Command, time::Duration};

    use super::{PeerKind, RunningPeer, measure_alone};
    use crate::process::{Process, tests::wait_for};

    /// A peer whose process is a `sleep`.
    fn sleeping_peer() -> RunningPeer {
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        RunningPeer {
            kind: PeerKind::NginxStream,
            name: "sleep".into(),
            addr: "127.0.0.1:9".parse().unwrap(),
            dns: None,
            admin: None,
            process: Some(Process { name: "sleep".into(), child, log: None }),
            stopped: false,
            _config_dir: None,
        }
    }

    #[test]
    fn only_the_peer_measured_runs() {
        let mut running = [sleeping_peer(), sleeping_peer(), sleeping_peer()];
        let pids: Vec<u32> = running.iter().map(|peer| peer.pid().unwrap()).collect();
        for at in [0, 1, 2, 0] {
            measure_alone(&mut running, at, Duration::ZERO).unwrap();
            wait_for(&[pids[at]], false);
            let others: Vec<u32> = (0..pids.len()).filter(|&i| i != at).map(|i| pids[i]).collect();
            wait_for(&others, true);
        }
    }
}
