//! The packet plane end to end: client, proxy and upstream in their own
//! network namespaces over veths, the proxy run with `--dataplane packet`
//! (its program attached to the interfaces of its routes). Transfers of
//! every size and order arrive SHA-256 exact and are carried by the program
//! (each access line counts kernel bytes; the exit totals count every
//! connection spliced). A connection that cannot be spliced stays on splice,
//! exact, with its reason counted. Stress runs (readers alternating slow and
//! fast) on an idle and on a busy host, and a lossy link each way with SACK
//! and timestamps on and off, every run exact and spliced. The deployed
//! capabilities run it as an unprivileged user, and it cannot start without
//! each of the BPF ones. A thousand connections, a hundred at a time, leave
//! no flow entry and no descriptor behind. Connections negotiated
//! differently (window scales, MSS, SACK on one side) are either exact on
//! the program or fall back with their reason. A reset each way, once spliced,
//! reaches the other end; a PROXY v2 header in front is absorbed by the
//! offset. Runs as root.
//!
//! Knobs: `SPLICE_PROXY_PACKET_STRESS_RUNS` (per host state, default 50),
//! `SPLICE_PROXY_PACKET_LOSSY_RUNS` (per variant, default 3),
//! `SPLICE_PROXY_PACKET_LOSSY_ONLY` (one variant: `11`, `01`, `10` or `00`,
//! SACK then timestamps),
//! `SPLICE_PROXY_PACKET_CONNECTIONS` (default 1,000).

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;
use splice_proxy::kernel::LossyLink;
use splice_proxy_tests::{
    bpf_maps,
    busy::BusyLoops,
    capabilities::{UNIT, as_unprivileged_with, repo_file, unit_capabilities},
    netns::{LineTopology, in_netns},
    process::{ProxyProcess, tcp_sockets},
    transfer::{Order, Pace, TransferServer, run_paced_transfer_on, run_transfer_on},
};

const MIB: u64 = 1 << 20;
/// The transfer protocol's request header, counted in the upload.
const HEADER: u64 = 24;

/// (bytes up, bytes down, order) of each connection.
const TRANSFERS: [(u64, u64, Order); 7] = [
    (1, 1, Order::Concurrent),
    (1000, 100_000, Order::Concurrent),
    (4 * MIB, 4 * MIB, Order::Concurrent),
    (64 * MIB, 64 * MIB, Order::Concurrent),
    (MIB, 3 * MIB, Order::ClientFirst),
    (3 * MIB, MIB, Order::UpstreamFirst),
    (0, 16 * MIB, Order::Concurrent),
];

/// A client that sends little and half-closes at once may have done so
/// before the switch: that connection stays on splice (`peer_closed`).
fn closes_at_once(up: u64, order: Order) -> bool {
    up < 64 << 10 && order == Order::Concurrent
}

/// A proxy on the packet plane in `topology`'s middle namespace, forwarding
/// to `server`.
fn packet_proxy(topology: &LineTopology, server: &TransferServer) -> Result<ProxyProcess> {
    let listen = format!("{}:0", LineTopology::PROXY_CLIENT_SIDE_ADDR);
    let upstream = server.addr.to_string();
    let args = ["--listen", &listen, "--upstream", &upstream, "--dataplane", "packet", "--no-sni-check"];
    ProxyProcess::start_in_netns(&topology.proxy, &args)
}

/// A number from the environment variable `name`, or `default`.
fn knob(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(value) => value.parse().with_context(|| format!("{name}={value} is not a number")),
        Err(_) => Ok(default),
    }
}

/// Runs `runs` transfers of `mib` MiB each way at once through `proxy`,
/// every other one with both readers alternating slow and fast; each must
/// be exact and carried by the program.
fn exact_runs(
    runtime: &tokio::runtime::Runtime,
    topology: &LineTopology,
    proxy: &ProxyProcess,
    server: &TransferServer,
    (runs, mib, what): (usize, u64, &str),
) -> Result<()> {
    let closed_before = proxy.closed_connections().len();
    for run in 0..runs {
        let pace = if run % 2 == 1 { Pace::Alternating } else { Pace::Fast };
        let socket = in_netns(&topology.client, tokio::net::TcpSocket::new_v4)??;
        runtime
            .block_on(async {
                let stream = socket.connect(proxy.addr()).await?;
                let transfer =
                    run_paced_transfer_on(stream, server, mib * MIB, mib * MIB, Order::Concurrent, pace);
                tokio::time::timeout(Duration::from_secs(120), transfer).await.context("stalled")?
            })
            .inspect_err(|_| eprintln!("{}", stall_report(topology, proxy, server)))
            .with_context(|| format!("{what}: run {} of {runs} ({pace:?})", run + 1))?;
    }
    let closed = runtime.block_on(proxy.wait_closed(closed_before + runs, Duration::from_secs(10)))?;
    for line in &closed[closed_before..] {
        ensure!(line["reason"] == "completed", "{what}: not completed: {line}");
        ensure!(line["kernel_bytes"].as_u64() > Some(0), "{what}: not spliced: {line}");
    }
    eprintln!("{what}: {runs} runs exact, every one spliced");
    Ok(())
}

/// What a failed run leaves: the sockets of all three namespaces and every
/// flow entry.
fn stall_report(topology: &LineTopology, proxy: &ProxyProcess, server: &TransferServer) -> String {
    let ports = [proxy.addr().port(), server.addr.port()];
    let mut report = String::new();
    for (side, netns) in
        [("client", &topology.client), ("proxy", &topology.proxy), ("upstream", &topology.upstream)]
    {
        report.push_str(&format!("{side} namespace:\n{}", tcp_sockets(Some(netns), &ports)));
    }
    match bpf_maps::packet_flows(proxy.pid().as_raw()) {
        Ok(flows) => {
            for (key, flow) in flows {
                report.push_str(&format!("flow {key:?}: {flow:?}\n"));
            }
        }
        Err(error) => report.push_str(&format!("flows: {error:#}\n")),
    }
    report
}

/// Runs each of `transfers` through `proxy` from the client namespace.
fn run_all(
    runtime: &tokio::runtime::Runtime,
    topology: &LineTopology,
    proxy: &ProxyProcess,
    server: &TransferServer,
    transfers: &[(u64, u64, Order)],
) -> Result<()> {
    for (i, &(up, down, order)) in transfers.iter().enumerate() {
        let socket = in_netns(&topology.client, tokio::net::TcpSocket::new_v4)??;
        runtime
            .block_on(async {
                let stream = socket.connect(proxy.addr()).await?;
                tokio::time::timeout(
                    Duration::from_secs(120),
                    run_transfer_on(stream, server, up, down, order),
                )
                .await
                .context("stalled")?
            })
            .with_context(|| format!("transfer {i}: {up} up, {down} down, {order:?}"))?;
    }
    Ok(())
}

/// Stops the proxy and returns its `packet plane totals` line.
fn totals(runtime: &tokio::runtime::Runtime, proxy: &mut ProxyProcess) -> Result<Value> {
    proxy.signal(nix::sys::signal::Signal::SIGTERM)?;
    runtime.block_on(proxy.wait_exit(Duration::from_secs(40)))?;
    runtime.block_on(proxy.wait_message("packet plane totals", Duration::from_secs(1)))
}

#[test]
fn every_transfer_is_exact_and_carried_by_the_program() -> Result<()> {
    let topology = LineTopology::create()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let _guard = runtime.enter();
    let server = topology.transfer_server()?;
    let mut proxy = packet_proxy(&topology, &server)?;
    run_all(&runtime, &topology, &proxy, &server, &TRANSFERS)?;
    let closed = runtime.block_on(proxy.wait_closed(TRANSFERS.len(), Duration::from_secs(10)))?;
    for &(up, down, order) in &TRANSFERS {
        let line = closed
            .iter()
            .find(|l| l["bytes_up"].as_u64() == Some(up + HEADER) && l["bytes_down"].as_u64() == Some(down))
            .with_context(|| format!("no access line for {up} up, {down} down: {closed:?}"))?;
        ensure!(line["reason"] == "completed", "not completed: {line}");
        if !closes_at_once(up, order) {
            ensure!(line["kernel_bytes"].as_u64() > Some(0), "the program carried nothing: {line}");
        }
    }
    let totals = totals(&runtime, &mut proxy)?;
    let spliced = totals["spliced"].as_u64().context("no spliced count")?;
    let fallbacks = totals["fallbacks"].as_str().context("no fallbacks")?;
    let expected_fallbacks = if spliced == TRANSFERS.len() as u64 {
        "none".to_owned()
    } else {
        format!("peer_closed={}", TRANSFERS.len() as u64 - spliced)
    };
    ensure!(
        spliced >= TRANSFERS.iter().filter(|&&(up, _, order)| !closes_at_once(up, order)).count() as u64
            && fallbacks == expected_fallbacks,
        "every connection spliced but those closed at once: {totals}"
    );
    Ok(())
}

#[test]
fn a_connection_with_timestamps_on_one_side_stays_on_splice_with_its_reason_counted() -> Result<()> {
    let topology = LineTopology::create()?;
    LineTopology::sysctl(&topology.client, "net.ipv4.tcp_timestamps=0")?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let _guard = runtime.enter();
    let server = topology.transfer_server()?;
    let mut proxy = packet_proxy(&topology, &server)?;
    let transfers =
        [(MIB, 2 * MIB, Order::Concurrent), (5, 0, Order::ClientFirst), (0, 0, Order::Concurrent)];
    run_all(&runtime, &topology, &proxy, &server, &transfers)?;
    let closed = runtime.block_on(proxy.wait_closed(transfers.len(), Duration::from_secs(10)))?;
    for line in &closed {
        ensure!(line["reason"] == "completed" && line["kernel_bytes"] == 0, "on splice: {line}");
    }
    let totals = totals(&runtime, &mut proxy)?;
    ensure!(
        totals["spliced"] == 0 && totals["fallbacks"] == "timestamps_on_one_side=3",
        "both fell back for their timestamps: {totals}"
    );
    Ok(())
}

#[test]
fn stress_runs_are_exact_on_an_idle_and_on_a_busy_host() -> Result<()> {
    let runs = knob("SPLICE_PROXY_PACKET_STRESS_RUNS", 50)?;
    let topology = LineTopology::create()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let _guard = runtime.enter();
    let server = topology.transfer_server()?;
    let proxy = packet_proxy(&topology, &server)?;
    exact_runs(&runtime, &topology, &proxy, &server, (runs, 64, "idle host"))?;
    let busy = BusyLoops::on_every_core()?;
    exact_runs(&runtime, &topology, &proxy, &server, (runs, 64, "busy host"))?;
    drop(busy);
    Ok(())
}

/// About 1 % of the data packets dropped on both of the proxy's interfaces
/// (an XDP program ahead of the splicing one), with SACK and timestamps on
/// and off in the end namespaces: loss recovery is end to end.
#[test]
fn a_lossy_link_each_way_with_sack_and_timestamps_on_and_off_stays_exact() -> Result<()> {
    let runs = knob("SPLICE_PROXY_PACKET_LOSSY_RUNS", 3)?;
    let only = std::env::var("SPLICE_PROXY_PACKET_LOSSY_ONLY").ok();
    for (sack, timestamps) in [(1, 1), (0, 1), (1, 0), (0, 0)] {
        if only.as_ref().is_some_and(|only| *only != format!("{sack}{timestamps}")) {
            continue;
        }
        let what = format!("tcp_sack={sack} tcp_timestamps={timestamps}");
        let topology = LineTopology::create()?;
        for ns in [&topology.client, &topology.upstream] {
            LineTopology::sysctl(ns, &format!("net.ipv4.tcp_sack={sack}"))?;
            LineTopology::sysctl(ns, &format!("net.ipv4.tcp_timestamps={timestamps}"))?;
        }
        let lossy = [
            in_netns(&topology.proxy, || LossyLink::attach("to-client"))??,
            in_netns(&topology.proxy, || LossyLink::attach("to-upstream"))??,
        ];
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let _guard = runtime.enter();
        let server = topology.transfer_server()?;
        let proxy = packet_proxy(&topology, &server)?;
        exact_runs(&runtime, &topology, &proxy, &server, (runs, 16, &what))?;
        for (link, side) in lossy.iter().zip(["from the client", "from the upstream"]) {
            ensure!(link.drops()? > 0, "{what}: nothing dropped {side}, so this proved nothing");
        }
    }
    Ok(())
}

/// The packet plane needs no capability beyond the four the unit and the
/// DaemonSet grant (tests/deploy_capabilities checks the files agree): an
/// unprivileged user holding exactly those splices; without CAP_BPF,
/// CAP_NET_ADMIN or CAP_PERFMON the plane refuses to start, saying so.
#[test]
fn the_deployed_capabilities_run_the_packet_plane_and_each_bpf_one_is_needed() -> Result<()> {
    let caps = unit_capabilities(&repo_file(UNIT)?, "AmbientCapabilities")?;
    let topology = LineTopology::create()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let _guard = runtime.enter();
    let server = topology.transfer_server()?;
    let listen = format!("{}:0", LineTopology::PROXY_CLIENT_SIDE_ADDR);
    let upstream = server.addr.to_string();
    let args = ["--listen", &listen, "--upstream", &upstream, "--dataplane", "packet", "--no-sni-check"];
    let start = |caps: &std::collections::BTreeSet<String>| {
        let mut wrapper = vec!["ip".to_owned(), "netns".into(), "exec".into(), topology.proxy.clone()];
        wrapper.extend(as_unprivileged_with(caps));
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        ProxyProcess::start_wrapped(&wrapper, &args)
    };
    let proxy = start(&caps)?;
    exact_runs(&runtime, &topology, &proxy, &server, (2, 4, "deployed capabilities"))?;
    drop(proxy);
    for missing in ["BPF", "NET_ADMIN", "PERFMON"] {
        let fewer = caps.iter().filter(|c| *c != missing).cloned().collect();
        match start(&fewer) {
            Ok(_) => anyhow::bail!("the packet plane started without CAP_{missing}"),
            Err(error) => ensure!(
                error.to_string().contains("the packet data plane could not start"),
                "without CAP_{missing}: {error:#}"
            ),
        }
    }
    Ok(())
}

/// After a thousand connections, a hundred at once, every flow entry and
/// every socket of the proxy's is gone once the entries' linger and quiet
/// time has passed, and the proxy holds the descriptors it held before.
#[test]
fn many_connections_leave_no_flow_entry_and_no_descriptor_behind() -> Result<()> {
    const AT_ONCE: usize = 100;
    let connections = knob("SPLICE_PROXY_PACKET_CONNECTIONS", 1000)?;
    let topology = LineTopology::create()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let _guard = runtime.enter();
    let server = std::sync::Arc::new(topology.transfer_server()?);
    let mut proxy = packet_proxy(&topology, &server)?;
    let pid = proxy.pid().as_raw();
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map(Iterator::count);
    let fds_before = fds()?;
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..connections {
        let socket = in_netns(&topology.client, tokio::net::TcpSocket::new_v4)??;
        let (server, limit, addr) =
            (std::sync::Arc::clone(&server), std::sync::Arc::clone(&limit), proxy.addr());
        tasks.spawn(async move {
            let _slot = limit.acquire_owned().await?;
            let stream = socket.connect(addr).await?;
            let transfer = run_transfer_on(stream, &server, 256 << 10, 256 << 10, Order::Concurrent);
            tokio::time::timeout(Duration::from_secs(60), transfer)
                .await
                .context("stalled")?
                .with_context(|| format!("connection {i}"))
        });
    }
    runtime.block_on(async {
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        anyhow::Ok(())
    })?;
    let closed = runtime.block_on(proxy.wait_closed(connections, Duration::from_secs(30)))?;
    let spliced = closed.iter().filter(|c| c["kernel_bytes"].as_u64() > Some(0)).count();
    ensure!(spliced > 0, "none of {connections} connections was spliced");
    // Linger (2 s) and quiet (3 s) after the last end, then gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (entries, now) = (bpf_maps::packet_flow_entries(pid)?, fds()?);
        if entries == 0 && now <= fds_before {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{entries} flow entries and {now} descriptors (was {fds_before}) left after {connections} connections"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let totals = totals(&runtime, &mut proxy)?;
    eprintln!("{connections} connections, {spliced} spliced: {totals}");
    Ok(())
}

/// Waits until the proxy has spliced `n` connections in all (its metrics).
async fn spliced(proxy: &ProxyProcess, n: f64) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let spliced = proxy.metrics().await?.count("splice_proxy_packet_spliced_total", &[]);
        if spliced >= n {
            return Ok(());
        }
        ensure!(tokio::time::Instant::now() < deadline, "{spliced} spliced, waited for {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Once a connection is spliced, a reset from either end reaches the other
/// as a reset (not an EOF), and the access line says which side reset.
#[test]
fn a_reset_each_way_reaches_the_other_end_once_spliced() -> Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let topology = LineTopology::create()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let _guard = runtime.enter();
    let upstream = in_netns(&topology.upstream, || {
        std::net::TcpListener::bind((LineTopology::UPSTREAM_ADDR, 0)).and_then(|l| {
            l.set_nonblocking(true)?;
            Ok(l)
        })
    })??;
    let upstream = tokio::net::TcpListener::from_std(upstream)?;
    let listen = format!("{}:0", LineTopology::PROXY_CLIENT_SIDE_ADDR);
    let upstream_addr = upstream.local_addr()?.to_string();
    let args = ["--listen", &listen, "--upstream", &upstream_addr, "--dataplane", "packet", "--no-sni-check"];
    let proxy = ProxyProcess::start_in_netns(&topology.proxy, &args)?;
    for (n, client_resets) in [(1.0, true), (2.0, false)] {
        let socket = in_netns(&topology.client, tokio::net::TcpSocket::new_v4)??;
        runtime
            .block_on(async {
                let mut client = socket.connect(proxy.addr()).await?;
                client.write_all(b"hello").await?;
                let mut accepted = splice_proxy_tests::accept_with_data(&upstream).await?;
                accepted.read_exact(&mut [0; 5]).await?;
                spliced(&proxy, n).await?;
                // Bytes both ways through the program first.
                accepted.write_all(b"spliced").await?;
                client.read_exact(&mut [0; 7]).await?;
                client.write_all(b"too").await?;
                accepted.read_exact(&mut [0; 3]).await?;
                let (resetting, other) = if client_resets { (client, accepted) } else { (accepted, client) };
                resetting.set_zero_linger()?;
                drop(resetting);
                let mut other = other;
                let read =
                    tokio::time::timeout(Duration::from_secs(10), other.read_to_end(&mut Vec::new())).await?;
                let error = read.expect_err("a clean EOF instead of the reset");
                ensure!(error.kind() == std::io::ErrorKind::ConnectionReset, "the other end saw {error}");
                anyhow::Ok(())
            })
            .with_context(|| format!("the {} resets", if client_resets { "client" } else { "upstream" }))?;
    }
    let closed = runtime.block_on(proxy.wait_closed(2, Duration::from_secs(10)))?;
    let reasons: Vec<_> = closed.iter().map(|c| c["reason"].as_str().unwrap_or_default()).collect();
    ensure!(reasons == ["client_reset", "upstream_reset"], "reasons {reasons:?}");
    Ok(())
}

/// A PROXY v2 header the proxy reads before forwarding is not part of the
/// client's stream to the upstream: the sequence offset absorbs it.
#[test]
fn a_proxy_v2_header_in_front_is_absorbed_by_the_offset() -> Result<()> {
    use tokio::io::AsyncWriteExt as _;
    let topology = LineTopology::create()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let _guard = runtime.enter();
    let server = topology.transfer_server()?;
    let listen = format!("{}:0", LineTopology::PROXY_CLIENT_SIDE_ADDR);
    let upstream = server.addr.to_string();
    let args = [
        "--listen",
        &listen,
        "--upstream",
        &upstream,
        "--dataplane",
        "packet",
        "--no-sni-check",
        "--proxy-protocol",
        "required",
    ];
    let proxy = ProxyProcess::start_in_netns(&topology.proxy, &args)?;
    let header = splice_proxy_tests::edge::v2_proxy(
        "203.0.113.9:40000".parse()?,
        proxy.addr(),
        &[splice_proxy_tests::edge::vpce_tlv("vpce-0123456789abcdef0")],
    );
    for (up, down) in [(MIB, 4 * MIB), (8 * MIB, MIB)] {
        let socket = in_netns(&topology.client, tokio::net::TcpSocket::new_v4)??;
        runtime.block_on(async {
            let mut stream = socket.connect(proxy.addr()).await?;
            stream.write_all(&header).await?;
            run_transfer_on(stream, &server, up, down, Order::Concurrent).await
        })?;
    }
    let closed = runtime.block_on(proxy.wait_closed(2, Duration::from_secs(10)))?;
    for line in &closed {
        ensure!(line["reason"] == "completed" && line["kernel_bytes"].as_u64() > Some(0), "{line}");
        let up = line["bytes_up"].as_u64().unwrap_or(0);
        ensure!(
            up == MIB + HEADER || up == 8 * MIB + HEADER,
            "the PROXY header was counted upstream: {line}"
        );
    }
    Ok(())
}

/// The proxy killed mid-flow (SIGKILL): its links go with it, so each end's
/// next packet meets no socket in the proxy's namespace and draws a RST
/// from its stack. Both ends see the connection fail; nothing hangs.
#[test]
fn a_proxy_killed_mid_flow_leaves_both_ends_reset_not_hanging() -> Result<()> {
    let topology = LineTopology::create()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let _guard = runtime.enter();
    let server = topology.transfer_server()?;
    let proxy = packet_proxy(&topology, &server)?;
    let socket = in_netns(&topology.client, tokio::net::TcpSocket::new_v4)??;
    let outcome = runtime.block_on(async {
        let stream = socket.connect(proxy.addr()).await?;
        // Paced, so the transfer is still running when the proxy dies.
        let transfer = run_paced_transfer_on(
            stream,
            &server,
            256 * MIB,
            256 * MIB,
            Order::Concurrent,
            Pace::Alternating,
        );
        let mut transfer = std::pin::pin!(transfer);
        tokio::select! {
            done = &mut transfer => anyhow::bail!("the transfer ended before the kill: {done:?}"),
            spliced = spliced(&proxy, 1.0) => spliced?,
        }
        proxy.signal(nix::sys::signal::Signal::SIGKILL)?;
        anyhow::Ok(tokio::time::timeout(Duration::from_secs(20), transfer).await)
    })?;
    let result = outcome.context("the transfer hung after the proxy was killed")?;
    let error = result.err().context("the transfer completed although the proxy was killed")?;
    let reset = error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset)
    });
    ensure!(reset, "the client's end failed otherwise than by a reset: {error:#}");
    Ok(())
}

/// How a connection negotiated differently on its two sides must come out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Spliced,
    FallsBack(&'static str),
}

/// The two connections negotiated differently: window scales (different
/// `tcp_rmem` in the end namespaces), MSS (a smaller MTU on the client's
/// side), SACK on one side only (over a lossy link, so SACK blocks flow).
/// Each is exact; it is spliced, or falls back with the reason asserted.
#[test]
fn connections_negotiated_differently_are_exact_spliced_or_fall_back_with_their_reason() -> Result<()> {
    use splice_proxy_tests::netns::ip;
    type Setup = fn(&LineTopology) -> Result<()>;
    let cases: [(&str, Setup, bool, Expect); 3] = [
        (
            "window scales differ",
            |t| {
                LineTopology::sysctl(&t.client, "net.ipv4.tcp_rmem=4096 65536 131072")?;
                LineTopology::sysctl(&t.upstream, "net.ipv4.tcp_rmem=4096 131072 33554432")
            },
            false,
            Expect::Spliced,
        ),
        (
            "a smaller MTU on the client's side",
            |t| {
                ip(&["-n", &t.client, "link", "set", "to-proxy", "mtu", "1400"])?;
                ip(&["-n", &t.proxy, "link", "set", "to-client", "mtu", "1400"])
            },
            false,
            Expect::FallsBack("mss_differs"),
        ),
        (
            "SACK on the client's side only",
            |t| LineTopology::sysctl(&t.upstream, "net.ipv4.tcp_sack=0"),
            true,
            Expect::Spliced,
        ),
    ];
    for (what, setup, lossy, expect) in cases {
        let topology = LineTopology::create()?;
        setup(&topology).with_context(|| format!("{what}: setting up"))?;
        let _lossy = if lossy {
            vec![
                in_netns(&topology.proxy, || LossyLink::attach("to-client"))??,
                in_netns(&topology.proxy, || LossyLink::attach("to-upstream"))??,
            ]
        } else {
            Vec::new()
        };
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let _guard = runtime.enter();
        let server = topology.transfer_server()?;
        let mut proxy = packet_proxy(&topology, &server)?;
        match expect {
            Expect::Spliced => exact_runs(&runtime, &topology, &proxy, &server, (2, 16, what))?,
            Expect::FallsBack(reason) => {
                run_all(&runtime, &topology, &proxy, &server, &[(16 * MIB, 16 * MIB, Order::Concurrent)])?;
                let totals = totals(&runtime, &mut proxy)?;
                ensure!(
                    totals["spliced"] == 0 && totals["fallbacks"] == format!("{reason}=1"),
                    "{what}: not {reason}: {totals}"
                );
            }
        }
    }
    Ok(())
}

/// The upstream vanishes mid-flow (its interface goes down, as when an ENI
/// is detached): the client's bytes wait for an acknowledgement that does
/// not come; after `--tcp-user-timeout` the proxy ends the connection as
/// the upstream's error and lets go of it, so the client's next
/// retransmission draws a RST. Nothing hangs.
#[test]
fn an_upstream_that_vanishes_mid_flow_ends_as_its_error_and_the_client_is_reset() -> Result<()> {
    let topology = LineTopology::create()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let _guard = runtime.enter();
    let server = topology.transfer_server()?;
    let listen = format!("{}:0", LineTopology::PROXY_CLIENT_SIDE_ADDR);
    let upstream = server.addr.to_string();
    let args = [
        "--listen",
        &listen,
        "--upstream",
        &upstream,
        "--dataplane",
        "packet",
        "--no-sni-check",
        "--tcp-user-timeout",
        "2s",
    ];
    let proxy = ProxyProcess::start_in_netns(&topology.proxy, &args)?;
    let socket = in_netns(&topology.client, tokio::net::TcpSocket::new_v4)??;
    let outcome = runtime.block_on(async {
        let stream = socket.connect(proxy.addr()).await?;
        let transfer =
            run_paced_transfer_on(stream, &server, 256 * MIB, 256 * MIB, Order::Concurrent, Pace::Alternating);
        let mut transfer = std::pin::pin!(transfer);
        tokio::select! {
            done = &mut transfer => anyhow::bail!("the transfer ended before the upstream vanished: {done:?}"),
            spliced = spliced(&proxy, 1.0) => spliced?,
        }
        splice_proxy_tests::netns::ip(&["-n", &topology.upstream, "link", "set", "to-proxy", "down"])?;
        anyhow::Ok(tokio::time::timeout(Duration::from_secs(30), transfer).await)
    })?;
    let result = outcome.context("the client hung after the upstream vanished")?;
    let error = result.err().context("the transfer completed although the upstream vanished")?;
    let reset = error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset)
    });
    ensure!(reset, "the client's end failed otherwise than by a reset: {error:#}");
    let closed = runtime.block_on(proxy.wait_closed(1, Duration::from_secs(10)))?;
    ensure!(closed[0]["reason"] == "upstream_error", "{}", closed[0]);
    Ok(())
}
