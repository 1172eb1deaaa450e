//! `source_filter` (XDP): on the interface named by `--xdp-interface`, drops
//! TCP packets to a guarded port (the proxy's listen ports) whose source
//! address is in no allowed prefix, and passes every other packet untouched.
//!
//! What it parses: Ethernet with up to two VLAN tags; IPv4 with options (the
//! header length field); IPv6 with up to [`MAX_IPV6_EXTENSIONS`] extension
//! headers (hop-by-hop, routing, destination options, fragment, AH) before
//! TCP. A chain longer than that cannot be followed here, and the kernel
//! would still deliver a TCP segment behind it: such a packet is treated as
//! if it were for a guarded port (dropped unless its source is allowed).
//! Fragments after the first carry no port and are passed: without their
//! first fragment (which carries the port and is checked) they are never
//! reassembled. Truncated or malformed headers are passed: the IP layer
//! drops them.

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use proxy_common::{MAX_GUARDED_PORTS, MAX_SOURCE_PREFIXES, SourceFilterStats};

use crate::packet::{be16, bytes};

/// Allowed IPv4 source prefixes; the value is unused.
#[map]
static SOURCE_ALLOW_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(2 * MAX_SOURCE_PREFIXES, 0);

/// Allowed IPv6 source prefixes; the value is unused.
#[map]
static SOURCE_ALLOW_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(2 * MAX_SOURCE_PREFIXES, 0);

/// TCP destination ports the filter guards (host byte order); the value is unused.
#[map]
static GUARDED_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_GUARDED_PORTS, 0);

/// One [`SourceFilterStats`] slot per CPU; user space sums the CPUs.
#[map]
static SOURCE_STATS: PerCpuArray<SourceFilterStats> = PerCpuArray::with_max_entries(1, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_HLEN: usize = 4;
const MAX_VLAN_TAGS: usize = 2;

const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
/// Fragment offset bits of the IPv4 flags/offset field.
const IPV4_OFFSET_MASK: u16 = 0x1fff;
/// Fragment offset bits of the IPv6 fragment header's offset/flags field.
const IPV6_OFFSET_MASK: u16 = 0xfff8;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
/// IPv6 extension headers followed before giving up (RFC 8200 orders at
/// most six in front of the upper layer).
const MAX_IPV6_EXTENSIONS: usize = 6;

/// What the program decided about one packet, and why.
enum Verdict {
    /// TCP to a guarded port from an allowed source.
    Allowed,
    /// TCP to a guarded port from a source in no allowed prefix.
    Denied,
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
    let action = if matches!(verdict, Verdict::Denied) { xdp_action::XDP_DROP } else { xdp_action::XDP_PASS };
    let stats = SOURCE_STATS.get_ptr_mut(0).ok_or(FilterError::NoStatsSlot { action })?;
    // SAFETY: this CPU's slot of a per-CPU map; nothing else writes it while
    // this program runs on this CPU.
    let stats = unsafe { &mut *stats };
    let counter = match verdict {
        Verdict::Allowed => &mut stats.allowed,
        Verdict::Denied => &mut stats.dropped,
        Verdict::Unguarded => &mut stats.unguarded,
        Verdict::Fragment => &mut stats.fragments,
        Verdict::Malformed => &mut stats.malformed,
    };
    *counter += 1;
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
    if GUARDED_PORTS.get_ptr(port).is_none() {
        return Verdict::Unguarded;
    }
    let source = Key::new(32, [ip[12], ip[13], ip[14], ip[15]]);
    if SOURCE_ALLOW_V4.get(&source).is_some() { Verdict::Allowed } else { Verdict::Denied }
}

fn ipv6(ctx: &XdpContext, offset: usize) -> Verdict {
    let Some(ip) = bytes::<IPV6_HLEN>(ctx, offset) else { return Verdict::Malformed };
    if ip[0] >> 4 != 6 {
        return Verdict::Malformed;
    }
    let mut source = [0u8; 16];
    source.copy_from_slice(&ip[8..24]);
    let allowed = || SOURCE_ALLOW_V6.get(Key::new(128, source)).is_some();
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
        // Too many extension headers to find the TCP header: fail closed.
        return if allowed() { Verdict::Allowed } else { Verdict::Denied };
    }
    let Some(port) = be16(ctx, offset + 2) else { return Verdict::Malformed };
    if GUARDED_PORTS.get_ptr(port).is_none() {
        return Verdict::Unguarded;
    }
    if allowed() { Verdict::Allowed } else { Verdict::Denied }
}
