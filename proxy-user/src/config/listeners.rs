//! Listeners and their edge settings. Each address of the top-level `listen`
//! (or `--listen`) gets the top-level settings (flags over the file); each
//! `[[listeners]]` entry takes its own keys and the top-level value for every
//! key it leaves out. That includes `allowed_source_cidrs`, the XDP source
//! filter's allow list of the listener's port (a listener with none is not
//! filtered), and `xdp_interface`, the interface the filter guards it on.

use std::{
    collections::{BTreeSet, HashSet},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;

use super::{ConfigError, de_from_str, source_lists};
use crate::{
    addr::{ListenAddr, UpstreamTarget},
    cli::Options,
    edge::{
        ChainedHeaders, EdgeConfig, ProxyProtocolConfig, ProxyProtocolMode, Route, Upstreams, is_vpce_id,
        routes::de_routes_opt,
    },
    source_prefix::SourcePrefix,
};

/// One `[[listeners]]` entry of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerOptions {
    pub listen: SocketAddr,
    #[serde(default, deserialize_with = "de_from_str")]
    pub upstream: Option<UpstreamTarget>,
    pub proxy_protocol: Option<ProxyProtocolMode>,
    pub proxy_protocol_v1: Option<bool>,
    pub chained_proxy_headers: Option<ChainedHeaders>,
    #[serde(default, with = "humantime_serde")]
    pub proxy_header_timeout: Option<Duration>,
    pub allowed_vpce_ids: Option<Vec<String>>,
    pub sni_check: Option<bool>,
    pub allowed_sni: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de_routes_opt")]
    pub routes: Option<Vec<Route>>,
    #[serde(default, with = "humantime_serde")]
    pub client_hello_timeout: Option<Duration>,
    pub allowed_source_cidrs: Option<Vec<SourcePrefix>>,
    pub xdp_interface: Option<String>,
}

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

/// A bad value: config key, flag, why.
pub(super) struct FieldError(pub &'static str, pub &'static str, pub String);

/// Every listener: the top-level addresses first, then the `[[listeners]]` entries.
pub(super) fn listeners(o: &Options) -> Result<Vec<ListenerConfig>, ConfigError> {
    if o.listen.is_empty() && o.listeners.is_empty() {
        return Err(super::invalid(
            "listen",
            "listen",
            "missing: give at least one ADDR:PORT in the config file (listen or [[listeners]]) or with --listen",
        ));
    }
    let at_top = |FieldError(field, flag, reason)| super::invalid(field, flag, reason);
    if let Some(interface) = &o.xdp_interface {
        source_lists::interface_exists(interface).map_err(at_top)?;
    }
    let top_list = (!o.allowed_source_cidrs.is_empty()).then(|| o.allowed_source_cidrs.clone());
    let top_sources = source_list(top_list, o.xdp_interface.is_some()).map_err(at_top)?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    if !o.listen.is_empty() {
        let top = Arc::new(top_level(o).map_err(at_top)?);
        for addr in &o.listen {
            if addr.port() != 0 && !seen.insert(*addr) {
                return Err(super::invalid("listen", "listen", format!("{addr} is listed twice")));
            }
            out.push(ListenerConfig {
                addr: ListenAddr(*addr),
                edge: Arc::clone(&top),
                allowed_sources: top_sources.clone(),
                xdp_interface: o.xdp_interface.clone(),
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
        let edge = from_entry(o, entry).map_err(in_listener)?;
        if let Some(interface) = &entry.xdp_interface {
            source_lists::interface_exists(interface).map_err(in_listener)?;
        }
        let xdp_interface = entry.xdp_interface.clone().or_else(|| o.xdp_interface.clone());
        let allowed_sources = match &entry.allowed_source_cidrs {
            Some(list) => source_list(Some(list.clone()), xdp_interface.is_some()).map_err(in_listener)?,
            None => top_sources.clone(),
        };
        out.push(ListenerConfig {
            addr: ListenAddr(entry.listen),
            edge: Arc::new(edge),
            allowed_sources,
            xdp_interface,
        });
    }
    Ok(out)
}

/// [`source_lists::listener_list`], its error naming the key and flag.
fn source_list(
    list: Option<Vec<SourcePrefix>>,
    has_interface: bool,
) -> Result<Option<BTreeSet<SourcePrefix>>, FieldError> {
    source_lists::listener_list(list, has_interface)
        .map_err(|why| FieldError(source_lists::KEY, source_lists::FLAG, why))
}

fn top_level(o: &Options) -> Result<EdgeConfig, FieldError> {
    edge(Settings {
        upstream: o.upstream.clone(),
        mode: o.proxy_protocol.unwrap_or_default(),
        accept_v1: o.proxy_protocol_v1,
        chained: o.chained_proxy_headers.unwrap_or_default(),
        header_timeout: o.proxy_header_timeout,
        vpce_ids: o.allowed_vpce_ids.clone(),
        sni_check: !o.no_sni_check,
        allowed_sni: o.allowed_sni.clone(),
        routes: o.routes.clone(),
        client_hello_timeout: o.client_hello_timeout,
    })
}

fn from_entry(o: &Options, e: &ListenerOptions) -> Result<EdgeConfig, FieldError> {
    edge(Settings {
        upstream: e.upstream.clone().or_else(|| o.upstream.clone()),
        mode: e.proxy_protocol.or(o.proxy_protocol).unwrap_or_default(),
        accept_v1: e.proxy_protocol_v1.unwrap_or(o.proxy_protocol_v1),
        chained: e.chained_proxy_headers.or(o.chained_proxy_headers).unwrap_or_default(),
        header_timeout: e.proxy_header_timeout.or(o.proxy_header_timeout),
        vpce_ids: e.allowed_vpce_ids.clone().unwrap_or_else(|| o.allowed_vpce_ids.clone()),
        sni_check: e.sni_check.unwrap_or(!o.no_sni_check),
        allowed_sni: e.allowed_sni.clone().or_else(|| o.allowed_sni.clone()),
        routes: e.routes.clone().unwrap_or_else(|| o.routes.clone()),
        client_hello_timeout: e.client_hello_timeout.or(o.client_hello_timeout),
    })
}

/// One listener's settings, each from the entry, the top level or the default.
struct Settings {
    upstream: Option<UpstreamTarget>,
    mode: ProxyProtocolMode,
    accept_v1: bool,
    chained: ChainedHeaders,
    header_timeout: Option<Duration>,
    vpce_ids: Vec<String>,
    sni_check: bool,
    allowed_sni: Option<Vec<String>>,
    routes: Vec<Route>,
    client_hello_timeout: Option<Duration>,
}

fn edge(s: Settings) -> Result<EdgeConfig, FieldError> {
    let off = s.mode == ProxyProtocolMode::Off;
    if s.accept_v1 && off {
        return Err(FieldError(
            "proxy_protocol_v1",
            "proxy-protocol-v1",
            "has no effect with proxy_protocol = \"off\"".into(),
        ));
    }
    let mut allowed_vpce_ids = BTreeSet::new();
    for id in s.vpce_ids {
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
    let upstreams = Upstreams::new(s.upstream, s.sni_check, s.allowed_sni, s.routes).map_err(|e| {
        let (field, flag) = e.key();
        FieldError(field, flag, e.to_string())
    })?;
    Ok(EdgeConfig {
        proxy_protocol: ProxyProtocolConfig {
            mode: s.mode,
            accept_v1: s.accept_v1,
            chained: s.chained,
            header_timeout: positive("proxy_header_timeout", "proxy-header-timeout", s.header_timeout, 5)?,
            allowed_vpce_ids,
        },
        upstreams,
        client_hello_timeout: positive(
            "client_hello_timeout",
            "client-hello-timeout",
            s.client_hello_timeout,
            10,
        )?,
    })
}

fn positive(
    field: &'static str,
    flag: &'static str,
    value: Option<Duration>,
    default_secs: u64,
) -> Result<Duration, FieldError> {
    match value.unwrap_or(Duration::from_secs(default_secs)) {
        d if d.is_zero() => Err(FieldError(field, flag, "must be longer than 0".into())),
        d => Ok(d),
    }
}

#[cfg(test)]
#[path = "listeners_tests.rs"]
mod tests;
