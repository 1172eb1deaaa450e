//! Why a connection closed: one fieldless value per reason and the one table
//! of their labels (the access log's `reason` and the metrics' label), log
//! levels and whether the edge guard refused the connection. Metrics, the
//! exit totals and the access log all read it; each connection is counted
//! once, in [`CloseCounts`].

use std::{
    fmt,
    sync::atomic::{AtomicU64, Ordering},
};

use tracing::Level;

/// Why a connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Both sides sent FIN; everything was forwarded.
    Completed,
    /// A side reset a forwarded connection; the reset was carried across.
    ClientReset,
    UpstreamReset,
    /// Another I/O error on a side of a forwarded connection; the other was reset.
    ClientError,
    UpstreamError,
    /// The drain timeout ran out (or an immediate stop) and the proxy cut it.
    Stopped,
    /// No upstream connection: the lookup failed, every address failed, or
    /// the upstream socket could not be set up.
    ResolveFailed,
    ConnectFailed,
    InternalError,
    /// The edge guard's refusals (docs/edge-guard.md).
    HealthCheck,
    ClosedBeforeData,
    ProxyHeaderMissing,
    ProxyHeaderInvalid,
    ProxyHeaderOversized,
    ProxyHeaderTimeout,
    ChainedHeaderRefused,
    VpceMissing,
    VpceDenied,
    NotTls,
    ClientHelloInvalid,
    ClientHelloTimeout,
    SniMissing,
    SniDenied,
    /// The client reset, or another error, while the guard read. Same label
    /// as [`Self::ClientError`]: for an operator both are the client's
    /// socket failing; the edge's refusal counter tells them apart.
    EdgeClientError,
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReasonInfo {
    pub label: &'static str,
    /// Level of the connection's access log line.
    pub level: Level,
    /// The edge guard closed the connection before any upstream was chosen.
    pub refusal: bool,
}

const fn row(label: &'static str, level: Level, refusal: bool) -> ReasonInfo {
    ReasonInfo { label, level, refusal }
}

impl CloseReason {
    /// Every reason, in the order the metrics list them.
    pub const ALL: [Self; 24] = [
        Self::Completed,
        Self::ClientReset,
        Self::UpstreamReset,
        Self::ClientError,
        Self::UpstreamError,
        Self::Stopped,
        Self::ResolveFailed,
        Self::ConnectFailed,
        Self::InternalError,
        Self::HealthCheck,
        Self::ClosedBeforeData,
        Self::ProxyHeaderMissing,
        Self::ProxyHeaderInvalid,
        Self::ProxyHeaderOversized,
        Self::ProxyHeaderTimeout,
        Self::ChainedHeaderRefused,
        Self::VpceMissing,
        Self::VpceDenied,
        Self::NotTls,
        Self::ClientHelloInvalid,
        Self::ClientHelloTimeout,
        Self::SniMissing,
        Self::SniDenied,
        Self::EdgeClientError,
    ];

    /// The table. A forwarded connection's end is routine (info), as is the
    /// NLB's health check; a connection the proxy could not serve is a
    /// warning.
    #[must_use]
    pub const fn info(self) -> ReasonInfo {
        use Level as L;
        match self {
            Self::Completed => row("completed", L::INFO, false),
            Self::ClientReset => row("client_reset", L::INFO, false),
            Self::UpstreamReset => row("upstream_reset", L::INFO, false),
            Self::ClientError => row("client_error", L::INFO, false),
            Self::UpstreamError => row("upstream_error", L::INFO, false),
            Self::Stopped => row("stopped", L::INFO, false),
            Self::ResolveFailed => row("resolve_failed", L::WARN, false),
            Self::ConnectFailed => row("connect_failed", L::WARN, false),
            Self::InternalError => row("internal_error", L::WARN, false),
            Self::HealthCheck => row("health_check", L::INFO, true),
            Self::ClosedBeforeData => row("closed_before_data", L::WARN, true),
            Self::ProxyHeaderMissing => row("proxy_header_missing", L::WARN, true),
            Self::ProxyHeaderInvalid => row("proxy_header_invalid", L::WARN, true),
            Self::ProxyHeaderOversized => row("proxy_header_oversized", L::WARN, true),
            Self::ProxyHeaderTimeout => row("proxy_header_timeout", L::WARN, true),
            Self::ChainedHeaderRefused => row("chained_header_refused", L::WARN, true),
            Self::VpceMissing => row("vpce_missing", L::WARN, true),
            Self::VpceDenied => row("vpce_denied", L::WARN, true),
            Self::NotTls => row("not_tls", L::WARN, true),
            Self::ClientHelloInvalid => row("client_hello_invalid", L::WARN, true),
            Self::ClientHelloTimeout => row("client_hello_timeout", L::WARN, true),
            Self::SniMissing => row("sni_missing", L::WARN, true),
            Self::SniDenied => row("sni_denied", L::WARN, true),
            Self::EdgeClientError => row("client_error", L::WARN, true),
        }
    }

    /// The access log's `reason` and the metrics' label.
    #[must_use]
    pub const fn label(self) -> &'static str {
        self.info().label
    }

    /// Position in [`Self::ALL`] (and in [`CloseCounts`]).
    fn index(self) -> usize {
        self as usize
    }
}

/// Connections closed, one counter per reason.
#[derive(Debug, Default)]
pub struct CloseCounts([AtomicU64; CloseReason::ALL.len()]);

impl CloseCounts {
    pub fn count(&self, reason: CloseReason) {
        self.0[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    #[must_use]
    pub fn get(&self, reason: CloseReason) -> u64 {
        self.0[reason.index()].load(Ordering::Relaxed)
    }

    /// Count per label, every label once (reasons that share a label summed).
    #[must_use]
    pub fn by_label(&self) -> Vec<(&'static str, u64)> {
        let mut labels: Vec<(&'static str, u64)> = Vec::with_capacity(CloseReason::ALL.len());
        for reason in CloseReason::ALL {
            let n = self.get(reason);
            match labels.iter_mut().find(|(label, _)| *label == reason.label()) {
                Some((_, total)) => *total += n,
                None => labels.push((reason.label(), n)),
            }
        }
        labels
    }

    /// Count per refusal of the edge guard, by label.
    #[must_use]
    pub fn refusals(&self) -> Vec<(&'static str, u64)> {
        CloseReason::ALL.iter().filter(|r| r.info().refusal).map(|&r| (r.label(), self.get(r))).collect()
    }

    /// The refusals as `label=count` pairs, for the exit totals.
    #[must_use]
    pub fn refusals_line(&self) -> impl fmt::Display + '_ {
        RefusalsLine(self)
    }
}

struct RefusalsLine<'a>(&'a CloseCounts);

impl fmt::Display for RefusalsLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (label, n)) in self.0.refusals().into_iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{label}={n}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn the_table_lists_every_reason_once_in_index_order() {
        for (i, reason) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i, "{reason:?}");
        }
        let labels: HashSet<_> = CloseReason::ALL.iter().map(|r| r.label()).collect();
        // client_error is both a forwarding error and an edge refusal.
        assert_eq!(labels.len(), CloseReason::ALL.len() - 1);
        let refusals: HashSet<_> =
            CloseReason::ALL.iter().filter(|r| r.info().refusal).map(|r| r.label()).collect();
        assert_eq!(refusals.len(), 15);
        assert!(refusals.contains("health_check") && refusals.contains("client_error"));
    }

    #[test]
    fn each_connection_is_counted_once_under_its_label() {
        let counts = CloseCounts::default();
        for reason in [
            CloseReason::SniDenied,
            CloseReason::SniDenied,
            CloseReason::ClientError,
            CloseReason::EdgeClientError,
        ] {
            counts.count(reason);
        }
        let by_label = counts.by_label();
        assert!(by_label.contains(&("sni_denied", 2)) && by_label.contains(&("client_error", 2)));
        assert_eq!(by_label.iter().map(|(_, n)| n).sum::<u64>(), 4);
        let refusals = counts.refusals();
        assert!(refusals.contains(&("client_error", 1)) && refusals.contains(&("sni_denied", 2)));
        assert!(counts.refusals_line().to_string().contains(" sni_denied=2 "));
    }
}
