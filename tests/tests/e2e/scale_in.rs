//! Scenario: scale-in (see main.rs).

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use splice_proxy_tests::e2e::{World, kubectl::ensure_no_failure};

use crate::run;

#[test]
fn scale_in() -> Result<()> {
    run("scale_in", |w| Box::pin(scale_in_scenario(w)))
}

/// Watches on both hosts, then SIGTERM to asg-a while kubectl calls go on:
/// its /readyz turns 503 at once, the forwarder's health check stops
/// sending it flows within two checks, the calls all succeed (asg-b takes
/// them; asg-a accepts during the drain delay), the watches on asg-a are cut
/// at the drain timeout and no earlier, the proxy exits 0; asg-b's watches
/// carry on.
async fn scale_in_scenario(world: &World) -> Result<()> {
    let watches = watches_on_both_hosts(world).await?;
    let on_a = world.forwarder.targets[0].active() as usize;
    let calls = world.kubectl.call_loop();
    calls.wait_more(2, Duration::from_secs(60)).await?;
    let (delay, timeout) = (deployed_duration("drain_delay")?, deployed_duration("drain_timeout")?);

    world.signal(0, nix::sys::signal::Signal::SIGTERM)?;
    let term = Instant::now();
    splice_proxy_tests::e2e::world::eventually(
        "/readyz 503 after SIGTERM",
        Duration::from_secs(1),
        || async { Ok(world.admin_get(0, "/readyz").await?.0 == 503) },
    )
    .await?;
    let noticed = world.forwarder.wait_health(0, false, Duration::from_secs(10)).await?;
    let flows_at_notice = world.forwarder.targets[0].flows();
    ensure!(world.metrics(0).await?.count("splice_proxy_draining", &[]) == 1.0, "draining is not 1");
    let flows_b = world.forwarder.targets[1].flows();
    calls.wait_more(3, Duration::from_secs(60)).await?;
    ensure!(world.forwarder.targets[1].flows() > flows_b, "asg-b got no new flows");
    ensure!(
        world.forwarder.targets[0].flows() == flows_at_notice,
        "asg-a got flows after it turned unhealthy"
    );

    let status = world.wait_proxy_exit(0, delay + timeout + Duration::from_secs(15)).await?;
    ensure!(status.success(), "asg-a exited with {status}");
    // The cut reaches kubectl through the forwarder a moment after the exit.
    let ended_count = || watches.iter().filter(|w| w.ended().is_some()).count();
    splice_proxy_tests::e2e::world::eventually(
        "the watches on asg-a ended",
        Duration::from_secs(5),
        || async { Ok(ended_count() >= on_a) },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ended: Vec<_> = watches.iter().filter_map(|w| w.ended()).collect();
    ensure!(ended.len() == on_a, "{} watches ended, {on_a} were on asg-a", ended.len());
    for (at, how) in &ended {
        let after = *at - term;
        ensure!(
            after + Duration::from_secs(2) >= delay + timeout,
            "a watch on asg-a ended {after:?} after SIGTERM: {how}"
        );
    }
    let calls = calls.stop().await;
    ensure_no_failure(&calls)?;
    ensure!(calls.iter().any(|c| c.started > term + delay), "no call after the listeners closed");
    eprintln!(
        "scale_in: forwarder noticed in {noticed:?}; {} calls, none failed; {on_a} watch(es) cut after {:?}",
        calls.len(),
        ended.first().map(|(at, _)| *at - term)
    );
    Ok(())
}

/// Starts kubectl watches until each proxy host carries at least one.
pub async fn watches_on_both_hosts(world: &World) -> Result<Vec<splice_proxy_tests::e2e::kubectl::Watch>> {
    let mut watches = Vec::new();
    while !world.forwarder.targets.iter().all(|t| t.active() >= 1) {
        ensure!(watches.len() < 8, "8 watches and still not on both hosts: {}", world.forwarder.summary());
        let watch = world.kubectl.watch()?;
        watch.wait_events(2, Duration::from_secs(30)).await?;
        watches.push(watch);
    }
    Ok(watches)
}

/// A duration from the deployed configuration.
fn deployed_duration(key: &str) -> Result<Duration> {
    let config = splice_proxy_tests::e2e::world::deployed_config()?;
    let line =
        config.lines().find(|l| l.starts_with(&format!("{key} ="))).with_context(|| format!("no {key}"))?;
    let value = line.split('"').nth(1).with_context(|| line.to_owned())?;
    let seconds: u64 = value.strip_suffix('s').context("seconds")?.parse()?;
    Ok(Duration::from_secs(seconds))
}
