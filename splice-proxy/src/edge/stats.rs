//! Counters of what the edge guard accepted, over the whole run (logged at
//! exit, read by the metrics endpoint at each scrape). What it refused is
//! counted with every other close, in `close_reason::CloseCounts`.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::close_reason::CloseCounts;

/// What the guard accepted.
#[derive(Debug, Default)]
pub struct EdgeStats {
    pub proxy_headers_accepted: AtomicU64,
    pub client_hellos_accepted: AtomicU64,
}

impl EdgeStats {
    /// One line with what the guard accepted and, from `closed`, what it refused.
    pub fn log_totals(&self, closed: &CloseCounts) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        tracing::info!(
            proxy_headers_accepted = get(&self.proxy_headers_accepted),
            client_hellos_accepted = get(&self.client_hellos_accepted),
            refusals = %closed.refusals_line(),
            "edge totals"
        );
    }
}
