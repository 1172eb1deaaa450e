//! The XDP source filter's settings: each listener's `xdp_interface` (its
//! own or the top-level one) and `allowed_source_cidrs`, checked one by one
//! ([`interface_exists`], [`listener_list`]) and across listeners
//! ([`validate`]).

use std::collections::{BTreeSet, HashMap};

use proxy_common::{MAX_GUARDED_PORTS, MAX_SOURCE_PREFIXES};

use super::{ConfigError, FieldError, ListenerConfig, invalid};
use crate::{source_filter::SourceFilterConfig, source_filter::prefix::SourcePrefix};

/// Config key and flag of the allow lists.
pub(super) const KEY: &str = "allowed_source_cidrs";
pub(super) const FLAG: &str = "allow-source";

/// Config key and flag of the interface.
const INTERFACE_KEY: &str = "xdp_interface";
const INTERFACE_FLAG: &str = "xdp-interface";

/// An `xdp_interface` (top level or a listener's) names an interface of
/// this network namespace.
pub(super) fn interface_exists(interface: &str) -> Result<(), FieldError> {
    nix::net::if_::if_nametoindex(interface).map(drop).map_err(|errno| {
        FieldError(INTERFACE_KEY, INTERFACE_FLAG, format!("no network interface {interface:?} ({errno})"))
    })
}

/// One listener's `allowed_source_cidrs`: only with `xdp_interface`, not
/// empty (that would drop every TCP packet to its port), no duplicate, and
/// at most [`MAX_SOURCE_PREFIXES`] per address family.
pub(super) fn listener_list(
    list: Option<Vec<SourcePrefix>>,
    has_interface: bool,
) -> Result<Option<BTreeSet<SourcePrefix>>, String> {
    let Some(list) = list else { return Ok(None) };
    if !has_interface {
        return Err("needs xdp_interface (--xdp-interface); without it nothing is filtered".into());
    }
    if list.is_empty() {
        return Err("empty: every TCP packet to this listener's port would be dropped; leave the key \
                    out for a listener that is not filtered"
            .into());
    }
    let mut set = BTreeSet::new();
    for prefix in list {
        if !set.insert(prefix) {
            return Err(format!("{prefix} is listed twice"));
        }
    }
    let v4 = set.iter().filter(|p| p.addr().is_ipv4()).count();
    let most = MAX_SOURCE_PREFIXES as usize;
    if v4 > most || set.len() - v4 > most {
        return Err(format!("more than {most} prefixes of one address family"));
    }
    Ok(Some(set))
}

/// The interfaces of all listeners (each exists, checked with its
/// listener): the filter is attached to each. Each interface is that of
/// some listener with an allow list (else nothing of its own would be
/// filtered there), a top-level `xdp_interface` is used by some listener,
/// listeners that share a port share their list (the filter tells them
/// apart by port only, on every interface), and the lists fit the kernel
/// maps. Each list itself was checked with its listener.
pub(super) fn validate(
    top_interface: Option<&str>,
    listeners: &[ListenerConfig],
) -> Result<Option<SourceFilterConfig>, ConfigError> {
    let interfaces: BTreeSet<String> = listeners.iter().filter_map(|l| l.xdp_interface.clone()).collect();
    if interfaces.is_empty() {
        return Ok(None);
    }
    // A listener without its own interface takes this one.
    if let Some(top) = top_interface.filter(|top| !interfaces.contains(*top)) {
        return Err(invalid(
            INTERFACE_KEY,
            INTERFACE_FLAG,
            format!("{top:?} is the interface of no listener: every [[listeners]] entry sets its own"),
        ));
    }
    // Port 0 listeners each get a port of their own.
    let mut by_port: HashMap<u16, &ListenerConfig> = HashMap::new();
    let mut guarded = Vec::new();
    for listener in listeners {
        let port = listener.addr.0.port();
        if port != 0
            && let Some(first) = by_port.insert(port, listener)
        {
            if first.allowed_sources != listener.allowed_sources {
                return Err(invalid(
                    KEY,
                    FLAG,
                    format!(
                        "the listeners on {} and {} share port {port} but not their list; the XDP \
                         source filter tells listeners apart by port only",
                        first.addr, listener.addr
                    ),
                ));
            }
            continue;
        }
        if let Some(list) = &listener.allowed_sources {
            guarded.push(list);
        }
    }
    if guarded.is_empty() {
        return Err(invalid(
            KEY,
            FLAG,
            "missing: xdp_interface is set but no listener has an allow list, so nothing would be filtered",
        ));
    }
    for interface in &interfaces {
        let on_it = || listeners.iter().filter(|l| l.xdp_interface.as_ref() == Some(interface));
        if !on_it().any(|l| l.allowed_sources.is_some()) {
            let addrs: Vec<String> = on_it().map(|l| l.addr.to_string()).collect();
            return Err(invalid(
                INTERFACE_KEY,
                INTERFACE_FLAG,
                format!(
                    "{interface:?} is the interface of {} but none of them has an allow list \
                     (allowed_source_cidrs), so none of its own listeners would be filtered there",
                    addrs.join(", ")
                ),
            ));
        }
    }
    if guarded.len() > MAX_GUARDED_PORTS as usize {
        return Err(invalid(
            KEY,
            FLAG,
            format!(
                "{} listen ports have a list; the XDP source filter guards at most {MAX_GUARDED_PORTS}",
                guarded.len()
            ),
        ));
    }
    let v4: usize = guarded.iter().map(|l| l.iter().filter(|p| p.addr().is_ipv4()).count()).sum();
    let all: usize = guarded.iter().map(|l| l.len()).sum();
    let most = MAX_SOURCE_PREFIXES as usize;
    if v4 > most || all - v4 > most {
        return Err(invalid(
            KEY,
            FLAG,
            format!("more than {most} prefixes of one address family over all listeners"),
        ));
    }
    Ok(Some(SourceFilterConfig { interfaces }))
}

/// For tests: three listeners filtered on lo, `first_port` with
/// 192.0.2.0/24, 7443 with 10.0.0.0/8, 8443 without a list.
#[cfg(test)]
pub(crate) fn three_listeners(first_port: u16) -> Vec<ListenerConfig> {
    use crate::config::{Config, ListenerSettings, Options, file};
    let entries = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:{first_port}\"\nallowed_source_cidrs = [\"192.0.2.0/24\"]\n\
         [[listeners]]\nlisten = \"127.0.0.1:7443\"\nallowed_source_cidrs = [\"10.0.0.0/8\"]\n\
         [[listeners]]\nlisten = \"127.0.0.1:8443\"\n"
    );
    let options = Options {
        listener: ListenerSettings {
            upstream: Some("10.0.0.1:443".parse().unwrap()),
            sni_check: Some(false),
            xdp_interface: Some("lo".into()),
            ..ListenerSettings::default()
        },
        listeners: file::parse(&entries, std::path::Path::new("three_listeners.toml")).unwrap().listeners,
        ..Options::default()
    };
    Config::from_options(options).unwrap().listeners
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three listeners on lo: 6443 and 7443 with a list, 8443 without.
    fn listeners() -> Vec<ListenerConfig> {
        three_listeners(6443)
    }

    // Interfaces other than lo exist only in a test's namespace: these take
    // the listeners as validated and name others (existence is checked with
    // each listener, before this).
    #[test]
    fn every_distinct_interface_is_attached() {
        let mut listeners = listeners();
        listeners[1].xdp_interface = Some("xf-a".into());
        let config = validate(Some("lo"), &listeners).unwrap().unwrap();
        assert_eq!(config.interfaces, BTreeSet::from(["lo".to_owned(), "xf-a".to_owned()]));
        // Without a top-level one, only the listeners' own.
        listeners[0].xdp_interface = Some("xf-b".into());
        listeners[2].xdp_interface = None;
        let config = validate(None, &listeners).unwrap().unwrap();
        assert_eq!(config.interfaces, BTreeSet::from(["xf-a".to_owned(), "xf-b".to_owned()]));
    }

    #[test]
    fn an_interface_without_a_listed_listener_or_an_unused_top_level_one_is_refused() {
        let mut listeners = listeners();
        listeners[2].xdp_interface = Some("xf-a".into());
        let err = validate(Some("lo"), &listeners).unwrap_err().to_string();
        assert!(
            err.contains(
                "field `xdp_interface` (--xdp-interface): \"xf-a\" is the interface of 127.0.0.1:8443 but \
                 none of them has an allow list"
            ),
            "{err}"
        );
        for listener in &mut listeners {
            listener.xdp_interface = Some("xf-b".into());
        }
        listeners[2].xdp_interface = None;
        let err = validate(Some("lo"), &listeners).unwrap_err().to_string();
        assert!(
            err.contains("field `xdp_interface` (--xdp-interface): \"lo\" is the interface of no listener"),
            "{err}"
        );
    }
}
