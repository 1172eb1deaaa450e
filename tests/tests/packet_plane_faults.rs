//! The packet plane's faults, end to end (the bench:
//! `splice_proxy_tests::packet_lab`): a reset each way, once spliced,
//! reaches the other end; the proxy killed mid-flow, and an upstream that
//! vanishes mid-flow, leave the client reset, not hanging; the deployed
//! capabilities run the plane as an unprivileged user, and it cannot start
//! without each of the BPF ones. Runs as root.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use splice_proxy_tests::{
    capabilities::{UNIT, as_unprivileged_with, repo_file, unit_capabilities},
    netns::{LineTopology, in_netns, ip},
    packet_lab::{Lab, spliced},
    process::ProxyProcess,
};

/// Once a connection is spliced, a reset from either end reaches the other
/// as a reset (not an EOF), and the access line says which side reset.
#[test]
fn a_reset_each_way_reaches_the_other_end_once_spliced() -> Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let lab = Lab::new()?;
    let upstream = in_netns(&lab.topology.upstream, || {
        std::net::TcpListener::bind((LineTopology::UPSTREAM_ADDR, 0)).and_then(|l| {
            l.set_nonblocking(true)?;
            Ok(l)
        })
    })??;
    let upstream = {
        let _guard = lab.runtime.enter();
        tokio::net::TcpListener::from_std(upstream)?
    };
    let listen = format!("{}:0", LineTopology::PROXY_CLIENT_SIDE_ADDR);
    let upstream_addr = upstream.local_addr()?.to_string();
    let args = ["--listen", &listen, "--upstream", &upstream_addr, "--dataplane", "packet", "--no-sni-check"];
    let proxy = ProxyProcess::start_in_netns(&lab.topology.proxy, &args)?;
    // Each connection's client address, with the reason its line must give.
    let mut expected = Vec::new();
    for (n, client_resets) in [(1.0, true), (2.0, false)] {
        let socket = lab.client_socket()?;
        let reason = if client_resets { "client_reset" } else { "upstream_reset" };
        lab.runtime
            .block_on(async {
                let mut client = socket.connect(proxy.addr()).await?;
                expected.push((client.local_addr()?.to_string(), reason));
                client.write_all(b"hello").await?;
                let mut accepted = splice_proxy_tests::accept_with_data(&upstream).await?;
                accepted.read_exact(&mut [0; 5]).await?;
                spliced(&proxy, n).await?;
                // Bytes both ways through the program first.
                accepted.write_all(b"spliced").await?;
                client.read_exact(&mut [0; 7]).await?;
                client.write_all(b"too").await?;
                accepted.read_exact(&mut [0; 3]).await?;
                let (resetting, mut other) =
                    if client_resets { (client, accepted) } else { (accepted, client) };
                resetting.set_zero_linger()?;
                drop(resetting);
                let read =
                    tokio::time::timeout(Duration::from_secs(10), other.read_to_end(&mut Vec::new())).await?;
                let error = read.expect_err("a clean EOF instead of the reset");
                ensure!(error.kind() == std::io::ErrorKind::ConnectionReset, "the other end saw {error}");
                anyhow::Ok(())
            })
            .with_context(|| format!("the {} resets", if client_resets { "client" } else { "upstream" }))?;
    }
    let closed = lab.runtime.block_on(proxy.wait_closed(2, Duration::from_secs(10)))?;
    // The lines come in the order the ends were noticed, which the polling
    // does not fix: each is matched by its client address.
    for (client, reason) in &expected {
        let line = closed
            .iter()
            .find(|c| c["span"]["client"] == client.as_str())
            .with_context(|| format!("no line for {client}: {closed:?}"))?;
        ensure!(line["reason"] == *reason, "{client}: {line}");
    }
    Ok(())
}

/// The proxy killed mid-flow (SIGKILL): its links go with it, so the
/// client's next packet meets no socket in the proxy's namespace and draws
/// a RST from its stack. Nothing hangs.
#[test]
fn a_proxy_killed_mid_flow_leaves_the_client_reset_not_hanging() -> Result<()> {
    let lab = Lab::new()?;
    let proxy = lab.proxy(&[])?;
    let kill = || proxy.signal(nix::sys::signal::Signal::SIGKILL);
    lab.client_reset_after(&proxy, kill, Duration::from_secs(20))
}

/// The upstream vanishes mid-flow (its interface goes down, as when an ENI
/// is detached): the client repeats itself to a silent upstream; after
/// `--tcp-user-timeout` the proxy ends the connection as the upstream's
/// error and lets go of it, so the client's next packet draws a RST.
#[test]
fn an_upstream_that_vanishes_mid_flow_ends_as_its_error_and_the_client_is_reset() -> Result<()> {
    let lab = Lab::new()?;
    let proxy = lab.proxy(&["--tcp-user-timeout", "2s"])?;
    let vanish = || ip(&["-n", &lab.topology.upstream, "link", "set", "to-proxy", "down"]);
    lab.client_reset_after(&proxy, vanish, Duration::from_secs(30))?;
    let closed = lab.runtime.block_on(proxy.wait_closed(1, Duration::from_secs(10)))?;
    ensure!(closed[0]["reason"] == "upstream_error", "{}", closed[0]);
    Ok(())
}

/// The packet plane needs no capability beyond the four the unit and the
/// DaemonSet grant (tests/deploy_capabilities checks the files agree): an
/// unprivileged user holding exactly those splices; without CAP_BPF,
/// CAP_NET_ADMIN or CAP_PERFMON the plane refuses to start, saying so.
#[test]
fn the_deployed_capabilities_run_the_packet_plane_and_each_bpf_one_is_needed() -> Result<()> {
    let caps = unit_capabilities(&repo_file(UNIT)?, "AmbientCapabilities")?;
    let lab = Lab::new()?;
    let listen = format!("{}:0", LineTopology::PROXY_CLIENT_SIDE_ADDR);
    let upstream = lab.server.addr.to_string();
    let args = ["--listen", &listen, "--upstream", &upstream, "--dataplane", "packet", "--no-sni-check"];
    let start = |caps: &std::collections::BTreeSet<String>| {
        let mut wrapper = vec!["ip".to_owned(), "netns".into(), "exec".into(), lab.topology.proxy.clone()];
        wrapper.extend(as_unprivileged_with(caps));
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        ProxyProcess::start_wrapped(&wrapper, &args)
    };
    let proxy = start(&caps)?;
    lab.exact_runs(&proxy, (2, 4, "deployed capabilities"))?;
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
