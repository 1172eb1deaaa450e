//! The proxy path end to end with real sockets and real DNS: the proxy binary,
//! a DNS server whose answer the test changes, and TLS API servers on
//! 127.0.0.2 and 127.0.0.3 whose certificate the client verifies.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::Result;
use nix::sys::signal::Signal;
use splice_proxy_tests::{
    API_HOSTNAME,
    api::{self, ApiClient, ApiServer, Pki},
    dns::{Answer, DnsServer},
    process::{ProxyProcess, message},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const ENI_A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const ENI_B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
/// Nothing listens here: connecting is refused.
const DEAD_ENI: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9));

struct Setup {
    dns: DnsServer,
    enis: Vec<ApiServer>,
    client: ApiClient,
    proxy: ProxyProcess,
}

async fn setup(initial: Answer, extra_args: &[&str]) -> Result<Setup> {
    let dns = DnsServer::start(Duration::from_secs(30)).await?;
    dns.set(API_HOSTNAME, initial);
    let pki = Pki::new(API_HOSTNAME)?;
    let enis = api::start_on_common_port(&pki, &[ENI_A, ENI_B]).await?;
    let upstream = format!("{API_HOSTNAME}:{}", enis[0].addr.port());
    let dns_server = dns.addr.to_string();
    let mut args = vec!["--upstream", &upstream, "--dns-server", &dns_server, "--connect-timeout", "1s"];
    args.extend_from_slice(extra_args);
    let proxy = tokio::task::block_in_place(|| ProxyProcess::start(&args))?;
    Ok(Setup { dns, enis, client: pki.client(API_HOSTNAME)?, proxy })
}

/// Connects, sends a ClientHello for the API name, and returns what the read
/// saw: `Ok(0)` is a clean close (FIN), an error is a reset.
async fn read_after_send(proxy: std::net::SocketAddr) -> std::io::Result<usize> {
    let hello = splice_proxy_tests::edge::client_hello(API_HOSTNAME).expect("a ClientHello");
    let mut stream = TcpStream::connect(proxy).await?;
    stream.write_all(&hello).await?;
    let mut buf = [0u8; 64];
    tokio::time::timeout(Duration::from_secs(15), stream.read(&mut buf))
        .await
        .expect("the proxy never closed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_passes_through_and_the_client_verifies_the_api_certificate() -> Result<()> {
    let s = setup(Answer::Addrs(vec![ENI_A]), &[]).await?;
    assert_eq!(s.client.get_once(s.proxy.addr(), "/version").await?, ENI_A);
    let closed = s.proxy.wait_closed(1, Duration::from_secs(5)).await?;
    assert_eq!(closed[0]["reason"], "completed");
    assert_eq!(closed[0]["upstream"], s.enis[0].addr.to_string());
    assert!(closed[0]["bytes_up"].as_u64() > Some(200), "a ClientHello went up: {:?}", closed[0]);
    assert!(closed[0]["bytes_down"].as_u64() > Some(200), "a certificate came down: {:?}", closed[0]);
    assert!(closed[0]["span"]["client"].as_str().is_some_and(|c| c.starts_with("127.0.0.1:")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eni_rotation_moves_new_connections_and_keeps_old_ones() -> Result<()> {
    let s = setup(Answer::Addrs(vec![ENI_A]), &["--dns-max-ttl", "1s"]).await?;
    let mut old = s.client.connect(s.proxy.addr()).await?;
    assert_eq!(old.get("/version").await?, ENI_A);

    s.dns.set(API_HOSTNAME, Answer::Addrs(vec![ENI_B]));
    let rotated = Instant::now();
    loop {
        if s.client.get_once(s.proxy.addr(), "/version").await? == ENI_B {
            break;
        }
        assert!(rotated.elapsed() < Duration::from_secs(3), "still on the old ENI 3 s after a 1 s TTL cap");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..5 {
        assert_eq!(s.client.get_once(s.proxy.addr(), "/version").await?, ENI_B);
    }
    // The connection opened before the rotation still talks to its ENI.
    assert_eq!(old.get("/api/v1/pods").await?, ENI_A);

    // The old ENI goes away: only the old connection ends.
    let mut enis = s.enis.into_iter();
    enis.next().expect("ENI A").stop().await;
    assert!(old.get("/version").await.is_err(), "the old connection outlived its ENI");
    for _ in 0..5 {
        assert_eq!(s.client.get_once(s.proxy.addr(), "/version").await?, ENI_B);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ttl_zero_resolves_for_every_connection() -> Result<()> {
    let s = setup(Answer::Addrs(vec![ENI_A]), &["--dns-max-ttl", "0"]).await?;
    s.client.get_once(s.proxy.addr(), "/version").await?;
    let before = s.dns.queries();
    for _ in 0..5 {
        s.client.get_once(s.proxy.addr(), "/version").await?;
    }
    // A and AAAA per connection, none served from a cache.
    assert!(s.dns.queries() - before >= 10, "{} queries for 5 connections", s.dns.queries() - before);
    Ok(())
}

/// With answers reusable (the default 5 s), connections after the first ask
/// nothing, though the name has no AAAA records and the server's empty
/// answer carries no SOA (hickory alone asked AAAA for every connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_reused_within_max_ttl() -> Result<()> {
    let s = setup(Answer::Addrs(vec![ENI_A]), &[]).await?;
    s.client.get_once(s.proxy.addr(), "/version").await?;
    let before = s.dns.queries();
    for _ in 0..5 {
        s.client.get_once(s.proxy.addr(), "/version").await?;
    }
    // At most one refresh (A and AAAA) should the 5 s end meanwhile on a slow machine.
    let queries = s.dns.queries() - before;
    assert!(queries <= 2, "{queries} queries for 5 connections within the default max TTL");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_address_among_several_fails_no_connection() -> Result<()> {
    let s = setup(Answer::Addrs(vec![DEAD_ENI, ENI_A, ENI_B]), &[]).await?;
    let mut seen = Vec::new();
    for _ in 0..12 {
        seen.push(s.client.get_once(s.proxy.addr(), "/version").await?);
    }
    assert!(seen.contains(&ENI_A) && seen.contains(&ENI_B), "connections not spread: {seen:?}");
    let closed = s.proxy.wait_closed(12, Duration::from_secs(5)).await?;
    assert!(closed.iter().all(|c| c["reason"] == "completed"), "{closed:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolution_failures_close_cleanly_and_the_proxy_recovers() -> Result<()> {
    let s = setup(Answer::NxDomain, &["--dns-max-ttl", "0", "--dns-timeout", "500ms"]).await?;
    for answer in [Answer::NxDomain, Answer::ServFail, Answer::Silent] {
        s.dns.set(API_HOSTNAME, answer.clone());
        let read = read_after_send(s.proxy.addr()).await;
        assert!(matches!(read, Ok(0)), "{answer:?}: client saw {read:?}, not a clean close");
    }
    let closed = s.proxy.wait_closed(3, Duration::from_secs(5)).await?;
    assert!(closed.iter().all(|c| c["reason"] == "resolve_failed"), "{closed:?}");
    assert!(closed[0]["error"].as_str().is_some_and(|e| e.contains("NXDOMAIN")), "{closed:?}");
    assert!(closed.iter().all(|c| c["span"]["client"].is_string()), "client address missing: {closed:?}");

    s.dns.set(API_HOSTNAME, Answer::Addrs(vec![ENI_A]));
    assert_eq!(s.client.get_once(s.proxy.addr(), "/version").await?, ENI_A);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connects_close_cleanly_and_the_proxy_recovers() -> Result<()> {
    let s = setup(Answer::Addrs(vec![DEAD_ENI]), &["--dns-max-ttl", "0"]).await?;
    let read = read_after_send(s.proxy.addr()).await;
    assert!(matches!(read, Ok(0)), "client saw {read:?}, not a clean close");
    let closed = s.proxy.wait_closed(1, Duration::from_secs(5)).await?;
    assert_eq!(closed[0]["reason"], "connect_failed");
    assert!(closed[0]["error"].as_str().is_some_and(|e| e.contains("127.0.0.9")), "{closed:?}");

    s.dns.set(API_HOSTNAME, Answer::Addrs(vec![ENI_B]));
    assert_eq!(s.client.get_once(s.proxy.addr(), "/version").await?, ENI_B);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_connections_then_exits_zero() -> Result<()> {
    let mut s = setup(Answer::Addrs(vec![ENI_A]), &["--drain-timeout", "20s"]).await?;
    let mut open = s.client.connect(s.proxy.addr()).await?;
    assert_eq!(open.get("/version").await?, ENI_A);

    s.proxy.signal(Signal::SIGTERM)?;
    s.proxy.wait_message("SIGTERM: draining", Duration::from_secs(5)).await?;
    assert!(TcpStream::connect(s.proxy.addr()).await.is_err(), "still accepting during the drain");
    // The open connection goes on during the drain.
    assert_eq!(open.get("/api/v1/namespaces").await?, ENI_A);
    drop(open);

    let status = s.proxy.wait_exit(Duration::from_secs(10)).await?;
    assert_eq!(status.code(), Some(0));
    assert!(s.proxy.events().iter().any(|e| message(e) == "drained: every connection finished"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cuts_connections_left_at_the_drain_timeout() -> Result<()> {
    let mut s = setup(Answer::Addrs(vec![ENI_A]), &["--drain-timeout", "1s"]).await?;
    let mut open = s.client.connect(s.proxy.addr()).await?;
    assert_eq!(open.get("/version").await?, ENI_A);
    let signalled = Instant::now();
    s.proxy.signal(Signal::SIGTERM)?;
    let status = s.proxy.wait_exit(Duration::from_secs(10)).await?;
    assert_eq!(status.code(), Some(0));
    assert!(signalled.elapsed() >= Duration::from_secs(1), "exited before the drain timeout");
    assert!(open.get("/version").await.is_err(), "the connection survived the drain timeout");
    let cut = s
        .proxy
        .wait_message("drain timeout: closed the connections still open", Duration::from_secs(1))
        .await?;
    assert_eq!(cut["cut"], 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_at_once() -> Result<()> {
    let mut s = setup(Answer::Addrs(vec![ENI_A]), &["--drain-timeout", "60s"]).await?;
    let mut open = s.client.connect(s.proxy.addr()).await?;
    assert_eq!(open.get("/version").await?, ENI_A);
    s.proxy.signal(Signal::SIGINT)?;
    let status = s.proxy.wait_exit(Duration::from_secs(5)).await?;
    assert_eq!(status.code(), Some(0));
    assert!(open.get("/version").await.is_err(), "the connection survived SIGINT");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresolvable_name_at_start_up_is_only_a_warning() -> Result<()> {
    let s = setup(Answer::NxDomain, &["--dns-max-ttl", "0"]).await?;
    let warning = s
        .proxy
        .wait_message(
            "upstream does not resolve yet; will retry for every connection",
            Duration::from_secs(5),
        )
        .await?;
    assert_eq!(warning["level"], "WARN");
    // The name appears later and is used.
    s.dns.set(API_HOSTNAME, Answer::Addrs(vec![ENI_B]));
    assert_eq!(s.client.get_once(s.proxy.addr(), "/version").await?, ENI_B);
    Ok(())
}

/// `ss -o` timers of the established sockets matching `filter`.
fn socket_timers(filter: &str) -> Result<String> {
    let out = std::process::Command::new("ss").args(["-Htno", "state", "established", filter]).output()?;
    anyhow::ensure!(out.status.success(), "ss failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_runs_on_both_sockets_of_a_connection() -> Result<()> {
    let s = setup(Answer::Addrs(vec![ENI_A]), &["--tcp-keepalive-idle", "45s"]).await?;
    let mut open = s.client.connect(s.proxy.addr()).await?;
    assert_eq!(open.get("/version").await?, ENI_A);
    // While data is unacknowledged `ss` shows the retransmit timer instead, so
    // look until the connection is quiet.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let downstream = socket_timers(&format!("( sport = :{} )", s.proxy.addr().port()))?;
        let upstream = socket_timers(&format!("( dport = :{} )", s.enis[0].addr.port()))?;
        let both = [&downstream, &upstream].iter().all(|text| text.contains("timer:(keepalive,4"));
        if both {
            return Ok(());
        }
        assert!(
            Instant::now() < deadline,
            "no keepalive timer near 45 s on both proxy sockets:\nclient side: {downstream}\nupstream side: {upstream}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The DNS server goes away for longer than a few lookups (once the kept
/// answer ends, every connection closes as `resolve_failed`), then comes back
/// on the same address: the next connection resolves again at once, however
/// many lookups failed before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_server_back_after_an_outage_is_used_at_once() -> Result<()> {
    let max_ttl = Duration::from_secs(1);
    let mut s = setup(Answer::Addrs(vec![ENI_A]), &["--dns-max-ttl", "1s", "--dns-timeout", "1s"]).await?;
    assert_eq!(s.client.get_once(s.proxy.addr(), "/version").await?, ENI_A);
    let dns_addr = s.dns.addr;
    let stand_in = DnsServer::start(Duration::from_secs(30)).await?;
    std::mem::replace(&mut s.dns, stand_in).stop().await;
    let down = Instant::now();
    let mut failed = 0;
    while down.elapsed() < Duration::from_secs(8) {
        let proxy = s.proxy.addr();
        let tries: Vec<_> = (0..4)
            .map(|_| tokio::spawn(async move { (read_after_send(proxy).await, down.elapsed()) }))
            .collect();
        for t in tries {
            match t.await? {
                (Ok(0), _) => failed += 1,
                // The answer kept from before the outage, for at most max_ttl.
                (Ok(_), at) if at < max_ttl + Duration::from_millis(200) => {}
                (read, at) => panic!("{at:?} into the outage the client saw {read:?}, not a clean close"),
            }
        }
    }
    assert!(failed >= 8, "only {failed} connections failed during the outage");
    let answers = [(API_HOSTNAME, Answer::Addrs(vec![ENI_A]))];
    let back_server = DnsServer::start_on(dns_addr, Duration::from_secs(30), &answers).await?;
    let back = Instant::now();
    let eni = s.client.get_once(s.proxy.addr(), "/version").await;
    assert!(
        matches!(eni, Ok(ENI_A)),
        "the first connection {:?} after the server came back ({failed} failed during the outage) saw {eni:?}; \
         the server got {} queries",
        back.elapsed(),
        back_server.queries()
    );
    Ok(())
}
