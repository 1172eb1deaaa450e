//! The server's side of the XDP source filter: attach at start-up to every
//! listener's interface with each listener's allow list on its port, reload
//! the lists on SIGHUP, log its totals at exit.

use std::{collections::BTreeMap, net::SocketAddr};

use crate::{
    config::{Config, ListenerConfig},
    source_filter::{AllowLists, SourceFilter, SourceFilterConfig, SourceFilterError},
};

/// A listener as it runs: the address it was configured with and the port
/// it is bound to (they differ for port 0).
pub(super) type Listening = (SocketAddr, u16);

/// The allow lists of `listeners`, each on the port of the same index in
/// `ports` (port 0: not bound yet, left out). Listeners without a list are
/// not filtered; listeners sharing a port share their list (validated).
pub(super) fn allow_lists(listeners: &[ListenerConfig], ports: &[u16]) -> AllowLists {
    let mut lists = AllowLists::new();
    for (listener, &port) in listeners.iter().zip(ports) {
        if let (Some(list), true) = (&listener.allowed_sources, port != 0) {
            lists.insert(port, list.clone());
        }
    }
    lists
}

/// `{port: [prefix, ...]}` for the log.
fn describe(lists: &AllowLists) -> BTreeMap<u16, Vec<String>> {
    lists.iter().map(|(port, list)| (*port, strings(list))).collect()
}

fn strings<T: ToString>(items: impl IntoIterator<Item = T>) -> Vec<String> {
    items.into_iter().map(|item| item.to_string()).collect()
}

/// Loads the source filter with the lists of the ports known before
/// binding, then attaches it to each interface, logging the mode and why
/// for each. If one fails, the filter is dropped, which detaches it from
/// the interfaces it was attached to before (the error names the one that
/// failed).
pub(super) fn start(
    config: &SourceFilterConfig,
    lists: &AllowLists,
) -> Result<SourceFilter, SourceFilterError> {
    let mut filter = SourceFilter::load(lists)?;
    for interface in &config.interfaces {
        let attached = filter.attach(interface)?;
        tracing::info!(
            interface = attached.interface,
            mode = %attached.mode,
            why = attached.why,
            allowed = ?describe(&filter.allowed()),
            "XDP source filter attached"
        );
    }
    Ok(filter)
}

/// Once every listener is bound: the lists of all ports (port 0 listeners
/// got theirs only now).
pub(super) fn guard_bound(
    filter: &mut SourceFilter,
    listeners: &[ListenerConfig],
    listening: &[Listening],
) -> Result<(), SourceFilterError> {
    let ports: Vec<u16> = listening.iter().map(|(_, port)| *port).collect();
    filter.reload(&allow_lists(listeners, &ports))?;
    tracing::info!(allowed = ?describe(&filter.allowed()), "XDP source filter guards the listen ports");
    Ok(())
}

/// SIGHUP, once the reloaded configuration is validated and its listeners
/// bound ([`super::reload`]): makes the allow lists of `config` those of the
/// running listeners (`listening`, in configuration order), each on its
/// bound port.
pub(super) fn apply(filter: &mut SourceFilter, config: &Config, listening: &[Listening]) {
    if config.source_filter.is_none() {
        tracing::warn!(
            "SIGHUP: the configuration no longer sets xdp_interface; removing the filter needs a \
             restart; the source lists stay as they were"
        );
        return;
    }
    let configured: Vec<SocketAddr> = config.listeners.iter().map(|l| l.addr.0).collect();
    let running: Vec<SocketAddr> = listening.iter().map(|(addr, _)| *addr).collect();
    if configured != running {
        tracing::warn!(
            running = ?strings(&running),
            configured = ?strings(&configured),
            "SIGHUP: the running listeners differ from the configuration's; the source lists stay as they were"
        );
        return;
    }
    // The interfaces stay as attached (`Config::keep_fixed_settings` logged
    // a change); the lists, keyed by port, apply on all of them.
    // The counters so far, so each reload also reports what the old lists did.
    let (passed, dropped) = filter.counters().map_or((None, None), |c| (Some(c.passed()), Some(c.dropped)));
    let ports: Vec<u16> = listening.iter().map(|(_, port)| *port).collect();
    match filter.reload(&allow_lists(&config.listeners, &ports)) {
        Ok(summary) => tracing::info!(
            added = ?strings(&summary.added),
            removed = ?strings(&summary.removed),
            guarded = ?summary.guarded,
            unguarded = ?summary.unguarded,
            allowed = ?describe(&filter.allowed()),
            passed,
            dropped,
            "SIGHUP: source lists reloaded"
        ),
        Err(error) => {
            tracing::error!(%error, "SIGHUP: reloading the source lists failed; the old lists stay")
        }
    }
}

/// Log lines with the filter's counters over the whole run: the totals,
/// then one per guarded port.
pub(super) fn log_totals(filter: &SourceFilter) {
    match filter.counters() {
        Ok(c) => tracing::info!(
            passed = c.passed(),
            dropped = c.dropped,
            allowed = c.allowed,
            unguarded = c.unguarded,
            fragments = c.fragments,
            malformed = c.malformed,
            "xdp source filter totals"
        ),
        Err(error) => tracing::warn!(%error, "cannot read the XDP source filter counters"),
    }
    match filter.port_counters() {
        Ok(ports) => {
            for (port, c) in ports {
                tracing::info!(
                    port,
                    allowed = c.allowed,
                    dropped = c.dropped,
                    "xdp source filter port totals"
                );
            }
        }
        Err(error) => tracing::warn!(%error, "cannot read the XDP source filter's port counters"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn allow_lists_put_each_listener_s_list_on_its_bound_port() {
        let listeners = crate::config::three_listeners(0);
        let ten = BTreeSet::from(["10.0.0.0/8".parse().unwrap()]);
        let doc = BTreeSet::from(["192.0.2.0/24".parse().unwrap()]);
        // Before binding the port 0 listener is left out; 8443 has no list.
        assert_eq!(allow_lists(&listeners, &[0, 7443, 8443]), AllowLists::from([(7443, ten.clone())]));
        assert_eq!(
            allow_lists(&listeners, &[40000, 7443, 8443]),
            AllowLists::from([(7443, ten), (40000, doc)])
        );
    }
}
