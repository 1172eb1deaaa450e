//! The packet plane's targets, checked against the routed topology's run:
//! throughput and CPU per GB against the routed path and the best HAProxy
//! at 1 and 8 streams, CPU added when paced, p99 latency, and connection
//! set-up against sockmap. Each is a ratio of medians of the same run,
//! shown with the same ratio round by round: every round measures each peer
//! once, one after the other, so the two values of a round saw the machine
//! in the same minutes, and how many rounds meet a bound tells a median
//! beside it that is a difference from one that is the run's spread.

use std::fmt::Write as _;

use crate::{
    peers::PeerKind,
    report::{ADDED_NOISE_FLOOR, best_haproxy, summaries},
    results::{PeerRounds, Results},
    stats::Stat,
    throughput::Sample,
};

/// One target: a ratio, and the bound it must stay at or within.
pub(crate) struct Target {
    pub what: String,
    /// The ratio of the two medians.
    pub ratio: Option<f64>,
    /// The ratio in each round; `None` for a round that could not be
    /// divided (see [`divide`]). Empty: not measured.
    pub rounds: Vec<Option<f64>>,
    pub bound: Bound,
}

#[derive(Clone, Copy)]
pub(crate) enum Bound {
    AtLeast(f64),
    AtMost(f64),
}

impl Bound {
    fn holds(self, ratio: f64) -> bool {
        match self {
            Self::AtLeast(bound) => ratio >= bound,
            Self::AtMost(bound) => ratio <= bound,
        }
    }
}

impl Target {
    /// `peers[measured]` against `peers[reference]` on `value`: the ratio
    /// of their medians and, round by round, of their values.
    pub(crate) fn compare<T>(
        what: impl Into<String>,
        peers: &[PeerRounds<T>],
        value: impl Fn(&T) -> f64,
        measured: Option<usize>,
        reference: Option<usize>,
        bound: Bound,
    ) -> Self {
        let values = |i: usize| peers[i].rounds.iter().map(&value).collect::<Vec<f64>>();
        let (measured, reference) = (measured.map(values), reference.map(values));
        Self::of_rounds(what, measured.as_deref(), reference.as_deref(), 0.0, bound)
    }

    /// A target of two peers' values round by round (`None`: a peer it
    /// needs was not measured). The medians and each round are divided
    /// alike: not when the reference is at or below `floor` or a value is
    /// not a number.
    pub(crate) fn of_rounds(
        what: impl Into<String>,
        measured: Option<&[f64]>,
        reference: Option<&[f64]>,
        floor: f64,
        bound: Bound,
    ) -> Self {
        let median = |values: &[f64]| (!values.is_empty()).then(|| Stat::of(values.iter().copied()).median);
        let ratio = measured.and_then(median).zip(reference.and_then(median)).and_then(divide(floor));
        let rounds = measured
            .zip(reference)
            .map(|(measured, reference)| {
                measured.iter().copied().zip(reference.iter().copied()).map(divide(floor)).collect()
            })
            .unwrap_or_default();
        Self { what: what.into(), ratio, rounds, bound }
    }

    fn met(&self) -> &'static str {
        match self.ratio {
            None => "not measured",
            Some(ratio) if self.bound.holds(ratio) => "yes",
            Some(_) => "**no**",
        }
    }

    /// "0.93–1.05, 3 of 5": the range of the round-by-round ratios and how
    /// many rounds meet the bound; "(1 left out)" after it when a round
    /// could not be divided.
    fn round_by_round(&self) -> String {
        let divided: Vec<f64> = self.rounds.iter().flatten().copied().collect();
        let left_out = match self.rounds.len() - divided.len() {
            0 => String::new(),
            n => format!(" ({n} left out)"),
        };
        let range = match divided.iter().copied().reduce(f64::min) {
            None => "—".to_owned(),
            Some(low) => {
                let high = divided.iter().copied().fold(low, f64::max);
                let meeting = divided.iter().filter(|&&ratio| self.bound.holds(ratio)).count();
                format!("{low:.2}–{high:.2}, {meeting} of {}", divided.len())
            }
        };
        format!("{range}{left_out}")
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
        "\n### {title}\n\nEach a ratio of medians of this run, and the same ratio round by \
         round (each round measures every peer once, one after the other): its range, and how \
         many rounds meet the bound. \"Not measured\" means a peer it needs was left out, \
         or its reference was too small to divide by.\n\n\
         | target | ratio | round by round | required | met |\n|---|---|---|---|---|"
    );
    for target in targets {
        let required = match target.bound {
            Bound::AtLeast(bound) => format!("≥ {bound}"),
            Bound::AtMost(bound) => format!("≤ {bound}"),
        };
        let ratio = target.ratio.map_or("—".into(), |r| format!("{r:.2}"));
        let _ = writeln!(
            out,
            "| {} | {ratio} | {} | {required} | {} |",
            target.what,
            target.round_by_round(),
            target.met()
        );
    }
}

fn position<T>(peers: &[PeerRounds<T>], kind: PeerKind) -> Option<usize> {
    peers.iter().position(|p| p.kind == Some(kind))
}

/// `value ÷ by`, unless `by` is at or below `floor` (a reference too small
/// to divide by) or either is not a number.
fn divide(floor: f64) -> impl Fn((f64, f64)) -> Option<f64> {
    move |(value, by)| (value.is_finite() && by.is_finite() && by > floor).then(|| value / by)
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
        let name = &scenario.scenario;
        let gbit = |s: &Sample| s.gbit_per_s;
        let cost = |s: &Sample| s.core_s_per_gb;
        match (scenario.paced_gbit_per_s, scenario.streams) {
            (None, 1 | 8) => {
                let best = best_haproxy(peers, &summaries(peers, gbit), true);
                targets.extend([
                    Target::compare(
                        format!("{name}: Gbit/s ÷ routed"),
                        peers,
                        gbit,
                        Some(packet),
                        Some(routed),
                        Bound::AtLeast(0.9),
                    ),
                    Target::compare(
                        format!("{name}: core-s per GB ÷ routed"),
                        peers,
                        cost,
                        Some(packet),
                        Some(routed),
                        Bound::AtMost(1.15),
                    ),
                    Target::compare(
                        format!("{name}: Gbit/s ÷ best HAProxy"),
                        peers,
                        gbit,
                        Some(packet),
                        best,
                        Bound::AtLeast(1.0),
                    ),
                ]);
            }
            (Some(_), 1) => {
                // CPU each peer adds over routed, round by round, as in the table.
                let added = |i: usize| -> Vec<f64> {
                    peers[i]
                        .rounds
                        .iter()
                        .zip(&peers[routed].rounds)
                        .map(|(s, r)| s.busy_percent - r.busy_percent)
                        .collect()
                };
                let best = best_haproxy(peers, &summaries(peers, |s: &Sample| s.busy_percent), false);
                targets.push(Target::of_rounds(
                    format!("{name}: CPU added over routed ÷ best HAProxy's added"),
                    Some(&added(packet)),
                    best.map(added).as_deref(),
                    ADDED_NOISE_FLOOR,
                    Bound::AtMost(0.3),
                ));
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
            let p99 = |s: &crate::latency::Sample| s.p99_us;
            let best = best_haproxy(peers, &summaries(peers, p99), false);
            Some(Target::compare(
                format!("latency {}: p99 ÷ best HAProxy", crate::latency::size_name(result.request_bytes)),
                peers,
                p99,
                Some(packet),
                best,
                Bound::AtMost(0.9),
            ))
        })
        .collect()
}

/// splice-proxy runs twice per plane here (a lookup each connection, and
/// answers cached): packet is compared with sockmap in the same mode, found
/// by the name's suffix after the plane's name.
fn connect_targets(results: &Results) -> Vec<Target> {
    let peers = &results.connect;
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
            Target::compare(
                format!("connection set-up{mode}: rate ÷ sockmap's"),
                peers,
                |s| s.connections_per_s,
                Some(packet),
                sockmap,
                Bound::AtLeast(1.0),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{Bound, Target};
    use crate::results::PeerRounds;

    #[test]
    fn each_round_is_divided_by_the_same_round_of_the_reference() {
        // Medians 100 and 100; round by round 0.90, 1.11 and 0.92, one
        // meeting the bound (divided by the reference's median instead:
        // 0.90, 1.00 and 1.20, two).
        let target = Target::of_rounds(
            "rate",
            Some(&[90.0, 100.0, 120.0]),
            Some(&[100.0, 90.0, 130.0]),
            0.0,
            Bound::AtLeast(1.0),
        );
        assert_eq!(target.ratio, Some(1.0));
        assert_eq!(target.met(), "yes");
        assert_eq!(target.round_by_round(), "0.90–1.11, 1 of 3");
        // Medians 2.5 and 4; rounds 0.50 and 0.75.
        let cost = Target::of_rounds("cost", Some(&[2.0, 3.0]), Some(&[4.0, 4.0]), 0.0, Bound::AtMost(0.625));
        assert_eq!((cost.met(), cost.round_by_round().as_str()), ("yes", "0.50–0.75, 1 of 2"));
    }

    #[test]
    fn compare_pairs_the_rounds_of_the_two_peers_it_names() {
        let peer =
            |name: &str, rounds: Vec<f64>| PeerRounds { peer: name.into(), kind: None, dns: None, rounds };
        let peers = [
            peer("reference", vec![10.0, 20.0]),
            peer("other", vec![1.0, 1.0]),
            peer("measured", vec![12.0, 16.0]),
        ];
        let target = Target::compare("rate", &peers, |&v| v, Some(2), Some(0), Bound::AtLeast(1.0));
        // Medians 14 and 15; rounds 1.20 and 0.80.
        assert_eq!(target.round_by_round(), "0.80–1.20, 1 of 2");
        assert!(target.ratio.is_some_and(|r| (r - 14.0 / 15.0).abs() < 1e-12));
    }

    #[test]
    fn a_round_that_cannot_be_divided_is_left_out_and_said_so() {
        // The reference's second round is at the floor, the third is not a number.
        let target = Target::of_rounds(
            "added",
            Some(&[0.2, 0.1, 0.3]),
            Some(&[4.0, 0.5, f64::NAN]),
            0.5,
            Bound::AtMost(0.3),
        );
        assert_eq!(target.round_by_round(), "0.05–0.05, 1 of 1 (2 left out)");
        let none = Target::of_rounds("added", Some(&[0.2]), Some(&[0.1]), 0.5, Bound::AtMost(0.3));
        assert_eq!(none.round_by_round(), "— (1 left out)");
        // The medians are divided by the same rule as the rounds.
        assert_eq!((none.ratio, none.met()), (None, "not measured"));
    }

    #[test]
    fn a_target_without_its_reference_is_not_measured() {
        let target = Target::of_rounds("rate", Some(&[100.0]), None, 0.0, Bound::AtLeast(1.0));
        assert_eq!((target.ratio, target.met()), (None, "not measured"));
        assert_eq!(target.round_by_round(), "—");
    }
}
