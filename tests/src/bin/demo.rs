//! The local demo (`cargo xtask demo`): a DNS server, two TLS "EKS API
//! servers" on 127.0.0.2 and 127.0.0.3 with a certificate for the cluster
//! hostname, splice-proxy in front, and a client whose requests go through the
//! proxy while the DNS answer moves from one ENI to the other.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use nix::sys::signal::Signal;
use splice_proxy_tests::{
    API_HOSTNAME,
    api::{self, Pki},
    dns::{Answer, DnsServer},
    process::{ProxyProcess, message},
};

const ENI_A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const ENI_B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

#[derive(Parser)]
struct Args {
    /// The splice-proxy binary to run.
    #[arg(long)]
    proxy_bin: Option<PathBuf>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dns = DnsServer::start(Duration::from_secs(60)).await?;
    dns.set(API_HOSTNAME, Answer::Addrs(vec![ENI_A]));
    let pki = Pki::new(API_HOSTNAME)?;
    let mut enis = api::start_on_common_port(&pki, &[ENI_A, ENI_B]).await?.into_iter();
    let (eni_a, eni_b) = (enis.next().context("ENI A")?, enis.next().context("ENI B")?);
    let port = eni_a.addr.port();
    let upstream = format!("{API_HOSTNAME}:{port}");
    let dns_addr = dns.addr.to_string();
    let proxy_args = ["--upstream", &upstream, "--dns-server", &dns_addr, "--dns-max-ttl", "1s"];
    let binary = match args.proxy_bin {
        Some(path) => path,
        None => splice_proxy_tests::process::binary()?,
    };
    let mut proxy = tokio::task::block_in_place(|| ProxyProcess::start_binary(&binary, &proxy_args))?;
    let client = pki.client(API_HOSTNAME)?;
    let via = proxy.addr();

    println!("splice-proxy demo");
    println!("  DNS server      {dns_addr}: {API_HOSTNAME} -> {ENI_A} (answers reused at most 1 s)");
    println!("  API server ENIs {} and {} (TLS, certificate for {API_HOSTNAME})", eni_a.addr, eni_b.addr);
    println!("  proxy           {via} -> {upstream}, resolved for every new connection");
    println!();

    let mut failures = 0u32;
    let mut served: BTreeMap<IpAddr, u32> = BTreeMap::new();
    println!("1. five requests, each on a new TLS connection verified against the cluster CA:");
    for i in 1..=5 {
        let eni = client.get_once(via, "/version").await?;
        *served.entry(eni).or_default() += 1;
        println!("   GET /version #{i} -> served by {eni}");
    }

    println!("2. a long-lived connection (like `kubectl get pods --watch`) opens:");
    let mut watch = client.connect(via).await?;
    println!("   watch -> served by {}", watch.get("/api/v1/pods?watch=1").await?);

    println!("3. EKS rotates its ENIs: DNS now answers {ENI_B}");
    dns.set(API_HOSTNAME, Answer::Addrs(vec![ENI_B]));
    let rotated = Instant::now();
    let mut switched = None;
    while rotated.elapsed() < Duration::from_millis(2500) {
        match client.get_once(via, "/version").await {
            Ok(eni) => {
                *served.entry(eni).or_default() += 1;
                if eni == ENI_B && switched.is_none() {
                    switched = Some(rotated.elapsed());
                }
                println!("   +{:>4} ms GET /version -> served by {eni}", rotated.elapsed().as_millis());
            }
            Err(error) => {
                failures += 1;
                println!("   +{:>4} ms GET /version FAILED: {error:#}", rotated.elapsed().as_millis());
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    match switched {
        Some(after) => println!("   new connections moved to {ENI_B} after {} ms", after.as_millis()),
        None => bail!("new connections never moved to {ENI_B}"),
    }
    println!("   the long-lived connection still talks to {}", watch.get("/api/v1/pods?watch=1").await?);

    println!("4. the old ENI {ENI_A} goes away:");
    eni_a.stop().await;
    match watch.get("/api/v1/pods?watch=1").await {
        Ok(eni) => println!("   watch unexpectedly still served by {eni}"),
        Err(_) => println!("   the long-lived connection ends (kubectl would reconnect)"),
    }
    drop(watch);
    let mut watch = client.connect(via).await?;
    println!("   reconnected watch -> served by {}", watch.get("/api/v1/pods?watch=1").await?);
    drop(watch);

    println!("5. SIGTERM: the proxy drains and exits");
    proxy.signal(Signal::SIGTERM)?;
    let status = proxy.wait_exit(Duration::from_secs(35)).await?;
    let log = proxy.closed_connections();
    let mut by_upstream: BTreeMap<String, u32> = BTreeMap::new();
    for event in &log {
        *by_upstream.entry(event["upstream"].as_str().unwrap_or("-").to_owned()).or_default() += 1;
    }
    println!("   {status}; the proxy logged {} closed connections:", log.len());
    for (upstream, count) in &by_upstream {
        println!("     {count:>3} to {upstream}");
    }
    let drained = proxy.events().iter().any(|e| message(e) == "drained: every connection finished");
    println!();
    println!(
        "requests served: {}; failed: {failures}; drained cleanly: {drained}",
        served.iter().map(|(eni, n)| format!("{n} by {eni}")).collect::<Vec<_>>().join(", ")
    );
    drop(eni_b);
    if failures > 0 || !status.success() || !drained {
        bail!("the demo saw failures");
    }
    Ok(())
}
