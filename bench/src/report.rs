//! The markdown report of one run: one table per throughput scenario (the
//! tables of issue 10, plus the proxy's own CPU), per latency request size,
//! connection set-up and idle memory; each with ratios to the best HAProxy
//! configuration and to the reference (direct on loopback, routed in the
//! routed topology) in the same run; in the routed topology, the packet
//! plane's targets ([`crate::targets`]).

use std::fmt::Write as _;

use crate::{
    results::{PeerRounds, Results, ThroughputResult},
    stats::{Stat, ratio, ratio_above},
};

/// Busy points below which CPU added over the reference is noise (a saturated or
/// noisy machine), not a reference to divide by.
pub(crate) const ADDED_NOISE_FLOOR: f64 = 0.5;

pub fn markdown(results: &Results) -> String {
    let mut out = String::new();
    let m = &results.machine;
    let reference = reference_name(results);
    let _ = writeln!(out, "## splice-proxy bench, {}, {} topology\n", results.started_utc, results.topology);
    let _ = writeln!(out, "{}\n", topology_line(results.topology));
    let _ = writeln!(out, "Machine: {} CPUs ({}), kernel {}.", m.cpus, m.cpu_model, m.kernel);
    let versions: Vec<String> = [("HAProxy", &m.haproxy), ("nginx", &m.nginx), ("socat", &m.socat)]
        .iter()
        .filter_map(|(name, version)| version.as_ref().map(|v| format!("{name}: {v}")))
        .collect();
    if !versions.is_empty() {
        let _ = writeln!(out, "Peers: {}.", versions.join("; "));
    }
    let [before, after] = results.background_busy_percent;
    let _ = writeln!(
        out,
        "\n{}. Each value is the median (min–max) of the rounds. Background load, nothing sent: busy \
         {before:.1} % before the run, {after:.1} % after (more than a few % means other work shares the CPUs).",
        results.settings
    );
    crate::targets::write(&mut out, results);
    crate::setup_targets::write(&mut out, results);
    for scenario in &results.throughput {
        throughput_table(&mut out, scenario, reference);
    }
    for result in &results.latency {
        let title = format!(
            "Latency, {} ping-pong, {} round trips a round",
            crate::latency::size_name(result.request_bytes),
            result.round_trips_per_round
        );
        let stats = |f: fn(&crate::latency::Sample) -> f64| summaries(&result.peers, f);
        let (p50, p99, p999) = (stats(|s| s.p50_us), stats(|s| s.p99_us), stats(|s| s.p999_us));
        let best = best_haproxy(&result.peers, &p99, false);
        let reference_p99 = p99.first().map(|s| s.median);
        heading(&mut out, &title, &result.peers, best, "lowest p99");
        let _ = writeln!(
            out,
            "| peer | p50 µs | p99 µs | p99.9 µs | p99 ÷ best HAProxy | p99 ÷ {reference} |\n|---|---|---|---|---|---|"
        );
        for (i, peer) in result.peers.iter().enumerate() {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                peer.peer,
                p50[i].show(1),
                p99[i].show(1),
                p999[i].show(1),
                ratio(p99[i].median, best.map(|b| p99[b].median)),
                ratio(p99[i].median, reference_p99),
            );
        }
    }
    if !results.connect.is_empty() {
        let title =
            format!("Connection set-up, {} each connecting one after the other", clients(results.clients));
        crate::setup_report::write(&mut out, &title, &results.connect, reference, "first byte");
    }
    if !results.tls.is_empty() {
        let title = format!(
            "TLS connection, one request and its answer (kubectl's pattern), {} each connecting one \
             after the other",
            clients(results.clients)
        );
        crate::setup_report::write(&mut out, &title, &results.tls, reference, "whole answer");
    }
    if !results.idle.is_empty() {
        let _ = writeln!(
            out,
            "\n### Idle connections, bytes per connection\n\nProxy RSS: resident memory the proxy process (with its children) \
             added, divided by the connections. TCP buffers: /proc/net/sockstat `mem` pages added, all sockets of the \
             machine (client, proxy's two, upstream). Slab: /proc/meminfo `Slab` added (whole machine: socket structures, \
             files, and whatever else ran). One round.\n"
        );
        // The HAProxy configuration with the least proxy RSS per connection at the largest count.
        let at_most =
            |points: &[crate::idle::Point]| points.last().map(|p| p.per_connection(p.proxy_rss_bytes));
        let best = results
            .idle
            .iter()
            .filter(|r| r.kind.is_some_and(|kind| kind.is_haproxy()))
            .filter_map(|r| at_most(&r.points))
            .min_by(f64::total_cmp);
        let _ = writeln!(
            out,
            "| peer | connections | proxy RSS B/conn | TCP buffers B/conn | slab B/conn | RSS/conn ÷ best HAProxy |\n|---|---|---|---|---|---|"
        );
        for result in &results.idle {
            if let Some(error) = &result.error {
                let _ = writeln!(
                    out,
                    "| {} | stopped after {} points: {error} | | | | |",
                    result.peer,
                    result.points.len()
                );
            }
            for point in &result.points {
                let rss = point.per_connection(point.proxy_rss_bytes);
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.0} | {:.0} | {:.0} | {} |",
                    result.peer,
                    point.connections,
                    rss,
                    point.per_connection(point.tcp_buffer_bytes),
                    point.per_connection(point.slab_bytes),
                    if std::ptr::eq(point, result.points.last().unwrap_or(point)) {
                        ratio(rss, best)
                    } else {
                        "".into()
                    },
                );
            }
        }
    }
    out
}

fn throughput_table(out: &mut String, scenario: &ThroughputResult, reference: &str) {
    let peers = &scenario.peers;
    let gbit = summaries(peers, |s| s.gbit_per_s);
    let busy = summaries(peers, |s| s.busy_percent);
    let cost = summaries(peers, |s| s.core_s_per_gb);
    let own: Vec<Option<Stat>> = peers
        .iter()
        .map(|p| p.rounds.iter().map(|s| s.proxy_core_s_per_gb).collect::<Option<Vec<f64>>>().map(Stat::of))
        .collect();
    let own_text = |i: usize| own[i].as_ref().map_or("—".into(), |s| s.show(2));
    let paced = scenario.paced_gbit_per_s.is_some();
    // The strongest HAProxy: the fastest at full speed, the cheapest when paced.
    let best = if paced { best_haproxy(peers, &busy, false) } else { best_haproxy(peers, &gbit, true) };
    heading(out, &scenario.scenario, peers, best, if paced { "lowest busy %" } else { "highest Gbit/s" });
    if paced {
        // Busy points each peer adds to the reference, paired round by round.
        let added: Vec<Stat> = peers
            .iter()
            .map(|p| {
                Stat::of(p.rounds.iter().zip(&peers[0].rounds).map(|(s, d)| s.busy_percent - d.busy_percent))
            })
            .collect();
        let _ = writeln!(
            out,
            "| peer | Gbit/s achieved | busy % | core-s per GB | proxy's own core-s per GB | CPU added over {reference} (busy points) \
             | added ÷ best HAProxy's added | busy ÷ best HAProxy | busy ÷ {reference} |\n|---|---|---|---|---|---|---|---|---|"
        );
        for (i, peer) in peers.iter().enumerate() {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                peer.peer,
                gbit[i].show(2),
                busy[i].show(1),
                cost[i].show(2),
                own_text(i),
                added[i].show(1),
                ratio_above(added[i].median, best.map(|b| added[b].median), ADDED_NOISE_FLOOR),
                ratio(busy[i].median, best.map(|b| busy[b].median)),
                ratio(busy[i].median, Some(busy[0].median)),
            );
        }
    } else {
        let _ = writeln!(
            out,
            "| peer | Gbit/s | busy % | core-s per GB | proxy's own core-s per GB | Gbit/s ÷ best HAProxy \
             | core-s/GB ÷ best HAProxy | Gbit/s ÷ {reference} | core-s/GB ÷ {reference} |\n|---|---|---|---|---|---|---|---|---|"
        );
        for (i, peer) in peers.iter().enumerate() {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                peer.peer,
                gbit[i].show(1),
                busy[i].show(1),
                cost[i].show(2),
                own_text(i),
                ratio(gbit[i].median, best.map(|b| gbit[b].median)),
                ratio(cost[i].median, best.map(|b| cost[b].median)),
                ratio(gbit[i].median, Some(gbit[0].median)),
                ratio(cost[i].median, Some(cost[0].median)),
            );
        }
    }
    kernel_share_line(out, peers);
}

/// splice-proxy's share of bytes redirected in the kernel, per peer that reports it.
fn kernel_share_line(out: &mut String, peers: &[PeerRounds<crate::throughput::Sample>]) {
    let shares: Vec<String> = peers
        .iter()
        .filter_map(|p| {
            let rounds = p.rounds.iter().map(|s| s.kernel_percent).collect::<Option<Vec<f64>>>()?;
            (!rounds.is_empty()).then(|| format!("{} {} %", p.peer, Stat::of(rounds).show(1)))
        })
        .collect();
    if !shares.is_empty() {
        let _ = writeln!(
            out,
            "\nOf the bytes splice-proxy forwarded, the share its kernel programs carried (sockmap's verdict program, packet's tc program; its counters): {}.",
            shares.join("; ")
        );
    }
}

pub(crate) fn heading<T>(
    out: &mut String,
    title: &str,
    peers: &[PeerRounds<T>],
    best: Option<usize>,
    by: &str,
) {
    let _ = writeln!(out, "\n### {title}\n");
    match best {
        Some(best) => {
            let _ = writeln!(out, "Best HAProxy here ({by}): {}.\n", peers[best].peer);
        }
        None => {
            let _ = writeln!(out, "No HAProxy configuration was measured, so its ratios are left blank.\n");
        }
    }
    if !peers.first().is_some_and(PeerRounds::is_reference) {
        let _ = writeln!(
            out,
            "(The first row is not the reference: the ratios to the reference are to that row.)\n"
        );
    }
}

/// What the ratios "÷ reference" divide by, as the tables name it.
pub fn reference_name(results: &Results) -> &'static str {
    if results.topology == crate::topology::TopologyKind::Routed.name() { "routed" } else { "direct" }
}

fn topology_line(topology: &str) -> &'static str {
    if topology == crate::topology::TopologyKind::Routed.name() {
        "Routed: the client, every proxy and the upstream servers each in a network namespace of their own, \
         client — proxy — upstream over two veth pairs with GRO on. The reference, `routed`, is the middle \
         namespace forwarding the packets itself: the floor any middlebox can reach here."
    } else {
        "Loopback: the client, every proxy and the upstream servers on 127.0.0.1 in one namespace. The \
         reference, `direct`, is the client talking to the upstream server."
    }
}

pub fn summaries<T>(peers: &[PeerRounds<T>], value: fn(&T) -> f64) -> Vec<Stat> {
    peers.iter().map(|p| Stat::of(p.rounds.iter().map(value))).collect()
}

/// The HAProxy configuration with the highest median among those that find
/// the upstream as `dns` says (`None`: given the address).
pub fn best_haproxy_resolving<T>(
    peers: &[PeerRounds<T>],
    stats: &[Stat],
    dns: Option<crate::peers::DnsCache>,
) -> Option<usize> {
    (0..peers.len())
        .filter(|&i| peers[i].is_haproxy() && peers[i].dns == dns)
        .max_by(|&a, &b| stats[a].median.total_cmp(&stats[b].median))
}

/// The HAProxy configuration with the highest (or lowest) median.
pub fn best_haproxy<T>(peers: &[PeerRounds<T>], stats: &[Stat], highest: bool) -> Option<usize> {
    let haproxies = (0..peers.len()).filter(|&i| peers[i].is_haproxy());
    if highest {
        haproxies.max_by(|&a, &b| stats[a].median.total_cmp(&stats[b].median))
    } else {
        haproxies.min_by(|&a, &b| stats[a].median.total_cmp(&stats[b].median))
    }
}

/// "1 client", "4 clients".
fn clients(n: usize) -> String {
    if n == 1 { "1 client".to_owned() } else { format!("{n} clients") }
}
