//! Scenario: load (see main.rs).

use std::time::Duration;

use anyhow::{Result, ensure};
use splice_proxy_tests::e2e::World;

use crate::run;

#[test]
fn load() -> Result<()> {
    run("load", |w| Box::pin(load_scenario(w)))
}

/// 1,000 kubectl-like TLS clients at once (each a connection with five
/// requests 300 ms apart, then the next) for 20 s (`--long`: 300 s): no
/// failed request, all 1,000 open at once, and once they are done (and,
/// on the packet plane, retired) the proxies hold no more descriptors and hardly more memory than after a
/// warm-up round.
async fn load_scenario(world: &World) -> Result<()> {
    use splice_proxy_tests::e2e::{PROXY_PORT, load, topology::ENDPOINT};
    let client = std::sync::Arc::new(world.pki.client(splice_proxy_tests::e2e::API_HOST)?);
    let endpoint = std::net::SocketAddr::from((ENDPOINT, PROXY_PORT));
    let shape = |seconds| load::Shape {
        clients: 1000,
        duration: Duration::from_secs(seconds),
        requests_per_connection: 5,
        pause: Duration::from_millis(300),
    };
    let warm = world.control.run(load::run(std::sync::Arc::clone(&client), endpoint, shape(5))).await?;
    ensure!(warm.failures == 0, "warm-up: {warm:?}");
    let idle = || async {
        for host in 0..2 {
            splice_proxy_tests::e2e::world::eventually(
                "the proxy idle",
                Duration::from_secs(30),
                || async move {
                    // On the packet plane, an ended connection's sockets
                    // are held a few seconds more (its flow lingers).
                    let metrics = world.metrics(host).await?;
                    let retiring = metrics.count("splice_proxy_packet_ended_total", &[])
                        - metrics.count("splice_proxy_packet_retired_total", &[]);
                    Ok(metrics.count("splice_proxy_connections_active", &[]) == 0.0 && retiring == 0.0)
                },
            )
            .await?;
        }
        anyhow::Ok([world.proxy_resources(0)?, world.proxy_resources(1)?])
    };
    let before = idle().await?;
    let seconds = if splice_proxy_tests::e2e::long() { 300 } else { 20 };
    let report = world.control.run(load::run(client, endpoint, shape(seconds))).await?;
    let after = idle().await?;
    eprintln!("load: {report:?}; proxies (fds, RSS KiB) before {before:?}, after {after:?}");
    ensure!(report.failures == 0, "{} failed connections: {:?}", report.failures, report.first_failures);
    ensure!(report.peak_open >= 1000, "only {} connections open at once", report.peak_open);
    ensure!(report.requests >= 5 * 1000, "only {} requests", report.requests);
    for host in 0..2 {
        let ((fds0, rss0), (fds1, rss1)) = (before[host], after[host]);
        ensure!(fds1 <= fds0, "host {host}: {fds0} descriptors before, {fds1} after");
        ensure!(rss1 <= rss0 + 16 * 1024, "host {host}: RSS {rss0} KiB before, {rss1} KiB after");
    }
    Ok(())
}
