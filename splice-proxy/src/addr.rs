//! Address newtypes, so a client address can never be passed where an
//! upstream address is expected, and the upstream target (`HOST:PORT`, resolved
//! per connection) is never confused with one resolved address.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

/// The peer address of an accepted (downstream) connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// One resolved address of the upstream that we connect to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UpstreamAddr(pub SocketAddr);

/// A local address a listener is bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenAddr(pub SocketAddr);

macro_rules! display_inner {
    ($($ty:ty),*) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    )*};
}
display_inner!(ClientAddr, UpstreamAddr, ListenAddr);

/// The host part of an upstream target.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum UpstreamHost {
    /// A DNS name, resolved again for every new connection.
    Name(String),
    /// An IP literal: no DNS needed.
    Ip(IpAddr),
}

/// `HOST:PORT` of the upstream as configured (`--upstream`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamTarget {
    pub host: UpstreamHost,
    pub port: u16,
}

/// Why an `--upstream` value was rejected.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TargetParseError {
    #[error("expected HOST:PORT (IPv6 literals as [ADDR]:PORT)")]
    MissingPort,
    #[error("port {0:?} is not a number from 1 to 65535")]
    BadPort(String),
    #[error("host {0:?} is not a valid DNS name or IP address")]
    BadHost(String),
}

impl FromStr for UpstreamTarget {
    type Err = TargetParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            if addr.port() == 0 {
                return Err(TargetParseError::BadPort("0".into()));
            }
            return Ok(Self { host: UpstreamHost::Ip(addr.ip()), port: addr.port() });
        }
        let (host, port) = s.rsplit_once(':').ok_or(TargetParseError::MissingPort)?;
        let port = match port.parse::<u16>() {
            Ok(port) if port != 0 => port,
            _ => return Err(TargetParseError::BadPort(port.into())),
        };
        if host.contains(':') || host.starts_with('[') {
            return Err(TargetParseError::BadHost(host.into()));
        }
        if !is_dns_name(host) {
            return Err(TargetParseError::BadHost(host.into()));
        }
        Ok(Self { host: UpstreamHost::Name(host.to_ascii_lowercase()), port })
    }
}

impl fmt::Display for UpstreamTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            UpstreamHost::Name(name) => write!(f, "{name}:{}", self.port),
            UpstreamHost::Ip(ip) => SocketAddr::new(*ip, self.port).fmt(f),
        }
    }
}

/// A DNS name: dot-separated labels of 1–63 letters, digits and hyphens (not
/// at either end), 253 characters at most, an optional final dot.
pub(crate) fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_ip_literals() {
        let t: UpstreamTarget = "Demo.gr7.us-east-1.eks.amazonaws.com:443".parse().unwrap();
        assert_eq!(t.host, UpstreamHost::Name("demo.gr7.us-east-1.eks.amazonaws.com".into()));
        assert_eq!(t.port, 443);
        let t: UpstreamTarget = "10.0.0.1:6443".parse().unwrap();
        assert_eq!(t.host, UpstreamHost::Ip("10.0.0.1".parse().unwrap()));
        let t: UpstreamTarget = "[::1]:443".parse().unwrap();
        assert_eq!(t.to_string(), "[::1]:443");
    }

    #[test]
    fn rejects_bad_targets() {
        assert_eq!("example.com".parse::<UpstreamTarget>(), Err(TargetParseError::MissingPort));
        assert!(matches!("example.com:0".parse::<UpstreamTarget>(), Err(TargetParseError::BadPort(_))));
        assert!(matches!("example.com:http".parse::<UpstreamTarget>(), Err(TargetParseError::BadPort(_))));
        assert!(matches!("exa mple.com:443".parse::<UpstreamTarget>(), Err(TargetParseError::BadHost(_))));
        assert!(matches!("::1:443".parse::<UpstreamTarget>(), Err(TargetParseError::BadHost(_))));
        assert!(matches!("-a.com:443".parse::<UpstreamTarget>(), Err(TargetParseError::BadHost(_))));
    }
}
