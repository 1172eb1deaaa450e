//! splice-proxy's byte counters, read from its admin endpoint's `/metrics`:
//! what share of the bytes it forwarded the kernel redirected (the sockmap
//! plane's verdict program) rather than user space.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

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
        let body = get_metrics(admin).with_context(|| format!("GET http://{admin}/metrics"))?;
        parse(&body).with_context(|| format!("the metrics of {admin}"))
    }

    /// Waits until at least `sent` bytes more than `self` are counted, then
    /// returns the kernel's share of the bytes counted since, in percent.
    pub fn kernel_percent_since(self, admin: SocketAddr, sent: u64) -> Result<f64> {
        let deadline = Instant::now() + CLOSE_WAIT;
        loop {
            let now = Self::read(admin)?;
            let forwarded = now.forwarded.saturating_sub(self.forwarded);
            if forwarded >= sent {
                let kernel = now.kernel.saturating_sub(self.kernel);
                return Ok(100.0 * kernel as f64 / forwarded as f64);
            }
            if Instant::now() > deadline {
                bail!("{forwarded} of the {sent} bytes sent were counted within {CLOSE_WAIT:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn get_metrics(admin: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") => {
            Ok(body.to_owned())
        }
        _ => bail!("unexpected answer: {}", response.lines().next().unwrap_or_default()),
    }
}

/// `splice_proxy_bytes_total` (summed over its directions; absent before a
/// first connection closed) and `splice_proxy_kernel_bytes_total` (always
/// there) from a Prometheus text body.
fn parse(body: &str) -> Result<ByteCounters> {
    let mut counters = ByteCounters::default();
    let mut kernel_seen = false;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else { continue };
        let value = || value.parse::<f64>().with_context(|| format!("the value of {line:?}"));
        if name.starts_with("splice_proxy_bytes_total{") {
            counters.forwarded += value()? as u64;
        } else if name == "splice_proxy_kernel_bytes_total" {
            counters.kernel = value()? as u64;
            kernel_seen = true;
        }
    }
    if !kernel_seen {
        bail!("no splice_proxy_kernel_bytes_total");
    }
    Ok(counters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_directions_are_summed_and_the_kernel_share_read() {
        let body = "# HELP splice_proxy_bytes_total Bytes forwarded\n\
                    splice_proxy_bytes_total{direction=\"client_to_upstream\"} 3000\n\
                    splice_proxy_bytes_total{direction=\"upstream_to_client\"} 1000\n\
                    splice_proxy_kernel_bytes_total 2500\n\
                    splice_proxy_kernel_bytes_per_thing 7\n";
        let counters = parse(body).unwrap();
        assert_eq!((counters.forwarded, counters.kernel), (4000, 2500));
    }

    #[test]
    fn before_a_first_close_nothing_was_forwarded() {
        let counters =
            parse("# TYPE splice_proxy_bytes_total counter\nsplice_proxy_kernel_bytes_total 0\n").unwrap();
        assert_eq!((counters.forwarded, counters.kernel), (0, 0));
    }

    #[test]
    fn a_body_without_the_kernel_counter_is_an_error() {
        assert!(parse("splice_proxy_bytes_total{direction=\"x\"} 1\n").is_err());
        assert!(parse("").is_err());
    }
}
