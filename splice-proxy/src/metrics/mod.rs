//! Prometheus metrics (`/metrics`, text format 0.0.4), every name prefixed
//! `splice_proxy_`. Counted here, as connections go: accepted, closed by
//! reason, bytes, resolve and connect times and failures, upstream
//! addresses, probes. Read at scrape time by [`collectors`] instead of being
//! kept twice: open connections, readiness, drain, data plane, and the edge,
//! sockmap and XDP counters that already exist as atomics.
//!
//! Address labels are bounded ([`MAX_ADDRESS_LABELS`]); docs/admin.md lists
//! every metric.

pub mod collectors;

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use crate::{
    addr::{ListenAddr, UpstreamAddr},
    close_reason::{CloseCounts, CloseReason},
};

/// Most distinct upstream addresses with a label of their own; connections
/// to further addresses are counted under `address="other"`.
pub const MAX_ADDRESS_LABELS: usize = 256;
/// The label of addresses beyond [`MAX_ADDRESS_LABELS`].
pub const OTHER_ADDRESS: &str = "other";
/// Upper bounds (seconds) of the resolve and connect time buckets.
const LATENCY_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

type Label<V> = [(&'static str, V); 1];

/// The upstream addresses given a label so far, at most [`MAX_ADDRESS_LABELS`].
#[derive(Debug, Default)]
pub struct AddressLabels {
    seen: Mutex<HashSet<SocketAddr>>,
}

impl AddressLabels {
    /// The label of `addr`: itself while there is room, else [`OTHER_ADDRESS`].
    pub fn label(&self, addr: UpstreamAddr) -> String {
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.contains(&addr.0) || (seen.len() < MAX_ADDRESS_LABELS && seen.insert(addr.0)) {
            addr.to_string()
        } else {
            OTHER_ADDRESS.to_owned()
        }
    }

    /// Distinct addresses with a label.
    #[must_use]
    pub fn len(&self) -> usize {
        self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The metrics counted as connections go (cheap clones share the values).
#[derive(Debug, Clone)]
pub struct Metrics {
    accepted: Family<Label<String>, Counter>,
    closed: Arc<CloseCounts>,
    bytes: Family<Label<&'static str>, Counter>,
    kernel_bytes: Counter,
    resolve_seconds: Histogram,
    resolve_failures: Family<Label<&'static str>, Counter>,
    connect_seconds: Histogram,
    connect_failures: Family<Label<String>, Counter>,
    upstream_connections: Family<Label<String>, Counter>,
    probes: Family<Label<&'static str>, Counter>,
    reloads: Family<Label<&'static str>, Counter>,
    addresses: Arc<AddressLabels>,
}

impl Default for Metrics {
    fn default() -> Self {
        let histogram = || Histogram::new(LATENCY_BUCKETS);
        Self {
            accepted: Family::default(),
            closed: Arc::default(),
            bytes: Family::default(),
            kernel_bytes: Counter::default(),
            resolve_seconds: histogram(),
            resolve_failures: Family::default(),
            connect_seconds: histogram(),
            connect_failures: Family::default(),
            upstream_connections: Family::default(),
            probes: Family::default(),
            reloads: Family::default(),
            addresses: Arc::default(),
        }
    }
}

impl Metrics {
    /// A connection was accepted on `listen`.
    pub fn accepted(&self, listen: ListenAddr) {
        self.accepted.get_or_create(&[("listen", listen.to_string())]).inc();
    }

    /// A connection closed for `reason` after moving these bytes (`kernel`:
    /// of them, redirected by the kernel). Every connection is counted here
    /// once.
    pub fn closed(&self, reason: CloseReason, up: u64, down: u64, kernel: u64) {
        self.closed.count(reason);
        if up > 0 {
            self.bytes.get_or_create(&[("direction", "client_to_upstream")]).inc_by(up);
        }
        if down > 0 {
            self.bytes.get_or_create(&[("direction", "upstream_to_client")]).inc_by(down);
        }
        self.kernel_bytes.inc_by(kernel);
    }

    /// A client connection's upstream lookup took `took`; `failure`: its kind.
    pub fn resolved(&self, took: Duration, failure: Option<&'static str>) {
        self.resolve_seconds.observe(took.as_secs_f64());
        if let Some(kind) = failure {
            self.resolve_failures.get_or_create(&[("kind", kind)]).inc();
        }
    }

    /// A client connection's connect step (every address tried) took `took`.
    pub fn connect_time(&self, took: Duration) {
        self.connect_seconds.observe(took.as_secs_f64());
    }

    /// Connecting to `addr` failed (for a client connection).
    pub fn connect_failed(&self, addr: UpstreamAddr) {
        self.connect_failures.get_or_create(&[("address", self.addresses.label(addr))]).inc();
    }

    /// A client connection was made to `addr`.
    pub fn connected(&self, addr: UpstreamAddr) {
        self.upstream_connections.get_or_create(&[("address", self.addresses.label(addr))]).inc();
    }

    /// A background probe ended with `result` (`ok`, `resolve_failed`, `connect_failed`).
    pub fn probed(&self, result: &'static str) {
        self.probes.get_or_create(&[("result", result)]).inc();
    }

    /// A SIGHUP reload of the configuration was applied (`ok`) or rejected.
    pub fn reloaded(&self, ok: bool) {
        self.reloads.get_or_create(&[("result", if ok { "success" } else { "failure" })]).inc();
    }

    /// The labelled upstream addresses.
    #[must_use]
    pub fn addresses(&self) -> &Arc<AddressLabels> {
        &self.addresses
    }

    /// Connections closed so far, by reason.
    #[must_use]
    pub fn close_counts(&self) -> &CloseCounts {
        &self.closed
    }

    /// A registry with these metrics and the `collectors` read at scrape time.
    #[must_use]
    pub fn registry(&self, collectors: Vec<Box<dyn Collector>>) -> Registry {
        let mut r = Registry::with_prefix("splice_proxy");
        r.register("connections_accepted", "Connections accepted, by listen address", self.accepted.clone());
        r.register_collector(Box::new(collectors::ClosedCollector(Arc::clone(&self.closed))));
        r.register(
            "bytes",
            "Bytes forwarded, by direction, counted when a connection closes (kernel-spliced bytes included)",
            self.bytes.clone(),
        );
        r.register(
            "kernel_bytes",
            "Of those bytes, the ones the kernel programs carried (the sockmap and packet planes)",
            self.kernel_bytes.clone(),
        );
        r.register(
            "resolve_duration_seconds",
            "Upstream name lookups of client connections (every lookup, failed ones too)",
            self.resolve_seconds.clone(),
        );
        r.register("resolve_failures", "Failed upstream lookups, by kind", self.resolve_failures.clone());
        r.register(
            "connect_duration_seconds",
            "Connect step of client connections (every address tried), failed ones too",
            self.connect_seconds.clone(),
        );
        r.register(
            "connect_failures",
            "Failed connects to one upstream address (256 addresses at most, then \"other\")",
            self.connect_failures.clone(),
        );
        r.register(
            "upstream_connections",
            "Client connections made, by upstream address (256 addresses at most, then \"other\")",
            self.upstream_connections.clone(),
        );
        r.register("upstream_probes", "Background upstream probes, by result", self.probes.clone());
        r.register(
            "config_reloads",
            "SIGHUP reloads of the configuration, by result (success, failure: the old one stays)",
            self.reloads.clone(),
        );
        for collector in collectors {
            r.register_collector(collector);
        }
        r
    }
}

/// The registry in Prometheus text format.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, registry)?;
    Ok(text)
}

/// The `Content-Type` of [`encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u32) -> UpstreamAddr {
        UpstreamAddr(SocketAddr::new(std::net::Ipv4Addr::from(0x0a00_0000 + n).into(), 443))
    }

    #[test]
    fn address_labels_stop_at_the_cap() {
        let labels = AddressLabels::default();
        for n in 0..MAX_ADDRESS_LABELS as u32 {
            assert_eq!(labels.label(addr(n)), addr(n).to_string());
        }
        assert_eq!(labels.label(addr(9999)), OTHER_ADDRESS);
        assert_eq!(labels.label(addr(0)), addr(0).to_string(), "a known address keeps its label");
        assert_eq!(labels.len(), MAX_ADDRESS_LABELS);
    }

    #[test]
    fn exposition_has_the_counted_values() {
        let m = Metrics::default();
        m.accepted(ListenAddr("127.0.0.1:6443".parse().unwrap()));
        m.closed(CloseReason::Completed, 100, 2000, 0);
        m.closed(CloseReason::SniDenied, 0, 0, 0);
        m.resolved(Duration::from_millis(2), None);
        m.resolved(Duration::from_millis(3), Some("nxdomain"));
        m.connected(addr(1));
        m.connect_failed(addr(2));
        let text = encode(&m.registry(Vec::new())).unwrap();
        for line in [
            "splice_proxy_connections_accepted_total{listen=\"127.0.0.1:6443\"} 1",
            "splice_proxy_connections_closed_total{reason=\"completed\"} 1",
            "splice_proxy_connections_closed_total{reason=\"sni_denied\"} 1",
            "splice_proxy_connections_closed_total{reason=\"upstream_reset\"} 0",
            "splice_proxy_bytes_total{direction=\"client_to_upstream\"} 100",
            "splice_proxy_bytes_total{direction=\"upstream_to_client\"} 2000",
            "splice_proxy_resolve_duration_seconds_count 2",
            "splice_proxy_resolve_duration_seconds_bucket{le=\"0.0025\"} 1",
            "splice_proxy_resolve_failures_total{kind=\"nxdomain\"} 1",
            "splice_proxy_upstream_connections_total{address=\"10.0.0.1:443\"} 1",
            "splice_proxy_connect_failures_total{address=\"10.0.0.2:443\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
