//! Connection set-up against HAProxy, on the default plane (`auto`, which
//! runs packet; its peer here is `splice-proxy packet`), in any topology:
//! with answers reused, the rate against HAProxy given the address (the
//! floor of a proxy that resolves nothing) and against HAProxy resolving
//! each connection's upstream with answers held alike (`do-resolve`), and
//! the proxy's own CPU per connection; with a lookup for every connection,
//! the rate against HAProxy looking up every connection; first-byte p99
//! against the HAProxy that resolves alike, in both cases. Each a ratio of
//! medians of the same run, with the ratio round by round. Under the table,
//! the DNS queries per connection of the two that look up every connection,
//! and the two rules of sharing an answer that make them differ.

use std::fmt::Write as _;

use crate::{
    connect_rate::Sample,
    peers::{DnsCache, PeerKind},
    report::{best_haproxy_resolving, summaries},
    results::{PeerRounds, Results},
    targets::{Bound, Target, write_table},
};

/// Writes the table when the run measured connection set-up on packet.
pub fn write(out: &mut String, results: &Results) {
    let peers = &results.connect;
    let Some(found) = Compared::find(peers) else {
        return;
    };
    write_table(out, "Connection set-up against HAProxy, default plane", &found.targets(peers));
    if let Some(note) = found.sharing_note(peers) {
        let _ = writeln!(out, "\n{note}");
    }
}

/// The peers the targets compare, by position: splice-proxy packet with
/// answers reused and with a lookup each, and the fastest HAProxy given the
/// address, resolving with answers held 5 s, and looking up each connection.
struct Compared {
    cached: usize,
    each: usize,
    given: Option<usize>,
    held: Option<usize>,
    looked_up: Option<usize>,
}

impl Compared {
    fn find(peers: &[PeerRounds<Sample>]) -> Option<Self> {
        let packet = |dns| {
            peers.iter().position(|p| p.kind == Some(PeerKind::SpliceProxyPacket) && p.dns == Some(dns))
        };
        let rates = summaries(peers, rate);
        let haproxy = |dns| best_haproxy_resolving(peers, &rates, dns);
        Some(Self {
            cached: packet(DnsCache::Default)?,
            each: packet(DnsCache::Off)?,
            given: haproxy(None),
            held: haproxy(Some(DnsCache::Default)),
            looked_up: haproxy(Some(DnsCache::Off)),
        })
    }

    /// With a lookup each, how many queries the two sent per connection, and
    /// the sharing rules that make them differ.
    fn sharing_note(&self, peers: &[PeerRounds<Sample>]) -> Option<String> {
        let queries = summaries(peers, |s| s.dns_queries_per_connection.unwrap_or(f64::NAN));
        let haproxy = self.looked_up?;
        let (ours, theirs) = (queries[self.each].median, queries[haproxy].median);
        (ours.is_finite() && theirs.is_finite()).then(|| {
            format!(
                "DNS queries per connection with a lookup each: {ours:.2} by {}, {theirs:.2} by {}. \
                 splice-proxy with `--dns-max-ttl 0` shares only a lookup still in flight, so \
                 every connection's answer arrived after the connection did. HAProxy's \
                 `do-resolve` has no such setting (`hold valid` 0 asks again and again): it \
                 also hands a new connection the answer its lookup got earlier in the same \
                 millisecond, as long as another connection still holds that lookup.",
                peers[self.each].peer, peers[haproxy].peer
            )
        })
    }

    fn targets(&self, peers: &[PeerRounds<Sample>]) -> Vec<Target> {
        let p99 = |s: &Sample| s.ttfb_p99_us;
        let cpu = |s: &Sample| s.proxy_cpu_us_per_connection.unwrap_or(f64::NAN);
        let (cached, each) = (Some(self.cached), Some(self.each));
        let Self { given, held, looked_up, .. } = *self;
        vec![
            Target::compare(
                "answers reused: rate ÷ HAProxy given the address",
                peers,
                rate,
                cached,
                given,
                Bound::AtLeast(1.0),
            ),
            Target::compare(
                "answers reused: rate ÷ HAProxy do-resolve held 5 s",
                peers,
                rate,
                cached,
                held,
                Bound::AtLeast(1.2),
            ),
            Target::compare(
                "answers reused: proxy's own CPU per connection ÷ HAProxy's, given the address",
                peers,
                cpu,
                cached,
                given,
                Bound::AtMost(1.0),
            ),
            Target::compare(
                "answers reused: first-byte p99 ÷ HAProxy do-resolve held 5 s",
                peers,
                p99,
                cached,
                held,
                Bound::AtMost(1.0),
            ),
            Target::compare(
                "a lookup each connection: rate ÷ HAProxy do-resolve each connection",
                peers,
                rate,
                each,
                looked_up,
                Bound::AtLeast(1.0),
            ),
            Target::compare(
                "a lookup each connection: first-byte p99 ÷ HAProxy do-resolve each connection",
                peers,
                p99,
                each,
                looked_up,
                Bound::AtMost(1.0),
            ),
        ]
    }
}

fn rate(sample: &Sample) -> f64 {
    sample.connections_per_s
}

#[cfg(test)]
mod tests {
    use super::Compared;
    use crate::{
        connect_rate::Sample,
        peers::{DnsCache, PeerKind},
        results::PeerRounds,
    };

    fn peer(kind: PeerKind, dns: Option<DnsCache>, rate: f64, queries: Option<f64>) -> PeerRounds<Sample> {
        let sample = Sample {
            connections_per_s: rate,
            ttfb_p50_us: 100.0,
            ttfb_p99_us: 200.0,
            machine_cpu_us_per_connection: 100.0,
            proxy_cpu_us_per_connection: Some(50.0),
            connections: 1000,
            dns_queries_per_connection: queries,
        };
        PeerRounds {
            peer: format!("{} {dns:?}", kind.name()),
            kind: Some(kind),
            dns,
            rounds: vec![sample; 3],
        }
    }

    #[test]
    fn the_note_names_the_fastest_haproxy_looking_up_each_connection_and_both_query_counts() {
        let peers = [
            peer(PeerKind::SpliceProxyPacket, Some(DnsCache::Off), 90.0, Some(0.45)),
            peer(PeerKind::SpliceProxyPacket, Some(DnsCache::Default), 120.0, Some(0.0)),
            peer(PeerKind::HaproxySpliceAuto, Some(DnsCache::Off), 95.0, Some(0.47)),
            peer(PeerKind::HaproxySpliceAutoOneThread, Some(DnsCache::Off), 100.0, Some(0.3)),
            peer(PeerKind::HaproxySpliceAuto, None, 110.0, None),
        ];
        let found = Compared::find(&peers).expect("both packet peers are there");
        assert_eq!(
            (found.cached, found.each, found.given, found.held, found.looked_up),
            (1, 0, Some(4), None, Some(3))
        );
        let note = found.sharing_note(&peers).expect("both counted their queries");
        assert!(note.starts_with("DNS queries per connection with a lookup each: 0.45 by "), "{note}");
        assert!(note.contains(", 0.30 by HAProxy splice-auto, nbthread 1 Some(Off)."), "{note}");
        assert_eq!(found.targets(&peers).len(), 6);
    }

    #[test]
    fn no_note_without_an_haproxy_looking_up_each_connection() {
        let peers = [
            peer(PeerKind::SpliceProxyPacket, Some(DnsCache::Off), 90.0, Some(0.45)),
            peer(PeerKind::SpliceProxyPacket, Some(DnsCache::Default), 120.0, Some(0.0)),
        ];
        let found = Compared::find(&peers).expect("both packet peers are there");
        assert!(found.sharing_note(&peers).is_none());
        assert!(Compared::find(&peers[..1]).is_none(), "no packet peer with answers reused");
    }
}
