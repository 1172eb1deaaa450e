//! `source_filter` (XDP): on the interface named by `--xdp-interface`, drops
//! TCP packets to a guarded port (the listen port of a listener with an
//! allow list) whose source address is in none of that port's prefixes, and
//! passes every other packet untouched. The tries are keyed by port, then
//! address, so one lookup answers "is this source allowed to this port".
//!
//! What it parses: Ethernet with up to two VLAN tags; IPv4 with options (the
//! header length field); IPv6 with up to [`MAX_IPV6_EXTENSIONS`] extension
//! headers (hop-by-hop, routing, destination options, fragment, AH) before
//! TCP. A chain longer than that cannot be followed here, and the kernel
//! would still deliver a TCP segment behind it: such a packet is treated as
//! if it were for a guarded port (dropped unless its source is allowed to
//! one: looked up under [`ANY_GUARDED_PORT`]).
//! Fragments after the first carry no port and are passed: without their
//! first fragment (which carries the port and is checked) they are never
//! reassembled. Truncated or malformed headers are passed: the IP layer
//! drops them.

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{LpmTrie, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    programs::XdpContext,
};
use proxy_common::{
    ANY_GUARDED_PORT, MAX_GUARDED_PORTS, PORT_PREFIX_BITS, PortFilterStats, SOURCE_TRIE_CAPACITY,
    SourceFilterStats, SourceKeyV4, SourceKeyV6,
};

use crate::packet::{
    ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_AH, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT,
    IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_TCP, IPV4_HLEN, IPV4_OFFSET_MASK, IPV6_HLEN, IPV6_OFFSET_MASK,
    VLAN_HLEN, be16, bytes,
};

/// Allowed IPv4 sources per guarded port (port, then prefix); the value is unused.
#[map]
static SOURCE_ALLOW_V4: LpmTrie<SourceKeyV4, u8> = LpmTrie::with_max_entries(SOURCE_TRIE_CAPACITY, 0);

/// Allowed IPv6 sources per guarded port (port, then prefix); the value is unused.
#[map]
static SOURCE_ALLOW_V6: LpmTrie<SourceKeyV6, u8> = LpmTrie::with_max_entries(SOURCE_TRIE_CAPACITY, 0);

/// Guarded TCP destination ports (host byte order) with their per-CPU verdict counts.
#[map]
static GUARDED_PORTS: PerCpuHashMap<u16, PortFilterStats> =
    PerCpuHashMap::with_max_entries(MAX_GUARDED_PORTS, 0);

/// One [`SourceFilterStats`] slot per CPU; user space sums the CPUs.
#[map]
static SOURCE_STATS: PerCpuArray<SourceFilterStats> = PerCpuArray::with_max_entries(1, 0);

const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers followed before giving up (RFC 8200 orders at
/// most six in front of the upper layer).
const MAX_IPV6_EXTENSIONS: usize = 6;

/// This CPU's counters of one guarded port, when the packet's port is known.
type PortSlot = Option<*mut PortFilterStats>;

/// What the program decided about one packet, and why.
enum Verdict {
    /// TCP to a guarded port from a source allowed to it.
    Allowed(PortSlot),
    /// TCP to a guarded port from a source in none of its prefixes.
    Denied(PortSlot),
    /// Not TCP to a guarded port.
    Unguarded,
    /// A fragment after the first: no port to check.
    Fragment,
    /// Headers cut short or invalid.
    Malformed,
}

/// Why the packet could not be counted; the verdict stands regardless.
enum FilterError {
    /// The per-CPU stats slot was missing (cannot happen for index 0 of a
    /// one-entry array, but the verifier needs the check).
    NoStatsSlot { action: u32 },
}

#[xdp]
pub fn source_filter(ctx: XdpContext) -> u32 {
    match try_source_filter(&ctx) {
        Ok(action) | Err(FilterError::NoStatsSlot { action }) => action,
    }
}

fn try_source_filter(ctx: &XdpContext) -> Result<u32, FilterError> {
    let verdict = classify(ctx);
    let action =
        if matches!(verdict, Verdict::Denied(_)) { xdp_action::XDP_DROP } else { xdp_action::XDP_PASS };
    let stats = SOURCE_STATS.get_ptr_mut(0).ok_or(FilterError::NoStatsSlot { action })?;
    // SAFETY: this CPU's slot of a per-CPU map; nothing else writes it while
    // this program runs on this CPU.
    let stats = unsafe { &mut *stats };
    let (counter, port) = match verdict {
        Verdict::Allowed(port) => (
            &mut stats.allowed,
            port.map(|p| {
                // SAFETY: this CPU's value of a per-CPU hash entry; written only
                // by this program on this CPU.
                unsafe { &mut (*p).allowed }
            }),
        ),
        Verdict::Denied(port) => (
            &mut stats.dropped,
            port.map(|p| {
                // SAFETY: as above.
                unsafe { &mut (*p).dropped }
            }),
        ),
        Verdict::Unguarded => (&mut stats.unguarded, None),
        Verdict::Fragment => (&mut stats.fragments, None),
        Verdict::Malformed => (&mut stats.malformed, None),
    };
    *counter += 1;
    if let Some(port) = port {
        *port += 1;
    }
    Ok(action)
}

fn classify(ctx: &XdpContext) -> Verdict {
    let Some(mut ether_type) = be16(ctx, 12) else { return Verdict::Malformed };
    let mut offset = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let Some(inner) = be16(ctx, offset + 2) else { return Verdict::Malformed };
        ether_type = inner;
        offset += VLAN_HLEN;
    }
    match ether_type {
        ETH_P_IP => ipv4(ctx, offset),
        ETH_P_IPV6 => ipv6(ctx, offset),
        _ => Verdict::Unguarded,
    }
}

fn ipv4(ctx: &XdpContext, offset: usize) -> Verdict {
    let Some(ip) = bytes::<IPV4_HLEN>(ctx, offset) else { return Verdict::Malformed };
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || header_len < IPV4_HLEN {
        return Verdict::Malformed;
    }
    if ip[9] != IPPROTO_TCP {
        return Verdict::Unguarded;
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & IPV4_OFFSET_MASK != 0 {
        return Verdict::Fragment;
    }
    let Some(port) = be16(ctx, offset + header_len + 2) else { return Verdict::Malformed };
    let Some(slot) = GUARDED_PORTS.get_ptr_mut(port) else { return Verdict::Unguarded };
    let source = SourceKeyV4 { port: port.to_be_bytes(), addr: [ip[12], ip[13], ip[14], ip[15]] };
    let allowed = SOURCE_ALLOW_V4.get(Key::new(PORT_PREFIX_BITS + 32, source)).is_some();
    if allowed { Verdict::Allowed(Some(slot)) } else { Verdict::Denied(Some(slot)) }
}

fn ipv6(ctx: &XdpContext, offset: usize) -> Verdict {
    let Some(ip) = bytes::<IPV6_HLEN>(ctx, offset) else { return Verdict::Malformed };
    if ip[0] >> 4 != 6 {
        return Verdict::Malformed;
    }
    let mut addr = [0u8; 16];
    addr.copy_from_slice(&ip[8..24]);
    let allowed = |port: u16| {
        let source = SourceKeyV6 { port: port.to_be_bytes(), addr };
        SOURCE_ALLOW_V6.get(Key::new(PORT_PREFIX_BITS + 128, source)).is_some()
    };
    let mut next = ip[6];
    let mut offset = offset + IPV6_HLEN;
    for _ in 0..MAX_IPV6_EXTENSIONS {
        let step = match next {
            IPPROTO_TCP => break,
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let Some([header, len]) = bytes::<2>(ctx, offset) else { return Verdict::Malformed };
                next = header;
                (usize::from(len) + 1) * 8
            }
            IPPROTO_AH => {
                let Some([header, len]) = bytes::<2>(ctx, offset) else { return Verdict::Malformed };
                next = header;
                (usize::from(len) + 2) * 4
            }
            IPPROTO_FRAGMENT => {
                let Some(fragment) = bytes::<4>(ctx, offset) else { return Verdict::Malformed };
                if u16::from_be_bytes([fragment[2], fragment[3]]) & IPV6_OFFSET_MASK != 0 {
                    return Verdict::Fragment;
                }
                next = fragment[0];
                8
            }
            // UDP, ICMPv6, ESP, no next header, ...: not for the proxy.
            _ => return Verdict::Unguarded,
        };
        offset += step;
    }
    if next != IPPROTO_TCP {
        // Too many extension headers to find the TCP header: fail closed,
        // unless the source is allowed to some guarded port.
        return if allowed(ANY_GUARDED_PORT) { Verdict::Allowed(None) } else { Verdict::Denied(None) };
    }
    let Some(port) = be16(ctx, offset + 2) else { return Verdict::Malformed };
    let Some(slot) = GUARDED_PORTS.get_ptr_mut(port) else { return Verdict::Unguarded };
    if allowed(port) { Verdict::Allowed(Some(slot)) } else { Verdict::Denied(Some(slot)) }
}
