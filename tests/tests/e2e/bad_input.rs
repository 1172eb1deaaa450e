//! Scenario: bad input at the front (see main.rs).

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use splice_proxy_tests::e2e::{World, kubectl::ensure_no_failure};

use crate::run;

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
    use splice_proxy_tests::e2e::{OTHER_ENDPOINT_PORT, PROXY_PORT, load, topology::ENDPOINT};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const WRONG_VPCE: usize = 6;
    const NOT_TLS: usize = 6;
    const SLOWLORIS: usize = 4;
    let calls = world.kubectl.call_loop();
    let client = std::sync::Arc::new(world.pki.client(splice_proxy_tests::e2e::API_HOST)?);
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
                let hello = splice_proxy_tests::edge::client_hello(splice_proxy_tests::e2e::API_HOST)?;
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
