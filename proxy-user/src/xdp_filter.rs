//! The XDP source filter (`--xdp-interface`, `--allow-source`): the kernel
//! program `source_filter` on one interface drops TCP packets to the proxy's
//! listen ports from sources in no allowed prefix and passes everything else.
//!
//! It is loaded from the embedded object on its own (the sockmap plane owns
//! the other loaded copy), attached natively when the driver supports XDP and
//! generically otherwise, and detached when [`SourceFilter`] is dropped: on
//! exit and on every start-up error after it was attached. The link is a BPF
//! link, so it also goes away if the process is killed.

use std::{collections::BTreeSet, fmt, net::IpAddr, sync::Arc};

use aya::{
    Ebpf,
    maps::{HashMap, LpmTrie, MapData, MapError, PerCpuArray, lpm_trie::Key},
    programs::{Link as _, ProgramError, TestRun as _, TestRunOptions, Xdp, XdpMode, xdp::XdpLink},
};
use proxy_common::{MAX_GUARDED_PORTS, SourceFilterStats, map, program};

use crate::{
    kernel::{self, KernelError},
    source_prefix::SourcePrefix,
};

#[derive(Debug, thiserror::Error)]
pub enum SourceFilterError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(
        "attaching the XDP source filter to {interface} failed: native mode: {native}; generic mode: {generic}"
    )]
    Attach { interface: String, native: String, generic: String },
    #[error("{action} {prefix} in map {}: {source}", map_of(prefix))]
    Prefix { action: &'static str, prefix: SourcePrefix, source: MapError },
    #[error("guarding TCP port {port} (map {}): {source}", map::GUARDED_PORTS)]
    Port { port: u16, source: MapError },
    #[error("{count} listen ports, but the source filter guards at most {MAX_GUARDED_PORTS}")]
    TooManyPorts { count: usize },
    #[error("test run of {name}: {source}", name = program::SOURCE_FILTER)]
    TestRun { source: ProgramError },
}

/// `error: its cause: ...`: aya's syscall errors keep the OS error as their source.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text = format!("{text}: {inner}");
        cause = inner.source();
    }
    text
}

fn map_of(prefix: &SourcePrefix) -> &'static str {
    if prefix.addr().is_ipv4() { map::SOURCE_ALLOW_V4 } else { map::SOURCE_ALLOW_V6 }
}

/// The validated `xdp_interface` and `allowed_source_cidrs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFilterConfig {
    /// Interface the program is attached to.
    pub interface: String,
    /// Allowed source prefixes; never empty.
    pub allowed: Vec<SourcePrefix>,
}

/// How the program runs on its interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpAttachMode {
    /// In the driver, before an skb is built.
    Native,
    /// In the kernel's receive path, on the skb (drivers without XDP support).
    Generic,
}

impl fmt::Display for XdpAttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::Generic => "generic",
        })
    }
}

/// Where and how the filter was attached, and why in that mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub interface: String,
    pub mode: XdpAttachMode,
    pub why: String,
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: Vec<SourcePrefix>,
    pub removed: Vec<SourcePrefix>,
}

/// The loaded filter, its maps, and (once attached) its link.
pub struct SourceFilter {
    /// Declared first, so it is dropped (detached) before the program is unloaded.
    link: Option<(XdpLink, Attached)>,
    allow_v4: LpmTrie<MapData, [u8; 4], u8>,
    allow_v6: LpmTrie<MapData, [u8; 16], u8>,
    ports: HashMap<MapData, u16, u8>,
    stats: Arc<SourceFilterCounters>,
    /// What the tries hold now.
    allowed: BTreeSet<SourcePrefix>,
    ebpf: Ebpf,
}

impl SourceFilter {
    /// Loads the program and its maps with `allowed` in the tries and no
    /// guarded port; attaches nothing.
    pub fn load(allowed: &[SourcePrefix]) -> Result<Self, SourceFilterError> {
        let mut ebpf = kernel::load_for_xdp()?;
        let mut filter = Self {
            link: None,
            allow_v4: kernel::take_map(&mut ebpf, map::SOURCE_ALLOW_V4)?,
            allow_v6: kernel::take_map(&mut ebpf, map::SOURCE_ALLOW_V6)?,
            ports: kernel::take_map(&mut ebpf, map::GUARDED_PORTS)?,
            stats: Arc::new(SourceFilterCounters(kernel::take_map(&mut ebpf, map::SOURCE_STATS)?)),
            allowed: BTreeSet::new(),
            ebpf,
        };
        let name = program::SOURCE_FILTER;
        filter.program_mut()?.load().map_err(|source| KernelError::Program { name, source })?;
        filter.reload(allowed)?;
        Ok(filter)
    }

    fn program_mut(&mut self) -> Result<&mut Xdp, KernelError> {
        let name = program::SOURCE_FILTER;
        self.ebpf
            .program_mut(name)
            .ok_or(KernelError::Missing { kind: "program", name })?
            .try_into()
            .map_err(|source| KernelError::Program { name, source })
    }

    fn program(&self) -> Result<&Xdp, KernelError> {
        let name = program::SOURCE_FILTER;
        self.ebpf
            .program(name)
            .ok_or(KernelError::Missing { kind: "program", name })?
            .try_into()
            .map_err(|source| KernelError::Program { name, source })
    }

    /// Attaches the program to `interface` (in the calling thread's network
    /// namespace): native mode when the driver supports it, generic otherwise.
    pub fn attach(&mut self, interface: &str) -> Result<Attached, SourceFilterError> {
        let name = program::SOURCE_FILTER;
        let xdp = self.program_mut()?;
        let (id, mode, why) = match xdp.attach(interface, XdpMode::Driver) {
            Ok(id) => (id, XdpAttachMode::Native, "the driver runs XDP programs".to_owned()),
            Err(native) => match xdp.attach(interface, XdpMode::Skb) {
                Ok(id) => {
                    (id, XdpAttachMode::Generic, format!("native mode refused: {}", with_causes(&native)))
                }
                Err(generic) => {
                    return Err(SourceFilterError::Attach {
                        interface: interface.to_owned(),
                        native: with_causes(&native),
                        generic: with_causes(&generic),
                    });
                }
            },
        };
        let link = xdp.take_link(id).map_err(|source| KernelError::Program { name, source })?;
        let attached = Attached { interface: interface.to_owned(), mode, why };
        self.link = Some((link, attached.clone()));
        Ok(attached)
    }

    /// Guards these TCP destination ports (adding to those already guarded).
    pub fn guard_ports(&mut self, ports: &[u16]) -> Result<(), SourceFilterError> {
        let guarded: BTreeSet<u16> =
            self.ports.keys().filter_map(Result::ok).chain(ports.iter().copied()).collect();
        if guarded.len() > MAX_GUARDED_PORTS as usize {
            return Err(SourceFilterError::TooManyPorts { count: guarded.len() });
        }
        for &port in ports {
            self.ports.insert(port, 1, 0).map_err(|source| SourceFilterError::Port { port, source })?;
        }
        Ok(())
    }

    /// Makes `allowed` the allow list without detaching: new prefixes are
    /// inserted first, then the ones no longer listed removed, so a source
    /// allowed before and after is never dropped in between. When an insert
    /// fails, the ones this call inserted are removed again and the old list
    /// stays.
    pub fn reload(&mut self, allowed: &[SourcePrefix]) -> Result<ReloadSummary, SourceFilterError> {
        let wanted: BTreeSet<SourcePrefix> = allowed.iter().copied().collect();
        let added: Vec<SourcePrefix> = wanted.difference(&self.allowed).copied().collect();
        let removed: Vec<SourcePrefix> = self.allowed.difference(&wanted).copied().collect();
        for (done, prefix) in added.iter().enumerate() {
            if let Err(error) = self.insert(prefix) {
                for inserted in &added[..done] {
                    // Best effort: it was inserted a moment ago.
                    let _ = self.remove(inserted);
                }
                return Err(error);
            }
        }
        self.allowed.extend(added.iter().copied());
        for prefix in &removed {
            self.remove(prefix)?;
            self.allowed.remove(prefix);
        }
        Ok(ReloadSummary { added, removed })
    }

    fn insert(&mut self, prefix: &SourcePrefix) -> Result<(), SourceFilterError> {
        let result = match prefix.addr() {
            IpAddr::V4(v4) => {
                self.allow_v4.insert(&Key::new(u32::from(prefix.prefix_len()), v4.octets()), 1, 0)
            }
            IpAddr::V6(v6) => {
                self.allow_v6.insert(&Key::new(u32::from(prefix.prefix_len()), v6.octets()), 1, 0)
            }
        };
        result.map_err(|source| SourceFilterError::Prefix { action: "adding", prefix: *prefix, source })
    }

    fn remove(&mut self, prefix: &SourcePrefix) -> Result<(), SourceFilterError> {
        let result = match prefix.addr() {
            IpAddr::V4(v4) => self.allow_v4.remove(&Key::new(u32::from(prefix.prefix_len()), v4.octets())),
            IpAddr::V6(v6) => self.allow_v6.remove(&Key::new(u32::from(prefix.prefix_len()), v6.octets())),
        };
        result.map_err(|source| SourceFilterError::Prefix { action: "removing", prefix: *prefix, source })
    }

    /// The prefixes allowed now, in order.
    #[must_use]
    pub fn allowed(&self) -> Vec<SourcePrefix> {
        self.allowed.iter().copied().collect()
    }

    /// Where the filter is attached, if it is.
    #[must_use]
    pub fn attached(&self) -> Option<&Attached> {
        self.link.as_ref().map(|(_, attached)| attached)
    }

    /// The program's counters, summed over all CPUs.
    pub fn counters(&self) -> Result<SourceFilterStats, SourceFilterError> {
        self.stats.read()
    }

    /// A handle on the counters for the metrics endpoint. It holds the map,
    /// not the program's link: the filter still detaches when dropped.
    #[must_use]
    pub fn counters_handle(&self) -> Arc<SourceFilterCounters> {
        Arc::clone(&self.stats)
    }

    /// Runs the program once on `frame` (an Ethernet frame, at least 14
    /// bytes) with BPF_PROG_TEST_RUN and returns its XDP action. Counters
    /// count it like a received packet. For tests.
    pub fn test_run(&self, frame: &[u8]) -> Result<u32, SourceFilterError> {
        let xdp = self.program()?;
        let opts = TestRunOptions { data_in: Some(frame), ..TestRunOptions::default() };
        xdp.test_run(opts).map(|r| r.return_value).map_err(|source| SourceFilterError::TestRun { source })
    }
}

/// The filter's per-CPU counters map.
pub struct SourceFilterCounters(PerCpuArray<MapData, SourceFilterStats>);

impl fmt::Debug for SourceFilterCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(map::SOURCE_STATS)
    }
}

impl SourceFilterCounters {
    /// The counters now, summed over all CPUs.
    pub fn read(&self) -> Result<SourceFilterStats, SourceFilterError> {
        let per_cpu =
            self.0.get(&0, 0).map_err(|source| KernelError::Map { name: map::SOURCE_STATS, source })?;
        Ok(per_cpu.iter().fold(SourceFilterStats::default(), |sum, cpu| sum.add(*cpu)))
    }
}

impl Drop for SourceFilter {
    fn drop(&mut self) {
        if let Some((link, attached)) = self.link.take() {
            match link.detach() {
                Ok(()) => tracing::info!(interface = attached.interface, "XDP source filter detached"),
                Err(error) => {
                    tracing::warn!(interface = attached.interface, %error, "detaching the XDP source filter failed");
                }
            }
        }
    }
}
