//! Each direction's [`PacketRewrite`] from the two connections' state at the
//! switch. Pure: what the switch read from the proxy's two sockets in, the
//! two flow entries out, or why this connection cannot be spliced.
//!
//! With Sc the proxy's socket to the client and Su its socket to the
//! upstream, both quiescent (nothing unread, unsent or unacknowledged), the
//! client's next byte is Su's next byte, and the upstream's next byte is
//! Sc's next byte: one sequence offset per direction, and the ACKs of one
//! direction use the other's offset negated. Bytes the proxy consumed (a
//! PROXY header) are inside the offset. Timestamps: each peer's TSvals are
//! moved onto the clock of the proxy socket that faced the other peer, so
//! the first rewritten TSval is that socket's clock now and each end's PAWS
//! sees values that keep growing; a TSecr is moved back by the other
//! direction's offset, so it echoes a TSval its receiver sent.

use std::net::SocketAddrV4;

use proxy_common::{PacketFlowKey, PacketRewrite, packet::rewrite_flags};

use super::fallback::Fallback;

/// What the switch read from one of the proxy's sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketState {
    /// The proxy's address of this connection, and its peer's.
    pub local: SocketAddrV4,
    pub remote: SocketAddrV4,
    /// The next sequence number the socket would send (everything before
    /// it acknowledged) and the next it expects (everything before it read).
    pub snd_nxt: u32,
    pub rcv_nxt: u32,
    /// The socket's timestamp clock now, and the last TSval its peer sent.
    pub tsval: u32,
    pub peer_tsval: u32,
    pub options: Negotiated,
    /// Whether the connection is still established both ways (no FIN or RST
    /// received).
    pub established: bool,
}

/// The options a connection negotiated in its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub timestamps: bool,
    /// Microsecond timestamps on this side (a `tcp_usec_ts` route).
    pub usec_timestamps: bool,
    pub sack: bool,
    /// The scale the peer applies to the windows it advertises, and the one
    /// it applies to the windows this socket advertises.
    pub peer_wscale: u8,
    pub own_wscale: u8,
    /// The largest segment payload this socket sends now (its options
    /// taken off), and the MSS it advertised to its peer (what the peer may
    /// send, options included).
    pub send_mss: u32,
    pub advertised_mss: u32,
}

/// Where a rewritten packet leaves: the interface and the Ethernet
/// addresses towards the peer it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// The flow entries of both directions: client → upstream first.
pub fn rewrites(
    client: &SocketState,
    upstream: &SocketState,
    to_client: Hop,
    to_upstream: Hop,
) -> Result<[(PacketFlowKey, PacketRewrite); 2], Fallback> {
    if !(client.established && upstream.established) {
        return Err(Fallback::PeerClosed);
    }
    let (c, u) = (client.options, upstream.options);
    compatible(&c, &u)?;
    let mut flags = 0;
    if c.timestamps {
        flags |= rewrite_flags::TIMESTAMPS;
    }
    if !(c.sack && u.sack) {
        flags |= rewrite_flags::STRIP_SACK;
    }
    let up_seq = upstream.snd_nxt.wrapping_sub(client.rcv_nxt);
    let down_seq = client.snd_nxt.wrapping_sub(upstream.rcv_nxt);
    let up_tsval = upstream.tsval.wrapping_sub(client.peer_tsval);
    let down_tsval = client.tsval.wrapping_sub(upstream.peer_tsval);
    let up = PacketRewrite {
        seq_delta: up_seq,
        ack_delta: down_seq.wrapping_neg(),
        tsval_delta: up_tsval,
        tsecr_delta: down_tsval.wrapping_neg(),
        sender_wscale: c.peer_wscale,
        receiver_wscale: u.own_wscale,
        flags,
        next_seq: u64::from(client.rcv_nxt),
        // The client has acknowledged all Sc sent: all Su received.
        acked: u64::from(upstream.rcv_nxt),
        ..towards(upstream, to_upstream)
    };
    let down = PacketRewrite {
        seq_delta: down_seq,
        ack_delta: up_seq.wrapping_neg(),
        tsval_delta: down_tsval,
        tsecr_delta: up_tsval.wrapping_neg(),
        sender_wscale: u.peer_wscale,
        receiver_wscale: c.own_wscale,
        flags,
        next_seq: u64::from(upstream.rcv_nxt),
        acked: u64::from(client.rcv_nxt),
        ..towards(client, to_client)
    };
    Ok([(arriving(client.local, client.remote), up), (arriving(upstream.local, upstream.remote), down)])
}

/// Bytes the timestamp option takes in every segment (with its padding):
/// what a socket's sending MSS leaves out of the MSS it was advertised.
const TIMESTAMP_OPTION_LEN: u32 = 12;

/// Whether connections that negotiated `client` and `upstream` can be
/// joined: timestamps on both or on neither, on a millisecond clock, and
/// no segment too large for the other side.
pub fn compatible(client: &Negotiated, upstream: &Negotiated) -> Result<(), Fallback> {
    if client.timestamps != upstream.timestamps {
        return Err(Fallback::TimestampsOnOneSide);
    }
    if client.usec_timestamps || upstream.usec_timestamps {
        return Err(Fallback::MicrosecondTimestamps);
    }
    // A segment the peer of one side may send must fit the other side's
    // path: nothing in the program splits a packet.
    let options = if client.timestamps { TIMESTAMP_OPTION_LEN } else { 0 };
    let fits = |advertised: u32, send_mss: u32| advertised <= send_mss + options;
    if !fits(client.advertised_mss, upstream.send_mss) || !fits(upstream.advertised_mss, client.send_mss) {
        return Err(Fallback::MssDiffers);
    }
    Ok(())
}

/// The key of the packets that arrive for the socket from `local` to `remote`.
#[must_use]
pub fn arriving(local: SocketAddrV4, remote: SocketAddrV4) -> PacketFlowKey {
    PacketFlowKey {
        remote_addr: remote.ip().octets(),
        local_addr: local.ip().octets(),
        remote_port: remote.port().to_be_bytes(),
        local_port: local.port().to_be_bytes(),
    }
}

/// A rewrite that sends packets as `socket` would, out of `hop`.
fn towards(socket: &SocketState, hop: Hop) -> PacketRewrite {
    PacketRewrite {
        src_addr: socket.local.ip().octets(),
        dst_addr: socket.remote.ip().octets(),
        src_port: socket.local.port().to_be_bytes(),
        dst_port: socket.remote.port().to_be_bytes(),
        ifindex: hop.ifindex,
        src_mac: hop.src_mac,
        dst_mac: hop.dst_mac,
        ..PacketRewrite::default()
    }
}

#[cfg(test)]
#[path = "rewrite_tests.rs"]
mod tests;
