//! Scenario: basic (see main.rs).

use anyhow::{Context as _, Result, ensure};
use splice_proxy_tests::e2e::{World, kube_api::pod_name, topology::ENIS};

use crate::run;

#[test]
fn basic() -> Result<()> {
    run("basic", |w| Box::pin(basic_scenario(w)))
}

/// `kubectl version`, `kubectl get --raw /version` and `kubectl get pods`
/// through the whole path, on both proxy hosts, with the edge counters and
/// the data plane's bytes on the proxies to show the path was the proxies'.
async fn basic_scenario(world: &World) -> Result<()> {
    let kubectl = &world.kubectl;
    for _ in 0..2 {
        kubectl.version().await?;
        kubectl.raw_version().await?;
        let eni = kubectl.get_pods().await?;
        ensure!(
            ENIS[..2].iter().any(|e| std::net::IpAddr::V4(*e) == eni),
            "answered by {eni}, not a named ENI"
        );
    }
    let table = kubectl.run(&["get", "pods"]).await?;
    ensure!(
        table.contains(&pod_name(ENIS[0].into())) || table.contains(&pod_name(ENIS[1].into())),
        "{table}"
    );
    // Six calls or more, spread over both hosts by the forwarder.
    for (host, target) in world.forwarder.targets.iter().enumerate() {
        ensure!(target.flows() >= 2, "host {host} got {} flows", target.flows());
        let metrics = world.metrics(host).await?;
        let headers = metrics.count("splice_proxy_edge_proxy_headers_accepted_total", &[]);
        let hellos = metrics.count("splice_proxy_edge_client_hellos_accepted_total", &[]);
        ensure!(headers >= 2.0 && hellos >= 2.0, "host {host}: {headers} headers, {hellos} hellos");
        let completed = metrics.count("splice_proxy_connections_closed_total", &[("reason", "completed")]);
        ensure!(completed >= 2.0, "host {host}: {completed} completed connections");
        let up = metrics.count("splice_proxy_bytes_total", &[("direction", "client_to_upstream")]);
        ensure!(up > 1000.0, "host {host}: {up} bytes up");
        let closed =
            world.events(host).into_iter().find(|e| e["message"] == "connection closed").context("no log")?;
        ensure!(closed["span"]["vpce"] == splice_proxy_tests::e2e::VPCE_ALLOWED, "{closed}");
    }
    Ok(())
}
