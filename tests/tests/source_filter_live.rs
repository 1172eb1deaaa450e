//! The XDP source filter in a running proxy: client, proxy and upstream in
//! their own network namespaces joined by veth pairs, the filter on the
//! proxy's client-facing veth, two listeners each allowing one of the
//! client's two addresses. Each address moves checksummed bytes through its
//! own listener; its SYNs to the other listener are dropped, every one
//! counted on that listener's port; an invalid config file on SIGHUP is
//! rejected with its reason; a file adding the second address to the first
//! listener lets it in there without a restart (and not the first address
//! into the second listener); the totals logged at exit, per port too, match
//! the program's counters (and so do its metrics), and the program is gone
//! from the interface after the exit.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::sys::signal::Signal;
use proxy_common::PortFilterStats;
use splice_proxy_tests::{
    admin::Exposition,
    bpf_maps::{source_filter_port_stats, source_filter_stats},
    netns::{LineTopology, in_netns, ip, xdp_attachment},
    process::ProxyProcess,
    transfer::{Order, run_transfer_on},
};

/// The second client address, on the same veth as `LineTopology::CLIENT_ADDR`.
const SECOND_ADDR: &str = "192.0.2.3";
/// Long enough for the first SYN and its first retransmission (after 1 s).
const DENIED_WAIT: Duration = Duration::from_millis(2500);
const BYTES: u64 = 256 * 1024;

/// Two listeners on the proxy's client-side address (each on a port of its
/// own), with these allow lists.
fn write_config(file: &mut tempfile::NamedTempFile, first: &[&str], second: &[&str]) -> Result<()> {
    let list = |allowed: &[&str]| allowed.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ");
    let listen = format!("{}:0", LineTopology::PROXY_CLIENT_SIDE_ADDR);
    let text = format!(
        "xdp_interface = \"to-client\"\n\
         [[listeners]]\nlisten = \"{listen}\"\nallowed_source_cidrs = [{}]\n\
         [[listeners]]\nlisten = \"{listen}\"\nallowed_source_cidrs = [{}]\n",
        list(first),
        list(second)
    );
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

/// Connects from `source` to `listener` and checks that it never gets
/// through: its SYNs are dropped. Returns how many it sent (at least the
/// first and one retransmission), once the program has counted as many
/// more drops on `listener`'s port.
fn denied_syns(
    runtime: &tokio::runtime::Runtime,
    client: &str,
    source: &str,
    listener: SocketAddr,
    prog: u32,
) -> Result<u64> {
    let port = listener.port();
    let before = source_filter_port_stats(prog)?.get(&port).copied().context("port not guarded")?;
    let segments_before = tcp_out_segments(client)?;
    let denied = runtime
        .block_on(async { tokio::time::timeout(DENIED_WAIT, connect_from(client, source, listener)).await });
    ensure!(denied.is_err(), "{source} connected to {listener} (or failed fast): {denied:?}");
    let syns = tcp_out_segments(client)? - segments_before;
    ensure!(syns >= 2, "expected a SYN and a retransmission from {source}, the client sent {syns} segments");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = source_filter_port_stats(prog)?.get(&port).copied().unwrap_or_default();
        if now.dropped >= before.dropped + syns {
            ensure!(now.dropped == before.dropped + syns, "{syns} SYNs from {source} to {port}: {now:?}");
            return Ok(syns);
        }
        if Instant::now() > deadline {
            bail!("{syns} SYNs from {source} to {port}, dropped only {before:?} -> {now:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn each_listener_lets_only_its_sources_through_and_sighup_reloads_the_lists() -> Result<()> {
    let topology = LineTopology::create()?;
    let (client, proxy_ns) = (topology.client.as_str(), topology.proxy.as_str());
    ip(&["-n", client, "addr", "add", &format!("{SECOND_ADDR}/24"), "dev", "to-proxy"])?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let _guard = runtime.enter();
    let server = topology.transfer_server()?;
    let mut config = tempfile::NamedTempFile::new()?;
    let (first_allowed, second_allowed) =
        (format!("{}/32", LineTopology::CLIENT_ADDR), format!("{SECOND_ADDR}/32"));
    write_config(&mut config, &[&first_allowed], &[&second_allowed])?;
    let upstream = server.addr.to_string();
    let config_path = config.path().to_str().context("temp path")?.to_owned();
    let mut proxy = ProxyProcess::start_in_netns(
        proxy_ns,
        &["--config", &config_path, "--upstream", &upstream, "--no-sni-check"],
    )?;
    let attached =
        runtime.block_on(proxy.wait_message("XDP source filter attached", Duration::from_secs(1)))?;
    ensure!(attached["mode"] == "native", "veth should run XDP natively: {attached}");
    let on_link = xdp_attachment(proxy_ns, "to-client")?.context("no XDP program on to-client")?;
    ensure!(on_link.mode == "xdp", "{on_link:?}");
    let prog = on_link.prog_id;
    let [first, second] = proxy.listen[..] else { bail!("expected two listeners: {:?}", proxy.listen) };
    let guarded: Vec<u16> = source_filter_port_stats(prog)?.into_keys().collect();
    let mut listening = vec![first.port(), second.port()];
    listening.sort_unstable();
    ensure!(guarded == listening, "guarded ports {guarded:?}, listeners {first} and {second}");

    // Each address to the other's listener: its SYNs are dropped, every one
    // counted on that port (first, while nothing else in the client namespace sends).
    let second_to_first = denied_syns(&runtime, client, SECOND_ADDR, first, prog)?;
    let first_to_second = denied_syns(&runtime, client, LineTopology::CLIENT_ADDR, second, prog)?;
    let syns = second_to_first + first_to_second;
    ensure!(source_filter_stats(prog)?.dropped == syns, "{syns} SYNs sent, {:?}", source_filter_stats(prog)?);

    // Each address to its own listener: bytes through the proxy, each way, checksummed.
    let transfer = |source: &'static str, listener: SocketAddr| {
        runtime.block_on(async {
            let stream = connect_from(client, source, listener).await?;
            let run = run_transfer_on(stream, &server, BYTES, BYTES, Order::Concurrent);
            tokio::time::timeout(Duration::from_secs(30), run).await.context("transfer stalled")?
        })
    };
    transfer(LineTopology::CLIENT_ADDR, first).context("the first address to the first listener")?;
    transfer(SECOND_ADDR, second).context("the second address to the second listener")?;
    let after_allowed = source_filter_stats(prog)?;
    ensure!(after_allowed.allowed > 0 && after_allowed.dropped == syns, "{after_allowed:?}");
    let ports = source_filter_port_stats(prog)?;
    let port = |ports: &BTreeMap<u16, PortFilterStats>, p: u16| ports.get(&p).copied().unwrap_or_default();
    let (on_first, on_second) = (port(&ports, first.port()), port(&ports, second.port()));
    ensure!(on_first.allowed > 0 && on_first.dropped == second_to_first, "{on_first:?}");
    ensure!(on_second.allowed > 0 && on_second.dropped == first_to_second, "{on_second:?}");

    // An invalid file is rejected with its reason; the old lists stay.
    write_config(&mut config, &[&first_allowed, "192.0.2.3/33"], &[&second_allowed])?;
    proxy.signal(Signal::SIGHUP)?;
    let rejected = runtime.block_on(proxy.wait_message(
        "SIGHUP: configuration rejected; the running configuration stays in force",
        Duration::from_secs(5),
    ))?;
    let reason = rejected["error"].as_str().unwrap_or_default();
    ensure!(reason.contains("192.0.2.3/33") && reason.contains("listeners[0]"), "{rejected}");

    // A file adding the second address to the first listener lets it in
    // there, without a restart; the second listener's list is unchanged.
    write_config(&mut config, &[&first_allowed, &second_allowed], &[&second_allowed])?;
    proxy.signal(Signal::SIGHUP)?;
    let reloaded =
        runtime.block_on(proxy.wait_message("SIGHUP: source lists reloaded", Duration::from_secs(5)))?;
    let added = format!("[\"{second_allowed} to port {}\"]", first.port());
    ensure!(reloaded["added"] == added && reloaded["removed"] == "[]", "{reloaded}");
    ensure!(reloaded["dropped"].as_u64() == Some(syns), "the reload reports other counters: {reloaded}");
    transfer(SECOND_ADDR, first).context("the address added by SIGHUP")?;
    transfer(LineTopology::CLIENT_ADDR, first).context("the first address after the reload")?;
    let still_denied = denied_syns(&runtime, client, LineTopology::CLIENT_ADDR, second, prog)?;
    let syns = syns + still_denied;

    // The metrics endpoint (inside the proxy's namespace) reads the same counters.
    let admin = proxy.admin.context("no admin endpoint logged")?;
    let (status, body) = runtime.block_on(async {
        let socket = in_netns(proxy_ns, tokio::net::TcpSocket::new_v4)??;
        splice_proxy_tests::admin::get_on(socket.connect(admin).await?, "/metrics").await
    })?;
    ensure!(status == 200, "/metrics answered {status}");
    let metrics = Exposition::parse(&body)?;
    let counted = |result: &str| metrics.count("splice_proxy_xdp_packets_total", &[("result", result)]);
    let on_port = |p: SocketAddr, result: &str| {
        let p = p.port().to_string();
        metrics.count("splice_proxy_xdp_port_packets_total", &[("port", p.as_str()), ("result", result)])
    };
    let now = source_filter_stats(prog)?;
    ensure!(counted("dropped") == syns as f64, "{syns} SYNs dropped, /metrics: {}", counted("dropped"));
    ensure!(
        counted("allowed") >= after_allowed.allowed as f64 && counted("allowed") <= now.allowed as f64,
        "/metrics: {} allowed, the map: {} then {}",
        counted("allowed"),
        after_allowed.allowed,
        now.allowed
    );
    ensure!(on_port(first, "dropped") == second_to_first as f64, "/metrics: {body}");
    ensure!(on_port(second, "dropped") == (first_to_second + still_denied) as f64, "/metrics: {body}");
    ensure!(on_port(first, "allowed") > on_first.allowed as f64, "/metrics: {body}");

    proxy.signal(Signal::SIGTERM)?;
    let status = runtime.block_on(proxy.wait_exit(Duration::from_secs(40)))?;
    ensure!(status.success(), "proxy exited with {status}");
    let totals = runtime.block_on(proxy.wait_message("xdp source filter totals", Duration::from_secs(1)))?;
    eprintln!("{syns} SYNs dropped; proxy totals: {totals}");
    ensure!(totals["dropped"].as_u64() == Some(syns), "{syns} SYNs dropped, totals {totals}");
    ensure!(
        totals["allowed"].as_u64() > Some(after_allowed.allowed),
        "no packet passed after the reload: {totals}"
    );
    ensure!(totals["passed"].as_u64() >= totals["allowed"].as_u64(), "{totals}");
    let port_totals: BTreeMap<u64, (u64, u64)> = proxy
        .events()
        .iter()
        .filter(|e| splice_proxy_tests::process::message(e) == "xdp source filter port totals")
        .filter_map(|e| Some((e["port"].as_u64()?, (e["allowed"].as_u64()?, e["dropped"].as_u64()?))))
        .collect();
    let dropped_on = |p: SocketAddr| port_totals.get(&u64::from(p.port())).map(|(_, dropped)| *dropped);
    ensure!(port_totals.len() == 2, "{port_totals:?}");
    ensure!(dropped_on(first) == Some(second_to_first), "{port_totals:?}");
    ensure!(dropped_on(second) == Some(first_to_second + still_denied), "{port_totals:?}");
    ensure!(
        port_totals.values().map(|(allowed, _)| allowed).sum::<u64>()
            == totals["allowed"].as_u64().unwrap_or(0),
        "per-port allowed {port_totals:?} do not add up to {totals}"
    );
    runtime.block_on(proxy.wait_message("XDP source filter detached", Duration::from_secs(1)))?;
    let left = xdp_attachment(proxy_ns, "to-client")?;
    ensure!(left.is_none(), "an XDP program is still attached after the exit: {left:?}");
    Ok(())
}
