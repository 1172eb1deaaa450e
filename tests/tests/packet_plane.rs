//! The packet plane end to end: client, proxy and upstream in their own
//! network namespaces over veths, the proxy run with `--dataplane packet`
//! (its program attached to the interfaces of its routes). Transfers of
//! every size and order arrive SHA-256 exact and are carried by the program
//! (each access line counts kernel bytes; the exit totals count every
//! connection spliced). A connection that cannot be spliced stays on splice,
//! exact, with its reason counted. Runs as root.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;
use splice_proxy_tests::{
    netns::{LineTopology, in_netns},
    process::ProxyProcess,
    transfer::{Order, TransferServer, run_transfer_on},
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
