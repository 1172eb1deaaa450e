//! splice-proxy's byte counters, read from its admin endpoint's `/metrics`
//! (with the tests' client and parser, `splice_proxy_tests::admin`): what share of the
//! bytes it forwarded the kernel redirected (the sockmap plane's verdict
//! program) rather than user space.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use splice_proxy_tests::admin::{Exposition, get};
use tokio::runtime::Runtime;

/// Connections are counted when they close, just after the sink's last
/// byte: how long to wait for that.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// The proxy's totals so far, both directions.
#[derive(Clone, Copy, Debug, Default)]
pub struct ByteCounters {
    pub forwarded: u64,
    pub kernel: u64,
}

impl ByteCounters {
    /// Reads the totals from the admin endpoint at `admin`.
    pub fn read(admin: SocketAddr) -> Result<Self> {
        read_on(&runtime()?, admin)
    }

    /// Waits until at least `sent` bytes more than `self` are counted, then
    /// returns the kernel's share of the bytes counted since, in percent.
    pub fn kernel_percent_since(self, admin: SocketAddr, sent: u64) -> Result<f64> {
        let runtime = runtime()?;
        let deadline = Instant::now() + CLOSE_WAIT;
        loop {
            let now = read_on(&runtime, admin)?;
            let forwarded = now.forwarded.saturating_sub(self.forwarded);
            if forwarded >= sent {
                let kernel = now.kernel.saturating_sub(self.kernel);
                return Ok(100.0 * kernel as f64 / forwarded as f64);
            }
            if Instant::now() > deadline {
                bail!("{forwarded} of the {sent} bytes sent were counted within {CLOSE_WAIT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn runtime() -> Result<Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("a runtime for /metrics")
}

fn read_on(runtime: &Runtime, admin: SocketAddr) -> Result<ByteCounters> {
    let (status, body) = runtime.block_on(get(admin, "/metrics"))?;
    ensure!(status == 200, "GET http://{admin}/metrics: status {status}");
    let exposition = Exposition::parse(&body).with_context(|| format!("the metrics of {admin}"))?;
    counters(&exposition).with_context(|| format!("the metrics of {admin}"))
}

/// `splice_proxy_bytes_total` (summed over its directions; absent before a
/// first connection closed) and `splice_proxy_kernel_bytes_total` (always
/// there).
fn counters(exposition: &Exposition) -> Result<ByteCounters> {
    let kernel = exposition
        .value("splice_proxy_kernel_bytes_total", &[])
        .context("no splice_proxy_kernel_bytes_total")?;
    let forwarded: f64 = exposition.all("splice_proxy_bytes_total").map(|s| s.value).sum();
    Ok(ByteCounters { forwarded: forwarded as u64, kernel: kernel as u64 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Result<ByteCounters> {
        counters(&Exposition::parse(text)?)
    }

    #[test]
    fn both_directions_are_summed_and_the_kernel_share_read() {
        let body = "# HELP splice_proxy_bytes_total Bytes forwarded\n\
                    splice_proxy_bytes_total{direction=\"client_to_upstream\"} 3000\n\
                    splice_proxy_bytes_total{direction=\"upstream_to_client\"} 1000\n\
                    splice_proxy_kernel_bytes_total 2500\n\
                    splice_proxy_kernel_bytes_per_thing 7\n";
        let counters = parsed(body).unwrap();
        assert_eq!((counters.forwarded, counters.kernel), (4000, 2500));
    }

    #[test]
    fn before_a_first_close_nothing_was_forwarded() {
        let counters =
            parsed("# TYPE splice_proxy_bytes_total counter\nsplice_proxy_kernel_bytes_total 0\n").unwrap();
        assert_eq!((counters.forwarded, counters.kernel), (0, 0));
    }

    #[test]
    fn a_body_without_the_kernel_counter_is_an_error() {
        assert!(parsed("splice_proxy_bytes_total{direction=\"x\"} 1\n").is_err());
        assert!(parsed("").is_err());
    }
}
