//! The XDP source filter (`--xdp-interface`, `--allow-source`, per listener
//! `allowed_source_cidrs`, `xdp_interface` per listener): the kernel
//! program `source_filter`, on each interface it is attached to, drops TCP
//! packets to a guarded listen port from sources in none of that port's
//! prefixes and passes everything else. Allow lists and their
//! reload: [`lists`]; the per-CPU counters: [`counters`]; the prefixes
//! themselves: [`prefix`]. Its configuration is checked in
//! `config::source_filter` and applied by `server::source_filter`.
//!
//! It is loaded from the embedded object on its own (the sockmap plane owns
//! the other loaded copy), attached to each interface (one BPF link each)
//! natively when the driver supports XDP and generically otherwise, and
//! detached from all when [`SourceFilter`] is dropped: on exit and on every
//! start-up error after it was attached. The links are BPF links, so they
//! also go away if the process is killed.

mod counters;
mod lists;
pub mod prefix;

pub use counters::SourceFilterCounters;
pub use lists::{AllowLists, PortPrefix, ReloadSummary};

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf,
    maps::{LpmTrie, MapData, MapError},
    programs::{Link as _, ProgramError, TestRun as _, TestRunOptions, Xdp, XdpMode, xdp::XdpLink},
};
use proxy_common::{
    MAX_GUARDED_PORTS, PortFilterStats, SourceFilterStats, SourceKeyV4, SourceKeyV6, map, program,
};

use crate::kernel::{self, KernelError};

#[derive(Debug, thiserror::Error)]
pub enum SourceFilterError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(
        "attaching the XDP source filter to {interface} failed: native mode: {native}; generic mode: {generic}"
    )]
    Attach { interface: String, native: String, generic: String },
    #[error("{action} {entry} in map {}: {source}", entry.map_name())]
    Prefix { action: &'static str, entry: PortPrefix, source: MapError },
    #[error("{action} TCP port {port} (map {}): {source}", map::GUARDED_PORTS)]
    Port { action: &'static str, port: u16, source: MapError },
    #[error("guarding TCP port {port}: counting the CPUs: {source}")]
    Cpus { port: u16, source: std::io::Error },
    #[error(
        "{count} listen ports with an allow list, but the source filter guards at most {MAX_GUARDED_PORTS}"
    )]
    TooManyPorts { count: usize },
    #[error("TCP port 0 cannot be guarded (the tries use it for every listener's prefixes together)")]
    PortZero,
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

/// The validated interfaces; the allow lists are per listener
/// ([`crate::config::ListenerConfig::allowed_sources`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFilterConfig {
    /// Every distinct `xdp_interface` of the listeners (own or inherited):
    /// the one loaded program is attached to each (one BPF link each). The
    /// lists are keyed by port, so a packet to a listener's port is checked
    /// against that listener's list on whichever of them it arrives.
    pub interfaces: BTreeSet<String>,
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

/// The loaded filter, its maps, and (once attached) its links.
pub struct SourceFilter {
    /// One per interface, in the order attached. Declared first, so they
    /// are dropped (detached) before the program is unloaded.
    links: Vec<(XdpLink, Attached)>,
    allow_v4: LpmTrie<MapData, SourceKeyV4, u8>,
    allow_v6: LpmTrie<MapData, SourceKeyV6, u8>,
    /// The counters; its port map is also the set of guarded ports.
    stats: Arc<SourceFilterCounters>,
    /// What the tries hold now: each port's prefixes, and their union under
    /// [`proxy_common::ANY_GUARDED_PORT`].
    entries: BTreeSet<PortPrefix>,
    /// The ports in [`map::GUARDED_PORTS`] now.
    guarded: BTreeSet<u16>,
    ebpf: Ebpf,
}

impl SourceFilter {
    /// Loads the program and its maps with `lists` in the tries (those
    /// ports guarded); attaches nothing.
    pub fn load(lists: &AllowLists) -> Result<Self, SourceFilterError> {
        let mut ebpf = kernel::load_for_xdp()?;
        let stats = SourceFilterCounters {
            totals: kernel::take_map(&mut ebpf, map::SOURCE_STATS)?,
            ports: Mutex::new(kernel::take_map(&mut ebpf, map::GUARDED_PORTS)?),
        };
        let mut filter = Self {
            links: Vec::new(),
            allow_v4: kernel::take_map(&mut ebpf, map::SOURCE_ALLOW_V4)?,
            allow_v6: kernel::take_map(&mut ebpf, map::SOURCE_ALLOW_V6)?,
            stats: Arc::new(stats),
            entries: BTreeSet::new(),
            guarded: BTreeSet::new(),
            ebpf,
        };
        let name = program::SOURCE_FILTER;
        filter.program_mut()?.load().map_err(|source| KernelError::Program { name, source })?;
        filter.reload(lists)?;
        Ok(filter)
    }

    fn program_mut(&mut self) -> Result<&mut Xdp, KernelError> {
        kernel::program_mut(&mut self.ebpf, program::SOURCE_FILTER)
    }

    fn program(&self) -> Result<&Xdp, KernelError> {
        kernel::program(&self.ebpf, program::SOURCE_FILTER)
    }

    /// Attaches the program to `interface` (in the calling thread's network
    /// namespace): native mode when the driver supports it, generic
    /// otherwise. Called once per interface, it adds a link each time; the
    /// links attached before stay.
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
        self.links.push((link, attached.clone()));
        Ok(attached)
    }

    /// Where the filter is attached (in the order attached; empty: nowhere).
    pub fn attached(&self) -> impl Iterator<Item = &Attached> {
        self.links.iter().map(|(_, attached)| attached)
    }

    /// The program's counters, summed over all CPUs.
    pub fn counters(&self) -> Result<SourceFilterStats, SourceFilterError> {
        self.stats.read()
    }

    /// Each guarded port's counters, summed over all CPUs.
    pub fn port_counters(&self) -> Result<BTreeMap<u16, PortFilterStats>, SourceFilterError> {
        self.stats.read_ports()
    }

    /// A handle on the counters for the metrics endpoint. It holds the map,
    /// not the program's links: the filter still detaches when dropped.
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

impl Drop for SourceFilter {
    fn drop(&mut self) {
        for (link, attached) in self.links.drain(..) {
            match link.detach() {
                Ok(()) => tracing::info!(interface = attached.interface, "XDP source filter detached"),
                Err(error) => {
                    tracing::warn!(interface = attached.interface, %error, "detaching the XDP source filter failed");
                }
            }
        }
    }
}
