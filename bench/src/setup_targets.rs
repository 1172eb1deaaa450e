//! Connection set-up against HAProxy, on the default plane (`auto`, which
//! runs packet; its peer here is `splice-proxy packet`), in any topology:
//! with answers reused, the rate against HAProxy given the address (the
//! floor of a proxy that resolves nothing) and against HAProxy resolving
//! each connection's upstream with answers held alike (`do-resolve`), and
//! the proxy's own CPU per connection; with a lookup for every connection,
//! the rate against HAProxy looking up every connection; first-byte p99
//! against the HAProxy that resolves alike, in both cases. Each a ratio of
//! medians of the same run, with the ratio round by round.

use crate::{
    connect_rate::Sample,
    peers::{DnsCache, PeerKind},
    report::{best_haproxy_resolving, summaries},
    results::{PeerRounds, Results},
    targets::{Bound, Target, write_table},
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
    let rate = |s: &Sample| s.connections_per_s;
    let p99 = |s: &Sample| s.ttfb_p99_us;
    let cpu = |s: &Sample| s.proxy_cpu_us_per_connection.unwrap_or(f64::NAN);
    let rates = summaries(peers, rate);
    let haproxy = |dns| best_haproxy_resolving(peers, &rates, dns);
    let (given, held, looked_up) =
        (haproxy(None), haproxy(Some(DnsCache::Default)), haproxy(Some(DnsCache::Off)));
    vec![
        Target::compare(
            "answers reused: rate ÷ HAProxy given the address",
            peers,
            rate,
            Some(cached),
            given,
            Bound::AtLeast(1.0),
        ),
        Target::compare(
            "answers reused: rate ÷ HAProxy do-resolve held 5 s",
            peers,
            rate,
            Some(cached),
            held,
            Bound::AtLeast(1.2),
        ),
        Target::compare(
            "answers reused: proxy's own CPU per connection ÷ HAProxy's, given the address",
            peers,
            cpu,
            Some(cached),
            given,
            Bound::AtMost(1.0),
        ),
        Target::compare(
            "answers reused: first-byte p99 ÷ HAProxy do-resolve held 5 s",
            peers,
            p99,
            Some(cached),
            held,
            Bound::AtMost(1.0),
        ),
        Target::compare(
            "a lookup each connection: rate ÷ HAProxy do-resolve each connection",
            peers,
            rate,
            Some(each),
            looked_up,
            Bound::AtLeast(1.0),
        ),
        Target::compare(
            "a lookup each connection: first-byte p99 ÷ HAProxy do-resolve each connection",
            peers,
            p99,
            Some(each),
            looked_up,
            Bound::AtMost(1.0),
        ),
    ]
}
