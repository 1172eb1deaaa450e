//! The process and system limits the idle-connection workload needs: open
//! files for the bench and the proxies it starts, and local ports.

use anyhow::{Context as _, Result};
use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Open files wanted: 50,000 idle connections hold 100,000 sockets in the
/// bench (client and upstream ends) and 100,000 in the proxy.
const FILES: u64 = 262_144;
const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
/// Local ports for 50,000 connections from one address to one proxy and from
/// the proxy to the upstream (the default 32768–60999 has 28,232).
const WIDE_PORT_RANGE: &str = "1024 65535";

/// Raises RLIMIT_NOFILE (soft and, as root, hard) to [`FILES`]; the proxies
/// inherit it. Returns the soft limit in force.
pub fn raise_open_files() -> Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
    let wanted = FILES.max(soft);
    if setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted.max(hard)).is_ok() {
        return Ok(wanted);
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("raising RLIMIT_NOFILE to its hard limit")?;
    Ok(hard)
}

/// Files a process keeps for other things than the connections (listeners,
/// the admin endpoint, logs, BPF maps, the runtime; HAProxy's 1,024 splice
/// pipes take 2,048).
const SPARE_FILES: u64 = 3072;

/// The most connections one process can hold both ends of (a proxy: client
/// and upstream socket; the bench: client socket and the upstream's) within
/// `files` open files.
pub fn max_connections(files: u64) -> usize {
    usize::try_from(files.saturating_sub(SPARE_FILES) / 2).unwrap_or(usize::MAX)
}

/// Connections below [`max_connections`] the idle workload stops at when
/// the limit caps it: HAProxy, with `maxconn` at that maximum, accepted one
/// connection less.
const IDLE_HEADROOM: usize = 64;

/// `wanted` idle-connection counts, or, when the open-file limit cannot be
/// raised far enough (a container without CAP_SYS_RESOURCE keeps its hard
/// limit), half the most that fit and the most that fit, said on stderr.
pub fn idle_counts_within(wanted: &[usize], files: u64) -> Vec<usize> {
    let most = max_connections(files);
    if wanted.iter().all(|&count| count <= most) {
        return wanted.to_vec();
    }
    let top = most.saturating_sub(IDLE_HEADROOM);
    eprintln!(
        "idle: the open-file limit is {files} and cannot be raised here (hard limit; CAP_SYS_RESOURCE \
         needed), so one process holds at most {most} connections: measuring {} and {top} instead of {wanted:?}",
        top / 2
    );
    vec![top / 2, top]
}

/// Local ports available per destination (the size of ip_local_port_range).
pub fn local_ports() -> usize {
    read_range().map_or(0, |(low, high)| high.saturating_sub(low) + 1)
}

fn read_range() -> Option<(usize, usize)> {
    let text = std::fs::read_to_string(PORT_RANGE).ok()?;
    let mut parts = text.split_whitespace().map(|part| part.parse::<usize>().ok());
    Some((parts.next()??, parts.next()??))
}

/// ip_local_port_range widened while it lives, restored on drop.
pub struct WidePortRange {
    previous: String,
}

impl WidePortRange {
    /// Widens the range if it has fewer than `needed` ports (needs root).
    pub fn ensure(needed: usize) -> Result<Option<Self>> {
        if local_ports() >= needed {
            return Ok(None);
        }
        let previous =
            std::fs::read_to_string(PORT_RANGE).with_context(|| format!("reading {PORT_RANGE}"))?;
        std::fs::write(PORT_RANGE, WIDE_PORT_RANGE).with_context(|| {
            format!(
                "{needed} idle connections need {needed} local ports, {PORT_RANGE} has {}: \
                 run as root (the bench widens it for the workload) or lower --idle",
                local_ports()
            )
        })?;
        eprintln!("idle: {PORT_RANGE} set to {WIDE_PORT_RANGE} for the workload (was {})", previous.trim());
        Ok(Some(Self { previous }))
    }
}

impl Drop for WidePortRange {
    fn drop(&mut self) {
        if std::fs::write(PORT_RANGE, self.previous.trim()).is_err() {
            eprintln!("could not restore {PORT_RANGE} to {}", self.previous.trim());
        }
    }
}
