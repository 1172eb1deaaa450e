//! Throughput benchmark over loopback, all on one machine in one run: a direct
//! connection, splice-proxy in each data plane, and HAProxy in three
//! configurations, each in three scenarios (one stream at full speed, eight
//! streams at full speed, one stream paced at 3 Gbit/s). Rounds alternate
//! across peers; every value is the median of the rounds with its range. CPU
//! is whole-machine busy time, ncpu × wall − Δidle (idle from /proc/uptime).
//!
//! `cargo xtask bench [-- --help]`; see bench/README.md.

mod measure;
mod peers;
mod report;

use std::{path::PathBuf, thread, time::Duration};

use anyhow::{Context as _, Result, bail};

use measure::{Sample, Scenario};
use peers::{Haproxy, PeerKind, RunningPeer};

const USAGE: &str = "\
bench [--seconds S (3)] [--rounds N (3)] [--only SUBSTRING] [--scenario 1|8|paced]
      [--proxy-bin PATH (target/release/splice-proxy)] [--haproxy-bin PATH (haproxy on PATH or in /usr/sbin)]

Measures, over loopback: direct, splice-proxy (sockmap, splice, copy) and HAProxy
(splice-auto; splice-request+response with tune.pipesize 1 MiB; no splice with
tune.bufsize 256 KiB) with 1 stream and 8 streams at full speed and 1 stream paced
at 3 Gbit/s. --only keeps the peers whose name contains SUBSTRING (any case);
direct, the reference, is always measured. --scenario runs only that one (repeatable;
default all three). The sockmap peer needs root.";

/// How long the machine's background load is measured before and after the run.
const BACKGROUND_WINDOW: Duration = Duration::from_secs(1);

struct Args {
    seconds: f64,
    rounds: usize,
    only: Option<String>,
    /// Indexes into [`Scenario::ALL`] to run, in order.
    scenarios: Vec<usize>,
    proxy_bin: PathBuf,
    haproxy_bin: String,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        seconds: 3.0,
        rounds: 3,
        only: None,
        scenarios: Vec::new(),
        proxy_bin: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/splice-proxy")),
        haproxy_bin: "haproxy".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => args.seconds = value()?.parse().context("--seconds")?,
            "--rounds" => args.rounds = value()?.parse().context("--rounds")?,
            "--only" => args.only = Some(value()?.to_lowercase()),
            "--scenario" => {
                let name = value()?;
                let index = match name.as_str() {
                    "1" => 0,
                    "8" => 1,
                    "paced" => 2,
                    other => bail!("--scenario {other}: expected 1, 8 or paced"),
                };
                if !args.scenarios.contains(&index) {
                    args.scenarios.push(index);
                }
            }
            "--proxy-bin" => args.proxy_bin = value()?.into(),
            "--haproxy-bin" => args.haproxy_bin = value()?,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}; see --help"),
        }
    }
    if args.scenarios.is_empty() {
        args.scenarios = (0..Scenario::ALL.len()).collect();
    }
    if args.rounds == 0 || !args.seconds.is_finite() || args.seconds <= 0.0 {
        bail!("--rounds and --seconds must be positive");
    }
    Ok(args)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let kinds: Vec<PeerKind> = PeerKind::ALL
        .into_iter()
        .filter(|kind| {
            *kind == PeerKind::Direct
                || args.only.as_ref().is_none_or(|only| kind.name().to_lowercase().contains(only))
        })
        .collect();
    if kinds.len() == 1 && args.only.is_some() {
        bail!("--only matches no peer besides direct; peer names: {}", peer_names());
    }
    let haproxy =
        if kinds.iter().any(PeerKind::is_haproxy) { Some(Haproxy::find(&args.haproxy_bin)?) } else { None };

    let sink = peers::start_sink()?;
    // Started before any measurement; every child is killed by its PID when
    // `running` is dropped, on success, error or panic alike.
    let mut running: Vec<RunningPeer> = kinds
        .iter()
        .map(|kind| RunningPeer::start(*kind, sink, &args.proxy_bin, haproxy.as_ref()))
        .collect::<Result<_>>()?;

    let busy_before = measure::background_busy_percent(BACKGROUND_WINDOW)?;
    let duration = Duration::from_secs_f64(args.seconds);
    // samples[scenario][peer][round]
    let scenarios: Vec<Scenario> = args.scenarios.iter().map(|&i| Scenario::ALL[i]).collect();
    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); running.len()]; scenarios.len()];
    for round in 1..=args.rounds {
        for (scenario_index, scenario) in scenarios.iter().enumerate() {
            for (peer_index, peer) in running.iter_mut().enumerate() {
                peer.check_alive()?;
                // Let the previous run's queues and timers settle.
                thread::sleep(Duration::from_millis(200));
                let sample = measure::run(*scenario, peer.addr, duration)
                    .with_context(|| format!("round {round}, {}, {}", scenario.title(), peer.kind.name()))?;
                eprintln!(
                    "round {round}/{}: {}: {}: {:.1} Gbit/s, busy {:.0} %",
                    args.rounds,
                    scenario.title(),
                    peer.kind.name(),
                    sample.gbit_per_s,
                    sample.busy_percent
                );
                samples[scenario_index][peer_index].push(sample);
            }
        }
    }
    let busy_after = measure::background_busy_percent(BACKGROUND_WINDOW)?;
    drop(running);

    report::print_header(
        &args_summary(&args),
        haproxy.as_ref().map(Haproxy::version),
        [busy_before, busy_after],
    );
    for (scenario, peer_samples) in scenarios.iter().zip(&samples) {
        report::print_scenario(*scenario, &kinds, peer_samples);
    }
    Ok(())
}

fn args_summary(args: &Args) -> String {
    let (plural, note) = match args.rounds {
        1 => ("", " (a smoke run: no spread, not a measurement)"),
        2 => ("s", " (fewer than 3: a smoke run)"),
        _ => ("s", ""),
    };
    format!("{} round{plural} of {} s per peer and scenario{note}", args.rounds, args.seconds)
}

fn peer_names() -> String {
    PeerKind::ALL.iter().map(|kind| format!("`{}`", kind.name())).collect::<Vec<_>>().join(", ")
}
