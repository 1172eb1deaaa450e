//! Benchmark, all on one machine in one run, in two topologies: over
//! loopback, and routed through three network namespaces (client — proxy —
//! upstream over veths). Peers: the reference (direct, or the middle
//! namespace routing), splice-proxy in each data plane, HAProxy in three
//! configurations, nginx stream and socat. Workloads: throughput and CPU at
//! 1, 8 and 64 streams and paced; request/response latency; connection
//! set-up with a DNS lookup; memory of idle connections. Every value is the
//! median of the rounds with its range; results go to bench/results/ as
//! JSON, markdown and SVG plots.
//!
//! `cargo xtask bench [-- --help]`; see bench/README.md.

mod args;
mod connect_rate;
mod cpu;
mod haproxy;
mod idle;
mod latency;
mod limits;
mod nginx;
mod peers;
mod plots;
mod process;
mod proxy_counters;
mod report;
mod results;
mod servers;
mod setup_report;
mod setup_targets;
mod socat;
mod splice_proxy;
mod stats;
mod targets;
mod throughput;
mod tls_request;
mod topology;
mod workloads;

use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use args::Workload;
use peers::{PeerKind, Tools};
use results::{Machine, Results};
use topology::{Topology, TopologyKind};

/// How long the machine's background load is measured before and after the run.
const BACKGROUND_WINDOW: Duration = Duration::from_secs(1);

fn main() -> Result<()> {
    let mut args = args::parse()?;
    let selected = |kind: &PeerKind| {
        kind.is_reference()
            || args.only.is_empty()
            || args.only.iter().any(|only| kind.name().to_lowercase().contains(only))
    };
    let kinds: Vec<PeerKind> = PeerKind::ALL
        .into_iter()
        .filter(|kind| args.topologies.iter().any(|topology| kind.runs_in(*topology)))
        .filter(selected)
        .collect();
    if kinds.iter().all(|kind| kind.is_reference()) && !args.only.is_empty() {
        let names: Vec<String> = PeerKind::ALL.iter().map(|kind| format!("`{}`", kind.name())).collect();
        bail!("--only matches no peer besides the reference; peer names: {}", names.join(", "));
    }
    let files = limits::raise_open_files()?;
    if args.runs(Workload::Idle) {
        args.idle_counts = limits::idle_counts_within(&args.idle_counts, files);
    }
    let tools = Tools::find(&kinds, args.proxy_bin.clone(), &args.haproxy_bin, files)?;
    let machine = Machine {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
        cpus: cpu::ncpu(),
        cpu_model: results::cpu_model(),
        haproxy: tools.haproxy.as_ref().map(|h| h.version().to_owned()),
        nginx: tools.nginx.as_ref().and_then(|path| results::version_of(path, "-v")),
        socat: tools.socat.as_ref().and_then(|path| socat_version(path)),
    };
    for &topology_kind in &args.topologies {
        let topology = Topology::create(topology_kind)?;
        let kinds: Vec<PeerKind> = kinds.iter().copied().filter(|kind| kind.runs_in(topology_kind)).collect();
        let results = topology
            .as_client(|| measure(&args, &kinds, &tools, &topology, machine.clone()))?
            .with_context(|| format!("the {} topology", topology_kind.name()))?;
        write(&args, &results)?;
    }
    Ok(())
}

/// Every workload of `args` in one topology, with the calling thread where
/// the clients run.
fn measure(
    args: &args::Args,
    kinds: &[PeerKind],
    tools: &Tools,
    topology: &Topology,
    machine: Machine,
) -> Result<Results> {
    let started_utc = results::now_utc();
    let busy_before = cpu::background_busy_percent(BACKGROUND_WINDOW)?;
    let runs = |workload| args.runs(workload);
    let throughput = if runs(Workload::Throughput) {
        workloads::throughput(args, kinds, tools, topology)?
    } else {
        Vec::new()
    };
    let latency =
        if runs(Workload::Latency) { workloads::latency(args, kinds, tools, topology)? } else { Vec::new() };
    let connect =
        if runs(Workload::Connect) { workloads::connect(args, kinds, tools, topology)? } else { Vec::new() };
    let tls = if runs(Workload::Tls) { workloads::tls(args, kinds, tools, topology)? } else { Vec::new() };
    // Memory per connection does not depend on the path, and the routed
    // namespaces would need their own port range and limits for it.
    let idle = if runs(Workload::Idle) && topology.kind() == TopologyKind::Loopback {
        workloads::idle(args, kinds, tools, topology)?
    } else {
        Vec::new()
    };
    let busy_after = cpu::background_busy_percent(BACKGROUND_WINDOW)?;
    Ok(Results {
        started_utc,
        topology: topology.kind().name(),
        machine,
        settings: settings_summary(args),
        clients: args.clients,
        background_busy_percent: [busy_before, busy_after],
        throughput,
        latency,
        connect,
        tls,
        idle,
    })
}

/// Prints the report and writes it with the JSON and the plots:
/// `<time>.*` for loopback, `<time>-routed.*` for the routed topology.
fn write(args: &args::Args, results: &Results) -> Result<()> {
    let markdown = report::markdown(results);
    println!("{markdown}");
    std::fs::create_dir_all(&args.results_dir)
        .with_context(|| format!("creating {}", args.results_dir.display()))?;
    let mut name = results.started_utc.replace(':', "");
    if results.topology != TopologyKind::Loopback.name() {
        name = format!("{name}-{}", results.topology);
    }
    let stem = args.results_dir.join(name);
    let json = stem.with_extension("json");
    std::fs::write(&json, serde_json::to_string_pretty(results)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let md = stem.with_extension("md");
    std::fs::write(&md, &markdown).with_context(|| format!("writing {}", md.display()))?;
    let plots = plots::write(results, &stem)?;
    eprintln!("results: {}, {}", json.display(), md.display());
    for plot in plots {
        eprintln!("plot: {}", plot.display());
    }
    Ok(())
}

/// "socat version 1.7.4.4 on ..." is the second line of `socat -V`.
fn socat_version(path: &std::path::Path) -> Option<String> {
    let out = std::process::Command::new(path).arg("-V").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().find(|line| line.starts_with("socat version")).map(|line| line.trim().to_owned())
}

fn settings_summary(args: &args::Args) -> String {
    let note = match args.rounds {
        1 => " (a smoke run: no spread, not a measurement)",
        2 => " (fewer than 3: a smoke run)",
        _ => "",
    };
    format!(
        "{} round(s){note}; throughput and connection set-up {} s per peer and round, latency {} round trips \
         per size, peer and round; idle connections {:?}, one round",
        args.rounds, args.seconds, args.round_trips, args.idle_counts
    )
}
