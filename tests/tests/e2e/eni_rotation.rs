//! Scenario: ENI rotation (see main.rs).

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use splice_proxy_tests::e2e::{World, kubectl::ensure_no_failure, topology::ENIS};

use crate::run;

#[test]
fn eni_rotation() -> Result<()> {
    run("eni_rotation", |w| Box::pin(eni_rotation_scenario(w)))
}

/// While a loop of kubectl calls runs and a watch is open, the DNS answer
/// moves from ENIs .11/.12 to .13/.14, then .11 and .12 are withdrawn. No
/// call fails; new calls land on the new ENIs within the answer's TTL; the
/// watch stays on its ENI until that ENI disappears, and a watch started
/// again lands on a new one; the proxies' metrics name the new addresses.
async fn eni_rotation_scenario(world: &World) -> Result<()> {
    let (old, new) = (&ENIS[..2], &ENIS[2..]);
    let is = |set: &[std::net::Ipv4Addr], eni: Option<std::net::IpAddr>| {
        eni.is_some_and(|e| set.iter().any(|s| std::net::IpAddr::V4(*s) == e))
    };
    let calls = world.kubectl.call_loop();
    calls.wait_more(3, Duration::from_secs(60)).await?;
    let watch = world.kubectl.watch()?;
    watch.wait_events(3, Duration::from_secs(30)).await?;
    let watched = watch.eni();
    ensure!(is(old, watched), "the watch is on {watched:?}");

    world.set_dns(new);
    let moved = Instant::now();
    let settled = moved + splice_proxy_tests::e2e::world::DNS_TTL + Duration::from_secs(1);
    let mut on_new = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while on_new < 4 {
        ensure!(
            Instant::now() < deadline,
            "kubectl calls did not move to the new ENIs: {:#?}",
            calls.calls()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after: Vec<_> = calls.calls().into_iter().filter(|c| c.started > settled).collect();
        ensure!(
            !after.iter().any(|c| matches!(c.result, Ok(Some(e)) if is(old, Some(e)))),
            "a call after the move landed on an old ENI: {after:#?}"
        );
        on_new = after.iter().filter(|c| matches!(c.result, Ok(Some(e)) if is(new, Some(e)))).count();
    }
    // The open watch is not moved: it goes on with its ENI.
    let seen = watch.events().len();
    watch.wait_events(seen + 3, Duration::from_secs(10)).await?;
    ensure!(watch.eni() == watched, "the watch moved to {:?} while its ENI was up", watch.eni());

    let withdrawn = Instant::now();
    for eni in old {
        world.withdraw_eni(*eni).await?;
    }
    // Its ENI gone, kubectl's watch ends (kubectl get --watch exits when
    // the stream closes); started again, it lands on a new ENI.
    let (ended, how) = watch.wait_ended(Duration::from_secs(15)).await?;
    ensure!(ended >= withdrawn, "the watch ended before its ENI was withdrawn: {how}");
    let again = world.kubectl.watch()?;
    again.wait_events(3, Duration::from_secs(30)).await?;
    ensure!(is(new, again.eni()), "the new watch is on {:?}", again.eni());
    calls.wait_more(3, Duration::from_secs(60)).await?;
    let calls = calls.stop().await;
    ensure_no_failure(&calls)?;
    for eni in new {
        let address = format!("{eni}:443");
        let used = world.total("splice_proxy_upstream_connections_total", &[("address", &address)]).await?;
        ensure!(used >= 1.0, "no connection to {address} in the metrics");
    }
    eprintln!(
        "eni_rotation: {} kubectl calls, none failed; watch ended {:?} after the withdrawal ({how})",
        calls.len(),
        ended - withdrawn
    );
    Ok(())
}
