//! Command-line arguments (no clap: a handful of flags, all documented in USAGE).

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};

use crate::topology::TopologyKind;

pub const USAGE: &str = "\
bench [--workload throughput|latency|connect|tls|idle]... [--topology loopback|routed]...
      [--only SUBSTRING]... [--seconds S (3)] [--rounds N (3)] [--scenario 1|8|64|paced|paced8]...
      [--round-trips N (20000)] [--clients N (4)] [--idle N,N (10000,50000)] [--results DIR (bench/results)]
      [--proxy-bin PATH (target/release/splice-proxy)] [--haproxy-bin PATH (haproxy on PATH or in /usr/sbin)]

Measures splice-proxy (packet, sockmap, splice, copy), HAProxy (splice-auto;
splice-request+response with tune.pipesize 1 MiB; no splice with tune.bufsize
256 KiB; splice-auto with nbthread 1), nginx stream and socat against a
reference, in two topologies (--topology picks one; repeatable; default
both, loopback first):
  loopback    everything on 127.0.0.1; reference: direct; packet left out (it
              attaches to interfaces)
  routed      client, proxy and upstream namespaces over veth pairs with GRO
              on; reference: routed (the middle namespace forwards); socat
              and the idle workload left out; the report ends with the packet
              plane's targets
Workloads:
  throughput  1, 8 and 64 streams at full speed, 1 stream paced at 3 Gbit/s,
              8 streams paced at 0.5 Gbit/s each (paced8):
              Gbit/s, machine busy %, core-s per GB, the proxy's own core-s per GB
              (--seconds each, --scenario picks some; repeatable)
  latency     1 B and 16 KiB ping-pong on one connection: p50/p99/p99.9
              (--round-trips each)
  connect     new connections/s through the peer with time to first byte
              (--seconds each), --clients threads each connecting one after
              the other (1: no two connections at once); splice-proxy with its
              upstream as a name that a local DNS server resolves, with
              --dns-max-ttl 0 and the default
  tls         kubectl's pattern: a new TLS connection (certificate verified), one
              request, its whole answer, the server closing; connections/s
              with time to the whole answer (--seconds each), every peer given
              the API server's address
  idle        proxy RSS and kernel socket memory per connection with --idle
              connections held open (one round; socat left out)
--workload picks some (repeatable; default all). --rounds applies to throughput,
latency and connect; rounds alternate across peers and each figure is the median
(min-max). --only keeps the peers whose name contains SUBSTRING (any case;
repeatable: a peer is kept if it matches any);
the reference is always measured. Results: DIR/<time>.json, .md and .svg plots,
DIR/<time>-routed.* for the routed topology. Run as root: the kernel planes
load BPF programs, the routed topology makes network namespaces (deleted when
it ends), the idle workload raises file limits and widens ip_local_port_range
while it runs.";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Workload {
    Throughput,
    Latency,
    Connect,
    Tls,
    Idle,
}

pub struct Args {
    pub workloads: Vec<Workload>,
    pub topologies: Vec<TopologyKind>,
    pub seconds: f64,
    pub rounds: usize,
    /// Peers kept: those whose name contains any of these (lowercase); none
    /// given keeps all.
    pub only: Vec<String>,
    /// Indexes into [`crate::throughput::Scenario::ALL`] to run, in order.
    pub scenarios: Vec<usize>,
    pub round_trips: usize,
    /// Client threads of the connect and TLS workloads.
    pub clients: usize,
    pub idle_counts: Vec<usize>,
    pub results_dir: PathBuf,
    pub proxy_bin: PathBuf,
    pub haproxy_bin: String,
}

impl Args {
    pub fn runs(&self, workload: Workload) -> bool {
        self.workloads.contains(&workload)
    }
}

pub fn parse() -> Result<Args> {
    let mut args = Args {
        workloads: Vec::new(),
        topologies: Vec::new(),
        seconds: 3.0,
        rounds: 3,
        only: Vec::new(),
        scenarios: Vec::new(),
        round_trips: 20_000,
        clients: crate::connect_rate::DEFAULT_CLIENTS,
        idle_counts: vec![10_000, 50_000],
        results_dir: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/results")),
        proxy_bin: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/splice-proxy")),
        haproxy_bin: "haproxy".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--workload" => {
                let workload = match value()?.as_str() {
                    "throughput" => Workload::Throughput,
                    "latency" => Workload::Latency,
                    "connect" => Workload::Connect,
                    "tls" => Workload::Tls,
                    "idle" => Workload::Idle,
                    other => bail!("--workload {other}: expected throughput, latency, connect, tls or idle"),
                };
                if !args.workloads.contains(&workload) {
                    args.workloads.push(workload);
                }
            }
            "--topology" => {
                let name = value()?;
                let Some(topology) = TopologyKind::ALL.into_iter().find(|t| t.name() == name) else {
                    bail!("--topology {name}: expected loopback or routed");
                };
                if !args.topologies.contains(&topology) {
                    args.topologies.push(topology);
                }
            }
            "--seconds" => args.seconds = value()?.parse().context("--seconds")?,
            "--rounds" => args.rounds = value()?.parse().context("--rounds")?,
            "--only" => args.only.push(value()?.to_lowercase()),
            "--scenario" => {
                let name = value()?;
                let scenarios = &crate::throughput::Scenario::ALL;
                let Some(index) = scenarios.iter().position(|(known, _)| *known == name) else {
                    let known: Vec<&str> = scenarios.iter().map(|(known, _)| *known).collect();
                    bail!("--scenario {name}: expected one of {}", known.join(", "));
                };
                if !args.scenarios.contains(&index) {
                    args.scenarios.push(index);
                }
            }
            "--round-trips" => args.round_trips = value()?.parse().context("--round-trips")?,
            "--clients" => args.clients = value()?.parse().context("--clients")?,
            "--idle" => {
                args.idle_counts = value()?
                    .split(',')
                    .map(|count| count.trim().parse::<usize>().with_context(|| format!("--idle {count}")))
                    .collect::<Result<_>>()?;
                args.idle_counts.sort_unstable();
            }
            "--results" => args.results_dir = value()?.into(),
            "--proxy-bin" => args.proxy_bin = value()?.into(),
            "--haproxy-bin" => args.haproxy_bin = value()?,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}; see --help"),
        }
    }
    if args.workloads.is_empty() {
        args.workloads =
            vec![Workload::Throughput, Workload::Latency, Workload::Connect, Workload::Tls, Workload::Idle];
    }
    if args.topologies.is_empty() {
        args.topologies = TopologyKind::ALL.to_vec();
    }
    if args.scenarios.is_empty() {
        args.scenarios = (0..crate::throughput::Scenario::ALL.len()).collect();
    }
    if args.rounds == 0
        || !args.seconds.is_finite()
        || args.seconds <= 0.0
        || args.round_trips == 0
        || args.clients == 0
    {
        bail!("--rounds, --seconds, --round-trips and --clients must be positive");
    }
    if args.idle_counts.is_empty() || args.idle_counts.contains(&0) {
        bail!("--idle needs positive counts, such as 10000,50000");
    }
    Ok(args)
}
