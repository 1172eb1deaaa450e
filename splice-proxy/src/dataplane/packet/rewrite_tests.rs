use super::*;

const OPTIONS: Negotiated = Negotiated {
    timestamps: true,
    usec_timestamps: false,
    sack: true,
    peer_wscale: 7,
    own_wscale: 10,
    send_mss: 1448,
    advertised_mss: 1460,
};

fn client() -> SocketState {
    SocketState {
        local: "10.0.0.5:6443".parse().unwrap(),
        remote: "198.51.100.7:50123".parse().unwrap(),
        // The client sent a 28-byte PROXY header and a 517-byte ClientHello.
        snd_nxt: 1_000,
        rcv_nxt: 4_000_000_000,
        tsval: 50_000,
        peer_tsval: 7_000,
        options: OPTIONS,
        established: true,
    }
}

fn upstream() -> SocketState {
    SocketState {
        local: "10.0.1.5:41000".parse().unwrap(),
        remote: "10.0.2.9:443".parse().unwrap(),
        snd_nxt: 300,
        rcv_nxt: 0xffff_ff00,
        tsval: 90_000,
        peer_tsval: 123_456,
        options: Negotiated { peer_wscale: 9, own_wscale: 8, ..OPTIONS },
        established: true,
    }
}

const TO_CLIENT: Hop = Hop { ifindex: 2, src_mac: [2, 0, 0, 0, 0, 1], dst_mac: [2, 0, 0, 0, 0, 2] };
const TO_UPSTREAM: Hop = Hop { ifindex: 3, src_mac: [2, 0, 0, 0, 0, 3], dst_mac: [2, 0, 0, 0, 0, 4] };

/// A packet's sequence number through `r`.
fn seq(r: &PacketRewrite, n: u32) -> u32 {
    n.wrapping_add(r.seq_delta)
}

#[test]
fn the_next_byte_of_each_peer_becomes_the_next_byte_of_the_other_socket() {
    let [(up_key, up), (down_key, down)] = rewrites(&client(), &upstream(), TO_CLIENT, TO_UPSTREAM).unwrap();
    let (c, u) = (client(), upstream());
    // The client's next byte is Su's next byte; the upstream's is Sc's.
    assert_eq!(seq(&up, c.rcv_nxt), u.snd_nxt);
    assert_eq!(seq(&down, u.rcv_nxt), c.snd_nxt);
    // An ACK of everything Sc sent acknowledges everything Su received.
    assert_eq!(c.snd_nxt.wrapping_add(up.ack_delta), u.rcv_nxt);
    assert_eq!(u.snd_nxt.wrapping_add(down.ack_delta), c.rcv_nxt);
    // Bytes are counted from each peer's next byte.
    assert_eq!((up.next_seq, down.next_seq), (u64::from(c.rcv_nxt), u64::from(u.rcv_nxt)));
    // Each direction's acknowledgements, rewritten, start where the other
    // direction's bytes are.
    assert_eq!((up.acked, down.acked), (down.next_seq, up.next_seq));
    // Keys are the packets as they arrive; the rewrite sends as the other socket.
    assert_eq!(up_key, arriving(c.local, c.remote));
    assert_eq!((up.src_addr, up.dst_addr), (u.local.ip().octets(), u.remote.ip().octets()));
    assert_eq!((up.src_port, up.dst_port), (41000u16.to_be_bytes(), 443u16.to_be_bytes()));
    assert_eq!((up.ifindex, up.dst_mac), (3, TO_UPSTREAM.dst_mac));
    assert_eq!(down_key, arriving(u.local, u.remote));
    assert_eq!((down.src_addr, down.dst_addr), (c.local.ip().octets(), c.remote.ip().octets()));
    assert_eq!((down.ifindex, down.dst_mac), (2, TO_CLIENT.dst_mac));
}

#[test]
fn timestamps_continue_each_proxy_socket_clock_and_echoes_map_back() {
    let [(_, up), (_, down)] = rewrites(&client(), &upstream(), TO_CLIENT, TO_UPSTREAM).unwrap();
    let (c, u) = (client(), upstream());
    // The client's next TSval (at least its last) reaches the upstream at
    // or after Su's clock now: PAWS at the upstream holds.
    assert_eq!(c.peer_tsval.wrapping_add(up.tsval_delta), u.tsval);
    assert_eq!(u.peer_tsval.wrapping_add(down.tsval_delta), c.tsval);
    // The client echoing Sc's clock (its last TSval seen before the switch)
    // reaches the upstream as an echo of the upstream's own last TSval.
    assert_eq!(c.tsval.wrapping_add(up.tsecr_delta), u.peer_tsval);
    assert_eq!(u.tsval.wrapping_add(down.tsecr_delta), c.peer_tsval);
    // An upstream TSval the client echoes comes back unchanged.
    let upstream_tsval = 200_000u32;
    let as_client_sees_it = upstream_tsval.wrapping_add(down.tsval_delta);
    assert_eq!(as_client_sees_it.wrapping_add(up.tsecr_delta), upstream_tsval);
    assert_eq!(up.flags & rewrite_flags::TIMESTAMPS, rewrite_flags::TIMESTAMPS);
}

#[test]
fn windows_go_from_the_sender_scale_to_the_one_the_receiver_applies() {
    let [(_, up), (_, down)] = rewrites(&client(), &upstream(), TO_CLIENT, TO_UPSTREAM).unwrap();
    // The client scales its windows by 7 (Sc's peer scale); the upstream
    // applies 8 to what Su advertises.
    assert_eq!((up.sender_wscale, up.receiver_wscale), (7, 8));
    assert_eq!((down.sender_wscale, down.receiver_wscale), (9, 10));
}

#[test]
fn sack_on_one_side_only_is_blanked_both_ways() {
    let mut u = upstream();
    u.options.sack = false;
    let [(_, up), (_, down)] = rewrites(&client(), &u, TO_CLIENT, TO_UPSTREAM).unwrap();
    assert_ne!(up.flags & rewrite_flags::STRIP_SACK, 0);
    assert_ne!(down.flags & rewrite_flags::STRIP_SACK, 0);
    let [(_, up), _] = rewrites(&client(), &upstream(), TO_CLIENT, TO_UPSTREAM).unwrap();
    assert_eq!(up.flags & rewrite_flags::STRIP_SACK, 0);
}

#[test]
fn connections_whose_timestamps_cannot_be_mapped_are_not_spliced() {
    let mut u = upstream();
    u.options.timestamps = false;
    assert_eq!(rewrites(&client(), &u, TO_CLIENT, TO_UPSTREAM), Err(Fallback::TimestampsOnOneSide));
    let mut c = client();
    c.options.usec_timestamps = true;
    assert_eq!(rewrites(&c, &upstream(), TO_CLIENT, TO_UPSTREAM), Err(Fallback::MicrosecondTimestamps));
    let (mut c, mut u) = (client(), upstream());
    for o in [&mut c.options, &mut u.options] {
        // Without the option, segments carry 12 bytes more.
        o.timestamps = false;
        o.send_mss = 1460;
    }
    let [(_, up), _] = rewrites(&c, &u, TO_CLIENT, TO_UPSTREAM).unwrap();
    assert_eq!(up.flags & rewrite_flags::TIMESTAMPS, 0);
}

#[test]
fn a_connection_a_peer_closed_before_the_switch_is_not_spliced() {
    for closed in [true, false] {
        let (mut c, mut u) = (client(), upstream());
        if closed {
            c.established = false;
        } else {
            u.established = false;
        }
        assert_eq!(rewrites(&c, &u, TO_CLIENT, TO_UPSTREAM), Err(Fallback::PeerClosed));
    }
}

#[test]
fn a_segment_too_large_for_the_other_side_is_not_spliced() {
    // The client's side has a 1400-byte MTU: the upstream may send 1460-byte
    // segments, which would not fit.
    let mut c = client();
    c.options.send_mss = 1348;
    c.options.advertised_mss = 1360;
    assert_eq!(rewrites(&c, &upstream(), TO_CLIENT, TO_UPSTREAM), Err(Fallback::MssDiffers));
    // The other way round: the upstream's side is the smaller one.
    let mut u = upstream();
    u.options.send_mss = 1348;
    u.options.advertised_mss = 1360;
    assert_eq!(rewrites(&client(), &u, TO_CLIENT, TO_UPSTREAM), Err(Fallback::MssDiffers));
    // Without timestamps the sending MSS is the advertised one.
    let (mut c, mut u) = (client(), upstream());
    for o in [&mut c.options, &mut u.options] {
        o.timestamps = false;
        o.send_mss = 1460;
    }
    assert!(rewrites(&c, &u, TO_CLIENT, TO_UPSTREAM).is_ok());
}
