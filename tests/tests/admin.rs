//! The admin endpoint of the running proxy: metrics after known traffic
//! (parsed from the exposition text) on every data plane, the open
//! connections listing, readiness with the TCP health-check port (not ready
//! while the upstream does not resolve; false on SIGTERM before any listener
//! closes), and a second SIGTERM ending the drain delay.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use nix::sys::signal::Signal;
use splice_proxy_tests::{
    dns::{Answer, DnsServer},
    edge::{client_hello, start_echoes_on_common_port},
    process::{ProxyProcess, message},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// The upstream's name: its ClientHello is allowed by default.
const NAME: &str = "echo.example.test";
const ENI_A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4));
const ENI_B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5));
const WAIT: Duration = Duration::from_secs(10);

struct Setup {
    dns: DnsServer,
    port: u16,
    proxy: ProxyProcess,
}

async fn setup(answer: Answer, extra: &[&str]) -> Result<Setup> {
    let dns = DnsServer::start(Duration::from_secs(30)).await?;
    dns.set(NAME, answer);
    let port = start_echoes_on_common_port(&[ENI_A, ENI_B]).await?;
    let upstream = format!("{NAME}:{port}");
    let dns_addr = dns.addr.to_string();
    let mut args = vec!["--upstream", &upstream, "--dns-server", &dns_addr, "--dns-max-ttl", "0"];
    args.extend_from_slice(extra);
    let proxy = tokio::task::block_in_place(|| ProxyProcess::start(&args))?;
    Ok(Setup { dns, port, proxy })
}

/// The ClientHello for [`NAME`], then `len` bytes; reads the whole echo
/// before half-closing (so the connection is set up on every plane before
/// any FIN), then reads to the end. Returns the bytes sent each way.
async fn echo_exchange(proxy: SocketAddr, len: usize) -> Result<u64> {
    let mut sent = client_hello(NAME)?;
    sent.extend((0..len).map(|i| (i % 251) as u8));
    let mut stream = TcpStream::connect(proxy).await?;
    let exchange = async {
        let (mut read, mut write) = stream.split();
        let mut back = vec![0u8; sent.len()];
        let (written, echoed) = tokio::join!(write.write_all(&sent), read.read_exact(&mut back));
        written?;
        echoed?;
        ensure!(back == sent, "the echo differs from the {} bytes sent", sent.len());
        write.shutdown().await?;
        let mut rest = Vec::new();
        read.read_to_end(&mut rest).await?;
        ensure!(rest.is_empty(), "{} bytes more than sent came back", rest.len());
        Ok(())
    };
    tokio::time::timeout(WAIT, exchange).await.context("the echo never ended")??;
    Ok(sent.len() as u64)
}

/// A metric, its labels, its value.
type Expected<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// Polls `check` until it holds (or [`WAIT`] passes).
async fn eventually<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if check().await? {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn readyz(proxy: &ProxyProcess) -> Result<(u16, String)> {
    proxy.admin_get("/readyz").await
}

/// Whether a TCP connect to `addr` completes (a refused one is a reset).
async fn accepts(addr: SocketAddr) -> bool {
    matches!(tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await, Ok(Ok(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_hold_the_traffic_on_every_plane() -> Result<()> {
    for plane in ["splice", "copy", "sockmap"] {
        metrics_after_known_traffic(plane).await.with_context(|| format!("--dataplane {plane}"))?;
    }
    Ok(())
}

async fn metrics_after_known_traffic(plane: &str) -> Result<()> {
    let mut s = setup(Answer::Addrs(vec![ENI_A]), &["--dataplane", plane]).await?;
    let via = s.proxy.addr();
    let mut sent = 0;
    for len in [1_000, 70_000] {
        sent += echo_exchange(via, len).await?;
    }
    // The ENI moves: the next connections go to the other address.
    s.dns.set(NAME, Answer::Addrs(vec![ENI_B]));
    for len in [1, 300_000] {
        sent += echo_exchange(via, len).await?;
    }
    // A name not allowed: refused by the edge guard, no upstream connection.
    let mut denied = TcpStream::connect(via).await?;
    denied.write_all(&client_hello("other.example.test")?).await?;
    let mut nothing = Vec::new();
    tokio::time::timeout(WAIT, denied.read_to_end(&mut nothing)).await??;
    ensure!(nothing.is_empty());
    drop(denied);
    s.proxy.wait_closed(5, WAIT).await?;
    // A refused connection stays open until its client closes too (or 1 s).
    eventually("no connection open", || async {
        Ok(s.proxy.metrics().await?.value("splice_proxy_connections_active", &[]) == Some(0.0))
    })
    .await?;

    let m = s.proxy.metrics().await?;
    let listen = via.to_string();
    let (a, b) = (SocketAddr::new(ENI_A, s.port).to_string(), SocketAddr::new(ENI_B, s.port).to_string());
    let expected: [Expected; 17] = [
        ("splice_proxy_connections_accepted_total", &[("listen", &listen)], 5.0),
        ("splice_proxy_connections_closed_total", &[("reason", "completed")], 4.0),
        ("splice_proxy_connections_closed_total", &[("reason", "sni_denied")], 1.0),
        ("splice_proxy_connections_active", &[], 0.0),
        ("splice_proxy_bytes_total", &[("direction", "client_to_upstream")], sent as f64),
        ("splice_proxy_bytes_total", &[("direction", "upstream_to_client")], sent as f64),
        ("splice_proxy_resolve_duration_seconds_count", &[], 4.0),
        ("splice_proxy_resolve_duration_seconds_bucket", &[("le", "+Inf")], 4.0),
        ("splice_proxy_connect_duration_seconds_count", &[], 4.0),
        ("splice_proxy_upstream_connections_total", &[("address", &a)], 2.0),
        ("splice_proxy_upstream_connections_total", &[("address", &b)], 2.0),
        ("splice_proxy_upstream_addresses_seen", &[], 2.0),
        ("splice_proxy_edge_refusals_total", &[("reason", "sni_denied")], 1.0),
        ("splice_proxy_edge_client_hellos_accepted_total", &[], 5.0),
        ("splice_proxy_dataplane_info", &[("plane", plane)], 1.0),
        ("splice_proxy_draining", &[], 0.0),
        ("splice_proxy_ready", &[], 1.0),
    ];
    for (name, labels, value) in expected {
        ensure!(
            m.value(name, labels) == Some(value),
            "{name}{labels:?}: {:?}, not {value}",
            m.value(name, labels)
        );
    }
    ensure!(m.all("splice_proxy_resolve_failures_total").count() == 0, "a lookup failed");
    ensure!(m.all("splice_proxy_connect_failures_total").count() == 0, "a connect failed");
    ensure!(m.types["splice_proxy_connect_duration_seconds"] == "histogram");
    // Buckets are cumulative and end at the count.
    let buckets: Vec<f64> = m.all("splice_proxy_connect_duration_seconds_bucket").map(|s| s.value).collect();
    ensure!(buckets.windows(2).all(|w| w[0] <= w[1]) && buckets.last() == Some(&4.0), "{buckets:?}");
    ensure!(m.count("splice_proxy_upstream_probes_total", &[("result", "ok")]) >= 1.0);
    // The access log and the counters agree.
    let logged: u64 = s.proxy.closed_connections().iter().filter_map(|c| c["bytes_up"].as_u64()).sum();
    ensure!(logged == sent, "access log: {logged} bytes up, sent {sent}");
    if plane == "sockmap" {
        ensure!(m.count("splice_proxy_kernel_bytes_total", &[]) > 0.0, "no byte went through the kernel");
        ensure!(m.value("splice_proxy_sockmap_spliced_total", &[]) == Some(4.0), "not spliced in the kernel");
    }
    s.proxy.signal(Signal::SIGTERM)?;
    ensure!(s.proxy.wait_exit(WAIT).await?.code() == Some(0));
    Ok(())
}

/// On every plane: byte counts are live (on sockmap, the kernel's share is
/// read from its flows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_connections_lists_an_open_connection_on_every_plane() -> Result<()> {
    for plane in ["sockmap", "splice", "copy"] {
        debug_connections_with(plane).await.with_context(|| format!("--dataplane {plane}"))?;
    }
    Ok(())
}

async fn debug_connections_with(plane: &str) -> Result<()> {
    let s = setup(Answer::Addrs(vec![ENI_A]), &["--dataplane", plane]).await?;
    let (status, body) = s.proxy.admin_get("/healthz").await?;
    ensure!(status == 200 && body == "ok\n", "/healthz: {status} {body:?}");
    ensure!(s.proxy.admin_get("/nothing").await?.0 == 404);

    let mut stream = TcpStream::connect(s.proxy.addr()).await?;
    let mut sent = client_hello(NAME)?;
    sent.extend([7u8; 1000]);
    stream.write_all(&sent).await?;
    let mut back = vec![0u8; sent.len()];
    tokio::time::timeout(WAIT, stream.read_exact(&mut back)).await??;
    ensure!(back == sent);

    // The client can read the echo before the proxy task that wrote it has
    // added the bytes to its counter, so wait for the counters to catch up.
    let total = sent.len() as u64;
    let deadline = Instant::now() + WAIT;
    let list = loop {
        let (status, body) = s.proxy.admin_get("/debug/connections").await?;
        ensure!(status == 200, "{status}: {body}");
        let list: serde_json::Value = serde_json::from_str(&body)?;
        let c = &list["connections"][0];
        if c["bytes_up"].as_u64() == Some(total) && c["bytes_down"].as_u64() == Some(total) {
            break list;
        }
        ensure!(Instant::now() < deadline, "byte counts not at {total} within {WAIT:?}: {list}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ensure!(list["open"] == 1 && list["listed"] == 1, "{list}");
    let c = &list["connections"][0];
    let expected = [
        ("stage", serde_json::json!("forwarding")),
        ("client", serde_json::json!(stream.local_addr()?.to_string())),
        ("peer", serde_json::json!(stream.local_addr()?.to_string())),
        ("listen", serde_json::json!(s.proxy.addr().to_string())),
        ("sni", serde_json::json!(NAME)),
        ("target", serde_json::json!(format!("{NAME}:{}", s.port))),
        ("upstream", serde_json::json!(SocketAddr::new(ENI_A, s.port).to_string())),
        ("bytes_up", serde_json::json!(sent.len())),
        ("bytes_down", serde_json::json!(sent.len())),
    ];
    for (field, value) in expected {
        ensure!(c[field] == value, "{field}: {} is not {value}", c[field]);
    }
    ensure!(c["age_seconds"].as_f64().is_some_and(|age| age >= 0.0), "{c}");
    ensure!(s.proxy.metrics().await?.value("splice_proxy_connections_active", &[]) == Some(1.0));

    drop(stream);
    eventually("the closed connection leaves the list", || async {
        let (_, body) = s.proxy.admin_get("/debug/connections").await?;
        Ok(serde_json::from_str::<serde_json::Value>(&body)?["open"] == 0)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_while_the_upstream_does_not_resolve() -> Result<()> {
    let args = ["--health-listen", "127.0.0.1:0", "--probe-interval", "300ms"];
    let s = setup(Answer::NxDomain, &args).await?;
    let health = s.proxy.health.context("no health-check port logged")?;
    let (status, body) = readyz(&s.proxy).await?;
    ensure!(status == 503 && body.contains("no successful resolution"), "{status}: {body}");
    ensure!(!accepts(health).await, "the health-check port accepts while not ready");
    eventually("a failed probe is counted", || async {
        Ok(s.proxy
            .metrics()
            .await?
            .count("splice_proxy_upstream_probes_total", &[("result", "resolve_failed")])
            >= 1.0)
    })
    .await?;
    ensure!(s.proxy.metrics().await?.value("splice_proxy_ready", &[]) == Some(0.0));

    // The name appears: the probe alone makes the proxy ready, no client needed.
    s.dns.set(NAME, Answer::Addrs(vec![ENI_A]));
    eventually("ready once the name resolves", || async { Ok(readyz(&s.proxy).await?.0 == 200) }).await?;
    eventually("the health-check port opens", || async { Ok(accepts(health).await) }).await?;
    ensure!(
        s.proxy
            .metrics()
            .await?
            .value("splice_proxy_upstream_ready", &[("target", &format!("{NAME}:{}", s.port))])
            == Some(1.0)
    );

    // An outage: not ready once the last success is older than the window (3 probe intervals).
    s.dns.set(NAME, Answer::NxDomain);
    eventually("not ready after the outage", || async { Ok(readyz(&s.proxy).await?.0 == 503) }).await?;
    eventually("the health-check port closes", || async { Ok(!accepts(health).await) }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_turns_false_on_sigterm_before_any_listener_closes() -> Result<()> {
    let args = ["--health-listen", "127.0.0.1:0", "--drain-delay", "3s", "--drain-timeout", "10s"];
    let mut s = setup(Answer::Addrs(vec![ENI_A]), &args).await?;
    let (via, health) = (s.proxy.addr(), s.proxy.health.context("no health-check port logged")?);
    eventually("ready after start-up", || async { Ok(readyz(&s.proxy).await?.0 == 200) }).await?;
    eventually("the health-check port opens", || async { Ok(accepts(health).await) }).await?;
    // A connection open before the signal.
    let mut open = TcpStream::connect(via).await?;
    let hello = client_hello(NAME)?;
    open.write_all(&hello).await?;
    let mut back = vec![0u8; hello.len()];
    open.read_exact(&mut back).await?;

    let signalled = Instant::now();
    s.proxy.signal(Signal::SIGTERM)?;
    eventually("/readyz answers 503", || async { Ok(readyz(&s.proxy).await?.0 == 503) }).await?;
    // The port is closed by its own task once the drain starts, a moment
    // after /readyz turns: soon, and long before the drain delay ends.
    eventually("the health-check port closes on SIGTERM", || async { Ok(!accepts(health).await) }).await?;
    let m = s.proxy.metrics().await?;
    ensure!(
        m.value("splice_proxy_draining", &[]) == Some(1.0) && m.value("splice_proxy_ready", &[]) == Some(0.0)
    );
    // Not ready, yet the listener still accepts and serves new connections.
    echo_exchange(via, 10_000).await.context("a new connection during the drain delay")?;
    ensure!(s.proxy.events().iter().all(|e| message(e) != "listener closed"), "a listener closed early");

    eventually("the listener closes after the drain delay", || async { Ok(!accepts(via).await) }).await?;
    let closed_after = signalled.elapsed();
    ensure!(closed_after >= Duration::from_secs(3), "the listener closed {closed_after:?} after SIGTERM");
    // The connection opened before the signal goes on during the drain.
    open.write_all(b"still here").await?;
    let mut still = [0u8; 10];
    open.read_exact(&mut still).await?;
    ensure!(&still == b"still here");
    drop(open);
    ensure!(s.proxy.wait_exit(WAIT).await?.code() == Some(0));

    let order: Vec<String> = s.proxy.events().iter().map(|e| message(e).to_owned()).collect();
    let at = |msg: &str| order.iter().position(|m| m == msg).with_context(|| format!("no {msg:?} logged"));
    ensure!(at("health-check port closed: draining")? < at("listener closed")?);
    ensure!(s.proxy.events().iter().any(|e| message(e) == "drained: every connection finished"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_the_drain_delay() -> Result<()> {
    let mut s = setup(Answer::Addrs(vec![ENI_A]), &["--drain-delay", "60s"]).await?;
    s.proxy.signal(Signal::SIGTERM)?;
    let not_ready =
        "SIGTERM: not ready; still accepting until the drain delay is over, then the listeners close";
    s.proxy.wait_message(not_ready, WAIT).await?;
    ensure!(accepts(s.proxy.addr()).await, "the listener closed at the first SIGTERM");
    let second = Instant::now();
    s.proxy.signal(Signal::SIGTERM)?;
    ensure!(s.proxy.wait_exit(WAIT).await?.code() == Some(0));
    ensure!(second.elapsed() < Duration::from_secs(5), "exit took {:?}", second.elapsed());
    s.proxy.wait_message("second SIGTERM: the drain delay ends now", Duration::ZERO).await.map(drop)
}
