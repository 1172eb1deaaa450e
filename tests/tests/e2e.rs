//! End to end (issue 14): kubectl in `control` → WireGuard → the VPC
//! endpoint + NLB stand-in in `proxyacct` (PROXY v2 with the endpoint's
//! TLV) → the built splice-proxy on `asg-a` and `asg-b` with the deployed
//! configuration → fake API servers on the ENIs in `eks`, named by DNS.
//! Each scenario builds its own world (testkit::e2e::World) and tears it
//! down; on failure it prints the proxies' logs and metrics. The scenarios
//! run one at a time. `cargo xtask e2e` runs them (`--long` for the soak).

use std::{
    future::Future,
    pin::Pin,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use testkit::e2e::{World, kube_api::pod_name, kubectl::ensure_no_failure, topology::ENIS};

type Scenario = for<'a> fn(&'a World) -> Pin<Box<dyn Future<Output = Result<()>> + 'a>>;

/// Builds the world, runs `scenario`, prints the report on failure, tears
/// everything down (also when building failed half way).
fn run(name: &str, scenario: Scenario) -> Result<()> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    testkit::netns::require_root("the end-to-end suite")?;
    testkit::raise_fd_limit()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let started = Instant::now();
    let (world, result) = runtime.block_on(async {
        let world = match World::build(name).await {
            Ok(world) => world,
            Err(error) => return (None, Err(error.context(format!("building the world for {name}")))),
        };
        let result = scenario(&world).await;
        if let Err(error) = &result {
            eprintln!("{}\nerror: {error:#}", world.report().await);
        }
        (Some(world), result)
    });
    drop(world);
    runtime.shutdown_timeout(Duration::from_secs(5));
    eprintln!("scenario {name}: {:.1} s", started.elapsed().as_secs_f64());
    result
}

// ---- basic ----

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
        ensure!(closed["span"]["vpce"] == testkit::e2e::VPCE_ALLOWED, "{closed}");
    }
    Ok(())
}

// ---- ENI rotation ----

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
    let settled = moved + testkit::e2e::world::DNS_TTL + Duration::from_secs(1);
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

// ---- scale-in ----

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
    testkit::e2e::world::eventually("/readyz 503 after SIGTERM", Duration::from_secs(1), || async {
        Ok(world.admin_get(0, "/readyz").await?.0 == 503)
    })
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
async fn watches_on_both_hosts(world: &World) -> Result<Vec<testkit::e2e::kubectl::Watch>> {
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
    let config = testkit::e2e::world::deployed_config()?;
    let line =
        config.lines().find(|l| l.starts_with(&format!("{key} ="))).with_context(|| format!("no {key}"))?;
    let value = line.split('"').nth(1).with_context(|| line.to_owned())?;
    let seconds: u64 = value.strip_suffix('s').context("seconds")?.parse()?;
    Ok(Duration::from_secs(seconds))
}

// ---- bad input at the front ----

#[test]
fn bad_input() -> Result<()> {
    run("bad_input", |w| Box::pin(bad_input_scenario(w)))
}

/// While kubectl calls and 50 load clients go on: TLS clients through
/// another consumer's endpoint (its header names a VPC endpoint not
/// allowed), plain-HTTP clients, and slowloris clients that never finish
/// their ClientHello. Each bad one is closed without a byte of answer (the
/// slowloris at the deployed `client_hello_timeout`, 10 s) and counted by
/// reason in the proxies' metrics; the good traffic sees no failure.
async fn bad_input_scenario(world: &World) -> Result<()> {
    use testkit::e2e::{OTHER_ENDPOINT_PORT, PROXY_PORT, load, topology::ENDPOINT};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const WRONG_VPCE: usize = 6;
    const NOT_TLS: usize = 6;
    const SLOWLORIS: usize = 4;
    let calls = world.kubectl.call_loop();
    let client = std::sync::Arc::new(world.pki.client(testkit::e2e::API_HOST)?);
    let shape = load::Shape {
        clients: 50,
        duration: Duration::from_secs(20),
        requests_per_connection: 3,
        pause: Duration::from_millis(200),
    };
    let good =
        world.control.spawn(load::run(std::sync::Arc::clone(&client), (ENDPOINT, PROXY_PORT).into(), shape));

    // Another endpoint's consumer with a valid TLS client.
    let other = std::net::SocketAddr::from((ENDPOINT, OTHER_ENDPOINT_PORT));
    for _ in 0..WRONG_VPCE {
        let client = std::sync::Arc::clone(&client);
        let refused = world.control.run(async move { client.get_once(other, "/version").await }).await?;
        ensure!(refused.is_err(), "a client of the other endpoint was served: {refused:?}");
    }
    // Not TLS, and slowloris: each gets nothing back and is closed.
    let endpoint = std::net::SocketAddr::from((ENDPOINT, PROXY_PORT));
    let mut bad = Vec::new();
    for n in 0..NOT_TLS + SLOWLORIS {
        bad.push(world.control.spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(endpoint).await?;
            let started = Instant::now();
            if n < NOT_TLS {
                stream.write_all(b"GET /api HTTP/1.1\r\nhost: api\r\n\r\n").await?;
            } else {
                let hello = testkit::edge::client_hello(testkit::e2e::API_HOST)?;
                stream.write_all(&hello[..10]).await?;
                for byte in &hello[10..hello.len() - 1] {
                    let mut one = [0u8; 1];
                    tokio::select! {
                        read = stream.read(&mut one) => { read?; break }
                        () = tokio::time::sleep(Duration::from_millis(1500)) => {}
                    }
                    if stream.write_all(std::slice::from_ref(byte)).await.is_err() {
                        break;
                    }
                }
            }
            let mut back = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut back)).await;
            anyhow::Ok((n < NOT_TLS, read.is_ok(), back.len(), started.elapsed()))
        }));
    }
    for handle in bad {
        let (plain, closed, answered, after) = handle.await??;
        ensure!(closed && answered == 0, "a bad client got {answered} bytes back (closed: {closed})");
        if !plain {
            ensure!(
                after >= Duration::from_secs(9) && after < Duration::from_secs(20),
                "slowloris closed after {after:?}"
            );
        }
    }
    let report = good.await?;
    let calls = calls.stop().await;
    ensure_no_failure(&calls)?;
    ensure!(report.failures == 0 && report.requests > 0, "good load clients failed: {report:?}");
    let refusals = |reason: &'static str| async move {
        world.total("splice_proxy_edge_refusals_total", &[("reason", reason)]).await
    };
    ensure!(
        refusals("vpce_denied").await? == WRONG_VPCE as f64,
        "vpce_denied: {}",
        refusals("vpce_denied").await?
    );
    ensure!(refusals("not_tls").await? == NOT_TLS as f64, "not_tls: {}", refusals("not_tls").await?);
    let timeouts = refusals("client_hello_timeout").await?;
    ensure!(timeouts == SLOWLORIS as f64, "client_hello_timeout: {timeouts}");
    eprintln!(
        "bad_input: every bad client refused and counted; {} calls and {} load requests fine",
        calls.len(),
        report.requests
    );
    Ok(())
}

// ---- faults ----

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
    for _ in 0..4 {
        if kubectl.get_pods().await.is_err() {
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
    while kubectl.get_pods().await.is_err() {
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
    let watches = watches_on_both_hosts(world).await?;
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

// ---- load ----

#[test]
fn load() -> Result<()> {
    run("load", |w| Box::pin(load_scenario(w)))
}

/// 1,000 kubectl-like TLS clients at once (each a connection with five
/// requests 300 ms apart, then the next) for 20 s (`--long`: 300 s): no
/// failed request, all 1,000 open at once, and once they are done the
/// proxies hold no more descriptors and hardly more memory than after a
/// warm-up round.
async fn load_scenario(world: &World) -> Result<()> {
    use testkit::e2e::{PROXY_PORT, load, topology::ENDPOINT};
    let client = std::sync::Arc::new(world.pki.client(testkit::e2e::API_HOST)?);
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
            testkit::e2e::world::eventually("the proxy idle", Duration::from_secs(30), || async move {
                Ok(world.metrics(host).await?.count("splice_proxy_connections_active", &[]) == 0.0)
            })
            .await?;
        }
        anyhow::Ok([world.proxy_resources(0)?, world.proxy_resources(1)?])
    };
    let before = idle().await?;
    let seconds = if testkit::e2e::long() { 300 } else { 20 };
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
