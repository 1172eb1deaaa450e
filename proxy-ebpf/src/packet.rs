//! Bounds-checked reads from an XDP packet, in a form the verifier accepts:
//! the packet pointer plus the offset is compared with `data_end` before the
//! load; and the header constants (Ethernet, IP) the XDP programs parse with.

use aya_ebpf::programs::XdpContext;

/// The `N` bytes at `offset` of the packet, if the packet holds them.
#[inline(always)]
pub fn bytes<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<[u8; N]> {
    let start = ctx.data() + offset;
    if start + N > ctx.data_end() {
        return None;
    }
    // SAFETY: the range was checked against data_end just above.
    Some(unsafe { *(start as *const [u8; N]) })
}

/// The big-endian `u16` at `offset`, if the packet holds it.
#[inline(always)]
pub fn be16(ctx: &XdpContext, offset: usize) -> Option<u16> {
    bytes::<2>(ctx, offset).map(u16::from_be_bytes)
}

/// Ethernet header length (no VLAN tag).
pub const ETH_HLEN: usize = 14;
/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// EtherType of an 802.1Q VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// EtherType of an 802.1ad (QinQ) service tag.
pub const ETH_P_8021AD: u16 = 0x88a8;
/// Length of one VLAN tag.
pub const VLAN_HLEN: usize = 4;

/// IPv4 header length without options.
pub const IPV4_HLEN: usize = 20;
/// IPv6 fixed header length.
pub const IPV6_HLEN: usize = 40;
/// Fragment offset bits of the IPv4 flags/offset field.
pub const IPV4_OFFSET_MASK: u16 = 0x1fff;
/// Fragment offset bits of the IPv6 fragment header's offset/flags field.
pub const IPV6_OFFSET_MASK: u16 = 0xfff8;

// IP protocol numbers (IPv4 protocol field, IPv6 next header).
/// IPv6 hop-by-hop options header.
pub const IPPROTO_HOPOPTS: u8 = 0;
/// TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IPv6 routing header.
pub const IPPROTO_ROUTING: u8 = 43;
/// IPv6 fragment header.
pub const IPPROTO_FRAGMENT: u8 = 44;
/// Authentication header.
pub const IPPROTO_AH: u8 = 51;
/// IPv6 destination options header.
pub const IPPROTO_DSTOPTS: u8 = 60;
