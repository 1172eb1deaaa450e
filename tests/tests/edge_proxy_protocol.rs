//! PROXY protocol at the edge, against the running proxy: a table of headers
//! (valid IPv4, IPv6 and LOCAL, each TLV form, VPC endpoint allowed, denied
//! and missing, truncated, oversized, bad signature, chained, v1) on two
//! listeners of one config file, each case checked by what the client gets
//! back from an echoing upstream and by the access log line; then the totals
//! logged at exit. A header dribbled and never completed is closed at the
//! header timeout while other connections are served.

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use nix::sys::signal::Signal;
use splice_proxy_tests::{
    edge::{
        client_hello, exchange_in_chunks, start_echo, v1_line, v2_local, v2_proxy, v2_raw, vpce_tlv,
        with_crc32c,
    },
    process::{ProxyProcess, message, refusal_count},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const UPSTREAM_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const NAME: &str = "edge.example.test";
const ALLOWED: &str = "vpce-0123456789abcdef0";
const OTHER: &str = "vpce-0fedcba9876543210";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

/// Listener 0: v2 required, one VPC endpoint allowed, chained headers refused.
/// Listener 1: optional, v1 accepted, chained headers stripped.
fn config(upstream: SocketAddr) -> Result<tempfile::NamedTempFile> {
    let mut file = tempfile::NamedTempFile::new()?;
    write!(
        file,
        r#"upstream = "{upstream}"
dataplane = "splice"
allowed_sni = ["{NAME}"]
proxy_header_timeout = "3s"

[[listeners]]
listen = "127.0.0.1:0"
proxy_protocol = "required"
allowed_vpce_ids = ["{ALLOWED}"]

[[listeners]]
listen = "127.0.0.1:0"
proxy_protocol = "optional"
proxy_protocol_v1 = true
chained_proxy_headers = "strip"
"#
    )?;
    Ok(file)
}

struct Case {
    name: &'static str,
    listener: usize,
    /// Bytes before the ClientHello.
    first: Vec<u8>,
    /// Send the ClientHello after `first` (otherwise the client stops there).
    hello: bool,
    reason: &'static str,
    /// The client address the log must show (completed cases).
    client: Option<&'static str>,
}

fn cases() -> Vec<Case> {
    let v4 = |tlvs: &[(u8, Vec<u8>)]| v2_proxy(addr("192.0.2.7:40000"), addr("10.0.0.1:443"), tlvs);
    let vpce = vpce_tlv(ALLOWED);
    let with_vpce = std::slice::from_ref(&vpce);
    let ssl = [&[0x07, 0, 0, 0, 0][..], &[0x21, 0, 3], b"1.3"].concat();
    let every_form = vec![
        (0x01, b"h2".to_vec()),
        (0x02, NAME.as_bytes().to_vec()),
        (0x04, vec![0; 5]),
        (0x05, vec![7; 32]),
        (0x20, ssl),
        (0x30, b"blue".to_vec()),
        vpce.clone(),
        (0x03, vec![0; 4]),
    ];
    let mut oversized = splice_proxy_tests::edge::V2_SIGNATURE.to_vec();
    oversized.extend([0x21, 0x11, 0x0f, 0xa0]);
    let mut bad_tlv = v4(with_vpce);
    bad_tlv[15] += 3;
    bad_tlv.extend([0x04, 0, 200]);
    let full = v4(with_vpce);
    let case =
        |name, listener, first, hello, reason, client| Case { name, listener, first, hello, reason, client };
    vec![
        case("ipv4", 0, v4(with_vpce), true, "completed", Some("192.0.2.7:40000")),
        case(
            "ipv6",
            0,
            v2_proxy(addr("[2001:db8::7]:50000"), addr("[2001:db8::1]:443"), with_vpce),
            true,
            "completed",
            Some("[2001:db8::7]:50000"),
        ),
        case("every TLV form", 0, with_crc32c(v4(&every_form)), true, "completed", Some("192.0.2.7:40000")),
        case("local", 0, v2_local(), false, "health_check", None),
        case("vpce denied", 0, v4(&[vpce_tlv(OTHER)]), true, "vpce_denied", None),
        case("vpce missing", 0, v4(&[]), true, "vpce_missing", None),
        case("truncated", 0, full[..full.len() - 3].to_vec(), false, "proxy_header_invalid", None),
        case("oversized", 0, oversized, false, "proxy_header_oversized", None),
        case(
            "bad signature",
            0,
            [&b"\r\n\r\n\0\r\nQUIX\n"[..], &full[12..]].concat(),
            true,
            "proxy_header_missing",
            None,
        ),
        case("no header", 0, Vec::new(), true, "proxy_header_missing", None),
        case("bad TLV", 0, bad_tlv, true, "proxy_header_invalid", None),
        case("bad version", 0, v2_raw(0x11, 0x11, &full[16..28], &[]), true, "proxy_header_invalid", None),
        case(
            "chained, refused",
            0,
            [full.clone(), full.clone()].concat(),
            true,
            "chained_header_refused",
            None,
        ),
        case(
            "v1 where only v2 is read",
            0,
            v1_line(addr("192.0.2.9:1"), addr("10.0.0.1:443")),
            true,
            "proxy_header_missing",
            None,
        ),
        case(
            "v1",
            1,
            v1_line(addr("192.0.2.9:1234"), addr("10.0.0.1:443")),
            true,
            "completed",
            Some("192.0.2.9:1234"),
        ),
        case("optional, none", 1, Vec::new(), true, "completed", None),
        case(
            "chained, stripped",
            1,
            [v4(&[]), full.clone()].concat(),
            true,
            "completed",
            Some("192.0.2.7:40000"),
        ),
        case("local on the optional listener", 1, v2_local(), false, "health_check", None),
    ]
}

/// Sends `bytes` in one write, half-closes, and returns what came back.
async fn exchange(proxy: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>> {
    exchange_in_chunks(proxy, &[bytes], Duration::ZERO).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_headers_table() -> Result<()> {
    let upstream = start_echo(UPSTREAM_IP).await?;
    let file = config(upstream)?;
    let path = file.path().to_str().context("path")?.to_owned();
    let mut proxy = tokio::task::block_in_place(|| ProxyProcess::start(&["--config", &path]))?;
    ensure!(proxy.listen.len() == 2, "listeners: {:?}", proxy.listen);
    let hello = client_hello(NAME)?;
    let cases = cases();
    for (i, case) in cases.iter().enumerate() {
        let sent = if case.hello { [case.first.clone(), hello.clone()].concat() } else { case.first.clone() };
        let back = exchange(proxy.listen[case.listener], &sent).await.with_context(|| case.name)?;
        let closed = proxy.wait_closed(i + 1, Duration::from_secs(10)).await?;
        let line = &closed[i];
        ensure!(line["reason"] == case.reason, "{}: expected {}, got {line}", case.name, case.reason);
        if case.reason == "completed" {
            ensure!(back == hello, "{}: the upstream did not get the ClientHello byte for byte", case.name);
            let client = case.client.map_or_else(|| line["span"]["peer"].clone(), |c| c.into());
            ensure!(line["span"]["client"] == client, "{}: client {line}", case.name);
            ensure!(line["span"]["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{line}");
        } else {
            ensure!(
                back.is_empty(),
                "{}: {} bytes came back from a refused connection",
                case.name,
                back.len()
            );
        }
    }
    let first = &proxy.closed_connections()[0];
    ensure!(first["span"]["vpce"] == ALLOWED && first["span"]["proxy_header"] == 2, "{first}");

    proxy.signal(Signal::SIGTERM)?;
    proxy.wait_exit(Duration::from_secs(10)).await?;
    let totals =
        proxy.events().into_iter().find(|e| message(e) == "edge totals").context("no edge totals at exit")?;
    let count = |reason: &str| cases.iter().filter(|c| c.reason == reason).count();
    for reason in [
        "health_check",
        "vpce_denied",
        "vpce_missing",
        "proxy_header_missing",
        "proxy_header_invalid",
        "proxy_header_oversized",
        "chained_header_refused",
    ] {
        let counted = refusal_count(&totals, reason).with_context(|| format!("no {reason} in {totals}"))?;
        ensure!(counted == count(reason) as u64, "{reason}: {totals}");
    }
    ensure!(totals["client_hellos_accepted"] == count("completed"), "{totals}");
    Ok(())
}

/// A header dribbled a byte at a time and never completed is closed at the
/// header timeout; meanwhile other connections are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_header_is_closed_at_the_timeout_while_others_are_served() -> Result<()> {
    let upstream = start_echo(UPSTREAM_IP).await?.to_string();
    let args = ["--upstream", &upstream, "--allow-sni", NAME, "--proxy-protocol", "required"];
    let proxy = tokio::task::block_in_place(|| {
        ProxyProcess::start(&[&args[..], &["--proxy-header-timeout", "1s"]].concat())
    })?;
    let header = v2_proxy(addr("192.0.2.7:40000"), addr("10.0.0.1:443"), &[]);
    let hello = client_hello(NAME)?;
    let started = Instant::now();
    let slow = TcpStream::connect(proxy.addr()).await?;
    slow.set_nodelay(true)?;
    let (mut slow_read, mut slow_write) = slow.into_split();
    let partial = header[..header.len() - 1].to_vec();
    let dribbler = tokio::spawn(async move {
        for byte in partial {
            if slow_write.write_all(&[byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // The proxy's FIN (a read of 0) or a reset ends the wait.
    let dribble = async {
        let _ = slow_read.read(&mut [0u8; 16]).await;
        started.elapsed()
    };
    let others = async {
        let mut served = Vec::new();
        for _ in 0..3 {
            let back = exchange(proxy.addr(), &[header.clone(), hello.clone()].concat()).await?;
            ensure!(back == hello, "a connection was not served during the slow header");
            served.push(started.elapsed());
        }
        anyhow::Ok(served)
    };
    let (closed_after, served) = tokio::join!(dribble, others);
    let served = served?;
    dribbler.abort();
    ensure!(
        closed_after >= Duration::from_millis(900) && closed_after < Duration::from_secs(3),
        "the slow header was closed after {closed_after:?}, not at the 1 s timeout"
    );
    ensure!(
        served.iter().all(|t| *t < closed_after),
        "others served at {served:?}, slow closed at {closed_after:?}"
    );
    let closed = proxy.wait_closed(4, Duration::from_secs(5)).await?;
    ensure!(closed.iter().filter(|c| c["reason"] == "proxy_header_timeout").count() == 1, "{closed:?}");
    ensure!(closed.iter().filter(|c| c["reason"] == "completed").count() == 3, "{closed:?}");
    Ok(())
}

/// On every data plane, the bytes after the header (the ClientHello and what
/// follows it) reach the upstream exactly, and nothing of the header does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_data_plane_gets_exactly_the_bytes_after_the_header() -> Result<()> {
    let upstream = start_echo(UPSTREAM_IP).await?.to_string();
    let header = v2_proxy(addr("192.0.2.7:40000"), addr("10.0.0.1:443"), &[]);
    let hello = client_hello(NAME)?;
    let after: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
    for plane in ["splice", "copy", "sockmap"] {
        let args = [
            "--upstream",
            &upstream,
            "--allow-sni",
            NAME,
            "--proxy-protocol",
            "required",
            "--dataplane",
            plane,
        ];
        let proxy = tokio::task::block_in_place(|| ProxyProcess::start(&args))?;
        let sent = [header.clone(), hello.clone(), after.clone()].concat();
        let back = exchange(proxy.addr(), &sent).await.with_context(|| plane)?;
        ensure!(back.len() == hello.len() + after.len(), "{plane}: {} bytes came back", back.len());
        ensure!(
            back == [hello.clone(), after.clone()].concat(),
            "{plane}: the bytes after the header differ"
        );
        let closed = proxy.wait_closed(1, Duration::from_secs(5)).await?;
        ensure!(
            closed[0]["reason"] == "completed" && closed[0]["span"]["client"] == "192.0.2.7:40000",
            "{plane}: {}",
            closed[0]
        );
    }
    Ok(())
}
