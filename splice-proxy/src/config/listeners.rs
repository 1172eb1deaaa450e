//! Listeners and their edge settings. Each address of the top-level `listen`
//! (or `--listen`) gets the top-level settings (flags over the file); each
//! `[[listeners]]` entry takes its own keys and the top-level value for every
//! key it leaves out. That includes `allowed_source_cidrs`, the XDP source
//! filter's allow list of the listener's port (a listener with none is not
//! filtered), and `xdp_interface`, the interface the filter guards it on.

use std::{
    collections::{BTreeSet, HashSet},
    sync::Arc,
};

use super::{ConfigError, FieldError, ListenerSettings, Options, defaults, positive, source_filter};
use crate::{
    addr::ListenAddr,
    edge::{EdgeConfig, ProxyProtocolConfig, ProxyProtocolMode, Upstreams, is_vpce_id},
    source_filter::prefix::SourcePrefix,
};

/// A validated listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub addr: ListenAddr,
    pub edge: Arc<EdgeConfig>,
    /// The source prefixes the XDP filter lets through to this listener's
    /// port (never empty); `None`: the port is not filtered.
    pub allowed_sources: Option<BTreeSet<SourcePrefix>>,
    /// The interface the XDP source filter is attached to for this listener
    /// (its own `xdp_interface` or the top-level one; it exists); `None`:
    /// no filter for it.
    pub xdp_interface: Option<String>,
}

/// Every listener: the top-level addresses first, then the `[[listeners]]` entries.
pub(super) fn listeners(o: &Options) -> Result<Vec<ListenerConfig>, ConfigError> {
    if o.listen.is_empty() && o.listeners.is_empty() {
        return Err(super::invalid(
            "listen",
            "listen",
            "missing: give at least one ADDR:PORT in the config file (listen or [[listeners]]) or with --listen",
        ));
    }
    let top = &o.listener;
    let at_top = |FieldError(field, flag, reason)| super::invalid(field, flag, reason);
    if let Some(interface) = &top.xdp_interface {
        source_filter::interface_exists(interface).map_err(at_top)?;
    }
    // An empty list at the top level is no list (an entry's is an error).
    let top_list = top.allowed_source_cidrs.clone().filter(|list| !list.is_empty());
    let top_sources = source_list(top_list, top.xdp_interface.is_some()).map_err(at_top)?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    if !o.listen.is_empty() {
        let edge = Arc::new(edge(top.clone()).map_err(at_top)?);
        for addr in &o.listen {
            if addr.port() != 0 && !seen.insert(*addr) {
                return Err(super::invalid("listen", "listen", format!("{addr} is listed twice")));
            }
            out.push(ListenerConfig {
                addr: ListenAddr(*addr),
                edge: Arc::clone(&edge),
                allowed_sources: top_sources.clone(),
                xdp_interface: top.xdp_interface.clone(),
            });
        }
    }
    for (index, entry) in o.listeners.iter().enumerate() {
        let in_listener = |FieldError(field, flag, reason)| ConfigError::InvalidListener {
            index,
            listen: entry.listen,
            field,
            flag,
            reason,
        };
        // Port 0 (any free port) may repeat: each listener gets its own.
        if entry.listen.port() != 0 && !seen.insert(entry.listen) {
            return Err(in_listener(FieldError(
                "listen",
                "listen",
                format!("{} is listed twice", entry.listen),
            )));
        }
        if let Some(interface) = &entry.settings.xdp_interface {
            source_filter::interface_exists(interface).map_err(in_listener)?;
        }
        let settings = entry.settings.clone().over(top);
        // A list of its own is checked with the interface it ends up with.
        let allowed_sources = match &entry.settings.allowed_source_cidrs {
            Some(list) => {
                source_list(Some(list.clone()), settings.xdp_interface.is_some()).map_err(in_listener)?
            }
            None => top_sources.clone(),
        };
        let xdp_interface = settings.xdp_interface.clone();
        out.push(ListenerConfig {
            addr: ListenAddr(entry.listen),
            edge: Arc::new(edge(settings).map_err(in_listener)?),
            allowed_sources,
            xdp_interface,
        });
    }
    Ok(out)
}

/// [`source_filter::listener_list`], its error naming the key and flag.
fn source_list(
    list: Option<Vec<SourcePrefix>>,
    has_interface: bool,
) -> Result<Option<BTreeSet<SourcePrefix>>, FieldError> {
    source_filter::listener_list(list, has_interface)
        .map_err(|why| FieldError(source_filter::KEY, source_filter::FLAG, why))
}

/// One listener's edge guard from its settings, with the defaults for what
/// they leave out.
fn edge(s: ListenerSettings) -> Result<EdgeConfig, FieldError> {
    let mode = s.proxy_protocol.unwrap_or(defaults::PROXY_PROTOCOL);
    let accept_v1 = s.proxy_protocol_v1.unwrap_or(false);
    let off = mode == ProxyProtocolMode::Off;
    if accept_v1 && off {
        return Err(FieldError(
            "proxy_protocol_v1",
            "proxy-protocol-v1",
            "has no effect with proxy_protocol = \"off\"".into(),
        ));
    }
    let mut allowed_vpce_ids = BTreeSet::new();
    for id in s.allowed_vpce_ids.unwrap_or_default() {
        let err = |why: String| FieldError("allowed_vpce_ids", "allow-vpce", why);
        if !is_vpce_id(&id) {
            return Err(err(format!(
                "{id:?} is not a VPC endpoint ID (vpce- and 8 or 17 lowercase hex digits)"
            )));
        }
        if !allowed_vpce_ids.insert(id.clone()) {
            return Err(err(format!("{id} is listed twice")));
        }
    }
    if off && !allowed_vpce_ids.is_empty() {
        return Err(FieldError(
            "allowed_vpce_ids",
            "allow-vpce",
            "the VPC endpoint ID comes in the PROXY header: set proxy_protocol (--proxy-protocol)".into(),
        ));
    }
    let sni_check = s.sni_check.unwrap_or(true);
    let upstreams = Upstreams::new(s.upstream, sni_check, s.allowed_sni, s.routes.unwrap_or_default())
        .map_err(|e| {
            let (field, flag) = e.key();
            FieldError(field, flag, e.to_string())
        })?;
    let header_timeout = s.proxy_header_timeout.unwrap_or(defaults::PROXY_HEADER_TIMEOUT);
    let client_hello_timeout = s.client_hello_timeout.unwrap_or(defaults::CLIENT_HELLO_TIMEOUT);
    Ok(EdgeConfig {
        proxy_protocol: ProxyProtocolConfig {
            mode,
            accept_v1,
            chained: s.chained_proxy_headers.unwrap_or(defaults::CHAINED_PROXY_HEADERS),
            header_timeout: positive("proxy_header_timeout", "proxy-header-timeout", header_timeout)?,
            allowed_vpce_ids,
        },
        upstreams,
        client_hello_timeout: positive("client_hello_timeout", "client-hello-timeout", client_hello_timeout)?,
    })
}

#[cfg(test)]
#[path = "listeners_tests.rs"]
mod tests;
