//! The capabilities the deployment files grant are the ones the proxy needs:
//! the systemd unit's ambient set and the DaemonSet's added set are the same
//! four; an unprivileged user holding exactly those (no_new_privs, as the unit
//! sets) binds port 443, loads the kernel programs, runs the default
//! `--dataplane auto` (packet, which has no interface to attach to in a
//! namespace with only lo: splice) and says why, and with `--dataplane
//! sockmap` moves bytes in the kernel; without CAP_BPF, CAP_NET_ADMIN or
//! CAP_PERFMON an explicit `--dataplane sockmap` cannot start while `auto`
//! still runs on splice, and without
//! CAP_NET_BIND_SERVICE port 443 cannot be bound.
//! Runs as root (setpriv) in its own network namespace.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use splice_proxy_tests::{
    capabilities::{
        DAEMONSET, UNIT, as_unprivileged_with, daemonset_capabilities, repo_file, unit_capabilities,
    },
    netns::NetNs,
    process::{ProxyProcess, message},
};

/// The proxy on port 443 as the unprivileged user with `caps`, on `plane`
/// (`auto` when None, the default).
fn start(caps: &BTreeSet<String>, upstream: &str, plane: Option<&str>) -> Result<ProxyProcess> {
    let wrapper = as_unprivileged_with(caps);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut args = vec!["--listen", "127.0.0.1:443", "--upstream", upstream, "--no-sni-check"];
    args.extend(plane.map(|plane| ["--dataplane", plane]).iter().flatten());
    ProxyProcess::start_wrapped(&wrapper, &args)
}

/// The plane the proxy logged it serves on, and why.
fn plane_in_use(proxy: &ProxyProcess) -> Result<(String, String)> {
    let events = proxy.events();
    let event = events.iter().find(|e| message(e) == "data plane").context("no \"data plane\" line")?;
    let field = |name: &str| event[name].as_str().map(str::to_owned).with_context(|| format!("{event}"));
    Ok((field("dataplane")?, field("why")?))
}

/// Proxies one echo of `len` bytes, then stops the proxy; returns the bytes
/// its close line says the kernel moved.
fn echo_then_stop(mut proxy: ProxyProcess, upstream: &TcpListener, len: usize) -> Result<u64> {
    echo_through(proxy.addr(), upstream, len)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let closed = rt.block_on(proxy.wait_closed(1, Duration::from_secs(10)))?;
    let kernel_bytes =
        closed[0]["kernel_bytes"].as_u64().with_context(|| format!("no kernel_bytes: {closed:?}"))?;
    proxy.signal(nix::sys::signal::Signal::SIGINT)?;
    let exit = rt.block_on(proxy.wait_exit(Duration::from_secs(10)))?;
    ensure!(exit.success(), "exit {exit}");
    Ok(kernel_bytes)
}

/// One connection through the proxy: `len` bytes up, the same bytes echoed down.
fn echo_through(proxy: std::net::SocketAddr, upstream: &TcpListener, len: usize) -> Result<()> {
    let sent: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    std::thread::scope(|scope| {
        let echo = scope.spawn(|| -> Result<()> {
            // Skip the proxy's readiness probes: they connect and close without data.
            loop {
                let (mut stream, _) = upstream.accept()?;
                let mut got = Vec::new();
                stream.read_to_end(&mut got)?;
                if !got.is_empty() {
                    stream.write_all(&got)?;
                    return Ok(());
                }
            }
        });
        let mut client = TcpStream::connect(proxy)?;
        client.set_read_timeout(Some(Duration::from_secs(30)))?;
        client.write_all(&sent)?;
        client.shutdown(Shutdown::Write)?;
        let mut got = Vec::new();
        client.read_to_end(&mut got)?;
        echo.join().map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
        ensure!(got == sent, "{} bytes came back of {len}, or different ones", got.len());
        Ok(())
    })
}

#[test]
fn the_deployed_capabilities_are_enough_and_each_is_needed() -> Result<()> {
    let _ns = NetNs::enter()?;
    let unit = repo_file(UNIT)?;
    let caps = unit_capabilities(&unit, "AmbientCapabilities")?;
    assert_eq!(caps, unit_capabilities(&unit, "CapabilityBoundingSet")?, "{UNIT}: ambient and bounding sets");
    assert_eq!(caps, daemonset_capabilities(&repo_file(DAEMONSET)?)?, "{UNIT} against {DAEMONSET}");
    let expected: BTreeSet<String> =
        ["BPF", "NET_ADMIN", "NET_BIND_SERVICE", "PERFMON"].map(str::to_owned).into();
    assert_eq!(caps, expected);

    let upstream = TcpListener::bind("127.0.0.1:0")?;
    let upstream_addr = upstream.local_addr()?.to_string();

    // Exactly the deployed set: port 443, kernel programs; the default plane
    // is packet, here (only lo) splice (it says why), and `--dataplane
    // sockmap` moves bytes in the kernel. The packet plane with this set:
    // tests/packet_plane_faults.rs.
    let proxy = start(&caps, &upstream_addr, None)?;
    let events = proxy.events();
    ensure!(
        events.iter().any(|e| message(e) == "kernel programs loaded and attached"),
        "kernel programs did not load: {events:?}"
    );
    let (plane, why) = plane_in_use(&proxy)?;
    ensure!(
        plane == "splice" && why.starts_with("auto: splice, because the packet plane could not start"),
        "auto chose {plane}: {why}"
    );
    echo_then_stop(proxy, &upstream, 1 << 20)?;
    let proxy = start(&caps, &upstream_addr, Some("sockmap"))?;
    let (plane, _) = plane_in_use(&proxy)?;
    ensure!(plane == "sockmap", "--dataplane sockmap ran {plane}");
    let kernel_bytes = echo_then_stop(proxy, &upstream, 4 << 20)?;
    ensure!(kernel_bytes > 0, "the sockmap plane moved no byte in the kernel");

    // Each BPF capability left out: the sockmap plane cannot start; auto
    // runs on splice.
    for missing in ["BPF", "NET_ADMIN", "PERFMON"] {
        let fewer: BTreeSet<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        match start(&fewer, &upstream_addr, Some("sockmap")) {
            Ok(_) => bail!("the sockmap plane started without CAP_{missing}"),
            Err(error) => ensure!(
                error.to_string().contains("the sockmap data plane needs the kernel programs"),
                "without CAP_{missing}: {error:#}"
            ),
        }
        let proxy =
            start(&fewer, &upstream_addr, None).with_context(|| format!("auto without CAP_{missing}"))?;
        let (plane, why) = plane_in_use(&proxy)?;
        ensure!(
            plane == "splice" && why.starts_with("auto: splice"),
            "auto without CAP_{missing} chose {plane}: {why}"
        );
        let kernel_bytes = echo_then_stop(proxy, &upstream, 1 << 20)?;
        ensure!(kernel_bytes == 0, "without CAP_{missing}: {kernel_bytes} bytes in the kernel");
    }
    // Without CAP_NET_BIND_SERVICE: port 443 is refused.
    let fewer: BTreeSet<String> = caps.iter().filter(|c| *c != "NET_BIND_SERVICE").cloned().collect();
    match start(&fewer, &upstream_addr, None) {
        Ok(_) => bail!("port 443 was bound without CAP_NET_BIND_SERVICE"),
        Err(error) => ensure!(error.to_string().contains("exit status: 3"), "{error:#}"),
    }
    Ok(())
}
