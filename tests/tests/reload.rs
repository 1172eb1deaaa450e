//! SIGHUP reloads the configuration file without dropping a connection: a
//! valid file adds a listener and a route (a name refused before is then
//! served by its own upstream); an invalid one is rejected with the key
//! named and changes nothing; a file without the added listener closes it
//! while its open connection finishes; a changed data plane is named in the
//! log and kept. Connections with checksummed data
//! flowing stay open across all three and end byte-exact;
//! `config_reloads_total` counts successes and failures.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::sys::signal::Signal;
use serde_json::Value;
use splice_proxy_tests::{
    dns::{Answer, DnsServer},
    echo_stream::EchoStream,
    edge::{client_hello, exchange_in_chunks, start_echo},
    process::{ProxyProcess, message},
};

const CLUSTER_A: &str = "a.example.test";
const CLUSTER_B: &str = "b.example.test";
const ECHO_A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6));
const ECHO_B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7));
const WAIT: Duration = Duration::from_secs(10);

/// Events with this message so far.
fn events(proxy: &ProxyProcess, msg: &str) -> Vec<Value> {
    proxy.events().into_iter().filter(|e| message(e) == msg).collect()
}

/// Waits until there are `n` events with this message; returns the last.
async fn nth(proxy: &ProxyProcess, msg: &str, n: usize) -> Result<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(event) = events(proxy, msg).into_iter().nth(n - 1) {
            return Ok(event);
        }
        if Instant::now() > deadline {
            bail!("fewer than {n} {msg:?} events: {:?}", proxy.events());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A ClientHello for `name` and a few bytes; the echo when served, nothing when refused.
async fn once(proxy: SocketAddr, name: &str) -> Result<bool> {
    let mut sent = client_hello(name)?;
    sent.extend_from_slice(b"checksummed by comparison");
    let back = exchange_in_chunks(proxy, &[&sent], Duration::ZERO).await?;
    ensure!(
        back.is_empty() || back == sent,
        "{name}: {} bytes came back, not the {} sent",
        back.len(),
        sent.len()
    );
    Ok(!back.is_empty())
}

/// The upstream the first completed connection for `name` went to.
async fn upstream_of(proxy: &ProxyProcess, name: &str) -> Result<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let closed = proxy.closed_connections();
        let served = closed.iter().find(|c| c["span"]["sni"] == name && c["reason"] == "completed");
        if let Some(upstream) = served.and_then(|c| c["upstream"].as_str()) {
            return Ok(upstream.to_owned());
        }
        ensure!(Instant::now() < deadline, "no completed connection for {name}: {closed:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_valid_file_rejects_an_invalid_one_and_drops_no_connection() -> Result<()> {
    let dns = DnsServer::start(Duration::from_secs(30)).await?;
    dns.set(CLUSTER_A, Answer::Addrs(vec![ECHO_A]));
    dns.set(CLUSTER_B, Answer::Addrs(vec![ECHO_B]));
    let (echo_a, echo_b) = (start_echo(ECHO_A).await?, start_echo(ECHO_B).await?);
    let base = format!(
        "dataplane = \"splice\"\nlisten = [\"127.0.0.1:0\"]\nupstream = \"{CLUSTER_A}:{}\"\n\
         dns_servers = [\"{}\"]\ndns_max_ttl = \"0s\"\n",
        echo_a.port(),
        dns.addr
    );
    let route = format!("routes = {{ \"{CLUSTER_B}\" = \"{CLUSTER_B}:{}\" }}\n", echo_b.port());
    let added = "[[listeners]]\nlisten = \"127.0.0.1:0\"\nallowed_sni = [\"a.example.test\"]\nroutes = {}\n";
    let file = tempfile::NamedTempFile::new()?;
    let path = file.path().to_str().context("temp path")?.to_owned();
    let write = |text: &str| std::fs::write(&path, text);
    write(&base)?;
    let mut proxy = tokio::task::block_in_place(|| ProxyProcess::start(&["--config", &path]))?;
    let first = proxy.addr();

    ensure!(once(first, CLUSTER_A).await?, "{CLUSTER_A} not served at start");
    ensure!(!once(first, CLUSTER_B).await?, "{CLUSTER_B} served before its route");
    let open_a = EchoStream::start(first, CLUSTER_A, 1).await?;

    // Valid: a route for B and a second listener; a data plane, which only
    // a restart changes, is named and kept.
    let base_on_copy = base.replacen("dataplane = \"splice\"", "dataplane = \"copy\"", 1);
    write(&format!("{base_on_copy}{route}{added}"))?;
    proxy.signal(Signal::SIGHUP)?;
    let reloaded = nth(&proxy, "SIGHUP: configuration reloaded", 1).await?;
    let kept =
        nth(&proxy, "SIGHUP: changing this setting needs a restart; it keeps its running value", 1).await?;
    ensure!(kept["key"].as_str().is_some_and(|k| k.starts_with("dataplane")), "{kept}");
    ensure!(kept["running"].as_str().is_some_and(|v| v.starts_with("Splice {")), "{kept}");
    let second: SocketAddr = events(&proxy, "listening")
        .iter()
        .filter_map(|e| e["listen"].as_str()?.parse().ok())
        .find(|a| *a != first)
        .with_context(|| format!("no second listener: {reloaded}"))?;
    ensure!(once(first, CLUSTER_B).await?, "{CLUSTER_B} not served after its route was added");
    let upstream = upstream_of(&proxy, CLUSTER_B).await?;
    ensure!(upstream == echo_b.to_string(), "{CLUSTER_B} went to {upstream}, not {echo_b}");
    ensure!(once(second, CLUSTER_A).await?, "the added listener does not serve");
    ensure!(!once(second, CLUSTER_B).await?, "the added listener's own allow list is not applied");
    let open_second = EchoStream::start(second, CLUSTER_A, 2).await?;
    open_a.flowing().await?;
    open_second.flowing().await?;

    // Invalid: rejected with the key named; the route and listener stay.
    write(&format!("{base}{added}max_connections = 0\n"))?;
    proxy.signal(Signal::SIGHUP)?;
    let rejected =
        nth(&proxy, "SIGHUP: configuration rejected; the running configuration stays in force", 1).await?;
    ensure!(rejected["error"].as_str().unwrap_or_default().contains("`max_connections`"), "{rejected}");
    ensure!(once(first, CLUSTER_B).await?, "the route went with the rejected file");
    ensure!(once(second, CLUSTER_A).await?, "the added listener went with the rejected file");
    open_a.flowing().await?;
    open_second.flowing().await?;

    // Valid again, without the route and the second listener: it closes,
    // its open connection goes on.
    write(&base)?;
    proxy.signal(Signal::SIGHUP)?;
    nth(&proxy, "SIGHUP: configuration reloaded", 2).await?;
    ensure!(!once(first, CLUSTER_B).await?, "{CLUSTER_B} still served after its route was removed");
    nth(&proxy, "listener closed", 1).await?;
    let deadline = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(second).await.is_ok() {
        ensure!(Instant::now() < deadline, "the removed listener {second} still accepts");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    open_a.flowing().await?;
    open_second.flowing().await?;
    let metrics = proxy.metrics().await?;
    ensure!(
        metrics.count("splice_proxy_dataplane_info", &[("plane", "splice")]) == 1.0,
        "the data plane changed"
    );
    for (result, n) in [("success", 2.0), ("failure", 1.0)] {
        let got = metrics.count("splice_proxy_config_reloads_total", &[("result", result)]);
        ensure!(got == n, "config_reloads_total{{result={result}}} is {got}, not {n}");
    }
    ensure!(!open_a.is_finished() && !open_second.is_finished(), "an open connection ended early");
    open_a.finish().await.context("the connection open across every reload")?;
    open_second.finish().await.context("the connection on the removed listener")?;
    proxy.signal(Signal::SIGTERM)?;
    proxy.wait_exit(WAIT).await?;
    let completed = proxy.closed_connections().iter().filter(|c| c["reason"] == "completed").count();
    ensure!(completed == 7, "{completed} connections completed, not 7: {:?}", proxy.closed_connections());
    Ok(())
}
