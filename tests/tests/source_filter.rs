//! The XDP source filter's verdicts, packet by packet, through
//! `BPF_PROG_TEST_RUN`: the loaded program with its real maps and counters,
//! each packet's action and the one counter it moves (and, for a guarded
//! port, that port's counter). Ports with different lists: a source allowed
//! to one is dropped on the other. Runs as root in its own network namespace.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result, ensure};
use proxy_common::SourceFilterStats;
use splice_proxy::source_filter::{AllowLists, PortPrefix, SourceFilter, prefix::SourcePrefix};
use splice_proxy_tests::{frames::*, netns::NetNs};

/// XDP actions (uapi `enum xdp_action`).
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const GUARDED: u16 = 6443;
const ALSO_GUARDED: u16 = 443;
const UNGUARDED: u16 = 8080;
/// Guarded with a list of its own ([`OTHER_LIST`]).
const OTHER_PORT: u16 = 7443;
const OTHER_LIST: [&str; 2] = ["203.0.113.0/24", "2001:db8:2::/48"];
const PROXY_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const PROXY_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 2);

/// Which counter one packet must move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counter {
    Allowed,
    Dropped,
    Unguarded,
    Fragments,
    Malformed,
}

fn bump(stats: SourceFilterStats, counter: Counter) -> SourceFilterStats {
    let mut s = stats;
    match counter {
        Counter::Allowed => s.allowed += 1,
        Counter::Dropped => s.dropped += 1,
        Counter::Unguarded => s.unguarded += 1,
        Counter::Fragments => s.fragments += 1,
        Counter::Malformed => s.malformed += 1,
    }
    s
}

fn prefixes(list: &[&str]) -> Vec<SourcePrefix> {
    list.iter().map(|p| p.parse().unwrap_or_else(|e| panic!("{p}: {e}"))).collect()
}

fn lists(ports: &[(u16, &[&str])]) -> AllowLists {
    ports.iter().map(|(port, list)| (*port, prefixes(list).into_iter().collect())).collect()
}

fn entries(port: u16, list: &[&str]) -> Vec<PortPrefix> {
    prefixes(list).into_iter().map(|prefix| PortPrefix { port, prefix }).collect()
}

fn ip4(text: &str) -> Ipv4Addr {
    text.parse().expect("IPv4 literal")
}

fn ip6(text: &str) -> Ipv6Addr {
    text.parse().expect("IPv6 literal")
}

fn tcp4(src: &str, port: u16) -> Vec<u8> {
    ethernet(ETH_P_IP, &ipv4(ip4(src), PROXY_V4, V4::TCP, &tcp(40_000, port)))
}

fn tcp6(src: &str, port: u16) -> Vec<u8> {
    ethernet(ETH_P_IPV6, &ipv6(ip6(src), PROXY_V6, IPPROTO_TCP, &tcp(40_000, port)))
}

/// `ipv6` with `extensions` (each built for the next in line) in front of a TCP header.
fn tcp6_behind(src: &str, port: u16, first: u8, extensions: &[Vec<u8>]) -> Vec<u8> {
    let mut payload: Vec<u8> = extensions.concat();
    payload.extend_from_slice(&tcp(40_000, port));
    ethernet(ETH_P_IPV6, &ipv6(ip6(src), PROXY_V6, first, &payload))
}

/// Like [`check`], and also that the case's port counter (allowed or
/// dropped) moved by one and no other port's did.
fn check_ports(filter: &SourceFilter, cases: &[(&str, Vec<u8>, u32, Counter, u16)]) -> Result<()> {
    for (name, frame, action, counter, port) in cases {
        let before = filter.port_counters()?;
        check(filter, &[(name, frame.clone(), *action, *counter)])?;
        let mut expected = before.clone();
        match counter {
            Counter::Allowed => expected.entry(*port).or_default().allowed += 1,
            Counter::Dropped => expected.entry(*port).or_default().dropped += 1,
            // Not for a guarded port: no port counter moves.
            _ => {}
        }
        let after = filter.port_counters()?;
        ensure!(
            after == expected,
            "case {name}: port counters {before:?} -> {after:?}, expected {expected:?}"
        );
    }
    Ok(())
}

/// Runs every case and checks its action and that exactly its counter moved by one.
fn check(filter: &SourceFilter, cases: &[(&str, Vec<u8>, u32, Counter)]) -> Result<()> {
    for (name, frame, action, counter) in cases {
        let before = filter.counters()?;
        let got = filter.test_run(frame).with_context(|| format!("case {name}"))?;
        let after = filter.counters()?;
        ensure!(got == *action, "case {name}: action {got}, expected {action}");
        ensure!(
            after == bump(before, *counter),
            "case {name}: counters {before:?} -> {after:?}, expected {counter:?} + 1"
        );
    }
    Ok(())
}

#[test]
fn verdicts_and_counters_packet_by_packet() -> Result<()> {
    let _netns = NetNs::enter()?;
    let main: &[&str] = &["192.0.2.0/24", "198.51.100.7/32", "10.0.0.0/8", "10.1.0.0/16", "2001:db8:1::/48"];
    let mut filter =
        SourceFilter::load(&lists(&[(GUARDED, main), (ALSO_GUARDED, main), (OTHER_PORT, &OTHER_LIST)]))
            .context("loading the source filter")?;

    let v4_options = V4 { option_words: 3, option_byte: 0x01, ..V4::TCP };
    // Options whose bytes, read as a TCP header at offset 20, would give an unguarded port.
    let v4_port_lookalike = V4 { option_words: 1, option_byte: 0x1f, ..V4::TCP };
    let first_fragment = V4 { flags_offset: V4::MORE_FRAGMENTS, ..V4::TCP };
    let later_fragment = V4 { flags_offset: 185, ..V4::TCP };
    let denied = ip4("203.0.113.9");
    let mut short_tcp = ipv4(denied, PROXY_V4, V4::TCP, &tcp(40_000, GUARDED));
    short_tcp.truncate(20 + 3);
    let bad_ihl = {
        let mut p = ipv4(denied, PROXY_V4, V4::TCP, &tcp(40_000, GUARDED));
        p[0] = 0x44;
        p
    };
    let seven_options: Vec<Vec<u8>> =
        (0..7).map(|i| ipv6_options(if i == 6 { IPPROTO_TCP } else { IPPROTO_DSTOPTS })).collect();
    let cases = [
        ("v4 allowed by /24", tcp4("192.0.2.77", GUARDED), XDP_PASS, Counter::Allowed),
        ("v4 allowed, second guarded port", tcp4("192.0.2.1", ALSO_GUARDED), XDP_PASS, Counter::Allowed),
        ("v4 denied", tcp4("203.0.113.9", GUARDED), XDP_DROP, Counter::Dropped),
        ("v4 /32 host", tcp4("198.51.100.7", GUARDED), XDP_PASS, Counter::Allowed),
        ("v4 next to the /32 host", tcp4("198.51.100.8", GUARDED), XDP_DROP, Counter::Dropped),
        ("v4 inside /8 and /16", tcp4("10.1.2.3", GUARDED), XDP_PASS, Counter::Allowed),
        ("v4 inside /8 only", tcp4("10.2.0.1", GUARDED), XDP_PASS, Counter::Allowed),
        ("v4 denied, unguarded port", tcp4("203.0.113.9", UNGUARDED), XDP_PASS, Counter::Unguarded),
        (
            "v4 denied, UDP to the guarded port",
            ethernet(
                ETH_P_IP,
                &ipv4(denied, PROXY_V4, V4 { protocol: IPPROTO_UDP, ..V4::TCP }, &udp(5, GUARDED)),
            ),
            XDP_PASS,
            Counter::Unguarded,
        ),
        ("ARP", arp(denied, PROXY_V4), XDP_PASS, Counter::Unguarded),
        (
            "v4 options, denied",
            ethernet(ETH_P_IP, &ipv4(denied, PROXY_V4, v4_options, &tcp(1, GUARDED))),
            XDP_DROP,
            Counter::Dropped,
        ),
        (
            "v4 options, allowed",
            ethernet(ETH_P_IP, &ipv4(ip4("192.0.2.5"), PROXY_V4, v4_options, &tcp(1, GUARDED))),
            XDP_PASS,
            Counter::Allowed,
        ),
        (
            "v4 options that look like another port",
            ethernet(ETH_P_IP, &ipv4(denied, PROXY_V4, v4_port_lookalike, &tcp(1, GUARDED))),
            XDP_DROP,
            Counter::Dropped,
        ),
        (
            "v4 first fragment, denied",
            ethernet(ETH_P_IP, &ipv4(denied, PROXY_V4, first_fragment, &tcp(1, GUARDED))),
            XDP_DROP,
            Counter::Dropped,
        ),
        (
            "v4 later fragment, denied source",
            ethernet(ETH_P_IP, &ipv4(denied, PROXY_V4, later_fragment, &[0u8; 16])),
            XDP_PASS,
            Counter::Fragments,
        ),
        ("v4 header cut short", ethernet(ETH_P_IP, &short_tcp[..12]), XDP_PASS, Counter::Malformed),
        ("v4 TCP ports cut short", ethernet(ETH_P_IP, &short_tcp), XDP_PASS, Counter::Malformed),
        ("v4 header length below 20", ethernet(ETH_P_IP, &bad_ihl), XDP_PASS, Counter::Malformed),
        ("Ethernet header only", ethernet(ETH_P_IP, &[]), XDP_PASS, Counter::Malformed),
        (
            "802.1Q tagged v4 denied",
            ethernet(ETH_P_8021Q, &vlan(ETH_P_IP, &ipv4(denied, PROXY_V4, V4::TCP, &tcp(1, GUARDED)))),
            XDP_DROP,
            Counter::Dropped,
        ),
        (
            "QinQ tagged v4 denied",
            ethernet(
                ETH_P_8021AD,
                &vlan(ETH_P_8021Q, &vlan(ETH_P_IP, &ipv4(denied, PROXY_V4, V4::TCP, &tcp(1, GUARDED)))),
            ),
            XDP_DROP,
            Counter::Dropped,
        ),
        ("v6 allowed by /48", tcp6("2001:db8:1:ffff::5", GUARDED), XDP_PASS, Counter::Allowed),
        ("v6 denied", tcp6("2001:db8:2::5", GUARDED), XDP_DROP, Counter::Dropped),
        ("v6 denied, unguarded port", tcp6("2001:db8:2::5", UNGUARDED), XDP_PASS, Counter::Unguarded),
        (
            "v6 denied, UDP to the guarded port",
            ethernet(ETH_P_IPV6, &ipv6(ip6("2001:db8:2::5"), PROXY_V6, IPPROTO_UDP, &udp(5, GUARDED))),
            XDP_PASS,
            Counter::Unguarded,
        ),
        (
            "v6 hop-by-hop and destination options, denied",
            tcp6_behind(
                "2001:db8:2::5",
                GUARDED,
                IPPROTO_HOPOPTS,
                &[ipv6_options(IPPROTO_DSTOPTS), ipv6_options(IPPROTO_TCP)],
            ),
            XDP_DROP,
            Counter::Dropped,
        ),
        (
            "v6 hop-by-hop, allowed",
            tcp6_behind("2001:db8:1::9", GUARDED, IPPROTO_HOPOPTS, &[ipv6_options(IPPROTO_TCP)]),
            XDP_PASS,
            Counter::Allowed,
        ),
        (
            "v6 first fragment, denied",
            tcp6_behind("2001:db8:2::5", GUARDED, IPPROTO_FRAGMENT, &[ipv6_fragment(IPPROTO_TCP, 0, true)]),
            XDP_DROP,
            Counter::Dropped,
        ),
        (
            "v6 later fragment, denied source",
            tcp6_behind("2001:db8:2::5", GUARDED, IPPROTO_FRAGMENT, &[ipv6_fragment(IPPROTO_TCP, 4, false)]),
            XDP_PASS,
            Counter::Fragments,
        ),
        (
            "v6 seven extension headers, denied: fails closed",
            tcp6_behind("2001:db8:3::5", UNGUARDED, IPPROTO_DSTOPTS, &seven_options),
            XDP_DROP,
            Counter::Dropped,
        ),
        (
            "v6 seven extension headers, allowed to another port only",
            tcp6_behind("2001:db8:2::5", UNGUARDED, IPPROTO_DSTOPTS, &seven_options),
            XDP_PASS,
            Counter::Allowed,
        ),
        (
            "v6 seven extension headers, allowed",
            tcp6_behind("2001:db8:1::5", UNGUARDED, IPPROTO_DSTOPTS, &seven_options),
            XDP_PASS,
            Counter::Allowed,
        ),
        (
            "v6 header cut short",
            ethernet(ETH_P_IPV6, &tcp6("2001:db8:2::5", GUARDED)[14..40]),
            XDP_PASS,
            Counter::Malformed,
        ),
    ];
    check(&filter, &cases)?;

    // Two ports, two lists: each source only to its own port, both families.
    check_ports(
        &filter,
        &[
            ("v4 allowed to 7443", tcp4("203.0.113.9", OTHER_PORT), XDP_PASS, Counter::Allowed, OTHER_PORT),
            ("v4 of 7443's list, to 6443", tcp4("203.0.113.9", GUARDED), XDP_DROP, Counter::Dropped, GUARDED),
            (
                "v4 of 6443's list, to 7443",
                tcp4("192.0.2.77", OTHER_PORT),
                XDP_DROP,
                Counter::Dropped,
                OTHER_PORT,
            ),
            ("v4 allowed to 6443", tcp4("192.0.2.77", GUARDED), XDP_PASS, Counter::Allowed, GUARDED),
            ("v4 unguarded port", tcp4("203.0.113.9", UNGUARDED), XDP_PASS, Counter::Unguarded, UNGUARDED),
            ("v6 allowed to 7443", tcp6("2001:db8:2::5", OTHER_PORT), XDP_PASS, Counter::Allowed, OTHER_PORT),
            (
                "v6 of 7443's list, to 443",
                tcp6("2001:db8:2::5", ALSO_GUARDED),
                XDP_DROP,
                Counter::Dropped,
                ALSO_GUARDED,
            ),
            (
                "v6 of 6443's list, to 7443",
                tcp6("2001:db8:1::5", OTHER_PORT),
                XDP_DROP,
                Counter::Dropped,
                OTHER_PORT,
            ),
            (
                "v6 allowed to 443",
                tcp6("2001:db8:1::5", ALSO_GUARDED),
                XDP_PASS,
                Counter::Allowed,
                ALSO_GUARDED,
            ),
            ("v6 unguarded port", tcp6("2001:db8:1::5", UNGUARDED), XDP_PASS, Counter::Unguarded, UNGUARDED),
        ],
    )?;

    // A reload changes the lists in place: on 6443 the /8 goes, its /16
    // stays; 443 is no longer guarded; 7443 keeps its list.
    let kept: &[&str] = &["192.0.2.0/24", "10.1.0.0/16", "2001:db8:1::/48"];
    let summary = filter.reload(&lists(&[(GUARDED, kept), (OTHER_PORT, &OTHER_LIST)]))?;
    assert_eq!(summary.added, Vec::<PortPrefix>::new());
    let mut removed = entries(ALSO_GUARDED, main);
    removed.extend(entries(GUARDED, &["10.0.0.0/8", "198.51.100.7/32"]));
    removed.sort();
    assert_eq!(summary.removed, removed);
    assert_eq!((summary.guarded, summary.unguarded), (vec![], vec![ALSO_GUARDED]));
    assert_eq!(filter.allowed(), lists(&[(GUARDED, kept), (OTHER_PORT, &OTHER_LIST)]));
    check(
        &filter,
        &[
            ("after reload: inside the remaining /16", tcp4("10.1.2.3", GUARDED), XDP_PASS, Counter::Allowed),
            ("after reload: the removed /8", tcp4("10.2.0.1", GUARDED), XDP_DROP, Counter::Dropped),
            ("after reload: the removed /32", tcp4("198.51.100.7", GUARDED), XDP_DROP, Counter::Dropped),
            (
                "after reload: 443 not guarded",
                tcp4("203.0.113.9", ALSO_GUARDED),
                XDP_PASS,
                Counter::Unguarded,
            ),
            ("after reload: 7443 kept", tcp4("203.0.113.9", OTHER_PORT), XDP_PASS, Counter::Allowed),
        ],
    )?;
    ensure!(!filter.port_counters()?.contains_key(&ALSO_GUARDED), "443 still has counters");
    // Port 0 holds every list together in the tries: it cannot be a listener's.
    ensure!(filter.reload(&lists(&[(0, &["192.0.2.0/24"])])).is_err(), "port 0 was accepted");
    // /0 allows every IPv4 source to its port, and no IPv6 one; 7443 is left unguarded.
    let summary = filter.reload(&lists(&[(GUARDED, &["0.0.0.0/0"])]))?;
    assert_eq!(summary.added, entries(GUARDED, &["0.0.0.0/0"]));
    assert_eq!(summary.unguarded, vec![OTHER_PORT]);
    assert_eq!(filter.allowed(), lists(&[(GUARDED, &["0.0.0.0/0"])]));
    check(
        &filter,
        &[
            ("/0: any IPv4 source", tcp4("203.0.113.9", GUARDED), XDP_PASS, Counter::Allowed),
            ("/0: not IPv6", tcp6("2001:db8:1::9", GUARDED), XDP_DROP, Counter::Dropped),
            ("/0: other ports unguarded", tcp4("192.0.2.77", OTHER_PORT), XDP_PASS, Counter::Unguarded),
        ],
    )?;
    // A listener that gains a list on reload: its port is guarded from then on.
    let summary = filter.reload(&lists(&[(GUARDED, &["0.0.0.0/0"]), (UNGUARDED, &["198.51.100.0/24"])]))?;
    assert_eq!((summary.added, summary.guarded), (entries(UNGUARDED, &["198.51.100.0/24"]), vec![UNGUARDED]));
    check_ports(
        &filter,
        &[
            (
                "newly guarded: allowed",
                tcp4("198.51.100.9", UNGUARDED),
                XDP_PASS,
                Counter::Allowed,
                UNGUARDED,
            ),
            ("newly guarded: denied", tcp4("203.0.113.9", UNGUARDED), XDP_DROP, Counter::Dropped, UNGUARDED),
        ],
    )?;
    Ok(())
}
