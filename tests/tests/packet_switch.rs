//! What the packet-splicing switch reads from live sockets: a real TCP
//! connection over loopback in its own network namespace, read in repair
//! mode from both ends. Each end's next byte to send is the other's next
//! byte expected; the negotiated options agree crosswise; repair mode stops
//! the application's reads; leaving it (without a window probe) lets bytes
//! flow again; unread bytes are seen. And the switch itself, end to end.
//! Runs as root.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use splice_proxy::dataplane::packet::{
    program::PacketProgram,
    repair,
    rewrite::{Hop, rewrites},
};
use splice_proxy::kernel::socket_cookie;
use splice_proxy_tests::{
    netns::{LineTopology, NetNs, in_netns},
    positional::{PositionalPayload, StreamChecker},
};

/// A connected pair over loopback: (connecting end, accepted end).
fn pair() -> Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let a = TcpStream::connect(listener.local_addr()?)?;
    let (b, _) = listener.accept()?;
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
    }
    Ok((a, b))
}

/// Waits until `socket` has nothing unacknowledged and `unread` bytes to read.
fn settle(socket: &TcpStream, unread: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let queued = repair::queued(socket)?;
        if queued == (unread, 0) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "queues stuck at (unread, unsent) {queued:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn both_ends_of_a_quiescent_connection_agree_on_where_each_byte_stream_is() -> Result<()> {
    let _netns = NetNs::enter()?;
    let (mut a, mut b) = pair()?;
    a.write_all(&[7; 1000])?;
    b.read_exact(&mut [0; 1000])?;
    b.write_all(&[9; 777])?;
    a.read_exact(&mut [0; 777])?;
    settle(&a, 0)?;
    settle(&b, 0)?;
    repair::enter(&a).context("TCP_REPAIR (needs CAP_NET_ADMIN)")?;
    repair::enter(&b)?;
    let (sa, sb) = (repair::read(&a, 0)?, repair::read(&b, 0)?);
    ensure!(sa.snd_nxt == sb.rcv_nxt && sb.snd_nxt == sa.rcv_nxt, "sequence numbers: {sa:?} {sb:?}");
    ensure!(sa.local == sb.remote && sb.local == sa.remote, "addresses: {sa:?} {sb:?}");
    let (oa, ob) = (sa.options, sb.options);
    ensure!(oa.timestamps && ob.timestamps && oa.sack && ob.sack, "loopback negotiates TS and SACK: {oa:?}");
    ensure!(oa.peer_wscale == ob.own_wscale && ob.peer_wscale == oa.own_wscale, "scales: {oa:?} {ob:?}");
    ensure!(!oa.usec_timestamps, "no tcp_usec_ts route here: {oa:?}");
    // The application cannot read a socket in repair mode.
    let error = a.read(&mut [0; 1]).expect_err("a read in repair mode");
    ensure!(error.raw_os_error() == Some(nix::libc::EPERM), "read in repair mode: {error}");
    repair::leave(&a)?;
    repair::leave(&b)?;
    a.write_all(b"after")?;
    let mut after = [0; 5];
    b.read_exact(&mut after)?;
    ensure!(&after == b"after", "bytes after leaving repair: {after:?}");
    // Unread bytes keep a socket from being quiescent.
    b.write_all(&[1; 10])?;
    settle(&a, 10)?;
    Ok(())
}

/// How many bytes each end sends once the connection is spliced.
const SPLICED_BYTES: u64 = 8 << 20;

/// The Ethernet address of `dev` in `netns`.
fn mac(netns: &str, dev: &str) -> Result<[u8; 6]> {
    let out =
        std::process::Command::new("ip").args(["-n", netns, "-br", "link", "show", "dev", dev]).output()?;
    let text = String::from_utf8(out.stdout)?;
    let field = text.split_whitespace().nth(2).with_context(|| format!("no address in {text:?}"))?;
    let bytes: Vec<u8> = field.split(':').map(|b| u8::from_str_radix(b, 16)).collect::<Result<_, _>>()?;
    bytes.try_into().map_err(|b| anyhow::anyhow!("not a MAC address: {b:?}"))
}

/// Sends `payload` on `stream` while checking what arrives against `expect`,
/// then half-closes and reads to EOF; returns the bytes received.
fn exchange(stream: TcpStream, payload: PositionalPayload, expect: PositionalPayload) -> Result<u64> {
    let reader = stream.try_clone()?;
    let receiving = std::thread::spawn(move || -> Result<u64> {
        let mut reader = reader;
        let mut checker = StreamChecker::new(expect);
        let mut buf = vec![0; 1 << 16];
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                return checker.finish().map_err(|d| anyhow::anyhow!("{d}"));
            }
            checker.update(&buf[..n]);
        }
    });
    let mut writer = stream;
    let mut offset = 0;
    let mut buf = vec![0; 1 << 16];
    loop {
        let n = payload.fill(offset, &mut buf);
        if n == 0 {
            break;
        }
        writer.write_all(&buf[..n])?;
        offset += n as u64;
    }
    writer.shutdown(std::net::Shutdown::Write)?;
    receiving.join().map_err(|_| anyhow::anyhow!("the reader panicked"))?
}

/// The proxy's two connections joined in the kernel: the client and the
/// upstream talk through the proxy's namespace (client — proxy — upstream
/// over veths), first through the proxy's sockets, then, after the switch,
/// through the program alone: 8 MiB each way at once arrive exact, both
/// FINs go through, and the flows count every byte; what the proxy's
/// sockets still send (a window probe each) is dropped on its way out.
/// Timestamps are off in the end namespaces, so no peer TSval is needed
/// (the plane learns it while it holds the flows: tests/packet_plane).
#[test]
fn a_switched_connection_carries_both_directions_through_the_program_alone() -> Result<()> {
    let topology = LineTopology::create()?;
    for ns in [&topology.client, &topology.upstream] {
        LineTopology::sysctl(ns, "net.ipv4.tcp_timestamps=0")?;
    }
    let upstream_listener =
        in_netns(&topology.upstream, || TcpListener::bind((LineTopology::UPSTREAM_ADDR, 0)))??;
    let upstream_addr = upstream_listener.local_addr()?;
    let front = in_netns(&topology.proxy, || TcpListener::bind((LineTopology::PROXY_CLIENT_SIDE_ADDR, 0)))??;
    let front_addr = front.local_addr()?;
    let client = in_netns(&topology.client, || TcpStream::connect(front_addr))??;
    let (sc, _) = front.accept()?;
    let su = in_netns(&topology.proxy, || TcpStream::connect(upstream_addr))??;
    let (upstream, _) = upstream_listener.accept()?;
    // The handshake phase: the proxy relays a hello each way itself.
    let (mut client, mut upstream, mut sc, mut su) = (client, upstream, sc, su);
    client.write_all(b"hello upstream")?;
    let mut hello = [0; 14];
    sc.read_exact(&mut hello)?;
    su.write_all(&hello)?;
    upstream.read_exact(&mut hello)?;
    upstream.write_all(b"hello client")?;
    let mut reply = [0; 12];
    su.read_exact(&mut reply)?;
    sc.write_all(&reply)?;
    client.read_exact(&mut reply)?;
    ensure!(&hello == b"hello upstream" && &reply == b"hello client", "relayed hellos");

    // The switch.
    let mut program = in_netns(&topology.proxy, || PacketProgram::load(16))??;
    for dev in ["to-client", "to-upstream"] {
        in_netns(&topology.proxy, || program.attach(dev))??;
    }
    for socket in [&sc, &su] {
        settle(socket, 0)?;
        repair::enter(socket)?;
    }
    let (client_side, upstream_side) = (repair::read(&sc, 0)?, repair::read(&su, 0)?);
    let hop = |dev: &str, peer_ns: &str| -> Result<Hop> {
        let ifindex = in_netns(&topology.proxy, || nix::net::if_::if_nametoindex(dev))??;
        Ok(Hop { ifindex, src_mac: mac(&topology.proxy, dev)?, dst_mac: mac(peer_ns, "to-proxy")? })
    };
    let to_client = hop("to-client", &topology.client)?;
    let to_upstream = hop("to-upstream", &topology.upstream)?;
    let mut flows = rewrites(&client_side, &upstream_side, to_client, to_upstream)
        .map_err(|why| anyhow::anyhow!("not spliced: {}", why.label()))?;
    flows[0].1.socket_cookie = socket_cookie(&sc)?;
    flows[1].1.socket_cookie = socket_cookie(&su)?;
    for (key, rewrite) in &flows {
        program.set_flow(key, rewrite)?;
    }
    // What a spliced socket still sends is dropped on its way out: a window
    // probe (which leaves repair mode, so back in).
    for socket in [&sc, &su] {
        repair::probe(socket)?;
        repair::enter(socket)?;
    }
    let silenced = program.silenced()?;
    ensure!(silenced >= 2, "the proxy sockets' probes were not dropped: {silenced} silenced");

    // Both ends now talk through the program.
    let up = PositionalPayload { key: 1, len: SPLICED_BYTES };
    let down = PositionalPayload { key: 2, len: SPLICED_BYTES };
    let client_end = std::thread::spawn(move || exchange(client, up, down));
    let upstream_end = std::thread::spawn(move || exchange(upstream, down, up));
    let got_down = client_end.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    let got_up = upstream_end.join().map_err(|_| anyhow::anyhow!("upstream panicked"))??;
    ensure!(got_up == SPLICED_BYTES && got_down == SPLICED_BYTES, "received {got_up} up, {got_down} down");
    let [(up_key, _), (down_key, _)] = flows;
    let (up_flow, down_flow) = (
        program.flow(&up_key)?.context("up flow gone")?,
        program.flow(&down_key)?.context("down flow gone")?,
    );
    ensure!(
        up_flow.bytes == SPLICED_BYTES && down_flow.bytes == SPLICED_BYTES,
        "the program counted {} up and {} down",
        up_flow.bytes,
        down_flow.bytes
    );
    ensure!(up_flow.fin_seen != 0 && down_flow.fin_seen != 0, "FINs: {up_flow:?} {down_flow:?}");
    // The proxy's own sockets saw none of it.
    let (sc_state, su_state) = (repair::read(&sc, 0)?, repair::read(&su, 0)?);
    ensure!(
        sc_state.rcv_nxt == client_side.rcv_nxt && su_state.rcv_nxt == upstream_side.rcv_nxt,
        "a spliced byte reached a proxy socket"
    );
    // Closed in repair mode: nothing is sent.
    drop((sc, su));
    Ok(())
}
