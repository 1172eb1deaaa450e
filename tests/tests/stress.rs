//! Stress: 64 MiB each way at once at full speed, half the runs with both
//! readers alternating slow and fast phases (which makes the sockmap plane
//! pause directions, copy them in user space and resume), many runs per plane:
//! rare failures are the ones that matter (100 runs catch a 2 % failure with
//! 87 % probability). Runs per plane: 100, or `SPLICE_PROXY_STRESS_RUNS`.
//!
//! `SPLICE_PROXY_STRESS_PLANES` (comma-separated) chooses the planes. A run
//! that hangs prints the proxy's threads and its sockets (`ss`): that is how
//! the sockmap hang in docs/kernel-notes.md was found.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use splice_proxy_tests::{
    process::ProxyProcess,
    transfer::{Order, Pace, TransferServer, run_paced_transfer_on},
};
use tokio::net::TcpStream;

const MIB: u64 = 1 << 20;
/// A run that takes this long has stalled (they take 0.3–2 s).
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_plane_is_exact_run_after_run() -> Result<()> {
    let runs: usize =
        std::env::var("SPLICE_PROXY_STRESS_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(100);
    let server = TransferServer::start(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))).await?;
    let upstream = server.addr.to_string();
    let planes =
        std::env::var("SPLICE_PROXY_STRESS_PLANES").unwrap_or_else(|_| "sockmap,splice,copy".to_owned());
    for plane in planes.split(',') {
        let args = ["--upstream", upstream.as_str(), "--dataplane", plane, "--no-sni-check"];
        let mut proxy = tokio::task::block_in_place(|| ProxyProcess::start(&args))?;
        let started = Instant::now();
        for run in 0..runs {
            let pace = if run % 2 == 1 { Pace::Alternating } else { Pace::Fast };
            let stream = TcpStream::connect(proxy.addr()).await?;
            let transfer =
                run_paced_transfer_on(stream, &server, 64 * MIB, 64 * MIB, Order::Concurrent, pace);
            let outcome =
                tokio::time::timeout(RUN_TIMEOUT, transfer).await.context("stalled").and_then(|r| r);
            if outcome.is_err() {
                tokio::time::sleep(Duration::from_secs(1)).await;
                for event in proxy.events().iter().rev().take(40).rev() {
                    eprintln!("proxy: {event}");
                }
                eprintln!("{}", proxy.diagnostics(&[server.addr.port()]));
            }
            outcome.with_context(|| format!("{plane}, run {} of {runs} ({pace:?})", run + 1))?;
        }
        let closed = proxy.wait_closed(runs, Duration::from_secs(10)).await?;
        ensure!(closed.iter().all(|c| c["reason"] == "completed"), "{plane}: not all completed");
        let paused: u64 = closed.iter().filter_map(|c| c["paused_directions"].as_u64()).sum();
        let kernel: u64 = closed.iter().filter_map(|c| c["kernel_bytes"].as_u64()).sum();
        let resumes: u64 = closed.iter().filter_map(|c| c["resumes"].as_u64()).sum();
        eprintln!(
            "{plane}: {runs} runs exact in {:.1} s; {paused} directions paused, {resumes} resumes, {} MiB through the kernel",
            started.elapsed().as_secs_f64(),
            kernel / MIB
        );
    }
    Ok(())
}
