//! Metrics read at scrape time from state that exists anyway: readiness and
//! drain, open connections, the data plane, the edge guard's and sockmap
//! plane's atomics, and the XDP source filter's per-CPU map (summed).

use std::sync::{Arc, atomic::Ordering};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use super::AddressLabels;
use crate::{
    close_reason::CloseCounts, connections::ConnectionTable, health::Health, proxy::Proxy,
    source_filter::SourceFilterCounters,
};

type Encoded = Result<(), std::fmt::Error>;

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> Encoded {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Encoded {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// One family of counters or gauges with one label.
fn family<'a>(
    encoder: &mut DescriptorEncoder,
    (name, help, kind): (&str, &str, MetricType),
    label: &str,
    values: impl IntoIterator<Item = (&'a str, u64)>,
) -> Encoded {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (value, n) in values {
        let labels = [(label, value)];
        let encoder = metric.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(n).encode(encoder)?,
            _ => ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX)).encode(encoder)?,
        }
    }
    Ok(())
}

/// Readiness, drain, open connections, the data plane, upstream addresses.
#[derive(Debug)]
pub struct StateCollector {
    pub health: Arc<Health>,
    pub connections: Arc<ConnectionTable>,
    pub addresses: Arc<AddressLabels>,
    pub plane: &'static str,
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Encoded {
        let readiness = self.health.readiness();
        gauge(
            &mut encoder,
            "ready",
            "1 while /readyz answers 200 (see upstream_ready and draining)",
            i64::from(readiness.ready),
        )?;
        gauge(&mut encoder, "draining", "1 from SIGTERM on", i64::from(self.health.is_draining()))?;
        family(
            &mut encoder,
            (
                "upstream_ready",
                "1 while the target resolved and connected within the readiness window",
                MetricType::Gauge,
            ),
            "target",
            readiness.targets.iter().map(|(target, ok)| (target.as_str(), u64::from(*ok))),
        )?;
        let open = i64::try_from(self.connections.len()).unwrap_or(i64::MAX);
        gauge(&mut encoder, "connections_active", "Connections open now (accepted, not yet closed)", open)?;
        let seen = i64::try_from(self.addresses.len()).unwrap_or(i64::MAX);
        gauge(
            &mut encoder,
            "upstream_addresses_seen",
            "Distinct upstream addresses client connections were made or tried to (at most 256)",
            seen,
        )?;
        family(
            &mut encoder,
            ("dataplane_info", "The data plane in use", MetricType::Gauge),
            "plane",
            [(self.plane, 1)],
        )
    }
}

/// Connections closed, by reason: every reason of the table, those that did
/// not happen yet at 0.
#[derive(Debug)]
pub struct ClosedCollector(pub Arc<CloseCounts>);

impl Collector for ClosedCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Encoded {
        family(
            &mut encoder,
            (
                "connections_closed",
                "Connections closed, by reason (the access log's reason)",
                MetricType::Counter,
            ),
            "reason",
            self.0.by_label(),
        )
    }
}

/// The edge guard's counters and the data plane's own.
#[derive(Debug)]
pub struct ProxyCollector(pub Arc<Proxy>);

impl Collector for ProxyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Encoded {
        let edge = self.0.edge_stats();
        let load = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed);
        counter(
            &mut encoder,
            "edge_proxy_headers_accepted",
            "PROXY protocol headers accepted",
            load(&edge.proxy_headers_accepted),
        )?;
        counter(
            &mut encoder,
            "edge_client_hellos_accepted",
            "ClientHellos whose server name was allowed or routed",
            load(&edge.client_hellos_accepted),
        )?;
        family(
            &mut encoder,
            ("edge_refusals", "Connections the edge guard closed, by reason", MetricType::Counter),
            "reason",
            self.0.metrics().close_counts().refusals(),
        )?;
        for (name, help, value) in self.0.plane().counters() {
            counter(&mut encoder, name, help, value)?;
        }
        if let Some(fallbacks) = self.0.plane().fallbacks() {
            family(
                &mut encoder,
                (
                    "packet_fallbacks",
                    "Connections the packet plane left on the next plane, by reason",
                    MetricType::Counter,
                ),
                "reason",
                fallbacks,
            )?;
        }
        Ok(())
    }
}

/// The XDP source filter's packet counters, summed over the CPUs: the
/// totals by verdict, and allowed/dropped per guarded port.
#[derive(Debug)]
pub struct XdpCollector(pub Arc<SourceFilterCounters>);

impl Collector for XdpCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Encoded {
        // An unreadable map leaves its family out of this scrape.
        if let Ok(c) = self.0.read() {
            family(
                &mut encoder,
                ("xdp_packets", "Packets the XDP source filter saw, by verdict", MetricType::Counter),
                "result",
                [
                    ("allowed", c.allowed),
                    ("dropped", c.dropped),
                    ("unguarded", c.unguarded),
                    ("fragments", c.fragments),
                    ("malformed", c.malformed),
                ],
            )?;
        }
        let Ok(ports) = self.0.read_ports() else { return Ok(()) };
        if ports.is_empty() {
            return Ok(());
        }
        let mut metric = encoder.encode_descriptor(
            "xdp_port_packets",
            "TCP packets to a guarded listen port the XDP source filter allowed or dropped",
            None,
            MetricType::Counter,
        )?;
        for (port, c) in ports {
            let port = port.to_string();
            for (result, n) in [("allowed", c.allowed), ("dropped", c.dropped)] {
                let labels = [("port", port.as_str()), ("result", result)];
                ConstCounter::new(n).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
