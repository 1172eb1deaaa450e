//! The XDP source filter in a running proxy: client, proxy and upstream in
//! their own network namespaces joined by veth pairs, the filter on the
//! proxy's client-facing veth allowing one of the client's two addresses.
//! The allowed address moves checksummed bytes through the proxy; the other
//! one's SYNs are dropped, every one counted; an invalid config file on
//! SIGHUP is rejected with its reason; a file adding the second address lets
//! it in without a restart; the totals logged at exit match the program's
//! counters (and so do its metrics), and the program is gone from the
//! interface after the exit.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::sys::signal::Signal;
use proxy_common::SourceFilterStats;
use testkit::{
    admin::Exposition,
    bpf_maps::source_filter_stats,
    netns::{LineTopology, in_netns, ip, xdp_attachment},
    process::ProxyProcess,
    transfer::{Order, run_transfer_on},
};

/// The second client address, on the same veth as `LineTopology::CLIENT_ADDR`.
const DENIED_ADDR: &str = "192.0.2.3";
/// Long enough for the first SYN and its first retransmission (after 1 s).
const DENIED_WAIT: Duration = Duration::from_millis(2500);
const BYTES: u64 = 256 * 1024;

fn write_config(file: &mut tempfile::NamedTempFile, allowed: &[&str]) -> Result<()> {
    let list: Vec<String> = allowed.iter().map(|a| format!("\"{a}\"")).collect();
    let text = format!("xdp_interface = \"to-client\"\nallowed_source_cidrs = [{}]\n", list.join(", "));
    let f = file.as_file_mut();
    f.set_len(0)?;
    std::io::Seek::rewind(f)?;
    f.write_all(text.as_bytes())?;
    Ok(f.sync_all()?)
}

/// TCP segments sent from `netns` so far: `Tcp: OutSegs` (which leaves out
/// retransmissions on this kernel) plus `RetransSegs`.
fn tcp_out_segments(netns: &str) -> Result<u64> {
    let snmp = in_netns(netns, || std::fs::read_to_string("/proc/thread-self/net/snmp"))??;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().context("no Tcp: header")?, tcp.next().context("no Tcp: values")?);
    let field = |name: &str| -> Result<u64> {
        let column =
            names.split_whitespace().position(|n| n == name).with_context(|| format!("no {name}"))?;
        Ok(values.split_whitespace().nth(column).context("short Tcp: line")?.parse()?)
    };
    Ok(field("OutSegs")? + field("RetransSegs")?)
}

/// A connection from `source` (in the client namespace) to the proxy.
async fn connect_from(netns: &str, source: &str, proxy: SocketAddr) -> Result<tokio::net::TcpStream> {
    let socket = in_netns(netns, tokio::net::TcpSocket::new_v4)??;
    socket.bind(SocketAddr::new(source.parse::<IpAddr>()?, 0))?;
    Ok(socket.connect(proxy).await?)
}

/// Polls the program's counters until `done` holds for them (packets may
/// still be on their way), or fails with the last ones.
fn wait_counters(prog: u32, done: impl Fn(&SourceFilterStats) -> bool) -> Result<SourceFilterStats> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = source_filter_stats(prog)?;
        if done(&stats) {
            return Ok(stats);
        }
        if Instant::now() > deadline {
            bail!("counters never reached the expected values: {stats:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn only_allowed_sources_get_through_and_sighup_reloads_the_list() -> Result<()> {
    let topology = LineTopology::create()?;
    let (client, proxy_ns) = (topology.client.as_str(), topology.proxy.as_str());
    ip(&["-n", client, "addr", "add", &format!("{DENIED_ADDR}/24"), "dev", "to-proxy"])?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let _guard = runtime.enter();
    let server = topology.transfer_server()?;
    let mut config = tempfile::NamedTempFile::new()?;
    let allowed = format!("{}/32", LineTopology::CLIENT_ADDR);
    write_config(&mut config, &[&allowed])?;
    let listen = format!("{}:0", LineTopology::PROXY_CLIENT_SIDE_ADDR);
    let upstream = server.addr.to_string();
    let config_path = config.path().to_str().context("temp path")?.to_owned();
    let mut proxy = ProxyProcess::start_in_netns(
        proxy_ns,
        &["--config", &config_path, "--listen", &listen, "--upstream", &upstream, "--no-sni-check"],
    )?;
    let attached =
        runtime.block_on(proxy.wait_message("XDP source filter attached", Duration::from_secs(1)))?;
    ensure!(attached["mode"] == "native", "veth should run XDP natively: {attached}");
    let on_link = xdp_attachment(proxy_ns, "to-client")?.context("no XDP program on to-client")?;
    ensure!(on_link.mode == "xdp", "{on_link:?}");
    let prog = on_link.prog_id;

    // The other address: its SYNs are dropped, every one of them counted
    // (first, while nothing else in the client namespace sends).
    let segments_before = tcp_out_segments(client)?;
    let denied = runtime.block_on(async {
        tokio::time::timeout(DENIED_WAIT, connect_from(client, DENIED_ADDR, proxy.addr())).await
    });
    ensure!(denied.is_err(), "the denied address connected (or failed fast): {denied:?}");
    let syns = tcp_out_segments(client)? - segments_before;
    ensure!(syns >= 2, "expected a SYN and a retransmission, the client sent {syns} segments");
    let after_denied = wait_counters(prog, |s| s.dropped >= syns)?;
    ensure!(after_denied.dropped == syns, "{syns} SYNs sent, {after_denied:?}");

    // The allowed address: bytes through the proxy, each way, checksummed.
    let transfer = |source: &'static str| {
        runtime.block_on(async {
            let stream = connect_from(client, source, proxy.addr()).await?;
            let run = run_transfer_on(stream, &server, BYTES, BYTES, Order::Concurrent);
            tokio::time::timeout(Duration::from_secs(30), run).await.context("transfer stalled")?
        })
    };
    transfer(LineTopology::CLIENT_ADDR).context("the allowed address")?;
    let after_allowed = source_filter_stats(prog)?;
    ensure!(after_allowed.allowed > 0 && after_allowed.dropped == syns, "{after_allowed:?}");

    // An invalid file is rejected with its reason; the old list stays.
    write_config(&mut config, &[&allowed, "192.0.2.3/33"])?;
    proxy.signal(Signal::SIGHUP)?;
    let rejected = runtime.block_on(proxy.wait_message(
        "SIGHUP: configuration rejected; the running configuration stays in force",
        Duration::from_secs(5),
    ))?;
    ensure!(rejected["error"].as_str().unwrap_or_default().contains("192.0.2.3/33"), "{rejected}");

    // A file adding the second address lets it in, without a restart.
    write_config(&mut config, &[&allowed, &format!("{DENIED_ADDR}/32")])?;
    proxy.signal(Signal::SIGHUP)?;
    let reloaded =
        runtime.block_on(proxy.wait_message("SIGHUP: source list reloaded", Duration::from_secs(5)))?;
    ensure!(
        reloaded["added"] == format!("[\"{DENIED_ADDR}/32\"]") && reloaded["removed"] == "[]",
        "{reloaded}"
    );
    ensure!(reloaded["dropped"].as_u64() == Some(syns), "the reload reports other counters: {reloaded}");
    transfer(DENIED_ADDR).context("the address added by SIGHUP")?;
    transfer(LineTopology::CLIENT_ADDR).context("the allowed address after the reload")?;

    // The metrics endpoint (inside the proxy's namespace) reads the same counters.
    let admin = proxy.admin.context("no admin endpoint logged")?;
    let (status, body) = runtime.block_on(async {
        let socket = in_netns(proxy_ns, tokio::net::TcpSocket::new_v4)??;
        testkit::admin::get_on(socket.connect(admin).await?, "/metrics").await
    })?;
    ensure!(status == 200, "/metrics answered {status}");
    let metrics = Exposition::parse(&body)?;
    let counted = |result: &str| metrics.count("splice_proxy_xdp_packets_total", &[("result", result)]);
    let now = source_filter_stats(prog)?;
    ensure!(counted("dropped") == syns as f64, "{syns} SYNs dropped, /metrics: {}", counted("dropped"));
    ensure!(
        counted("allowed") >= after_allowed.allowed as f64 && counted("allowed") <= now.allowed as f64,
        "/metrics: {} allowed, the map: {} then {}",
        counted("allowed"),
        after_allowed.allowed,
        now.allowed
    );

    proxy.signal(Signal::SIGTERM)?;
    let status = runtime.block_on(proxy.wait_exit(Duration::from_secs(40)))?;
    ensure!(status.success(), "proxy exited with {status}");
    let totals = runtime.block_on(proxy.wait_message("xdp source filter totals", Duration::from_secs(1)))?;
    eprintln!("{syns} SYNs from the denied address; proxy totals: {totals}");
    ensure!(totals["dropped"].as_u64() == Some(syns), "{syns} SYNs dropped, totals {totals}");
    ensure!(
        totals["allowed"].as_u64() > Some(after_allowed.allowed),
        "no packet passed after the reload: {totals}"
    );
    ensure!(totals["passed"].as_u64() >= totals["allowed"].as_u64(), "{totals}");
    runtime.block_on(proxy.wait_message("XDP source filter detached", Duration::from_secs(1)))?;
    let left = xdp_attachment(proxy_ns, "to-client")?;
    ensure!(left.is_none(), "an XDP program is still attached after the exit: {left:?}");
    Ok(())
}
