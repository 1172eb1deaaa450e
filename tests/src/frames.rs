//! Raw Ethernet frames for `BPF_PROG_TEST_RUN`: IPv4 (with options and
//! fragment fields), IPv6 (with extension headers), TCP, UDP, VLAN tags, ARP.
//! Checksums are left zero: XDP programs see frames before anything checks them.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_DSTOPTS: u8 = 60;

/// An Ethernet header with `ether_type`, then `payload`.
#[must_use]
pub fn ethernet(ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The rest of a VLAN tag (VLAN 100) and `inner_type`, then `payload`: the
/// payload of `ethernet(ETH_P_8021Q or ETH_P_8021AD, ..)`.
#[must_use]
pub fn vlan(inner_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut tag = vec![0x00, 0x64];
    tag.extend_from_slice(&inner_type.to_be_bytes());
    tag.extend_from_slice(payload);
    tag
}

/// A TCP SYN header (20 bytes).
#[must_use]
pub fn tcp(src_port: u16, dst_port: u16) -> Vec<u8> {
    let mut header = Vec::with_capacity(20);
    header.extend_from_slice(&src_port.to_be_bytes());
    header.extend_from_slice(&dst_port.to_be_bytes());
    header.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    header
}

/// A UDP header with 4 bytes of data.
#[must_use]
pub fn udp(src_port: u16, dst_port: u16) -> Vec<u8> {
    let mut datagram = Vec::with_capacity(12);
    datagram.extend_from_slice(&src_port.to_be_bytes());
    datagram.extend_from_slice(&dst_port.to_be_bytes());
    datagram.extend_from_slice(&12u16.to_be_bytes());
    datagram.extend_from_slice(&[0, 0, b'd', b'a', b't', b'a']);
    datagram
}

/// IPv4 packet fields beyond the addresses.
#[derive(Debug, Clone, Copy)]
pub struct V4 {
    pub protocol: u8,
    /// Flags and fragment offset (in 8-byte units), as on the wire.
    pub flags_offset: u16,
    /// Words of options (each 4 bytes of `option_byte`), 0 to 10.
    pub option_words: u8,
    pub option_byte: u8,
}

impl V4 {
    pub const TCP: Self = Self { protocol: IPPROTO_TCP, flags_offset: 0, option_words: 0, option_byte: 0 };
    pub const MORE_FRAGMENTS: u16 = 0x2000;
}

/// An IPv4 packet from `src` to `dst` carrying `payload`.
#[must_use]
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, fields: V4, payload: &[u8]) -> Vec<u8> {
    let header_len = 20 + 4 * usize::from(fields.option_words);
    let total = u16::try_from(header_len + payload.len()).expect("small packets");
    let mut packet = vec![0x40 | (5 + fields.option_words), 0];
    packet.extend_from_slice(&total.to_be_bytes());
    packet.extend_from_slice(&[0x12, 0x34]);
    packet.extend_from_slice(&fields.flags_offset.to_be_bytes());
    packet.extend_from_slice(&[64, fields.protocol, 0, 0]);
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    packet.resize(header_len, fields.option_byte);
    packet.extend_from_slice(payload);
    packet
}

/// An IPv6 extension header (hop-by-hop, routing or destination options) of
/// 8 bytes, followed by `next`.
#[must_use]
pub fn ipv6_options(next: u8) -> Vec<u8> {
    // Next header, length 0 (8 bytes), a PadN option filling the rest.
    vec![next, 0, 1, 4, 0, 0, 0, 0]
}

/// An IPv6 fragment header followed by `next`, at `offset` (8-byte units).
#[must_use]
pub fn ipv6_fragment(next: u8, offset: u16, more: bool) -> Vec<u8> {
    let field = (offset << 3) | u16::from(more);
    let mut header = vec![next, 0];
    header.extend_from_slice(&field.to_be_bytes());
    header.extend_from_slice(&[0, 0, 0, 7]);
    header
}

/// An IPv6 packet whose first next header is `next`, carrying `payload`
/// (extension headers included).
#[must_use]
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(payload.len()).expect("small packets");
    let mut packet = vec![0x60, 0, 0, 0];
    packet.extend_from_slice(&len.to_be_bytes());
    packet.extend_from_slice(&[next, 64]);
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    packet.extend_from_slice(payload);
    packet
}

/// An ARP request (Ethernet, IPv4) for `target` from `sender`.
#[must_use]
pub fn arp(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut packet = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1, 0x02, 0, 0, 0, 0, 0x02];
    packet.extend_from_slice(&sender.octets());
    packet.extend_from_slice(&[0; 6]);
    packet.extend_from_slice(&target.octets());
    ethernet(ETH_P_ARP, &packet)
}
