//! The VPC endpoint + NLB stand-in in `proxyacct`: accepts TCP on the
//! endpoint address, spreads connections round-robin over the proxy hosts
//! that pass its health check (HTTP `GET /readyz` on the admin port, as the
//! target group's), and prepends a PROXY v2 header naming the client and
//! the VPC endpoint (AWS TLV 0xEA/0x01), as the NLB does for PrivateLink.
//! With no healthy host it fails open (every host), as an NLB does.
//!
//! The health check runs every [`CHECK_INTERVAL`] with the target group's
//! thresholds (2 to turn healthy, 2 to turn unhealthy): the same shape as
//! the deployed 10 s interval, ten times faster so a scenario takes seconds.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::{io::AsyncWriteExt as _, net::TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::edge::{v2_proxy, vpce_tlv};

pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);
const CHECK_TIMEOUT: Duration = Duration::from_millis(800);
const THRESHOLD: u32 = 2;

/// One proxy host behind the forwarder.
pub struct Target {
    /// Where flows go (the proxy port) and where the health check asks.
    pub addr: SocketAddr,
    pub health: SocketAddr,
    healthy: AtomicBool,
    /// Flows sent to it, and open now.
    flows: AtomicU64,
    active: AtomicU64,
    /// When the health check last turned it unhealthy, and flows sent after that.
    unhealthy_since: Mutex<Option<Instant>>,
    flows_while_unhealthy: AtomicU64,
    /// Flows whose connect to it failed or timed out (the client was closed).
    connect_failures: AtomicU64,
}

impl Target {
    #[must_use]
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
    #[must_use]
    pub fn flows(&self) -> u64 {
        self.flows.load(Ordering::Relaxed)
    }
    #[must_use]
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }
    #[must_use]
    pub fn flows_while_unhealthy(&self) -> u64 {
        self.flows_while_unhealthy.load(Ordering::Relaxed)
    }
    #[must_use]
    pub fn unhealthy_since(&self) -> Option<Instant> {
        *self.unhealthy_since.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running forwarder; stops on drop of its node or with [`Forwarder::stop`].
pub struct Forwarder {
    pub targets: Arc<Vec<Target>>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Forwarder {
    /// Call on the `proxyacct` node. `listeners`: (listen address, VPC
    /// endpoint ID its header names); `targets`: (proxy, health-check) addresses.
    pub async fn start(
        listeners: &[(SocketAddr, &str)],
        targets: &[(SocketAddr, SocketAddr)],
    ) -> Result<Self> {
        let targets: Arc<Vec<Target>> = Arc::new(
            targets
                .iter()
                .map(|&(addr, health)| Target {
                    addr,
                    health,
                    healthy: AtomicBool::new(false),
                    flows: AtomicU64::new(0),
                    active: AtomicU64::new(0),
                    unhealthy_since: Mutex::new(None),
                    flows_while_unhealthy: AtomicU64::new(0),
                    connect_failures: AtomicU64::new(0),
                })
                .collect(),
        );
        let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
        for index in 0..targets.len() {
            let (targets, stop) = (Arc::clone(&targets), stop.clone());
            tasks.spawn(async move { check_health(&targets[index], &stop).await });
        }
        let next = Arc::new(AtomicUsize::new(0));
        for &(listen, vpce) in listeners {
            let listener =
                crate::listen(listen).with_context(|| format!("forwarder listening on {listen}"))?;
            let (targets, stop, flows, next) =
                (Arc::clone(&targets), stop.clone(), tasks.clone(), Arc::clone(&next));
            let tlv = vpce_tlv(vpce);
            tasks.spawn(async move {
                loop {
                    let (client, peer) = tokio::select! {
                        () = stop.cancelled() => return,
                        accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                    };
                    let target = pick(&targets, &next);
                    let (targets, stop, tlv) = (Arc::clone(&targets), stop.clone(), tlv.clone());
                    flows.spawn(async move {
                        tokio::select! {
                            () = stop.cancelled() => {}
                            () = relay(client, peer, listen, &targets[target], tlv) => {}
                        }
                    });
                }
            });
        }
        Ok(Self { targets, stop, tasks })
    }

    /// Waits until every target passed its health check.
    pub async fn wait_all_healthy(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.targets.iter().all(Target::healthy) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "not every proxy host turned healthy within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Waits until target `index` has the health `healthy`; returns how long it took.
    pub async fn wait_health(&self, index: usize, healthy: bool, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        while self.targets[index].healthy() != healthy {
            anyhow::ensure!(
                start.elapsed() < timeout,
                "host {index} not healthy={healthy} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(start.elapsed())
    }

    /// One line per target: health, flows, open flows.
    #[must_use]
    pub fn summary(&self) -> String {
        let line = |t: &Target| {
            let failed = t.connect_failures.load(Ordering::Relaxed);
            format!(
                "{} healthy={} flows={} active={} connect_failures={failed}",
                t.addr,
                t.healthy(),
                t.flows(),
                t.active()
            )
        };
        self.targets.iter().map(line).collect::<Vec<_>>().join("; ")
    }

    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// The next healthy target round-robin; every target when none is healthy.
fn pick(targets: &[Target], next: &AtomicUsize) -> usize {
    let healthy: Vec<usize> = (0..targets.len()).filter(|&i| targets[i].healthy()).collect();
    let n = next.fetch_add(1, Ordering::Relaxed);
    if healthy.is_empty() { n % targets.len() } else { healthy[n % healthy.len()] }
}

async fn relay(
    mut client: TcpStream,
    peer: SocketAddr,
    listen: SocketAddr,
    target: &Target,
    tlv: (u8, Vec<u8>),
) {
    target.flows.fetch_add(1, Ordering::Relaxed);
    if !target.healthy() {
        target.flows_while_unhealthy.fetch_add(1, Ordering::Relaxed);
    }
    target.active.fetch_add(1, Ordering::Relaxed);
    let connect = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(target.addr)).await;
    if let Ok(Ok(mut upstream)) = connect {
        let _ = upstream.set_nodelay(true);
        let _ = client.set_nodelay(true);
        let header = v2_proxy(peer, listen, std::slice::from_ref(&tlv));
        if upstream.write_all(&header).await.is_ok() {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
    } else {
        target.connect_failures.fetch_add(1, Ordering::Relaxed);
    }
    target.active.fetch_sub(1, Ordering::Relaxed);
}

async fn check_health(target: &Target, stop: &CancellationToken) {
    let (mut successes, mut failures) = (0u32, 0u32);
    loop {
        let check = async {
            let stream = TcpStream::connect(target.health).await?;
            crate::admin::get_on(stream, "/readyz").await
        };
        let ok = matches!(tokio::time::timeout(CHECK_TIMEOUT, check).await, Ok(Ok((200, _))));
        if ok {
            (successes, failures) = (successes + 1, 0);
            if successes >= THRESHOLD {
                target.healthy.store(true, Ordering::Relaxed);
            }
        } else {
            (successes, failures) = (0, failures + 1);
            if failures >= THRESHOLD && target.healthy.swap(false, Ordering::Relaxed) {
                *target.unhealthy_since.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(CHECK_INTERVAL) => {}
        }
    }
}
