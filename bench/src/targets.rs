//! The packet plane's targets, checked against the routed topology's run:
//! throughput and CPU per GB against the routed path and the best HAProxy
//! at 1 and 8 streams, CPU added when paced, p99 latency, and connection
//! set-up against sockmap. Each is a ratio of medians of the same run.

use std::fmt::Write as _;

use crate::{
    peers::PeerKind,
    report::{best_haproxy, summaries},
    results::{PeerRounds, Results},
    throughput::Sample,
};

/// One target: a ratio, and the bound it must stay at or within.
pub(crate) struct Target {
    pub what: String,
    pub ratio: Option<f64>,
    pub bound: Bound,
}

#[derive(Clone, Copy)]
pub(crate) enum Bound {
    AtLeast(f64),
    AtMost(f64),
}

impl Target {
    fn met(&self) -> &'static str {
        match (self.ratio, self.bound) {
            (None, _) => "not measured",
            (Some(r), Bound::AtLeast(bound)) if r >= bound => "yes",
            (Some(r), Bound::AtMost(bound)) if r <= bound => "yes",
            _ => "**no**",
        }
    }
}

/// Writes the targets table when the run was routed and measured the packet plane.
pub fn write(out: &mut String, results: &Results) {
    if results.topology != crate::topology::TopologyKind::Routed.name() {
        return;
    }
    let targets: Vec<Target> =
        [throughput_targets(results), latency_targets(results), connect_targets(results)]
            .into_iter()
            .flatten()
            .collect();
    write_table(out, "The packet plane's targets", &targets);
}

/// A table of `targets` under `title`, if there are any.
pub(crate) fn write_table(out: &mut String, title: &str, targets: &[Target]) {
    if targets.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n### {title}\n\nEach a ratio of medians of this run. \"Not measured\" means a \
         peer it needs was left out.\n\n| target | ratio | required | met |\n|---|---|---|---|"
    );
    for target in targets {
        let required = match target.bound {
            Bound::AtLeast(bound) => format!("≥ {bound}"),
            Bound::AtMost(bound) => format!("≤ {bound}"),
        };
        let ratio = target.ratio.map_or("—".into(), |r| format!("{r:.2}"));
        let _ = writeln!(out, "| {} | {ratio} | {required} | {} |", target.what, target.met());
    }
}

fn position<T>(peers: &[PeerRounds<T>], kind: PeerKind) -> Option<usize> {
    peers.iter().position(|p| p.kind == Some(kind))
}

pub(crate) fn divide(value: Option<f64>, by: Option<f64>) -> Option<f64> {
    value.zip(by).filter(|(_, by)| *by > 0.0).map(|(value, by)| value / by)
}

fn throughput_targets(results: &Results) -> Vec<Target> {
    let mut targets = Vec::new();
    for scenario in &results.throughput {
        let peers = &scenario.peers;
        let (Some(packet), Some(routed)) =
            (position(peers, PeerKind::SpliceProxyPacket), position(peers, PeerKind::Routed))
        else {
            continue;
        };
        let gbit = summaries(peers, |s: &Sample| s.gbit_per_s);
        let cost = summaries(peers, |s: &Sample| s.core_s_per_gb);
        let busy = summaries(peers, |s: &Sample| s.busy_percent);
        let name = &scenario.scenario;
        match (scenario.paced_gbit_per_s, scenario.streams) {
            (None, 1 | 8) => {
                let best = best_haproxy(peers, &gbit, true).map(|b| gbit[b].median);
                targets.extend([
                    Target {
                        what: format!("{name}: Gbit/s ÷ routed"),
                        ratio: divide(Some(gbit[packet].median), Some(gbit[routed].median)),
                        bound: Bound::AtLeast(0.9),
                    },
                    Target {
                        what: format!("{name}: core-s per GB ÷ routed"),
                        ratio: divide(Some(cost[packet].median), Some(cost[routed].median)),
                        bound: Bound::AtMost(1.15),
                    },
                    Target {
                        what: format!("{name}: Gbit/s ÷ best HAProxy"),
                        ratio: divide(Some(gbit[packet].median), best),
                        bound: Bound::AtLeast(1.0),
                    },
                ]);
            }
            (Some(_), 1) => {
                // CPU each peer adds over routed, round by round, as in the table.
                let added = |i: usize| {
                    crate::stats::Stat::of(
                        peers[i]
                            .rounds
                            .iter()
                            .zip(&peers[routed].rounds)
                            .map(|(s, r)| s.busy_percent - r.busy_percent),
                    )
                    .median
                };
                let best = best_haproxy(peers, &busy, false).map(added);
                targets.push(Target {
                    what: format!("{name}: CPU added over routed ÷ best HAProxy's added"),
                    ratio: divide(Some(added(packet)), best),
                    bound: Bound::AtMost(0.3),
                });
            }
            _ => {}
        }
    }
    targets
}

fn latency_targets(results: &Results) -> Vec<Target> {
    results
        .latency
        .iter()
        .filter_map(|result| {
            let peers = &result.peers;
            let packet = position(peers, PeerKind::SpliceProxyPacket)?;
            let p99 = summaries(peers, |s| s.p99_us);
            let best = best_haproxy(peers, &p99, false).map(|b| p99[b].median);
            Some(Target {
                what: format!(
                    "latency {}: p99 ÷ best HAProxy",
                    crate::latency::size_name(result.request_bytes)
                ),
                ratio: divide(Some(p99[packet].median), best),
                bound: Bound::AtMost(0.9),
            })
        })
        .collect()
}

/// splice-proxy runs twice per plane here (a lookup each connection, and
/// answers cached): packet is compared with sockmap in the same mode, found
/// by the name's suffix after the plane's name.
fn connect_targets(results: &Results) -> Vec<Target> {
    let peers = &results.connect;
    if peers.is_empty() {
        return Vec::new();
    }
    let rate = summaries(peers, |s| s.connections_per_s);
    let of_kind = |kind: PeerKind| {
        peers
            .iter()
            .enumerate()
            .filter(move |(_, p)| p.kind == Some(kind))
            .map(move |(i, p)| (p.peer.strip_prefix(kind.name()).unwrap_or("").to_owned(), i))
    };
    of_kind(PeerKind::SpliceProxyPacket)
        .map(|(mode, packet)| {
            let sockmap = of_kind(PeerKind::SpliceProxySockmap).find(|(m, _)| *m == mode).map(|(_, i)| i);
            Target {
                what: format!("connection set-up{mode}: rate ÷ sockmap's"),
                ratio: divide(Some(rate[packet].median), sockmap.map(|i| rate[i].median)),
                bound: Bound::AtLeast(1.0),
            }
        })
        .collect()
}
