//! Benchmark over loopback, all on one machine in one run: a direct
//! connection, splice-proxy in each data plane, HAProxy in three
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
mod socat;
mod splice_proxy;
mod stats;
mod throughput;
mod workloads;

use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use args::Workload;
use peers::{PeerKind, Tools};
use results::{Machine, Results};

/// How long the machine's background load is measured before and after the run.
const BACKGROUND_WINDOW: Duration = Duration::from_secs(1);

fn main() -> Result<()> {
    let mut args = args::parse()?;
    let kinds: Vec<PeerKind> = PeerKind::ALL
        .into_iter()
        .filter(|kind| {
            *kind == PeerKind::Direct
                || args.only.as_ref().is_none_or(|only| kind.name().to_lowercase().contains(only))
        })
        .collect();
    if kinds.len() == 1 && args.only.is_some() {
        let names: Vec<String> = PeerKind::ALL.iter().map(|kind| format!("`{}`", kind.name())).collect();
        bail!("--only matches no peer besides direct; peer names: {}", names.join(", "));
    }
    let files = limits::raise_open_files()?;
    if args.runs(Workload::Idle) {
        args.idle_counts = limits::idle_counts_within(&args.idle_counts, files);
    }
    let tools = Tools::find(&kinds, args.proxy_bin.clone(), &args.haproxy_bin, files)?;
    let started_utc = results::now_utc();
    let machine = Machine {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
        cpus: cpu::ncpu(),
        cpu_model: results::cpu_model(),
        haproxy: tools.haproxy.as_ref().map(|h| h.version().to_owned()),
        nginx: tools.nginx.as_ref().and_then(|path| results::version_of(path, "-v")),
        socat: tools.socat.as_ref().and_then(|path| socat_version(path)),
    };

    let busy_before = cpu::background_busy_percent(BACKGROUND_WINDOW)?;
    let throughput = if args.runs(Workload::Throughput) {
        workloads::throughput(&args, &kinds, &tools)?
    } else {
        Vec::new()
    };
    let latency =
        if args.runs(Workload::Latency) { workloads::latency(&args, &kinds, &tools)? } else { Vec::new() };
    let connect =
        if args.runs(Workload::Connect) { workloads::connect(&args, &kinds, &tools)? } else { Vec::new() };
    let idle = if args.runs(Workload::Idle) { workloads::idle(&args, &kinds, &tools)? } else { Vec::new() };
    let busy_after = cpu::background_busy_percent(BACKGROUND_WINDOW)?;

    let results = Results {
        started_utc,
        machine,
        settings: settings_summary(&args),
        background_busy_percent: [busy_before, busy_after],
        throughput,
        latency,
        connect,
        idle,
    };
    let markdown = report::markdown(&results);
    println!("{markdown}");
    std::fs::create_dir_all(&args.results_dir)
        .with_context(|| format!("creating {}", args.results_dir.display()))?;
    let stem = args.results_dir.join(results.started_utc.replace(':', ""));
    let json = stem.with_extension("json");
    std::fs::write(&json, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let md = stem.with_extension("md");
    std::fs::write(&md, &markdown).with_context(|| format!("writing {}", md.display()))?;
    let plots = plots::write(&results, &stem)?;
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
