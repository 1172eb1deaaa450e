//! The packet plane end to end, its correctness gate (the bench:
//! `splice_proxy_tests::packet_lab`): transfers of every size and order
//! arrive SHA-256 exact and are carried by the program (each access line
//! counts kernel bytes; the exit totals count every connection spliced). A
//! connection that cannot be spliced stays on splice, exact, with its reason
//! counted. Stress runs (readers alternating slow and fast) on an idle and
//! on a busy host, and a lossy link each way with SACK and timestamps on and
//! off, every run exact and spliced. Connections negotiated differently
//! (window scales, MSS, SACK on one side) are exact on the program or fall
//! back with their reason. BIG TCP packets (IP total length 0) are spliced
//! and counted to the byte. A PROXY v2 header in front is absorbed by the
//! offset; an SNI route to a second upstream is spliced there. An answer
//! and its close reach the client in one segment, relayed by hand. A slow
//! reader queues nothing in the proxy. A thousand connections (a hundred at once), and 100,000 short
//! ones, leave no flow entry, no descriptor and no memory behind. Its faults:
//! `packet_plane_faults.rs`. Runs as root.
//!
//! Knobs: `SPLICE_PROXY_PACKET_STRESS_RUNS` (per host state, default 50),
//! `SPLICE_PROXY_PACKET_LOSSY_RUNS` (per variant, default 3),
//! `SPLICE_PROXY_PACKET_LOSSY_ONLY` (one variant: `11`, `01`, `10` or `00`,
//! SACK then timestamps), `SPLICE_PROXY_PACKET_CONNECTIONS` (default
//! 1,000), `SPLICE_PROXY_PACKET_SHORT_CONNECTIONS` (default 100,000).

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, Result, ensure};
use splice_proxy::kernel::LossyLink;
use splice_proxy_tests::{
    big_tcp, bpf_maps,
    busy::BusyLoops,
    netns::{LineTopology, in_netns, ip},
    packet_lab::{HEADER, Lab, MIB, knob},
    process::rss_kib,
    transfer::{Order, run_transfer_on},
};

/// (bytes up, bytes down, order) of each connection.
const TRANSFERS: [(u64, u64, Order); 7] = [
    (1, 1, Order::Concurrent),
    (1000, 100_000, Order::Concurrent),
    (4 * MIB, 4 * MIB, Order::Concurrent),
    (256 * MIB, 256 * MIB, Order::Concurrent),
    (MIB, 3 * MIB, Order::ClientFirst),
    (3 * MIB, MIB, Order::UpstreamFirst),
    (0, 16 * MIB, Order::Concurrent),
];

/// A client that sends little and half-closes at once may have done so
/// before the switch: that connection stays on splice (`peer_closed`).
fn closes_at_once(up: u64, order: Order) -> bool {
    up < 64 << 10 && order == Order::Concurrent
}

#[test]
fn every_transfer_is_exact_and_carried_by_the_program() -> Result<()> {
    let lab = Lab::new()?;
    let mut proxy = lab.proxy(&[])?;
    lab.run_all(&proxy, &TRANSFERS)?;
    let closed = lab.runtime.block_on(proxy.wait_closed(TRANSFERS.len(), Duration::from_secs(10)))?;
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
    let totals = lab.totals(&mut proxy)?;
    let spliced = totals["spliced"].as_u64().context("no spliced count")?;
    let fallbacks = totals["fallbacks"].as_str().context("no fallbacks")?;
    let all = TRANSFERS.len() as u64;
    let expected_fallbacks =
        if spliced == all { "none".to_owned() } else { format!("peer_closed={}", all - spliced) };
    let must_splice = TRANSFERS.iter().filter(|&&(up, _, order)| !closes_at_once(up, order)).count() as u64;
    ensure!(
        spliced >= must_splice && fallbacks == expected_fallbacks,
        "every connection spliced but those closed at once: {totals}"
    );
    Ok(())
}

#[test]
fn a_connection_with_timestamps_on_one_side_stays_on_splice_with_its_reason_counted() -> Result<()> {
    let lab = Lab::with(|t| LineTopology::sysctl(&t.client, "net.ipv4.tcp_timestamps=0"))?;
    let mut proxy = lab.proxy(&[])?;
    let transfers =
        [(MIB, 2 * MIB, Order::Concurrent), (5, 0, Order::ClientFirst), (0, 0, Order::Concurrent)];
    lab.run_all(&proxy, &transfers)?;
    let closed = lab.runtime.block_on(proxy.wait_closed(transfers.len(), Duration::from_secs(10)))?;
    for line in &closed {
        ensure!(line["reason"] == "completed" && line["kernel_bytes"] == 0, "on splice: {line}");
    }
    let totals = lab.totals(&mut proxy)?;
    ensure!(
        totals["spliced"] == 0 && totals["fallbacks"] == "timestamps_on_one_side=3",
        "all fell back for their timestamps: {totals}"
    );
    Ok(())
}

/// The stress runs, each connection joined at once, on an idle and on a
/// busy host; then, on the busy host, half as many as deployed: relayed by
/// hand first and joined in the middle of the stream, once it carried
/// enough.
#[test]
fn stress_runs_are_exact_on_an_idle_and_on_a_busy_host() -> Result<()> {
    let runs = knob("SPLICE_PROXY_PACKET_STRESS_RUNS", 50)?;
    let lab = Lab::new()?;
    let proxy = lab.proxy(&[])?;
    lab.exact_runs(&proxy, (runs, 64, "idle host"))?;
    let busy = BusyLoops::on_every_core()?;
    lab.exact_runs(&proxy, (runs, 64, "busy host"))?;
    let deployed = lab.proxy_as_deployed(&[])?;
    lab.exact_runs(&deployed, (runs.div_ceil(2), 64, "busy host, relayed by hand first"))?;
    drop(busy);
    Ok(())
}

/// As deployed, a connection is relayed by hand until it has lived 1 s or
/// carried 1 MiB: short ones end there, exact, never switched and counted
/// `short_lived`; a bulk one is joined in the middle of its stream and one
/// that goes quiet once it has lived long enough, each exact and carried by
/// the program from then on.
#[test]
fn short_connections_end_relayed_by_hand_and_long_ones_are_joined() -> Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let lab = Lab::new()?;
    let mut proxy = lab.proxy_as_deployed(&[])?;
    let short = [(100, 5000, Order::Concurrent), (0, 0, Order::Concurrent), (4000, 100, Order::ClientFirst)];
    lab.run_all(&proxy, &short)?;
    let closed = lab.runtime.block_on(proxy.wait_closed(short.len(), Duration::from_secs(10)))?;
    for line in &closed {
        ensure!(line["reason"] == "completed" && line["kernel_bytes"] == 0, "relayed by hand: {line}");
    }
    let bulk = [(16 * MIB, 16 * MIB, Order::Concurrent), (MIB, 8 * MIB, Order::UpstreamFirst)];
    lab.run_all(&proxy, &bulk)?;
    let closed =
        lab.runtime.block_on(proxy.wait_closed(short.len() + bulk.len(), Duration::from_secs(10)))?;
    // Run at once, so their lines come in either order.
    let bulk_lines = &closed[short.len()..];
    for &(up, down, _) in &bulk {
        ensure!(
            bulk_lines.iter().any(|line| line["reason"] == "completed"
                && line["bytes_up"].as_u64() == Some(up + HEADER)
                && line["bytes_down"].as_u64() == Some(down)
                && line["kernel_bytes"].as_u64() > Some(0)),
            "{up} B up and {down} down exact, and joined once it carried 1 MiB: {bulk_lines:?}"
        );
    }
    let totals = lab.totals(&mut proxy)?;
    ensure!(
        totals["spliced"] == 2 && totals["fallbacks"] == "short_lived=3",
        "the short ones relayed by hand, the bulk ones joined: {totals}"
    );
    // A quiet connection: its hello relayed by hand, joined after 1 s.
    let upstream = lab.plain_upstream()?;
    let mut proxy = lab.start_proxy_as_deployed_to(&upstream.local_addr()?.to_string())?;
    lab.runtime.block_on(async {
        let (mut client, mut accepted) = lab.spliced_pair(&proxy, &upstream, 1.0).await?;
        client.shutdown().await?;
        accepted.read_to_end(&mut Vec::new()).await?;
        accepted.shutdown().await?;
        client.read_to_end(&mut Vec::new()).await?;
        let closed = proxy.wait_closed(1, Duration::from_secs(10)).await?;
        ensure!(
            closed[0]["reason"] == "completed" && closed[0]["kernel_bytes"].as_u64() > Some(0),
            "joined once it had lived 1 s: {}",
            closed[0]
        );
        anyhow::Ok(())
    })?;
    let totals = lab.totals(&mut proxy)?;
    ensure!(totals["spliced"] == 1 && totals["fallbacks"] == "none", "the quiet one joined: {totals}");
    a_chatty_connection_is_joined_after_its_reads(&lab)
}

/// A connection relayed by hand gets keepalive on its upstream socket once
/// it has lived a quarter of `--tcp-keepalive-idle` (1 s at most), not at
/// connect: `ss` in the proxy's namespace shows no keepalive timer there
/// at first, then one.
#[test]
fn a_connection_relayed_by_hand_gets_keepalive_upstream_once_it_has_lived() -> Result<()> {
    let lab = Lab::new()?;
    let upstream = lab.plain_upstream()?;
    let upstream_port = upstream.local_addr()?.port();
    // A quarter of 8 s is more than 1 s: the options come at 1 s.
    let proxy = lab.proxy_to(
        &upstream.local_addr()?.to_string(),
        &["--packet-switch-after", "60s", "--tcp-keepalive-idle", "8s"],
    )?;
    lab.runtime.block_on(async {
        use tokio::io::AsyncWriteExt as _;
        let connected = tokio::time::Instant::now();
        let mut client = lab.client_socket()?.connect(proxy.addr()).await?;
        client.write_all(b"hello").await?;
        let _accepted = splice_proxy_tests::accept_with_data(&upstream).await?;
        let deadline = connected + Duration::from_secs(5);
        let mut first_look = true;
        loop {
            let ss = in_netns(&lab.topology.proxy, || {
                std::process::Command::new("ss")
                    .args(["-Htno", "state", "established", &format!("( dport = :{upstream_port} )")])
                    .output()
            })??;
            let timers = String::from_utf8_lossy(&ss.stdout);
            let keepalive = timers.contains("timer:(keepalive");
            if first_look {
                ensure!(
                    connected.elapsed() < Duration::from_millis(800),
                    "the first look came {:?} after connect, too late to tell",
                    connected.elapsed()
                );
                ensure!(!keepalive, "keepalive set at connect: {timers}");
                first_look = false;
            } else if keepalive {
                return anyhow::Ok(());
            }
            ensure!(tokio::time::Instant::now() < deadline, "no keepalive timer upstream: {timers}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// A client that half-closes while relayed by hand, and an upstream that
/// answers only after the connection is worth the switch: the end already
/// carried, the connection goes to splice for the rest (`short_lived`),
/// which does not send that end again, and completes exact.
#[test]
fn a_connection_half_closed_while_relayed_by_hand_ends_on_splice() -> Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let lab = Lab::new()?;
    let upstream = lab.plain_upstream()?;
    let mut proxy = lab.proxy_to(&upstream.local_addr()?.to_string(), &["--packet-switch-after", "200ms"])?;
    lab.runtime.block_on(async {
        let mut client = lab.client_socket()?.connect(proxy.addr()).await?;
        client.write_all(b"request").await?;
        client.shutdown().await?;
        let mut accepted = splice_proxy_tests::accept_with_data(&upstream).await?;
        let mut request = Vec::new();
        accepted.read_to_end(&mut request).await?;
        ensure!(request == b"request", "the upstream read {request:?}");
        // Past the switch time: the relay hands the half-open connection on.
        tokio::time::sleep(Duration::from_millis(400)).await;
        accepted.write_all(b"late answer").await?;
        accepted.shutdown().await?;
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut answer))
            .await
            .context("the answer or its end never came")??;
        ensure!(answer == b"late answer", "the client read {answer:?}");
        let closed = proxy.wait_closed(1, Duration::from_secs(10)).await?;
        ensure!(
            closed[0]["reason"] == "completed" && closed[0]["bytes_up"] == 7 && closed[0]["bytes_down"] == 11,
            "{}",
            closed[0]
        );
        anyhow::Ok(())
    })?;
    let totals = lab.totals(&mut proxy)?;
    ensure!(totals["fallbacks"] == "short_lived=1" && totals["spliced"] == 0, "{totals}");
    Ok(())
}

/// A server that answers and closes at once, as the API server ends the
/// connection of a kubectl request: relayed by hand, the answer and its end
/// reach the client in one segment (the client then acknowledges both with
/// its own FIN), and the connection is over in the relay, however soon the
/// client closes: every connection completes, exact, never switched.
#[test]
fn an_answer_and_its_close_reach_the_client_in_one_segment() -> Result<()> {
    use std::os::fd::AsRawFd as _;

    use nix::sys::socket::{MsgFlags, Shutdown, send, shutdown};
    use splice_proxy::tcpstat::segments_received;
    use splice_proxy_tests::accept_with_data;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const CONNECTIONS: usize = 200;
    const REQUEST: &[u8] = b"request";
    const ANSWER: &[u8] = b"answer";
    let lab = Lab::new()?;
    let upstream = lab.plain_upstream()?;
    let mut proxy = lab.start_proxy_as_deployed_to(&upstream.local_addr()?.to_string())?;
    let in_one_segment = lab.runtime.block_on(async {
        let mut in_one_segment = 0;
        for i in 0..CONNECTIONS {
            let mut client = lab.client_socket()?.connect(proxy.addr()).await?;
            // A request first, which tells this connection from the
            // proxy's probes of the upstream; once the upstream has it, the
            // proxy has acknowledged it to the client.
            client.write_all(REQUEST).await?;
            let mut accepted = accept_with_data(&upstream).await?;
            accepted.read_exact(&mut [0; REQUEST.len()]).await?;
            let before = segments_received(&client)?;
            // The answer and the FIN leave the server in one segment, so the
            // proxy finds both when it reads.
            let fd = accepted.as_raw_fd();
            send(fd, ANSWER, MsgFlags::from_bits_retain(nix::libc::MSG_MORE))?;
            shutdown(fd, Shutdown::Write)?;
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut answer))
                .await
                .with_context(|| format!("connection {i}: the answer or its end never came"))??;
            ensure!(answer == ANSWER, "the client read {answer:?}");
            if segments_received(&client)? - before == 1 {
                in_one_segment += 1;
            }
            drop(client);
        }
        anyhow::Ok(in_one_segment)
    })?;
    let closed = lab.runtime.block_on(proxy.wait_closed(CONNECTIONS, Duration::from_secs(10)))?;
    for line in &closed {
        ensure!(
            line["reason"] == "completed"
                && line["bytes_up"] == REQUEST.len()
                && line["bytes_down"] == ANSWER.len(),
            "{line}"
        );
    }
    // A proxy worker woken by the bytes before the FIN was queued behind
    // them sends them alone; that is rare, never the rule.
    ensure!(
        in_one_segment >= CONNECTIONS / 2,
        "{in_one_segment} of {CONNECTIONS} answers reached the client with their end in one segment"
    );
    let totals = lab.totals(&mut proxy)?;
    ensure!(totals["fallbacks"] == format!("short_lived={CONNECTIONS}"), "all relayed by hand: {totals}");
    Ok(())
}

/// 200 round trips of one byte each way, 1 ms apart, far from 1 MiB, on a
/// proxy that would wait 30 s: joined after 64 reads (`--packet-switch-after-reads`),
/// so the round trips after the switch are carried by the program; every
/// byte echoed exact.
fn a_chatty_connection_is_joined_after_its_reads(lab: &Lab) -> Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const ROUND_TRIPS: u64 = 200;
    let upstream = lab.plain_upstream()?;
    let mut proxy = lab.proxy_to(&upstream.local_addr()?.to_string(), &["--packet-switch-after", "30s"])?;
    let line = lab.runtime.block_on(async {
        let mut client = lab.client_socket()?.connect(proxy.addr()).await?;
        client.write_all(&[0]).await?;
        let mut accepted = splice_proxy_tests::accept_with_data(&upstream).await?;
        for i in 0..ROUND_TRIPS {
            let mut byte = [0];
            accepted.read_exact(&mut byte).await?;
            ensure!(byte[0] == i as u8, "round trip {i}: the upstream got {}", byte[0]);
            accepted.write_all(&byte).await?;
            client.read_exact(&mut byte).await?;
            ensure!(byte[0] == i as u8, "round trip {i}: the client got {}", byte[0]);
            // A pause between round trips, as a chatty client makes: the
            // switch finds the connection quiescent there.
            tokio::time::sleep(Duration::from_millis(1)).await;
            client.write_all(&[(i + 1) as u8]).await?;
        }
        client.shutdown().await?;
        let mut last = Vec::new();
        accepted.read_to_end(&mut last).await?;
        ensure!(last == [ROUND_TRIPS as u8], "the upstream's last bytes: {last:?}");
        accepted.shutdown().await?;
        client.read_to_end(&mut Vec::new()).await?;
        let closed = proxy.wait_closed(1, Duration::from_secs(10)).await?;
        anyhow::Ok(closed[0].clone())
    })?;
    let totals = lab.totals(&mut proxy)?;
    ensure!(
        line["reason"] == "completed"
            && line["bytes_up"].as_u64() == Some(ROUND_TRIPS + 1)
            && line["bytes_down"].as_u64() == Some(ROUND_TRIPS)
            && line["kernel_bytes"].as_u64() > Some(0),
        "exact, and joined after its reads: {line}; {totals}"
    );
    ensure!(totals["spliced"] == 1 && totals["fallbacks"] == "none", "the chatty one joined: {totals}");
    Ok(())
}

/// Both of the proxy's interfaces drop about 1 % of the data packets (an
/// XDP program ahead of the splicing one).
fn lossy_links(lab: &Lab) -> Result<[LossyLink; 2]> {
    let proxy = &lab.topology.proxy;
    Ok([
        in_netns(proxy, || LossyLink::attach("to-client"))??,
        in_netns(proxy, || LossyLink::attach("to-upstream"))??,
    ])
}

/// The end namespaces' longest retransmission timeout over a lossy link
/// (`net.ipv4.tcp_rto_max_ms`, 120 s by default; 1 s at least).
const ENDS_RTO_MAX_MS: u32 = 2_000;
/// The end namespaces' retransmissions before a connection is given up
/// (`net.ipv4.tcp_retries2`, 15 by default, and
/// `net.ipv4.tcp_orphan_retries` for a closed socket, 0 by default, which
/// gives one whose timeout is at its largest no retry more): with the cap
/// above, about 200 s of them, beyond the test's bound (15 would give
/// about 27 s).
const ENDS_RETRIES: u32 = 100;

/// About 1 % of the data packets dropped each way, with SACK and timestamps
/// on and off in the end namespaces: loss recovery is end to end.
#[test]
fn a_lossy_link_each_way_with_sack_and_timestamps_on_and_off_stays_exact() -> Result<()> {
    let runs = knob("SPLICE_PROXY_PACKET_LOSSY_RUNS", 3)?;
    let only = std::env::var("SPLICE_PROXY_PACKET_LOSSY_ONLY").ok();
    for (sack, timestamps) in [(1, 1), (0, 1), (1, 0), (0, 0)] {
        if only.as_ref().is_some_and(|only| *only != format!("{sack}{timestamps}")) {
            continue;
        }
        let what = format!("tcp_sack={sack} tcp_timestamps={timestamps}");
        let lab = Lab::with(|t| {
            for ns in [&t.client, &t.upstream] {
                LineTopology::sysctl(ns, &format!("net.ipv4.tcp_sack={sack}"))?;
                LineTopology::sysctl(ns, &format!("net.ipv4.tcp_timestamps={timestamps}"))?;
                // The ends' own recovery, not the plane's: without SACK
                // or timestamps an ACK that covers a retransmitted segment
                // gives no RTT sample, and Linux clears the timer's backoff
                // only on one, so under loss each way its timeout can
                // double past this test's bound (seen on the routed path
                // alike, docs/kernel-notes.md). Capped, a recovery by
                // timeouts takes seconds; a segment the plane kept from
                // its end would still never arrive. Set before any socket
                // exists: a socket takes the cap when it is made, an
                // accepted one from its listener. The retries an end makes
                // before it gives up are counted as the time they would
                // take with that cap, so they are raised with it, for a
                // socket its application holds and for one it has closed
                // (the server closes once it has written everything, and
                // a closed socket whose timeout has reached the cap
                // otherwise gives up at its next timeout); either would
                // end a long recovery in a reset within the test.
                LineTopology::sysctl(ns, &format!("net.ipv4.tcp_rto_max_ms={ENDS_RTO_MAX_MS}"))?;
                LineTopology::sysctl(ns, &format!("net.ipv4.tcp_retries2={ENDS_RETRIES}"))?;
                LineTopology::sysctl(ns, &format!("net.ipv4.tcp_orphan_retries={ENDS_RETRIES}"))?;
            }
            Ok(())
        })?;
        let lossy = lossy_links(&lab)?;
        let proxy = lab.proxy(&[])?;
        lab.exact_runs(&proxy, (runs, 16, &what))?;
        for (link, side) in lossy.iter().zip(["from the client", "from the upstream"]) {
            ensure!(link.drops()? > 0, "{what}: nothing dropped {side}, so this proved nothing");
        }
    }
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
        let lab = Lab::with(setup).with_context(|| what.to_owned())?;
        let _lossy = if lossy { Some(lossy_links(&lab)?) } else { None };
        let mut proxy = lab.proxy(&[])?;
        match expect {
            Expect::Spliced => lab.exact_runs(&proxy, (2, 16, what))?,
            Expect::FallsBack(reason) => {
                lab.run_all(&proxy, &[(16 * MIB, 16 * MIB, Order::Concurrent)])?;
                let totals = lab.totals(&mut proxy)?;
                ensure!(
                    totals["spliced"] == 0 && totals["fallbacks"] == format!("{reason}=1"),
                    "{what}: not {reason}: {totals}"
                );
            }
        }
    }
    Ok(())
}

/// IPv4 BIG TCP on every link (GSO and GRO past 64 KiB, which an operator
/// may turn on for a host): packets with an IP total length of 0 reach the
/// program, which must count them by their length. Every run is exact and
/// spliced, and its access line counts every byte each way.
#[test]
fn big_tcp_packets_are_spliced_and_counted_to_the_byte() -> Result<()> {
    const SIZE: u32 = 185_000;
    const RUNS: usize = 4;
    let lab = Lab::with(|t| {
        big_tcp::enable(&t.client, "to-proxy", SIZE)?;
        big_tcp::enable(&t.proxy, "to-client", SIZE)?;
        big_tcp::enable(&t.proxy, "to-upstream", SIZE)?;
        big_tcp::enable(&t.upstream, "to-proxy", SIZE)
    })?;
    let proxy = lab.proxy(&[])?;
    lab.exact_runs(&proxy, (RUNS, 64, "BIG TCP"))?;
    let closed = proxy.closed_connections();
    ensure!(closed.len() == RUNS, "{} access lines, not {RUNS}", closed.len());
    for line in closed {
        ensure!(
            (line["bytes_up"].as_u64(), line["bytes_down"].as_u64())
                == (Some(64 * MIB + HEADER), Some(64 * MIB)),
            "bytes miscounted: {line}"
        );
    }
    Ok(())
}

/// A PROXY v2 header the proxy reads before forwarding is not part of the
/// client's stream to the upstream: the sequence offset absorbs it.
#[test]
fn a_proxy_v2_header_in_front_is_absorbed_by_the_offset() -> Result<()> {
    use tokio::io::AsyncWriteExt as _;
    let lab = Lab::new()?;
    let proxy = lab.proxy(&["--proxy-protocol", "required"])?;
    let header = splice_proxy_tests::edge::v2_proxy(
        "203.0.113.9:40000".parse()?,
        proxy.addr(),
        &[splice_proxy_tests::edge::vpce_tlv("vpce-0123456789abcdef0")],
    );
    for (up, down) in [(MIB, 4 * MIB), (8 * MIB, MIB)] {
        let socket = lab.client_socket()?;
        lab.runtime.block_on(async {
            let mut stream = socket.connect(proxy.addr()).await?;
            stream.write_all(&header).await?;
            run_transfer_on(stream, &lab.server, up, down, Order::Concurrent).await
        })?;
    }
    let closed = lab.runtime.block_on(proxy.wait_closed(2, Duration::from_secs(10)))?;
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

/// An SNI route: a ClientHello for the routed name goes to the second
/// upstream, one for the allowed name to the first; each is spliced and
/// carries bytes both ways, and its access line names its upstream.
#[test]
fn an_sni_route_to_a_second_upstream_is_spliced_there() -> Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let lab = Lab::new()?;
    let (first, second) = (lab.plain_upstream()?, lab.plain_upstream()?);
    let (first_addr, second_addr) = (first.local_addr()?.to_string(), second.local_addr()?.to_string());
    let route = format!("second.example={second_addr}");
    let args = ["--allow-sni", "first.example", "--route", &route];
    let listen = format!("{}:0", LineTopology::PROXY_CLIENT_SIDE_ADDR);
    let mut all = vec!["--listen", &listen, "--upstream", &first_addr, "--dataplane", "packet"];
    all.extend_from_slice(&args);
    let proxy = splice_proxy_tests::process::ProxyProcess::start_in_netns(&lab.topology.proxy, &all)?;
    for (n, (name, upstream, addr)) in
        [("second.example", &second, &second_addr), ("first.example", &first, &first_addr)]
            .into_iter()
            .enumerate()
    {
        let hello = splice_proxy_tests::edge::client_hello(name)?;
        lab.runtime
            .block_on(async {
                let (mut client, mut accepted) =
                    lab.spliced_pair_opening_with(&proxy, upstream, (n + 1) as f64, &hello).await?;
                accepted.write_all(b"routed").await?;
                client.read_exact(&mut [0; 6]).await?;
                client.shutdown().await?;
                accepted.read_to_end(&mut Vec::new()).await?;
                accepted.shutdown().await?;
                client.read_to_end(&mut Vec::new()).await?;
                let closed = proxy.wait_closed(n + 1, Duration::from_secs(10)).await?;
                let line = &closed[n];
                ensure!(line["upstream"] == addr.as_str(), "{name}: {line}");
                ensure!(
                    line["reason"] == "completed" && line["kernel_bytes"].as_u64() > Some(0),
                    "{name}: {line}"
                );
                anyhow::Ok(())
            })
            .with_context(|| format!("the ClientHello for {name}"))?;
    }
    Ok(())
}

/// A slow reader: the upstream reads 1 KiB every 5 ms for 4 s, then fast,
/// while the client sends 64 MiB. Flow control is end to end, so nothing
/// queues in the proxy: its sockets hold no byte at any sample (`ss` in its
/// namespace), its resident memory does not grow, and every byte arrives.
#[test]
fn a_slow_reader_queues_nothing_in_the_proxy() -> Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const TOTAL: usize = 64 << 20;
    const SLOW_FOR: Duration = Duration::from_secs(4);
    /// Allowed growth of the proxy's resident memory meanwhile.
    const RSS_SLACK_KIB: u64 = 4 * 1024;
    let lab = Lab::new()?;
    let upstream = lab.plain_upstream()?;
    let proxy = lab.proxy_to(&upstream.local_addr()?.to_string(), &[])?;
    let pid = proxy.pid().as_raw();
    let rss_before = rss_kib(pid)?;
    let (received, held) = lab.runtime.block_on(async {
        let (mut client, mut accepted) = lab.spliced_pair(&proxy, &upstream, 1.0).await?;
        let sender = tokio::spawn(async move {
            let block = vec![7u8; 1 << 16];
            for _ in 0..TOTAL / block.len() {
                client.write_all(&block).await?;
            }
            client.shutdown().await?;
            anyhow::Ok(client)
        });
        let (mut received, mut held, started) = (0usize, 0u64, tokio::time::Instant::now());
        let mut buffer = vec![0u8; 1 << 16];
        let mut next_sample = started;
        loop {
            let slow = started.elapsed() < SLOW_FOR;
            let want = if slow { 1024 } else { buffer.len() };
            let n = accepted.read(&mut buffer[..want]).await?;
            if n == 0 {
                break;
            }
            ensure!(buffer[..n].iter().all(|b| *b == 7), "a byte changed at {received}");
            received += n;
            if slow {
                if tokio::time::Instant::now() >= next_sample {
                    held = held.max(queued_in(&lab.topology.proxy, proxy.addr().port())?);
                    next_sample += Duration::from_millis(200);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        sender.await??;
        anyhow::Ok((received, held))
    })?;
    let rss_after = rss_kib(pid)?;
    ensure!(received == TOTAL, "{received} of {TOTAL} bytes arrived");
    ensure!(held == 0, "the proxy's sockets held {held} bytes while the reader was slow");
    ensure!(
        rss_after <= rss_before + RSS_SLACK_KIB,
        "the proxy's memory grew from {rss_before} KiB to {rss_after} KiB"
    );
    Ok(())
}

/// Bytes queued (received or to send) in the TCP sockets of the proxy's
/// namespace `netns` whose local port is `port` (its listener's accepted
/// sockets) or that lead elsewhere from it: every socket there but the
/// listeners and the admin endpoint's.
fn queued_in(netns: &str, port: u16) -> Result<u64> {
    let ss = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "ss", "-tnH", "state", "established"])
        .output()?;
    ensure!(ss.status.success(), "ss in {netns}: {}", String::from_utf8_lossy(&ss.stderr));
    let mut queued = 0;
    let text = String::from_utf8_lossy(&ss.stdout);
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [recv_q, send_q, local, ..] = fields[..] else { continue };
        // The admin endpoint's connections (the test's metrics reads) are not the proxy's flow.
        if !local.ends_with(&format!(":{port}")) && local.starts_with("127.") {
            continue;
        }
        queued += recv_q.parse::<u64>()? + send_q.parse::<u64>()?;
    }
    Ok(queued)
}

/// A thousand connections, a hundred at once, each 256 KiB each way: every
/// one exact, and once their entries have lingered nothing of them is
/// left. (All thousand at once through these veths: a burst of that many
/// connects overflows the namespaces' receive queues, SYNs are retried a
/// second later, and some upstream connections are then reset, on splice
/// as on this plane; not a property of the plane.)
#[test]
fn a_thousand_connections_are_exact_and_leave_nothing_behind() -> Result<()> {
    const AT_ONCE: usize = 100;
    let connections = knob("SPLICE_PROXY_PACKET_CONNECTIONS", 1000)?;
    let lab = Arc::new(Lab::new()?);
    let mut proxy = lab.proxy(&[])?;
    let pid = proxy.pid().as_raw();
    let fds_before = descriptors(pid)?;
    let addr = proxy.addr();
    lab.runtime.block_on(async {
        let limit = Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..connections {
            let (lab, limit) = (Arc::clone(&lab), Arc::clone(&limit));
            let socket = lab.client_socket()?;
            tasks.spawn(async move {
                let _slot = limit.acquire_owned().await?;
                let stream = socket.connect(addr).await?;
                let transfer = run_transfer_on(stream, &lab.server, 256 << 10, 256 << 10, Order::Concurrent);
                tokio::time::timeout(Duration::from_secs(60), transfer)
                    .await
                    .context("stalled")?
                    .with_context(|| format!("connection {i}"))
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        anyhow::Ok(())
    })?;
    let closed = lab.runtime.block_on(proxy.wait_closed(connections, Duration::from_secs(30)))?;
    let spliced = closed.iter().filter(|c| c["kernel_bytes"].as_u64() > Some(0)).count();
    ensure!(spliced > 0, "none of {connections} connections was spliced");
    nothing_left(pid, fds_before, &format!("{connections} connections"))?;
    let totals = lab.totals(&mut proxy)?;
    eprintln!("{connections} connections, {spliced} spliced: {totals}");
    Ok(())
}

/// 100,000 short connections (100 B up, up to 5,000 B down, both ends
/// closing at once), 50 at a time: every one completes, and afterwards the
/// proxy holds no flow entry, no more descriptors, and hardly more memory
/// than half-way through. Most are left on splice (a client that sent
/// everything and its FIN before the switch: `peer_closed`); those that are
/// spliced go through the whole retirement.
#[test]
fn short_connections_leave_no_flow_entry_descriptor_or_memory_behind() -> Result<()> {
    /// Allowed growth of resident memory after the warm-up: a leak of 200
    /// bytes per connection would exceed it.
    const RSS_SLACK_KIB: u64 = 8 * 1024;
    const BATCH: usize = 50;
    let total = knob("SPLICE_PROXY_PACKET_SHORT_CONNECTIONS", 100_000)?;
    // More connections than one address has ports: those in TIME_WAIT are
    // reused, from the whole range (the client's and the proxy's own).
    let lab = Arc::new(Lab::with(|t| {
        for ns in [&t.client, &t.proxy] {
            LineTopology::sysctl(ns, "net.ipv4.tcp_tw_reuse=1")?;
            LineTopology::sysctl(ns, "net.ipv4.ip_local_port_range=1024 65535")?;
        }
        Ok(())
    })?);
    let mut proxy = lab.proxy(&[])?;
    let pid = proxy.pid().as_raw();
    let fds_before = descriptors(pid)?;
    let addr = proxy.addr();
    let mut rss_after_warm_up = None;
    for batch in 0..total / BATCH {
        lab.runtime
            .block_on(async {
                let mut tasks = tokio::task::JoinSet::new();
                for i in 0..BATCH {
                    let lab = Arc::clone(&lab);
                    let socket = lab.client_socket()?;
                    let down = ((batch * BATCH + i) % 5000) as u64;
                    tasks.spawn(async move {
                        let stream = socket.connect(addr).await?;
                        let transfer = run_transfer_on(stream, &lab.server, 100, down, Order::Concurrent);
                        tokio::time::timeout(Duration::from_secs(60), transfer).await.context("stalled")?
                    });
                }
                while let Some(done) = tasks.join_next().await {
                    done??;
                }
                anyhow::Ok(())
            })
            .with_context(|| format!("batch {batch}"))?;
        if batch == total / BATCH / 2 {
            rss_after_warm_up = Some(rss_kib(pid)?);
        }
    }
    let closed = lab.runtime.block_on(async {
        let closed = proxy.wait_closed(total, Duration::from_secs(60)).await;
        if closed.is_err() {
            eprintln!("flows left: {:?}", bpf_maps::packet_flows(pid));
            eprintln!("connections: {:?}", proxy.admin_get("/debug/connections").await);
        }
        closed
    })?;
    ensure!(closed.iter().all(|c| c["reason"] == "completed"), "not all completed");
    let spliced = closed.iter().filter(|c| c["kernel_bytes"].as_u64() > Some(0)).count();
    nothing_left(pid, fds_before, &format!("{total} short connections"))?;
    let (warm, end) = (rss_after_warm_up.context("too few connections to warm up")?, rss_kib(pid)?);
    ensure!(end <= warm + RSS_SLACK_KIB, "resident memory grew from {warm} KiB to {end} KiB");
    let totals = lab.totals(&mut proxy)?;
    eprintln!("{total} short connections, {spliced} spliced; RSS {warm} -> {end} KiB: {totals}");
    Ok(())
}

/// The proxy's descriptors.
fn descriptors(pid: i32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Waits until the proxy `pid` holds no flow entry and no more descriptors
/// than `fds_before`: the entries' linger (2 s) and quiet time (3 s) after
/// the last end, then gone.
fn nothing_left(pid: i32, fds_before: usize, what: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (entries, now) = (bpf_maps::packet_flow_entries(pid)?, descriptors(pid)?);
        if entries == 0 && now <= fds_before {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{entries} flow entries and {now} descriptors (was {fds_before}) left after {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
