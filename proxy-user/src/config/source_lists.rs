//! The XDP source filter's settings: `xdp_interface` (one for all
//! listeners) and each listener's `allowed_source_cidrs`, checked one by one
//! ([`listener_list`]) and across listeners ([`validate`]).

use std::collections::{BTreeSet, HashMap};

use proxy_common::{MAX_GUARDED_PORTS, MAX_SOURCE_PREFIXES};

use super::{ConfigError, ListenerConfig, invalid};
use crate::{source_prefix::SourcePrefix, xdp_filter::SourceFilterConfig};

/// Config key and flag of the allow lists.
pub(super) const KEY: &str = "allowed_source_cidrs";
pub(super) const FLAG: &str = "allow-source";

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

/// `xdp_interface`: the interface exists (in this network namespace), some
/// listener has an allow list (else nothing would be filtered), listeners
/// that share a port share their list (the filter tells them apart by port
/// only), and the lists fit the kernel maps. Each list itself was checked
/// with its listener.
pub(super) fn validate(
    interface: Option<String>,
    listeners: &[ListenerConfig],
) -> Result<Option<SourceFilterConfig>, ConfigError> {
    let Some(interface) = interface else { return Ok(None) };
    if let Err(errno) = nix::net::if_::if_nametoindex(interface.as_str()) {
        return Err(invalid(
            "xdp_interface",
            "xdp-interface",
            format!("no network interface {interface:?} ({errno})"),
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
    Ok(Some(SourceFilterConfig { interface }))
}
