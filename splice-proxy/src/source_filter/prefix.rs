//! `SourcePrefix`: an IPv4 or IPv6 prefix in CIDR notation (`192.0.2.0/24`,
//! `2001:db8::/32`; a bare address means that one host), as the XDP source
//! filter's allow list holds it.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use serde::{Deserialize, Deserializer};

/// A network prefix: an address with no bits set beyond `len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourcePrefix {
    addr: IpAddr,
    len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("{input:?} is not an IP address or prefix (ADDR or ADDR/LEN)")]
    Address { input: String },
    #[error("{input:?}: prefix length {len} is not from 0 to {max}")]
    Length { input: String, len: String, max: u8 },
    #[error("{input:?} has bits set beyond its prefix length; did you mean {masked}?")]
    HostBits { input: String, masked: SourcePrefix },
}

impl SourcePrefix {
    /// The prefix `addr/len`; fails when `len` is too long for the family or
    /// `addr` has bits set beyond it.
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, PrefixError> {
        let input = format!("{addr}/{len}");
        let max = max_len(addr);
        if len > max {
            return Err(PrefixError::Length { input, len: len.to_string(), max });
        }
        let masked = Self { addr: mask(addr, len), len };
        if masked.addr != addr {
            return Err(PrefixError::HostBits { input, masked });
        }
        Ok(masked)
    }

    #[must_use]
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// Prefix length in bits.
    #[must_use]
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether `ip` lies in this prefix (an IPv4 prefix never holds an IPv6 address).
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        max_len(ip) == max_len(self.addr) && mask(ip, self.len) == self.addr
    }
}

fn max_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

/// `addr` with every bit after the first `len` cleared.
fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4) & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    }
}

impl FromStr for SourcePrefix {
    type Err = PrefixError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let address = || PrefixError::Address { input: input.to_owned() };
        let (addr, len) = match input.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (input, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| address())?;
        let max = max_len(addr);
        let len =
            match len {
                None => max,
                Some(len) => len.trim().parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| {
                    PrefixError::Length { input: input.to_owned(), len: len.to_owned(), max }
                })?,
            };
        Self::new(addr, len).map_err(|e| match e {
            PrefixError::HostBits { masked, .. } => PrefixError::HostBits { input: input.to_owned(), masked },
            other => other,
        })
    }
}

impl fmt::Display for SourcePrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl<'de> Deserialize<'de> for SourcePrefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> SourcePrefix {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn parses_prefixes_and_hosts() {
        assert_eq!(p("192.0.2.0/24").to_string(), "192.0.2.0/24");
        assert_eq!(p("192.0.2.7").to_string(), "192.0.2.7/32");
        assert_eq!(p("0.0.0.0/0").prefix_len(), 0);
        assert_eq!(p("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(p("2001:db8::1").to_string(), "2001:db8::1/128");
        assert_eq!(p("::/0").to_string(), "::/0");
    }

    #[test]
    fn errors_name_the_input() {
        for (text, needle) in [
            ("example.com/8", "is not an IP address"),
            ("192.0.2.0/33", "prefix length 33 is not from 0 to 32"),
            ("2001:db8::/129", "prefix length 129 is not from 0 to 128"),
            ("192.0.2.0/x", "prefix length x"),
            ("192.0.2.1/24", "did you mean 192.0.2.0/24"),
            ("2001:db8::1/64", "did you mean 2001:db8::/64"),
            ("", "is not an IP address"),
        ] {
            let err = text.parse::<SourcePrefix>().unwrap_err().to_string();
            assert!(err.contains(needle) && err.contains(&format!("{text:?}")), "{text:?}: {err}");
        }
    }

    #[test]
    fn contains_follows_the_prefix_bits() {
        assert!(p("192.0.2.0/24").contains("192.0.2.255".parse().unwrap()));
        assert!(!p("192.0.2.0/24").contains("192.0.3.0".parse().unwrap()));
        assert!(p("0.0.0.0/0").contains("203.0.113.9".parse().unwrap()));
        assert!(!p("0.0.0.0/0").contains("2001:db8::1".parse().unwrap()));
        assert!(p("2001:db8::/32").contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!p("2001:db8::/32").contains("2001:db9::1".parse().unwrap()));
    }
}
