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
}

/// Where a rewritten packet leaves: the interface and the Ethernet
/// addresses towards the peer it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// Why a connection is not spliced (the label of its fallback counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotSpliced {
    /// One connection negotiated timestamps and the other did not: the
    /// option cannot be added to or removed from a packet in place.
    TimestampsOnOneSide,
    /// A side uses microsecond timestamps: no offset maps them onto a
    /// millisecond clock.
    MicrosecondTimestamps,
}

impl NotSpliced {
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::TimestampsOnOneSide => "timestamps_on_one_side",
            Self::MicrosecondTimestamps => "microsecond_timestamps",
        }
    }
}

/// The flow entries of both directions: client → upstream first.
pub fn rewrites(
    client: &SocketState,
    upstream: &SocketState,
    to_client: Hop,
    to_upstream: Hop,
) -> Result<[(PacketFlowKey, PacketRewrite); 2], NotSpliced> {
    let (c, u) = (client.options, upstream.options);
    if c.timestamps != u.timestamps {
        return Err(NotSpliced::TimestampsOnOneSide);
    }
    if c.usec_timestamps || u.usec_timestamps {
        return Err(NotSpliced::MicrosecondTimestamps);
    }
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
        next_seq: client.rcv_nxt,
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
        next_seq: upstream.rcv_nxt,
        ..towards(client, to_client)
    };
    Ok([(arriving(client), up), (arriving(upstream), down)])
}

/// The key of the packets that arrive for `socket`.
#[must_use]
pub fn arriving(socket: &SocketState) -> PacketFlowKey {
    PacketFlowKey {
        remote_addr: socket.remote.ip().octets(),
        local_addr: socket.local.ip().octets(),
        remote_port: socket.remote.port().to_be_bytes(),
        local_port: socket.local.port().to_be_bytes(),
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
