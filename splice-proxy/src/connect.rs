//! Connecting to the upstream: every resolved address is tried in turn, each
//! within the connect timeout; the starting address rotates so connections
//! spread over the ENIs; an address that just failed is tried only after the
//! others for `failed_address_hold`.

use std::{
    collections::HashMap,
    io,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::net::TcpStream;

use crate::addr::UpstreamAddr;

/// Validated connect settings (see [`crate::config`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectConfig {
    pub timeout: Duration,
    pub failed_address_hold: Duration,
}

/// One failed attempt.
#[derive(Debug)]
pub struct Attempt {
    pub addr: UpstreamAddr,
    pub error: io::Error,
}

#[derive(Debug, thiserror::Error)]
#[error("no upstream address accepted the connection: {}", describe(.attempts))]
pub struct ConnectError {
    pub attempts: Vec<Attempt>,
}

fn describe(attempts: &[Attempt]) -> String {
    if attempts.is_empty() {
        return "no address to try".into();
    }
    attempts.iter().map(|a| format!("{}: {}", a.addr, a.error)).collect::<Vec<_>>().join(", ")
}

/// A connection made, and the addresses that failed before it.
#[derive(Debug)]
pub struct Connected {
    pub stream: TcpStream,
    pub addr: UpstreamAddr,
    pub failed: Vec<Attempt>,
}

#[derive(Debug)]
pub struct Connector {
    config: ConnectConfig,
    /// Rotates the first address tried.
    next_start: AtomicUsize,
    /// Addresses that failed recently, with the time of the failure.
    recently_failed: Mutex<HashMap<UpstreamAddr, Instant>>,
}

impl Connector {
    #[must_use]
    pub fn new(config: ConnectConfig) -> Self {
        Self { config, next_start: AtomicUsize::new(0), recently_failed: Mutex::default() }
    }

    /// The order in which to try `addrs`: rotated by one per call, addresses
    /// that failed within the hold time moved to the end (still tried, last).
    pub fn order(&self, addrs: &[UpstreamAddr]) -> Vec<UpstreamAddr> {
        if addrs.is_empty() {
            return Vec::new();
        }
        let start = self.next_start.fetch_add(1, Ordering::Relaxed) % addrs.len();
        let mut rotated: Vec<UpstreamAddr> = addrs[start..].iter().chain(&addrs[..start]).copied().collect();
        let now = Instant::now();
        let mut failed = self.recently_failed.lock().unwrap_or_else(|p| p.into_inner());
        failed.retain(|_, at| now.duration_since(*at) < self.config.failed_address_hold);
        // Stable sort: healthy addresses first, each group keeps its rotation.
        rotated.sort_by_key(|addr| failed.contains_key(addr));
        rotated
    }

    /// Connects to the first address (in [`Self::order`]) that accepts.
    pub async fn connect(&self, addrs: &[UpstreamAddr]) -> Result<Connected, ConnectError> {
        let mut attempts = Vec::new();
        for addr in self.order(addrs) {
            let error = match tokio::time::timeout(self.config.timeout, TcpStream::connect(addr.0)).await {
                Ok(Ok(stream)) => {
                    self.recently_failed.lock().unwrap_or_else(|p| p.into_inner()).remove(&addr);
                    return Ok(Connected { stream, addr, failed: attempts });
                }
                Ok(Err(error)) => error,
                Err(_) => io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("timed out after {:?}", self.config.timeout),
                ),
            };
            self.recently_failed.lock().unwrap_or_else(|p| p.into_inner()).insert(addr, Instant::now());
            attempts.push(Attempt { addr, error });
        }
        Err(ConnectError { attempts })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(last: u8) -> UpstreamAddr {
        UpstreamAddr(format!("127.0.0.{last}:443").parse().unwrap())
    }

    fn connector() -> Connector {
        Connector::new(ConnectConfig {
            timeout: Duration::from_secs(1),
            failed_address_hold: Duration::from_secs(60),
        })
    }

    #[test]
    fn rotation_spreads_the_first_choice() {
        let c = connector();
        let addrs = [addr(2), addr(3), addr(4)];
        let firsts: Vec<_> = (0..6).map(|_| c.order(&addrs)[0]).collect();
        assert_eq!(firsts, [addr(2), addr(3), addr(4), addr(2), addr(3), addr(4)]);
    }

    #[test]
    fn recently_failed_addresses_go_last() {
        let c = connector();
        c.recently_failed.lock().unwrap().insert(addr(2), Instant::now());
        for _ in 0..4 {
            let order = c.order(&[addr(2), addr(3)]);
            assert_eq!(order, [addr(3), addr(2)]);
        }
    }

    #[tokio::test]
    async fn a_refused_address_is_skipped_and_remembered() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live = UpstreamAddr(live.local_addr().unwrap());
        // Bound but not listening: connecting is refused.
        let dead_socket = tokio::net::TcpSocket::new_v4().unwrap();
        dead_socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let dead = UpstreamAddr(dead_socket.local_addr().unwrap());
        let c = connector();
        let first = c.connect(&[dead, live]).await.unwrap();
        assert_eq!(first.addr, live);
        assert_eq!(first.failed.len(), 1, "the dead address came first: {first:?}");
        assert_eq!(first.failed[0].addr, dead);
        for _ in 0..4 {
            let connected = c.connect(&[dead, live]).await.unwrap();
            assert_eq!(connected.addr, live);
            assert!(connected.failed.is_empty(), "the dead address goes last now");
        }
        assert!(c.recently_failed.lock().unwrap().contains_key(&dead));
        let err = c.connect(&[dead]).await.unwrap_err();
        assert_eq!(err.attempts.len(), 1);
        assert_eq!(err.attempts[0].error.kind(), io::ErrorKind::ConnectionRefused);
    }
}
