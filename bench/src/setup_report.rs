//! The table of a connection set-up workload (connect, TLS): rate, the time
//! to what the workload waits for (p50, p99), CPU per connection, and
//! ratios to the fastest HAProxy given the address, to the fastest HAProxy
//! resolving the name the same way (for a peer that resolves it), and to
//! the reference.

use std::fmt::Write as _;

use crate::{
    connect_rate::Sample,
    report::{best_haproxy_resolving, heading, summaries},
    results::PeerRounds,
    stats::ratio,
};

/// Writes the table under `title`; `measured`: what the time is to.
pub fn write(out: &mut String, title: &str, peers: &[PeerRounds<Sample>], reference: &str, measured: &str) {
    let rate = summaries(peers, |s| s.connections_per_s);
    let (p50, p99) = (summaries(peers, |s| s.ttfb_p50_us), summaries(peers, |s| s.ttfb_p99_us));
    let machine_cpu = summaries(peers, |s| s.machine_cpu_us_per_connection);
    let proxy_cpu = summaries(peers, |s| s.proxy_cpu_us_per_connection.unwrap_or(f64::NAN));
    let queries = summaries(peers, |s| s.dns_queries_per_connection.unwrap_or(f64::NAN));
    // HAProxy given the address: the cost floor of a proxy that resolves
    // nothing; and, for a peer that resolves, HAProxy resolving alike.
    let best = best_haproxy_resolving(peers, &rate, None);
    heading(out, title, peers, best, "highest rate, given the address");
    let resolving_peers = peers.iter().any(|p| p.dns.is_some());
    if resolving_peers {
        let _ = writeln!(
            out,
            "The do-resolve column compares a peer that resolves the name with the fastest HAProxy \
             resolving it the same way (each connection, or answers held 5 s). DNS queries/conn: \
             what the bench's DNS server answered per connection; below 1 with a lookup each \
             connection, lookups were shared (splice-proxy and HAProxy join a lookup of the same \
             name in flight; HAProxy also hands out the answer it got earlier in the same \
             millisecond).\n"
        );
    }
    let queries_column = if resolving_peers { " DNS queries/conn |" } else { "" };
    let _ = writeln!(
        out,
        "| peer | connections/s | {measured} p50 µs | {measured} p99 µs | machine CPU µs/conn | proxy's own CPU µs/conn \
         |{queries_column} rate ÷ best HAProxy | p99 ÷ best HAProxy | rate ÷ best do-resolve HAProxy | rate ÷ {reference} |\n\
         |---|---|---|---|---|---|{}---|---|---|---|",
        if resolving_peers { "---|" } else { "" }
    );
    for (i, peer) in peers.iter().enumerate() {
        let resolving = peer.dns.and_then(|_| best_haproxy_resolving(peers, &rate, peer.dns));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |{} {} | {} | {} | {} |",
            peer.peer,
            rate[i].show(0),
            p50[i].show(0),
            p99[i].show(0),
            machine_cpu[i].show(0),
            if proxy_cpu[i].median.is_nan() { "—".to_owned() } else { proxy_cpu[i].show(0) },
            match (resolving_peers, queries[i].median.is_nan()) {
                (false, _) => String::new(),
                (true, true) => " — |".to_owned(),
                (true, false) => format!(" {} |", queries[i].show(2)),
            },
            ratio(rate[i].median, best.map(|b| rate[b].median)),
            ratio(p99[i].median, best.map(|b| p99[b].median)),
            ratio(rate[i].median, resolving.map(|b| rate[b].median)),
            ratio(rate[i].median, rate.first().map(|s| s.median)),
        );
    }
}
