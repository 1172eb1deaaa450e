//! The packet plane's faults, end to end (the bench:
//! `splice_proxy_tests::packet_lab`): a reset each way, once spliced,
//! reaches the other end; the proxy killed mid-flow, and an upstream that
//! vanishes mid-flow, leave the client reset, not hanging; a proxy killed,
//! or reaching its drain timeout, resets both ends of quiet spliced
//! connections at once; the deployed
//! capabilities run the plane as an unprivileged user, and it cannot start
//! without each of the BPF ones. Runs as root.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use splice_proxy::kernel::LossyLink;
use splice_proxy_tests::{
    capabilities::{UNIT, as_unprivileged_with, repo_file, unit_capabilities},
    netns::{LineTopology, in_netns, ip},
    packet_lab::{Lab, reset_within},
    process::ProxyProcess,
};

/// Once a connection is spliced, a reset from either end reaches the other
/// as a reset (not an EOF), and the access line says which side reset.
#[test]
fn a_reset_each_way_reaches_the_other_end_once_spliced() -> Result<()> {
    let lab = Lab::new()?;
    let upstream = lab.plain_upstream()?;
    let proxy = lab.proxy_to(&upstream.local_addr()?.to_string(), &[])?;
    // Each connection's client address, with the reason its line must give.
    let mut expected = Vec::new();
    for (n, client_resets) in [(1.0, true), (2.0, false)] {
        let reason = if client_resets { "client_reset" } else { "upstream_reset" };
        lab.runtime
            .block_on(async {
                let (client, accepted) = lab.spliced_pair(&proxy, &upstream, n).await?;
                expected.push((client.local_addr()?.to_string(), reason));
                let (resetting, mut other) =
                    if client_resets { (client, accepted) } else { (accepted, client) };
                resetting.set_zero_linger()?;
                drop(resetting);
                reset_within(&mut other, Duration::from_secs(10)).await
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
    lab.client_reset_after(&proxy, kill, Duration::from_secs(5))
}

/// How soon both ends of a quiet spliced connection must be reset once the
/// proxy lets go of it: at once, not when they next send (a watch may not
/// for minutes).
const QUIET_ENDS_RESET_WITHIN: Duration = Duration::from_secs(2);

/// Quiet spliced connections (watches) through a proxy that is SIGKILLed:
/// its reset helper resets both ends of each at once.
#[test]
fn a_proxy_killed_resets_both_ends_of_its_quiet_spliced_connections_at_once() -> Result<()> {
    let lab = Lab::new()?;
    let upstream = lab.plain_upstream()?;
    let proxy = lab.proxy_to(&upstream.local_addr()?.to_string(), &[])?;
    lab.runtime.block_on(async {
        let mut pairs = Vec::new();
        for n in 1..=3 {
            pairs.push(lab.spliced_pair(&proxy, &upstream, f64::from(n)).await?);
        }
        proxy.signal(nix::sys::signal::Signal::SIGKILL)?;
        for (i, (client, accepted)) in pairs.iter_mut().enumerate() {
            reset_within(client, QUIET_ENDS_RESET_WITHIN).await.with_context(|| format!("client {i}"))?;
            reset_within(accepted, QUIET_ENDS_RESET_WITHIN).await.with_context(|| format!("upstream {i}"))?;
        }
        anyhow::Ok(())
    })
}

/// A quiet spliced connection still open at the drain timeout: the proxy
/// cuts it as on every plane (access line `stopped`), and both ends are
/// reset then, not before and not later; the proxy exits 0.
#[test]
fn a_drain_timeout_resets_both_ends_of_a_quiet_spliced_connection() -> Result<()> {
    let lab = Lab::new()?;
    let upstream = lab.plain_upstream()?;
    let drain_timeout = Duration::from_secs(2);
    let timeout = format!("{}s", drain_timeout.as_secs());
    let args = ["--drain-delay", "0s", "--drain-timeout", &timeout];
    let mut proxy = lab.proxy_to(&upstream.local_addr()?.to_string(), &args)?;
    lab.runtime.block_on(async {
        let (mut client, mut accepted) = lab.spliced_pair(&proxy, &upstream, 1.0).await?;
        proxy.signal(nix::sys::signal::Signal::SIGTERM)?;
        let term = std::time::Instant::now();
        reset_within(&mut client, drain_timeout + QUIET_ENDS_RESET_WITHIN).await.context("the client")?;
        ensure!(term.elapsed() >= drain_timeout, "the client was reset {:?} after SIGTERM", term.elapsed());
        reset_within(&mut accepted, QUIET_ENDS_RESET_WITHIN).await.context("the upstream")?;
        let status = proxy.wait_exit(Duration::from_secs(10)).await?;
        ensure!(status.success(), "the proxy exited with {status}");
        let closed = proxy.wait_closed(1, Duration::from_secs(1)).await?;
        ensure!(closed[0]["reason"] == "stopped", "{}", closed[0]);
        anyhow::Ok(())
    })
}

/// Keepalive in seconds, for the tests of quiet spliced connections: a
/// quiet end probed after 1 s, every second, gone after 2 probes.
const FAST_KEEPALIVE: [&str; 6] =
    ["--tcp-keepalive-idle", "1s", "--tcp-keepalive-interval", "1s", "--tcp-keepalive-count", "2"];

/// A quiet spliced connection (a watch): the proxy's sockets are silent,
/// so its keepalive probes each end itself once that end has been quiet for
/// `--tcp-keepalive-idle`, and each end answers (its packets are counted
/// in its flow entry); the connection is still exact afterwards. When the
/// upstream stops answering (its interface down), it is gone after
/// `--tcp-keepalive-count` probes: the connection ends as its error and the
/// client is reset.
#[test]
fn quiet_spliced_connections_are_kept_alive_by_probes_and_end_when_an_end_stops_answering() -> Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let lab = Lab::new()?;
    let upstream = lab.plain_upstream()?;
    let proxy = lab.proxy_to(&upstream.local_addr()?.to_string(), &FAST_KEEPALIVE)?;
    let pid = proxy.pid().as_raw();
    let packets = || -> Result<Vec<u64>> {
        let mut flows = splice_proxy_tests::bpf_maps::packet_flows(pid)?;
        flows.sort_by_key(|(key, _)| key.remote_port);
        Ok(flows.iter().map(|(_, flow)| flow.packets).collect())
    };
    lab.runtime.block_on(async {
        let (mut client, mut accepted) = lab.spliced_pair(&proxy, &upstream, 1.0).await?;
        let before = packets()?;
        ensure!(before.len() == 2, "{} flow entries", before.len());
        // Quiet for four idle times: each end probed and answering.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let after = packets()?;
        ensure!(
            after.iter().zip(&before).all(|(a, b)| a >= &(b + 2)),
            "packets of each end before {before:?}, after 4 s quiet {after:?}: not answering probes"
        );
        accepted.write_all(b"still").await?;
        let mut five = [0; 5];
        client.read_exact(&mut five).await?;
        client.write_all(b"here").await?;
        accepted.read_exact(&mut [0; 4]).await?;
        ensure!(&five == b"still", "the client read {five:?}");
        // The upstream stops answering: gone after idle + 2 probes.
        ip(&["-n", &lab.topology.upstream, "link", "set", "to-proxy", "down"])?;
        reset_within(&mut client, Duration::from_secs(8))
            .await
            .context("the client, once the upstream was gone")?;
        let closed = proxy.wait_closed(1, Duration::from_secs(5)).await?;
        ensure!(closed[0]["reason"] == "upstream_error", "{}", closed[0]);
        anyhow::Ok(())
    })
}

/// The upstream's socket of a quiet spliced connection goes without a word
/// (closed in repair mode): once the ends are probed, the upstream's stack
/// answers the client's answer (passed on to it) with an exactly numbered
/// RST, and its own probe with a RST numbered for the old socket, which is
/// no sign of life; either way the connection ends as the upstream's
/// (`upstream_reset`, or `upstream_error` after `--tcp-keepalive-count`
/// probes) within the keepalive times, and the client is reset.
#[test]
fn an_end_whose_socket_is_gone_answers_probes_with_resets_and_is_gone() -> Result<()> {
    let lab = Lab::new()?;
    let upstream = lab.plain_upstream()?;
    let proxy = lab.proxy_to(&upstream.local_addr()?.to_string(), &FAST_KEEPALIVE)?;
    lab.runtime.block_on(async {
        let (mut client, accepted) = lab.spliced_pair(&proxy, &upstream, 1.0).await?;
        // Everything the client sent acknowledged first: a retransmission
        // would draw an exactly numbered RST, a reset of its own.
        while splice_proxy::tcpstat::unsent_bytes(&client)? > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        splice_proxy::dataplane::packet::repair::enter(&accepted)?;
        drop(accepted);
        reset_within(&mut client, Duration::from_secs(8))
            .await
            .context("the client, once the upstream was gone")?;
        let closed = proxy.wait_closed(1, Duration::from_secs(5)).await?;
        ensure!(
            closed[0]["reason"] == "upstream_reset" || closed[0]["reason"] == "upstream_error",
            "{}",
            closed[0]
        );
        anyhow::Ok(())
    })
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

/// A client that answers but takes nothing (every segment with data on its
/// way to it dropped at its interface, its own upload and ACKs going out): the upstream repeats itself and the client's packets
/// acknowledge nothing new. The proxy no longer counts the client's upload
/// as a sign of life: after `--tcp-user-timeout` it ends the connection as
/// the client's error and resets both ends, rather than let the flow hang.
#[test]
fn a_client_that_answers_but_acknowledges_nothing_new_is_reset_after_the_user_timeout() -> Result<()> {
    let lab = Lab::new()?;
    let proxy = lab.proxy(&["--tcp-user-timeout", "2s"])?;
    // Every data segment arriving at the client is dropped (an XDP
    // program on its interface); its ACKs and its own upload go out.
    let mut blackhole = None;
    let stuck = || {
        blackhole = Some(in_netns(&lab.topology.client, || LossyLink::dropping("to-proxy", 1000))??);
        Ok(())
    };
    // Within 4 s: the user timeout and a poll. The client's own packets
    // thin out as its retransmission timer backs off, and the first gap of
    // 2 s (after about 3 s) would let the rule for a silent end fire too,
    // but not before 5 s: the limit tells the two rules apart.
    lab.client_reset_after(&proxy, stuck, Duration::from_secs(4))?;
    let closed = lab.runtime.block_on(proxy.wait_closed(1, Duration::from_secs(10)))?;
    ensure!(closed[0]["reason"] == "client_error", "{}", closed[0]);
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
