//! The packet-splicing program's rewrite, packet by packet, through
//! `BPF_PROG_TEST_RUN`: the loaded program with its real flow map. Each case
//! sends one frame and checks the verdict, every header field of the frame
//! that comes out (both checksums verified), and the flow's counters (a
//! retransmission counts as a packet, not as new bytes), a BIG TCP packet
//! (IP total length 0) by its length; the table again with the headers
//! copied out, the way of headers past the skb's linear part.
//! Runs as root in its own network namespace.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, ensure};
use proxy_common::{PacketFlowKey, PacketRewrite, packet::rewrite_flags};
use splice_proxy::dataplane::packet::program::PacketProgram;
use splice_proxy_tests::{
    netns::NetNs,
    segments::{ACK, FIN, RST, SYN, Segment, sack_blocks, sack_option, timestamp_option, timestamps},
};

/// tc verdicts (uapi `TC_ACT_*`).
/// `TC_ACT_UNSPEC` (-1), TCX's "next": the packet goes on to the next
/// program on the hook, or up the stack when there is none.
const TC_ACT_NEXT: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(198, 51, 100, 7), 50_123);
const PROXY_FRONT: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 0, 0, 5), 6443);
const PROXY_BACK: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 0, 1, 5), 41_000);
const UPSTREAM: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 0, 2, 9), 443);
const OUT_SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 1];
const OUT_DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 2];

/// Client → proxy packets become proxy → upstream packets.
fn client_to_upstream_key() -> PacketFlowKey {
    PacketFlowKey {
        remote_addr: CLIENT.0.octets(),
        local_addr: PROXY_FRONT.0.octets(),
        remote_port: CLIENT.1.to_be_bytes(),
        local_port: PROXY_FRONT.1.to_be_bytes(),
    }
}

fn rewrite(flags: u16, sender_wscale: u8, receiver_wscale: u8) -> PacketRewrite {
    PacketRewrite {
        src_addr: PROXY_BACK.0.octets(),
        dst_addr: UPSTREAM.0.octets(),
        src_port: PROXY_BACK.1.to_be_bytes(),
        dst_port: UPSTREAM.1.to_be_bytes(),
        // Wrap around 2³² both ways.
        seq_delta: 0x9000_0000,
        ack_delta: 0u32.wrapping_sub(1000),
        tsval_delta: 12_345,
        tsecr_delta: 0u32.wrapping_sub(777),
        ifindex: 1,
        src_mac: OUT_SRC_MAC,
        dst_mac: OUT_DST_MAC,
        sender_wscale,
        receiver_wscale,
        flags,
        ..PacketRewrite::default()
    }
}

fn from_client(seq: u32, ack: u32, payload: &[u8]) -> Segment {
    Segment::data(CLIENT, PROXY_FRONT, seq, ack, payload)
}

/// One case: a segment in, what must come out.
struct Case {
    name: &'static str,
    input: Segment,
    rewrite: PacketRewrite,
    /// The segment expected out (checked field by field), or `None` for a
    /// packet the program must pass untouched.
    expect: Option<Segment>,
}

/// What `rewrite` does to `input`, computed here independently.
fn expected(input: &Segment, r: &PacketRewrite, options: Vec<u8>, window: u16) -> Segment {
    Segment {
        src_mac: r.src_mac,
        dst_mac: r.dst_mac,
        src: Ipv4Addr::from(r.src_addr),
        dst: Ipv4Addr::from(r.dst_addr),
        src_port: u16::from_be_bytes(r.src_port),
        dst_port: u16::from_be_bytes(r.dst_port),
        seq: input.seq.wrapping_add(r.seq_delta),
        ack: if input.flags & ACK != 0 { input.ack.wrapping_add(r.ack_delta) } else { input.ack },
        flags: input.flags,
        window,
        options,
        payload: input.payload.clone(),
    }
}

fn cases() -> Vec<Case> {
    let plain = rewrite(rewrite_flags::TIMESTAMPS, 7, 7);
    let mut cases = Vec::new();

    let input = from_client(0xffff_fff0, 5, b"GET /api/v1/pods HTTP/1.1\r\n");
    let expect = expected(&input, &plain, Vec::new(), input.window);
    cases.push(Case {
        name: "data: addresses, ports, MACs, seq and ack",
        input,
        rewrite: plain,
        expect: Some(expect),
    });

    let mut input = from_client(100, 200, b"x");
    input.options = timestamp_option(5, 0xffff_ff00);
    let out = timestamp_option(5 + 12_345, 0xffff_ff00u32.wrapping_sub(777));
    let expect = expected(&input, &plain, out, input.window);
    cases.push(Case { name: "timestamps shifted", input, rewrite: plain, expect: Some(expect) });

    let mut input = from_client(100, 200, b"");
    let blocks = [(10, 20), (0xffff_fff0, 5), (300, 400), (500, 600)];
    input.options = sack_option(&blocks);
    let shifted: Vec<(u32, u32)> =
        blocks.iter().map(|(l, r)| (l.wrapping_sub(1000), r.wrapping_sub(1000))).collect();
    let expect = expected(&input, &plain, sack_option(&shifted), input.window);
    cases.push(Case {
        name: "four SACK blocks shifted like the ack",
        input,
        rewrite: plain,
        expect: Some(expect),
    });

    let mut input = from_client(100, 200, b"");
    input.options = [timestamp_option(1, 2), sack_option(&[(1000, 2000)])].concat();
    let strip = rewrite(rewrite_flags::TIMESTAMPS | rewrite_flags::STRIP_SACK, 7, 7);
    let mut out = timestamp_option(1 + 12_345, 2u32.wrapping_sub(777));
    out.extend_from_slice(&[1; 12]);
    let expect = expected(&input, &strip, out, input.window);
    cases.push(Case {
        name: "SACK blanked to NOPs when one side has none",
        input,
        rewrite: strip,
        expect: Some(expect),
    });

    // The timestamp option at an odd offset (NOP, timestamps, NOP): each
    // byte of its fields sits in the other half of its checksum word.
    let odd_timestamps = |tsval: u32, tsecr: u32| {
        let mut options = vec![1, 8, 10];
        options.extend(tsval.to_be_bytes());
        options.extend(tsecr.to_be_bytes());
        options.push(1);
        options
    };
    let mut input = from_client(100, 200, b"odd");
    input.options = odd_timestamps(0x0102_0304, 0xa0b0_c0d0);
    let out = odd_timestamps(0x0102_0304 + 12_345, 0xa0b0_c0d0u32.wrapping_sub(777));
    let expect = expected(&input, &plain, out, input.window);
    cases.push(Case { name: "timestamps at an odd offset", input, rewrite: plain, expect: Some(expect) });

    // SACK at an odd offset (NOP, SACK, NOP NOP NOP), blanked.
    let mut input = from_client(100, 200, b"");
    let mut options = vec![1];
    options.extend(sack_option(&[(1000, 2000)]));
    options.extend([1, 1, 1]);
    input.options = options;
    let no_ts_strip = rewrite(rewrite_flags::STRIP_SACK, 7, 7);
    let expect = expected(&input, &no_ts_strip, vec![1; 16], input.window);
    cases.push(Case {
        name: "SACK at an odd offset blanked",
        input,
        rewrite: no_ts_strip,
        expect: Some(expect),
    });

    let input = from_client(1, 2, b"abc");
    let down = rewrite(0, 7, 10);
    let expect = expected(&input, &down, Vec::new(), 502 >> 3);
    cases.push(Case { name: "window rescaled from 7 to 10", input, rewrite: down, expect: Some(expect) });

    let input = from_client(1, 2, b"abc");
    let up = rewrite(0, 10, 2);
    let expect = expected(&input, &up, Vec::new(), u16::MAX);
    cases.push(Case { name: "window rescaled up is capped", input, rewrite: up, expect: Some(expect) });

    let mut input = from_client(9, 9, b"");
    input.flags = FIN | ACK;
    let expect = expected(&input, &plain, Vec::new(), input.window);
    cases.push(Case { name: "FIN", input, rewrite: plain, expect: Some(expect) });

    let mut input = from_client(9, 1234, b"");
    input.flags = RST;
    let expect = expected(&input, &plain, Vec::new(), input.window);
    cases.push(Case {
        name: "RST without ACK keeps its ack field",
        input,
        rewrite: plain,
        expect: Some(expect),
    });

    let mut input = from_client(1, 2, b"z");
    input.src_port += 1;
    cases.push(Case { name: "another flow passes", input, rewrite: plain, expect: None });
    cases
}

#[test]
fn packets_of_a_flow_are_rewritten_into_the_other_connection() -> Result<()> {
    let _netns = NetNs::enter()?;
    let mut program = PacketProgram::load(16).context("loading packet_splice")?;
    rewrites_every_case(&mut program)
}

/// The same cases with every header copied out by the helper: the way of a
/// packet whose headers lie past the skb's linear part, which no frame of
/// `BPF_PROG_TEST_RUN` reaches otherwise (they are linear).
#[test]
fn packets_whose_headers_are_copied_out_are_rewritten_alike() -> Result<()> {
    let _netns = NetNs::enter()?;
    let mut program =
        PacketProgram::load_copying_headers(16).context("loading packet_splice, headers copied out")?;
    rewrites_every_case(&mut program)
}

/// Runs [`cases`] through `program` and checks each.
fn rewrites_every_case(program: &mut PacketProgram) -> Result<()> {
    let key = client_to_upstream_key();
    for case in cases() {
        // Bytes are counted from the flow's next expected byte.
        let rewrite = PacketRewrite { next_seq: u64::from(case.input.seq), ..case.rewrite };
        program.set_flow(&key, &rewrite)?;
        let frame = case.input.frame();
        let (verdict, out) = program.test_run(&frame)?;
        let flow = program.flow(&key)?.context("the flow is gone")?;
        match &case.expect {
            None => {
                ensure!(verdict == TC_ACT_NEXT, "{}: verdict {verdict}, not TC_ACT_NEXT", case.name);
                ensure!(out == frame, "{}: a packet of no flow was changed", case.name);
                ensure!(flow.packets == 0, "{}: counted {} packets", case.name, flow.packets);
            }
            Some(expect) => {
                ensure!(verdict == TC_ACT_REDIRECT, "{}: verdict {verdict}, not TC_ACT_REDIRECT", case.name);
                let got = Segment::parse(&out).with_context(|| format!("{}: the frame out", case.name))?;
                ensure!(&got == expect, "{}:\n got {got:?}\nwant {expect:?}", case.name);
                let payload = case.input.payload.len() as u64;
                ensure!(
                    (flow.packets, flow.bytes) == (1, payload),
                    "{}: counted {} packets, {} bytes",
                    case.name,
                    flow.packets,
                    flow.bytes
                );
                let (fin, rst) = (case.input.flags & FIN != 0, case.input.flags & RST != 0);
                ensure!(
                    (flow.fin_seen != 0, flow.rst_seen != 0) == (fin, rst),
                    "{}: fin_seen {} rst_seen {}",
                    case.name,
                    flow.fin_seen,
                    flow.rst_seen
                );
                if let Some((tsval, tsecr)) = timestamps(&expect.options) {
                    ensure!(timestamps(&got.options) == Some((tsval, tsecr)), "{}: timestamps", case.name);
                }
                ensure!(sack_blocks(&got.options) == sack_blocks(&expect.options), "{}: SACK", case.name);
                // The same segment again (a retransmission) is a packet, not new bytes.
                program.test_run(&frame)?;
                let again = program.flow(&key)?.context("the flow is gone")?;
                ensure!(
                    (again.packets, again.bytes) == (2, payload),
                    "{}: a retransmission counted {} packets, {} bytes",
                    case.name,
                    again.packets,
                    again.bytes
                );
            }
        }
        program.remove_flow(&key)?;
    }
    Ok(())
}

#[test]
fn a_flow_packet_whose_options_cannot_be_walked_is_dropped_not_passed() -> Result<()> {
    let _netns = NetNs::enter()?;
    let mut program = PacketProgram::load(16).context("loading packet_splice")?;
    let key = client_to_upstream_key();
    program.set_flow(&key, &rewrite(rewrite_flags::TIMESTAMPS, 7, 7))?;
    let mut thirteen_nops = vec![1; 13];
    thirteen_nops.extend_from_slice(&timestamp_option(1, 2)[2..]);
    for (name, options) in [
        ("an option running past the header", vec![8, 30, 0, 0, 0, 0, 0, 0]),
        ("an option of length 0", vec![1, 1, 19, 0]),
        ("more options than a segment carries", thirteen_nops),
    ] {
        let mut input = from_client(1, 2, b"x");
        input.options = options;
        let (verdict, _) = program.test_run(&input.frame())?;
        ensure!(verdict == TC_ACT_SHOT, "{name}: verdict {verdict}, not TC_ACT_SHOT");
    }
    let flow = program.flow(&key)?.context("the flow is gone")?;
    ensure!(flow.packets == 0, "dropped packets were counted: {}", flow.packets);
    Ok(())
}

/// A frame shorter than the Ethernet and IPv4 headers (of another
/// protocol: `BPF_PROG_TEST_RUN` refuses an IPv4 one that short), and an
/// IPv4 frame that ends before the TCP ports its header length points to,
/// even with a flow's addresses, are no flow's: each is passed on
/// untouched (the stack judges it), whether the headers are read in place
/// (the frame ends before them, so the program falls back to copying them
/// out, which finds it not IPv4 or fails) or copied out.
#[test]
fn a_frame_cut_short_inside_its_headers_passes_untouched() -> Result<()> {
    let _netns = NetNs::enter()?;
    let key = client_to_upstream_key();
    let whole = from_client(1, 2, &[0x5a; 64]).frame();
    let mut short_arp = whole[..14 + 14].to_vec();
    short_arp[12..14].copy_from_slice(&0x0806_u16.to_be_bytes());
    // IPv4 options said to fill 40 bytes (IHL 15): the TCP ports would
    // start at byte 74 of the frame, which ends at 76.
    let mut before_ports = whole[..14 + 60 + 2].to_vec();
    before_ports[14] = 0x4f;
    for (loaded, mut program) in [
        ("read in place", PacketProgram::load(16).context("loading packet_splice")?),
        (
            "copied out",
            PacketProgram::load_copying_headers(16).context("loading packet_splice, headers copied out")?,
        ),
    ] {
        program.set_flow(&key, &rewrite(rewrite_flags::TIMESTAMPS, 7, 7))?;
        for (name, frame) in
            [("shorter than an IPv4 header", &short_arp), ("ends before the ports", &before_ports)]
        {
            let (verdict, out) = program.test_run(frame).with_context(|| format!("{loaded}, {name}"))?;
            ensure!(verdict == TC_ACT_NEXT, "{loaded}, {name}: verdict {verdict}, not TC_ACT_NEXT");
            ensure!(&out == frame, "{loaded}, {name}: the frame was changed");
        }
        let flow = program.flow(&key)?.context("the flow is gone")?;
        ensure!(flow.packets == 0, "{loaded}: cut frames were counted: {}", flow.packets);
        // The whole frame they were cut from is the flow's.
        let (verdict, _) = program.test_run(&whole)?;
        let flow = program.flow(&key)?.context("the flow is gone")?;
        ensure!(
            verdict == TC_ACT_REDIRECT && flow.packets == 1,
            "{loaded}: the whole frame: verdict {verdict}, {} packets counted",
            flow.packets
        );
    }
    Ok(())
}

/// While the switch waits for quiescence the program watches the flow:
/// every packet reaches the proxy's socket untouched. While it reads the
/// sockets it holds the flow: pure ACKs and RSTs reach the socket untouched,
/// everything that moves the sequence forward is dropped (its sender
/// retransmits it). In both, every packet teaches the entry the hop back to
/// its sender and the sender's newest TSval (a reordered older one does not
/// move it back). An ended flow drops everything.
/// IPv4 BIG TCP: a GRO or GSO packet past 64 KiB carries an IP total
/// length of 0, and only its length says how much it holds. Its payload is
/// counted from that length: its bytes, its FIN's number, and, on a held
/// flow, that it moves the sequence (dropped, never passed to the proxy's
/// socket, which would take its bytes).
#[test]
fn a_big_tcp_packet_is_counted_by_its_length() -> Result<()> {
    let _netns = NetNs::enter()?;
    let mut program = PacketProgram::load(16).context("loading packet_splice")?;
    let key = client_to_upstream_key();
    let plain = rewrite(rewrite_flags::TIMESTAMPS, 7, 7);
    let mut input = from_client(1000, 2000, &[0x5a; 1200]);
    input.flags = FIN | ACK;
    program.set_flow(&key, &PacketRewrite { next_seq: 1000, ..plain })?;
    let frame = input.big_tcp_frame();
    let (verdict, out) = program.test_run(&frame)?;
    ensure!(verdict == TC_ACT_REDIRECT, "verdict {verdict}, not TC_ACT_REDIRECT");
    ensure!(out[16..18] == [0, 0], "the total length was changed: {:02x?}", &out[16..18]);
    let got = Segment::parse(&out).context("the frame out")?;
    let expect = expected(&input, &plain, Vec::new(), input.window);
    ensure!(got == expect, "\n got {got:?}\nwant {expect:?}");
    let flow = program.flow(&key)?.context("the flow is gone")?;
    ensure!(
        (flow.packets, flow.bytes, flow.fin_seen, flow.fin_seq) == (1, 1200, 1, 2200),
        "counted {} packets, {} bytes, FIN seen {} at {}",
        flow.packets,
        flow.bytes,
        flow.fin_seen,
        flow.fin_seq
    );
    program.set_flow(&key, &PacketRewrite { flags: rewrite_flags::HOLD, ..PacketRewrite::default() })?;
    let data = from_client(1000, 2000, &[0x5a; 1200]);
    let (verdict, _) = program.test_run(&data.big_tcp_frame())?;
    ensure!(verdict == TC_ACT_SHOT, "a held flow's BIG TCP data: verdict {verdict}, not TC_ACT_SHOT");
    program.remove_flow(&key)?;
    Ok(())
}

#[test]
fn held_and_watched_flows_learn_their_hop_an_ended_one_drops_all_and_a_syn_is_never_rewritten() -> Result<()>
{
    let _netns = NetNs::enter()?;
    let mut program = PacketProgram::load(16).context("loading packet_splice")?;
    let key = client_to_upstream_key();
    let segment = |flags: u8, payload: &[u8], tsval: u32| {
        let mut s = from_client(100, 200, payload);
        s.flags = flags;
        s.options = timestamp_option(tsval, 9);
        s
    };
    // A watched flow passes what a held one drops; both learn alike.
    for (state, flags, moving) in
        [("held", rewrite_flags::HOLD, TC_ACT_SHOT), ("watched", rewrite_flags::WATCH, TC_ACT_NEXT)]
    {
        program.set_flow(&key, &PacketRewrite { flags, ..PacketRewrite::default() })?;
        let table: [(&str, Segment, u32, u32); 6] = [
            ("a pure ACK passes", segment(ACK, b"", 5000), TC_ACT_NEXT, 5000),
            ("data", segment(ACK, b"data", 5003), moving, 5003),
            ("an older TSval does not move it back", segment(ACK, b"", 4000), TC_ACT_NEXT, 5003),
            ("a FIN", segment(FIN | ACK, b"", 5004), moving, 5004),
            ("a RST passes", segment(RST, b"", 5005), TC_ACT_NEXT, 5005),
            ("a segment without timestamps keeps the last", from_client(1, 2, b""), TC_ACT_NEXT, 5005),
        ];
        for (name, input, verdict_wanted, tsval_wanted) in table {
            let frame = input.frame();
            let (verdict, out) = program.test_run(&frame)?;
            ensure!(verdict == verdict_wanted, "{state}, {name}: verdict {verdict}, not {verdict_wanted}");
            ensure!(out == frame, "{state}, {name}: the packet was changed");
            let flow = program.flow(&key)?.context("the flow is gone")?;
            ensure!(flow.peer_tsval == tsval_wanted, "{state}, {name}: peer TSval {}", flow.peer_tsval);
            ensure!(
                (flow.ifindex != 0, flow.src_mac, flow.dst_mac) == (true, input.dst_mac, input.src_mac),
                "{state}, {name}: hop learned {} {:?} {:?}",
                flow.ifindex,
                flow.src_mac,
                flow.dst_mac
            );
            ensure!((flow.packets, flow.bytes) == (0, 0), "{state}, {name}: the packet was counted");
        }
    }
    let ended = PacketRewrite { flags: rewrite_flags::ENDED, ..rewrite(rewrite_flags::TIMESTAMPS, 7, 7) };
    program.set_flow(&key, &ended)?;
    for input in [segment(ACK, b"", 1), segment(ACK, b"late", 2), segment(RST, b"", 3)] {
        let (verdict, _) = program.test_run(&input.frame())?;
        ensure!(verdict == TC_ACT_SHOT, "an ended flow's packet: verdict {verdict}, not TC_ACT_SHOT");
    }
    // A SYN with a watched or held flow's four-tuple (a client that reset
    // its connection during the switch and reuses the port) goes on to the
    // stack, and teaches the entry nothing.
    for state in [rewrite_flags::WATCH, rewrite_flags::HOLD] {
        program.set_flow(&key, &PacketRewrite { flags: state, ..PacketRewrite::default() })?;
        let (verdict, _) = program.test_run(&segment(SYN, b"", 9000).frame())?;
        ensure!(verdict == TC_ACT_NEXT, "a SYN on a switching flow ({state}): verdict {verdict}, not next");
        let flow = program.flow(&key)?.context("the flow is gone")?;
        ensure!(flow.ifindex == 0 && flow.peer_tsval == 0, "a SYN taught the entry: {flow:?}");
    }
    // A SYN with the four-tuple of a flow the proxy saw end (finished, or
    // ended) is a client reusing its port: the entry is forgotten, the
    // other direction's drops from now on, and the SYN goes on.
    let upstream_key = PacketFlowKey {
        remote_addr: UPSTREAM.0.octets(),
        local_addr: PROXY_BACK.0.octets(),
        remote_port: UPSTREAM.1.to_be_bytes(),
        local_port: PROXY_BACK.1.to_be_bytes(),
    };
    for state in [rewrite_flags::FINISHED, rewrite_flags::ENDED] {
        program.set_flow(&key, &rewrite(rewrite_flags::TIMESTAMPS | state, 7, 7))?;
        program.set_flow(
            &upstream_key,
            &PacketRewrite { flags: rewrite_flags::FINISHED, ..PacketRewrite::default() },
        )?;
        let (verdict, _) = program.test_run(&segment(SYN, b"", 9000).frame())?;
        ensure!(verdict == TC_ACT_NEXT, "a SYN on a finished flow ({state}): verdict {verdict}, not next");
        ensure!(program.flow(&key)?.is_none(), "the finished flow ({state}) was not forgotten");
        let other = program.flow(&upstream_key)?.context("the other direction's entry is gone")?;
        ensure!(other.flags & rewrite_flags::ENDED != 0, "the other direction still rewrites: {other:?}");
        program.remove_flow(&upstream_key)?;
    }
    // A SYN with a spliced flow's four-tuple (a client reusing the port of
    // a connection whose end the proxy has not seen yet) is a new
    // connection: dropped, never rewritten to the old upstream, nor
    // counted.
    let spliced = rewrite(rewrite_flags::TIMESTAMPS, 7, 7);
    program.set_flow(&key, &spliced)?;
    let (verdict, _) = program.test_run(&segment(SYN, b"", 4).frame())?;
    ensure!(verdict == TC_ACT_SHOT, "a SYN on a spliced flow: verdict {verdict}, not TC_ACT_SHOT");
    let flow = program.flow(&key)?.context("the flow is gone")?;
    ensure!(flow.packets == 0, "a SYN on a spliced flow was counted");
    Ok(())
}

/// A RST ends the flow only when its number could come from its sender's
/// stack: from what the other side acknowledged (the other direction's
/// `acked`) to the sender's next byte (one past its FIN, after one); any other (a blind RST with the
/// four-tuple) is still sent on, for its receiver to judge, but does not
/// end the flow. Without the other direction's entry, only the next byte.
#[test]
fn only_a_reset_numbered_within_what_was_sent_and_acknowledged_ends_the_flow() -> Result<()> {
    let _netns = NetNs::enter()?;
    let mut program = PacketProgram::load(16).context("loading packet_splice")?;
    let key = client_to_upstream_key();
    let next: u32 = 5; // wraps: acknowledged from 2³² − 995 on
    let acked = next.wrapping_sub(1000);
    let upstream_to_client = PacketFlowKey {
        remote_addr: UPSTREAM.0.octets(),
        local_addr: PROXY_BACK.0.octets(),
        remote_port: UPSTREAM.1.to_be_bytes(),
        local_port: PROXY_BACK.1.to_be_bytes(),
    };
    let other = PacketRewrite { acked: u64::from(acked), ..PacketRewrite::default() };
    let table: [(&str, u32, bool, bool); 9] = [
        ("at the next byte", next, true, true),
        ("after the FIN (see below)", next.wrapping_add(1), true, true),
        ("at the acknowledged edge", acked, true, true),
        ("in between", next.wrapping_sub(500), true, true),
        ("before the acknowledged edge", acked.wrapping_sub(1), true, false),
        ("past the next byte", next.wrapping_add(1), true, false),
        ("half the number space away", next.wrapping_add(1 << 31), true, false),
        ("at the next byte, the other direction unknown", next, false, true),
        ("in between, the other direction unknown", next.wrapping_sub(500), false, false),
    ];
    for (name, seq, other_known, ends) in table {
        let plain = PacketRewrite { next_seq: u64::from(next), ..rewrite(0, 7, 7) };
        // The sender's FIN went through, at its next byte: one more number.
        let plain = if name.starts_with("after the FIN") {
            PacketRewrite { fin_seen: 1, fin_seq: next, ..plain }
        } else {
            plain
        };
        program.set_flow(&key, &plain)?;
        if other_known {
            program.set_flow(&upstream_to_client, &other)?;
        } else {
            program.remove_flow(&upstream_to_client)?;
        }
        let mut input = from_client(seq, 0, b"");
        input.flags = RST;
        let (verdict, _) = program.test_run(&input.frame())?;
        ensure!(verdict == TC_ACT_REDIRECT, "{name}: verdict {verdict}, not sent on");
        let flow = program.flow(&key)?.context("the flow is gone")?;
        ensure!((flow.rst_seen != 0) == ends, "{name}: rst_seen {}", flow.rst_seen);
    }
    Ok(())
}
