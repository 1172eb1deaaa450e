//! PROXY protocol headers: version 2 (binary) and, when enabled, version 1
//! (text). Pure functions over the bytes peeked from a connection; the socket
//! side is in [`super::peek`].
//!
//! The `ppp` crate parses the address block, the TLVs and v1 lines. It is
//! wrapped because it cannot do three things this proxy needs: bound the size
//! before the whole header has arrived (it waits for any length up to 64 KiB),
//! accept a LOCAL header whose family needs more address bytes than it
//! carries (the specification says a receiver must discard a LOCAL header's
//! block, whatever it holds), and tell an incomplete v1 line from an invalid
//! one reliably (it calls some malformed lines "incomplete"). So the fixed
//! 16-byte part and the v1 line ending are checked here, and `ppp` only ever
//! sees a complete header.

use std::net::{IpAddr, SocketAddr};

use ppp::{v1, v2};

/// The 12 bytes every v2 header starts with.
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// How every v1 header starts.
pub const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// Longest v2 header accepted, fixed part, addresses and TLVs together (the
/// NLB's are under 100 bytes; a UNIX address block alone is 216).
pub const MAX_V2_HEADER: usize = 1024;
/// Longest v1 header, CRLF included (the specification's limit).
pub const MAX_V1_HEADER: usize = 107;
/// Length of the fixed part of a v2 header.
const V2_FIXED: usize = 16;
/// Longest UNIQUE_ID TLV value (the specification's limit).
const MAX_UNIQUE_ID: usize = 128;

const TLV_CRC32C: u8 = 0x03;
const TLV_UNIQUE_ID: u8 = 0x05;
const TLV_SSL: u8 = 0x20;
/// AWS TLV type; its first value byte is a subtype.
pub const TLV_AWS: u8 = 0xEA;
/// AWS subtype carrying the VPC endpoint ID (`vpce-…`) of a PrivateLink connection.
pub const AWS_SUBTYPE_VPCE_ID: u8 = 0x01;

/// What the header says the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Made by the proxy in front for itself (the NLB's health checks).
    Local,
    /// Relayed for a client.
    Proxy,
}

/// A complete, valid header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    /// 1 (text) or 2 (binary).
    pub version: u8,
    pub command: Command,
    /// The original client, when the header names one (IPv4 or IPv6).
    pub source: Option<SocketAddr>,
    /// The AWS VPC endpoint ID TLV, when present.
    pub vpce_id: Option<String>,
    /// Bytes the header takes on the wire: exactly these are consumed.
    pub len: usize,
}

/// The result of looking at the first bytes of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A complete header (there may be more bytes after it: they are not its).
    Header(ProxyHeader),
    /// The bytes are not the start of a header.
    NotAHeader,
    /// The start of a header: more bytes are needed.
    Incomplete,
}

/// Why a header is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("header of {declared} bytes exceeds the limit of {limit}")]
    Oversized { declared: usize, limit: usize },
    #[error("invalid v2 header: {0}")]
    InvalidV2(String),
    #[error("invalid v1 header: {0}")]
    InvalidV1(String),
}

/// Looks at the bytes a connection starts with. `accept_v1`: a v1 text
/// header is recognised (otherwise `PROXY …` is [`Parsed::NotAHeader`]).
pub fn parse(buf: &[u8], accept_v1: bool) -> Result<Parsed, HeaderError> {
    let could_be_v2 = buf.len() < V2_SIGNATURE.len() && V2_SIGNATURE.starts_with(buf);
    let could_be_v1 = accept_v1 && buf.len() < V1_PREFIX.len() && V1_PREFIX.starts_with(buf);
    if could_be_v2 || could_be_v1 {
        Ok(Parsed::Incomplete)
    } else if buf.starts_with(V2_SIGNATURE) {
        parse_v2(buf)
    } else if accept_v1 && buf.starts_with(V1_PREFIX) {
        parse_v1(buf)
    } else {
        Ok(Parsed::NotAHeader)
    }
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let invalid = |m: String| HeaderError::InvalidV2(m);
    if buf.len() < V2_FIXED {
        return Ok(Parsed::Incomplete);
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 {
        return Err(invalid(format!("version {version}, not 2")));
    }
    let command = match command {
        0 => Command::Local,
        1 => Command::Proxy,
        other => return Err(invalid(format!("command {other:#x} is neither LOCAL nor PROXY"))),
    };
    let (family, protocol) = (buf[13] >> 4, buf[13] & 0x0f);
    if family > 3 {
        return Err(invalid(format!("address family {family:#x}")));
    }
    if protocol > 2 {
        return Err(invalid(format!("transport protocol {protocol:#x}")));
    }
    let len = V2_FIXED + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > MAX_V2_HEADER {
        return Err(HeaderError::Oversized { declared: len, limit: MAX_V2_HEADER });
    }
    if buf.len() < len {
        return Ok(Parsed::Incomplete);
    }
    let header = match command {
        // The specification: a LOCAL header's block is discarded, whatever it holds.
        Command::Local => ProxyHeader { version: 2, command, source: None, vpce_id: None, len },
        Command::Proxy => proxy_v2(&buf[..len])?,
    };
    Ok(Parsed::Header(header))
}

fn proxy_v2(bytes: &[u8]) -> Result<ProxyHeader, HeaderError> {
    let invalid = |m: String| HeaderError::InvalidV2(m);
    let header = v2::Header::try_from(bytes).map_err(|e| invalid(e.to_string()))?;
    let stream = header.protocol == v2::Protocol::Stream;
    let source = match header.addresses {
        v2::Addresses::IPv4(a) if stream => {
            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        v2::Addresses::IPv6(a) if stream => {
            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
        v2::Addresses::IPv4(_) | v2::Addresses::IPv6(_) => {
            return Err(invalid(format!("{:?} transport for a TCP connection", header.protocol)));
        }
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    };
    let vpce_id = check_tlvs(bytes, bytes.len() - header.tlv_bytes().len(), header.tlvs())?;
    Ok(ProxyHeader { version: 2, command: Command::Proxy, source, vpce_id, len: bytes.len() })
}

/// Checks every TLV (`tlvs`, starting at `start` in `header`) and returns the
/// VPC endpoint ID, if one is there. Unknown types are ignored, as the
/// specification asks.
fn check_tlvs(
    header: &[u8],
    start: usize,
    tlvs: v2::TypeLengthValues<'_>,
) -> Result<Option<String>, HeaderError> {
    let invalid = |m: String| HeaderError::InvalidV2(m);
    let mut vpce_id = None;
    let mut offset = start;
    for tlv in tlvs {
        let tlv = tlv.map_err(|e| invalid(e.to_string()))?;
        let (value, value_at) = (tlv.value.as_ref(), offset + 3);
        offset = value_at + value.len();
        match tlv.kind {
            TLV_CRC32C => check_crc(header, value, value_at)?,
            TLV_UNIQUE_ID if value.len() > MAX_UNIQUE_ID => {
                return Err(invalid(format!("UNIQUE_ID of {} bytes (at most {MAX_UNIQUE_ID})", value.len())));
            }
            TLV_SSL => {
                // client (1 byte), verify (4 bytes), then sub-TLVs.
                let subs =
                    value.get(5..).ok_or_else(|| invalid(format!("SSL TLV of {} bytes", value.len())))?;
                for sub in v2::TypeLengthValues::from(subs) {
                    sub.map_err(|e| invalid(format!("in the SSL TLV: {e}")))?;
                }
            }
            TLV_AWS => match value.split_first() {
                Some((&AWS_SUBTYPE_VPCE_ID, id)) => {
                    if vpce_id.is_some() {
                        return Err(invalid("two VPC endpoint ID TLVs".into()));
                    }
                    let id = std::str::from_utf8(id)
                        .ok()
                        .filter(|id| id.bytes().all(|b| b.is_ascii_graphic()))
                        .ok_or_else(|| invalid(format!("VPC endpoint ID {id:?} is not printable text")))?;
                    vpce_id = Some(id.to_owned());
                }
                Some(_) => {}
                None => return Err(invalid("empty AWS TLV".into())),
            },
            _ => {}
        }
    }
    Ok(vpce_id)
}

/// A CRC32C TLV holds the checksum of the whole header with its own value zeroed.
fn check_crc(header: &[u8], value: &[u8], value_at: usize) -> Result<(), HeaderError> {
    let expected: [u8; 4] = value
        .try_into()
        .map_err(|_| HeaderError::InvalidV2(format!("CRC32C TLV of {} bytes, not 4", value.len())))?;
    let mut zeroed = header.to_vec();
    zeroed[value_at..value_at + 4].fill(0);
    let actual = crc32c(&zeroed);
    if actual != u32::from_be_bytes(expected) {
        return Err(HeaderError::InvalidV2(format!(
            "CRC32C {:#010x} does not match the header's {actual:#010x}",
            u32::from_be_bytes(expected)
        )));
    }
    Ok(())
}

/// CRC-32C (Castagnoli), bit by bit: headers are short.
#[must_use]
pub fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let window = &buf[..buf.len().min(MAX_V1_HEADER)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        return if buf.len() >= MAX_V1_HEADER {
            Err(HeaderError::Oversized { declared: buf.len(), limit: MAX_V1_HEADER })
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let len = cr + 2;
    if len > MAX_V1_HEADER {
        return Err(HeaderError::Oversized { declared: len, limit: MAX_V1_HEADER });
    }
    match buf.get(cr + 1) {
        None => return Ok(Parsed::Incomplete),
        Some(b'\n') => {}
        Some(_) => return Err(HeaderError::InvalidV1("CR not followed by LF".into())),
    }
    let header = v1::Header::try_from(&buf[..len]).map_err(|e| HeaderError::InvalidV1(e.to_string()))?;
    let source = match header.addresses {
        v1::Addresses::Tcp4(a) => Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port)),
        v1::Addresses::Tcp6(a) => Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port)),
        v1::Addresses::Unknown => None,
    };
    Ok(Parsed::Header(ProxyHeader { version: 1, command: Command::Proxy, source, vpce_id: None, len }))
}

#[cfg(test)]
#[path = "proxy_protocol_tests.rs"]
mod tests;
