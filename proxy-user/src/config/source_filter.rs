//! `xdp_interface` and `allowed_source_cidrs`, validated before anything binds.

use std::collections::HashSet;

use proxy_common::{MAX_GUARDED_PORTS, MAX_SOURCE_PREFIXES};

use super::{ConfigError, ListenerConfig, invalid};
use crate::{source_prefix::SourcePrefix, xdp_filter::SourceFilterConfig};

/// `xdp_interface` and `allowed_source_cidrs`: both or neither; the
/// interface exists (in this network namespace); the list is not empty (that
/// would drop every TCP packet to a listen port) and fits the kernel maps.
pub(super) fn validate(
    interface: Option<String>,
    allowed: Vec<SourcePrefix>,
    listeners: &[ListenerConfig],
) -> Result<Option<SourceFilterConfig>, ConfigError> {
    const CIDRS: (&str, &str) = ("allowed_source_cidrs", "allow-source");
    let Some(interface) = interface else {
        if allowed.is_empty() {
            return Ok(None);
        }
        return Err(invalid(
            CIDRS.0,
            CIDRS.1,
            "needs xdp_interface (--xdp-interface); without it nothing is filtered",
        ));
    };
    if let Err(errno) = nix::net::if_::if_nametoindex(interface.as_str()) {
        return Err(invalid(
            "xdp_interface",
            "xdp-interface",
            format!("no network interface {interface:?} ({errno})"),
        ));
    }
    if allowed.is_empty() {
        return Err(invalid(
            CIDRS.0,
            CIDRS.1,
            "empty: with xdp_interface set every TCP packet to a listen port would be dropped; \
             list the client prefixes",
        ));
    }
    let mut seen = HashSet::new();
    for prefix in &allowed {
        if !seen.insert(prefix) {
            return Err(invalid(CIDRS.0, CIDRS.1, format!("{prefix} is listed twice")));
        }
    }
    let v4 = allowed.iter().filter(|p| p.addr().is_ipv4()).count();
    let most = MAX_SOURCE_PREFIXES as usize;
    if v4 > most || allowed.len() - v4 > most {
        return Err(invalid(CIDRS.0, CIDRS.1, format!("more than {most} prefixes of one address family")));
    }
    let ports: HashSet<u16> = listeners.iter().map(|l| l.addr.0.port()).collect();
    if ports.len() > MAX_GUARDED_PORTS as usize {
        return Err(invalid(
            "listen",
            "listen",
            format!("the XDP source filter guards at most {MAX_GUARDED_PORTS} ports, not {}", ports.len()),
        ));
    }
    Ok(Some(SourceFilterConfig { interface, allowed }))
}
