//! Both ends of a spliced connection reset at once, when the proxy lets go
//! of it before it ended: a stop (the drain timeout), a stalled side, or the
//! proxy's death (see [`super::reset_helper`]).
//!
//! The proxy's own sockets cannot do it: they are silent, and their sequence
//! numbers stopped at the switch. Without a RST a quiet end (a watch) would
//! learn nothing until it next sent. So each end gets one from a socket
//! rebuilt on the same four-tuple in repair mode (`TCP_REPAIR`, as CRIU
//! restores a connection; CAP_NET_ADMIN, which the switch needs too, and no
//! raw socket): its send queue starts at the flow's next byte towards that
//! end (the program's `next_seq`, rewritten), it is connected without a
//! handshake, leaves repair mode without a window probe, and is closed with
//! SO_LINGER 0, which sends the RST at that number. An end that has taken
//! every byte finds it at the edge of its window and is reset. An end with
//! bytes still on their way to it finds it inside the window and answers
//! with a challenge ACK (RFC 5961); that meets no socket and draws the
//! stack's own RST, at the exact number. A RST never answers a RST, and one
//! outside an unrelated connection's window is dropped, so nothing stray
//! comes of it.
//!
//! The tuple must be free: the proxy's socket on it is closed first (repair
//! mode closes it silently); the reset helper, which may find a dying
//! process's socket still on it, tries again for a moment.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsRawFd as _,
};

use nix::{
    errno::Errno,
    libc,
    sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket},
};
use proxy_common::{PacketFlowKey, PacketRewrite, packet::rewrite_flags};

use super::repair::{self, RECV_QUEUE, REPAIR_OFF_NO_WINDOW_PROBE, REPAIR_ON, RepairError, SEND_QUEUE};
use crate::sockopt;

/// Why one end could not be reset.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("resetting {remote} from {local}: {what}: {source}")]
    Socket { local: SocketAddrV4, remote: SocketAddrV4, what: &'static str, source: io::Error },
    #[error("resetting {remote} from {local}: {source}")]
    Repair { local: SocketAddrV4, remote: SocketAddrV4, source: RepairError },
    #[error("resetting {remote} from {local}: {source}")]
    Option { local: SocketAddrV4, remote: SocketAddrV4, source: sockopt::SockoptError },
}

impl ResetError {
    /// Whether the tuple was still held by another socket (one being
    /// closed, as a dying process's are): trying again may succeed.
    #[must_use]
    pub fn tuple_busy(&self) -> bool {
        matches!(self, Self::Socket { what: "connect", source, .. }
            if matches!(source.raw_os_error(), Some(libc::EADDRNOTAVAIL | libc::EADDRINUSE)))
    }
}

/// One end to reset: the tuple its packets carry from the proxy, and the
/// next sequence number it expects and the next it would send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct End {
    pub local: SocketAddrV4,
    pub remote: SocketAddrV4,
    pub seq: u32,
    pub ack: u32,
}

impl End {
    /// The end `rewrite`'s packets go to: its next byte is the furthest the
    /// flow carried, rewritten; what it sent is acknowledged up to the
    /// furthest acknowledgement carried to it.
    #[must_use]
    pub fn receiving(rewrite: &PacketRewrite) -> Self {
        Self {
            local: SocketAddrV4::new(Ipv4Addr::from(rewrite.src_addr), u16::from_be_bytes(rewrite.src_port)),
            remote: SocketAddrV4::new(Ipv4Addr::from(rewrite.dst_addr), u16::from_be_bytes(rewrite.dst_port)),
            // The low 32 bits carry the sequence number (see `PacketRewrite`).
            seq: (rewrite.next_seq as u32).wrapping_add(rewrite.seq_delta),
            ack: rewrite.acked as u32,
        }
    }

    /// Sends this end a RST from a socket rebuilt in repair mode, once; a
    /// tuple still held by another socket fails ([`ResetError::tuple_busy`]).
    pub fn reset(&self) -> Result<(), ResetError> {
        let socket_error = |what, source: Errno| ResetError::Socket {
            local: self.local,
            remote: self.remote,
            what,
            source: source.into(),
        };
        let repair_error = |source| ResetError::Repair { local: self.local, remote: self.remote, source };
        let socket = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
            .map_err(|e| socket_error("socket", e))?;
        repair::tcp_set(&socket, libc::TCP_REPAIR, REPAIR_ON, "TCP_REPAIR on").map_err(repair_error)?;
        for (queue, seq, what) in [(SEND_QUEUE, self.seq, "send"), (RECV_QUEUE, self.ack, "receive")] {
            repair::tcp_set(&socket, libc::TCP_REPAIR_QUEUE, queue, "TCP_REPAIR_QUEUE")
                .map_err(repair_error)?;
            // The option takes the 32 bits of a sequence number as an int.
            let seq = i32::from_ne_bytes(seq.to_ne_bytes());
            repair::tcp_set(&socket, libc::TCP_QUEUE_SEQ, seq, what).map_err(repair_error)?;
        }
        // Repair mode binds a port that is in use (the listener's).
        bind(socket.as_raw_fd(), &SockaddrIn::from(self.local)).map_err(|e| socket_error("bind", e))?;
        connect(socket.as_raw_fd(), &SockaddrIn::from(self.remote))
            .map_err(|e| socket_error("connect", e))?;
        repair::tcp_set(&socket, libc::TCP_REPAIR, REPAIR_OFF_NO_WINDOW_PROBE, "TCP_REPAIR off")
            .map_err(repair_error)?;
        sockopt::reset_on_close(&socket).map_err(|source| ResetError::Option {
            local: self.local,
            remote: self.remote,
            source,
        })?;
        drop(socket);
        Ok(())
    }
}

/// The ends of the connections in `flows` (a snapshot of the flow map) that
/// are spliced and have not ended: both ends of each. Flows still held by a
/// switch, and ended ones, have none (their sockets, or their ends, close
/// the connection).
#[must_use]
pub fn live_ends(flows: &[(PacketFlowKey, PacketRewrite)]) -> Vec<End> {
    let partner_of = |rewrite: &PacketRewrite| {
        let end = End::receiving(rewrite);
        super::rewrite::arriving(end.local, end.remote)
    };
    let mut ends = Vec::new();
    for (_, rewrite) in flows {
        if rewrite.flags & (rewrite_flags::HOLD | rewrite_flags::ENDED) != 0 {
            continue;
        }
        let partner = partner_of(rewrite);
        let Some((_, other)) = flows.iter().find(|(key, _)| *key == partner) else { continue };
        if other.flags & (rewrite_flags::HOLD | rewrite_flags::ENDED) != 0
            || super::flow::ending_of(&[Some(*rewrite), Some(*other)]).is_some()
        {
            continue;
        }
        ends.push(End::receiving(rewrite));
    }
    ends
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(addr: [u8; 4], port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::from(addr), port)
    }

    /// A rewrite for packets arriving from `from` at `at`, sent on from
    /// `via` to `to`.
    fn entry(
        from: SocketAddrV4,
        at: SocketAddrV4,
        via: SocketAddrV4,
        to: SocketAddrV4,
        flags: u16,
    ) -> (PacketFlowKey, PacketRewrite) {
        let rewrite = PacketRewrite {
            src_addr: via.ip().octets(),
            dst_addr: to.ip().octets(),
            src_port: via.port().to_be_bytes(),
            dst_port: to.port().to_be_bytes(),
            seq_delta: 1000,
            next_seq: 0x1_0000_0005,
            acked: 77,
            flags,
            ..PacketRewrite::default()
        };
        (super::super::rewrite::arriving(at, from), rewrite)
    }

    #[test]
    fn an_end_is_reset_at_the_next_byte_the_flow_would_carry_to_it() {
        let (client, front) = (endpoint([10, 0, 0, 1], 40000), endpoint([10, 0, 0, 2], 443));
        let (back, upstream) = (endpoint([10, 0, 1, 2], 50000), endpoint([10, 0, 1, 1], 443));
        let (_, up) = entry(client, front, back, upstream, 0);
        let end = End::receiving(&up);
        assert_eq!(end, End { local: back, remote: upstream, seq: 1005, ack: 77 });
    }

    #[test]
    fn only_spliced_connections_that_have_not_ended_have_ends_to_reset() {
        let (client, front) = (endpoint([10, 0, 0, 1], 40000), endpoint([10, 0, 0, 2], 443));
        let (back, upstream) = (endpoint([10, 0, 1, 2], 50000), endpoint([10, 0, 1, 1], 443));
        let pair = |up_flags, down_flags| {
            vec![
                entry(client, front, back, upstream, up_flags),
                entry(upstream, back, front, client, down_flags),
            ]
        };
        let ends = live_ends(&pair(0, 0));
        let remotes: Vec<_> = ends.iter().map(|e| e.remote).collect();
        assert_eq!(remotes, [upstream, client]);
        assert!(live_ends(&pair(rewrite_flags::HOLD, rewrite_flags::HOLD)).is_empty());
        assert!(live_ends(&pair(0, rewrite_flags::ENDED)).is_empty());
        assert!(live_ends(&pair(0, 0)[..1]).is_empty(), "an entry without its partner");
        let mut reset = pair(0, 0);
        reset[1].1.rst_seen = 1;
        assert!(live_ends(&reset).is_empty(), "a connection already reset");
        let mut finished = pair(0, 0);
        for (_, rewrite) in &mut finished {
            *rewrite = PacketRewrite { fin_seen: 1, fin_seq: 100, acked: 101, ..*rewrite };
        }
        assert!(live_ends(&finished).is_empty(), "a FIN each way, each acknowledged");
    }
}
