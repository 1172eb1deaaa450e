//! Counters of what the edge guard admitted and refused, over the whole run
//! (logged at exit, read by the metrics endpoint at each scrape).

use std::sync::atomic::{AtomicU64, Ordering};

use super::Refusal;

/// One counter per close reason of the guard, plus what it accepted.
#[derive(Debug, Default)]
pub struct EdgeStats {
    pub proxy_headers_accepted: AtomicU64,
    pub client_hellos_accepted: AtomicU64,
    pub health_checks: AtomicU64,
    pub closed_before_data: AtomicU64,
    pub proxy_header_missing: AtomicU64,
    pub proxy_header_invalid: AtomicU64,
    pub proxy_header_oversized: AtomicU64,
    pub proxy_header_timeout: AtomicU64,
    pub chained_header_refused: AtomicU64,
    pub vpce_missing: AtomicU64,
    pub vpce_denied: AtomicU64,
    pub not_tls: AtomicU64,
    pub client_hello_invalid: AtomicU64,
    pub client_hello_timeout: AtomicU64,
    pub sni_missing: AtomicU64,
    pub sni_denied: AtomicU64,
    pub client_errors: AtomicU64,
}

impl EdgeStats {
    /// Counts one connection closed for `refusal`.
    pub fn refused(&self, refusal: &Refusal) {
        self.counter(refusal).fetch_add(1, Ordering::Relaxed);
    }

    /// Each refusal's label (as in the access log) with its count.
    #[must_use]
    pub fn refusals(&self) -> Vec<(&'static str, u64)> {
        let text = String::new;
        [
            Refusal::HealthCheck,
            Refusal::ClosedBeforeData,
            Refusal::HeaderMissing,
            Refusal::HeaderInvalid(text()),
            Refusal::HeaderOversized(text()),
            Refusal::HeaderTimeout,
            Refusal::ChainedHeader,
            Refusal::VpceMissing,
            Refusal::VpceDenied(text()),
            Refusal::NotTls(text()),
            Refusal::ClientHelloInvalid(text()),
            Refusal::ClientHelloTimeout,
            Refusal::SniMissing,
            Refusal::SniDenied(text()),
            Refusal::ClientError(std::io::ErrorKind::Other.into()),
        ]
        .iter()
        .map(|r| (r.label(), self.counter(r).load(Ordering::Relaxed)))
        .collect()
    }

    fn counter(&self, refusal: &Refusal) -> &AtomicU64 {
        match refusal {
            Refusal::HealthCheck => &self.health_checks,
            Refusal::ClosedBeforeData => &self.closed_before_data,
            Refusal::HeaderMissing => &self.proxy_header_missing,
            Refusal::HeaderInvalid(_) => &self.proxy_header_invalid,
            Refusal::HeaderOversized(_) => &self.proxy_header_oversized,
            Refusal::HeaderTimeout => &self.proxy_header_timeout,
            Refusal::ChainedHeader => &self.chained_header_refused,
            Refusal::VpceMissing => &self.vpce_missing,
            Refusal::VpceDenied(_) => &self.vpce_denied,
            Refusal::NotTls(_) => &self.not_tls,
            Refusal::ClientHelloInvalid(_) => &self.client_hello_invalid,
            Refusal::ClientHelloTimeout => &self.client_hello_timeout,
            Refusal::SniMissing => &self.sni_missing,
            Refusal::SniDenied(_) => &self.sni_denied,
            Refusal::ClientError(_) => &self.client_errors,
        }
    }

    /// One line with every counter.
    pub fn log_totals(&self) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        tracing::info!(
            proxy_headers_accepted = get(&self.proxy_headers_accepted),
            client_hellos_accepted = get(&self.client_hellos_accepted),
            health_checks = get(&self.health_checks),
            closed_before_data = get(&self.closed_before_data),
            proxy_header_missing = get(&self.proxy_header_missing),
            proxy_header_invalid = get(&self.proxy_header_invalid),
            proxy_header_oversized = get(&self.proxy_header_oversized),
            proxy_header_timeout = get(&self.proxy_header_timeout),
            chained_header_refused = get(&self.chained_header_refused),
            vpce_missing = get(&self.vpce_missing),
            vpce_denied = get(&self.vpce_denied),
            not_tls = get(&self.not_tls),
            client_hello_invalid = get(&self.client_hello_invalid),
            client_hello_timeout = get(&self.client_hello_timeout),
            sni_missing = get(&self.sni_missing),
            sni_denied = get(&self.sni_denied),
            client_errors = get(&self.client_errors),
            "edge totals"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_its_own_label_and_counter() {
        let stats = EdgeStats::default();
        stats.refused(&Refusal::SniDenied("x.example.com".into()));
        stats.refused(&Refusal::SniDenied("y.example.com".into()));
        stats.refused(&Refusal::HealthCheck);
        let refusals = stats.refusals();
        let labels: std::collections::HashSet<_> = refusals.iter().map(|(l, _)| *l).collect();
        assert_eq!(labels.len(), 15);
        assert!(refusals.contains(&("sni_denied", 2)));
        assert!(refusals.contains(&("health_check", 1)));
        assert_eq!(refusals.iter().map(|(_, n)| n).sum::<u64>(), 3);
    }
}
