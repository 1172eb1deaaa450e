//! Connection set-up against HAProxy, on the default plane (`auto`, which
//! runs packet; its peer here is `splice-proxy packet`), in any topology:
//! with answers reused, the rate against HAProxy given the address (the
//! floor of a proxy that resolves nothing) and against HAProxy resolving
//! each connection's upstream with answers held alike (`do-resolve`), and
//! the proxy's own CPU per connection; with a lookup for every connection,
//! the rate against HAProxy looking up every connection; first-byte p99
//! against the HAProxy that resolves alike, in both cases. Each a ratio of
//! medians of the same run.

use crate::{
    connect_rate::Sample,
    peers::{DnsCache, PeerKind},
    report::{best_haproxy_resolving, summaries},
    results::{PeerRounds, Results},
    stats::Stat,
    targets::{Bound, Target, divide, write_table},
};

/// Writes the table when the run measured connection set-up on packet.
pub fn write(out: &mut String, results: &Results) {
    write_table(out, "Connection set-up against HAProxy, default plane", &targets(&results.connect));
}

fn targets(peers: &[PeerRounds<Sample>]) -> Vec<Target> {
    let packet =
        |dns| peers.iter().position(|p| p.kind == Some(PeerKind::SpliceProxyPacket) && p.dns == Some(dns));
    let (Some(cached), Some(each)) = (packet(DnsCache::Default), packet(DnsCache::Off)) else {
        return Vec::new();
    };
    let rate = summaries(peers, |s| s.connections_per_s);
    let p99 = summaries(peers, |s| s.ttfb_p99_us);
    let cpu = summaries(peers, |s| s.proxy_cpu_us_per_connection.unwrap_or(f64::NAN));
    let of = |stat: &[Stat], i: usize| Some(stat[i].median);
    let haproxy = |dns| best_haproxy_resolving(peers, &rate, dns);
    let (given, held, looked_up) =
        (haproxy(None), haproxy(Some(DnsCache::Default)), haproxy(Some(DnsCache::Off)));
    let target = |what: &str, ratio, bound| Target { what: what.to_owned(), ratio, bound };
    vec![
        target(
            "answers reused: rate ÷ HAProxy given the address",
            divide(of(&rate, cached), given.and_then(|h| of(&rate, h))),
            Bound::AtLeast(1.0),
        ),
        target(
            "answers reused: rate ÷ HAProxy do-resolve held 5 s",
            divide(of(&rate, cached), held.and_then(|h| of(&rate, h))),
            Bound::AtLeast(1.2),
        ),
        target(
            "answers reused: proxy's own CPU per connection ÷ HAProxy's, given the address",
            divide(of(&cpu, cached), given.and_then(|h| of(&cpu, h))),
            Bound::AtMost(1.0),
        ),
        target(
            "answers reused: first-byte p99 ÷ HAProxy do-resolve held 5 s",
            divide(of(&p99, cached), held.and_then(|h| of(&p99, h))),
            Bound::AtMost(1.0),
        ),
        target(
            "a lookup each connection: rate ÷ HAProxy do-resolve each connection",
            divide(of(&rate, each), looked_up.and_then(|h| of(&rate, h))),
            Bound::AtLeast(1.0),
        ),
        target(
            "a lookup each connection: first-byte p99 ÷ HAProxy do-resolve each connection",
            divide(of(&p99, each), looked_up.and_then(|h| of(&p99, h))),
            Bound::AtMost(1.0),
        ),
    ]
}
