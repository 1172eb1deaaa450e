//! What one run measured, as written to bench/results/<time>.json: every
//! round of every peer, so medians and ratios can be recomputed.

use serde::Serialize;

use crate::{
    connect_rate, idle, latency,
    peers::{DnsCache, PeerKind},
    throughput,
};

#[derive(Debug, Serialize)]
pub struct Results {
    /// Start of the run, UTC (`date -u`).
    pub started_utc: String,
    /// `loopback` or `routed` ([`crate::topology::TopologyKind::name`]).
    pub topology: &'static str,
    pub machine: Machine,
    pub settings: String,
    /// Client threads of the connect and TLS workloads.
    pub clients: usize,
    /// Whole-machine busy % with nothing sent, before and after the run.
    pub background_busy_percent: [f64; 2],
    pub throughput: Vec<ThroughputResult>,
    pub latency: Vec<LatencyResult>,
    /// Connection set-up; empty when not measured.
    pub connect: Vec<PeerRounds<connect_rate::Sample>>,
    /// TLS connections, one request each; empty when not measured.
    pub tls: Vec<PeerRounds<connect_rate::Sample>>,
    pub idle: Vec<IdleResult>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub haproxy: Option<String>,
    pub nginx: Option<String>,
    pub socat: Option<String>,
}

/// One peer's rounds of one measurement.
#[derive(Debug, Serialize)]
pub struct PeerRounds<T> {
    pub peer: String,
    #[serde(skip)]
    pub kind: Option<PeerKind>,
    /// How a splice-proxy or HAProxy peer of the connection set-up found
    /// its upstream by name (`None`: given the address).
    #[serde(skip)]
    pub dns: Option<DnsCache>,
    pub rounds: Vec<T>,
}

impl<T> PeerRounds<T> {
    pub fn is_haproxy(&self) -> bool {
        self.kind.is_some_and(|kind| kind.is_haproxy())
    }

    pub fn is_reference(&self) -> bool {
        self.kind.is_some_and(PeerKind::is_reference)
    }
}

#[derive(Debug, Serialize)]
pub struct ThroughputResult {
    pub scenario: String,
    pub streams: usize,
    /// The pacing rate of each stream, for the paced scenarios.
    pub paced_gbit_per_s: Option<f64>,
    pub peers: Vec<PeerRounds<throughput::Sample>>,
}

#[derive(Debug, Serialize)]
pub struct LatencyResult {
    pub request_bytes: usize,
    pub round_trips_per_round: usize,
    pub peers: Vec<PeerRounds<latency::Sample>>,
}

#[derive(Debug, Serialize)]
pub struct IdleResult {
    pub peer: String,
    #[serde(skip)]
    pub kind: Option<PeerKind>,
    pub points: Vec<idle::Point>,
    /// Why the peer held no more connections than the points show (such as
    /// its open-file limit), if it failed.
    pub error: Option<String>,
}

/// The first line of `program --version`-like output, or None.
pub fn version_of(program: &std::path::Path, arg: &str) -> Option<String> {
    let out = std::process::Command::new(program).arg(arg).output().ok()?;
    // nginx prints its version on standard error.
    let text = [out.stdout, out.stderr].concat();
    String::from_utf8_lossy(&text).lines().next().map(|line| line.trim().to_owned())
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// `date -u` as 2026-11-26T01:23:45Z.
pub fn now_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|text| !text.is_empty())
        .unwrap_or_else(|| "unknown-time".into())
}
