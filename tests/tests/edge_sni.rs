//! The SNI check and routes, against the running proxy: a name allowed (the
//! upstream's own), a name routed to a second cluster, a name denied, no
//! server name, not TLS, a ClientHello split over several TCP segments
//! (which the upstream must get byte for byte), one never completed; then
//! the totals logged at exit.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use nix::sys::signal::Signal;
use splice_proxy_tests::{
    api::{ApiServer, Pki},
    dns::{Answer, DnsServer},
    edge::{client_hello, exchange_in_chunks, start_echo},
    process::{ProxyProcess, message, refusal_count},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const CLUSTER_A: &str = "a.example.test";
const CLUSTER_B: &str = "b.example.test";
const ECHO: &str = "echo.example.test";
const ENI_A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const ENI_B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
const ECHO_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4));

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_is_checked_and_routes_pick_the_cluster() -> Result<()> {
    let dns = DnsServer::start(Duration::from_secs(30)).await?;
    dns.set(CLUSTER_A, Answer::Addrs(vec![ENI_A]));
    dns.set(CLUSTER_B, Answer::Addrs(vec![ENI_B]));
    let (pki_a, pki_b) = (Pki::new(CLUSTER_A)?, Pki::new(CLUSTER_B)?);
    let (server_a, server_b) =
        (ApiServer::start(&pki_a, ENI_A, 0).await?, ApiServer::start(&pki_b, ENI_B, 0).await?);
    let echo = start_echo(ECHO_IP).await?;
    let upstream = format!("{CLUSTER_A}:{}", server_a.addr.port());
    let route_b = format!("{CLUSTER_B}={CLUSTER_B}:{}", server_b.addr.port());
    let route_echo = format!("{ECHO}={echo}");
    let dns_addr = dns.addr.to_string();
    let args = [
        "--upstream",
        &upstream,
        "--route",
        &route_b,
        "--route",
        &route_echo,
        "--dns-server",
        &dns_addr,
        "--client-hello-timeout",
        "1s",
    ];
    let mut proxy = tokio::task::block_in_place(|| ProxyProcess::start(&args))?;
    let via = proxy.addr();
    let mut expected = Vec::new();

    // The upstream's own name, and a routed name to the other cluster; both
    // clients verify their cluster's certificate through the proxy.
    ensure!(pki_a.client(CLUSTER_A)?.get_once(via, "/version").await? == ENI_A);
    expected.push(("completed", Some(CLUSTER_A)));
    ensure!(pki_b.client(CLUSTER_B)?.get_once(via, "/version").await? == ENI_B);
    expected.push(("completed", Some(CLUSTER_B)));
    proxy.wait_closed(2, Duration::from_secs(5)).await?;

    // Refused before any upstream connection: nothing comes back.
    let not_tls: &[u8] = b"GET /version HTTP/1.1\r\nhost: a.example.test\r\n\r\n";
    for (bytes, reason, sni) in [
        (client_hello("c.example.test")?, "sni_denied", Some("c.example.test")),
        (client_hello("127.0.0.1")?, "sni_missing", None),
        (not_tls.to_vec(), "not_tls", None),
    ] {
        let back = exchange_in_chunks(via, &[&bytes], Duration::ZERO).await?;
        ensure!(back.is_empty(), "{reason}: {} bytes came back", back.len());
        expected.push((reason, sni));
        proxy.wait_closed(expected.len(), Duration::from_secs(5)).await?;
    }

    // Split over six segments: the upstream gets the ClientHello byte for byte.
    let hello = client_hello(ECHO)?;
    let chunks: Vec<&[u8]> = hello.chunks(hello.len().div_ceil(6)).collect();
    let back = exchange_in_chunks(via, &chunks, Duration::from_millis(30)).await?;
    ensure!(back == hello, "the upstream got {} bytes, not the {}-byte ClientHello", back.len(), hello.len());
    expected.push(("completed", Some(ECHO)));
    proxy.wait_closed(expected.len(), Duration::from_secs(5)).await?;

    // Half a ClientHello, never finished: closed at the 1 s handshake timeout.
    let mut stalled = TcpStream::connect(via).await?;
    stalled.write_all(&hello[..hello.len() / 2]).await?;
    let started = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut [0u8; 16])).await?;
    let waited = started.elapsed();
    ensure!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );
    expected.push(("client_hello_timeout", None));

    let closed = proxy.wait_closed(expected.len(), Duration::from_secs(5)).await?;
    for (line, (reason, sni)) in closed.iter().zip(&expected) {
        ensure!(line["reason"] == *reason, "expected {reason}: {line}");
        ensure!(line["span"]["sni"].as_str() == *sni, "expected SNI {sni:?}: {line}");
    }
    ensure!(closed[1]["upstream"].as_str().is_some_and(|u| u.starts_with("127.0.0.3:")), "{}", closed[1]);

    proxy.signal(Signal::SIGTERM)?;
    proxy.wait_exit(Duration::from_secs(10)).await?;
    let totals =
        proxy.events().into_iter().find(|e| message(e) == "edge totals").context("no edge totals")?;
    for (field, n) in [("client_hellos_accepted", 5), ("proxy_headers_accepted", 0)] {
        ensure!(totals[field] == n, "{field}: {totals}");
    }
    for (reason, n) in [("sni_denied", 1), ("sni_missing", 1), ("not_tls", 1), ("client_hello_timeout", 1)] {
        ensure!(refusal_count(&totals, reason) == Some(n), "{reason}: {totals}");
    }
    Ok(())
}
