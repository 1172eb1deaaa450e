//! Scenario: faults (see main.rs).

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use testkit::e2e::{World, topology::ENIS};

use crate::run;

/// `--request-timeout` of the calls made while DNS is down.
const FAILING_CALL_TIMEOUT: &str = "6s";

#[test]
fn faults() -> Result<()> {
    run("faults", |w| Box::pin(faults_scenario(w)))
}

/// The DNS server stops (new connections fail cleanly, counted as
/// `resolve_failed`, and work again once it is back); one ENI is blackholed
/// (every call still succeeds, none reaches it); a proxy host is SIGKILLed
/// (the watches through it end at once, the forwarder stops sending to it,
/// new calls go to the other host and succeed).
async fn faults_scenario(world: &World) -> Result<()> {
    let kubectl = &world.kubectl;
    // DNS down.
    world.stop_dns().await;
    tokio::time::sleep(testkit::e2e::world::DNS_TTL + Duration::from_secs(1)).await;
    let failed_before =
        world.total("splice_proxy_connections_closed_total", &[("reason", "resolve_failed")]).await?;
    let mut failed = 0;
    // Each call is bounded: kubectl retries a GET whose connection the proxy
    // closes until its request timeout (the default 20 s made this phase
    // take minutes); 6 s leaves room for the proxy's 2 s resolve timeout.
    for _ in 0..4 {
        if kubectl.get_pods_within(FAILING_CALL_TIMEOUT).await.is_err() {
            failed += 1;
        }
    }
    ensure!(failed == 4, "{failed} of 4 calls failed while DNS was down");
    let resolve_failed =
        world.total("splice_proxy_connections_closed_total", &[("reason", "resolve_failed")]).await?
            - failed_before;
    ensure!(resolve_failed >= 4.0, "{resolve_failed} connections closed as resolve_failed");
    world.start_dns().await?;
    let back = Instant::now();
    while kubectl.get_pods_within(FAILING_CALL_TIMEOUT).await.is_err() {
        ensure!(back.elapsed() < Duration::from_secs(20), "calls still fail 20 s after DNS returned");
    }
    for _ in 0..4 {
        kubectl.get_pods().await.context("a call after DNS returned")?;
    }

    // One ENI blackholed.
    let dark = ENIS[1];
    let dark_address = format!("{dark}:443");
    let labels = [("address", dark_address.as_str())];
    let to_dark = || world.total("splice_proxy_upstream_connections_total", &labels);
    let before = to_dark().await?;
    world.topology.blackhole_eni(dark)?;
    for _ in 0..8 {
        let eni = kubectl.get_pods().await.context("a call with an ENI blackholed")?;
        ensure!(eni == std::net::IpAddr::V4(ENIS[0]), "answered by {eni}");
    }
    ensure!(to_dark().await? == before, "connections reached the blackholed ENI");
    world.topology.add_eni(dark)?;

    // A proxy host killed.
    let watches = super::scale_in::watches_on_both_hosts(world).await?;
    let on_b = world.forwarder.targets[1].active() as usize;
    world.signal(1, nix::sys::signal::Signal::SIGKILL)?;
    let killed = Instant::now();
    let status = world.wait_proxy_exit(1, Duration::from_secs(5)).await?;
    ensure!(status.code().is_none(), "asg-b exited with {status}, not by the signal");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ended: Vec<_> = watches.iter().filter_map(|w| w.ended()).collect();
    ensure!(ended.len() == on_b, "{} watches ended, {on_b} were on asg-b", ended.len());
    ensure!(
        ended.iter().all(|(at, _)| *at - killed < Duration::from_secs(3)),
        "a watch outlived the kill: {ended:?}"
    );
    world.forwarder.wait_health(1, false, Duration::from_secs(10)).await?;
    let (a, b) = (world.forwarder.targets[0].flows(), world.forwarder.targets[1].flows());
    for _ in 0..4 {
        kubectl.get_pods().await.context("a call after asg-b was killed")?;
    }
    ensure!(
        world.forwarder.targets[1].flows() == b && world.forwarder.targets[0].flows() >= a + 4,
        "{}",
        world.forwarder.summary()
    );
    Ok(())
}
