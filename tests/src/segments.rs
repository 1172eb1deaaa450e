//! Whole TCP/IPv4 frames with valid checksums, and their fields read back:
//! for the packet-splicing program, which rewrites headers and must leave
//! every checksum right.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, ensure};

/// TCP flag bits.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// One TCP segment in an Ethernet frame, field by field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// Option bytes, padded by the builder to a multiple of 4 with NOPs.
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Segment {
    /// A data segment (PSH, ACK) of `payload` with no options.
    #[must_use]
    pub fn data(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), seq: u32, ack: u32, payload: &[u8]) -> Self {
        Self {
            src_mac: [0x02, 0, 0, 0, 0, 0x0a],
            dst_mac: [0x02, 0, 0, 0, 0, 0x0b],
            src: src.0,
            dst: dst.0,
            src_port: src.1,
            dst_port: dst.1,
            seq,
            ack,
            flags: PSH | ACK,
            window: 502,
            options: Vec::new(),
            payload: payload.to_vec(),
        }
    }

    /// The Ethernet frame, with the IPv4 and TCP checksums computed.
    #[must_use]
    pub fn frame(&self) -> Vec<u8> {
        let mut options = self.options.clone();
        while !options.len().is_multiple_of(4) {
            options.push(1);
        }
        let tcp_len = 20 + options.len() + self.payload.len();
        let mut tcp = Vec::with_capacity(tcp_len);
        tcp.extend_from_slice(&self.src_port.to_be_bytes());
        tcp.extend_from_slice(&self.dst_port.to_be_bytes());
        tcp.extend_from_slice(&self.seq.to_be_bytes());
        tcp.extend_from_slice(&self.ack.to_be_bytes());
        tcp.push(u8::try_from((20 + options.len()) / 4 * 16).expect("at most 40 option bytes"));
        tcp.push(self.flags);
        tcp.extend_from_slice(&self.window.to_be_bytes());
        tcp.extend_from_slice(&[0, 0, 0, 0]);
        tcp.extend_from_slice(&options);
        tcp.extend_from_slice(&self.payload);
        let checksum = tcp_checksum(self.src, self.dst, &tcp);
        tcp[16..18].copy_from_slice(&checksum.to_be_bytes());
        let total = u16::try_from(20 + tcp_len).expect("small segments");
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 6, 0, 0]);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        let checksum = fold(sum(&ip));
        ip[10..12].copy_from_slice(&checksum.to_be_bytes());
        let mut frame = Vec::with_capacity(14 + ip.len() + tcp.len());
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        frame.extend_from_slice(&0x0800u16.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&tcp);
        frame
    }

    /// [`Segment::frame`] as IPv4 BIG TCP writes a packet past 64 KiB: an IP
    /// total length of 0 (the skb's length is the packet's), the header
    /// checksum computed over that.
    #[must_use]
    pub fn big_tcp_frame(&self) -> Vec<u8> {
        let mut frame = self.frame();
        frame[16..18].copy_from_slice(&[0, 0]);
        frame[24..26].copy_from_slice(&[0, 0]);
        let checksum = fold(sum(&frame[14..34]));
        frame[24..26].copy_from_slice(&checksum.to_be_bytes());
        frame
    }

    /// Reads a frame back, after checking both checksums. An IP total length
    /// of 0 (BIG TCP) is the frame's.
    pub fn parse(frame: &[u8]) -> Result<Self> {
        ensure!(frame.len() >= 14 + 20 + 20, "a frame of {} bytes holds no TCP header", frame.len());
        ensure!(frame[12..14] == [0x08, 0x00], "not IPv4: {:02x?}", &frame[12..14]);
        let ip = &frame[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = match u16::from_be_bytes([ip[2], ip[3]]) {
            0 => ip.len(),
            total => usize::from(total),
        };
        ensure!(fold(sum(&ip[..ihl])) == 0, "IPv4 header checksum wrong: {:02x?}", &ip[..ihl]);
        let src = Ipv4Addr::from(<[u8; 4]>::try_from(&ip[12..16])?);
        let dst = Ipv4Addr::from(<[u8; 4]>::try_from(&ip[16..20])?);
        let tcp = ip.get(ihl..total).context("IP total length beyond the frame")?;
        ensure!(tcp_checksum(src, dst, tcp) == 0, "TCP checksum wrong");
        let data_offset = usize::from(tcp[12] >> 4) * 4;
        let be16 = |at: usize| u16::from_be_bytes([tcp[at], tcp[at + 1]]);
        let be32 = |at: usize| u32::from_be_bytes([tcp[at], tcp[at + 1], tcp[at + 2], tcp[at + 3]]);
        Ok(Self {
            dst_mac: frame[0..6].try_into()?,
            src_mac: frame[6..12].try_into()?,
            src,
            dst,
            src_port: be16(0),
            dst_port: be16(2),
            seq: be32(4),
            ack: be32(8),
            flags: tcp[13],
            window: be16(14),
            options: tcp[20..data_offset].to_vec(),
            payload: tcp[data_offset..].to_vec(),
        })
    }
}

/// A timestamp option (with two NOPs in front, as Linux sends it).
#[must_use]
pub fn timestamp_option(tsval: u32, tsecr: u32) -> Vec<u8> {
    let mut option = vec![1, 1, 8, 10];
    option.extend_from_slice(&tsval.to_be_bytes());
    option.extend_from_slice(&tsecr.to_be_bytes());
    option
}

/// A SACK option with `blocks` (left, right edges), two NOPs in front.
#[must_use]
pub fn sack_option(blocks: &[(u32, u32)]) -> Vec<u8> {
    let mut option = vec![1, 1, 5, u8::try_from(2 + 8 * blocks.len()).expect("at most 4 blocks")];
    for (left, right) in blocks {
        option.extend_from_slice(&left.to_be_bytes());
        option.extend_from_slice(&right.to_be_bytes());
    }
    option
}

/// The (TSval, TSecr) of a timestamp option among `options`, if any.
#[must_use]
pub fn timestamps(options: &[u8]) -> Option<(u32, u32)> {
    find_option(options, 8).map(|o| (be32(&o[2..6]), be32(&o[6..10])))
}

/// The blocks of a SACK option among `options`, if any.
#[must_use]
pub fn sack_blocks(options: &[u8]) -> Option<Vec<(u32, u32)>> {
    find_option(options, 5).map(|o| o[2..].chunks(8).map(|b| (be32(&b[..4]), be32(&b[4..8]))).collect())
}

fn find_option(options: &[u8], kind: u8) -> Option<&[u8]> {
    let mut at = 0;
    while at < options.len() {
        match options[at] {
            0 => return None,
            1 => at += 1,
            k => {
                let len = usize::from(*options.get(at + 1)?);
                let option = options.get(at..at + len)?;
                if k == kind {
                    return Some(option);
                }
                at += len.max(2);
            }
        }
    }
    None
}

fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// The TCP checksum over the pseudo-header and `segment` (0 when `segment`
/// carries a right one).
fn tcp_checksum(src: Ipv4Addr, dst: Ipv4Addr, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&u16::try_from(segment.len()).expect("small segments").to_be_bytes());
    fold(sum(&pseudo) + sum(segment))
}

/// The 16-bit one's-complement sum of `bytes`, unfolded.
fn sum(bytes: &[u8]) -> u64 {
    bytes.chunks(2).map(|pair| u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]))).sum()
}

fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_frame_parses_back_with_its_checksums() {
        let mut segment = Segment::data(
            ("10.0.0.1".parse().unwrap(), 40_000),
            ("10.0.0.2".parse().unwrap(), 443),
            u32::MAX - 3,
            7,
            b"hello",
        );
        segment.options = [timestamp_option(1, 2), sack_option(&[(10, 20)])].concat();
        let frame = segment.frame();
        let back = Segment::parse(&frame).unwrap();
        assert_eq!(back, segment);
        assert_eq!(timestamps(&back.options), Some((1, 2)));
        assert_eq!(sack_blocks(&back.options), Some(vec![(10, 20)]));
        let mut broken = frame.clone();
        broken[60] ^= 1;
        assert!(Segment::parse(&broken).is_err());
    }
}
