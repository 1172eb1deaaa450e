//! The allow lists in the kernel: per guarded port its prefixes, as entries
//! (port, prefix) of the two LPM tries, plus every prefix once more under
//! [`ANY_GUARDED_PORT`]; and the reload that changes them in place.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use aya::maps::{PerCpuValues, lpm_trie::Key};
use proxy_common::{
    ANY_GUARDED_PORT, MAX_GUARDED_PORTS, PORT_PREFIX_BITS, PortFilterStats, SourceKeyV4, SourceKeyV6, map,
};

use super::{SourceFilter, SourceFilterError};
use crate::source_filter::prefix::SourcePrefix;

/// Per guarded TCP port (the listen port of a listener with an allow list),
/// the source prefixes allowed to it. A port not in it is not filtered.
pub type AllowLists = BTreeMap<u16, BTreeSet<SourcePrefix>>;

/// One trie entry: `prefix` is allowed to `port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortPrefix {
    pub port: u16,
    pub prefix: SourcePrefix,
}

impl PortPrefix {
    /// The trie this entry belongs in.
    #[must_use]
    pub fn map_name(&self) -> &'static str {
        if self.prefix.addr().is_ipv4() { map::SOURCE_ALLOW_V4 } else { map::SOURCE_ALLOW_V6 }
    }

    /// Trie prefix length: the port's bits, then the address prefix's.
    fn key_len(&self) -> u32 {
        PORT_PREFIX_BITS + u32::from(self.prefix.prefix_len())
    }
}

impl fmt::Display for PortPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} to port {}", self.prefix, self.port)
    }
}

/// What a reload changed (the entries under [`ANY_GUARDED_PORT`] left out).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: Vec<PortPrefix>,
    pub removed: Vec<PortPrefix>,
    /// Ports filtered from now on.
    pub guarded: Vec<u16>,
    /// Ports no longer filtered.
    pub unguarded: Vec<u16>,
}

/// Every trie entry `lists` needs.
fn entries(lists: &AllowLists) -> BTreeSet<PortPrefix> {
    let mut out = BTreeSet::new();
    for (&port, prefixes) in lists {
        for &prefix in prefixes {
            out.insert(PortPrefix { port, prefix });
            out.insert(PortPrefix { port: ANY_GUARDED_PORT, prefix });
        }
    }
    out
}

impl SourceFilter {
    /// Makes `lists` the allow lists without detaching. New entries go in
    /// first, then newly listed ports are guarded, then ports no longer
    /// listed unguarded, and only then old entries removed: a source allowed
    /// to a port before and after is never dropped in between, and a port
    /// is never guarded without its list. When an insert fails, what this
    /// call inserted is removed again and the old lists stay.
    pub fn reload(&mut self, lists: &AllowLists) -> Result<ReloadSummary, SourceFilterError> {
        if lists.contains_key(&ANY_GUARDED_PORT) {
            return Err(SourceFilterError::PortZero);
        }
        if lists.len() > MAX_GUARDED_PORTS as usize {
            return Err(SourceFilterError::TooManyPorts { count: lists.len() });
        }
        let wanted = entries(lists);
        let added: Vec<PortPrefix> = wanted.difference(&self.entries).copied().collect();
        let removed: Vec<PortPrefix> = self.entries.difference(&wanted).copied().collect();
        let ports: BTreeSet<u16> = lists.keys().copied().collect();
        let guard: Vec<u16> = ports.difference(&self.guarded).copied().collect();
        let unguard: Vec<u16> = self.guarded.difference(&ports).copied().collect();
        for (done, entry) in added.iter().enumerate() {
            if let Err(error) = self.insert(entry) {
                self.undo(&added[..done], &[]);
                return Err(error);
            }
        }
        for (done, &port) in guard.iter().enumerate() {
            if let Err(error) = self.guard(port) {
                self.undo(&added, &guard[..done]);
                return Err(error);
            }
        }
        self.entries.extend(added.iter().copied());
        self.guarded.extend(guard.iter().copied());
        for &port in &unguard {
            self.unguard(port)?;
            self.guarded.remove(&port);
        }
        for entry in &removed {
            self.remove(entry)?;
            self.entries.remove(entry);
        }
        let listed = |e: &&PortPrefix| e.port != ANY_GUARDED_PORT;
        Ok(ReloadSummary {
            added: added.iter().filter(listed).copied().collect(),
            removed: removed.iter().filter(listed).copied().collect(),
            guarded: guard,
            unguarded: unguard,
        })
    }

    /// Best effort: takes back what a failed reload put in a moment ago.
    fn undo(&mut self, entries: &[PortPrefix], ports: &[u16]) {
        for &port in ports {
            let _ = self.unguard(port);
        }
        for entry in entries {
            let _ = self.remove(entry);
        }
    }

    fn guard(&mut self, port: u16) -> Result<(), SourceFilterError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| SourceFilterError::Cpus { port, source })?;
        let zero = PerCpuValues::try_from(vec![PortFilterStats::default(); cpus])
            .map_err(|source| SourceFilterError::Cpus { port, source })?;
        let mut map = self.stats.ports.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.insert(port, zero, 0).map_err(|source| SourceFilterError::Port {
            action: "guarding",
            port,
            source,
        })
    }

    fn unguard(&mut self, port: u16) -> Result<(), SourceFilterError> {
        let mut map = self.stats.ports.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.remove(&port).map_err(|source| SourceFilterError::Port { action: "unguarding", port, source })
    }

    fn insert(&mut self, entry: &PortPrefix) -> Result<(), SourceFilterError> {
        let (len, port) = (entry.key_len(), entry.port.to_be_bytes());
        let result = match entry.prefix.addr() {
            IpAddr::V4(v4) => {
                self.allow_v4.insert(&Key::new(len, SourceKeyV4 { port, addr: v4.octets() }), 1, 0)
            }
            IpAddr::V6(v6) => {
                self.allow_v6.insert(&Key::new(len, SourceKeyV6 { port, addr: v6.octets() }), 1, 0)
            }
        };
        result.map_err(|source| SourceFilterError::Prefix { action: "adding", entry: *entry, source })
    }

    fn remove(&mut self, entry: &PortPrefix) -> Result<(), SourceFilterError> {
        let (len, port) = (entry.key_len(), entry.port.to_be_bytes());
        let result = match entry.prefix.addr() {
            IpAddr::V4(v4) => self.allow_v4.remove(&Key::new(len, SourceKeyV4 { port, addr: v4.octets() })),
            IpAddr::V6(v6) => self.allow_v6.remove(&Key::new(len, SourceKeyV6 { port, addr: v6.octets() })),
        };
        result.map_err(|source| SourceFilterError::Prefix { action: "removing", entry: *entry, source })
    }

    /// The allow lists now.
    #[must_use]
    pub fn allowed(&self) -> AllowLists {
        let mut lists: AllowLists = self.guarded.iter().map(|&port| (port, BTreeSet::new())).collect();
        for entry in self.entries.iter().filter(|e| e.port != ANY_GUARDED_PORT) {
            lists.entry(entry.port).or_default().insert(entry.prefix);
        }
        lists
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(text: &str) -> SourcePrefix {
        text.parse().unwrap()
    }

    #[test]
    fn entries_hold_each_port_s_prefixes_and_their_union_under_port_0() {
        let lists = AllowLists::from([
            (443, BTreeSet::from([prefix("10.0.0.0/8"), prefix("2001:db8::/32")])),
            (8443, BTreeSet::from([prefix("10.0.0.0/8")])),
        ]);
        let got: Vec<String> = entries(&lists).iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "10.0.0.0/8 to port 0",
                "2001:db8::/32 to port 0",
                "10.0.0.0/8 to port 443",
                "2001:db8::/32 to port 443",
                "10.0.0.0/8 to port 8443",
            ]
        );
        let v6 = PortPrefix { port: 443, prefix: prefix("2001:db8::/32") };
        assert_eq!((v6.key_len(), v6.map_name()), (16 + 32, map::SOURCE_ALLOW_V6));
    }
}
