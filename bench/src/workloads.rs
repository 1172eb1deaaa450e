//! Each workload: start the peers in front of its upstream server, measure
//! them round after round (rounds alternate across peers, 200 ms apart), and
//! stop them (killed by PID when dropped).

use std::{net::SocketAddr, thread, time::Duration};

use anyhow::{Context as _, Result};
use splice_proxy_tests::api::{ApiServer, Pki};

use crate::{
    args::Args,
    connect_rate, idle, latency,
    limits::WidePortRange,
    peers::{self, DnsCache, PeerKind, RunningPeer, Tools, UPSTREAM_NAME, Upstream},
    results::{IdleResult, LatencyResult, PeerRounds, ThroughputResult},
    servers::{self, Holder},
    throughput::{self, Scenario},
    tls_request::{self, TlsClient},
    topology::Topology,
};

/// Time between two measurements, for the previous one's queues and timers.
const PAUSE: Duration = Duration::from_millis(200);

fn rounds_of<T>(peers: &[RunningPeer]) -> Vec<PeerRounds<T>> {
    peers
        .iter()
        .map(|peer| PeerRounds {
            peer: peer.name.clone(),
            kind: Some(peer.kind),
            dns: peer.dns,
            rounds: Vec::new(),
        })
        .collect()
}

pub fn throughput(
    args: &Args,
    kinds: &[PeerKind],
    tools: &Tools,
    topology: &Topology,
) -> Result<Vec<ThroughputResult>> {
    let sink = servers::start_sink(topology)?;
    let mut running = peers::start_all(kinds, Upstream { addr: sink, dns: None }, tools, topology)?;
    let scenarios: Vec<Scenario> = args.scenarios.iter().map(|&i| Scenario::ALL[i].1).collect();
    let mut results: Vec<ThroughputResult> = scenarios
        .iter()
        .map(|scenario| ThroughputResult {
            scenario: scenario.title(),
            streams: scenario.streams(),
            paced_gbit_per_s: match scenario {
                Scenario::Paced { gbit_per_s, .. } => Some(*gbit_per_s),
                Scenario::FullSpeed { .. } => None,
            },
            peers: rounds_of(&running),
        })
        .collect();
    let duration = Duration::from_secs_f64(args.seconds);
    for round in 1..=args.rounds {
        for (scenario, result) in scenarios.iter().zip(&mut results) {
            for (at, rounds) in result.peers.iter_mut().enumerate() {
                let peer = peers::measure_alone(&mut running, at, PAUSE)?;
                let sample = throughput::run(*scenario, peer.addr, duration, peer.pid(), peer.admin)
                    .with_context(|| format!("round {round}, {}, {}", scenario.title(), peer.name))?;
                let kernel =
                    sample.kernel_percent.map(|k| format!(", {k:.1} % in the kernel")).unwrap_or_default();
                eprintln!(
                    "throughput round {round}/{}: {}: {}: {:.1} Gbit/s, busy {:.0} %{kernel}",
                    args.rounds,
                    scenario.title(),
                    peer.name,
                    sample.gbit_per_s,
                    sample.busy_percent
                );
                rounds.rounds.push(sample);
            }
        }
    }
    Ok(results)
}

pub fn latency(
    args: &Args,
    kinds: &[PeerKind],
    tools: &Tools,
    topology: &Topology,
) -> Result<Vec<LatencyResult>> {
    let echo = servers::start_echo(topology)?;
    let mut running = peers::start_all(kinds, Upstream { addr: echo, dns: None }, tools, topology)?;
    let mut results: Vec<LatencyResult> = latency::SIZES
        .iter()
        .map(|&size| LatencyResult {
            request_bytes: size,
            round_trips_per_round: args.round_trips,
            peers: rounds_of(&running),
        })
        .collect();
    for round in 1..=args.rounds {
        for result in &mut results {
            for (at, rounds) in result.peers.iter_mut().enumerate() {
                let peer = peers::measure_alone(&mut running, at, PAUSE)?;
                let size = result.request_bytes;
                let sample = latency::run(peer.addr, size, args.round_trips)
                    .with_context(|| format!("round {round}, latency {size} B, {}", peer.name))?;
                eprintln!(
                    "latency round {round}/{}: {}: {}: p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs",
                    args.rounds,
                    latency::size_name(size),
                    peer.name,
                    sample.p50_us,
                    sample.p99_us,
                    sample.p999_us
                );
                rounds.rounds.push(sample);
            }
        }
    }
    Ok(results)
}

/// Every peer with the upstream as an address but splice-proxy, which with
/// each HAProxy configuration runs twice more with the upstream as a name
/// (the same DNS server): looked up for every connection (`--dns-max-ttl
/// 0`; HAProxy's shortest, `hold valid 1ms`) and with answers reused for 5 s.
pub fn connect(
    args: &Args,
    kinds: &[PeerKind],
    tools: &Tools,
    topology: &Topology,
) -> Result<Vec<PeerRounds<connect_rate::Sample>>> {
    let greeter = servers::start_greeter(topology)?;
    // The DNS server runs on a runtime of its own for the workload's length.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the DNS server's runtime")?;
    // Where the proxies run, so that its loopback address is theirs.
    let dns = topology.as_proxy(|| {
        runtime.block_on(splice_proxy_tests::dns::DnsServer::start(Duration::from_secs(300)))
    })??;
    dns.set(UPSTREAM_NAME, splice_proxy_tests::dns::Answer::Addrs(vec![greeter.ip()]));
    let mut running = Vec::new();
    for &kind in kinds {
        if kind.is_splice_proxy() || kind.is_haproxy() {
            if kind.is_haproxy() {
                running.push(RunningPeer::start(
                    kind,
                    Upstream { addr: greeter, dns: None },
                    tools,
                    topology,
                )?);
            }
            for cache in [DnsCache::Off, DnsCache::Default] {
                running.push(RunningPeer::start(
                    kind,
                    Upstream { addr: greeter, dns: Some((dns.addr, cache)) },
                    tools,
                    topology,
                )?);
            }
        } else {
            running.push(RunningPeer::start(kind, Upstream { addr: greeter, dns: None }, tools, topology)?);
        }
    }
    let results =
        set_up_rounds(args, &mut running, "connect", "first byte", Some(&dns), connect_rate::first_byte)?;
    eprintln!("connect: the DNS server answered {} queries", dns.queries());
    drop(running);
    runtime.block_on(dns.stop());
    Ok(results)
}

/// The rounds of a connection set-up workload (`what`): every peer of
/// `running` opening connections with `connection` (which measures the time
/// to `measured`); `dns`: the DNS server the peers that resolve ask, whose
/// queries are counted per connection.
fn set_up_rounds(
    args: &Args,
    running: &mut [RunningPeer],
    what: &str,
    measured: &str,
    dns: Option<&splice_proxy_tests::dns::DnsServer>,
    connection: impl Fn(SocketAddr) -> Result<Duration> + Sync,
) -> Result<Vec<PeerRounds<connect_rate::Sample>>> {
    let mut results = rounds_of(running);
    let duration = Duration::from_secs_f64(args.seconds);
    for round in 1..=args.rounds {
        for (at, rounds) in results.iter_mut().enumerate() {
            let peer = peers::measure_alone(running, at, PAUSE)?;
            let queries_before = dns.map(splice_proxy_tests::dns::DnsServer::queries);
            let mut sample =
                connect_rate::run_with(peer.addr, args.clients, peer.pid(), duration, &connection)
                    .with_context(|| format!("round {round}, {what}, {}", peer.name))?;
            if let (Some(dns), Some(before), Some(_)) = (dns, queries_before, peer.dns) {
                let queries = dns.queries().saturating_sub(before);
                sample.dns_queries_per_connection = Some(queries as f64 / sample.connections.max(1) as f64);
            }
            eprintln!(
                "{what} round {round}/{}: {}: {:.0} connections/s, {measured} p99 {:.0} µs",
                args.rounds, peer.name, sample.connections_per_s, sample.ttfb_p99_us
            );
            rounds.rounds.push(sample);
        }
    }
    Ok(results)
}

/// kubectl's pattern through every peer given the API server's address: a
/// new TLS connection, one request, its whole answer
/// ([`tls_request::TlsClient`]), the server closing. The server is the
/// tests' fake API server, on a runtime of its own for the workload's
/// length.
pub fn tls(
    args: &Args,
    kinds: &[PeerKind],
    tools: &Tools,
    topology: &Topology,
) -> Result<Vec<PeerRounds<connect_rate::Sample>>> {
    let pki = Pki::new(tls_request::HOSTNAME)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let server = {
        let _guard = runtime.enter();
        ApiServer::start_on(&pki, topology.upstream_listener()?)?
    };
    let client = TlsClient::new(&pki)?;
    let mut running = peers::start_all(kinds, Upstream { addr: server.addr, dns: None }, tools, topology)?;
    let results =
        set_up_rounds(args, &mut running, "tls", "whole answer", None, |addr| client.request(addr))?;
    eprintln!("tls: the API server answered {} requests", server.requests());
    drop(running);
    runtime.block_on(server.stop());
    Ok(results)
}

/// One peer at a time (each holds its connections alone), one round: memory
/// readings vary little from round to round, unlike the rates above.
pub fn idle(args: &Args, kinds: &[PeerKind], tools: &Tools, topology: &Topology) -> Result<Vec<IdleResult>> {
    let most = args.idle_counts.iter().copied().max().unwrap_or(0);
    let _ports = WidePortRange::ensure(most + 4096)?;
    let mut results = Vec::new();
    for &kind in kinds {
        if kind == PeerKind::Socat {
            eprintln!("idle: socat left out (a process per connection: thousands of processes)");
            continue;
        }
        let holder = Holder::start(topology)?;
        let mut peer = RunningPeer::start(kind, Upstream { addr: holder.addr, dns: None }, tools, topology)?;
        thread::sleep(PAUSE);
        let (points, error) = idle::run(peer.addr, &holder, peer.pid(), &args.idle_counts);
        if let Some(error) = &error {
            eprintln!("idle: {}: stopped early: {error:#}", peer.name);
        }
        peer.check_alive()?;
        for point in &points {
            eprintln!(
                "idle: {}: {} connections: proxy RSS +{:.0} B/connection, TCP buffers +{:.0}, slab +{:.0}",
                peer.name,
                point.connections,
                point.per_connection(point.proxy_rss_bytes),
                point.per_connection(point.tcp_buffer_bytes),
                point.per_connection(point.slab_bytes)
            );
        }
        let error = error.map(|error| format!("{error:#}"));
        results.push(IdleResult { peer: peer.name.clone(), kind: Some(kind), points, error });
    }
    Ok(results)
}
